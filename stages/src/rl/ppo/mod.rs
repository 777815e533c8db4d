//! Stage 3: PPO against the reward model (InstructGPT, Ouyang et al. 2022;
//! Ziegler et al. 2019; Schulman et al. 2017).
//!
//! Four models: the policy (from SFT), a frozen reference (SFT), the critic
//! (trunk and value head from the reward model) and the frozen reward
//! model. Each iteration runs three named phases ([`phases`]):
//!
//! 1. **rollout**: the rollout every RL kind shares (`rl::rollout`: answers
//!    sampled with the KV cache, the policy's and reference's view of
//!    them, the reward model's scores), plus the critic's values;
//! 2. **experience**: per-token rewards from the KL penalty and the score
//!    ([`math::token_rewards`]), GAE advantages, whitening;
//! 3. **update**: minibatch epochs of clipped-surrogate policy steps and
//!    clipped value steps;
//!
//! and the RL driver (`rl::driver`) runs the stage around them: resume,
//! evals, metrics, rollout files, checkpoints, interrupts, summary.
//!
//! Token `i` of an answer is predicted from position `P - 1 + i` of the
//! padded sequence (P = prompt width), and its value is the critic's output
//! at that same position: the state before the token is chosen.

pub mod math;
mod phases;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::check;
use crate::dist::Ranks;
use crate::kind::{KindConfig, LoopRole, PathSetting, Plot, Produces};
use crate::model::sample::SamplingConfig;
use crate::optim::AdamWConfig;
use crate::rl::check_scorer_and_iterations;
use crate::rl::driver::{RlSummary, Schedule};
use crate::train::{StageContext, StageError};

pub use math::{
    clipped_surrogate, clipped_value_loss, explained_variance, gae, kl_estimate, masked_mean,
    token_rewards, whiten, AdaptiveKl, KlController, KlEstimator,
};
use phases::PpoLearner;

/// Language-model loss on demonstrations during PPO (InstructGPT's PPO-ptx).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtxConfig {
    /// `{prompt, completion}` or `{messages}` rows.
    pub data: PathBuf,
    /// gamma in InstructGPT's objective (they used 27.8).
    pub coef: f64,
    #[serde(default = "default_ptx_batch")]
    pub batch_size: usize,
}

fn default_ptx_batch() -> usize {
    8
}

/// Settings of a PPO stage (`kind: ppo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PpoConfig {
    /// `{prompt}` rows to roll out on.
    pub prompts: PathBuf,
    /// The starting policy (the SFT checkpoint, e.g. `policy: sft`).
    pub policy: PathBuf,
    /// The frozen reference; unset: the starting policy.
    pub reference: Option<PathBuf>,
    /// The frozen reward model.
    pub reward_model: Option<PathBuf>,
    /// Use the judge (the bundled task's gold judge) as the reward instead
    /// of a model: an oracle run, the upper bound of what a reward model
    /// can give.
    pub gold_reward: bool,
    /// Or a reward program or built-in checker that scores each answer
    /// (`reward: {checker: math}`, `reward: {command: [python3, r.py]}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reward: Option<crate::rl::reward::RewardConfig>,
    /// The critic's start; unset: the reward model (or the policy's trunk
    /// with a fresh head when the reward is not a model).
    pub critic: Option<PathBuf>,
    pub iterations: i64,
    /// Prompts sampled per iteration.
    pub rollout_batch: usize,
    pub sampling: SamplingConfig,
    pub ppo_epochs: usize,
    pub minibatch_size: usize,
    /// epsilon of the clipped surrogate.
    pub clip_range: f64,
    /// Clip range of the value update; 0 disables value clipping.
    pub clip_range_value: f64,
    pub gamma: f64,
    pub lam: f64,
    /// beta: the KL penalty's weight (InstructGPT: 0.02).
    pub kl_coef: f64,
    pub kl_estimator: KlEstimator,
    pub adaptive_kl: Option<AdaptiveKl>,
    /// Subtracted from the score of answers that do not end with EOS.
    pub missing_eos_penalty: Option<f64>,
    /// Scores are clipped to [-reward_clip, reward_clip].
    pub reward_clip: Option<f64>,
    pub whiten_advantages: bool,
    pub entropy_coef: f64,
    pub policy_optimizer: AdamWConfig,
    pub critic_optimizer: AdamWConfig,
    pub max_grad_norm: f64,
    pub ptx: Option<PtxConfig>,
    pub checkpoint_every: i64,
    /// Prompts to answer greedily before and after, scored by the judge.
    pub eval_prompts: Option<PathBuf>,
    /// Write each iteration's rollouts as Parquet.
    pub save_rollouts: bool,
    /// Unset: the experiment's seed.
    pub seed: Option<u64>,
    /// When the stage is flagged (its rollouts' score did not rise, or the
    /// judge scores its eval answers no better than the reference's),
    /// `rlhf run` starts no stage that depends on it; unset, flags warn.
    pub fail_if_not_learning: bool,
    /// Train LoRA adapters on the frozen policy and critic. The reference
    /// is then the policy with its adapters off: one copy of the base in
    /// memory, not two.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<crate::model::lora::LoraConfig>,
    /// `bf16`: rollouts and updates with matmuls in bfloat16 on fp32
    /// master weights (autocast).
    #[serde(skip_serializing_if = "crate::model::precision::Precision::is_fp32")]
    pub precision: crate::model::precision::Precision,
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self {
            prompts: PathBuf::new(),
            policy: PathBuf::new(),
            reference: None,
            reward_model: None,
            gold_reward: false,
            reward: None,
            critic: None,
            iterations: 40,
            rollout_batch: 64,
            sampling: SamplingConfig {
                temperature: 1.0,
                max_new_tokens: 24,
                ..SamplingConfig::default()
            },
            ppo_epochs: 4,
            minibatch_size: 16,
            clip_range: 0.2,
            clip_range_value: 0.2,
            gamma: 1.0,
            lam: 0.95,
            kl_coef: 0.02,
            kl_estimator: KlEstimator::K1,
            adaptive_kl: None,
            missing_eos_penalty: Some(1.0),
            reward_clip: None,
            whiten_advantages: true,
            entropy_coef: 0.0,
            policy_optimizer: AdamWConfig {
                lr: 1e-5,
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
            critic_optimizer: AdamWConfig {
                lr: 1e-4,
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
            max_grad_norm: 1.0,
            ptx: None,
            checkpoint_every: 10,
            eval_prompts: None,
            save_rollouts: true,
            seed: None,
            fail_if_not_learning: false,
            lora: None,
            precision: Default::default(),
        }
    }
}

impl KindConfig for PpoConfig {
    const KIND: &'static str = "ppo";
    const PRODUCES: Produces = Produces::Policy;
    const LOOP_ROLE: LoopRole = LoopRole::OptimisesScorer;
    const PLOTS: &'static [Plot] = &[
        Plot::Iterations {
            file: "ppo_training.png",
            panels: &[
                ("score", "Reward-model score of rollouts", "mean score"),
                ("kl", "KL to the reference (per answer)", "nats"),
                ("beta", "KL coefficient beta", "beta"),
                ("clip_fraction", "Clip fraction", "fraction"),
            ],
        },
        Plot::ScoreAgainstKl {
            file: "overoptimization.png",
        },
    ];
    type Summary = RlSummary;

    fn precision(&mut self) -> crate::model::precision::Precision {
        self.precision
    }

    fn validate(&self) -> Result<(), StageError> {
        if let Some(l) = &self.lora {
            l.validate("lora")?;
        }
        if let Some(r) = &self.reward {
            if self.reward_model.is_some() || self.gold_reward {
                return Err(StageError::setting(
                    "reward",
                    "give one scorer: `reward_model`, `gold_reward: true` or `reward`",
                ));
            }
            r.validate()?;
        }
        check_scorer_and_iterations(
            self.reward_model.is_some() || self.reward.is_some(),
            self.gold_reward,
            self.iterations,
        )?;
        for (name, n) in [
            ("rollout_batch", self.rollout_batch),
            ("ppo_epochs", self.ppo_epochs),
            ("minibatch_size", self.minibatch_size),
        ] {
            check::count(name, n as u64, 1, 1 << 16)?;
        }
        let eps = self.clip_range;
        check::require("clip_range", eps > 0.0 && eps < 1.0, "in (0, 1)", eps)?;
        check::non_negative("clip_range_value", self.clip_range_value)?;
        check::within("gamma", self.gamma, 0.0, 1.0)?;
        check::within("lam", self.lam, 0.0, 1.0)?;
        check::non_negative("kl_coef", self.kl_coef)?;
        if let Some(a) = &self.adaptive_kl {
            check::positive("adaptive_kl.target", a.target)?;
            check::positive("adaptive_kl.horizon", a.horizon)?;
        }
        if let Some(p) = self.missing_eos_penalty {
            check::require("missing_eos_penalty", p.is_finite(), "a finite number", p)?;
        }
        if let Some(c) = self.reward_clip {
            check::positive("reward_clip", c)?;
        }
        check::non_negative("entropy_coef", self.entropy_coef)?;
        self.policy_optimizer.validate("policy_optimizer")?;
        self.critic_optimizer.validate("critic_optimizer")?;
        check::non_negative("max_grad_norm", self.max_grad_norm)?;
        if let Some(ptx) = &self.ptx {
            check::non_negative("ptx.coef", ptx.coef)?;
            check::count("ptx.batch_size", ptx.batch_size as u64, 1, 1 << 16)?;
        }
        check::at_least("checkpoint_every", self.checkpoint_every, 1)?;
        self.sampling.validate().map_err(|e| match e {
            crate::model::sample::SamplingError::Invalid(m) => StageError::setting("sampling", m),
            other => other.into(),
        })
    }

    fn paths(&mut self) -> Vec<PathSetting<'_>> {
        let mut paths = vec![
            PathSetting::data(
                "prompts",
                "the prompts to roll out on: {prompt} rows",
                &mut self.prompts,
            ),
            PathSetting::model(
                "policy",
                "the starting policy: the SFT stage or a model folder, e.g. `policy: sft`",
                &mut self.policy,
            ),
            PathSetting::optional_model("reference", &mut self.reference),
            PathSetting::optional_model("reward_model", &mut self.reward_model),
            PathSetting::optional_model("critic", &mut self.critic),
            PathSetting::optional_data("eval_prompts", &mut self.eval_prompts),
        ];
        if let Some(ptx) = &mut self.ptx {
            paths.push(PathSetting::data(
                "ptx.data",
                "the demonstrations for the LM loss",
                &mut ptx.data,
            ));
        }
        paths
    }

    fn seed_mut(&mut self) -> &mut Option<u64> {
        &mut self.seed
    }

    fn shared_batches(&mut self) -> Vec<(&'static str, usize)> {
        vec![
            ("rollout_batch", self.rollout_batch),
            ("minibatch_size", self.minibatch_size),
        ]
    }
    fn run(&self, ctx: &StageContext) -> Result<RlSummary, StageError> {
        run(self, ctx)
    }
}

/// Runs (or resumes, or finds done) a PPO run.
pub fn run(cfg: &PpoConfig, ctx: &StageContext) -> Result<RlSummary, StageError> {
    KindConfig::validate(cfg)?;
    check_ranks(cfg, &ctx.ranks)?;
    let schedule = Schedule {
        kind: "ppo",
        iterations: cfg.iterations,
        checkpoint_every: cfg.checkpoint_every,
        seed: cfg.seed.unwrap_or(0),
        eval_prompts: cfg.eval_prompts.clone(),
        max_new_tokens: cfg.sampling.max_new_tokens,
        save_rollouts: cfg.save_rollouts,
        kl_setting: "kl_coef",
        max_grad_norm: cfg.max_grad_norm,
    };
    crate::rl::driver::run(&schedule, ctx, || PpoLearner::start_or_resume(cfg, ctx))
}

/// What several ranks need: every batch divides among them, and no PPO-ptx
/// (its language-model batches are not split yet).
fn check_ranks(cfg: &PpoConfig, ranks: &Ranks) -> Result<(), StageError> {
    let shared = KindConfig::shared_batches(&mut cfg.clone());
    let answers = (cfg.rollout_batch, "rollout_batch");
    crate::rl::check_rank_shares(ranks.world(), shared, cfg.minibatch_size, answers)?;
    if ranks.world() > 1 && cfg.ptx.is_some() {
        return Err(StageError::setting(
            "ptx",
            "PPO-ptx does not run data-parallel yet: run this stage as one process",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::rl::score_did_not_rise;
    use crate::train::METRICS_FILE;

    #[test]
    fn a_score_that_did_not_rise_is_flagged() {
        let d = tempfile::tempdir().unwrap();
        let metrics = d.path().join(METRICS_FILE);
        let write = |scores: &[f64]| {
            let lines: String = scores
                .iter()
                .map(|s| format!("{{\"score\": {s}}}\n"))
                .collect();
            std::fs::write(&metrics, lines).unwrap();
        };
        write(&[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]);
        assert_eq!(score_did_not_rise(&metrics, "ppo", "kl_coef"), None);
        write(&[0.5, 0.6, 0.4, 0.5, 0.5, 0.4, 0.5, 0.4]);
        // First two 0.5, 0.6 and last two 0.5, 0.4: a fall of 0.1 against a
        // standard error of sqrt(0.005 / 2 + 0.005 / 2) = 0.0707.
        let w = score_did_not_rise(&metrics, "ppo", "kl_coef").unwrap();
        assert!(w.starts_with("ppo may not be learning: the rollouts' mean score went from 0.5500 (first 2 iterations) to 0.4500 (last 2), a fall beyond its noise (0.0707)"), "{w}");
        // The same fall among scores that swing by 1 either way says nothing.
        write(&[1.5, -0.4, 0.4, 0.5, 0.5, 0.4, 1.4, -0.5]);
        assert_eq!(score_did_not_rise(&metrics, "grpo", "beta"), None);
        // A flat run without noise falls by nothing: still flagged.
        write(&[0.5; 8]);
        assert!(score_did_not_rise(&metrics, "ppo", "kl_coef").is_some());
    }
}
