//! Ranking sampled answers: the bundled task's gold judge, or a user's
//! program speaking JSON lines.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use rlhf_datasets::task::judge;
use serde_json::{json, Value};

use crate::experiment::Labeller;

/// Rank of each answer, 0 the best, equal scores tied.
pub fn gold_ranking(prompt: &str, answers: &[String]) -> anyhow::Result<Vec<usize>> {
    let scores = answers
        .iter()
        .map(|a| {
            judge(prompt, a)
                .with_context(|| format!("the gold judge does not know the prompt {prompt:?}"))
        })
        .collect::<anyhow::Result<Vec<f64>>>()?;
    Ok(ranks_by_score(&scores))
}

/// Rank of each score, 0 the highest; equal scores share a rank.
pub fn ranks_by_score(scores: &[f64]) -> Vec<usize> {
    scores
        .iter()
        .map(|s| scores.iter().filter(|&&o| o > *s).count())
        .collect()
}

/// Rankings by a reward model's scores of each group's answers (a model
/// folder with a scalar head, read as it was trained).
pub fn rank_by_reward_model(
    dir: &std::path::Path,
    groups: &[(String, Vec<String>)],
    device: tch::Device,
) -> anyhow::Result<Vec<Vec<usize>>> {
    use rlhf_stages::{Head, HeadChoice, Model};
    let model = Model::load(dir, HeadChoice::AsSaved, device)
        .with_context(|| format!("loading the labeller's reward model {}", dir.display()))?;
    if model.net.head() != Head::Scalar {
        bail!(
            "labeller.model: {} has no scalar head; give a reward stage or a reward model's folder",
            dir.display()
        );
    }
    let (prompts, answers): (Vec<String>, Vec<String>) = groups
        .iter()
        .flat_map(|(p, a)| a.iter().map(move |x| (p.clone(), x.clone())))
        .unzip();
    let settings = rlhf_stages::eval::EvalSettings::default();
    let scores = rlhf_stages::eval::reward_scores(&model, &prompts, &answers, &settings, device)?;
    let mut at = 0;
    Ok(groups
        .iter()
        .map(|(_, a)| {
            at += a.len();
            ranks_by_score(&scores[at - a.len()..at])
        })
        .collect())
}

/// Rankings for `(prompt, answers)` groups, in order.
pub fn rank(
    labeller: &Labeller,
    groups: &[(String, Vec<String>)],
) -> anyhow::Result<Vec<Vec<usize>>> {
    match labeller {
        Labeller::Gold => groups.iter().map(|(p, a)| gold_ranking(p, a)).collect(),
        Labeller::Web { .. } => bail!("a web labeller ranks through its round's queue"),
        Labeller::RewardModel { .. } => {
            bail!("a reward-model labeller ranks on the round's device")
        }
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
            .map(|x| x.as_f64().filter(|s| s.abs() <= MAX_SCORE))
            .collect::<Option<_>>()
            .ok_or("scores must be finite numbers within ±1e15")?;
        if scores.len() != answers {
            return Err(format!("{} scores for {answers} responses", scores.len()));
        }
        Ok(scores)
    })
}

/// Scores from a reward program: one `{"prompt", "response", "answer"}`
/// line in per answer, one `{"score": x, "components": {name: x}}` line
/// out (components optional).
pub(crate) fn reward_with_command(
    program: &LineProgram,
    items: &[rlhf_stages::programs::ScoreItem],
) -> anyhow::Result<Vec<rlhf_stages::programs::Scored>> {
    let inputs: Vec<Value> = items
        .iter()
        .map(|i| json!({"prompt": i.prompt, "response": i.response, "answer": i.answer}))
        .collect();
    program.exchange_lines(&inputs, "answers", |_, v| {
        rlhf_stages::programs::Scored::from_json(v)
    })
}

/// Runs reward programs in `base` (their relative paths point there) and
/// asks reward servers; `limit` names the timeout's setting in messages.
pub(crate) fn reward_runner(
    base: std::path::PathBuf,
    limit: &'static str,
) -> rlhf_stages::programs::ProgramRunner {
    std::sync::Arc::new(move |endpoint, timeout, items| {
        let timeout = std::time::Duration::from_secs_f64(timeout);
        let scored = match endpoint {
            rlhf_stages::programs::Endpoint::Command(command) => {
                let program = LineProgram {
                    command,
                    role: "reward program",
                    timeout,
                    limit,
                    cwd: Some(&base),
                };
                reward_with_command(&program, items)
            }
            rlhf_stages::programs::Endpoint::Url(url) => {
                crate::reward_server::scores(url, timeout, items)
            }
        };
        scored.map_err(|e| format!("{e:#}"))
    })
}

/// An environment program's replies (`env:` of a multi-turn stage): one
/// request line in per live episode, one JSON object line out for each
/// (read by the stage).
pub(crate) fn env_with_command(
    program: &LineProgram,
    requests: &[Value],
) -> anyhow::Result<Vec<Value>> {
    program.exchange_lines(requests, "turns", |_, v| match v.is_object() {
        true => Ok(v.clone()),
        false => Err("expected {\"observation\", \"done\", \"reward\"}".into()),
    })
}

/// The largest score magnitude a judge may give (as a reward program's).
const MAX_SCORE: f64 = rlhf_stages::programs::MAX_SCORE;

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
        let lines: Vec<Value> = groups
            .iter()
            .map(|(p, a)| json!({"prompt": p, "responses": a}))
            .collect();
        self.exchange_lines(&lines, "groups", |i, v| parse(v, groups[i].1.len()))
    }

    /// Runs the program on one JSON line per input; `parse(i, line)`
    /// reads the output line of input `i` (`what` names the inputs).
    fn exchange_lines<T>(
        &self,
        inputs: &[Value],
        what: &str,
        parse: impl Fn(usize, &Value) -> Result<T, String>,
    ) -> anyhow::Result<Vec<T>> {
        let (role, shown) = (self.role, self.command.join(" "));
        let mut input = String::new();
        for v in inputs {
            input.push_str(&v.to_string());
            input.push('\n');
        }
        let text = self.run(input, inputs.len())?;
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.len() != inputs.len() {
            bail!(
                "{role} `{shown}` wrote {} lines for {} {what}",
                lines.len(),
                inputs.len()
            );
        }
        lines
            .iter()
            .enumerate()
            .map(|(i, line)| {
                let bad = |m: &str| anyhow::anyhow!("{role} `{shown}`: output line {}: {m}", i + 1);
                let v: Value = serde_json::from_str(line).map_err(|_| bad("invalid JSON"))?;
                parse(i, &v).map_err(|m| bad(&m))
            })
            .collect()
    }

    /// Starts the program, writes `input`, and returns its output (at most
    /// `max_lines` non-empty lines) once it has written it and exited.
    /// The timeout covers both; the program's whole process group is
    /// killed when it ends, so nothing it started outlives it or holds its
    /// output open.
    fn run(&self, input: String, max_lines: usize) -> anyhow::Result<String> {
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
        let group = child.id();
        crate::exec::children::register(group);
        // Write from a thread so a program that answers while reading cannot deadlock.
        let mut stdin = child.stdin.take().expect("piped");
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(read_output(stdout, max_lines));
        });
        let ended = wait_for_output(&mut child, &rx, self.timeout);
        crate::exec::children::stop_group(group);
        let _ = child.kill();
        let status = child.wait();
        crate::exec::children::unregister(group);
        let _ = writer.join();
        let stdout = match ended {
            Ended::Output(Ok(bytes)) => bytes,
            Ended::Output(Err(e)) => bail!("{role} `{shown}`: {e}; it was stopped"),
            Ended::Interrupted => bail!("{role} `{shown}` was stopped: interrupted"),
            Ended::TimedOut => bail!(
                "{role} `{shown}` had not written its answers and exited within {} s and was stopped ({})",
                self.timeout.as_secs_f64(),
                self.limit
            ),
        };
        let status = status.with_context(|| format!("{role} `{shown}`"))?;
        if !status.success() {
            bail!("{role} `{shown}` failed ({status})");
        }
        String::from_utf8(stdout).with_context(|| format!("{role} `{shown}`: output is not UTF-8"))
    }
}

/// Longest output line read from a program (a line answers one group).
const MAX_LINE: usize = 1 << 20;

/// How a program's run ended.
enum Ended {
    /// Its output is complete (or refused) and it exited.
    Output(Result<Vec<u8>, String>),
    TimedOut,
    Interrupted,
}

/// Waits, until `timeout`, for the output to end and the program to exit.
/// Once it has exited, what it left running gets a moment to close the
/// output, then the group is killed so the output ends.
fn wait_for_output(
    child: &mut std::process::Child,
    output: &std::sync::mpsc::Receiver<Result<Vec<u8>, String>>,
    timeout: std::time::Duration,
) -> Ended {
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + timeout;
    let (mut read, mut exited_at) = (None, None);
    loop {
        if read.is_none() {
            if let Ok(r) = output.try_recv() {
                if r.is_err() {
                    return Ended::Output(r);
                }
                read = Some(r);
            }
        }
        if exited_at.is_none() && child.try_wait().ok().flatten().is_some() {
            exited_at = Some(Instant::now());
        }
        match (read.take(), exited_at) {
            (Some(r), Some(_)) => return Ended::Output(r),
            (r, Some(at)) if at.elapsed() > Duration::from_secs(1) => {
                // Exited, but something it started still holds the output.
                crate::exec::children::stop_group(child.id());
                read = r;
            }
            (r, _) => read = r,
        }
        if rlhf_stages::train::interrupt_requested() {
            return Ended::Interrupted;
        }
        if Instant::now() >= deadline {
            return Ended::TimedOut;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reads a program's output to its end: at most `max_lines` non-empty
/// lines of at most [`MAX_LINE`] bytes, so a program that writes without
/// end is refused rather than read until memory runs out.
fn read_output(mut from: impl std::io::Read, max_lines: usize) -> Result<Vec<u8>, String> {
    let (mut out, mut buf) = (Vec::new(), vec![0u8; 64 << 10]);
    let (mut line, mut lines, mut counted) = (0usize, 0usize, false);
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("reading its output: {e}")),
        };
        for &b in &buf[..n] {
            if b == b'\n' {
                (line, counted) = (0, false);
            } else {
                if !counted && !b.is_ascii_whitespace() {
                    (lines, counted) = (lines + 1, true);
                }
                line += 1;
                if line > MAX_LINE {
                    return Err(format!("an output line is over {} MiB", MAX_LINE >> 20));
                }
            }
        }
        if lines > max_lines {
            return Err(format!(
                "it wrote more than {max_lines} lines, one per group"
            ));
        }
        out.extend_from_slice(&buf[..n]);
        if out.len() > max_lines.saturating_add(1).saturating_mul(MAX_LINE) {
            return Err("it wrote more than its lines can hold".into());
        }
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
            e.contains("within 0.5 s") && e.contains("timeout_seconds"),
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

    /// Running (a zombie waiting for a parent that does not reap it is not).
    fn alive(pid: &str) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        })
    }

    /// A program that answers and exits but leaves a child holding its
    /// output: the answer is taken, and the child is killed.
    #[test]
    fn a_child_left_holding_the_output_is_killed_with_its_group() {
        let d = tempfile::tempdir().unwrap();
        let pid_file = d.path().join("pid");
        let script = format!(
            "cat > /dev/null; echo '{{\"ranking\": [1, 0]}}'; sleep 100000 & echo $! > {}",
            pid_file.display()
        );
        let groups = vec![("p".to_string(), vec!["a".to_string(), "b".to_string()])];
        let t0 = std::time::Instant::now();
        let r = rank(
            &command(vec!["sh".into(), "-c".into(), script], 60.0),
            &groups,
        )
        .unwrap();
        assert_eq!(r, vec![vec![1, 0]]);
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            t0.elapsed()
        );
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while alive(pid.trim()) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(!alive(pid.trim()), "the left child {pid} was killed");
        // Stuck past the timeout the same way: stopped at the timeout.
        let stuck = "cat > /dev/null; (sleep 100000; echo late) & wait".to_string();
        let t0 = std::time::Instant::now();
        let e = rank(
            &command(vec!["sh".into(), "-c".into(), stuck], 0.5),
            &groups,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("within 0.5 s"), "{e}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(10));
    }

    /// A judge's score beyond ±1e15 is refused naming the line (means and
    /// differences of scores must stay finite).
    #[test]
    fn a_judges_huge_scores_are_refused() {
        let groups = vec![("p".to_string(), vec!["a".to_string(), "b".to_string()])];
        let command: Vec<String> = vec![
            "sh".into(),
            "-c".into(),
            "cat > /dev/null; echo '{\"scores\": [1e308, 0]}'".into(),
        ];
        let program = LineProgram {
            command: &command,
            role: "judge",
            timeout: std::time::Duration::from_secs(60),
            limit: "judge.timeout_seconds",
            cwd: None,
        };
        let e = score_with_command(&program, &groups)
            .unwrap_err()
            .to_string();
        assert!(e.contains("output line 1") && e.contains("1e15"), "{e}");
    }

    /// A program that writes without end is refused, not read until
    /// memory runs out; so is one line without end.
    #[test]
    fn endless_output_is_refused_with_bounded_memory() {
        let groups = vec![("p".to_string(), vec!["a".to_string(), "b".to_string()]); 2];
        let e = rank(&command(vec!["yes".into()], 60.0), &groups)
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 2 lines"), "{e}");
        let one_line = vec!["sh".into(), "-c".into(), "yes | tr -d '\\n'".into()];
        let e = rank(&command(one_line, 60.0), &groups)
            .unwrap_err()
            .to_string();
        assert!(e.contains("over 1 MiB"), "{e}");
    }
}
