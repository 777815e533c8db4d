//! Shared by the stage tests: small slices of the bundled task and tiny models.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rlhf_datasets::Tokenizer;
use rlhf_stages::kinds::sft::SftConfig;
use rlhf_stages::train::{ScratchModel, StageContext};
use rlhf_stages::GptConfig;
use tch::Device;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The first `n` lines of a bundled task file, written into `dir`.
pub fn task_slice(dir: &Path, file: &str, n: usize) -> PathBuf {
    let text = std::fs::read_to_string(workspace().join("datasets/task").join(file)).unwrap();
    let out = dir.join(file);
    let lines: Vec<&str> = text.lines().take(n).collect();
    std::fs::write(&out, lines.join("\n") + "\n").unwrap();
    out
}

pub fn tiny_model() -> ScratchModel {
    ScratchModel {
        config: GptConfig {
            vocab_size: 264,
            n_positions: 48,
            n_embd: 64,
            n_layer: 2,
            n_head: 4,
            ..GptConfig::default()
        }
        .into(),
        tokenizer: Tokenizer::bytes(),
    }
}

/// A stage's settings and where it runs.
pub struct Job<C> {
    pub config: C,
    pub ctx: StageContext,
}

/// A run on the CPU into `out_dir`, from a tiny scratch model, no judge.
pub fn ctx(out_dir: PathBuf) -> StageContext {
    StageContext {
        out_dir,
        device: Device::Cpu,
        scratch: tiny_model(),
        judge: None,
        eval_judge: None,
        ranker: None,
        reward_runner: None,
        env_runner: None,
        stop_after: None,
        ranks: std::sync::Arc::new(rlhf_stages::dist::Ranks::single()),
    }
}

pub fn sft_job(data: PathBuf, out_dir: PathBuf, config: SftConfig) -> Job<SftConfig> {
    Job {
        config: SftConfig { data, ..config },
        ctx: ctx(out_dir),
    }
}

/// The share of an answer's characters that are lowercase ASCII letters:
/// about 0.1 for a random byte-level model, 1 for a model that learnt it
/// (the rule PPO's and GRPO's tests reward).
pub fn lowercase_share(_prompt: &str, answer: &str) -> f64 {
    let n = answer.chars().count();
    if n == 0 {
        return 0.0;
    }
    answer.chars().filter(|c| c.is_ascii_lowercase()).count() as f64 / n as f64
}

/// A seeded tiny policy saved in `dir/policy` and 64 prompts `Q<i>: ` in
/// `dir/prompts.jsonl`.
pub fn rule_policy_and_prompts(dir: &Path) -> (PathBuf, PathBuf) {
    tch::manual_seed(5);
    let scratch = tiny_model();
    let model = rlhf_stages::Model::init(
        &scratch.config,
        rlhf_stages::Head::Lm,
        scratch.tokenizer,
        Device::Cpu,
    )
    .unwrap();
    let policy = dir.join("policy");
    model.save(&policy).unwrap();
    let prompts = dir.join("prompts.jsonl");
    let lines: String = (0..64)
        .map(|i| format!("{{\"prompt\": \"Q{i}: \"}}\n"))
        .collect();
    std::fs::write(&prompts, lines).unwrap();
    (policy, prompts)
}

/// Prompts `Q: <n>`, four answers of random digits ranked by the rule
/// "the larger its first digit, the better" (distinct first digits, so no
/// ties); with `shuffled`, each ranking shuffled at random (labels that
/// say nothing a model could learn).
pub fn first_digit_rankings(path: &Path, n: usize, seed: u64, shuffled: bool) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut text = String::new();
    for i in 0..n {
        let mut firsts: Vec<u32> = (0..10).collect();
        let mut responses = Vec::new();
        for _ in 0..4 {
            let first = firsts.remove(rng.random_range(0..firsts.len()));
            let tail: String = (0..rng.random_range(2..6))
                .map(|_| char::from(b'0' + rng.random_range(0..10u8)))
                .collect();
            responses.push(format!("{first}{tail}"));
        }
        let mut order: Vec<usize> = (0..4).collect();
        order.sort_by_key(|&j| std::cmp::Reverse(responses[j].as_bytes()[0]));
        if shuffled {
            rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rng);
        }
        let mut ranking = vec![0; 4];
        for (r, &j) in order.iter().enumerate() {
            ranking[j] = r;
        }
        let row = serde_json::json!({"prompt": format!("Q: {i}\n"), "responses": responses, "ranking": ranking});
        text.push_str(&format!("{row}\n"));
    }
    std::fs::write(path, text).unwrap();
}

/// libtorch's RNG is global to the process, and every module here runs in
/// one test binary: a test that seeds it and trains holds this lock, so
/// that another test's draws never land between its own.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}
