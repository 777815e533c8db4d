use anyhow::Context;
use rlhf_datasets::Tokenizer;
use rlhf_stages::{GptConfig, Head, Model, ModelConfig};

use crate::cli::{HeadArg, InitArgs, LayoutArg};

pub fn run(args: InitArgs) -> anyhow::Result<()> {
    refuse_files(&args.out, args.force)?;
    let tokenizer = match &args.tokenizer {
        None => Tokenizer::bytes(),
        Some(p) if p.is_dir() => Tokenizer::from_model_dir(p)?,
        Some(p) => Tokenizer::from_file(p)?,
    };
    let vocab_size = args
        .vocab_size
        .unwrap_or_else(|| GptConfig::vocab_for(tokenizer.vocab_size()));
    let config = model_config(&args, vocab_size)?;
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
        "wrote {} ({} layout, {} parameters, vocab {})",
        args.out.display(),
        config.layout(),
        config.n_params(),
        config.vocab_size()
    );
    Ok(())
}

/// A folder to write must be new or empty, unless `--force`; a file (or
/// anything else that is not a folder) is refused before anything is
/// touched, `--force` or not.
pub fn refuse_files(out: &std::path::Path, force: bool) -> anyhow::Result<()> {
    if let Ok(meta) = out.symlink_metadata() {
        anyhow::ensure!(
            meta.is_dir(),
            "{}: exists and is not a folder; --out names the model folder to write: give a new folder",
            out.display()
        );
    }
    let has_files = std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some());
    if has_files && !force {
        anyhow::bail!(
            "{}: the folder is not empty; give a new folder, or --force to replace it and its files",
            out.display()
        );
    }
    Ok(())
}

fn model_config(args: &InitArgs, vocab_size: i64) -> anyhow::Result<ModelConfig> {
    let config = match args.layout {
        LayoutArg::Gpt2 => ModelConfig::Gpt2(GptConfig {
            vocab_size,
            n_positions: args.n_positions,
            n_embd: args.n_embd,
            n_layer: args.n_layer,
            n_head: args.n_head,
            ..GptConfig::default()
        }),
        LayoutArg::Llama => {
            let kv_heads = args.kv_heads.unwrap_or(match args.n_head {
                h if h % 2 == 0 => h / 2,
                h => h,
            });
            let spec = serde_json::json!({
                "vocab_size": vocab_size,
                "hidden_size": args.n_embd,
                "num_hidden_layers": args.n_layer,
                "num_attention_heads": args.n_head,
                "num_key_value_heads": kv_heads,
                "max_position_embeddings": args.n_positions,
            });
            ModelConfig::Llama(
                rlhf_stages::model::llama::LlamaConfig::from_experiment(spec)
                    .map_err(|e| anyhow::anyhow!("model shape: {e}"))?,
            )
        }
    };
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("model shape: {e}"))?;
    Ok(config)
}
