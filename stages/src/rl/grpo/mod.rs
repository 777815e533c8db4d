//! Stage kind `grpo` (Shao et al., 2024): each iteration answers
//! `prompts_per_iteration` prompts `group_size` times each (sampled with
//! the KV cache, as PPO's rollouts), scores the answers (a reward-model
//! stage or the task's judge), gives each answer its score against its
//! group's as the advantage of all its tokens, and takes `epochs` passes of
//! clipped policy steps over them, the KL to the frozen reference (k3) in
//! the loss or subtracted from the score. No critic. The arithmetic is in
//! [`math`]. One process (data-parallel GRPO is refused by name).

pub mod math;

use std::path::PathBuf;
use std::time::Instant;

use rlhf_datasets::batch::epoch_order;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Kind, Tensor};

use crate::check;
use crate::kind::{KindConfig, LoopRole, PathSetting, Plot, Produces};
use crate::model::checkpoint::{HeadChoice, Model};
use crate::model::gpt::Head;
use crate::model::sample::{generate, SamplingConfig, TokenSpec};
use crate::optim::{AdamW, AdamWConfig};
use crate::rl::rollout::{answer_logprobs, prompts_with_room, Scorer};
use crate::train::{
    check_finite, load_training, newest_usable, prepare_out_dir, progress_bar, save_training,
    step_seed, write_summary, Checkpointer, MetricsLog, StageContext, StageError, FINAL_DIR,
    METRICS_FILE,
};
use math::{group_advantages, grpo_loss};

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
    pub clip_range: f64,
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
            prompts: PathBuf::new(),
            iterations: 40,
            prompts_per_iteration: 16,
            group_size: 8,
            minibatch_size: 32,
            epochs: 1,
            clip_range: 0.2,
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
            seed: None,
        }
    }
}

impl KindConfig for GrpoConfig {
    const KIND: &'static str = "grpo";
    const PRODUCES: Produces = Produces::Policy;
    const LOOP_ROLE: LoopRole = LoopRole::OptimisesScorer;
    const PLOTS: &'static [Plot] = &[Plot::Iterations {
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
    }];
    type Summary = GrpoSummary;

    fn validate(&self) -> Result<(), StageError> {
        let scorers = [
            self.reward_model.is_some(),
            self.gold_reward,
            self.ranker_command.is_some(),
        ];
        if scorers.iter().filter(|&&s| s).count() > 1 {
            return Err(StageError::setting(
                "reward_model",
                "give one scorer: `reward_model`, `gold_reward: true` or `ranker_command`",
            ));
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
            self.reward_model.is_some() || self.ranker_command.is_some(),
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
        ]
    }

    fn seed_mut(&mut self) -> &mut Option<u64> {
        &mut self.seed
    }

    fn run(&self, ctx: &StageContext) -> Result<GrpoSummary, StageError> {
        run(self, ctx)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrpoSummary {
    pub iterations: i64,
    pub first_mean_score: f64,
    pub last_mean_score: f64,
    /// Mean per-token KL to the reference, last iteration.
    pub last_kl: f64,
    /// Share of groups, over the run, whose answers all scored alike.
    pub zero_spread_share: f64,
    pub wall_seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// What a GRPO checkpoint records besides the weights and moments.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct GrpoState {
    stage: String,
    iteration: i64,
    iterations: i64,
    first_mean_score: Option<f64>,
    groups: usize,
    zero_spread: usize,
    done: bool,
}

/// How the stage scores answers: each on its own (a reward model, the
/// judge), or each group ranked by a program.
enum GroupScorer {
    Each(Scorer),
    Ranked(RankedBy),
}

/// A program that ranks groups, and how long it may take.
struct RankedBy {
    ranker: crate::train::Ranker,
    command: Vec<String>,
    timeout: f64,
}

impl RankedBy {
    /// Minus each answer's rank in its group (`group` consecutive answers
    /// to one prompt): the best scores 0.
    fn scores(
        &self,
        prompts: &[&str],
        answers: &[String],
        group: usize,
    ) -> Result<Vec<f64>, StageError> {
        let groups: Vec<(String, Vec<String>)> = answers
            .chunks(group)
            .zip(prompts.chunks(group))
            .map(|(a, p)| (p[0].to_owned(), a.to_vec()))
            .collect();
        let rankings = (self.ranker)(&self.command, self.timeout, &groups)
            .map_err(|e| StageError::setting("ranker_command", e))?;
        Ok(rankings.iter().flatten().map(|&r| -(r as f64)).collect())
    }
}

/// One iteration's answers, as the update needs them (rows: answers).
struct Answers {
    tokens: Tensor,
    attention: Tensor,
    mask: Tensor,
    width: i64,
    old_lp: Tensor,
    ref_lp: Tensor,
    advantages: Tensor,
    scores: Vec<f64>,
    zero_spread: usize,
    mean_length: f64,
}

/// Samples the iteration's groups, scores them and gives each answer its
/// group advantage.
#[allow(clippy::too_many_arguments)]
fn sample_groups(
    cfg: &GrpoConfig,
    policy: &Model,
    reference: &Model,
    scorer: &GroupScorer,
    prompts: &(Vec<String>, Vec<Vec<i64>>),
    iteration: i64,
    device: tch::Device,
) -> Result<Answers, StageError> {
    let (texts, ids) = prompts;
    let p = cfg.prompts_per_iteration;
    let per_epoch = (ids.len() / p).max(1) as i64;
    let (epoch, pos) = (iteration / per_epoch, (iteration % per_epoch) as usize);
    let order = epoch_order(ids.len(), cfg.seed.unwrap_or(0), epoch as u64);
    let chosen: Vec<usize> = order
        .iter()
        .cycle()
        .skip(pos * p)
        .take(p)
        .copied()
        .collect();
    let group = cfg.group_size;
    let rows: Vec<usize> = chosen
        .iter()
        .flat_map(|&i| std::iter::repeat_n(i, group))
        .collect();
    let prompt_ids: Vec<Vec<i64>> = rows.iter().map(|&i| ids[i].clone()).collect();
    let tok = &policy.tokenizer;
    let g = generate(
        &policy.net,
        &prompt_ids,
        &cfg.sampling,
        TokenSpec::of(tok),
        device,
    )?;
    let (width, vocab) = (g.prompt_width, tok.vocab_size() as i64);
    let n = g.tokens.size()[1] - width;
    let mask = g.attention_mask.narrow(1, width, n).to_kind(Kind::Float);
    let (old_lp, ref_lp) = tch::no_grad(|| {
        let (lp, _) = answer_logprobs(&policy.net, &g.tokens, &g.attention_mask, width, vocab);
        let (rlp, _) = answer_logprobs(&reference.net, &g.tokens, &g.attention_mask, width, vocab);
        (lp, rlp)
    });
    let answers: Vec<String> = g
        .answers
        .iter()
        .map(|a| tok.decode(a, false))
        .collect::<Result<_, _>>()?;
    let row_prompts: Vec<&str> = rows.iter().map(|&i| texts[i].as_str()).collect();
    let scores = match scorer {
        GroupScorer::Each(s) => s.score(&prompt_ids, &row_prompts, &g.answers, &answers, device),
        GroupScorer::Ranked(r) => r.scores(&row_prompts, &answers, group)?,
    };
    check_finite(iteration + 1, "score", scores.iter().sum::<f64>())?;
    // Groups whose answers all scored alike teach nothing, whatever their KL.
    let (_, zero_spread) = group_advantages(&scores, group, cfg.scale_rewards);
    let mut shaped = scores.clone();
    if cfg.kl_in == KlPlacement::Reward {
        let kl = ((&old_lp - &ref_lp) * &mask).sum_dim_intlist(1, false, Kind::Double);
        let kl = Vec::<f64>::try_from(kl.to_device(tch::Device::Cpu)).unwrap_or_default();
        shaped
            .iter_mut()
            .zip(kl)
            .for_each(|(s, k)| *s -= cfg.beta * k);
    }
    let (mut adv, _) = group_advantages(&shaped, group, cfg.scale_rewards);
    for (a, s) in adv.chunks_mut(group).zip(scores.chunks(group)) {
        if s.iter().all(|&x| x == s[0]) {
            a.fill(0.0);
        }
    }
    let mean_length = g.answers.iter().map(Vec::len).sum::<usize>() as f64 / rows.len() as f64;
    Ok(Answers {
        advantages: Tensor::from_slice(&adv)
            .to_kind(Kind::Float)
            .to_device(device),
        tokens: g.tokens,
        attention: g.attention_mask,
        mask,
        width,
        old_lp,
        ref_lp,
        scores,
        zero_spread,
        mean_length,
    })
}

/// `epochs` passes of clipped policy steps over the answers, shuffled
/// into minibatches; mean loss, clip fraction and KL over the steps.
fn update(
    cfg: &GrpoConfig,
    policy: &Model,
    opt: &mut AdamW,
    a: &Answers,
    iteration: i64,
) -> Result<[f64; 3], StageError> {
    let device = a.tokens.device();
    let vocab = policy.tokenizer.vocab_size() as i64;
    let beta = if cfg.kl_in == KlPlacement::Loss {
        cfg.beta
    } else {
        0.0
    };
    let b = a.scores.len();
    let (mut sums, mut steps) = ([0.0; 3], 0.0);
    for epoch in 0..cfg.epochs {
        let perm = epoch_order(
            b,
            cfg.seed.unwrap_or(0) ^ ((iteration as u64 + 1) << 16),
            epoch as u64,
        );
        for chunk in perm.chunks(cfg.minibatch_size) {
            let idx = Tensor::from_slice(&chunk.iter().map(|&i| i as i64).collect::<Vec<_>>())
                .to_device(device);
            let sel = |t: &Tensor| t.index_select(0, &idx);
            let (lp, _) = answer_logprobs(
                &policy.net,
                &sel(&a.tokens),
                &sel(&a.attention),
                a.width,
                vocab,
            );
            let out = grpo_loss(
                &lp,
                &sel(&a.old_lp),
                &sel(&a.ref_lp),
                &sel(&a.advantages),
                &sel(&a.mask),
                cfg.clip_range,
                beta,
            );
            opt.zero_grad();
            out.loss.backward();
            let norm = opt.clip_grad_norm(cfg.max_grad_norm);
            check_finite(iteration + 1, "policy gradient norm", norm)?;
            opt.step(cfg.optimizer.lr);
            sums[0] += out.loss.double_value(&[]);
            sums[1] += out.clip_fraction;
            sums[2] += out.kl;
            steps += 1.0;
        }
    }
    check_finite(iteration + 1, "GRPO loss", sums[0])?;
    Ok(sums.map(|s| s / steps))
}

/// The policy and its optimiser from the newest usable periodic
/// checkpoint, with the state it saved; else the starting policy.
fn start_or_resume(
    cfg: &GrpoConfig,
    ctx: &StageContext,
) -> Result<(Model, AdamW, Option<GrpoState>), StageError> {
    let want = HeadChoice::Want(Head::Lm);
    let resumed = newest_usable(&ctx.out_dir, |dir| {
        load_training::<GrpoState>(dir, want, ctx.device)
    });
    let (policy, moments, state) = match resumed {
        Some((_, _, (m, moments, state))) => (m, Some(moments), Some(state)),
        None => (Model::load(&cfg.policy, want, ctx.device)?, None, None),
    };
    let mut opt = AdamW::new(&policy.vs, cfg.optimizer.clone());
    if let Some(m) = &moments {
        opt.load_state_tensors(m)?;
    }
    Ok((policy, opt, state))
}

impl GroupScorer {
    /// The stage's scorer: its ranking program, else a reward model or the judge.
    fn load(cfg: &GrpoConfig, ctx: &StageContext) -> Result<Self, StageError> {
        let Some(command) = &cfg.ranker_command else {
            let rm = cfg.reward_model.as_deref();
            return Ok(GroupScorer::Each(Scorer::load(rm, cfg.gold_reward, ctx)?));
        };
        let ranker = ctx.ranker.clone().ok_or_else(|| {
            StageError::setting(
                "ranker_command",
                "needs the pipeline's ranker (run the stage with rlhf)",
            )
        })?;
        Ok(GroupScorer::Ranked(RankedBy {
            ranker,
            command: command.clone(),
            timeout: cfg.ranker_timeout_seconds,
        }))
    }
}

/// Runs (or resumes, or finds done) a GRPO run.
pub fn run(cfg: &GrpoConfig, ctx: &StageContext) -> Result<GrpoSummary, StageError> {
    KindConfig::validate(cfg)?;
    if ctx.ranks.world() > 1 {
        return Err(StageError::setting(
            "distributed",
            "GRPO does not run data-parallel yet: run this stage as one process",
        ));
    }
    let started = Instant::now();
    let out = &ctx.out_dir;
    if let Some(done) = prepare_out_dir(out, "grpo")? {
        return Ok(done);
    }
    let (device, seed) = (ctx.device, cfg.seed.unwrap_or(0));
    tch::manual_seed(seed as i64);
    let (policy, mut opt, state) = start_or_resume(cfg, ctx)?;
    let mut reference = Model::load(
        cfg.reference.as_ref().unwrap_or(&cfg.policy),
        HeadChoice::Want(Head::Lm),
        device,
    )?;
    reference.vs.freeze();
    let scorer = GroupScorer::load(cfg, ctx)?;
    let prompts = prompts_with_room(&cfg.prompts, &policy, cfg.sampling.max_new_tokens)?;
    let mut state = state.unwrap_or(GrpoState {
        stage: "grpo".into(),
        iteration: 0,
        iterations: cfg.iterations,
        first_mean_score: None,
        groups: 0,
        zero_spread: 0,
        done: false,
    });
    let mut metrics = MetricsLog::open(
        &out.join(METRICS_FILE),
        Some(state.iteration).filter(|&i| i > 0),
    )?;
    let checkpointer = Checkpointer {
        out_dir: out.clone(),
        every: cfg.checkpoint_every,
        total_steps: cfg.iterations,
        stop_after: ctx.stop_after,
        writes: true,
    };
    let bar = progress_bar(cfg.iterations as u64, state.iteration as u64, "grpo");
    let (mut last_score, mut last_kl) = (f64::NAN, f64::NAN);
    for iteration in state.iteration..cfg.iterations {
        let t0 = Instant::now();
        tch::manual_seed(step_seed(seed, iteration));
        let a = sample_groups(
            cfg, &policy, &reference, &scorer, &prompts, iteration, device,
        )?;
        let [loss, clip_fraction, kl] = update(cfg, &policy, &mut opt, &a, iteration)?;
        let score = a.scores.iter().sum::<f64>() / a.scores.len() as f64;
        state.first_mean_score.get_or_insert(score);
        state.groups += cfg.prompts_per_iteration;
        state.zero_spread += a.zero_spread;
        (last_score, last_kl) = (score, kl);
        metrics.write(&json!({
            "step": iteration + 1, "iteration": iteration + 1, "score": score, "kl": kl,
            "policy_loss": loss, "clip_fraction": clip_fraction,
            "zero_spread": a.zero_spread as f64 / cfg.prompts_per_iteration as f64,
            "answer_length": a.mean_length, "iteration_seconds": t0.elapsed().as_secs_f64(),
        }));
        bar.set_position(iteration as u64 + 1);
        bar.set_message(format!("score {score:.3} kl {kl:.4}"));
        state.iteration = iteration + 1;
        let interrupted = crate::train::interrupt_requested();
        checkpointer
            .after_step_or_stop(iteration + 1, interrupted, |dir| {
                save_training(dir, &policy, &opt, &state)
            })
            .inspect_err(|_| bar.abandon())?;
    }
    bar.finish_and_clear();
    state.done = true;
    checkpointer.finish(|| save_training(&out.join(FINAL_DIR), &policy, &opt, &state))?;
    let warning = crate::rl::score_did_not_rise(&out.join(METRICS_FILE), "grpo", "beta");
    if let Some(w) = &warning {
        tracing::warn!("{w}");
    }
    let summary = GrpoSummary {
        iterations: cfg.iterations,
        first_mean_score: state.first_mean_score.unwrap_or(f64::NAN),
        last_mean_score: last_score,
        last_kl,
        zero_spread_share: state.zero_spread as f64 / state.groups.max(1) as f64,
        wall_seconds: started.elapsed().as_secs_f64(),
        warning,
    };
    write_summary(out, &summary)?;
    Ok(summary)
}
