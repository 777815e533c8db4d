//! The decoder a model folder holds, in either layout, behind the one
//! interface every stage uses: hidden states, LM logits, scalar values and
//! a KV cache for sampling.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tch::{nn, Device, Kind, Tensor};

use crate::model::gpt::{Gpt, GptConfig, Head, KvCache};
use crate::model::llama::{Llama, LlamaCache, LlamaConfig};

/// The shape of a model: a GPT-2-layout one or a Llama-layout one.
///
/// In an experiment file, `model:` holds GPT-2's fields (`n_layer`,
/// `n_embd`, ...) or `layout: llama` with HF's Llama fields
/// (`hidden_size`, `num_key_value_heads`, ...).
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    Gpt2(GptConfig),
    Llama(LlamaConfig),
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self::Gpt2(GptConfig::default())
    }
}

impl From<GptConfig> for ModelConfig {
    fn from(c: GptConfig) -> Self {
        Self::Gpt2(c)
    }
}

impl From<LlamaConfig> for ModelConfig {
    fn from(c: LlamaConfig) -> Self {
        Self::Llama(c)
    }
}

impl ModelConfig {
    /// Checks the shapes; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Gpt2(c) => c.validate().map_err(|e| e.to_string()),
            Self::Llama(c) => c.check().map_err(|e| format!("model config: {e}")),
        }
    }

    /// The longest sequence the model reads.
    pub fn n_positions(&self) -> i64 {
        match self {
            Self::Gpt2(c) => c.n_positions,
            Self::Llama(c) => c.max_position_embeddings,
        }
    }

    pub fn vocab_size(&self) -> i64 {
        match self {
            Self::Gpt2(c) => c.vocab_size,
            Self::Llama(c) => c.vocab_size,
        }
    }

    /// Parameters of the trunk and LM head.
    pub fn n_params(&self) -> i64 {
        match self {
            Self::Gpt2(c) => c.n_params(),
            Self::Llama(c) => c.n_params(),
        }
    }

    /// Layers, width and attention heads.
    pub fn shape(&self) -> (i64, i64, i64) {
        match self {
            Self::Gpt2(c) => (c.n_layer, c.n_embd, c.n_head),
            Self::Llama(c) => (c.num_hidden_layers, c.hidden_size, c.num_attention_heads),
        }
    }

    pub fn set_vocab_size(&mut self, vocab: i64) {
        match self {
            Self::Gpt2(c) => c.vocab_size = vocab,
            Self::Llama(c) => c.vocab_size = vocab,
        }
    }

    /// `gpt2` or `llama` (the family of `qwen2` and `mistral` too).
    pub fn layout(&self) -> &'static str {
        match self {
            Self::Gpt2(_) => "gpt2",
            Self::Llama(_) => "llama",
        }
    }

    /// The network with freshly initialised variables under `root`.
    pub fn build(&self, root: &nn::Path, head: Head) -> Network {
        match self {
            Self::Gpt2(c) => Network::Gpt(Gpt::new(root, c, head)),
            Self::Llama(c) => Network::Llama(Llama::new(root, c, head)),
        }
    }
}

impl Serialize for ModelConfig {
    /// GPT-2 shapes as their own fields (as before there were layouts, so
    /// cache keys of existing runs stay valid); Llama ones with `layout`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Gpt2(c) => c.serialize(s),
            Self::Llama(c) => {
                let mut v = serde_json::to_value(c).map_err(serde::ser::Error::custom)?;
                v["layout"] = Value::from("llama");
                v.serialize(s)
            }
        }
    }
}

impl<'de> Deserialize<'de> for ModelConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ModelConfigVisitor)
    }
}

/// Reads the map, then picks the layout. The error is raised inside the
/// visit, so that a YAML reader can still say where the map is.
struct ModelConfigVisitor;

impl<'de> serde::de::Visitor<'de> for ModelConfigVisitor {
    type Value = ModelConfig;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a model shape: GPT-2's fields, or `layout: llama` with HF's Llama fields")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut access: A,
    ) -> Result<ModelConfig, A::Error> {
        use serde::de::Error;
        let mut map = serde_json::Map::new();
        while let Some((key, value)) = access.next_entry::<String, Value>()? {
            map.insert(key, value);
        }
        // A YAML .nan or .inf reaches here as null (JSON has neither).
        if let Some(key) = map
            .iter()
            .find(|(_, v)| v.is_null())
            .map(|(k, _)| k.clone())
        {
            return Err(A::Error::custom(format!(
                "{key}: must be a finite number (.nan and .inf are not)"
            )));
        }
        let layout = map.remove("layout");
        match layout.as_ref().map(|v| v.as_str()) {
            // A YAML .nan or .inf reaches here as null (JSON has neither).
            None | Some(Some("gpt2")) => serde_json::from_value(Value::Object(map))
                .map(ModelConfig::Gpt2)
                .map_err(|e| match e.to_string().contains("invalid type: null, expected f64") {
                    true => A::Error::custom("a number must be finite (.nan and .inf are not), got null or a non-finite number"),
                    false => A::Error::custom(e),
                }),
            Some(Some("llama")) => LlamaConfig::from_experiment(Value::Object(map))
                .map(ModelConfig::Llama)
                .map_err(A::Error::custom),
            Some(_) => Err(A::Error::custom(format!(
                "layout must be \"gpt2\" or \"llama\", got {}",
                layout.unwrap_or_default()
            ))),
        }
    }
}

/// A decoder of either layout.
#[derive(Debug)]
pub enum Network {
    Gpt(Gpt),
    Llama(Llama),
}

/// Keys and values of the tokens seen so far, for the network they came
/// from. Use under `tch::no_grad`.
#[derive(Debug)]
pub enum Cache {
    Gpt(KvCache),
    Llama(LlamaCache),
}

impl Cache {
    /// Keeps only the batch rows `rows` (int64 indices, in that order):
    /// rows that finished stop costing work.
    pub fn keep_rows(&mut self, rows: &Tensor) {
        match self {
            Self::Gpt(c) => c.keep_rows(rows),
            Self::Llama(c) => c.keep_rows(rows),
        }
    }
}

impl Network {
    pub fn config(&self) -> ModelConfig {
        match self {
            Self::Gpt(g) => ModelConfig::Gpt2(g.config().clone()),
            Self::Llama(l) => ModelConfig::Llama(l.config().clone()),
        }
    }

    pub fn n_positions(&self) -> i64 {
        match self {
            Self::Gpt(g) => g.config().n_positions,
            Self::Llama(l) => l.config().max_position_embeddings,
        }
    }

    pub fn vocab_size(&self) -> i64 {
        match self {
            Self::Gpt(g) => g.config().vocab_size,
            Self::Llama(l) => l.config().vocab_size,
        }
    }

    /// A real tokenizer's vocabulary (>= [`SPARSE_LOGITS_VOCAB`] ids):
    /// where the economies that reorder float work apply (logits only
    /// where a loss reads them, shared prompts, rows leaving the batch,
    /// minibatches cut to their span). Byte-level models skip them, which
    /// keeps their runs bit-identical to earlier ones.
    ///
    /// [`SPARSE_LOGITS_VOCAB`]: crate::model::score::SPARSE_LOGITS_VOCAB
    pub fn has_real_vocabulary(&self) -> bool {
        self.vocab_size() >= crate::model::score::SPARSE_LOGITS_VOCAB
    }

    pub fn head(&self) -> Head {
        match self {
            Self::Gpt(g) => g.head(),
            Self::Llama(l) => l.head(),
        }
    }

    /// The dtype of the weights.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Gpt(g) => g.kind(),
            Self::Llama(l) => l.kind(),
        }
    }

    /// Hidden states after the final norm, `(B, T, C)`; see
    /// [`Gpt::hidden`] for the mask and cache.
    pub fn hidden(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut Cache>,
        train: bool,
    ) -> Tensor {
        match (self, cache) {
            (Self::Gpt(g), None) => g.hidden(ids, attention_mask, None, train),
            (Self::Gpt(g), Some(Cache::Gpt(c))) => g.hidden(ids, attention_mask, Some(c), train),
            (Self::Llama(l), None) => l.hidden(ids, attention_mask, None, train),
            (Self::Llama(l), Some(Cache::Llama(c))) => {
                l.hidden(ids, attention_mask, Some(c), train)
            }
            _ => panic!("a cache made for the other layout"),
        }
    }

    /// Next-token logits from hidden states: `(.., C) -> (.., V)`, in fp32
    /// whatever the matmul ran in (log-softmax and losses need it).
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        let logits = match self {
            Self::Gpt(g) => g.logits(hidden),
            Self::Llama(l) => l.logits(hidden),
        };
        logits.to_kind(Kind::Float)
    }

    /// Scalar head values: `(B, T, C) -> (B, T)`; panics without one.
    pub fn values(&self, hidden: &Tensor) -> Tensor {
        match self {
            Self::Gpt(g) => g.values(hidden),
            Self::Llama(l) => l.values(hidden),
        }
    }

    /// `hidden` then `logits`, for the common case.
    pub fn forward_logits(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        self.logits(&self.hidden(ids, attention_mask, None, train))
    }

    /// Adds `delta` to the scalar head's bias (reward normalisation).
    pub fn shift_scalar_bias(&self, delta: f64) {
        match self {
            Self::Gpt(g) => g.shift_scalar_bias(delta),
            Self::Llama(l) => l.shift_scalar_bias(delta),
        }
    }

    /// Runs `f` with any LoRA adapters skipped: the base model.
    pub fn without_adapters<T>(&self, f: impl FnOnce() -> T) -> T {
        match self {
            Self::Gpt(g) => g.without_adapters(f),
            Self::Llama(l) => l.without_adapters(f),
        }
    }

    /// Runs `f` (sampling) with weights prepared once for many one-token
    /// forwards: on the Llama layout, LoRA adapters merged and frozen
    /// weights in the compute kind ([`Llama::with_sampling_weights`]).
    pub fn with_sampling_weights<T>(&self, device: Device, f: impl FnOnce() -> T) -> T {
        match self {
            Self::Gpt(_) => f(),
            Self::Llama(l) => {
                l.with_sampling_weights(crate::ffi::compute_kind(device, l.kind()), f)
            }
        }
    }

    /// Activation checkpointing of training forwards
    /// ([`crate::model::checkpointing`]); refused where the model draws
    /// dropout masks.
    pub fn set_gradient_checkpointing(&self, on: bool) -> Result<(), String> {
        match self {
            Self::Gpt(g) => g.set_gradient_checkpointing(on),
            Self::Llama(l) => l.set_gradient_checkpointing(on),
        }
    }

    /// The layers' part of the backward of checkpointed training forwards,
    /// after the loss's `backward()`; nothing without checkpointing.
    pub fn backward_checkpointed(&self) {
        match self {
            Self::Gpt(g) => g.backward_checkpointed(),
            Self::Llama(l) => l.backward_checkpointed(),
        }
    }

    /// An empty cache for `batch` sequences of up to `capacity` tokens.
    pub fn cache(&self, batch: i64, capacity: i64) -> Cache {
        match self {
            Self::Gpt(g) => Cache::Gpt(KvCache::new(g.config(), batch, capacity)),
            Self::Llama(l) => Cache::Llama(LlamaCache::new(l, capacity)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_config_reads_either_layout_and_keeps_gpt_keys_unchanged() {
        let gpt: ModelConfig = serde_json::from_str(r#"{"n_layer": 2}"#).unwrap();
        let ModelConfig::Gpt2(g) = &gpt else {
            panic!("{gpt:?}")
        };
        assert_eq!(g.n_layer, 2);
        assert_eq!(
            serde_json::to_value(&gpt).unwrap(),
            serde_json::to_value(g).unwrap()
        );
        let llama: ModelConfig =
            serde_json::from_str(r#"{"layout": "llama", "hidden_size": 64}"#).unwrap();
        let ModelConfig::Llama(l) = &llama else {
            panic!("{llama:?}")
        };
        assert_eq!((l.hidden_size, l.head_dim), (64, 16));
        let back: ModelConfig =
            serde_json::from_value(serde_json::to_value(&llama).unwrap()).unwrap();
        assert_eq!(back, llama);
        let e = serde_json::from_str::<ModelConfig>(r#"{"layout": "llama", "n_layer": 2}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("n_layer"), "{e}");
        let e = serde_json::from_str::<ModelConfig>(r#"{"layout": "mamba"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("layout must be"), "{e}");
        let e = serde_json::from_str::<ModelConfig>(
            r#"{"layout": "llama", "num_attention_heads": 4, "num_key_value_heads": 3}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
    }
}
