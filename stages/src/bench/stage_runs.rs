//! Benchmarks that run a whole stage (PPO, DPO, GRPO) as a user runs it,
//! in a temporary folder, and read its timings back from `metrics.jsonl`.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tch::Device;
use tempfile::TempDir;

use super::{median, model_config, BenchSpec};
use crate::error::{io_err, StageError};
use crate::kinds::dpo::{self, DpoConfig};
use crate::model::lora::LoraConfig;
use crate::model::sample::SamplingConfig;
use crate::optim::AdamWConfig;
use crate::rl::grpo::{self, GrpoConfig};
use crate::rl::ppo::{self, PpoConfig};
use crate::train::{ScratchModel, StageContext, METRICS_FILE};
use crate::{Head, HeadChoice, Model};

/// A stage's folder in a temporary directory, and its context (one
/// process, no judge).
struct StageRun {
    dir: TempDir,
    ctx: StageContext,
}

impl StageRun {
    fn new(policy: &Model, device: Device) -> Result<Self, StageError> {
        let dir = tempfile::tempdir().map_err(io_err(&std::env::temp_dir()))?;
        let ctx = StageContext {
            out_dir: dir.path().join("stage"),
            device,
            scratch: ScratchModel {
                config: policy.net.config(),
                tokenizer: policy.tokenizer.clone(),
            },
            judge: None,
            eval_judge: None,
            ranker: None,
            reward_runner: None,
            env_runner: None,
            stop_after: None,
            ranks: std::sync::Arc::new(crate::dist::Ranks::single()),
        };
        Ok(Self { dir, ctx })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The stage's metric lines.
    fn metrics(&self) -> Result<Vec<Value>, StageError> {
        let path = self.ctx.out_dir.join(METRICS_FILE);
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }
}

fn required<'a>(
    value: &'a Option<PathBuf>,
    flag: &str,
    mode: &str,
) -> Result<&'a Path, StageError> {
    value
        .as_deref()
        .ok_or_else(|| StageError::Config(format!("bench {mode}: give {flag}")))
}

/// LoRA adapters of rank `r` (alpha 2r) on every projection; 0: none.
fn lora(r: i64) -> Option<LoraConfig> {
    (r > 0).then(|| LoraConfig {
        r,
        alpha: 2.0 * r as f64,
        ..Default::default()
    })
}

/// PPO iterations (rollout, reference and reward scoring, GAE, update) with
/// a policy and a reward model; the median iteration's wall time.
pub fn ppo_iterations(spec: &BenchSpec, device: Device) -> Result<Value, StageError> {
    tch::manual_seed(spec.seed);
    let scratch = tempfile::tempdir().map_err(io_err(&std::env::temp_dir()))?;
    let policy_dir = match &spec.model {
        Some(d) => d.clone(),
        None => {
            let p = scratch.path().join("policy");
            let tokenizer = rlhf_datasets::Tokenizer::bytes();
            Model::init(&model_config(spec), Head::Lm, tokenizer, device)?.save(&p)?;
            p
        }
    };
    let policy = Model::load(&policy_dir, HeadChoice::AsSaved, device)?;
    let run = StageRun::new(&policy, device)?;
    let rm_dir = run.path("rm");
    let (config, tokenizer) = (policy.net.config(), policy.tokenizer.clone());
    drop(policy);
    Model::init(&config, Head::Scalar, tokenizer, device)?.save(&rm_dir)?;
    // Prompts of `prompt_len` random bytes; answers of exactly `new_tokens`.
    let mut lines = String::new();
    for i in 0..spec.batch * 4 {
        let p: String = (0..spec.prompt_len)
            .map(|j| char::from(b'a' + ((i * 7 + j * 13) % 26) as u8))
            .collect();
        lines.push_str(&json!({ "prompt": p }).to_string());
        lines.push('\n');
    }
    let prompts = run.path("prompts.jsonl");
    std::fs::write(&prompts, lines).map_err(io_err(&prompts))?;
    let config = PpoConfig {
        prompts,
        policy: policy_dir,
        reward_model: Some(rm_dir),
        iterations: spec.warmup + spec.steps,
        rollout_batch: spec.batch as usize,
        minibatch_size: spec.minibatch as usize,
        ppo_epochs: 1,
        sampling: SamplingConfig {
            temperature: 1.0,
            max_new_tokens: spec.new_tokens,
            stop_at_eos: false,
            ..SamplingConfig::default()
        },
        save_rollouts: false,
        checkpoint_every: 1_000_000,
        ..PpoConfig::default()
    };
    ppo::run(&config, &run.ctx)?;
    let timed = timed_iterations(&run.metrics()?, spec.warmup);
    if timed.is_empty() {
        return Err(StageError::Config("bench: no timed PPO iterations".into()));
    }
    let times = timed.iter().map(|t| t.seconds).collect();
    Ok(json!({
        "mode": "ppo", "batch": spec.batch, "new_tokens": spec.new_tokens,
        "iteration_seconds": median(times),
    }))
}

/// One RL iteration's times from its metrics line: the whole, and its
/// rollout (sampling, scoring, log-probabilities) and update.
struct IterationTimes {
    seconds: f64,
    rollout: f64,
    update: f64,
    answer_length: f64,
    /// Of the rollout: sampling, the log-probability forwards, scoring.
    sampling: f64,
    logprobs: f64,
    scoring: f64,
}

/// The iterations after the first `warmup`, with their phases (the
/// metrics hold running totals of the phases).
fn timed_iterations(metrics: &[Value], warmup: i64) -> Vec<IterationTimes> {
    let rows: Vec<&Value> = metrics
        .iter()
        .filter(|r| r["iteration"].as_i64().is_some())
        .collect();
    let total = |r: &Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let mut out = vec![];
    for (i, r) in rows.iter().enumerate() {
        if r["iteration"].as_i64().unwrap_or(0) <= warmup {
            continue;
        }
        let before = |k: &str| i.checked_sub(1).map_or(0.0, |j| total(rows[j], k));
        out.push(IterationTimes {
            seconds: total(r, "iteration_seconds"),
            rollout: total(r, "generation_seconds") - before("generation_seconds"),
            update: total(r, "training_seconds") - before("training_seconds"),
            answer_length: total(r, "answer_length"),
            sampling: total(r, "sampling_s"),
            logprobs: total(r, "logprobs_s"),
            scoring: total(r, "scoring_s"),
        });
    }
    out
}

/// GRPO iterations of the grpo stage: `batch` prompts of the `{messages}`
/// or `{prompt}` rows of `spec.data` a step, `group_size` answers each
/// (at most `new_tokens`, until EOS), scored by `spec.reward_model`,
/// updated in minibatches of `minibatch` answers with the KL to the
/// reference in the loss (beta 0.04); LoRA of rank `lora_r` when set.
/// The median iteration's seconds and its phases.
pub fn grpo_iterations(spec: &BenchSpec, device: Device) -> Result<Value, StageError> {
    tch::manual_seed(spec.seed);
    let policy_dir = required(&spec.model, "--model", "grpo")?;
    let reward_model = required(&spec.reward_model, "--reward-model", "grpo")?;
    let prompts = required(&spec.data, "--data", "grpo")?;
    let run = StageRun::new(
        &Model::load(policy_dir, HeadChoice::AsSaved, device)?,
        device,
    )?;
    let config = GrpoConfig {
        policy: policy_dir.to_owned(),
        reward_model: Some(reward_model.to_owned()),
        prompts: prompts.to_owned(),
        iterations: spec.warmup + spec.steps,
        prompts_per_iteration: spec.batch as usize,
        group_size: spec.group_size as usize,
        minibatch_size: spec.minibatch as usize,
        epochs: 1,
        optimizer: AdamWConfig {
            lr: 1e-5,
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        sampling: SamplingConfig {
            temperature: 1.0,
            max_new_tokens: spec.new_tokens,
            stop_at_eos: true,
            ..SamplingConfig::default()
        },
        save_rollouts: false,
        checkpoint_every: 1_000_000,
        lora: lora(spec.lora_r),
        precision: spec.precision,
        seed: Some(spec.seed as u64),
        ..GrpoConfig::default()
    };
    grpo::run(&config, &run.ctx)?;
    let timed = timed_iterations(&run.metrics()?, spec.warmup);
    if timed.is_empty() {
        return Err(StageError::Config("bench: no timed GRPO iterations".into()));
    }
    let med = |f: fn(&IterationTimes) -> f64| median(timed.iter().map(f).collect());
    Ok(json!({
        "mode": "grpo", "prompts": spec.batch, "group_size": spec.group_size,
        "new_tokens": spec.new_tokens, "lora_r": spec.lora_r,
        "iteration_seconds": med(|t| t.seconds), "rollout_seconds": med(|t| t.rollout),
        "update_seconds": med(|t| t.update), "mean_length": med(|t| t.answer_length),
        "sampling_seconds": med(|t| t.sampling), "logprobs_seconds": med(|t| t.logprobs),
        "scoring_seconds": med(|t| t.scoring),
        "peak_rss_mib": crate::memory::peak_rss_bytes().map(|b| b as f64 / (1 << 20) as f64),
    }))
}

/// Two epochs of the dpo stage over the rankings of `spec.data`, `batch`
/// prompts a step (rows grouped by length, LoRA of rank `lora_r` when
/// set): the second epoch's step seconds and real (unpadded) tokens, so
/// that every pair counts once; the reference's log-probabilities, which
/// the stage computes once before its first step, timed apart.
pub fn dpo_epochs(spec: &BenchSpec, device: Device) -> Result<Value, StageError> {
    tch::manual_seed(spec.seed);
    let policy_dir = required(&spec.model, "--model", "dpo")?;
    let data = required(&spec.data, "--data", "dpo")?;
    let run = StageRun::new(
        &Model::load(policy_dir, HeadChoice::AsSaved, device)?,
        device,
    )?;
    let mut config = DpoConfig {
        policy: Some(policy_dir.to_owned()),
        data: data.to_owned(),
        eval_fraction: 0.0,
        max_len: spec.seq as usize,
        ..DpoConfig::default()
    };
    let train = &mut config.train;
    train.batch_size = spec.batch as usize;
    train.epochs = 2;
    train.optimizer.lr = 1e-4;
    train.schedule.warmup_steps = 0;
    train.eval_every = 1_000_000;
    train.checkpoint_every = 1_000_000;
    train.group_by_length = true;
    train.lora = lora(spec.lora_r);
    train.precision = spec.precision;
    train.seed = Some(spec.seed as u64);
    let summary = dpo::run(&config, &run.ctx)?;
    let steps: Vec<Value> = run
        .metrics()?
        .into_iter()
        .filter(|r| r["loss"].is_number())
        .collect();
    let second = &steps[steps.len() / 2..];
    let seconds: f64 = second.iter().filter_map(|r| r["step_s"].as_f64()).sum();
    let real_tokens: f64 = second
        .iter()
        .map(|r| {
            let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            f("tokens_per_s") * f("step_s") * (1.0 - f("padding_waste"))
        })
        .sum();
    Ok(json!({
        "mode": "dpo", "pairs": summary.train_pairs, "batch": spec.batch, "lora_r": spec.lora_r,
        "steps": second.len(), "epoch_seconds": seconds, "real_tokens": real_tokens,
        "tokens_per_s": real_tokens / seconds, "reference_seconds": summary.reference_seconds,
        "peak_rss_mib": crate::memory::peak_rss_bytes().map(|b| b as f64 / (1 << 20) as f64),
    }))
}
