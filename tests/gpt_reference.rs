//! rlhf's GPT computes what HF transformers' GPT-2 computes, and the two
//! read each other's model folders.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;

use rlhf_datasets::Tokenizer;
use rlhf_stages::{GptConfig, Head, HeadChoice, Model};
use tch::{Device, Tensor};

fn read(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

fn rlhf_logits(model: &Model, ids: &Tensor) -> Tensor {
    tch::no_grad(|| model.net.forward_logits(ids, None, false))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn hf_gpt2_folder_loads_and_gives_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    common::run_python("gpt2_reference.py", &["make-hf", d]);
    // HF folders carry their tokenizer; this one gets ours.
    Tokenizer::bytes()
        .save(&dir.path().join("tokenizer.json"))
        .unwrap();
    let model = Model::load(dir.path(), HeadChoice::AsSaved, Device::Cpu).unwrap();
    assert_eq!(model.net.head(), Head::Lm);
    let rlhf_stages::ModelConfig::Gpt2(config) = model.net.config() else {
        panic!("not loaded as GPT-2")
    };
    assert_eq!(config.n_layer, 3);
    let reference = read(&dir.path().join("reference.safetensors"));
    let ours = rlhf_logits(&model, &reference["input_ids"]);
    let diff = max_abs_diff(&ours, &reference["logits"]);
    assert!(diff < 1e-4, "max abs logit difference {diff}");
}

#[test]
fn rlhf_checkpoint_opens_in_transformers_with_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(4321);
    let config = GptConfig {
        vocab_size: 264,
        n_positions: 64,
        n_embd: 32,
        n_layer: 2,
        n_head: 4,
        ..GptConfig::default()
    };
    let config = rlhf_stages::ModelConfig::Gpt2(config);
    let model = Model::init(&config, Head::Lm, Tokenizer::bytes(), Device::Cpu).unwrap();
    // Move LayerNorms and biases off their 1/0 initial values.
    tch::no_grad(|| {
        for (name, mut v) in model.vs.variables() {
            if name.ends_with("bias") || name.contains(".ln_") || name.starts_with("ln_f") {
                let _ = v.g_add_(&(v.randn_like() * 0.1));
            }
        }
    });
    let ckpt = dir.path().join("ckpt");
    model.save(&ckpt).unwrap();
    let ids = Tensor::randint(261, [2, 30], (tch::Kind::Int64, Device::Cpu));
    let out = dir.path().join("hf_logits.safetensors");
    Tensor::write_safetensors(&[("input_ids", &ids)], &out).unwrap();
    common::run_python(
        "gpt2_reference.py",
        &["logits", ckpt.to_str().unwrap(), out.to_str().unwrap()],
    );
    let hf = read(&out);
    let diff = max_abs_diff(&rlhf_logits(&model, &ids), &hf["logits"]);
    assert!(diff < 1e-4, "max abs logit difference {diff}");
}
