//! Reward programs as a GRPO stage's scorer, run by the `rlhf` binary: a
//! Python program (JSON lines, with named components) run as two workers
//! scores every answer, its components reach `metrics.jsonl` and its
//! scores the stage's cache; a program that fails is retried, then stops
//! the stage naming it; a reward server (Python's http.server) scores
//! them over HTTP. The prompts are `rlhf task arithmetic`'s, whose
//! `answer` column reaches the program.

use crate::common;

use std::path::Path;

const REWARD: &str = r#"
import json, os, sys
calls = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.log")
items = [json.loads(l) for l in sys.stdin if l.strip()]
with open(calls, "a") as f:
    f.write(f"{len(items)}\n")
for item in items:
    text = item["response"]
    digits = sum(c.isdigit() for c in text) / max(len(text), 1)
    right = float(item["answer"] is not None and item["answer"] in text)
    print(json.dumps({"score": digits + right, "components": {"digits": digits, "right": right}}))
"#;

fn experiment(dir: &Path, reward: &str) -> std::path::PathBuf {
    common::rlhf_ok(&[
        "task",
        "arithmetic",
        "--out",
        dir.to_str().unwrap(),
        "--prompts",
        "64",
    ]);
    std::fs::write(dir.join("reward.py"), REWARD).unwrap();
    let exp = dir.join("exp.yaml");
    std::fs::write(
        &exp,
        format!(
            "name: rp\ndevice: cpu\nmodel: {{n_layer: 1, n_head: 2, n_embd: 32, n_positions: 48}}\nstages:\n\
             \x20 sft: {{kind: sft, data: sft.jsonl, max_steps: 4, batch_size: 8}}\n\
             \x20 grpo: {{kind: grpo, policy: sft, prompts: prompts.jsonl, iterations: 2, prompts_per_iteration: 4,\n\
             \x20        group_size: 4, minibatch_size: 8, epochs: 1, sampling: {{max_new_tokens: 6}}, reward: {reward}}}\n"
        ),
    )
    .unwrap();
    exp
}

#[test]
fn a_reward_program_scores_grpo_with_components_and_a_cache() {
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path(), "{command: [python3, reward.py], workers: 2}");
    let out = common::rlhf(&["run", exp.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let grpo = d.path().join("runs/rp/grpo");
    let metrics = std::fs::read_to_string(grpo.join("metrics.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 2);
    for r in &records {
        let (digits, right) = (
            r["reward/digits"].as_f64().unwrap(),
            r["reward/right"].as_f64().unwrap(),
        );
        assert!(
            (0.0..=1.0).contains(&digits) && (0.0..=1.0).contains(&right),
            "{r}"
        );
        assert!(
            (r["score"].as_f64().unwrap() - (digits + right)).abs() < 1e-9,
            "{r}"
        );
    }
    // Two workers a rollout: each call scored a share of the 16 answers.
    let calls = std::fs::read_to_string(d.path().join("calls.log")).unwrap();
    let sizes: Vec<usize> = calls.lines().map(|l| l.parse().unwrap()).collect();
    assert!(
        sizes.len() >= 2 && sizes.iter().all(|&n| n <= 8),
        "{sizes:?}"
    );
    let cache = std::fs::read_to_string(grpo.join("reward_cache.jsonl")).unwrap();
    assert_eq!(
        cache.lines().count(),
        sizes.iter().sum::<usize>(),
        "every score kept once"
    );
    eval_with_the_reward_program(d.path());
}

/// `rlhf eval --reward-command` scores every policy's greedy answers with
/// the same program: each policy's mean score and components are the
/// program's formula on the report's own answers.
fn eval_with_the_reward_program(dir: &Path) {
    let run = dir.join("runs/rp");
    let prompts = dir.join("prompts_eval.jsonl");
    let command = format!("python3 {}", dir.join("reward.py").display());
    common::rlhf_ok(&[
        "eval",
        run.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--max-new-tokens",
        "8",
        "--kl-samples",
        "1",
        "--reward-command",
        &command,
        "--reward-workers",
        "2",
    ]);
    let (report, answers) = report_and_answers(&run);
    let refs = references(&prompts);
    for p in report["policies"].as_array().unwrap() {
        let label = p["label"].as_str().unwrap();
        let (mut digits, mut right) = (0.0, 0.0);
        for (a, r) in answers.iter().zip(&refs) {
            let mine = a["answers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["policy"] == label);
            let text = mine.unwrap()["answer"].as_str().unwrap();
            let n = text.chars().count().max(1) as f64;
            digits += text.chars().filter(|c| c.is_ascii_digit()).count() as f64 / n;
            right += f64::from(u8::from(text.contains(r.as_str())));
        }
        let n = refs.len() as f64;
        let s = &p["program_score"];
        assert!(
            (s["components"]["digits"].as_f64().unwrap() - digits / n).abs() < 1e-9,
            "{label}: {s}"
        );
        assert!(
            (s["components"]["right"].as_f64().unwrap() - right / n).abs() < 1e-9,
            "{label}: {s}"
        );
        assert!(
            (s["mean"].as_f64().unwrap() - (digits + right) / n).abs() < 1e-9,
            "{label}: {s}"
        );
    }
    let md = std::fs::read_to_string(run.join("report/report.md")).unwrap();
    assert!(
        md.contains("### Reward program (`python3 ")
            && md.contains("| policy | mean score | digits | right |"),
        "{md}"
    );
}

#[test]
fn a_failing_reward_program_is_retried_then_named() {
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(
        d.path(),
        "{command: [python3, -c, 'import sys; sys.exit(3)'], retries: 2}",
    );
    let out = common::rlhf(&["run", exp.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reward program `python3 -c"), "{err}");
    assert!(err.contains("(after 3 tries)"), "{err}");
    assert!(!d.path().join("runs/rp/grpo/checkpoint").exists());
}

const SERVER: &str = r#"
import http.server, json, sys
class Score(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        items = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        out = [{"score": float(len(i["response"])), "components": {"chars": float(len(i["response"]))}} for i in items]
        body = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        with open("requests.log", "a") as f:
            f.write(f"{len(items)}\n")
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Score)
print("ready", flush=True)
server.serve_forever()
"#;

/// A reward server (Python's http.server) scores GRPO's answers through
/// `reward: {url}`, two requests at once, its components in the metrics.
#[test]
fn a_reward_server_scores_grpo_over_http() {
    use std::io::BufRead;
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("server.py"), SERVER).unwrap();
    let port = common::free_port();
    let mut server = std::process::Command::new("python3")
        .args(["server.py", &port.to_string()])
        .current_dir(d.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready");
    let url = format!("{{url: \"http://127.0.0.1:{port}/score\", workers: 2}}");
    let exp = experiment(d.path(), &url);
    let out = common::rlhf(&["run", exp.to_str().unwrap()]);
    server.kill().unwrap();
    server.wait().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = std::fs::read_to_string(d.path().join("runs/rp/grpo/metrics.jsonl")).unwrap();
    for line in metrics.lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(r["score"], r["reward/chars"], "{r}");
    }
    let sizes: Vec<usize> = std::fs::read_to_string(d.path().join("requests.log"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert!(
        sizes.len() >= 2 && sizes.iter().all(|&n| n <= 8),
        "{sizes:?}"
    );
}

/// `rlhf eval --checker math` adds greedy accuracy, pass@1, pass@k and
/// cons@k per policy; the greedy share equals the checker run here on the
/// report's own greedy answers, and pass@k is at least pass@1.
#[test]
fn eval_reports_pass_at_k_and_majority_vote_with_the_math_checker() {
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path(), "{checker: math}");
    common::rlhf_ok(&["run", exp.to_str().unwrap()]);
    let run = d.path().join("runs/rp");
    let prompts = d.path().join("prompts_eval.jsonl");
    common::rlhf_ok(&[
        "eval",
        run.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--max-new-tokens",
        "8",
        "--kl-samples",
        "1",
        "--checker",
        "math",
        "--checker-samples",
        "4",
    ]);
    let (report, answers) = report_and_answers(&run);
    let refs = references(&prompts);
    let policies = report["policies"].as_array().unwrap();
    assert_eq!(policies.len(), 2, "sft and grpo");
    for p in policies {
        let v = &p["verifiable"];
        assert_eq!(v["k"], 4, "{p}");
        let label = p["label"].as_str().unwrap();
        let greedy: Vec<bool> = answers
            .iter()
            .zip(&refs)
            .map(|(a, r)| {
                let mine = a["answers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|x| x["policy"] == label)
                    .unwrap();
                rlhf_datasets::math_answer::is_correct(mine["answer"].as_str().unwrap(), r)
            })
            .collect();
        let share = greedy.iter().filter(|&&g| g).count() as f64 / greedy.len() as f64;
        assert!(
            (v["greedy"].as_f64().unwrap() - share).abs() < 1e-12,
            "{label}: {v}"
        );
        let (p1, pk, cons) = (
            v["pass_at_1"].as_f64().unwrap(),
            v["pass_at_k"].as_f64().unwrap(),
            v["cons_at_k"].as_f64().unwrap(),
        );
        assert!(
            (0.0..=1.0).contains(&p1) && pk >= p1 && (0.0..=1.0).contains(&cons),
            "{label}: {v}"
        );
    }
    let md = std::fs::read_to_string(run.join("report/report.md")).unwrap();
    assert!(
        md.contains("| policy | greedy accepted | pass@1 | pass@4 | cons@4 |"),
        "{md}"
    );
    eval_with_the_code_checker(&run, &refs, d.path());
}

/// `--checker code` on the same run: each prompt's `answer` becomes tests
/// (some that any runnable answer passes, some none can); the report
/// names the checker and its greedy share is the checker's own verdict on
/// the report's greedy answers.
fn eval_with_the_code_checker(run: &Path, refs: &[String], dir: &Path) {
    let prompts = dir.join("prompts_code.jsonl");
    let texts = std::fs::read_to_string(dir.join("prompts_eval.jsonl")).unwrap();
    let tests: Vec<&str> = (0..refs.len())
        .map(|i| {
            if i % 2 == 0 {
                "assert True"
            } else {
                "assert False"
            }
        })
        .collect();
    let lines: Vec<String> = texts
        .lines()
        .zip(&tests)
        .map(|(l, t)| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["answer"] = (*t).into();
            v.to_string()
        })
        .collect();
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    let (run_s, prompts_s) = (run.to_str().unwrap(), prompts.to_str().unwrap());
    common::rlhf_ok(&[
        "eval",
        run_s,
        "--prompts",
        prompts_s,
        "--max-new-tokens",
        "8",
        "--kl-samples",
        "1",
        "--checker",
        "code",
        "--checker-samples",
        "2",
    ]);
    let (report, answers) = report_and_answers(run);
    let limits = rlhf_stages::programs::sandbox::Limits {
        wall_seconds: 10.0,
        memory_mb: 1024,
        file_mb: 16,
    };
    let checker = rlhf_stages::programs::code_check::CodeChecker::new("python3", limits).unwrap();
    for p in report["policies"].as_array().unwrap() {
        let v = &p["verifiable"];
        assert_eq!(
            (v["checker"].as_str(), v["k"].as_u64()),
            (Some("code"), Some(2)),
            "{p}"
        );
        let label = p["label"].as_str().unwrap();
        let passed = answers
            .iter()
            .zip(&tests)
            .filter(|(a, t)| {
                let mine = a["answers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|x| x["policy"] == label);
                let answer = mine.unwrap()["answer"].as_str().unwrap();
                checker.check(answer, t).unwrap()
                    == rlhf_stages::programs::code_check::Verdict::Passed
            })
            .count();
        let share = passed as f64 / tests.len() as f64;
        assert!(
            (v["greedy"].as_f64().unwrap() - share).abs() < 1e-12,
            "{label}: {v}"
        );
        assert!(
            v["pass_at_k"].as_f64().unwrap() <= 0.5,
            "odd prompts cannot pass: {v}"
        );
    }
    let md = std::fs::read_to_string(run.join("report/report.md")).unwrap();
    assert!(md.contains("(the code checker against"), "{md}");
}

/// A run's `report.json` and its `answers.jsonl` lines, after `rlhf eval`.
fn report_and_answers(run: &Path) -> (serde_json::Value, Vec<serde_json::Value>) {
    let read = |f: &str| std::fs::read_to_string(run.join("report").join(f)).unwrap();
    let report = serde_json::from_str(&read("report.json")).unwrap();
    let answers = read("answers.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (report, answers)
}

/// Each prompt's `answer` in a prompts file.
fn references(prompts: &Path) -> Vec<String> {
    std::fs::read_to_string(prompts)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["answer"].as_str().unwrap().to_owned()
        })
        .collect()
}
