//! The Llama-layout decoder against `transformers` in the venv: random
//! Llama and Qwen2 models with grouped-query attention (4 query heads, 2
//! key/value heads), tied and untied embeddings, saved by
//! `save_pretrained` and loaded here by key copy, give the same logits
//! within 1e-4; a folder saved here (weights changed) loads in
//! `transformers` with the same logits. The Qwen2 folder is sharded.

use crate::common;

use std::path::Path;

use rlhf_stages::model::checkpoint::ModelMeta;
use rlhf_stages::{model::llama, HeadChoice, Model, Network};

fn check(family: &str, tied: bool) {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_str().unwrap();
    let tied_flag = if tied { "1" } else { "0" };
    common::run_python("llama_reference.py", &["make-hf", dir, family, tied_flag]);
    if family == "qwen2" {
        assert!(d.path().join("model.safetensors.index.json").exists());
    }
    let (vs, net) =
        Model::load_network(Path::new(dir), HeadChoice::AsSaved, tch::Device::Cpu).unwrap();
    let Network::Llama(model) = &net else {
        panic!("{family} loaded as {net:?}")
    };
    assert_eq!(model.config().tie_word_embeddings, tied);
    assert_eq!(model.config().attention_bias, family == "qwen2");
    let window = if family == "mistral" { 96 } else { 128 };
    assert_eq!(model.config().max_position_embeddings, window);
    let reference = common::tensors(&d.path().join("reference.safetensors"));
    let get = |k: &str| reference[k].shallow_clone();
    let logits = tch::no_grad(|| model.forward_logits(&get("input_ids"), None));
    let diff = (logits - get("logits")).abs().max().double_value(&[]);
    assert!(
        diff < 1e-4,
        "{family} (tied {tied}): logits differ by {diff}"
    );

    // Ours loaded there: change every weight, save, let transformers load it.
    tch::no_grad(|| {
        for (_, mut t) in vs.variables() {
            let _ = t.g_add_scalar_(0.01);
        }
    });
    let ours = d.path().join("ours");
    let model = Model {
        vs,
        net,
        tokenizer: rlhf_datasets::Tokenizer::bytes(),
        meta: ModelMeta::default(),
        lora: None,
    };
    model.save(&ours).unwrap();
    let Network::Llama(model) = &model.net else {
        unreachable!()
    };
    let theirs = d.path().join("theirs.safetensors");
    let reference_path = d.path().join("reference.safetensors");
    common::run_python(
        "llama_reference.py",
        &[
            "logits",
            ours.to_str().unwrap(),
            reference_path.to_str().unwrap(),
            theirs.to_str().unwrap(),
        ],
    );
    let theirs = tch::Tensor::read_safetensors(&theirs).unwrap().remove(0).1;
    let logits = tch::no_grad(|| model.forward_logits(&get("input_ids"), None));
    let diff = (logits - theirs).abs().max().double_value(&[]);
    assert!(
        diff < 1e-4,
        "{family} (tied {tied}) saved here: logits differ by {diff}"
    );
}

#[test]
fn llama_untied_matches_transformers() {
    check("llama", false);
}

#[test]
fn llama_tied_matches_transformers() {
    check("llama", true);
}

#[test]
fn mistral_with_a_sliding_window_matches_transformers() {
    check("mistral", false);
}

#[test]
fn qwen2_with_qkv_biases_matches_transformers() {
    check("qwen2", true);
}

#[test]
fn unsupported_rope_scaling_is_named() {
    let v = serde_json::json!({
        "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0}
    });
    let e = llama::LlamaConfig::from_hf(&v).unwrap_err().to_string();
    assert_eq!(
        e,
        "rope_scaling of type \"yarn\" is not supported (only plain rotary embeddings are)"
    );
    let v = serde_json::json!({"model_type": "gpt2"});
    let e = llama::LlamaConfig::from_hf(&v).unwrap_err().to_string();
    assert!(e.contains("not a Llama-layout decoder"), "{e}");
}

/// Where `rope_parameters` and a top-level `rope_theta` disagree, rlhf
/// uses what transformers 5 uses (the former): the logits of the edited
/// folder match transformers' own. An activation or MLP bias rlhf does not
/// compute is refused by name.
#[test]
fn config_fields_are_read_as_transformers_reads_them() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_str().unwrap();
    common::run_python("llama_reference.py", &["make-hf", dir, "llama", "0"]);
    let config_path = d.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["rope_theta"] = serde_json::json!(500000.0);
    config["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 20000.0});
    std::fs::write(&config_path, config.to_string()).unwrap();
    let (_, net) =
        Model::load_network(Path::new(dir), HeadChoice::AsSaved, tch::Device::Cpu).unwrap();
    let Network::Llama(model) = &net else {
        panic!("loaded as {net:?}")
    };
    assert_eq!(model.config().rope_theta, 20000.0);
    let reference_path = d.path().join("reference.safetensors");
    let theirs = d.path().join("theirs.safetensors");
    common::run_python(
        "llama_reference.py",
        &[
            "logits",
            dir,
            reference_path.to_str().unwrap(),
            theirs.to_str().unwrap(),
        ],
    );
    let ids = tch::Tensor::read_safetensors(&reference_path)
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == "input_ids")
        .unwrap()
        .1;
    let theirs = tch::Tensor::read_safetensors(&theirs).unwrap().remove(0).1;
    let logits = tch::no_grad(|| model.forward_logits(&ids, None));
    let diff = (logits - theirs).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "logits differ from transformers' by {diff}");

    for (key, value, named) in [
        (
            "hidden_act",
            serde_json::json!("gelu"),
            "hidden_act: \"gelu\" is not supported",
        ),
        (
            "hidden_act",
            serde_json::json!("relu2"),
            "hidden_act: \"relu2\" is not supported",
        ),
        (
            "mlp_bias",
            serde_json::json!(true),
            "mlp_bias: true is not supported",
        ),
        (
            "eos_token_id",
            serde_json::json!(-1),
            "eos_token_id: -1 is not a token id",
        ),
        (
            "eos_token_id",
            serde_json::json!([2, 300]),
            "eos_token_id: 300 is not a token id",
        ),
    ] {
        let mut bad = config.clone();
        bad[key] = value;
        std::fs::write(&config_path, bad.to_string()).unwrap();
        let e = Model::load_network(Path::new(dir), HeadChoice::AsSaved, tch::Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains(named) && e.contains("config.json"), "{key}: {e}");
    }
}
