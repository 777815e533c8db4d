//! Multi-turn episodes run by the `rlhf` binary: a GRPO stage with `env:`
//! plays each prompt against a Python environment program (JSON lines),
//! which sees each turn with its history and answers with an
//! observation, a done flag and a reward; the rollout files record every
//! turn, the environment's tokens carry no advantage, the metrics count
//! the turns. An environment that writes a bad line stops the stage
//! naming it. The shipped calculator environment agrees with the rules
//! the stage tests learn from.

use crate::common;

use std::path::Path;

/// Observes every policy turn until the second, then ends the episode;
/// the reward is the history's length. Logs each request.
const ENV: &str = r#"
import json, os, sys
log = os.path.join(os.path.dirname(os.path.abspath(__file__)), "requests.jsonl")
with open(log, "a") as f:
    for line in sys.stdin:
        if not line.strip():
            continue
        r = json.loads(line)
        f.write(line if line.endswith("\n") else line + "\n")
        if r["turn"] < 2:
            out = {"observation": "<tool: %d>" % r["turn"], "done": False, "reward": 0.25}
        else:
            out = {"observation": None, "done": True, "reward": float(len(r["history"]))}
        print(json.dumps(out), flush=True)
"#;

fn experiment(dir: &Path, env: &str) -> std::path::PathBuf {
    let out = dir.to_str().unwrap();
    common::rlhf_ok(&["task", "calculator", "--out", out, "--prompts", "32"]);
    let exp = dir.join("exp.yaml");
    std::fs::write(
        &exp,
        format!(
            "name: ep\ndevice: cpu\nmodel: {{n_layer: 1, n_head: 2, n_embd: 32, n_positions: 64}}\nstages:\n\
             \x20 sft: {{kind: sft, data: sft.jsonl, max_steps: 4, batch_size: 8, max_len: 44}}\n\
             \x20 grpo: {{kind: grpo, policy: sft, prompts: prompts.jsonl, iterations: 2, prompts_per_iteration: 4,\n\
             \x20        group_size: 4, minibatch_size: 8, epochs: 1, sampling: {{max_new_tokens: 6}}, env: {env}}}\n"
        ),
    )
    .unwrap();
    exp
}

#[test]
fn a_grpo_stage_plays_episodes_against_an_environment_program() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("env.py"), ENV).unwrap();
    let exp = experiment(d.path(), "{command: [python3, env.py], max_turns: 3}");
    common::rlhf_ok(&["run", exp.to_str().unwrap()]);
    let grpo = d.path().join("runs/ep/grpo");
    // 2 iterations x 16 episodes, each two calls: turn 1 then turn 2.
    let requests: Vec<serde_json::Value> = std::fs::read_to_string(d.path().join("requests.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(requests.len(), 64);
    for r in &requests {
        let (turn, history) = (
            r["turn"].as_u64().unwrap(),
            r["history"].as_array().unwrap(),
        );
        assert_eq!(history.len() as u64, 2 * turn - 1, "{r}");
        assert_eq!(history.last().unwrap()["text"], r["response"], "{r}");
        assert_eq!(history.last().unwrap()["role"], "policy");
        if turn == 2 {
            assert_eq!(history[1]["text"], "<tool: 1>");
            assert_eq!(history[1]["role"], "environment");
        }
        assert!(
            r["prompt"].as_str().unwrap().starts_with("Q: ") && r["answer"].is_string(),
            "{r}"
        );
    }
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(grpo.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for m in &metrics {
        // Every episode: 0.25 after turn 1, then 3 (the history's length).
        assert!((m["score"].as_f64().unwrap() - 3.25).abs() < 1e-9, "{m}");
        assert_eq!(m["turns"], 2.0, "{m}");
    }
    let df = rlhf_datasets::load::read_table(&grpo.join("rollouts/iter-0002.parquet")).unwrap();
    assert_eq!(df.height(), 16);
    let list = |c: &str, row: usize| {
        df.column(c)
            .unwrap()
            .list()
            .unwrap()
            .get_as_series(row)
            .unwrap()
    };
    let answers = df.column("answer").unwrap().str().unwrap().clone();
    for row in 0..df.height() {
        let roles: Vec<String> = list("turn_roles", row)
            .str()
            .unwrap()
            .iter()
            .map(|x| x.unwrap().to_owned())
            .collect();
        let texts: Vec<String> = list("turn_texts", row)
            .str()
            .unwrap()
            .iter()
            .map(|x| x.unwrap().to_owned())
            .collect();
        let tokens: Vec<u32> = list("turn_tokens", row)
            .u32()
            .unwrap()
            .iter()
            .flatten()
            .collect();
        assert_eq!(roles, ["policy", "environment", "policy"]);
        assert_eq!(texts[1], "<tool: 1>");
        assert_eq!(
            answers.get(row).unwrap(),
            texts.concat(),
            "the answer is every turn"
        );
        let adv: Vec<f64> = list("advantages", row)
            .f64()
            .unwrap()
            .iter()
            .flatten()
            .collect();
        let env = tokens[0] as usize..(tokens[0] + tokens[1]) as usize;
        assert!(
            adv[env].iter().all(|&a| a == 0.0),
            "environment tokens out of the loss"
        );
    }
}

#[test]
fn an_environment_that_writes_a_bad_line_stops_the_stage_naming_it() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("env.py"),
        "import sys\nfor l in sys.stdin:\n    print('{\"done\": \"yes\"}')\n",
    )
    .unwrap();
    let exp = experiment(d.path(), "{command: [python3, env.py], retries: 0}");
    let out = common::rlhf(&["run", exp.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("env.command") && err.contains("reply 1: `done` must be true or false"),
        "{err}"
    );
}

/// The shipped calculator environment answers as the rules the stage
/// tests learn from (`rlhf_datasets::calculator::reply`).
#[test]
fn the_shipped_calculator_environment_follows_the_calculator_rules() {
    let cases = [
        ("CALC 37*58", Some("2146")),
        ("CALC 12 + 5", None),
        ("CALC 3*x", None),
        ("A: 2146", Some("2146")),
        ("A: 2147", Some("2146")),
        ("no idea", Some("10")),
    ];
    let input: String = cases
        .iter()
        .map(|(r, a)| serde_json::json!({"episode": 0, "turn": 1, "prompt": "Q", "history": [], "response": r, "answer": a}).to_string() + "\n")
        .collect();
    let script = common::workspace().join("configs/calculator_env.py");
    let mut child = std::process::Command::new(common::python())
        .arg(&script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let got: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let want: Vec<serde_json::Value> = cases
        .iter()
        .map(|(r, a)| rlhf_datasets::calculator::reply(r, *a))
        .collect();
    assert_eq!(got, want);
}
