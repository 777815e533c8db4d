//! `<run>/plan.json`: what the runner set out to do, written when `rlhf
//! run` starts: the stages in order with their kinds, folders, upstream
//! stages and executors, and when and by which process it started. `rlhf
//! watch` draws the DAG from it (stages not started yet included), and a
//! run folder copied elsewhere carries it along.

use std::path::Path;

use serde::{Deserialize, Serialize};

pub const PLAN_FILE: &str = "plan.json";

/// Largest plan read: a few lines per stage.
const MAX_PLAN: u64 = 4 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunPlan {
    /// The experiment file's name (no folder: the run may be read elsewhere).
    pub experiment: String,
    /// Seconds since the Unix epoch when this `rlhf run` started.
    pub started_at: f64,
    /// The runner's process id (on the machine that ran it).
    pub pid: u32,
    pub stages: Vec<PlannedEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedEntry {
    /// How logs and the report name it (`rm`, `round-1/rm`, `ppo[kl_coef=0.1]`).
    pub label: String,
    pub kind: String,
    /// Its folder, relative to the run folder.
    pub folder: String,
    /// The stages it reads from (labels).
    pub upstream: Vec<String>,
    /// `local` or `slurm`.
    pub executor: String,
}

impl RunPlan {
    pub fn write(&self, run_dir: &Path) -> Result<(), rlhf_datasets::atomic::AtomicWriteError> {
        let text = serde_json::to_string_pretty(self).expect("a plan serialises");
        rlhf_datasets::atomic::write_file(&run_dir.join(PLAN_FILE), text.as_bytes())
    }

    /// The run's plan; none when missing or unreadable (an older run
    /// folder, or one whose runner never started).
    pub fn read(run_dir: &Path) -> Option<Self> {
        let path = run_dir.join(PLAN_FILE);
        let text =
            rlhf_datasets::files::read_bounded(&path, MAX_PLAN, "the limit for a plan").ok()?;
        serde_json::from_str(&text).ok()
    }
}
