//! Ctrl-C during `rlhf run`, in each stage kind: the stage stops after its
//! current step (PPO: iteration) with a checkpoint, the run exits 130 and
//! starts nothing new, and a rerun finishes with the same weights, bit for
//! bit, as a run that was never interrupted.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rlhf_stages::model::checkpoint::{weights_of, HeadChoice};
use rlhf_stages::Model;

const EXPERIMENT: &str = "name: ctrlc\ndevice: cpu\nmodel: {n_layer: 1, n_head: 2, n_embd: 16, n_positions: 48}\nstages:\n\
\x20 sft: {kind: sft, data: sft.jsonl, max_steps: 600, batch_size: 8, checkpoint_every: 100000, eval_every: 100000}\n\
\x20 rm: {kind: reward, init: sft, data: prefs.jsonl, max_steps: 600, batch_size: 2, max_len: 48, checkpoint_every: 100000, eval_every: 100000}\n\
\x20 ppo: {kind: ppo, policy: sft, reward_model: rm, prompts: prompts.jsonl, iterations: 60, rollout_batch: 8, minibatch_size: 4, ppo_epochs: 1, sampling: {max_new_tokens: 8}, checkpoint_every: 100000}\n";

fn experiment(dir: &Path) -> PathBuf {
    common::task_head("sft.jsonl", &dir.join("sft.jsonl"), 200);
    common::task_head("preferences.jsonl", &dir.join("prefs.jsonl"), 200);
    common::task_head("prompts.jsonl", &dir.join("prompts.jsonl"), 64);
    let exp = dir.join("exp.yaml");
    std::fs::write(&exp, EXPERIMENT).unwrap();
    exp
}

fn rlhf_run(exp: &Path, only: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlhf"));
    c.args(["run", exp.to_str().unwrap(), "--only", only])
        .env("RUST_LOG", "info")
        // One thread each: these tests run side by side on a small machine,
        // where spinning OpenMP threads of four processes slow all of them.
        .env("RLHF_THREADS", "1");
    c
}

/// A stage's final weights: `part` is `checkpoint` or PPO's `critic`.
fn final_weights(dir: &Path, stage: &str, part: &str) -> Vec<(String, tch::Tensor)> {
    let path = dir.join("runs/ctrlc").join(stage).join(part);
    let model = Model::load(&path, HeadChoice::AsSaved, tch::Device::Cpu).unwrap();
    weights_of(&model).into_iter().collect()
}

/// One uninterrupted run of every stage, shared by the tests.
fn reference() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let out = rlhf_run(&experiment(d.path()), "ppo").output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        d
    })
    .path()
}

/// Runs the experiment up to `run_to`, sends the runner SIGINT (a
/// terminal's Ctrl-C) once `stage` has logged `lines` steps, checks the
/// stop (and that no later stage started), reruns, and compares the
/// stage's final weights with the uninterrupted run's.
fn interrupt_then_rerun(stage: &str, run_to: &str, lines: usize, parts: &[&str]) {
    let reference = reference();
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path());
    let child = rlhf_run(&exp, run_to)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stage_dir = d.path().join("runs/ctrlc").join(stage);
    let metrics = stage_dir.join("metrics.jsonl");
    let mut child = common::Drained::new(child);
    child.wait_until(
        &format!("{stage}'s {lines} logged steps"),
        Duration::from_secs(600),
        || std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) >= lines,
    );
    let (status, stderr) = child.interrupt();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted after step"), "{stderr}");
    assert!(
        stderr.contains("rerun to resume it from its checkpoint at step"),
        "{stderr}"
    );
    let checkpoints = std::fs::read_dir(stage_dir.join("checkpoints")).unwrap();
    assert_eq!(checkpoints.count(), 1, "the interrupt wrote its checkpoint");
    assert!(
        !stage_dir.join("checkpoint").exists(),
        "{stage} did not finish"
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(stage_dir.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["status"], "interrupted");
    if run_to != stage {
        let later = d.path().join("runs/ctrlc").join(run_to);
        assert!(!later.exists(), "{run_to} was started after the interrupt");
    }

    let out = rlhf_run(&exp, run_to).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resuming from"), "{stderr}");
    for part in parts {
        let (a, b) = (
            final_weights(reference, stage, part),
            final_weights(d.path(), stage, part),
        );
        assert_eq!(a.len(), b.len());
        for ((k, x), (_, y)) in a.iter().zip(&b) {
            assert!(
                x.equal(y),
                "{stage}/{part}: {k} differs after the resumed run"
            );
        }
    }
    if stage == "ppo" {
        // The summary of the resumed run reports iteration 1's score.
        let first = |dir: &Path| -> serde_json::Value {
            let path = dir.join("runs/ctrlc/ppo/summary.json");
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
            v["first_mean_score"].clone()
        };
        assert!(first(reference).is_f64());
        assert_eq!(first(reference), first(d.path()));
    }
}

#[test]
fn ctrl_c_in_sft_then_rerun_equals_an_uninterrupted_run() {
    interrupt_then_rerun("sft", "sft", 100, &["checkpoint"]);
}

#[test]
fn ctrl_c_in_the_reward_model_then_rerun_equals_an_uninterrupted_run() {
    interrupt_then_rerun("rm", "ppo", 100, &["checkpoint"]);
}

#[test]
fn ctrl_c_in_ppo_then_rerun_equals_an_uninterrupted_run() {
    interrupt_then_rerun("ppo", "ppo", 5, &["checkpoint", "critic"]);
}

/// A step of very many micro-batches: one Ctrl-C abandons it once the
/// grace period is over (1 s here), instead of waiting for its end.
#[test]
fn ctrl_c_inside_an_enormous_step_stops_after_the_grace_period() {
    let d = tempfile::tempdir().unwrap();
    common::task_head("sft.jsonl", &d.path().join("sft.jsonl"), 200);
    let exp = d.path().join("exp.yaml");
    std::fs::write(
        &exp,
        "name: ctrlc\ndevice: cpu\nmodel: {n_layer: 1, n_head: 2, n_embd: 16, n_positions: 48}\nstages:\n\
         \x20 sft: {kind: sft, data: sft.jsonl, max_steps: 2, batch_size: 1, grad_accum: 65536}\n",
    )
    .unwrap();
    let child = rlhf_run(&exp, "sft")
        .env("RLHF_STEP_GRACE_SECONDS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = d.path().join("runs/ctrlc/sft/metrics.jsonl");
    let mut child = common::Drained::new(child);
    // The step-0 eval line: the first step has begun.
    child.wait_until("sft's first step", Duration::from_secs(600), || {
        metrics.exists()
    });
    std::thread::sleep(Duration::from_millis(500));
    let sent = Instant::now();
    let (status, stderr) = child.interrupt();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(
        stderr
            .contains("interrupted inside step 1, which was still running 1 s after the interrupt"),
        "{stderr}"
    );
    assert!(
        stderr.contains("it stopped before its first checkpoint: rerun to start it again"),
        "no checkpoint is claimed: {stderr}"
    );
    assert!(
        sent.elapsed() < Duration::from_secs(15),
        "took {:?}",
        sent.elapsed()
    );
}
