//! Evaluating finished policies on held-out prompts: greedy answers, their
//! gold and reward-model scores, head-to-head tallies against a reference
//! policy, and the KL to that reference measured on sampled answers.
//!
//! Everything here is deterministic for a given seed, so two evaluations of
//! the same run give the same report.

pub mod answer;
pub mod verifiable;

use serde::{Deserialize, Serialize};
use tch::Device;

use crate::error::StageError;
use crate::eval::answer::{answer_prompts, greedy, Judge, ANSWER_BATCH};
use crate::model::checkpoint::Model;
use crate::model::precision::Precision;
use crate::model::sample::SamplingConfig;
use crate::model::score::sequence_logprobs_from;
use crate::objectives::rankings::{reward_sequence, sequence_rewards};

/// How answers are drawn for evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalSettings {
    pub max_new_tokens: i64,
    /// Sampled answers per prompt for the KL estimate.
    pub kl_samples_per_prompt: usize,
    pub batch_size: usize,
    pub seed: i64,
    /// What the models run in (bf16: autocast, as a stage's `precision`).
    #[serde(default)]
    pub precision: Precision,
}

impl Default for EvalSettings {
    fn default() -> Self {
        Self {
            max_new_tokens: 24,
            kl_samples_per_prompt: 4,
            batch_size: ANSWER_BATCH,
            seed: 1,
            precision: Precision::Fp32,
        }
    }
}

/// A policy's greedy answers to the evaluation prompts and their scores,
/// one entry per prompt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyAnswers {
    pub answers: Vec<String>,
    /// Answer length in tokens (EOS included when the answer stopped).
    pub answer_tokens: Vec<usize>,
    pub finished: Vec<bool>,
    /// The judge's score; `None` where it does not know the prompt.
    pub gold: Vec<Option<f64>>,
    /// The reward model's score, where one was given.
    pub reward: Option<Vec<f64>>,
}

/// Head-to-head comparisons of two policies' answers to the same prompts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
}

impl Tally {
    /// Compares `ours[i]` with `theirs[i]`; differences within `tie` are ties.
    pub fn of(ours: &[f64], theirs: &[f64], tie: f64) -> Self {
        let mut t = Tally::default();
        for (a, b) in ours.iter().zip(theirs) {
            if (a - b).abs() <= tie {
                t.ties += 1;
            } else if a > b {
                t.wins += 1;
            } else {
                t.losses += 1;
            }
        }
        t
    }

    /// Wins over the comparisons that were not ties; `None` if all were.
    pub fn win_rate(&self) -> Option<f64> {
        let decided = self.wins + self.losses;
        (decided > 0).then(|| self.wins as f64 / decided as f64)
    }

    /// The Wilson score interval of the win rate at 95% (Wilson, 1927):
    /// how far the rate could move on another draw of prompts. Unlike the
    /// normal approximation it stays inside [0, 1] for rates near 0 or 1.
    pub fn win_rate_interval(&self) -> Option<[f64; 2]> {
        const Z: f64 = 1.959_963_984_540_054;
        let n = (self.wins + self.losses) as f64;
        let p = self.win_rate()?;
        let z2 = Z * Z;
        let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
        let half = Z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
        Some([(centre - half).max(0.0), (centre + half).min(1.0)])
    }
}

/// Greedy answers of `policy` to `prompts`, scored by the judge and, if
/// given, by `reward_model`.
pub fn answer_and_score(
    policy: &Model,
    reward_model: Option<&Model>,
    judge: Option<&Judge>,
    prompts: &[String],
    settings: &EvalSettings,
    device: Device,
) -> Result<PolicyAnswers, StageError> {
    let greedy = greedy(settings.max_new_tokens);
    let answered = answer_prompts(policy, prompts, 1, &greedy, settings.batch_size, device)?;
    let samples = answered.answers.into_iter().zip(answered.finished);
    let tok = &policy.tokenizer;
    let mut out = PolicyAnswers {
        answers: Vec::with_capacity(prompts.len()),
        answer_tokens: Vec::with_capacity(prompts.len()),
        finished: Vec::with_capacity(prompts.len()),
        gold: Vec::with_capacity(prompts.len()),
        reward: None,
    };
    for (p, (answer, finished)) in prompts.iter().zip(samples) {
        let text = tok.decode(&answer, false)?;
        out.gold.push(judge.and_then(|j| j(p, &text)));
        out.answers.push(text);
        out.answer_tokens.push(answer.len());
        out.finished.push(finished);
    }
    if let Some(rm) = reward_model {
        out.reward = Some(reward_scores(rm, prompts, &out.answers, settings, device)?);
    }
    Ok(out)
}

/// Reward-model scores of `answers[i]` to `prompts[i]`, read as the reward
/// model was trained: prompt + answer + EOS, pooled as it was trained. A
/// sequence longer than the model's context keeps its end.
pub fn reward_scores(
    reward_model: &Model,
    prompts: &[String],
    answers: &[String],
    settings: &EvalSettings,
    device: Device,
) -> Result<Vec<f64>, StageError> {
    let limit = reward_model.net.n_positions() as usize;
    let seqs = prompts
        .iter()
        .zip(answers)
        .map(|(p, a)| Ok(reward_sequence(&reward_model.tokenizer, p, a, limit)?.0))
        .collect::<Result<Vec<_>, StageError>>()?;
    Ok(sequence_rewards(
        reward_model,
        &seqs,
        settings.batch_size,
        device,
    ))
}

/// `k` answers to each prompt sampled at temperature 1, the RNG seeded
/// with `settings.seed`: what the KL estimate and a checker's pass@k read.
pub fn sampled_answers(
    policy: &Model,
    prompts: &[String],
    k: usize,
    settings: &EvalSettings,
    device: Device,
) -> Result<answer::Answered, StageError> {
    let sampling = SamplingConfig {
        temperature: 1.0,
        max_new_tokens: settings.max_new_tokens,
        ..SamplingConfig::default()
    };
    tch::manual_seed(settings.seed);
    answer_prompts(policy, prompts, k, &sampling, settings.batch_size, device)
}

/// KL(policy || reference) in nats per answer, estimated on answers sampled
/// from the policy at temperature 1: the mean over samples of
/// `sum_t log p(y_t) - log p_ref(y_t)`, the quantity PPO penalises.
pub fn kl_to_reference(
    policy: &Model,
    reference: &Model,
    prompts: &[String],
    settings: &EvalSettings,
    device: Device,
) -> Result<f64, StageError> {
    let answered = sampled_answers(
        policy,
        prompts,
        settings.kl_samples_per_prompt.max(1),
        settings,
        device,
    )?;
    let seqs: Vec<Vec<i64>> = answered
        .prompt_ids
        .iter()
        .zip(&answered.answers)
        .map(|(p, a)| p.iter().chain(a).copied().collect())
        .collect();
    // Only the answers' positions are scored (logits over a 49k vocabulary
    // for whole prompts would take gigabytes).
    let starts: Vec<usize> = answered.prompt_ids.iter().map(Vec::len).collect();
    let lp = sequence_logprobs_from(&policy.net, &seqs, &starts, settings.batch_size, device);
    let ref_lp =
        sequence_logprobs_from(&reference.net, &seqs, &starts, settings.batch_size, device);
    let total: f64 = lp
        .iter()
        .zip(&ref_lp)
        .map(|(a, b)| a.iter().zip(b).map(|(a, b)| a - b).sum::<f64>())
        .sum();
    Ok(total / answered.answers.len().max(1) as f64)
}

/// Mean of the values that are present; `None` if none are. Each is
/// divided before it is added, so finite values have a finite mean (two
/// scores of 1e308 do not overflow to inf).
pub fn mean_present(xs: &[Option<f64>]) -> Option<f64> {
    let present: Vec<f64> = xs.iter().flatten().copied().collect();
    let n = present.len() as f64;
    (!present.is_empty()).then(|| present.iter().map(|x| x / n).sum::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::checkpoint::Model;

    fn tiny(seed: i64) -> Model {
        crate::tiny_byte_model(seed, 48)
    }

    #[test]
    fn the_mean_of_huge_finite_scores_is_finite() {
        let xs = [Some(1e308), None, Some(1e308), Some(-1e308)];
        let m = mean_present(&xs).unwrap();
        assert!((m - 1e308 / 3.0).abs() < 1e295, "{m}");
        assert_eq!(mean_present(&[None]), None);
    }

    #[test]
    fn tally_counts_wins_ties_losses_and_rate_ignores_ties() {
        let t = Tally::of(&[1.0, 0.5, 0.2, 0.9], &[0.5, 0.5, 0.7, 0.1], 1e-9);
        assert_eq!(
            t,
            Tally {
                wins: 2,
                ties: 1,
                losses: 1
            }
        );
        assert_eq!(t.win_rate(), Some(2.0 / 3.0));
        assert_eq!(Tally::of(&[1.0], &[1.0], 0.0).win_rate(), None);
        assert_eq!(Tally::of(&[1.0], &[1.0], 0.0).win_rate_interval(), None);
        // Wilson's interval for 8 of 10 by hand: 0.4902 to 0.9433.
        let t = Tally {
            wins: 8,
            ties: 5,
            losses: 2,
        };
        let [lo, hi] = t.win_rate_interval().unwrap();
        assert!(
            (lo - 0.4902).abs() < 1e-4 && (hi - 0.9433).abs() < 1e-4,
            "{lo} {hi}"
        );
        let all = Tally {
            wins: 5,
            ties: 0,
            losses: 0,
        };
        let [lo, hi] = all.win_rate_interval().unwrap();
        assert!((lo - 0.5655).abs() < 1e-4 && hi == 1.0, "{lo} {hi}");
    }

    #[test]
    fn kl_on_samples_matches_the_exact_kl_of_one_token_answers() {
        let _rng = crate::rng_lock();
        let (a, b) = (tiny(1), tiny(2));
        // Sharpen b so that the two next-token distributions differ a lot.
        tch::no_grad(|| {
            for (name, mut t) in b.vs.variables() {
                if name.ends_with("wte.weight") {
                    let _ = t.g_mul_scalar_(60.0);
                }
            }
        });
        let prompts = vec!["Upper: cat\n".to_string(), "Reverse: cat\n".into()];
        let settings = EvalSettings {
            max_new_tokens: 1,
            kl_samples_per_prompt: 3000,
            batch_size: 512,
            seed: 7,
            ..EvalSettings::default()
        };
        let same = kl_to_reference(&a, &a, &prompts, &settings, Device::Cpu).unwrap();
        assert!(same.abs() < 1e-9, "{same}");
        let estimate = kl_to_reference(&a, &b, &prompts, &settings, Device::Cpu).unwrap();
        // Exactly: sum_v p(v) (log p(v) - log q(v)) at the prompt's end,
        // averaged over the prompts.
        let mut exact = 0.0;
        for p in &prompts {
            let ids = a.tokenizer.encode(p).unwrap();
            let ids = tch::Tensor::from_slice(&ids).view([1, -1]);
            let last = |m: &Model| {
                m.net
                    .forward_logits(&ids, None, false)
                    .select(1, -1)
                    .log_softmax(-1, tch::Kind::Double)
            };
            let (lp, lq) = (last(&a), last(&b));
            exact += (lp.exp() * (&lp - &lq))
                .sum(tch::Kind::Double)
                .double_value(&[]);
        }
        exact /= prompts.len() as f64;
        assert!(exact > 0.5, "the test needs distinct models: {exact}");
        assert!(
            (estimate - exact).abs() < 0.08 * exact,
            "estimate {estimate} vs exact {exact}"
        );
        let again = kl_to_reference(&a, &b, &prompts, &settings, Device::Cpu).unwrap();
        assert_eq!(estimate, again, "same seed, same estimate");
    }

    #[test]
    fn greedy_answers_are_judged_per_prompt() {
        let _rng = crate::rng_lock();
        let m = tiny(3);
        let prompts = vec!["Upper: cat\n".to_string(), "not a task prompt".into()];
        let settings = EvalSettings {
            max_new_tokens: 5,
            ..EvalSettings::default()
        };
        let judge: Judge = std::sync::Arc::new(rlhf_datasets::task::judge);
        let got =
            answer_and_score(&m, None, Some(&judge), &prompts, &settings, Device::Cpu).unwrap();
        assert_eq!(got.answers.len(), 2);
        assert!(got.gold[0].is_some());
        assert_eq!(got.gold[1], None);
        assert!(got.answer_tokens.iter().all(|&n| n <= 5));
        // The judge's verdict on exactly these answers.
        assert_eq!(
            got.gold[0],
            rlhf_datasets::task::judge(&prompts[0], &got.answers[0])
        );
    }
}
