//! `rlhf stage`: one stage of an experiment, in this process. The runner
//! spawns this as a child per stage; people use it to run one stage alone.

use anyhow::Context;
use rlhf_datasets::Tokenizer;
use rlhf_stages::device::{device_name, parse_device};
use rlhf_stages::ppo::{self, PpoJob};
use rlhf_stages::reward::{self, RewardJob};
use rlhf_stages::sft::{self, ScratchModel, SftJob};

use crate::cli::StageArgs;
use crate::config::{Experiment, StageFile};

pub fn run(args: StageArgs) -> anyhow::Result<()> {
    let exp = Experiment::load(&args.config, &args.overrides)?;
    let stage = exp.stage(&args.name)?;
    let device = parse_device(&exp.spec.device)?;
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| exp.stage_dir(&args.name));
    tracing::info!(
        "stage {} ({}) of {} on {} -> {}",
        args.name,
        stage.kind(),
        exp.file.display(),
        device_name(device),
        out_dir.display()
    );
    let tokenizer = match &exp.spec.tokenizer {
        Some(p) if p.is_dir() => Tokenizer::from_model_dir(p)?,
        Some(p) => Tokenizer::from_file(p)?,
        None => Tokenizer::bytes(),
    };
    let scratch = ScratchModel {
        config: exp.spec.model.clone(),
        tokenizer,
    };
    let failed = || format!("stage {} failed", args.name);
    let summary = match stage {
        StageFile::Sft(config) => {
            let job = SftJob {
                config: config.clone(),
                scratch,
                out_dir,
                device,
                stop_after_step: args.stop_after_step,
            };
            serde_json::to_value(sft::run(&job).with_context(failed)?)?
        }
        StageFile::Reward(config) => {
            let job = RewardJob {
                config: config.clone(),
                scratch,
                out_dir,
                device,
                stop_after_step: args.stop_after_step,
            };
            serde_json::to_value(reward::run(&job).with_context(failed)?)?
        }
        StageFile::Ppo(config) => {
            let job = PpoJob {
                config: config.clone(),
                out_dir,
                device,
                reward_rule: None,
                stop_after_iteration: args.stop_after_step,
            };
            serde_json::to_value(ppo::run(&job).with_context(failed)?)?
        }
    };
    println!("{summary}");
    Ok(())
}
