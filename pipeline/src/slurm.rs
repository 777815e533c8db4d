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

use crate::config::SlurmSettings;

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
        let name = job_name(self.label, self.key);
        let job = match self.queued(&name)? {
            Some(id) => {
                tracing::info!(
                    "[{}] following Slurm job {id}, submitted before",
                    self.label
                );
                id
            }
            None => self.submit(&name)?,
        };
        let state = self.follow(&job)?;
        if state != "COMPLETED" {
            bail!(
                "{}: Slurm job {job} ended {state}; its log: {}",
                self.label,
                self.log(&job).display()
            );
        }
        let summary = rlhf_stages::train::SUMMARY_FILE;
        let text = std::fs::read_to_string(self.dir.join(summary)).with_context(|| {
            format!(
                "{}: Slurm job {job} completed without {summary}",
                self.label
            )
        })?;
        Ok(serde_json::from_str(&text)?)
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
        let out = squeue(&["--noheader", "--format=%i", &format!("--name={name}")])?;
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

    fn log(&self, job: &str) -> PathBuf {
        self.job_dir().join(format!("job-{job}.log"))
    }

    /// Writes the batch script and submits it; records the job's id.
    fn submit(&self, name: &str) -> anyhow::Result<String> {
        let script = self.job_dir().join("job.sh");
        rlhf_datasets::atomic::write_file(&script, self.script(name)?.as_bytes())?;
        let out = Command::new("sbatch")
            .arg("--parsable")
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
        let log = self.job_dir().join("job-%j.log");
        let mut lines = vec![
            "#!/bin/bash".to_owned(),
            format!("#SBATCH --job-name={name}"),
            format!("#SBATCH --output={}", log.display()),
            format!("#SBATCH --chdir={}", std::env::current_dir()?.display()),
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
        let mut signalled = false;
        let mut last = String::new();
        loop {
            if rlhf_stages::train::interrupt_requested() && !signalled {
                tracing::info!(
                    "[{}] interrupted: sending SIGINT to Slurm job {job}",
                    self.label
                );
                let _ = Command::new("scancel").args(["--signal=INT", job]).status();
                signalled = true;
            }
            let state = queue_state(job)?;
            log.echo();
            match state {
                Some(s) => {
                    if s != last {
                        tracing::info!("[{}] Slurm job {job}: {s}", self.label);
                        last = s;
                    }
                }
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

/// `rlhf-<stage>-<key>`: one job name per stage folder and settings.
fn job_name(label: &str, key: &str) -> String {
    let stage: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '.'
            }
        })
        .collect();
    format!("rlhf-{stage}-{}", &key[..key.len().min(12)])
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
