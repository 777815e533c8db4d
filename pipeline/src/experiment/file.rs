//! The experiment file as serde reads it: the structs that mirror it, and
//! each stage parsed on its own by its kind, so that an error keeps its
//! field's path.

use super::*;

/// The file as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentFile {
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    /// Run the whole experiment once per seed, each in its own run folder
    /// (`<out_dir>/<name>/seed-N/`), sharing nothing; `seed` is then
    /// unused. `rlhf eval <out_dir>/<name>` reports the spread over them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seeds: Vec<u64>,
    /// When a finished stage is flagged as not learning (its summary's
    /// `flags`), start no stage that depends on it; a stage's own
    /// `fail_if_not_learning` asks the same for that stage alone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fail_if_not_learning: bool,
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
    /// A reward stage of this experiment trained on held-out labels: its
    /// score of each answer is the gold score. No stage may read it, so no
    /// policy ever optimises (or is selected by) its judge.
    RewardModel { stage: String },
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

pub(super) fn default_labeller_timeout() -> f64 {
    3600.0
}

pub(super) fn default_prompts_per_round() -> usize {
    200
}

pub(super) fn default_k() -> usize {
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
    /// A reward model ranks the answers by its score (equal scores tie): a
    /// stage of this experiment, or a model folder. A stand-in for fresh
    /// human labels, such as one trained on labels the policies' own
    /// reward model never saw.
    RewardModel { model: PathBuf },
}

impl Labeller {
    /// `gold`, `command`, `web` or `reward_model`, as `kind:` names it.
    pub fn name(&self) -> &'static str {
        match self {
            Labeller::Gold => "gold",
            Labeller::Command { .. } => "command",
            Labeller::Web { .. } => "web",
            Labeller::RewardModel { .. } => "reward_model",
        }
    }
}

pub(super) fn default_labels_per_group() -> usize {
    1
}

pub(super) fn default_bind() -> String {
    "127.0.0.1:8080".into()
}

pub(super) fn default_web_timeout() -> f64 {
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

pub(super) fn default_max_parallel() -> usize {
    1
}

pub(super) fn default_device() -> String {
    "auto".into()
}

pub(super) fn default_out_dir() -> PathBuf {
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

/// Stages by name, each parsed on its own by its `kind`: through serde's
/// tagged enum a field's path is lost, parsed alone an error names it
/// (`stages.rm.epochs: invalid type: ...`).
pub(super) fn stages_by_name<'de, D>(d: D) -> Result<BTreeMap<String, StageFile>, D::Error>
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

/// One stage's mapping as its kind's config; an error starts with the
/// field's path (`.epochs: ...`) or `: ` for the stage itself.
pub(super) fn parse_stage(value: serde_norway::Value) -> Result<StageFile, String> {
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
pub(super) fn take_setting<T: serde::de::DeserializeOwned>(
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
pub(super) fn from_value_with_paths<T: serde::de::DeserializeOwned>(
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
