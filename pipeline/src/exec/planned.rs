//! `<stage>/stage.json`: one planned stage as data. The runner writes what
//! it resolved for the stage (its settings with every path absolute, its
//! key, its upstream stages' keys, and the experiment's shared settings),
//! and the child that runs it (one process, a torchrun or `rlhf run`
//! rank, or a Slurm job's task) reads only this file: no child parses the
//! experiment file again. `rlhf stage --config FILE NAME` writes it first
//! and runs from it the same way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rlhf_stages::kind::StageConfig;
use rlhf_stages::ModelConfig;
use serde::{Deserialize, Serialize};

use crate::experiment::Experiment;

/// The file's name in the stage folder.
pub const STAGE_FILE: &str = "stage.json";

/// Largest stage.json read: settings and keys.
const MAX_STAGE_FILE: u64 = 16 << 20;

/// One stage as the runner planned it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlannedStage {
    /// Its name in the experiment file (`rm`, `ppo[kl_coef=0.1]`).
    pub name: String,
    /// How logs and the report name it (`rm`, `round-1/rm`).
    pub label: String,
    /// The experiment file it came from (absolute): for messages, and the
    /// folder a ranking program runs in.
    pub experiment: PathBuf,
    pub run_dir: PathBuf,
    pub out_dir: PathBuf,
    /// Its key: settings, input hashes and upstream keys.
    pub key: String,
    pub upstream: BTreeMap<String, String>,
    /// Its settings, `kind` included, as its kind parses them.
    pub settings: serde_json::Value,
    /// libtorch's threads: the stage's, else the experiment's.
    pub threads: Option<usize>,
    pub experiment_threads: Option<usize>,
    pub device: String,
    /// The shape of a model built from nothing (as `model:` reads it:
    /// unset fields left out), and its tokenizer.
    pub model: serde_json::Value,
    pub tokenizer: Option<PathBuf>,
    /// How long a rank waits for the others, seconds.
    pub rank_timeout_seconds: u64,
    /// The experiment's judge program (`judge: {kind: command}`), which
    /// scores the stage's own evals; run in the experiment file's folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<PlannedJudge>,
}

/// A judging program as the stage runs it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlannedJudge {
    pub command: Vec<String>,
    pub timeout_seconds: f64,
}

impl PlannedStage {
    /// Stage `name` of `exp` (settings as resolved, overrides applied),
    /// writing into `out_dir`.
    pub fn of(
        exp: &Experiment,
        name: &str,
        label: &str,
        out_dir: &Path,
        key: &str,
        upstream: &BTreeMap<String, String>,
    ) -> anyhow::Result<Self> {
        let stage = exp.stage(name)?;
        Ok(Self {
            name: name.to_owned(),
            label: label.to_owned(),
            experiment: std::path::absolute(&exp.file)?,
            run_dir: std::path::absolute(&exp.run_dir)?,
            out_dir: std::path::absolute(out_dir)?,
            key: key.to_owned(),
            upstream: upstream.clone(),
            settings: stage.config.to_json(),
            threads: stage.threads,
            experiment_threads: exp.spec.threads,
            device: exp.spec.device.clone(),
            model: without_nulls(serde_json::to_value(&exp.spec.model)?),
            tokenizer: exp.spec.tokenizer.clone(),
            rank_timeout_seconds: exp.spec.distributed.timeout_seconds,
            judge: match &exp.spec.judge {
                crate::experiment::JudgeSpec::Command {
                    command,
                    timeout_seconds,
                } => Some(PlannedJudge {
                    command: command.clone(),
                    timeout_seconds: *timeout_seconds,
                }),
                _ => None,
            },
        })
    }

    /// Writes `<out_dir>/stage.json` whole (temp, fsync, rename).
    pub fn write(&self) -> anyhow::Result<PathBuf> {
        let path = self.out_dir.join(STAGE_FILE);
        let text = serde_json::to_string_pretty(self)?;
        rlhf_datasets::atomic::write_file(&path, text.as_bytes())?;
        Ok(path)
    }

    /// Reads a stage.json; errors name the file and what is wrong.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text =
            rlhf_datasets::files::read_bounded(path, MAX_STAGE_FILE, "the limit for a stage file")
                .map_err(|e| {
                    anyhow::anyhow!("{}: cannot read the planned stage: {e}", path.display())
                })?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: not a stage file that `rlhf run` writes (rerun `rlhf run` to plan the stage again)",
                path.display()
            )
        })
    }

    /// The stage's settings, parsed by its kind.
    pub fn config(&self) -> anyhow::Result<Box<dyn StageConfig>> {
        let serde_json::Value::Object(mut fields) = self.settings.clone() else {
            anyhow::bail!("{}: settings: expected a mapping", self.label);
        };
        let kind_name = fields
            .remove("kind")
            .and_then(|k| k.as_str().map(str::to_owned))
            .with_context(|| format!("{}: settings: no kind", self.label))?;
        let kind = crate::experiment::kind_named(&kind_name)
            .with_context(|| format!("{}: settings: unknown kind {kind_name:?}", self.label))?;
        let mapping: serde_norway::Mapping = serde_norway::to_value(&fields)
            .ok()
            .and_then(|v| v.as_mapping().cloned())
            .with_context(|| format!("{}: settings: not a mapping", self.label))?;
        kind.parse(mapping)
            .map_err(|m| anyhow::anyhow!("{}: settings{m}", self.label))
    }

    /// The shape of a model built from nothing.
    pub fn model_config(&self) -> anyhow::Result<ModelConfig> {
        serde_json::from_value(self.model.clone())
            .with_context(|| format!("{}: model: not a model shape", self.label))
    }

    /// The experiment file's folder, where relative program paths point.
    pub fn experiment_dir(&self) -> PathBuf {
        match self.experiment.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        }
    }
}

/// `value` without its null fields: `model:` reads an unset field as
/// absent, not as null.
fn without_nulls(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(fields) => fields
            .into_iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k, without_nulls(v)))
            .collect(),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every stage of the bundled experiments comes back from its
    /// stage.json as the experiment resolved it: the same settings and
    /// the same model shape.
    #[test]
    fn a_planned_stage_round_trips_through_its_file() {
        let d = tempfile::tempdir().unwrap();
        let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        for file in ["default.yaml", "llama.yaml", "compare.yaml"] {
            let exp = Experiment::load(&configs.join(file), &[]).unwrap();
            for name in exp.spec.stages.keys() {
                let out = d.path().join(file).join(name);
                let upstream = BTreeMap::from([("sft".to_owned(), "k0".to_owned())]);
                let planned = PlannedStage::of(&exp, name, name, &out, "k1", &upstream).unwrap();
                std::fs::create_dir_all(&out).unwrap();
                let back = PlannedStage::read(&planned.write().unwrap()).unwrap();
                assert_eq!(back, planned);
                let config = back.config().unwrap();
                assert_eq!(config.to_json(), exp.stage(name).unwrap().config.to_json());
                assert_eq!(back.model_config().unwrap(), exp.spec.model, "{file}");
            }
        }
    }

    #[test]
    fn a_damaged_stage_file_is_named() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(STAGE_FILE);
        std::fs::write(&path, "{\"name\": 3}").unwrap();
        let e = format!("{:#}", PlannedStage::read(&path).unwrap_err());
        assert!(
            e.contains("stage.json") && e.contains("not a stage file"),
            "{e}"
        );
    }
}
