//! An RL update's optimiser step, the same for every kind: backward, the
//! gradients summed over the ranks, global-norm clipping, AdamW.

use tch::Tensor;

use crate::dist::Ranks;
use crate::optim::AdamW;
use crate::train::{check_finite, StageError};

/// Which iteration an update belongs to (1-based), and the ranks it is
/// shared by.
#[derive(Clone, Copy)]
pub struct Step<'a> {
    pub it: i64,
    pub ranks: &'a Ranks,
}

/// Backward, the gradients of `vars` summed over the ranks, global-norm
/// clipping to `clip.0` (the norm must be finite; `clip.1` names it), and
/// an AdamW step at `lr`.
pub fn optimizer_step(
    opt: &mut AdamW,
    vars: &[Tensor],
    loss: &Tensor,
    lr: f64,
    clip: (f64, &'static str),
    step: Step,
) -> Result<(), StageError> {
    opt.zero_grad();
    loss.backward();
    step.ranks.sum_gradients(vars)?;
    let norm = opt.clip_grad_norm(clip.0);
    check_finite(step.it, clip.1, norm)?;
    opt.step(lr);
    Ok(())
}
