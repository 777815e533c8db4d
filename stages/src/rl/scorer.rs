//! Where an RL stage's answers get their scores: a frozen reward model,
//! the bundled task's judge, a program that ranks each group
//! (`ranker_command`), or a reward program or checker (`reward`, see
//! [`super::reward`]). Every scorer gives each answer a [`Scored`]: its
//! score and, for reward programs, its named components.

use std::path::Path;

use tch::Device;

use super::reward::{ProgramScorer, RewardConfig, ScoreItem, Scored};
use crate::eval::answer::Judge;
use crate::model::checkpoint::{HeadChoice, Model};
use crate::model::gpt::Head;
use crate::objectives::rankings::{sequence_rewards, RewardInput, SCORE_BATCH};
use crate::train::{StageContext, StageError};

/// Where answers get their score.
pub enum Scorer {
    Model(Box<Model>),
    Judge(Judge),
    Ranked(RankedBy),
    Program(Box<ProgramScorer>),
    /// Multi-turn episodes: their environment scores them as they are
    /// played (`rl::episode`); nothing is scored after.
    Environment,
}

/// A program that ranks groups (the loop's labeller protocol), and how
/// long it may take.
pub struct RankedBy {
    pub ranker: crate::train::Ranker,
    pub command: Vec<String>,
    pub timeout: f64,
}

impl RankedBy {
    /// Minus each answer's rank in its group (`group` consecutive answers
    /// to one prompt): the best scores 0.
    fn scores(
        &self,
        prompts: &[&str],
        answers: &[String],
        group: usize,
    ) -> Result<Vec<f64>, StageError> {
        let groups: Vec<(String, Vec<String>)> = answers
            .chunks(group)
            .zip(prompts.chunks(group))
            .map(|(a, p)| (p[0].to_owned(), a.to_vec()))
            .collect();
        let rankings = (self.ranker)(&self.command, self.timeout, &groups)
            .map_err(|e| StageError::setting("ranker_command", e))?;
        Ok(rankings.iter().flatten().map(|&r| -(r as f64)).collect())
    }
}

impl Scorer {
    /// A reward program or checker (`reward`), its scores kept in the
    /// stage folder.
    pub fn program(cfg: &RewardConfig, ctx: &StageContext) -> Result<Self, StageError> {
        let scorer = ProgramScorer::new(cfg, ctx.reward_runner.clone(), &ctx.out_dir)?;
        Ok(Scorer::Program(Box::new(scorer)))
    }

    /// A ranking program (`command`, its timeout in seconds): it needs
    /// the pipeline's ranker.
    pub fn ranked(
        command: &[String],
        timeout: f64,
        ctx: &StageContext,
    ) -> Result<Self, StageError> {
        let ranker = ctx.ranker.clone().ok_or_else(|| {
            StageError::setting(
                "ranker_command",
                "needs the pipeline's ranker (run the stage with rlhf)",
            )
        })?;
        Ok(Scorer::Ranked(RankedBy {
            ranker,
            command: command.to_vec(),
            timeout,
        }))
    }

    /// The judge (`gold_reward`), else the reward model at `reward_model`.
    pub fn load(
        reward_model: Option<&Path>,
        gold_reward: bool,
        ctx: &StageContext,
    ) -> Result<Self, StageError> {
        if gold_reward {
            return ctx.judge.clone().map(Scorer::Judge).ok_or_else(|| {
                StageError::setting("gold_reward", "is set but no judge is available")
            });
        }
        let path = reward_model.ok_or_else(|| {
            StageError::setting(
                "reward_model",
                "is required: set `reward_model` (e.g. `reward_model: rm`) or `gold_reward: true`",
            )
        })?;
        let mut m = Model::load(path, HeadChoice::AsSaved, ctx.device)?;
        if m.net.head() != Head::Scalar {
            return Err(StageError::setting(
                "reward_model",
                format!(
                    "{} has no scalar head; give a reward stage's checkpoint",
                    path.display()
                ),
            ));
        }
        m.vs.freeze();
        Ok(Scorer::Model(Box::new(m)))
    }

    /// Scores of answers (`ids` and `texts`) to prompts (`prompt_ids` and
    /// `prompts`, with their reference answers where the prompts file has
    /// them), in groups of `group` answers to one prompt.
    #[allow(clippy::too_many_arguments)]
    pub fn score(
        &self,
        prompt_ids: &[Vec<i64>],
        prompts: &[&str],
        references: &[Option<&str>],
        ids: &[Vec<i64>],
        texts: &[String],
        group: usize,
        device: Device,
    ) -> Result<Vec<Scored>, StageError> {
        if let Scorer::Program(p) = self {
            let items: Vec<ScoreItem> = (0..texts.len())
                .map(|i| ScoreItem {
                    prompt: prompts[i].to_owned(),
                    response: texts[i].clone(),
                    answer: references[i].map(str::to_owned),
                })
                .collect();
            return p.scores(&items);
        }
        let scores = match self {
            Scorer::Model(rm) => {
                let eos = rm.tokenizer.eos_id();
                let inputs: Vec<RewardInput> = prompt_ids
                    .iter()
                    .zip(ids)
                    .map(|(p, a)| {
                        let mut ids: Vec<i64> = p.iter().chain(a).copied().collect();
                        if a.last() != Some(&eos) {
                            ids.push(eos); // scored as the reward model was trained: answer + EOS
                        }
                        RewardInput {
                            ids,
                            answer_start: p.len(),
                        }
                    })
                    .collect();
                sequence_rewards(rm, &inputs, SCORE_BATCH, device)
            }
            Scorer::Judge(judge) => prompts
                .iter()
                .zip(texts)
                .map(|(p, a)| judge(p, a).unwrap_or(0.0))
                .collect(),
            Scorer::Ranked(r) => r.scores(prompts, texts, group)?,
            Scorer::Program(_) => unreachable!("scored above"),
            Scorer::Environment => {
                return Err(StageError::Config(
                    "episodes are scored by their environment, not after".into(),
                ))
            }
        };
        Ok(scores
            .into_iter()
            .map(|score| Scored {
                score,
                ..Scored::default()
            })
            .collect())
    }
}
