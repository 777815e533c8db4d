//! A tool-use task (`rlhf task calculator`): products of two-digit
//! numbers, which a small model cannot work out but can look up. A policy
//! turn `CALC a*b` (then EOS) asks the calculator environment, which
//! answers `= r` on a line of its own; a turn `A: r` is the final answer,
//! scored 1 when right. The demonstrations call the calculator only a
//! share of the time (else they guess), so a policy fine-tuned on them
//! calls it sometimes, and RL on the environment's reward has room to
//! teach it to call it always.
//!
//! [`reply`] is the environment (the same rules as the shipped
//! `configs/calculator_env.py`).

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::arithmetic::{jsonl_rows, write_files};
use crate::atomic::AtomicWriteError;
use crate::tokenizer::EOS_TOKEN;

/// What to generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CalculatorConfig {
    pub seed: u64,
    /// Demonstrations `{prompt, completion}`.
    pub sft_examples: usize,
    /// How often a demonstration calls the calculator (else it guesses).
    pub tool_share: f64,
    /// Prompts `{prompt, answer}` for RL.
    pub prompts: usize,
    /// Held-out prompts `{prompt, answer}`.
    pub eval_prompts: usize,
}

impl Default for CalculatorConfig {
    fn default() -> Self {
        Self {
            seed: 7,
            sft_examples: 3000,
            tool_share: 0.3,
            prompts: 2000,
            eval_prompts: 200,
        }
    }
}

/// The files written.
pub const FILES: [&str; 3] = ["sft.jsonl", "prompts.jsonl", "prompts_eval.jsonl"];

/// What a policy turn starts with to call the calculator.
pub const CALL: &str = "CALC ";

fn problem(rng: &mut impl Rng) -> (i64, i64) {
    (rng.random_range(10..=99), rng.random_range(10..=99))
}

fn prompt(a: i64, b: i64) -> String {
    format!("Q: {a} * {b} =\n")
}

/// The calculator's observation for a result.
pub fn observation(result: &str) -> String {
    format!("= {result}\n")
}

/// Writes `sft.jsonl` (demonstrations: `CALC a*b`, EOS, the calculator's
/// line, `A: r`; or a guess `A: g`), `prompts.jsonl` and
/// `prompts_eval.jsonl` (`{prompt, answer}`) to `out`.
pub fn generate(out: &Path, cfg: &CalculatorConfig) -> Result<(), AtomicWriteError> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut lines =
        |n, row: &mut dyn FnMut(&mut ChaCha8Rng) -> serde_json::Value| jsonl_rows(&mut rng, n, row);
    let sft = lines(cfg.sft_examples, &mut |rng| {
        let (a, b) = problem(rng);
        let completion = match rng.random_bool(cfg.tool_share) {
            true => format!(
                "{CALL}{a}*{b}{EOS_TOKEN}{}A: {}",
                observation(&(a * b).to_string()),
                a * b
            ),
            false => format!("A: {}", rng.random_range(100..=9801)),
        };
        json!({"prompt": prompt(a, b), "completion": completion})
    });
    let mut prompts = |n| {
        lines(n, &mut |rng| {
            let (a, b) = problem(rng);
            json!({"prompt": prompt(a, b), "answer": (a * b).to_string()})
        })
    };
    let (train, eval) = (prompts(cfg.prompts), prompts(cfg.eval_prompts));
    write_files(out, &FILES, [sft, train, eval])
}

/// The calculator environment's reply to a policy turn `response` (with
/// the prompt's reference `answer`): a call `CALC a*b` (or `+`, `-`)
/// gets the result (`= ?` when it does not parse), reward 0; anything
/// else is the final answer, done, 1 when it is right.
pub fn reply(response: &str, answer: Option<&str>) -> serde_json::Value {
    let text = response.trim();
    if let Some(expr) = text.strip_prefix(CALL.trim_end()) {
        let result = evaluate(expr.trim()).map_or("?".to_owned(), |r| r.to_string());
        return json!({"observation": observation(&result), "done": false, "reward": 0.0});
    }
    let right = answer.is_some_and(|a| crate::math_answer::is_correct(text, a));
    json!({"observation": null, "done": true, "reward": f64::from(u8::from(right))})
}

/// `a*b`, `a+b` or `a-b` of integers.
fn evaluate(expr: &str) -> Option<i64> {
    let at = expr.find(['*', '+', '-'])?;
    let (a, b) = (expr[..at].trim(), expr[at + 1..].trim());
    let (a, b): (i64, i64) = (a.parse().ok()?, b.parse().ok()?);
    match &expr[at..=at] {
        "*" => a.checked_mul(b),
        "+" => a.checked_add(b),
        _ => a.checked_sub(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_calculator_answers_calls_and_scores_final_answers() {
        let r = reply("CALC 37*58", Some("2146"));
        assert_eq!(r["observation"], "= 2146\n");
        assert_eq!(
            (r["done"].as_bool(), r["reward"].as_f64()),
            (Some(false), Some(0.0))
        );
        assert_eq!(reply("CALC 3*x", None)["observation"], "= ?\n");
        assert_eq!(reply("A: 2146", Some("2146"))["reward"], 1.0);
        let wrong = reply("A: 2147", Some("2146"));
        assert_eq!(
            (wrong["done"].as_bool(), wrong["reward"].as_f64()),
            (Some(true), Some(0.0))
        );
    }

    #[test]
    fn demonstrations_call_the_tool_a_share_of_the_time_with_eos_between_turns() {
        let d = tempfile::tempdir().unwrap();
        let cfg = CalculatorConfig {
            sft_examples: 400,
            prompts: 20,
            eval_prompts: 5,
            ..CalculatorConfig::default()
        };
        generate(d.path(), &cfg).unwrap();
        let sft = std::fs::read_to_string(d.path().join("sft.jsonl")).unwrap();
        let rows: Vec<serde_json::Value> = sft
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let calls = rows
            .iter()
            .filter(|r| r["completion"].as_str().unwrap().starts_with(CALL))
            .count();
        assert!((80..=160).contains(&calls), "{calls} of 400 call it");
        let tok = crate::tokenizer::Tokenizer::bytes();
        let call = rows
            .iter()
            .find(|r| r["completion"].as_str().unwrap().starts_with(CALL))
            .unwrap();
        let ids = tok.encode(call["completion"].as_str().unwrap()).unwrap();
        assert_eq!(
            ids.iter().filter(|&&i| i == tok.eos_id()).count(),
            1,
            "one turn ends inside"
        );
    }
}
