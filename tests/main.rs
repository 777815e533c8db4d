//! rlhf's end-to-end tests, one module a subject, linked as one binary
//! (each binary links libtorch: one link instead of nineteen).
//!
//! Most tests run the `rlhf` binary on a small experiment in a temporary
//! folder; `common` holds the helpers they share. Some need the venv's
//! Python (`just setup`), chromium (`just browser`), TRL (`just trl`) or a
//! one-node Slurm (`just slurm`); `just test` provides them all.

mod common;

mod bad_inputs;
mod chat_templates;
mod cli;
mod concurrent;
mod data_parallel;
mod episodes;
mod eval_report;
mod gpt_reference;
mod hostile;
mod interrupt;
mod label_browser;
mod label_http;
mod learning;
mod llama_reference;
mod lora;
mod memory;
mod pipeline_run;
mod reward_programs;
mod sft_data_errors;
mod sigkill;
mod slurm;
mod smollm2;
mod sweep;
mod tensorboard;
mod trl_reference;
mod watch;
