use anyhow::Context;
use rlhf_stages::answer::{answer_prompts, ANSWER_BATCH};
use rlhf_stages::device::parse_device;
use rlhf_stages::sample::SamplingConfig;
use rlhf_stages::{HeadChoice, Model};

use crate::cli::GenerateArgs;

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device.device)?;
    let model = Model::load(&args.model, HeadChoice::Want(rlhf_stages::Head::Lm), device)?;
    let config = SamplingConfig {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        max_new_tokens: args.max_new_tokens,
        stop_at_eos: !args.ignore_eos,
    };
    let tok = &model.tokenizer;
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
