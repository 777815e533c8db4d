//! Ranking sampled answers: the bundled task's gold judge, or a user's
//! program speaking JSON lines.

use std::io::Write;
use std::os::unix::process::CommandExt;
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

/// The child's exit status, or `None` after killing it at `timeout`.
fn wait_or_kill(
    child: &mut std::process::Child,
    timeout: std::time::Duration,
) -> std::io::Result<Option<std::process::ExitStatus>> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if std::time::Instant::now() >= deadline || rlhf_stages::train::interrupt_requested() {
            let group = format!("-{}", child.id());
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Rankings for `(prompt, answers)` groups, in order.
pub fn rank(
    labeller: &Labeller,
    groups: &[(String, Vec<String>)],
) -> anyhow::Result<Vec<Vec<usize>>> {
    match labeller {
        Labeller::Gold => groups.iter().map(|(p, a)| gold_ranking(p, a)).collect(),
        Labeller::Web { .. } => bail!("a web labeller ranks through its queue (rlhf collect)"),
        Labeller::Command {
            command,
            timeout_seconds,
        } => {
            let timeout = std::time::Duration::from_secs_f64(*timeout_seconds);
            rank_with_command(
                command,
                groups,
                timeout,
                "loop.labeller.timeout_seconds",
                None,
            )
        }
    }
}

/// Rankings from `command` (JSON lines in and out); stopped after
/// `timeout`, which the setting `limit` sets.
pub(crate) fn rank_with_command(
    command: &[String],
    groups: &[(String, Vec<String>)],
    timeout: std::time::Duration,
    limit: &str,
    cwd: Option<&std::path::Path>,
) -> anyhow::Result<Vec<Vec<usize>>> {
    let program = LineProgram {
        command,
        role: "labeller",
        timeout,
        limit,
        cwd,
    };
    program.exchange(groups, |v, answers| {
        let ranking: Vec<usize> = v["ranking"]
            .as_array()
            .ok_or("expected {\"ranking\": [...]}")?
            .iter()
            .map(|x| x.as_u64().map(|r| r as usize))
            .collect::<Option<_>>()
            .ok_or("ranks must be integers >= 0")?;
        if ranking.len() != answers {
            return Err(format!("{} ranks for {answers} responses", ranking.len()));
        }
        Ok(ranking)
    })
}

/// Scores from `command`: `{"scores": [...]}` for each group, one finite
/// number per response (a judge's protocol).
pub(crate) fn score_with_command(
    program: &LineProgram,
    groups: &[(String, Vec<String>)],
) -> anyhow::Result<Vec<Vec<f64>>> {
    program.exchange(groups, |v, answers| {
        let scores: Vec<f64> = v["scores"]
            .as_array()
            .ok_or("expected {\"scores\": [...]}")?
            .iter()
            .map(|x| x.as_f64().filter(|s| s.is_finite()))
            .collect::<Option<_>>()
            .ok_or("scores must be finite numbers")?;
        if scores.len() != answers {
            return Err(format!("{} scores for {answers} responses", scores.len()));
        }
        Ok(scores)
    })
}

/// A user's program speaking the loop's line protocol: one
/// `{"prompt", "responses"}` JSON line per group in, one JSON line per
/// group out.
#[derive(Debug, Clone)]
pub(crate) struct LineProgram<'a> {
    pub command: &'a [String],
    /// How messages name it: `labeller`, `judge`.
    pub role: &'a str,
    pub timeout: std::time::Duration,
    /// The setting that sets `timeout`, for the message when it passes.
    pub limit: &'a str,
    /// Where it runs (default: this process's folder).
    pub cwd: Option<&'a std::path::Path>,
}

impl LineProgram<'_> {
    /// Runs the program on `groups`; `parse(line, responses)` reads each
    /// output line. Errors name the program and the line.
    fn exchange<T>(
        &self,
        groups: &[(String, Vec<String>)],
        parse: impl Fn(&Value, usize) -> Result<T, String>,
    ) -> anyhow::Result<Vec<T>> {
        let (role, shown) = (self.role, self.command.join(" "));
        let mut input = String::new();
        for (p, a) in groups {
            input.push_str(&json!({"prompt": p, "responses": a}).to_string());
            input.push('\n');
        }
        let text = self.run(input)?;
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.len() != groups.len() {
            bail!(
                "{role} `{shown}` wrote {} lines for {} groups",
                lines.len(),
                groups.len()
            );
        }
        lines
            .iter()
            .zip(groups)
            .enumerate()
            .map(|(i, (line, (_, answers)))| {
                let bad = |m: &str| anyhow::anyhow!("{role} `{shown}`: output line {}: {m}", i + 1);
                let v: Value = serde_json::from_str(line).map_err(|_| bad("invalid JSON"))?;
                parse(&v, answers.len()).map_err(|m| bad(&m))
            })
            .collect()
    }

    /// Starts the program, writes `input`, and returns its output once it
    /// exits (stopped after the timeout, or on Ctrl-C).
    fn run(&self, input: String) -> anyhow::Result<String> {
        let (role, shown) = (self.role, self.command.join(" "));
        // In its own process group, so a timeout stops what it started too.
        let mut program = Command::new(&self.command[0]);
        if let Some(dir) = self.cwd {
            program.current_dir(dir);
        }
        let mut child = program
            .args(&self.command[1..])
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("{role} `{shown}` could not start"))?;
        crate::children::register(child.id());
        // Write from a thread so a program that answers while reading cannot deadlock.
        let mut stdin = child.stdin.take().expect("piped");
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let mut stdout = child.stdout.take().expect("piped");
        let reader = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut stdout, &mut bytes).map(|_| bytes)
        });
        let status =
            wait_or_kill(&mut child, self.timeout).with_context(|| format!("{role} `{shown}`"))?;
        crate::children::unregister(child.id());
        let Some(status) = status else {
            if rlhf_stages::train::interrupt_requested() {
                bail!("{role} `{shown}` was stopped: interrupted");
            }
            bail!(
                "{role} `{shown}` gave no answer within {} s and was stopped ({})",
                self.timeout.as_secs_f64(),
                self.limit
            );
        };
        let _ = writer.join();
        let stdout = reader
            .join()
            .map_err(|_| anyhow::anyhow!("{role} `{shown}`: reading its output failed"))?
            .with_context(|| format!("{role} `{shown}`: reading its output"))?;
        if !status.success() {
            bail!("{role} `{shown}` failed ({status})");
        }
        String::from_utf8(stdout).with_context(|| format!("{role} `{shown}`: output is not UTF-8"))
    }
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

    fn command(command: Vec<String>, timeout_seconds: f64) -> Labeller {
        Labeller::Command {
            command,
            timeout_seconds,
        }
    }

    #[test]
    fn a_labeller_that_never_answers_is_stopped_at_its_timeout() {
        let groups = vec![("p".to_string(), vec!["a".to_string(), "b".to_string()])];
        // A shell that starts a child: the whole group is stopped.
        let hang = vec!["sh".into(), "-c".into(), "sleep 600; echo late".into()];
        let t0 = std::time::Instant::now();
        let e = rank(&command(hang, 0.5), &groups).unwrap_err().to_string();
        assert!(
            e.contains("gave no answer within 0.5 s") && e.contains("timeout_seconds"),
            "{e}"
        );
        assert!(t0.elapsed() < std::time::Duration::from_secs(10));
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
            rank(&command(cmd, 60.0), &groups).unwrap(),
            vec![vec![1, 0]; 3]
        );
        let short = vec![
            "sh".into(),
            "-c".into(),
            "cat > /dev/null; echo '{\"ranking\": [0, 1]}'".into(),
        ];
        let e = rank(&command(short, 60.0), &groups)
            .unwrap_err()
            .to_string();
        assert!(e.contains("wrote 1 lines for 3 groups"), "{e}");
    }
}
