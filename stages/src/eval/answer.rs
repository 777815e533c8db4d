//! Answering prompts: the one place that turns prompt texts into answers,
//! greedy or sampled, with one rule for prompts too long for the model.
//! Training-time eval (SFT, PPO), `rlhf eval`, `rlhf samples` and the
//! loop's sampling all come through here.
//!
//! The rule for long prompts: a prompt keeps its last `n_positions -
//! max_new_tokens` tokens (its end is what the answer continues), and an
//! empty prompt becomes a lone EOS, so every prompt can be answered.

use std::path::Path;
use std::sync::Arc;

use serde_json::json;
use tch::Device;

use rlhf_datasets::load::read_table;
use rlhf_datasets::schema::{prompt_texts, ChatTemplate};
use rlhf_datasets::Tokenizer;

use crate::error::StageError;
use crate::model::checkpoint::Model;
use crate::model::sample::{generate, SamplingConfig, TokenSpec};

/// Sequences per generation batch. Part of what a seed means: sampled
/// answers depend on how prompts are batched.
pub const ANSWER_BATCH: usize = 64;

/// Scores an answer to a prompt where it knows the prompt (the bundled
/// task's gold judge); the pipeline passes it to the stages.
pub type Judge = Arc<dyn Fn(&str, &str) -> Option<f64> + Send + Sync>;

/// How a stage scores its eval answers: every (prompt, answer) at once.
pub type JudgeAnswers<'a> =
    dyn Fn(&[(String, String)]) -> Result<Vec<Option<f64>>, StageError> + 'a;

/// Scores many (prompt, answer) pairs in one call (a judging program gets
/// them all at once); `None` where it does not know a prompt, `Err` with
/// what went wrong.
pub type BatchJudge =
    Arc<dyn Fn(&[(String, String)]) -> Result<Vec<Option<f64>>, String> + Send + Sync>;

/// `k` answers to each prompt, in prompt order with a prompt's `k`
/// together, and the prompts' token ids repeated to match.
#[derive(Debug, Clone, Default)]
pub struct Answered {
    pub prompt_ids: Vec<Vec<i64>>,
    /// Each answer's tokens, EOS included when it stopped there.
    pub answers: Vec<Vec<i64>>,
    /// Whether each answer ended with EOS (else it hit max_new_tokens).
    pub finished: Vec<bool>,
}

impl Answered {
    pub fn texts(&self, tokenizer: &Tokenizer) -> Result<Vec<String>, StageError> {
        self.answers
            .iter()
            .map(|a| Ok(tokenizer.decode(a, false)?))
            .collect()
    }
}

/// Greedy decoding of up to `max_new_tokens`.
pub fn greedy(max_new_tokens: i64) -> SamplingConfig {
    SamplingConfig {
        temperature: 0.0,
        max_new_tokens,
        ..SamplingConfig::default()
    }
}

/// A prompt's ids as the model can answer it: its last `limit` tokens, or
/// a lone EOS for an empty prompt.
pub fn prompt_ids(
    tokenizer: &Tokenizer,
    prompt: &str,
    limit: usize,
) -> Result<Vec<i64>, StageError> {
    let mut ids = tokenizer.encode(prompt)?;
    if ids.is_empty() {
        ids.push(tokenizer.eos_id());
    }
    if ids.len() > limit {
        ids.drain(..ids.len() - limit);
    }
    Ok(ids)
}

/// `k` answers of `model` to each prompt, in batches of `batch_size`
/// sequences. Deterministic for a given `tch::manual_seed`.
pub fn answer_prompts(
    model: &Model,
    prompts: &[String],
    k: usize,
    sampling: &SamplingConfig,
    batch_size: usize,
    device: Device,
) -> Result<Answered, StageError> {
    let tok = &model.tokenizer;
    let limit = (model.net.n_positions() - sampling.max_new_tokens).max(1) as usize;
    let mut out = Answered::default();
    for p in prompts {
        let ids = prompt_ids(tok, p, limit)?;
        out.prompt_ids.extend(std::iter::repeat_n(ids, k));
    }
    for chunk in out.prompt_ids.chunks(batch_size.max(1)) {
        let g = generate(&model.net, chunk, sampling, TokenSpec::of(tok), device)?;
        out.answers.extend(g.answers);
        out.finished.extend(g.finished);
    }
    Ok(out)
}

/// What greedy answers to a prompt file scored under the judge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JudgedScore {
    /// Mean score over the prompts the judge knows.
    pub mean: f64,
    /// Share of those answers scored 1 (exactly right).
    pub exact: f64,
}

impl JudgedScore {
    /// `None` if no prompt was judged.
    pub fn of(scores: &[f64]) -> Option<Self> {
        if scores.is_empty() {
            return None;
        }
        let n = scores.len() as f64;
        Some(Self {
            mean: scores.iter().sum::<f64>() / n,
            exact: scores.iter().filter(|&&s| s == 1.0).count() as f64 / n,
        })
    }
}

/// Training-time eval: greedy answers to the `{prompt}` rows of `path`,
/// written with their judge scores to `samples_out` (JSON lines), and their
/// score where the judge knows the prompts.
pub fn judged_eval(
    model: &Model,
    path: &Path,
    max_new_tokens: i64,
    judge: &JudgeAnswers<'_>,
    device: Device,
    samples_out: &Path,
) -> Result<Option<JudgedScore>, StageError> {
    let table = read_table(path)?;
    let chat = ChatTemplate::for_tokenizer(&model.tokenizer);
    let prompts = prompt_texts(&table, path, &chat)?;
    let answered = answer_prompts(
        model,
        &prompts,
        1,
        &greedy(max_new_tokens),
        ANSWER_BATCH,
        device,
    )?;
    let answers = answered.texts(&model.tokenizer)?;
    let pairs: Vec<(String, String)> = prompts.iter().cloned().zip(answers).collect();
    let judged = judge(&pairs)?;
    let mut lines = String::new();
    let mut scores = Vec::new();
    for ((p, a), &score) in pairs.iter().zip(&judged) {
        scores.extend(score);
        lines.push_str(&json!({"prompt": p, "answer": a, "gold_score": score}).to_string());
        lines.push('\n');
    }
    rlhf_datasets::atomic::write_file(samples_out, lines.as_bytes())?;
    Ok(JudgedScore::of(&scores))
}

/// The judge scores an earlier [`judged_eval`] wrote to `samples`.
pub fn read_judged(samples: &Path) -> Option<JudgedScore> {
    let text = std::fs::read_to_string(samples).ok()?;
    let scores: Vec<f64> = text
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()?
                .get("gold_score")?
                .as_f64()
        })
        .collect();
    JudgedScore::of(&scores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_prompts_keep_their_end_and_empty_ones_become_eos() {
        let tok = Tokenizer::bytes();
        let full = tok.encode("abcdef").unwrap();
        assert_eq!(prompt_ids(&tok, "abcdef", 16).unwrap(), full);
        assert_eq!(prompt_ids(&tok, "abcdef", 2).unwrap(), full[4..].to_vec());
        assert_eq!(prompt_ids(&tok, "", 4).unwrap(), vec![tok.eos_id()]);
    }

    #[test]
    fn judged_scores_are_the_mean_and_the_exact_share() {
        let s = JudgedScore::of(&[1.0, 0.5, 0.0, 1.0]).unwrap();
        assert_eq!((s.mean, s.exact), (0.625, 0.5));
        assert!(JudgedScore::of(&[]).is_none());
    }
}
