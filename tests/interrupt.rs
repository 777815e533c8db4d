//! Ctrl-C during `rlhf run`: the stage stops after its current step with a
//! checkpoint, the run exits 130, and a rerun finishes with the same
//! weights, bit for bit, as a run that was never interrupted.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rlhf_stages::checkpoint::{weights_of, HeadChoice};
use rlhf_stages::Model;

fn experiment(dir: &Path) -> std::path::PathBuf {
    let text =
        std::fs::read_to_string(common::workspace().join("datasets/task/sft.jsonl")).unwrap();
    std::fs::write(
        dir.join("sft.jsonl"),
        text.lines().take(200).collect::<Vec<_>>().join("\n") + "\n",
    )
    .unwrap();
    let exp = dir.join("exp.yaml");
    std::fs::write(
        &exp,
        "name: ctrlc\ndevice: cpu\nmodel: {n_layer: 1, n_head: 2, n_embd: 16, n_positions: 48}\nstages:\n\
         \x20 sft: {kind: sft, data: sft.jsonl, max_steps: 1500, batch_size: 8, checkpoint_every: 100000, eval_every: 100000}\n",
    )
    .unwrap();
    exp
}

fn rlhf_run(exp: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlhf"));
    c.args(["run", exp.to_str().unwrap()])
        .env("RUST_LOG", "info");
    c
}

fn final_weights(dir: &Path) -> std::collections::BTreeMap<String, tch::Tensor> {
    weights_of(
        &Model::load(
            &dir.join("runs/ctrlc/sft/checkpoint"),
            HeadChoice::AsSaved,
            tch::Device::Cpu,
        )
        .unwrap(),
    )
}

#[test]
fn ctrl_c_then_rerun_equals_an_uninterrupted_run() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let status = rlhf_run(&experiment(a.path())).output().unwrap().status;
    assert!(status.success());

    let exp = experiment(b.path());
    let child = rlhf_run(&exp)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = b.path().join("runs/ctrlc/sft/metrics.jsonl");
    let started = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 100 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "training never got going"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // What a terminal's Ctrl-C sends the runner.
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted after step"), "{stderr}");
    let checkpoints: Vec<_> = std::fs::read_dir(b.path().join("runs/ctrlc/sft/checkpoints"))
        .unwrap()
        .collect();
    assert_eq!(checkpoints.len(), 1, "the interrupt wrote its checkpoint");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(b.path().join("runs/ctrlc/sft/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["status"], "interrupted");

    let out = rlhf_run(&exp).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (wa, wb) = (final_weights(a.path()), final_weights(b.path()));
    for (k, t) in &wa {
        assert!(
            t.equal(&wb[k]),
            "{k} differs after the interrupted run was resumed"
        );
    }
}
