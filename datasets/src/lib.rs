//! Files -> examples -> token batches: loaders, schemas, tokenizers, the
//! bundled task. No model code lives here.
//!
//! - [`load`]: Polars readers (JSONL, JSONL.gz, Parquet, CSV) and column checks.
//! - [`schema`]: SFT records (`{prompt, completion}`, `{messages}`), chat template.
//! - [`hh`]: HH-RLHF dialogues (`\n\nHuman: …`) as messages, rendered in a model's chat format.
//! - [`batch`]: truncation, seeded shuffles and splits, padded batches.
//! - [`tokenizer`]: the byte-level default and HF `tokenizer.json`.
//! - [`task`]: the bundled task, its simulated labeller and gold judge.
//! - [`atomic`]: files and folders written whole or not at all.
//! - [`checksum`]: sha256 lists that let a loader refuse a damaged folder.
//! - [`files`]: user-named files opened bounded (regular, size-limited).
//! - [`jinja`]: a model folder's chat template, rendered as transformers does.
//! - [`template_check`]: whether a chat template keeps earlier turns a prefix of later ones.
//! - [`render_guard`]: the memory bound on a chat template's rendering.
//! - [`append_log`]: append-only JSON-lines files (a torn last line cut off).
//! - [`arithmetic`]: a verifiable task (`rlhf task arithmetic`): prompts with exact answers.
//! - [`math_answer`]: a math answer's final value checked against the known one.
//! - [`unpaired`]: answers labelled good or bad on their own (KTO), also from rankings.
//! - [`labels`]: a loop round's labelling queue: groups, who saw what, submissions (Parquet).
//! - [`label_exchange`]: a queue to and from Label Studio's and Argilla's JSON.

pub mod append_log;
pub mod arithmetic;
pub mod atomic;
pub mod batch;
pub mod calculator;
pub mod checksum;
pub mod files;
pub mod hh;
pub mod jinja;
pub mod label_exchange;
pub mod labels;
pub mod load;
pub mod math_answer;
pub mod preference;
pub mod render_guard;
pub mod rollout;
pub mod schema;
pub mod task;
pub mod template_check;
pub mod tokenizer;
pub mod unpaired;

pub use tokenizer::Tokenizer;
