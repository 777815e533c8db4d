//! Shared by the stage tests: small slices of the bundled task and tiny models.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rlhf_datasets::Tokenizer;
use rlhf_stages::sft::{ScratchModel, SftConfig, SftJob};
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
        },
        tokenizer: Tokenizer::bytes(),
    }
}

pub fn sft_job(data: PathBuf, out_dir: PathBuf, config: SftConfig) -> SftJob {
    SftJob {
        config: SftConfig { data, ..config },
        scratch: tiny_model(),
        out_dir,
        device: Device::Cpu,
        stop_after_step: None,
    }
}
