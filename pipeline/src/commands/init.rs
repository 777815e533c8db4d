use anyhow::Context;
use rlhf_datasets::Tokenizer;
use rlhf_stages::{GptConfig, Head, Model};

use crate::cli::{HeadArg, InitArgs};

pub fn run(args: InitArgs) -> anyhow::Result<()> {
    let has_files = std::fs::read_dir(&args.out).is_ok_and(|mut d| d.next().is_some());
    if has_files && !args.force {
        anyhow::bail!(
            "{}: the folder is not empty; give a new folder, or --force to replace it and its files",
            args.out.display()
        );
    }
    let tokenizer = match &args.tokenizer {
        None => Tokenizer::bytes(),
        Some(p) if p.is_dir() => Tokenizer::from_model_dir(p)?,
        Some(p) => Tokenizer::from_file(p)?,
    };
    let vocab_size = args
        .vocab_size
        .unwrap_or_else(|| GptConfig::vocab_for(tokenizer.vocab_size()));
    let config = GptConfig {
        vocab_size,
        n_positions: args.n_positions,
        n_embd: args.n_embd,
        n_layer: args.n_layer,
        n_head: args.n_head,
        ..GptConfig::default()
    };
    let head = match args.head {
        HeadArg::Lm => Head::Lm,
        HeadArg::Scalar => Head::Scalar,
    };
    tch::manual_seed(args.seed);
    let model = Model::init(&config, head, tokenizer, tch::Device::Cpu)?;
    model
        .save(&args.out)
        .with_context(|| format!("writing the model folder {}", args.out.display()))?;
    tracing::info!(
        "wrote {} ({} parameters, {} layers, n_embd {}, vocab {})",
        args.out.display(),
        config.n_params(),
        config.n_layer,
        config.n_embd,
        config.vocab_size
    );
    Ok(())
}
