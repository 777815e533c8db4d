//! `rlhf task generate`: the bundled task's files.

use anyhow::Context;
use rlhf_datasets::task::generate::{generate, TaskConfig, TASK_FILES};

use crate::cli::TaskCommand;

pub fn run(cmd: TaskCommand) -> anyhow::Result<()> {
    match cmd {
        TaskCommand::Generate {
            out,
            seed,
            sft_examples,
            preference_prompts,
            force,
        } => {
            let there: Vec<String> = TASK_FILES
                .iter()
                .filter(|f| out.join(f).symlink_metadata().is_ok())
                .map(|f| out.join(f).display().to_string())
                .collect();
            anyhow::ensure!(
                force || there.is_empty(),
                "{} already exist; give a new --out folder, or --force to replace them",
                there.join(", ")
            );
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
