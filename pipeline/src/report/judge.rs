//! Who fills the report's gold columns: the bundled task's judge (which
//! knows only its own prompts), the user's program (`judge: {kind:
//! command}` in the experiment, or `rlhf eval --judge`), which gets every
//! policy's answer to a prompt in one line of the loop labeller's
//! protocol (`{"prompt", "responses"}` in, `{"scores": [...]}` out), or a
//! held-out reward stage of the run (`judge: {kind: reward_model}`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::experiment::JudgeSpec;
use crate::label::programs::{score_with_command, LineProgram};
use crate::run_folder::finished::FinishedStage;
use rlhf_stages::eval::PolicyAnswers;
use rlhf_stages::{HeadChoice, Model};
use tch::Device;

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

/// What `judge.json` holds: a reward stage of the run (used by `rlhf
/// eval`, as it runs no program), or a program (shown, never run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Recorded {
    RewardModel { reward_model_stage: String },
    Command(CommandJudge),
}

/// Records the experiment's judge in its run folder (removes an old one
/// when the experiment has none).
pub fn record(run_dir: &Path, spec: &JudgeSpec, experiment_dir: &Path) -> anyhow::Result<()> {
    let path = run_dir.join(JUDGE_FILE);
    let recorded = match spec {
        JudgeSpec::Gold => {
            if path.exists() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
            return Ok(());
        }
        JudgeSpec::Command {
            command,
            timeout_seconds,
        } => Recorded::Command(CommandJudge {
            command: command.clone(),
            timeout_seconds: *timeout_seconds,
            cwd: Some(crate::run_folder::relative_to(experiment_dir, run_dir)),
        }),
        JudgeSpec::RewardModel { stage } => Recorded::RewardModel {
            reward_model_stage: stage.clone(),
        },
    };
    std::fs::create_dir_all(run_dir)?;
    rlhf_datasets::atomic::write_file(&path, serde_json::to_string_pretty(&recorded)?.as_bytes())?;
    Ok(())
}

/// The run folder's recorded judge: `None` without one, else what it
/// holds or why it could not be read.
pub fn read_recorded(run_dir: &Path) -> Option<Result<Recorded, String>> {
    let path = run_dir.join(JUDGE_FILE);
    path.symlink_metadata().ok()?;
    let text = match rlhf_datasets::files::read_bounded(&path, 1 << 20, "the limit for judge.json")
    {
        Ok(t) => t,
        Err(e) => return Some(Err(format!("{}: {e}; not read", path.display()))),
    };
    Some(
        serde_json::from_str::<Recorded>(&text)
            .map_err(|_| format!("{}: not a recorded judge; not read", path.display())),
    )
}

/// The reward stage a run folder records as its judge, if it does.
pub fn recorded_reward_model(run_dir: &Path) -> Option<String> {
    match read_recorded(run_dir)? {
        Ok(Recorded::RewardModel { reward_model_stage }) => Some(reward_model_stage),
        _ => None,
    }
}

/// What to tell the person who evaluates a run folder whose experiment
/// named a judge: the recorded command and how to run it. A run folder may
/// have come from someone else, so what it records is shown, never run.
pub fn recorded_hint(run_dir: &Path) -> Option<String> {
    let path = run_dir.join(JUDGE_FILE);
    let judge = match read_recorded(run_dir)? {
        Err(e) => return Some(e),
        Ok(Recorded::RewardModel { .. }) => return None,
        Ok(Recorded::Command(judge)) => judge,
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

    /// Scores single answers to their prompts: one line per answer.
    pub fn score_pairs(&self, pairs: &[(String, String)]) -> anyhow::Result<Vec<Option<f64>>> {
        let prompts: Vec<String> = pairs.iter().map(|(p, _)| p.clone()).collect();
        let n = pairs.len();
        let answers = PolicyAnswers {
            answers: pairs.iter().map(|(_, a)| a.clone()).collect(),
            answer_tokens: vec![0; n],
            finished: vec![true; n],
            gold: vec![None; n],
            reward: None,
        };
        let mut one = vec![(String::new(), answers)];
        self.score(&prompts, &mut one)?;
        Ok(one.remove(0).1.gold)
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

/// Who gives this evaluation's gold scores.
pub enum Gold {
    /// The bundled task's judge, which scores while the answers are made.
    Task,
    Command(CommandJudge),
    /// The run's held-out reward stage (its label) and its model.
    RewardModel {
        label: String,
        model: Box<Model>,
    },
}

impl Gold {
    /// `--judge` if given; else the run's recorded reward-model judge
    /// (one of `stages`, finished); else the bundled task's judge (with a
    /// warning where the run records a program, which is never run).
    pub fn choose(
        run_dir: &Path,
        given: Option<CommandJudge>,
        stages: &[FinishedStage],
        device: Device,
    ) -> anyhow::Result<Self> {
        if let Some(command) = given {
            return Ok(Self::Command(command));
        }
        if let Some(label) = recorded_reward_model(run_dir) {
            let stage = stages
                .iter()
                .find(|s| s.label == label && s.is_reward_model())
                .with_context(|| {
                    format!(
                        "{}: the judge is reward stage {label}, which has not finished in {}; run the experiment first",
                        run_dir.join(JUDGE_FILE).display(),
                        run_dir.display()
                    )
                })?;
            let model = Model::load(&stage.checkpoint(), HeadChoice::AsSaved, device)
                .with_context(|| format!("loading the judge {label}"))?;
            return Ok(Self::RewardModel {
                label,
                model: Box::new(model),
            });
        }
        if let Some(hint) = recorded_hint(run_dir) {
            tracing::warn!("{hint}; judged by the bundled task's gold judge instead");
        }
        Ok(Self::Task)
    }

    /// The judge to score answers as they are made (the task's).
    pub fn while_answering(&self) -> Option<rlhf_stages::eval::answer::Judge> {
        matches!(self, Self::Task).then(|| {
            let judge: rlhf_stages::eval::answer::Judge =
                std::sync::Arc::new(rlhf_datasets::task::judge);
            judge
        })
    }

    /// The held-out reward stage, which is no policy's reward model.
    pub fn stage(&self) -> Option<&str> {
        match self {
            Self::RewardModel { label, .. } => Some(label),
            _ => None,
        }
    }

    /// Whether a score of 1 means an exactly right answer.
    pub fn scores_exactness(&self) -> bool {
        matches!(self, Self::Task)
    }

    /// Fills every policy's gold scores, after all have answered.
    pub fn score(
        &self,
        prompts: &[String],
        policies: &mut [(String, PolicyAnswers)],
        settings: &rlhf_stages::eval::EvalSettings,
        device: Device,
    ) -> anyhow::Result<()> {
        match self {
            Self::Task => Ok(()),
            Self::Command(command) => command.score(prompts, policies),
            Self::RewardModel { label, model } => {
                tracing::info!(
                    "judging {} policies' answers to {} prompts with reward stage {label}",
                    policies.len(),
                    prompts.len()
                );
                for (_, answers) in policies.iter_mut() {
                    let scores = rlhf_stages::eval::reward_scores(
                        model,
                        prompts,
                        &answers.answers,
                        settings,
                        device,
                    )?;
                    answers.gold = scores.into_iter().map(Some).collect();
                }
                Ok(())
            }
        }
    }

    /// Scores of single answers to their prompts (a stage's rollouts):
    /// none where the bundled judge does not know a prompt.
    pub fn score_pairs(
        &self,
        pairs: &[(String, String)],
        settings: &rlhf_stages::eval::EvalSettings,
        device: Device,
    ) -> anyhow::Result<Vec<Option<f64>>> {
        match self {
            Self::Task => Ok(pairs
                .iter()
                .map(|(p, a)| rlhf_datasets::task::judge(p, a))
                .collect()),
            Self::Command(command) => command.score_pairs(pairs),
            Self::RewardModel { model, .. } => {
                let prompts: Vec<String> = pairs.iter().map(|(p, _)| p.clone()).collect();
                let answers: Vec<String> = pairs.iter().map(|(_, a)| a.clone()).collect();
                let scores =
                    rlhf_stages::eval::reward_scores(model, &prompts, &answers, settings, device)?;
                Ok(scores.into_iter().map(Some).collect())
            }
        }
    }

    /// How the report names it.
    pub fn shown(&self) -> String {
        match self {
            Self::Task => "the bundled task's judge".into(),
            Self::Command(command) => command.shown(),
            Self::RewardModel { label, .. } => format!(
                "reward stage `{label}`, trained on held-out labels that no stage learnt from"
            ),
        }
    }
}
