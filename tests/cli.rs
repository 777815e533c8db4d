//! The model commands as a user runs them: init, generate, score.

use crate::common;

use std::path::Path;

use common::{rlhf, rlhf_ok};
use serde_json::Value;

fn tiny_model(dir: &std::path::Path) -> String {
    let out = dir.join("model");
    let out_s = out.to_str().unwrap().to_owned();
    rlhf_ok(&[
        "init",
        "--out",
        &out_s,
        "--n-layer",
        "2",
        "--n-head",
        "2",
        "--n-embd",
        "32",
        "--n-positions",
        "64",
        "--seed",
        "3",
    ]);
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    out_s
}

fn json_lines(s: &str) -> Vec<Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

#[test]
fn greedy_generate_is_deterministic_and_bounded() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny_model(d.path());
    let args = [
        "generate",
        "--model",
        &m,
        "--prompt",
        "Sort: 3 1 2",
        "--prompt",
        "Hi",
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
        "--json",
        "--device",
        "cpu",
    ];
    let a = json_lines(&rlhf_ok(&args));
    let b = json_lines(&rlhf_ok(&args));
    assert_eq!(a, b);
    assert_eq!(a.len(), 2);
    for line in &a {
        let ids = line["answer_ids"].as_array().unwrap();
        assert!(!ids.is_empty() && ids.len() <= 12);
        assert!(line["answer"].is_string());
    }
}

#[test]
fn generate_uses_the_room_the_model_has_left() {
    // The tiny model holds 64 positions; the default --max-new-tokens is 64.
    let d = tempfile::tempdir().unwrap();
    let m = tiny_model(d.path());
    let out = rlhf(&["generate", "--model", &m, "--prompt", "abcd", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--max-new-tokens 64 capped to 60"),
        "{stderr}"
    );
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert!(line["answer_ids"].as_array().unwrap().len() <= 60);
}

#[test]
fn sampled_generate_depends_on_seed_only() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny_model(d.path());
    let run = |seed: &str| {
        rlhf_ok(&[
            "generate",
            "--model",
            &m,
            "--prompt",
            "abc",
            "--max-new-tokens",
            "20",
            "--ignore-eos",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--json",
        ])
    };
    assert_eq!(run("1"), run("1"));
    assert_ne!(run("1"), run("2"));
}

#[test]
fn score_reports_consistent_logprobs_nll_and_perplexity() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny_model(d.path());
    let input = d.path().join("texts.jsonl");
    std::fs::write(
        &input,
        "{\"text\": \"hello world\"}\n\n{\"ids\": [104, 105, 33]}\n",
    )
    .unwrap();
    let lines = json_lines(&rlhf_ok(&[
        "score",
        "--model",
        &m,
        "--text",
        "abc",
        "--input",
        input.to_str().unwrap(),
    ]));
    assert_eq!(lines.len(), 3);
    let n_scored: Vec<u64> = lines
        .iter()
        .map(|l| l["n_scored"].as_u64().unwrap())
        .collect();
    assert_eq!(n_scored, vec![2, 10, 2]);
    for l in &lines {
        let lp: Vec<f64> = l["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let nll = l["nll"].as_f64().unwrap();
        assert!((nll + lp.iter().sum::<f64>()).abs() < 1e-9);
        let ppl = l["perplexity"].as_f64().unwrap();
        assert!((ppl - (nll / lp.len() as f64).exp()).abs() < 1e-9);
        // An untrained model is near uniform over 264 ids: perplexity ~ 264.
        assert!(ppl > 100.0 && ppl < 700.0, "perplexity {ppl}");
    }
    // The same text as text and as ids scores the same (up to float
    // rounding: alone it is a matmul of another shape than in the batch).
    let by_ids = json_lines(&rlhf_ok(&["score", "--model", &m, "--text", "hi!"]));
    let floats = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let (alone, batched) = (
        floats(&by_ids[0]["logprobs"]),
        floats(&lines[2]["logprobs"]),
    );
    assert_eq!(alone.len(), batched.len());
    for (a, b) in alone.iter().zip(&batched) {
        assert!((a - b).abs() < 1e-5, "{alone:?} vs {batched:?}");
    }

    // Token ids need no tokenizer: the folder without one scores them alike.
    std::fs::remove_file(Path::new(&m).join("tokenizer.json")).unwrap();
    std::fs::remove_file(Path::new(&m).join("checksums.sha256")).unwrap();
    let ids = d.path().join("ids.jsonl");
    std::fs::write(&ids, format!("{{\"ids\": {}}}\n", by_ids[0]["ids"])).unwrap();
    let no_tok = json_lines(&rlhf_ok(&[
        "score",
        "--model",
        &m,
        "--input",
        ids.to_str().unwrap(),
    ]));
    assert_eq!(no_tok[0]["logprobs"], by_ids[0]["logprobs"]);
    assert!(no_tok[0]["tokens"].is_null());
}

#[test]
fn bad_inputs_get_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny_model(d.path());
    let missing = d.path().join("nope");
    let out = rlhf(&[
        "generate",
        "--model",
        missing.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a model folder") && err.contains("nope"),
        "{err}"
    );

    let bad = d.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"ok\"}\n{\"txt\": 1}\n").unwrap();
    let out = rlhf(&["score", "--model", &m, "--input", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("line 2") && err.contains("bad.jsonl"),
        "{err}"
    );

    let long = "x".repeat(100);
    let out = rlhf(&["score", "--model", &m, "--text", &long]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("n_positions"),
        "{err}"
    );

    let out = rlhf(&["generate", "--model", &m, "--prompt", "x", "--top-p", "0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("top_p"), "{err}");

    let out = rlhf(&[
        "generate", "--model", &m, "--prompt", "x", "--device", "tpu",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("tpu"));

    // No answer of no tokens: refused, not one token.
    let out = rlhf(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "x",
        "--max-new-tokens",
        "0",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--max-new-tokens: must be at least 1"),
        "{err}"
    );

    // A non-finite model setting given with --set is named, with its --set.
    let exp = d.path().join("exp.yaml");
    std::fs::write(
        &exp,
        "name: t\nmodel: {n_layer: 1, n_head: 2, n_embd: 16, n_positions: 32}\nstages:\n  sft: {kind: sft, data: sft.jsonl}\n",
    )
    .unwrap();
    let out = rlhf(&[
        "plan",
        exp.to_str().unwrap(),
        "--set",
        "model.layer_norm_epsilon=.inf",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("model.layer_norm_epsilon: must be a finite number")
            && err.contains("(from --set model.layer_norm_epsilon=.inf)"),
        "{err}"
    );
}

#[test]
fn reward_scores_answers_and_refuses_lm_models() {
    let d = tempfile::tempdir().unwrap();
    let lm = tiny_model(d.path());
    let rm = d.path().join("rm");
    rlhf_ok(&[
        "init",
        "--out",
        rm.to_str().unwrap(),
        "--n-layer",
        "1",
        "--n-head",
        "2",
        "--n-embd",
        "16",
        "--head",
        "scalar",
    ]);
    let rm = rm.to_str().unwrap();
    let by_flag = json_lines(&rlhf_ok(&[
        "reward", "--model", rm, "--prompt", "Q\n", "--answer", "a", "--answer", "bb",
    ]));
    assert_eq!(by_flag.len(), 2);
    let input = d.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"prompt\": \"Q\\n\", \"answer\": \"bb\", \"id\": 7}\n",
    )
    .unwrap();
    let by_file = json_lines(&rlhf_ok(&[
        "reward",
        "--model",
        rm,
        "--input",
        input.to_str().unwrap(),
    ]));
    assert_eq!(by_file[0]["id"], 7, "input fields are echoed");
    let (a, b) = (
        by_flag[1]["reward"].as_f64().unwrap(),
        by_file[0]["reward"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-6 && a.is_finite());
    assert_ne!(by_flag[0]["reward"], by_flag[1]["reward"]);
    let out = rlhf(&["reward", "--model", &lm, "--prompt", "Q", "--answer", "a"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no scalar head"));
}

/// Inputs of the text commands are bounded: a device is refused by name,
/// a line longer than the limit gets an error naming it, and a UTF-8 BOM
/// (as some editors write) is skipped.
#[test]
fn command_inputs_are_regular_bounded_files() {
    let d = tempfile::tempdir().unwrap();
    let out = rlhf(&["judge", "--input", "/dev/zero"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/dev/zero is a device"),
        "{err}"
    );
    let out = rlhf(&["plan", "/dev/zero"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/dev/zero: is a device, expected a regular file"),
        "{err}"
    );
    let long = d.path().join("long.jsonl");
    let text = "x".repeat(rlhf_datasets::load::MAX_TEXT_BYTES + 10);
    std::fs::write(
        &long,
        format!("{{\"prompt\": \"{text}\", \"answer\": \"a\"}}\n"),
    )
    .unwrap();
    let out = rlhf(&["judge", "--input", long.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("line 1: longer than 4.0 MB"),
        "{err}"
    );
    let bom = d.path().join("bom.jsonl");
    std::fs::write(
        &bom,
        "\u{feff}{\"prompt\": \"Reverse: ab\\n\", \"answer\": \"ba\"}\n",
    )
    .unwrap();
    let out = rlhf_ok(&["judge", "--input", bom.to_str().unwrap()]);
    assert!(out.contains("\"score\""), "{out}");
}
