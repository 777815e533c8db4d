//! GRPO's arithmetic (Shao et al., 2024, DeepSeekMath): no critic; each
//! prompt is answered G times and an answer's advantage is its score
//! against its group's, the same for every token of the answer; PPO's
//! clipped ratio; the KL to the reference as a per-token penalty in the
//! loss (the k3 estimator), or subtracted from the score.
//!
//! The critic-free family shares this home: the objectives of
//! [`LossType`] (TRL's `loss_type`s, GSPO's sequence ratio, TRL's RLOO
//! loss) with clip-higher, and the advantage estimators of
//! [`AdvantageEstimator`] (group baseline, leave-one-out, REINFORCE++).

use serde::{Deserialize, Serialize};
use tch::Tensor;

/// Added to a group's standard deviation before dividing by it (TRL).
pub const STD_EPS: f64 = 1e-4;

/// Whether a group's answers scored differently (a group without spread
/// teaches nothing).
pub fn has_spread(scores: &[f64]) -> bool {
    scores.iter().any(|&s| s != scores[0])
}

/// Advantages of answers scored in groups of `group` consecutive answers
/// (one prompt each): `s - mean` of the group, divided by the group's
/// standard deviation (unbiased, as `torch.std`) plus [`STD_EPS`] when
/// `scale` (GRPO), or not (Dr. GRPO: the division favours groups of
/// nearly equal scores). Also how many groups had no spread (all scores
/// equal: nothing to learn from them).
pub fn group_advantages(scores: &[f64], group: usize, scale: bool) -> (Vec<f64>, usize) {
    let mut out = Vec::with_capacity(scores.len());
    let mut flat = 0;
    for g in scores.chunks(group.max(1)) {
        let n = g.len() as f64;
        let mean = g.iter().sum::<f64>() / n;
        let var = g.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        let std = var.sqrt();
        flat += usize::from(!has_spread(g));
        let scale = if scale { std + STD_EPS } else { 1.0 };
        out.extend(g.iter().map(|s| (s - mean) / scale));
    }
    (out, flat)
}

/// The k3 estimate of KL(policy || reference) per token (Schulman, 2020):
/// `exp(ref - lp) - (ref - lp) - 1`, never negative, unbiased.
pub fn k3(lp: &Tensor, ref_lp: &Tensor) -> Tensor {
    let d = ref_lp - lp;
    d.exp() - &d - 1.0
}

/// The clipped objective and how it is normalised (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Each answer's token mean, then the mean over answers (DeepSeekMath).
    #[default]
    Grpo,
    /// Token sums over answers x `max_new_tokens` (Dr. GRPO): no length bias.
    DrGrpo,
    /// The token sum over the minibatch's answer tokens (DAPO; TRL's default).
    Dapo,
    /// Normalised by the micro-batch's tokens (TRL); a GRPO minibatch is
    /// one step here, so the same as `dapo`.
    Bnpo,
    /// One ratio per answer, the exp of its mean token log-ratio, clipped
    /// (GSPO; TRL's `importance_sampling_level: sequence`); GRPO's means.
    Gspo,
    /// The ratio, truncated above at `epsilon_high` and without gradient,
    /// weights the log-probability (CISPO, MiniMax-M1); DAPO's sum.
    Cispo,
    /// TRL's RLOO loss: one ratio per answer, the exp of its summed
    /// log-ratio, clipped; the mean over answers.
    Rloo,
}

impl LossType {
    /// One importance ratio per answer rather than per token.
    pub fn per_answer_ratio(self) -> bool {
        matches!(self, Self::Gspo | Self::Rloo)
    }
}

/// What a policy loss reads besides the tensors.
#[derive(Debug, Clone, Copy)]
pub struct LossSpec {
    pub loss_type: LossType,
    /// Ratios are clipped to `[1 - clip_low, 1 + clip_high]`; CISPO
    /// truncates at `clip_high` itself.
    pub clip_low: f64,
    pub clip_high: f64,
    /// The k3 KL's weight in the loss.
    pub beta: f64,
    /// Dr. GRPO's constant: the longest answer sampling allows.
    pub max_new_tokens: f64,
}

/// How scores become advantages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageEstimator {
    /// The score against its group's mean (over its std with
    /// `scale_rewards`).
    #[default]
    Grpo,
    /// Against the mean of the group's other answers (RLOO; TRL's
    /// `RLOOTrainer`).
    Rloo,
    /// REINFORCE++ (OpenRLHF): each token's return (the score, less the
    /// KL still to come when the KL is in the reward), whitened over the
    /// batch's answer tokens.
    ReinforcePp,
    /// REINFORCE++-baseline: the score less its group's mean first.
    ReinforcePpBaseline,
}

/// RLOO's advantages: each score against the mean of the other answers of
/// its group of `group` (TRL's `RLOOTrainer`).
pub fn leave_one_out(scores: &[f64], group: usize) -> Vec<f64> {
    let g = group.max(2) as f64;
    scores
        .chunks(group.max(1))
        .flat_map(|s| {
            let sum: f64 = s.iter().sum();
            s.iter().map(move |x| x - (sum - x) / (g - 1.0))
        })
        .collect()
}

/// REINFORCE++'s token advantages `(B, N)`: from per-answer `base`
/// scores `(B,)` and per-token KL penalties `kl` `(B, N)` (zero where the
/// KL is not in the reward), each token's return `base - sum of the KL
/// from it on`, whitened over the real tokens of `mask`: `(x - mean) /
/// sqrt(max(var, 1e-8))` with the biased variance (OpenRLHF's
/// `masked_normalize`).
pub fn reinforce_pp(base: &Tensor, kl: &Tensor, mask: &Tensor) -> Tensor {
    let to_come = (kl * mask).flip([1]).cumsum(1, kl.kind()).flip([1]);
    let returns = base.unsqueeze(1) - to_come;
    let n = mask.sum(kl.kind()).clamp_min(1.0);
    let mean = (&returns * mask).sum(kl.kind()) / &n;
    let var = ((&returns - &mean).square() * mask).sum(kl.kind()) / &n;
    (returns - mean) * var.clamp_min(1e-8).rsqrt() * mask
}

/// What one GRPO loss gives: the loss, the share of answer tokens where
/// the clip binds, and the mean per-token KL to the reference.
#[derive(Debug)]
pub struct GrpoLoss {
    pub loss: Tensor,
    pub clip_fraction: f64,
    pub kl: f64,
}

/// GRPO's loss on answers `(B, N)` with per-answer `advantages` `(B,)`:
/// per token `-min(r A, clip(r, 1 - e, 1 + e) A) + beta k3`, with
/// `r = exp(lp - old_lp)`; averaged over each answer's tokens (`mask`),
/// then over the answers (the paper's normalisation).
pub fn grpo_loss(
    lp: &Tensor,
    old_lp: &Tensor,
    ref_lp: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    clip_range: f64,
    beta: f64,
) -> GrpoLoss {
    grpo_loss_over(lp, old_lp, ref_lp, advantages, mask, clip_range, beta, None)
}

/// [`grpo_loss`] on one rank's rows of a minibatch whose whole holds
/// `whole = (answers, answer tokens)` over every rank: the loss and the
/// shares are this rank's parts, so that their sums over the ranks are
/// the minibatch's. `None`: the rows are the whole minibatch.
#[allow(clippy::too_many_arguments)]
pub fn grpo_loss_over(
    lp: &Tensor,
    old_lp: &Tensor,
    ref_lp: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    clip_range: f64,
    beta: f64,
    whole: Option<(f64, f64)>,
) -> GrpoLoss {
    let spec = LossSpec {
        loss_type: LossType::Grpo,
        clip_low: clip_range,
        clip_high: clip_range,
        beta,
        max_new_tokens: 1.0,
    };
    policy_loss(lp, old_lp, ref_lp, advantages, mask, &spec, whole)
}

/// The importance ratios (per token, or per answer for gspo and rloo)
/// and the clipped objective per token (to be minimised) of `spec`, with
/// where the clip binds.
fn surrogate(
    spec: &LossSpec,
    lp: &Tensor,
    old_lp: &Tensor,
    a: &Tensor,
    mask: &Tensor,
) -> (Tensor, Tensor) {
    let kind = lp.kind();
    let log_ratio = lp - old_lp;
    let summed = || (&log_ratio * mask).sum_dim_intlist(1, true, kind);
    let ratio = match spec.loss_type {
        LossType::Gspo => (summed() / mask.sum_dim_intlist(1, true, kind).clamp_min(1.0)).exp(),
        LossType::Rloo => summed().exp(),
        _ => log_ratio.exp(),
    };
    if spec.loss_type == LossType::Cispo {
        let weight = ratio.clamp_max(spec.clip_high).detach();
        let clipped = ratio.gt(spec.clip_high).logical_and(&a.gt(0.0));
        return (-(weight * a * lp), clipped);
    }
    let (low, high) = (1.0 - spec.clip_low, 1.0 + spec.clip_high);
    let unclipped = &ratio * a;
    let clipped = ratio.clamp(low, high) * a;
    // Where the clip binds (TRL): below 1 - e with A < 0, above 1 + e
    // with A > 0.
    let binds =
        (ratio.lt(low).logical_and(&a.lt(0.0))).logical_or(&ratio.gt(high).logical_and(&a.gt(0.0)));
    (-unclipped.minimum(&clipped), binds)
}

/// The critic-free policy loss of `spec.loss_type` on answers `(B, N)`
/// with advantages per answer `(B,)` or per token `(B, N)`, plus `beta`
/// times the k3 KL per token. On one rank's rows of a minibatch whose
/// whole holds `whole = (answers, answer tokens)`, the loss and the shares
/// are this rank's parts of the whole's (`None`: the rows are the whole).
pub fn policy_loss(
    lp: &Tensor,
    old_lp: &Tensor,
    ref_lp: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    spec: &LossSpec,
    whole: Option<(f64, f64)>,
) -> GrpoLoss {
    let kind = lp.kind();
    let a = match advantages.dim() {
        1 => advantages.unsqueeze(1),
        _ => advantages.shallow_clone(),
    };
    let tokens = mask.sum_dim_intlist(1, true, kind);
    let (surrogate, was_clipped) = surrogate(spec, lp, old_lp, &a, mask);
    let kl = k3(lp, ref_lp);
    let per_token = surrogate + &kl * spec.beta;
    let masked = (per_token * mask).sum_dim_intlist(1, false, kind);
    let b = mask.size()[0] as f64;
    let all_tokens = || match whole {
        None => mask.sum(kind).double_value(&[]),
        Some((_, tokens)) => tokens,
    };
    let loss = match spec.loss_type {
        LossType::Grpo | LossType::Gspo | LossType::Rloo => {
            let per_answer = masked / tokens.squeeze_dim(1).clamp_min(1.0);
            match whole {
                None => per_answer.mean(kind),
                Some((answers, _)) => per_answer.sum(kind) / answers,
            }
        }
        LossType::DrGrpo => {
            let answers = whole.map_or(b, |w| w.0);
            masked.sum(kind) / (answers * spec.max_new_tokens)
        }
        LossType::Dapo | LossType::Bnpo | LossType::Cispo => {
            masked.sum(kind) / all_tokens().max(1.0)
        }
    };
    // Shares over the answer tokens (or answers), in the tensor's kind
    // for one process as before; as parts of the whole over ranks.
    let share = |t: &Tensor, of: &Tensor| {
        let part = (t * of).sum(kind);
        match whole {
            None => (part / of.sum(kind).clamp_min(1.0)).double_value(&[]),
            Some((answers, tokens)) => {
                let all = if of.size()[1] == 1 && mask.size()[1] != 1 {
                    answers
                } else {
                    tokens
                };
                part.double_value(&[]) / all.max(1.0)
            }
        }
    };
    let was_clipped = was_clipped.to_kind(kind);
    let clip_fraction = match spec.loss_type.per_answer_ratio() {
        // One ratio per answer: the share of answers (TRL).
        true => {
            let any = was_clipped.amax(1, true);
            share(&any, &mask.ones_like().narrow(1, 0, 1))
        }
        false => share(&was_clipped, mask),
    };
    GrpoLoss {
        loss,
        clip_fraction,
        kl: share(&kl.detach(), mask),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two ranks' parts of a minibatch (rows split by position, each
    /// normalised by the whole's answers and tokens) sum to the loss, its
    /// gradient, and the shares one process computes on the whole, for
    /// every loss type.
    #[test]
    fn rank_parts_sum_to_the_whole_minibatch() {
        tch::manual_seed(3);
        let (b, n) = (6, 5);
        let old = Tensor::randn([b, n], (tch::Kind::Double, tch::Device::Cpu)) * 0.1;
        let reference = Tensor::randn([b, n], (tch::Kind::Double, tch::Device::Cpu)) * 0.1;
        let adv = Tensor::randn([b], (tch::Kind::Double, tch::Device::Cpu));
        // Answers of 5, 3, 4, 1, 5 and 2 tokens.
        let lens = [5, 3, 4, 1, 5, 2];
        let mask = Tensor::from_slice(
            &lens
                .iter()
                .flat_map(|&l| (0..n).map(move |j| if j < l { 1.0 } else { 0.0 }))
                .collect::<Vec<f64>>(),
        )
        .view([b, n]);
        let lp = (&old + Tensor::randn([b, n], (tch::Kind::Double, tch::Device::Cpu)) * 0.3)
            .set_requires_grad(true);
        let all = (b as f64, mask.sum(tch::Kind::Double).double_value(&[]));
        let types = [
            LossType::Grpo,
            LossType::DrGrpo,
            LossType::Dapo,
            LossType::Bnpo,
            LossType::Gspo,
            LossType::Cispo,
            LossType::Rloo,
        ];
        for loss_type in types {
            let spec = LossSpec {
                loss_type,
                clip_low: 0.2,
                clip_high: if loss_type == LossType::Cispo {
                    1.1
                } else {
                    0.28
                },
                beta: 0.1,
                max_new_tokens: n as f64,
            };
            let whole = policy_loss(&lp, &old, &reference, &adv, &mask, &spec, None);
            let g_whole = Tensor::run_backward(&[&whole.loss], &[&lp], false, false)[0].copy();
            let (mut loss, mut clip, mut kl) = (0.0, 0.0, 0.0);
            let mut g_parts = Tensor::zeros([b, n], (tch::Kind::Double, tch::Device::Cpu));
            for rows in [0..2i64, 2..6] {
                let part = |t: &Tensor| t.narrow(0, rows.start, rows.end - rows.start);
                let (lp_part, old, r, a, m) = (
                    part(&lp),
                    part(&old),
                    part(&reference),
                    part(&adv),
                    part(&mask),
                );
                let out = policy_loss(&lp_part, &old, &r, &a, &m, &spec, Some(all));
                let g = Tensor::run_backward(&[&out.loss], &[&lp], false, false)[0].copy();
                g_parts += g;
                loss += out.loss.double_value(&[]);
                (clip, kl) = (clip + out.clip_fraction, kl + out.kl);
            }
            let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
            let name = format!("{loss_type:?}");
            assert!(close(loss, whole.loss.double_value(&[])), "{name}: {loss}");
            assert!(
                close(clip, whole.clip_fraction),
                "{name}: clip {clip} vs {}",
                whole.clip_fraction
            );
            assert!(close(kl, whole.kl), "{name}: kl");
            assert!(
                whole.clip_fraction > 0.0 || loss_type == LossType::Gspo,
                "{name}: the clip binds somewhere"
            );
            let gap = (g_parts - g_whole).abs().max().double_value(&[]);
            assert!(gap < 1e-12, "{name}: gradients differ by {gap}");
        }
    }

    #[test]
    fn leave_one_out_and_reinforce_pp_by_hand() {
        // RLOO: 1 - (2 + 3) / 2, 2 - (1 + 3) / 2, 3 - (1 + 2) / 2.
        assert_eq!(
            leave_one_out(&[1.0, 2.0, 3.0, 4.0, 4.0], 3)[..3],
            [-1.5, 0.0, 1.5]
        );
        // REINFORCE++: scores 1 and 0; per-token KL penalties 0.1, 0.2 on
        // the first answer's two tokens, 0.3 on the second's one. Returns:
        // 1 - 0.3 = 0.7, 1 - 0.2 = 0.8 and 0 - 0.3 = -0.3; over those three
        // tokens mean 0.4, biased variance 0.74 / 3.
        let base = Tensor::from_slice(&[1.0f64, 0.0]);
        let kl = Tensor::from_slice(&[0.1f64, 0.2, 0.5, 0.3, 0.5, 0.5]).view([2, 3]);
        let mask = Tensor::from_slice(&[1.0f64, 1.0, 0.0, 1.0, 0.0, 0.0]).view([2, 3]);
        let got = reinforce_pp(&base, &kl, &mask);
        let sd = (0.74f64 / 3.0).sqrt();
        let want = Tensor::from_slice(&[0.3 / sd, 0.4 / sd, 0.0, -0.7 / sd, 0.0, 0.0]).view([2, 3]);
        let gap = (got - want).abs().max().double_value(&[]);
        assert!(gap < 1e-12, "{gap}");
    }

    #[test]
    fn group_advantages_by_hand() {
        // Group 1: scores 1, 2, 3: mean 2, unbiased std 1. Group 2: all 5.
        let (a, flat) = group_advantages(&[1.0, 2.0, 3.0, 5.0, 5.0, 5.0], 3, true);
        let s = 1.0 + STD_EPS;
        assert_eq!(a, [-1.0 / s, 0.0, 1.0 / s, 0.0, 0.0, 0.0]);
        assert_eq!(flat, 1, "one group without spread");
        // Dr. GRPO: the differences alone.
        let (a, _) = group_advantages(&[0.0, 1.0, 0.5, 0.5], 2, false);
        assert_eq!(a, [-0.5, 0.5, 0.0, 0.0]);
    }

    #[test]
    fn grpo_loss_by_hand() {
        // Two answers, two token slots; the second answer has one token.
        let lp = Tensor::from_slice(&[-1.0f64, -2.0, -0.5, 0.0]).view([2, 2]);
        let old = Tensor::from_slice(&[-1.0f64, -2.5, -1.0, 0.0]).view([2, 2]);
        let reference = Tensor::from_slice(&[-1.0f64, -2.0, -0.7, 0.0]).view([2, 2]);
        let adv = Tensor::from_slice(&[2.0f64, -1.0]);
        let mask = Tensor::from_slice(&[1.0f64, 1.0, 1.0, 0.0]).view([2, 2]);
        let (clip, beta) = (0.2, 0.1);
        let out = grpo_loss(&lp, &old, &reference, &adv, &mask, clip, beta);
        // Answer 1: ratios 1 and e^0.5 = 1.6487 (clipped to 1.2); A = 2:
        // -min(2, 2) = -2 and -min(3.2974, 2.4) = -2.4; KL 0 on both.
        // Answer 2: ratio e^0.5 with A = -1: -min(-1.6487, -1.2) = 1.6487;
        // k3 with d = -0.2: e^-0.2 + 0.2 - 1 = 0.018731.
        let k3 = (-0.2f64).exp() + 0.2 - 1.0;
        let answer1 = (-2.0 - 2.4) / 2.0;
        let answer2 = 0.5f64.exp() + beta * k3;
        let want = (answer1 + answer2) / 2.0;
        let got = out.loss.double_value(&[]);
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        // The clip binds on answer 1's second token only (r > 1 + e, A > 0);
        // answer 2's ratio is beyond it but A < 0 keeps the unclipped term.
        assert!(
            (out.clip_fraction - 1.0 / 3.0).abs() < 1e-12,
            "{}",
            out.clip_fraction
        );
        assert!((out.kl - k3 / 3.0).abs() < 1e-12, "{}", out.kl);
        // By the numbers: e^0.5 = 1.648721, k3 = 0.018731.
        assert!((0.5f64.exp() - 1.648721).abs() < 1e-6 && (k3 - 0.018731).abs() < 1e-6);
    }
}
