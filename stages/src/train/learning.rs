//! Did a stage learn? Its numbers set against baselines that know nothing
//! of the task: a model that knows only which answer tokens are common
//! (SFT), chance and "the longer answer wins" (reward models), the
//! starting policy's answers by the judge (SFT, PPO, DPO, GRPO). A stage
//! that does not clear them is flagged: its summary's `flags` say which
//! baseline and the numbers, and `rlhf run` with `fail_if_not_learning`
//! stops before any stage that depends on it.

use std::collections::HashMap;

use rlhf_datasets::batch::TokenizedGroup;

/// The share of its start an eval loss must fall by for a stage to count
/// as learning: a stage stuck at chance (an unlucky seed, labels that say
/// nothing) moves it by a percent or less.
pub const MIN_IMPROVEMENT: f64 = 0.02;

/// The share of the frequency baseline's loss an SFT stage must remove:
/// one that ends above 75% of it learned little beyond which tokens are
/// common (the default experiment's SFT ends at 12% of it: 0.41 nats per
/// answer byte against 3.48).
pub const FREQUENCY_GAIN: f64 = 0.25;

/// A warning when the eval loss fell by less than [`MIN_IMPROVEMENT`] of
/// its start (or rose).
pub fn not_learning(label: &str, start: Option<f64>, end: Option<f64>) -> Option<String> {
    let (start, end) = (start?, end?);
    let fell = (start - end) / start.abs().max(1e-12);
    (fell < MIN_IMPROVEMENT).then(|| {
        format!(
            "{label} may not be learning: its eval loss ended at {end:.4} against {start:.4} at its start or by chance ({:+.1}%; a learning stage falls by at least {:.0}%): check the data, the learning rate and the seed",
            -100.0 * fell,
            100.0 * MIN_IMPROVEMENT
        )
    })
}

/// The loss per token of a model that knows only how often each token
/// occurs among `answers` (the tokens a stage's loss counts): their
/// entropy in nats. `None` without tokens.
pub fn frequency_loss<A: AsRef<[i64]>>(answers: impl IntoIterator<Item = A>) -> Option<f64> {
    let mut counts: HashMap<i64, u64> = HashMap::new();
    let mut total = 0u64;
    for answer in answers {
        for &t in answer.as_ref() {
            *counts.entry(t).or_default() += 1;
            total += 1;
        }
    }
    if total == 0 {
        return None;
    }
    let n = total as f64;
    Some(
        counts
            .values()
            .map(|&c| {
                let p = c as f64 / n;
                -p * p.ln()
            })
            .sum(),
    )
}

/// A flag when an eval loss ends within [`FREQUENCY_GAIN`] of the
/// frequency baseline.
pub fn near_frequency_baseline(
    label: &str,
    eval_loss: Option<f64>,
    frequency: Option<f64>,
) -> Option<String> {
    let (loss, freq) = (eval_loss?, frequency?);
    (loss > (1.0 - FREQUENCY_GAIN) * freq).then(|| {
        format!(
            "{label} did not get clear of the frequency baseline: its eval loss {loss:.4} per answer token against {freq:.4} for a model that knows only how often each answer token occurs ({:.0}% of it; a stage that learns the task ends below {:.0}%): it learned little beyond which tokens are common; try another seed or a higher learning rate",
            100.0 * loss / freq,
            100.0 * (1.0 - FREQUENCY_GAIN)
        )
    })
}

/// A flag when the judge scores a stage's answers no better than the
/// answers it started from (`before`: the same prompts, greedy).
pub fn no_judge_gain(
    label: &str,
    started_from: &str,
    before: Option<f64>,
    after: Option<f64>,
) -> Option<String> {
    let (before, after) = (before?, after?);
    (after <= before).then(|| {
        format!(
            "{label} did not improve by the judge: its answers to the eval prompts score {after:.4} against {before:.4} for {started_from}"
        )
    })
}

/// The pairwise accuracy of "the longer answer wins" (in tokens) over the
/// groups' ranked pairs; an equal length counts as a coin flip (one half).
/// `None` without pairs.
pub fn length_accuracy(groups: &[&TokenizedGroup]) -> Option<f64> {
    let (mut right, mut pairs) = (0.0, 0usize);
    for g in groups {
        for &(better, worse) in &g.pairs {
            let (b, w) = (g.responses[better].len(), g.responses[worse].len());
            right += match b.cmp(&w) {
                std::cmp::Ordering::Greater => 1.0,
                std::cmp::Ordering::Equal => 0.5,
                std::cmp::Ordering::Less => 0.0,
            };
            pairs += 1;
        }
    }
    (pairs > 0).then(|| right / pairs as f64)
}

/// The flags found, each logged as a warning, on the rank that writes
/// (`main`); none on the others.
pub fn flags(main: bool, found: impl IntoIterator<Item = Option<String>>) -> Vec<String> {
    if !main {
        return vec![];
    }
    let flags: Vec<String> = found.into_iter().flatten().collect();
    for f in &flags {
        tracing::warn!("{f}");
    }
    flags
}

/// Chance for a pairwise accuracy.
pub const CHANCE_ACCURACY: f64 = 0.5;

/// A flag when a reward model's held-out accuracy is no better than
/// chance or than the length-only rule.
pub fn below_accuracy_baselines(
    label: &str,
    accuracy: Option<f64>,
    length: Option<f64>,
) -> Option<String> {
    let acc = accuracy?;
    if acc <= CHANCE_ACCURACY {
        return Some(format!(
            "{label} ranks held-out answers no better than chance: pairwise accuracy {acc:.4} against {CHANCE_ACCURACY}"
        ));
    }
    let length = length?;
    (acc <= length).then(|| {
        format!(
            "{label} ranks held-out answers no better than \"the longer answer wins\": pairwise accuracy {acc:.4} against {length:.4} for that rule"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frequency_baseline_is_the_answer_tokens_entropy() {
        // Tokens 1, 1, 2, 3: p = 1/2, 1/4, 1/4.
        let answers: [&[i64]; 2] = [&[1, 2], &[1, 3]];
        let h = frequency_loss(answers).unwrap();
        let by_hand = -(0.5f64 * 0.5f64.ln() + 2.0 * 0.25 * 0.25f64.ln());
        assert!((h - by_hand).abs() < 1e-12, "{h} vs {by_hand}");
        assert_eq!(frequency_loss(std::iter::empty::<Vec<i64>>()), None);
        // One token alone: nothing to learn beyond its frequency.
        assert_eq!(frequency_loss([&[7i64, 7][..]]), Some(0.0));
    }

    #[test]
    fn a_loss_near_the_frequency_baseline_is_flagged() {
        let flag = near_frequency_baseline("sft", Some(2.54), Some(2.9)).unwrap();
        assert!(flag.contains("2.5400") && flag.contains("2.9000"), "{flag}");
        assert!(flag.contains("88%"), "{flag}");
        assert_eq!(near_frequency_baseline("sft", Some(0.64), Some(2.9)), None);
        assert_eq!(near_frequency_baseline("sft", None, Some(2.9)), None);
    }

    #[test]
    fn the_judge_flags_no_gain() {
        assert!(no_judge_gain("ppo", "SFT", Some(0.7), Some(0.7)).is_some());
        assert!(no_judge_gain("ppo", "SFT", Some(0.7), Some(0.69)).is_some());
        assert_eq!(no_judge_gain("ppo", "SFT", Some(0.7), Some(0.8)), None);
        assert_eq!(no_judge_gain("ppo", "SFT", None, Some(0.8)), None);
    }

    #[test]
    fn a_reward_model_is_set_against_chance_and_length() {
        let flag = below_accuracy_baselines("rm", Some(0.58), Some(0.6)).unwrap();
        assert!(flag.contains("longer") && flag.contains("0.6000"), "{flag}");
        assert!(below_accuracy_baselines("rm", Some(0.5), None)
            .unwrap()
            .contains("chance"));
        assert_eq!(below_accuracy_baselines("rm", Some(0.9), Some(0.49)), None);
    }
}
