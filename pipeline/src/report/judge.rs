//! Who fills the report's gold columns: the bundled task's judge (which
//! knows only its own prompts), or the user's program (`judge: {kind:
//! command}` in the experiment, or `rlhf eval --judge`), which gets every
//! policy's answer to a prompt in one line of the loop labeller's
//! protocol (`{"prompt", "responses"}` in, `{"scores": [...]}` out).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::experiment::JudgeSpec;
use crate::label::programs::{score_with_command, LineProgram};
use rlhf_stages::eval::PolicyAnswers;

/// What the runner writes into the run folder for `rlhf eval`.
pub const JUDGE_FILE: &str = "judge.json";

/// A judging program and where it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandJudge {
    pub command: Vec<String>,
    pub timeout_seconds: f64,
    /// Its working folder: the experiment file's (in `judge.json`,
    /// relative to the run folder).
    pub cwd: Option<PathBuf>,
}

/// Records the experiment's judge in its run folder (removes an old one
/// when the experiment has none).
pub fn record(run_dir: &Path, spec: &JudgeSpec, experiment_dir: &Path) -> anyhow::Result<()> {
    let path = run_dir.join(JUDGE_FILE);
    match spec {
        JudgeSpec::Gold => {
            if path.exists() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
        JudgeSpec::Command {
            command,
            timeout_seconds,
        } => {
            let judge = CommandJudge {
                command: command.clone(),
                timeout_seconds: *timeout_seconds,
                cwd: Some(crate::run_folder::relative_to(experiment_dir, run_dir)),
            };
            std::fs::create_dir_all(run_dir)?;
            rlhf_datasets::atomic::write_file(
                &path,
                serde_json::to_string_pretty(&judge)?.as_bytes(),
            )?;
        }
    }
    Ok(())
}

/// What to tell the person who evaluates a run folder whose experiment
/// named a judge: the recorded command and how to run it. A run folder may
/// have come from someone else, so what it records is shown, never run.
pub fn recorded_hint(run_dir: &Path) -> Option<String> {
    let path = run_dir.join(JUDGE_FILE);
    path.symlink_metadata().ok()?;
    let text = match rlhf_datasets::files::read_bounded(&path, 1 << 20, "the limit for judge.json")
    {
        Ok(t) => t,
        Err(e) => return Some(format!("{}: {e}; not read", path.display())),
    };
    let Ok(judge) = serde_json::from_str::<CommandJudge>(&text) else {
        return Some(format!(
            "{}: not a recorded judge; not read",
            path.display()
        ));
    };
    let line = shlex::try_join(judge.command.iter().map(String::as_str))
        .unwrap_or_else(|_| judge.command.join(" "));
    let folder = judge
        .cwd
        .map(|c| {
            format!(
                ", from the experiment's folder ({})",
                run_dir.join(c).display()
            )
        })
        .unwrap_or_default();
    Some(format!(
        "{} records the experiment's judge `{line}`; a run folder's commands are never run for you. \
         To judge with it, run: rlhf eval {} --judge {}{folder}",
        path.display(),
        run_dir.display(),
        shlex::try_quote(&line).unwrap_or_else(|_| line.as_str().into())
    ))
}

impl CommandJudge {
    /// How the report names it.
    pub fn shown(&self) -> String {
        format!("`{}`", self.command.join(" "))
    }

    /// Fills every policy's `gold` scores: one line per prompt holding
    /// every policy's answer.
    pub fn score(
        &self,
        prompts: &[String],
        policies: &mut [(String, PolicyAnswers)],
    ) -> anyhow::Result<()> {
        let groups: Vec<(String, Vec<String>)> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                (
                    p.clone(),
                    policies.iter().map(|(_, a)| a.answers[i].clone()).collect(),
                )
            })
            .collect();
        let program = LineProgram {
            command: &self.command,
            role: "judge",
            timeout: Duration::from_secs_f64(self.timeout_seconds),
            limit: "judge.timeout_seconds",
            cwd: self.cwd.as_deref(),
        };
        tracing::info!(
            "judging {} policies' answers to {} prompts with {}",
            policies.len(),
            prompts.len(),
            self.shown()
        );
        let scores = score_with_command(&program, &groups)?;
        for (i, row) in scores.iter().enumerate() {
            for ((_, answers), s) in policies.iter_mut().zip(row) {
                answers.gold[i] = Some(*s);
            }
        }
        Ok(())
    }
}
