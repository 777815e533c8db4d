//! Chat templates of four model families rendered here (minijinja) and by
//! `transformers`' `apply_chat_template` give the same text, with and
//! without the generation prompt.

use crate::common;

use rlhf_datasets::jinja::{JinjaTemplate, Message};
use serde_json::{json, Value};

/// Qwen2's (ChatML with a default system prompt).
const QWEN2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Llama 3 Instruct's.
const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

/// Mistral Instruct v0.1's (roles must alternate).
const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

/// Zephyr's, written over several lines: trim_blocks and lstrip_blocks
/// decide its whitespace.
const ZEPHYR: &str = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";

fn conversations(with_system: bool) -> Vec<(Vec<Message>, bool)> {
    let m = Message::new;
    let mut out = vec![
        (vec![m("user", "Sort: 3 1 2")], true),
        (
            vec![m("user", "Sort: 3 1 2"), m("assistant", " 1 2 3 ")],
            false,
        ),
        (
            vec![
                m("user", "Hi there"),
                m("assistant", "Hello!"),
                m("user", "Reverse: é ü 日本"),
            ],
            true,
        ),
    ];
    if with_system {
        out.push((
            vec![m("system", "Be brief."), m("user", "Count to 3")],
            true,
        ));
    }
    out
}

fn check(name: &str, template: &str, bos: &str, eos: &str, with_system: bool) {
    let d = tempfile::tempdir().unwrap();
    rlhf_datasets::Tokenizer::bytes()
        .save(&d.path().join("tokenizer.json"))
        .unwrap();
    let config = json!({"chat_template": template, "bos_token": bos, "eos_token": eos});
    std::fs::write(d.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let cases = conversations(with_system);
    let as_json: Vec<Value> = cases
        .iter()
        .map(|(messages, gen)| json!({"messages": messages, "add_generation_prompt": gen}))
        .collect();
    std::fs::write(
        d.path().join("conversations.json"),
        Value::from(as_json).to_string(),
    )
    .unwrap();
    let out = d.path().join("rendered.json");
    common::run_python(
        "chat_template_reference.py",
        &["render", d.path().to_str().unwrap(), out.to_str().unwrap()],
    );
    let theirs: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let ours = JinjaTemplate::from_model_dir(d.path())
        .unwrap()
        .expect("a template");
    for ((messages, gen), theirs) in cases.iter().zip(&theirs) {
        let rendered = ours.render(messages, *gen).unwrap();
        assert_eq!(&rendered, theirs, "{name}: {messages:?}");
        let last = &messages.last().unwrap().content;
        assert!(rendered.contains(last.trim()), "{name}: {rendered}");
    }
}

#[test]
fn qwen2_chatml_renders_as_transformers_does() {
    check("qwen2", QWEN2, "<|endoftext|>", "<|im_end|>", true);
}

#[test]
fn llama3_renders_as_transformers_does() {
    check("llama3", LLAMA3, "<|begin_of_text|>", "<|eot_id|>", true);
}

#[test]
fn mistral_renders_as_transformers_does_and_refuses_a_system_turn() {
    check("mistral", MISTRAL, "<s>", "</s>", false);
    let t = JinjaTemplate::new(MISTRAL, serde_json::Map::new()).unwrap();
    let e = t
        .render(
            &[Message::new("system", "x"), Message::new("user", "y")],
            true,
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("Conversation roles must alternate"),
        "{e}"
    );
}

#[test]
fn zephyr_multiline_renders_as_transformers_does() {
    check("zephyr", ZEPHYR, "<s>", "</s>", true);
}

/// A model folder with a ChatML template runs SFT on multi-turn `messages`
/// data and PPO on `messages` prompts: the checkpoints carry the template
/// on, and the PPO rollouts' prompts are the template's rendering with its
/// generation prompt.
#[test]
fn stages_render_conversations_with_the_folders_template() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base");
    common::rlhf_ok(&[
        "init",
        "--layout",
        "llama",
        "--n-layer",
        "1",
        "--n-head",
        "2",
        "--n-embd",
        "32",
        "--n-positions",
        "96",
        "--out",
        base.to_str().unwrap(),
    ]);
    let chatml = "{% for m in messages %}{{ '<|user|>' if m.role == 'user' else '<|assistant|>' }}{{ m.content + eos_token }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}";
    let config = json!({"chat_template": chatml, "eos_token": "<|endoftext|>"});
    std::fs::write(base.join("tokenizer_config.json"), config.to_string()).unwrap();
    let turn = |role: &str, content: &str| json!({"role": role, "content": content});
    let mut sft = String::new();
    for i in 0..24 {
        let row = json!({"messages": [
            turn("user", &format!("Sort: {} 1", i % 9 + 2)), turn("assistant", &format!("1 {}", i % 9 + 2)),
            turn("user", "Upper: ab"), turn("assistant", "AB"),
        ]});
        sft.push_str(&format!("{row}\n"));
    }
    std::fs::write(d.path().join("sft.jsonl"), sft).unwrap();
    let prompt = json!({"messages": [turn("user", "Sort: 5 1")]});
    std::fs::write(
        d.path().join("prompts.jsonl"),
        format!("{prompt}\n").repeat(4),
    )
    .unwrap();
    let exp = d.path().join("exp.yaml");
    std::fs::write(
        &exp,
        "name: chat\ndevice: cpu\nstages:\n\
         \x20 sft: {kind: sft, init: base, data: sft.jsonl, max_steps: 3, batch_size: 4}\n\
         \x20 ppo: {kind: ppo, policy: sft, gold_reward: true, prompts: prompts.jsonl, iterations: 1, rollout_batch: 4, minibatch_size: 4, sampling: {max_new_tokens: 4}, save_rollouts: true}\n",
    )
    .unwrap();
    common::rlhf_ok(&["run", exp.to_str().unwrap()]);
    let run = d.path().join("runs/chat");
    for stage in ["sft", "ppo"] {
        let copied =
            std::fs::read_to_string(run.join(stage).join("checkpoint/tokenizer_config.json"));
        assert!(copied.unwrap().contains("add_generation_prompt"), "{stage}");
    }
    let rollouts = run.join("ppo/rollouts/iter-0001.parquet");
    let rows = rlhf_datasets::load::read_table(&rollouts).unwrap();
    let prompts = rlhf_datasets::load::string_column(&rows, &rollouts, "prompt", "").unwrap();
    assert_eq!(prompts[0], "<|user|>Sort: 5 1<|endoftext|><|assistant|>");
}

fn folder_with_template(dir: &std::path::Path, template: &str) {
    rlhf_datasets::Tokenizer::bytes()
        .save(&dir.join("tokenizer.json"))
        .unwrap();
    let config = json!({"chat_template": template, "eos_token": "<|endoftext|>"});
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

/// A model folder's template is code from elsewhere: one that loops
/// without end runs out of its step budget, one that writes without end
/// stops at the rendering cap, and one that never writes assistant turns
/// is named; each error names the template's file.
#[test]
fn a_hostile_template_is_stopped_and_named() {
    let d = tempfile::tempdir().unwrap();
    let conversation = [
        Message::new("user", "hi"),
        Message::new("assistant", "hello"),
    ];
    for (template, expected) in [
        (
            "{% for a in range(10000) %}{% for b in range(10000) %}{% for c in range(10000) %}{% endfor %}{% endfor %}{% endfor %}",
            "does it loop without end?",
        ),
        (
            "{% for a in range(10000) %}{% for b in range(10000) %}{{ 'x' * 1000 }}{% endfor %}{% endfor %}",
            "grew past 16 MiB",
        ),
        (
            "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}",
            "does not write assistant turns",
        ),
    ] {
        folder_with_template(d.path(), template);
        let t = JinjaTemplate::from_model_dir(d.path()).unwrap().unwrap();
        let t0 = std::time::Instant::now();
        let e = t
            .render_with_assistant_spans(&conversation)
            .unwrap_err()
            .to_string();
        assert!(e.contains(expected), "{e}");
        assert!(e.contains("tokenizer_config.json"), "names the file: {e}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(20), "{expected}: {:?}", t0.elapsed());
    }
}

/// A template that doubles a string fills no machine: `rlhf run` stops at
/// the memory cap on one rendering, naming the template, within seconds.
#[test]
fn a_template_that_doubles_a_string_stops_the_run_at_its_memory_cap() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base");
    common::rlhf_ok(&[
        "init",
        "--n-layer",
        "1",
        "--n-head",
        "2",
        "--n-embd",
        "16",
        "--n-positions",
        "64",
        "--out",
        base.to_str().unwrap(),
    ]);
    let doubling = "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}{% for m in messages %}{{ m.content }}{% endfor %}";
    let config = json!({"chat_template": doubling, "eos_token": "<|endoftext|>"});
    std::fs::write(base.join("tokenizer_config.json"), config.to_string()).unwrap();
    let row = json!({"messages": [{"role": "user", "content": "Sort: 2 1"}, {"role": "assistant", "content": "1 2"}]});
    std::fs::write(d.path().join("sft.jsonl"), format!("{row}\n").repeat(8)).unwrap();
    let exp = d.path().join("exp.yaml");
    std::fs::write(
        &exp,
        "name: t\ndevice: cpu\nstages:\n  sft: {kind: sft, init: base, data: sft.jsonl, max_steps: 1, batch_size: 2}\n",
    )
    .unwrap();
    let t0 = std::time::Instant::now();
    let out = common::rlhf(&["run", exp.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("held over 512 MiB") && err.contains("tokenizer_config.json"),
        "{err}"
    );
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(120),
        "{:?}",
        t0.elapsed()
    );
}

/// `rlhf check-template` against TRL's `is_chat_template_prefix_preserving`
/// on six templates: the four above keep earlier turns, Qwen3's (TRL's
/// copy) drops the empty `<think>` block of an answer once a question
/// follows, and TRL's training variant of it keeps it; the command exits
/// 0 for exactly the templates TRL accepts and names the broken case.
#[test]
fn check_template_agrees_with_trl() {
    let d = tempfile::tempdir().unwrap();
    let qwen3 = d.path().join("qwen3.json");
    common::run_python(
        "chat_template_reference.py",
        &["qwen3", qwen3.to_str().unwrap()],
    );
    let qwen3: Value = serde_json::from_str(&std::fs::read_to_string(&qwen3).unwrap()).unwrap();
    let templates = [
        ("qwen2", QWEN2),
        ("llama3", LLAMA3),
        ("mistral", MISTRAL),
        ("zephyr", ZEPHYR),
        ("qwen3", qwen3["qwen3"].as_str().unwrap()),
        ("qwen3_training", qwen3["qwen3_training"].as_str().unwrap()),
    ];
    let mut dirs = Vec::new();
    for (name, template) in templates {
        let dir = d.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        rlhf_datasets::Tokenizer::bytes()
            .save(&dir.join("tokenizer.json"))
            .unwrap();
        let config = json!({"chat_template": template, "bos_token": "<s>", "eos_token": "</s>"});
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        dirs.push(dir.to_str().unwrap().to_owned());
    }
    let out = d.path().join("verdicts.json");
    let mut args = vec!["prefix", out.to_str().unwrap()];
    args.extend(dirs.iter().map(String::as_str));
    common::run_python("chat_template_reference.py", &args);
    let trl: Vec<bool> = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(trl, [true, true, true, true, false, true], "TRL's verdicts");
    for ((name, _), (dir, theirs)) in templates.iter().zip(dirs.iter().zip(trl)) {
        let out = common::rlhf(&["check-template", dir]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.success(), theirs, "{name}: {text}");
        if !theirs {
            assert!(
                text.contains("answer, then the next question: NOT kept"),
                "{name}: {text}"
            );
            assert!(text.contains("not prefix-preserving"), "{name}: {text}");
        }
    }
}
