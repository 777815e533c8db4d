//! The registry of stage kinds, and the supervised kinds: SFT on
//! demonstrations (`sft`), the reward model on rankings (`reward`) and DPO
//! (`dpo`). The RL kinds live in `rl`. Each kind declares itself through
//! `kind::KindConfig`; a kind borrows shared objectives from
//! `objectives`, never another kind's code.

pub mod dpo;
pub mod reward;
pub mod sft;

use std::sync::RwLock;

use crate::kind::Kind;

/// Every stage kind, in the order `kind:` lists them in errors.
pub static KINDS: &[Kind] = &[
    Kind::of::<sft::SftConfig>(),
    Kind::of::<reward::RewardConfig>(),
    Kind::of::<crate::rl::ppo::PpoConfig>(),
    Kind::of::<dpo::DpoConfig>(),
    Kind::of::<crate::rl::grpo::GrpoConfig>(),
];

/// Kinds registered beside the built-in ones, at run time.
static REGISTERED: RwLock<Vec<&'static Kind>> = RwLock::new(Vec::new());

/// Adds a kind beside the built-in ones (a test's, or a plugin's): from
/// then on it is parsed, planned, run, evaluated and plotted like them.
/// A name already taken is refused.
pub fn register(kind: &'static Kind) -> Result<(), String> {
    let mut registered = REGISTERED.write().unwrap_or_else(|e| e.into_inner());
    if KINDS
        .iter()
        .chain(registered.iter().copied())
        .any(|k| k.name == kind.name)
    {
        return Err(format!(
            "a kind named {:?} is already registered",
            kind.name
        ));
    }
    registered.push(kind);
    Ok(())
}

/// Every kind: the built-in ones in order, then the registered ones.
pub fn all() -> Vec<&'static Kind> {
    let registered = REGISTERED.read().unwrap_or_else(|e| e.into_inner());
    KINDS.iter().chain(registered.iter().copied()).collect()
}

/// The kind named `name`.
pub fn kind(name: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.name == name).or_else(|| {
        let registered = REGISTERED.read().unwrap_or_else(|e| e.into_inner());
        registered.iter().copied().find(|k| k.name == name)
    })
}
