//! libtorch: the GPT and the math of each RLHF stage.
//!
//! - [`gpt`]: the GPT-2-layout model, KV cache, LM and scalar heads.
//! - [`llama`]: the Llama-layout decoder (Llama, Qwen2, Mistral).
//! - [`lora`]: LoRA adapters, PEFT's files.
//! - [`network`]: either layout behind one interface; `model:` shapes.
//! - [`checkpoint`]: model folders (HF GPT-2 compatible), atomic writes.
//! - [`optim`]: AdamW with saveable moments, LR schedule, clipping.
//! - [`train`]: the training loop every supervised stage shares, training
//!   checkpoints, metrics, resume and stop.
//! - [`kind`]: a stage kind declared once, and the registry of kinds.
//! - [`sft`], [`reward`], [`ppo`]: the stage kinds.
//! - [`sample`]: batched KV-cache sampling; [`answer`]: answering prompts.
//! - [`score`]: per-token log-probabilities of texts.
//! - [`eval`]: held-out evaluation of policies: judge and reward scores, win rates, KL.
//! - [`bench`]: the timed kernels of `rlhf bench`.
//! - [`dist`]: data-parallel ranks on libtorch's c10d (Gloo, NCCL).

pub mod adapters;
pub mod answer;
pub mod bench;
pub mod check;
pub mod checkpoint;
pub mod device;
pub mod dist;
pub mod dpo;
pub mod error;
pub mod eval;
mod ffi;
pub mod gpt;
pub mod grpo;
pub mod kind;
pub mod llama;
pub mod lora;
pub mod network;
pub mod optim;
pub mod ppo;
pub mod precision;
pub mod reward;
pub mod sample;
pub mod score;
pub mod sft;
pub mod train;

pub use checkpoint::{HeadChoice, Model};
pub use gpt::{Gpt, GptConfig, Head, KvCache};
pub use network::{Cache, ModelConfig, Network};

/// A seeded tiny GPT for unit tests: 16 wide, 2 heads.
#[cfg(test)]
pub(crate) fn tiny_gpt(
    seed: i64,
    vocab_size: i64,
    n_positions: i64,
    n_layer: i64,
    head: Head,
) -> (tch::nn::VarStore, Network) {
    tch::manual_seed(seed);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let cfg = GptConfig {
        vocab_size,
        n_positions,
        n_embd: 16,
        n_layer,
        n_head: 2,
        ..GptConfig::default()
    };
    let gpt = Gpt::new(&vs.root(), &cfg, head);
    (vs, Network::Gpt(gpt))
}

/// A seeded tiny Llama-layout model for unit tests: 16 wide, 4 query
/// heads sharing 2 key/value heads, untied.
#[cfg(test)]
pub(crate) fn tiny_llama(
    seed: i64,
    vocab_size: i64,
    n_positions: i64,
    n_layer: i64,
    head: Head,
) -> (tch::nn::VarStore, Network) {
    tch::manual_seed(seed);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let cfg = llama::LlamaConfig::from_experiment(serde_json::json!({
        "vocab_size": vocab_size, "hidden_size": 16, "num_hidden_layers": n_layer,
        "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": n_positions, "tie_word_embeddings": false,
    }))
    .expect("a valid tiny config");
    let net = ModelConfig::Llama(cfg).build(&vs.root(), head);
    (vs, net)
}

/// Serialises the unit tests that seed libtorch's global RNG: tests run on
/// threads of one process, and a seed means nothing if another test draws
/// from the same generator in between.
#[cfg(test)]
pub(crate) fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
