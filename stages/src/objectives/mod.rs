//! Objectives more than one kind uses, so that no kind borrows from
//! another: rankings and sequence rewards (the reward model, DPO, PPO,
//! GRPO, eval), KTO's labelled answers, and the masked next-token NLL (SFT, PPO's ptx, bench).
//! It imports the model room and nothing of the kinds.

pub mod nll;
pub mod rankings;
pub mod unpaired;
