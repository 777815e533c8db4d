//! The error every stage returns, the checks that raise it, and the
//! interrupt flag that the binary's Ctrl-C handler sets.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rlhf_datasets::atomic::AtomicWriteError;
use rlhf_datasets::load::DataError;
use rlhf_datasets::tokenizer::TokenizerError;

use crate::model::checkpoint::CheckpointError;
use crate::model::sample::SamplingError;
use crate::optim::OptimError;

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
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
    /// A setting out of its range: `field` is its path inside the stage
    /// (`optimizer.lr`), so the pipeline can name it with the stage and line.
    #[error("{field}: {message}")]
    Setting { field: String, message: String },
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
    #[error("interrupted inside step {step}, which was still running {grace_s} s after the interrupt; stopped without finishing it (a rerun continues from the last checkpoint, if there is one)")]
    InterruptedInStep { step: i64, grace_s: u64 },
}

impl StageError {
    pub fn setting(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Setting {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<crate::check::SettingError> for StageError {
    fn from(e: crate::check::SettingError) -> Self {
        Self::Setting {
            field: e.field,
            message: e.message,
        }
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static INTERRUPTED_AT: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// How long a step may go on after an interrupt before it is abandoned
/// (a step of many micro-batches can take minutes; its checkpoint is not
/// worth that wait): 20 s, or `RLHF_STEP_GRACE_SECONDS`.
pub fn step_grace() -> std::time::Duration {
    static GRACE: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *GRACE.get_or_init(|| {
        let secs = std::env::var("RLHF_STEP_GRACE_SECONDS")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(20);
        std::time::Duration::from_secs(secs)
    })
}

/// Asks training loops to stop at the end of the current step, after
/// writing a checkpoint (the binary's Ctrl-C / SIGTERM handler calls this).
pub fn request_interrupt() {
    INTERRUPTED_AT.get_or_init(std::time::Instant::now);
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether an interrupt came more than `step_grace()` ago: a step still
/// running then stops without finishing.
pub fn step_grace_over() -> bool {
    INTERRUPTED_AT
        .get()
        .is_some_and(|t| t.elapsed() > step_grace())
}

pub fn interrupt_requested() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
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
