//! `rlhf judge`: the bundled task's gold judge as a command.

use anyhow::{bail, Context};
use rlhf_datasets::task::judge;
use serde_json::json;

use crate::cli::JudgeArgs;
use crate::commands::jsonl::read_json_lines;

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
    for (row, mut v) in read_json_lines(&args.input)? {
        let (Some(prompt), Some(answer)) = (v["prompt"].as_str(), v["answer"].as_str()) else {
            bail!("{name}: line {row}: expected string fields \"prompt\" and \"answer\"");
        };
        // Unknown prompts score null: the judge only knows the bundled task.
        v["score"] = json!(judge(prompt, answer));
        println!("{v}");
    }
    Ok(())
}
