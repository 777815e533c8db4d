//! A decoder-only GPT in the GPT-2 layout (Radford et al., 2019), read top to
//! bottom like nanoGPT's `model.py`.
//!
//! Parameter names and shapes are HF GPT-2's (`wte`, `wpe`, `h.{i}.attn.c_attn`,
//! ...), linear layers included: they are kept in HF's Conv1D layout
//! `(in, out)`, so loading or saving an HF folder is a plain key copy. The LM
//! head is tied to `wte`. An optional scalar head (`score`) gives one value per
//! position, for the reward model and the critic. LoRA adapters may sit on
//! `c_attn`, `c_proj` and `c_fc` ([`Gpt::add_lora`]).
//!
//! The KV cache lives outside the model ([`KvCache`]): the model is `&self`
//! and one instance serves training and generation.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

use crate::model::checkpointing::Checkpointing;
use crate::model::lora::{Adapter, LoraConfig};

/// The shapes of a GPT. Field names and defaults are HF `GPT2Config`'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GptConfig {
    /// Token ids the model can read and predict (at least the tokenizer's).
    pub vocab_size: i64,
    /// Longest sequence: the number of learned positions.
    pub n_positions: i64,
    pub n_embd: i64,
    pub n_layer: i64,
    pub n_head: i64,
    /// MLP width; `None` means 4 * n_embd as in GPT-2.
    pub n_inner: Option<i64>,
    pub layer_norm_epsilon: f64,
    pub embd_pdrop: f64,
    pub attn_pdrop: f64,
    pub resid_pdrop: f64,
}

impl Default for GptConfig {
    /// A small model that trains in minutes on 2 CPU cores, sized for the
    /// byte tokenizer (261 ids, padded to 264 for aligned matmuls).
    fn default() -> Self {
        Self {
            vocab_size: 264,
            n_positions: 256,
            n_embd: 128,
            n_layer: 4,
            n_head: 4,
            n_inner: None,
            layer_norm_epsilon: 1e-5,
            embd_pdrop: 0.0,
            attn_pdrop: 0.0,
            resid_pdrop: 0.0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GptConfigError {
    #[error("model config: {field} must be positive, got {value}")]
    NotPositive { field: &'static str, value: i64 },
    #[error("model config: n_embd ({n_embd}) must be a multiple of n_head ({n_head})")]
    HeadsDoNotDivide { n_embd: i64, n_head: i64 },
    #[error("model config: {field} must lie in [0, 1), got {value}")]
    BadDropout { field: &'static str, value: f64 },
    #[error("model config: layer_norm_epsilon must be a positive finite number, got {0}")]
    BadEpsilon(f64),
    #[error("model config: {field} must be at most {max}, got {value}")]
    TooLarge {
        field: &'static str,
        value: i64,
        max: i64,
    },
    #[error("model config: the weights alone need {need_gb:.1} GB ({params} parameters in float32); this machine has {have_gb:.1} GB of memory")]
    TooBig {
        params: i64,
        need_gb: f64,
        have_gb: f64,
    },
}

/// Upper bounds on the shapes: far above any model this tool trains, low
/// enough that the arithmetic on them cannot overflow.
const SHAPE_LIMITS: [(&str, i64); 6] = [
    ("vocab_size", 1 << 22),
    ("n_positions", 1 << 20),
    ("n_embd", 1 << 16),
    ("n_layer", 1 << 10),
    ("n_head", 1 << 10),
    ("n_inner", 1 << 18),
];

impl GptConfig {
    /// A vocabulary for a tokenizer of `ids` ids: rounded up to a multiple
    /// of 8, as GPT-2's 50257 becomes 50264.
    pub fn vocab_for(ids: usize) -> i64 {
        (ids as u64).next_multiple_of(8) as i64
    }

    pub fn validate(&self) -> Result<(), GptConfigError> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_inner", self.n_inner.unwrap_or(1)),
        ];
        for (field, value) in positive {
            if value <= 0 {
                return Err(GptConfigError::NotPositive { field, value });
            }
        }
        for ((field, value), (_, max)) in positive.iter().zip(SHAPE_LIMITS) {
            if *value > max {
                let (field, value) = (*field, *value);
                return Err(GptConfigError::TooLarge { field, value, max });
            }
        }
        let params = self.n_params();
        if let Some(have) = rlhf_datasets::files::memory_bytes().map(|b| b as f64) {
            let need = params as f64 * 4.0;
            if need > have {
                return Err(GptConfigError::TooBig {
                    params,
                    need_gb: need / 1e9,
                    have_gb: have / 1e9,
                });
            }
        }
        if self.n_embd % self.n_head != 0 {
            return Err(GptConfigError::HeadsDoNotDivide {
                n_embd: self.n_embd,
                n_head: self.n_head,
            });
        }
        for (field, value) in [
            ("embd_pdrop", self.embd_pdrop),
            ("attn_pdrop", self.attn_pdrop),
            ("resid_pdrop", self.resid_pdrop),
        ] {
            if !(0.0..1.0).contains(&value) {
                return Err(GptConfigError::BadDropout { field, value });
            }
        }
        if !self.layer_norm_epsilon.is_finite() || self.layer_norm_epsilon <= 0.0 {
            return Err(GptConfigError::BadEpsilon(self.layer_norm_epsilon));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> i64 {
        self.n_embd / self.n_head
    }

    pub fn inner_dim(&self) -> i64 {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// Trainable parameters of the trunk (the tied LM head adds none).
    pub fn n_params(&self) -> i64 {
        let (c, f) = (self.n_embd, self.inner_dim());
        let block = 2 * 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * f + f) + (f * c + c);
        self.vocab_size * c + self.n_positions * c + self.n_layer * block + 2 * c
    }
}

/// Which heads sit on the trunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Head {
    /// Next-token logits through the tied `wte` (the policy).
    Lm,
    /// One scalar per position, `score.{weight,bias}` (reward model, critic).
    Scalar,
}

/// What one forward call does beside the arithmetic: dropout (training)
/// and whether LoRA adapters apply.
#[derive(Debug, Clone, Copy)]
struct Mode {
    train: bool,
    adapters: bool,
}

impl Mode {
    /// Decoding: never dropout.
    fn decode(self) -> Self {
        Self {
            train: false,
            ..self
        }
    }
}

/// HF's Conv1D: a linear layer stored `(in, out)`, computing `x @ W + b`,
/// with a LoRA adapter once one is added.
#[derive(Debug)]
struct Conv1D {
    weight: Tensor,
    bias: Tensor,
    adapter: Option<Adapter>,
}

impl Conv1D {
    fn new(p: nn::Path, n_in: i64, n_out: i64, std: f64) -> Self {
        Self {
            weight: p.var(
                "weight",
                &[n_in, n_out],
                Init::Randn {
                    mean: 0.,
                    stdev: std,
                },
            ),
            bias: p.var("bias", &[n_out], Init::Const(0.)),
            adapter: None,
        }
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Tensor {
        let mut out_shape = x.size();
        let n_in = *out_shape.last().expect("input has a feature dim");
        *out_shape.last_mut().expect("input has a feature dim") = self.weight.size()[1];
        self.forward_2d(&x.reshape([-1, n_in]), mode)
            .view(out_shape.as_slice())
    }

    /// `(N, in) -> (N, out)`: one libtorch call without an adapter.
    fn forward_2d(&self, x: &Tensor, mode: Mode) -> Tensor {
        let y = self.bias.addmm(x, &self.weight);
        match &self.adapter {
            Some(a) if mode.adapters => y + a.delta(x, mode.train),
            _ => y,
        }
    }

    /// Adds an adapter under `p` (PEFT's names below the module's).
    fn add_adapter(&mut self, p: &nn::Path, config: &LoraConfig) {
        let (n_in, n_out) = self.weight.size2().expect("Conv1D weight is (in, out)");
        self.adapter = Some(Adapter::new(p, n_in, n_out, config));
    }
}

#[derive(Debug)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        Self {
            weight: p.var("weight", &[dim], Init::Const(1.)),
            bias: p.var("bias", &[dim], Init::Const(0.)),
            eps,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let dim = *x.size().last().expect("input has a feature dim");
        x.layer_norm([dim], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

/// How attention is masked in one forward call.
enum AttentionMask {
    /// Plain causal attention without past keys: SDPA's fused `is_causal`.
    Causal,
    /// One new query that may see every cached key.
    Unmasked,
    /// Boolean `(B, 1, T, S)`, true where a query may attend.
    Explicit(Tensor),
}

#[derive(Debug)]
struct CausalSelfAttention {
    c_attn: Conv1D,
    c_proj: Conv1D,
    n_head: i64,
    attn_pdrop: f64,
    resid_pdrop: f64,
}

impl CausalSelfAttention {
    fn new(p: nn::Path, cfg: &GptConfig) -> Self {
        let c = cfg.n_embd;
        Self {
            c_attn: Conv1D::new(&p / "c_attn", c, 3 * c, 0.02),
            // GPT-2 scales residual projections by 1/sqrt(2 * n_layer).
            c_proj: Conv1D::new(&p / "c_proj", c, c, residual_std(cfg)),
            n_head: cfg.n_head,
            attn_pdrop: cfg.attn_pdrop,
            resid_pdrop: cfg.resid_pdrop,
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        at: &Attend,
        cache: Option<&mut LayerCache>,
        mode: Mode,
    ) -> Tensor {
        let (b, t, c) = x.size3().expect("attention input is (B, T, C)");
        let hs = c / self.n_head;
        let qkv = self.c_attn.forward(x, mode).split(c, 2);
        let heads = |z: &Tensor| z.view([b, t, self.n_head, hs]).transpose(1, 2); // (B, nh, T, hs)
        let (q, mut k, mut v) = (heads(&qkv[0]), heads(&qkv[1]), heads(&qkv[2]));
        if let Some(layer) = cache {
            (k, v) = layer.append(&k, &v, at.past); // (B, nh, past + T, hs)
        }
        let attn_dropout = if mode.train { self.attn_pdrop } else { 0.0 };
        let y = attention(&q, &k, &v, &at.mask, attn_dropout); // (B, nh, T, hs)
        let y = y.transpose(1, 2).contiguous().view([b, t, c]);
        dropout(self.c_proj.forward(&y, mode), self.resid_pdrop, mode.train)
    }

    /// One new token per row against the cache, `x` `(B, C)`: the arithmetic
    /// of `forward` in about half the libtorch calls (a decode step makes
    /// them once per layer per token, and they cost more than the math on
    /// small models).
    fn decode(&self, x: &Tensor, at: &Attend, layer: &mut LayerCache, mode: Mode) -> Tensor {
        let (b, c) = x.size2().expect("decode input is (B, C)");
        let (nh, hs) = (self.n_head, c / self.n_head);
        let qkv = self.c_attn.forward_2d(x, mode); // (B, 3C): q | k | v, heads side by side
        let q = qkv.narrow(1, 0, c).view([b, nh, 1, hs]);
        let (k, v) = layer.append_one(&qkv.narrow(1, c, 2 * c).view([b, 2, nh, 1, hs]), at.past);
        let y = attention(&q, &k, &v, &at.mask, 0.0); // (B, nh, 1, hs): (B, C) in memory
        self.c_proj.forward_2d(&y.reshape([b, c]), mode)
    }
}

/// Scaled dot-product attention of `(B, nh, T, hs)` queries under `mask`.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask, dropout: f64) -> Tensor {
    let (m, causal) = match mask {
        AttentionMask::Causal => (None, true),
        AttentionMask::Unmasked => (None, false),
        AttentionMask::Explicit(m) => (Some(m), false),
    };
    Tensor::scaled_dot_product_attention(q, k, v, m, dropout, causal, None, false)
}

#[derive(Debug)]
struct Mlp {
    c_fc: Conv1D,
    c_proj: Conv1D,
    resid_pdrop: f64,
}

impl Mlp {
    fn new(p: nn::Path, cfg: &GptConfig) -> Self {
        let (c, f) = (cfg.n_embd, cfg.inner_dim());
        Self {
            c_fc: Conv1D::new(&p / "c_fc", c, f, 0.02),
            c_proj: Conv1D::new(&p / "c_proj", f, c, residual_std(cfg)),
            resid_pdrop: cfg.resid_pdrop,
        }
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Tensor {
        // GPT-2's "gelu_new" is the tanh approximation.
        let h = self.c_fc.forward(x, mode).gelu("tanh");
        dropout(self.c_proj.forward(&h, mode), self.resid_pdrop, mode.train)
    }

    /// `forward` of `(B, C)` rows, without dropout.
    fn decode(&self, x: &Tensor, mode: Mode) -> Tensor {
        let h = self.c_fc.forward_2d(x, mode).gelu("tanh");
        self.c_proj.forward_2d(&h, mode)
    }
}

#[derive(Debug)]
struct Block {
    ln_1: LayerNorm,
    attn: CausalSelfAttention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn new(p: nn::Path, cfg: &GptConfig) -> Self {
        let eps = cfg.layer_norm_epsilon;
        Self {
            ln_1: LayerNorm::new(&p / "ln_1", cfg.n_embd, eps),
            attn: CausalSelfAttention::new(&p / "attn", cfg),
            ln_2: LayerNorm::new(&p / "ln_2", cfg.n_embd, eps),
            mlp: Mlp::new(&p / "mlp", cfg),
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        at: &Attend,
        cache: Option<&mut LayerCache>,
        mode: Mode,
    ) -> Tensor {
        let x = x + self.attn.forward(&self.ln_1.forward(x), at, cache, mode);
        &x + self.mlp.forward(&self.ln_2.forward(&x), mode)
    }

    /// `forward` of one token per row, `x` `(B, C)`, without dropout.
    fn decode(&self, x: &Tensor, at: &Attend, layer: &mut LayerCache, mode: Mode) -> Tensor {
        let mode = mode.decode();
        let x = x + self.attn.decode(&self.ln_1.forward(x), at, layer, mode);
        &x + self.mlp.decode(&self.ln_2.forward(&x), mode)
    }

    /// The block's projections that can carry adapters, by PEFT's path
    /// below the block and module name.
    fn projections(&mut self) -> [(&'static str, &'static str, &mut Conv1D); 4] {
        [
            ("attn", "c_attn", &mut self.attn.c_attn),
            ("attn", "c_proj", &mut self.attn.c_proj),
            ("mlp", "c_fc", &mut self.mlp.c_fc),
            ("mlp", "c_proj", &mut self.mlp.c_proj),
        ]
    }
}

/// Dropout in training only; otherwise the tensor itself, without a
/// libtorch call (decoding makes hundreds of them per token).
fn dropout(x: Tensor, p: f64, train: bool) -> Tensor {
    if train && p > 0.0 {
        x.dropout(p, true)
    } else {
        x
    }
}

fn residual_std(cfg: &GptConfig) -> f64 {
    0.02 / ((2 * cfg.n_layer) as f64).sqrt()
}

/// `score`: one scalar per position, on either layout.
#[derive(Debug)]
pub(crate) struct ScalarHead {
    weight: Tensor, // (1, C), as HF's *ForSequenceClassification
    bias: Tensor,   // (1,); HF has none, it shifts rewards (normalisation)
}

impl ScalarHead {
    /// `score.{weight,bias}` under `p` for hidden states of width `c`.
    pub(crate) fn new(p: &nn::Path, c: i64) -> Self {
        let sp = p / "score";
        let weight = sp.var(
            "weight",
            &[1, c],
            Init::Randn {
                mean: 0.,
                stdev: 1.0 / ((c + 1) as f64).sqrt(),
            },
        );
        Self {
            weight,
            bias: sp.var("bias", &[1], Init::Const(0.)),
        }
    }

    /// `(B, T, C) -> (B, T)`.
    pub(crate) fn values(&self, hidden: &Tensor) -> Tensor {
        hidden
            .matmul(&self.weight.to_kind(hidden.kind()).tr())
            .squeeze_dim(-1)
            .to_kind(Kind::Float)
            + &self.bias
    }

    pub(crate) fn shift(&self, delta: f64) {
        tch::no_grad(|| {
            let _ = self.bias.shallow_clone().g_add_scalar_(delta);
        });
    }
}

/// The GPT: embeddings, blocks, final LayerNorm, tied LM head, optional
/// scalar head.
#[derive(Debug)]
pub struct Gpt {
    config: GptConfig,
    wte: Tensor, // (V, C)
    wpe: Tensor, // (P, C)
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    score: Option<ScalarHead>,
    /// Off: the LoRA adapters are skipped (the base model, PPO's
    /// reference).
    adapters_on: AtomicBool,
    /// Activation checkpointing of training forwards: what the blocks
    /// share (attention, mode) and the tokens' positions.
    checkpointing: Checkpointing<(Attend, Mode, Tensor)>,
}

impl Gpt {
    /// Creates the variables under `p` (randomly initialised as GPT-2 is).
    /// The LM head is always there (tied, no parameters); `Head::Scalar` adds
    /// `score`.
    pub fn new(p: &nn::Path, config: &GptConfig, head: Head) -> Self {
        let c = config.n_embd;
        let init = Init::Randn {
            mean: 0.,
            stdev: 0.02,
        };
        let wte = (p / "wte").var("weight", &[config.vocab_size, c], init);
        let wpe = (p / "wpe").var(
            "weight",
            &[config.n_positions, c],
            Init::Randn {
                mean: 0.,
                stdev: 0.01,
            },
        );
        let blocks = (0..config.n_layer)
            .map(|i| Block::new(p / "h" / i, config))
            .collect();
        let ln_f = LayerNorm::new(p / "ln_f", c, config.layer_norm_epsilon);
        let score = (head == Head::Scalar).then(|| ScalarHead::new(p, c));
        Self {
            config: config.clone(),
            wte,
            wpe,
            blocks,
            ln_f,
            score,
            adapters_on: true.into(),
            checkpointing: Default::default(),
        }
    }

    /// Training forwards keep only each block's input; the backward
    /// recomputes the blocks ([`crate::model::checkpointing`]), run by
    /// [`Gpt::backward_checkpointed`] after the loss's backward. Refused
    /// with dropout on: the recompute would draw other masks.
    pub fn set_gradient_checkpointing(&self, on: bool) -> Result<(), String> {
        let c = &self.config;
        if on
            && [c.embd_pdrop, c.attn_pdrop, c.resid_pdrop]
                .iter()
                .any(|&p| p > 0.0)
        {
            return Err("needs the model's dropout off (embd_pdrop, attn_pdrop, resid_pdrop 0): the recomputed blocks would draw other dropout masks".into());
        }
        let lora_dropout = self.blocks.iter().any(|b| {
            [&b.attn.c_attn, &b.attn.c_proj, &b.mlp.c_fc, &b.mlp.c_proj]
                .iter()
                .any(|p| p.adapter.as_ref().is_some_and(|a| a.dropout() > 0.0))
        });
        if on && lora_dropout {
            return Err(crate::model::llama::LORA_DROPOUT.into());
        }
        self.checkpointing.set(on);
        Ok(())
    }

    /// The blocks' part of the backward of checkpointed forwards.
    pub fn backward_checkpointed(&self) {
        self.checkpointing.backward(
            |i, x, (at, mode, _)| self.blocks[i].forward(x, at, None, *mode),
            |ids, (_, _, positions)| self.embed(ids, positions),
        );
    }

    /// Token plus position embeddings.
    fn embed(&self, ids: &Tensor, positions: &Tensor) -> Tensor {
        let tok = Tensor::embedding(&self.wte, ids, -1, false, false);
        tok + Tensor::embedding(&self.wpe, positions, -1, false, false)
    }

    /// Adds LoRA adapters to the `config.target_modules` projections of
    /// every block, their variables under `root` with our names
    /// (`h.0.attn.c_attn.lora_A.weight`; PEFT's add `transformer.`).
    pub fn add_lora(&mut self, root: &nn::Path, config: &LoraConfig) {
        for (i, block) in self.blocks.iter_mut().enumerate() {
            let h = root / "h" / i;
            for (part, name, proj) in block.projections() {
                if config.targets(name) {
                    proj.add_adapter(&(&h / part / name), config);
                }
            }
        }
    }

    /// Runs `f` with the adapters skipped: the base model.
    pub fn without_adapters<T>(&self, f: impl FnOnce() -> T) -> T {
        crate::model::lora::with_adapters_off(&self.adapters_on, f)
    }

    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    /// The dtype of the weights (the KV cache must match it).
    pub fn kind(&self) -> Kind {
        self.wte.kind()
    }

    pub fn head(&self) -> Head {
        if self.score.is_some() {
            Head::Scalar
        } else {
            Head::Lm
        }
    }

    /// Hidden states after `ln_f`, `(B, T, C)`.
    ///
    /// - `input_ids`: `(B, T)`, the new tokens (after any cached ones).
    /// - `attention_mask`: `(B, past + T)`, 1 for real tokens and 0 for
    ///   padding, needed for left padding; positions then count real tokens
    ///   only. `None` means no padding before or among the tokens (right
    ///   padding needs no mask under causal attention).
    /// - `cache`: keys and values of earlier tokens; this call appends.
    pub fn hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        train: bool,
    ) -> Tensor {
        let (b, t) = input_ids.size2().expect("input_ids is (B, T)");
        let past = cache.as_ref().map_or(0, |c| c.len());
        assert!(
            past + t <= self.config.n_positions,
            "sequence of {} tokens exceeds n_positions = {}",
            past + t,
            self.config.n_positions
        );
        let (positions, at) = positions_and_mask(attention_mask, past, t, input_ids.device());
        let mode = Mode {
            train,
            adapters: self.adapters_on.load(Ordering::SeqCst),
        };
        let tok = Tensor::embedding(&self.wte, input_ids, -1, false, false);
        let pos = Tensor::embedding(&self.wpe, &positions, -1, false, false);
        if let (Some(c), 1, false) = (cache.as_deref_mut(), t, train) {
            // One token per row after a prefill: the decode path, in (B, C).
            let mut x = (tok + pos).view([b, self.config.n_embd]);
            for (block, layer) in self.blocks.iter().zip(&mut c.layers) {
                x = block.decode(&x, &at, layer, mode);
            }
            c.len += 1;
            return self.ln_f.forward(&x).unsqueeze(1);
        }
        if cache.is_none() && self.checkpointing.applies() {
            let x = tch::no_grad(|| tok + pos);
            let (n, blocks) = (self.blocks.len(), &self.blocks);
            let pass = (at, mode, positions);
            let out = self
                .checkpointing
                .forward(x, input_ids, pass, n, |i, x, (at, mode, _)| {
                    blocks[i].forward(x, at, None, *mode)
                });
            return self.ln_f.forward(&out);
        }
        let mut x = dropout(tok + pos, self.config.embd_pdrop, train);
        for (i, block) in self.blocks.iter().enumerate() {
            let layer = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = block.forward(&x, &at, layer, mode);
        }
        if let Some(c) = cache {
            c.len += t;
        }
        self.ln_f.forward(&x)
    }

    /// Next-token logits from hidden states: `(.., C) -> (.., V)`.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        hidden.linear(&self.wte, None::<Tensor>)
    }

    /// Scalar head values from hidden states: `(B, T, C) -> (B, T)`.
    ///
    /// Panics if the model was built without a scalar head.
    pub fn values(&self, hidden: &Tensor) -> Tensor {
        let head = self.score.as_ref().expect("values() needs Head::Scalar");
        head.values(hidden)
    }

    /// `hidden` then `logits`, for the common case.
    pub fn forward_logits(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        self.logits(&self.hidden(input_ids, attention_mask, None, train))
    }

    /// Adds `delta` to the scalar head's bias (reward normalisation).
    pub fn shift_scalar_bias(&self, delta: f64) {
        let head = self.score.as_ref().expect("shift needs Head::Scalar");
        head.shift(delta);
    }
}

/// How the `t` new tokens after `past` cached ones attend: the mask, and
/// the cache length every layer appends at.
struct Attend {
    mask: AttentionMask,
    past: i64,
}

/// Position ids `(B or 1, t)` of the new tokens and how they attend. With
/// a mask (left padding), a token's position is the number of real tokens
/// before it; without one, positions count from `past`.
fn positions_and_mask(
    attention_mask: Option<&Tensor>,
    past: i64,
    t: i64,
    device: Device,
) -> (Tensor, Attend) {
    let (positions, mask) = match attention_mask {
        // One query (decoding): it sees every real key and itself.
        Some(m) if t == 1 => {
            let positions = (m.sum_dim_intlist(1, true, Kind::Int64) - 1).clamp_min(0);
            let valid = m.ne(0);
            let _ = valid.narrow(1, past, 1).fill_(1);
            (
                positions,
                AttentionMask::Explicit(valid.view([-1, 1, 1, past + 1])),
            )
        }
        Some(m) => (
            (m.cumsum(1, Kind::Int64) - 1)
                .clamp_min(0)
                .narrow(1, past, t),
            AttentionMask::Explicit(explicit_mask(m, past, t)),
        ),
        None => {
            let positions =
                Tensor::arange_start(past, past + t, (Kind::Int64, device)).unsqueeze(0);
            let mask = match (past, t) {
                (0, _) => AttentionMask::Causal,
                (_, 1) => AttentionMask::Unmasked,
                _ => AttentionMask::Explicit(explicit_mask(
                    &Tensor::ones([1, past + t], (Kind::Bool, device)),
                    past,
                    t,
                )),
            };
            (positions, mask)
        }
    };
    (positions, Attend { mask, past })
}

/// `(B, 1, T, S)` booleans: query `i` (at absolute position `past + i`) may see
/// key `j` if `j` is not after it and is a real token. A query always sees
/// itself, so padding rows never have zero keys (SDPA would return NaN).
fn explicit_mask(key_valid: &Tensor, past: i64, t: i64) -> Tensor {
    let device = key_valid.device();
    let s = past + t;
    let q_pos = Tensor::arange_start(past, s, (Kind::Int64, device)).unsqueeze(1); // (T, 1)
    let k_pos = Tensor::arange(s, (Kind::Int64, device)).unsqueeze(0); // (1, S)
    let causal = k_pos.le_tensor(&q_pos); // (T, S)
    let itself = k_pos.eq_tensor(&q_pos); // (T, S)
    let valid = key_valid.to_kind(Kind::Bool).unsqueeze(1).unsqueeze(1); // (B, 1, 1, S)
    valid.logical_or(&itself).logical_and(&causal) // (B, 1, T, S)
}

/// One layer's preallocated keys and values in one buffer,
/// `(B, 2, nh, capacity, hs)`: a decode step writes both in one copy. The
/// buffer is made at the first write, in the keys' kind (bfloat16 under
/// bf16 autocast, so that decoding never casts the cache).
#[derive(Debug)]
struct LayerCache {
    keys_values: Option<Tensor>,
    shape: [i64; 5],
}

impl LayerCache {
    fn buffer(&mut self, like: &Tensor) -> &Tensor {
        // As many rows as the first keys (a prefill of distinct prompts
        // may have fewer than the batch).
        let mut shape = self.shape;
        shape[0] = like.size()[0];
        self.keys_values
            .get_or_insert_with(|| Tensor::zeros(shape, (like.kind(), like.device())))
    }

    /// Writes the new keys/values `(B, nh, T, hs)` at `past..past+T` and
    /// returns views of everything so far. No reallocation: the buffer is
    /// sized once.
    fn append(&mut self, k: &Tensor, v: &Tensor, past: i64) -> (Tensor, Tensor) {
        let t = k.size()[2];
        let buffer = self.buffer(k);
        let (keys, values) = (buffer.select(1, 0), buffer.select(1, 1));
        keys.narrow(2, past, t).copy_(k);
        values.narrow(2, past, t).copy_(v);
        (keys.narrow(2, 0, past + t), values.narrow(2, 0, past + t))
    }

    /// `append` of one token whose keys and values come together,
    /// `(B, 2, nh, 1, hs)`.
    fn append_one(&mut self, kv: &Tensor, past: i64) -> (Tensor, Tensor) {
        let buffer = self.buffer(kv);
        buffer.narrow(3, past, 1).copy_(kv);
        let so_far = buffer.narrow(3, 0, past + 1);
        (so_far.select(1, 0), so_far.select(1, 1))
    }
}

/// Keys and values of the tokens seen so far, for incremental decoding.
/// Use under `tch::no_grad`.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: i64,
    capacity: i64,
}

impl KvCache {
    /// Room for `capacity` tokens of `batch` sequences (allocated with
    /// the first tokens, on their device).
    pub fn new(config: &GptConfig, batch: i64, capacity: i64) -> Self {
        let shape = [batch, 2, config.n_head, capacity, config.head_dim()];
        let layers = (0..config.n_layer)
            .map(|_| LayerCache {
                keys_values: None,
                shape,
            })
            .collect();
        Self {
            layers,
            len: 0,
            capacity,
        }
    }

    /// Tokens cached so far.
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
        for layer in &mut self.layers {
            layer.shape[0] = rows.size()[0];
            if let Some(buffer) = &mut layer.keys_values {
                *buffer = buffer.index_select(0, rows);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(head: Head) -> (nn::VarStore, Gpt) {
        tch::manual_seed(7);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = GptConfig {
            vocab_size: 50,
            n_positions: 32,
            n_embd: 32,
            n_layer: 2,
            n_head: 4,
            ..GptConfig::default()
        };
        let gpt = Gpt::new(&vs.root(), &cfg, head);
        (vs, gpt)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn parameter_names_and_shapes_are_hf_gpt2() {
        let _rng = crate::rng_lock();
        let (vs, gpt) = tiny(Head::Scalar);
        let vars = vs.variables();
        let shape = |k: &str| vars.get(k).unwrap_or_else(|| panic!("missing {k}")).size();
        assert_eq!(shape("wte.weight"), vec![50, 32]);
        assert_eq!(shape("wpe.weight"), vec![32, 32]);
        assert_eq!(shape("h.1.attn.c_attn.weight"), vec![32, 96]);
        assert_eq!(shape("h.1.attn.c_proj.weight"), vec![32, 32]);
        assert_eq!(shape("h.0.mlp.c_fc.weight"), vec![32, 128]);
        assert_eq!(shape("h.0.mlp.c_proj.weight"), vec![128, 32]);
        assert_eq!(shape("h.0.ln_1.bias"), vec![32]);
        assert_eq!(shape("ln_f.weight"), vec![32]);
        assert_eq!(shape("score.weight"), vec![1, 32]);
        let n: i64 = vars
            .iter()
            .filter(|(k, _)| !k.starts_with("score"))
            .map(|(_, v)| v.numel() as i64)
            .sum();
        assert_eq!(n, gpt.config().n_params());
    }

    #[test]
    fn kv_cache_decoding_matches_full_forward() {
        let _rng = crate::rng_lock();
        let (_vs, gpt) = tiny(Head::Lm);
        let ids = Tensor::randint(50, [3, 12], (Kind::Int64, Device::Cpu));
        tch::no_grad(|| {
            let full = gpt.forward_logits(&ids, None, false); // (3, 12, V)
            let mut cache = KvCache::new(gpt.config(), 3, 12);
            // A 5-token prefill, then one token at a time.
            let pre = gpt.logits(&gpt.hidden(&ids.narrow(1, 0, 5), None, Some(&mut cache), false));
            assert!(max_abs_diff(&pre, &full.narrow(1, 0, 5)) < 1e-5);
            for i in 5..12 {
                let step =
                    gpt.logits(&gpt.hidden(&ids.narrow(1, i, 1), None, Some(&mut cache), false));
                let d = max_abs_diff(&step, &full.narrow(1, i, 1));
                assert!(d < 1e-5, "position {i}: max abs diff {d}");
            }
            assert_eq!(cache.len(), 12);
        });
    }

    #[test]
    fn left_padding_with_mask_matches_unpadded_sequences() {
        let _rng = crate::rng_lock();
        let (_vs, gpt) = tiny(Head::Lm);
        tch::no_grad(|| {
            let a = Tensor::from_slice(&[5i64, 6, 7, 8, 9, 10]).view([1, 6]);
            let b = Tensor::from_slice(&[11i64, 12, 13]).view([1, 3]);
            let pad = 0i64;
            let batch =
                Tensor::from_slice(&[5i64, 6, 7, 8, 9, 10, pad, pad, pad, 11, 12, 13]).view([2, 6]);
            let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1]).view([2, 6]);
            let padded = gpt.forward_logits(&batch, Some(&mask), false);
            let la = gpt.forward_logits(&a, None, false);
            let lb = gpt.forward_logits(&b, None, false);
            assert!(max_abs_diff(&padded.narrow(0, 0, 1), &la) < 1e-5);
            assert!(max_abs_diff(&padded.narrow(0, 1, 1).narrow(1, 3, 3), &lb) < 1e-5);
            // Incremental decoding on the padded batch, mask growing by one column a step.
            let mut cache = KvCache::new(gpt.config(), 2, 8);
            let _ = gpt.hidden(&batch, Some(&mask), Some(&mut cache), false);
            let next = Tensor::from_slice(&[20i64, 21]).view([2, 1]);
            let mask2 = Tensor::cat(
                &[&mask, &Tensor::ones([2, 1], (Kind::Int64, Device::Cpu))],
                1,
            );
            let step = gpt.logits(&gpt.hidden(&next, Some(&mask2), Some(&mut cache), false));
            let full_b = gpt.forward_logits(
                &Tensor::from_slice(&[11i64, 12, 13, 21]).view([1, 4]),
                None,
                false,
            );
            assert!(max_abs_diff(&step.narrow(0, 1, 1), &full_b.narrow(1, 3, 1)) < 1e-5);
        });
    }

    #[test]
    fn scalar_head_gives_one_value_per_position_and_bias_shifts() {
        let _rng = crate::rng_lock();
        let (_vs, gpt) = tiny(Head::Scalar);
        let ids = Tensor::randint(50, [2, 7], (Kind::Int64, Device::Cpu));
        let h = gpt.hidden(&ids, None, None, false);
        let v = gpt.values(&h);
        assert_eq!(v.size(), vec![2, 7]);
        gpt.shift_scalar_bias(1.5);
        let shifted = gpt.values(&h);
        assert!(max_abs_diff(&(shifted - 1.5), &v) < 1e-6);
    }

    #[test]
    fn config_validation_names_the_field() {
        let _rng = crate::rng_lock();
        let bad = GptConfig {
            n_head: 3,
            ..GptConfig::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("n_head"));
        let bad = GptConfig {
            n_layer: 0,
            ..GptConfig::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("n_layer"));
        let bad = GptConfig {
            attn_pdrop: 1.0,
            ..GptConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("attn_pdrop"));
        GptConfig::default().validate().unwrap();
    }
}
