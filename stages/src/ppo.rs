//! Stage 3: PPO against the reward model (InstructGPT, Ouyang et al. 2022;
//! Ziegler et al. 2019; Schulman et al. 2017).
//!
//! Four models: the policy (from SFT), a frozen reference (SFT), the critic
//! (trunk and value head from the reward model) and the frozen reward
//! model. Each iteration samples answers with the KV cache, scores them,
//! turns scores and a per-token KL penalty into rewards, computes GAE
//! advantages, then runs several epochs of clipped-surrogate updates of the
//! policy and clipped value updates of the critic.
//!
//! Token `i` of an answer is predicted from position `P - 1 + i` of the
//! padded sequence (P = prompt width), and its value is the critic's output
//! at that same position: the state before the token is chosen.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rlhf_datasets::atomic;
use rlhf_datasets::batch::{collate, epoch_order, tokenize_pairs, TokenizedPair};
use rlhf_datasets::load::{read_table, string_column};
use rlhf_datasets::rollout::{write_rollouts, RolloutRow};
use rlhf_datasets::schema::{sft_records, ChatTemplate};
use rlhf_datasets::task;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{HeadChoice, Model};
use crate::gpt::{Gpt, Head};
use crate::optim::{AdamW, AdamWConfig};
use crate::reward::{sequence_rewards, RewardInput};
use crate::sample::{generate, SamplingConfig, TokenSpec};
use crate::score::gather_logprobs;
use crate::sft::{gold_eval, masked_nll_sum};
use crate::train::{
    check_finite, finished_summary, io_err, load_training, newest_usable, periodic_dir,
    progress_bar, prune_periodic, save_training, write_summary, MetricsLog, StageError, FINAL_DIR,
    METRICS_FILE,
};

/// How the per-token KL to the reference is estimated (Schulman's notes
/// "Approximating KL divergence").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `log p - log q`: unbiased, can be negative per token.
    K1,
    /// `(r - 1) - log r` with `r = q / p`: unbiased and never negative.
    K3,
}

/// Ziegler et al. (2019)'s adaptive KL coefficient.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveKl {
    /// Wanted KL per answer (nats).
    pub target: f64,
    /// Samples over which beta may move by about e.
    pub horizon: f64,
}

/// Language-model loss on demonstrations during PPO (InstructGPT's PPO-ptx).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtxConfig {
    /// `{prompt, completion}` or `{messages}` rows.
    pub data: PathBuf,
    /// gamma in InstructGPT's objective (they used 27.8).
    pub coef: f64,
    #[serde(default = "default_ptx_batch")]
    pub batch_size: usize,
}

fn default_ptx_batch() -> usize {
    8
}

/// Settings of a PPO stage (`kind: ppo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PpoConfig {
    /// `{prompt}` rows to roll out on.
    pub prompts: PathBuf,
    /// The starting policy (the SFT checkpoint).
    pub policy: Option<PathBuf>,
    /// The frozen reference; unset: the starting policy.
    pub reference: Option<PathBuf>,
    /// The frozen reward model.
    pub reward_model: Option<PathBuf>,
    /// Use the bundled task's gold judge as the reward instead of a model
    /// (an oracle run: the upper bound of what a reward model can give).
    pub gold_reward: bool,
    /// The critic's start; unset: the reward model (or the policy's trunk
    /// with a fresh head when the reward is not a model).
    pub critic: Option<PathBuf>,
    pub iterations: i64,
    /// Prompts sampled per iteration.
    pub rollout_batch: usize,
    pub sampling: SamplingConfig,
    pub ppo_epochs: usize,
    pub minibatch_size: usize,
    /// epsilon of the clipped surrogate.
    pub clip_range: f64,
    /// Clip range of the value update; 0 disables value clipping.
    pub clip_range_value: f64,
    pub gamma: f64,
    pub lam: f64,
    /// beta: the KL penalty's weight (InstructGPT: 0.02).
    pub kl_coef: f64,
    pub kl_estimator: KlEstimator,
    pub adaptive_kl: Option<AdaptiveKl>,
    /// Subtracted from the score of answers that do not end with EOS.
    pub missing_eos_penalty: Option<f64>,
    /// Scores are clipped to [-reward_clip, reward_clip].
    pub reward_clip: Option<f64>,
    pub whiten_advantages: bool,
    pub entropy_coef: f64,
    pub policy_optimizer: AdamWConfig,
    pub critic_optimizer: AdamWConfig,
    pub max_grad_norm: f64,
    pub ptx: Option<PtxConfig>,
    pub checkpoint_every: i64,
    /// Prompts to answer greedily before and after, scored by the gold judge.
    pub eval_prompts: Option<PathBuf>,
    /// Write each iteration's rollouts as Parquet.
    pub save_rollouts: bool,
    pub seed: u64,
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self {
            prompts: PathBuf::from("datasets/task/prompts.jsonl"),
            policy: None,
            reference: None,
            reward_model: None,
            gold_reward: false,
            critic: None,
            iterations: 40,
            rollout_batch: 64,
            sampling: SamplingConfig {
                temperature: 1.0,
                max_new_tokens: 24,
                ..SamplingConfig::default()
            },
            ppo_epochs: 4,
            minibatch_size: 16,
            clip_range: 0.2,
            clip_range_value: 0.2,
            gamma: 1.0,
            lam: 0.95,
            kl_coef: 0.02,
            kl_estimator: KlEstimator::K1,
            adaptive_kl: None,
            missing_eos_penalty: Some(1.0),
            reward_clip: None,
            whiten_advantages: true,
            entropy_coef: 0.0,
            policy_optimizer: AdamWConfig {
                lr: 1e-5,
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
            critic_optimizer: AdamWConfig {
                lr: 1e-4,
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
            max_grad_norm: 1.0,
            ptx: None,
            checkpoint_every: 10,
            eval_prompts: None,
            save_rollouts: true,
            seed: 0,
        }
    }
}

impl PpoConfig {
    pub fn validate(&self) -> Result<(), StageError> {
        let bad = |m: String| Err(StageError::Config(format!("ppo: {m}")));
        if self.policy.is_none() {
            return bad("`policy` is required (the SFT checkpoint, e.g. `policy: sft`)".into());
        }
        if self.reward_model.is_none() && !self.gold_reward {
            return bad(
                "set `reward_model` (e.g. `reward_model: rm`) or `gold_reward: true`".into(),
            );
        }
        if self.iterations < 1
            || self.rollout_batch == 0
            || self.ppo_epochs == 0
            || self.minibatch_size == 0
        {
            return bad(
                "iterations, rollout_batch, ppo_epochs and minibatch_size must be at least 1"
                    .into(),
            );
        }
        if !(self.clip_range > 0.0 && self.clip_range < 1.0) {
            return bad(format!(
                "clip_range must lie in (0, 1), got {}",
                self.clip_range
            ));
        }
        if !(0.0..=1.0).contains(&self.gamma) || !(0.0..=1.0).contains(&self.lam) {
            return bad("gamma and lam must lie in [0, 1]".into());
        }
        if self.kl_coef < 0.0 || self.kl_coef.is_nan() {
            return bad(format!("kl_coef must be >= 0, got {}", self.kl_coef));
        }
        if let Some(a) = &self.adaptive_kl {
            if a.target <= 0.0 || a.horizon <= 0.0 {
                return bad("adaptive_kl target and horizon must be positive".into());
            }
        }
        if self.checkpoint_every < 1 {
            return bad("checkpoint_every must be at least 1".into());
        }
        self.sampling
            .validate()
            .map_err(|e| StageError::Config(format!("ppo: {e}")))
    }
}

/// A reward computed by code from (prompt, answer) text, for tests and for
/// the gold judge.
pub type RewardRule = Arc<dyn Fn(&str, &str) -> f64 + Send + Sync>;

#[derive(Clone)]
pub struct PpoJob {
    pub config: PpoConfig,
    pub out_dir: PathBuf,
    pub device: Device,
    /// Overrides the reward model with a rule.
    pub reward_rule: Option<RewardRule>,
    pub stop_after_iteration: Option<i64>,
}

impl std::fmt::Debug for PpoJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PpoJob")
            .field("config", &self.config)
            .field("out_dir", &self.out_dir)
            .field("reward_rule", &self.reward_rule.is_some())
            .finish()
    }
}

/// The KL coefficient and, when adaptive, its controller.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KlController {
    pub beta: f64,
    pub adaptive: Option<AdaptiveKl>,
}

impl KlController {
    /// Ziegler et al. (2019): e = clip(KL / target - 1, -0.2, 0.2);
    /// beta *= 1 + e * n / horizon.
    pub fn update(&mut self, kl: f64, n_samples: usize) {
        if let Some(a) = self.adaptive {
            let error = (kl / a.target - 1.0).clamp(-0.2, 0.2);
            self.beta *= 1.0 + error * n_samples as f64 / a.horizon;
        }
    }
}

/// GAE (Schulman et al., 2016) over one answer: `A_t = sum_l (gamma lam)^l
/// delta_{t+l}`, `delta_t = r_t + gamma V_{t+1} - V_t`, V after the last
/// token = 0. Returns (advantages, returns = advantages + values).
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lam: f64) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let mut adv = vec![0.0; n];
    let mut next_adv = 0.0;
    for t in (0..n).rev() {
        let next_value = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next_value - values[t];
        next_adv = delta + gamma * lam * next_adv;
        adv[t] = next_adv;
    }
    let returns = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, returns)
}

/// Whitens in place: zero mean, unit variance (unbiased), over all values.
pub fn whiten(xs: &mut [f64]) {
    let n = xs.len();
    if n < 2 {
        return;
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let scale = 1.0 / (var + 1e-8).sqrt();
    for x in xs {
        *x = (*x - mean) * scale;
    }
}

pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Tensor {
    (x * mask).sum(Kind::Float) / mask.sum(Kind::Float).clamp_min(1.0)
}

/// The clipped surrogate objective as a loss:
/// `-mean(min(ratio A, clip(ratio, 1-eps, 1+eps) A))`, `ratio = exp(new - old)`.
/// Also the clip fraction and the approximate KL `mean((ratio - 1) - log ratio)`.
pub fn clipped_surrogate(
    new_lp: &Tensor,
    old_lp: &Tensor,
    adv: &Tensor,
    mask: &Tensor,
    eps: f64,
) -> (Tensor, f64, f64) {
    let log_ratio = new_lp - old_lp;
    let ratio = log_ratio.exp();
    let unclipped = &ratio * adv;
    let clipped = ratio.clamp(1.0 - eps, 1.0 + eps) * adv;
    let loss = -masked_mean(&unclipped.minimum(&clipped), mask);
    let (clipfrac, approx_kl) = tch::no_grad(|| {
        let clipfrac =
            masked_mean(&(&ratio - 1.0).abs().gt(eps).to_kind(Kind::Float), mask).double_value(&[]);
        let approx_kl = masked_mean(&((&ratio - 1.0) - &log_ratio), mask).double_value(&[]);
        (clipfrac, approx_kl)
    });
    (loss, clipfrac, approx_kl)
}

/// The clipped value loss: `0.5 mean(max((V - R)^2, (V_clip - R)^2))` with
/// `V_clip = V_old + clip(V - V_old, -eps, eps)`; eps = 0 disables clipping.
pub fn clipped_value_loss(
    new_v: &Tensor,
    old_v: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
    eps: f64,
) -> Tensor {
    let unclipped = (new_v - returns).square();
    if eps <= 0.0 {
        return 0.5 * masked_mean(&unclipped, mask);
    }
    let v_clipped = old_v + (new_v - old_v).clamp(-eps, eps);
    let clipped = (v_clipped - returns).square();
    0.5 * masked_mean(&unclipped.maximum(&clipped), mask)
}

/// Per-token KL estimate from policy and reference log-probabilities.
pub fn kl_estimate(lp: &[f64], ref_lp: &[f64], estimator: KlEstimator) -> Vec<f64> {
    lp.iter()
        .zip(ref_lp)
        .map(|(p, q)| match estimator {
            KlEstimator::K1 => p - q,
            KlEstimator::K3 => {
                let log_r = q - p;
                log_r.exp() - 1.0 - log_r
            }
        })
        .collect()
}

/// Log-probabilities `(B, N)` of the answer tokens in `tokens` (answers
/// start at column `width`), and the logits they came from, over the
/// tokenizer's `vocab` ids only (the ids sampling can produce).
fn answer_logprobs(
    model: &Gpt,
    tokens: &Tensor,
    attention: &Tensor,
    width: i64,
    vocab: i64,
) -> (Tensor, Tensor) {
    let n = tokens.size()[1] - width;
    let hidden = model.hidden(tokens, Some(attention), None, false);
    let logits = model.logits(&hidden.narrow(1, width - 1, n));
    let logits = logits.narrow(2, 0, vocab.min(logits.size()[2]));
    let lp = gather_logprobs(&logits, &tokens.narrow(1, width, n));
    (lp, logits)
}

/// Critic values `(B, N)` of the states before each answer token.
fn answer_values(critic: &Gpt, tokens: &Tensor, attention: &Tensor, width: i64) -> Tensor {
    let n = tokens.size()[1] - width;
    critic.values(
        &critic
            .hidden(tokens, Some(attention), None, false)
            .narrow(1, width - 1, n),
    )
}

fn to_rows(t: &Tensor) -> Vec<Vec<f64>> {
    let t = t.to_kind(Kind::Double).to_device(Device::Cpu);
    let (b, n) = t.size2().expect("2-D");
    let flat: Vec<f64> = Vec::try_from(t.reshape([-1])).expect("f64");
    (0..b as usize)
        .map(|i| flat[i * n as usize..(i + 1) * n as usize].to_vec())
        .collect()
}

fn from_rows(rows: &[Vec<f64>], n: usize, device: Device) -> Tensor {
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

/// What PPO saves with each checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PpoState {
    stage: String,
    iteration: i64,
    iterations: i64,
    kl: KlController,
    done: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PpoSummary {
    pub iterations: i64,
    pub first_mean_score: f64,
    pub last_mean_score: f64,
    /// Mean KL to the reference per answer (nats), last iteration.
    pub last_kl: f64,
    pub beta: f64,
    /// Gold-judge score of greedy answers to `eval_prompts`: reference, final policy.
    pub eval_gold_before: Option<f64>,
    pub eval_gold_after: Option<f64>,
    pub eval_exact_before: Option<f64>,
    pub eval_exact_after: Option<f64>,
    pub generation_seconds: f64,
    pub training_seconds: f64,
    pub wall_seconds: f64,
}

const POLICY_DIR: &str = "policy";
const CRITIC_DIR: &str = "critic";

fn save_ppo(
    dir: &Path,
    policy: &Model,
    popt: &AdamW,
    critic: &Model,
    copt: &AdamW,
    state: &PpoState,
) -> Result<(), StageError> {
    atomic::write_dir(dir, |tmp| -> Result<(), StageError> {
        save_training(&tmp.join(POLICY_DIR), policy, popt, state)?;
        save_training(&tmp.join(CRITIC_DIR), critic, copt, state)
    })
}

/// The reward: a frozen model, or a rule on text.
enum Scorer {
    Model(Box<Model>),
    Rule(RewardRule),
}

/// Runs (or resumes, or finds done) a PPO run.
/// Policy, critic, their optimisers and the trainer state of a periodic
/// checkpoint.
type PpoResume = (Model, Model, AdamW, AdamW, PpoState);

fn load_resume_point(dir: &Path, cfg: &PpoConfig, device: Device) -> Result<PpoResume, StageError> {
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

pub fn run(job: &PpoJob) -> Result<PpoSummary, StageError> {
    let cfg = &job.config;
    cfg.validate()?;
    let started = Instant::now();
    let out = &job.out_dir;
    let device = job.device;
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    if let Some(summary) = finished_summary(out) {
        tracing::info!("ppo: {} is complete; nothing to do", out.display());
        return Ok(summary);
    }
    let policy_init = cfg.policy.as_deref().expect("validated");
    tch::manual_seed(cfg.seed as i64);

    // Models: resume both trained ones from a periodic checkpoint, or start.
    let resume =
        newest_usable(out, |dir| load_resume_point(dir, cfg, device)).map(|(it, dir, r)| {
            tracing::info!("ppo: resuming from {} (iteration {it})", dir.display());
            r
        });
    let (policy, critic, mut popt, mut copt, state) = match resume {
        Some((p, c, popt, copt, state)) => (p, c, popt, copt, Some(state)),
        None => {
            let p = Model::load(policy_init, HeadChoice::Want(Head::Lm), device)?;
            let critic_init = cfg
                .critic
                .as_deref()
                .or(cfg
                    .reward_model
                    .as_deref()
                    .filter(|_| job.reward_rule.is_none() && !cfg.gold_reward))
                .unwrap_or(policy_init);
            let c = Model::load(critic_init, HeadChoice::Want(Head::Scalar), device)?;
            let popt = AdamW::new(&p.vs, cfg.policy_optimizer.clone());
            let copt = AdamW::new(&c.vs, cfg.critic_optimizer.clone());
            (p, c, popt, copt, None)
        }
    };
    let reference = Model::load(
        cfg.reference.as_deref().unwrap_or(policy_init),
        HeadChoice::Want(Head::Lm),
        device,
    )?;
    let mut reference = reference;
    reference.vs.freeze();
    let scorer = match (&job.reward_rule, cfg.gold_reward, &cfg.reward_model) {
        (Some(rule), _, _) => Scorer::Rule(rule.clone()),
        (None, true, _) => Scorer::Rule(Arc::new(|p: &str, a: &str| {
            task::judge(p, a).unwrap_or(0.0)
        })),
        (None, false, Some(path)) => {
            let m = Model::load(path, HeadChoice::AsSaved, device)?;
            if m.gpt.head() != Head::Scalar {
                return Err(StageError::Config(format!(
                    "ppo: reward_model {} has no scalar head; give a reward stage's checkpoint",
                    path.display()
                )));
            }
            let mut m = m;
            m.vs.freeze();
            Scorer::Model(Box::new(m))
        }
        (None, false, None) => unreachable!("validated"),
    };

    let table = read_table(&cfg.prompts)?;
    let prompts = string_column(&table, &cfg.prompts, "prompt", "{prompt}")?;
    let tok = policy.tokenizer.clone();
    let prompt_ids = prompts
        .iter()
        .map(|p| tok.encode(p))
        .collect::<Result<Vec<_>, _>>()?;
    let limit = (policy.gpt.config().n_positions - cfg.sampling.max_new_tokens) as usize;
    if let Some((i, p)) = prompt_ids
        .iter()
        .enumerate()
        .find(|(_, p)| p.len() > limit || p.is_empty())
    {
        return Err(StageError::Config(format!(
            "{}: row {}: the prompt has {} tokens; it must have 1..={limit} to leave room for max_new_tokens ({})",
            cfg.prompts.display(),
            i + 1,
            p.len(),
            cfg.sampling.max_new_tokens
        )));
    }
    let ptx_pairs = match &cfg.ptx {
        Some(ptx) => {
            let records = sft_records(
                &read_table(&ptx.data)?,
                &ptx.data,
                &ChatTemplate::for_tokenizer(&tok),
            )?;
            tokenize_pairs(&records, &tok, policy.gpt.config().n_positions as usize)?.0
        }
        None => vec![],
    };

    let eval_before = match (&cfg.eval_prompts, &state) {
        (Some(p), None) => gold_eval(
            &reference,
            p,
            cfg.sampling.max_new_tokens,
            device,
            &out.join("samples_before.jsonl"),
        )?,
        _ => None,
    };
    let start = state.as_ref().map_or(0, |s| s.iteration);
    let mut kl = state.as_ref().map_or(
        KlController {
            beta: cfg.kl_coef,
            adaptive: cfg.adaptive_kl,
        },
        |s| s.kl,
    );
    let mut metrics =
        MetricsLog::open(&out.join(METRICS_FILE), state.as_ref().map(|s| s.iteration))?;
    let bar = progress_bar(cfg.iterations as u64, start as u64, "ppo");
    let per_epoch = (prompts.len() / cfg.rollout_batch).max(1) as i64;
    let (mut gen_time, mut train_time) = (0.0, 0.0);
    let (mut first_score, mut last_score, mut last_kl) = (f64::NAN, f64::NAN, f64::NAN);
    let eos = tok.eos_id();
    let vocab = tok.vocab_size() as i64;

    for iteration in start..cfg.iterations {
        let it = iteration + 1;
        // --- Rollout ---------------------------------------------------
        let t0 = Instant::now();
        tch::manual_seed(
            (cfg.seed as i64)
                .wrapping_mul(1_000_003)
                .wrapping_add(iteration),
        );
        let (epoch, pos) = (iteration / per_epoch, (iteration % per_epoch) as usize);
        let order = epoch_order(prompts.len(), cfg.seed, epoch as u64);
        let batch_idx: Vec<usize> = order
            .iter()
            .skip(pos * cfg.rollout_batch)
            .take(cfg.rollout_batch)
            .copied()
            .collect();
        let batch_prompts: Vec<Vec<i64>> =
            batch_idx.iter().map(|&i| prompt_ids[i].clone()).collect();
        let g = generate(
            &policy.gpt,
            &batch_prompts,
            &cfg.sampling,
            TokenSpec::of(&tok),
            device,
        )?;
        let width = g.prompt_width;
        let b = batch_idx.len();
        let n = (g.tokens.size()[1] - width) as usize;
        let answer_mask = g
            .attention_mask
            .narrow(1, width, n as i64)
            .to_kind(Kind::Float);
        let (old_lp, ref_lp, old_values) = tch::no_grad(|| {
            let (lp, _) = answer_logprobs(&policy.gpt, &g.tokens, &g.attention_mask, width, vocab);
            let (rlp, _) =
                answer_logprobs(&reference.gpt, &g.tokens, &g.attention_mask, width, vocab);
            let v = answer_values(&critic.gpt, &g.tokens, &g.attention_mask, width);
            (lp, rlp, v)
        });
        let answers_text: Vec<String> = g
            .answers
            .iter()
            .map(|a| tok.decode(a, false))
            .collect::<Result<_, _>>()?;
        let mut scores = match &scorer {
            Scorer::Model(rm) => {
                let inputs: Vec<RewardInput> = batch_prompts
                    .iter()
                    .zip(&g.answers)
                    .map(|(p, a)| {
                        let mut ids: Vec<i64> = p.iter().chain(a).copied().collect();
                        if a.last() != Some(&eos) {
                            ids.push(eos); // scored as the reward model was trained: answer + EOS
                        }
                        RewardInput {
                            ids,
                            answer_start: p.len(),
                        }
                    })
                    .collect();
                sequence_rewards(rm, &inputs, 64, device)
            }
            Scorer::Rule(rule) => batch_idx
                .iter()
                .zip(&answers_text)
                .map(|(&i, a)| rule(&prompts[i], a))
                .collect(),
        };
        if let Some(c) = cfg.reward_clip {
            scores.iter_mut().for_each(|s| *s = s.clamp(-c, c));
        }
        let raw_mean_score = scores.iter().sum::<f64>() / b as f64;
        check_finite(it, "reward-model score", raw_mean_score)?;

        // --- Rewards and advantages (per answer, on the CPU) -------------
        let (lp_rows, ref_rows, v_rows) =
            (to_rows(&old_lp), to_rows(&ref_lp), to_rows(&old_values));
        let lens: Vec<usize> = g.answers.iter().map(Vec::len).collect();
        let (mut rewards, mut advantages, mut returns, mut kls) = (vec![], vec![], vec![], vec![]);
        for row in 0..b {
            let len = lens[row];
            let kl_tokens = kl_estimate(
                &lp_rows[row][..len],
                &ref_rows[row][..len],
                cfg.kl_estimator,
            );
            kls.push(kl_tokens.iter().sum::<f64>());
            let mut r: Vec<f64> = kl_tokens.iter().map(|k| -kl.beta * k).collect();
            let mut score = scores[row];
            if !g.finished[row] {
                score -= cfg.missing_eos_penalty.unwrap_or(0.0);
            }
            if let Some(last) = r.last_mut() {
                *last += score;
            }
            let (a, ret) = gae(&r, &v_rows[row][..len], cfg.gamma, cfg.lam);
            rewards.push(r);
            advantages.push(a);
            returns.push(ret);
        }
        if cfg.whiten_advantages {
            let mut flat: Vec<f64> = advantages.iter().flatten().copied().collect();
            whiten(&mut flat);
            let mut k = 0;
            for a in &mut advantages {
                for x in a.iter_mut() {
                    *x = flat[k];
                    k += 1;
                }
            }
        }
        let mean_kl = kls.iter().sum::<f64>() / b as f64;
        gen_time += t0.elapsed().as_secs_f64();

        // --- PPO update ---------------------------------------------------
        let t1 = Instant::now();
        let adv_t = from_rows(&advantages, n, device);
        let ret_t = from_rows(&returns, n, device);
        let (
            mut pg_sum,
            mut vf_sum,
            mut ent_sum,
            mut clip_sum,
            mut akl_sum,
            mut ptx_sum,
            mut updates,
        ) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
        let mut ptx_cursor = (iteration as usize * cfg.ppo_epochs * b.div_ceil(cfg.minibatch_size))
            % ptx_pairs.len().max(1);
        for epoch in 0..cfg.ppo_epochs {
            let perm = epoch_order(b, cfg.seed ^ (it as u64) << 16, epoch as u64);
            for chunk in perm.chunks(cfg.minibatch_size) {
                let idx = Tensor::from_slice(&chunk.iter().map(|&i| i as i64).collect::<Vec<_>>())
                    .to_device(device);
                let sel = |t: &Tensor| t.index_select(0, &idx);
                let (tokens, attn, mask) =
                    (sel(&g.tokens), sel(&g.attention_mask), sel(&answer_mask));
                let (new_lp, logits) = answer_logprobs(&policy.gpt, &tokens, &attn, width, vocab);
                let (pg_loss, clipfrac, approx_kl) =
                    clipped_surrogate(&new_lp, &sel(&old_lp), &sel(&adv_t), &mask, cfg.clip_range);
                let entropy = {
                    let logp = logits.log_softmax(-1, Kind::Float);
                    masked_mean(
                        &-(logp.exp() * &logp).sum_dim_intlist(-1, false, Kind::Float),
                        &mask,
                    )
                };
                let mut loss = &pg_loss - cfg.entropy_coef * &entropy;
                if let Some(ptx) = &cfg.ptx {
                    let rows: Vec<&TokenizedPair> = (0..ptx.batch_size)
                        .map(|k| &ptx_pairs[(ptx_cursor + k) % ptx_pairs.len()])
                        .collect();
                    ptx_cursor = (ptx_cursor + ptx.batch_size) % ptx_pairs.len();
                    let batch = collate(&rows, tok.pad_id());
                    let (nll, count) = masked_nll_sum(&policy.gpt, &batch, device, false);
                    let ptx_loss = nll / count;
                    ptx_sum += ptx_loss.double_value(&[]);
                    loss += ptx.coef * ptx_loss;
                }
                popt.zero_grad();
                loss.backward();
                let pnorm = popt.clip_grad_norm(cfg.max_grad_norm);
                check_finite(it, "policy gradient norm", pnorm)?;
                popt.step(cfg.policy_optimizer.lr);

                let new_v = answer_values(&critic.gpt, &tokens, &attn, width);
                let vf_loss = clipped_value_loss(
                    &new_v,
                    &sel(&old_values),
                    &sel(&ret_t),
                    &mask,
                    cfg.clip_range_value,
                );
                copt.zero_grad();
                vf_loss.backward();
                let cnorm = copt.clip_grad_norm(cfg.max_grad_norm);
                check_finite(it, "critic gradient norm", cnorm)?;
                copt.step(cfg.critic_optimizer.lr);

                pg_sum += pg_loss.double_value(&[]);
                vf_sum += vf_loss.double_value(&[]);
                ent_sum += entropy.double_value(&[]);
                clip_sum += clipfrac;
                akl_sum += approx_kl;
                updates += 1.0;
            }
        }
        train_time += t1.elapsed().as_secs_f64();
        check_finite(it, "policy loss", pg_sum)?;
        check_finite(it, "value loss", vf_sum)?;

        // --- Metrics, rollouts, KL control, checkpoint -------------------
        let flat_ret: Vec<f64> = returns.iter().flatten().copied().collect();
        let flat_v: Vec<f64> = v_rows
            .iter()
            .zip(&lens)
            .flat_map(|(v, &l)| v[..l].to_vec())
            .collect();
        let explained_variance = explained_variance(&flat_v, &flat_ret);
        let beta_used = kl.beta;
        kl.update(mean_kl, b);
        if iteration == start {
            first_score = raw_mean_score;
        }
        (last_score, last_kl) = (raw_mean_score, mean_kl);
        let mean_len = lens.iter().sum::<usize>() as f64 / b as f64;
        metrics.write(&json!({
            "step": it, "iteration": it, "score": raw_mean_score, "kl": mean_kl, "beta": beta_used,
            "policy_loss": pg_sum / updates, "value_loss": vf_sum / updates, "entropy": ent_sum / updates,
            "clip_fraction": clip_sum / updates, "approx_kl": akl_sum / updates,
            "explained_variance": explained_variance, "answer_length": mean_len,
            "finished_fraction": g.finished.iter().filter(|&&f| f).count() as f64 / b as f64,
            "ptx_loss": if cfg.ptx.is_some() { json!(ptx_sum / updates) } else { json!(null) },
            "generation_seconds": gen_time, "training_seconds": train_time,
            // Rollout, scoring and update of this iteration alone.
            "iteration_seconds": t0.elapsed().as_secs_f64(),
        }));
        if cfg.save_rollouts {
            let rows: Vec<RolloutRow> = (0..b)
                .map(|row| RolloutRow {
                    iteration: it,
                    prompt: prompts[batch_idx[row]].clone(),
                    answer: answers_text[row].clone(),
                    token_ids: g.answers[row].clone(),
                    logprobs: lp_rows[row][..lens[row]].to_vec(),
                    ref_logprobs: ref_rows[row][..lens[row]].to_vec(),
                    values: v_rows[row][..lens[row]].to_vec(),
                    rewards: rewards[row].clone(),
                    advantages: advantages[row].clone(),
                    returns: returns[row].clone(),
                    score: scores[row],
                    finished: g.finished[row],
                })
                .collect();
            write_rollouts(
                &out.join("rollouts").join(format!("iter-{it:04}.parquet")),
                &rows,
            )?;
        }
        bar.set_position(it as u64);
        bar.set_message(format!("score {raw_mean_score:.3} kl {mean_kl:.2}"));
        if it % 5 == 0 || it == cfg.iterations {
            tracing::info!("ppo: iteration {it}/{} score {raw_mean_score:.4} kl {mean_kl:.3} beta {beta_used:.4}", cfg.iterations);
        }
        let state = PpoState {
            stage: "ppo".into(),
            iteration: it,
            iterations: cfg.iterations,
            kl,
            done: false,
        };
        let stop = job.stop_after_iteration == Some(it);
        if it < cfg.iterations && (it % cfg.checkpoint_every == 0 || stop) {
            save_ppo(
                &periodic_dir(out, it),
                &policy,
                &popt,
                &critic,
                &copt,
                &state,
            )?;
            prune_periodic(out, 2);
        }
        if stop && it < cfg.iterations {
            bar.abandon();
            return Err(StageError::StoppedEarly(it));
        }
    }
    bar.finish_and_clear();

    let state = PpoState {
        stage: "ppo".into(),
        iteration: cfg.iterations,
        iterations: cfg.iterations,
        kl,
        done: true,
    };
    save_training(&out.join(FINAL_DIR), &policy, &popt, &state)?;
    save_training(&out.join(CRITIC_DIR), &critic, &copt, &state)?;
    prune_periodic(out, 0);
    let eval_after = match &cfg.eval_prompts {
        Some(p) => gold_eval(
            &policy,
            p,
            cfg.sampling.max_new_tokens,
            device,
            &out.join("samples.jsonl"),
        )?,
        None => None,
    };
    let eval_before = eval_before.or_else(|| read_previous_before(out));
    let summary = PpoSummary {
        iterations: cfg.iterations,
        first_mean_score: first_score,
        last_mean_score: last_score,
        last_kl,
        beta: kl.beta,
        eval_gold_before: eval_before.map(|e| e.0),
        eval_gold_after: eval_after.map(|e| e.0),
        eval_exact_before: eval_before.map(|e| e.1),
        eval_exact_after: eval_after.map(|e| e.1),
        generation_seconds: gen_time,
        training_seconds: train_time,
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    write_summary(out, &summary)?;
    Ok(summary)
}

/// After a resume the reference's eval was computed by the first run; it
/// left its answers in `samples_before.jsonl`.
fn read_previous_before(out: &Path) -> Option<(f64, f64)> {
    let text = std::fs::read_to_string(out.join("samples_before.jsonl")).ok()?;
    let scores: Vec<f64> = text
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()?
                .get("gold_score")?
                .as_f64()
        })
        .collect();
    if scores.is_empty() {
        return None;
    }
    let n = scores.len() as f64;
    Some((
        scores.iter().sum::<f64>() / n,
        scores.iter().filter(|&&s| s == 1.0).count() as f64 / n,
    ))
}

/// `1 - Var(returns - values) / Var(returns)`: how much of the return the
/// critic explains (1 perfect, <= 0 useless).
pub fn explained_variance(values: &[f64], returns: &[f64]) -> f64 {
    let var = |xs: &[f64]| {
        let m = xs.iter().sum::<f64>() / xs.len().max(1) as f64;
        xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len().max(1) as f64
    };
    let residual: Vec<f64> = returns.iter().zip(values).map(|(r, v)| r - v).collect();
    let vr = var(returns);
    if vr == 0.0 {
        return f64::NAN;
    }
    1.0 - var(&residual) / vr
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(xs: &[f32]) -> Tensor {
        Tensor::from_slice(xs)
    }

    #[test]
    fn gae_matches_hand_computation() {
        // rewards [0, 0, 1], values [0.5, 0.6, 0.7], gamma 0.9, lam 0.8:
        // delta2 = 1 - 0.7 = 0.3; delta1 = 0 + 0.9*0.7 - 0.6 = 0.03;
        // delta0 = 0 + 0.9*0.6 - 0.5 = 0.04.
        // A2 = 0.3; A1 = 0.03 + 0.72*0.3 = 0.246; A0 = 0.04 + 0.72*0.246 = 0.21712.
        let (a, r) = gae(&[0.0, 0.0, 1.0], &[0.5, 0.6, 0.7], 0.9, 0.8);
        for (x, y) in a.iter().zip([0.21712, 0.246, 0.3]) {
            assert!((x - y).abs() < 1e-12, "{a:?}");
        }
        for (x, y) in r.iter().zip([0.71712, 0.846, 1.0]) {
            assert!((x - y).abs() < 1e-12, "{r:?}");
        }
        // gamma = lam = 1: advantages are reward-to-go minus value.
        let (a, _) = gae(&[1.0, 2.0], &[0.0, 0.0], 1.0, 1.0);
        assert_eq!(a, vec![3.0, 2.0]);
    }

    #[test]
    fn whitening_gives_zero_mean_unit_variance() {
        let mut xs = vec![1.0, 2.0, 3.0, 4.0];
        whiten(&mut xs);
        // mean 2.5, unbiased var 5/3: (x - 2.5) / sqrt(5/3).
        let s = (5.0f64 / 3.0).sqrt();
        for (x, y) in xs.iter().zip([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s]) {
            assert!((x - y).abs() < 1e-6);
        }
    }

    #[test]
    fn clipped_surrogate_matches_hand_values() {
        // ratios e^0.1, e^-0.5, e^0.5 with advantages 1, 1, -1; eps 0.2.
        let old = t(&[0.0, 0.0, 0.0]);
        let new = t(&[0.1, -0.5, 0.5]);
        let adv = t(&[1.0, 1.0, -1.0]);
        let mask = t(&[1.0, 1.0, 1.0]);
        let (loss, clipfrac, akl) = clipped_surrogate(&new, &old, &adv, &mask, 0.2);
        let r: Vec<f64> = [0.1f64, -0.5, 0.5].iter().map(|x| x.exp()).collect();
        // min(r A, clip(r) A): 1.10517 (inside); min(0.60653, 0.8) = 0.60653;
        // min(-1.64872, -1.2) = -1.64872.
        let expected = -(r[0] + r[1] - r[2]) / 3.0;
        assert!(
            (loss.double_value(&[]) - expected).abs() < 1e-6,
            "{}",
            loss.double_value(&[])
        );
        assert!((clipfrac - 2.0 / 3.0).abs() < 1e-6);
        let akl_hand = r
            .iter()
            .zip([0.1, -0.5, 0.5])
            .map(|(r, l)| r - 1.0 - l)
            .sum::<f64>()
            / 3.0;
        assert!((akl - akl_hand).abs() < 1e-6);
        // A masked-out token changes nothing.
        let (loss2, _, _) = clipped_surrogate(
            &t(&[0.1, -0.5, 0.5, 3.0]),
            &t(&[0.0; 4]),
            &t(&[1.0, 1.0, -1.0, 5.0]),
            &t(&[1.0, 1.0, 1.0, 0.0]),
            0.2,
        );
        assert!((loss2.double_value(&[]) - expected).abs() < 1e-6);
    }

    #[test]
    fn surrogate_gradient_is_zero_where_clipped() {
        // Ratio above 1 + eps with A > 0, and below 1 - eps with A < 0: the
        // clipped term is the minimum and constant, so no gradient. Inside
        // the range, or clipped on the other side, the gradient flows.
        let old = t(&[0.0, 0.0, 0.0, 0.0]);
        let new = t(&[0.5, -0.5, 0.05, -0.5]).set_requires_grad(true);
        let adv = t(&[1.0, -1.0, 1.0, 1.0]);
        let (loss, _, _) = clipped_surrogate(&new, &old, &adv, &t(&[1.0; 4]), 0.2);
        loss.backward();
        let g: Vec<f32> = Vec::try_from(new.grad()).unwrap();
        assert_eq!(g[0], 0.0, "ratio 1.65 > 1.2 with A > 0");
        assert_eq!(g[1], 0.0, "ratio 0.61 < 0.8 with A < 0");
        assert!(
            g[2] < 0.0,
            "inside the range the loss falls as the ratio rises: {g:?}"
        );
        // Ratio below 1 - eps with A > 0: the unclipped term is the minimum.
        assert!((g[3] as f64 + (-0.5f64).exp() / 4.0).abs() < 1e-6, "{g:?}");
    }

    #[test]
    fn clipped_value_loss_matches_hand_values() {
        let old = t(&[1.0, 1.0]);
        let new = t(&[1.5, 0.9]);
        let ret = t(&[2.0, 0.0]);
        let mask = t(&[1.0, 1.0]);
        // Token 0: unclipped (1.5-2)^2 = 0.25; clipped V = 1.2, (1.2-2)^2 = 0.64 -> 0.64.
        // Token 1: unclipped 0.81; clipped V = 0.9 (inside) -> 0.81.
        let l = clipped_value_loss(&new, &old, &ret, &mask, 0.2).double_value(&[]);
        assert!((l - 0.5 * (0.64 + 0.81) / 2.0).abs() < 1e-6, "{l}");
        let l = clipped_value_loss(&new, &old, &ret, &mask, 0.0).double_value(&[]);
        assert!((l - 0.5 * (0.25 + 0.81) / 2.0).abs() < 1e-6, "{l}");
    }

    #[test]
    fn kl_estimators_and_adaptive_controller() {
        let k1 = kl_estimate(&[-1.0, -2.0], &[-1.5, -1.0], KlEstimator::K1);
        assert_eq!(k1, vec![0.5, -1.0]);
        let k3 = kl_estimate(&[-1.0, -2.0], &[-1.5, -1.0], KlEstimator::K3);
        assert!((k3[0] - ((-0.5f64).exp() - 1.0 + 0.5)).abs() < 1e-12);
        assert!(k3.iter().all(|&x| x >= 0.0));
        let mut c = KlController {
            beta: 0.1,
            adaptive: Some(AdaptiveKl {
                target: 6.0,
                horizon: 10000.0,
            }),
        };
        c.update(12.0, 1000); // error clipped to 0.2: beta *= 1.02
        assert!((c.beta - 0.102).abs() < 1e-12);
        c.update(3.0, 1000); // error -0.2: beta *= 0.98
        assert!((c.beta - 0.102 * 0.98).abs() < 1e-12);
        let mut fixed = KlController {
            beta: 0.02,
            adaptive: None,
        };
        fixed.update(100.0, 1000);
        assert_eq!(fixed.beta, 0.02);
    }

    #[test]
    fn explained_variance_is_one_for_a_perfect_critic() {
        assert!((explained_variance(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]) - 1.0).abs() < 1e-12);
        assert!(explained_variance(&[0.0, 0.0, 0.0], &[1.0, 2.0, 3.0]).abs() < 1e-12);
    }
}
