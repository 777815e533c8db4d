//! PPO's learner: the models it trains and holds ([`Models`]), and one
//! iteration in three phases with plain data in and out: the shared
//! rollout with the critic's values ([`PpoLearner::rollout`]),
//! [`experience`] (token rewards, GAE advantages) and
//! [`PpoLearner::update`] (minibatch epochs). The driver (`rl::driver`)
//! runs the rest of the stage.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use rlhf_datasets::atomic;
use rlhf_datasets::batch::{collate, epoch_order, tokenize_pairs, TokenizedPair};
use rlhf_datasets::load::read_table;
use rlhf_datasets::rollout::RolloutRow;
use rlhf_datasets::schema::{sft_records, ChatTemplate};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use super::math::{
    clipped_surrogate_over, clipped_value_loss_over, explained_variance, gae, kl_estimate,
    masked_mean_over, token_rewards, whiten, KlController,
};
use super::PpoConfig;
use crate::dist::Ranks;
use crate::model::checkpoint::{HeadChoice, Model};
use crate::model::gpt::Head;
use crate::model::network::Network;
use crate::objectives::nll::masked_nll_sum;
use crate::optim::AdamW;
use crate::rl::driver::{Learner, Outcome, RlState};
use crate::rl::rollout::{
    answer_logprobs, columns_of, from_rows, rollout_logprob_diff, rollout_padding_waste, to_rows,
    Prompts, Reference, RolloutInputs, Sampled, Scorer,
};
use crate::rl::step::{optimizer_step, Step};
use crate::train::{
    check_finite, load_training, newest_usable, save_training, trainable_by_name, StageContext,
    StageError, FINAL_DIR,
};

/// PPO's part of a checkpoint's state: the KL controller.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct PpoOwn {
    kl: KlController,
}

type PpoState = RlState<PpoOwn>;

/// The critic's folder, beside the policy's `checkpoint/`, and inside a
/// periodic checkpoint beside `policy/`.
const CRITIC_DIR: &str = "critic";
const POLICY_DIR: &str = "policy";

/// The policy and critic that PPO trains, their optimisers, the frozen
/// reference and the scorer.
pub(super) struct Models {
    pub policy: Model,
    pub critic: Model,
    reference: Reference,
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
        // The adapters' base is the starting policy: the reference.
        let reference = Reference::load(cfg.reference.as_deref(), &cfg.policy, &policy, device)?;
        let rm = cfg.reward_model.as_deref();
        let scorer = match &cfg.reward {
            Some(reward) => Scorer::program(reward, ctx)?,
            None => Scorer::load(rm, cfg.gold_reward, ctx)?,
        };
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
    prompts: Prompts,
    ptx: Vec<TokenizedPair>,
}

impl Data {
    pub fn load(cfg: &PpoConfig, policy: &Model) -> Result<Self, StageError> {
        let prompts = Prompts::load(&cfg.prompts, policy, cfg.sampling.max_new_tokens)?;
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
        Ok(Self { prompts, ptx })
    }
}

/// PPO as the driver runs it: the models, the data, the KL controller.
pub(super) struct PpoLearner<'a> {
    cfg: &'a PpoConfig,
    models: Models,
    data: Data,
    kl: KlController,
    device: Device,
}

impl<'a> PpoLearner<'a> {
    /// The models (resumed, or from the config's starting points), the
    /// data, and the KL controller where the checkpoint left it.
    pub fn start_or_resume(
        cfg: &'a PpoConfig,
        ctx: &StageContext,
    ) -> Result<(Self, Option<PpoState>), StageError> {
        let (models, state) = Models::start_or_resume(cfg, ctx)?;
        let data = Data::load(cfg, &models.policy)?;
        let kl = state.as_ref().map_or(
            KlController {
                beta: cfg.kl_coef,
                adaptive: cfg.adaptive_kl,
            },
            |s| s.own.kl,
        );
        let learner = Self {
            cfg,
            models,
            data,
            kl,
            device: ctx.device,
        };
        Ok((learner, state))
    }

    /// Phase 1: this rank's share of the iteration's prompts answered
    /// (libtorch's RNG is seeded by the driver), scored and valued by the
    /// critic; then every rank's shares gathered.
    fn rollout(&self, iteration: i64, ranks: &Ranks) -> Result<Sampled, StageError> {
        let (cfg, m) = (self.cfg, &self.models);
        let seed = cfg.seed.unwrap_or(0);
        let batch = self
            .data
            .prompts
            .of_iteration(cfg.rollout_batch, seed, iteration);
        let inputs = RolloutInputs {
            env: None,
            policy: &m.policy,
            reference: &m.reference,
            scorer: &m.scorer,
            prompts: &self.data.prompts,
            sampling: &cfg.sampling,
            group: 1,
            device: self.device,
        };
        let mut r = inputs.sample(&batch[ranks.share(batch.len())], iteration)?;
        let g = &r.generation;
        r.values = Some(tch::no_grad(|| {
            answer_values(&m.critic.net, &g.tokens, &g.attention_mask, g.prompt_width)
        }));
        if let Some(c) = cfg.reward_clip {
            r.scores.iter_mut().for_each(|s| *s = s.clamp(-c, c));
        }
        crate::rl::shard::gather(r, ranks, m.policy.tokenizer.pad_id())
    }
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
fn experience(r: &Sampled, cfg: &PpoConfig, beta: f64) -> Experience {
    let values = r.values.as_ref().expect("PPO's rollout carries values");
    let (lp_rows, ref_rows, v_rows) = (to_rows(&r.old_lp), to_rows(&r.ref_lp), to_rows(values));
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
    /// The prompts' padded width: answers start there.
    width: i64,
    /// The answer tokens of the whole minibatch, over every rank: losses
    /// are means over them.
    count: Tensor,
    old_lp: Tensor,
    old_values: Tensor,
    advantages: Tensor,
    returns: Tensor,
}

impl Minibatch {
    /// Cut to `(start, prompt, answer)`, a span of [`columns_of`].
    fn trimmed(self, (start, prompt, answer): (i64, i64, i64)) -> Self {
        let cols = |t: &Tensor| t.narrow(1, start, prompt + answer);
        let answers = |t: &Tensor| t.narrow(1, 0, answer);
        Self {
            tokens: cols(&self.tokens),
            attention: cols(&self.attention),
            mask: answers(&self.mask),
            width: prompt,
            count: self.count,
            old_lp: answers(&self.old_lp),
            old_values: answers(&self.old_values),
            advantages: answers(&self.advantages),
            returns: answers(&self.returns),
        }
    }
}

impl PpoLearner<'_> {
    /// Phase 3: `ppo_epochs` passes over the rollout in shuffled
    /// minibatches, each a clipped policy step (plus PPO-ptx) and a
    /// clipped value step.
    fn update(
        &mut self,
        r: &Sampled,
        exp: &Experience,
        step: Step,
    ) -> Result<UpdateStats, StageError> {
        let (cfg, it) = (self.cfg, step.it);
        let device = r.generation.tokens.device();
        let b = r.rows.len();
        let n = r.answer_mask.size()[1] as usize;
        let (adv_t, ret_t) = (
            from_rows(&exp.advantages, n, device),
            from_rows(&exp.returns, n, device),
        );
        let values = r.values.as_ref().expect("PPO's rollout carries values");
        let mut stats = UpdateStats::default();
        let mut ptx_cursor = ((it - 1) as usize * cfg.ppo_epochs * b.div_ceil(cfg.minibatch_size))
            % self.data.ptx.len().max(1);
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
                let idx = rows(&chunk[step.ranks.share(chunk.len())]);
                let sel = |t: &Tensor| t.index_select(0, &idx);
                let mut mb = Minibatch {
                    tokens: sel(&r.generation.tokens),
                    attention: sel(&r.generation.attention_mask),
                    mask: sel(&r.answer_mask),
                    width: r.generation.prompt_width,
                    count,
                    old_lp: sel(&r.old_lp),
                    old_values: sel(values),
                    advantages: sel(&adv_t),
                    returns: sel(&ret_t),
                };
                let trim = self.models.policy.net.has_real_vocabulary();
                if trim {
                    mb = mb.trimmed(columns_of(r, &rows(chunk), trim));
                }
                self.policy_step(&mb, &mut ptx_cursor, &mut stats, step)?;
                self.critic_step(&mb, &mut stats, step)?;
                stats.updates += 1.0;
            }
        }
        stats.sum_over(step.ranks)?;
        check_finite(it, "policy loss", stats.policy_loss)?;
        check_finite(it, "value loss", stats.value_loss)?;
        Ok(stats)
    }

    /// One clipped-surrogate step of the policy, with the entropy bonus
    /// and the PPO-ptx language-model loss when set.
    fn policy_step(
        &mut self,
        mb: &Minibatch,
        ptx_cursor: &mut usize,
        stats: &mut UpdateStats,
        step: Step,
    ) -> Result<(), StageError> {
        let (cfg, models) = (self.cfg, &mut self.models);
        let vocab = models.policy.tokenizer.vocab_size() as i64;
        let (new_lp, logits) = answer_logprobs(
            &models.policy.net,
            &mb.tokens,
            &mb.attention,
            mb.width,
            vocab,
        );
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
            let ptx_data = &self.data.ptx;
            let rows: Vec<&TokenizedPair> = (0..ptx.batch_size)
                .map(|k| &ptx_data[(*ptx_cursor + k) % ptx_data.len()])
                .collect();
            *ptx_cursor = (*ptx_cursor + ptx.batch_size) % ptx_data.len();
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
        &mut self,
        mb: &Minibatch,
        stats: &mut UpdateStats,
        step: Step,
    ) -> Result<(), StageError> {
        let (cfg, models) = (self.cfg, &mut self.models);
        let new_v = answer_values(&models.critic.net, &mb.tokens, &mb.attention, mb.width);
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

    /// The iteration's fields of `metrics.jsonl`; `beta` is the KL
    /// coefficient its rewards used.
    fn record(&self, r: &Sampled, e: &Experience, s: &UpdateStats, beta: f64) -> serde_json::Value {
        let b = r.rows.len() as f64;
        let flat_ret: Vec<f64> = e.returns.iter().flatten().copied().collect();
        let flat_v: Vec<f64> = e
            .v_rows
            .iter()
            .zip(&e.lens)
            .flat_map(|(v, &l)| v[..l].to_vec())
            .collect();
        let finished = r.generation.finished.iter().filter(|&&f| f).count();
        let ptx = self.cfg.ptx.is_some();
        let [diff_max, diff_mean] = rollout_logprob_diff(r);
        let mut record = json!({
            "rollout_logprob_diff_max": diff_max, "rollout_logprob_diff_mean": diff_mean,
            "padding_waste": rollout_padding_waste(r),
            "beta": beta, "policy_loss": s.policy_loss / s.updates,
            "value_loss": s.value_loss / s.updates, "entropy": s.entropy / s.updates,
            "clip_fraction": s.clip_fraction / s.updates, "approx_kl": s.approx_kl / s.updates,
            "explained_variance": explained_variance(&flat_v, &flat_ret),
            "answer_length": e.lens.iter().sum::<usize>() as f64 / b,
            "finished_fraction": finished as f64 / b,
            "ptx_loss": if ptx { json!(s.ptx_loss / s.updates) } else { json!(null) },
        });
        r.seconds.record(&mut record);
        crate::rl::reward::record_components(&r.components, &mut record);
        record
    }

    /// Every answer of the iteration with its per-token numbers.
    fn rollout_rows(&self, it: i64, r: &Sampled, e: &Experience) -> Vec<RolloutRow> {
        (0..r.rows.len())
            .map(|row| {
                let len = e.lens[row];
                RolloutRow {
                    turns: vec![],
                    iteration: it,
                    prompt: self.data.prompts.texts[r.rows[row]].clone(),
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
            .collect()
    }
}

impl Learner for PpoLearner<'_> {
    type Own = PpoOwn;

    fn policy(&self) -> &Model {
        &self.models.policy
    }

    fn with_reference<T>(&self, f: impl FnOnce(&Model) -> T) -> T {
        self.models.reference.with(&self.models.policy, f)
    }

    fn iterate(
        &mut self,
        iteration: i64,
        ranks: &Ranks,
        rows: bool,
    ) -> Result<Outcome, StageError> {
        let started = Instant::now();
        let beta = self.kl.beta;
        let rollout = self.rollout(iteration, ranks)?;
        let exp = experience(&rollout, self.cfg, beta);
        let generation_seconds = started.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let step = Step {
            it: iteration + 1,
            ranks,
        };
        let stats = self.update(&rollout, &exp, step)?;
        let b = rollout.rows.len();
        let outcome = Outcome {
            mean_score: rollout.scores.iter().sum::<f64>() / b as f64,
            mean_kl: exp.mean_kl,
            record: self.record(&rollout, &exp, &stats, beta),
            rows: match rows {
                true => self.rollout_rows(iteration + 1, &rollout, &exp),
                false => vec![],
            },
            generation_seconds,
            training_seconds: t1.elapsed().as_secs_f64(),
            note: format!(" beta {beta:.4}"),
        };
        self.kl.update(exp.mean_kl, b);
        Ok(outcome)
    }

    fn own_state(&self) -> PpoOwn {
        PpoOwn { kl: self.kl }
    }

    fn save(&self, dir: &Path, state: &PpoState) -> Result<(), StageError> {
        self.models.save(dir, state)
    }

    fn save_final(&self, out: &Path, state: &PpoState) -> Result<(), StageError> {
        self.models.save_final(out, state)
    }

    fn summary_fields(&self) -> BTreeMap<String, serde_json::Value> {
        BTreeMap::from([("beta".to_owned(), json!(self.kl.beta))])
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
