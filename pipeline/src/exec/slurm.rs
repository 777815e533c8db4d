//! The `slurm` executor: a stage as a Slurm batch job whose script runs
//! the stage's ranks with `srun`. The runner follows the job (`squeue`,
//! then `scontrol`/`sacct` for how it ended), streams its log with the job
//! id in every line, and treats a cancelled, failed or timed-out job as a
//! failed stage; a rerun submits it again and the stage resumes from its
//! checkpoint.
//!
//! Nothing lives only on the login node: the job's id is kept in the stage
//! folder (`slurm/job.json`, on the shared file system), and jobs are named
//! after the stage and its key, so a runner killed while a job is queued
//! finds it on rerun (by the file, or by name in `squeue`) instead of
//! submitting it twice.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::experiment::SlurmSettings;

/// What the stage folder keeps of its job.
const JOB_FILE: &str = "job.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct JobRecord {
    job_id: String,
    name: String,
}

/// One stage to run as a batch job.
#[derive(Debug)]
pub struct SlurmStage<'a> {
    /// How logs name it (`ppo`, `round-1/rm`).
    pub label: &'a str,
    /// The stage's folder; its job's files go in `slurm/` inside it.
    pub dir: &'a Path,
    /// The stage's key: part of the job's name.
    pub key: &'a str,
    /// `rlhf` arguments that run the stage (`stage --config ...`).
    pub args: &'a [String],
    /// Tasks per node: the stage's ranks on each node.
    pub tasks_per_node: usize,
    pub settings: SlurmSettings,
}

impl SlurmStage<'_> {
    fn job_dir(&self) -> PathBuf {
        self.dir.join("slurm")
    }

    /// Runs the stage as a job (or follows the one already queued for it)
    /// until it ends; returns the stage's summary.
    pub fn run(&self) -> anyhow::Result<serde_json::Value> {
        let job_dir = self.job_dir();
        std::fs::create_dir_all(&job_dir)
            .with_context(|| format!("creating {}", job_dir.display()))?;
        let name = job_name(self.label, self.dir, self.key);
        let job = match (self.queued(&name)?, self.completed_before(&name)) {
            (Some(id), _) => {
                tracing::info!(
                    "[{}] following Slurm job {id}, submitted before",
                    self.label
                );
                id
            }
            (None, Some(id)) => {
                tracing::info!(
                    "[{}] Slurm job {id} completed while no runner followed it",
                    self.label
                );
                id
            }
            (None, None) => self.submit(&name)?,
        };
        let state = self.follow(&job)?;
        if state != "COMPLETED" {
            bail!(
                "{}: Slurm job {job} ended {state}; its log: {}",
                self.label,
                self.log(&job).display()
            );
        }
        crate::run_folder::read_summary(self.dir)
            .with_context(|| format!("{}: Slurm job {job} completed", self.label))
    }

    /// The job of this stage and key still queued or running: the one the
    /// stage folder names, else one with its name in `squeue`.
    fn queued(&self, name: &str) -> anyhow::Result<Option<String>> {
        let record = std::fs::read_to_string(self.job_dir().join(JOB_FILE))
            .ok()
            .and_then(|t| serde_json::from_str::<JobRecord>(&t).ok())
            .filter(|r| r.name == name);
        if let Some(r) = record {
            if queue_state(&r.job_id)?.is_some() {
                return Ok(Some(r.job_id));
            }
        }
        let out = squeue(&[
            "--me",
            "--noheader",
            "--format=%i",
            &format!("--name={name}"),
        ])?;
        let found = out.split_whitespace().next().map(str::to_owned);
        if let Some(id) = &found {
            // Submitted by a runner that stopped before it could say so.
            self.record(id, name)?;
        }
        Ok(found)
    }

    /// Keeps the job's id in the stage folder.
    fn record(&self, id: &str, name: &str) -> anyhow::Result<()> {
        let record = JobRecord {
            job_id: id.to_owned(),
            name: name.to_owned(),
        };
        let file = self.job_dir().join(JOB_FILE);
        rlhf_datasets::atomic::write_file(&file, serde_json::to_string(&record)?.as_bytes())?;
        Ok(())
    }

    /// The recorded job of this stage and key, if it completed and left
    /// the stage's summary (it ran while the runner was stopped).
    fn completed_before(&self, name: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.job_dir().join(JOB_FILE)).ok()?;
        let record: JobRecord = serde_json::from_str(&text).ok()?;
        let summary = self.dir.join(rlhf_stages::train::SUMMARY_FILE);
        let done = record.name == name
            && summary.exists()
            && final_state(&record.job_id).is_ok_and(|s| s == "COMPLETED");
        done.then_some(record.job_id)
    }

    fn log(&self, job: &str) -> PathBuf {
        self.job_dir().join(format!("job-{job}.log"))
    }

    /// Writes the batch script and submits it; records the job's id.
    fn submit(&self, name: &str) -> anyhow::Result<String> {
        let script = self.job_dir().join("job.sh");
        rlhf_datasets::atomic::write_file(&script, self.script(name)?.as_bytes())?;
        // Paths go on sbatch's command line, not into #SBATCH lines, where a
        // space or a line break would change what they mean.
        let (log, cwd) = (self.job_dir().join("job-%j.log"), std::env::current_dir()?);
        for path in [&self.job_dir(), &cwd] {
            let text = path.display().to_string();
            if text.contains('%') || text.chars().any(char::is_control) {
                bail!("{}: {text}: a folder Slurm runs in or logs to may not hold `%` or control characters", self.label);
            }
        }
        let out = Command::new("sbatch")
            .arg("--parsable")
            .arg(format!("--job-name={name}"))
            .arg(format!("--output={}", log.display()))
            .arg(format!("--chdir={}", cwd.display()))
            .arg(&script)
            .output()
            .context("running sbatch (is Slurm installed here?)")?;
        if !out.status.success() {
            bail!(
                "{}: sbatch refused the job ({}): {}",
                self.label,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let id = text.trim().split(';').next().unwrap_or_default().to_owned();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit() || c == '_') {
            bail!(
                "{}: sbatch answered `{}`, not a job id",
                self.label,
                text.trim()
            );
        }
        self.record(&id, name)?;
        tracing::info!(
            "[{}] submitted as Slurm job {id} ({})",
            self.label,
            script.display()
        );
        Ok(id)
    }

    /// The batch script: resources as `#SBATCH` lines, then `srun` of the
    /// stage with every argument quoted.
    fn script(&self, name: &str) -> anyhow::Result<String> {
        let s = &self.settings;
        let nodes = s.nodes.unwrap_or(1);
        let mut lines = vec![
            "#!/bin/bash".to_owned(),
            format!("# {name}: its name, log and folder are on sbatch's command line."),
            format!("#SBATCH --nodes={nodes}"),
            format!("#SBATCH --ntasks-per-node={}", self.tasks_per_node),
        ];
        let optional = [
            ("partition", s.partition.clone()),
            ("account", s.account.clone()),
            ("time", s.time.clone()),
            ("cpus-per-task", s.cpus_per_task.map(|n| n.to_string())),
            (
                "gpus-per-node",
                s.gpus_per_node.filter(|&g| g > 0).map(|n| n.to_string()),
            ),
        ];
        for (flag, value) in optional {
            if let Some(v) = value {
                lines.push(format!("#SBATCH --{flag}={v}"));
            }
        }
        for f in s.sbatch_flags.iter().flatten() {
            lines.push(format!("#SBATCH {f}"));
        }
        let exe = std::env::current_exe().context("locating the rlhf binary")?;
        let mut command = vec![quote(&exe.display().to_string())];
        command.extend(self.args.iter().map(|a| quote(a)));
        lines.push(format!(
            "# Stage {}, written by rlhf run; rerunning it resumes the stage.",
            self.label
        ));
        lines.push("export RUST_LOG=\"${RUST_LOG:-info}\"".into());
        // Two jobs on one node must not meet at one rendezvous port.
        lines.push(
            "export MASTER_PORT=\"${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}\"".into(),
        );
        lines.push(format!(
            "exec srun --kill-on-bad-exit=1 {}",
            command.join(" ")
        ));
        Ok(lines.join("\n") + "\n")
    }

    /// Polls the job until it leaves the queue, echoing its log; passes a
    /// Ctrl-C on to it (SIGINT: the stage checkpoints and stops). Returns
    /// how it ended.
    fn follow(&self, job: &str) -> anyhow::Result<String> {
        let poll = Duration::from_secs_f64(self.settings.poll_seconds.unwrap_or(5.0));
        let mut log = LogTail::new(self.log(job), format!("[{} job {job}] ", self.label));
        let (mut signalled, mut last, mut failures) = (false, String::new(), 0u32);
        loop {
            let state = match queue_state(job) {
                Ok(state) => {
                    failures = 0;
                    state
                }
                // A busy controller times out now and then: keep asking
                // for a few minutes before giving the stage up.
                Err(e) if failures < 60 => {
                    failures += 1;
                    tracing::warn!(
                        "[{}] asking Slurm about job {job}: {e:#}; asking again",
                        self.label
                    );
                    std::thread::sleep(poll.max(Duration::from_secs(5)));
                    continue;
                }
                Err(e) => return Err(e),
            };
            if rlhf_stages::train::interrupt_requested() && !signalled {
                interrupt(self.label, job, state.as_deref());
                signalled = true;
            }
            log.echo();
            match state {
                Some(s) if s != last => {
                    tracing::info!("[{}] Slurm job {job}: {s}", self.label);
                    last = s;
                }
                Some(_) => {}
                None => break,
            }
            std::thread::sleep(poll);
        }
        // Slurm may write the log's last lines as the job leaves the queue.
        std::thread::sleep(Duration::from_millis(300));
        log.echo();
        let end = final_state(job)?;
        if signalled && end != "COMPLETED" {
            bail!("{}: interrupted (Slurm job {job} ended {end})", self.label);
        }
        Ok(end)
    }
}

/// Passes a Ctrl-C on: a running job gets SIGINT (its stage checkpoints
/// and stops); a job still waiting is cancelled.
fn interrupt(label: &str, job: &str, state: Option<&str>) {
    let waiting = matches!(state, Some("PENDING" | "CONFIGURING" | "REQUEUED"));
    tracing::info!(
        "[{label}] interrupted: {} Slurm job {job}",
        if waiting {
            "cancelling"
        } else {
            "sending SIGINT to"
        }
    );
    let mut scancel = Command::new("scancel");
    if !waiting {
        scancel.arg("--signal=INT");
    }
    if !scancel.arg(job).status().is_ok_and(|s| s.success()) {
        let _ = Command::new("scancel").arg(job).status();
    }
}

/// `rlhf-<stage>-<hash>`: one job name per stage folder and settings (the
/// hash is of the folder's absolute path and the stage's key), so that two
/// run folders with the same stage never take each other's jobs.
fn job_name(label: &str, dir: &Path, key: &str) -> String {
    use sha2::{Digest, Sha256};
    let stage: String = label
        .chars()
        .map(|c| match c.is_ascii_alphanumeric() || "-_.".contains(c) {
            true => c,
            false => '.',
        })
        .collect();
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
    let hash = format!("{:x}", Sha256::digest(format!("{}\n{key}", dir.display())));
    format!("rlhf-{stage}-{}", &hash[..12])
}

/// Cancels the job a stage folder records, if Slurm still has it queued or
/// running: before the runner clears the folder to start the stage over,
/// so that no old job writes into the new one.
pub fn cancel_recorded(dir: &Path) {
    let Some(job_id) = recorded_job(dir) else {
        return;
    };
    if queue_state(&job_id).ok().flatten().is_some() {
        tracing::warn!(
            "cancelling Slurm job {job_id} of {}: the stage starts over",
            dir.display()
        );
        let _ = Command::new("scancel").arg(&job_id).status();
    }
}

/// The id of the job a stage folder records (its last submission).
pub fn recorded_job(dir: &Path) -> Option<String> {
    let file = dir.join("slurm").join(JOB_FILE);
    let text =
        rlhf_datasets::files::read_bounded(&file, 1 << 16, "the limit for a job record").ok()?;
    serde_json::from_str::<JobRecord>(&text)
        .ok()
        .map(|r| r.job_id)
}

/// `'text'` for bash, single quotes escaped.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

fn squeue(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("squeue")
        .args(args)
        .output()
        .context("running squeue (is Slurm installed here?)")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        // A job Slurm has forgotten is no longer queued.
        if err.contains("Invalid job id") {
            return Ok(String::new());
        }
        bail!("squeue failed ({}): {}", out.status, err.trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The job's state while it is in the queue (PENDING, RUNNING,
/// COMPLETING, ...); `None` once it has left.
fn queue_state(job: &str) -> anyhow::Result<Option<String>> {
    let out = squeue(&["--noheader", "--format=%T", &format!("--jobs={job}")])?;
    Ok(out.split_whitespace().next().map(str::to_owned))
}

/// How a job that left the queue ended (COMPLETED, FAILED, CANCELLED,
/// TIMEOUT, ...): from `scontrol` while Slurm remembers it, else `sacct`.
fn final_state(job: &str) -> anyhow::Result<String> {
    let out = Command::new("scontrol").args(["show", "job", job]).output();
    if let Some(out) = out.ok().filter(|o| o.status.success()) {
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(state) = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix("JobState="))
        {
            return Ok(state.to_owned());
        }
    }
    let out = Command::new("sacct")
        .args(["--noheader", "--parsable2", "--format=State", "--jobs", job])
        .output()
        .context("running sacct")?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text
        .lines()
        .next()
        .map(|l| l.split_whitespace().next().unwrap_or_default())
    {
        Some(state) if out.status.success() && !state.is_empty() => Ok(state.to_owned()),
        _ => bail!(
            "Slurm job {job} left the queue and neither scontrol nor sacct knows how it ended"
        ),
    }
}

/// Echoes what a job's log file gained since the last look.
struct LogTail {
    path: PathBuf,
    prefix: String,
    offset: u64,
    partial: String,
}

impl LogTail {
    fn new(path: PathBuf, prefix: String) -> Self {
        Self {
            path,
            prefix,
            offset: 0,
            partial: String::new(),
        }
    }

    fn echo(&mut self) {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return;
        };
        let mut bytes = Vec::new();
        if f.seek(SeekFrom::Start(self.offset)).is_err() || f.read_to_end(&mut bytes).is_err() {
            return;
        }
        self.offset += bytes.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            eprintln!("{}{}", self.prefix, line.trim_end());
        }
    }
}
