//! The one training loop of the supervised stage kinds (SFT, the reward
//! model, and the next ones): a stage brings its data, its loss and its
//! eval as an [`Objective`]; [`fit`] owns seeding, micro-batches and
//! accumulation, the non-finite guard, clipping, the optimiser step,
//! metrics, progress, checkpoints, resume and stop.
//!
//! Exact resume: a checkpoint holds weights, AdamW moments and the step.
//! The data order is a function of (seed, epoch) and libtorch's RNG is
//! reseeded from (seed, step) before every step ([`step_seed`]), so the
//! step number alone restores the data position and the RNG: a resumed run
//! ends with the same weights, bit for bit on CPU, as an uninterrupted one.

pub mod batches;
pub mod checkpoints;
pub mod learning;
pub mod metrics;
pub mod tensorboard;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::json;
use tch::{Device, Tensor};

use crate::check;
use crate::model::checkpoint::{HeadChoice, Model};
use crate::model::gpt::Head;
use crate::model::network::{ModelConfig, Network};
use crate::optim::{AdamW, AdamWConfig, LrSchedule};

pub use crate::dist::Ranks;
pub use crate::error::{check_finite, interrupt_requested, io_err, request_interrupt, StageError};
pub use crate::model::precision::Precision;
pub use batches::EpochBatches;
pub use checkpoints::{
    load_training, newest_usable, periodic_checkpoints, periodic_dir, prune_periodic,
    save_training, Checkpointer, FINAL_DIR, KEEP_PERIODIC, OPTIMIZER_FILE, PERIODIC_DIR,
    STATE_FILE,
};
pub use learning::{not_learning, MIN_IMPROVEMENT};
pub use metrics::{
    finished_summary, progress_bar, stage_progress, write_summary, MetricsLog, METRICS_FILE,
    PROGRESS_FILE, SUMMARY_FILE,
};

/// The settings every supervised stage shares. A stage config holds them
/// flattened, so they sit beside the stage's own keys in the experiment
/// file; each stage kind supplies its own defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSettings {
    /// Examples (SFT) or prompts with their ranked answers (reward) per
    /// micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    pub epochs: usize,
    /// Stop after this many optimiser steps (overrides `epochs`).
    pub max_steps: Option<i64>,
    pub optimizer: AdamWConfig,
    pub schedule: LrSchedule,
    /// Global gradient-norm bound; 0 disables clipping.
    pub max_grad_norm: f64,
    pub eval_every: i64,
    pub checkpoint_every: i64,
    /// Unset: the experiment's seed.
    pub seed: Option<u64>,
    /// When the stage is flagged as not learning ([`learning`]: its eval
    /// loss hardly fell, or it did not clear its baselines), `rlhf run`
    /// starts no stage that depends on it; unset, the flags only warn.
    pub fail_if_not_learning: bool,
    /// Train LoRA adapters on the frozen `init` model instead of every
    /// weight (a scalar head is trained in full).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<crate::model::lora::LoraConfig>,
    /// `bf16`: matmuls in bfloat16 on fp32 master weights (autocast).
    #[serde(default, skip_serializing_if = "Precision::is_fp32")]
    pub precision: Precision,
    /// Pool each step's micro-batches, sort their examples by length and
    /// deal them back into micro-batches of the same sizes, so that rows
    /// of similar length share a forward and less of it is padding. A step
    /// sees the same examples: SFT's gradient is the same, the reward
    /// model's and DPO's (a mean over micro-batches of their means) the
    /// same when the micro-batches are full, and in expectation always.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub group_by_length: bool,
    /// Keep only each layer's input in a training forward and recompute
    /// the layers in the backward: activation memory of one layer instead
    /// of all, for about a third more time. Needs dropout off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
}

impl TrainSettings {
    /// Keys left out when unset: the experiment file may still set them.
    pub const OPTIONAL_KEYS: [&'static str; 4] = [
        "lora",
        "precision",
        "group_by_length",
        "gradient_checkpointing",
    ];

    /// Settings with the common defaults: no accumulation, no step limit,
    /// clipping at norm 1, eval every 50 steps, a checkpoint every 100.
    pub fn new(
        batch_size: usize,
        epochs: usize,
        optimizer: AdamWConfig,
        schedule: LrSchedule,
    ) -> Self {
        Self {
            batch_size,
            grad_accum: 1,
            epochs,
            max_steps: None,
            optimizer,
            schedule,
            max_grad_norm: 1.0,
            eval_every: 50,
            checkpoint_every: 100,
            seed: None,
            fail_if_not_learning: false,
            lora: None,
            precision: Precision::Fp32,
            group_by_length: false,
            gradient_checkpointing: false,
        }
    }

    pub fn validate(&self) -> Result<(), StageError> {
        check::count("batch_size", self.batch_size as u64, 1, 1 << 20)?;
        check::count("grad_accum", self.grad_accum as u64, 1, 1 << 16)?;
        check::count("epochs", self.epochs as u64, 0, 1_000_000)?;
        if self.epochs == 0 && self.max_steps.is_none() {
            return Err(StageError::setting(
                "epochs",
                "is 0 and max_steps is unset: nothing to train",
            ));
        }
        if let Some(s) = self.max_steps {
            check::require("max_steps", (1..=1 << 40).contains(&s), "in [1, 2^40]", s)?;
        }
        check::at_least("eval_every", self.eval_every, 1)?;
        check::at_least("checkpoint_every", self.checkpoint_every, 1)?;
        check::non_negative("max_grad_norm", self.max_grad_norm)?;
        if let Some(l) = &self.lora {
            l.validate("lora")?;
        }
        self.optimizer.validate("optimizer")?;
        self.schedule.validate("schedule")?;
        Ok(())
    }

    /// The seed, once the experiment's has been filled in.
    pub fn seed(&self) -> u64 {
        self.seed.unwrap_or(0)
    }

    /// Optimiser steps for `examples` training examples.
    pub fn total_steps(&self, examples: usize) -> i64 {
        let per_epoch = examples.div_ceil(self.batch_size) as u64;
        self.max_steps.unwrap_or_else(|| {
            ((self.epochs as u64 * per_epoch).div_ceil(self.grad_accum as u64) as i64).max(1)
        })
    }
}

/// libtorch's seed for step (or iteration) `step` of a run seeded `seed`:
/// dropout and sampling depend on the step number alone, so a resumed run
/// draws what an uninterrupted one drew.
pub fn step_seed(seed: u64, step: i64) -> i64 {
    (seed as i64).wrapping_mul(1_000_003).wrapping_add(step)
}

/// The model a stage starts from when its config names no `init`.
#[derive(Debug, Clone)]
pub struct ScratchModel {
    pub config: ModelConfig,
    pub tokenizer: rlhf_datasets::Tokenizer,
}

/// Saved with every checkpoint of a supervised stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub stage: String,
    /// Optimiser steps done.
    pub step: i64,
    pub total_steps: i64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "nan")]
    pub last_train_loss: f64,
    pub done: bool,
}

fn nan() -> f64 {
    f64::NAN
}

/// The model a stage trains, where its optimiser stands, and its saved
/// state when it resumes.
pub struct Start {
    pub model: Model,
    pub opt: AdamW,
    pub state: Option<TrainerState>,
}

/// Resumes from the newest usable periodic checkpoint of `out_dir`, else
/// loads `init` (or builds a fresh model from `scratch`), seeded by `seed`.
pub fn start_or_resume(
    out_dir: &Path,
    head: Head,
    init: Option<&Path>,
    scratch: &ScratchModel,
    settings: &TrainSettings,
    device: Device,
) -> Result<Start, StageError> {
    let (optimizer, seed) = (&settings.optimizer, settings.seed());
    let want = HeadChoice::Want(head);
    let resumed = newest_usable(out_dir, |dir| load_training(dir, want, device));
    let (model, moments, state) = match resumed {
        Some((_, _, (m, moments, state))) => (m, Some(moments), Some(state)),
        None => {
            tch::manual_seed(seed as i64);
            let mut m = match init {
                Some(dir) => Model::load(dir, want, device)?,
                None => Model::init(&scratch.config, head, scratch.tokenizer.clone(), device)?,
            };
            if let Some(lora) = &settings.lora {
                let base = init.ok_or_else(|| {
                    StageError::setting(
                        "lora",
                        "needs `init`, a model to adapt: a model from scratch trains every weight",
                    )
                })?;
                m.add_lora(lora, base)?;
            }
            (m, None, None)
        }
    };
    if settings.gradient_checkpointing {
        model
            .net
            .set_gradient_checkpointing(true)
            .map_err(|e| StageError::setting("gradient_checkpointing", e))?;
    }
    let mut opt = AdamW::new(&model.vs, optimizer.clone());
    if let Some(m) = &moments {
        opt.load_state_tensors(m)?;
    }
    Ok(Start { model, opt, state })
}

/// A sum over a step's micro-batches, logged as `num / den`
/// (the reward model's pairwise accuracy).
#[derive(Debug, Clone, Copy)]
pub struct Ratio {
    pub name: &'static str,
    pub num: f64,
    pub den: f64,
}

/// Where a micro-batch stands in its step, over every rank: what a
/// stage's loss needs to be this rank's exact part of the step's loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Share {
    /// This rank's weight in the micro-batch ([`Objective::weight`]).
    pub local: f64,
    /// The micro-batch's weight over every rank.
    pub micro: f64,
    /// The step's weight: every micro-batch of every rank.
    pub step: f64,
    /// Micro-batches in the step.
    pub micro_batches: usize,
}

/// Held-out quality: its loss for the log line, its fields for the metrics.
pub trait Evaluation {
    fn loss(&self) -> f64;
    /// Adds its fields (`eval_loss`, ...) to a metrics record.
    fn record(&self, record: &mut serde_json::Value);
}

/// A collated batch: how many tokens it feeds the model (for tokens/s),
/// and how many of them are not padding (for `padding_waste`).
pub trait Tokens {
    fn tokens(&self) -> usize;
    fn real_tokens(&self) -> usize;
}

impl Tokens for rlhf_datasets::batch::LmBatch {
    fn tokens(&self) -> usize {
        self.rows * self.width
    }

    fn real_tokens(&self) -> usize {
        self.real_tokens
    }
}

impl Tokens for rlhf_datasets::batch::GroupBatch {
    fn tokens(&self) -> usize {
        self.rows * self.width
    }

    fn real_tokens(&self) -> usize {
        self.last_index.iter().map(|&i| i as usize + 1).sum()
    }
}

/// What a supervised stage brings to [`fit`]: how its examples become a
/// batch, its loss and its eval.
pub trait Objective {
    type Example;
    type Batch: Tokens;
    type Eval: Evaluation;
    /// How errors and logs name the loss ("training loss").
    const LOSS: &'static str;
    fn collate(&self, examples: &[&Self::Example]) -> Self::Batch;
    /// What the loss is normalised by in a micro-batch (SFT: its answer
    /// tokens; the reward model: its groups), summed over the ranks.
    fn weight(&self, batch: &Self::Batch) -> f64;
    /// This rank's part of the step's loss from one micro-batch (the parts
    /// of every micro-batch and rank sum to the step's loss), and its
    /// ratios to sum over the step.
    fn loss(&self, model: &Network, batch: &Self::Batch, share: &Share) -> (Tensor, Vec<Ratio>);
    /// Held-out quality; `None` without held-out data.
    fn evaluate(&self, model: &Network) -> Option<Self::Eval>;
    /// The width one example needs in a batch (`group_by_length` sorts
    /// by it).
    fn length(&self, example: &Self::Example) -> usize;
    /// The eval loss of a model that knows nothing, where the loss has one
    /// (Bradley-Terry: ln 2). Learning is then measured from it rather than
    /// from the start's eval loss: a fresh head can start above chance and
    /// fall to it without learning anything, and a reward model fine-tuned
    /// from a good one starts near where it ends.
    fn chance_loss(&self) -> Option<f64> {
        None
    }
}

/// One supervised run: where it writes, how it trains, and its test hook.
#[derive(Debug, Clone)]
pub struct FitRun<'a> {
    /// How logs and the progress bar name the stage ("sft").
    pub label: &'static str,
    pub settings: &'a TrainSettings,
    pub out_dir: &'a Path,
    /// Stop (as if killed) after this step, leaving its checkpoint.
    pub stop_after: Option<i64>,
    /// The ranks sharing the run; rank 0 writes.
    pub ranks: &'a Ranks,
}

impl<'a> FitRun<'a> {
    pub fn new(label: &'static str, settings: &'a TrainSettings, ctx: &'a StageContext) -> Self {
        Self {
            label,
            settings,
            out_dir: &ctx.out_dir,
            stop_after: ctx.stop_after,
            ranks: &ctx.ranks,
        }
    }

    /// The run folder made; a finished run's summary, or the model to train
    /// (resumed from the newest usable checkpoint, else loaded from `init`
    /// or built from the context's scratch model).
    pub fn begin<S: DeserializeOwned>(
        &self,
        head: Head,
        init: Option<&Path>,
        ctx: &StageContext,
    ) -> Result<Result<Start, S>, StageError> {
        // Rank 0 owns the folder; the others read it once it is ready.
        let done = match self.ranks.is_main() {
            true => prepare_out_dir(self.out_dir, self.label)?,
            false => None,
        };
        self.ranks.barrier()?;
        let done = done.or_else(|| match self.ranks.is_main() {
            true => None,
            false => finished_summary(self.out_dir),
        });
        if let Some(summary) = done {
            return Ok(Err(summary));
        }
        let s = self.settings;
        let start = start_or_resume(self.out_dir, head, init, &ctx.scratch, s, ctx.device)?;
        let step = start.state.as_ref().map_or(0, |s| s.step);
        same_on_every_rank(self.ranks, step, "resumed from step")?;
        Ok(Ok(start))
    }
}

/// Fails on every rank alike unless all ranks hold the same `value` (a
/// rank that read another checkpoint would train other weights).
pub fn same_on_every_rank(ranks: &Ranks, value: i64, what: &str) -> Result<(), StageError> {
    if ranks.world() == 1 {
        return Ok(());
    }
    let v = value as f64;
    let s = ranks.sum(&[v, v * v])?;
    if s[1] * ranks.world() as f64 != s[0] * s[0] {
        return Err(StageError::Config(format!(
            "the ranks disagree: rank {} {what} {value}, their mean is {}; every rank must see the same run folder (shared between machines)",
            ranks.rank(),
            s[0] / ranks.world() as f64
        )));
    }
    Ok(())
}

/// A finished step loop: the model and optimiser as they ended.
pub struct Fitted<E> {
    pub model: Model,
    pub opt: AdamW,
    pub steps: i64,
    pub last_loss: f64,
    pub last_eval: Option<E>,
    pub tokens_per_second: f64,
    /// Set when the eval loss hardly moved ([`not_learning`]); the stage
    /// logs it with its other flags ([`learning::flags`]).
    pub warning: Option<String>,
}

/// Runs (or resumes) the step loop of `objective` from `start`. With
/// several ranks, each takes its share of every micro-batch in the same
/// order; their gradients and the step's numbers are summed, so the ranks
/// take the step a single process would take with the whole batch.
pub fn fit<O: Objective>(
    run: &FitRun,
    start: Start,
    objective: &O,
    train: &[&O::Example],
) -> Result<Fitted<O::Eval>, StageError> {
    let cfg = run.settings;
    let ranks = run.ranks;
    let main = ranks.is_main();
    check_before_fit(run)?;
    let Start {
        model,
        mut opt,
        state,
    } = start;
    let trainable = trainable_by_name(&model);
    ranks.broadcast_from_main(&trainable)?;
    let total_steps = cfg.total_steps(train.len());
    let start_step = state.as_ref().map_or(0, |s| s.step);
    let metrics_path = run.out_dir.join(METRICS_FILE);
    let mut metrics = match main {
        true => MetricsLog::open(&metrics_path, state.as_ref().map(|s| s.step))?,
        false => MetricsLog::disabled(),
    };
    let checkpointer = checkpointer(run, total_steps);
    let bar = match main {
        true => stage_progress(run.out_dir, total_steps, start_step, run.label),
        false => indicatif::ProgressBar::hidden(),
    };
    let mut micro_batches = EpochBatches::new(train.len(), cfg.batch_size, cfg.seed());
    let mut last_loss = state.as_ref().map_or(f64::NAN, |s| s.last_train_loss);
    let mut last_eval = None;
    let start_eval = eval_at_start(
        objective,
        &model,
        state.is_some(),
        &mut metrics,
        &metrics_path,
    );
    let (mut tokens_seen, mut train_time) = (0usize, 0.0f64);
    for step in start_step..total_steps {
        let t0 = Instant::now();
        tch::manual_seed(step_seed(cfg.seed(), step));
        let lr = cfg.schedule.lr(cfg.optimizer.lr, step, total_steps);
        let share = step_batches(objective, &mut micro_batches, train, step, cfg, ranks);
        let done_step = accumulate(
            objective, &model, &mut opt, &trainable, &share, cfg, step, ranks,
        )?;
        opt.step(lr);
        crate::memory::release_free_memory();
        last_loss = done_step.loss;
        let dt = t0.elapsed().as_secs_f64();
        let (step_tokens, real_tokens) = share.tokens();
        (tokens_seen, train_time) = (tokens_seen + step_tokens, train_time + dt);
        let done = step + 1;
        let epoch = (done * cfg.grad_accum as i64) as f64 / micro_batches.per_epoch().max(1) as f64;
        let measured = StepTimes {
            lr,
            seconds: dt,
            tokens: step_tokens,
            real_tokens,
            epoch,
            world: ranks.world(),
        };
        let mut record = step_record(done, &done_step, &measured);
        if done % cfg.eval_every == 0 || done == total_steps {
            last_eval = objective.evaluate(&model.net);
            log_eval(run, &mut record, last_eval.as_ref(), done, total_steps, lr);
        }
        metrics.write(&record);
        bar.set_position(done as u64);
        bar.set_message(format!("loss {:.3}", done_step.loss));
        let state = trainer_state(run, done, total_steps, last_loss, false);
        // One process: the interrupt as it stands now (it may have come
        // during the eval); several: as the ranks agreed.
        let interrupted = match ranks.world() {
            1 => interrupt_requested(),
            _ => done_step.interrupted,
        };
        checkpointer
            .after_step_or_stop(done, interrupted, |dir| {
                save_training(dir, &model, &opt, &state)
            })
            .inspect_err(|_| bar.abandon())?;
    }
    bar.finish_and_clear();
    let baseline = objective.chance_loss().or(start_eval);
    let warning = not_learning(run.label, baseline, last_eval.as_ref().map(|e| e.loss()));
    Ok(Fitted {
        model,
        opt,
        steps: total_steps,
        last_loss,
        last_eval,
        tokens_per_second: tokens_seen as f64 * ranks.world() as f64 / train_time.max(1e-9),
        warning,
    })
}

/// Before the first step: says when clipping is off, and refuses a batch
/// the ranks cannot share equally (under torchrun or srun the world size is
/// known only now; `rlhf run` checks it at plan time).
fn check_before_fit(run: &FitRun) -> Result<(), StageError> {
    let (cfg, world) = (run.settings, run.ranks.world());
    if run.ranks.is_main() {
        check::note_clipping_off("max_grad_norm", cfg.max_grad_norm);
    }
    if !cfg.batch_size.is_multiple_of(world) {
        return Err(StageError::setting(
            "batch_size",
            format!("{} does not divide among the {world} ranks", cfg.batch_size),
        ));
    }
    Ok(())
}

/// The eval loss the run started from: measured now (and logged as step
/// 0) on a fresh run, read back from the metrics on a resumed one. Every
/// rank evaluates (the same data; rank 0 writes): a rank waiting in the
/// next collective meanwhile could reach its timeout.
fn eval_at_start<O: Objective>(
    objective: &O,
    model: &Model,
    resumed: bool,
    metrics: &mut MetricsLog,
    metrics_path: &Path,
) -> Option<f64> {
    if resumed {
        return metrics::start_eval_loss(metrics_path);
    }
    let start = objective.evaluate(&model.net).map(|e| e.loss());
    if let Some(loss) = start {
        metrics.write(&json!({"step": 0, "eval_loss": loss}));
    }
    start
}

/// What a step measured besides its loss.
struct StepTimes {
    lr: f64,
    seconds: f64,
    /// This rank's tokens, and those of them that are not padding.
    tokens: usize,
    real_tokens: usize,
    epoch: f64,
    world: usize,
}

/// A step's line of `metrics.jsonl` (its eval is added by [`log_eval`]).
fn step_record(done: i64, step: &StepDone, t: &StepTimes) -> serde_json::Value {
    let mut record = json!({
        "step": done, "loss": step.loss, "lr": t.lr, "grad_norm": step.grad_norm,
        "tokens_per_s": t.tokens as f64 * t.world as f64 / t.seconds.max(1e-9),
        "epoch": t.epoch,
        "padding_waste": padding_waste(t.real_tokens, t.tokens),
    });
    for r in &step.ratios {
        record[r.name] = json!(r.num / r.den.max(1.0));
    }
    record["step_s"] = json!(t.seconds);
    if t.world > 1 {
        record["allreduce_s"] = json!(step.comm_seconds);
    }
    record
}

/// The share of the positions a step computed that were padding.
pub fn padding_waste(real: usize, computed: usize) -> f64 {
    match computed {
        0 => 0.0,
        n => 1.0 - real as f64 / n as f64,
    }
}

/// Adds an eval to the step's record, and logs it every `eval_every`.
fn log_eval<E: Evaluation>(
    run: &FitRun,
    record: &mut serde_json::Value,
    eval: Option<&E>,
    done: i64,
    total_steps: i64,
    lr: f64,
) {
    if let Some(e) = eval {
        e.record(record);
    }
    if done % run.settings.eval_every == 0 {
        let loss = record["loss"].as_f64().unwrap_or(f64::NAN);
        let eval = eval.map_or("-".into(), |e| format!("{:.4}", e.loss()));
        tracing::info!(
            "{}: step {done}/{total_steps} loss {loss:.4} eval {eval} lr {lr:.2e}",
            run.label
        );
    }
}

/// Refuses a training step on the CPU that cannot fit in this machine's
/// memory, before its state is allocated: weights, gradients and AdamW's
/// two moments (16 bytes per trained parameter, 4 per frozen one), and one
/// micro-batch of `rows` sequences of `len` tokens (fp32 activations, and
/// a policy's logits with their softmax and gradient). A rough lower bound: a
/// step refused here could not have run. `rows` is one rank's share.
/// Not checked on CUDA (the device's memory is what counts there).
pub fn check_step_memory(model: &Model, rows: usize, len: usize) -> Result<(), StageError> {
    let on_cpu = model.vs.device() == tch::Device::Cpu;
    let Some(have) = rlhf_datasets::files::memory_bytes().filter(|_| on_cpu) else {
        return Ok(());
    };
    let config = model.net.config();
    let trained: f64 = trainable_by_name(model)
        .iter()
        .map(|t| t.numel() as f64)
        .sum();
    let frozen = (config.n_params() as f64 - trained).max(0.0);
    let state = 16.0 * trained + 4.0 * frozen;
    let (layers, width, heads) = config.shape();
    let tokens = rows as f64 * len as f64;
    // Per token: the logits three times over (a scalar head has none); per
    // layer about 17 values of the width and the attention scores
    // (Korthikanti et al., 2022).
    let logits = match model.net.head() {
        Head::Lm => 3.0 * config.vocab_size() as f64,
        Head::Scalar => 0.0,
    };
    let per_token =
        logits + layers as f64 * (17.0 * width as f64 + 2.5 * heads as f64 * len as f64);
    let batch = 4.0 * tokens * per_token;
    if state + batch <= have as f64 {
        return Ok(());
    }
    let gb = |b: f64| format!("{:.1} GB", b / 1e9);
    Err(StageError::setting(
        "batch_size",
        format!(
            "a training step needs at least {} (weights, gradients and AdamW moments: {}; a micro-batch of {rows} x {len} tokens: {}); this machine has {}: lower batch_size or max_len, or train LoRA adapters",
            gb(state + batch),
            gb(state),
            gb(batch),
            gb(have as f64)
        ),
    ))
}

/// [`check_step_memory`] for ranked groups: a micro-batch holds every
/// answer of `batch_size` groups (this rank's share), each after its prompt.
pub fn check_groups_memory<'a>(
    model: &Model,
    groups: impl Iterator<Item = &'a rlhf_datasets::batch::TokenizedGroup> + Clone,
    batch_size: usize,
    ranks: &Ranks,
) -> Result<(), StageError> {
    let answers = groups.clone().map(|g| g.responses.len()).max().unwrap_or(0);
    let count = groups.clone().count();
    let longest = groups
        .flat_map(|g| g.responses.iter().map(|r| g.prompt.len() + r.len()))
        .max()
        .unwrap_or(0);
    let rows = (batch_size / ranks.world()).max(1).min(count) * answers;
    check_step_memory(model, rows, longest)
}

/// The trainable variables by name: the same order on every rank (a
/// VarStore's own order comes from a hash map).
pub fn trainable_by_name(model: &Model) -> Vec<Tensor> {
    let mut vars: Vec<(String, Tensor)> = model
        .vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars.into_iter().map(|(_, t)| t).collect()
}

/// This rank's part of each micro-batch of a step (`None` where its part
/// is empty: a short last micro-batch of an epoch).
struct StepBatches<B> {
    batches: Vec<Option<B>>,
    /// The rank has no example in the whole step: `batches` holds one of
    /// another rank's, to be weighted zero, so that this rank's backward
    /// reaches the same weights as the others' and their gradients sum.
    stand_in: bool,
}

impl<B: Tokens> StepBatches<B> {
    /// The positions this rank's forwards compute, and those of them that
    /// are tokens rather than padding (a stand-in counts none).
    fn tokens(&self) -> (usize, usize) {
        let count = |f: fn(&B) -> usize| match self.stand_in {
            true => 0,
            false => self.batches.iter().flatten().map(f).sum::<usize>(),
        };
        (count(B::tokens), count(B::real_tokens))
    }
}

fn step_batches<O: Objective>(
    objective: &O,
    micro_batches: &mut EpochBatches,
    train: &[&O::Example],
    step: i64,
    cfg: &TrainSettings,
    ranks: &Ranks,
) -> StepBatches<O::Batch> {
    let mut all: Vec<Vec<usize>> = (0..cfg.grad_accum as i64)
        .map(|k| micro_batches.rows(step * cfg.grad_accum as i64 + k))
        .collect();
    if cfg.group_by_length {
        all = by_length(&all, ranks.world(), |i| objective.length(train[i]));
    }
    let collate = |rows: &[usize]| {
        let examples: Vec<&O::Example> = rows.iter().map(|&i| train[i]).collect();
        (!examples.is_empty()).then(|| objective.collate(&examples))
    };
    let mut batches: Vec<Option<O::Batch>> = all
        .iter()
        .map(|rows| collate(&rows[ranks.share(rows.len())]))
        .collect();
    let stand_in = batches.iter().all(Option::is_none);
    if stand_in {
        if let Some(k) = all.iter().position(|rows| !rows.is_empty()) {
            batches[k] = collate(&all[k][..1]);
        }
    }
    StepBatches { batches, stand_in }
}

/// The step's examples sorted by `length` (longest first, ties in their
/// order) and dealt back into micro-batches of the same sizes: rows of
/// similar length share a forward. Within a micro-batch the rows are
/// dealt to the `world` ranks in turn, so that no rank always takes the
/// longest.
fn by_length(
    micro: &[Vec<usize>],
    world: usize,
    length: impl Fn(usize) -> usize,
) -> Vec<Vec<usize>> {
    let mut pooled: Vec<usize> = micro.iter().flatten().copied().collect();
    pooled.sort_by_key(|&i| std::cmp::Reverse(length(i)));
    let mut rest = pooled.as_slice();
    micro
        .iter()
        .map(|m| {
            let (head, tail) = rest.split_at(m.len());
            rest = tail;
            deal(head, world)
        })
        .collect()
}

/// `rows` in the order whose contiguous rank shares ([`Ranks::share`])
/// take every `world`-th row: rank 0 the 1st, (world+1)th, ...
fn deal(rows: &[usize], world: usize) -> Vec<usize> {
    let n = rows.len();
    let sizes: Vec<usize> = (0..world)
        .map(|w| n * (w + 1) / world - n * w / world)
        .collect();
    let mut parts: Vec<Vec<usize>> = vec![Vec::new(); world];
    let mut w = 0;
    for &row in rows {
        while parts[w].len() == sizes[w] {
            w = (w + 1) % world;
        }
        parts[w].push(row);
        w = (w + 1) % world;
    }
    parts.concat()
}

/// What one step did, agreed on by every rank.
struct StepDone {
    loss: f64,
    grad_norm: f64,
    ratios: Vec<Ratio>,
    /// Some rank was interrupted: all stop after this step.
    interrupted: bool,
    /// Seconds spent in collectives (0 for one process).
    comm_seconds: f64,
}

/// Forward and backward over this rank's micro-batches, the gradients
/// summed over the ranks, then the non-finite guard and clipping.
#[allow(clippy::too_many_arguments)]
fn accumulate<O: Objective>(
    objective: &O,
    model: &Model,
    opt: &mut AdamW,
    trainable: &[Tensor],
    share: &StepBatches<O::Batch>,
    cfg: &TrainSettings,
    step: i64,
    ranks: &Ranks,
) -> Result<StepDone, StageError> {
    let batches = &share.batches;
    let local: Vec<f64> = batches
        .iter()
        .map(|b| match (b, share.stand_in) {
            (Some(b), false) => objective.weight(b),
            _ => 0.0,
        })
        .collect();
    let micro = ranks.sum(&local)?;
    let step_weight: f64 = micro.iter().sum();
    opt.zero_grad();
    let mut loss_sum = 0.0;
    let mut ratios: Vec<Ratio> = Vec::new();
    for (k, batch) in batches.iter().enumerate() {
        let Some(batch) = batch else { continue };
        // One process may abandon a step; of several, none may alone.
        if ranks.world() == 1 && crate::error::step_grace_over() {
            return Err(StageError::InterruptedInStep {
                step: step + 1,
                grace_s: crate::error::step_grace().as_secs(),
            });
        }
        let part = Share {
            local: local[k],
            micro: micro[k],
            step: step_weight,
            micro_batches: batches.len(),
        };
        let (mut loss, mut rs) = objective.loss(&model.net, batch, &part);
        if share.stand_in {
            loss = &loss * 0.0;
            rs.iter_mut().for_each(|r| (r.num, r.den) = (0.0, 0.0));
        }
        loss.backward();
        model.net.backward_checkpointed();
        loss_sum += loss.double_value(&[]);
        for r in rs {
            match ratios.iter_mut().find(|x| x.name == r.name) {
                Some(x) => (x.num, x.den) = (x.num + r.num, x.den + r.den),
                None => ratios.push(r),
            }
        }
    }
    let comm = Instant::now();
    ranks.sum_gradients(trainable)?;
    let (loss, interrupted) = agree(ranks, loss_sum, &mut ratios)?;
    let comm_seconds = comm.elapsed().as_secs_f64();
    check_finite(step + 1, O::LOSS, loss)?;
    let grad_norm = opt.clip_grad_norm(cfg.max_grad_norm);
    check_finite(step + 1, "gradient norm", grad_norm)?;
    Ok(StepDone {
        loss,
        grad_norm,
        ratios,
        interrupted,
        comm_seconds,
    })
}

/// The step's loss and ratios over every rank, and whether any rank was
/// interrupted: one small all-reduce, so that every rank decides alike.
fn agree(ranks: &Ranks, loss: f64, ratios: &mut [Ratio]) -> Result<(f64, bool), StageError> {
    if ranks.world() == 1 {
        return Ok((loss, interrupt_requested()));
    }
    let mut values = vec![loss, f64::from(u8::from(interrupt_requested()))];
    values.extend(ratios.iter().flat_map(|r| [r.num, r.den]));
    let summed = ranks.sum(&values)?;
    for (r, nd) in ratios.iter_mut().zip(summed[2..].chunks(2)) {
        (r.num, r.den) = (nd[0], nd[1]);
    }
    Ok((summed[0], summed[1] > 0.0))
}

fn checkpointer(run: &FitRun, total_steps: i64) -> Checkpointer {
    Checkpointer {
        out_dir: run.out_dir.to_owned(),
        every: run.settings.checkpoint_every,
        total_steps,
        stop_after: run.stop_after,
        writes: run.ranks.is_main(),
    }
}

fn trainer_state(run: &FitRun, step: i64, total: i64, loss: f64, done: bool) -> TrainerState {
    TrainerState {
        stage: run.label.into(),
        step,
        total_steps: total,
        seed: run.settings.seed(),
        last_train_loss: loss,
        done,
    }
}

/// Writes the final checkpoint of a fitted run (after the stage's own
/// finishing touches, such as the reward model's normalisation).
pub fn finish<E>(run: &FitRun, fitted: &Fitted<E>) -> Result<(), StageError> {
    let state = trainer_state(run, fitted.steps, fitted.steps, fitted.last_loss, true);
    checkpointer(run, fitted.steps).finish(|| {
        save_training(
            &run.out_dir.join(FINAL_DIR),
            &fitted.model,
            &fitted.opt,
            &state,
        )
    })
}

/// The run folder, made, and whether it already holds a finished run (its
/// summary then).
pub fn prepare_out_dir<T: DeserializeOwned>(
    out_dir: &Path,
    label: &str,
) -> Result<Option<T>, StageError> {
    std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    let stale = rlhf_datasets::atomic::clean_stale(out_dir)
        + rlhf_datasets::atomic::clean_stale(&out_dir.join(PERIODIC_DIR));
    if stale > 0 {
        tracing::info!("{label}: removed {stale} temporary file(s) a killed run left");
    }
    let done = finished_summary(out_dir);
    if done.is_some() {
        tracing::info!("{label}: {} is complete; nothing to do", out_dir.display());
    }
    Ok(done)
}

/// Where a stage runs: its folder, device, scratch model, judge, test hook.
#[derive(Clone)]
pub struct StageContext {
    pub out_dir: PathBuf,
    pub device: Device,
    /// The model to build when a stage starts from nothing.
    pub scratch: ScratchModel,
    /// Scores (prompt, answer) text where it knows the prompt: the bundled
    /// task's gold judge, passed in by the pipeline.
    pub judge: Option<crate::eval::answer::Judge>,
    /// The experiment's own judge (`judge: {kind: command}`), passed in by
    /// the pipeline: when set, it scores the stage's evals instead.
    pub eval_judge: Option<crate::eval::answer::BatchJudge>,
    /// Stop (as if killed) after this step, leaving its checkpoint: for
    /// resume tests.
    pub stop_after: Option<i64>,
    /// The ranks the stage runs on ([`Ranks::single`] for one process).
    pub ranks: std::sync::Arc<Ranks>,
    /// Runs a user's ranking program (the loop's labeller protocol),
    /// passed in by the pipeline: `(command, timeout_seconds, groups)`.
    pub ranker: Option<Ranker>,
    /// Runs a user's reward program (`reward.command`), passed in by the
    /// pipeline.
    pub reward_runner: Option<crate::programs::ProgramRunner>,
    /// Runs a multi-turn stage's environment program (`env.command`),
    /// passed in by the pipeline.
    pub env_runner: Option<crate::rl::episode::EnvRunner>,
}

/// Rankings (0 the best) of `(prompt, answers)` groups from a program.
pub type Ranker = std::sync::Arc<
    dyn Fn(&[String], f64, &[(String, Vec<String>)]) -> Result<Vec<Vec<usize>>, String>
        + Send
        + Sync,
>;

/// Greedy answers to a stage's eval prompts, judged: the starting
/// model's (written when the stage starts; a resumed stage reads their
/// scores back) and the trained model's.
pub const SAMPLES_BEFORE: &str = "samples_before.jsonl";
pub const SAMPLES_AFTER: &str = "samples.jsonl";

impl StageContext {
    /// `model`'s greedy answers to `prompts`, judged and written to `file`
    /// in the stage folder; `None` without prompts, or where the judge
    /// knows none of them.
    pub fn judged_eval(
        &self,
        model: &Model,
        prompts: Option<&Path>,
        max_new_tokens: i64,
        file: &str,
    ) -> Result<Option<crate::eval::answer::JudgedScore>, StageError> {
        let Some(path) = prompts else {
            return Ok(None);
        };
        crate::eval::answer::judged_eval(
            model,
            path,
            max_new_tokens,
            &|pairs| self.judge_answers(pairs),
            self.device,
            &self.out_dir.join(file),
        )
    }

    /// The starting model's judged answers ([`SAMPLES_BEFORE`]): judged now
    /// on a `fresh` run, read back on a resumed one.
    pub fn judged_start(
        &self,
        model: &Model,
        prompts: Option<&Path>,
        max_new_tokens: i64,
        fresh: bool,
    ) -> Result<Option<crate::eval::answer::JudgedScore>, StageError> {
        match fresh {
            true => self.judged_eval(model, prompts, max_new_tokens, SAMPLES_BEFORE),
            false => Ok(prompts.and_then(|_| {
                crate::eval::answer::read_judged(&self.out_dir.join(SAMPLES_BEFORE))
            })),
        }
    }

    /// Scores of the stage's eval answers: the experiment's judge program,
    /// all at once, when it names one; else the bundled task's judge where
    /// it knows the prompt.
    pub fn judge_answers(
        &self,
        pairs: &[(String, String)],
    ) -> Result<Vec<Option<f64>>, StageError> {
        match (&self.eval_judge, &self.judge) {
            (Some(program), _) => program(pairs).map_err(|message| StageError::Setting {
                field: "judge.command".into(),
                message,
            }),
            (None, Some(judge)) => Ok(pairs.iter().map(|(p, a)| judge(p, a)).collect()),
            (None, None) => Ok(vec![None; pairs.len()]),
        }
    }
}

impl std::fmt::Debug for StageContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageContext")
            .field("out_dir", &self.out_dir)
            .field("device", &self.device)
            .field("judge", &self.judge.is_some())
            .field("eval_judge", &self.eval_judge.is_some())
            .field("stop_after", &self.stop_after)
            .field("ranks", &self.ranks)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GptConfig, Head, ModelConfig};

    #[test]
    fn a_step_that_cannot_fit_in_memory_is_refused_before_it_starts() {
        let config = ModelConfig::Gpt2(GptConfig {
            vocab_size: 300,
            n_positions: 64,
            n_embd: 16,
            n_layer: 1,
            n_head: 2,
            ..GptConfig::default()
        });
        let tokenizer = rlhf_datasets::Tokenizer::bytes();
        let model = Model::init(&config, Head::Lm, tokenizer, tch::Device::Cpu).unwrap();
        check_step_memory(&model, 8, 64).unwrap();
        // 2^40 tokens of 300 logits: more than any machine holds.
        let e = check_step_memory(&model, 1 << 20, 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("batch_size: a training step needs at least")
                && e.contains("a micro-batch of 1048576 x 1048576 tokens")
                && e.contains("lower batch_size or max_len"),
            "{e}"
        );
        // A reward model computes no logits: a batch a policy could not fit
        // may fit it (about 3 x 50k logits per token against 17 x 16 + 2.5 x
        // 2 x 4096 activations).
        let big = ModelConfig::Gpt2(GptConfig {
            vocab_size: 50_000,
            ..match config {
                ModelConfig::Gpt2(c) => c,
                _ => unreachable!(),
            }
        });
        let tokenizer = rlhf_datasets::Tokenizer::bytes();
        let policy = Model::init(&big, Head::Lm, tokenizer.clone(), tch::Device::Cpu).unwrap();
        let reward = Model::init(&big, Head::Scalar, tokenizer, tch::Device::Cpu).unwrap();
        let have = rlhf_datasets::files::memory_bytes().unwrap() as f64;
        // Rows whose logits alone take the machine's memory twice over.
        let rows = (2.0 * have / (4.0 * 4096.0 * 3.0 * 50_000.0)).ceil() as usize;
        assert!(check_step_memory(&policy, rows, 4096).is_err());
        assert!(check_step_memory(&reward, rows, 4096).is_ok());
    }

    #[test]
    fn rows_grouped_by_length_keep_the_steps_examples_and_spread_over_ranks() {
        let lengths = [5usize, 9, 1, 7, 3, 8, 2, 6];
        let micro = vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]];
        let one = by_length(&micro, 1, |i| lengths[i]);
        // Longest first, the micro-batches' sizes kept.
        assert_eq!(one, vec![vec![1, 5, 3, 7], vec![0, 4, 6, 2]]);
        // Two ranks: each contiguous half holds every other row, so rank 0
        // does not take the longest rows of every micro-batch.
        let two = by_length(&micro, 2, |i| lengths[i]);
        assert_eq!(two, vec![vec![1, 3, 5, 7], vec![0, 6, 4, 2]]);
        // Uneven shares fill as `Ranks::share` cuts them (2 then 3 of 5).
        assert_eq!(deal(&[10, 11, 12, 13, 14], 2), vec![10, 12, 11, 13, 14]);
    }
}
