//! `rlhf run` and `rlhf plan` on a tiny experiment: the plan's order, a
//! run that writes every artifact and manifest, a second run that is all
//! cache hits, and misses when a setting or an input file changes.

use crate::common;

use std::path::Path;

use common::rlhf;

use common::task_head as head;

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
    // The child ran from the stage as planned: its settings, key and
    // upstream keys in rm/stage.json, the summary back through summary.json.
    let planned: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runs.join("rm/stage.json")).unwrap())
            .unwrap();
    assert_eq!(planned["key"], manifest["key"]);
    assert_eq!(planned["upstream"], manifest["upstream"]);
    assert_eq!(planned["settings"]["kind"], "reward");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runs.join("rm/summary.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["summary"], summary);
    // A planned stage runs again from its file alone, in another folder:
    // no experiment file is read (it is gone).
    let mut alone = planned.clone();
    let elsewhere = d.path().join("alone");
    std::fs::create_dir(&elsewhere).unwrap();
    alone["out_dir"] = serde_json::json!(elsewhere);
    alone["experiment"] = serde_json::json!(d.path().join("gone.yaml"));
    std::fs::write(elsewhere.join("stage.json"), alone.to_string()).unwrap();
    common::Rlhf::new(["stage", "--planned"])
        .arg(elsewhere.join("stage.json"))
        .ok();
    assert_eq!(
        std::fs::read(elsewhere.join("checkpoint/model.safetensors")).unwrap(),
        std::fs::read(runs.join("rm/checkpoint/model.safetensors")).unwrap(),
        "the same stage from its stage.json gives the same weights"
    );
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
    data.push_str("{\"prompt\": \"Upper: ab\\n\", \"completion\": \"AB\"}\n");
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
        !out.status.success()
            && err.contains("stages.rm.init: \"sfx\"")
            && err.contains("at line 7"),
        "{err}"
    );
}

/// The DAG with one loop round, ranked by a user's program: every artifact
/// and manifest exists, the program's rankings land in the round's
/// preference data, and a second run is all cache hits.
#[test]
fn loop_round_with_command_labeller() {
    let d = tempfile::tempdir().unwrap();
    head("sft.jsonl", &d.path().join("sft.jsonl"), 64);
    head("preferences.jsonl", &d.path().join("prefs.jsonl"), 16);
    head("prompts.jsonl", &d.path().join("prompts.jsonl"), 16);
    // Longer answers rank higher; ties share a rank.
    std::fs::write(
        d.path().join("label.py"),
        "import json, sys\nfor line in sys.stdin:\n    r = json.loads(line)['responses']\n    \
         print(json.dumps({'ranking': [sum(len(o) > len(a) for o in r) for a in r]}))\n",
    )
    .unwrap();
    let exp = d.path().join("exp.yaml");
    std::fs::write(
        &exp,
        "name: loop\ndevice: cpu\nmodel: {n_layer: 1, n_head: 2, n_embd: 16, n_positions: 48}\nstages:\n\
         \x20 sft: {kind: sft, data: sft.jsonl, max_steps: 2, batch_size: 8}\n\
         \x20 rm: {kind: reward, init: sft, data: prefs.jsonl, max_steps: 2, batch_size: 4}\n\
         \x20 ppo:\n    kind: ppo\n    policy: sft\n    reward_model: rm\n    prompts: prompts.jsonl\n    iterations: 2\n\
         \x20   rollout_batch: 4\n    minibatch_size: 4\n    ppo_epochs: 1\n    sampling: {max_new_tokens: 6}\n\
         loop:\n  repeat: [rm, ppo]\n  rounds: 1\n  prompts: prompts.jsonl\n  prompts_per_round: 5\n  k: 3\n\
         \x20 sampling: {max_new_tokens: 6, stop_at_eos: false}\n  labeller: {kind: command, command: [python3, label.py]}\n",
    )
    .unwrap();
    // The labeller runs from the current directory: run from the temp dir.
    let run_here = || {
        let out = common::Rlhf::new(["run", "exp.yaml"])
            .dir(d.path())
            .output();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    let log = run_here();
    let runs = d.path().join("runs/loop");
    for f in [
        "sft/manifest.json",
        "rm/manifest.json",
        "ppo/manifest.json",
        "ppo/rollouts/iter-0002.parquet",
        "round-1/collect/manifest.json",
        "round-1/collect/checkpoint/preferences.parquet",
        "round-1/rm/manifest.json",
        "round-1/rm/checkpoint/model.safetensors",
        "round-1/ppo/manifest.json",
        "round-1/ppo/checkpoint/model.safetensors",
        "rounds.jsonl",
    ] {
        assert!(runs.join(f).exists(), "{f} missing\n{log}");
    }
    let p = runs.join("round-1/collect/checkpoint/preferences.parquet");
    let table = rlhf_datasets::load::read_table(&p).unwrap();
    let groups = rlhf_datasets::preference::ranked_groups(&table, &p)
        .unwrap()
        .groups;
    let rounds: Vec<i64> = table
        .column("round")
        .unwrap()
        .i64()
        .unwrap()
        .iter()
        .map(|v| v.unwrap())
        .collect();
    assert_eq!(
        rounds.iter().filter(|&&r| r == 0).count(),
        16,
        "the earlier data is kept"
    );
    let new: Vec<_> = groups
        .iter()
        .zip(&rounds)
        .filter(|(_, &r)| r == 1)
        .map(|(g, _)| g)
        .collect();
    assert!(!new.is_empty());
    for g in new {
        assert_eq!(g.responses.len(), 3);
        // Python's len counts characters.
        let len = |s: &String| s.chars().count();
        let by_length: Vec<usize> = g
            .responses
            .iter()
            .map(|a| g.responses.iter().filter(|o| len(o) > len(a)).count())
            .collect();
        assert_eq!(
            g.ranking, by_length,
            "the labeller's ranking is stored as given"
        );
    }
    let policy = table
        .column("policy")
        .unwrap()
        .str()
        .unwrap()
        .get(16)
        .unwrap()
        .to_owned();
    assert!(policy.ends_with("ppo/checkpoint"), "provenance: {policy}");

    let log = run_here();
    for stage in [
        "sft",
        "rm",
        "ppo",
        "round-1/collect",
        "round-1/rm",
        "round-1/ppo",
    ] {
        assert!(cached(&log, stage), "{stage} not cached:\n{log}");
    }
}

#[test]
fn a_run_survives_its_binary_being_replaced() {
    // A rebuild or an upgrade replaces the file while a pipeline runs: the
    // stages must still start, with the runner's own code.
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path());
    let exe = d.path().join("rlhf-copy");
    std::fs::copy(env!("CARGO_BIN_EXE_rlhf"), &exe).unwrap();
    let child = std::process::Command::new(&exe)
        .args(["run", exp.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // spawn() returns after exec: the file can go now.
    std::fs::remove_file(&exe).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "rlhf run failed:\n{stderr}");
    assert!(d
        .path()
        .join("runs/tiny/rm/checkpoint/model.safetensors")
        .exists());
}

#[test]
fn a_copied_run_folder_stays_cached() {
    // Stage keys do not depend on where the run folder is: a run copied
    // elsewhere (to branch an experiment off it) reuses every stage.
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path());
    run(&exp, &[]);
    let copy = d.path().join("elsewhere");
    std::fs::create_dir_all(&copy).unwrap();
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(d.path().join("runs/tiny"))
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    let out_dir = format!("out_dir={}", copy.display());
    let log = run(&exp, &["--set", &out_dir]);
    assert!(cached(&log, "sft") && cached(&log, "rm"), "{log}");
    // A setting that differs still reruns the stage in the copy.
    let log = run(&exp, &["--set", &out_dir, "--set", "stages.rm.max_steps=3"]);
    assert!(cached(&log, "sft") && !cached(&log, "rm"), "{log}");
}

/// A reward model from scratch on Anthropic's HH-RLHF `helpful-base` test
/// split with the GPT-2 tokenizer and no `vocab_size`: the split's pair
/// whose chosen equals its rejected is skipped and counted, not refused.
/// Skipped (with a message) where `../shared/data` is absent.
#[test]
fn a_reward_model_trains_on_real_hh_rlhf_with_the_gpt2_tokenizer() {
    let shared = common::workspace().join("../shared/data");
    let (data, tokenizer) = (
        shared.join("hh-rlhf/helpful-base-test.jsonl.gz"),
        shared.join("gpt2-tokenizer/tokenizer.json"),
    );
    if !data.exists() || !tokenizer.exists() {
        eprintln!("skipped: {} is absent", shared.display());
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let exp = d.path().join("exp.yaml");
    std::fs::write(
        &exp,
        format!(
            "name: hh\ndevice: cpu\ntokenizer: {}\nmodel: {{n_layer: 1, n_head: 2, n_embd: 16, n_positions: 64}}\nstages:\n\
             \x20 rm: {{kind: reward, data: {}, max_steps: 3, batch_size: 2, max_len: 64, eval_fraction: 0.02}}\n",
            tokenizer.display(),
            data.display()
        ),
    )
    .unwrap();
    let log = run(&exp, &[]);
    assert!(log.contains("model.vocab_size: 264 -> 50264"), "{log}");
    assert!(
        log.contains("rows skipped as saying nothing") && log.contains("with `chosen` identical"),
        "{log}"
    );
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.path().join("runs/hh/rm/summary.json")).unwrap(),
    )
    .unwrap();
    assert!(summary["skipped_rows"].as_u64().unwrap() >= 1, "{summary}");
    assert!(summary["eval"]["accuracy"].is_number(), "{summary}");
}

/// A from-scratch model takes its vocabulary size from the experiment's
/// tokenizer (here a word-level `tokenizer.json` of 300 ids, written by
/// the test): no `vocab_size` in the file, and the run says what it chose.
#[test]
fn a_scratch_model_takes_its_vocabulary_from_the_tokenizer() {
    let d = tempfile::tempdir().unwrap();
    let mut vocab = serde_json::Map::new();
    for (id, word) in ["<|endoftext|>", "[UNK]"].into_iter().enumerate() {
        vocab.insert(word.into(), id.into());
    }
    for i in 2..300 {
        vocab.insert(format!("w{i}"), i.into());
    }
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "normalizer": null,
        "post_processor": null, "decoder": null,
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "pre_tokenizer": {"type": "Whitespace"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    });
    std::fs::write(d.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let rows: String = (0..16)
        .map(|i| {
            format!(
                "{{\"prompt\": \"w{} w{}\", \"completion\": \" w{}\"}}\n",
                2 + i,
                3 + i,
                4 + i
            )
        })
        .collect();
    std::fs::write(d.path().join("sft.jsonl"), rows).unwrap();
    let exp = d.path().join("exp.yaml");
    std::fs::write(
        &exp,
        "name: words\ndevice: cpu\ntokenizer: tokenizer.json\nmodel: {n_layer: 1, n_head: 2, n_embd: 16, n_positions: 32}\n\
         stages:\n  sft: {kind: sft, data: sft.jsonl, max_steps: 2, batch_size: 4}\n",
    )
    .unwrap();
    let log = run(&exp, &[]);
    assert!(
        log.contains("model.vocab_size: 264 -> 304 to hold the tokenizer's 300 ids"),
        "{log}"
    );
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.path().join("runs/words/sft/checkpoint/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["vocab_size"], 304);
}

/// A DPO stage in the DAG beside PPO: trained from the SFT stage on the
/// reward model's rankings, cached on a rerun, and judged as a policy by
/// `rlhf eval` (with the reference's log-probabilities in its folder).
#[test]
fn a_dpo_stage_trains_from_sft_and_is_evaluated_as_a_policy() {
    let d = tempfile::tempdir().unwrap();
    common::task_head("sft.jsonl", &d.path().join("sft.jsonl"), 40);
    common::task_head("preferences.jsonl", &d.path().join("prefs.jsonl"), 24);
    common::task_head("prompts.jsonl", &d.path().join("prompts.jsonl"), 8);
    let exp = d.path().join("exp.yaml");
    std::fs::write(
        &exp,
        "name: routes\ndevice: cpu\nmodel: {n_layer: 1, n_head: 2, n_embd: 16, n_positions: 48}\nstages:\n\
         \x20 sft: {kind: sft, data: sft.jsonl, max_steps: 4, batch_size: 4}\n\
         \x20 dpo: {kind: dpo, policy: sft, data: prefs.jsonl, max_steps: 3, batch_size: 2, max_len: 48, beta: 0.2, loss: ipo}\n",
    )
    .unwrap();
    let plan = String::from_utf8(rlhf(&["plan", exp.to_str().unwrap()]).stdout).unwrap();
    assert!(plan.contains("2. dpo (dpo) after sft: to run"), "{plan}");
    run(&exp, &[]);
    let dpo = d.path().join("runs/routes/dpo");
    assert!(dpo.join("checkpoint/model.safetensors").exists());
    assert!(dpo.join("reference_logps.json").exists());
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dpo.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 3);
    assert!(summary["eval"]["accuracy"].is_number(), "{summary}");
    let log = run(&exp, &[]);
    assert!(cached(&log, "dpo"), "{log}");
    let run_dir = d.path().join("runs/routes");
    let prompts = d.path().join("prompts.jsonl");
    let out = common::eval_quick(&run_dir, &prompts, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = std::fs::read_to_string(run_dir.join("report/report.md")).unwrap();
    assert!(report.contains("| dpo |"), "{report}");
    // A bad setting is named with its stage and line.
    std::fs::write(
        &exp,
        std::fs::read_to_string(&exp)
            .unwrap()
            .replace("beta: 0.2", "beta: -1"),
    )
    .unwrap();
    let err = String::from_utf8_lossy(&rlhf(&["plan", exp.to_str().unwrap()]).stderr).into_owned();
    assert!(
        err.contains("stages.dpo.beta: must be in (0, 100], got -1 at line 6"),
        "{err}"
    );
}

/// Iterated DPO: `loop: {repeat: [dpo]}` samples the latest DPO policy,
/// has its answers ranked, and trains DPO again on every ranking so far,
/// from the latest policy against the fixed reference.
#[test]
fn a_loop_repeats_dpo_on_fresh_rankings() {
    let d = tempfile::tempdir().unwrap();
    common::task_head("sft.jsonl", &d.path().join("sft.jsonl"), 40);
    common::task_head("preferences.jsonl", &d.path().join("prefs.jsonl"), 16);
    common::task_head("prompts.jsonl", &d.path().join("prompts.jsonl"), 8);
    let exp = d.path().join("exp.yaml");
    std::fs::write(
        &exp,
        "name: online\ndevice: cpu\nmodel: {n_layer: 1, n_head: 2, n_embd: 16, n_positions: 48}\nstages:\n\
         \x20 sft: {kind: sft, data: sft.jsonl, max_steps: 4, batch_size: 4}\n\
         \x20 dpo: {kind: dpo, policy: sft, data: prefs.jsonl, max_steps: 2, batch_size: 2, max_len: 48}\n\
         loop: {repeat: [dpo], rounds: 2, prompts: prompts.jsonl, prompts_per_round: 3, k: 3, sampling: {max_new_tokens: 4}, labeller: {kind: gold}}\n",
    )
    .unwrap();
    let plan = String::from_utf8(rlhf(&["plan", exp.to_str().unwrap()]).stdout).unwrap();
    // The rounds are stages of the plan, each after what it reads.
    for line in [
        "round-1/collect (collect) after dpo: to run",
        "round-1/dpo (dpo) after dpo, round-1/collect, sft: to run",
        "round-2/collect (collect) after round-1/collect, round-1/dpo: to run",
        "round-2/dpo (dpo) after round-1/dpo, round-2/collect, sft: to run",
        "loop: 2 round(s) (the round-N stages above), each collect (3 prompts x 3 answers, gold labeller) -> dpo",
    ] {
        assert!(plan.contains(line), "{line}\n{plan}");
    }
    run(&exp, &[]);
    let run_dir = d.path().join("runs/online");
    for round in [1, 2] {
        assert!(run_dir
            .join(format!("round-{round}/dpo/checkpoint/model.safetensors"))
            .exists());
    }
    // Round 2 trained from round 1's policy on the rankings of both rounds.
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run_dir.join("round-2/dpo/manifest.json")).unwrap(),
    )
    .unwrap();
    let config = manifest["config"].to_string();
    assert!(
        config.contains("round-1/dpo/checkpoint")
            && config.contains("round-2/collect/checkpoint/preferences.parquet"),
        "{config}"
    );
    let table = rlhf_datasets::load::read_table(
        &run_dir.join("round-2/collect/checkpoint/preferences.parquet"),
    )
    .unwrap();
    let rounds = table.column("round").unwrap().i64().unwrap().clone();
    let per_round = |r: i64| {
        (0..rounds.len())
            .filter(|&i| rounds.get(i) == Some(r))
            .count()
    };
    assert_eq!(per_round(0), 16, "the stage's own rankings");
    // Each round's new groups (all-tied ones dropped), as its collect says.
    for r in [1, 2] {
        let m: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run_dir.join(format!("round-{r}/collect/manifest.json")))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            m["summary"]["new_groups"].as_u64(),
            Some(per_round(r as i64) as u64),
            "round {r}"
        );
    }
    assert_eq!(table.height(), 16 + per_round(1) + per_round(2));
    let lines = std::fs::read_to_string(run_dir.join("rounds.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
    assert_eq!(last["round"], 2);
    assert!(last["dpo_eval_accuracy"].is_number(), "{last}");
    let log = run(&exp, &[]);
    assert!(cached(&log, "round-2/dpo"), "{log}");
}

/// The three routes side by side: one SFT and one reward model, then PPO,
/// DPO and GRPO from them; a loop round repeats [rm, grpo]; `rlhf eval`
/// judges every policy in one report.
#[test]
fn ppo_dpo_and_grpo_side_by_side_in_one_report() {
    let d = tempfile::tempdir().unwrap();
    common::task_head("sft.jsonl", &d.path().join("sft.jsonl"), 40);
    common::task_head("preferences.jsonl", &d.path().join("prefs.jsonl"), 16);
    common::task_head("prompts.jsonl", &d.path().join("prompts.jsonl"), 8);
    let exp = d.path().join("exp.yaml");
    std::fs::write(
        &exp,
        "name: routes\ndevice: cpu\nmodel: {n_layer: 1, n_head: 2, n_embd: 16, n_positions: 48}\nstages:\n\
         \x20 sft: {kind: sft, data: sft.jsonl, max_steps: 4, batch_size: 4}\n\
         \x20 rm: {kind: reward, init: sft, data: prefs.jsonl, max_steps: 2, batch_size: 2, max_len: 48}\n\
         \x20 ppo: {kind: ppo, policy: sft, reward_model: rm, prompts: prompts.jsonl, iterations: 1, rollout_batch: 4, minibatch_size: 4, sampling: {max_new_tokens: 4}}\n\
         \x20 dpo: {kind: dpo, policy: sft, data: prefs.jsonl, max_steps: 2, batch_size: 2, max_len: 48}\n\
         \x20 grpo: {kind: grpo, policy: sft, reward_model: rm, prompts: prompts.jsonl, iterations: 2, prompts_per_iteration: 2, group_size: 3, minibatch_size: 3, sampling: {max_new_tokens: 4}}\n\
         loop: {repeat: [rm, grpo], rounds: 1, prompts: prompts.jsonl, prompts_per_round: 3, k: 2, sampling: {max_new_tokens: 4}, labeller: {kind: gold}}\n",
    )
    .unwrap();
    run(&exp, &[]);
    let run_dir = d.path().join("runs/routes");
    let grpo: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("grpo/summary.json")).unwrap())
            .unwrap();
    assert_eq!(grpo["iterations"], 2);
    assert!(grpo["zero_spread_share"].is_number(), "{grpo}");
    assert!(run_dir
        .join("round-1/grpo/checkpoint/model.safetensors")
        .exists());
    let line = std::fs::read_to_string(run_dir.join("rounds.jsonl")).unwrap();
    assert!(
        line.contains("\"ppo_last_score\"") && line.contains("\"rm_eval_accuracy\""),
        "{line}"
    );
    let prompts = d.path().join("prompts.jsonl");
    let out = common::eval_quick(&run_dir, &prompts, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = std::fs::read_to_string(run_dir.join("report/report.md")).unwrap();
    for policy in [
        "| sft |",
        "| ppo |",
        "| dpo |",
        "| grpo |",
        "| round-1/grpo |",
    ] {
        assert!(report.contains(policy), "{policy} missing:\n{report}");
    }
}

/// GRPO scored by a program (the loop's labeller protocol): each group of
/// answers is ranked by the program, an answer scores minus its rank.
#[test]
fn grpo_scores_groups_with_a_ranking_program() {
    let d = tempfile::tempdir().unwrap();
    common::task_head("sft.jsonl", &d.path().join("sft.jsonl"), 40);
    common::task_head("prompts.jsonl", &d.path().join("prompts.jsonl"), 8);
    // Longer answers rank better (ties share a rank); each group is logged.
    std::fs::write(
        d.path().join("rank.py"),
        "import json, sys\nlog = open(sys.argv[1], 'a')\nfor line in sys.stdin:\n    g = json.loads(line)\n\
         \x20   keys = sorted({-len(r) for r in g['responses']})\n\
         \x20   print(json.dumps({'ranking': [keys.index(-len(r)) for r in g['responses']]}))\n    log.write('group\\n')\n",
    )
    .unwrap();
    let (py, calls) = (common::python(), d.path().join("calls.txt"));
    let exp = d.path().join("exp.yaml");
    std::fs::write(
        &exp,
        format!(
            "name: verified\ndevice: cpu\nmodel: {{n_layer: 1, n_head: 2, n_embd: 16, n_positions: 48}}\nstages:\n\
             \x20 sft: {{kind: sft, data: sft.jsonl, max_steps: 4, batch_size: 4}}\n\
             \x20 grpo: {{kind: grpo, policy: sft, ranker_command: [{py:?}, rank.py, {calls:?}], prompts: prompts.jsonl,\n\
             \x20        iterations: 3, prompts_per_iteration: 2, group_size: 3, minibatch_size: 3, sampling: {{max_new_tokens: 4}}}}\n",
            py = py.display().to_string(),
            calls = calls.display().to_string()
        ),
    )
    .unwrap();
    run(&exp, &[]);
    let groups = std::fs::read_to_string(&calls).unwrap().lines().count();
    assert_eq!(
        groups,
        3 * 2,
        "every group of every iteration was ranked by the program"
    );
    let metrics =
        std::fs::read_to_string(d.path().join("runs/verified/grpo/metrics.jsonl")).unwrap();
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let score = v["score"].as_f64().unwrap();
        assert!(
            (-2.0..=0.0).contains(&score),
            "minus a rank in a group of 3: {score}"
        );
    }
    // Two scorers at once are refused by name.
    let text = std::fs::read_to_string(&exp)
        .unwrap()
        .replace("policy: sft,", "policy: sft, gold_reward: true,");
    std::fs::write(&exp, text).unwrap();
    let err = String::from_utf8_lossy(&rlhf(&["plan", exp.to_str().unwrap()]).stderr).into_owned();
    assert!(err.contains("give one scorer"), "{err}");
}

/// Two experiment files beside each other (one `out_dir`) with the same
/// SFT stage: the second copies the first's finished stage instead of
/// training it again (a damaged one is passed over), and `rlhf eval
/// --with` judges both runs' policies in one report, the shared SFT once,
/// with each policy's own and route wall times.
#[test]
fn experiments_share_finished_stages_and_one_report_judges_them() {
    let d = tempfile::tempdir().unwrap();
    common::task_head("sft.jsonl", &d.path().join("sft.jsonl"), 40);
    common::task_head("preferences.jsonl", &d.path().join("prefs.jsonl"), 16);
    common::task_head("prompts.jsonl", &d.path().join("prompts.jsonl"), 6);
    let write = |name: &str, beta: f64| {
        let exp = d.path().join(format!("{name}.yaml"));
        std::fs::write(
            &exp,
            format!(
                "name: {name}\ndevice: cpu\nmodel: {{n_layer: 1, n_head: 2, n_embd: 16, n_positions: 48}}\nstages:\n\
                 \x20 sft: {{kind: sft, data: sft.jsonl, max_steps: 4, batch_size: 4}}\n\
                 \x20 dpo: {{kind: dpo, policy: sft, data: prefs.jsonl, max_steps: 2, batch_size: 2, max_len: 48, beta: {beta}}}\n"
            ),
        )
        .unwrap();
        exp
    };
    let (a, b, c) = (write("a", 0.1), write("b", 0.5), write("c", 0.1));
    run(&a, &[]);
    let plan = String::from_utf8(rlhf(&["plan", b.to_str().unwrap()]).stdout).unwrap();
    assert!(
        plan.contains("1. sft (sft): finished in ../a/sft (copied)"),
        "{plan}"
    );
    assert!(plan.contains("dpo (dpo) after sft: to run"), "{plan}");
    let log = run(&b, &[]);
    assert!(log.contains("[sft] copied from"), "{log}");
    assert!(
        !log.contains("stage sft (sft)"),
        "sft trained again:\n{log}"
    );
    let runs = d.path().join("runs");
    let weights =
        |run: &str| std::fs::read(runs.join(run).join("sft/checkpoint/model.safetensors")).unwrap();
    assert_eq!(weights("a"), weights("b"));
    let manifest = |path: &str| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(runs.join(path).join("manifest.json")).unwrap(),
        )
        .unwrap()
    };
    assert_eq!(manifest("b/sft")["copied_from"], "../a/sft");
    assert_eq!(manifest("b/sft")["stage"], "sft");
    assert_eq!(manifest("b/sft")["seconds"], manifest("a/sft")["seconds"]);
    // Its TensorBoard events come along, byte for byte.
    let events = |run: &str| -> Vec<Vec<u8>> {
        let dir = runs.join(run).join("sft");
        let files = rlhf_stages::train::tensorboard::event_files(&dir);
        files.iter().map(|f| std::fs::read(f).unwrap()).collect()
    };
    assert_eq!(events("a").len(), 1);
    assert_eq!(events("a"), events("b"));
    // A source whose checkpoint no longer matches its checksums is passed over.
    let damaged = runs.join("a/sft/checkpoint/model.safetensors");
    let mut bytes = std::fs::read(&damaged).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&damaged, bytes).unwrap();
    let log = run(&c, &[]);
    assert!(
        log.contains("[sft] copied from") && log.contains("b/sft"),
        "{log}"
    );
    // One report for runs b and c: c's dpo (another beta) joins as c/dpo,
    // the shared sft once.
    let prompts = d.path().join("prompts.jsonl");
    let (b_dir, c_dir) = (runs.join("b"), runs.join("c"));
    let out = common::eval_quick(&b_dir, &prompts, &["--with", c_dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = std::fs::read_to_string(b_dir.join("report/report.md")).unwrap();
    assert!(
        md.contains("| sft |") && md.contains("| dpo |") && md.contains("| c/dpo |"),
        "{md}"
    );
    assert!(!md.contains("| c/sft |"), "the shared sft twice:\n{md}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(b_dir.join("report/report.json")).unwrap())
            .unwrap();
    let row = report["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["label"] == "c/dpo")
        .unwrap()
        .clone();
    let secs = |path: &str| manifest(path)["seconds"].as_f64().unwrap();
    assert_eq!(row["seconds"].as_f64().unwrap(), secs("c/dpo"));
    let route = row["route_seconds"].as_f64().unwrap();
    assert!(
        (route - (secs("c/dpo") + secs("c/sft"))).abs() < 1e-9,
        "{row}"
    );
    // Evaluating a run --with itself is refused.
    let out = rlhf(&[
        "eval",
        b_dir.to_str().unwrap(),
        "--with",
        b_dir.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("that is the run being evaluated"));
}
