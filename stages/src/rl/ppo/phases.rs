//! PPO's phases, each a function with plain data in and out: [`rollout`]
//! (generate and score), [`experience`] (token rewards, advantages) and
//! [`update`] (minibatch epochs), run in turn by [`Iteration::run`]; and
//! the models they work on, loaded, resumed and saved by [`Models`].

use std::path::Path;
use std::time::Instant;

use rlhf_datasets::atomic;
use rlhf_datasets::batch::{collate, epoch_order, tokenize_pairs, TokenizedPair};
use rlhf_datasets::load::read_table;
use rlhf_datasets::rollout::{write_rollouts, RolloutRow};
use rlhf_datasets::schema::{sft_records, ChatTemplate};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use super::math::{
    clipped_surrogate_over, clipped_value_loss_over, explained_variance, gae, kl_estimate,
    masked_mean_over, token_rewards, whiten, KlController,
};
use super::{PpoConfig, PpoState, PpoSummary};
use crate::dist::Ranks;
use crate::eval::answer::JudgedScore;
use crate::model::checkpoint::{HeadChoice, Model};
use crate::model::gpt::Head;
use crate::model::network::Network;
use crate::model::sample::{generate, Generation, TokenSpec};
use crate::objectives::nll::masked_nll_sum;
use crate::optim::AdamW;
use crate::rl::rollout::{answer_logprobs, prompts_with_room, Scorer};
use crate::train::{
    check_finite, load_training, newest_usable, save_training, trainable_by_name, StageContext,
    StageError, FINAL_DIR,
};

/// The critic's folder, beside the policy's `checkpoint/`, and inside a
/// periodic checkpoint beside `policy/`.
const CRITIC_DIR: &str = "critic";
const POLICY_DIR: &str = "policy";

/// The policy and critic that PPO trains, their optimisers, the frozen
/// reference and the scorer.
pub(super) struct Models {
    pub policy: Model,
    pub critic: Model,
    /// `None`: the policy with its LoRA adapters off.
    reference: Option<Model>,
    popt: AdamW,
    copt: AdamW,
    scorer: Scorer,
    /// The trained variables by name, for summing gradients over ranks.
    policy_vars: Vec<Tensor>,
    critic_vars: Vec<Tensor>,
}

impl Models {
    /// Resumes the trained models from the newest usable periodic
    /// checkpoint, or loads them from the config's starting points.
    pub fn start_or_resume(
        cfg: &PpoConfig,
        ctx: &StageContext,
    ) -> Result<(Self, Option<PpoState>), StageError> {
        let device = ctx.device;
        let resume = newest_usable(&ctx.out_dir, |dir| load_resume_point(dir, cfg, device));
        let (policy, critic, popt, copt, state) = match resume {
            Some((_, _, (p, c, popt, copt, state))) => (p, c, popt, copt, Some(state)),
            None => {
                let mut p = Model::load(&cfg.policy, HeadChoice::Want(Head::Lm), device)?;
                let critic_init = cfg
                    .critic
                    .as_deref()
                    .or(cfg.reward_model.as_deref().filter(|_| !cfg.gold_reward))
                    .unwrap_or(&cfg.policy);
                let mut c = Model::load(critic_init, HeadChoice::Want(Head::Scalar), device)?;
                if let Some(lora) = &cfg.lora {
                    p.add_lora(lora, &cfg.policy)?;
                    c.add_lora(lora, critic_init)?;
                }
                let popt = AdamW::new(&p.vs, cfg.policy_optimizer.clone());
                let copt = AdamW::new(&c.vs, cfg.critic_optimizer.clone());
                (p, c, popt, copt, None)
            }
        };
        let reference = match (&cfg.reference, &policy.lora) {
            // The adapters' base is the starting policy: the reference.
            (None, Some(_)) => None,
            (r, _) => {
                let dir = r.as_deref().unwrap_or(&cfg.policy);
                let mut m = Model::load(dir, HeadChoice::Want(Head::Lm), device)?;
                m.vs.freeze();
                Some(m)
            }
        };
        let rm = cfg.reward_model.as_deref();
        let scorer = Scorer::load(rm, cfg.gold_reward, ctx)?;
        let models = Self {
            policy_vars: trainable_by_name(&policy),
            critic_vars: trainable_by_name(&critic),
            policy,
            critic,
            reference,
            popt,
            copt,
            scorer,
        };
        Ok((models, state))
    }

    /// Runs `f` on the frozen reference: its own model, or the policy with
    /// its adapters off.
    pub fn with_reference<T>(&self, f: impl FnOnce(&Model) -> T) -> T {
        match &self.reference {
            Some(r) => f(r),
            None => self.policy.net.without_adapters(|| f(&self.policy)),
        }
    }

    /// A periodic checkpoint: `policy/` and `critic/` in one folder, whole.
    pub fn save(&self, dir: &Path, state: &PpoState) -> Result<(), StageError> {
        atomic::write_dir(dir, |tmp| -> Result<(), StageError> {
            save_training(&tmp.join(POLICY_DIR), &self.policy, &self.popt, state)?;
            save_training(&tmp.join(CRITIC_DIR), &self.critic, &self.copt, state)
        })
    }

    /// The final policy in `checkpoint/` (what later stages read), the
    /// critic in `critic/`.
    pub fn save_final(&self, out: &Path, state: &PpoState) -> Result<(), StageError> {
        save_training(&out.join(FINAL_DIR), &self.policy, &self.popt, state)?;
        save_training(&out.join(CRITIC_DIR), &self.critic, &self.copt, state)
    }
}

/// Policy, critic, their optimisers and the state of a periodic checkpoint.
type ResumePoint = (Model, Model, AdamW, AdamW, PpoState);

fn load_resume_point(
    dir: &Path,
    cfg: &PpoConfig,
    device: Device,
) -> Result<ResumePoint, StageError> {
    let (p, pm, state): (Model, _, PpoState) =
        load_training(&dir.join(POLICY_DIR), HeadChoice::Want(Head::Lm), device)?;
    let (c, cm, _): (Model, _, PpoState) = load_training(
        &dir.join(CRITIC_DIR),
        HeadChoice::Want(Head::Scalar),
        device,
    )?;
    let mut popt = AdamW::new(&p.vs, cfg.policy_optimizer.clone());
    popt.load_state_tensors(&pm)?;
    let mut copt = AdamW::new(&c.vs, cfg.critic_optimizer.clone());
    copt.load_state_tensors(&cm)?;
    Ok((p, c, popt, copt, state))
}

/// The prompts to roll out on, tokenized, and the PPO-ptx demonstrations.
pub(super) struct Data {
    prompts: Vec<String>,
    prompt_ids: Vec<Vec<i64>>,
    ptx: Vec<TokenizedPair>,
}

impl Data {
    pub fn load(cfg: &PpoConfig, policy: &Model) -> Result<Self, StageError> {
        let (prompts, prompt_ids) =
            prompts_with_room(&cfg.prompts, policy, cfg.sampling.max_new_tokens)?;
        let tok = &policy.tokenizer;
        let chat = ChatTemplate::for_tokenizer(tok);
        let n_positions = policy.net.n_positions();
        let ptx = match &cfg.ptx {
            Some(ptx) => {
                let table = read_table(&ptx.data)?;
                let records = sft_records(&table, &ptx.data, &chat)?;
                tokenize_pairs(&records, tok, n_positions as usize)?.0
            }
            None => vec![],
        };
        Ok(Self {
            prompts,
            prompt_ids,
            ptx,
        })
    }
}

/// Phase 1's output: sampled answers, how the policy, the reference and the
/// critic see them, and their scores.
pub(super) struct Rollout {
    /// Which prompts of [`Data`] were answered.
    pub batch_idx: Vec<usize>,
    pub generation: Generation,
    /// `(B, N)`: 1 on the answers' real tokens.
    pub answer_mask: Tensor,
    pub old_lp: Tensor,
    pub ref_lp: Tensor,
    pub old_values: Tensor,
    pub answers: Vec<String>,
    /// Scores after `reward_clip`.
    pub scores: Vec<f64>,
}

/// Phase 1: answers to this iteration's prompts, sampled from the policy
/// (libtorch's RNG is seeded by the caller), and scored.
fn rollout(
    models: &Models,
    data: &Data,
    cfg: &PpoConfig,
    iteration: i64,
    ranks: &Ranks,
    device: Device,
) -> Result<Rollout, StageError> {
    let per_epoch = (data.prompts.len() / cfg.rollout_batch).max(1) as i64;
    let (epoch, pos) = (iteration / per_epoch, (iteration % per_epoch) as usize);
    let order = epoch_order(data.prompts.len(), cfg.seed.unwrap_or(0), epoch as u64);
    let batch: Vec<usize> = order
        .iter()
        .skip(pos * cfg.rollout_batch)
        .take(cfg.rollout_batch)
        .copied()
        .collect();
    // This rank's share of the batch (all of it for one process).
    let batch_idx = batch[ranks.share(batch.len())].to_vec();
    let prompt_ids: Vec<Vec<i64>> = batch_idx
        .iter()
        .map(|&i| data.prompt_ids[i].clone())
        .collect();
    let tok = &models.policy.tokenizer;
    let g = generate(
        &models.policy.net,
        &prompt_ids,
        &cfg.sampling,
        TokenSpec::of(tok),
        device,
    )?;
    let (width, vocab) = (g.prompt_width, tok.vocab_size() as i64);
    let n = g.tokens.size()[1] - width;
    let answer_mask = g.attention_mask.narrow(1, width, n).to_kind(Kind::Float);
    let (old_lp, ref_lp, old_values) = tch::no_grad(|| {
        let (lp, _) = answer_logprobs(
            &models.policy.net,
            &g.tokens,
            &g.attention_mask,
            width,
            vocab,
        );
        let (rlp, _) = models.with_reference(|r| {
            answer_logprobs(&r.net, &g.tokens, &g.attention_mask, width, vocab)
        });
        let v = answer_values(&models.critic.net, &g.tokens, &g.attention_mask, width);
        (lp, rlp, v)
    });
    let answers: Vec<String> = g
        .answers
        .iter()
        .map(|a| tok.decode(a, false))
        .collect::<Result<_, _>>()?;
    let prompts: Vec<&str> = batch_idx
        .iter()
        .map(|&i| data.prompts[i].as_str())
        .collect();
    let mut scores = models
        .scorer
        .score(&prompt_ids, &prompts, &g.answers, &answers, device);
    if let Some(c) = cfg.reward_clip {
        scores.iter_mut().for_each(|s| *s = s.clamp(-c, c));
    }
    let mean = scores.iter().sum::<f64>() / scores.len() as f64;
    check_finite(iteration + 1, "reward-model score", mean)?;
    Ok(Rollout {
        batch_idx,
        generation: g,
        answer_mask,
        old_lp,
        ref_lp,
        old_values,
        answers,
        scores,
    })
}

/// Phase 2's output, per answer (rows) and token, on the CPU.
struct Experience {
    lp_rows: Vec<Vec<f64>>,
    ref_rows: Vec<Vec<f64>>,
    v_rows: Vec<Vec<f64>>,
    lens: Vec<usize>,
    rewards: Vec<Vec<f64>>,
    advantages: Vec<Vec<f64>>,
    returns: Vec<Vec<f64>>,
    /// Mean KL to the reference per answer (nats).
    mean_kl: f64,
}

/// Phase 2: per-token rewards (KL penalty at `beta` plus the score), GAE
/// advantages and returns, advantages whitened over the batch.
fn experience(r: &Rollout, cfg: &PpoConfig, beta: f64) -> Experience {
    let (lp_rows, ref_rows, v_rows) = (
        to_rows(&r.old_lp),
        to_rows(&r.ref_lp),
        to_rows(&r.old_values),
    );
    let lens: Vec<usize> = r.generation.answers.iter().map(Vec::len).collect();
    let (mut rewards, mut advantages, mut returns, mut kl_sum) = (vec![], vec![], vec![], 0.0);
    for (row, &len) in lens.iter().enumerate() {
        let kl_tokens = kl_estimate(
            &lp_rows[row][..len],
            &ref_rows[row][..len],
            cfg.kl_estimator,
        );
        kl_sum += kl_tokens.iter().sum::<f64>();
        let finished = r.generation.finished[row];
        let reward = token_rewards(
            &kl_tokens,
            beta,
            r.scores[row],
            finished,
            cfg.missing_eos_penalty,
        );
        let (a, ret) = gae(&reward, &v_rows[row][..len], cfg.gamma, cfg.lam);
        rewards.push(reward);
        advantages.push(a);
        returns.push(ret);
    }
    if cfg.whiten_advantages {
        let mut flat: Vec<f64> = advantages.iter().flatten().copied().collect();
        whiten(&mut flat);
        let mut rest = flat.as_slice();
        for a in &mut advantages {
            let (head, tail) = rest.split_at(a.len());
            a.copy_from_slice(head);
            rest = tail;
        }
    }
    Experience {
        mean_kl: kl_sum / lens.len() as f64,
        lp_rows,
        ref_rows,
        v_rows,
        lens,
        rewards,
        advantages,
        returns,
    }
}

/// Sums over an iteration's minibatch updates.
#[derive(Debug, Default)]
struct UpdateStats {
    policy_loss: f64,
    value_loss: f64,
    entropy: f64,
    clip_fraction: f64,
    approx_kl: f64,
    ptx_loss: f64,
    updates: f64,
}

impl UpdateStats {
    /// Each rank's losses are its parts of the minibatches' means: their
    /// sums over the ranks are the means.
    fn sum_over(&mut self, ranks: &Ranks) -> Result<(), StageError> {
        if ranks.world() == 1 {
            return Ok(());
        }
        let s = ranks.sum(&[
            self.policy_loss,
            self.value_loss,
            self.entropy,
            self.clip_fraction,
            self.approx_kl,
        ])?;
        [
            self.policy_loss,
            self.value_loss,
            self.entropy,
            self.clip_fraction,
            self.approx_kl,
        ] = [s[0], s[1], s[2], s[3], s[4]];
        Ok(())
    }
}

/// One minibatch of a rollout (this rank's part of it), on the device.
struct Minibatch {
    tokens: Tensor,
    attention: Tensor,
    mask: Tensor,
    /// The answer tokens of the whole minibatch, over every rank: losses
    /// are means over them.
    count: Tensor,
    old_lp: Tensor,
    old_values: Tensor,
    advantages: Tensor,
    returns: Tensor,
}

/// Phase 3: `ppo_epochs` passes over the rollout in shuffled minibatches,
/// each a clipped policy step (plus PPO-ptx) and a clipped value step.
fn update(
    models: &mut Models,
    data: &Data,
    r: &Rollout,
    exp: &Experience,
    cfg: &PpoConfig,
    iteration: i64,
    ranks: &Ranks,
) -> Result<UpdateStats, StageError> {
    let it = iteration + 1;
    let device = r.generation.tokens.device();
    let b = r.batch_idx.len();
    let n = r.answer_mask.size()[1] as usize;
    let (adv_t, ret_t) = (
        from_rows(&exp.advantages, n, device),
        from_rows(&exp.returns, n, device),
    );
    let mut stats = UpdateStats::default();
    let mut ptx_cursor = (iteration as usize * cfg.ppo_epochs * b.div_ceil(cfg.minibatch_size))
        % data.ptx.len().max(1);
    for epoch in 0..cfg.ppo_epochs {
        let perm = epoch_order(b, cfg.seed.unwrap_or(0) ^ (it as u64) << 16, epoch as u64);
        for chunk in perm.chunks(cfg.minibatch_size) {
            let rows = |rows: &[usize]| {
                Tensor::from_slice(&rows.iter().map(|&i| i as i64).collect::<Vec<_>>())
                    .to_device(device)
            };
            let count = r.answer_mask.index_select(0, &rows(chunk)).sum(Kind::Float);
            // Every rank holds the whole rollout and takes its positions
            // of each minibatch.
            let idx = rows(&chunk[ranks.share(chunk.len())]);
            let sel = |t: &Tensor| t.index_select(0, &idx);
            let mb = Minibatch {
                tokens: sel(&r.generation.tokens),
                attention: sel(&r.generation.attention_mask),
                mask: sel(&r.answer_mask),
                count,
                old_lp: sel(&r.old_lp),
                old_values: sel(&r.old_values),
                advantages: sel(&adv_t),
                returns: sel(&ret_t),
            };
            let step = Step { it, ranks };
            policy_step(
                models,
                data,
                &mb,
                r.generation.prompt_width,
                cfg,
                &mut ptx_cursor,
                &mut stats,
                step,
            )?;
            critic_step(
                models,
                &mb,
                r.generation.prompt_width,
                cfg,
                &mut stats,
                step,
            )?;
            stats.updates += 1.0;
        }
    }
    stats.sum_over(ranks)?;
    check_finite(it, "policy loss", stats.policy_loss)?;
    check_finite(it, "value loss", stats.value_loss)?;
    Ok(stats)
}

/// One clipped-surrogate step of the policy, with the entropy bonus and
/// the PPO-ptx language-model loss when set.
#[allow(clippy::too_many_arguments)]
fn policy_step(
    models: &mut Models,
    data: &Data,
    mb: &Minibatch,
    width: i64,
    cfg: &PpoConfig,
    ptx_cursor: &mut usize,
    stats: &mut UpdateStats,
    step: Step,
) -> Result<(), StageError> {
    let vocab = models.policy.tokenizer.vocab_size() as i64;
    let (new_lp, logits) =
        answer_logprobs(&models.policy.net, &mb.tokens, &mb.attention, width, vocab);
    let (pg_loss, clipfrac, approx_kl) = clipped_surrogate_over(
        &new_lp,
        &mb.old_lp,
        &mb.advantages,
        &mb.mask,
        &mb.count,
        cfg.clip_range,
    );
    let entropy = {
        let logp = logits.log_softmax(-1, Kind::Float);
        masked_mean_over(
            &-(logp.exp() * &logp).sum_dim_intlist(-1, false, Kind::Float),
            &mb.mask,
            &mb.count,
        )
    };
    let mut loss = &pg_loss - cfg.entropy_coef * &entropy;
    if let Some(ptx) = &cfg.ptx {
        let rows: Vec<&TokenizedPair> = (0..ptx.batch_size)
            .map(|k| &data.ptx[(*ptx_cursor + k) % data.ptx.len()])
            .collect();
        *ptx_cursor = (*ptx_cursor + ptx.batch_size) % data.ptx.len();
        let batch = collate(&rows, models.policy.tokenizer.pad_id());
        let device = mb.tokens.device();
        let (nll, count) = masked_nll_sum(&models.policy.net, &batch, device, false);
        let ptx_loss = nll / count;
        stats.ptx_loss += ptx_loss.double_value(&[]);
        loss += ptx.coef * ptx_loss;
    }
    let lr = cfg.policy_optimizer.lr;
    let clip = (cfg.max_grad_norm, "policy gradient norm");
    let vars = &models.policy_vars;
    optimizer_step(&mut models.popt, vars, &loss, lr, clip, step)?;
    stats.policy_loss += pg_loss.double_value(&[]);
    stats.entropy += entropy.double_value(&[]);
    stats.clip_fraction += clipfrac;
    stats.approx_kl += approx_kl;
    Ok(())
}

/// One clipped value step of the critic.
fn critic_step(
    models: &mut Models,
    mb: &Minibatch,
    width: i64,
    cfg: &PpoConfig,
    stats: &mut UpdateStats,
    step: Step,
) -> Result<(), StageError> {
    let new_v = answer_values(&models.critic.net, &mb.tokens, &mb.attention, width);
    let vf_loss = clipped_value_loss_over(
        &new_v,
        &mb.old_values,
        &mb.returns,
        &mb.mask,
        &mb.count,
        cfg.clip_range_value,
    );
    let lr = cfg.critic_optimizer.lr;
    let clip = (cfg.max_grad_norm, "critic gradient norm");
    let vars = &models.critic_vars;
    optimizer_step(&mut models.copt, vars, &vf_loss, lr, clip, step)?;
    stats.value_loss += vf_loss.double_value(&[]);
    Ok(())
}

/// Which iteration an update belongs to, and the ranks it is shared by.
#[derive(Clone, Copy)]
struct Step<'a> {
    it: i64,
    ranks: &'a Ranks,
}

/// Backward, the gradients of `vars` summed over the ranks, global-norm
/// clipping to `clip.0` (the norm must be finite; `clip.1` names it), and
/// an AdamW step at `lr`.
fn optimizer_step(
    opt: &mut AdamW,
    vars: &[Tensor],
    loss: &Tensor,
    lr: f64,
    clip: (f64, &'static str),
    step: Step,
) -> Result<(), StageError> {
    opt.zero_grad();
    loss.backward();
    step.ranks.sum_gradients(vars)?;
    let norm = opt.clip_grad_norm(clip.0);
    check_finite(step.it, clip.1, norm)?;
    opt.step(lr);
    Ok(())
}

/// One iteration, phase by phase, and what it measured.
pub(super) struct Iteration {
    /// 1-based.
    it: i64,
    rollout: Rollout,
    exp: Experience,
    stats: UpdateStats,
    pub mean_score: f64,
    pub mean_kl: f64,
    generation_seconds: f64,
    training_seconds: f64,
    started: Instant,
}

impl Iteration {
    pub fn run(
        models: &mut Models,
        data: &Data,
        cfg: &PpoConfig,
        beta: f64,
        iteration: i64,
        ranks: &Ranks,
        device: Device,
    ) -> Result<Self, StageError> {
        let started = Instant::now();
        let rollout = rollout(models, data, cfg, iteration, ranks, device)?;
        let rollout = super::shard::gather(rollout, ranks, models.policy.tokenizer.pad_id())?;
        let exp = experience(&rollout, cfg, beta);
        let generation_seconds = started.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let stats = update(models, data, &rollout, &exp, cfg, iteration, ranks)?;
        let training_seconds = t1.elapsed().as_secs_f64();
        let b = rollout.scores.len() as f64;
        Ok(Self {
            it: iteration + 1,
            mean_score: rollout.scores.iter().sum::<f64>() / b,
            mean_kl: exp.mean_kl,
            rollout,
            exp,
            stats,
            generation_seconds,
            training_seconds,
            started,
        })
    }

    /// Progress: the bar's position and message, and every 5th iteration
    /// (and the last of `iterations`) a log line; `beta` is the KL
    /// coefficient its rewards used.
    pub fn show(&self, bar: &indicatif::ProgressBar, iterations: i64, beta: f64) {
        let (score, kl) = (self.mean_score, self.mean_kl);
        bar.set_position(self.it as u64);
        bar.set_message(format!("score {score:.3} kl {kl:.2}"));
        if self.it % 5 == 0 || self.it == iterations {
            tracing::info!(
                "ppo: iteration {}/{iterations} score {score:.4} kl {kl:.3} beta {beta:.4}",
                self.it
            );
        }
    }

    pub fn batch_size(&self) -> usize {
        self.rollout.batch_idx.len()
    }

    /// The iteration's line of `metrics.jsonl`; `beta` is the KL
    /// coefficient its rewards used.
    pub fn record(&self, tallies: &Tallies, beta: f64) -> serde_json::Value {
        let (s, e) = (&self.stats, &self.exp);
        let b = self.batch_size() as f64;
        let flat_ret: Vec<f64> = e.returns.iter().flatten().copied().collect();
        let flat_v: Vec<f64> = e
            .v_rows
            .iter()
            .zip(&e.lens)
            .flat_map(|(v, &l)| v[..l].to_vec())
            .collect();
        let finished = self
            .rollout
            .generation
            .finished
            .iter()
            .filter(|&&f| f)
            .count();
        json!({
            "step": self.it, "iteration": self.it, "score": self.mean_score, "kl": self.mean_kl,
            "beta": beta, "policy_loss": s.policy_loss / s.updates,
            "value_loss": s.value_loss / s.updates, "entropy": s.entropy / s.updates,
            "clip_fraction": s.clip_fraction / s.updates, "approx_kl": s.approx_kl / s.updates,
            "explained_variance": explained_variance(&flat_v, &flat_ret),
            "answer_length": e.lens.iter().sum::<usize>() as f64 / b,
            "finished_fraction": finished as f64 / b,
            "ptx_loss": if tallies.ptx { json!(s.ptx_loss / s.updates) } else { json!(null) },
            "generation_seconds": tallies.generation_seconds,
            "training_seconds": tallies.training_seconds,
            // Rollout, scoring and update of this iteration alone.
            "iteration_seconds": self.started.elapsed().as_secs_f64(),
        })
    }

    /// Every answer of the iteration with its per-token numbers, as Parquet.
    pub fn save_rollouts(&self, data: &Data, path: &Path) -> Result<(), StageError> {
        let (r, e) = (&self.rollout, &self.exp);
        let rows: Vec<RolloutRow> = (0..self.batch_size())
            .map(|row| {
                let len = e.lens[row];
                RolloutRow {
                    iteration: self.it,
                    prompt: data.prompts[r.batch_idx[row]].clone(),
                    answer: r.answers[row].clone(),
                    token_ids: r.generation.answers[row].clone(),
                    logprobs: e.lp_rows[row][..len].to_vec(),
                    ref_logprobs: e.ref_rows[row][..len].to_vec(),
                    values: e.v_rows[row][..len].to_vec(),
                    rewards: e.rewards[row].clone(),
                    advantages: e.advantages[row].clone(),
                    returns: e.returns[row].clone(),
                    score: r.scores[row],
                    finished: r.generation.finished[row],
                }
            })
            .collect();
        write_rollouts(path, &rows)?;
        Ok(())
    }
}

/// What the run reports across iterations.
#[derive(Debug)]
pub(super) struct Tallies {
    first_score: f64,
    last_score: f64,
    last_kl: f64,
    generation_seconds: f64,
    training_seconds: f64,
    ptx: bool,
}

impl Tallies {
    /// `ptx`: whether the run trains PPO-ptx (its loss is then logged);
    /// `first`: iteration 1's score, kept by the checkpoint resumed from.
    pub fn new(ptx: bool, first: Option<f64>) -> Self {
        Self {
            first_score: first.unwrap_or(f64::NAN),
            last_score: f64::NAN,
            last_kl: f64::NAN,
            generation_seconds: 0.0,
            training_seconds: 0.0,
            ptx,
        }
    }

    /// The first iteration's score, kept in checkpoints so that a resumed
    /// run reports iteration 1's, not the one it resumed at.
    pub fn first_score(&self) -> Option<f64> {
        self.first_score.is_finite().then_some(self.first_score)
    }

    /// Counts an iteration; `first` when the run has no first score yet.
    pub fn add(&mut self, step: &Iteration, first: bool) {
        if first && self.first_score.is_nan() {
            self.first_score = step.mean_score;
        }
        (self.last_score, self.last_kl) = (step.mean_score, step.mean_kl);
        self.generation_seconds += step.generation_seconds;
        self.training_seconds += step.training_seconds;
    }

    pub fn summary(
        &self,
        cfg: &PpoConfig,
        kl: KlController,
        judged: [Option<JudgedScore>; 2],
        started: Instant,
    ) -> PpoSummary {
        let [gold_before, gold_after, exact_before, exact_after] = PpoSummary::judged(judged);
        PpoSummary {
            iterations: cfg.iterations,
            first_mean_score: self.first_score,
            last_mean_score: self.last_score,
            last_kl: self.last_kl,
            beta: kl.beta,
            eval_gold_before: gold_before,
            eval_gold_after: gold_after,
            eval_exact_before: exact_before,
            eval_exact_after: exact_after,
            generation_seconds: self.generation_seconds,
            training_seconds: self.training_seconds,
            wall_seconds: started.elapsed().as_secs_f64(),
            warning: None,
        }
    }
}

/// Critic values `(B, N)` of the states before each answer token.
fn answer_values(critic: &Network, tokens: &Tensor, attention: &Tensor, width: i64) -> Tensor {
    let n = tokens.size()[1] - width;
    critic.values(
        &critic
            .hidden(tokens, Some(attention), None, false)
            .narrow(1, width - 1, n),
    )
}

/// A `(B, N)` tensor as B rows, in `T`'s kind, on the CPU.
pub(super) fn to_rows<T>(t: &Tensor) -> Vec<Vec<T>>
where
    T: tch::kind::Element,
    Vec<T>: TryFrom<Tensor>,
    <Vec<T> as TryFrom<Tensor>>::Error: std::fmt::Debug,
{
    let t = t.to_kind(T::KIND).to_device(Device::Cpu);
    let (b, n) = t.size2().expect("2-D");
    let flat: Vec<T> = Vec::try_from(t.reshape([-1])).expect("the kind asked for");
    let n = n as usize;
    (0..b as usize)
        .map(|i| flat[i * n..(i + 1) * n].to_vec())
        .collect()
}

pub(super) fn from_rows(rows: &[Vec<f64>], n: usize, device: Device) -> Tensor {
    let flat: Vec<f32> = rows
        .iter()
        .flat_map(|r| {
            r.iter()
                .map(|&x| x as f32)
                .chain(std::iter::repeat_n(0.0, n - r.len()))
        })
        .collect();
    Tensor::from_slice(&flat)
        .view([rows.len() as i64, n as i64])
        .to_device(device)
}
