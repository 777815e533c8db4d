//! The experiment file: shared settings and named stages.
//!
//! ```yaml
//! name: default
//! seed: 0
//! device: auto            # auto | cpu | cuda | cuda:N
//! out_dir: ../runs        # runs/<name>/<stage>/
//! model: {n_layer: 4, n_head: 4, n_embd: 128, n_positions: 128}
//! tokenizer: null         # null: built-in bytes; or a tokenizer.json
//! stages:
//!   sft:
//!     kind: sft
//!     data: ../datasets/task/sft.jsonl
//! ```
//!
//! Relative paths are relative to the experiment file's folder, so a run
//! does not depend on the directory it is started from. Parsing is two
//! steps (candle's pattern): serde structs mirror the file, then
//! [`Experiment::resolve`] checks and resolves them once. `sweep:` lines
//! expand into stages here too (`sweep`).
//!
//! It imports plan (the stages' graph) and run_folder (names a stage may
//! not take).

pub mod sweep;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rlhf_stages::kind::{LoopRole, PathRole, StageConfig};
use rlhf_stages::train::StageError;
use rlhf_stages::ModelConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The file as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentFile {
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    /// libtorch's threads for every stage that sets none (default: the
    /// cores the process may use); not part of any stage's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// Ranks per stage on this machine (`rlhf run` starts them).
    #[serde(default)]
    pub distributed: Distributed,
    /// Stages `rlhf run` runs at once when the DAG has independent
    /// branches; they divide the cores among them.
    #[serde(default = "default_max_parallel")]
    pub max_parallel: usize,
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default = "default_out_dir")]
    pub out_dir: PathBuf,
    /// Shape of models that start from scratch: GPT-2's fields, or
    /// `layout: llama` with HF's Llama fields.
    #[serde(default)]
    pub model: ModelConfig,
    /// An HF tokenizer.json; unset means the built-in byte tokenizer.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    #[serde(deserialize_with = "stages_by_name")]
    pub stages: BTreeMap<String, StageFile>,
    /// Rounds of fresh comparisons: sample the policy, rank, retrain the
    /// reward model, run PPO again.
    #[serde(default, rename = "loop")]
    pub rounds: Option<LoopFile>,
    /// Who judges the policies' answers in `rlhf eval`.
    #[serde(default)]
    pub judge: JudgeSpec,
    /// Where stages run: on this machine (`local`) or as Slurm batch jobs
    /// (`slurm`); a stage's own `executor:` wins.
    #[serde(default)]
    pub executor: ExecutorKind,
    /// The Slurm jobs' resources; a stage's own `slurm:` overrides fields.
    #[serde(default)]
    pub slurm: SlurmSettings,
}

/// Where a stage runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    #[default]
    Local,
    Slurm,
}

/// A Slurm batch job's resources and flags (unset: the cluster's default).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlurmSettings {
    pub partition: Option<String>,
    pub account: Option<String>,
    /// The job's time limit, as sbatch takes it (`02:00:00`).
    pub time: Option<String>,
    /// Nodes; the stage's ranks are `nodes` x `distributed.nproc_per_node`
    /// for kinds that train data-parallel, else one task.
    pub nodes: Option<usize>,
    pub gpus_per_node: Option<usize>,
    pub cpus_per_task: Option<usize>,
    /// More `sbatch` flags, each as one word (`--qos=high`).
    pub sbatch_flags: Option<Vec<String>>,
    /// How often the runner asks Slurm about the job (seconds, default 5).
    pub poll_seconds: Option<f64>,
}

impl SlurmSettings {
    /// These settings where set, else `base`'s.
    pub fn over(&self, base: &SlurmSettings) -> SlurmSettings {
        SlurmSettings {
            partition: self.partition.clone().or_else(|| base.partition.clone()),
            account: self.account.clone().or_else(|| base.account.clone()),
            time: self.time.clone().or_else(|| base.time.clone()),
            nodes: self.nodes.or(base.nodes),
            gpus_per_node: self.gpus_per_node.or(base.gpus_per_node),
            cpus_per_task: self.cpus_per_task.or(base.cpus_per_task),
            sbatch_flags: self
                .sbatch_flags
                .clone()
                .or_else(|| base.sbatch_flags.clone()),
            poll_seconds: self.poll_seconds.or(base.poll_seconds),
        }
    }

    /// Values that go into a batch script's `#SBATCH` lines: one word
    /// each, no line breaks or shell characters.
    pub fn check(&self) -> Result<(), String> {
        let word = |field: &str, v: &str| {
            let ok = !v.is_empty()
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.:,-+=/@%".contains(c));
            ok.then_some(()).ok_or_else(|| {
                format!("slurm.{field}: `{v}` is not one word of letters, digits and _.:,-+=/@%")
            })
        };
        for (field, v) in [
            ("partition", &self.partition),
            ("account", &self.account),
            ("time", &self.time),
        ] {
            if let Some(v) = v {
                word(field, v)?;
            }
        }
        for f in self.sbatch_flags.iter().flatten() {
            word("sbatch_flags", f)?;
            let name = f.strip_prefix("--").or_else(|| f.strip_prefix('-'));
            if !name.is_some_and(|n| n.starts_with(|c: char| c.is_ascii_alphabetic())) {
                return Err(format!(
                    "slurm.sbatch_flags: `{f}` is not a flag (e.g. --qos=high)"
                ));
            }
        }
        let counts = [
            ("nodes", self.nodes, 1),
            ("cpus_per_task", self.cpus_per_task, 1),
            ("gpus_per_node", self.gpus_per_node, 0),
        ];
        for (field, v, min) in counts {
            if v.is_some_and(|n| n < min || n > 100_000) {
                return Err(format!(
                    "slurm.{field}: must be in [{min}, 100000], got {}",
                    v.unwrap_or_default()
                ));
            }
        }
        if self
            .poll_seconds
            .is_some_and(|p| !(0.1..=3600.0).contains(&p))
        {
            return Err(format!(
                "slurm.poll_seconds: must be in [0.1, 3600], got {}",
                rlhf_stages::check::shown(self.poll_seconds.unwrap_or_default())
            ));
        }
        Ok(())
    }
}

/// `judge:`: the bundled task's judge, or a program scoring answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum JudgeSpec {
    /// The bundled task's judge (it knows only the task's prompts).
    #[default]
    Gold,
    /// A program run in the experiment file's folder: reads
    /// `{"prompt", "responses"}` JSON lines (every policy's answer to the
    /// prompt) and writes one `{"scores": [...]}` line each.
    Command {
        command: Vec<String>,
        #[serde(default = "default_labeller_timeout")]
        timeout_seconds: f64,
    },
}

/// `loop:`: the iterated RM -> PPO rounds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopFile {
    /// The stages each round trains after ranking: a reward stage then a
    /// PPO or GRPO stage (`[rm, ppo]`, `[rm, grpo]`), or one DPO stage
    /// (`[dpo]`).
    pub repeat: Vec<String>,
    pub rounds: usize,
    /// Prompts to sample answers for (`{prompt}` rows).
    pub prompts: PathBuf,
    #[serde(default = "default_prompts_per_round")]
    pub prompts_per_round: usize,
    /// Answers sampled per prompt.
    #[serde(default = "default_k")]
    pub k: usize,
    #[serde(default)]
    pub labeller: Labeller,
    /// Retrain each round's reward model from the previous round's
    /// (`previous`) or from the reward stage's own `init` (`stage`).
    #[serde(default)]
    pub reward_init: RewardInit,
    /// Start each round's PPO from the latest policy (`previous`) or afresh
    /// from the reference (SFT) policy (`reference`), so that KL does not
    /// pile up over rounds. Rounds sample the latest policy either way.
    #[serde(default)]
    pub policy_init: PolicyInit,
    #[serde(default)]
    pub sampling: rlhf_stages::model::sample::SamplingConfig,
    /// Settings for the rounds' stages only, as `--set` writes them:
    /// `["stages.rm.epochs=1"]` fine-tunes each round's reward model for
    /// one epoch instead of the first one's three.
    #[serde(default)]
    pub set: Vec<String>,
}

fn default_labeller_timeout() -> f64 {
    3600.0
}

fn default_prompts_per_round() -> usize {
    200
}

fn default_k() -> usize {
    4
}

/// Who ranks the sampled answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Labeller {
    /// The bundled task's gold judge (ties for equal scores).
    #[default]
    Gold,
    /// A program: reads `{"prompt", "responses"}` JSON lines on stdin,
    /// writes one `{"ranking": [...]}` line per input line on stdout.
    Command {
        command: Vec<String>,
        /// The program is stopped, and the round fails, after this long.
        #[serde(default = "default_labeller_timeout")]
        timeout_seconds: f64,
    },
    /// People, in a web page: the round writes its groups to
    /// `round-N/queue/`, serves them (`rlhf label token NAME --queue ...`
    /// makes a labeller's token) and goes on once every group has its
    /// labels. Rerun after a stop, it keeps the labels already given.
    Web {
        /// Labels each group needs; 2 or more measure agreement.
        #[serde(default = "default_labels_per_group")]
        labels_per_group: usize,
        /// Where the page is served; port 0 picks a free one (written to
        /// `queue/address`).
        #[serde(default = "default_bind")]
        bind: String,
        /// The round fails when the labels are not all in after this long.
        #[serde(default = "default_web_timeout")]
        timeout_seconds: f64,
        /// A Markdown file shown above every prompt (relative to the
        /// experiment file); copied into each round's queue.
        #[serde(default)]
        guidelines: Option<PathBuf>,
    },
}

fn default_labels_per_group() -> usize {
    1
}

fn default_bind() -> String {
    "127.0.0.1:8080".into()
}

fn default_web_timeout() -> f64 {
    7.0 * 24.0 * 3600.0
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardInit {
    #[default]
    Previous,
    Stage,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyInit {
    #[default]
    Previous,
    Reference,
}

fn default_max_parallel() -> usize {
    1
}

fn default_device() -> String {
    "auto".into()
}

fn default_out_dir() -> PathBuf {
    PathBuf::from("runs")
}

/// Data parallelism on this machine: `rlhf run` starts `nproc_per_node`
/// ranks for each stage that trains with the shared loop (SFT, reward
/// models); other kinds run as one process. Under torchrun or Slurm the
/// launcher starts the ranks instead.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Distributed {
    pub nproc_per_node: usize,
    /// How long a rank waits for the others (joining, each collective).
    pub timeout_seconds: u64,
}

impl Default for Distributed {
    fn default() -> Self {
        Self {
            nproc_per_node: 1,
            timeout_seconds: rlhf_stages::dist::DEFAULT_TIMEOUT_S,
        }
    }
}

/// One stage as written: its kind's settings (the kinds are registered
/// in `rlhf_stages::kinds::all()`) and its thread count.
#[derive(Debug, Clone)]
pub struct StageFile {
    pub config: Box<dyn StageConfig>,
    /// libtorch's threads for this stage: how fast, never what it computes
    /// on one machine, so it is left out of the stage's key.
    pub threads: Option<usize>,
    /// Where it runs, and its Slurm job's resources: like `threads`, not
    /// part of its key.
    pub executor: Option<ExecutorKind>,
    pub slurm: Option<SlurmSettings>,
}

impl StageFile {
    pub fn kind(&self) -> &'static str {
        self.config.kind()
    }

    /// The settings as kind `C`'s config, if the stage is of that kind.
    pub fn get<C: 'static>(&self) -> Option<&C> {
        self.config.as_any().downcast_ref()
    }
}

impl Serialize for StageFile {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.config.to_json().serialize(s)
    }
}

/// A checked experiment with absolute paths.
#[derive(Debug, Clone)]
pub struct Experiment {
    pub file: PathBuf,
    pub spec: ExperimentFile,
    /// `out_dir/<name>`.
    pub run_dir: PathBuf,
    /// Each stage's upstream stages (the ones whose checkpoints it reads).
    pub deps: BTreeMap<String, BTreeSet<String>>,
}

impl Experiment {
    /// Reads, parses and resolves an experiment file; `overrides` are
    /// `dotted.key=value` settings applied before parsing.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        // An experiment file is a page of YAML, not a device or a FIFO.
        if path.exists() {
            rlhf_datasets::files::bounded_size(path, 16 << 20, "the limit for an experiment file")
                .map_err(&invalid)?;
        }
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut value: serde_norway::Value = serde_norway::from_str(&text)
            .map_err(|e| invalid(pinpoint_duplicate_key(&text, &e.to_string())))?;
        for o in overrides {
            apply_override(&mut value, o).map_err(|m| invalid(format!("--set {o}: {m}")))?;
        }
        let swept = value.get("sweep").is_some();
        crate::experiment::sweep::check_overrides(&value, overrides).map_err(&invalid)?;
        let refs = stage_refs(&value);
        crate::experiment::sweep::expand(&mut value, refs).map_err(&invalid)?;
        // Parse from the text when nothing was overridden or swept, so that
        // errors carry the file's line and column.
        // With overrides or sweeps, the changed value is parsed from its
        // own text too: serde names a field's path only when it reads text.
        let spec: ExperimentFile = if overrides.is_empty() && !swept {
            serde_norway::from_str(&text)
        } else {
            from_value_with_paths(value)
        }
        .map_err(|e| {
            let message = dotted(&e.to_string());
            if overrides.is_empty() && !swept {
                invalid(locate_stage_error(
                    &text,
                    &pinpoint_unknown_field(&text, &message),
                ))
            } else {
                invalid(place_error(message, overrides, None))
            }
        })?;
        Self::resolve(path, &text, spec, overrides)
    }

    fn resolve(
        path: &Path,
        text: &str,
        mut spec: ExperimentFile,
        overrides: &[String],
    ) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message: place_error(message, overrides, Some(text)),
        };
        check_names_and_settings(text, &spec).map_err(&invalid)?;
        spec.model
            .validate()
            .map_err(|e| invalid(format!("model: {e}")))?;
        rlhf_stages::model::device::check_device_spec(&spec.device)
            .map_err(|e| invalid(format!("device: {e}")))?;
        // Absolute, so paths mean the same in child processes and overrides.
        let base = path.parent().map(Path::to_owned).unwrap_or_default();
        let base = std::path::absolute(if base.as_os_str().is_empty() {
            Path::new(".")
        } else {
            &base
        })
        .map_err(|e| invalid(format!("cannot resolve the file's folder: {e}")))?;
        let abs = |p: &Path| absolute_from(&base, p);
        spec.out_dir = abs(&spec.out_dir);
        spec.tokenizer = spec.tokenizer.as_deref().map(abs);
        if let Some(kind) = spec
            .tokenizer
            .as_deref()
            .and_then(rlhf_datasets::files::not_a_regular_file)
        {
            return Err(invalid(format!(
                "tokenizer: {} is {kind}, not a regular file",
                spec.tokenizer.as_ref().expect("checked").display()
            )));
        }
        let run_dir = spec.out_dir.join(&spec.name);
        let stage_names: Vec<String> = spec.stages.keys().cloned().collect();
        let mut deps = BTreeMap::new();
        for (name, stage) in spec.stages.iter_mut() {
            let places = Places {
                stage: name,
                stages: &stage_names,
                run_dir: &run_dir,
                base: &base,
            };
            let refs = places.resolve(&mut *stage.config).map_err(&invalid)?;
            let seed = stage.config.seed_mut();
            seed.get_or_insert(spec.seed);
            stage
                .config
                .validate()
                .map_err(|e| invalid(stage_error(name, e)))?;
            let ranks = spec.distributed.nproc_per_node;
            let shared = stage.config.shared_batches();
            if let Some((field, batch)) = shared.iter().find(|(_, b)| b % ranks != 0) {
                return Err(invalid(format!(
                    "stages.{name}.{field}: {batch} does not divide among the {ranks} ranks of distributed.nproc_per_node (each rank takes an equal share of every batch)"
                )));
            }
            deps.insert(name.clone(), refs);
        }
        if let Some(l) = &mut spec.rounds {
            if let Labeller::Web {
                guidelines: Some(g),
                ..
            } = &mut l.labeller
            {
                *g = abs(g);
            }
            check_loop(l, &spec.stages).map_err(|m| invalid(format!("loop: {m}")))?;
            l.prompts = abs(&l.prompts);
        }
        Ok(Self {
            file: path.to_owned(),
            spec,
            run_dir,
            deps,
        })
    }

    /// How many ranks `rlhf run` starts for stage `name`: the experiment's
    /// `distributed.nproc_per_node` for kinds that train data-parallel.
    pub fn ranks(&self, name: &str) -> usize {
        match self.spec.stages.get(name) {
            Some(s) if !s.config.shared_batches().is_empty() => {
                self.spec.distributed.nproc_per_node
            }
            _ => 1,
        }
    }

    /// A stage's batch arithmetic for `rlhf plan`: global batch, per rank,
    /// accumulation.
    pub fn batch_arithmetic(&self, name: &str) -> Option<String> {
        let stage = self.spec.stages.get(name)?;
        let ranks = self.ranks(name);
        if let Some((batch, accum)) = stage.config.batch() {
            return Some(format!(
                "global batch {} = {ranks} rank(s) x {} per micro-batch x {accum} accumulation",
                batch * accum,
                batch / ranks
            ));
        }
        let parts: Vec<String> = stage
            .config
            .shared_batches()
            .iter()
            .map(|(field, n)| format!("{field} {n} = {ranks} rank(s) x {}", n / ranks))
            .collect();
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    pub fn stage(&self, name: &str) -> Result<&StageFile, ConfigError> {
        self.spec
            .stages
            .get(name)
            .ok_or_else(|| ConfigError::Invalid {
                path: self.file.clone(),
                message: format!(
                    "no stage named \"{name}\"; the file defines: {}",
                    self.spec
                        .stages
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }

    /// Where stage `name` runs, and its Slurm settings.
    pub fn executor(&self, name: &str) -> (ExecutorKind, SlurmSettings) {
        let stage = self.spec.stages.get(name);
        let kind = stage.and_then(|s| s.executor).unwrap_or(self.spec.executor);
        let slurm = stage
            .and_then(|s| s.slurm.as_ref())
            .map_or_else(|| self.spec.slurm.clone(), |s| s.over(&self.spec.slurm));
        (kind, slurm)
    }

    /// The folder a stage writes.
    pub fn stage_dir(&self, name: &str) -> PathBuf {
        self.run_dir.join(crate::experiment::sweep::folder_of(name))
    }

    /// Fails unless `path` lies strictly inside the run folder (checked on
    /// the path's text, before anything is created or removed).
    pub fn check_inside(&self, path: &Path) -> anyhow::Result<()> {
        let path = clean_path(path);
        let inside = path.starts_with(&self.run_dir)
            && path != self.run_dir
            && !path
                .components()
                .any(|c| c == std::path::Component::ParentDir);
        anyhow::ensure!(
            inside,
            "{}: refusing to touch {}: it is not inside the run folder {}",
            self.file.display(),
            path.display(),
            self.run_dir.display()
        );
        Ok(())
    }
}

/// Stages by name, each parsed on its own by its `kind`: through serde's
/// tagged enum a field's path is lost, parsed alone an error names it
/// (`stages.rm.epochs: invalid type: ...`).
fn stages_by_name<'de, D>(d: D) -> Result<BTreeMap<String, StageFile>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::de::Error;
    let raw = BTreeMap::<String, serde_norway::Value>::deserialize(d)?;
    raw.into_iter()
        .map(|(name, value)| match parse_stage(value) {
            Ok(stage) => Ok((name, stage)),
            Err(m) => Err(D::Error::custom(format!("stages.{name}{m}"))),
        })
        .collect()
}

/// For a sweep: where each stage of the raw file names another stage it
/// reads (its model settings whose value is a stage's name).
fn stage_refs(
    root: &serde_norway::Value,
) -> impl Fn(&str, &serde_norway::Value) -> crate::experiment::sweep::Refs {
    let names: BTreeSet<String> = root
        .get("stages")
        .and_then(serde_norway::Value::as_mapping)
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    move |_, value| {
        let Ok(mut stage) = parse_stage(value.clone()) else {
            // Its error is reported when the file is parsed.
            return vec![];
        };
        stage
            .config
            .paths()
            .into_iter()
            .filter(|p| p.role != PathRole::Data)
            .filter_map(|p| {
                let s = p.get()?.to_string_lossy().into_owned();
                names.contains(&s).then(|| (p.field.to_owned(), s))
            })
            .collect()
    }
}

/// One stage's mapping as its kind's config; an error starts with the
/// field's path (`.epochs: ...`) or `: ` for the stage itself.
fn parse_stage(value: serde_norway::Value) -> Result<StageFile, String> {
    let registered = rlhf_stages::kinds::all();
    let kinds = registered
        .iter()
        .map(|k| format!("`{}`", k.name))
        .collect::<Vec<_>>()
        .join(", ");
    let serde_norway::Value::Mapping(mut map) = value else {
        let names: Vec<&str> = registered.iter().map(|k| k.name).collect();
        let (last, rest) = names.split_last().expect("kinds are registered");
        return Err(format!(
            ": expected a mapping: `kind` ({} or {last}) and the stage's settings",
            rest.join(", ")
        ));
    };
    let kind = map
        .remove("kind")
        .ok_or_else(|| ": missing field `kind`".to_owned())?;
    let Some(name) = kind.as_str() else {
        let shown = serde_norway::to_string(&kind).unwrap_or_default();
        return Err(format!(
            ".kind: expected a name, one of {kinds}; got `{}`",
            shown.trim()
        ));
    };
    let Some(kind) = rlhf_stages::kinds::kind(name) else {
        return Err(format!(
            ".kind: unknown variant `{name}`, expected one of {kinds}"
        ));
    };
    let threads = match map.remove("threads") {
        None | Some(serde_norway::Value::Null) => None,
        Some(v) => match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
            Some(n) if (1..=crate::threads::MAX_THREADS).contains(&n) => Some(n),
            _ => {
                let shown = serde_norway::to_string(&v).unwrap_or_default();
                return Err(format!(
                    ".threads: must be a whole number in [1, {}], got {}",
                    crate::threads::MAX_THREADS,
                    shown.trim()
                ));
            }
        },
    };
    let executor = take_setting::<ExecutorKind>(&mut map, "executor")?;
    let slurm = take_setting::<SlurmSettings>(&mut map, "slurm")?;
    if let Some(s) = &slurm {
        s.check().map_err(|m| format!(".{m}"))?;
    }
    let config = kind.parse(map).map_err(|message| {
        // Line numbers of the re-serialised text would mislead; the
        // caller finds the line in the file.
        let message = message
            .rfind(" at line ")
            .map_or(message.as_str(), |i| &message[..i]);
        match message.split_once(": ") {
            Some((path, rest)) if !path.is_empty() && !path.contains(' ') => {
                format!(".{path}: {rest}")
            }
            _ => format!(": {message}"),
        }
    })?;
    Ok(StageFile {
        config,
        threads,
        executor,
        slurm,
    })
}

/// A setting every stage kind takes, removed from the stage's mapping;
/// an error names it and the field inside it (`.slurm.cpus_per_task: ...`).
fn take_setting<T: serde::de::DeserializeOwned>(
    map: &mut serde_norway::Mapping,
    field: &str,
) -> Result<Option<T>, String> {
    match map.remove(field) {
        None | Some(serde_norway::Value::Null) => Ok(None),
        Some(v) => from_value_with_paths(v).map(Some).map_err(|e| {
            let message = e.to_string();
            let message = without_position(&message);
            match message.split_once(": ") {
                Some((path, rest)) if !path.contains(' ') => format!(".{field}.{path}: {rest}"),
                _ => format!(".{field}: {message}"),
            }
        }),
    }
}

/// Parses a YAML value through its text, so that an error names the path
/// of the field at fault (`distributed.nproc_per_node: ...`), as parsing
/// the file does; the line and column of that text, which would mislead,
/// are dropped.
fn from_value_with_paths<T: serde::de::DeserializeOwned>(
    value: serde_norway::Value,
) -> Result<T, serde_norway::Error> {
    let text = match serde_norway::to_string(&value) {
        Ok(t) => t,
        Err(_) => return serde_norway::from_value(value),
    };
    serde_norway::from_str(&text).map_err(|e| {
        <serde_norway::Error as serde::de::Error>::custom(without_position(&e.to_string()))
    })
}

/// `model: layer_norm_epsilon: ...` (serde's field, then a custom
/// error's own field) as one path: `model.layer_norm_epsilon: ...`.
fn dotted(message: &str) -> String {
    let mut path: Vec<&str> = Vec::new();
    let mut rest = message;
    while let Some((head, tail)) = rest.split_once(": ") {
        let is_path = !head.is_empty()
            && head
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.[]=-".contains(c));
        if !is_path {
            break;
        }
        path.push(head);
        rest = tail;
    }
    match path.is_empty() {
        true => message.to_owned(),
        false => format!("{}: {rest}", path.join(".")),
    }
}

/// A serde message without its " at line N column M" (of re-serialised
/// text, not the user's file).
fn without_position(message: &str) -> &str {
    message
        .rfind(" at line ")
        .map_or(message, |i| &message[..i])
}

/// A stage's validation error, named by the stage and, for a setting, by
/// its path inside the stage.
fn stage_error(name: &str, e: StageError) -> String {
    match e {
        StageError::Setting { field, message } => format!("stages.{name}.{field}: {message}"),
        other => format!("stages.{name}: {other}"),
    }
}

/// What a stage's path settings resolve against.
struct Places<'a> {
    stage: &'a str,
    stages: &'a [String],
    run_dir: &'a Path,
    /// The experiment file's folder: relative paths start there.
    base: &'a Path,
}

impl Places<'_> {
    fn abs(&self, p: &Path) -> PathBuf {
        absolute_from(self.base, p)
    }

    /// Makes a stage's data paths absolute and its model references
    /// checkpoint folders; returns the stages it reads from.
    fn resolve(&self, stage: &mut dyn StageConfig) -> Result<BTreeSet<String>, String> {
        let name = self.stage;
        let mut refs = BTreeSet::new();
        for mut p in stage.paths() {
            let field = p.field;
            let Some(value) = p.get().cloned() else {
                if p.is_required() {
                    return Err(format!(
                        "stages.{name}: missing field `{field}` ({})",
                        p.about
                    ));
                }
                continue;
            };
            if p.role == PathRole::Data {
                let file = self.abs(&value);
                if let Some(kind) = rlhf_datasets::files::not_a_regular_file(&file) {
                    return Err(format!(
                        "stages.{name}.{field}: {} is {kind}, not a regular file",
                        file.display()
                    ));
                }
                p.set(file);
                continue;
            }
            // A model reference: another stage's name (its final
            // checkpoint, and a dependency) or a model folder on disk.
            let s = value.to_string_lossy().into_owned();
            if self.stages.contains(&s) {
                if s == name {
                    return Err(format!(
                        "stages.{name}.{field}: a stage cannot start from itself"
                    ));
                }
                let folder = crate::experiment::sweep::folder_of(&s);
                p.set(
                    self.run_dir
                        .join(folder)
                        .join(rlhf_stages::train::FINAL_DIR),
                );
                refs.insert(s);
            } else {
                let folder = self.abs(&value);
                if !folder.is_dir() {
                    return Err(format!(
                        "stages.{name}.{field}: \"{s}\" is neither a stage of this file ({}) nor an existing model folder",
                        self.stages.join(", ")
                    ));
                }
                p.set(folder);
            }
        }
        Ok(refs)
    }
}

/// The `--set` that wrote the setting a `PATH: ...` error names, if one
/// did (the last one wins, as when they are applied).
fn set_by_override<'a>(message: &str, overrides: &'a [String]) -> Option<&'a str> {
    let (path, _) = message.split_once(": ")?;
    overrides
        .iter()
        .rev()
        .find(|o| {
            o.split_once('=').is_some_and(|(key, _)| {
                let key = key.trim();
                path == key || path.starts_with(&format!("{key}."))
            })
        })
        .map(String::as_str)
}

/// The names that become folders, and the run-wide settings' ranges.
fn check_names_and_settings(text: &str, spec: &ExperimentFile) -> Result<(), String> {
    if !is_folder_name(&spec.name) {
        let at = at_key_line(text, "name");
        return Err(format!(
            "name \"{}\" {FOLDER_NAME} (it names the run folder){at}",
            spec.name
        ));
    }
    if spec.stages.is_empty() {
        return Err("stages: no stages defined".into());
    }
    if let Some(bad) = spec
        .stages
        .keys()
        .find(|n| !is_folder_name(n) && !crate::experiment::sweep::is_variant_name(n))
    {
        let at = at_key_line(text, bad);
        return Err(format!(
            "stages: the stage name \"{bad}\" {FOLDER_NAME} (it names the stage's folder){at}"
        ));
    }
    if let Some(taken) = spec
        .stages
        .keys()
        .find(|n| crate::run_folder::is_reserved(n))
    {
        let at = at_key_line(text, taken);
        return Err(format!(
            "stages: the stage name \"{taken}\" is taken by the run folder's own files \
             (report/, round-N/, rounds.jsonl, hidden files); choose another{at}"
        ));
    }
    if let JudgeSpec::Command {
        command,
        timeout_seconds,
    } = &spec.judge
    {
        if command.is_empty() || command[0].is_empty() {
            return Err(format!(
                "judge.command: name the program to run, e.g. [python3, judge.py]{}",
                at_key_line(text, "judge")
            ));
        }
        if !(*timeout_seconds > 0.0 && *timeout_seconds <= 1e9) {
            return Err(format!(
                "judge.timeout_seconds: must be in (0, 1e9] seconds, got {}{}",
                rlhf_stages::check::shown(*timeout_seconds),
                at_key_line(text, "judge")
            ));
        }
    }
    spec.slurm.check()?;
    if !(1..=1024).contains(&spec.max_parallel) {
        return Err(format!(
            "max_parallel: must be in [1, 1024] (stages run at once), got {}{}",
            spec.max_parallel,
            at_key_line(text, "max_parallel")
        ));
    }
    let d = &spec.distributed;
    if !(1..=1024).contains(&d.nproc_per_node) || !(1..=86_400).contains(&d.timeout_seconds) {
        return Err(format!(
            "distributed: nproc_per_node must be in [1, 1024] and timeout_seconds in [1, 86400], got {} and {}{}",
            d.nproc_per_node,
            d.timeout_seconds,
            at_key_line(text, "distributed")
        ));
    }
    if let Some(n) = spec.threads {
        crate::threads::check(n, "threads")
            .map_err(|e| format!("{e}{}", at_key_line(text, "threads")))?;
    }
    Ok(())
}

/// A labeller's time limit: above 0, at most about 30 years (a longer
/// one would overflow the clock's arithmetic).
fn check_timeout(seconds: f64) -> Result<(), String> {
    if seconds.is_finite() && seconds > 0.0 && seconds <= 1e9 {
        return Ok(());
    }
    Err(format!(
        "labeller.timeout_seconds must be in (0, 1e9], got {}",
        rlhf_stages::check::shown(seconds)
    ))
}

/// The kinds that play `role` in a loop, for messages: `ppo or grpo`.
fn kinds_with_role(role: LoopRole) -> String {
    let names: Vec<&str> = rlhf_stages::kinds::all()
        .into_iter()
        .filter(|k| k.loop_role == role)
        .map(|k| k.name)
        .collect();
    names.join(" or ")
}

/// The loop's settings, checked with the rest before any stage runs.
fn check_loop(l: &LoopFile, stages: &BTreeMap<String, StageFile>) -> Result<(), String> {
    let kinds: Vec<&str> = l
        .repeat
        .iter()
        .map(|n| stages.get(n).map_or("missing", |s| s.kind()))
        .collect();
    let roles: Vec<Option<LoopRole>> = kinds
        .iter()
        .map(|k| rlhf_stages::kinds::kind(k).map(|k| k.loop_role))
        .collect();
    use LoopRole::{LearnsFromRankings, OptimisesScorer, Scorer};
    if !matches!(
        roles.as_slice(),
        [Some(Scorer), Some(OptimisesScorer)] | [Some(LearnsFromRankings)]
    ) {
        return Err(format!(
            "repeat must name a reward stage then a stage that optimises it ({}), or one stage that learns from rankings ({}), got {:?} (kinds {kinds:?})",
            kinds_with_role(OptimisesScorer),
            kinds_with_role(LearnsFromRankings),
            l.repeat
        ));
    }
    let dpo = l
        .repeat
        .first()
        .and_then(|n| stages.get(n)?.get::<rlhf_stages::kinds::dpo::DpoConfig>());
    if dpo.is_some_and(|d| d.policy.is_none()) {
        return Err(
            "repeat: [dpo] needs the dpo stage's `policy` (the model the rounds start from)".into(),
        );
    }
    // Each round points GRPO at its new reward model: no other scorer.
    let grpo = l
        .repeat
        .get(1)
        .and_then(|n| stages.get(n)?.get::<rlhf_stages::rl::grpo::GrpoConfig>());
    if grpo.is_some_and(|g| g.gold_reward || g.ranker_command.is_some()) {
        return Err("repeat: [rm, grpo] scores each round with the round's reward model; drop the grpo stage's `gold_reward` and `ranker_command`".into());
    }
    // A round's folder holds its own `collect/` and preferences beside the
    // repeated stages.
    if let Some(taken) = l
        .repeat
        .iter()
        .find(|n| ["collect", "preferences.parquet"].contains(&n.as_str()))
    {
        return Err(format!(
            "repeat: the stage name \"{taken}\" is taken inside each round's folder (collect/, preferences.parquet); rename the stage"
        ));
    }
    for (name, value, lo, hi) in [
        ("rounds", l.rounds, 1, 10_000),
        ("k", l.k, 2, 1024),
        ("prompts_per_round", l.prompts_per_round, 1, 1 << 20),
    ] {
        if !(lo..=hi).contains(&value) {
            return Err(format!("{name} must be in [{lo}, {hi}], got {value}"));
        }
    }
    check_labeller(&l.labeller)?;
    l.sampling.validate().map_err(|e| e.to_string())?;
    if let Some(bad) = l
        .set
        .iter()
        .find(|o| !o.contains('=') || o.starts_with('='))
    {
        return Err(format!(
            "set: \"{bad}\" is not KEY=VALUE (e.g. \"stages.rm.epochs=1\")"
        ));
    }
    Ok(())
}

/// The loop's labeller: a program that exists, a web page's settings.
fn check_labeller(labeller: &Labeller) -> Result<(), String> {
    if let Labeller::Command {
        command,
        timeout_seconds,
    } = labeller
    {
        let Some(program) = command.first() else {
            return Err("labeller.command is empty".into());
        };
        if !program_exists(program) {
            return Err(format!(
                "labeller.command: program \"{program}\" not found (neither a file nor on PATH)"
            ));
        }
        check_timeout(*timeout_seconds)?;
    }
    if let Labeller::Web {
        labels_per_group,
        bind,
        timeout_seconds,
        guidelines,
    } = labeller
    {
        if let Some(kind) = guidelines
            .as_deref()
            .and_then(rlhf_datasets::files::not_a_regular_file)
        {
            return Err(format!(
                "labeller.guidelines: {kind}, expected a Markdown file"
            ));
        }
        if !(1..=100).contains(labels_per_group) {
            return Err(format!(
                "labeller.labels_per_group must be in 1..=100, got {labels_per_group}"
            ));
        }
        if bind.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!(
                "labeller.bind: \"{bind}\" is not an address such as 127.0.0.1:8080"
            ));
        }
        check_timeout(*timeout_seconds)?;
    }
    Ok(())
}

/// Where a setting's error comes from: `(from --set KEY=VALUE)` when a
/// `--set` wrote it, else its line in `text` (when the file's lines still
/// describe what was parsed).
fn place_error(message: String, overrides: &[String], text: Option<&str>) -> String {
    match (set_by_override(&message, overrides), text) {
        (Some(o), _) => format!("{message} (from --set {o})"),
        (None, Some(text)) => locate_stage_error(text, &message),
        (None, None) => message,
    }
}

/// Whether a command's program is a file (a path) or found on PATH.
fn program_exists(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// Appends the file line of a `stages.NAME[.FIELD...]: ...` error: the
/// field's line where it is written on its own line in the stage's
/// block, else the stage's.
fn locate_stage_error(text: &str, message: &str) -> String {
    let Some(rest) = message.strip_prefix("stages.") else {
        return message.to_owned();
    };
    if message.contains(" at line ") {
        return message.to_owned();
    }
    let Some((path, _)) = rest.split_once(": ") else {
        return message.to_owned();
    };
    let mut parts = path.split('.');
    let Some(name) = parts.next() else {
        return message.to_owned();
    };
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let key_line =
        |from: usize, to: usize, key: &str| (from..to).find(|&i| is_key_line(lines[i], key));
    let Some(stages) = (0..lines.len()).find(|&i| lines[i].trim_end() == "stages:") else {
        return message.to_owned();
    };
    let Some(stage) = key_line(stages + 1, lines.len(), name) else {
        return message.to_owned();
    };
    let end = (stage + 1..lines.len())
        .find(|&i| !lines[i].trim().is_empty() && indent(lines[i]) <= indent(lines[stage]))
        .unwrap_or(lines.len());
    // An unknown field is searched for like one more part of the path.
    let mut at = stage;
    for part in parts.chain(unknown_field(message)) {
        // `epochs` or `sampling` (a list index like `ptx[0]` names its key).
        let key = part.split('[').next().unwrap_or(part);
        match key_line(at + 1, end, key) {
            Some(i) => at = i,
            None => break,
        }
    }
    format!("{message} at line {}", at + 1)
}

/// The field named by serde's "unknown field `X`" message.
fn unknown_field(message: &str) -> Option<&str> {
    message
        .split_once("unknown field `")
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(f, _)| f)
}

/// Whether a YAML line sets `key` (`key:`, `- key:`, `"key":`).
fn is_key_line(line: &str, key: &str) -> bool {
    let l = line.trim_start().trim_start_matches("- ");
    l.trim_start_matches(['"', '\''])
        .strip_prefix(key)
        .is_some_and(|r| {
            r.trim_start_matches(['"', '\''])
                .trim_start()
                .starts_with(':')
        })
}

/// Serde reports some unknown keys at their mapping's first line; point at
/// the key's own line instead.
fn pinpoint_unknown_field(text: &str, message: &str) -> String {
    let field = unknown_field(message);
    let at = message.rfind(" at line ").and_then(|i| {
        let line: usize = message[i + 9..].split_whitespace().next()?.parse().ok()?;
        Some((i, line))
    });
    let (Some(field), Some((cut, line))) = (field, at) else {
        return message.to_owned();
    };
    let found = text
        .lines()
        .enumerate()
        .skip(line.saturating_sub(1))
        .find(|(_, l)| is_key_line(l, field));
    match found {
        Some((i, _)) => format!("{} at line {}", &message[..cut], i + 1),
        None => message.to_owned(),
    }
}

/// Serde reports a duplicate key at its mapping's first line; point at
/// the key's second occurrence (the one to remove) instead.
fn pinpoint_duplicate_key(text: &str, message: &str) -> String {
    let Some((head, rest)) = message.split_once("duplicate entry with key \"") else {
        return message.to_owned();
    };
    let Some((key, place)) = rest.split_once('"') else {
        return message.to_owned();
    };
    let numbers: Vec<usize> = place
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    let [line, column] = numbers[..] else {
        return message.to_owned();
    };
    let indent = column.saturating_sub(1);
    let second = text
        .lines()
        .enumerate()
        .skip(line.saturating_sub(1))
        .filter(|(_, l)| l.len() - l.trim_start().len() == indent && is_key_line(l, key))
        .nth(1);
    match second {
        Some((i, _)) => format!("{head}duplicate entry with key \"{key}\" at line {}", i + 1),
        None => message.to_owned(),
    }
}

const FOLDER_NAME: &str = "must be one path component of at most 100 letters, digits, '-', '_' or '.', not empty, \".\" or \"..\"";

/// Whether a name can be a folder inside the run folder and nothing else.
pub fn is_folder_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// ` at line N` for the first line that sets `key`, or nothing.
fn at_key_line(text: &str, key: &str) -> String {
    // A key with a backslash or quote is written escaped in double quotes.
    let escaped = serde_json::to_string(key).unwrap_or_default();
    let escaped = escaped.trim_matches('"');
    let line = text
        .lines()
        .position(|l| is_key_line(l, key) || is_key_line(l, escaped));
    line.map_or(String::new(), |i| format!(" at line {}", i + 1))
}

/// `p` made absolute against `base` (the experiment file's folder), cleaned.
fn absolute_from(base: &Path, p: &Path) -> PathBuf {
    clean_path(&if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    })
}

/// `a/b/../c` -> `a/c`, without touching the file system (the folder may
/// not exist yet), so messages and manifests show plain paths.
fn clean_path(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    if out.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        out
    }
}

/// Applies `a.b.c=value` to a YAML tree; the value is parsed as YAML
/// (`0.05` is a number, `[1, 2]` a list, `cpu` a string).
pub fn apply_override(root: &mut serde_norway::Value, assignment: &str) -> Result<(), String> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| "expected KEY=VALUE, e.g. stages.sft.epochs=3".to_string())?;
    let value: serde_norway::Value = serde_norway::from_str(raw)
        .map_err(|e| format!("value `{raw}` is not valid YAML ({e})"))?;
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!("key `{key}` has an empty part"));
    }
    set_path(root, &parts, value)
}

/// Sets `root.a.b.c` (`parts`) to `value`, making the mappings on the way.
pub fn set_path(
    root: &mut serde_norway::Value,
    parts: &[&str],
    value: serde_norway::Value,
) -> Result<(), String> {
    let mut node = root;
    for (i, part) in parts.iter().enumerate() {
        let map = node
            .as_mapping_mut()
            .ok_or_else(|| format!("`{}` is not a mapping", parts[..i].join(".")))?;
        let k = serde_norway::Value::String((*part).to_owned());
        if i + 1 == parts.len() {
            map.insert(k, value);
            return Ok(());
        }
        node = map
            .entry(k)
            .or_insert_with(|| serde_norway::Value::Mapping(Default::default()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rlhf_stages::kinds::reward::RewardConfig;
    use rlhf_stages::kinds::sft::SftConfig;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("exp.yaml");
        std::fs::write(&p, text).unwrap();
        p
    }

    const GOOD: &str = "name: t\nseed: 3\nstages:\n  sft:\n    kind: sft\n    data: data/sft.jsonl\n    epochs: 1\n";

    #[test]
    fn resolves_paths_against_the_file_and_inherits_the_seed() {
        let d = tempfile::tempdir().unwrap();
        let e = Experiment::load(&write(d.path(), GOOD), &[]).unwrap();
        let c: &SftConfig = e.stage("sft").unwrap().get().unwrap();
        assert_eq!(c.data, d.path().join("data/sft.jsonl"));
        assert_eq!(c.train.seed, Some(3));
        assert_eq!(e.stage_dir("sft"), d.path().join("runs/t/sft"));
    }

    #[test]
    fn a_stage_without_its_data_names_the_field_and_the_stage_line() {
        let d = tempfile::tempdir().unwrap();
        let text = "name: t\nstages:\n  sft:\n    kind: sft\n    epochs: 1\n";
        let m = Experiment::load(&write(d.path(), text), &[])
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("exp.yaml")
                && m.contains("stages.sft: missing field `data`")
                && m.ends_with("at line 3"),
            "{m}"
        );
        let text =
            "name: t\nstages:\n  p:\n    kind: ppo\n    prompts: p.jsonl\n    gold_reward: true\n";
        let m = Experiment::load(&write(d.path(), text), &[])
            .unwrap_err()
            .to_string();
        assert!(m.contains("stages.p: missing field `policy`"), "{m}");
    }

    #[test]
    fn seed_zero_is_a_seed_and_an_unset_one_is_the_experiments() {
        let d = tempfile::tempdir().unwrap();
        let text = format!("{GOOD}    seed: 0\n  rm:\n    kind: reward\n    data: p.jsonl\n");
        let e = Experiment::load(&write(d.path(), &text), &[]).unwrap();
        let sft: &SftConfig = e.stage("sft").unwrap().get().unwrap();
        let rm: &RewardConfig = e.stage("rm").unwrap().get().unwrap();
        assert_eq!((sft.train.seed, rm.train.seed), (Some(0), Some(3)));
    }

    #[test]
    fn training_settings_keep_each_kinds_defaults_and_unknown_keys_list_both() {
        let d = tempfile::tempdir().unwrap();
        let text = format!("{GOOD}  rm:\n    kind: reward\n    data: p.jsonl\n");
        let e = Experiment::load(&write(d.path(), &text), &[]).unwrap();
        let sft: &SftConfig = e.stage("sft").unwrap().get().unwrap();
        let rm: &RewardConfig = e.stage("rm").unwrap().get().unwrap();
        assert_eq!(sft.train.epochs, 1, "set in the file");
        assert_eq!(sft.train.batch_size, SftConfig::default().train.batch_size);
        assert_eq!(rm.train.optimizer, RewardConfig::default().train.optimizer);
        let m = Experiment::load(&write(d.path(), &GOOD.replace("epochs", "epochz")), &[])
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("unknown field `epochz`")
                && m.contains("`data`")
                && m.contains("`grad_accum`")
                && m.ends_with("at line 7"),
            "{m}"
        );
    }

    #[test]
    fn unknown_keys_name_the_key_and_line() {
        let d = tempfile::tempdir().unwrap();
        let text = GOOD.replace("    epochs: 1\n", "    epochs: 1\n    epocs: 2\n");
        let m = Experiment::load(&write(d.path(), &text), &[])
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("exp.yaml") && m.contains("epocs") && m.contains("line 8"),
            "{m}"
        );
        let m = Experiment::load(&write(d.path(), "name: t\nstagez: {}\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(m.contains("stagez"), "{m}");
        let m = Experiment::load(
            &write(d.path(), &GOOD.replace("kind: sft", "kind: kto")),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            m.contains("kto") && m.contains("sft") && m.contains("grpo"),
            "{m}"
        );
    }

    #[test]
    fn a_bad_value_inside_a_stage_names_its_path_and_line() {
        let d = tempfile::tempdir().unwrap();
        let text = GOOD.replace(
            "    epochs: 1\n",
            "    epochs: 1\n    schedule:\n      warmup_steps: soon\n",
        );
        let m = Experiment::load(&write(d.path(), &text), &[])
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("exp.yaml")
                && m.contains("stages.sft.schedule.warmup_steps: invalid type")
                && m.ends_with("at line 9"),
            "{m}"
        );
        let text = GOOD.replace("    epochs: 1\n", "    epochs: [1]\n");
        let m = Experiment::load(&write(d.path(), &text), &[])
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("stages.sft.epochs:") && m.ends_with("at line 7"),
            "{m}"
        );
        let m = Experiment::load(&write(d.path(), GOOD), &["stages.sft.seed=x".into()])
            .unwrap_err()
            .to_string();
        assert!(m.contains("stages.sft.seed: invalid type"), "{m}");
    }

    #[test]
    fn overrides_set_nested_values_and_reject_bad_ones() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), GOOD);
        let e = Experiment::load(
            &p,
            &["stages.sft.optimizer.lr=0.01".into(), "device=cpu".into()],
        )
        .unwrap();
        let c: &SftConfig = e.stage("sft").unwrap().get().unwrap();
        assert_eq!(c.train.optimizer.lr, 0.01);
        assert_eq!(e.spec.device, "cpu");
        let m = Experiment::load(&p, &["stages.sft.epochs".into()])
            .unwrap_err()
            .to_string();
        assert!(m.contains("KEY=VALUE"), "{m}");
        let m = Experiment::load(&p, &["stages.sft.epochs=many".into()])
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("stages.sft.epochs: invalid type: string \"many\", expected usize (from --set stages.sft.epochs=many)"),
            "{m}"
        );
        let m = Experiment::load(&p, &["seed.x=1".into()])
            .unwrap_err()
            .to_string();
        assert!(m.contains("not a mapping"), "{m}");
        // A range error names the --set that wrote the value, not a line.
        let m = Experiment::load(&p, &["stages.sft.optimizer.lr=-1".into()])
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("stages.sft.optimizer.lr: must be")
                && m.ends_with("(from --set stages.sft.optimizer.lr=-1)"),
            "{m}"
        );
    }

    #[test]
    fn stage_references_resolve_to_checkpoints() {
        let d = tempfile::tempdir().unwrap();
        let text = format!("{GOOD}  rm:\n    kind: reward\n    init: sft\n    data: prefs.jsonl\n");
        let e = Experiment::load(&write(d.path(), &text), &[]).unwrap();
        let c: &RewardConfig = e.stage("rm").unwrap().get().unwrap();
        assert_eq!(
            c.init.as_deref(),
            Some(d.path().join("runs/t/sft/checkpoint").as_path())
        );
        assert_eq!(c.data, d.path().join("prefs.jsonl"));
    }

    #[test]
    fn semantic_errors_name_the_stage() {
        let d = tempfile::tempdir().unwrap();
        let m = Experiment::load(
            &write(d.path(), &GOOD.replace("epochs: 1", "batch_size: 0")),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(m.contains("stages.sft") && m.contains("batch_size"), "{m}");
        let m = Experiment::load(&write(d.path(), &GOOD.replace("name: t", "name: a/b")), &[])
            .unwrap_err()
            .to_string();
        assert!(m.contains("name"), "{m}");
    }
}

/// Property test of the parser: thousands of mutated experiment files
/// (bytes dropped, duplicated or replaced, lines swapped or cut, values
/// swapped for other YAML values) never panic; each either loads or fails
/// with an error that names the file; and a file that loads, loads the
/// same again.
#[cfg(test)]
mod fuzz {
    use super::*;
    use rand::{Rng, SeedableRng};

    const SEEDS: [&str; 2] = [
        include_str!("../../../configs/default.yaml"),
        "name: t\nseed: 3\nmodel: {n_layer: 1, n_head: 2, n_embd: 16, n_positions: 32}\nstages:\n  sft: {kind: sft, data: a.jsonl}\n  rm: {kind: reward, init: sft, data: b.jsonl}\n  ppo: {kind: ppo, policy: sft, reward_model: rm, prompts: c.jsonl}\nloop: {repeat: [rm, ppo], rounds: 1, prompts: c.jsonl, labeller: {kind: gold}}\n",
    ];
    const VALUES: [&str; 16] = [
        "-1",
        "0",
        "1e400",
        "nan",
        ".inf",
        "null",
        "~",
        "[]",
        "{}",
        "\"\"",
        "yes",
        "sft",
        "ppo",
        "[rm, ppo]",
        "{kind: sft}",
        "18446744073709551616",
    ];

    fn mutate(text: &str, rng: &mut impl Rng) -> String {
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        for _ in 0..rng.random_range(1..4) {
            let n = lines.len().max(1);
            let i = rng.random_range(0..n);
            match rng.random_range(0..7) {
                0 if !lines.is_empty() => {
                    lines.remove(i);
                }
                1 if !lines.is_empty() => {
                    let l = lines[i].clone();
                    lines.insert(i, l);
                }
                2 if n > 1 => lines.swap(i, rng.random_range(0..n)),
                3 if !lines.is_empty() => {
                    // Replace a value after a colon.
                    if let Some(c) = lines[i].find(": ") {
                        let v = VALUES[rng.random_range(0..VALUES.len())];
                        lines[i] = format!("{}: {v}", &lines[i][..c]);
                    }
                }
                4 if !lines.is_empty() => {
                    let l = &lines[i];
                    let cut = rng.random_range(0..=l.len());
                    let cut = (0..=cut)
                        .rev()
                        .find(|&c| l.is_char_boundary(c))
                        .unwrap_or(0);
                    lines[i] = l[..cut].to_owned();
                }
                5 if !lines.is_empty() => {
                    // Indentation broken.
                    let pad = [" ", "\t", "   "][rng.random_range(0..3)];
                    lines[i] = format!("{pad}{}", lines[i]);
                }
                _ => {
                    let junk = ["{", "]", ":", "- x", "&a", "*a", "!!int x", "'", "\"", "#"];
                    lines.insert(i, junk[rng.random_range(0..junk.len())].to_owned());
                }
            }
        }
        lines.join("\n") + "\n"
    }

    #[test]
    fn mutated_files_load_or_fail_cleanly_never_panic() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("fuzz.yaml");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (mut loaded, mut failed) = (0, 0);
        for round in 0..3000 {
            let seed = SEEDS[round % SEEDS.len()];
            let text = mutate(seed, &mut rng);
            std::fs::write(&path, &text).unwrap();
            let result = std::panic::catch_unwind(|| Experiment::load(&path, &[]));
            let result = result.unwrap_or_else(|_| panic!("the parser panicked on:\n{text}"));
            match result {
                Ok(first) => {
                    loaded += 1;
                    let again = Experiment::load(&path, &[]).unwrap();
                    assert_eq!(
                        serde_json::to_string(&first.spec).unwrap(),
                        serde_json::to_string(&again.spec).unwrap()
                    );
                }
                Err(e) => {
                    failed += 1;
                    let msg = e.to_string();
                    assert!(
                        msg.contains("fuzz.yaml"),
                        "error without the file name: {msg}\n{text}"
                    );
                    assert!(
                        msg.len() > "fuzz.yaml: ".len() + d.path().as_os_str().len(),
                        "{msg}"
                    );
                }
            }
        }
        // Both outcomes are exercised, not one of them only.
        assert!(
            loaded > 100 && failed > 1000,
            "loaded {loaded}, failed {failed}"
        );
    }

    #[test]
    fn random_set_overrides_never_panic() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("exp.yaml");
        std::fs::write(&path, SEEDS[1]).unwrap();
        let keys = [
            "name",
            "seed",
            "model.n_layer",
            "model.n_embd",
            "stages.sft.epochs",
            "stages.sft",
            "stages.rm.init",
            "stages.ppo.sampling.top_p",
            "loop.k",
            "loop",
            "stages",
            "x.y.z",
            "stages..sft",
            ".",
            "",
        ];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        for _ in 0..500 {
            let k = keys[rng.random_range(0..keys.len())];
            let v = VALUES[rng.random_range(0..VALUES.len())];
            let set = vec![format!("{k}={v}")];
            let r = std::panic::catch_unwind(|| Experiment::load(&path, &set));
            assert!(r.is_ok(), "--set {k}={v} panicked");
        }
    }
}
