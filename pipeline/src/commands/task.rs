//! `rlhf task generate`: the bundled task's files; `rlhf task
//! arithmetic`: a verifiable task; `rlhf task calculator`: a tool-use
//! task for multi-turn episodes.

use anyhow::Context;
use rlhf_datasets::task::generate::{generate, TaskConfig, TASK_FILES};

use crate::cli::TaskCommand;

/// Refuses to overwrite `files` of `out` unless `force`.
fn check_free(out: &std::path::Path, files: &[&str], force: bool) -> anyhow::Result<()> {
    let there: Vec<String> = files
        .iter()
        .filter(|f| out.join(f).symlink_metadata().is_ok())
        .map(|f| out.join(f).display().to_string())
        .collect();
    anyhow::ensure!(
        force || there.is_empty(),
        "{} already exist; give a new --out folder, or --force to replace them",
        there.join(", ")
    );
    Ok(())
}

pub fn run(cmd: TaskCommand) -> anyhow::Result<()> {
    match cmd {
        TaskCommand::Arithmetic {
            out,
            seed,
            prompts,
            force,
        } => {
            use rlhf_datasets::arithmetic::{generate, ArithmeticConfig, FILES};
            check_free(&out, &FILES, force)?;
            let defaults = ArithmeticConfig::default();
            let cfg = ArithmeticConfig {
                seed: seed.unwrap_or(defaults.seed),
                prompts: prompts.unwrap_or(defaults.prompts),
                ..defaults
            };
            generate(&out, &cfg).with_context(|| format!("writing {}", out.display()))?;
            for f in FILES {
                println!("{}", out.join(f).display());
            }
        }
        TaskCommand::Calculator {
            out,
            seed,
            prompts,
            force,
        } => {
            use rlhf_datasets::calculator::{generate, CalculatorConfig, FILES};
            check_free(&out, &FILES, force)?;
            let defaults = CalculatorConfig::default();
            let cfg = CalculatorConfig {
                seed: seed.unwrap_or(defaults.seed),
                prompts: prompts.unwrap_or(defaults.prompts),
                ..defaults
            };
            generate(&out, &cfg).with_context(|| format!("writing {}", out.display()))?;
            for f in FILES {
                println!("{}", out.join(f).display());
            }
        }
        TaskCommand::Generate {
            out,
            seed,
            sft_examples,
            preference_prompts,
            force,
        } => {
            check_free(&out, &TASK_FILES, force)?;
            let defaults = TaskConfig::default();
            let cfg = TaskConfig {
                seed: seed.unwrap_or(defaults.seed),
                sft_examples: sft_examples.unwrap_or(defaults.sft_examples),
                preference_prompts: preference_prompts.unwrap_or(defaults.preference_prompts),
                ..defaults
            };
            let summary =
                generate(&out, &cfg).with_context(|| format!("writing {}", out.display()))?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
        }
    }
    Ok(())
}
