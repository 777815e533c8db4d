//! AdamW (Loshchilov & Hutter, 2019) with moments we own, so that they are
//! saved with a checkpoint (tch's optimiser cannot export its state), plus
//! the learning-rate schedule and global-norm gradient clipping.
//!
//! The update is PyTorch's `torch.optim.AdamW` (decoupled weight decay,
//! bias-corrected moments), applied to 2-D weights only for the decay, as
//! GPT-2 / nanoGPT do.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Kind, Tensor};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled decay, on 2-D weights only (not biases, LayerNorm, ...).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 3e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

#[derive(Debug)]
struct ParamState {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
}

/// AdamW over the trainable variables of a `VarStore`.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<ParamState>,
    step: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("optimizer state: moment `{name}` is missing")]
    Missing { name: String },
    #[error(
        "optimizer state: moment `{name}` has shape {found:?}, the parameter has {expected:?}"
    )]
    Shape {
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
}

impl AdamWConfig {
    /// Every field in its range; `prefix` is the setting's path
    /// (`optimizer`, `policy_optimizer`).
    pub fn validate(&self, prefix: &str) -> Result<(), crate::check::SettingError> {
        use crate::check::{non_negative, path, positive, require};
        positive(&path(prefix, "lr"), self.lr)?;
        for (name, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            require(
                &path(prefix, name),
                (0.0..1.0).contains(&beta),
                "in [0, 1)",
                beta,
            )?;
        }
        positive(&path(prefix, "eps"), self.eps)?;
        non_negative(&path(prefix, "weight_decay"), self.weight_decay)
    }
}

impl AdamW {
    /// Variables whose name starts with one of `frozen_prefixes` are left out.
    pub fn new(vs: &VarStore, config: AdamWConfig) -> Self {
        Self::with_frozen(vs, config, &[])
    }

    pub fn with_frozen(vs: &VarStore, config: AdamWConfig, frozen_prefixes: &[&str]) -> Self {
        let params = vs
            .variables()
            .into_iter()
            .filter(|(name, t)| {
                t.requires_grad() && !frozen_prefixes.iter().any(|p| name.starts_with(p))
            })
            .collect::<BTreeMap<_, _>>() // sorted: a stable order for saving
            .into_iter()
            .map(|(name, param)| ParamState {
                exp_avg: param.zeros_like(),
                exp_avg_sq: param.zeros_like(),
                decay: param.dim() >= 2,
                name,
                param,
            })
            .collect();
        Self {
            config,
            params,
            step: 0,
        }
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Updates applied so far.
    pub fn steps(&self) -> i64 {
        self.step
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.param.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Global L2 norm of all gradients, as if concatenated.
    pub fn grad_norm(&self) -> f64 {
        tch::no_grad(|| {
            let norms: Vec<Tensor> = self
                .params
                .iter()
                .map(|p| p.param.grad())
                .filter(Tensor::defined)
                .map(|g| g.to_kind(Kind::Float).norm())
                .collect();
            if norms.is_empty() {
                return 0.0;
            }
            Tensor::stack(&norms, 0).norm().double_value(&[])
        })
    }

    /// Scales gradients so their global norm is at most `max_norm` (if > 0);
    /// returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let norm = self.grad_norm();
        if max_norm > 0.0 && norm > max_norm {
            let scale = max_norm / (norm + 1e-6);
            tch::no_grad(|| {
                for p in &self.params {
                    let mut g = p.param.grad();
                    if g.defined() {
                        let _ = g.g_mul_scalar_(scale);
                    }
                }
            });
        }
        norm
    }

    /// One AdamW update at learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let c = &self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        let step_size = lr / bias1;
        let bias2_sqrt = bias2.sqrt();
        tch::no_grad(|| {
            for p in &mut self.params {
                let g = p.param.grad();
                if !g.defined() {
                    continue;
                }
                if p.decay && c.weight_decay != 0.0 {
                    let _ = p.param.g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                let _ = p.exp_avg.lerp_(&g, 1.0 - c.beta1);
                let _ = p.exp_avg_sq.g_mul_scalar_(c.beta2);
                let _ = p.exp_avg_sq.addcmul_(&g, &g.g_mul_scalar(1.0 - c.beta2));
                let denom = p
                    .exp_avg_sq
                    .sqrt()
                    .g_div_scalar_(bias2_sqrt)
                    .g_add_scalar_(c.eps);
                let _ = p
                    .param
                    .addcdiv_(&p.exp_avg.g_mul_scalar(-step_size), &denom);
            }
        });
    }

    /// Moments and step count as named tensors (`exp_avg.<name>`, ...).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("step".to_owned(), Tensor::from(self.step))];
        for p in &self.params {
            out.push((
                format!("exp_avg.{}", p.name),
                p.exp_avg.to_device(tch::Device::Cpu),
            ));
            out.push((
                format!("exp_avg_sq.{}", p.name),
                p.exp_avg_sq.to_device(tch::Device::Cpu),
            ));
        }
        out
    }

    /// Restores what [`AdamW::state_tensors`] produced.
    pub fn load_state_tensors(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<(), OptimError> {
        let get = |name: String, like: &Tensor| -> Result<Tensor, OptimError> {
            let t = tensors
                .get(&name)
                .ok_or_else(|| OptimError::Missing { name: name.clone() })?;
            if t.size() != like.size() {
                return Err(OptimError::Shape {
                    name,
                    expected: like.size(),
                    found: t.size(),
                });
            }
            Ok(t.to_device(like.device()).to_kind(like.kind()))
        };
        let step = tensors.get("step").ok_or_else(|| OptimError::Missing {
            name: "step".into(),
        })?;
        let mut loaded = Vec::with_capacity(self.params.len());
        for p in &self.params {
            loaded.push((
                get(format!("exp_avg.{}", p.name), &p.exp_avg)?,
                get(format!("exp_avg_sq.{}", p.name), &p.exp_avg_sq)?,
            ));
        }
        tch::no_grad(|| {
            for (p, (m, v)) in self.params.iter_mut().zip(loaded) {
                p.exp_avg.copy_(&m);
                p.exp_avg_sq.copy_(&v);
            }
        });
        self.step = step.int64_value(&[]);
        Ok(())
    }
}

/// Linear warm-up to the peak, then cosine decay to `min_lr_ratio * peak`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LrSchedule {
    pub warmup_steps: i64,
    /// Final learning rate as a fraction of the peak.
    pub min_lr_ratio: f64,
}

impl Default for LrSchedule {
    fn default() -> Self {
        Self {
            warmup_steps: 20,
            min_lr_ratio: 0.1,
        }
    }
}

impl LrSchedule {
    pub fn validate(&self, prefix: &str) -> Result<(), crate::check::SettingError> {
        use crate::check::{at_least, path, within};
        at_least(&path(prefix, "warmup_steps"), self.warmup_steps, 0)?;
        within(&path(prefix, "min_lr_ratio"), self.min_lr_ratio, 0.0, 1.0)
    }

    /// Learning rate for update `step` (0-based) of `total_steps`.
    pub fn lr(&self, peak: f64, step: i64, total_steps: i64) -> f64 {
        if step < self.warmup_steps {
            return peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = (total_steps - self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        peak * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::Init, Device};

    /// Two steps of PyTorch's AdamW on w = [1, -2] (as a 1x2 weight, decayed)
    /// with loss sum(w^2), lr 0.1, betas (0.9, 0.999), eps 1e-8, wd 0.1:
    /// `torch.optim.AdamW([w], lr=0.1, weight_decay=0.1)`, printed w after
    /// each step: [0.89, -1.88], [0.780..., -1.761...]; computed by hand:
    /// step 1 moves each weight by lr * sign(g) after decay.
    #[test]
    fn matches_pytorch_adamw_by_hand() {
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[1, 2], Init::Const(0.0));
        tch::no_grad(|| {
            w.shallow_clone()
                .copy_(&Tensor::from_slice(&[1.0f32, -2.0]).view([1, 2]))
        });
        let mut opt = AdamW::new(
            &vs,
            AdamWConfig {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
            },
        );
        let mut history = vec![];
        for _ in 0..2 {
            opt.zero_grad();
            (&w * &w).sum(Kind::Float).backward();
            opt.step(0.1);
            history.push(Vec::<f32>::try_from(w.view([-1])).unwrap());
        }
        // Step 1: w*(1-0.01) - 0.1*sign(g) = [0.89, -1.88].
        assert!(
            (history[0][0] - 0.89).abs() < 1e-5 && (history[0][1] + 1.88).abs() < 1e-5,
            "{history:?}"
        );
        // Step 2, by hand: g = 2w; m = 0.1*g1*0.9 + 0.1*g2 ...; see below.
        let (g1, g2) = ([2.0f64, -4.0], [2.0 * 0.89, -2.0 * 1.88]);
        for i in 0..2 {
            let m = 0.9 * 0.1 * g1[i] + 0.1 * g2[i];
            let v = 0.999 * 0.001 * g1[i] * g1[i] + 0.001 * g2[i] * g2[i];
            let mhat = m / (1.0 - 0.9f64.powi(2));
            let vhat = v / (1.0 - 0.999f64.powi(2));
            let w1 = history[0][i] as f64 * (1.0 - 0.01);
            let expected = w1 - 0.1 * mhat / (vhat.sqrt() + 1e-8);
            assert!(
                (history[1][i] as f64 - expected).abs() < 1e-5,
                "{i}: {} vs {expected}",
                history[1][i]
            );
        }
    }

    #[test]
    fn state_round_trips_and_clipping_bounds_the_norm() {
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().var(
            "w",
            &[3, 4],
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        );
        let mut opt = AdamW::new(&vs, AdamWConfig::default());
        (&w * 100.0).sum(Kind::Float).backward();
        let before = opt.clip_grad_norm(1.0);
        assert!((before - 100.0 * 12f64.sqrt()).abs() < 1e-3);
        assert!((opt.grad_norm() - 1.0).abs() < 1e-4);
        opt.step(0.01);
        let saved: BTreeMap<_, _> = opt.state_tensors().into_iter().collect();
        let mut other = AdamW::new(&vs, AdamWConfig::default());
        other.load_state_tensors(&saved).unwrap();
        assert_eq!(other.steps(), 1);
        let again: BTreeMap<_, _> = other.state_tensors().into_iter().collect();
        for (k, t) in &saved {
            assert!(t.equal(&again[k]), "{k}");
        }
        let mut missing = saved;
        missing.remove("exp_avg.w");
        assert!(other
            .load_state_tensors(&missing)
            .unwrap_err()
            .to_string()
            .contains("exp_avg.w"));
    }

    #[test]
    fn schedule_warms_up_then_decays_to_floor() {
        let s = LrSchedule {
            warmup_steps: 10,
            min_lr_ratio: 0.1,
        };
        assert!((s.lr(1.0, 0, 100) - 0.1).abs() < 1e-12);
        assert!((s.lr(1.0, 9, 100) - 1.0).abs() < 1e-12);
        assert!((s.lr(1.0, 10, 100) - 1.0).abs() < 1e-12);
        assert!((s.lr(1.0, 55, 100) - 0.55).abs() < 1e-12);
        assert!((s.lr(1.0, 100, 100) - 0.1).abs() < 1e-12);
    }
}
