//! `sweep:` in an experiment file: three PPO KL coefficients become three
//! PPO stages that share one SFT and one reward model (each trained
//! once), in folders a shell can type; `rlhf eval` puts the three
//! policies in one table, their gold columns filled by the experiment's
//! command judge.

use crate::common;

use std::path::Path;

const JUDGE: &str = r#"import json, sys
# An answer's score: its share of ASCII upper-case letters.
for line in sys.stdin:
    group = json.loads(line)
    scores = [sum("A" <= c <= "Z" for c in r) / max(1, len(r)) for r in group["responses"]]
    print(json.dumps({"scores": scores}), flush=True)
"#;

fn experiment(dir: &Path, extra: &str) -> std::path::PathBuf {
    common::task_head("sft.jsonl", &dir.join("sft.jsonl"), 40);
    common::task_head("preferences.jsonl", &dir.join("prefs.jsonl"), 16);
    common::task_head("prompts.jsonl", &dir.join("prompts.jsonl"), 8);
    std::fs::write(dir.join("judge.py"), JUDGE).unwrap();
    let python = common::python();
    let exp = dir.join("exp.yaml");
    std::fs::write(
        &exp,
        format!(
            "name: sweep\ndevice: cpu\nmax_parallel: 3\nmodel: {{n_layer: 1, n_head: 2, n_embd: 16, n_positions: 48}}\nstages:\n\
             \x20 sft: {{kind: sft, data: sft.jsonl, max_steps: 4, batch_size: 4}}\n\
             \x20 rm: {{kind: reward, init: sft, data: prefs.jsonl, max_steps: 2, batch_size: 2, max_len: 48}}\n\
             \x20 ppo: {{kind: ppo, policy: sft, reward_model: rm, prompts: prompts.jsonl, iterations: 2, rollout_batch: 4, minibatch_size: 4, sampling: {{max_new_tokens: 4}}, policy_optimizer: {{lr: 0.01}}, save_rollouts: true, eval_prompts: prompts.jsonl}}\n\
             sweep:\n  stages.ppo.kl_coef: [0.01, 0.1, 1.0]\n\
             judge: {{kind: command, command: [{}, judge.py]}}\n{extra}",
            python.display()
        ),
    )
    .unwrap();
    exp
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn a_sweep_shares_its_upstream_stages_and_one_report_judges_every_value() {
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path(), "");
    let plan = common::rlhf_ok(&["plan", exp.to_str().unwrap()]);
    for v in ["0.01", "0.1", "1.0"] {
        assert!(
            plan.contains(&format!("ppo[kl_coef={v}] (ppo) after rm, sft: to run")),
            "{plan}"
        );
    }
    let out = common::rlhf(&["run", exp.to_str().unwrap()]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert_eq!(
        log.matches("stage sft (sft)").count(),
        1,
        "sft trained once:\n{log}"
    );
    assert_eq!(
        log.matches("stage rm (reward)").count(),
        1,
        "rm trained once:\n{log}"
    );
    let run = d.path().join("runs/sweep");
    let rm_key = json(&run.join("rm/manifest.json"))["key"].clone();
    for v in ["0.01", "0.1", "1.0"] {
        let m = json(&run.join(format!("ppo.kl_coef={v}/manifest.json")));
        assert_eq!(m["stage"], format!("ppo[kl_coef={v}]"));
        assert_eq!(m["status"], "complete");
        assert_eq!(
            m["config"]["stage"]["kl_coef"].as_f64(),
            v.parse::<f64>().ok()
        );
        assert_eq!(
            m["upstream"]["rm"], rm_key,
            "every value reads the one reward model"
        );
    }
    assert!(!run.join("ppo").exists(), "no unswept ppo stage");

    let prompts = d.path().join("prompts.jsonl");
    // The experiment's judge is named on the command line: a run folder's
    // recorded command is never run for the person evaluating it.
    let judge = format!(
        "{} {}",
        common::python().display(),
        d.path().join("judge.py").display()
    );
    let out = common::eval_quick(&run, &prompts, &["--judge", &judge]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json(&run.join("report/report.json"));
    assert!(
        report["judge"].as_str().unwrap().contains("judge.py"),
        "{}",
        report["judge"]
    );
    let labels: Vec<&str> = report["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["label"].as_str().unwrap())
        .collect();
    assert_eq!(
        labels,
        [
            "sft",
            "ppo[kl_coef=0.01]",
            "ppo[kl_coef=0.1]",
            "ppo[kl_coef=1.0]"
        ]
    );
    // The gold scores are the judge's: recomputed here from the answers.
    let answers = std::fs::read_to_string(run.join("report/answers.jsonl")).unwrap();
    let mut sums = std::collections::BTreeMap::<String, (f64, f64)>::new();
    for line in answers.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        for a in row["answers"].as_array().unwrap() {
            let text = a["answer"].as_str().unwrap();
            let share = text.chars().filter(char::is_ascii_uppercase).count() as f64
                / text.chars().count().max(1) as f64;
            let e = sums
                .entry(a["policy"].as_str().unwrap().to_owned())
                .or_default();
            assert!(
                (a["gold"].as_f64().unwrap() - share).abs() < 1e-12,
                "{line}"
            );
            *e = (e.0 + share, e.1 + 1.0);
        }
    }
    for p in report["policies"].as_array().unwrap() {
        let (sum, n) = sums[p["label"].as_str().unwrap()];
        assert!(
            (p["gold_score"].as_f64().unwrap() - sum / n).abs() < 1e-12,
            "{p}"
        );
    }
    let md = std::fs::read_to_string(run.join("report/report.md")).unwrap();
    assert!(
        md.contains("| ppo[kl_coef=1.0] |") && md.contains("judge.py`."),
        "{md}"
    );
    rollouts_are_judged_for_the_overoptimisation_plot(&run, &report);
    stage_evals_are_judged_by_the_experiments_judge(&run);
}

/// Each PPO stage's own evals (greedy answers to `eval_prompts` before
/// and after) are scored by the experiment's judge program.
fn stage_evals_are_judged_by_the_experiments_judge(run: &Path) {
    let share = |a: &str| {
        a.chars().filter(char::is_ascii_uppercase).count() as f64 / a.chars().count().max(1) as f64
    };
    for v in ["0.01", "0.1", "1.0"] {
        let dir = run.join(format!("ppo.kl_coef={v}"));
        let summary = json(&dir.join("summary.json"));
        for (file, key) in [
            ("samples_before.jsonl", "eval_gold_before"),
            ("samples.jsonl", "eval_gold_after"),
        ] {
            let text = std::fs::read_to_string(dir.join(file)).unwrap();
            let mut scores = Vec::new();
            for line in text.lines() {
                let row: serde_json::Value = serde_json::from_str(line).unwrap();
                let expected = share(row["answer"].as_str().unwrap());
                assert!(
                    (row["gold_score"].as_f64().unwrap() - expected).abs() < 1e-12,
                    "{line}"
                );
                scores.push(expected);
            }
            assert_eq!(scores.len(), 8, "{file}");
            let mean = scores.iter().sum::<f64>() / scores.len() as f64;
            assert!(
                (summary[key].as_f64().unwrap() - mean).abs() < 1e-12,
                "{key} of {v}: {summary}"
            );
        }
    }
}

/// The over-optimisation plot's judged half comes from the experiment's
/// judge (not the bundled task's): each variant's saved rollouts' mean
/// judge score by iteration, recomputed here from the Parquet files.
fn rollouts_are_judged_for_the_overoptimisation_plot(run: &Path, report: &serde_json::Value) {
    for v in ["0.01", "0.1", "1.0"] {
        let label = format!("ppo[kl_coef={v}]");
        let got = report["rollout_judge_scores"][&label].as_array().unwrap();
        assert_eq!(got.len(), 2, "two iterations of {label}: {got:?}");
        for (i, point) in got.iter().enumerate() {
            assert_eq!(point[0].as_i64(), Some(i as i64 + 1));
            let file = run.join(format!(
                "ppo.kl_coef={v}/rollouts/iter-{:04}.parquet",
                i + 1
            ));
            let rows = rlhf_datasets::rollout::read_prompts_and_answers(&file).unwrap();
            let mean = rows
                .iter()
                .map(|(_, a)| {
                    a.chars().filter(char::is_ascii_uppercase).count() as f64
                        / a.chars().count().max(1) as f64
                })
                .sum::<f64>()
                / rows.len() as f64;
            assert!(
                (point[1].as_f64().unwrap() - mean).abs() < 1e-12,
                "{label} {point}"
            );
        }
    }
    let plots: Vec<&str> = report["plots"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p.as_str())
        .collect();
    assert!(plots.contains(&"overoptimization.png"), "{plots:?}");
}

#[test]
fn sweeps_that_cannot_work_are_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let looped =
        "loop: {repeat: [rm, ppo], rounds: 1, prompts: prompts.jsonl, labeller: {kind: gold}}\n";
    let exp = experiment(d.path(), looped);
    let out = common::rlhf(&["plan", exp.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("loop.repeat names `ppo`"),
        "{err}"
    );
    experiment(d.path(), "");
    // A --set of a swept setting would be overwritten without a word.
    let exp = d.path().join("exp.yaml");
    let out = common::rlhf(&[
        "plan",
        exp.to_str().unwrap(),
        "--set",
        "stages.ppo.kl_coef=0.5",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("the sweep sets stages.ppo.kl_coef"),
        "{err}"
    );
    let exp = d.path().join("bad.yaml");
    for (sweep, want) in [
        (
            "stages.nope.lr: [1]",
            "sweep.stages.nope.lr: no stage named \"nope\"",
        ),
        (
            "kl_coef: [1]",
            "sweep.kl_coef: expected `stages.<stage>.<setting>`",
        ),
        ("stages.ppo.kl_coef: []", "an empty list makes no stage"),
        ("stages.ppo.kl_coef: 0.1", "expected a list of values"),
        ("stages.ppo.data: [a/b.jsonl]", "cannot name a stage folder"),
    ] {
        let text = std::fs::read_to_string(d.path().join("exp.yaml")).unwrap();
        let text = text.replace(
            "  stages.ppo.kl_coef: [0.01, 0.1, 1.0]",
            &format!("  {sweep}"),
        );
        std::fs::write(&exp, text).unwrap();
        let out = common::rlhf(&["plan", exp.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{sweep}: {err}"
        );
        assert!(err.contains("bad.yaml"), "the error names the file: {err}");
    }
}

/// Every experiment file in configs/ (the YAML files; beside them, the
/// programs they run) loads and plans, with what its comments promise:
/// the sweep expands to three PPO stages, the Slurm file runs every stage
/// as a job.
#[test]
fn every_bundled_experiment_file_plans() {
    let configs = common::workspace().join("configs");
    let mut files: Vec<_> = std::fs::read_dir(&configs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 7, "{files:?}");
    for f in &files {
        let plan = common::rlhf_ok(&["plan", f.to_str().unwrap()]);
        let name = f.file_name().unwrap().to_str().unwrap();
        if name == "sweep.yaml" {
            assert_eq!(plan.matches("] (ppo) after rm, sft").count(), 3, "{plan}");
        }
        if name == "slurm.yaml" {
            assert_eq!(
                plan.matches("runs as a Slurm job: 1 node(s) x 1 task(s), time 02:00:00")
                    .count(),
                3,
                "{plan}"
            );
        }
    }
}
