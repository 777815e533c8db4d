//! A verifiable task (`rlhf task arithmetic`): sums, differences and
//! products of small numbers, each prompt with its exact `answer`, so that
//! RL can learn from a checker alone (`reward: {checker: math}`). Its
//! demonstrations are noisy on purpose (a share of them off by one or
//! two), so a policy fine-tuned on them answers right only part of the
//! time, and what a checker rewards has room to rise.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::atomic::{self, AtomicWriteError};

/// What to generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArithmeticConfig {
    pub seed: u64,
    /// Demonstrations `{prompt, completion}`.
    pub sft_examples: usize,
    /// How often a demonstration is right (else off by 1 or 2).
    pub demonstration_accuracy: f64,
    /// Prompts `{prompt, answer}` for RL.
    pub prompts: usize,
    /// Held-out prompts `{prompt, answer}`.
    pub eval_prompts: usize,
    /// Operands are drawn from `0..=max_operand`.
    pub max_operand: i64,
}

impl Default for ArithmeticConfig {
    fn default() -> Self {
        Self {
            seed: 7,
            sft_examples: 3000,
            demonstration_accuracy: 0.5,
            prompts: 2000,
            eval_prompts: 200,
            max_operand: 9,
        }
    }
}

/// One problem: its prompt and exact answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub prompt: String,
    pub answer: i64,
}

impl Problem {
    fn random(rng: &mut impl Rng, max: i64) -> Self {
        let (a, b) = (rng.random_range(0..=max), rng.random_range(0..=max));
        let (op, answer) = match rng.random_range(0..3) {
            0 => ('+', a + b),
            1 => ('-', a - b),
            _ => ('*', a * b),
        };
        Self {
            prompt: format!("Q: {a} {op} {b} =\n"),
            answer,
        }
    }
}

/// The files written and their rows.
pub const FILES: [&str; 3] = ["sft.jsonl", "prompts.jsonl", "prompts_eval.jsonl"];

/// Writes `sft.jsonl` (noisy demonstrations, the answer after `A: `),
/// `prompts.jsonl` and `prompts_eval.jsonl` (`{prompt, answer}`) to `out`.
pub fn generate(out: &Path, cfg: &ArithmeticConfig) -> Result<(), AtomicWriteError> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut lines =
        |n, row: &mut dyn FnMut(&mut ChaCha8Rng) -> serde_json::Value| jsonl_rows(&mut rng, n, row);
    let sft = lines(cfg.sft_examples, &mut |rng| {
        let p = Problem::random(rng, cfg.max_operand);
        let off = match rng.random_bool(cfg.demonstration_accuracy) {
            true => 0,
            false => [-2, -1, 1, 2][rng.random_range(0..4)],
        };
        json!({"prompt": p.prompt, "completion": format!("A: {}", p.answer + off)})
    });
    let mut prompts = |n| {
        lines(n, &mut |rng| {
            let p = Problem::random(rng, cfg.max_operand);
            json!({"prompt": p.prompt, "answer": p.answer.to_string()})
        })
    };
    let (train, eval) = (prompts(cfg.prompts), prompts(cfg.eval_prompts));
    write_files(out, &FILES, [sft, train, eval])
}

/// `n` JSON lines, each `row` of the generator.
pub(crate) fn jsonl_rows(
    rng: &mut ChaCha8Rng,
    n: usize,
    row: &mut dyn FnMut(&mut ChaCha8Rng) -> serde_json::Value,
) -> String {
    let mut text = String::new();
    for _ in 0..n {
        text.push_str(&row(rng).to_string());
        text.push('\n');
    }
    text
}

/// Each of `files` in `out` with its text, atomically.
pub(crate) fn write_files(
    out: &Path,
    files: &[&str],
    texts: [String; 3],
) -> Result<(), AtomicWriteError> {
    for (name, text) in files.iter().zip(texts) {
        atomic::write_file(&out.join(name), text.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math_answer::is_correct;

    #[test]
    fn prompts_carry_exact_answers_and_demonstrations_are_noisy() {
        let d = tempfile::tempdir().unwrap();
        let cfg = ArithmeticConfig {
            sft_examples: 400,
            prompts: 50,
            eval_prompts: 10,
            ..ArithmeticConfig::default()
        };
        generate(d.path(), &cfg).unwrap();
        let read = |name: &str| -> Vec<serde_json::Value> {
            std::fs::read_to_string(d.path().join(name))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };
        let prompts = read("prompts.jsonl");
        assert_eq!((prompts.len(), read("prompts_eval.jsonl").len()), (50, 10));
        for p in &prompts {
            let text = p["prompt"].as_str().unwrap();
            let parts: Vec<&str> = text.trim_start_matches("Q: ").split_whitespace().collect();
            let (a, b): (i64, i64) = (parts[0].parse().unwrap(), parts[2].parse().unwrap());
            let want = match parts[1] {
                "+" => a + b,
                "-" => a - b,
                _ => a * b,
            };
            assert_eq!(p["answer"], want.to_string(), "{text}");
        }
        let sft = read("sft.jsonl");
        let right = sft
            .iter()
            .filter(|r| {
                let p = r["prompt"].as_str().unwrap();
                let parts: Vec<i64> = p
                    .trim_start_matches("Q: ")
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                let want = match p.split_whitespace().nth(2).unwrap() {
                    "+" => parts[0] + parts[1],
                    "-" => parts[0] - parts[1],
                    _ => parts[0] * parts[1],
                };
                is_correct(r["completion"].as_str().unwrap(), &want.to_string())
            })
            .count();
        let share = right as f64 / sft.len() as f64;
        assert!((0.4..0.6).contains(&share), "{share}");
    }
}
