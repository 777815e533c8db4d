//! Training checkpoints: model + optimiser moments + trainer state in one
//! folder, periodic ones under `checkpoints/step-NNNNNNNN/` (the newest
//! [`KEEP_PERIODIC`] kept), the final one in `checkpoint/`, and the walk
//! that finds the newest usable one to resume from.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use rlhf_datasets::atomic;
use serde::{de::DeserializeOwned, Serialize};
use tch::{Device, Tensor};

use crate::error::{interrupt_requested, io_err, StageError};
use crate::model::checkpoint::{CheckpointError, HeadChoice, Model};
use crate::optim::AdamW;

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";
pub const FINAL_DIR: &str = "checkpoint";
pub const PERIODIC_DIR: &str = "checkpoints";
/// Periodic checkpoints kept: the newest, and one before it in case the
/// newest was damaged by a kill mid-write.
pub const KEEP_PERIODIC: usize = 2;

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
    // With adapters: the base they name plus the adapters, as trained.
    let model = Model::load_adapted(dir, head, device)?;
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

/// The newest periodic checkpoint of `out_dir` that `load` accepts, with
/// its step and folder. A damaged one (a killed disk write, bit rot) is
/// named and passed over for the one before it.
pub fn newest_usable<T>(
    out_dir: &Path,
    load: impl Fn(&Path) -> Result<T, StageError>,
) -> Option<(i64, PathBuf, T)> {
    for (step, dir) in periodic_checkpoints(out_dir).into_iter().rev() {
        match load(&dir) {
            Ok(t) => {
                tracing::info!("resuming from {} (step {step})", dir.display());
                return Some((step, dir, t));
            }
            Err(e) => tracing::warn!(
                "checkpoint {} is unusable ({e}); falling back to the one before it",
                dir.display()
            ),
        }
    }
    None
}

/// When to write periodic checkpoints, and the stops that write one first:
/// Ctrl-C / SIGTERM, and the test hook that stops a run as if killed. Every
/// stage kind saves through it; what a checkpoint holds is the stage's.
#[derive(Debug, Clone)]
pub struct Checkpointer {
    pub out_dir: PathBuf,
    pub every: i64,
    pub total_steps: i64,
    /// Stop after this step as if killed (its checkpoint is written first).
    pub stop_after: Option<i64>,
    /// Whether this process writes checkpoints (rank 0 of several does).
    pub writes: bool,
}

impl Checkpointer {
    /// Call after step (or iteration) `done`, 1-based; `save` writes a
    /// checkpoint into the folder it is given.
    pub fn after_step(
        &self,
        done: i64,
        save: impl FnOnce(&Path) -> Result<(), StageError>,
    ) -> Result<(), StageError> {
        self.after_step_or_stop(done, interrupt_requested(), save)
    }

    /// As [`Self::after_step`], with whether to stop for an interrupt
    /// decided by the caller (every rank's, agreed on by all).
    pub fn after_step_or_stop(
        &self,
        done: i64,
        interrupted: bool,
        save: impl FnOnce(&Path) -> Result<(), StageError>,
    ) -> Result<(), StageError> {
        if done >= self.total_steps {
            return Ok(());
        }
        let stop = self.stop_after == Some(done);
        if self.writes && (done % self.every == 0 || stop || interrupted) {
            save(&periodic_dir(&self.out_dir, done))?;
            prune_periodic(&self.out_dir, KEEP_PERIODIC);
        }
        if stop {
            return Err(StageError::StoppedEarly(done));
        }
        if interrupted {
            return Err(StageError::Interrupted(done));
        }
        Ok(())
    }

    /// The final checkpoint (`save` writes it); periodic ones are then removed.
    pub fn finish(&self, save: impl FnOnce() -> Result<(), StageError>) -> Result<(), StageError> {
        if self.writes {
            save()?;
            prune_periodic(&self.out_dir, 0);
        }
        Ok(())
    }
}
