//! `rlhf run` and `rlhf plan` on a tiny experiment: the plan's order, a
//! run that writes every artifact and manifest, a second run that is all
//! cache hits, and misses when a setting or an input file changes.

mod common;

use std::path::Path;

use common::{rlhf, workspace};

fn head(src: &str, dst: &Path, n: usize) {
    let text = std::fs::read_to_string(workspace().join("datasets/task").join(src)).unwrap();
    std::fs::write(
        dst,
        text.lines().take(n).collect::<Vec<_>>().join("\n") + "\n",
    )
    .unwrap();
}

fn experiment(dir: &Path) -> std::path::PathBuf {
    head("sft.jsonl", &dir.join("sft.jsonl"), 64);
    head("preferences.jsonl", &dir.join("prefs.jsonl"), 16);
    let exp = dir.join("exp.yaml");
    std::fs::write(
        &exp,
        "name: tiny\ndevice: cpu\nmodel: {n_layer: 1, n_head: 2, n_embd: 16, n_positions: 48}\nstages:\n\
         \x20 rm:\n    kind: reward\n    init: sft\n    data: prefs.jsonl\n    max_steps: 2\n    batch_size: 4\n\
         \x20 sft:\n    kind: sft\n    data: sft.jsonl\n    max_steps: 3\n    batch_size: 8\n",
    )
    .unwrap();
    exp
}

/// Runs `rlhf run`; returns stderr, which logs each stage as cached or run.
fn run(exp: &Path, extra: &[&str]) -> String {
    let mut args = vec!["run", exp.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = rlhf(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "rlhf run failed:\n{stderr}");
    stderr
}

fn cached(stderr: &str, stage: &str) -> bool {
    stderr.contains(&format!("[{stage}] cached"))
}

#[test]
fn plan_run_cache_hit_and_misses() {
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path());
    let plan = String::from_utf8(rlhf(&["plan", exp.to_str().unwrap()]).stdout).unwrap();
    assert!(
        plan.contains("1. sft (sft): to run") && plan.contains("2. rm (reward) after sft: to run"),
        "{plan}"
    );

    let log = run(&exp, &[]);
    assert!(!cached(&log, "sft") && !cached(&log, "rm"), "{log}");
    let runs = d.path().join("runs/tiny");
    for stage in ["sft", "rm"] {
        for f in [
            "manifest.json",
            "metrics.jsonl",
            "summary.json",
            "checkpoint/model.safetensors",
            "checkpoint/optimizer.safetensors",
        ] {
            assert!(runs.join(stage).join(f).exists(), "{stage}/{f} missing");
        }
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runs.join("rm/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["status"], "complete");
    assert!(manifest["upstream"]["sft"].is_string());
    assert!(manifest["inputs"]
        .as_object()
        .unwrap()
        .keys()
        .any(|k| k.ends_with("prefs.jsonl")));

    // Nothing changed: all cached, nothing rewritten.
    let before = std::fs::metadata(runs.join("rm/checkpoint/model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    let log = run(&exp, &[]);
    assert!(cached(&log, "sft") && cached(&log, "rm"), "{log}");
    assert_eq!(
        before,
        std::fs::metadata(runs.join("rm/checkpoint/model.safetensors"))
            .unwrap()
            .modified()
            .unwrap()
    );
    let plan = String::from_utf8(rlhf(&["plan", exp.to_str().unwrap()]).stdout).unwrap();
    assert!(
        plan.contains("sft (sft): cached") && plan.contains("after sft: cached"),
        "{plan}"
    );

    // A setting of rm changes: rm reruns, sft stays cached.
    let log = run(&exp, &["--set", "stages.rm.max_steps=3"]);
    assert!(cached(&log, "sft") && !cached(&log, "rm"), "{log}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runs.join("rm/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["steps"], 3);

    // An input file of sft changes: sft and (through its key) rm rerun.
    let mut data = std::fs::read_to_string(d.path().join("sft.jsonl")).unwrap();
    data.push_str("{\"prompt\": \"Add: 1+1\\n\", \"completion\": \"2\"}\n");
    std::fs::write(d.path().join("sft.jsonl"), data).unwrap();
    let log = run(&exp, &[]);
    assert!(!cached(&log, "sft") && !cached(&log, "rm"), "{log}");

    // --force reruns a stage and what depends on it; --only stops there.
    let log = run(&exp, &["--force", "sft", "--only", "sft"]);
    assert!(!cached(&log, "sft") && !log.contains("[rm]"), "{log}");
}

#[test]
fn cycles_and_dangling_references_are_errors() {
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path());
    let text = std::fs::read_to_string(&exp).unwrap();
    std::fs::write(
        &exp,
        text.replace(
            "    data: sft.jsonl\n",
            "    data: sft.jsonl\n    init: rm\n",
        ),
    )
    .unwrap();
    let out = rlhf(&["plan", exp.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cycle: rm -> sft -> rm"),
        "{err}"
    );
    std::fs::write(&exp, text.replace("init: sft", "init: sfx")).unwrap();
    let out = rlhf(&["run", exp.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("stages.rm: init") && err.contains("sfx"),
        "{err}"
    );
}
