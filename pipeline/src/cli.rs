//! The command line: every subcommand and its flags.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "rlhf",
    version,
    about = "The InstructGPT recipe (SFT -> reward model -> PPO) on your own GPT"
)]
pub struct Cli {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Threads for libtorch (default: the cores this process may use; set
    /// fewer when another process is busy on some of them).
    #[arg(long, global = true, value_name = "N")]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a randomly initialised model folder (GPT-2 or Llama layout).
    Init(InitArgs),
    /// Merge LoRA adapters into their base: a plain model folder.
    Merge(MergeArgs),
    /// People rank sampled answers: serve a round's labelling queue, make tokens.
    #[command(subcommand)]
    Label(LabelCommand),
    /// Sample answers to prompts with the KV cache.
    Generate(GenerateArgs),
    /// Per-token log-probabilities and NLL of texts (perplexity), as JSON lines.
    Score(ScoreArgs),
    /// Reward-model scores of answers, as JSON lines.
    Reward(RewardArgs),
    /// Run an experiment: every stage in dependency order, cached stages skipped.
    Run(RunArgs),
    /// Print an experiment's plan: stage order, dependencies, cache state.
    Plan(PlanArgs),
    /// Run one stage of an experiment file in this process.
    Stage(StageArgs),
    /// Score answers with the bundled task's gold judge (JSON lines in and out).
    Judge(JudgeArgs),
    /// Whether a model folder's chat template keeps earlier turns a prefix
    /// (text and tokens) of later ones, as multi-turn training needs;
    /// exits 1 when it does not.
    CheckTemplate {
        /// The model folder (tokenizer.json, tokenizer_config.json).
        model: PathBuf,
    },
    /// Evaluate a finished run: every policy and reward model on held-out
    /// data; writes <run>/report/ (JSON, Markdown, PNG plots).
    Eval(EvalArgs),
    /// Prompts with each policy's answer side by side, with their scores.
    Samples(SamplesArgs),
    /// A live page of a run folder: the DAG and each stage's state, every
    /// metric's curve as it grows, the newest rollouts, labelling progress
    /// and the report (read-only; until Ctrl-C).
    Watch {
        /// The run folder (runs/NAME), running, finished or copied here.
        run: PathBuf,
        /// Address to listen on; port 0 picks a free one.
        #[arg(long, default_value = "127.0.0.1:8700")]
        bind: std::net::SocketAddr,
    },
    /// Time one piece of work for `just bench` (one JSON line).
    #[command(hide = true)]
    Bench(BenchArgs),
    /// The bundled task's data files.
    #[command(subcommand)]
    Task(TaskCommand),
}

#[derive(Debug, Subcommand)]
pub enum LabelCommand {
    /// Serve a labelling queue's page and API (until Ctrl-C).
    Serve {
        /// The queue folder (groups.json, labels.parquet, tokens.json), or
        /// the round's folder that holds it.
        queue: PathBuf,
        /// Address to listen on; port 0 picks a free one.
        #[arg(long, default_value = "127.0.0.1:8080")]
        bind: std::net::SocketAddr,
        /// Labels each group needs (2 or more measure agreement).
        #[arg(long, default_value_t = 1)]
        labels_per_group: usize,
        /// Stop once every group has its labels.
        #[arg(long)]
        until_done: bool,
        /// Markdown shown above every prompt; default: the queue's
        /// `guidelines.md`, when it has one.
        #[arg(long)]
        guidelines: Option<PathBuf>,
    },
    /// Write a queue's groups as Label Studio tasks or Argilla records
    /// (with Label Studio, its labelling config beside them).
    Export {
        queue: PathBuf,
        #[arg(long, value_enum)]
        format: ExchangeFormat,
        /// The JSON file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Add the labels of a Label Studio or Argilla JSON export to a queue
    /// (labels already there are left as they are).
    Import {
        queue: PathBuf,
        #[arg(long, value_enum)]
        format: ExchangeFormat,
        /// The tool's JSON export.
        file: PathBuf,
    },
    /// Make (or replace) a labeller's token; prints it once.
    Token {
        name: String,
        #[arg(long)]
        queue: PathBuf,
    },
}

/// The built-in answer checkers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CheckerArg {
    Math,
    Code,
}

/// The labelling tools `rlhf label export/import` speak.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ExchangeFormat {
    LabelStudio,
    Argilla,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// A folder a LoRA stage wrote (its `adapter/` is used), or a PEFT
    /// adapter folder (`adapter_config.json`, `adapter_model.safetensors`).
    #[arg(long)]
    pub adapter: PathBuf,
    /// The base model folder; default: the one the adapter names.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Folder to write: config.json, merged model.safetensors, tokenizer.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace `--out` even if it holds files.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct RewardArgs {
    /// A reward-model folder (a checkpoint with a scalar head).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt of the answers given with --answer.
    #[arg(long, requires = "answer")]
    pub prompt: Option<String>,
    /// An answer to --prompt; repeatable.
    #[arg(long, requires = "prompt")]
    pub answer: Vec<String>,
    /// JSON lines with "prompt" and "answer" (or "text", a whole
    /// dialogue); - for stdin.
    #[arg(long)]
    pub input: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[command(flatten)]
    pub device: DeviceArg,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The experiment file (YAML).
    pub config: PathBuf,
    /// Rerun this stage and everything after it, even if cached (repeatable).
    #[arg(long)]
    pub force: Vec<String>,
    /// Run only this stage and the stages it needs.
    #[arg(long)]
    pub only: Option<String>,
    /// Override a setting: --set stages.sft.epochs=3 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The experiment file (YAML).
    pub config: PathBuf,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

#[derive(Debug, Args)]
pub struct StageArgs {
    /// The experiment file (YAML).
    #[arg(long, short, required_unless_present = "planned")]
    pub config: Option<PathBuf>,
    /// Which stage of it to run.
    #[arg(required_unless_present = "planned")]
    pub name: Option<String>,
    /// A stage as `rlhf run` planned it: its folder's stage.json (what
    /// `rlhf run` starts; --config, the name, --set and --out do not apply).
    #[arg(long, conflicts_with_all = ["config", "name", "overrides", "out"])]
    pub planned: Option<PathBuf>,
    /// Override a setting: --set stages.sft.epochs=3 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Write the stage's folder here instead of runs/<name>/<stage>.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Stop after this optimiser step as if killed (for resume tests).
    #[arg(long, hide = true)]
    pub stop_after_step: Option<i64>,
    /// Set by `rlhf run`, which keys and clears stage folders itself.
    #[arg(long, hide = true)]
    pub managed: bool,
    /// Set by `rlhf run` in a Slurm job's script: like `--managed`, but
    /// the runner is not this process's parent.
    #[arg(long, hide = true)]
    pub scheduled: bool,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The run folder (`runs/<experiment name>`).
    pub run: PathBuf,
    /// Held-out prompts (JSONL/Parquet/CSV with "prompt"); default: the
    /// run's PPO (else SFT) stage's eval_prompts.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Held-out rankings for the reward models; default: each reward
    /// stage's eval_data.
    #[arg(long)]
    pub preferences: Option<PathBuf>,
    /// Evaluate only the first N prompts.
    #[arg(long)]
    pub max_prompts: Option<usize>,
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = 24)]
    pub max_new_tokens: i64,
    /// Sampled answers per prompt for the KL estimate.
    #[arg(long, default_value_t = 4)]
    pub kl_samples: usize,
    /// Another run folder whose policies join this report (repeatable):
    /// named `<run>/<stage>`, judged against this run's reference with
    /// this run's reward model; a stage copied between the runs is shown
    /// once. The report is written into RUN.
    #[arg(long = "with", value_name = "RUN")]
    pub with: Vec<PathBuf>,
    /// A program that judges the answers (split into words as a shell
    /// would, quotes kept; run here): `{"prompt", "responses"}` JSON lines
    /// in, one `{"scores": [...]}` line each out; it fills the gold
    /// columns. Default: the bundled task's judge. A run folder's recorded
    /// judge (`judge.json`) is shown, with how to run it, never run.
    #[arg(long, value_name = "COMMAND")]
    pub judge: Option<String>,
    /// Seconds the judge may take.
    #[arg(long, default_value_t = 3600.0)]
    pub judge_timeout: f64,
    /// Check answers against the prompts' `answer` column: `math` (the
    /// final answer as an exact number) or `code` (the answer's Python run
    /// confined against the column's Python tests). Adds greedy accuracy,
    /// pass@1, pass@k and cons@k (majority vote) over `--checker-samples`
    /// answers.
    #[arg(long, value_enum)]
    pub checker: Option<CheckerArg>,
    /// Sampled answers per prompt for pass@k and cons@k.
    #[arg(long, default_value_t = 8)]
    pub checker_samples: usize,
    /// Score every policy's greedy answers with a reward program (split
    /// as a shell would; run here), speaking `reward:`'s protocol
    /// (`{prompt, response, answer}` lines in, `{score, components}`
    /// out). Adds each policy's mean score and components.
    #[arg(long, value_name = "COMMAND", conflicts_with = "reward_url")]
    pub reward_command: Option<String>,
    /// The same with a reward server (`POST` a JSON array of the items).
    #[arg(long, value_name = "URL")]
    pub reward_url: Option<String>,
    /// Seconds a call of the reward program or server may take.
    #[arg(long, default_value_t = 60.0)]
    pub reward_timeout: f64,
    /// Calls of the reward program or server at once.
    #[arg(long, default_value_t = 1)]
    pub reward_workers: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: i64,
    /// fp32, or bf16 autocast as a stage's `precision: bf16` (faster on
    /// CPUs and GPUs with bf16 units; scores move slightly).
    #[arg(long, value_enum, default_value_t = PrecisionArg::Fp32)]
    pub precision: PrecisionArg,
    #[command(flatten)]
    pub device: DeviceArg,
}

#[derive(Debug, Args)]
pub struct SamplesArgs {
    /// The run folder (`runs/<experiment name>`).
    pub run: PathBuf,
    /// How many prompts to show.
    #[arg(long, short, default_value_t = 12)]
    pub n: usize,
    /// Show only prompts where the policies' gold scores differ.
    #[arg(long)]
    pub differing: bool,
    /// Print JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
    /// Held-out prompts; default: as `rlhf eval`.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    #[arg(long, default_value_t = 24)]
    pub max_new_tokens: i64,
    #[command(flatten)]
    pub device: DeviceArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchMode {
    Train,
    Generate,
    Ppo,
    Dpo,
    Grpo,
    Matmul,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(value_enum)]
    pub mode: BenchMode,
    /// A model folder (HF GPT-2 or rlhf) for generate and ppo; default: a
    /// random model of the shape below.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// generate: a JSON file {"prompts": [[ids]], "eos": id, "pad": id},
    /// answered in batches until EOS; default: random prompts, no early stop.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// dpo: rankings as the dpo stage reads them; grpo: prompt rows
    /// (`{prompt}` or `{messages}`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// grpo: the reward model folder that scores answers.
    #[arg(long)]
    pub reward_model: Option<PathBuf>,
    /// grpo: answers per prompt.
    #[arg(long, default_value_t = 8)]
    pub group_size: i64,
    /// generate, train, dpo, grpo: LoRA adapters of this rank on every
    /// projection of --model (its base frozen); 0: none.
    #[arg(long, default_value_t = 0)]
    pub lora_r: i64,
    /// train: activation checkpointing (the stage setting
    /// `gradient_checkpointing: true`).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    #[arg(long, default_value_t = 4)]
    pub n_layer: i64,
    #[arg(long, default_value_t = 4)]
    pub n_head: i64,
    #[arg(long, default_value_t = 128)]
    pub n_embd: i64,
    #[arg(long, default_value_t = 256)]
    pub n_positions: i64,
    #[arg(long, default_value_t = 264)]
    pub vocab_size: i64,
    #[arg(long, default_value_t = 16)]
    pub batch: i64,
    #[arg(long, default_value_t = 128)]
    pub seq: i64,
    #[arg(long, default_value_t = 16)]
    pub prompt_len: i64,
    #[arg(long, default_value_t = 32)]
    pub new_tokens: i64,
    #[arg(long, default_value_t = 8)]
    pub minibatch: i64,
    /// Untimed repetitions first.
    #[arg(long, default_value_t = 2)]
    pub warmup: i64,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub steps: i64,
    /// Matrix size for matmul.
    #[arg(long, default_value_t = 1024)]
    pub size: i64,
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// fp32, or bf16 (autocast; matmul: bfloat16 operands).
    #[arg(long, value_enum, default_value_t = PrecisionArg::Fp32)]
    pub precision: PrecisionArg,
    #[command(flatten)]
    pub device: DeviceArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PrecisionArg {
    Fp32,
    Bf16,
}

impl From<PrecisionArg> for rlhf_stages::model::precision::Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::Fp32 => Self::Fp32,
            PrecisionArg::Bf16 => Self::Bf16,
        }
    }
}

#[derive(Debug, Args)]
pub struct JudgeArgs {
    /// JSON lines with "prompt" and "answer"; - for stdin (the default).
    #[arg(long, default_value = "-")]
    pub input: PathBuf,
    /// Judge one answer given on the command line (with --answer).
    #[arg(long, requires = "answer")]
    pub prompt: Option<String>,
    #[arg(long, requires = "prompt")]
    pub answer: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Write the task's files (demonstrations, rankings, prompts).
    Generate {
        /// Output folder.
        #[arg(long, default_value = "datasets/task")]
        out: PathBuf,
        #[arg(long)]
        seed: Option<u64>,
        /// Demonstrations to write (default 6000).
        #[arg(long)]
        sft_examples: Option<usize>,
        /// Prompts ranked by the noisy labeller (default in the task's README).
        #[arg(long)]
        preference_prompts: Option<usize>,
        /// Replace the task's files where they already exist.
        #[arg(long)]
        force: bool,
    },
    /// Write a verifiable task: arithmetic prompts with exact answers
    /// (`{prompt, answer}`, for `reward: {checker: math}`) and noisy
    /// demonstrations to fine-tune on first.
    Arithmetic(TaskFilesArgs),
    /// Write a tool-use task: products of two-digit numbers
    /// (`{prompt, answer}`) for a multi-turn stage whose environment is a
    /// calculator (`configs/calculator_env.py`), and demonstrations that
    /// call it only some of the time.
    Calculator(TaskFilesArgs),
}

/// Where a generated task goes, and its size.
#[derive(Debug, Args)]
pub struct TaskFilesArgs {
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Prompts for RL (default 2000).
    #[arg(long)]
    pub prompts: Option<usize>,
    /// Replace the files where they already exist.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HeadArg {
    Lm,
    Scalar,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Folder to write (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace `--out` even if it holds files.
    #[arg(long)]
    pub force: bool,
    #[arg(long, default_value_t = 4)]
    pub n_layer: i64,
    #[arg(long, default_value_t = 4)]
    pub n_head: i64,
    #[arg(long, default_value_t = 128)]
    pub n_embd: i64,
    #[arg(long, default_value_t = 256)]
    pub n_positions: i64,
    /// Vocabulary size; default: the tokenizer's, rounded up to a multiple of 8.
    #[arg(long)]
    pub vocab_size: Option<i64>,
    /// An HF tokenizer.json (or a folder with one); default: built-in bytes.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = HeadArg::Lm)]
    pub head: HeadArg,
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// gpt2, or llama (RMSNorm, rotary positions, SwiGLU, grouped-query
    /// attention; n_embd, n_head, n_layer, n_positions map to HF's
    /// hidden_size, num_attention_heads, num_hidden_layers,
    /// max_position_embeddings).
    #[arg(long, value_enum, default_value_t = LayoutArg::Gpt2)]
    pub layout: LayoutArg,
    /// Llama layout: key/value heads (grouped-query attention); default
    /// half of n_head when it divides.
    #[arg(long)]
    pub kv_heads: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LayoutArg {
    Gpt2,
    Llama,
}

#[derive(Debug, Args)]
pub struct DeviceArg {
    /// auto (CUDA if present), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A model folder (rlhf checkpoint or HF GPT-2).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt text; repeat for a batch.
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    /// 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// 0 keeps all tokens.
    #[arg(long, default_value_t = 0)]
    pub top_k: i64,
    /// 1 keeps all tokens.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: i64,
    /// Keep sampling past EOS.
    #[arg(long)]
    pub ignore_eos: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// Print JSON lines (prompt, answer, token ids, finished) instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArg,
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// A model folder (rlhf checkpoint or HF GPT-2).
    #[arg(long)]
    pub model: PathBuf,
    /// Text to score; repeatable.
    #[arg(long)]
    pub text: Vec<String>,
    /// JSON lines with a "text" (string) or "ids" (token ids) field; - for stdin.
    #[arg(long)]
    pub input: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
