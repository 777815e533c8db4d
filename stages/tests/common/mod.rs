//! Shared by the stage tests: small slices of the bundled task and tiny models.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rlhf_datasets::Tokenizer;
use rlhf_stages::sft::SftConfig;
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
