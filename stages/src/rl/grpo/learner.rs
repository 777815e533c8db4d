//! GRPO's learner: the policy and its optimiser, and one iteration: the
//! shared rollout over each prompt's group, the group advantages
//! ([`advantages`]) and the clipped policy steps ([`GrpoLearner::update`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use rlhf_datasets::batch::epoch_order;
use rlhf_datasets::rollout::{RolloutRow, RolloutTurn};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use super::math::{
    group_advantages, has_spread, leave_one_out, policy_loss, reinforce_pp, AdvantageEstimator,
};
use super::{GrpoConfig, KlPlacement};
use crate::dist::Ranks;
use crate::model::checkpoint::{HeadChoice, Model};
use crate::model::gpt::Head;
use crate::optim::AdamW;
use crate::rl::driver::{Learner, Outcome, RlState};
use crate::rl::episode::{Environment, Role};
use crate::rl::rollout::{
    answer_logprobs, columns_of, rollout_logprob_diff, rollout_padding_waste, to_rows, Prompts,
    Reference, RolloutInputs, Sampled, Scorer,
};
use crate::rl::step::{optimizer_step, Step};
use crate::train::{
    check_finite, load_training, newest_usable, save_training, trainable_by_name, StageContext,
    StageError, FINAL_DIR,
};

/// GRPO's part of a checkpoint's state: groups sampled, and those whose
/// answers all scored alike.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct GrpoOwn {
    groups: usize,
    zero_spread: usize,
}

type GrpoState = RlState<GrpoOwn>;

/// GRPO as the driver runs it.
pub(super) struct GrpoLearner<'a> {
    cfg: &'a GrpoConfig,
    policy: Model,
    opt: AdamW,
    /// The trained variables by name, for summing gradients over ranks.
    vars: Vec<Tensor>,
    reference: Reference,
    scorer: Scorer,
    /// Multi-turn episodes' environment (`env`), which then scores.
    env: Option<Environment>,
    prompts: Prompts,
    own: GrpoOwn,
    device: Device,
}

impl<'a> GrpoLearner<'a> {
    /// The policy and its optimiser from the newest usable periodic
    /// checkpoint, with the state it saved; else the starting policy (with
    /// fresh adapters under `lora`).
    pub fn start_or_resume(
        cfg: &'a GrpoConfig,
        ctx: &StageContext,
    ) -> Result<(Self, Option<GrpoState>), StageError> {
        let (device, want) = (ctx.device, HeadChoice::Want(Head::Lm));
        let resumed = newest_usable(&ctx.out_dir, |dir| {
            load_training::<GrpoState>(dir, want, device)
        });
        let (policy, moments, state) = match resumed {
            Some((_, _, (m, moments, state))) => (m, Some(moments), Some(state)),
            None => {
                let mut m = Model::load(&cfg.policy, want, device)?;
                if let Some(lora) = &cfg.lora {
                    m.add_lora(lora, &cfg.policy)?;
                }
                (m, None, None)
            }
        };
        let mut opt = AdamW::new(&policy.vs, cfg.optimizer.clone());
        if let Some(m) = &moments {
            opt.load_state_tensors(m)?;
        }
        let reference = Reference::load(cfg.reference.as_deref(), &cfg.policy, &policy, device)?;
        let scorer = match (&cfg.ranker_command, &cfg.reward, &cfg.env) {
            (Some(command), _, _) => Scorer::ranked(command, cfg.ranker_timeout_seconds, ctx)?,
            (None, Some(reward), _) => Scorer::program(reward, ctx)?,
            (None, None, Some(_)) => Scorer::Environment,
            (None, None, None) => Scorer::load(cfg.reward_model.as_deref(), cfg.gold_reward, ctx)?,
        };
        let env = cfg
            .env
            .as_ref()
            .map(|e| Environment::new(e, ctx.env_runner.clone(), &policy, &cfg.policy))
            .transpose()?;
        let prompts = Prompts::load(&cfg.prompts, &policy, cfg.sampling.max_new_tokens)?;
        let learner = Self {
            cfg,
            vars: trainable_by_name(&policy),
            policy,
            opt,
            reference,
            scorer,
            env,
            prompts,
            own: state.as_ref().map(|s| s.own.clone()).unwrap_or_default(),
            device,
        };
        Ok((learner, state))
    }

    /// The iteration's groups: one round of [`Self::round`], or under
    /// `dynamic_sampling_rounds` the groups with spread of up to that many
    /// more rounds (made up with groups without spread where still
    /// short). Also the extra rounds sampled, and the first round's mean
    /// score and reward components (the policy's own, unselected).
    fn rollout(&self, iteration: i64, ranks: &Ranks) -> Result<Rollout, StageError> {
        let cfg = self.cfg;
        let first = self.round(iteration, 0, ranks)?;
        let score = first.scores.iter().sum::<f64>() / first.scores.len().max(1) as f64;
        let components = first.components.clone();
        if cfg.dynamic_sampling_rounds == 0 {
            return Ok(Rollout {
                kept: first,
                extra_rounds: 0,
                score,
                components,
            });
        }
        let (g, want) = (cfg.group_size, cfg.prompts_per_iteration);
        let spread = |r: &Sampled, k: usize| has_spread(&r.scores[k * g..(k + 1) * g]);
        let mut parts = vec![first];
        let mut keep: Vec<(usize, usize)> = vec![];
        loop {
            let last = parts.len() - 1;
            keep.extend(
                (0..want)
                    .filter(|&k| spread(&parts[last], k))
                    .map(|k| (last, k)),
            );
            if keep.len() >= want || last == cfg.dynamic_sampling_rounds {
                break;
            }
            parts.push(self.round(iteration, last as u64 + 1, ranks)?);
        }
        keep.truncate(want);
        // Still short: groups without spread, earliest first.
        let flat = (0..parts.len()).flat_map(|p| (0..want).map(move |k| (p, k)));
        let missing: Vec<(usize, usize)> = flat
            .filter(|&(p, k)| !spread(&parts[p], k))
            .take(want - keep.len())
            .collect();
        keep.extend(missing);
        let pad = self.policy.tokenizer.pad_id();
        let extra = parts.len() - 1;
        let kept = crate::rl::shard::select_groups(&parts, &keep, g, pad);
        Ok(Rollout {
            kept,
            extra_rounds: extra,
            score,
            components,
        })
    }

    /// This rank's share of a round of prompts, each answered `group_size`
    /// times and scored; then every rank's shares gathered. Round 0 takes
    /// the iteration's prompts; later rounds (dynamic sampling) prompts in
    /// an order of their own.
    fn round(&self, iteration: i64, round: u64, ranks: &Ranks) -> Result<Sampled, StageError> {
        let cfg = self.cfg;
        let seed = cfg
            .seed
            .unwrap_or(0)
            .wrapping_add(round.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let chosen = self
            .prompts
            .of_iteration(cfg.prompts_per_iteration, seed, iteration);
        let inputs = RolloutInputs {
            env: self.env.as_ref(),
            policy: &self.policy,
            reference: &self.reference,
            scorer: &self.scorer,
            prompts: &self.prompts,
            sampling: &cfg.sampling,
            group: cfg.group_size,
            device: self.device,
        };
        let mine = inputs.sample(&chosen[ranks.share(chosen.len())], iteration)?;
        crate::rl::shard::gather(mine, ranks, self.policy.tokenizer.pad_id())
    }

    /// `epochs` passes of clipped policy steps over the answers, shuffled
    /// into minibatches that the ranks split by position; mean loss, clip
    /// fraction and KL over the steps.
    fn update(
        &mut self,
        r: &Sampled,
        u: &UpdateInputs,
        step: Step,
    ) -> Result<[f64; 3], StageError> {
        let cfg = self.cfg;
        let device = r.generation.tokens.device();
        let vocab = self.policy.tokenizer.vocab_size() as i64;
        let beta = if cfg.kl_in == KlPlacement::Loss {
            cfg.beta
        } else {
            0.0
        };
        let (b, world) = (r.scores.len(), step.ranks.world());
        let (mut sums, mut steps) = ([0.0; 3], 0.0);
        for epoch in 0..cfg.epochs {
            let perm = epoch_order(
                b,
                cfg.seed.unwrap_or(0) ^ ((step.it as u64) << 16),
                epoch as u64,
            );
            for chunk in perm.chunks(cfg.minibatch_size) {
                let rows = |rows: &[usize]| {
                    Tensor::from_slice(&rows.iter().map(|&i| i as i64).collect::<Vec<_>>())
                        .to_device(device)
                };
                // One process: the whole minibatch, as the loss defines
                // it; several: this rank's positions, as parts of it.
                let whole = (world > 1).then(|| {
                    let tokens = u.mask.index_select(0, &rows(chunk)).sum(Kind::Float);
                    (chunk.len() as f64, tokens.double_value(&[]))
                });
                let idx = rows(&chunk[step.ranks.share(chunk.len())]);
                let g = &r.generation;
                let trim = self.policy.net.has_real_vocabulary();
                let (start, prompt, answer) = columns_of(r, &rows(chunk), trim);
                let cols = |t: &Tensor| t.index_select(0, &idx).narrow(1, start, prompt + answer);
                let sel = |t: &Tensor| t.index_select(0, &idx).narrow(1, 0, answer);
                let (lp, _) = answer_logprobs(
                    &self.policy.net,
                    &cols(&g.tokens),
                    &cols(&g.attention_mask),
                    prompt,
                    vocab,
                );
                let out = policy_loss(
                    &lp,
                    &sel(&r.old_lp),
                    &sel(&r.ref_lp),
                    &sel(&u.advantages),
                    &sel(&u.mask),
                    &cfg.loss_spec(beta),
                    whole,
                );
                let clip = (cfg.max_grad_norm, "policy gradient norm");
                optimizer_step(
                    &mut self.opt,
                    &self.vars,
                    &out.loss,
                    cfg.optimizer.lr,
                    clip,
                    step,
                )?;
                sums[0] += out.loss.double_value(&[]);
                sums[1] += out.clip_fraction;
                sums[2] += out.kl;
                steps += 1.0;
            }
        }
        if world > 1 {
            let s = step.ranks.sum(&sums)?;
            sums = [s[0], s[1], s[2]];
        }
        check_finite(step.it, "GRPO loss", sums[0])?;
        Ok(sums.map(|s| s / steps))
    }

    /// Every answer of the iteration, its advantage on each of its tokens.
    fn rollout_rows(&self, it: i64, r: &Sampled, advantages: &Tensor) -> Vec<RolloutRow> {
        let (lp, rlp): (Vec<Vec<f64>>, Vec<Vec<f64>>) = (to_rows(&r.old_lp), to_rows(&r.ref_lp));
        let adv: Vec<Vec<f64>> = to_rows(advantages);
        (0..r.rows.len())
            .map(|row| {
                let len = r.generation.answers[row].len();
                RolloutRow {
                    iteration: it,
                    prompt: self.prompts.texts[r.rows[row]].clone(),
                    answer: r.answers[row].clone(),
                    token_ids: r.generation.answers[row].clone(),
                    logprobs: lp[row][..len].to_vec(),
                    ref_logprobs: rlp[row][..len].to_vec(),
                    values: vec![],
                    rewards: vec![],
                    advantages: adv[row][..len].to_vec(),
                    returns: vec![],
                    score: r.scores[row],
                    finished: r.generation.finished[row],
                    turns: r.turns[row]
                        .iter()
                        .map(|t| RolloutTurn {
                            role: match t.role {
                                Role::Policy => "policy".into(),
                                Role::Environment => "environment".into(),
                            },
                            text: t.text.clone(),
                            tokens: t.tokens as u32,
                        })
                        .collect(),
                }
            })
            .collect()
    }
}

/// An iteration's answers: the groups kept, how many extra rounds were
/// sampled for them, and the first round's mean score and per-answer
/// reward components (what the policy itself scores, unselected).
struct Rollout {
    kept: Sampled,
    extra_rounds: usize,
    score: f64,
    components: Vec<std::collections::BTreeMap<String, f64>>,
}

/// What the policy steps read besides the rollout: every answer token's
/// advantage and which tokens count in the loss, `(B, N)` on the device.
struct UpdateInputs {
    advantages: Tensor,
    mask: Tensor,
}

/// The scores after DAPO's soft overlong punishment: an answer longer than
/// `max_new_tokens - buffer` tokens loses `(length - (max - buffer)) /
/// buffer`, at most 1.
fn overlong_scores(
    scores: &[f64],
    lengths: &[usize],
    max_new_tokens: i64,
    buffer: usize,
) -> Vec<f64> {
    if buffer == 0 {
        return scores.to_vec();
    }
    let free = max_new_tokens as f64 - buffer as f64;
    scores
        .iter()
        .zip(lengths)
        .map(|(s, &len)| s - ((len as f64 - free) / buffer as f64).clamp(0.0, 1.0))
        .collect()
}

/// Every answer token's advantage `(B, N)` by `cfg.advantage`, on the CPU
/// in f64, and how many groups had no spread (all scores alike). GRPO's
/// advantage is zero in a group without spread, whatever its KL; the
/// KL goes into the score (`kl_in: reward`) as its sum over the answer
/// (k1, as TRL's RLOO), or per token for REINFORCE++.
fn advantages(cfg: &GrpoConfig, r: &Sampled, loss_mask: &Tensor) -> (Tensor, usize) {
    let group = cfg.group_size;
    let lengths: Vec<usize> = r.generation.answers.iter().map(Vec::len).collect();
    let scores = overlong_scores(
        &r.scores,
        &lengths,
        cfg.sampling.max_new_tokens,
        cfg.overlong_buffer,
    );
    // Spread is judged on the scorer's scores (as dynamic sampling does).
    let (_, zero_spread) = group_advantages(&r.scores, group, cfg.scale_rewards);
    let cpu = |t: &Tensor| t.to_device(Device::Cpu).to_kind(Kind::Double);
    // REINFORCE++ whitens over the tokens that count in the loss.
    let mask = cpu(loss_mask);
    let in_reward = cfg.kl_in == KlPlacement::Reward;
    let mut shaped = scores.clone();
    if in_reward {
        let kl = ((&r.old_lp - &r.ref_lp) * &r.answer_mask).sum_dim_intlist(1, false, Kind::Double);
        let kl = Vec::<f64>::try_from(kl.to_device(Device::Cpu)).unwrap_or_default();
        shaped
            .iter_mut()
            .zip(kl)
            .for_each(|(s, k)| *s -= cfg.beta * k);
    }
    let per_answer = |a: Vec<f64>| Tensor::from_slice(&a).unsqueeze(1) * &mask;
    let adv = match cfg.advantage {
        AdvantageEstimator::Grpo => {
            let (mut adv, _) = group_advantages(&shaped, group, cfg.scale_rewards);
            for (a, s) in adv.chunks_mut(group).zip(r.scores.chunks(group)) {
                if !has_spread(s) {
                    a.fill(0.0);
                }
            }
            per_answer(adv)
        }
        AdvantageEstimator::Rloo => per_answer(leave_one_out(&shaped, group)),
        AdvantageEstimator::ReinforcePp | AdvantageEstimator::ReinforcePpBaseline => {
            let base = match cfg.advantage {
                // The score less its group's mean.
                AdvantageEstimator::ReinforcePpBaseline => {
                    group_advantages(&scores, group, false).0
                }
                _ => scores.clone(),
            };
            let kl = match in_reward {
                true => (cpu(&r.old_lp) - cpu(&r.ref_lp)) * cfg.beta,
                false => mask.zeros_like(),
            };
            reinforce_pp(&Tensor::from_slice(&base), &kl, &mask)
        }
    };
    (adv, zero_spread)
}

/// The tokens that count in the loss: every answer token, less answers
/// cut off at `max_new_tokens` under `mask_truncated`.
fn loss_mask(cfg: &GrpoConfig, r: &Sampled) -> Tensor {
    if !cfg.mask_truncated {
        return r.answer_mask.shallow_clone();
    }
    let keep: Vec<f32> = r
        .generation
        .finished
        .iter()
        .map(|&f| f32::from(u8::from(f)))
        .collect();
    &r.answer_mask
        * Tensor::from_slice(&keep)
            .to_device(r.answer_mask.device())
            .unsqueeze(1)
}

impl Learner for GrpoLearner<'_> {
    type Own = GrpoOwn;

    fn policy(&self) -> &Model {
        &self.policy
    }

    fn with_reference<T>(&self, f: impl FnOnce(&Model) -> T) -> T {
        self.reference.with(&self.policy, f)
    }

    fn iterate(
        &mut self,
        iteration: i64,
        ranks: &Ranks,
        rows: bool,
    ) -> Result<Outcome, StageError> {
        let started = Instant::now();
        let Rollout {
            kept: r,
            extra_rounds,
            score: sampled_score,
            components,
        } = self.rollout(iteration, ranks)?;
        let mask = loss_mask(self.cfg, &r);
        let (adv, zero_spread) = advantages(self.cfg, &r, &mask);
        let inputs = UpdateInputs {
            advantages: adv.to_kind(Kind::Float).to_device(self.device),
            mask,
        };
        let generation_seconds = started.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let step = Step {
            it: iteration + 1,
            ranks,
        };
        let [loss, clip_fraction, kl] = self.update(&r, &inputs, step)?;
        let b = r.scores.len() as f64;
        let prompts = self.cfg.prompts_per_iteration;
        self.own.groups += prompts;
        self.own.zero_spread += zero_spread;
        // The policy's tokens (an episode's environment tokens left out).
        let lengths = r.answer_mask.sum(Kind::Double).double_value(&[]);
        let [diff_max, diff_mean] = rollout_logprob_diff(&r);
        let mut record = json!({
            "policy_loss": loss, "clip_fraction": clip_fraction,
            "zero_spread": zero_spread as f64 / prompts as f64,
            "answer_length": lengths / b,
            "rollout_logprob_diff_max": diff_max, "rollout_logprob_diff_mean": diff_mean,
            "padding_waste": rollout_padding_waste(&r),
        });
        if self.cfg.dynamic_sampling_rounds > 0 {
            // `score` is the first round's (the policy's own); the kept
            // groups' is higher by construction.
            record["extra_rounds"] = extra_rounds.into();
            record["kept_score"] = (r.scores.iter().sum::<f64>() / b).into();
        }
        if r.turns.iter().any(|t| !t.is_empty()) {
            let policy_turns = r.turns.iter().flatten().filter(|t| t.role == Role::Policy);
            record["turns"] = (policy_turns.count() as f64 / b).into();
        }
        r.seconds.record(&mut record);
        crate::rl::reward::record_components(&components, &mut record);
        Ok(Outcome {
            mean_score: sampled_score,
            mean_kl: kl,
            record,
            rows: match rows {
                true => self.rollout_rows(iteration + 1, &r, &adv),
                false => vec![],
            },
            generation_seconds,
            training_seconds: t1.elapsed().as_secs_f64(),
            note: format!(" zero-spread groups {zero_spread}/{prompts}"),
        })
    }

    fn own_state(&self) -> GrpoOwn {
        self.own.clone()
    }

    fn save(&self, dir: &Path, state: &GrpoState) -> Result<(), StageError> {
        save_training(dir, &self.policy, &self.opt, state)
    }

    fn save_final(&self, out: &Path, state: &GrpoState) -> Result<(), StageError> {
        save_training(&out.join(FINAL_DIR), &self.policy, &self.opt, state)
    }

    fn summary_fields(&self) -> BTreeMap<String, serde_json::Value> {
        let share = self.own.zero_spread as f64 / self.own.groups.max(1) as f64;
        BTreeMap::from([("zero_spread_share".to_owned(), json!(share))])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlong_answers_lose_up_to_a_point() {
        // At most 10 tokens, a buffer of 4: free up to 6, then -1/4 a token.
        let got = overlong_scores(&[1.0, 1.0, 1.0, 0.5], &[5, 6, 8, 10], 10, 4);
        assert_eq!(got, [1.0, 1.0, 0.5, -0.5]);
        assert_eq!(overlong_scores(&[1.0], &[10], 10, 0), [1.0]);
    }

    /// Under `mask_truncated`, an answer without EOS leaves the loss.
    #[test]
    fn truncated_answers_leave_the_loss_when_asked() {
        let ones = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        let r = Sampled {
            rows: vec![0, 0],
            generation: crate::model::sample::Generation {
                tokens: Tensor::zeros([2, 4], (Kind::Int64, Device::Cpu)),
                attention_mask: Tensor::ones([2, 4], (Kind::Int64, Device::Cpu)),
                prompt_width: 1,
                answers: vec![vec![1, 2], vec![1, 2, 3]],
                finished: vec![true, false],
                logprobs: ones.zeros_like(),
            },
            answer_mask: ones.shallow_clone(),
            old_lp: ones.zeros_like(),
            ref_lp: ones.zeros_like(),
            values: None,
            answers: vec![String::new(); 2],
            scores: vec![0.0, 1.0],
            components: vec![Default::default(); 2],
            turns: vec![vec![]; 2],
            seconds: Default::default(),
        };
        let cfg = GrpoConfig::default();
        assert!(loss_mask(&cfg, &r).equal(&ones));
        let cfg = GrpoConfig {
            mask_truncated: true,
            ..cfg
        };
        let want = Tensor::from_slice(&[1.0f32, 1.0, 1.0, 0.0, 0.0, 0.0]).view([2, 3]);
        assert!(loss_mask(&cfg, &r).equal(&want));
    }
}
