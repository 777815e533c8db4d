//! Data parallelism through libtorch's c10d (Gloo on 127.0.0.1): a stage
//! run as two ranks, started the way torchrun starts them (`RANK`,
//! `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), ends with the weights and
//! the loss curve of one process on the same global batch.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use rlhf_stages::model::checkpoint::{weights_of, HeadChoice};
use rlhf_stages::Model;

const EXPERIMENT: &str = "name: dp\ndevice: cpu\nmodel: {n_layer: 2, n_head: 2, n_embd: 32, n_positions: 64}\nstages:\n\
\x20 sft: {kind: sft, data: sft.jsonl, max_steps: 12, batch_size: 8, grad_accum: 2, eval_every: 4, checkpoint_every: 5}\n\
\x20 rm: {kind: reward, init: sft, data: prefs.jsonl, max_steps: 10, batch_size: 6, max_len: 64, eval_every: 5, checkpoint_every: 4}\n\
\x20 dpo: {kind: dpo, policy: sft, data: prefs.jsonl, max_steps: 8, batch_size: 6, max_len: 64, eval_every: 4, checkpoint_every: 4}\n\
\x20 ppo: {kind: ppo, policy: sft, reward_model: rm, prompts: prompts.jsonl, iterations: 3, rollout_batch: 8, minibatch_size: 4,\n\
\x20       ppo_epochs: 2, checkpoint_every: 2, adaptive_kl: {target: 0.05, horizon: 10}, sampling: {max_new_tokens: 8, temperature: 0}}\n\
\x20 grpo: {kind: grpo, policy: sft, reference: dpo, reward_model: rm, prompts: prompts.jsonl, eval_prompts: prompts.jsonl, iterations: 3,\n\
\x20        prompts_per_iteration: 4, group_size: 4, minibatch_size: 8, epochs: 2, beta: 0.5, checkpoint_every: 2,\n\
\x20        optimizer: {lr: 0.001}, sampling: {max_new_tokens: 8, temperature: 0}}\n";

fn experiment(dir: &Path) -> PathBuf {
    common::task_head("sft.jsonl", &dir.join("sft.jsonl"), 150);
    common::task_head("preferences.jsonl", &dir.join("prefs.jsonl"), 120);
    common::task_head("prompts.jsonl", &dir.join("prompts.jsonl"), 32);
    let exp = dir.join("exp.yaml");
    std::fs::write(&exp, EXPERIMENT).unwrap();
    exp
}

/// Whether the binary has Gloo. Without it these tests fail (a broken
/// header detection must not pass as skipped tests) unless
/// `RLHF_ALLOW_NO_GLOO` says that build is meant.
fn gloo_or_allowed_to_skip() -> bool {
    if rlhf_stages::dist::backends().0 {
        return true;
    }
    assert!(
        std::env::var_os("RLHF_ALLOW_NO_GLOO").is_some(),
        "built without the Gloo backend (no gloo headers: Debian's libgloo-dev); set RLHF_ALLOW_NO_GLOO=1 to skip"
    );
    eprintln!("built without the Gloo backend: skipped (RLHF_ALLOW_NO_GLOO)");
    false
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
    let port = common::free_port();
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
    max_abs_difference_of(a, b, "checkpoint", skip)
}

fn max_abs_difference_of(a: &Path, b: &Path, part: &str, skip: &[&str]) -> f64 {
    let load = |p: &Path| {
        let m = Model::load(&p.join(part), HeadChoice::AsSaved, tch::Device::Cpu).unwrap();
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
fn two_ranks_train_sft_the_reward_model_and_dpo_as_one_process_does() {
    if !gloo_or_allowed_to_skip() {
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
    // DPO from the same SFT: the reference's log-probabilities computed on
    // each rank, each rank's share of every batch, the same weights.
    run_ranks(&exp, "dpo", &d.path().join("dpo-1"), 1);
    run_ranks(&exp, "dpo", &d.path().join("dpo-2"), 2);
    assert_same_run(&d.path().join("dpo-1"), &d.path().join("dpo-2"), "dpo", &[]);
    let acc = curve(&d.path().join("rm-2"), "accuracy");
    assert_eq!(
        acc,
        curve(&d.path().join("rm-1"), "accuracy"),
        "accuracy summed over ranks"
    );
}

/// `distributed: {nproc_per_node: 2}`: `rlhf run` starts the ranks itself;
/// the plan shows the batch arithmetic, and a batch that does not divide
/// among the ranks is refused by name.
#[test]
fn rlhf_run_starts_the_ranks_of_each_stage() {
    if !gloo_or_allowed_to_skip() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path());
    let exp_s = exp.to_str().unwrap();
    let two = ["--set", "distributed.nproc_per_node=2"];
    let plan = common::rlhf_ok(&[&["plan", exp_s][..], &two].concat());
    assert!(
        plan.contains("global batch 16 = 2 rank(s) x 4 per micro-batch x 2 accumulation")
            && plan.contains("rollout_batch 8 = 2 rank(s) x 4; minibatch_size 4 = 2 rank(s) x 2"),
        "{plan}"
    );
    let out = common::rlhf(&[&["run", exp_s, "--threads", "1"][..], &two].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("[sft r1] ") && stderr.contains("rank 1 of 2"),
        "{stderr}"
    );
    let runs = d.path().join("runs/dp");
    run_ranks(&exp, "sft", &d.path().join("sft-1"), 1);
    assert_same_run(&d.path().join("sft-1"), &runs.join("sft"), "sft", &[]);
    let bad = common::rlhf(&["plan", exp_s, "--set", "distributed.nproc_per_node=3"]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    // The first stage (by name) whose batch does not divide, at the line
    // of the setting.
    assert!(
        stderr.contains(
            "stages.grpo.prompts_per_iteration: 4 does not divide among the 3 ranks of distributed.nproc_per_node"
        ) && stderr.ends_with("at line 11\n"),
        "{stderr}"
    );
}

/// The metrics `keys` of two RL runs agree at each of `iterations`.
fn assert_same_curves(one: &Path, two: &Path, keys: &[&str], iterations: usize) {
    for key in keys {
        let (a, b) = (curve(one, key), curve(two, key));
        assert_eq!(a.len(), iterations, "{key}: {a:?}");
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{key}: {x} vs {y}");
        }
    }
}

/// Each iteration's rollout file of two RL runs holds the same `rows`
/// answers to the same prompts: the whole batch, gathered from the ranks.
fn assert_same_rollouts(one: &Path, two: &Path, iterations: usize, rows: usize) {
    let files = std::fs::read_dir(two.join("rollouts")).unwrap().count();
    assert_eq!(
        files, iterations,
        "one Parquet file per iteration, written by rank 0"
    );
    for it in 1..=iterations {
        let file = format!("rollouts/iter-{it:04}.parquet");
        let read = |dir: &Path| {
            rlhf_datasets::rollout::read_prompts_and_answers(&dir.join(&file)).unwrap()
        };
        let (a, b) = (read(one), read(two));
        assert_eq!(a.len(), rows, "{file}");
        assert_eq!(
            a, b,
            "{file}: the gathered rollout differs from one process's"
        );
    }
}

/// The pid of the `rlhf stage` process that is rank `rank` of a run in `dir`.
fn rank_pid(dir: &Path, rank: usize) -> Option<u32> {
    let want = format!("RANK={rank}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        let environ = std::fs::read(e.path().join("environ")).ok()?;
        let is_rank = environ.split(|&b| b == 0).any(|v| v == want.as_bytes());
        (cmdline.contains("stage") && cmdline.contains(dir.to_str()?) && is_rank).then_some(pid)
    })
}

/// Reruns `args` after a stop: it must resume and end where an
/// uninterrupted run with `sets` ends.
fn rerun_resumes_as_uninterrupted(dir: &Path, args: &[&str], sets: &[&str]) {
    let out = common::rlhf(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.contains("resuming from"),
        "{stderr}"
    );
    assert_equals_uninterrupted(dir, sets);
}

/// Runs the experiment's SFT uninterrupted under another name with `sets`
/// and checks that the resumed run in `runs/dp` equals it bit for bit.
fn assert_equals_uninterrupted(dir: &Path, sets: &[&str]) {
    let whole = dir.join("whole.yaml");
    std::fs::write(&whole, EXPERIMENT.replace("name: dp", "name: whole")).unwrap();
    let base = [
        "run",
        whole.to_str().unwrap(),
        "--only",
        "sft",
        "--threads",
        "1",
    ];
    let out = common::rlhf(&[&base[..], sets].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (a, b) = (dir.join("runs/whole/sft"), dir.join("runs/dp/sft"));
    assert_eq!(
        max_abs_difference(&a, &b, &[]),
        0.0,
        "resumed vs uninterrupted"
    );
}

/// Starts `rlhf ARGS` (SFT as two ranks), sends rank 1 `signal` once the
/// stage has logged `lines` steps, and waits for the run: whether it
/// succeeded, its stderr, and the seconds it took after the signal.
fn signal_rank_one(dir: &Path, args: &[&str], lines: usize, signal: &str) -> (bool, String, u64) {
    let metrics = dir.join("runs/dp/sft/metrics.jsonl");
    let mut child = common::Rlhf::new(args).spawn();
    child.wait_until(
        &format!("sft's {lines} logged steps"),
        std::time::Duration::from_secs(600),
        || std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) >= lines,
    );
    let pid = rank_pid(dir, 1).expect("rank 1 is running");
    Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    let sent = std::time::Instant::now();
    let (status, stderr) = child.wait();
    (status.success(), stderr, sent.elapsed().as_secs())
}

/// A rank killed mid-stage: the run fails within the timeout naming that
/// rank, and the rerun resumes and ends bit for bit as an uninterrupted
/// run of the same ranks.
#[test]
fn a_killed_rank_fails_the_stage_by_name_and_the_rerun_matches() {
    if !gloo_or_allowed_to_skip() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path());
    let exp_s = exp.to_str().unwrap();
    let long = [
        "--set",
        "stages.sft.max_steps=300",
        "--set",
        "stages.sft.checkpoint_every=40",
        "--set",
        "distributed.timeout_seconds=20",
    ];
    let two = [&long[..], &["--set", "distributed.nproc_per_node=2"]].concat();
    let args = [&["run", exp_s, "--only", "sft", "--threads", "1"][..], &two].concat();
    let (ok, stderr, seconds) = signal_rank_one(d.path(), &args, 60, "-KILL");
    assert!(!ok);
    assert!(
        stderr.contains("sft: rank 1 of 2 failed first (signal: 9 (SIGKILL))"),
        "{stderr}"
    );
    assert!(seconds < 60, "{seconds} s");
    let args = [&["run", exp_s, "--only", "sft", "--threads", "1"][..], &two].concat();
    rerun_resumes_as_uninterrupted(d.path(), &args, &two);
}

/// The same two ranks started by PyTorch's own launcher from the venv:
/// `torchrun --no-python --nproc-per-node 2 rlhf stage ...` (its agent
/// hosts the store; every rank connects to it).
#[test]
fn torchrun_starts_the_ranks_and_they_train_as_one_process() {
    if !gloo_or_allowed_to_skip() {
        return;
    }
    let torchrun = common::python().with_file_name("torchrun");
    assert!(
        torchrun.exists(),
        "no torchrun beside {}",
        common::python().display()
    );
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path());
    let torchrun_stage = |name: &str, out: &Path| {
        let o = Command::new(&torchrun)
            .args(["--no-python", "--nproc-per-node", "2", "--master-port"])
            .arg(common::free_port().to_string())
            .arg(env!("CARGO_BIN_EXE_rlhf"))
            .args([
                "--threads",
                "1",
                "stage",
                "--config",
                exp.to_str().unwrap(),
                name,
                "--out",
            ])
            .arg(out)
            .env("RUST_LOG", "info")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{stderr}");
        assert!(
            stderr.contains("rank 1 of 2 (local 1, Torchrun)"),
            "{stderr}"
        );
    };
    let out = d.path().join("sft-torchrun");
    torchrun_stage("sft", &out);
    run_ranks(&exp, "sft", &d.path().join("runs/dp/sft"), 1);
    assert_same_run(&d.path().join("runs/dp/sft"), &out, "sft", &[]);
    // The reward model from that SFT (its `init`); its biases as in the
    // two-rank test above.
    let out = d.path().join("rm-torchrun");
    torchrun_stage("rm", &out);
    run_ranks(&exp, "rm", &d.path().join("rm-1"), 1);
    assert_same_run(
        &d.path().join("rm-1"),
        &out,
        "rm",
        &["score.bias", "ln_f.bias"],
    );
}

/// PPO as two ranks: each samples and scores half of the rollout batch,
/// every rank holds the gathered batch (advantages whitened over all of
/// it), each minibatch is split between them. With greedy answers (no
/// sampling noise to share) the policy and the critic end as one
/// process's, within 1e-5, with the same score and KL curves.
#[test]
fn two_ranks_train_ppo_as_one_process_does() {
    if !gloo_or_allowed_to_skip() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path());
    let runs = d.path().join("runs/dp");
    run_ranks(&exp, "sft", &runs.join("sft"), 1);
    run_ranks(&exp, "rm", &runs.join("rm"), 1);
    let (one, two) = (d.path().join("ppo-1"), d.path().join("ppo-2"));
    run_ranks(&exp, "ppo", &one, 1);
    run_ranks(&exp, "ppo", &two, 2);
    for part in ["checkpoint", "critic"] {
        let diff = max_abs_difference_of(&one, &two, part, &[]);
        assert!(diff < 1e-5, "ppo {part}: weights differ by {diff}");
    }
    let keys = [
        "score",
        "kl",
        "beta",
        "policy_loss",
        "value_loss",
        "entropy",
    ];
    assert_same_curves(&one, &two, &keys, 3);
    let beta = curve(&two, "beta");
    assert!(
        beta[2] != beta[0],
        "the adaptive KL controller moved beta: {beta:?}"
    );
    // Each holds the whole batch, both ranks' rows, as one process's does.
    assert_same_rollouts(&one, &two, 3, 8);
}

/// GRPO as two ranks: each samples whole groups for its share of the
/// prompts; the gathered groups give every rank the same advantages, and
/// the split minibatches the same steps as one process. Sampling is
/// greedy, so that both draw the same answers; a group's answers are then
/// alike and its advantages zero, so the steps come from the KL to a
/// reference that is another model (the DPO stage's), per answer and
/// token as the loss normalises it.
#[test]
fn two_ranks_train_grpo_as_one_process_does() {
    if !gloo_or_allowed_to_skip() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path());
    let runs = d.path().join("runs/dp");
    for stage in ["sft", "rm", "dpo"] {
        run_ranks(&exp, stage, &runs.join(stage), 1);
    }
    let (one, two) = (d.path().join("grpo-1"), d.path().join("grpo-2"));
    run_ranks(&exp, "grpo", &one, 1);
    run_ranks(&exp, "grpo", &two, 2);
    let diff = max_abs_difference_of(&one, &two, "checkpoint", &[]);
    assert!(diff < 1e-5, "grpo: weights differ by {diff}");
    let moved = max_abs_difference_of(&one, &runs.join("sft"), "checkpoint", &[]);
    assert!(moved > 1e-4, "the policy moved from the SFT's: {moved}");
    let keys = ["score", "kl", "policy_loss", "clip_fraction", "zero_spread"];
    assert_same_curves(&one, &two, &keys, 3);
    // Rollout files hold the whole iteration (4 prompts x 4 answers).
    assert_same_rollouts(&one, &two, 3, 16);
    // Greedy answers judged before and after, as PPO's.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(two.join("summary.json")).unwrap()).unwrap();
    for key in ["eval_gold_before", "eval_gold_after", "zero_spread_share"] {
        assert!(summary[key].is_number(), "{key}: {summary}");
    }
    assert!(two.join("samples_before.jsonl").exists() && two.join("samples.jsonl").exists());

    // DAPO's dynamic sampling: greedy groups never spread, so every
    // iteration samples its two extra rounds, in step on both ranks, and
    // keeps the first round's groups.
    let text = std::fs::read_to_string(&exp).unwrap();
    let grpo = text.lines().position(|l| l.starts_with("  grpo:")).unwrap();
    let stage: Vec<&str> = text.lines().skip(grpo).take(4).collect();
    let stage = stage
        .join("\n")
        .replacen("  grpo:", "  grpo_ds:", 1)
        .replacen(
            "checkpoint_every: 2,",
            "checkpoint_every: 2, dynamic_sampling_rounds: 2,",
            1,
        );
    std::fs::write(&exp, format!("{text}{stage}\n")).unwrap();
    let (one, two) = (d.path().join("ds-1"), d.path().join("ds-2"));
    run_ranks(&exp, "grpo_ds", &one, 1);
    run_ranks(&exp, "grpo_ds", &two, 2);
    let diff = max_abs_difference_of(&one, &two, "checkpoint", &[]);
    assert!(
        diff < 1e-5,
        "grpo with dynamic sampling: weights differ by {diff}"
    );
    assert_same_curves(
        &one,
        &two,
        &["score", "kl", "kept_score", "extra_rounds"],
        3,
    );
    assert_eq!(curve(&two, "extra_rounds"), [2.0; 3]);
    assert_same_rollouts(&one, &two, 3, 16);
}

/// A loop round as two ranks: each samples answers to its share of the
/// round's prompts, rank 0 ranks them all and writes the round's data;
/// the round's reward model and PPO run as two ranks on it.
#[test]
fn a_loop_round_samples_on_two_ranks() {
    if !gloo_or_allowed_to_skip() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path());
    let text = std::fs::read_to_string(&exp).unwrap()
        + "loop: {repeat: [rm, ppo], rounds: 1, prompts: prompts.jsonl, prompts_per_round: 6, k: 3,\n\
           \x20      sampling: {max_new_tokens: 6}, labeller: {kind: gold}}\n";
    std::fs::write(&exp, text).unwrap();
    let out = common::rlhf(&[
        "run",
        exp.to_str().unwrap(),
        "--threads",
        "1",
        "--set",
        "distributed.nproc_per_node=2",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("[round-1/collect r1] "), "{stderr}");
    let collect: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.path().join("runs/dp/round-1/collect/manifest.json")).unwrap(),
    )
    .unwrap();
    let new = &collect["summary"]["new_groups"];
    let dropped = &collect["summary"]["all_tied_dropped"];
    assert_eq!(
        new.as_u64().unwrap() + dropped.as_u64().unwrap(),
        6,
        "every prompt of the round answered once: {collect}"
    );
    assert!(d.path().join("runs/dp/round-1/ppo/checkpoint").exists());
}

/// A rank that hangs (SIGSTOP) mid-stage: the others fail at their next
/// collective within the timeout, and the runner stops the hung rank and
/// names it.
#[test]
fn a_hung_rank_is_stopped_and_named_after_the_timeout() {
    if !gloo_or_allowed_to_skip() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path());
    let args = [
        "run",
        exp.to_str().unwrap(),
        "--only",
        "sft",
        "--threads",
        "1",
        "--set",
        "stages.sft.max_steps=100000",
        "--set",
        "distributed.nproc_per_node=2",
        "--set",
        "distributed.timeout_seconds=3",
    ];
    let (ok, stderr, seconds) = signal_rank_one(d.path(), &args, 20, "-STOP");
    assert!(!ok);
    assert!(
        stderr.contains("sft: rank(s) [1] of 2 hung (still running 3 s after rank 0 failed"),
        "{stderr}"
    );
    assert!(seconds < 30, "{seconds} s");
}

/// A short last micro-batch of one example, as two ranks: rank 0 has none
/// and backpropagates a stand-in weighted zero; both end as one process.
#[test]
fn a_micro_batch_shorter_than_the_ranks_still_matches_one_process() {
    if !gloo_or_allowed_to_skip() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    common::task_head("sft.jsonl", &d.path().join("sft.jsonl"), 9);
    let exp = d.path().join("exp.yaml");
    std::fs::write(
        &exp,
        "name: dp\ndevice: cpu\nmodel: {n_layer: 1, n_head: 2, n_embd: 16, n_positions: 64}\nstages:\n\
         \x20 sft: {kind: sft, data: sft.jsonl, epochs: 2, batch_size: 4, eval_fraction: 0}\n",
    )
    .unwrap();
    run_ranks(&exp, "sft", &d.path().join("one"), 1);
    run_ranks(&exp, "sft", &d.path().join("two"), 2);
    assert_eq!(
        curve(&d.path().join("one"), "loss").len(),
        6,
        "3 steps an epoch"
    );
    assert_same_run(&d.path().join("one"), &d.path().join("two"), "sft", &[]);
    // Started by a launcher (no plan-time check), a batch that does not
    // divide among the ranks is refused by name on every rank.
    std::fs::write(
        &exp,
        std::fs::read_to_string(&exp)
            .unwrap()
            .replace("batch_size: 4", "batch_size: 3"),
    )
    .unwrap();
    let port = common::free_port();
    let ranks: Vec<Child> = (0..2)
        .map(|r| stage(&exp, "sft", &d.path().join("three"), r, 2, port))
        .collect();
    for child in ranks {
        let o = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success()
                && stderr.contains("batch_size: 3 does not divide among the 2 ranks"),
            "{stderr}"
        );
    }
}

/// Ctrl-C to `rlhf run` with two ranks: both stop after the same step, rank
/// 0 writes its checkpoint, and the rerun ends bit for bit as an
/// uninterrupted two-rank run.
#[test]
fn ctrl_c_stops_both_ranks_after_the_same_step_and_the_rerun_matches() {
    if !gloo_or_allowed_to_skip() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path());
    let exp_s = exp.to_str().unwrap();
    let settings = [
        "--set",
        "stages.sft.max_steps=300",
        "--set",
        "stages.sft.checkpoint_every=1000",
        "--set",
        "distributed.nproc_per_node=2",
    ];
    let args = [
        &["run", exp_s, "--only", "sft", "--threads", "1"][..],
        &settings,
    ]
    .concat();
    let metrics = d.path().join("runs/dp/sft/metrics.jsonl");
    let mut child = common::Rlhf::new(&args).spawn();
    child.wait_until(
        "sft's 60 logged steps",
        std::time::Duration::from_secs(600),
        || std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) >= 60,
    );
    let (status, stderr) = child.interrupt();
    assert_eq!(status.code(), Some(130), "{stderr}");
    let checkpoints = std::fs::read_dir(d.path().join("runs/dp/sft/checkpoints")).unwrap();
    assert_eq!(
        checkpoints.count(),
        1,
        "rank 0 wrote the interrupt's checkpoint"
    );
    rerun_resumes_as_uninterrupted(d.path(), &args, &settings);
}

/// Two ranks started as Slurm's `srun` starts tasks: rank, world size and
/// local rank from `SLURM_PROCID`/`SLURM_NTASKS`/`SLURM_LOCALID`, the
/// rendezvous host from the job's node list (no Slurm here: the variables
/// are set as srun sets them).
#[test]
fn ranks_from_slurms_variables_train_as_one_process() {
    if !gloo_or_allowed_to_skip() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path());
    let out = d.path().join("sft-slurm");
    let port = common::free_port();
    let children: Vec<Child> = (0..2)
        .map(|rank| {
            Command::new(env!("CARGO_BIN_EXE_rlhf"))
                .args([
                    "--threads",
                    "1",
                    "stage",
                    "--config",
                    exp.to_str().unwrap(),
                    "sft",
                ])
                .arg("--out")
                .arg(&out)
                .env("RUST_LOG", "info")
                .env("SLURM_PROCID", rank.to_string())
                .env("SLURM_LOCALID", rank.to_string())
                .env("SLURM_NTASKS", "2")
                .env("SLURM_JOB_NODELIST", "localhost")
                .env("MASTER_PORT", port.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (rank, child) in children.into_iter().enumerate() {
        let o = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "rank {rank}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "rank {rank} of 2 (local {rank}, Slurm) joining at localhost:"
            )),
            "{stderr}"
        );
    }
    run_ranks(&exp, "sft", &d.path().join("sft-1"), 1);
    assert_same_run(&d.path().join("sft-1"), &out, "sft", &[]);
}

/// A rank whose rank 0 never comes fails after the timeout with one clear
/// line: the reason and the rendezvous, without libtorch's C++ backtraces.
#[test]
fn a_rank_without_rank_zero_fails_with_one_clear_line() {
    if !gloo_or_allowed_to_skip() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path());
    let port = common::free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args([
            "--threads",
            "1",
            "stage",
            "--config",
            exp.to_str().unwrap(),
            "sft",
        ])
        .args(["--out", d.path().join("out").to_str().unwrap()])
        .env("RANK", "1")
        .env("LOCAL_RANK", "1")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("RLHF_DIST_TIMEOUT_SECONDS", "3")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("joining the group")
            && stderr.contains(&format!("rendezvous at 127.0.0.1:{port}")),
        "{stderr}"
    );
    assert!(
        !stderr.contains("frame #") && !stderr.contains("Exception raised from"),
        "{stderr}"
    );
}
