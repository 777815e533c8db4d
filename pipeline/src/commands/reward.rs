//! `rlhf reward`: score answers with a reward model.
//!
//! Each answer is scored as the reward model was trained: prompt + answer +
//! EOS, the head read at the EOS or averaged over the answer (the pooling
//! saved in the checkpoint).

use anyhow::bail;
use rlhf_stages::model::device::parse_device;
use rlhf_stages::objectives::rankings::{reward_sequence, sequence_rewards, Pooling};
use rlhf_stages::{Head, HeadChoice, Model};
use serde_json::{json, Value};

use crate::cli::RewardArgs;
use crate::commands::jsonl::read_json_lines;

pub fn run(args: RewardArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device.device)?;
    let model = Model::load(&args.model, HeadChoice::AsSaved, device)?;
    if model.net.head() != Head::Scalar {
        bail!(
            "{}: this model has no scalar head; `rlhf reward` needs a reward model (a reward stage's checkpoint)",
            args.model.display()
        );
    }
    // (the JSON line to echo, prompt, answer)
    let mut items: Vec<(Value, String, String)> = Vec::new();
    if let Some(prompt) = &args.prompt {
        for a in &args.answer {
            items.push((
                json!({"prompt": prompt, "answer": a}),
                prompt.clone(),
                a.clone(),
            ));
        }
    }
    let pooling = Pooling::of(&model);
    if let Some(path) = &args.input {
        for (row, v) in read_json_lines(path)? {
            let (prompt, answer) = match (v["prompt"].as_str(), v["answer"].as_str(), v["text"].as_str()) {
                (Some(p), Some(a), _) => (p.to_owned(), a.to_owned()),
                (_, _, Some(t)) if pooling == Pooling::Last => (String::new(), t.to_owned()),
                (_, _, Some(_)) => bail!(
                    "{}: line {row}: this reward model averages its head over the answer (reward_pooling: mean in {}), so it needs \"prompt\" and \"answer\" apart, not \"text\"",
                    path.display(),
                    args.model.join("config.json").display()
                ),
                _ => bail!(
                    "{}: line {row}: expected \"prompt\" and \"answer\" strings, or a \"text\" string",
                    path.display()
                ),
            };
            items.push((v, prompt, answer));
        }
    }
    if items.is_empty() {
        bail!("nothing to score: give --prompt with --answer, or --input");
    }
    let limit = model.net.n_positions() as usize;
    let mut seqs = Vec::with_capacity(items.len());
    for (i, (_, p, a)) in items.iter().enumerate() {
        let (input, cut) = reward_sequence(&model.tokenizer, p, a, limit)?;
        if cut {
            // The answer's end, where the reward is read, was kept.
            tracing::warn!(
                "item {}: longer than n_positions ({limit}); the prompt was cut from the left",
                i + 1
            );
        }
        seqs.push(input);
    }
    let rewards = sequence_rewards(&model, &seqs, args.batch_size, device);
    for ((mut v, _, _), r) in items.into_iter().zip(rewards) {
        v["reward"] = json!(r);
        println!("{v}");
    }
    Ok(())
}
