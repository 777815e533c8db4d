//! libtorch: the models and the math of each RLHF stage, in rooms:
//!
//! - [`model`]: the GPT and Llama layouts behind one `Network`, LoRA,
//!   precision, devices, model folders; sampling and token log-probs.
//! - [`optim`]: AdamW with saveable moments, the LR schedule, clipping.
//! - [`train`]: the loop every supervised stage shares (`fit` behind an
//!   `Objective`), training checkpoints, metrics, exact resume, stop and
//!   interrupt.
//! - [`objectives`]: what several kinds use: rankings and sequence
//!   rewards, the masked next-token NLL.
//! - [`kind`]: how a stage kind is declared; [`kinds`]: the registry and
//!   the supervised kinds (SFT, reward model, DPO).
//! - [`rl`]: PPO and GRPO and the rollout they share.
//! - [`eval`]: held-out evaluation of policies (judge and reward scores,
//!   win rates, KL) and answering prompts.
//! - [`dist`]: data-parallel ranks on libtorch's c10d (Gloo, NCCL).
//! - [`bench`]: the timed kernels of `rlhf bench`.
//! - [`error`]: the error every stage returns; [`check`]: setting checks.
//! - [`programs`]: what the pipeline passes in to run reward programs;
//!   the code checker and the sandbox it runs answers in.
//!
//! Imports run one way, each room from those before it: check, programs, model,
//! dist, optim, error (the error every stage returns wraps theirs),
//! objectives, eval, train, rl, kinds (whose registry lists rl's kinds),
//! bench.

pub mod bench;
pub mod check;
pub mod dist;
pub mod error;
pub mod eval;
mod ffi;
pub mod kind;
pub mod kinds;
pub mod memory;
pub mod model;
pub mod objectives;
pub mod optim;
pub mod programs;
pub mod rl;
pub mod train;

pub use model::checkpoint::{HeadChoice, Model};
pub use model::gpt::{Gpt, GptConfig, Head, KvCache};
pub use model::network::{Cache, ModelConfig, Network};

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

/// A seeded one-layer byte-level GPT with its tokenizer, 16 wide, for
/// unit tests that sample and decode text.
#[cfg(test)]
pub(crate) fn tiny_byte_model(seed: i64, n_positions: i64) -> Model {
    tch::manual_seed(seed);
    let cfg = GptConfig {
        vocab_size: 264,
        n_positions,
        n_embd: 16,
        n_layer: 1,
        n_head: 2,
        ..GptConfig::default()
    };
    Model::init(
        &cfg.into(),
        Head::Lm,
        rlhf_datasets::Tokenizer::bytes(),
        tch::Device::Cpu,
    )
    .expect("a tiny model")
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
    let cfg = model::llama::LlamaConfig::from_experiment(serde_json::json!({
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
