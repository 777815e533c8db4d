//! A run folder's state as `rlhf watch` shows it, read afresh from its
//! files on every request (nothing is kept between requests, so a folder
//! copied from elsewhere reads the same): the plan, each stage's state
//! from its manifest, key, progress and Slurm record, the labelling
//! queues, and whether a report exists.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::run_folder::manifest::{read_manifest, Status, KEY_FILE};
use crate::run_folder::plan_file::{PlannedEntry, RunPlan};
use rlhf_stages::train::metrics::{METRICS_FILE, PROGRESS_FILE};

/// The whole page's data.
#[derive(Debug, Serialize)]
pub struct RunState {
    pub name: String,
    pub experiment: Option<String>,
    /// A process (`rlhf run`, `rlhf eval`) holds the run folder's lock.
    pub live: bool,
    pub holder_pid: Option<u32>,
    pub started_at: Option<f64>,
    pub stages: Vec<StageState>,
    pub labelling: Vec<super::labelling::QueueState>,
    /// `report/report.md` exists.
    pub report: bool,
}

#[derive(Debug, Serialize)]
pub struct StageState {
    pub label: String,
    pub kind: String,
    pub folder: String,
    pub upstream: Vec<String>,
    pub executor: String,
    /// waiting, running, queued, finished, cached, copied, failed,
    /// interrupted, stopped, not started.
    pub state: &'static str,
    /// The error of a failed stage; where a copied one came from.
    pub detail: Option<String>,
    pub slurm_job: Option<String>,
    /// Last step (or iteration) in its metrics, and of how many.
    pub step: Option<i64>,
    pub total: Option<i64>,
    /// Seconds left at the pace of the steps this process has made.
    pub eta_seconds: Option<f64>,
    /// Its run's seconds, once it ended.
    pub seconds: Option<f64>,
    /// The newest rollouts file (`rollouts/iter-NNNN.parquet`), by name.
    pub rollouts: Option<String>,
}

/// Reads the state of the run in `run_dir`.
pub fn read(run_dir: &Path) -> RunState {
    let plan = RunPlan::read(run_dir);
    let (live, holder_pid) = super::liveness::holder(run_dir);
    let entries = match &plan {
        Some(p) => p.stages.clone(),
        None => entries_from_folders(run_dir),
    };
    let started_at = plan.as_ref().map(|p| p.started_at);
    let stages = entries
        .into_iter()
        .map(|e| stage_state(run_dir, e, live, started_at))
        .collect();
    RunState {
        name: run_dir
            .file_name()
            .map_or_else(|| ".".into(), |n| n.to_string_lossy().into_owned()),
        experiment: plan.as_ref().map(|p| p.experiment.clone()),
        live,
        holder_pid,
        started_at,
        stages,
        labelling: super::labelling::queues(run_dir),
        report: run_dir
            .join(crate::run_folder::REPORT_DIR)
            .join("report.md")
            .is_file(),
    }
}

/// The folder of the stage labelled `label`, as the plan (else the stage
/// folders' manifests) names it.
pub fn folder_of(run_dir: &Path, label: &str) -> Option<PathBuf> {
    let entries =
        RunPlan::read(run_dir).map_or_else(|| entries_from_folders(run_dir), |p| p.stages);
    let entry = entries.into_iter().find(|e| e.label == label)?;
    stage_folder(run_dir, &entry.folder)
}

/// Without a plan (a run folder from before plans, or a lone stage): the
/// stage folders there are, named and linked by their manifests.
fn entries_from_folders(run_dir: &Path) -> Vec<PlannedEntry> {
    crate::run_folder::stage_dirs(run_dir)
        .into_iter()
        .filter_map(|dir| {
            let m = read_manifest(&dir)?;
            let folder = dir
                .strip_prefix(run_dir)
                .ok()?
                .to_string_lossy()
                .into_owned();
            Some(PlannedEntry {
                label: m.stage,
                kind: m.kind,
                folder,
                upstream: m.upstream.into_keys().collect(),
                executor: "local".into(),
            })
        })
        .collect()
}

fn stage_state(
    run_dir: &Path,
    e: PlannedEntry,
    live: bool,
    run_started: Option<f64>,
) -> StageState {
    let dir = stage_folder(run_dir, &e.folder);
    let manifest = dir.as_deref().and_then(read_manifest);
    // Started by this run: its key written since the run began (a folder
    // an earlier, killed run left waits for this one to reach it).
    let key_written = dir.as_deref().and_then(|d| modified(&d.join(KEY_FILE)));
    let started = match (key_written, run_started) {
        (Some(at), Some(run)) if live => at + 1.0 >= run,
        (written, _) => written.is_some(),
    };
    let slurm_job = dir.as_deref().and_then(crate::exec::slurm::recorded_job);
    let (step, progress) = match &dir {
        Some(d) => (last_step(&d.join(METRICS_FILE)), read_progress(d)),
        None => (None, None),
    };
    let (state, detail) = match &manifest {
        Some(m) => ended_state(m, live.then_some(run_started).flatten()),
        None if !started => (if live { "waiting" } else { "not started" }, None),
        None if !live => ("stopped", None),
        None if slurm_job.is_some() && step.is_none() => ("queued", None),
        None => ("running", None),
    };
    let eta_seconds = match (state, progress, step) {
        ("running", Some(p), Some(step)) => p.eta(step),
        _ => None,
    };
    StageState {
        label: e.label,
        kind: e.kind,
        folder: e.folder,
        upstream: e.upstream,
        executor: e.executor,
        state,
        detail,
        slurm_job,
        step,
        total: progress
            .map(|p| p.total)
            .or_else(|| manifest.as_ref().and(step)),
        eta_seconds,
        seconds: manifest.as_ref().map(|m| m.seconds),
        rollouts: dir.as_deref().and_then(newest_rollouts),
    }
}

/// When a file was last written, seconds since the Unix epoch.
fn modified(path: &Path) -> Option<f64> {
    let at = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(at.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64())
}

/// A finished attempt's state: finished here in this run, before it
/// (cached), copied from a sibling run, or how it failed.
fn ended_state(
    m: &crate::run_folder::manifest::Manifest,
    live_run_started: Option<f64>,
) -> (&'static str, Option<String>) {
    let before_this_run =
        matches!((m.ended_at, live_run_started), (Some(end), Some(start)) if end < start);
    let error = || m.summary["error"].as_str().map(str::to_owned);
    let flags = crate::run_folder::summary_flags(&m.summary);
    let flagged = || (!flags.is_empty()).then(|| format!("flagged: {}", flags.join("; ")));
    match m.status {
        // An earlier run's failure, which this one has not reached yet.
        Status::Failed | Status::Interrupted if before_this_run => (
            "waiting",
            Some(format!(
                "its last run: {}",
                error().unwrap_or_else(|| "interrupted".into())
            )),
        ),
        Status::Complete if m.copied_from.is_some() => ("copied", m.copied_from.clone()),
        Status::Complete if before_this_run => ("cached", flagged()),
        Status::Complete => ("finished", flagged()),
        Status::Failed => ("failed", error()),
        Status::Interrupted => ("interrupted", None),
    }
}

/// A stage's folder: inside the run folder, named by plain components
/// only (a plan from elsewhere cannot point the page outside).
pub fn stage_folder(run_dir: &Path, folder: &str) -> Option<PathBuf> {
    let path = Path::new(folder);
    let plain = !folder.is_empty()
        && path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    plain.then(|| run_dir.join(path))
}

/// The step (or iteration) of the last complete line of a metrics file,
/// read from its tail.
fn last_step(path: &Path) -> Option<i64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(16 << 10)))
        .ok()?;
    let mut tail = Vec::new();
    file.take(16 << 10).read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    let complete = &text[..text.rfind('\n')?];
    complete.lines().rev().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        v.get("step").or_else(|| v.get("iteration"))?.as_i64()
    })
}

#[derive(Debug, Clone, Copy, serde::Deserialize)]
struct Progress {
    total: i64,
    done_at_start: i64,
    started_at: f64,
}

impl Progress {
    /// The steps left at this process's mean pace so far.
    fn eta(&self, step: i64) -> Option<f64> {
        let made = step - self.done_at_start;
        let elapsed = crate::run_folder::manifest::unix_now() - self.started_at;
        (made > 0 && elapsed > 0.0)
            .then(|| (self.total - step).max(0) as f64 * elapsed / made as f64)
    }
}

fn read_progress(dir: &Path) -> Option<Progress> {
    let text =
        rlhf_datasets::files::read_bounded(&dir.join(PROGRESS_FILE), 4096, "the limit").ok()?;
    serde_json::from_str(&text).ok()
}

/// The newest `rollouts/iter-*.parquet` of a stage folder, by name.
pub fn newest_rollouts(dir: &Path) -> Option<String> {
    let (_, path) = rlhf_datasets::rollout::rollouts_files(dir).pop()?;
    Some(path.file_name()?.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::run_folder::manifest::{unix_now, write_manifest, Manifest};

    fn ended(dir: &Path, status: Status, ago: f64, copied_from: Option<&str>) {
        std::fs::create_dir_all(dir).unwrap();
        let m = Manifest {
            stage: "x".into(),
            kind: "sft".into(),
            key: "k".into(),
            inputs: Default::default(),
            upstream: Default::default(),
            config: serde_json::json!({}),
            status,
            seconds: 3.0,
            summary: serde_json::json!({"error": "boom"}),
            copied_from: copied_from.map(str::to_owned),
            started_at: Some(unix_now() - ago - 3.0),
            ended_at: Some(unix_now() - ago),
        };
        write_manifest(dir, &m).unwrap();
    }

    fn started(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(KEY_FILE), "k").unwrap();
    }

    fn entry(folder: &str) -> PlannedEntry {
        PlannedEntry {
            label: folder.into(),
            kind: "sft".into(),
            folder: folder.into(),
            upstream: vec![],
            executor: "local".into(),
        }
    }

    #[test]
    fn each_state_comes_from_the_stage_folders_files() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path();
        ended(&run.join("done"), Status::Complete, 10.0, None);
        ended(&run.join("before"), Status::Complete, 200.0, None);
        ended(
            &run.join("copied"),
            Status::Complete,
            200.0,
            Some("../other/sft"),
        );
        ended(&run.join("failed"), Status::Failed, 10.0, None);
        ended(&run.join("flagged"), Status::Complete, 10.0, None);
        let manifest = run.join("flagged").join(crate::run_folder::MANIFEST_FILE);
        let text = std::fs::read_to_string(&manifest).unwrap();
        let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
        m["summary"]["flags"] =
            serde_json::json!(["sft did not get clear of the frequency baseline"]);
        std::fs::write(&manifest, m.to_string()).unwrap();
        ended(&run.join("failed_before"), Status::Failed, 200.0, None);
        started(&run.join("running"));
        std::fs::write(
            run.join("running/metrics.jsonl"),
            "{\"step\":4}\n{\"step\":5}\n",
        )
        .unwrap();
        let progress =
            serde_json::json!({"total": 10, "done_at_start": 0, "started_at": unix_now() - 10.0});
        std::fs::write(
            run.join("running").join(PROGRESS_FILE),
            progress.to_string(),
        )
        .unwrap();
        started(&run.join("queued"));
        std::fs::create_dir_all(run.join("queued/slurm")).unwrap();
        std::fs::write(
            run.join("queued/slurm/job.json"),
            r#"{"job_id": "42", "name": "rlhf-q"}"#,
        )
        .unwrap();
        let at = |folder: &str, live: bool| {
            stage_state(run, entry(folder), live, Some(unix_now() - 100.0))
        };

        let got = |folder: &str, live: bool| {
            let s = at(folder, live);
            (s.state, s.detail)
        };
        assert_eq!(got("done", true), ("finished", None));
        assert_eq!(got("before", true), ("cached", None));
        assert_eq!(got("before", false), ("finished", None));
        assert_eq!(got("copied", true), ("copied", Some("../other/sft".into())));
        assert_eq!(got("failed", true), ("failed", Some("boom".into())));
        assert_eq!(
            got("flagged", true),
            (
                "finished",
                Some("flagged: sft did not get clear of the frequency baseline".into())
            )
        );
        assert_eq!(
            got("failed_before", true),
            ("waiting", Some("its last run: boom".into()))
        );
        assert_eq!(got("nothing", true), ("waiting", None));
        assert_eq!(got("nothing", false), ("not started", None));
        assert_eq!(got("running", false), ("stopped", None));
        let running = at("running", true);
        assert_eq!(
            (running.state, running.step, running.total),
            ("running", Some(5), Some(10))
        );
        // 5 steps in 10 s, 5 left.
        let eta = running.eta_seconds.unwrap();
        assert!((eta - 10.0).abs() < 1.0, "{eta}");
        let queued = at("queued", true);
        assert_eq!(
            (queued.state, queued.slurm_job.as_deref()),
            ("queued", Some("42"))
        );
    }

    #[test]
    fn a_plan_cannot_point_outside_the_run_folder() {
        let run = Path::new("/r");
        assert_eq!(
            stage_folder(run, "round-1/rm"),
            Some(run.join("round-1/rm"))
        );
        for bad in ["", "../x", "/etc", "a/../../b", "./a"] {
            assert_eq!(stage_folder(run, bad), None, "{bad}");
        }
    }

    #[test]
    fn the_last_complete_metrics_line_gives_the_step() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("m.jsonl");
        std::fs::write(&path, "{\"step\":1}\n{\"step\":2}\n{\"step\":3").unwrap();
        assert_eq!(last_step(&path), Some(2));
        std::fs::write(&path, "{\"iteration\":4,\"kl\":0.1}\n").unwrap();
        assert_eq!(last_step(&path), Some(4));
        assert_eq!(last_step(&d.path().join("none")), None);
    }
}
