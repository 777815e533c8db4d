//! The bad-input corpus (`tests/bad_inputs/`): malformed experiment files,
//! SFT data, rankings, PPO prompts and model folders. Each case must fail
//! cleanly (exit status 1, never a panic), name the file at fault, and say
//! what is wrong: the text `EXPECTED` in each folder gives for it.
//!
//! `EXPECTED` lines are `file: text the error must contain`.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{rlhf, workspace};

fn corpus() -> PathBuf {
    workspace().join("tests/bad_inputs")
}

/// `(case file, expected text)` for a folder, every file in it covered.
fn cases(folder: &str) -> Vec<(PathBuf, String)> {
    let dir = corpus().join(folder);
    let text = std::fs::read_to_string(dir.join("EXPECTED")).unwrap();
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
    {
        let (file, expected) = line
            .split_once(": ")
            .unwrap_or_else(|| panic!("bad line {line}"));
        out.push((dir.join(file), expected.to_owned()));
    }
    let listed: Vec<&PathBuf> = out.iter().map(|(p, _)| p).collect();
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let p = e.path();
        if p.file_name().unwrap() != "EXPECTED" {
            assert!(listed.contains(&&p), "{} has no EXPECTED line", p.display());
        }
    }
    out
}

/// A clean failure: exit 1, no panic, the file named, the expected text.
fn check(case: &str, out: &Output, names: &str, expected: &str) -> bool {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ok = out.status.code() == Some(1)
        && !stderr.contains("panicked")
        && stderr.contains(names)
        && stderr.contains(expected);
    if !ok {
        eprintln!(
            "FAIL {case}: status {:?}, expected `{expected}` naming `{names}`, got:\n{stderr}",
            out.status
        );
    }
    ok
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn malformed_experiment_files() {
    let mut failed = 0;
    let all = cases("config");
    for (file, expected) in &all {
        let out = rlhf(&["plan", file.to_str().unwrap()]);
        failed += usize::from(!check(&file_name(file), &out, &file_name(file), expected));
    }
    assert_eq!(failed, 0, "{failed} of {} config cases failed", all.len());
}

/// Runs one stage of a tiny experiment whose `field` points at `data`.
fn stage_with(dir: &Path, stage_yaml: &str, stage: &str) -> Output {
    let exp = dir.join("exp.yaml");
    std::fs::write(
        &exp,
        format!(
            "name: bad\ndevice: cpu\nmodel: {{n_layer: 1, n_head: 2, n_embd: 16, n_positions: 32}}\nstages:\n{stage_yaml}"
        ),
    )
    .unwrap();
    rlhf(&["stage", "--config", exp.to_str().unwrap(), stage])
}

#[test]
fn malformed_sft_data() {
    let d = tempfile::tempdir().unwrap();
    let mut failed = 0;
    let all = cases("sft");
    for (file, expected) in &all {
        let yaml = format!(
            "  sft: {{kind: sft, data: \"{}\", max_steps: 1}}\n",
            file.display()
        );
        let out = stage_with(d.path(), &yaml, "sft");
        failed += usize::from(!check(&file_name(file), &out, &file_name(file), expected));
        assert!(!d.path().join("runs/bad/sft/checkpoint").exists());
    }
    assert_eq!(failed, 0, "{failed} of {} SFT data cases failed", all.len());
}

#[test]
fn malformed_rankings() {
    let d = tempfile::tempdir().unwrap();
    let mut failed = 0;
    let all = cases("preferences");
    for (file, expected) in &all {
        let yaml = format!(
            "  rm: {{kind: reward, data: \"{}\", max_steps: 1}}\n",
            file.display()
        );
        let out = stage_with(d.path(), &yaml, "rm");
        failed += usize::from(!check(&file_name(file), &out, &file_name(file), expected));
    }
    assert_eq!(failed, 0, "{failed} of {} ranking cases failed", all.len());
}

fn init_model(dir: &Path, head: &str) -> PathBuf {
    let out = dir.join(head);
    let o = rlhf(&[
        "init",
        "--out",
        out.to_str().unwrap(),
        "--n-layer",
        "1",
        "--n-head",
        "2",
        "--n-embd",
        "16",
        "--n-positions",
        "32",
        "--head",
        head,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

#[test]
fn malformed_ppo_prompts() {
    let d = tempfile::tempdir().unwrap();
    let (policy, rm) = (init_model(d.path(), "lm"), init_model(d.path(), "scalar"));
    let mut failed = 0;
    let all = cases("prompts");
    for (file, expected) in &all {
        let yaml = format!(
            "  ppo: {{kind: ppo, policy: \"{}\", reward_model: \"{}\", prompts: \"{}\", iterations: 1,\n\
             \x20       rollout_batch: 2, minibatch_size: 2, sampling: {{max_new_tokens: 4}}}}\n",
            policy.display(),
            rm.display(),
            file.display()
        );
        let out = stage_with(d.path(), &yaml, "ppo");
        failed += usize::from(!check(&file_name(file), &out, &file_name(file), expected));
    }
    assert_eq!(failed, 0, "{failed} of {} prompt cases failed", all.len());
}

/// Damaged model folders, made from a good one: what is changed, the file
/// the error must name, and the text it must contain.
type Damage = (&'static str, fn(&Path), &'static str, &'static str);

fn damages() -> Vec<Damage> {
    fn truncate(p: &Path) {
        let f = p.join("model.safetensors");
        let n = std::fs::metadata(&f).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(n / 3)
            .unwrap();
    }
    fn flip_byte(p: &Path) {
        let f = p.join("model.safetensors");
        let mut b = std::fs::read(&f).unwrap();
        let i = b.len() - 10;
        b[i] ^= 1;
        std::fs::write(&f, b).unwrap();
    }
    fn strip_checksums(p: &Path) {
        std::fs::remove_file(p.join("checksums.sha256")).unwrap();
    }
    fn truncate_unlisted(p: &Path) {
        strip_checksums(p);
        truncate(p);
    }
    fn no_weights(p: &Path) {
        std::fs::remove_file(p.join("model.safetensors")).unwrap();
        strip_checksums(p);
    }
    fn no_config(p: &Path) {
        std::fs::remove_file(p.join("config.json")).unwrap();
    }
    fn config_not_json(p: &Path) {
        std::fs::write(p.join("config.json"), "{ n_layer: ").unwrap();
        strip_checksums(p);
    }
    fn config_wrong_shape(p: &Path) {
        let f = p.join("config.json");
        let t = std::fs::read_to_string(&f)
            .unwrap()
            .replace("\"n_embd\": 16", "\"n_embd\": 32");
        std::fs::write(&f, t).unwrap();
        strip_checksums(p);
    }
    fn config_bad_heads(p: &Path) {
        let f = p.join("config.json");
        let t = std::fs::read_to_string(&f)
            .unwrap()
            .replace("\"n_head\": 2", "\"n_head\": 3");
        std::fs::write(&f, t).unwrap();
        strip_checksums(p);
    }
    fn no_tokenizer(p: &Path) {
        std::fs::remove_file(p.join("tokenizer.json")).unwrap();
        strip_checksums(p);
    }
    fn tokenizer_garbage(p: &Path) {
        std::fs::write(p.join("tokenizer.json"), "not a tokenizer").unwrap();
        strip_checksums(p);
    }
    fn checksum_list_garbage(p: &Path) {
        std::fs::write(p.join("checksums.sha256"), "deadbeef model.safetensors\n").unwrap();
    }
    fn link(p: &Path, name: &str, target: &Path) {
        std::fs::remove_file(p.join(name)).unwrap();
        std::os::unix::fs::symlink(target, p.join(name)).unwrap();
    }
    fn weights_link_to_a_device(p: &Path) {
        strip_checksums(p);
        link(p, "model.safetensors", Path::new("/dev/zero"));
    }
    fn tokenizer_link_to_a_device(p: &Path) {
        strip_checksums(p);
        link(p, "tokenizer.json", Path::new("/dev/zero"));
    }
    fn listed_file_links_outside(p: &Path) {
        let outside = p.with_extension("outside");
        std::fs::write(&outside, "{}").unwrap();
        link(p, "config.json", &outside);
    }
    vec![
        (
            "weights linked to /dev/zero",
            weights_link_to_a_device,
            "model.safetensors",
            "is a device, expected a regular file",
        ),
        (
            "tokenizer linked to /dev/zero",
            tokenizer_link_to_a_device,
            "tokenizer.json",
            "is a device, expected a regular file",
        ),
        (
            "a listed file links out of the folder",
            listed_file_links_outside,
            "config.json",
            "links outside the folder",
        ),
        (
            "truncated weights",
            truncate,
            "model.safetensors",
            "corrupt",
        ),
        ("one flipped bit", flip_byte, "model.safetensors", "corrupt"),
        (
            "truncated, no checksums",
            truncate_unlisted,
            "model.safetensors",
            "truncated or corrupt",
        ),
        (
            "weights missing",
            no_weights,
            "model.safetensors",
            "not found",
        ),
        (
            "config missing",
            no_config,
            "config.json",
            "not a model folder",
        ),
        ("config not JSON", config_not_json, "config.json", "JSON"),
        (
            "config shape differs from weights",
            config_wrong_shape,
            "model.safetensors",
            "has shape",
        ),
        (
            "heads do not divide width",
            config_bad_heads,
            "config.json",
            "n_head",
        ),
        (
            "tokenizer missing",
            no_tokenizer,
            "tokenizer.json",
            "tokenizer",
        ),
        (
            "tokenizer not JSON",
            tokenizer_garbage,
            "tokenizer.json",
            "tokenizer",
        ),
        (
            "checksum list mangled",
            checksum_list_garbage,
            "checksums.sha256",
            "line 1",
        ),
    ]
}

#[test]
fn damaged_model_folders() {
    let d = tempfile::tempdir().unwrap();
    let good = init_model(d.path(), "lm");
    let mut failed = 0;
    let all = damages();
    for (i, (case, damage, names, expected)) in all.iter().enumerate() {
        let dir = d.path().join(format!("case-{i}"));
        std::fs::create_dir(&dir).unwrap();
        for e in std::fs::read_dir(&good).unwrap().flatten() {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        damage(&dir);
        let out = rlhf(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "ab",
        ]);
        failed += usize::from(!check(case, &out, names, expected));
    }
    assert_eq!(
        failed,
        0,
        "{failed} of {} model-folder cases failed",
        all.len()
    );
}

#[test]
fn the_corpus_has_at_least_fifty_cases() {
    let files: usize = ["config", "sft", "preferences", "prompts"]
        .iter()
        .map(|f| cases(f).len())
        .sum();
    let total = files + damages().len();
    assert!(total >= 50, "only {total} cases");
    eprintln!("bad-input corpus: {total} cases");
}
