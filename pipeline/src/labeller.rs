//! Ranking sampled answers: the bundled task's gold judge, or a user's
//! program speaking JSON lines.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use rlhf_datasets::task::judge;
use serde_json::{json, Value};

use crate::config::Labeller;

/// Rank of each answer, 0 the best, equal scores tied.
pub fn gold_ranking(prompt: &str, answers: &[String]) -> anyhow::Result<Vec<usize>> {
    let scores = answers
        .iter()
        .map(|a| {
            judge(prompt, a)
                .with_context(|| format!("the gold judge does not know the prompt {prompt:?}"))
        })
        .collect::<anyhow::Result<Vec<f64>>>()?;
    Ok(scores
        .iter()
        .map(|s| scores.iter().filter(|&&o| o > *s).count())
        .collect())
}

/// Rankings for `(prompt, answers)` groups, in order.
pub fn rank(
    labeller: &Labeller,
    groups: &[(String, Vec<String>)],
) -> anyhow::Result<Vec<Vec<usize>>> {
    match labeller {
        Labeller::Gold => groups.iter().map(|(p, a)| gold_ranking(p, a)).collect(),
        Labeller::Command { command } => rank_with_command(command, groups),
    }
}

fn rank_with_command(
    command: &[String],
    groups: &[(String, Vec<String>)],
) -> anyhow::Result<Vec<Vec<usize>>> {
    let shown = command.join(" ");
    let mut child = Command::new(&command[0])
        .args(&command[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("labeller `{shown}` could not start"))?;
    let mut input = String::new();
    for (p, a) in groups {
        input.push_str(&json!({"prompt": p, "responses": a}).to_string());
        input.push('\n');
    }
    // Write from a thread so a labeller that answers while reading cannot deadlock.
    let mut stdin = child.stdin.take().expect("piped");
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child
        .wait_with_output()
        .with_context(|| format!("labeller `{shown}`"))?;
    let _ = writer.join();
    if !out.status.success() {
        bail!("labeller `{shown}` failed ({})", out.status);
    }
    let text = String::from_utf8(out.stdout)
        .with_context(|| format!("labeller `{shown}`: output is not UTF-8"))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() != groups.len() {
        bail!(
            "labeller `{shown}` wrote {} ranking lines for {} groups",
            lines.len(),
            groups.len()
        );
    }
    lines
        .iter()
        .zip(groups)
        .enumerate()
        .map(|(i, (line, (_, answers)))| {
            let bad = |m: &str| anyhow::anyhow!("labeller `{shown}`: output line {}: {m}", i + 1);
            let v: Value = serde_json::from_str(line).map_err(|_| bad("invalid JSON"))?;
            let ranking: Vec<usize> = v["ranking"]
                .as_array()
                .ok_or_else(|| bad("expected {\"ranking\": [...]}"))?
                .iter()
                .map(|x| x.as_u64().map(|r| r as usize))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("ranks must be integers >= 0"))?;
            if ranking.len() != answers.len() {
                return Err(bad(&format!(
                    "{} ranks for {} responses",
                    ranking.len(),
                    answers.len()
                )));
            }
            Ok(ranking)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gold_ranking_ties_equal_scores() {
        let r = gold_ranking(
            "Upper: candle\n",
            &[
                "CANDLE".into(),
                "CANDlE".into(),
                "CANDLE".into(),
                "x".into(),
            ],
        )
        .unwrap();
        assert_eq!(r, vec![0, 2, 0, 3]);
    }

    #[test]
    fn command_labeller_round_trips_and_errors_are_named() {
        // A labeller in shell: ranks every group [1, 0] (second answer best).
        let cmd = vec![
            "sh".into(),
            "-c".into(),
            "while read l; do echo '{\"ranking\": [1, 0]}'; done".into(),
        ];
        let groups = vec![("p".to_string(), vec!["a".to_string(), "b".to_string()]); 3];
        assert_eq!(
            rank(&Labeller::Command { command: cmd }, &groups).unwrap(),
            vec![vec![1, 0]; 3]
        );
        let short = vec![
            "sh".into(),
            "-c".into(),
            "cat > /dev/null; echo '{\"ranking\": [0, 1]}'".into(),
        ];
        let e = rank(&Labeller::Command { command: short }, &groups)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 ranking lines for 3 groups"), "{e}");
    }
}
