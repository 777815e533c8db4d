//! `rlhf samples RUN`: prompts with every policy's answer side by side.
//!
//! Reads `<run>/report/answers.jsonl` when `rlhf eval` wrote it; otherwise
//! answers the prompts itself (greedy, no KL), which takes seconds.

use std::path::Path;

use rlhf_stages::eval::EvalSettings;
use rlhf_stages::model::device::parse_device;

use crate::cli::SamplesArgs;
use crate::report::{evaluate_run, EvalOptions, PromptAnswers, ANSWERS_FILE, REPORT_DIR};

fn saved_answers(run: &Path) -> Option<Vec<PromptAnswers>> {
    let text = std::fs::read_to_string(run.join(REPORT_DIR).join(ANSWERS_FILE)).ok()?;
    text.lines().map(|l| serde_json::from_str(l).ok()).collect()
}

/// Whether the policies' answers differ in gold score (or, without a
/// judge, in text).
fn differ(p: &PromptAnswers) -> bool {
    let first = &p.answers[0];
    p.answers.iter().any(|a| match (a.gold, first.gold) {
        (Some(x), Some(y)) => (x - y).abs() > 1e-9,
        _ => a.answer != first.answer,
    })
}

fn score(x: Option<f64>) -> String {
    x.map_or_else(|| "    -".into(), |v| format!("{v:5.2}"))
}

pub fn run(args: SamplesArgs) -> anyhow::Result<()> {
    let answers = match (args.prompts.is_none(), saved_answers(&args.run)) {
        (true, Some(a)) => a,
        _ => {
            let opts = EvalOptions {
                prompts: args.prompts.clone(),
                preferences: None,
                max_prompts: None,
                settings: EvalSettings {
                    max_new_tokens: args.max_new_tokens,
                    ..EvalSettings::default()
                },
                skip_kl: true,
                checker: None,
                reward_program: None,
                with_runs: vec![],
                judge: None,
            };
            evaluate_run(&args.run, &opts, parse_device(&args.device.device)?)?.answers
        }
    };
    let shown = answers
        .iter()
        .filter(|p| !p.answers.is_empty() && (!args.differing || differ(p)))
        .take(args.n);
    let width = answers.first().map_or(0, |p| {
        p.answers.iter().map(|a| a.policy.len()).max().unwrap_or(0)
    });
    for p in shown {
        if args.json {
            println!("{}", serde_json::to_string(p)?);
            continue;
        }
        println!("{}", p.prompt.trim_end());
        for a in &p.answers {
            println!(
                "  {:width$}  gold {}  rm {}  {:?}",
                a.policy,
                score(a.gold),
                score(a.reward),
                a.answer,
            );
        }
        println!();
    }
    Ok(())
}
