//! `rlhf eval` and `rlhf samples` on a tiny finished run with one loop
//! round: the report's numbers agree with the answers it lists (recounted
//! here), the reference's KL to itself is zero, the plots are PNGs, and a
//! second evaluation gives the same report.

use crate::common;

use std::path::Path;

use common::rlhf;
use serde_json::Value;

use common::task_head as head;

fn json_file(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn eval_report_agrees_with_its_answers_and_samples_shows_them() {
    let d = tempfile::tempdir().unwrap();
    head("sft.jsonl", &d.path().join("sft.jsonl"), 64);
    head("preferences.jsonl", &d.path().join("prefs.jsonl"), 16);
    head("preferences_gold.jsonl", &d.path().join("gold.jsonl"), 8);
    head("prompts.jsonl", &d.path().join("prompts.jsonl"), 16);
    head("prompts_eval.jsonl", &d.path().join("eval.jsonl"), 12);
    let exp = d.path().join("exp.yaml");
    std::fs::write(
        &exp,
        "name: ev\ndevice: cpu\nmodel: {n_layer: 1, n_head: 2, n_embd: 16, n_positions: 48}\nstages:\n\
         \x20 sft: {kind: sft, data: sft.jsonl, max_steps: 4, batch_size: 8, eval_every: 2}\n\
         \x20 rm: {kind: reward, init: sft, data: prefs.jsonl, eval_data: gold.jsonl, max_steps: 4, batch_size: 4, eval_every: 2}\n\
         \x20 ppo:\n    kind: ppo\n    policy: sft\n    reward_model: rm\n    prompts: prompts.jsonl\n    eval_prompts: eval.jsonl\n    iterations: 3\n\
         \x20   rollout_batch: 4\n    minibatch_size: 4\n    ppo_epochs: 1\n    sampling: {max_new_tokens: 6}\n    policy_optimizer: {lr: 0.01}\n\
         loop:\n  repeat: [rm, ppo]\n  rounds: 1\n  prompts: prompts.jsonl\n  prompts_per_round: 4\n  k: 3\n\
         \x20 sampling: {max_new_tokens: 6}\n  labeller: {kind: gold}\n  policy_init: reference\n",
    )
    .unwrap();
    let out = rlhf(&["run", exp.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = d.path().join("runs/ev");
    // policy_init: reference: the round's PPO starts again from SFT, while
    // the round's answers were sampled from the first PPO's policy.
    let round_ppo = json_file(&run.join("round-1/ppo/manifest.json"));
    assert_eq!(
        round_ppo["config"]["stage"]["policy"].as_str().unwrap(),
        run.join("sft/checkpoint").to_str().unwrap()
    );
    let collect = json_file(&run.join("round-1/collect/manifest.json"));
    let first_ppo = json_file(&run.join("ppo/manifest.json"));
    // Upstream keys are named by the stage they come from.
    assert_eq!(collect["upstream"]["ppo"], first_ppo["key"]);

    let out = rlhf(&["eval", run.to_str().unwrap(), "--max-new-tokens", "8"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report_dir = run.join("report");
    let report = json_file(&report_dir.join("report.json"));
    let labels: Vec<&str> = report["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["sft", "ppo", "round-1/ppo"]);
    assert_eq!(report["reference"], "sft");
    assert_eq!(report["reward_model"], "round-1/rm");
    assert_eq!(report["prompts"], 12);

    // Recount every number from the answers it lists.
    let answers: Vec<Value> = std::fs::read_to_string(report_dir.join("answers.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), 12);
    for (i, policy) in report["policies"].as_array().unwrap().iter().enumerate() {
        let (mut wins, mut ties, mut losses, mut gold_sum, mut exact) = (0, 0, 0, 0.0, 0);
        for a in &answers {
            let ours = &a["answers"][i];
            let theirs = &a["answers"][0];
            assert_eq!(ours["policy"], policy["label"]);
            let (g, r) = (
                ours["gold"].as_f64().unwrap(),
                theirs["gold"].as_f64().unwrap(),
            );
            gold_sum += g;
            exact += usize::from(g == 1.0);
            match g.partial_cmp(&r).unwrap() {
                std::cmp::Ordering::Greater => wins += 1,
                std::cmp::Ordering::Equal => ties += 1,
                std::cmp::Ordering::Less => losses += 1,
            }
        }
        let vs = &policy["gold_vs_reference"];
        assert_eq!(
            (
                vs["wins"].as_u64(),
                vs["ties"].as_u64(),
                vs["losses"].as_u64()
            ),
            (Some(wins), Some(ties), Some(losses)),
            "{}",
            policy["label"]
        );
        let rate = vs["win_rate"].as_f64();
        if wins + losses > 0 {
            assert!((rate.unwrap() - wins as f64 / (wins + losses) as f64).abs() < 1e-12);
        } else {
            assert!(rate.is_none());
        }
        assert!((policy["gold_score"].as_f64().unwrap() - gold_sum / 12.0).abs() < 1e-9);
        assert!((policy["exact"].as_f64().unwrap() - exact as f64 / 12.0).abs() < 1e-9);
        assert!(policy["kl_to_reference"].as_f64().unwrap().is_finite());
    }
    // By family: the eval file's families, adding up to the totals.
    let eval_families: std::collections::BTreeSet<String> =
        std::fs::read_to_string(d.path().join("eval.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["family"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
    for policy in report["policies"].as_array().unwrap() {
        let by = policy["gold_vs_reference_by_family"].as_object().unwrap();
        assert_eq!(
            by.keys()
                .cloned()
                .collect::<std::collections::BTreeSet<_>>(),
            eval_families
        );
        for key in ["wins", "ties", "losses"] {
            let sum: u64 = by.values().map(|v| v[key].as_u64().unwrap()).sum();
            assert_eq!(
                sum,
                policy["gold_vs_reference"][key].as_u64().unwrap(),
                "{key}"
            );
        }
    }
    // The reference against itself: all ties, no KL.
    let sft = &report["policies"][0];
    assert_eq!(sft["kl_to_reference"].as_f64(), Some(0.0));
    assert_eq!(sft["gold_vs_reference"]["ties"], 12);
    // PPO at a high learning rate has moved away from SFT.
    assert!(report["policies"][2]["kl_to_reference"].as_f64().unwrap() > 0.0);

    // The gold judge, run apart, agrees with the listed scores.
    let input: String = answers
        .iter()
        .map(|a| {
            serde_json::json!({"prompt": a["prompt"], "answer": a["answers"][1]["answer"]})
                .to_string()
                + "\n"
        })
        .collect();
    let judge_in = d.path().join("judge.jsonl");
    std::fs::write(&judge_in, input).unwrap();
    let judged = rlhf(&["judge", "--input", judge_in.to_str().unwrap()]);
    assert!(judged.status.success());
    for (line, a) in String::from_utf8(judged.stdout)
        .unwrap()
        .lines()
        .zip(&answers)
    {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["score"], a["answers"][1]["gold"]);
    }

    // Reward models: one per round, measured on the held-out rankings.
    let rms = report["reward_models"].as_array().unwrap();
    assert_eq!(rms.len(), 2);
    // Beside each accuracy, "the longer answer wins" on the same pairs,
    // recounted from the rankings file (bytes: the byte tokenizer's tokens).
    let (mut right, mut pairs) = (0.0, 0usize);
    for line in std::fs::read_to_string(d.path().join("gold.jsonl"))
        .unwrap()
        .lines()
    {
        let row: Value = serde_json::from_str(line).unwrap();
        let (answers, ranks) = (
            row["responses"].as_array().unwrap(),
            row["ranking"].as_array().unwrap(),
        );
        for i in 0..answers.len() {
            for j in 0..answers.len() {
                if ranks[i].as_u64() < ranks[j].as_u64() {
                    let (a, b) = (
                        answers[i].as_str().unwrap().len(),
                        answers[j].as_str().unwrap().len(),
                    );
                    right += if a > b {
                        1.0
                    } else if a == b {
                        0.5
                    } else {
                        0.0
                    };
                    pairs += 1;
                }
            }
        }
    }
    for m in rms {
        let acc = m["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc) && m["pairs"].as_u64().unwrap() > 0);
        assert_eq!(m["pairs"].as_u64(), Some(pairs as u64));
        let length = m["length_accuracy"].as_f64().unwrap();
        assert!((length - right / pairs as f64).abs() < 1e-12, "{length}");
    }

    // Plots: real PNGs, listed in the report and linked from the Markdown.
    let md = std::fs::read_to_string(report_dir.join("report.md")).unwrap();
    for plot in [
        "sft_loss.png",
        "reward_accuracy.png",
        "ppo_training.png",
        "overoptimization.png",
    ] {
        let bytes = std::fs::read(report_dir.join(plot)).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{plot}");
        assert!(md.contains(&format!("]({plot})")), "{plot} not linked");
    }
    assert!(md.contains("| round-1/ppo |"), "{md}");

    // Same run, same seed: the same report.
    let first = std::fs::read(report_dir.join("report.json")).unwrap();
    assert!(
        rlhf(&["eval", run.to_str().unwrap(), "--max-new-tokens", "8"])
            .status
            .success()
    );
    assert_eq!(
        first,
        std::fs::read(report_dir.join("report.json")).unwrap()
    );

    // Samples: each shown prompt with one line per policy.
    let out = rlhf(&["samples", run.to_str().unwrap(), "-n", "3"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for a in answers.iter().take(3) {
        assert!(
            text.contains(a["prompt"].as_str().unwrap().trim_end()),
            "{text}"
        );
    }
    assert_eq!(text.matches("round-1/ppo").count(), 3, "{text}");
    let out = rlhf(&["samples", run.to_str().unwrap(), "-n", "2", "--json"]);
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["answers"].as_array().unwrap().len(), 3);

    // A stage's own flags (did not learn) reach the report, and so does
    // the single warning of a summary written before flags.
    let manifest_path = run.join("ppo/manifest.json");
    let mut manifest = json_file(&manifest_path);
    manifest["summary"]["flags"] =
        serde_json::json!(["ppo did not improve by the judge: (written by the test)"]);
    manifest["summary"]["warning"] = Value::from("ppo may not be learning: (written by the test)");
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    assert!(
        rlhf(&["eval", run.to_str().unwrap(), "--max-new-tokens", "8"])
            .status
            .success()
    );
    let md = std::fs::read_to_string(report_dir.join("report.md")).unwrap();
    assert!(
        md.contains("## Flagged stages")
            && md.contains("- `ppo`: ppo did not improve by the judge: (written by the test)")
            && md.contains("- `ppo`: ppo may not be learning: (written by the test)"),
        "{md}"
    );
    let report = json_file(&report_dir.join("report.json"));
    let ppo = report["flagged"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["stage"] == "ppo")
        .unwrap_or_else(|| panic!("{}", report["flagged"]));
    assert_eq!(ppo["flags"].as_array().unwrap().len(), 2);

    // The round's reward model gone: the report says which one scored.
    std::fs::remove_dir_all(run.join("round-1/rm")).unwrap();
    let out = rlhf(&["eval", run.to_str().unwrap(), "--max-new-tokens", "8"]);
    assert!(out.status.success());
    let report = json_file(&report_dir.join("report.json"));
    assert_eq!(report["reward_model"], "rm");
    let warning =
        "round-1 has no finished reward model; answers are scored by rm, the latest one found";
    assert!(
        report["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w == warning),
        "{}",
        report["warnings"]
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains(warning));
}

#[test]
fn eval_of_a_folder_that_is_not_a_run_says_so() {
    let d = tempfile::tempdir().unwrap();
    let out = rlhf(&["eval", d.path().join("nope").to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no such run folder"), "{err}");
    let out = rlhf(&["eval", d.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no finished stages"), "{err}");
}

/// Scores of `(prompt, answer)` pairs by the reward model in `model`,
/// through `rlhf reward`.
fn rewards_of(model: &Path, pairs: &[(String, String)], dir: &Path) -> Vec<f64> {
    let input = dir.join("to_score.jsonl");
    let lines: Vec<String> = pairs
        .iter()
        .map(|(p, a)| serde_json::json!({"prompt": p, "answer": a}).to_string())
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let out = common::rlhf_ok(&[
        "reward",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    out.lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["reward"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// A run without a gold judge: a reward stage trained on held-out
/// rankings judges every policy (and is no policy's reward model), and
/// another ranks the loop round's answers. An experiment in which a stage
/// reads the judge is refused.
#[test]
fn held_out_reward_stages_judge_the_policies_and_label_the_round() {
    let d = tempfile::tempdir().unwrap();
    head("sft.jsonl", &d.path().join("sft.jsonl"), 64);
    head("preferences.jsonl", &d.path().join("prefs.jsonl"), 16);
    head("preferences_gold.jsonl", &d.path().join("gold.jsonl"), 12);
    head("prompts.jsonl", &d.path().join("prompts.jsonl"), 16);
    head("prompts_eval.jsonl", &d.path().join("eval.jsonl"), 12);
    let text = "name: held\ndevice: cpu\nmodel: {n_layer: 1, n_head: 2, n_embd: 16, n_positions: 48}\n\
         judge: {kind: reward_model, stage: judge}\nstages:\n\
         \x20 sft: {kind: sft, data: sft.jsonl, max_steps: 4, batch_size: 8}\n\
         \x20 rm: {kind: reward, init: sft, data: prefs.jsonl, eval_data: gold.jsonl, max_steps: 4, batch_size: 4}\n\
         \x20 labeller: {kind: reward, init: sft, data: gold.jsonl, max_steps: 4, batch_size: 4}\n\
         \x20 judge: {kind: reward, init: sft, data: gold.jsonl, eval_data: prefs.jsonl, max_steps: 6, batch_size: 4}\n\
         \x20 ppo:\n    kind: ppo\n    policy: sft\n    reward_model: rm\n    prompts: prompts.jsonl\n    eval_prompts: eval.jsonl\n    iterations: 2\n\
         \x20   rollout_batch: 4\n    minibatch_size: 4\n    ppo_epochs: 1\n    sampling: {max_new_tokens: 6}\n    policy_optimizer: {lr: 0.01}\n\
         loop:\n  repeat: [rm, ppo]\n  rounds: 1\n  prompts: prompts.jsonl\n  prompts_per_round: 4\n  k: 3\n\
         \x20 sampling: {max_new_tokens: 6}\n  labeller: {kind: reward_model, model: labeller}\n  policy_init: reference\n";
    let exp = d.path().join("exp.yaml");
    // A stage that reads the judge makes it no held-out judge.
    std::fs::write(
        &exp,
        text.replace("reward_model: rm", "reward_model: judge"),
    )
    .unwrap();
    let err = common::Rlhf::new(["plan", exp.to_str().unwrap()]).fails();
    assert!(
        err.contains("judge.stage: stage ppo reads judge") && err.contains("at line 4"),
        "{err}"
    );
    std::fs::write(&exp, text).unwrap();
    let plan = common::rlhf_ok(&["plan", exp.to_str().unwrap()]);
    assert!(
        plan.contains("round-1/collect (collect) after labeller, ppo"),
        "{plan}"
    );
    common::rlhf_ok(&["run", exp.to_str().unwrap()]);
    let run = d.path().join("runs/held");

    // The round's new rankings are the labeller's order of its answers.
    let prefs = run.join("round-1/collect/checkpoint/preferences.parquet");
    let table = rlhf_datasets::load::read_table(&prefs).unwrap();
    let groups = rlhf_datasets::preference::ranked_groups(&table, &prefs)
        .unwrap()
        .groups;
    let new = &groups[groups.len() - 4..];
    let pairs: Vec<(String, String)> = new
        .iter()
        .flat_map(|g| g.responses.iter().map(|r| (g.prompt.clone(), r.clone())))
        .collect();
    let scores = rewards_of(&run.join("labeller/checkpoint"), &pairs, d.path());
    for (i, g) in new.iter().enumerate() {
        let s = &scores[i * 3..i * 3 + 3];
        let ranks: Vec<usize> = s
            .iter()
            .map(|x| s.iter().filter(|&&o| o > *x).count())
            .collect();
        assert_eq!(g.ranking, ranks, "{g:?} scored {s:?}");
    }

    common::rlhf_ok(&["eval", run.to_str().unwrap(), "--max-new-tokens", "6"]);
    let report = json_file(&run.join("report/report.json"));
    assert!(
        report["judge"].as_str().unwrap().contains("`judge`"),
        "{}",
        report["judge"]
    );
    assert_eq!(report["reward_model"], "round-1/rm");
    assert_eq!(report["examples"].as_array().unwrap().len(), 10);
    assert!(
        report["gold_length_correlation"].is_number()
            || report["gold_length_correlation"].is_null()
    );
    let answers: Vec<Value> = std::fs::read_to_string(run.join("report/answers.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (i, policy) in report["policies"].as_array().unwrap().iter().enumerate() {
        assert!(policy["exact"].is_null(), "{policy}");
        // Each gold score is the judge's reward of that answer.
        let pairs: Vec<(String, String)> = answers
            .iter()
            .map(|a| {
                let s = |v: &Value| v.as_str().unwrap().to_owned();
                (s(&a["prompt"]), s(&a["answers"][i]["answer"]))
            })
            .collect();
        let judged = rewards_of(&run.join("judge/checkpoint"), &pairs, d.path());
        for (a, j) in answers.iter().zip(judged) {
            let gold = a["answers"][i]["gold"].as_f64().unwrap();
            assert!(
                (gold - j).abs() < 1e-4,
                "{}: gold {gold}, judge {j}",
                policy["label"]
            );
        }
    }
    let md = std::fs::read_to_string(run.join("report/report.md")).unwrap();
    assert!(
        md.contains("## Answers side by side") && md.contains("### Prompt 10"),
        "{md}"
    );
}
