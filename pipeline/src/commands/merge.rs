use anyhow::Context;
use rlhf_stages::model::lora::{ADAPTER_CONFIG_FILE, ADAPTER_DIR};
use rlhf_stages::{HeadChoice, Model};

use crate::cli::MergeArgs;

/// `rlhf merge`: base + adapters -> one plain folder (`W + scale * B @ A`).
pub fn run(args: MergeArgs) -> anyhow::Result<()> {
    super::init::refuse_files(&args.out, args.force)?;
    let nested = args.adapter.join(ADAPTER_DIR);
    let adapter = match nested.join(ADAPTER_CONFIG_FILE).exists() {
        true => nested,
        false => args.adapter.clone(),
    };
    if !adapter.join(ADAPTER_CONFIG_FILE).exists() {
        anyhow::bail!(
            "{}: no {ADAPTER_CONFIG_FILE} here or in its {ADAPTER_DIR}/; expected a LoRA stage's folder or a PEFT adapter folder",
            args.adapter.display()
        );
    }
    let model = Model::load_adapter_onto(
        &adapter,
        args.base.as_deref(),
        HeadChoice::AsSaved,
        tch::Device::Cpu,
    )?;
    model
        .save_merged(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let lora = model.lora.as_ref().expect("adapters were added");
    tracing::info!(
        "merged {} (r {}, alpha {}, {:?}) into {} from {}",
        adapter.display(),
        lora.config.r,
        lora.config.alpha,
        lora.config.target_modules,
        args.out.display(),
        lora.base.display()
    );
    Ok(())
}
