//! GRPO's learner: the policy and its optimiser, and one iteration: the
//! shared rollout over each prompt's group, the group advantages
//! ([`advantages`]) and the clipped policy steps ([`GrpoLearner::update`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use rlhf_datasets::batch::epoch_order;
use rlhf_datasets::rollout::RolloutRow;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use super::math::{group_advantages, grpo_loss_over};
use super::{GrpoConfig, KlPlacement};
use crate::dist::Ranks;
use crate::model::checkpoint::{HeadChoice, Model};
use crate::model::gpt::Head;
use crate::optim::AdamW;
use crate::rl::driver::{Learner, Outcome, RlState};
use crate::rl::rollout::{
    answer_logprobs, columns_of, rollout_logprob_diff, rollout_padding_waste, to_rows,
    trims_minibatches, Prompts, Reference, RolloutInputs, Sampled, Scorer,
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
        let scorer = match &cfg.ranker_command {
            Some(command) => Scorer::ranked(command, cfg.ranker_timeout_seconds, ctx)?,
            None => Scorer::load(cfg.reward_model.as_deref(), cfg.gold_reward, ctx)?,
        };
        let prompts = Prompts::load(&cfg.prompts, &policy, cfg.sampling.max_new_tokens)?;
        let learner = Self {
            cfg,
            vars: trainable_by_name(&policy),
            policy,
            opt,
            reference,
            scorer,
            prompts,
            own: state.as_ref().map(|s| s.own.clone()).unwrap_or_default(),
            device,
        };
        Ok((learner, state))
    }

    /// This rank's share of the iteration's prompts, each answered
    /// `group_size` times and scored; then every rank's shares gathered.
    fn rollout(&self, iteration: i64, ranks: &Ranks) -> Result<Sampled, StageError> {
        let cfg = self.cfg;
        let seed = cfg.seed.unwrap_or(0);
        let chosen = self
            .prompts
            .of_iteration(cfg.prompts_per_iteration, seed, iteration);
        let inputs = RolloutInputs {
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
        advantages: &Tensor,
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
                    let tokens = r.answer_mask.index_select(0, &rows(chunk)).sum(Kind::Float);
                    (chunk.len() as f64, tokens.double_value(&[]))
                });
                let idx = rows(&chunk[step.ranks.share(chunk.len())]);
                let g = &r.generation;
                let trim = trims_minibatches(&self.policy.net);
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
                let out = grpo_loss_over(
                    &lp,
                    &sel(&r.old_lp),
                    &sel(&r.ref_lp),
                    &advantages.index_select(0, &idx),
                    &sel(&r.answer_mask),
                    cfg.clip_range,
                    beta,
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
    fn rollout_rows(&self, it: i64, r: &Sampled, advantages: &[f64]) -> Vec<RolloutRow> {
        let (lp, rlp): (Vec<Vec<f64>>, Vec<Vec<f64>>) = (to_rows(&r.old_lp), to_rows(&r.ref_lp));
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
                    advantages: vec![advantages[row]; len],
                    returns: vec![],
                    score: r.scores[row],
                    finished: r.generation.finished[row],
                }
            })
            .collect()
    }
}

/// Each answer's advantage: its score (less `beta` times its KL where the
/// KL goes in the reward) against its group's; zero in groups whose
/// answers all scored alike, whatever their KL. Also how many such groups.
fn advantages(cfg: &GrpoConfig, r: &Sampled) -> (Vec<f64>, usize) {
    let group = cfg.group_size;
    let (_, zero_spread) = group_advantages(&r.scores, group, cfg.scale_rewards);
    let mut shaped = r.scores.clone();
    if cfg.kl_in == KlPlacement::Reward {
        let kl = ((&r.old_lp - &r.ref_lp) * &r.answer_mask).sum_dim_intlist(1, false, Kind::Double);
        let kl = Vec::<f64>::try_from(kl.to_device(Device::Cpu)).unwrap_or_default();
        shaped
            .iter_mut()
            .zip(kl)
            .for_each(|(s, k)| *s -= cfg.beta * k);
    }
    let (mut adv, _) = group_advantages(&shaped, group, cfg.scale_rewards);
    for (a, s) in adv.chunks_mut(group).zip(r.scores.chunks(group)) {
        if s.iter().all(|&x| x == s[0]) {
            a.fill(0.0);
        }
    }
    (adv, zero_spread)
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
        let r = self.rollout(iteration, ranks)?;
        let (adv, zero_spread) = advantages(self.cfg, &r);
        let adv_t = Tensor::from_slice(&adv)
            .to_kind(Kind::Float)
            .to_device(self.device);
        let generation_seconds = started.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let step = Step {
            it: iteration + 1,
            ranks,
        };
        let [loss, clip_fraction, kl] = self.update(&r, &adv_t, step)?;
        let b = r.scores.len() as f64;
        let prompts = self.cfg.prompts_per_iteration;
        self.own.groups += prompts;
        self.own.zero_spread += zero_spread;
        let lengths = r.generation.answers.iter().map(Vec::len).sum::<usize>() as f64;
        let [diff_max, diff_mean] = rollout_logprob_diff(&r);
        let mut record = json!({
            "policy_loss": loss, "clip_fraction": clip_fraction,
            "zero_spread": zero_spread as f64 / prompts as f64,
            "answer_length": lengths / b,
            "rollout_logprob_diff_max": diff_max, "rollout_logprob_diff_mean": diff_mean,
            "padding_waste": rollout_padding_waste(&r),
        });
        r.seconds.record(&mut record);
        Ok(Outcome {
            mean_score: r.scores.iter().sum::<f64>() / b,
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
