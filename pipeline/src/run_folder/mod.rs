//! The run folder, `<out_dir>/<name>/`: this module alone knows its layout.
//!
//! ```text
//! runs/default/
//!   .lock              one process at a time (lock)
//!   sft/ rm/ ppo/      a stage each: .key, manifest.json, checkpoint/,
//!                      metrics.jsonl, summary.json (manifest)
//!   round-1/collect/   a loop round's stages, and its labelling queue/
//!   round-1/rm/ ...
//!   rounds.jsonl       one line per finished round
//!   plan.json          what `rlhf run` set out to do (plan_file)
//!   report/            what `rlhf eval` wrote
//! ```
//!
//! Here: the names, the manifests and keys that make a stage cached
//! (`manifest`), the lock and what a finished run holds (`finished`). It
//! imports nothing else of rlhf: the stages' keys are the runner's
//! (`exec::key`), copying from sibling runs is the runner's
//! (`exec::sibling_cache`).

pub mod finished;
pub mod lock;
pub mod manifest;
pub mod plan_file;

use std::path::{Path, PathBuf};

use serde_json::Value;

pub use manifest::{KEY_FILE, MANIFEST_FILE};
pub use rlhf_stages::train::checkpoints::FINAL_DIR as CHECKPOINT_DIR;
pub use rlhf_stages::train::metrics::{METRICS_FILE, SUMMARY_FILE};

/// One line per finished loop round, beside the stages.
pub const ROUNDS_LOG: &str = "rounds.jsonl";
/// What `rlhf eval` writes.
pub const REPORT_DIR: &str = "report";
/// A round's labelling queue, inside its collect folder's parent.
pub const QUEUE_DIR: &str = "queue";
const ROUND_PREFIX: &str = "round-";
const SEED_PREFIX: &str = "seed-";

/// `seed-N`, the run folder of seed `n` of an experiment with `seeds:`
/// (inside the experiment's own folder, beside the seeds' `report/`).
pub fn seed_folder(n: u64) -> String {
    format!("{SEED_PREFIX}{n}")
}

/// The seed a folder name `seed-N` stands for.
pub fn seed_of(folder: &str) -> Option<u64> {
    let n = folder.strip_prefix(SEED_PREFIX)?;
    n.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| n.parse().ok())?
}

/// The seeds the last `rlhf run` of an experiment with `seeds:` ran, in
/// the experiment's folder: folders of an earlier, longer list are not
/// its runs.
pub const SEEDS_FILE: &str = "seeds.json";

/// Records `seeds` as the experiment's (in `dir`, its folder).
pub fn write_seeds(dir: &Path, seeds: &[u64]) -> anyhow::Result<()> {
    let text = serde_json::json!({ "seeds": seeds }).to_string();
    rlhf_datasets::atomic::write_file(&dir.join(SEEDS_FILE), text.as_bytes())?;
    Ok(())
}

/// The seed run folders of `dir` that its `seeds.json` lists (all of
/// them without one), by seed; those it does not list are named in the log.
pub fn listed_seed_runs(dir: &Path) -> Vec<(u64, PathBuf)> {
    let all = seed_runs(dir);
    let listed: Option<Vec<u64>> =
        rlhf_datasets::files::read_bounded(&dir.join(SEEDS_FILE), 1 << 20, "the limit")
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| serde_json::from_value(v["seeds"].clone()).ok());
    let Some(listed) = listed else {
        return all;
    };
    let (keep, old): (Vec<_>, Vec<_>) = all.into_iter().partition(|(s, _)| listed.contains(s));
    for (_, d) in &old {
        tracing::info!(
            "{}: not a seed of the last run ({SEEDS_FILE}); passed over",
            d.display()
        );
    }
    keep
}

/// The seed run folders (`seed-N/`) inside `dir`, by seed.
pub fn seed_runs(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = sorted_dirs(dir)
        .into_iter()
        .filter_map(|d| Some((seed_of(d.file_name()?.to_str()?)?, d)))
        .collect();
    out.sort();
    out
}

/// `round-N`, the folder of loop round `n`.
pub fn round_folder(n: usize) -> String {
    format!("{ROUND_PREFIX}{n}")
}

/// `round-N/STAGE`, how the runner and the report name a round's stage.
pub fn round_stage(n: usize, stage: &str) -> String {
    format!("{ROUND_PREFIX}{n}/{stage}")
}

/// The round a folder name `round-N` stands for.
pub fn round_of(folder: &str) -> Option<usize> {
    folder.strip_prefix(ROUND_PREFIX)?.parse().ok()
}

/// Whether a folder name looks like a round's (`round-…`), parsed or not.
pub fn is_round_like(folder: &str) -> bool {
    folder.starts_with(ROUND_PREFIX)
}

/// Whether a stage folder of this name would collide with what the runner
/// and `rlhf eval` write beside the stages.
pub fn is_reserved(name: &str) -> bool {
    round_of(name).is_some()
        || seed_of(name).is_some()
        || name.starts_with('.')
        || [REPORT_DIR, ROUNDS_LOG, SEEDS_FILE, plan_file::PLAN_FILE].contains(&name)
}

/// Top-level stage folders of a run and those of its loop rounds.
pub fn stage_dirs(run: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in sorted_dirs(run) {
        let is_round = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(is_round_like);
        if is_round {
            out.extend(sorted_dirs(&dir));
        } else {
            out.push(dir);
        }
    }
    out
}

/// Sub-folders, not following links: a link in another run folder could
/// point anywhere.
pub fn sorted_dirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// A finished stage's `summary.json`, which every kind writes as it ends:
/// the one way a stage's summary comes back to the runner.
pub fn read_summary(stage_dir: &Path) -> anyhow::Result<Value> {
    let path = stage_dir.join(SUMMARY_FILE);
    let text = rlhf_datasets::files::read_bounded(&path, 16 << 20, "the limit for a summary")
        .map_err(|e| {
            anyhow::anyhow!(
                "{}: the stage ended without its summary: {e}",
                path.display()
            )
        })?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", path.display()))
}

/// Why a finished stage may not have learnt, from its summary: its
/// `flags` (and the single `warning` of summaries written before them).
pub fn summary_flags(summary: &Value) -> Vec<String> {
    let flags = summary["flags"].as_array().into_iter().flatten();
    flags
        .chain(std::iter::once(&summary["warning"]))
        .filter_map(|f| f.as_str().map(str::to_owned))
        .collect()
}

/// Largest log read back: far above a long run's metrics.
const MAX_LOG_BYTES: u64 = 1 << 30;

/// The lines of a log the program itself appends to (`metrics.jsonl`,
/// `rounds.jsonl`) that parse; none if the file is absent. A line cut short
/// by a crash is skipped rather than failing a report. The file is read
/// bounded: a FIFO or a device put in its place is named and passed over,
/// never waited on or read without end.
pub fn read_log_lines(path: &Path) -> Vec<Value> {
    if path.symlink_metadata().is_err() {
        return vec![];
    }
    match rlhf_datasets::files::read_bounded(path, MAX_LOG_BYTES, "the limit for a log") {
        Ok(t) => t
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect(),
        Err(e) => {
            tracing::warn!("{}: {e}; passed over", path.display());
            vec![]
        }
    }
}

/// `path` as seen from `run_dir` (`../../datasets/task/x.jsonl`,
/// `sft/checkpoint`): a report names no folder of the machine it was made
/// on, and stays true when the run folder moves with its data.
pub fn relative_to(path: &Path, run_dir: &Path) -> PathBuf {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let (path, base) = (abs(path), abs(run_dir));
    let (p, b): (Vec<_>, Vec<_>) = (path.components().collect(), base.components().collect());
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out: PathBuf = std::iter::repeat_n("..", b.len() - common).collect();
    out.extend(p[common..].iter().map(|c| c.as_os_str()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_names_round_trip_and_are_reserved() {
        assert_eq!(round_of(&round_folder(12)), Some(12));
        assert_eq!(round_stage(3, "rm"), "round-3/rm");
        assert_eq!(round_of("round-x"), None);
        assert!(is_round_like("round-x") && !is_reserved("round-x"));
        for taken in ["round-2", ".hidden", "report", "rounds.jsonl"] {
            assert!(is_reserved(taken), "{taken}");
        }
        assert!(!is_reserved("rm"));
        assert_eq!(seed_of(&seed_folder(7)), Some(7));
        assert!(is_reserved("seed-3") && !is_reserved("seed-x"));
        assert_eq!(seed_of("seed-+3"), None);
    }

    /// A FIFO or a device where a log should be is passed over at once.
    #[test]
    fn a_log_that_is_not_a_regular_file_is_passed_over() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("metrics.jsonl");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        assert!(read_log_lines(&fifo).is_empty());
        let zero = d.path().join("rounds.jsonl");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert!(read_log_lines(&zero).is_empty());
        let ok = d.path().join("ok.jsonl");
        std::fs::write(&ok, "{\"step\": 1}\n{\"step\": 2, \"loss\"").unwrap();
        assert_eq!(read_log_lines(&ok).len(), 1);
    }
}
