//! LoRA (Hu et al., 2021): a frozen weight `W` plus a trained low-rank
//! update `scale * B @ A`, `A` `(r, in)`, `B` `(out, r)`, `scale = alpha /
//! r`. `B` starts at zero, so an adapted model starts equal to its base.
//!
//! Adapters are saved in PEFT's format (`adapter_config.json` and
//! `adapter_model.safetensors`, keys `base_model.model.<module>.lora_A.weight`),
//! so `PeftModel.from_pretrained` loads them on the HF model. GPT-2's
//! Conv1D projections store `W` as `(in, out)`: their update is merged
//! transposed (PEFT's `fan_in_fan_out: true`), `A` and `B` are as above.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tch::{nn, Kind, Tensor};

use crate::check::SettingError;

/// `lora:` in a stage's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// Rank of the update.
    pub r: i64,
    /// The update is scaled by `alpha / r`.
    pub alpha: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f64,
    /// Which projections get adapters, by HF module name: on the Llama
    /// layout `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`,
    /// `up_proj`, `down_proj`; on GPT-2 `c_attn`, `c_proj` (attention's and
    /// the MLP's, as PEFT matches names), `c_fc`. Unset: every one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_modules: Option<Vec<String>>,
}

impl Default for LoraConfig {
    /// Every projection of attention and MLP at rank 8, as QLoRA advises
    /// (adapting all linear layers matches full fine-tuning best).
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: None,
        }
    }
}

/// The projections of a Llama-layout layer that can carry adapters.
pub const LLAMA_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The projections of a GPT-2 layer that can carry adapters (`c_proj` is
/// both attention's output and the MLP's down projection).
pub const GPT2_MODULES: [&str; 3] = ["c_attn", "c_proj", "c_fc"];

/// PEFT's files and key prefix.
pub const ADAPTER_DIR: &str = "adapter";
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const PEFT_PREFIX: &str = "base_model.model.";

/// The largest `alpha`: far above any used (16 to 512), low enough that
/// `alpha / r * B @ A` stays finite in float32.
const MAX_ALPHA: f64 = 1e6;

/// PEFT settings that change what an adapter computes, with the values
/// that leave it plain LoRA (what rlhf computes); any other value is
/// refused by name rather than merged into other weights.
fn refuse_unsupported_peft(v: &Value) -> Result<(), String> {
    let plain = |key: &str, value: &Value| -> bool {
        match (key, value) {
            (_, Value::Null) => true,
            (_, Value::Object(o)) if o.is_empty() => true,
            (_, Value::Array(a)) if a.is_empty() => true,
            (_, Value::Bool(false)) => true,
            ("layers_pattern", Value::String(s)) => s.is_empty(),
            ("bias", Value::String(s)) => s == "none",
            ("init_lora_weights", Value::Bool(true)) => true,
            ("init_lora_weights", Value::String(s)) => s == "gaussian",
            ("modules_to_save", Value::Array(a)) => a.iter().all(|m| m == "score"),
            _ => false,
        }
    };
    const KEYS: [&str; 21] = [
        "alpha_pattern",
        "rank_pattern",
        "layers_to_transform",
        "layers_pattern",
        "exclude_modules",
        "target_parameters",
        "layer_replication",
        "trainable_token_indices",
        "bias",
        "lora_bias",
        "modules_to_save",
        "init_lora_weights",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "megatron_config",
        "use_qalora",
        "use_bdlora",
        "alora_invocation_tokens",
        "arrow_config",
    ];
    for key in KEYS {
        if let Some(value) = v.get(key) {
            if !plain(key, value) {
                return Err(format!(
                    "`{key}: {value}` changes what the adapter computes, and rlhf computes plain LoRA (one rank and scale, every layer, no bias); it is refused rather than merged wrongly"
                ));
            }
        }
    }
    Ok(())
}

impl LoraConfig {
    pub fn validate(&self, prefix: &str) -> Result<(), SettingError> {
        let field = |f: &str| format!("{prefix}.{f}");
        if !(1..=4096).contains(&self.r) {
            return Err(SettingError::new(
                field("r"),
                format!("must be in [1, 4096], got {}", self.r),
            ));
        }
        if !(self.alpha > 0.0 && self.alpha <= MAX_ALPHA) {
            return Err(SettingError::new(
                field("alpha"),
                format!(
                    "must be a positive number at most {MAX_ALPHA:e}, got {}",
                    crate::check::shown(self.alpha)
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(SettingError::new(
                field("dropout"),
                format!("must lie in [0, 1), got {}", self.dropout),
            ));
        }
        let Some(modules) = &self.target_modules else {
            return Ok(());
        };
        if modules.is_empty() {
            return Err(SettingError::new(
                field("target_modules"),
                format!("is empty; name some of {LLAMA_MODULES:?} (Llama layout) or {GPT2_MODULES:?} (GPT-2), or leave it out for every one"),
            ));
        }
        let known =
            |m: &String| LLAMA_MODULES.contains(&m.as_str()) || GPT2_MODULES.contains(&m.as_str());
        if let Some(m) = modules.iter().find(|m| !known(m)) {
            return Err(SettingError::new(
                field("target_modules"),
                format!("\"{m}\" is no projection rlhf adapts; choose from {LLAMA_MODULES:?} (Llama layout) or {GPT2_MODULES:?} (GPT-2)"),
            ));
        }
        Ok(())
    }

    /// This config with its modules named for a model whose projections
    /// are `layout_modules` (`layout` names it in errors): every one when
    /// unset; an error naming a module the layout lacks.
    pub fn for_layout(&self, layout: &str, layout_modules: &[&str]) -> Result<Self, String> {
        let modules = match &self.target_modules {
            None => layout_modules.iter().map(|m| m.to_string()).collect(),
            Some(named) => {
                if let Some(m) = named.iter().find(|m| !layout_modules.contains(&m.as_str())) {
                    return Err(format!(
                        "lora.target_modules: \"{m}\" is not a projection of a {layout}-layout model; choose from {layout_modules:?}"
                    ));
                }
                named.clone()
            }
        };
        Ok(Self {
            target_modules: Some(modules),
            ..self.clone()
        })
    }

    /// Whether the projection `name` gets an adapter.
    pub fn targets(&self, name: &str) -> bool {
        self.target_modules
            .as_ref()
            .is_none_or(|m| m.iter().any(|m| m == name))
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// PEFT's `adapter_config.json`; `base` is the base model's folder as
    /// seen from the adapter's folder; `fan_in_fan_out` for GPT-2's
    /// Conv1D weights.
    pub fn to_peft(&self, base: &str, fan_in_fan_out: bool) -> Value {
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules,
            "bias": "none",
            "fan_in_fan_out": fan_in_fan_out,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": null,
        })
    }

    /// Reads PEFT's `adapter_config.json` (a LoRA one, plain scaling).
    pub fn from_peft(v: &Value) -> Result<Self, String> {
        if v["peft_type"].as_str() != Some("LORA") {
            return Err(format!(
                "peft_type is {}; only LORA adapters load",
                v["peft_type"]
            ));
        }
        // `fan_in_fan_out` follows the layer (PEFT sets it true for GPT-2's
        // Conv1D and false for Linear whatever the file says): the layout
        // decides it here too.
        for flag in ["use_rslora", "use_dora"] {
            if v[flag].as_bool() == Some(true) {
                return Err(format!("`{flag}: true` is not supported"));
            }
        }
        refuse_unsupported_peft(v)?;
        let targets = match &v["target_modules"] {
            Value::Array(a) => a
                .iter()
                .map(|m| m.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>(),
            Value::String(s) => Some(vec![s.clone()]),
            _ => None,
        }
        .ok_or("`target_modules` must be a list of module names")?;
        let config = Self {
            r: v["r"].as_i64().ok_or("`r` must be an integer")?,
            alpha: v["lora_alpha"]
                .as_f64()
                .ok_or("`lora_alpha` must be a number")?,
            dropout: v["lora_dropout"].as_f64().unwrap_or(0.0),
            target_modules: Some(targets),
        };
        config.validate("adapter").map_err(|e| e.to_string())?;
        Ok(config)
    }
}

/// One projection's adapter.
#[derive(Debug)]
pub struct Adapter {
    /// `(r, in)`.
    pub a: Tensor,
    /// `(out, r)`.
    pub b: Tensor,
    scale: f64,
    dropout: f64,
}

impl Adapter {
    /// `lora_A.weight` and `lora_B.weight` under `p` for a projection of
    /// `input -> output`, initialised as PEFT does (A: Kaiming-uniform with
    /// a = sqrt(5), that is U(+-1/sqrt(in)); B: zeros).
    pub fn new(p: &nn::Path, input: i64, output: i64, config: &LoraConfig) -> Self {
        let bound = 1.0 / (input as f64).sqrt();
        let a = (p / "lora_A").var(
            "weight",
            &[config.r, input],
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        let b = (p / "lora_B").zeros("weight", &[output, config.r]);
        Self {
            a,
            b,
            scale: config.scale(),
            dropout: config.dropout,
        }
    }

    /// `weight` `(out, in)` with this update merged, then in `kind`: one
    /// matmul per projection while sampling instead of three. Computed in
    /// float64, which autocast leaves alone (it would round an fp32
    /// `B @ A` to bfloat16).
    pub fn merged(&self, weight: &Tensor, kind: Kind) -> Tensor {
        let f64 = |t: &Tensor| t.to_kind(Kind::Double);
        let update = f64(&self.b).matmul(&f64(&self.a)) * self.scale;
        (f64(weight) + update).to_kind(kind)
    }

    /// Dropout on the adapter's input while training.
    pub fn dropout(&self) -> f64 {
        self.dropout
    }

    /// The update to add to the projection's output for input `x`.
    pub fn delta(&self, x: &Tensor, train: bool) -> Tensor {
        let x = match (train, self.dropout) {
            (true, p) if p > 0.0 => x.dropout(p, true),
            _ => x.shallow_clone(),
        };
        let kind = x.kind();
        x.matmul(&self.a.to_kind(kind).tr())
            .matmul(&self.b.to_kind(kind).tr())
            * self.scale
    }
}

/// `W + scale * B @ A` for a weight stored `(out, in)`, or its transpose
/// for one stored `(in, out)` (`fan_in_fan_out`, GPT-2's Conv1D), computed
/// in fp32 and returned in the weight's kind.
pub fn merge(weight: &Tensor, a: &Tensor, b: &Tensor, scale: f64, fan_in_fan_out: bool) -> Tensor {
    let mut update = b.to_kind(Kind::Float).matmul(&a.to_kind(Kind::Float));
    if fan_in_fan_out {
        update = update.tr();
    }
    (weight.to_kind(Kind::Float) + update * scale).to_kind(weight.kind())
}

/// Runs `f` with the adapters switched off (`on` false), and switches them
/// back as they were afterwards, even if `f` panics.
pub(crate) fn with_adapters_off<T>(on: &AtomicBool, f: impl FnOnce() -> T) -> T {
    struct Restore<'a>(&'a AtomicBool, bool);
    impl Drop for Restore<'_> {
        fn drop(&mut self) {
            self.0.store(self.1, Ordering::SeqCst);
        }
    }
    let _restore = Restore(on, on.swap(false, Ordering::SeqCst));
    f()
}

/// The base folder an adapter folder names, resolved from `adapter_dir`.
pub fn base_of(adapter_dir: &Path, config: &Value) -> Result<PathBuf, String> {
    let base = config["base_model_name_or_path"]
        .as_str()
        .ok_or("`base_model_name_or_path` must name the base model's folder")?;
    Ok(adapter_dir.join(base))
}

/// `to` as seen from the folder `from` (both absolute): `../../sft/checkpoint`.
pub fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from.components().collect();
    let to_parts: Vec<_> = to.components().collect();
    let common = from
        .iter()
        .zip(&to_parts)
        .take_while(|(a, b)| a == b)
        .count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for part in &to_parts[common..] {
        out.push(part);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_climb_to_the_common_folder() {
        let rel = relative_path(
            Path::new("/r/run/ppo/checkpoint/adapter"),
            Path::new("/r/run/sft/checkpoint"),
        );
        assert_eq!(rel, PathBuf::from("../../../sft/checkpoint"));
        assert_eq!(
            Path::new("/r/run/ppo/checkpoint/adapter").join(&rel),
            PathBuf::from("/r/run/ppo/checkpoint/adapter/../../../sft/checkpoint")
        );
    }

    #[test]
    fn conv1d_weights_merge_the_transposed_update() {
        let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).view([3, 2]); // (in 3, out 2)
        let a = Tensor::from_slice(&[1.0f32, 0.0, 2.0]).view([1, 3]); // (r, in)
        let b = Tensor::from_slice(&[1.0f32, -1.0]).view([2, 1]); // (out, r)
        let merged = merge(&w, &a, &b, 0.5, true);
        // W[i][o] + 0.5 * B[o] * A[i].
        let want = [1.5f32, 1.5, 3.0, 4.0, 6.0, 5.0];
        assert_eq!(Vec::<f32>::try_from(merged.view([-1])).unwrap(), want);
    }

    #[test]
    fn peft_config_round_trips_and_names_bad_fields() {
        let c = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.05,
            target_modules: Some(vec!["q_proj".into(), "v_proj".into()]),
        };
        assert_eq!(LoraConfig::from_peft(&c.to_peft("..", false)).unwrap(), c);
        let mut v = c.to_peft("..", false);
        v["use_dora"] = json!(true);
        assert!(LoraConfig::from_peft(&v).unwrap_err().contains("use_dora"));
        let bad = LoraConfig {
            target_modules: Some(vec!["attn".into()]),
            ..c.clone()
        };
        let e = bad.validate("lora").unwrap_err().to_string();
        assert!(
            e.contains("lora.target_modules") && e.contains("\"attn\""),
            "{e}"
        );
        // Modules are checked against the model's layout once it is known.
        let gpt2 = LoraConfig {
            target_modules: Some(vec!["c_attn".into()]),
            ..c.clone()
        };
        assert!(gpt2.validate("lora").is_ok());
        let e = gpt2.for_layout("Llama", &LLAMA_MODULES).unwrap_err();
        assert!(e.contains("c_attn") && e.contains("Llama"), "{e}");
        let all = LoraConfig::default()
            .for_layout("GPT-2", &GPT2_MODULES)
            .unwrap();
        assert_eq!(all.target_modules.unwrap(), GPT2_MODULES);
    }
}
