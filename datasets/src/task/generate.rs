//! Writes the bundled task's files (`rlhf task generate`): demonstrations,
//! K-wise rankings, and prompt sets, all from one seed.

use std::collections::HashSet;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::labeller::{candidates, demonstrate, rank};
use super::Instruction;
use crate::atomic::{self, AtomicWriteError};

/// What to generate. The defaults made the files under `datasets/task/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskConfig {
    pub seed: u64,
    /// Demonstrations `{prompt, completion}`.
    pub sft_examples: usize,
    /// How often a demonstration of an easy item is correct.
    pub labeller_accuracy: f64,
    /// How often a demonstration of a hard item is correct (else the
    /// labeller's habitual mistake).
    pub labeller_hard_accuracy: f64,
    /// Prompts ranked by the noisy labeller, K answers each.
    pub preference_prompts: usize,
    /// Held-out prompts ranked by the gold judge without noise.
    pub gold_preference_prompts: usize,
    pub k_min: usize,
    pub k_max: usize,
    /// Sd of the labeller's noise on the gold score when ranking.
    pub ranking_noise: f64,
    /// Prompts for PPO rollouts.
    pub ppo_prompts: usize,
    /// Held-out prompts for evaluation.
    pub eval_prompts: usize,
}

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            seed: 2026,
            sft_examples: 6000,
            labeller_accuracy: 0.8,
            labeller_hard_accuracy: 0.35,
            preference_prompts: 24000,
            gold_preference_prompts: 200,
            k_min: 4,
            k_max: 9,
            ranking_noise: 0.22,
            ppo_prompts: 2000,
            eval_prompts: 500,
        }
    }
}

/// What was written, with the measured labeller quality.
#[derive(Debug, Clone, Serialize)]
pub struct TaskSummary {
    pub files: Vec<String>,
    /// Fraction of demonstrations that are correct.
    pub demonstration_accuracy: f64,
    /// Fraction of answer pairs (with different gold scores) that the noisy
    /// labeller orders as the gold judge does.
    pub ranking_agreement_with_gold: f64,
    pub comparison_pairs: usize,
}

pub const SFT_FILE: &str = "sft.jsonl";
pub const PREFERENCES_FILE: &str = "preferences.jsonl";
pub const GOLD_PREFERENCES_FILE: &str = "preferences_gold.jsonl";
pub const PPO_PROMPTS_FILE: &str = "prompts.jsonl";
pub const EVAL_PROMPTS_FILE: &str = "prompts_eval.jsonl";
/// Every file [`generate`] writes.
pub const TASK_FILES: [&str; 5] = [
    SFT_FILE,
    PREFERENCES_FILE,
    GOLD_PREFERENCES_FILE,
    PPO_PROMPTS_FILE,
    EVAL_PROMPTS_FILE,
];

/// Draws instructions whose prompts are new (never used by another file).
struct Fresh<'a> {
    rng: &'a mut ChaCha8Rng,
    used: HashSet<String>,
}

impl Fresh<'_> {
    fn next(&mut self, unique: bool) -> Instruction {
        loop {
            let i = Instruction::random(self.rng);
            let p = i.prompt();
            if !self.used.contains(&p) {
                if unique {
                    self.used.insert(p);
                }
                return i;
            }
        }
    }
}

pub fn generate(out: &Path, cfg: &TaskConfig) -> Result<TaskSummary, AtomicWriteError> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut eval_rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5eed);
    // Held-out prompts first, so that no other file ever contains them.
    let mut fresh = Fresh {
        rng: &mut eval_rng,
        used: HashSet::new(),
    };
    let eval: Vec<Instruction> = (0..cfg.eval_prompts).map(|_| fresh.next(true)).collect();
    let gold: Vec<Instruction> = (0..cfg.gold_preference_prompts)
        .map(|_| fresh.next(true))
        .collect();
    let held_out = fresh.used;
    let mut fresh = Fresh {
        rng: &mut rng,
        used: held_out,
    };
    let sft: Vec<Instruction> = (0..cfg.sft_examples).map(|_| fresh.next(false)).collect();
    let prefs: Vec<Instruction> = (0..cfg.preference_prompts)
        .map(|_| fresh.next(false))
        .collect();
    let ppo: Vec<Instruction> = (0..cfg.ppo_prompts).map(|_| fresh.next(false)).collect();

    let mut lines = Vec::new();
    let mut correct = 0usize;
    for i in &sft {
        let completion = demonstrate(
            i,
            cfg.labeller_accuracy,
            cfg.labeller_hard_accuracy,
            &mut rng,
        );
        correct += usize::from(completion == i.answer());
        lines.push(json!({"prompt": i.prompt(), "completion": completion, "family": i.family()}));
    }
    write_jsonl(&out.join(SFT_FILE), &lines)?;

    let (pref_lines, agree_noisy, pairs_noisy) =
        ranked_lines(&prefs, cfg, cfg.ranking_noise, &mut rng);
    let (gold_lines, _, _) = ranked_lines(&gold, cfg, 0.0, &mut rng);
    write_jsonl(&out.join(PREFERENCES_FILE), &pref_lines)?;
    write_jsonl(&out.join(GOLD_PREFERENCES_FILE), &gold_lines)?;
    let prompt_lines = |set: &[Instruction]| {
        set.iter()
            .map(|i| json!({"prompt": i.prompt(), "family": i.family()}))
            .collect::<Vec<_>>()
    };
    write_jsonl(&out.join(PPO_PROMPTS_FILE), &prompt_lines(&ppo))?;
    write_jsonl(&out.join(EVAL_PROMPTS_FILE), &prompt_lines(&eval))?;
    Ok(TaskSummary {
        files: [
            SFT_FILE,
            PREFERENCES_FILE,
            GOLD_PREFERENCES_FILE,
            PPO_PROMPTS_FILE,
            EVAL_PROMPTS_FILE,
        ]
        .map(String::from)
        .to_vec(),
        demonstration_accuracy: correct as f64 / cfg.sft_examples.max(1) as f64,
        ranking_agreement_with_gold: agree_noisy as f64 / pairs_noisy.max(1) as f64,
        comparison_pairs: pairs_noisy,
    })
}

/// K-wise ranked lines for `set`, and (agreeing, total) pairs against gold.
fn ranked_lines(
    set: &[Instruction],
    cfg: &TaskConfig,
    noise: f64,
    rng: &mut ChaCha8Rng,
) -> (Vec<serde_json::Value>, usize, usize) {
    let (mut agree, mut pairs) = (0usize, 0usize);
    let lines = set
        .iter()
        .map(|i| {
            let k = rng.random_range(cfg.k_min..=cfg.k_max);
            let prompt = i.prompt();
            let responses = candidates(i, k, 0.7, rng);
            let ranking = rank(&prompt, &responses, noise, rng);
            let scores: Vec<f64> = responses.iter().map(|r| super::judge(&prompt, r).unwrap_or(0.0)).collect();
            for a in 0..responses.len() {
                for b in a + 1..responses.len() {
                    if scores[a] != scores[b] {
                        pairs += 1;
                        agree += usize::from((ranking[a] < ranking[b]) == (scores[a] > scores[b]));
                    }
                }
            }
            json!({"prompt": prompt, "responses": responses, "ranking": ranking, "family": i.family()})
        })
        .collect();
    (lines, agree, pairs)
}

fn write_jsonl(path: &Path, lines: &[serde_json::Value]) -> Result<(), AtomicWriteError> {
    let mut text = String::new();
    for l in lines {
        text.push_str(&l.to_string());
        text.push('\n');
    }
    atomic::write_file(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_deterministic_disjoint_and_labelled_as_configured() {
        let cfg = TaskConfig {
            sft_examples: 300,
            preference_prompts: 100,
            gold_preference_prompts: 30,
            ppo_prompts: 50,
            eval_prompts: 40,
            ..TaskConfig::default()
        };
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let summary = generate(a.path(), &cfg).unwrap();
        generate(b.path(), &cfg).unwrap();
        for f in &summary.files {
            assert_eq!(
                std::fs::read(a.path().join(f)).unwrap(),
                std::fs::read(b.path().join(f)).unwrap(),
                "{f}"
            );
        }
        assert!(
            (0.5..0.7).contains(&summary.demonstration_accuracy),
            "{summary:?}"
        );
        assert!(
            (0.75..0.97).contains(&summary.ranking_agreement_with_gold),
            "{summary:?}"
        );
        let prompts = |f: &str| -> HashSet<String> {
            std::fs::read_to_string(a.path().join(f))
                .unwrap()
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["prompt"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                })
                .collect()
        };
        let eval = prompts(EVAL_PROMPTS_FILE);
        for f in [
            SFT_FILE,
            PREFERENCES_FILE,
            PPO_PROMPTS_FILE,
            GOLD_PREFERENCES_FILE,
        ] {
            assert!(
                prompts(f).is_disjoint(&eval),
                "{f} shares prompts with the eval set"
            );
        }
    }
}
