//! A stage kind, declared once.
//!
//! Each stage file implements [`KindConfig`] for its config struct: the
//! kind's name, validation, its path settings (data files and model
//! references, which the pipeline resolves, hashes into the cache key and
//! waits for) and how it runs. `kinds::KINDS` registers them; the
//! pipeline parses, resolves, hashes and runs stages by looping over it,
//! so adding a kind is one new file and one line there.

use std::any::Any;
use std::fmt::Debug;
use std::path::PathBuf;

use serde::{de::DeserializeOwned, Serialize};
use serde_norway::{Mapping, Value};

use crate::error::StageError;
use crate::model::precision::Precision;
use crate::train::{StageContext, TrainSettings};

/// What a finished stage of a kind leaves in its `checkpoint/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Produces {
    /// A policy: it answers prompts, and `rlhf eval` compares it.
    Policy,
    /// A reward model: a scalar head that scores answers.
    RewardModel,
    /// Rankings of sampled answers (a loop round's collection): a
    /// preference file, no model.
    Rankings,
}

/// A kind's part in a loop round (`loop: repeat:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopRole {
    /// Never repeated by a loop.
    None,
    /// Retrained each round on the round's rankings, then scores the
    /// round's policy: the reward model.
    Scorer,
    /// Trained each round against the round's scorer, from the last
    /// round's policy, anchored to a reference: PPO, GRPO.
    OptimisesScorer,
    /// Trained each round on the round's rankings directly: DPO.
    LearnsFromRankings,
}

/// A figure `rlhf eval` draws from a kind's finished stages (the pipeline
/// renders it; the kind says which and from what).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plot {
    /// The train loss per step (faint), its moving average, and the eval
    /// loss (`loss`, `eval_loss` of `metrics.jsonl`).
    Loss {
        file: &'static str,
        title: &'static str,
    },
    /// Pairwise accuracy on train batches and held-out rankings
    /// (`accuracy`, `eval_accuracy`).
    PairwiseAccuracy {
        file: &'static str,
        title: &'static str,
    },
    /// One panel per metric against `iteration`, raw and smoothed:
    /// `(metric, title, y axis)`.
    Iterations {
        file: &'static str,
        panels: &'static [(&'static str, &'static str, &'static str)],
    },
    /// The judge's score of the saved rollouts and the scorer's score
    /// against KL to the reference: over-optimisation (Gao et al.).
    ScoreAgainstKl { file: &'static str },
}

/// A registered kind: its name, its parser and its role.
#[derive(Debug)]
pub struct Kind {
    pub name: &'static str,
    pub produces: Produces,
    pub loop_role: LoopRole,
    pub plots: &'static [Plot],
    parse: fn(Mapping) -> Result<Box<dyn StageConfig>, String>,
}

impl Kind {
    pub const fn of<C: KindConfig>() -> Self {
        Self {
            name: C::KIND,
            produces: C::PRODUCES,
            loop_role: C::LOOP_ROLE,
            plots: C::PLOTS,
            parse: parse::<C>,
        }
    }

    /// A stage's settings (its mapping without `kind`). An error starts
    /// with the field's path (`optimizer.lr: ...`) where serde gives one.
    pub fn parse(&self, settings: Mapping) -> Result<Box<dyn StageConfig>, String> {
        (self.parse)(settings)
    }
}

/// What a path setting holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRole {
    /// A data file the stage reads: its content is hashed into the key.
    Data,
    /// A model folder, or the name of the stage whose checkpoint it is.
    Model,
}

/// A path setting's value: required (empty means unset) or optional.
#[derive(Debug)]
pub enum PathValue<'a> {
    Required(&'a mut PathBuf),
    Optional(&'a mut Option<PathBuf>),
}

/// One path setting of a stage, borrowed for resolving or hashing.
#[derive(Debug)]
pub struct PathSetting<'a> {
    /// Its path inside the stage (`data`, `ptx.data`).
    pub field: &'static str,
    pub role: PathRole,
    /// What it is, for the error when a required one is missing.
    pub about: &'static str,
    pub value: PathValue<'a>,
}

impl<'a> PathSetting<'a> {
    pub fn data(field: &'static str, about: &'static str, value: &'a mut PathBuf) -> Self {
        Self {
            field,
            role: PathRole::Data,
            about,
            value: PathValue::Required(value),
        }
    }

    pub fn optional_data(field: &'static str, value: &'a mut Option<PathBuf>) -> Self {
        Self {
            field,
            role: PathRole::Data,
            about: "",
            value: PathValue::Optional(value),
        }
    }

    pub fn model(field: &'static str, about: &'static str, value: &'a mut PathBuf) -> Self {
        Self {
            field,
            role: PathRole::Model,
            about,
            value: PathValue::Required(value),
        }
    }

    pub fn optional_model(field: &'static str, value: &'a mut Option<PathBuf>) -> Self {
        Self {
            field,
            role: PathRole::Model,
            about: "",
            value: PathValue::Optional(value),
        }
    }

    /// The path, if set.
    pub fn get(&self) -> Option<&PathBuf> {
        match &self.value {
            PathValue::Required(p) => (!p.as_os_str().is_empty()).then_some(&**p),
            PathValue::Optional(p) => p.as_ref(),
        }
    }

    /// Replaces the path, if set.
    pub fn set(&mut self, path: PathBuf) {
        match &mut self.value {
            PathValue::Required(p) => **p = path,
            PathValue::Optional(p) => **p = Some(path),
        }
    }

    pub fn is_required(&self) -> bool {
        matches!(self.value, PathValue::Required(_))
    }
}

/// What a stage file implements for its config struct.
pub trait KindConfig:
    Serialize + DeserializeOwned + Default + Clone + Debug + Send + Sync + 'static
{
    /// `kind:` in the experiment file.
    const KIND: &'static str;
    /// What its checkpoint is: `rlhf eval` compares policies and scores
    /// them with reward models.
    const PRODUCES: Produces;
    /// Its part in a loop round.
    const LOOP_ROLE: LoopRole = LoopRole::None;
    /// The figures `rlhf eval` draws from its finished stages.
    const PLOTS: &'static [Plot] = &[];
    type Summary: Serialize;
    /// The shared training settings, for the kinds that train with `fit`.
    fn train(&mut self) -> Option<&mut TrainSettings> {
        None
    }
    /// Every setting in its range; paths are checked by the pipeline.
    fn validate(&self) -> Result<(), StageError>;
    /// fp32, or bf16 autocast; a kind with training settings has it there.
    fn precision(&mut self) -> Precision {
        self.train().map(|t| t.precision).unwrap_or_default()
    }
    /// Every path setting: data files and model references.
    fn paths(&mut self) -> Vec<PathSetting<'_>>;
    /// The seed; unset: the experiment's. A kind with training settings
    /// has its seed there.
    fn seed_mut(&mut self) -> &mut Option<u64> {
        &mut self
            .train()
            .expect("a kind without training settings implements seed_mut")
            .seed
    }
    /// Runs (or resumes, or finds done) the stage.
    fn run(&self, ctx: &StageContext) -> Result<Self::Summary, StageError>;
    /// The batches every rank takes an equal share of, by setting name:
    /// the kind runs data-parallel; empty: it runs as one process.
    fn shared_batches(&mut self) -> Vec<(&'static str, usize)> {
        self.train()
            .map(|t| vec![("batch_size", t.batch_size)])
            .unwrap_or_default()
    }
}

/// A stage's settings of any kind, as the pipeline holds them.
pub trait StageConfig: Debug + Send + Sync {
    fn kind(&self) -> &'static str;
    fn validate(&self) -> Result<(), StageError>;
    fn paths(&mut self) -> Vec<PathSetting<'_>>;
    fn seed_mut(&mut self) -> &mut Option<u64>;
    /// Runs the stage; its summary as JSON.
    fn run(&self, ctx: &StageContext) -> Result<serde_json::Value, StageError>;
    /// The settings as JSON, `kind` included.
    fn to_json(&self) -> serde_json::Value;
    /// `(batch_size, grad_accum)` of a kind that trains with `fit`.
    fn batch(&self) -> Option<(usize, usize)>;
    /// See [`KindConfig::shared_batches`].
    fn shared_batches(&self) -> Vec<(&'static str, usize)>;
    fn clone_box(&self) -> Box<dyn StageConfig>;
    fn as_any(&self) -> &dyn Any;
}

impl<C: KindConfig> StageConfig for C {
    fn kind(&self) -> &'static str {
        C::KIND
    }
    fn validate(&self) -> Result<(), StageError> {
        KindConfig::validate(self)
    }
    fn paths(&mut self) -> Vec<PathSetting<'_>> {
        KindConfig::paths(self)
    }
    fn seed_mut(&mut self) -> &mut Option<u64> {
        KindConfig::seed_mut(self)
    }
    fn run(&self, ctx: &StageContext) -> Result<serde_json::Value, StageError> {
        let precision = KindConfig::precision(&mut self.clone());
        if !precision.is_fp32() {
            tracing::info!("precision: {precision:?} (autocast on fp32 master weights)");
        }
        let summary = precision.run(ctx.device, || KindConfig::run(self, ctx))?;
        Ok(serde_json::to_value(summary).expect("summaries serialise"))
    }
    fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("configs serialise");
        v["kind"] = serde_json::json!(C::KIND);
        v
    }
    fn batch(&self) -> Option<(usize, usize)> {
        let mut c = self.clone();
        c.train().map(|t| (t.batch_size, t.grad_accum))
    }
    fn shared_batches(&self) -> Vec<(&'static str, usize)> {
        KindConfig::shared_batches(&mut self.clone())
    }
    fn clone_box(&self) -> Box<dyn StageConfig> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Clone for Box<dyn StageConfig> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

/// Parses a kind's settings. The shared training settings are split off
/// and laid over the kind's defaults, so each part is parsed strictly
/// (unknown keys refused) with its errors' paths intact.
fn parse<C: KindConfig>(mut settings: Mapping) -> Result<Box<dyn StageConfig>, String> {
    let mut defaults = C::default();
    let train = match defaults.train() {
        Some(t) => {
            let Value::Mapping(mut merged) =
                serde_norway::to_value(&*t).map_err(|e| e.to_string())?
            else {
                unreachable!("training settings serialise as a mapping")
            };
            let mut keys: Vec<Value> = merged.keys().cloned().collect();
            // Unset ones are not serialised, but belong to the shared part.
            keys.extend(TrainSettings::OPTIONAL_KEYS.map(Value::from));
            for key in keys {
                if let Some(v) = settings.remove(&key) {
                    merged.insert(key, v);
                }
            }
            Some(from_mapping::<TrainSettings>(merged)?)
        }
        None => None,
    };
    let mut config: C = from_mapping(settings).map_err(|e| list_every_key::<C>(&e))?;
    if let (Some(t), Some(slot)) = (train, config.train()) {
        *slot = t;
    }
    Ok(Box::new(config))
}

fn from_mapping<T: DeserializeOwned>(m: Mapping) -> Result<T, String> {
    // Parsed from text, not from the value: text errors carry the path.
    let text = serde_norway::to_string(&Value::Mapping(m)).map_err(|e| e.to_string())?;
    serde_norway::from_str(&text).map_err(|e| e.to_string())
}

/// serde lists a kind's own keys for an unknown one; the shared training
/// keys are as valid, so the list names every key of the kind.
fn list_every_key<C: KindConfig>(message: &str) -> String {
    let Some(i) = message.find(", expected") else {
        return message.to_owned();
    };
    if !message[..i].contains("unknown field") {
        return message.to_owned();
    }
    let rest = message[i..]
        .rfind(" at line ")
        .map_or("", |j| &message[i + j..]);
    let serde_json::Value::Object(keys) = C::default().to_json() else {
        return message.to_owned();
    };
    let mut names: Vec<&str> = keys.keys().map(String::as_str).collect();
    if C::default().train().is_some() {
        names.extend(TrainSettings::OPTIONAL_KEYS);
    }
    names.sort();
    let names: Vec<String> = names
        .into_iter()
        .filter(|k| *k != "kind")
        .map(|k| format!("`{k}`"))
        .collect();
    format!(
        "{}, expected one of {}{rest}",
        &message[..i],
        names.join(", ")
    )
}
