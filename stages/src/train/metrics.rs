//! What a run shows while it trains and leaves behind: `metrics.jsonl`
//! (and the same numbers as TensorBoard event files beside it), the
//! progress bar, and `summary.json`.

use std::fs;
use std::io::Write;
use std::path::Path;

use rlhf_datasets::atomic;
use serde::{de::DeserializeOwned, Serialize};

use crate::error::{io_err, StageError};
use crate::train::checkpoints::{FINAL_DIR, STATE_FILE};
use crate::train::tensorboard::EventWriter;

pub const METRICS_FILE: &str = "metrics.jsonl";
pub const SUMMARY_FILE: &str = "summary.json";

/// Appends one JSON object per line, flushed at once, so a crash loses
/// nothing already logged and `tail -f` shows progress; every line's
/// numbers also go to a TensorBoard event file in the same folder.
#[derive(Debug)]
pub struct MetricsLog {
    file: Option<fs::File>,
    events: Option<EventWriter>,
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
        // The event file is rewritten with what was kept, so it always
        // holds what metrics.jsonl holds.
        let dir = path.parent().unwrap_or(Path::new("."));
        let events = match EventWriter::create(dir) {
            Ok(mut w) => {
                kept.lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .for_each(|v| drop(w.write(&v)));
                Some(w)
            }
            Err(e) => {
                tracing::warn!("{}: no TensorBoard event file ({e})", dir.display());
                None
            }
        };
        Ok(Self {
            file: Some(file),
            events,
        })
    }

    /// A log that writes nothing: ranks other than 0 of several.
    pub fn disabled() -> Self {
        Self {
            file: None,
            events: None,
        }
    }

    pub fn write(&mut self, record: &serde_json::Value) {
        // Metrics are best effort: a full disk must not kill training.
        if let Some(file) = &mut self.file {
            let _ = writeln!(file, "{record}");
            let _ = file.flush();
        }
        if let Some(events) = &mut self.events {
            let _ = events.write(record);
        }
    }
}

/// The eval loss a run logged before its first step (its `step: 0` line).
pub fn start_eval_loss(path: &Path) -> Option<f64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["step"].as_i64() == Some(0))?["eval_loss"]
        .as_f64()
}

/// `progress.json` in a stage folder: how many steps (or iterations) the
/// stage runs, how many were done when this process started and when, so
/// that `rlhf watch` shows its progress and an ETA from the metrics alone.
pub const PROGRESS_FILE: &str = "progress.json";

/// The progress bar of a stage's main process, with its `progress.json`
/// written (best effort: a watcher's help, not the run's).
pub fn stage_progress(
    out_dir: &Path,
    total: i64,
    done: i64,
    label: &str,
) -> indicatif::ProgressBar {
    let (total, done) = (total.max(0) as u64, done.max(0) as u64);
    let started_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let line = serde_json::json!({"total": total, "done_at_start": done, "started_at": started_at});
    if let Err(e) = atomic::write_file(&out_dir.join(PROGRESS_FILE), line.to_string().as_bytes()) {
        tracing::warn!("{}: {e}", out_dir.display());
    }
    progress_bar(total, done, label)
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

/// Writes `summary.json` atomically.
pub fn write_summary<T: Serialize>(out_dir: &Path, summary: &T) -> Result<(), StageError> {
    let text = serde_json::to_string_pretty(summary).expect("summary serialises");
    atomic::write_file(&out_dir.join(SUMMARY_FILE), text.as_bytes())?;
    Ok(())
}
