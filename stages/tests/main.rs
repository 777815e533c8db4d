//! The stages library's tests, one module a subject, linked as one binary:
//! each kind learns its bundled task, resumes exactly, survives a
//! non-finite step, and two ranks equal one process.

mod common;

mod dist;
mod dpo_learns;
mod grpo_learns;
mod nonfinite;
mod overfit;
mod ppo_learns;
mod reward_learns;
mod reward_resume;
mod same_steps;
mod sft_learns;
mod sft_resume;
