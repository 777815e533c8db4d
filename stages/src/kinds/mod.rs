//! The registry of stage kinds, and the supervised kinds: SFT on
//! demonstrations (`sft`), the reward model on rankings (`reward`) and DPO
//! (`dpo`). The RL kinds live in `rl`. Each kind declares itself through
//! `kind::KindConfig`; a kind borrows shared objectives from
//! `objectives`, never another kind's code.

pub mod dpo;
pub mod reward;
pub mod sft;

use crate::kind::Kind;

/// Every stage kind, in the order `kind:` lists them in errors.
pub static KINDS: &[Kind] = &[
    Kind::of::<sft::SftConfig>(),
    Kind::of::<reward::RewardConfig>(),
    Kind::of::<crate::rl::ppo::PpoConfig>(),
    Kind::of::<dpo::DpoConfig>(),
    Kind::of::<crate::rl::grpo::GrpoConfig>(),
];

/// The kind named `name`.
pub fn kind(name: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.name == name)
}
