//! Data parallelism through libtorch's c10d (Gloo on 127.0.0.1): a stage
//! run as two ranks, started the way torchrun starts them (`RANK`,
//! `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), ends with the weights and
//! the loss curve of one process on the same global batch.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use rlhf_stages::checkpoint::{weights_of, HeadChoice};
use rlhf_stages::Model;

const EXPERIMENT: &str = "name: dp\ndevice: cpu\nmodel: {n_layer: 2, n_head: 2, n_embd: 32, n_positions: 64}\nstages:\n\
\x20 sft: {kind: sft, data: sft.jsonl, max_steps: 12, batch_size: 8, grad_accum: 2, eval_every: 4, checkpoint_every: 5}\n\
\x20 rm: {kind: reward, init: sft, data: prefs.jsonl, max_steps: 10, batch_size: 6, max_len: 64, eval_every: 5, checkpoint_every: 4}\n";

fn experiment(dir: &Path) -> PathBuf {
    common::task_head("sft.jsonl", &dir.join("sft.jsonl"), 150);
    common::task_head("preferences.jsonl", &dir.join("prefs.jsonl"), 120);
    let exp = dir.join("exp.yaml");
    std::fs::write(&exp, EXPERIMENT).unwrap();
    exp
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `rlhf stage` as rank `rank` of `world` (world 1: alone, no variables).
fn stage(exp: &Path, name: &str, out: &Path, rank: usize, world: usize, port: u16) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlhf"));
    c.args([
        "--threads",
        "1",
        "stage",
        "--config",
        exp.to_str().unwrap(),
        name,
    ])
    .args(["--out", out.to_str().unwrap()])
    .env("RUST_LOG", "info")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if world > 1 {
        c.env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("RLHF_DIST_TIMEOUT_SECONDS", "60");
    }
    c.spawn().unwrap()
}

/// Runs stage `name` as `world` ranks into `out`; panics if one fails.
fn run_ranks(exp: &Path, name: &str, out: &Path, world: usize) {
    let port = free_port();
    let children: Vec<Child> = (0..world)
        .map(|r| stage(exp, name, out, r, world, port))
        .collect();
    for (rank, child) in children.into_iter().enumerate() {
        let o = child.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "rank {rank} of {world}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// The largest difference of any weight, but those in `skip`.
fn max_abs_difference(a: &Path, b: &Path, skip: &[&str]) -> f64 {
    let load = |p: &Path| {
        let m = Model::load(&p.join("checkpoint"), HeadChoice::AsSaved, tch::Device::Cpu).unwrap();
        weights_of(&m)
    };
    let (a, b) = (load(a), load(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .filter(|(k, _)| !skip.contains(&k.as_str()))
        .map(|(k, x)| (x - &b[k]).abs().max().double_value(&[]))
        .fold(0.0, f64::max)
}

/// `key` of every metrics line that has it.
fn curve(dir: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?[key].as_f64())
        .collect()
}

fn assert_same_run(one: &Path, two: &Path, what: &str, skip: &[&str]) {
    let diff = max_abs_difference(one, two, skip);
    assert!(diff < 1e-5, "{what}: weights differ by {diff}");
    for key in ["loss", "eval_loss"] {
        let (a, b) = (curve(one, key), curve(two, key));
        assert_eq!(a.len(), b.len(), "{what}: {key} curves of other lengths");
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{what}: {key} {x} vs {y}");
        }
    }
    assert!(
        !two.join("checkpoints").exists()
            || std::fs::read_dir(two.join("checkpoints")).unwrap().count() == 0
    );
}

#[test]
fn two_ranks_train_sft_and_the_reward_model_as_one_process_does() {
    if !rlhf_stages::dist::backends().0 {
        eprintln!("built without the Gloo backend: skipped");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path());
    let runs = d.path().join("runs/dp");
    run_ranks(&exp, "sft", &runs.join("sft"), 1);
    run_ranks(&exp, "sft", &d.path().join("sft-2"), 2);
    assert_same_run(&runs.join("sft"), &d.path().join("sft-2"), "sft", &[]);
    // The reward model starts from the one-process SFT (its `init`).
    run_ranks(&exp, "rm", &d.path().join("rm-1"), 1);
    run_ranks(&exp, "rm", &d.path().join("rm-2"), 2);
    // The Bradley-Terry loss does not change when every reward shifts by a
    // constant, so the gradient of the head's bias (and of ln_f's bias along
    // the head) is zero but for rounding, which AdamW scales up to steps of
    // the learning rate: those two differ between any two summation orders.
    // The rewards' gaps, which the loss sees, are compared through the eval
    // loss curve above.
    assert_same_run(
        &d.path().join("rm-1"),
        &d.path().join("rm-2"),
        "rm",
        &["score.bias", "ln_f.bias"],
    );
    let acc = curve(&d.path().join("rm-2"), "accuracy");
    assert_eq!(
        acc,
        curve(&d.path().join("rm-1"), "accuracy"),
        "accuracy summed over ranks"
    );
}
