//! SIGKILL anywhere, rerun, same result: a run killed (runner and stage
//! process alike, no chance to clean up) mid-SFT, mid-DPO,
//! mid-reward-model, mid-GRPO, mid-PPO and mid-loop-round, rerun after each kill, ends with weights
//! bit-identical to a run that was never killed. A damaged checkpoint is
//! named and passed over for the one before it.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rlhf_stages::model::checkpoint::{weights_of, HeadChoice};
use rlhf_stages::Model;

use common::task_head as head;

fn experiment(dir: &Path) -> PathBuf {
    head("sft.jsonl", &dir.join("sft.jsonl"), 200);
    head("preferences.jsonl", &dir.join("prefs.jsonl"), 100);
    head("prompts.jsonl", &dir.join("prompts.jsonl"), 64);
    let exp = dir.join("exp.yaml");
    std::fs::write(
        &exp,
        "name: kill\nseed: 3\ndevice: cpu\nmodel: {n_layer: 1, n_head: 2, n_embd: 16, n_positions: 48}\nstages:\n\
         \x20 sft: {kind: sft, data: sft.jsonl, max_steps: 240, batch_size: 8, checkpoint_every: 30, eval_every: 100000}\n\
         \x20 rm: {kind: reward, init: sft, data: prefs.jsonl, max_steps: 160, batch_size: 4, checkpoint_every: 20, eval_every: 100000}\n\
         \x20 dpo: {kind: dpo, policy: sft, data: prefs.jsonl, max_steps: 60, batch_size: 4, checkpoint_every: 10, eval_every: 100000}\n\
         \x20 grpo: {kind: grpo, policy: sft, reward_model: rm, prompts: prompts.jsonl, iterations: 12, checkpoint_every: 2,\n\
         \x20        prompts_per_iteration: 2, group_size: 4, minibatch_size: 4, sampling: {max_new_tokens: 6}}\n\
         \x20 ppo:\n    kind: ppo\n    policy: sft\n    reward_model: rm\n    prompts: prompts.jsonl\n    iterations: 16\n\
         \x20   checkpoint_every: 2\n    rollout_batch: 8\n    minibatch_size: 4\n    ppo_epochs: 1\n    sampling: {max_new_tokens: 6}\n\
         loop:\n  repeat: [rm, ppo]\n  rounds: 1\n  prompts: prompts.jsonl\n  prompts_per_round: 6\n  k: 3\n\
         \x20 sampling: {max_new_tokens: 6}\n  labeller: {kind: gold}\n",
    )
    .unwrap();
    exp
}

/// `rlhf run --only sft`, which must succeed; returns its log.
fn run_sft_only(exp: &Path) -> String {
    let out = rlhf_run(exp)
        .args(["--only", "sft"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{log}");
    log
}

fn rlhf_run(exp: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlhf"));
    c.args(["run", exp.to_str().unwrap()]);
    c
}

/// Every process below `pid` (the runner's stage children), from /proc.
fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of: Vec<(u32, u32)> = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces, so split after ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|x| x.parse().ok()) {
            parent_of.push((p, ppid));
        }
    }
    let mut out = vec![];
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(c, pp) in &parent_of {
            if pp == p {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

/// SIGKILL for the runner and every process under it, as an OOM killer or
/// a preempted machine would.
fn kill_all(mut child: std::process::Child) {
    let below = descendants(child.id());
    child.kill().unwrap();
    for p in below {
        let _ = Command::new("kill")
            .args(["-KILL", &p.to_string()])
            .status();
    }
    let _ = child.wait();
}

fn has_checkpoint(stage_dir: &Path) -> bool {
    std::fs::read_dir(stage_dir.join("checkpoints")).is_ok_and(|d| {
        d.flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("step-"))
    })
}

/// Starts `rlhf run`, waits until `stage_dir` has a periodic checkpoint,
/// then SIGKILLs the runner and every process under it.
fn kill_when_checkpointed(exp: &Path, stage_dir: &Path) {
    let mut child = rlhf_run(exp)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !has_checkpoint(stage_dir) {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the run ended ({status}) before {} checkpointed",
                stage_dir.display()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    kill_all(child);
    // The stage process is gone too: no manifest says it finished.
    std::thread::sleep(Duration::from_millis(50));
    let manifest = std::fs::read_to_string(stage_dir.join("manifest.json")).unwrap_or_default();
    assert!(
        !manifest.contains("\"complete\""),
        "{} finished",
        stage_dir.display()
    );
}

const FINAL: [&str; 8] = [
    "sft/checkpoint",
    "dpo/checkpoint",
    "rm/checkpoint",
    "grpo/checkpoint",
    "ppo/checkpoint",
    "ppo/critic",
    "round-1/rm/checkpoint",
    "round-1/ppo/checkpoint",
];

/// Each of `folders` (relative to the run) holds the same weights in the
/// runs under `a` and `b`.
fn assert_same_weights(a: &Path, b: &Path, folders: &[&str]) {
    for f in folders {
        let load = |root: &Path| {
            weights_of(
                &Model::load(
                    &root.join("runs/kill").join(f),
                    HeadChoice::AsSaved,
                    tch::Device::Cpu,
                )
                .unwrap_or_else(|e| panic!("{f}: {e}")),
            )
        };
        let (wa, wb) = (load(a), load(b));
        assert_eq!(wa.len(), wb.len());
        for (k, t) in &wa {
            assert!(
                t.equal(&wb[k]),
                "{f}: {k} differs from the uninterrupted run"
            );
        }
    }
}

#[test]
fn killed_in_every_stage_and_rerun_equals_an_uninterrupted_run() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let out = rlhf_run(&experiment(a.path())).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let exp = experiment(b.path());
    let run = b.path().join("runs/kill");
    // In the plan's order: sft, dpo, rm, grpo, ppo, then the round.
    for stage in [
        "sft",
        "dpo",
        "rm",
        "grpo",
        "ppo",
        "round-1/rm",
        "round-1/ppo",
    ] {
        kill_when_checkpointed(&exp, &run.join(stage));
    }
    let out = rlhf_run(&exp).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("resuming from"),
        "the last stage resumed:\n{log}"
    );
    assert_same_weights(a.path(), b.path(), &FINAL);
}

#[test]
fn a_damaged_periodic_checkpoint_is_named_and_the_one_before_it_used() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let exp_a = experiment(a.path());
    run_sft_only(&exp_a);

    // Kill mid-SFT once two periodic checkpoints exist.
    let exp = experiment(b.path());
    let sft = b.path().join("runs/kill/sft");
    let mut child = rlhf_run(&exp)
        .args(["--only", "sft"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let count = || std::fs::read_dir(sft.join("checkpoints")).map_or(0, |d| d.count());
    while count() < 2 {
        assert!(child.try_wait().unwrap().is_none(), "finished too soon");
        assert!(started.elapsed() < Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(5));
    }
    kill_all(child);
    let mut steps: Vec<PathBuf> = std::fs::read_dir(sft.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("step-")
        })
        .collect();
    steps.sort();
    let newest = steps.last().unwrap().clone();
    // Truncate the newest checkpoint's weights, as a full disk would.
    let weights = newest.join("model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let direct = Model::load(&newest, HeadChoice::AsSaved, tch::Device::Cpu)
        .expect_err("a truncated checkpoint must not load")
        .to_string();
    assert!(
        direct.contains("model.safetensors") && direct.contains("corrupt"),
        "{direct}"
    );

    let log = run_sft_only(&exp);
    assert!(
        log.contains(&format!("checkpoint {} is unusable", newest.display()))
            && log.contains("falling back"),
        "{log}"
    );
    assert_same_weights(a.path(), b.path(), &["sft/checkpoint"]);
}

#[test]
fn a_damaged_finished_checkpoint_is_reported_and_the_stage_rerun() {
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path());
    run_sft_only(&exp);
    let ckpt = d.path().join("runs/kill/sft/checkpoint");
    let before = weights_of(&Model::load(&ckpt, HeadChoice::AsSaved, tch::Device::Cpu).unwrap());
    // Flip one byte in the middle of the weights.
    let weights = ckpt.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&weights, bytes).unwrap();

    // Loading it directly: a clear error naming the file.
    let out = common::rlhf(&[
        "generate",
        "--model",
        ckpt.to_str().unwrap(),
        "--prompt",
        "Upper: cat\n",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("model.safetensors") && err.contains("corrupt"),
        "{err}"
    );

    // The runner does not trust it: it says so and runs the stage again.
    let log = run_sft_only(&exp);
    assert!(
        log.contains("corrupt") && !log.contains("[sft] cached"),
        "{log}"
    );
    let after = weights_of(&Model::load(&ckpt, HeadChoice::AsSaved, tch::Device::Cpu).unwrap());
    for (k, t) in &before {
        assert!(t.equal(&after[k]), "{k}: the rerun gives the same weights");
    }
}
