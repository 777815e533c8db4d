//! `rlhf bench` (hidden): the Rust side of `just bench`. Each mode runs
//! one of the stages crate's timed kernels and prints its JSON line.

use rlhf_stages::bench::{self, BenchSpec};
use rlhf_stages::model::device::parse_device;

use crate::cli::{BenchArgs, BenchMode};

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device.device)?;
    let spec = BenchSpec {
        model: args.model.clone(),
        prompts: args.prompts.clone(),
        data: args.data.clone(),
        reward_model: args.reward_model.clone(),
        group_size: args.group_size,
        lora_r: args.lora_r,
        gradient_checkpointing: args.gradient_checkpointing,
        n_layer: args.n_layer,
        n_head: args.n_head,
        n_embd: args.n_embd,
        n_positions: args.n_positions,
        vocab_size: args.vocab_size,
        batch: args.batch,
        seq: args.seq,
        prompt_len: args.prompt_len,
        new_tokens: args.new_tokens,
        minibatch: args.minibatch,
        warmup: args.warmup,
        steps: args.steps,
        size: args.size,
        seed: args.seed,
        precision: args.precision.into(),
    };
    let out = match args.mode {
        BenchMode::Matmul => bench::matmul(&spec, device)?,
        mode => spec.precision.run(device, || match mode {
            BenchMode::Train => bench::train(&spec, device),
            BenchMode::Generate => bench::generation(&spec, device),
            BenchMode::Dpo => bench::dpo_epochs(&spec, device),
            BenchMode::Grpo => bench::grpo_iterations(&spec, device),
            _ => bench::ppo_iterations(&spec, device),
        })?,
    };
    println!("{out}");
    Ok(())
}
