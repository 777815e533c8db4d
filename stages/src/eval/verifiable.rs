//! Answers a checker can verify (`rlhf eval --checker math|code`): the
//! share of greedy answers it accepts, and over `k` sampled answers per
//! prompt (temperature 1) pass@1 (the share accepted), pass@k (prompts
//! with at least one accepted: the unbiased estimator with n = k) and
//! cons@k (the majority answer accepted, as cons@64 in DeepSeek-R1's
//! tables: answers vote by final answer for math, by their code with
//! blank space collapsed for code).

use std::collections::HashMap;

use rlhf_datasets::math_answer::{final_answer_key, is_correct};
use serde::{Deserialize, Serialize};

use crate::programs::code_check::{solution_code, CodeChecker, Verdict};
use tch::Device;

use super::EvalSettings;
use crate::error::StageError;
use crate::model::checkpoint::Model;

/// A policy's verifiable accuracy on held-out prompts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Verifiable {
    /// The checker that judged (reports before it was recorded: math).
    #[serde(default)]
    pub checker: CheckerKind,
    pub k: usize,
    /// Greedy answers accepted.
    pub greedy: f64,
    pub pass_at_1: f64,
    pub pass_at_k: f64,
    pub cons_at_k: f64,
}

/// The built-in checkers, by name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckerKind {
    #[default]
    Math,
    Code,
}

impl CheckerKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Math => "math",
            Self::Code => "code",
        }
    }
}

/// What decides whether an answer is right.
#[derive(Debug, Clone)]
pub enum AnswerChecker {
    /// The final answer equals the reference as a number.
    Math,
    /// The answer's code passes the reference (Python tests), confined.
    Code(CodeChecker),
}

impl AnswerChecker {
    pub fn kind(&self) -> CheckerKind {
        match self {
            Self::Math => CheckerKind::Math,
            Self::Code(_) => CheckerKind::Code,
        }
    }

    /// Whether `answer` is right by `reference`.
    pub fn accepts(&self, answer: &str, reference: &str) -> Result<bool, StageError> {
        match self {
            Self::Math => Ok(is_correct(answer, reference)),
            Self::Code(c) => c
                .check(answer, reference)
                .map(|v| v == Verdict::Passed)
                .map_err(|e| StageError::setting("--checker", e)),
        }
    }

    /// What answers vote with for cons@k (none: the answer abstains).
    fn vote(&self, answer: &str) -> Option<String> {
        match self {
            Self::Math => final_answer_key(answer),
            Self::Code(_) => {
                let code = solution_code(answer).split_whitespace().collect::<Vec<_>>();
                (!code.is_empty()).then(|| code.join(" "))
            }
        }
    }

    /// Whether each `(answer, reference)` is right, checked on up to
    /// four threads (code runs are processes).
    fn accepts_all(&self, pairs: &[(&str, &str)]) -> Result<Vec<bool>, StageError> {
        let threads = match self {
            Self::Math => 1,
            Self::Code(_) => std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
        };
        let share = pairs.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = pairs
                .chunks(share)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|(a, r)| self.accepts(a, r))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("a checker thread panicked"))
                .collect()
        })
    }
}

/// `policy`'s verifiable accuracy on `prompts`, with each prompt's
/// `references`, given its greedy answers.
#[allow(clippy::too_many_arguments)]
pub fn verifiable(
    checker: &AnswerChecker,
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
    tally(checker, references, greedy_answers, &texts, k)
}

/// The numbers from the answers: `sampled` holds `k` answers per prompt,
/// prompt by prompt.
pub fn tally(
    checker: &AnswerChecker,
    references: &[String],
    greedy: &[String],
    sampled: &[String],
    k: usize,
) -> Result<Verifiable, StageError> {
    let n = references.len().max(1) as f64;
    let k = k.max(1);
    let share = |hits: usize, of: f64| hits as f64 / of;
    let greedy_pairs: Vec<(&str, &str)> = greedy
        .iter()
        .zip(references)
        .map(|(a, r)| (a.as_str(), r.as_str()))
        .collect();
    let greedy_hits = checker
        .accepts_all(&greedy_pairs)?
        .iter()
        .filter(|&&r| r)
        .count();
    let sampled_pairs: Vec<(&str, &str)> = sampled
        .chunks(k)
        .zip(references)
        .flat_map(|(answers, r)| answers.iter().map(move |a| (a.as_str(), r.as_str())))
        .collect();
    let right = checker.accepts_all(&sampled_pairs)?;
    let (mut any, mut all, mut majority) = (0, 0, 0);
    for (p, answers) in sampled.chunks(k).enumerate() {
        let right = &right[p * k..(p * k + answers.len()).min(right.len())];
        all += right.iter().filter(|&&r| r).count();
        any += usize::from(right.iter().any(|&r| r));
        majority += usize::from(majority_answer(checker, answers).is_some_and(|i| right[i]));
    }
    Ok(Verifiable {
        checker: checker.kind(),
        k,
        greedy: share(greedy_hits, n),
        pass_at_1: share(all, n * k.max(1) as f64),
        pass_at_k: share(any, n),
        cons_at_k: share(majority, n),
    })
}

/// The index of the answer whose vote most answers share (the first of
/// them; ties go to the vote seen first); `None` when none votes.
fn majority_answer(checker: &AnswerChecker, answers: &[String]) -> Option<usize> {
    let mut votes: HashMap<String, (usize, usize)> = HashMap::new();
    for (i, a) in answers.iter().enumerate() {
        if let Some(key) = checker.vote(a) {
            votes.entry(key).or_insert((0, i)).0 += 1;
        }
    }
    let (_, first) = votes
        .into_values()
        .max_by_key(|&(count, first)| (count, std::cmp::Reverse(first)))?;
    Some(first)
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
        let v = tally(
            &AnswerChecker::Math,
            &refs,
            &s(&["A: 4", "A: 7"]),
            &sampled,
            3,
        )
        .unwrap();
        assert_eq!(v.greedy, 0.5);
        assert!((v.pass_at_1 - 3.0 / 6.0).abs() < 1e-12);
        assert_eq!((v.pass_at_k, v.cons_at_k), (1.0, 0.5));
    }

    /// The code checker: answers pass by running their tests; code votes
    /// with its blank space collapsed.
    #[test]
    fn pass_and_majority_with_the_code_checker_by_hand() {
        let python = std::env::var("RLHF_PYTHON").unwrap_or_else(|_| "python3".into());
        let limits = crate::programs::sandbox::Limits {
            wall_seconds: 10.0,
            memory_mb: 512,
            file_mb: 1,
        };
        let code = AnswerChecker::Code(CodeChecker::new(&python, limits).unwrap());
        let refs = ["assert f(2) == 4".to_string()];
        let s = |x: &[&str]| x.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        // Two answers write `x * 2` (spaced differently), one `x + 2`
        // (right for 2 by chance), one `x * 3`: 3 of 4 pass; the majority
        // (`x * 2`) passes.
        let sampled = s(&[
            "def f(x): return x * 2",
            "def f(x): return x + 2",
            "```python\ndef f(x):   return x  *  2\n```",
            "def f(x): return x * 3",
        ]);
        let v = tally(&code, &refs, &s(&["def f(x): return 0"]), &sampled, 4).unwrap();
        assert_eq!(v.checker, CheckerKind::Code);
        assert_eq!(
            (v.greedy, v.pass_at_1, v.pass_at_k, v.cons_at_k),
            (0.0, 0.75, 1.0, 1.0)
        );
        let wrong_majority = s(&[
            "def f(x): return 3",
            "def f(x):  return 3",
            "def f(x): return 4",
        ]);
        let v = tally(&code, &refs, &s(&["x"]), &wrong_majority, 3).unwrap();
        assert_eq!(
            (v.pass_at_1, v.pass_at_k, v.cons_at_k),
            (1.0 / 3.0, 1.0, 0.0)
        );
    }
}
