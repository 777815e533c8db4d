//! libtorch: the GPT and the math of each RLHF stage.
//!
//! - [`gpt`]: the GPT-2-layout model, KV cache, LM and scalar heads.
//! - [`checkpoint`]: model folders (HF GPT-2 compatible), atomic writes.
//! - [`optim`]: AdamW with saveable moments, LR schedule, clipping.
//! - [`sample`]: batched KV-cache sampling.
//! - [`score`]: per-token log-probabilities of texts.
//! - [`eval`]: held-out evaluation of policies: gold and reward scores, win rates, KL.

pub mod checkpoint;
pub mod device;
pub mod eval;
pub mod gpt;
pub mod optim;
pub mod ppo;
pub mod reward;
pub mod sample;
pub mod score;

pub use checkpoint::{HeadChoice, Model};
pub use gpt::{Gpt, GptConfig, Head, KvCache};
pub mod sft;
pub mod train;

/// Serialises the unit tests that seed libtorch's global RNG: tests run on
/// threads of one process, and a seed means nothing if another test draws
/// from the same generator in between.
#[cfg(test)]
pub(crate) fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
