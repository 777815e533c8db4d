//! `rlhf task generate`: the bundled task's files.

use anyhow::Context;
use rlhf_datasets::task::generate::{generate, TaskConfig};

use crate::cli::TaskCommand;

pub fn run(cmd: TaskCommand) -> anyhow::Result<()> {
    match cmd {
        TaskCommand::Generate { out, seed } => {
            let mut cfg = TaskConfig::default();
            if let Some(s) = seed {
                cfg.seed = s;
            }
            let summary =
                generate(&out, &cfg).with_context(|| format!("writing {}", out.display()))?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
        }
    }
    Ok(())
}
