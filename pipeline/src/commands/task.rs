//! `rlhf task generate`: the bundled task's files.

use anyhow::Context;
use rlhf_datasets::task::generate::{generate, TaskConfig};

use crate::cli::TaskCommand;

pub fn run(cmd: TaskCommand) -> anyhow::Result<()> {
    match cmd {
        TaskCommand::Generate {
            out,
            seed,
            sft_examples,
            preference_prompts,
        } => {
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
