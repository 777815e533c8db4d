//! The error every stage returns, the checks that raise it, and the
//! interrupt flag that the binary's Ctrl-C handler sets.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rlhf_datasets::atomic::AtomicWriteError;
use rlhf_datasets::load::DataError;
use rlhf_datasets::tokenizer::TokenizerError;

use crate::checkpoint::CheckpointError;
use crate::optim::OptimError;
use crate::sample::SamplingError;

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
    #[error("{0} (fail_if_not_learning is set)")]
    NotLearning(String),
    #[error("stopped after step {0} as asked")]
    StoppedEarly(i64),
    #[error("interrupted after step {0}; its checkpoint is saved: rerun to continue")]
    Interrupted(i64),
}

impl StageError {
    pub fn setting(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Setting {
            field: field.into(),
            message: message.into(),
        }
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Asks training loops to stop at the end of the current step, after
/// writing a checkpoint (the binary's Ctrl-C / SIGTERM handler calls this).
pub fn request_interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
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
