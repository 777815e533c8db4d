//! GRPO's arithmetic (Shao et al., 2024, DeepSeekMath): no critic; each
//! prompt is answered G times and an answer's advantage is its score
//! against its group's, the same for every token of the answer; PPO's
//! clipped ratio; the KL to the reference as a per-token penalty in the
//! loss (the k3 estimator), or subtracted from the score.

use tch::Tensor;

/// Added to a group's standard deviation before dividing by it (TRL).
pub const STD_EPS: f64 = 1e-4;

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
        flat += usize::from(g.iter().all(|&s| s == g[0]));
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
    let ratio = (lp - old_lp).exp();
    let a = advantages.unsqueeze(1);
    let unclipped = &ratio * &a;
    let clipped = ratio.clamp(1.0 - clip_range, 1.0 + clip_range) * &a;
    let surrogate = -unclipped.minimum(&clipped);
    let kl = k3(lp, ref_lp);
    let per_token = surrogate + &kl * beta;
    let kind = lp.kind();
    let tokens = mask.sum_dim_intlist(1, false, kind).clamp_min(1.0);
    let per_answer = (per_token * mask).sum_dim_intlist(1, false, kind) / &tokens;
    // Clipped where the clip binds (TRL): below 1 - e with A < 0, above
    // 1 + e with A > 0.
    let low = ratio.lt(1.0 - clip_range).logical_and(&a.lt(0.0));
    let high = ratio.gt(1.0 + clip_range).logical_and(&a.gt(0.0));
    let was_clipped = low.logical_or(&high).to_kind(kind);
    let share = |t: Tensor| {
        let part = (t * mask).sum(kind);
        match whole {
            None => (part / mask.sum(kind).clamp_min(1.0)).double_value(&[]),
            Some((_, all)) => part.double_value(&[]) / all.max(1.0),
        }
    };
    GrpoLoss {
        loss: match whole {
            None => per_answer.mean(kind),
            Some((answers, _)) => per_answer.sum(kind) / answers,
        },
        clip_fraction: share(was_clipped),
        kl: share(kl.detach()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two ranks' parts of a minibatch (rows split by position, each
    /// normalised by the whole's answers and tokens) sum to the loss, its
    /// gradient, and the shares one process computes on the whole.
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
        let whole = grpo_loss(&lp, &old, &reference, &adv, &mask, 0.2, 0.1);
        let g_whole = Tensor::run_backward(&[&whole.loss], &[&lp], false, false)[0].copy();
        let all = (b as f64, mask.sum(tch::Kind::Double).double_value(&[]));
        let (mut loss, mut clip, mut kl) = (0.0, 0.0, 0.0);
        let mut g_parts = Tensor::zeros([b, n], (tch::Kind::Double, tch::Device::Cpu));
        for rows in [0..2i64, 2..6] {
            let part = |t: &Tensor| t.narrow(0, rows.start, rows.end - rows.start);
            let out = grpo_loss_over(
                &part(&lp),
                &part(&old),
                &part(&reference),
                &part(&adv),
                &part(&mask),
                0.2,
                0.1,
                Some(all),
            );
            let g = Tensor::run_backward(&[&out.loss], &[&lp], false, false)[0].copy();
            g_parts += g;
            loss += out.loss.double_value(&[]);
            (clip, kl) = (clip + out.clip_fraction, kl + out.kl);
        }
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(loss, whole.loss.double_value(&[])), "{loss}");
        assert!(close(clip, whole.clip_fraction) && close(kl, whole.kl));
        let gap = (g_parts - g_whole).abs().max().double_value(&[]);
        assert!(gap < 1e-12, "gradients differ by {gap}");
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
