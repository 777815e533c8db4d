//! The Llama-layout decoder (Llama, Qwen2, Mistral, SmolLM, TinyLlama):
//! RMSNorm, rotary position embeddings, SwiGLU MLP, grouped-query
//! attention, tied or untied embeddings, optional q/k/v biases (Qwen2).
//! Variables carry HF's names (`model.layers.0.self_attn.q_proj.weight`),
//! so an HF `LlamaForCausalLM` / `Qwen2ForCausalLM` / `MistralForCausalLM`
//! folder loads with a key copy.
//!
//! Checked against `transformers` in `tests/llama_reference.rs`; the
//! stages reach it through [`crate::model::network::Network`].

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::model::checkpointing::Checkpointing;
use crate::model::gpt::{Head, ScalarHead};
use crate::model::lora::{Adapter, LoraConfig};

/// Why checkpointing is refused with LoRA dropout.
pub(crate) const LORA_DROPOUT: &str =
    "needs lora.dropout 0: the recomputed layers would draw other dropout masks";

/// What `config.json` says of a Llama-layout model (HF's field names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `llama`, `qwen2` or `mistral`.
    pub model_type: String,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    /// q/k/v projections with biases (Qwen2; Llama's `attention_bias`).
    pub attention_bias: bool,
}

/// Why a `config.json` does not describe a model this module can build.
#[derive(Debug, thiserror::Error)]
pub enum LlamaConfigError {
    #[error("`{0}` is missing or not a number")]
    Missing(&'static str),
    #[error("model_type \"{0}\" is not a Llama-layout decoder (llama, qwen2, mistral)")]
    NotLlama(String),
    #[error("rope_scaling of type \"{0}\" is not supported (only plain rotary embeddings are)")]
    RopeScaling(String),
    #[error("{field}: {value} is not supported ({supported}); rlhf refuses it rather than compute another model")]
    Unsupported {
        field: &'static str,
        value: String,
        supported: &'static str,
    },
    #[error("{field} ({value}) must be a positive multiple of {of_field} ({of})")]
    Shape {
        field: &'static str,
        value: i64,
        of_field: &'static str,
        of: i64,
    },
    #[error("{field} must lie in 1..={max}, got {value}")]
    OutOfRange {
        field: &'static str,
        value: i64,
        max: i64,
    },
    #[error("{field} must be a positive number, got {value}")]
    NotPositive { field: &'static str, value: f64 },
    #[error("the weights alone need {need_gb:.1} GB ({params} parameters in float32); this machine has {have_gb:.1} GB of memory")]
    TooBig {
        params: i64,
        need_gb: f64,
        have_gb: f64,
    },
}

/// `model:` in an experiment file with `layout: llama`: a Llama-layout
/// model built from scratch. Unset fields take these defaults, a small
/// model for the byte tokenizer; `head_dim` follows from the others.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LlamaSpec {
    model_type: String,
    vocab_size: i64,
    hidden_size: i64,
    /// Default: 8/3 of hidden_size, a multiple of 8 (SwiGLU's usual width).
    intermediate_size: Option<i64>,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    num_key_value_heads: i64,
    head_dim: Option<i64>,
    rms_norm_eps: f64,
    rope_theta: f64,
    max_position_embeddings: i64,
    tie_word_embeddings: bool,
    attention_bias: bool,
}

impl Default for LlamaSpec {
    fn default() -> Self {
        Self {
            model_type: "llama".into(),
            vocab_size: 264,
            hidden_size: 128,
            intermediate_size: None,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: None,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            max_position_embeddings: 256,
            tie_word_embeddings: true,
            attention_bias: false,
        }
    }
}

/// Upper bounds on the shapes: far above any model this tool trains, low
/// enough that the arithmetic on them cannot overflow.
const LIMITS: [(&str, i64); 7] = [
    ("vocab_size", 1 << 22),
    ("hidden_size", 1 << 16),
    ("intermediate_size", 1 << 18),
    ("num_hidden_layers", 1 << 10),
    ("num_attention_heads", 1 << 10),
    ("num_key_value_heads", 1 << 10),
    ("max_position_embeddings", 1 << 24),
];

/// The MLP rlhf computes: SiLU-gated, without biases (`hidden_act` and
/// `mlp_bias` as transformers' Llama reads them).
fn check_activation(v: &Value) -> Result<(), LlamaConfigError> {
    match &v["hidden_act"] {
        Value::Null => {}
        Value::String(a) if a == "silu" || a == "swish" => {}
        other => {
            return Err(LlamaConfigError::Unsupported {
                field: "hidden_act",
                value: other.to_string(),
                supported: "\"silu\"",
            })
        }
    }
    match &v["mlp_bias"] {
        Value::Null | Value::Bool(false) => Ok(()),
        other => Err(LlamaConfigError::Unsupported {
            field: "mlp_bias",
            value: other.to_string(),
            supported: "false",
        }),
    }
}

impl LlamaConfig {
    /// From an HF `config.json` object.
    pub fn from_hf(v: &Value) -> Result<Self, LlamaConfigError> {
        let model_type = v["model_type"].as_str().unwrap_or("");
        let qwen = model_type == "qwen2";
        if !["llama", "qwen2", "mistral"].contains(&model_type) {
            return Err(LlamaConfigError::NotLlama(model_type.into()));
        }
        // transformers 5 writes `rope_parameters`, earlier ones `rope_theta`
        // and `rope_scaling`; as transformers 5 reads them, `rope_scaling`
        // replaces `rope_parameters` whole, and a top-level `rope_theta`
        // counts only where neither gives one.
        let rope = match &v["rope_scaling"] {
            r @ Value::Object(_) => r,
            _ => &v["rope_parameters"],
        };
        check_activation(v)?;
        let scaling = [&v["rope_scaling"], rope]
            .into_iter()
            .find_map(|r| r.get("rope_type").or_else(|| r.get("type")));
        if let Some(kind) = scaling {
            let kind = kind.as_str().unwrap_or("?");
            if kind != "default" {
                return Err(LlamaConfigError::RopeScaling(kind.into()));
            }
        }
        let int = |k: &'static str| v[k].as_i64().ok_or(LlamaConfigError::Missing(k));
        // A sliding window (Mistral v0.1; Qwen2 when `use_sliding_window`)
        // changes nothing within it: the window becomes the context limit.
        let window = match model_type {
            "qwen2" if v["use_sliding_window"].as_bool() != Some(true) => None,
            _ => v["sliding_window"].as_i64(),
        };
        let max_positions = int("max_position_embeddings")?;
        let heads = int("num_attention_heads")?;
        let hidden = int("hidden_size")?;
        let config = Self {
            model_type: model_type.into(),
            vocab_size: int("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: int("intermediate_size")?,
            num_hidden_layers: int("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: v["num_key_value_heads"].as_i64().unwrap_or(heads),
            head_dim: v["head_dim"]
                .as_i64()
                .unwrap_or(if heads > 0 { hidden / heads } else { 0 }),
            rms_norm_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-6),
            rope_theta: rope["rope_theta"]
                .as_f64()
                .or_else(|| v["rope_theta"].as_f64())
                .unwrap_or(10_000.0),
            max_position_embeddings: window.map_or(max_positions, |w| w.min(max_positions)),
            tie_word_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
            attention_bias: v["attention_bias"].as_bool().unwrap_or(qwen),
        };
        config.check()?;
        Ok(config)
    }

    /// The `config.json` that `transformers` reads for this model.
    pub fn to_hf(&self) -> Value {
        let architecture = match self.model_type.as_str() {
            "qwen2" => "Qwen2ForCausalLM",
            "mistral" => "MistralForCausalLM",
            _ => "LlamaForCausalLM",
        };
        let mut v = serde_json::json!({
            "architectures": [architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
        });
        if self.model_type != "qwen2" {
            v["attention_bias"] = Value::from(self.attention_bias);
        }
        v
    }

    /// The experiment file's `model:` fields (with `layout: llama`
    /// removed), defaults filled in, checked.
    pub fn from_experiment(v: Value) -> Result<Self, String> {
        let spec: LlamaSpec = serde_json::from_value(v).map_err(|e| e.to_string())?;
        if !["llama", "qwen2", "mistral"].contains(&spec.model_type.as_str()) {
            return Err(LlamaConfigError::NotLlama(spec.model_type).to_string());
        }
        let heads = spec.num_attention_heads.max(1);
        let config = Self {
            head_dim: spec.head_dim.unwrap_or(spec.hidden_size / heads),
            model_type: spec.model_type,
            vocab_size: spec.vocab_size,
            hidden_size: spec.hidden_size,
            intermediate_size: spec
                .intermediate_size
                .unwrap_or((spec.hidden_size.clamp(1, 1 << 40) * 8 / 3 + 7) / 8 * 8),
            num_hidden_layers: spec.num_hidden_layers,
            num_attention_heads: spec.num_attention_heads,
            num_key_value_heads: spec.num_key_value_heads,
            rms_norm_eps: spec.rms_norm_eps,
            rope_theta: spec.rope_theta,
            max_position_embeddings: spec.max_position_embeddings,
            tie_word_embeddings: spec.tie_word_embeddings,
            attention_bias: spec.attention_bias,
        };
        config.check().map_err(|e| e.to_string())?;
        Ok(config)
    }

    /// Parameters of the network (LM head included when untied).
    pub fn n_params(&self) -> i64 {
        let (c, d) = (self.hidden_size, self.head_dim);
        let q = self.num_attention_heads * d;
        let kv = self.num_key_value_heads * d;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let attn = c * (q + 2 * kv) + q * c + bias;
        let layer = attn + 3 * c * self.intermediate_size + 2 * c;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * c
        };
        self.vocab_size * c + self.num_hidden_layers * layer + c + head
    }

    /// Shapes that build a model that fits in this machine's memory.
    pub fn check(&self) -> Result<(), LlamaConfigError> {
        let sizes = [
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.max_position_embeddings,
        ];
        for ((field, max), value) in LIMITS.into_iter().zip(sizes) {
            if !(1..=max).contains(&value) {
                return Err(LlamaConfigError::OutOfRange { field, value, max });
            }
        }
        for (field, value) in [
            ("rms_norm_eps", self.rms_norm_eps),
            ("rope_theta", self.rope_theta),
        ] {
            if !(value > 0.0 && value.is_finite()) {
                return Err(LlamaConfigError::NotPositive { field, value });
            }
        }
        let shape = |field, value, of_field, of| LlamaConfigError::Shape {
            field,
            value,
            of_field,
            of,
        };
        let kv = self.num_key_value_heads;
        if self.num_attention_heads % kv != 0 {
            return Err(shape(
                "num_attention_heads",
                self.num_attention_heads,
                "num_key_value_heads",
                kv,
            ));
        }
        if !(2..=1 << 12).contains(&self.head_dim) || self.head_dim % 2 != 0 {
            return Err(shape("head_dim", self.head_dim, "2", 2));
        }
        let params = self.n_params();
        if let Some(have) = rlhf_datasets::files::memory_bytes().map(|b| b as f64) {
            let need = params as f64 * 4.0;
            if need > have {
                return Err(LlamaConfigError::TooBig {
                    params,
                    need_gb: need / 1e9,
                    have_gb: have / 1e9,
                });
            }
        }
        Ok(())
    }
}

/// HF's initialisation for training from scratch: N(0, 0.02) weights
/// (`initializer_range`), zero biases.
const INIT: nn::Init = nn::Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

fn linear(p: nn::Path, input: i64, output: i64, bias: bool) -> Proj {
    let linear = nn::linear(
        p,
        input,
        output,
        nn::LinearConfig {
            bias,
            ws_init: INIT,
            bs_init: Some(nn::Init::Const(0.0)),
        },
    );
    Proj {
        linear,
        adapter: None,
        shape: (input, output),
        sampling: Default::default(),
    }
}

/// A linear projection, with a LoRA adapter once one is added.
#[derive(Debug)]
struct Proj {
    linear: nn::Linear,
    adapter: Option<Adapter>,
    /// (in, out).
    shape: (i64, i64),
    /// While sampling ([`Llama::sampling_weights`]): the weight to use
    /// instead, the adapter merged in and in the compute kind.
    sampling: SamplingWeight,
}

impl Proj {
    fn forward(&self, x: &Tensor, pass: &Pass) -> Tensor {
        if pass.adapters {
            if let Some(w) = self.sampling.get() {
                return x.linear(&w, self.linear.bs.as_ref());
            }
        }
        let y = self.linear.forward(x);
        match &self.adapter {
            Some(a) if pass.adapters => y + a.delta(x, pass.train),
            _ => y,
        }
    }

    /// Sets or clears the sampling weight: the merged weight where an
    /// adapter is on, else a `kind` copy of a frozen weight that autocast
    /// would cast again for every token (it caches trainable weights only).
    fn prepare_sampling(&self, kind: Option<Kind>) {
        let w = &self.linear.ws;
        let weight = kind.and_then(|kind| match &self.adapter {
            Some(a) => Some(a.merged(w, kind)),
            None if kind != w.kind() && !w.requires_grad() => Some(w.to_kind(kind)),
            None => None,
        });
        self.sampling.set(weight);
    }
}

/// A weight that sampling swaps in, shared by `&self` forwards.
#[derive(Debug, Default)]
struct SamplingWeight(std::sync::Mutex<Option<Tensor>>);

impl SamplingWeight {
    fn get(&self) -> Option<Tensor> {
        let w = self.0.lock().unwrap_or_else(|e| e.into_inner());
        w.as_ref().map(Tensor::shallow_clone)
    }

    fn set(&self, weight: Option<Tensor>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = weight;
    }
}

/// RMSNorm in fp32, as HF computes it, back in the input's kind.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(p: nn::Path, size: i64, eps: f64) -> Self {
        Self {
            weight: p.ones("weight", &[size]),
            eps,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let x = x.to_kind(Kind::Float);
        let variance = x.square().mean_dim(-1, true, Kind::Float);
        let normed = (x * (variance + self.eps).rsqrt()).to_kind(kind);
        &self.weight * normed
    }
}

#[derive(Debug)]
struct Attention {
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

#[derive(Debug)]
struct Mlp {
    gate: Proj,
    up: Proj,
    down: Proj,
}

#[derive(Debug)]
struct Layer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: Mlp,
}

/// A Llama-layout causal language model.
#[derive(Debug)]
pub struct Llama {
    config: LlamaConfig,
    embed: nn::Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// `None` when tied to the embeddings.
    lm_head: Option<nn::Linear>,
    /// The reward model's and critic's head.
    score: Option<ScalarHead>,
    /// Off: the LoRA adapters are skipped (the base model, PPO's
    /// reference).
    adapters_on: std::sync::atomic::AtomicBool,
    /// Rotary inverse frequencies `(D/2,)`, fp32.
    inv_freq: Tensor,
    /// While sampling: the LM head's weight in the compute kind, where
    /// it is frozen and autocast would cast it for every token.
    sampling_head: SamplingWeight,
    /// Activation checkpointing of training forwards.
    checkpointing: Checkpointing<Pass>,
}

impl Llama {
    /// Variables under `root` with HF's names; `Head::Scalar` adds `score`.
    pub fn new(root: &nn::Path, config: &LlamaConfig, head: Head) -> Self {
        let c = config;
        let m = root / "model";
        let (hidden, d) = (c.hidden_size, c.head_dim);
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = &m / "layers" / i;
                let a = &l / "self_attn";
                let mlp = &l / "mlp";
                let bias = c.attention_bias;
                Layer {
                    input_norm: RmsNorm::new(&l / "input_layernorm", hidden, c.rms_norm_eps),
                    attn: Attention {
                        q: linear(&a / "q_proj", hidden, c.num_attention_heads * d, bias),
                        k: linear(&a / "k_proj", hidden, c.num_key_value_heads * d, bias),
                        v: linear(&a / "v_proj", hidden, c.num_key_value_heads * d, bias),
                        o: linear(&a / "o_proj", c.num_attention_heads * d, hidden, false),
                        heads: c.num_attention_heads,
                        kv_heads: c.num_key_value_heads,
                        head_dim: d,
                    },
                    post_norm: RmsNorm::new(
                        &l / "post_attention_layernorm",
                        hidden,
                        c.rms_norm_eps,
                    ),
                    mlp: Mlp {
                        gate: linear(&mlp / "gate_proj", hidden, c.intermediate_size, false),
                        up: linear(&mlp / "up_proj", hidden, c.intermediate_size, false),
                        down: linear(&mlp / "down_proj", c.intermediate_size, hidden, false),
                    },
                }
            })
            .collect();
        Self {
            config: c.clone(),
            embed: nn::embedding(
                &m / "embed_tokens",
                c.vocab_size,
                hidden,
                nn::EmbeddingConfig {
                    ws_init: INIT,
                    ..Default::default()
                },
            ),
            layers,
            norm: RmsNorm::new(&m / "norm", hidden, c.rms_norm_eps),
            lm_head: (!c.tie_word_embeddings)
                .then(|| linear(root / "lm_head", hidden, c.vocab_size, false).linear),
            score: (head == Head::Scalar).then(|| ScalarHead::new(root, hidden)),
            adapters_on: true.into(),
            sampling_head: Default::default(),
            checkpointing: Default::default(),
            inv_freq: {
                let exponents =
                    Tensor::arange_start_step(0, d, 2, (Kind::Float, root.device())) / d as f64;
                Tensor::pow_scalar(c.rope_theta, &exponents).reciprocal()
            },
        }
    }

    /// Adds LoRA adapters to the `config.target_modules` projections of
    /// every layer, their variables under `root` with PEFT's names
    /// (`model.layers.0.self_attn.q_proj.lora_A.weight`).
    pub fn add_lora(&mut self, root: &nn::Path, config: &LoraConfig) {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let l = root / "model" / "layers" / i;
            let projections = [
                ("self_attn", "q_proj", &mut layer.attn.q),
                ("self_attn", "k_proj", &mut layer.attn.k),
                ("self_attn", "v_proj", &mut layer.attn.v),
                ("self_attn", "o_proj", &mut layer.attn.o),
                ("mlp", "gate_proj", &mut layer.mlp.gate),
                ("mlp", "up_proj", &mut layer.mlp.up),
                ("mlp", "down_proj", &mut layer.mlp.down),
            ];
            for (block, name, proj) in projections {
                if config.targets(name) {
                    let (input, output) = proj.shape;
                    let p = &l / block / name;
                    proj.adapter = Some(Adapter::new(&p, input, output, config));
                }
            }
        }
    }

    /// Runs `f` (sampling, under `no_grad`) with each adapted projection's
    /// weight merged once, and frozen weights cast once to `kind` (the
    /// compute kind: bfloat16 under autocast), rather than for every
    /// token; the copies are dropped when `f` returns. Costs one copy of
    /// the adapted (or, under bf16, frozen) weights while it runs.
    pub fn with_sampling_weights<T>(&self, kind: Kind, f: impl FnOnce() -> T) -> T {
        let projections = || self.layers.iter().flat_map(Layer::projections);
        struct Clear<'a, I: Iterator<Item = &'a Proj>>(Option<I>, &'a SamplingWeight);
        impl<'a, I: Iterator<Item = &'a Proj>> Drop for Clear<'a, I> {
            fn drop(&mut self) {
                self.0
                    .take()
                    .into_iter()
                    .flatten()
                    .for_each(|p| p.prepare_sampling(None));
                self.1.set(None);
            }
        }
        // Cleared on the way out even if preparing them fails part-way.
        let _clear = Clear(Some(projections()), &self.sampling_head);
        let head = self.lm_head.as_ref().map_or(&self.embed.ws, |h| &h.ws);
        if kind != head.kind() && !head.requires_grad() {
            self.sampling_head.set(Some(head.to_kind(kind)));
        }
        projections().for_each(|p| p.prepare_sampling(Some(kind)));
        f()
    }

    /// Training forwards keep only each layer's input; the backward
    /// recomputes the layers ([`crate::model::checkpointing`]), run by
    /// [`Llama::backward_checkpointed`] after the loss's backward.
    /// Refused with adapter dropout on: the recomputed layers would draw
    /// other dropout masks.
    pub fn set_gradient_checkpointing(&self, on: bool) -> Result<(), String> {
        let dropout = self
            .layers
            .iter()
            .flat_map(Layer::projections)
            .any(|p| p.adapter.as_ref().is_some_and(|a| a.dropout() > 0.0));
        if on && dropout {
            return Err(LORA_DROPOUT.into());
        }
        self.checkpointing.set(on);
        Ok(())
    }

    /// The layers' part of the backward of checkpointed forwards.
    pub fn backward_checkpointed(&self) {
        self.checkpointing.backward(
            |i, x, pass| self.layers[i].forward(x, pass, &mut None),
            |ids, _| self.embed.forward(ids),
        );
    }

    /// Runs `f` with the adapters skipped: the base model.
    pub fn without_adapters<T>(&self, f: impl FnOnce() -> T) -> T {
        crate::model::lora::with_adapters_off(&self.adapters_on, f)
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn head(&self) -> Head {
        if self.score.is_some() {
            Head::Scalar
        } else {
            Head::Lm
        }
    }

    /// The dtype of the weights.
    pub fn kind(&self) -> Kind {
        self.embed.ws.kind()
    }

    /// Logits `(B, T, V)` of token ids `(B, T)`; `attention_mask` `(B, T)`
    /// (1: a real token) allows left padding: positions count real tokens.
    pub fn forward_logits(&self, ids: &Tensor, attention_mask: Option<&Tensor>) -> Tensor {
        self.logits(&self.hidden(ids, attention_mask, None, false))
    }

    /// Hidden states after the final norm, `(B, t, C)`, of `ids` `(B, t)`.
    /// With a cache, they follow the tokens already in it and their keys
    /// and values are appended; `attention_mask` then covers the cached
    /// tokens and these, `(B, past + t)`. `train` turns on the adapters'
    /// dropout (the model itself has none).
    pub fn hidden(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut LlamaCache>,
        train: bool,
    ) -> Tensor {
        let mut none;
        let cache = match cache {
            Some(c) => c,
            None => {
                none = LlamaCache::none(self.layers.len());
                &mut none
            }
        };
        self.run(ids, attention_mask, cache, train)
    }

    /// Next-token logits from hidden states: `(.., C) -> (.., V)`.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        if let Some(w) = self.sampling_head.get() {
            return hidden.linear(&w, None::<Tensor>);
        }
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => hidden.linear(&self.embed.ws, None::<Tensor>),
        }
    }

    /// Scalar head values: `(B, T, C) -> (B, T)`; panics without one.
    pub fn values(&self, hidden: &Tensor) -> Tensor {
        let head = self.score.as_ref().expect("values() needs Head::Scalar");
        head.values(hidden)
    }

    /// Adds `delta` to the scalar head's bias (reward normalisation).
    pub fn shift_scalar_bias(&self, delta: f64) {
        let head = self.score.as_ref().expect("shift needs Head::Scalar");
        head.shift(delta);
    }

    fn run(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut LlamaCache,
        train: bool,
    ) -> Tensor {
        let (b, t) = ids.size2().expect("ids are (B, T)");
        let device = ids.device();
        let past = cache.len;
        let positions = match attention_mask {
            // Decoding: the new token's position is the real tokens before it.
            Some(m) if t == 1 => (m.sum_dim_intlist(1, true, Kind::Int64) - 1).clamp_min(0),
            Some(m) => (m.cumsum(1, Kind::Int64) - 1)
                .clamp_min(0)
                .narrow(1, past, t),
            None => {
                Tensor::arange_start(past, past + t, (Kind::Int64, device)).expand([b, t], false)
            }
        };
        let (cos, sin) = self.rotary(&positions);
        let pass = Pass {
            cos,
            sin,
            mask: AttentionMask::new(t, past, attention_mask, device),
            past,
            capacity: cache.capacity,
            adapters: self.adapters_on.load(std::sync::atomic::Ordering::SeqCst),
            train,
        };
        if cache.capacity == 0 && self.checkpointing.applies() {
            let x = tch::no_grad(|| self.embed.forward(ids));
            let n = self.layers.len();
            let out = self.checkpointing.forward(x, ids, pass, n, |i, x, pass| {
                self.layers[i].forward(x, pass, &mut None)
            });
            return self.norm.forward(&out);
        }
        let mut x = self.embed.forward(ids);
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, &pass, kv);
        }
        if cache.keep {
            cache.len += t;
        }
        self.norm.forward(&x)
    }

    /// cos and sin `(B, 1, T, D)` of HF's rotary embedding at `positions`
    /// `(B, T)`.
    fn rotary(&self, positions: &Tensor) -> (Tensor, Tensor) {
        let inv_freq = self.inv_freq.to_device(positions.device());
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq; // (B, T, D/2)
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1); // (B, 1, T, D)
        (emb.cos(), emb.sin())
    }
}

/// What every layer of one forward pass shares: the rotary tables at the
/// tokens' positions, how queries attend, and where new keys go in the
/// cache.
struct Pass {
    cos: Tensor,
    sin: Tensor,
    mask: AttentionMask,
    /// Tokens already in the cache.
    past: i64,
    /// The cache's room per row; 0: keys and values are not kept.
    capacity: i64,
    /// Whether LoRA adapters apply, and whether their dropout does.
    adapters: bool,
    train: bool,
}

/// How `t` new queries after `past` cached tokens attend.
enum AttentionMask {
    /// Causal over the new tokens, no cache and no padding: SDPA's own
    /// causal kernels, no mask in memory.
    Causal,
    /// One query that sees every key (decoding without padding).
    All,
    /// A boolean `(B, 1, t, past + t)` mask.
    Explicit(Tensor),
}

impl AttentionMask {
    fn new(t: i64, past: i64, attention_mask: Option<&Tensor>, device: Device) -> Self {
        match (attention_mask, past, t) {
            (None, 0, _) => Self::Causal,
            (None, _, 1) => Self::All,
            // One query: every real key, and itself (a padded query row
            // would otherwise see nothing).
            (Some(m), _, 1) => {
                let valid = m.ne(0);
                let _ = valid.narrow(1, past, 1).fill_(1);
                Self::Explicit(valid.view([-1, 1, 1, past + 1]))
            }
            (m, _, _) => Self::Explicit(causal_mask(t, past, m, device)),
        }
    }
}

/// Each layer's keys and values so far (before grouped-query
/// repetition), for decoding one token at a time: one buffer per layer,
/// `(B, 2, kv_heads, capacity, D)`, allocated at the first tokens in their
/// kind (bfloat16 under bf16 autocast) and written in place, so that a
/// decode step copies only its new keys and values.
#[derive(Debug)]
pub struct LlamaCache {
    layers: Vec<Option<Tensor>>,
    len: i64,
    capacity: i64,
    /// Whether the keys and values are kept (a plain forward keeps none).
    keep: bool,
}

impl LlamaCache {
    /// Room for `capacity` tokens per row.
    pub fn new(model: &Llama, capacity: i64) -> Self {
        Self {
            keep: true,
            capacity,
            ..Self::none(model.layers.len())
        }
    }

    fn none(layers: usize) -> Self {
        Self {
            layers: (0..layers).map(|_| None).collect(),
            len: 0,
            capacity: 0,
            keep: false,
        }
    }

    /// Tokens cached.
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    /// Keeps only the batch rows `rows` (int64 indices).
    pub fn keep_rows(&mut self, rows: &Tensor) {
        for buffer in self.layers.iter_mut().flatten() {
            *buffer = buffer.index_select(0, rows);
        }
    }
}

/// Writes `k`, `v` `(B, kv_heads, t, D)` at `past..past + t` of one
/// layer's buffer (made on first use) and returns views of every cached
/// key and value.
fn append(
    buffer: &mut Option<Tensor>,
    capacity: i64,
    k: &Tensor,
    v: &Tensor,
    past: i64,
) -> (Tensor, Tensor) {
    let [b, heads, t, d] = k.size()[..] else {
        panic!("keys are (B, H, T, D)")
    };
    assert!(
        past + t <= capacity,
        "the KV cache holds {capacity} tokens; {past} + {t} do not fit"
    );
    let buffer = buffer
        .get_or_insert_with(|| Tensor::zeros([b, 2, heads, capacity, d], (k.kind(), k.device())));
    let new = buffer.narrow(3, past, t);
    new.select(1, 0).copy_(k);
    new.select(1, 1).copy_(v);
    let so_far = buffer.narrow(3, 0, past + t);
    (so_far.select(1, 0), so_far.select(1, 1))
}

impl Layer {
    /// The seven projections, in PEFT's module order.
    fn projections(&self) -> [&Proj; 7] {
        let (a, m) = (&self.attn, &self.mlp);
        [&a.q, &a.k, &a.v, &a.o, &m.gate, &m.up, &m.down]
    }

    /// Pre-norm residual block; out of place, so that autograd keeps what
    /// the norms saved.
    fn forward(&self, x: &Tensor, pass: &Pass, kv: &mut Option<Tensor>) -> Tensor {
        let attn = self.attn.forward(&self.input_norm.forward(x), pass, kv);
        let x = x + attn;
        let normed = self.post_norm.forward(&x);
        let m = &self.mlp;
        let h = m.gate.forward(&normed, pass).silu() * m.up.forward(&normed, pass);
        &x + m.down.forward(&h, pass)
    }
}

impl Attention {
    fn forward(&self, x: &Tensor, pass: &Pass, kv: &mut Option<Tensor>) -> Tensor {
        let (b, t, _) = x.size3().expect("(B, T, C)");
        let (cos, sin) = (&pass.cos, &pass.sin);
        let split = |y: Tensor, heads: i64| y.view([b, t, heads, self.head_dim]).transpose(1, 2);
        let q = apply_rotary(&split(self.q.forward(x, pass), self.heads), cos, sin);
        let mut k = apply_rotary(&split(self.k.forward(x, pass), self.kv_heads), cos, sin);
        let mut v = split(self.v.forward(x, pass), self.kv_heads);
        if pass.capacity > 0 {
            (k, v) = append(kv, pass.capacity, &k, &v, pass.past);
        }
        let y = self.attend(&q, &k, &v, &pass.mask);
        self.o.forward(&y, pass)
    }

    /// Grouped-query attention of `q` `(B, H, t, D)` over `k`, `v`
    /// `(B, kv_heads, S, D)`: `(B, t, H D)`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask) -> Tensor {
        let [b, heads, t, d] = q.size()[..] else {
            panic!("queries are (B, H, T, D)")
        };
        let groups = heads / self.kv_heads;
        if t == 1 {
            // One query per head: a group's queries are rows of one
            // attention against their shared key/value head, so the cache
            // is read as it is, never repeated.
            let q = q.reshape([b, self.kv_heads, groups, d]);
            let m = match mask {
                AttentionMask::Explicit(m) => Some(m),
                _ => None,
            };
            let y = Tensor::scaled_dot_product_attention(&q, k, v, m, 0.0, false, None, false);
            return y.reshape([b, 1, heads * d]);
        }
        let (k, v) = match groups {
            1 => (k.shallow_clone(), v.shallow_clone()),
            g => (
                k.repeat_interleave_self_int(g, 1, None),
                v.repeat_interleave_self_int(g, 1, None),
            ),
        };
        let (m, causal) = match mask {
            AttentionMask::Causal => (None, true),
            AttentionMask::All => (None, false),
            AttentionMask::Explicit(m) => (Some(m), false),
        };
        let y = Tensor::scaled_dot_product_attention(q, &k, &v, m, 0.0, causal, None, false);
        y.transpose(1, 2).contiguous().view([b, t, heads * d])
    }
}

/// `x * cos + rotate_half(x) * sin`, rotate_half(x) = [-x2, x1].
fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let (x1, x2) = (x.narrow(3, 0, half), x.narrow(3, half, half));
    let rotated = Tensor::cat(&[&(-x2), &x1], 3);
    x * cos.to_kind(x.kind()) + rotated * sin.to_kind(x.kind())
}

/// A boolean `(B, 1, t, past + t)` mask for `t` queries after `past`
/// cached tokens: causal, and no attention to padding.
fn causal_mask(t: i64, past: i64, attention_mask: Option<&Tensor>, device: Device) -> Tensor {
    let total = past + t;
    let ones = Tensor::ones([t, total], (Kind::Bool, device));
    let causal = ones.tril(past).view([1, 1, t, total]);
    match attention_mask {
        None => causal,
        Some(m) => {
            // (B, 1, 1, total); a padded query row would see nothing, so it
            // sees itself.
            let keys = m.to_kind(Kind::Bool).unsqueeze(1).unsqueeze(1);
            let itself = ones.tril(past).logical_and(&ones.triu(past));
            causal
                .logical_and(&keys)
                .logical_or(&itself.view([1, 1, t, total]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(tied: bool) -> (nn::VarStore, Llama) {
        tch::manual_seed(3);
        let v = serde_json::json!({
            "model_type": "qwen2", "vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "tie_word_embeddings": tied
        });
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Llama::new(&vs.root(), &LlamaConfig::from_hf(&v).unwrap(), Head::Lm);
        (vs, model)
    }

    #[test]
    fn a_left_padded_batch_gives_each_prompt_its_own_logits() {
        let (_vs, model) = tiny(false);
        let prompts: [&[i64]; 2] = [&[5, 9, 2, 7, 1, 3], &[8, 4, 6]];
        let width = 6;
        let mut ids = Vec::new();
        let mut mask = Vec::new();
        for p in prompts {
            let pad = width - p.len();
            ids.extend(std::iter::repeat_n(0, pad).chain(p.iter().copied()));
            mask.extend(std::iter::repeat_n(0i64, pad).chain(std::iter::repeat_n(1, p.len())));
        }
        let ids = Tensor::from_slice(&ids).view([2, width as i64]);
        let mask = Tensor::from_slice(&mask).view([2, width as i64]);
        let batched = tch::no_grad(|| model.forward_logits(&ids, Some(&mask)));
        for (row, p) in prompts.iter().enumerate() {
            let alone =
                tch::no_grad(|| model.forward_logits(&Tensor::from_slice(p).view([1, -1]), None));
            let n = p.len() as i64;
            let real = batched.get(row as i64).narrow(0, width as i64 - n, n);
            let diff = (real - alone.get(0)).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "row {row}: {diff}");
        }
    }

    #[test]
    fn decoding_with_the_cache_equals_the_full_forward() {
        let (_vs, model) = tiny(true);
        let ids = Tensor::from_slice(&[0i64, 0, 5, 9, 2, 7, 1, 3, 4, 6, 8, 3]).view([2, 6]);
        let mask = Tensor::from_slice(&[0i64, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]).view([2, 6]);
        let full = tch::no_grad(|| model.forward_logits(&ids, Some(&mask)));
        let mut cache = LlamaCache::new(&model, 6);
        let mut parts = vec![tch::no_grad(|| {
            model.logits(&model.hidden(
                &ids.narrow(1, 0, 3),
                Some(&mask.narrow(1, 0, 3)),
                Some(&mut cache),
                false,
            ))
        })];
        for col in 3..6 {
            let step = tch::no_grad(|| {
                model.logits(&model.hidden(
                    &ids.narrow(1, col, 1),
                    Some(&mask.narrow(1, 0, col + 1)),
                    Some(&mut cache),
                    false,
                ))
            });
            parts.push(step);
        }
        assert_eq!(cache.len(), 6);
        let decoded = Tensor::cat(&parts, 1);
        // Row 0's two padded positions are not compared: nothing reads them.
        let real = |t: &Tensor| Tensor::cat(&[t.get(0).narrow(0, 2, 4), t.get(1)], 0);
        let diff = (real(&full) - real(&decoded)).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{diff}");
    }

    /// Prefill then one token at a time, without padding (SDPA's causal
    /// kernel, then grouped queries against the cache as it is).
    fn decode_unpadded(model: &Llama, ids: &Tensor, prefill: i64) -> (Tensor, LlamaCache) {
        let (_, t) = ids.size2().unwrap();
        let mut cache = LlamaCache::new(model, t);
        let mut parts = Vec::new();
        for (start, len) in std::iter::once((0, prefill)).chain((prefill..t).map(|c| (c, 1))) {
            let h = model.hidden(&ids.narrow(1, start, len), None, Some(&mut cache), false);
            parts.push(model.logits(&h));
        }
        (Tensor::cat(&parts, 1), cache)
    }

    #[test]
    fn unpadded_decoding_equals_the_full_forward_and_keeps_bf16_keys_in_bf16() {
        let (_vs, model) = tiny(false);
        let ids = Tensor::from_slice(&[5i64, 9, 2, 7, 1, 3, 4, 6, 8, 3, 2, 2]).view([2, 6]);
        let full = tch::no_grad(|| model.forward_logits(&ids, None));
        let (decoded, cache) = tch::no_grad(|| decode_unpadded(&model, &ids, 2));
        let diff = (&full - decoded).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{diff}");
        assert_eq!(cache.layers[0].as_ref().unwrap().kind(), Kind::Float);
        // Under bf16 autocast the cache is made in bfloat16: no casts per step.
        let bf16 = crate::model::precision::Precision::Bf16;
        let (decoded, cache) = bf16.run(Device::Cpu, || {
            tch::no_grad(|| decode_unpadded(&model, &ids, 2))
        });
        assert_eq!(cache.layers[0].as_ref().unwrap().kind(), Kind::BFloat16);
        let diff = (full - decoded.to_kind(Kind::Float))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 0.1, "{diff}");
    }

    #[test]
    fn gradients_reach_every_weight() {
        let (vs, model) = tiny(true);
        let ids = Tensor::from_slice(&[1i64, 2, 3, 4]).view([1, 4]);
        model.forward_logits(&ids, None).sum(Kind::Float).backward();
        for (name, t) in vs.variables() {
            let g = t.grad();
            assert!(
                g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
                "{name}"
            );
        }
    }
}
