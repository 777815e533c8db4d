//! The `slurm` executor on a real one-node Slurm (`.ci/slurm-up` starts
//! one; `just test` runs it): stages run as batch jobs end with
//! checkpoints bit-identical to the local executor's; a job cancelled
//! mid-run fails its stage and the rerun resumes it from its checkpoint
//! (to the uninterrupted run's weights); a runner killed while its job is
//! queued finds that job on rerun instead of submitting it again.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Whether a Slurm answers here; without one the tests fail, unless
/// `RLHF_ALLOW_NO_SLURM` is set (then they are skipped, said on stderr).
/// Asked for up to a minute: beside the other tests `sinfo` can be slow,
/// or show the node `completing` another test's job for a moment.
fn slurm() -> bool {
    let mut seen = String::from("nothing");
    for _ in 0..30 {
        let out = Command::new("timeout")
            .args(["10", "sinfo", "--noheader", "--format=%T"])
            .output();
        match out {
            Ok(o) if o.status.success() => {
                let text = String::from_utf8_lossy(&o.stdout).into_owned();
                if text.lines().any(node_takes_jobs) {
                    return true;
                }
                seen = format!("node states {:?}", text.trim());
            }
            Ok(o) => seen = String::from_utf8_lossy(&o.stderr).trim().to_owned(),
            Err(e) => seen = e.to_string(),
        }
        if std::env::var_os("RLHF_ALLOW_NO_SLURM").is_some() {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    if std::env::var_os("RLHF_ALLOW_NO_SLURM").is_some() {
        eprintln!("skipped: no running Slurm here (RLHF_ALLOW_NO_SLURM is set)");
        return false;
    }
    panic!("no running Slurm (sinfo said {seen}): run .ci/slurm-up as root (just test does), or set RLHF_ALLOW_NO_SLURM=1 to skip");
}

/// A node state (`sinfo %T`, e.g. `idle`, `mixed+cloud`, `completing`)
/// in which the node runs or will run jobs (`*`: not responding).
fn node_takes_jobs(state: &str) -> bool {
    if state.contains('*') {
        return false;
    }
    let base = state.trim().split('+').next().unwrap_or("");
    let base = base.trim_end_matches(|c: char| !c.is_ascii_alphabetic());
    [
        "idle",
        "mixed",
        "allocated",
        "completing",
        "planned",
        "reserved",
    ]
    .contains(&base)
}

fn experiment(dir: &Path, executor: &str, sft_steps: usize, slurm: &str) -> PathBuf {
    common::task_head("sft.jsonl", &dir.join("sft.jsonl"), 64);
    common::task_head("preferences.jsonl", &dir.join("prefs.jsonl"), 16);
    let exp = dir.join("exp.yaml");
    std::fs::write(
        &exp,
        format!(
            "name: cluster\ndevice: cpu\nexecutor: {executor}\nslurm: {{time: \"00:20:00\", poll_seconds: 0.2{slurm}}}\n\
             model: {{n_layer: 1, n_head: 2, n_embd: 16, n_positions: 48}}\nstages:\n\
             \x20 sft: {{kind: sft, data: sft.jsonl, max_steps: {sft_steps}, batch_size: 4, checkpoint_every: 20, eval_every: 100000}}\n\
             \x20 rm: {{kind: reward, init: sft, data: prefs.jsonl, max_steps: 6, batch_size: 2, max_len: 48}}\n"
        ),
    )
    .unwrap();
    exp
}

fn run(exp: &Path) -> String {
    let out = common::rlhf(&["run", exp.to_str().unwrap()]);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{log}");
    log
}

fn weights(dir: &Path, stage: &str) -> Vec<u8> {
    std::fs::read(
        dir.join("runs/cluster")
            .join(stage)
            .join("checkpoint/model.safetensors"),
    )
    .unwrap()
}

fn job_id(dir: &Path, stage: &str) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("runs/cluster").join(stage).join("slurm/job.json"))
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["job_id"].as_str().map(str::to_owned)
}

#[test]
fn stages_run_as_slurm_jobs_end_bit_identical_to_local_ones() {
    if !slurm() {
        return;
    }
    let (local, cluster) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run(&experiment(local.path(), "local", 40, ""));
    let exp = experiment(cluster.path(), "slurm", 40, "");
    let plan = common::rlhf_ok(&["plan", exp.to_str().unwrap()]);
    assert!(
        plan.contains("runs as a Slurm job: 1 node(s) x 1 task(s), time 00:20:00"),
        "{plan}"
    );
    let log = run(&exp);
    for stage in ["sft", "rm"] {
        let id = job_id(cluster.path(), stage).expect("the job's id is kept in the stage folder");
        assert!(
            log.contains(&format!("[{stage}] submitted as Slurm job {id}")),
            "{log}"
        );
        assert!(
            log.contains(&format!("[{stage} job {id}] ")),
            "the job's log is streamed:\n{log}"
        );
        assert!(
            weights(local.path(), stage) == weights(cluster.path(), stage),
            "{stage} differs"
        );
    }
}

#[test]
fn a_cancelled_job_fails_its_stage_and_the_rerun_resumes_it() {
    if !slurm() {
        return;
    }
    let (local, cluster) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run(&experiment(local.path(), "local", 1500, ""));
    let exp = experiment(cluster.path(), "slurm", 1500, "");
    let mut child = common::Rlhf::new(["run".as_ref(), exp.as_os_str()]).spawn();
    let checkpoints = cluster.path().join("runs/cluster/sft/checkpoints");
    child.wait_until("sft's first checkpoint", Duration::from_secs(600), || {
        std::fs::read_dir(&checkpoints).is_ok_and(|d| d.count() > 0)
    });
    let id = job_id(cluster.path(), "sft").unwrap();
    // `rlhf watch` shows the stage running as that job, rm waiting.
    let run_dir = cluster.path().join("runs/cluster");
    let (mut watch, port) = common::serve(&["watch", run_dir.to_str().unwrap()]);
    let shown = |stage: &str| {
        let (code, body) = common::http(port, "GET", "/api/state", None, "");
        assert_eq!(code, 200, "{body}");
        let state: serde_json::Value = serde_json::from_str(&body).unwrap();
        let all = state["stages"].as_array().unwrap().clone();
        all.into_iter().find(|s| s["label"] == stage).unwrap()
    };
    let sft = shown("sft");
    assert_eq!(
        (&sft["state"], &sft["executor"]),
        (&"running".into(), &"slurm".into()),
        "{sft}"
    );
    assert_eq!(sft["slurm_job"], id.as_str(), "{sft}");
    assert_eq!(shown("rm")["state"], "waiting");
    assert!(Command::new("scancel").arg(&id).status().unwrap().success());
    let (status, stderr) = child.wait();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("Slurm job {id} ended CANCELLED")),
        "{stderr}"
    );
    let sft = shown("sft");
    assert_eq!(sft["state"], "failed", "{sft}");
    assert!(
        sft["detail"].as_str().unwrap().contains("CANCELLED"),
        "{sft}"
    );
    watch.kill().unwrap();
    watch.wait().unwrap();
    assert!(
        !cluster.path().join("runs/cluster/rm").exists(),
        "rm started after sft failed"
    );
    let log = run(&exp);
    assert!(log.contains("resuming from"), "{log}");
    let again = job_id(cluster.path(), "sft").unwrap();
    assert_ne!(again, id, "the rerun submits a new job");
    for stage in ["sft", "rm"] {
        assert!(
            weights(local.path(), stage) == weights(cluster.path(), stage),
            "{stage} differs after the resumed job"
        );
    }
}

#[test]
fn a_runner_killed_while_its_job_is_queued_does_not_submit_it_twice() {
    if !slurm() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    // The job may not start for 15 s: it sits in the queue meanwhile.
    let exp = experiment(d.path(), "slurm", 10, ", sbatch_flags: [--begin=now+15]");
    let (mut runner, id) = submit_and_wait(d.path(), &exp);
    runner.kill().unwrap();
    runner.wait().unwrap();
    assert_eq!(squeue_state(&id), "PENDING");
    // As if the runner had died between sbatch and writing the job's id:
    // the rerun finds the job by its name.
    std::fs::remove_file(d.path().join("runs/cluster/sft/slurm/job.json")).unwrap();
    let out = common::rlhf(&["run", exp.to_str().unwrap(), "--only", "sft"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains(&format!("following Slurm job {id}, submitted before")),
        "{log}"
    );
    assert!(
        !log.contains("submitted as Slurm job"),
        "submitted twice:\n{log}"
    );
    assert_eq!(job_id(d.path(), "sft").as_deref(), Some(id.as_str()));
    assert!(d
        .path()
        .join("runs/cluster/sft/checkpoint/model.safetensors")
        .exists());
}

/// Starts `rlhf run --only sft` and waits until its job is submitted;
/// returns the runner (the caller waits for it) and the job's id.
#[allow(clippy::zombie_processes)]
fn submit_and_wait(dir: &Path, exp: &Path) -> (std::process::Child, String) {
    let runner = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(["run", exp.to_str().unwrap(), "--only", "sft"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(id) = job_id(dir, "sft") {
            return (runner, id);
        }
        assert!(std::time::Instant::now() < deadline, "no job was submitted");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn squeue_state(id: &str) -> String {
    let out = Command::new("squeue")
        .args(["--noheader", "--format=%T", "--jobs", id])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn ctrl_c_cancels_a_queued_job_and_a_job_done_while_no_runner_watched_is_taken_as_done() {
    if !slurm() {
        return;
    }
    // Ctrl-C while the job waits in the queue: cancelled, the run stops.
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path(), "slurm", 10, ", sbatch_flags: [--begin=now+600]");
    let (runner, id) = submit_and_wait(d.path(), &exp);
    let runner = common::Drained::new(runner);
    let (status, stderr) = runner.interrupt();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains(&format!("cancelling Slurm job {id}")),
        "{stderr}"
    );
    assert_eq!(squeue_state(&id), "", "job {id} is still queued");

    // A runner killed while its job waits; the job then runs to its end
    // with no runner watching: the rerun takes its result, submits nothing.
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path(), "slurm", 10, ", sbatch_flags: [--begin=now+3]");
    let (mut runner, id) = submit_and_wait(d.path(), &exp);
    runner.kill().unwrap();
    runner.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !squeue_state(&id).is_empty() {
        assert!(std::time::Instant::now() < deadline, "job {id} did not end");
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = common::rlhf(&["run", exp.to_str().unwrap(), "--only", "sft"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "Slurm job {id} completed while no runner followed it"
        )),
        "{log}"
    );
    assert!(
        !log.contains("submitted as Slurm job"),
        "submitted again:\n{log}"
    );
    let manifest =
        std::fs::read_to_string(d.path().join("runs/cluster/sft/manifest.json")).unwrap();
    assert!(manifest.contains("\"status\": \"complete\""), "{manifest}");
}
