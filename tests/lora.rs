//! LoRA end to end, on a Llama-layout base and on a GPT-2 one (Conv1D
//! weights, PEFT's `fan_in_fan_out`): adapters trained by an SFT stage
//! load in PEFT (`PeftModel.from_pretrained`) with our logits within 1e-4;
//! the stage's merged folder equals base + adapter (in transformers and
//! against PEFT's own merge); `rlhf merge` writes the same weights; a
//! resumed LoRA run (SFT, DPO) equals an uninterrupted one; PPO, GRPO and
//! DPO with LoRA run on one copy of the base and train only adapters, and
//! DPO's adapters load in PEFT with our logits.

use crate::common;

use std::path::{Path, PathBuf};

use rlhf_stages::model::checkpoint::weights_of;
use rlhf_stages::{HeadChoice, Model};
use tch::Tensor;

const EXPERIMENT: &str = "name: lora\ndevice: cpu\nstages:\n\
\x20 sft:\n\
\x20   kind: sft\n\
\x20   init: base\n\
\x20   data: sft.jsonl\n\
\x20   max_steps: 12\n\
\x20   batch_size: 8\n\
\x20   checkpoint_every: 4\n\
\x20   optimizer: {lr: 0.01, weight_decay: 0.0}\n\
\x20   lora: {r: 4, alpha: 8}\n\
\x20 rm:\n\
\x20   kind: reward\n\
\x20   init: base\n\
\x20   data: prefs.jsonl\n\
\x20   max_steps: 4\n\
\x20   batch_size: 2\n\
\x20   max_len: 48\n\
\x20 ppo:\n\
\x20   kind: ppo\n\
\x20   policy: sft\n\
\x20   reward_model: rm\n\
\x20   prompts: prompts.jsonl\n\
\x20   iterations: 3\n\
\x20   rollout_batch: 4\n\
\x20   minibatch_size: 4\n\
\x20   sampling: {max_new_tokens: 6}\n\
\x20   lora: {r: 2, target_modules: [q_proj, v_proj]}\n\
\x20 grpo:\n\
\x20   kind: grpo\n\
\x20   policy: sft\n\
\x20   reward_model: rm\n\
\x20   prompts: prompts.jsonl\n\
\x20   iterations: 3\n\
\x20   prompts_per_iteration: 2\n\
\x20   group_size: 4\n\
\x20   minibatch_size: 4\n\
\x20   optimizer: {lr: 0.01, weight_decay: 0.0}\n\
\x20   sampling: {max_new_tokens: 6}\n\
\x20   precision: bf16\n\
\x20   lora: {r: 2, target_modules: [q_proj, v_proj]}\n\
\x20 dpo:\n\
\x20   kind: dpo\n\
\x20   policy: sft\n\
\x20   data: prefs.jsonl\n\
\x20   max_steps: 6\n\
\x20   batch_size: 2\n\
\x20   max_len: 48\n\
\x20   checkpoint_every: 2\n\
\x20   optimizer: {lr: 0.01, weight_decay: 0.0}\n\
\x20   lora: {r: 2, alpha: 4, target_modules: [q_proj, v_proj, down_proj]}\n";

#[derive(Clone, Copy)]
enum Layout {
    Llama,
    Gpt2,
}

/// A fresh Llama-layout base and the experiment beside it.
fn setup(dir: &Path) -> PathBuf {
    setup_layout(dir, Layout::Llama)
}

/// A fresh base of `layout` and the experiment beside it; on GPT-2 the
/// adapters are named by its projections.
fn setup_layout(dir: &Path, layout: Layout) -> PathBuf {
    let base = dir.join("base");
    let mut args = vec!["init", "--n-layer", "2", "--n-head", "4", "--n-embd", "32"];
    args.extend(["--n-positions", "64", "--seed", "3"]);
    args.extend(["--out", base.to_str().unwrap()]);
    let experiment = match layout {
        Layout::Llama => {
            args.extend(["--layout", "llama", "--kv-heads", "2"]);
            EXPERIMENT.to_string()
        }
        Layout::Gpt2 => EXPERIMENT
            .replace("[q_proj, v_proj, down_proj]", "[c_attn, c_fc]")
            .replace("[q_proj, v_proj]", "[c_attn]"),
    };
    common::rlhf_ok(&args);
    common::task_head("sft.jsonl", &dir.join("sft.jsonl"), 64);
    common::task_head("preferences.jsonl", &dir.join("prefs.jsonl"), 16);
    common::task_head("prompts.jsonl", &dir.join("prompts.jsonl"), 8);
    let exp = dir.join("exp.yaml");
    std::fs::write(&exp, experiment).unwrap();
    exp
}

fn logits(model: &Model, ids: &Tensor) -> Tensor {
    tch::no_grad(|| model.net.forward_logits(ids, None, false))
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// PEFT's logits of `base` with the adapters of the stage `checkpoint`
/// (and of the base, merged folders...), against ours (base + adapter).
fn peft_reference(
    dir: &Path,
    base: &Path,
    checkpoint: &Path,
) -> std::collections::HashMap<String, Tensor> {
    let out = dir.join("peft.safetensors");
    common::run_python(
        "lora_reference.py",
        &[
            base.to_str().unwrap(),
            checkpoint.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let theirs: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&out)
        .unwrap()
        .into_iter()
        .collect();
    // The adapters moved the model: a check that they are read at all.
    assert!(max_diff(&theirs["peft"], &theirs["base"]) > 1e-3);
    let adapted = Model::load_adapted(checkpoint, HeadChoice::AsSaved, tch::Device::Cpu).unwrap();
    assert!(adapted.lora.is_some());
    let d_peft = max_diff(&logits(&adapted, &theirs["input_ids"]), &theirs["peft"]);
    assert!(d_peft < 1e-4, "ours (base + adapter) vs PEFT: {d_peft}");
    theirs
}

#[test]
fn adapters_load_in_peft_and_merge_to_the_same_model() {
    let d = tempfile::tempdir().unwrap();
    let exp = setup(d.path());
    common::rlhf_ok(&["run", exp.to_str().unwrap(), "--only", "sft"]);
    let checkpoint = d.path().join("runs/lora/sft/checkpoint");
    merges_to_the_same_model(d.path(), &checkpoint);
    refuses_peft_settings_it_does_not_compute(d.path(), &checkpoint);
}

/// GPT-2's Conv1D projections (`c_attn`, `c_proj`, `c_fc`) carry adapters
/// that PEFT reads with `fan_in_fan_out` and merges as we do.
#[test]
fn gpt2_adapters_load_in_peft_and_merge_to_the_same_model() {
    let d = tempfile::tempdir().unwrap();
    let exp = setup_layout(d.path(), Layout::Gpt2);
    common::rlhf_ok(&["run", exp.to_str().unwrap(), "--only", "sft"]);
    let checkpoint = d.path().join("runs/lora/sft/checkpoint");
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(checkpoint.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["fan_in_fan_out"], true);
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["c_attn", "c_proj", "c_fc"])
    );
    merges_to_the_same_model(d.path(), &checkpoint);
}

/// The SFT stage's adapters in PEFT, its merged folder in transformers,
/// PEFT's own merge and `rlhf merge`: one model.
fn merges_to_the_same_model(d: &Path, checkpoint: &Path) {
    let theirs = peft_reference(d, &d.join("base"), checkpoint);
    let ids = &theirs["input_ids"];
    let adapted = Model::load_adapted(checkpoint, HeadChoice::AsSaved, tch::Device::Cpu).unwrap();
    let merged = Model::load(checkpoint, HeadChoice::AsSaved, tch::Device::Cpu).unwrap();
    assert!(merged.lora.is_none());
    for (what, reference) in [
        ("transformers on the merged folder", "merged"),
        ("PEFT's merge_and_unload", "peft_merged"),
        ("PEFT", "peft"),
    ] {
        let diff = max_diff(&logits(&merged, ids), &theirs[reference]);
        assert!(diff < 1e-4, "our merged folder vs {what}: {diff}");
    }
    // Adapters off: the base itself.
    let base = adapted.net.without_adapters(|| logits(&adapted, ids));
    assert!(max_diff(&base, &theirs["base"]) < 1e-4);

    // `rlhf merge` writes the stage's merged weights, and no adapter.
    let merged_out = d.join("merged");
    common::rlhf_ok(&[
        "merge",
        "--adapter",
        checkpoint.to_str().unwrap(),
        "--out",
        merged_out.to_str().unwrap(),
    ]);
    assert!(!merged_out.join("adapter").exists());
    let again = Model::load(&merged_out, HeadChoice::AsSaved, tch::Device::Cpu).unwrap();
    let (a, b) = (weights_of(&merged), weights_of(&again));
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        assert!(max_diff(t, &b[k]) < 1e-6, "{k}");
    }
}

/// PEFT settings that change the weights, and a scale that overflows:
/// refused by name, nothing written.
fn refuses_peft_settings_it_does_not_compute(d: &Path, checkpoint: &Path) {
    let adapter = d.join("their-adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(checkpoint.join("adapter").join(f), adapter.join(f)).unwrap();
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(adapter.join("adapter_config.json")).unwrap())
            .unwrap();
    for (key, value, named) in [
        (
            "alpha_pattern",
            serde_json::json!({"q_proj": 64}),
            "alpha_pattern",
        ),
        (
            "rank_pattern",
            serde_json::json!({"q_proj": 2}),
            "rank_pattern",
        ),
        (
            "layers_to_transform",
            serde_json::json!([0]),
            "layers_to_transform",
        ),
        ("bias", serde_json::json!("all"), "bias"),
        (
            "modules_to_save",
            serde_json::json!(["lm_head"]),
            "modules_to_save",
        ),
        (
            "init_lora_weights",
            serde_json::json!("pissa"),
            "init_lora_weights",
        ),
        (
            "lora_alpha",
            serde_json::json!(1e300),
            "alpha: must be a positive number at most 1e6",
        ),
    ] {
        let mut bad = config.clone();
        bad[key] = value;
        std::fs::write(adapter.join("adapter_config.json"), bad.to_string()).unwrap();
        let out_dir = d.join("refused");
        let out = common::rlhf(&[
            "merge",
            "--adapter",
            adapter.to_str().unwrap(),
            "--base",
            d.join("base").to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(named), "{key}: {err}");
        assert!(!out_dir.exists(), "{key}: nothing written");
    }
}

#[test]
fn a_resumed_lora_run_equals_an_uninterrupted_one() {
    for layout in [Layout::Llama, Layout::Gpt2] {
        let d = tempfile::tempdir().unwrap();
        let exp = setup_layout(d.path(), layout);
        resumed_equals_whole(d.path(), &exp, "sft", "6");
    }
}

/// DPO with LoRA: resumed equals uninterrupted, bit for bit.
#[test]
fn a_resumed_lora_dpo_run_equals_an_uninterrupted_one() {
    let d = tempfile::tempdir().unwrap();
    let exp = setup(d.path());
    common::rlhf_ok(&["run", exp.to_str().unwrap(), "--only", "sft"]);
    resumed_equals_whole(d.path(), &exp, "dpo", "3");
}

/// Runs `name` whole, and again stopped after step `stop_after` and
/// resumed from a periodic checkpoint; the weights and adapters of both
/// are equal bit for bit.
fn resumed_equals_whole(d: &Path, exp: &Path, name: &str, stop_after: &str) {
    let stage = |out: &str, stop: Option<&str>| {
        let out = d.join(out);
        let mut args = vec![
            "stage",
            "-c",
            exp.to_str().unwrap(),
            name,
            "--out",
            out.to_str().unwrap(),
        ];
        if let Some(s) = stop {
            args.extend(["--stop-after-step", s]);
        }
        common::rlhf(&args)
    };
    assert!(stage("whole", None).status.success());
    let stopped = stage("resumed", Some(stop_after));
    assert!(!stopped.status.success());
    let periodic = d.join("resumed/checkpoints");
    // Periodic checkpoints carry the adapters, for an exact resume.
    let first = std::fs::read_dir(&periodic)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert!(first
        .path()
        .join("adapter/adapter_model.safetensors")
        .exists());
    let resumed = stage("resumed", None);
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(stderr.contains("resuming from"), "{stderr}");
    let load = |dir: &str| {
        let m = Model::load_adapted(
            &d.join(dir).join("checkpoint"),
            HeadChoice::AsSaved,
            tch::Device::Cpu,
        )
        .unwrap();
        weights_of(&m)
    };
    let (a, b) = (load("whole"), load("resumed"));
    assert!(a.keys().any(|k| k.contains("lora_B")));
    for (k, t) in &a {
        assert!(t.equal(&b[k]), "{k} differs after the resumed run");
    }
}

/// Every iteration's log-probabilities recorded while sampling equal those
/// of the update's forward to float rounding: under 1e-4 in fp32, under
/// bf16's rounding (a few 1e-2) in bf16.
fn sampling_matches_training(stage_dir: &Path, bf16: bool) {
    let metrics = std::fs::read_to_string(stage_dir.join("metrics.jsonl")).unwrap();
    let bound = if bf16 { 0.25 } else { 1e-4 };
    let mut iterations = 0;
    for line in metrics.lines() {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        let Some(max) = m["rollout_logprob_diff_max"].as_f64() else {
            continue;
        };
        let mean = m["rollout_logprob_diff_mean"].as_f64().unwrap();
        assert!(max < bound && mean <= max, "{}: {m}", stage_dir.display());
        iterations += 1;
    }
    assert!(
        iterations > 0,
        "{}: no rollout_logprob_diff",
        stage_dir.display()
    );
}

/// PPO, GRPO (in bf16) and DPO with LoRA: the policy's base stays the SFT
/// policy bit for bit, the adapters move, and the reference is that base
/// (no second copy is loaded).
#[test]
fn ppo_grpo_and_dpo_with_lora_keep_one_base_and_train_only_adapters() {
    lora_kinds_keep_one_base(Layout::Llama);
}

#[test]
fn gpt2_ppo_grpo_and_dpo_with_lora_keep_one_base_and_train_only_adapters() {
    lora_kinds_keep_one_base(Layout::Gpt2);
}

fn lora_kinds_keep_one_base(layout: Layout) {
    let d = tempfile::tempdir().unwrap();
    let exp = setup_layout(d.path(), layout);
    let run = d.path().join("runs/lora");
    for stage in ["ppo", "grpo", "dpo"] {
        common::rlhf_ok(&["run", exp.to_str().unwrap(), "--only", stage]);
        let adapter: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                run.join(format!("{stage}/checkpoint/adapter/adapter_config.json")),
            )
            .unwrap(),
        )
        .unwrap();
        // The adapter names its base (the SFT policy) by a relative path.
        assert_eq!(
            adapter["base_model_name_or_path"],
            "../../../sft/checkpoint"
        );
        let sft = weights_of(
            &Model::load(
                &run.join("sft/checkpoint"),
                HeadChoice::AsSaved,
                tch::Device::Cpu,
            )
            .unwrap(),
        );
        let trained = Model::load_adapted(
            &run.join(stage).join("checkpoint"),
            HeadChoice::AsSaved,
            tch::Device::Cpu,
        )
        .unwrap();
        let mut moved = 0;
        for (k, t) in &weights_of(&trained) {
            match sft.get(k) {
                // The frozen base is the SFT policy, bit for bit.
                Some(base) => assert!(t.equal(base), "{stage}: {k} moved"),
                None => {
                    assert!(k.contains(".lora_"), "{k}");
                    assert_eq!(t.kind(), tch::Kind::Float, "fp32 master weights");
                    moved +=
                        usize::from(k.contains("lora_B") && t.abs().max().double_value(&[]) > 0.0);
                }
            }
        }
        assert!(moved > 0, "{stage}: no adapter was trained");
        if stage != "dpo" {
            sampling_matches_training(&run.join(stage), stage == "grpo");
        }
    }
    // DPO's adapters on the SFT policy load in PEFT with our logits.
    peft_reference(
        d.path(),
        &run.join("sft/checkpoint"),
        &run.join("dpo/checkpoint"),
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("grpo/summary.json")).unwrap())
            .unwrap();
    assert!(
        summary["last_kl"].as_f64().unwrap().is_finite(),
        "{summary}"
    );
}
