//! The runner runs a DAG's independent branches side by side
//! (`max_parallel`): from the stages' own start and end times in their
//! manifests, two branches overlapped, each on its share of the cores; a
//! failing branch stops only what is downstream of it; Ctrl-C stops every
//! running stage with a checkpoint and a rerun resumes them all.

use crate::common;

use std::path::{Path, PathBuf};

use std::time::Duration;

/// SFT, then a reward model and DPO beside each other (both read only
/// SFT), then a second DPO from the first.
fn experiment(dir: &Path, name: &str, steps: usize, dpo_data: &str) -> PathBuf {
    common::task_head("sft.jsonl", &dir.join("sft.jsonl"), 64);
    common::task_head("preferences.jsonl", &dir.join("prefs.jsonl"), 64);
    let exp = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &exp,
        format!(
            "name: {name}\ndevice: cpu\nmax_parallel: 2\nmodel: {{n_layer: 1, n_head: 2, n_embd: 16, n_positions: 48}}\nstages:\n\
             \x20 sft: {{kind: sft, data: sft.jsonl, max_steps: 3, batch_size: 4}}\n\
             \x20 rm: {{kind: reward, init: sft, data: prefs.jsonl, max_steps: {steps}, batch_size: 2, max_len: 48, eval_every: 100000, checkpoint_every: 100000}}\n\
             \x20 dpo: {{kind: dpo, policy: sft, data: {dpo_data}, max_steps: {steps}, batch_size: 2, max_len: 48, eval_every: 100000, checkpoint_every: 100000}}\n\
             \x20 dpo2: {{kind: dpo, policy: dpo, data: prefs.jsonl, max_steps: 2, batch_size: 2, max_len: 48}}\n"
        ),
    )
    .unwrap();
    exp
}

fn manifest(run: &Path, stage: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(run.join(stage).join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn span(m: &serde_json::Value) -> (f64, f64) {
    (
        m["started_at"].as_f64().unwrap(),
        m["ended_at"].as_f64().unwrap(),
    )
}

#[test]
fn independent_branches_overlap_and_a_failure_stops_only_its_own() {
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path(), "par", 40, "prefs.jsonl");
    let out = common::rlhf(&["run", exp.to_str().unwrap()]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("up to 2 stages run side by side"), "{log}");
    assert!(log.contains("shared by 2 stages side by side"), "{log}");
    // SFT, which every branch waits for, runs alone on every core.
    let sft_threads = log
        .lines()
        .find(|l| l.starts_with("[sft]") && l.contains("threads:"))
        .unwrap();
    assert!(!sft_threads.contains("shared by"), "{sft_threads}");
    let run = d.path().join("runs/par");
    let (sft, rm, dpo, dpo2) = (
        span(&manifest(&run, "sft")),
        span(&manifest(&run, "rm")),
        span(&manifest(&run, "dpo")),
        span(&manifest(&run, "dpo2")),
    );
    assert!(rm.0 >= sft.1 && dpo.0 >= sft.1, "both waited for sft");
    assert!(
        rm.0 < dpo.1 && dpo.0 < rm.1,
        "rm {rm:?} and dpo {dpo:?} did not overlap"
    );
    assert!(dpo2.0 >= dpo.1, "dpo2 waited for dpo");

    // DPO's data broken: DPO fails, the reward model beside it finishes,
    // and dpo2 (downstream of DPO) never starts.
    std::fs::write(
        d.path().join("bad.jsonl"),
        "{\"prompt\": \"a\", \"chosen\": \n",
    )
    .unwrap();
    let exp = experiment(d.path(), "fails", 40, "bad.jsonl");
    let out = common::rlhf(&["run", exp.to_str().unwrap()]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("bad.jsonl"),
        "the error names the file:\n{log}"
    );
    assert!(
        log.contains("not run (downstream of a failure): dpo2"),
        "{log}"
    );
    let run = d.path().join("runs/fails");
    assert_eq!(manifest(&run, "rm")["status"], "complete");
    assert!(run.join("rm/checkpoint/model.safetensors").exists());
    assert_eq!(manifest(&run, "dpo")["status"], "failed");
    assert!(!run.join("dpo2").exists(), "dpo2 was started");
}

#[test]
fn ctrl_c_stops_every_stage_running_side_by_side_and_a_rerun_resumes_them() {
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path(), "stop", 1500, "prefs.jsonl");
    let mut child = common::Rlhf::new(["run".as_ref(), exp.as_os_str()])
        .set("stages.dpo2.max_steps=1")
        .spawn();
    let run = d.path().join("runs/stop");
    let steps = |stage: &str| {
        std::fs::read_to_string(run.join(stage).join("metrics.jsonl"))
            .map_or(0, |t| t.lines().count())
    };
    child.wait_until("rm and dpo both training", Duration::from_secs(600), || {
        steps("rm") >= 2 && steps("dpo") >= 2
    });
    let (status, stderr) = child.interrupt();
    assert_eq!(status.code(), Some(130), "{stderr}");
    for stage in ["rm", "dpo"] {
        assert_eq!(
            manifest(&run, stage)["status"],
            "interrupted",
            "{stage}:\n{stderr}"
        );
        let checkpoints = std::fs::read_dir(run.join(stage).join("checkpoints")).unwrap();
        assert_eq!(
            checkpoints.count(),
            1,
            "{stage} wrote its checkpoint on the interrupt"
        );
    }
    assert!(
        !run.join("dpo2").exists(),
        "dpo2 was started after the interrupt"
    );
    let out = common::rlhf(&[
        "run",
        exp.to_str().unwrap(),
        "--set",
        "stages.dpo2.max_steps=1",
    ]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("[rm] ") && log.contains("[dpo] "), "{log}");
    assert_eq!(
        log.matches("resuming from").count(),
        2,
        "both resumed:\n{log}"
    );
    assert_eq!(manifest(&run, "dpo2")["status"], "complete");
}
