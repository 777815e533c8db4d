//! Learning you can trust: a stage stuck near what knows nothing of the
//! task is flagged against its baselines and, with `fail_if_not_learning`,
//! stops the run before what depends on it; `seeds:` runs an experiment
//! once per seed and `rlhf eval` reports each policy's spread over them.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::common::{rlhf, rlhf_ok, task_head};

/// `rlhf eval RUN` with short answers and one KL sample; its stdout.
fn evaluate(run: &Path, max_new_tokens: &str) -> String {
    let run = run.to_str().unwrap();
    rlhf_ok(&[
        "eval",
        run,
        "--max-new-tokens",
        max_new_tokens,
        "--kl-samples",
        "1",
    ])
}

fn json_file(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// SFT on the bundled task at a learning rate that leaves it on the
/// plateau of token frequencies after 90 steps (its loss falls from
/// ln 257 = 5.5 to about 3.4, far more than the 2% the eval-loss check
/// asks), then a reward model from it.
fn plateau_experiment(dir: &Path) -> std::path::PathBuf {
    task_head("sft.jsonl", &dir.join("sft.jsonl"), 2000);
    task_head("preferences.jsonl", &dir.join("prefs.jsonl"), 200);
    task_head("prompts_eval.jsonl", &dir.join("prompts.jsonl"), 60);
    let exp = dir.join("plateau.yaml");
    std::fs::write(
        &exp,
        "name: plateau\ndevice: cpu\nfail_if_not_learning: true\n\
         model: {n_layer: 1, n_head: 2, n_embd: 32, n_positions: 64}\nstages:\n\
         \x20 sft: {kind: sft, data: sft.jsonl, eval_prompts: prompts.jsonl, max_steps: 90, batch_size: 16,\n\
         \x20       max_len: 64, eval_every: 30, optimizer: {lr: 0.001}}\n\
         \x20 rm: {kind: reward, init: sft, data: prefs.jsonl, max_steps: 2, batch_size: 4, max_len: 64}\n",
    )
    .unwrap();
    exp
}

#[test]
fn a_stage_on_the_plateau_is_flagged_and_stops_the_run_before_the_reward_model() {
    let d = tempfile::tempdir().unwrap();
    let exp = plateau_experiment(d.path());
    let run = d.path().join("runs/plateau");
    let out = rlhf(&["run", exp.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the run must stop:\n{stderr}");
    assert!(
        stderr.contains("sft finished but was flagged as not learning")
            && stderr.contains("not run (downstream of a flagged stage): rm"),
        "{stderr}"
    );
    assert!(!run.join("rm").exists(), "the reward model never started");

    // SFT itself finished: its checkpoint, and a summary that names the
    // frequency baseline with its numbers.
    let manifest = json_file(&run.join("sft/manifest.json"));
    assert_eq!(manifest["status"], "complete");
    assert!(run.join("sft/checkpoint/model.safetensors").exists());
    let summary = &manifest["summary"];
    let freq = summary["baselines"]["frequency_loss"].as_f64().unwrap();
    let loss = summary["final_eval_loss"].as_f64().unwrap();
    let flags: Vec<&str> = summary["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    let frequency_flag = flags
        .iter()
        .find(|f| f.contains("frequency baseline"))
        .unwrap_or_else(|| panic!("{flags:?}"));
    assert!(
        frequency_flag.contains(&format!("{loss:.4}"))
            && frequency_flag.contains(&format!("{freq:.4}")),
        "{frequency_flag}"
    );
    assert!(loss > 0.75 * freq, "on the plateau: {loss} vs {freq}");
    // The eval-loss check alone would have passed it: the loss fell far.
    let metrics = std::fs::read_to_string(run.join("sft/metrics.jsonl")).unwrap();
    let start: Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    let start = start["eval_loss"].as_f64().unwrap();
    assert!(loss < 0.9 * start, "fell from {start} to {loss}");
    assert!(
        !flags.iter().any(|f| f.contains("may not be learning")),
        "{flags:?}"
    );
    // The baseline is the training answers' token entropy: by hand over
    // every row (the stage's 95% training share lands within 0.02 of it).
    let by_hand = answer_byte_entropy(&d.path().join("sft.jsonl"));
    assert!((freq - by_hand).abs() < 0.02, "{freq} vs {by_hand}");
    // The judge at step 0 is recorded beside the end's.
    assert!(summary["baselines"]["eval_gold_before"].is_number());
    assert!(run.join("sft/samples_before.jsonl").exists());

    // `rlhf plan` says which stage was flagged, why, and that the run stops.
    let plan = String::from_utf8(rlhf(&["plan", exp.to_str().unwrap()]).stdout).unwrap();
    assert!(
        plan.contains("1. sft (sft): cached")
            && plan.contains("flagged: sft did not get clear of the frequency baseline")
            && plan.contains("fail_if_not_learning: the run stops here"),
        "{plan}"
    );

    // Without the setting the run goes on; the report names the flag.
    let out = rlhf(&[
        "run",
        exp.to_str().unwrap(),
        "--set",
        "fail_if_not_learning=false",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(run.join("rm/manifest.json").exists());
    evaluate(&run, "8");
    let report = json_file(&run.join("report/report.json"));
    let flagged = report["flagged"].as_array().unwrap();
    assert!(
        flagged.iter().any(|f| f["stage"] == "sft"
            && f["flags"][0]
                .as_str()
                .unwrap()
                .contains("frequency baseline")),
        "{flagged:?}"
    );
    let md = std::fs::read_to_string(run.join("report/report.md")).unwrap();
    assert!(
        md.contains("## Flagged stages") && md.contains("## SFT against its baselines"),
        "{md}"
    );
    assert_eq!(
        report["sft_baselines"][0]["frequency_loss"].as_f64(),
        Some(freq)
    );

    // A stage's own setting stops the run too; it is no part of the stage's
    // key (it changes nothing the stage makes), so SFT stays cached.
    let out = rlhf(&[
        "run",
        exp.to_str().unwrap(),
        "--set",
        "fail_if_not_learning=false",
        "--set",
        "stages.sft.fail_if_not_learning=true",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("not run (downstream of a flagged stage): rm")
            && stderr.contains("[sft] cached"),
        "{stderr}"
    );
}

/// Entropy (nats) of the answers' tokens for the byte tokenizer: each
/// answer's bytes and its EOS, over every row of `data`.
fn answer_byte_entropy(data: &Path) -> f64 {
    let mut counts: BTreeMap<i64, f64> = BTreeMap::new();
    for line in std::fs::read_to_string(data).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        for b in v["completion"].as_str().unwrap().bytes() {
            *counts.entry(i64::from(b)).or_default() += 1.0;
        }
        *counts.entry(-1).or_default() += 1.0;
    }
    let n: f64 = counts.values().sum();
    counts.values().map(|c| -(c / n) * (c / n).ln()).sum()
}

/// Each seed's mean gold score and gold win rate against SFT, from the
/// answers its report wrote (ties within 1e-9 left out of the rate).
fn per_seed_numbers(seed_run: &Path) -> BTreeMap<String, (f64, Option<f64>)> {
    let text = std::fs::read_to_string(seed_run.join("report/answers.jsonl")).unwrap();
    let mut gold: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut tally: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let answers = v["answers"].as_array().unwrap();
        let sft = answers.iter().find(|a| a["policy"] == "sft").unwrap()["gold"]
            .as_f64()
            .unwrap();
        for a in answers {
            let policy = a["policy"].as_str().unwrap().to_owned();
            let g = a["gold"].as_f64().unwrap();
            gold.entry(policy.clone()).or_default().push(g);
            let t = tally.entry(policy).or_default();
            if g > sft + 1e-9 {
                t.0 += 1;
            } else if g < sft - 1e-9 {
                t.1 += 1;
            }
        }
    }
    gold.into_iter()
        .map(|(policy, g)| {
            let (w, l) = tally[&policy];
            let rate = (w + l > 0).then(|| w as f64 / (w + l) as f64);
            (policy, (g.iter().sum::<f64>() / g.len() as f64, rate))
        })
        .collect()
}

/// Mean, min, max and the 95% t-interval (t(0.975, 2) = 4.303) of three.
fn spread_by_hand(xs: &[f64]) -> (f64, f64, f64, [f64; 2]) {
    assert_eq!(xs.len(), 3);
    let mean = xs.iter().sum::<f64>() / 3.0;
    let sd = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 2.0).sqrt();
    let half = 4.303 * sd / 3f64.sqrt();
    let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (mean, min, max, [mean - half, mean + half])
}

fn assert_spread(got: &Value, xs: &[f64], what: &str) {
    let (mean, min, max, [lo, hi]) = spread_by_hand(xs);
    let close = |k: &str, want: f64| {
        let v = got[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{what}.{k}: {got}"));
        assert!(
            (v - want).abs() < 1e-9,
            "{what}.{k}: {v} vs {want} from {xs:?}"
        );
    };
    close("mean", mean);
    close("min", min);
    close("max", max);
    let interval = &got["interval_95"];
    assert!(
        (interval[0].as_f64().unwrap() - lo).abs() < 1e-9,
        "{what}: {interval}"
    );
    assert!(
        (interval[1].as_f64().unwrap() - hi).abs() < 1e-9,
        "{what}: {interval}"
    );
}

#[test]
fn seeds_run_apart_and_eval_reports_their_spread() {
    let d = tempfile::tempdir().unwrap();
    task_head("sft.jsonl", &d.path().join("sft.jsonl"), 400);
    task_head("prompts.jsonl", &d.path().join("prompts.jsonl"), 200);
    task_head("prompts_eval.jsonl", &d.path().join("eval.jsonl"), 40);
    let exp = d.path().join("seeds.yaml");
    std::fs::write(
        &exp,
        "name: seeds\ndevice: cpu\nseeds: [1, 2, 3]\n\
         model: {n_layer: 2, n_head: 2, n_embd: 48, n_positions: 64}\nstages:\n\
         \x20 sft: {kind: sft, data: sft.jsonl, eval_prompts: eval.jsonl, max_steps: 300, batch_size: 16, max_len: 64,\n\
         \x20       optimizer: {lr: 0.003}}\n\
         \x20 ppo: {kind: ppo, policy: sft, gold_reward: true, prompts: prompts.jsonl, eval_prompts: eval.jsonl,\n\
         \x20       iterations: 3, rollout_batch: 16, minibatch_size: 8, sampling: {max_new_tokens: 12},\n\
         \x20       policy_optimizer: {lr: 0.001}}\n",
    )
    .unwrap();
    let plan = String::from_utf8(rlhf(&["plan", exp.to_str().unwrap()]).stdout).unwrap();
    assert!(
        plan.contains("runs once per seed (seeds 1, 2, 3)"),
        "{plan}"
    );
    let out = rlhf(&["run", exp.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = d.path().join("runs/seeds");
    // Each seed is a whole run of its own: its seed in every stage, its
    // own keys, nothing copied from another seed.
    let mut keys = std::collections::BTreeSet::new();
    for seed in [1u64, 2, 3] {
        for stage in ["sft", "ppo"] {
            let m = json_file(&run.join(format!("seed-{seed}/{stage}/manifest.json")));
            assert_eq!(m["status"], "complete");
            assert_eq!(m["config"]["stage"]["seed"].as_u64(), Some(seed), "{stage}");
            assert!(m["copied_from"].is_null());
            assert!(keys.insert(m["key"].as_str().unwrap().to_owned()));
        }
    }
    assert!(
        !run.join("sft").exists(),
        "no stage of its own beside the seeds"
    );

    let stdout = evaluate(&run, "12");
    assert!(stdout.contains("over 3 seeds (1, 2, 3)"), "{stdout}");
    let report = json_file(&run.join("report/report.json"));
    assert_eq!(report["seeds"], serde_json::json!([1, 2, 3]));
    let numbers: Vec<_> = [1, 2, 3]
        .iter()
        .map(|s| per_seed_numbers(&run.join(format!("seed-{s}"))))
        .collect();
    let policies = report["policies"].as_array().unwrap();
    assert_eq!(policies.len(), 2);
    for p in policies {
        let label = p["label"].as_str().unwrap();
        let gold: Vec<f64> = numbers.iter().map(|n| n[label].0).collect();
        assert_spread(&p["gold_score"], &gold, &format!("{label} gold"));
        for (row, g) in p["seeds"].as_array().unwrap().iter().zip(&gold) {
            assert!((row["gold_score"].as_f64().unwrap() - g).abs() < 1e-9);
        }
        if label == "ppo" {
            let rates: Vec<f64> = numbers.iter().map(|n| n[label].1.unwrap()).collect();
            assert_spread(&p["win_rate"], &rates, "ppo win rate");
        }
    }
    let md = std::fs::read_to_string(run.join("report/report.md")).unwrap();
    assert!(
        md.contains("## Policies over the seeds") && md.contains("../seed-2/report/report.md"),
        "{md}"
    );
    // Each seed's own report stands beside its stages.
    assert!(run.join("seed-3/report/report.md").exists());
    // A folder of an earlier, longer seeds list is not averaged in.
    assert_eq!(
        json_file(&run.join("seeds.json"))["seeds"],
        serde_json::json!([1, 2, 3])
    );
    std::fs::create_dir_all(run.join("seed-9/sft")).unwrap();
    // A seed that finished no policy is left out, and the report says so.
    std::fs::remove_dir_all(run.join("seed-3/sft")).unwrap();
    std::fs::remove_dir_all(run.join("seed-3/ppo")).unwrap();
    evaluate(&run, "12");
    let report = json_file(&run.join("report/report.json"));
    assert_eq!(report["seeds"], serde_json::json!([1, 2]));
    assert!(
        report["left_out"][0]
            .as_str()
            .unwrap()
            .starts_with("seed 3 (seed-3): "),
        "{report}"
    );
    assert_eq!(
        report["left_out"].as_array().unwrap().len(),
        1,
        "seed-9 is passed over"
    );
    assert_eq!(report["policies"][1]["gold_score"]["seeds"], 2);
    // The seeds' folder is no run to watch: the error names one that is.
    let out = rlhf(&["watch", run.to_str().unwrap(), "--bind", "127.0.0.1:0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("holds one run per seed (seed-1, seed-2, seed-3)"),
        "{stderr}"
    );
}
