//! Model folders: `config.json` (HF's, plus an `rlhf` section),
//! `model.safetensors` (HF key names) and `tokenizer.json`.
//!
//! The same format is an HF folder of either layout: a `GPT2LMHeadModel`,
//! `LlamaForCausalLM`, `Qwen2ForCausalLM` or `MistralForCausalLM` saved by
//! `transformers` loads here (sharded weights too), and a folder written
//! here opens in `transformers`. Folders are written whole to a temporary sibling and
//! renamed, so a reader never sees half a checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rlhf_datasets::atomic::{self, AtomicWriteError};
use rlhf_datasets::tokenizer::{Tokenizer, TokenizerError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::model::gpt::{GptConfig, GptConfigError, Head};
use crate::model::llama::LlamaConfig;
use crate::model::network::{ModelConfig, Network};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Sharded weights: which file holds each tensor.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// HF nests the trunk under this prefix in `GPT2LMHeadModel` files.
pub(crate) const HF_TRUNK_PREFIX: &str = "transformer.";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a model folder (no {CONFIG_FILE}); expected a folder written by rlhf or an HF GPT-2, Llama, Qwen2 or Mistral folder")]
    NotAModel { path: PathBuf },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Shapes {
        path: PathBuf,
        #[source]
        source: GptConfigError,
    },
    #[error("{path}: cannot read the weights ({source}); the file may be truncated or corrupt")]
    Weights {
        path: PathBuf,
        #[source]
        source: tch::TchError,
    },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, the config implies {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("{path}: the tokenizer has {tokenizer} ids but the model's vocab_size is {model}")]
    VocabTooSmall {
        path: PathBuf,
        tokenizer: usize,
        model: i64,
    },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Write(#[from] AtomicWriteError),
    #[error(transparent)]
    Corrupt(#[from] rlhf_datasets::checksum::ChecksumError),
    #[error("cannot write weights to {path}: {source}")]
    WriteWeights {
        path: PathBuf,
        #[source]
        source: tch::TchError,
    },
}

/// What rlhf keeps in `config.json` beside HF's keys (`"rlhf": {...}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    /// Which head the weights carry; absent in plain HF folders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<Head>,
    /// Stage-specific entries (reward normalisation, provenance, ...).
    #[serde(default, flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// A model folder's config, head and weight tensors, checked and read.
struct Folder {
    config: ModelConfig,
    /// With the head that will be built.
    meta: ModelMeta,
    tensors: BTreeMap<String, Tensor>,
    weights_path: PathBuf,
}

impl Folder {
    fn read(dir: &Path, head: HeadChoice) -> Result<Self, CheckpointError> {
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.exists() {
            return Err(CheckpointError::NotAModel {
                path: dir.to_owned(),
            });
        }
        rlhf_datasets::checksum::verify(dir)?;
        let (config, meta) = read_config(&config_path)?;
        let weights_path = dir.join(WEIGHTS_FILE);
        let tensors = match dir.join(WEIGHTS_INDEX_FILE) {
            index if !weights_path.exists() && index.exists() => read_shards(&index)?,
            _ => read_weights(&weights_path)?,
        };
        let saved_head = meta
            .head
            .unwrap_or(if tensors.contains_key("score.weight") {
                Head::Scalar
            } else {
                Head::Lm
            });
        let head = match head {
            HeadChoice::AsSaved => saved_head,
            HeadChoice::Want(h) => h,
        };
        let meta = ModelMeta {
            head: Some(head),
            ..meta
        };
        Ok(Self {
            config,
            meta,
            tensors,
            weights_path,
        })
    }
}

/// A network with its variables and tokenizer: what a model folder holds.
#[derive(Debug)]
pub struct Model {
    pub vs: VarStore,
    pub net: Network,
    pub tokenizer: Tokenizer,
    pub meta: ModelMeta,
    /// LoRA adapters on a frozen base, once added ([`Model::add_lora`]).
    pub lora: Option<crate::model::adapters::LoraState>,
}

/// Which head to build when loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadChoice {
    /// Whatever the folder has.
    AsSaved,
    /// This head; a scalar head missing from the folder is freshly
    /// initialised (a reward model starting from an SFT policy).
    Want(Head),
}

impl Model {
    /// A randomly initialised model (seed tch first for reproducibility).
    pub fn init(
        config: &ModelConfig,
        head: Head,
        tokenizer: Tokenizer,
        device: Device,
    ) -> Result<Self, CheckpointError> {
        config
            .validate()
            .map_err(|message| CheckpointError::Invalid {
                path: PathBuf::from("<new model>"),
                message,
            })?;
        let meta = ModelMeta {
            head: Some(head),
            ..ModelMeta::default()
        };
        Self::assemble(
            config,
            tokenizer,
            meta,
            device,
            Path::new("<new model>"),
            None,
        )
    }

    /// Loads a model folder onto `device`.
    pub fn load(dir: &Path, head: HeadChoice, device: Device) -> Result<Self, CheckpointError> {
        let folder = Folder::read(dir, head)?;
        let tokenizer = Tokenizer::from_model_dir(dir)?;
        let weights = Some((&folder.tensors, folder.weights_path.as_path()));
        Self::assemble(&folder.config, tokenizer, folder.meta, device, dir, weights)
    }

    /// The network of a model folder without its tokenizer, for work on
    /// token ids (`rlhf score` with `ids`): a folder with no tokenizer loads.
    pub fn load_network(
        dir: &Path,
        head: HeadChoice,
        device: Device,
    ) -> Result<(VarStore, Network), CheckpointError> {
        let folder = Folder::read(dir, head)?;
        let vs = VarStore::new(device);
        let net = folder
            .config
            .build(&vs.root(), folder.meta.head.unwrap_or(Head::Lm));
        copy_into(&vs, &folder.tensors, &folder.weights_path)?;
        Ok((vs, net))
    }

    /// The model of `config` with `meta`'s head, its weights copied from
    /// `weights` when given; `path` names it in errors.
    fn assemble(
        config: &ModelConfig,
        tokenizer: Tokenizer,
        meta: ModelMeta,
        device: Device,
        path: &Path,
        weights: Option<(&BTreeMap<String, Tensor>, &Path)>,
    ) -> Result<Self, CheckpointError> {
        if tokenizer.vocab_size() as i64 > config.vocab_size() {
            return Err(CheckpointError::VocabTooSmall {
                path: path.to_owned(),
                tokenizer: tokenizer.vocab_size(),
                model: config.vocab_size(),
            });
        }
        let vs = VarStore::new(device);
        let net = config.build(&vs.root(), meta.head.unwrap_or(Head::Lm));
        if let Some((tensors, file)) = weights {
            copy_into(&vs, tensors, file)?;
        }
        Ok(Self {
            vs,
            net,
            tokenizer,
            meta,
            lora: None,
        })
    }

    /// Writes the folder atomically; `extra` may add files (optimiser state,
    /// training state) into the same temporary folder before the rename.
    pub fn save_with<E>(
        &self,
        dir: &Path,
        extra: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<(), E>
    where
        E: From<CheckpointError> + From<AtomicWriteError>,
    {
        atomic::write_dir(dir, |tmp| {
            self.write_files(tmp)?;
            self.write_adapter(tmp)?;
            extra(tmp)?;
            // Last, over every file: loads check it (truncation, bit rot).
            rlhf_datasets::checksum::write(tmp).map_err(CheckpointError::from)?;
            Ok(())
        })
    }

    pub fn save(&self, dir: &Path) -> Result<(), CheckpointError> {
        self.save_with(dir, |_| Ok::<(), CheckpointError>(()))
    }

    /// The merged model alone, without `adapter/`: a plain folder
    /// (`rlhf merge`).
    pub fn save_merged(&self, dir: &Path) -> Result<(), CheckpointError> {
        atomic::write_dir(dir, |tmp| -> Result<(), CheckpointError> {
            self.write_files(tmp)?;
            rlhf_datasets::checksum::write(tmp)?;
            Ok(())
        })
    }

    fn write_files(&self, dir: &Path) -> Result<(), CheckpointError> {
        let config = hf_config_json(
            &self.net.config(),
            self.net.head(),
            &self.tokenizer,
            &self.meta,
        );
        let gpt = matches!(self.net, Network::Gpt(_));
        let text = serde_json::to_string_pretty(&config).expect("config serialises");
        atomic::write_file(&dir.join(CONFIG_FILE), text.as_bytes())?;
        let weights_path = dir.join(WEIGHTS_FILE);
        let named: Vec<(String, Tensor)> = self
            .tensors_to_save()
            .into_iter()
            .map(|(name, t)| (if gpt { hf_name(&name) } else { name }, t))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect();
        // A merge with a huge scale (or a broken adapter) would write inf.
        // Only merged weights are checked: a model's own are the training
        // loop's, whose non-finite guard stops before any is saved.
        let merged = self.lora.is_some();
        if let Some((name, _)) = named.iter().find(|(_, t)| {
            merged && t.is_floating_point() && !bool::try_from(t.isfinite().all()).unwrap_or(false)
        }) {
            return Err(CheckpointError::Invalid {
                path: weights_path,
                message: format!(
                    "{name}, merged with its adapter, would hold non-finite values (inf or NaN); nothing was written"
                ),
            });
        }
        Tensor::write_safetensors(&named, &weights_path).map_err(|source| {
            CheckpointError::WriteWeights {
                path: weights_path.clone(),
                source,
            }
        })?;
        self.tokenizer.save(&dir.join(TOKENIZER_FILE))?;
        self.tokenizer.save_chat_files(dir)?;
        Ok(())
    }
}

/// Our variable name -> HF key: the trunk goes under `transformer.`.
pub(crate) fn hf_name(name: &str) -> String {
    if name.starts_with("score.") {
        name.to_owned()
    } else {
        format!("{HF_TRUNK_PREFIX}{name}")
    }
}

fn read_weights(path: &Path) -> Result<BTreeMap<String, Tensor>, CheckpointError> {
    if !path.exists() {
        return Err(CheckpointError::Io {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "weights file not found"),
        });
    }
    // A file larger than memory (or a link to a device) would be read until
    // the process is killed; refuse it by name first.
    let memory = rlhf_datasets::files::memory_bytes().unwrap_or(u64::MAX);
    rlhf_datasets::files::bounded_size(path, memory, "this machine's memory").map_err(
        |message| CheckpointError::Invalid {
            path: path.to_owned(),
            message,
        },
    )?;
    let tensors = Tensor::read_safetensors(path).map_err(|source| CheckpointError::Weights {
        path: path.to_owned(),
        source,
    })?;
    Ok(tensors
        .into_iter()
        .map(|(name, t)| {
            let name = name
                .strip_prefix(HF_TRUNK_PREFIX)
                .map(str::to_owned)
                .unwrap_or(name);
            (name, t)
        })
        .collect())
}

/// Sharded weights: every file the index names, read and merged. A shard
/// must lie in the folder.
fn read_shards(index: &Path) -> Result<BTreeMap<String, Tensor>, CheckpointError> {
    let bad = |message: String| CheckpointError::Invalid {
        path: index.to_owned(),
        message,
    };
    rlhf_datasets::files::bounded_size(index, MAX_CONFIG_BYTES * 64, "an index's limit")
        .map_err(bad)?;
    let text = std::fs::read_to_string(index).map_err(|source| CheckpointError::Io {
        path: index.to_owned(),
        source,
    })?;
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let map = v["weight_map"]
        .as_object()
        .ok_or_else(|| bad("expected a `weight_map` object of tensor -> file".into()))?;
    let mut files = std::collections::BTreeSet::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("`weight_map.{name}` must be a file name")))?;
        if Path::new(file).file_name() != Some(std::ffi::OsStr::new(file)) {
            return Err(bad(format!(
                "`weight_map.{name}`: \"{file}\" must be a file in the same folder"
            )));
        }
        files.insert(file.to_owned());
    }
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut tensors = BTreeMap::new();
    for file in files {
        tensors.extend(read_weights(&dir.join(file))?);
    }
    for name in map.keys() {
        if !tensors.contains_key(name.strip_prefix(HF_TRUNK_PREFIX).unwrap_or(name)) {
            return Err(bad(format!("`{name}` is in no shard")));
        }
    }
    Ok(tensors)
}

/// Copies file tensors into the model's variables, checking every shape.
/// Converts dtype (an fp16 HF file loads into fp32 variables).
fn copy_into(
    vs: &VarStore,
    tensors: &BTreeMap<String, Tensor>,
    path: &Path,
) -> Result<(), CheckpointError> {
    let vars = vs.variables();
    for (name, var) in &vars {
        let Some(src) = tensors.get(name) else {
            if name.starts_with("score.") {
                tracing::info!(
                    "{}: no scalar head saved; `{name}` starts freshly initialised",
                    path.display()
                );
                continue;
            }
            return Err(CheckpointError::MissingTensor {
                path: path.to_owned(),
                name: name.clone(),
            });
        };
        if src.size() != var.size() {
            return Err(CheckpointError::ShapeMismatch {
                path: path.to_owned(),
                name: name.clone(),
                expected: var.size(),
                found: src.size(),
            });
        }
        tch::no_grad(|| var.shallow_clone().copy_(src));
    }
    // Keys HF writes that carry nothing of ours: the tied LM head and the
    // causal-mask buffers of old GPT-2 files.
    let ignorable = |k: &str| {
        k == "lm_head.weight"
            || k.ends_with(".attn.bias")
            || k.ends_with(".attn.masked_bias")
            || k.ends_with(".rotary_emb.inv_freq")
    };
    let unused: Vec<&String> = tensors
        .keys()
        .filter(|k| !vars.contains_key(*k) && !ignorable(k))
        .collect();
    if !unused.is_empty() {
        tracing::warn!(
            "{}: ignoring tensors the model does not use: {unused:?}",
            path.display()
        );
    }
    Ok(())
}

/// `key` of a `config.json` object read by `get` (`what` it must be), or
/// HF's `default` when unset.
fn config_value<T>(
    obj: &serde_json::Map<String, Value>,
    key: &str,
    what: &str,
    get: impl Fn(&Value) -> Option<T>,
    default: T,
) -> Result<T, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => get(x).ok_or_else(|| format!("`{key}` must be {what}, got {x}")),
    }
}

/// HF `GPT2Config` keys with HF's defaults, so any GPT-2 `config.json` reads.
/// The most a `config.json` may hold (real ones are a few kB).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

fn read_config(path: &Path) -> Result<(ModelConfig, ModelMeta), CheckpointError> {
    let bad = |message: String| CheckpointError::Invalid {
        path: path.to_owned(),
        message,
    };
    rlhf_datasets::files::bounded_size(path, MAX_CONFIG_BYTES, "a config's limit").map_err(bad)?;
    let text = std::fs::read_to_string(path).map_err(|source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    })?;
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("expected a JSON object".into()))?;
    let config = match obj.get("model_type").and_then(Value::as_str) {
        None | Some("gpt2") => ModelConfig::Gpt2(gpt2_config(obj, path)?),
        Some("llama" | "qwen2" | "mistral") => {
            ModelConfig::Llama(LlamaConfig::from_hf(&v).map_err(|e| bad(e.to_string()))?)
        }
        Some(t) => {
            return Err(bad(format!(
                "model_type is \"{t}\"; rlhf runs GPT-2 (\"gpt2\") and Llama-layout (\"llama\", \"qwen2\", \"mistral\") models"
            )))
        }
    };
    check_token_ids(obj, config.vocab_size()).map_err(bad)?;
    let generation = path.with_file_name("generation_config.json");
    if generation.is_file() {
        let bad_generation = |message: String| CheckpointError::Invalid {
            path: generation.clone(),
            message,
        };
        let text =
            rlhf_datasets::files::read_bounded(&generation, MAX_CONFIG_BYTES, "a config's limit")
                .map_err(bad_generation)?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| bad_generation(format!("invalid JSON: {e}")))?;
        if let Some(obj) = v.as_object() {
            check_token_ids(obj, config.vocab_size()).map_err(bad_generation)?;
        }
    }
    let meta = match obj.get("rlhf") {
        None => ModelMeta::default(),
        Some(m) => {
            serde_json::from_value(m.clone()).map_err(|e| bad(format!("`rlhf` section: {e}")))?
        }
    };
    Ok((config, meta))
}

/// The special token ids a config names (`eos_token_id` may be a list):
/// each an id of the vocabulary, so an answer can end.
fn check_token_ids(obj: &serde_json::Map<String, Value>, vocab: i64) -> Result<(), String> {
    for key in ["eos_token_id", "bos_token_id", "pad_token_id"] {
        let ids: Vec<&Value> = match obj.get(key) {
            None | Some(Value::Null) => continue,
            Some(Value::Array(list)) => list.iter().collect(),
            Some(one) => vec![one],
        };
        for id in ids {
            match id.as_i64() {
                Some(i) if (0..vocab).contains(&i) => {}
                _ => {
                    return Err(format!(
                        "{key}: {id} is not a token id of this model (0..{vocab})"
                    ))
                }
            }
        }
    }
    Ok(())
}

/// A GPT-2 `config.json`'s shapes, HF's defaults for unset keys.
fn gpt2_config(
    obj: &serde_json::Map<String, Value>,
    path: &Path,
) -> Result<GptConfig, CheckpointError> {
    let bad = |message: String| CheckpointError::Invalid {
        path: path.to_owned(),
        message,
    };
    let int = |key: &str, default: i64| -> Result<i64, CheckpointError> {
        config_value(obj, key, "an integer", Value::as_i64, default).map_err(bad)
    };
    let float = |key: &str, default: f64| -> Result<f64, CheckpointError> {
        config_value(obj, key, "a number", Value::as_f64, default).map_err(bad)
    };
    let activation = obj
        .get("activation_function")
        .and_then(Value::as_str)
        .unwrap_or("gelu_new");
    if !matches!(activation, "gelu_new" | "gelu_pytorch_tanh") {
        return Err(bad(format!(
            "activation_function \"{activation}\" is not supported; rlhf's GPT uses GELU (tanh), HF's \"gelu_new\""
        )));
    }
    for (key, supported) in [
        ("scale_attn_by_inverse_layer_idx", false),
        ("scale_attn_weights", true),
        ("tie_word_embeddings", true),
    ] {
        if let Some(b) = obj.get(key).and_then(Value::as_bool) {
            if b != supported {
                return Err(bad(format!(
                    "`{key}: {b}` is not supported (rlhf needs {supported})"
                )));
            }
        }
    }
    let n_inner = match obj.get("n_inner") {
        None | Some(Value::Null) => None,
        Some(_) => Some(int("n_inner", 0)?),
    };
    let config = GptConfig {
        vocab_size: int("vocab_size", 50257)?,
        n_positions: int("n_positions", int("n_ctx", 1024)?)?,
        n_embd: int("n_embd", 768)?,
        n_layer: int("n_layer", 12)?,
        n_head: int("n_head", 12)?,
        n_inner,
        layer_norm_epsilon: float("layer_norm_epsilon", 1e-5)?,
        embd_pdrop: float("embd_pdrop", 0.1)?,
        attn_pdrop: float("attn_pdrop", 0.1)?,
        resid_pdrop: float("resid_pdrop", 0.1)?,
    };
    config
        .validate()
        .map_err(|source| CheckpointError::Shapes {
            path: path.to_owned(),
            source,
        })?;
    Ok(config)
}

fn hf_config_json(
    config: &ModelConfig,
    head: Head,
    tokenizer: &Tokenizer,
    meta: &ModelMeta,
) -> Value {
    let mut meta = meta.clone();
    meta.head = Some(head);
    let eos = tokenizer.eos_id();
    let mut v = match config {
        ModelConfig::Gpt2(c) => gpt2_config_json(c, head),
        ModelConfig::Llama(c) => {
            let mut v = c.to_hf();
            if head == Head::Scalar {
                let name = v["architectures"][0].as_str().unwrap_or("LlamaForCausalLM");
                let name = name.replace("ForCausalLM", "ForSequenceClassification");
                v["architectures"] = json!([name]);
            }
            v
        }
    };
    for (key, value) in [
        ("bos_token_id", json!(eos)),
        ("eos_token_id", json!(eos)),
        ("pad_token_id", json!(tokenizer.pad_id())),
        ("num_labels", json!(1)),
        ("rlhf", json!(meta)),
    ] {
        v[key] = value;
    }
    v
}

fn gpt2_config_json(config: &GptConfig, head: Head) -> Value {
    let architecture = match head {
        Head::Lm => "GPT2LMHeadModel",
        Head::Scalar => "GPT2ForSequenceClassification",
    };
    json!({
        "architectures": [architecture],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_ctx": config.n_positions,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.n_inner,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "embd_pdrop": config.embd_pdrop,
        "attn_pdrop": config.attn_pdrop,
        "resid_pdrop": config.resid_pdrop,
        "initializer_range": 0.02,
        "scale_attn_weights": true,
        "tie_word_embeddings": true,
        "use_cache": true,
        "torch_dtype": "float32",
    })
}

/// The checkpoint's tensors in fp32 on the CPU, by our variable names (for
/// bit-for-bit comparisons of two runs).
pub fn weights_of(model: &Model) -> BTreeMap<String, Tensor> {
    model
        .vs
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.detach().to_device(Device::Cpu).to_kind(Kind::Float)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig::Gpt2(GptConfig {
            vocab_size: 264,
            n_positions: 16,
            n_embd: 16,
            n_layer: 1,
            n_head: 2,
            ..GptConfig::default()
        })
    }

    #[test]
    fn save_then_load_gives_identical_weights_and_head() {
        let _rng = crate::rng_lock();
        tch::manual_seed(1);
        let d = tempfile::tempdir().unwrap();
        let m = Model::init(&tiny(), Head::Scalar, Tokenizer::bytes(), Device::Cpu).unwrap();
        m.save(&d.path().join("ck")).unwrap();
        let back = Model::load(&d.path().join("ck"), HeadChoice::AsSaved, Device::Cpu).unwrap();
        assert_eq!(back.net.head(), Head::Scalar);
        let (a, b) = (weights_of(&m), weights_of(&back));
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (k, t) in &a {
            assert!(t.equal(&b[k]), "{k} differs");
        }
    }

    #[test]
    fn lm_checkpoint_loads_as_reward_model_with_fresh_head() {
        let _rng = crate::rng_lock();
        tch::manual_seed(2);
        let d = tempfile::tempdir().unwrap();
        let m = Model::init(&tiny(), Head::Lm, Tokenizer::bytes(), Device::Cpu).unwrap();
        m.save(d.path()).unwrap();
        let rm = Model::load(d.path(), HeadChoice::Want(Head::Scalar), Device::Cpu).unwrap();
        assert_eq!(rm.net.head(), Head::Scalar);
        assert!(weights_of(&m)["wte.weight"].equal(&weights_of(&rm)["wte.weight"]));
    }

    #[test]
    fn truncated_weights_are_reported_with_their_path() {
        let _rng = crate::rng_lock();
        let d = tempfile::tempdir().unwrap();
        let m = Model::init(&tiny(), Head::Lm, Tokenizer::bytes(), Device::Cpu).unwrap();
        m.save(d.path()).unwrap();
        let w = d.path().join(WEIGHTS_FILE);
        let bytes = std::fs::read(&w).unwrap();
        std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
        let err = Model::load(d.path(), HeadChoice::AsSaved, Device::Cpu).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("model.safetensors") && msg.contains("truncated"),
            "{msg}"
        );
    }

    #[test]
    fn config_errors_name_file_and_key() {
        let _rng = crate::rng_lock();
        let d = tempfile::tempdir().unwrap();
        let m = Model::init(&tiny(), Head::Lm, Tokenizer::bytes(), Device::Cpu).unwrap();
        m.save(d.path()).unwrap();
        // Edited by hand, as a user may: without its checksum list the
        // folder loads as an HF one, and the config itself is checked.
        std::fs::remove_file(d.path().join(rlhf_datasets::checksum::CHECKSUM_FILE)).unwrap();
        let cfg = d.path().join(CONFIG_FILE);
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
        v["n_embd"] = json!("wide");
        std::fs::write(&cfg, v.to_string()).unwrap();
        let msg = Model::load(d.path(), HeadChoice::AsSaved, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("config.json") && msg.contains("n_embd"),
            "{msg}"
        );
        v["n_embd"] = json!(24);
        std::fs::write(&cfg, v.to_string()).unwrap();
        let msg = Model::load(d.path(), HeadChoice::AsSaved, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("shape"), "{msg}");
        let msg = Model::load(&d.path().join("nope"), HeadChoice::AsSaved, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not a model folder"), "{msg}");
    }
}
