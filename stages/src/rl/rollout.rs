//! The rollout both RL kinds share: the prompts that leave room for an
//! answer, the scorer (a frozen reward model or the judge) and the
//! answers' log-probabilities under a policy or its reference.

use std::path::Path;

use rlhf_datasets::load::read_table;
use rlhf_datasets::schema::{prompt_texts, ChatTemplate};
use tch::{Device, Tensor};

use crate::eval::answer::Judge;
use crate::model::checkpoint::{HeadChoice, Model};
use crate::model::gpt::Head;
use crate::model::network::Network;
use crate::model::score::gather_logprobs;
use crate::objectives::rankings::{sequence_rewards, RewardInput, SCORE_BATCH};
use crate::train::{StageContext, StageError};

/// Where answers get their score: a frozen reward model, or the judge.
pub enum Scorer {
    Model(Box<Model>),
    Judge(Judge),
}

impl Scorer {
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
    /// `prompts`).
    pub fn score(
        &self,
        prompt_ids: &[Vec<i64>],
        prompts: &[&str],
        ids: &[Vec<i64>],
        texts: &[String],
        device: Device,
    ) -> Vec<f64> {
        match self {
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
        }
    }
}

/// The prompts of `path` as text and tokens; each must leave room for
/// `max_new_tokens` in the model's context.
pub fn prompts_with_room(
    path: &Path,
    policy: &Model,
    max_new_tokens: i64,
) -> Result<(Vec<String>, Vec<Vec<i64>>), StageError> {
    let table = read_table(path)?;
    let tok = &policy.tokenizer;
    let prompts = prompt_texts(&table, path, &ChatTemplate::for_tokenizer(tok))?;
    let ids = prompts
        .iter()
        .map(|p| tok.encode(p))
        .collect::<Result<Vec<_>, _>>()?;
    let limit = (policy.net.n_positions() - max_new_tokens).max(0) as usize;
    if let Some((i, p)) = ids
        .iter()
        .enumerate()
        .find(|(_, p)| p.len() > limit || p.is_empty())
    {
        return Err(StageError::Config(format!(
            "{}: row {}: the prompt has {} tokens; it must have 1..={limit} to leave room for max_new_tokens ({max_new_tokens})",
            path.display(),
            i + 1,
            p.len(),
        )));
    }
    Ok((prompts, ids))
}

/// Log-probabilities `(B, N)` of the answer tokens in `tokens` (answers
/// start at column `width`), and the logits they came from, over the
/// tokenizer's `vocab` ids only (the ids sampling can produce).
pub fn answer_logprobs(
    model: &Network,
    tokens: &Tensor,
    attention: &Tensor,
    width: i64,
    vocab: i64,
) -> (Tensor, Tensor) {
    let n = tokens.size()[1] - width;
    let hidden = model.hidden(tokens, Some(attention), None, false);
    let logits = model.logits(&hidden.narrow(1, width - 1, n));
    let logits = logits.narrow(2, 0, vocab.min(logits.size()[2]));
    let lp = gather_logprobs(&logits, &tokens.narrow(1, width, n));
    (lp, logits)
}
