//! Stage kind `grpo` (Shao et al., 2024): each iteration answers
//! `prompts_per_iteration` prompts `group_size` times each (the rollout
//! every RL kind shares, `rl::rollout`), scores the answers (a
//! reward-model stage, the task's judge, or a program that ranks each
//! group), gives each answer its score against its group's as the
//! advantage of all its tokens, and takes `epochs` passes of clipped
//! policy steps over them, the KL to the frozen reference (k3) in the loss
//! or subtracted from the score. No critic. The arithmetic is in [`math`],
//! the iteration in [`learner`]; the RL driver (`rl::driver`) runs the
//! stage around it as it runs PPO's: ranks, LoRA, bf16, evals before and
//! after, rollout files, resume.

mod learner;
pub mod math;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::check;
use crate::dist::Ranks;
use crate::kind::{KindConfig, LoopRole, PathSetting, Plot, Produces};
use crate::model::sample::SamplingConfig;
use crate::optim::AdamWConfig;
use crate::rl::driver::{RlSummary, Schedule};
use crate::train::{StageContext, StageError};
use learner::GrpoLearner;
use math::{AdvantageEstimator, LossSpec, LossType};

/// Where the KL to the reference goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlPlacement {
    /// A per-token k3 penalty in the loss (GRPO).
    #[default]
    Loss,
    /// Subtracted from each answer's score before the group baseline (PPO's way).
    Reward,
}

/// Settings of a GRPO stage (`kind: grpo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoConfig {
    /// The starting policy: the SFT stage or a model folder.
    pub policy: PathBuf,
    /// The frozen reference; unset: the starting policy.
    pub reference: Option<PathBuf>,
    /// The reward-model stage that scores answers (or `gold_reward`).
    pub reward_model: Option<PathBuf>,
    /// Score answers with the task's judge instead of a reward model.
    pub gold_reward: bool,
    /// Or a program that ranks each group (the loop's labeller protocol:
    /// `{prompt, responses}` lines in, `{ranking}` lines out): an answer
    /// scores minus its rank, for rewards a program can verify.
    pub ranker_command: Option<Vec<String>>,
    /// The program is stopped, and the stage fails, after this long.
    pub ranker_timeout_seconds: f64,
    /// Or a reward program or built-in checker that scores each answer
    /// (`reward: {checker: math}`, `reward: {command: [python3, r.py]}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reward: Option<crate::rl::reward::RewardConfig>,
    /// Or multi-turn episodes: an environment program answers each policy
    /// turn (a tool's result) and scores the episode (see `rl::episode`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<crate::rl::episode::EnvConfig>,
    /// Prompts to answer: `{prompt}` (or `{messages}`) rows.
    pub prompts: PathBuf,
    pub iterations: i64,
    pub prompts_per_iteration: usize,
    /// Answers per prompt (G).
    pub group_size: usize,
    /// Answers per policy step.
    pub minibatch_size: usize,
    /// Passes over each iteration's answers.
    pub epochs: usize,
    /// Ratios are clipped to `1 - clip_range` below (and above, unless
    /// `epsilon_high` is set).
    pub clip_range: f64,
    /// Clip-higher (DAPO): ratios are clipped to `1 + epsilon_high` above;
    /// for `loss_type: cispo`, the largest importance weight itself (e.g.
    /// 5). Unset: `clip_range` (cispo: 5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon_high: Option<f64>,
    /// The objective and its normalisation: grpo, dr_grpo, dapo, bnpo,
    /// gspo, cispo or rloo (see `math::LossType`).
    #[serde(skip_serializing_if = "is_default")]
    pub loss_type: LossType,
    /// How scores become advantages: grpo, rloo, reinforce_pp or
    /// reinforce_pp_baseline.
    #[serde(skip_serializing_if = "is_default")]
    pub advantage: AdvantageEstimator,
    /// Answers cut off at `max_new_tokens` (no EOS) take no part in the
    /// loss (DAPO's overlong filtering).
    #[serde(skip_serializing_if = "is_default")]
    pub mask_truncated: bool,
    /// DAPO's dynamic sampling: groups whose answers all scored alike are
    /// replaced by groups of further prompts, sampled in up to this many
    /// extra rounds (each the size of an iteration); what is still short
    /// is made up with such groups. 0: off.
    #[serde(skip_serializing_if = "is_default")]
    pub dynamic_sampling_rounds: usize,
    /// DAPO's soft overlong punishment: an answer longer than
    /// `max_new_tokens - overlong_buffer` tokens loses up to 1 point,
    /// linearly, reaching -1 at `max_new_tokens`. 0: off.
    #[serde(skip_serializing_if = "is_default")]
    pub overlong_buffer: usize,
    /// The KL penalty's weight.
    pub beta: f64,
    pub kl_in: KlPlacement,
    /// Divide advantages by the group's standard deviation (GRPO); false:
    /// the differences alone (Dr. GRPO's advantages; the loss still
    /// averages over each answer's tokens).
    pub scale_rewards: bool,
    pub optimizer: AdamWConfig,
    pub max_grad_norm: f64,
    pub sampling: SamplingConfig,
    pub checkpoint_every: i64,
    /// Prompts to answer greedily before and after, scored by the judge.
    pub eval_prompts: Option<PathBuf>,
    /// Write each iteration's answers as Parquet (`rollouts/`).
    pub save_rollouts: bool,
    /// When the stage is flagged (its rollouts' score did not rise, or the
    /// judge scores its eval answers no better than the reference's),
    /// `rlhf run` starts no stage that depends on it; unset, flags warn.
    pub fail_if_not_learning: bool,
    /// Train LoRA adapters on the frozen policy; the reference is then the
    /// policy with its adapters off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<crate::model::lora::LoraConfig>,
    /// `bf16`: sampling and updates with matmuls in bfloat16 on fp32
    /// master weights (autocast).
    #[serde(skip_serializing_if = "crate::model::precision::Precision::is_fp32")]
    pub precision: crate::model::precision::Precision,
    pub seed: Option<u64>,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            policy: PathBuf::new(),
            reference: None,
            reward_model: None,
            gold_reward: false,
            ranker_command: None,
            ranker_timeout_seconds: 3600.0,
            reward: None,
            env: None,
            prompts: PathBuf::new(),
            iterations: 40,
            prompts_per_iteration: 16,
            group_size: 8,
            minibatch_size: 32,
            epochs: 1,
            clip_range: 0.2,
            epsilon_high: None,
            loss_type: LossType::Grpo,
            advantage: AdvantageEstimator::Grpo,
            mask_truncated: false,
            dynamic_sampling_rounds: 0,
            overlong_buffer: 0,
            beta: 0.04,
            kl_in: KlPlacement::Loss,
            scale_rewards: true,
            optimizer: AdamWConfig {
                lr: 1e-5,
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
            max_grad_norm: 1.0,
            sampling: SamplingConfig {
                temperature: 1.0,
                ..SamplingConfig::default()
            },
            checkpoint_every: 10,
            eval_prompts: None,
            save_rollouts: true,
            fail_if_not_learning: false,
            lora: None,
            precision: Default::default(),
            seed: None,
        }
    }
}

impl KindConfig for GrpoConfig {
    const KIND: &'static str = "grpo";
    const PRODUCES: Produces = Produces::Policy;
    const LOOP_ROLE: LoopRole = LoopRole::OptimisesScorer;
    const PLOTS: &'static [Plot] = &[
        Plot::Iterations {
            file: "grpo_training.png",
            panels: &[
                ("score", "Score of the sampled groups", "mean score"),
                ("kl", "KL to the reference (per answer)", "nats"),
                ("clip_fraction", "Clip fraction", "fraction"),
                (
                    "zero_spread",
                    "Groups whose answers all scored alike",
                    "fraction",
                ),
            ],
        },
        Plot::ScoreAgainstKl {
            file: "grpo_overoptimization.png",
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
        let scorers = [
            self.reward_model.is_some(),
            self.gold_reward,
            self.ranker_command.is_some(),
            self.reward.is_some(),
            self.env.is_some(),
        ];
        if scorers.iter().filter(|&&s| s).count() > 1 {
            return Err(StageError::setting(
                "reward_model",
                "give one scorer: `reward_model`, `gold_reward: true`, `ranker_command`, `reward` or `env` (whose environment scores its episodes)",
            ));
        }
        if let Some(r) = &self.reward {
            r.validate()?;
        }
        if let Some(e) = &self.env {
            e.validate()?;
        }
        if let Some(c) = &self.ranker_command {
            if c.is_empty() {
                return Err(StageError::setting(
                    "ranker_command",
                    "is empty: give the program and its arguments",
                ));
            }
        }
        let t = self.ranker_timeout_seconds;
        check::require(
            "ranker_timeout_seconds",
            t > 0.0 && t <= 1e9,
            "in (0, 1e9]",
            check::shown(t),
        )?;
        crate::rl::check_scorer_and_iterations(
            self.reward_model.is_some()
                || self.ranker_command.is_some()
                || self.reward.is_some()
                || self.env.is_some(),
            self.gold_reward,
            self.iterations,
        )?;
        check::count(
            "prompts_per_iteration",
            self.prompts_per_iteration as u64,
            1,
            1 << 16,
        )?;
        check::count("group_size", self.group_size as u64, 2, 1024)?;
        check::count("minibatch_size", self.minibatch_size as u64, 1, 1 << 16)?;
        check::count("epochs", self.epochs as u64, 1, 64)?;
        let eps = self.clip_range;
        check::require("clip_range", eps > 0.0 && eps < 1.0, "in (0, 1)", eps)?;
        self.check_family()?;
        check::non_negative("beta", self.beta)?;
        self.optimizer.validate("optimizer")?;
        check::non_negative("max_grad_norm", self.max_grad_norm)?;
        check::at_least("checkpoint_every", self.checkpoint_every, 1)?;
        self.sampling.validate().map_err(|e| match e {
            crate::model::sample::SamplingError::Invalid(m) => StageError::setting("sampling", m),
            other => other.into(),
        })
    }

    fn paths(&mut self) -> Vec<PathSetting<'_>> {
        vec![
            PathSetting::data(
                "prompts",
                "the prompts to answer: {prompt} rows",
                &mut self.prompts,
            ),
            PathSetting::model(
                "policy",
                "the starting policy: the SFT stage or a model folder, e.g. `policy: sft`",
                &mut self.policy,
            ),
            PathSetting::optional_model("reference", &mut self.reference),
            PathSetting::optional_model("reward_model", &mut self.reward_model),
            PathSetting::optional_data("eval_prompts", &mut self.eval_prompts),
        ]
    }

    fn seed_mut(&mut self) -> &mut Option<u64> {
        &mut self.seed
    }

    /// Ranks take equal shares of the prompts (each a whole group) and
    /// of each minibatch.
    fn shared_batches(&mut self) -> Vec<(&'static str, usize)> {
        vec![
            ("prompts_per_iteration", self.prompts_per_iteration),
            ("minibatch_size", self.minibatch_size),
        ]
    }

    fn run(&self, ctx: &StageContext) -> Result<RlSummary, StageError> {
        run(self, ctx)
    }
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

impl GrpoConfig {
    /// The upper clip: `epsilon_high`, else `clip_range` (cispo: 5).
    pub fn clip_high(&self) -> f64 {
        match (self.epsilon_high, self.loss_type) {
            (Some(e), _) => e,
            (None, LossType::Cispo) => 5.0,
            (None, _) => self.clip_range,
        }
    }

    /// The settings of the critic-free family agree with each other.
    fn check_family(&self) -> Result<(), StageError> {
        let high = self.clip_high();
        match self.loss_type {
            LossType::Cispo => check::require(
                "epsilon_high",
                high > 1.0 && high <= 1e6,
                "the largest importance weight for cispo: in (1, 1e6]",
                high,
            )?,
            _ => check::require(
                "epsilon_high",
                high > 0.0 && high <= 10.0,
                "in (0, 10]",
                high,
            )?,
        }
        let per_token = matches!(
            self.advantage,
            AdvantageEstimator::ReinforcePp | AdvantageEstimator::ReinforcePpBaseline
        ) && self.kl_in == KlPlacement::Reward;
        if per_token && self.loss_type.per_answer_ratio() {
            return Err(StageError::setting(
                "loss_type",
                "gspo and rloo take one ratio per answer; REINFORCE++ with `kl_in: reward` gives each token its own advantage: use a token-level loss_type (grpo, dapo, ...) or `kl_in: loss`",
            ));
        }
        check::count(
            "dynamic_sampling_rounds",
            self.dynamic_sampling_rounds as u64,
            0,
            64,
        )?;
        let most = self.sampling.max_new_tokens.max(0) as usize;
        check::require(
            "overlong_buffer",
            self.overlong_buffer <= most,
            "at most sampling.max_new_tokens",
            self.overlong_buffer,
        )?;
        Ok(())
    }

    /// What the policy loss reads.
    pub fn loss_spec(&self, beta: f64) -> LossSpec {
        LossSpec {
            loss_type: self.loss_type,
            clip_low: self.clip_range,
            clip_high: self.clip_high(),
            beta,
            max_new_tokens: self.sampling.max_new_tokens as f64,
        }
    }
}

/// Runs (or resumes, or finds done) a GRPO run.
pub fn run(cfg: &GrpoConfig, ctx: &StageContext) -> Result<RlSummary, StageError> {
    KindConfig::validate(cfg)?;
    check_ranks(cfg, &ctx.ranks)?;
    let schedule = Schedule {
        kind: "grpo",
        iterations: cfg.iterations,
        checkpoint_every: cfg.checkpoint_every,
        seed: cfg.seed.unwrap_or(0),
        eval_prompts: cfg.eval_prompts.clone(),
        max_new_tokens: cfg.sampling.max_new_tokens,
        save_rollouts: cfg.save_rollouts,
        kl_setting: "beta",
        max_grad_norm: cfg.max_grad_norm,
    };
    crate::rl::driver::run(&schedule, ctx, || GrpoLearner::start_or_resume(cfg, ctx))
}

/// What several ranks need: whole groups and minibatches divide among
/// them, and the minibatches divide the iteration's answers.
fn check_ranks(cfg: &GrpoConfig, ranks: &Ranks) -> Result<(), StageError> {
    let shared = KindConfig::shared_batches(&mut cfg.clone());
    let answers = (
        cfg.prompts_per_iteration * cfg.group_size,
        "the iteration's answers (prompts_per_iteration x group_size)",
    );
    crate::rl::check_rank_shares(ranks.world(), shared, cfg.minibatch_size, answers)
}
