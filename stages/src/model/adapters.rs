//! Models with LoRA adapters: adding them (the base frozen), saving a
//! folder whose `model.safetensors` holds the merged weights (what later
//! stages and `transformers` read) and whose `adapter/` holds the adapters
//! in PEFT's format, and loading base + adapters back exactly (resume).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tch::{Device, Tensor};

use crate::model::checkpoint::{hf_name, HF_TRUNK_PREFIX};
use crate::model::checkpoint::{CheckpointError, HeadChoice, Model};
use crate::model::lora::{
    base_of, merge, relative_path, LoraConfig, ADAPTER_CONFIG_FILE, ADAPTER_DIR,
    ADAPTER_WEIGHTS_FILE, GPT2_MODULES, LLAMA_MODULES, PEFT_PREFIX,
};
use crate::model::network::Network;

/// The adapters a model carries and the folder of the base they adapt.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraState {
    pub config: LoraConfig,
    /// The base model's folder, absolute and resolved.
    pub base: PathBuf,
}

fn is_adapter(name: &str) -> bool {
    name.contains(".lora_A.") || name.contains(".lora_B.")
}

/// A scalar head is trained in full beside the adapters (PEFT's
/// `modules_to_save`).
fn is_head(name: &str) -> bool {
    name.starts_with("score.")
}

impl Model {
    /// Freezes every weight but the scalar head and adds `config`'s
    /// adapters; `base` is the folder this model was loaded from.
    pub fn add_lora(&mut self, config: &LoraConfig, base: &Path) -> Result<(), CheckpointError> {
        let resolved = match &self.net {
            Network::Gpt(_) => config.for_layout("GPT-2", &GPT2_MODULES),
            Network::Llama(_) => config.for_layout("Llama", &LLAMA_MODULES),
        }
        .map_err(|message| CheckpointError::Invalid {
            path: base.to_owned(),
            message,
        })?;
        for (name, t) in self.vs.variables() {
            if !is_head(&name) {
                let _ = t.set_requires_grad(false);
            }
        }
        let root = self.vs.root();
        match &mut self.net {
            Network::Gpt(gpt) => gpt.add_lora(&root, &resolved),
            Network::Llama(llama) => llama.add_lora(&root, &resolved),
        }
        self.lora = Some(LoraState {
            config: resolved,
            // Resolved (no `..`): adapters saved elsewhere name it relatively.
            base: std::fs::canonicalize(base).map_err(|source| CheckpointError::Io {
                path: base.to_owned(),
                source,
            })?,
        });
        Ok(())
    }

    /// The tensors `model.safetensors` holds, by our variable names: with
    /// adapters, each adapted weight merged (`W + scale * B @ A`) and the
    /// adapters themselves left out.
    pub fn tensors_to_save(&self) -> BTreeMap<String, Tensor> {
        let vars = self.vs.variables();
        let cpu = |t: &Tensor| t.detach().to_device(Device::Cpu).contiguous();
        let Some(lora) = &self.lora else {
            return vars.iter().map(|(k, t)| (k.clone(), cpu(t))).collect();
        };
        let scale = lora.config.scale();
        let fan_in_fan_out = self.fan_in_fan_out();
        vars.iter()
            .filter(|(k, _)| !is_adapter(k))
            .map(|(k, w)| {
                let stem = k.strip_suffix(".weight").unwrap_or(k);
                let (a, b) = (
                    vars.get(&format!("{stem}.lora_A.weight")),
                    vars.get(&format!("{stem}.lora_B.weight")),
                );
                let t = match (a, b) {
                    (Some(a), Some(b)) => tch::no_grad(|| merge(w, a, b, scale, fan_in_fan_out)),
                    _ => w.shallow_clone(),
                };
                (k.clone(), cpu(&t))
            })
            .collect()
    }

    /// GPT-2's Conv1D weights are stored `(in, out)`: PEFT's
    /// `fan_in_fan_out`.
    fn fan_in_fan_out(&self) -> bool {
        matches!(self.net, Network::Gpt(_))
    }

    /// HF's key of our variable `name` (GPT-2's trunk sits under
    /// `transformer.`, the scalar head beside it).
    fn hf_key(&self, name: &str) -> String {
        match self.net {
            Network::Gpt(_) => hf_name(name),
            Network::Llama(_) => name.to_owned(),
        }
    }

    /// Writes `dir/adapter/` (PEFT's two files and a checksum list) when
    /// the model carries adapters; `dir` may be a temporary sibling of the
    /// final folder (the base's relative path is the same from both).
    pub(crate) fn write_adapter(&self, dir: &Path) -> Result<(), CheckpointError> {
        let Some(lora) = &self.lora else {
            return Ok(());
        };
        let out = dir.join(ADAPTER_DIR);
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| CheckpointError::Io { path, source }
        };
        std::fs::create_dir_all(&out).map_err(io(&out))?;
        let here = std::fs::canonicalize(&out).map_err(io(&out))?;
        let base = relative_path(&here, &lora.base);
        let config = lora
            .config
            .to_peft(&base.to_string_lossy(), self.fan_in_fan_out());
        let text = serde_json::to_string_pretty(&config).expect("config serialises");
        rlhf_datasets::atomic::write_file(&out.join(ADAPTER_CONFIG_FILE), text.as_bytes())?;
        let named: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(k, _)| is_adapter(k) || is_head(k))
            .map(|(k, t)| {
                (
                    format!("{PEFT_PREFIX}{}", self.hf_key(&k)),
                    t.detach().to_device(Device::Cpu).contiguous(),
                )
            })
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect();
        let path = out.join(ADAPTER_WEIGHTS_FILE);
        Tensor::write_safetensors(&named, &path)
            .map_err(|source| CheckpointError::WriteWeights { path, source })?;
        rlhf_datasets::checksum::write(&out)?;
        Ok(())
    }

    /// A folder as training left it: with `adapter/`, its base (the folder
    /// the adapter names) plus the adapters, exactly; else the folder.
    pub fn load_adapted(
        dir: &Path,
        head: HeadChoice,
        device: Device,
    ) -> Result<Self, CheckpointError> {
        let adapter = dir.join(ADAPTER_DIR);
        if !adapter.join(ADAPTER_CONFIG_FILE).exists() {
            return Self::load(dir, head, device);
        }
        Self::load_adapter_onto(&adapter, None, head, device)
    }

    /// The base model with the adapter folder `adapter` (PEFT's files)
    /// added: the base is `base`, else the folder the adapter names.
    pub fn load_adapter_onto(
        adapter: &Path,
        base: Option<&Path>,
        head: HeadChoice,
        device: Device,
    ) -> Result<Self, CheckpointError> {
        let bad = |path: &Path, message: String| CheckpointError::Invalid {
            path: path.to_owned(),
            message,
        };
        let config_path = adapter.join(ADAPTER_CONFIG_FILE);
        rlhf_datasets::checksum::verify(adapter)?;
        let text = std::fs::read_to_string(&config_path).map_err(|source| CheckpointError::Io {
            path: config_path.clone(),
            source,
        })?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| bad(&config_path, format!("invalid JSON: {e}")))?;
        let config = LoraConfig::from_peft(&v).map_err(|e| bad(&config_path, e))?;
        let base = match base {
            Some(b) => b.to_owned(),
            None => base_of(adapter, &v).map_err(|e| bad(&config_path, e))?,
        };
        let mut model = Self::load(&base, head, device)?;
        model.add_lora(&config, &base)?;
        let path = adapter.join(ADAPTER_WEIGHTS_FILE);
        let tensors =
            Tensor::read_safetensors(&path).map_err(|source| CheckpointError::Weights {
                path: path.clone(),
                source,
            })?;
        model.copy_adapter_tensors(tensors, &path)?;
        Ok(model)
    }

    /// Copies PEFT-named tensors into the adapters (and scalar head); every
    /// adapter must be there.
    fn copy_adapter_tensors(
        &self,
        tensors: Vec<(String, Tensor)>,
        path: &Path,
    ) -> Result<(), CheckpointError> {
        let vars = self.vs.variables();
        let mut found = 0;
        for (key, t) in tensors {
            let name = key.strip_prefix(PEFT_PREFIX).unwrap_or(&key);
            let name = match self.net {
                Network::Gpt(_) => name.strip_prefix(HF_TRUNK_PREFIX).unwrap_or(name),
                Network::Llama(_) => name,
            };
            // PEFT names the default adapter in memory, not on disk.
            let name = name.replace(".default.", ".");
            let Some(var) = vars.get(&name) else {
                return Err(CheckpointError::Invalid {
                    path: path.to_owned(),
                    message: format!("`{key}` is no adapter of this model"),
                });
            };
            if var.size() != t.size() {
                return Err(CheckpointError::ShapeMismatch {
                    path: path.to_owned(),
                    name,
                    expected: var.size(),
                    found: t.size(),
                });
            }
            tch::no_grad(|| var.shallow_clone().copy_(&t));
            found += usize::from(is_adapter(&name));
        }
        let expected = vars.keys().filter(|k| is_adapter(k)).count();
        if found != expected {
            return Err(CheckpointError::Invalid {
                path: path.to_owned(),
                message: format!("holds {found} of the model's {expected} adapter tensors"),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gpt::Head;
    use crate::optim::{AdamW, AdamWConfig};
    use tch::Kind;

    fn model((vs, net): (tch::nn::VarStore, Network)) -> Model {
        Model {
            vs,
            net,
            tokenizer: rlhf_datasets::Tokenizer::bytes(),
            meta: Default::default(),
            lora: None,
        }
    }

    #[test]
    fn gradients_reach_only_the_adapters_and_the_head() {
        let _rng = crate::rng_lock();
        let mut model = model(crate::tiny_llama(5, 40, 32, 2, Head::Scalar));
        let d = tempfile::tempdir().unwrap();
        model.add_lora(&LoraConfig::default(), d.path()).unwrap();
        // B starts at zero: give it values so that A's gradient is not zero too.
        tch::no_grad(|| {
            for (k, mut t) in model.vs.variables() {
                if k.contains("lora_B") {
                    let _ = t.normal_(0.0, 0.1);
                }
            }
        });
        let opt = AdamW::new(&model.vs, AdamWConfig::default());
        let ids = Tensor::from_slice(&[1i64, 5, 9, 3]).view([1, 4]);
        let h = model.net.hidden(&ids, None, None, true);
        model.net.values(&h).sum(Kind::Float).backward();
        let mut adapters = 0;
        for (name, t) in model.vs.variables() {
            let g = t.grad();
            let trained = is_adapter(&name) || is_head(&name);
            assert_eq!(t.requires_grad(), trained, "{name}");
            if trained {
                assert!(
                    g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
                    "{name}"
                );
                adapters += usize::from(is_adapter(&name));
            } else {
                assert!(!g.defined(), "{name} got a gradient");
            }
        }
        // Seven projections per layer, two layers, A and B each.
        assert_eq!(adapters, 7 * 2 * 2);
        // The optimiser holds the step and two moments per trained tensor.
        assert_eq!(opt.state_tensors().len(), 1 + 2 * (adapters + 2));
    }

    #[test]
    fn gpt2_models_take_adapters_on_their_conv1d_projections() {
        let _rng = crate::rng_lock();
        let mut model = model(crate::tiny_gpt(1, 40, 16, 2, Head::Lm));
        let llama_names = LoraConfig {
            target_modules: Some(vec!["q_proj".into()]),
            ..LoraConfig::default()
        };
        let e = model
            .add_lora(&llama_names, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("GPT-2") && e.contains("q_proj"), "{e}");
        model
            .add_lora(&LoraConfig::default(), Path::new("."))
            .unwrap();
        let adapters: Vec<String> = model
            .vs
            .variables()
            .into_keys()
            .filter(|k| is_adapter(k))
            .collect();
        // c_attn, both c_proj and c_fc in each of 2 blocks, A and B each.
        assert_eq!(adapters.len(), 4 * 2 * 2);
        assert!(adapters.contains(&"h.1.mlp.c_proj.lora_B.weight".to_string()));
        // B starts at zero: the adapted model is its base until trained.
        let ids = Tensor::from_slice(&[1i64, 5, 9, 3]).view([1, 4]);
        let on = tch::no_grad(|| model.net.forward_logits(&ids, None, false));
        tch::no_grad(|| {
            for (k, mut t) in model.vs.variables() {
                if k.contains("lora_B") {
                    let _ = t.normal_(0.0, 0.1);
                }
            }
        });
        let moved = tch::no_grad(|| model.net.forward_logits(&ids, None, false));
        let off = model
            .net
            .without_adapters(|| tch::no_grad(|| model.net.forward_logits(&ids, None, false)));
        assert!(off.allclose(&on, 1e-6, 1e-6, false));
        assert!(!moved.allclose(&on, 1e-3, 1e-3, false));
        // The merged weights compute what base + adapters compute.
        let merged = model.tensors_to_save();
        let (vs, plain) = crate::tiny_gpt(1, 40, 16, 2, Head::Lm);
        tch::no_grad(|| {
            for (k, mut t) in vs.variables() {
                t.copy_(&merged[&k]);
            }
        });
        let again = tch::no_grad(|| plain.forward_logits(&ids, None, false));
        assert!(again.allclose(&moved, 1e-5, 1e-5, false));
    }
}
