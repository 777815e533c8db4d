//! Answers a checker can verify (`rlhf eval --checker math`): the share of
//! greedy answers it accepts, and over `k` sampled answers per prompt
//! (temperature 1) pass@1 (the share accepted), pass@k (prompts with at
//! least one accepted: the unbiased estimator with n = k) and cons@k (the
//! majority final answer accepted, as cons@64 in DeepSeek-R1's tables).

use std::collections::HashMap;

use rlhf_datasets::math_answer::{final_answer_key, is_correct};
use serde::{Deserialize, Serialize};
use tch::Device;

use super::EvalSettings;
use crate::error::StageError;
use crate::model::checkpoint::Model;

/// A policy's verifiable accuracy on held-out prompts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Verifiable {
    pub k: usize,
    /// Greedy answers accepted.
    pub greedy: f64,
    pub pass_at_1: f64,
    pub pass_at_k: f64,
    pub cons_at_k: f64,
}

/// `policy`'s verifiable accuracy on `prompts`, with each prompt's
/// `references`, given its greedy answers.
pub fn verifiable(
    policy: &Model,
    prompts: &[String],
    references: &[String],
    greedy_answers: &[String],
    k: usize,
    settings: &EvalSettings,
    device: Device,
) -> Result<Verifiable, StageError> {
    let answered = super::sampled_answers(policy, prompts, k, settings, device)?;
    let texts = answered.texts(&policy.tokenizer)?;
    Ok(tally(references, greedy_answers, &texts, k))
}

/// The numbers from the answers: `sampled` holds `k` answers per prompt,
/// prompt by prompt.
pub fn tally(references: &[String], greedy: &[String], sampled: &[String], k: usize) -> Verifiable {
    let n = references.len().max(1) as f64;
    let share = |hits: usize, of: f64| hits as f64 / of;
    let greedy_hits = greedy
        .iter()
        .zip(references)
        .filter(|(a, r)| is_correct(a, r))
        .count();
    let (mut any, mut all, mut majority) = (0, 0, 0);
    for (answers, reference) in sampled.chunks(k.max(1)).zip(references) {
        let right = answers.iter().filter(|a| is_correct(a, reference)).count();
        all += right;
        any += usize::from(right > 0);
        majority += usize::from(majority_answer(answers).is_some_and(|a| is_correct(a, reference)));
    }
    Verifiable {
        k,
        greedy: share(greedy_hits, n),
        pass_at_1: share(all, n * k.max(1) as f64),
        pass_at_k: share(any, n),
        cons_at_k: share(majority, n),
    }
}

/// The answer whose final answer most answers give (the first of them;
/// ties go to the answer seen first); `None` when none has one.
fn majority_answer(answers: &[String]) -> Option<&String> {
    let mut votes: HashMap<String, (usize, usize)> = HashMap::new();
    for (i, a) in answers.iter().enumerate() {
        if let Some(key) = final_answer_key(a) {
            votes.entry(key).or_insert((0, i)).0 += 1;
        }
    }
    let (_, first) = votes
        .into_values()
        .max_by_key(|&(count, first)| (count, std::cmp::Reverse(first)))?;
    Some(&answers[first])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_and_majority_by_hand() {
        let refs = ["4".to_string(), "9".to_string()];
        let s = |x: &[&str]| x.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        // Prompt 1: 1 of 3 right, majority wrong (5 twice); prompt 2: 2 of
        // 3 right (9 and 9.0 vote together), majority right.
        let sampled = s(&["A: 4", "A: 5", "5", "A: 9", "it is 9.0", "8"]);
        let v = tally(&refs, &s(&["A: 4", "A: 7"]), &sampled, 3);
        assert_eq!(v.greedy, 0.5);
        assert!((v.pass_at_1 - 3.0 / 6.0).abs() < 1e-12);
        assert_eq!((v.pass_at_k, v.cons_at_k), (1.0, 0.5));
    }
}
