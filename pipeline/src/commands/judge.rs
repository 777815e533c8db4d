//! `rlhf judge`: the bundled task's gold judge as a command.

use std::io::{BufRead, BufReader};

use anyhow::{bail, Context};
use rlhf_datasets::task::judge;
use serde_json::{json, Value};

use crate::cli::JudgeArgs;

pub fn run(args: JudgeArgs) -> anyhow::Result<()> {
    if let (Some(prompt), Some(answer)) = (&args.prompt, &args.answer) {
        let score = judge(prompt, answer)
            .with_context(|| format!("the judge does not know the prompt {prompt:?}"))?;
        println!(
            "{}",
            json!({"prompt": prompt, "answer": answer, "score": score})
        );
        return Ok(());
    }
    let name = args.input.display().to_string();
    let reader: Box<dyn BufRead> = if name == "-" {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        Box::new(BufReader::new(
            std::fs::File::open(&args.input).with_context(|| format!("cannot open {name}"))?,
        ))
    };
    for (i, line) in reader.lines().enumerate() {
        let row = i + 1;
        let line = line.with_context(|| format!("{name}: line {row}: not valid UTF-8"))?;
        if line.trim().is_empty() {
            continue;
        }
        let mut v: Value = serde_json::from_str(&line)
            .with_context(|| format!("{name}: line {row}: invalid JSON"))?;
        let (Some(prompt), Some(answer)) = (v["prompt"].as_str(), v["answer"].as_str()) else {
            bail!("{name}: line {row}: expected string fields \"prompt\" and \"answer\"");
        };
        // Unknown prompts score null: the judge only knows the bundled task.
        v["score"] = json!(judge(prompt, answer));
        println!("{v}");
    }
    Ok(())
}
