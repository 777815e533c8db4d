//! PPO's arithmetic as small pure functions, each with its formula and a
//! hand-computed test: per-token rewards, GAE, whitening, the clipped
//! surrogate and value losses, KL estimates and the adaptive controller.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How the per-token KL to the reference is estimated (Schulman's notes
/// "Approximating KL divergence").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `log p - log q`: unbiased, can be negative per token.
    K1,
    /// `(r - 1) - log r` with `r = q / p`: unbiased and never negative.
    K3,
}

/// Ziegler et al. (2019)'s adaptive KL coefficient.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveKl {
    /// Wanted KL per answer (nats).
    pub target: f64,
    /// Samples over which beta may move by about e.
    pub horizon: f64,
}

/// Per-token rewards of one answer (Ziegler et al. 2019; InstructGPT):
/// `r_t = -beta * kl_t`, plus the answer's score on its last token; an
/// answer that did not end with EOS loses `missing_eos_penalty` from its
/// score first.
pub fn token_rewards(
    kl_tokens: &[f64],
    beta: f64,
    score: f64,
    finished: bool,
    missing_eos_penalty: Option<f64>,
) -> Vec<f64> {
    let mut rewards: Vec<f64> = kl_tokens.iter().map(|k| -beta * k).collect();
    let mut score = score;
    if !finished {
        score -= missing_eos_penalty.unwrap_or(0.0);
    }
    if let Some(last) = rewards.last_mut() {
        *last += score;
    }
    rewards
}

/// The KL coefficient and, when adaptive, its controller.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KlController {
    pub beta: f64,
    pub adaptive: Option<AdaptiveKl>,
}

impl KlController {
    /// Ziegler et al. (2019): e = clip(KL / target - 1, -0.2, 0.2);
    /// beta *= 1 + e * n / horizon.
    pub fn update(&mut self, kl: f64, n_samples: usize) {
        if let Some(a) = self.adaptive {
            let error = (kl / a.target - 1.0).clamp(-0.2, 0.2);
            self.beta *= 1.0 + error * n_samples as f64 / a.horizon;
        }
    }
}

/// GAE (Schulman et al., 2016) over one answer: `A_t = sum_l (gamma lam)^l
/// delta_{t+l}`, `delta_t = r_t + gamma V_{t+1} - V_t`, V after the last
/// token = 0. Returns (advantages, returns = advantages + values).
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lam: f64) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let mut adv = vec![0.0; n];
    let mut next_adv = 0.0;
    for t in (0..n).rev() {
        let next_value = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next_value - values[t];
        next_adv = delta + gamma * lam * next_adv;
        adv[t] = next_adv;
    }
    let returns = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, returns)
}

/// Whitens in place: zero mean, unit variance (unbiased), over all values.
pub fn whiten(xs: &mut [f64]) {
    let n = xs.len();
    if n < 2 {
        return;
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let scale = 1.0 / (var + 1e-8).sqrt();
    for x in xs {
        *x = (*x - mean) * scale;
    }
}

pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Tensor {
    masked_mean_over(x, mask, &mask.sum(Kind::Float))
}

/// The masked sum of `x` over `count` tokens: with several ranks, `count`
/// is the minibatch's tokens over every rank, and the ranks' parts sum to
/// the mean.
pub fn masked_mean_over(x: &Tensor, mask: &Tensor, count: &Tensor) -> Tensor {
    (x * mask).sum(Kind::Float) / count.clamp_min(1.0)
}

/// The clipped surrogate objective as a loss:
/// `-mean(min(ratio A, clip(ratio, 1-eps, 1+eps) A))`, `ratio = exp(new - old)`.
/// Also the clip fraction and the approximate KL `mean((ratio - 1) - log ratio)`.
pub fn clipped_surrogate(
    new_lp: &Tensor,
    old_lp: &Tensor,
    adv: &Tensor,
    mask: &Tensor,
    eps: f64,
) -> (Tensor, f64, f64) {
    clipped_surrogate_over(new_lp, old_lp, adv, mask, &mask.sum(Kind::Float), eps)
}

/// [`clipped_surrogate`] as this rank's part of a mean over `count` tokens.
pub fn clipped_surrogate_over(
    new_lp: &Tensor,
    old_lp: &Tensor,
    adv: &Tensor,
    mask: &Tensor,
    count: &Tensor,
    eps: f64,
) -> (Tensor, f64, f64) {
    let log_ratio = new_lp - old_lp;
    let ratio = log_ratio.exp();
    let unclipped = &ratio * adv;
    let clipped = ratio.clamp(1.0 - eps, 1.0 + eps) * adv;
    let loss = -masked_mean_over(&unclipped.minimum(&clipped), mask, count);
    let (clipfrac, approx_kl) = tch::no_grad(|| {
        let outside = (&ratio - 1.0).abs().gt(eps).to_kind(Kind::Float);
        let clipfrac = masked_mean_over(&outside, mask, count).double_value(&[]);
        let approx_kl = masked_mean_over(&((&ratio - 1.0) - &log_ratio), mask, count);
        (clipfrac, approx_kl.double_value(&[]))
    });
    (loss, clipfrac, approx_kl)
}

/// The clipped value loss: `0.5 mean(max((V - R)^2, (V_clip - R)^2))` with
/// `V_clip = V_old + clip(V - V_old, -eps, eps)`; eps = 0 disables clipping.
pub fn clipped_value_loss(
    new_v: &Tensor,
    old_v: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
    eps: f64,
) -> Tensor {
    clipped_value_loss_over(new_v, old_v, returns, mask, &mask.sum(Kind::Float), eps)
}

/// [`clipped_value_loss`] as this rank's part of a mean over `count` tokens.
pub fn clipped_value_loss_over(
    new_v: &Tensor,
    old_v: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
    count: &Tensor,
    eps: f64,
) -> Tensor {
    let unclipped = (new_v - returns).square();
    if eps <= 0.0 {
        return 0.5 * masked_mean_over(&unclipped, mask, count);
    }
    let v_clipped = old_v + (new_v - old_v).clamp(-eps, eps);
    let clipped = (v_clipped - returns).square();
    0.5 * masked_mean_over(&unclipped.maximum(&clipped), mask, count)
}

/// Per-token KL estimate from policy and reference log-probabilities.
pub fn kl_estimate(lp: &[f64], ref_lp: &[f64], estimator: KlEstimator) -> Vec<f64> {
    lp.iter()
        .zip(ref_lp)
        .map(|(p, q)| match estimator {
            KlEstimator::K1 => p - q,
            KlEstimator::K3 => {
                let log_r = q - p;
                log_r.exp() - 1.0 - log_r
            }
        })
        .collect()
}

/// `1 - Var(returns - values) / Var(returns)`: how much of the return the
/// critic explains (1 perfect, <= 0 useless).
pub fn explained_variance(values: &[f64], returns: &[f64]) -> f64 {
    let var = |xs: &[f64]| {
        let m = xs.iter().sum::<f64>() / xs.len().max(1) as f64;
        xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len().max(1) as f64
    };
    let residual: Vec<f64> = returns.iter().zip(values).map(|(r, v)| r - v).collect();
    let vr = var(returns);
    if vr == 0.0 {
        return f64::NAN;
    }
    1.0 - var(&residual) / vr
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(xs: &[f32]) -> Tensor {
        Tensor::from_slice(xs)
    }

    #[test]
    fn gae_matches_hand_computation() {
        // rewards [0, 0, 1], values [0.5, 0.6, 0.7], gamma 0.9, lam 0.8:
        // delta2 = 1 - 0.7 = 0.3; delta1 = 0 + 0.9*0.7 - 0.6 = 0.03;
        // delta0 = 0 + 0.9*0.6 - 0.5 = 0.04.
        // A2 = 0.3; A1 = 0.03 + 0.72*0.3 = 0.246; A0 = 0.04 + 0.72*0.246 = 0.21712.
        let (a, r) = gae(&[0.0, 0.0, 1.0], &[0.5, 0.6, 0.7], 0.9, 0.8);
        for (x, y) in a.iter().zip([0.21712, 0.246, 0.3]) {
            assert!((x - y).abs() < 1e-12, "{a:?}");
        }
        for (x, y) in r.iter().zip([0.71712, 0.846, 1.0]) {
            assert!((x - y).abs() < 1e-12, "{r:?}");
        }
        // gamma = lam = 1: advantages are reward-to-go minus value.
        let (a, _) = gae(&[1.0, 2.0], &[0.0, 0.0], 1.0, 1.0);
        assert_eq!(a, vec![3.0, 2.0]);
    }

    #[test]
    fn token_rewards_are_the_kl_penalty_plus_the_score_at_the_end() {
        // beta 0.1, KL [0.5, -0.2, 1.0], score 2: [-0.05, 0.02, -0.1 + 2].
        let r = token_rewards(&[0.5, -0.2, 1.0], 0.1, 2.0, true, Some(1.0));
        for (x, y) in r.iter().zip([-0.05, 0.02, 1.9]) {
            assert!((x - y).abs() < 1e-12, "{r:?}");
        }
        // Cut off before EOS: the penalty comes off the score.
        let r = token_rewards(&[0.5, -0.2, 1.0], 0.1, 2.0, false, Some(1.0));
        assert!((r[2] - 0.9).abs() < 1e-12, "{r:?}");
        let r = token_rewards(&[0.0], 0.1, 2.0, false, None);
        assert_eq!(r, vec![2.0]);
        assert!(token_rewards(&[], 0.1, 2.0, true, None).is_empty());
    }

    #[test]
    fn whitening_gives_zero_mean_unit_variance() {
        let mut xs = vec![1.0, 2.0, 3.0, 4.0];
        whiten(&mut xs);
        // mean 2.5, unbiased var 5/3: (x - 2.5) / sqrt(5/3).
        let s = (5.0f64 / 3.0).sqrt();
        for (x, y) in xs.iter().zip([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s]) {
            assert!((x - y).abs() < 1e-6);
        }
    }

    #[test]
    fn clipped_surrogate_matches_hand_values() {
        // ratios e^0.1, e^-0.5, e^0.5 with advantages 1, 1, -1; eps 0.2.
        let old = t(&[0.0, 0.0, 0.0]);
        let new = t(&[0.1, -0.5, 0.5]);
        let adv = t(&[1.0, 1.0, -1.0]);
        let mask = t(&[1.0, 1.0, 1.0]);
        let (loss, clipfrac, akl) = clipped_surrogate(&new, &old, &adv, &mask, 0.2);
        let r: Vec<f64> = [0.1f64, -0.5, 0.5].iter().map(|x| x.exp()).collect();
        // min(r A, clip(r) A): 1.10517 (inside); min(0.60653, 0.8) = 0.60653;
        // min(-1.64872, -1.2) = -1.64872.
        let expected = -(r[0] + r[1] - r[2]) / 3.0;
        assert!(
            (loss.double_value(&[]) - expected).abs() < 1e-6,
            "{}",
            loss.double_value(&[])
        );
        assert!((clipfrac - 2.0 / 3.0).abs() < 1e-6);
        let akl_hand = r
            .iter()
            .zip([0.1, -0.5, 0.5])
            .map(|(r, l)| r - 1.0 - l)
            .sum::<f64>()
            / 3.0;
        assert!((akl - akl_hand).abs() < 1e-6);
        // A masked-out token changes nothing.
        let (loss2, _, _) = clipped_surrogate(
            &t(&[0.1, -0.5, 0.5, 3.0]),
            &t(&[0.0; 4]),
            &t(&[1.0, 1.0, -1.0, 5.0]),
            &t(&[1.0, 1.0, 1.0, 0.0]),
            0.2,
        );
        assert!((loss2.double_value(&[]) - expected).abs() < 1e-6);
    }

    #[test]
    fn surrogate_gradient_is_zero_where_clipped() {
        // Ratio above 1 + eps with A > 0, and below 1 - eps with A < 0: the
        // clipped term is the minimum and constant, so no gradient. Inside
        // the range, or clipped on the other side, the gradient flows.
        let old = t(&[0.0, 0.0, 0.0, 0.0]);
        let new = t(&[0.5, -0.5, 0.05, -0.5]).set_requires_grad(true);
        let adv = t(&[1.0, -1.0, 1.0, 1.0]);
        let (loss, _, _) = clipped_surrogate(&new, &old, &adv, &t(&[1.0; 4]), 0.2);
        loss.backward();
        let g: Vec<f32> = Vec::try_from(new.grad()).unwrap();
        assert_eq!(g[0], 0.0, "ratio 1.65 > 1.2 with A > 0");
        assert_eq!(g[1], 0.0, "ratio 0.61 < 0.8 with A < 0");
        assert!(
            g[2] < 0.0,
            "inside the range the loss falls as the ratio rises: {g:?}"
        );
        // Ratio below 1 - eps with A > 0: the unclipped term is the minimum.
        assert!((g[3] as f64 + (-0.5f64).exp() / 4.0).abs() < 1e-6, "{g:?}");
    }

    #[test]
    fn clipped_value_loss_matches_hand_values() {
        let old = t(&[1.0, 1.0]);
        let new = t(&[1.5, 0.9]);
        let ret = t(&[2.0, 0.0]);
        let mask = t(&[1.0, 1.0]);
        // Token 0: unclipped (1.5-2)^2 = 0.25; clipped V = 1.2, (1.2-2)^2 = 0.64 -> 0.64.
        // Token 1: unclipped 0.81; clipped V = 0.9 (inside) -> 0.81.
        let l = clipped_value_loss(&new, &old, &ret, &mask, 0.2).double_value(&[]);
        assert!((l - 0.5 * (0.64 + 0.81) / 2.0).abs() < 1e-6, "{l}");
        let l = clipped_value_loss(&new, &old, &ret, &mask, 0.0).double_value(&[]);
        assert!((l - 0.5 * (0.25 + 0.81) / 2.0).abs() < 1e-6, "{l}");
    }

    #[test]
    fn kl_estimators_and_adaptive_controller() {
        let k1 = kl_estimate(&[-1.0, -2.0], &[-1.5, -1.0], KlEstimator::K1);
        assert_eq!(k1, vec![0.5, -1.0]);
        let k3 = kl_estimate(&[-1.0, -2.0], &[-1.5, -1.0], KlEstimator::K3);
        assert!((k3[0] - ((-0.5f64).exp() - 1.0 + 0.5)).abs() < 1e-12);
        assert!(k3.iter().all(|&x| x >= 0.0));
        let mut c = KlController {
            beta: 0.1,
            adaptive: Some(AdaptiveKl {
                target: 6.0,
                horizon: 10000.0,
            }),
        };
        c.update(12.0, 1000); // error clipped to 0.2: beta *= 1.02
        assert!((c.beta - 0.102).abs() < 1e-12);
        c.update(3.0, 1000); // error -0.2: beta *= 0.98
        assert!((c.beta - 0.102 * 0.98).abs() < 1e-12);
        let mut fixed = KlController {
            beta: 0.02,
            adaptive: None,
        };
        fixed.update(100.0, 1000);
        assert_eq!(fixed.beta, 0.02);
    }

    #[test]
    fn explained_variance_is_one_for_a_perfect_critic() {
        assert!((explained_variance(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]) - 1.0).abs() < 1e-12);
        assert!(explained_variance(&[0.0, 0.0, 0.0], &[1.0, 2.0, 3.0]).abs() < 1e-12);
    }
}
