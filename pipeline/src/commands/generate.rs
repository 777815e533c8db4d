use anyhow::Context;
use rlhf_stages::eval::answer::{answer_prompts, ANSWER_BATCH};
use rlhf_stages::model::device::parse_device;
use rlhf_stages::model::sample::SamplingConfig;
use rlhf_stages::{HeadChoice, Model};

use crate::cli::GenerateArgs;

/// `--max-new-tokens`, capped to the room the model's positions leave after
/// the longest prompt (which keeps at least half of them), with a warning.
fn room_for_answers(asked: i64, n_positions: i64, longest_prompt: i64) -> i64 {
    let room = n_positions - longest_prompt.min(n_positions / 2);
    if asked > room {
        tracing::warn!(
            "--max-new-tokens {asked} capped to {room}: the model holds {n_positions} positions and the longest prompt has {longest_prompt} tokens"
        );
    }
    asked.min(room)
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.max_new_tokens >= 1,
        "--max-new-tokens: must be at least 1, got {}",
        args.max_new_tokens
    );
    let device = parse_device(&args.device.device)?;
    let model = Model::load(&args.model, HeadChoice::Want(rlhf_stages::Head::Lm), device)?;
    let tok = &model.tokenizer;
    let longest = args
        .prompt
        .iter()
        .map(|p| tok.encode(p).map(|ids| ids.len().max(1) as i64))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .max()
        .unwrap_or(1);
    let config = SamplingConfig {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        max_new_tokens: room_for_answers(args.max_new_tokens, model.net.n_positions(), longest),
        stop_at_eos: !args.ignore_eos,
    };
    tch::manual_seed(args.seed);
    let out = answer_prompts(&model, &args.prompt, 1, &config, ANSWER_BATCH, device)
        .context("sampling failed")?;
    for (i, prompt) in args.prompt.iter().enumerate() {
        let answer = tok.decode(&out.answers[i], false)?;
        if args.json {
            let line = serde_json::json!({
                "prompt": prompt,
                "answer": answer,
                "answer_ids": out.answers[i],
                "finished": out.finished[i],
            });
            println!("{line}");
        } else {
            println!("{prompt}{answer}");
        }
    }
    Ok(())
}
