//! What every training stage shares: the stage error, training checkpoints
//! (model + optimiser moments + trainer state), the metrics log and the
//! progress bar.
//!
//! A run folder holds `checkpoints/step-NNNNNNNN/` while training (the last
//! two kept), `checkpoint/` when done, and `metrics.jsonl`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rlhf_datasets::atomic::{self, AtomicWriteError};
use rlhf_datasets::load::DataError;
use rlhf_datasets::tokenizer::TokenizerError;
use serde::{de::DeserializeOwned, Serialize};
use tch::{Device, Tensor};

use crate::checkpoint::{CheckpointError, HeadChoice, Model};
use crate::optim::{AdamW, OptimError};
use crate::sample::SamplingError;

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";
pub const FINAL_DIR: &str = "checkpoint";
pub const PERIODIC_DIR: &str = "checkpoints";
pub const METRICS_FILE: &str = "metrics.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Optimizer(#[from] OptimError),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error(transparent)]
    Write(#[from] AtomicWriteError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    BadState { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
    #[error("step {step}: {quantity} is {value}; stopping (the last good checkpoint is kept)")]
    NonFinite {
        step: i64,
        quantity: &'static str,
        value: f64,
    },
    #[error("stopped after step {0} as asked")]
    StoppedEarly(i64),
    #[error("interrupted after step {0}; its checkpoint is saved: rerun to continue")]
    Interrupted(i64),
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks training loops to stop at the end of the current step, after
/// writing a checkpoint (the binary's Ctrl-C / SIGTERM handler calls this).
pub fn request_interrupt() {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

pub fn interrupt_requested() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

pub fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StageError + '_ {
    move |source| StageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Fails on a NaN or infinite value, naming it.
pub fn check_finite(step: i64, quantity: &'static str, value: f64) -> Result<(), StageError> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(StageError::NonFinite {
            step,
            quantity,
            value,
        })
    }
}

/// Writes model, optimiser moments and trainer state into `dir`, whole.
pub fn save_training<S: Serialize>(
    dir: &Path,
    model: &Model,
    opt: &AdamW,
    state: &S,
) -> Result<(), StageError> {
    model.save_with(dir, |tmp| -> Result<(), StageError> {
        let path = tmp.join(OPTIMIZER_FILE);
        Tensor::write_safetensors(&opt.state_tensors(), &path)
            .map_err(|source| CheckpointError::WriteWeights { path, source })?;
        let json = serde_json::to_string_pretty(state).expect("state serialises");
        atomic::write_file(&tmp.join(STATE_FILE), json.as_bytes())?;
        Ok(())
    })
}

/// Reads what [`save_training`] wrote.
pub fn load_training<S: DeserializeOwned>(
    dir: &Path,
    head: HeadChoice,
    device: Device,
) -> Result<(Model, BTreeMap<String, Tensor>, S), StageError> {
    let model = Model::load(dir, head, device)?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    let moments = Tensor::read_safetensors(&opt_path)
        .map_err(|source| CheckpointError::Weights {
            path: opt_path.clone(),
            source,
        })?
        .into_iter()
        .collect();
    let state_path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&state_path).map_err(io_err(&state_path))?;
    let state = serde_json::from_str(&text).map_err(|e| StageError::BadState {
        path: state_path.clone(),
        message: format!("invalid trainer state ({e})"),
    })?;
    Ok((model, moments, state))
}

/// `checkpoints/step-00000120`.
pub fn periodic_dir(run_dir: &Path, step: i64) -> PathBuf {
    run_dir.join(PERIODIC_DIR).join(format!("step-{step:08}"))
}

/// Periodic checkpoints, oldest first.
pub fn periodic_checkpoints(run_dir: &Path) -> Vec<(i64, PathBuf)> {
    let mut found: Vec<(i64, PathBuf)> = fs::read_dir(run_dir.join(PERIODIC_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// Keeps the newest `keep` periodic checkpoints.
pub fn prune_periodic(run_dir: &Path, keep: usize) {
    let all = periodic_checkpoints(run_dir);
    for (_, dir) in all.iter().take(all.len().saturating_sub(keep)) {
        let _ = fs::remove_dir_all(dir);
    }
}

/// Appends one JSON object per line, flushed at once, so a crash loses
/// nothing already logged and `tail -f` shows progress.
#[derive(Debug)]
pub struct MetricsLog {
    file: fs::File,
}

impl MetricsLog {
    /// Opens the log; when resuming after `resume_step`, drops the lines of
    /// later steps (they are about to be recomputed), else starts empty.
    pub fn open(path: &Path, resume_step: Option<i64>) -> Result<Self, StageError> {
        let kept = match (resume_step, fs::read_to_string(path)) {
            (Some(step), Ok(text)) => text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(serde_json::Value::as_i64))
                        .is_some_and(|s| s <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
            _ => String::new(),
        };
        atomic::write_file(path, kept.as_bytes())?;
        let file = fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io_err(path))?;
        Ok(Self { file })
    }

    pub fn write(&mut self, record: &serde_json::Value) {
        // Metrics are best effort: a full disk must not kill training.
        let _ = writeln!(self.file, "{record}");
        let _ = self.file.flush();
    }
}

/// A progress bar on stderr; invisible when stderr is not a terminal.
pub fn progress_bar(total: u64, done: u64, label: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} steps {elapsed}<{eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    bar.set_position(done);
    bar
}

/// A stage's run that finished before: its final checkpoint and summary
/// exist. Rerunning it is a no-op that returns the summary.
pub fn finished_summary<T: DeserializeOwned>(out_dir: &Path) -> Option<T> {
    if !out_dir.join(FINAL_DIR).join(STATE_FILE).exists() {
        return None;
    }
    let text = fs::read_to_string(out_dir.join(SUMMARY_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

pub const SUMMARY_FILE: &str = "summary.json";

/// Writes `summary.json` atomically.
pub fn write_summary<T: Serialize>(out_dir: &Path, summary: &T) -> Result<(), StageError> {
    let text = serde_json::to_string_pretty(summary).expect("summary serialises");
    atomic::write_file(&out_dir.join(SUMMARY_FILE), text.as_bytes())?;
    Ok(())
}

/// The newest periodic checkpoint of a run, loaded: (step, model, AdamW
/// moments, trainer state).
pub type ResumePoint<S> = (i64, Model, BTreeMap<String, Tensor>, S);

pub fn resume_point<S: DeserializeOwned>(
    out_dir: &Path,
    head: HeadChoice,
    device: Device,
) -> Result<Option<ResumePoint<S>>, StageError> {
    Ok(
        newest_usable(out_dir, |dir| load_training(dir, head, device)).map(
            |(step, dir, (model, moments, state))| {
                tracing::info!("resuming from {} (step {step})", dir.display());
                (step, model, moments, state)
            },
        ),
    )
}

/// The newest periodic checkpoint of `out_dir` that `load` accepts, with
/// its step and folder. A damaged one (a killed disk write, bit rot) is
/// named and passed over for the one before it.
pub fn newest_usable<T>(
    out_dir: &Path,
    load: impl Fn(&Path) -> Result<T, StageError>,
) -> Option<(i64, PathBuf, T)> {
    for (step, dir) in periodic_checkpoints(out_dir).into_iter().rev() {
        match load(&dir) {
            Ok(t) => return Some((step, dir, t)),
            Err(e) => tracing::warn!(
                "checkpoint {} is unusable ({e}); falling back to the one before it",
                dir.display()
            ),
        }
    }
    None
}

/// Periodic checkpoints and the test hook that stops a run early.
#[derive(Debug, Clone)]
pub struct Checkpointer {
    pub out_dir: PathBuf,
    pub every: i64,
    pub total_steps: i64,
    /// Stop after this step as if killed (its checkpoint is written first).
    pub stop_after: Option<i64>,
}

impl Checkpointer {
    /// Call after optimiser step `done` (1-based).
    pub fn after_step<S: Serialize>(
        &self,
        done: i64,
        model: &Model,
        opt: &AdamW,
        state: &S,
    ) -> Result<(), StageError> {
        if done >= self.total_steps {
            return Ok(());
        }
        let stop = self.stop_after == Some(done);
        let interrupted = interrupt_requested();
        if done % self.every == 0 || stop || interrupted {
            save_training(&periodic_dir(&self.out_dir, done), model, opt, state)?;
            prune_periodic(&self.out_dir, 2);
        }
        if stop {
            return Err(StageError::StoppedEarly(done));
        }
        if interrupted {
            return Err(StageError::Interrupted(done));
        }
        Ok(())
    }

    /// The final checkpoint; periodic ones are then removed.
    pub fn finish<S: Serialize>(
        &self,
        model: &Model,
        opt: &AdamW,
        state: &S,
    ) -> Result<(), StageError> {
        save_training(&self.out_dir.join(FINAL_DIR), model, opt, state)?;
        prune_periodic(&self.out_dir, 0);
        Ok(())
    }
}

/// The model a stage trains, where its optimiser stands, and its saved
/// state when it resumes.
pub struct Start<S> {
    pub model: Model,
    pub opt: AdamW,
    /// The step of the checkpoint resumed from.
    pub resumed_at: Option<i64>,
    pub state: Option<S>,
}

/// Resumes from the newest periodic checkpoint of `out_dir`, else loads
/// `init` (or builds a fresh model from `scratch`), seeded by `seed`.
pub fn start_or_resume<S: DeserializeOwned>(
    out_dir: &Path,
    head: crate::gpt::Head,
    init: Option<&Path>,
    scratch: &ScratchModel,
    optimizer: &crate::optim::AdamWConfig,
    seed: u64,
    device: Device,
) -> Result<Start<S>, StageError> {
    let (model, moments, resumed_at, state) =
        match resume_point::<S>(out_dir, HeadChoice::Want(head), device)? {
            Some((step, m, moments, state)) => (m, Some(moments), Some(step), Some(state)),
            None => {
                tch::manual_seed(seed as i64);
                let m = match init {
                    Some(dir) => Model::load(dir, HeadChoice::Want(head), device)?,
                    None => Model::init(&scratch.config, head, scratch.tokenizer.clone(), device)?,
                };
                (m, None, None, None)
            }
        };
    let mut opt = AdamW::new(&model.vs, optimizer.clone());
    if let Some(m) = &moments {
        opt.load_state_tensors(m)?;
    }
    Ok(Start {
        model,
        opt,
        resumed_at,
        state,
    })
}

/// The model a stage starts from when its config names no `init`.
#[derive(Debug, Clone)]
pub struct ScratchModel {
    pub config: crate::gpt::GptConfig,
    pub tokenizer: rlhf_datasets::Tokenizer,
}

/// Micro-batches in a seeded order per epoch: micro-batch `m` is a
/// function of `(seed, m)` alone, which is what makes resume exact.
#[derive(Debug)]
pub struct EpochBatches {
    n: usize,
    batch_size: usize,
    seed: u64,
    epoch: i64,
    order: Vec<usize>,
}

impl EpochBatches {
    pub fn new(n: usize, batch_size: usize, seed: u64) -> Self {
        Self {
            n,
            batch_size,
            seed,
            epoch: -1,
            order: Vec::new(),
        }
    }

    /// Micro-batches per epoch (the last may be short).
    pub fn per_epoch(&self) -> i64 {
        self.n.div_ceil(self.batch_size) as i64
    }

    /// Example indices of micro-batch `micro` (counted from the start).
    pub fn rows(&mut self, micro: i64) -> Vec<usize> {
        let per_epoch = self.per_epoch().max(1);
        let (epoch, pos) = (micro / per_epoch, (micro % per_epoch) as usize);
        if epoch != self.epoch {
            self.order = rlhf_datasets::batch::epoch_order(self.n, self.seed, epoch as u64);
            self.epoch = epoch;
        }
        self.order
            .iter()
            .skip(pos * self.batch_size)
            .take(self.batch_size)
            .copied()
            .collect()
    }
}
