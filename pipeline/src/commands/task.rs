//! `rlhf task generate`: the bundled task's files; `rlhf task
//! arithmetic`: a verifiable task; `rlhf task calculator`: a tool-use
//! task for multi-turn episodes.

use anyhow::Context;
use rlhf_datasets::task::generate::{generate, TaskConfig, TASK_FILES};

use crate::cli::{TaskCommand, TaskFilesArgs};

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

/// Writes a generated task's `files` into `args.out` with `generate`,
/// and prints their paths.
fn write_task(
    args: &TaskFilesArgs,
    files: &[&str],
    generate: impl FnOnce(&std::path::Path) -> Result<(), rlhf_datasets::atomic::AtomicWriteError>,
) -> anyhow::Result<()> {
    check_free(&args.out, files, args.force)?;
    generate(&args.out).with_context(|| format!("writing {}", args.out.display()))?;
    for f in files {
        println!("{}", args.out.join(f).display());
    }
    Ok(())
}

pub fn run(cmd: TaskCommand) -> anyhow::Result<()> {
    match cmd {
        TaskCommand::Arithmetic(args) => {
            use rlhf_datasets::arithmetic::{generate, ArithmeticConfig, FILES};
            let d = ArithmeticConfig::default();
            write_task(&args, &FILES, |out| {
                let seed = args.seed.unwrap_or(d.seed);
                let prompts = args.prompts.unwrap_or(d.prompts);
                generate(out, &ArithmeticConfig { seed, prompts, ..d })
            })?;
        }
        TaskCommand::Calculator(args) => {
            use rlhf_datasets::calculator::{generate, CalculatorConfig, FILES};
            let d = CalculatorConfig::default();
            write_task(&args, &FILES, |out| {
                let seed = args.seed.unwrap_or(d.seed);
                let prompts = args.prompts.unwrap_or(d.prompts);
                generate(out, &CalculatorConfig { seed, prompts, ..d })
            })?;
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
