//! The lifecycle every RL kind shares, written once: the stage folder
//! (done, resumed or started), greedy answers to `eval_prompts` judged
//! before and after, the iterations with their seeds, metrics, progress,
//! rollout files, periodic checkpoints and interrupts over every rank,
//! the final checkpoint, the did-not-learn check and the summary. A kind
//! brings a [`Learner`]: its models, and how one iteration turns sampled
//! answers into advantages and an update.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rlhf_datasets::rollout::{write_rollouts, RolloutRow};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::check;
use crate::dist::Ranks;
use crate::eval::answer::JudgedScore;
use crate::model::checkpoint::Model;
use crate::rl::score_did_not_rise;
use crate::train::{
    finished_summary, learning, prepare_out_dir, same_on_every_rank, stage_progress, step_seed,
    write_summary, Checkpointer, MetricsLog, StageContext, StageError, METRICS_FILE, SAMPLES_AFTER,
};

/// The settings the driver reads from a kind's config.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// `ppo` or `grpo`: logs, checkpoints and the progress bar say it.
    pub kind: &'static str,
    pub iterations: i64,
    pub checkpoint_every: i64,
    pub seed: u64,
    pub eval_prompts: Option<PathBuf>,
    pub max_new_tokens: i64,
    pub save_rollouts: bool,
    /// The setting that weighs the KL penalty, which the did-not-learn
    /// warning suggests lowering.
    pub kl_setting: &'static str,
    pub max_grad_norm: f64,
}

/// What a checkpoint records: the driver's progress, and the kind's own
/// state beside it (PPO's KL controller, GRPO's group counts).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RlState<K> {
    pub stage: String,
    pub iteration: i64,
    pub iterations: i64,
    pub done: bool,
    /// Iteration 1's mean score (absent in checkpoints written before it
    /// was kept).
    #[serde(default)]
    pub first_mean_score: Option<f64>,
    #[serde(flatten)]
    pub own: K,
}

/// One iteration, as the driver logs and saves it.
pub struct Outcome {
    pub mean_score: f64,
    /// Mean KL to the reference per answer (nats).
    pub mean_kl: f64,
    /// The kind's fields of the iteration's `metrics.jsonl` line.
    pub record: serde_json::Value,
    /// Every answer with its per-token numbers, when rollouts are saved.
    pub rows: Vec<RolloutRow>,
    pub generation_seconds: f64,
    pub training_seconds: f64,
    /// What the log line adds after score and KL (` beta 0.0200`).
    pub note: String,
}

/// What the driver asks of an RL kind.
pub trait Learner {
    /// The kind's part of a checkpoint's state.
    type Own: Serialize + DeserializeOwned + Clone;
    fn policy(&self) -> &Model;
    /// Runs `f` on the frozen reference.
    fn with_reference<T>(&self, f: impl FnOnce(&Model) -> T) -> T;
    /// Iteration `index` (0-based): sample, score, advantages, update.
    /// `rows`: whether to return the rollout's rows.
    fn iterate(&mut self, index: i64, ranks: &Ranks, rows: bool) -> Result<Outcome, StageError>;
    fn own_state(&self) -> Self::Own;
    /// A periodic checkpoint, whole in `dir`.
    fn save(&self, dir: &Path, state: &RlState<Self::Own>) -> Result<(), StageError>;
    /// The final policy in `out/checkpoint/` (what later stages read), and
    /// whatever else the kind keeps.
    fn save_final(&self, out: &Path, state: &RlState<Self::Own>) -> Result<(), StageError>;
    /// The kind's fields of the summary (PPO's final `beta`).
    fn summary_fields(&self) -> BTreeMap<String, serde_json::Value>;
}

/// What an RL stage reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RlSummary {
    pub iterations: i64,
    pub first_mean_score: f64,
    pub last_mean_score: f64,
    /// Mean KL to the reference per answer (nats), last iteration.
    pub last_kl: f64,
    /// Judge score of greedy answers to `eval_prompts`: reference, final policy.
    pub eval_gold_before: Option<f64>,
    pub eval_gold_after: Option<f64>,
    pub eval_exact_before: Option<f64>,
    pub eval_exact_after: Option<f64>,
    /// Absent from GRPO summaries written before the driver.
    #[serde(default)]
    pub generation_seconds: f64,
    #[serde(default)]
    pub training_seconds: f64,
    pub wall_seconds: f64,
    /// Why the stage may not have learnt, each naming its baseline (its
    /// first rollouts' score; the judge's score of the reference's answers)
    /// and the numbers; empty when it cleared them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
    #[serde(flatten)]
    pub own: BTreeMap<String, serde_json::Value>,
}

/// Runs (or resumes, or finds done) an RL stage; `start` loads its
/// learner, from the newest usable periodic checkpoint if there is one.
pub fn run<L: Learner>(
    s: &Schedule,
    ctx: &StageContext,
    start: impl FnOnce() -> Result<(L, Option<RlState<L::Own>>), StageError>,
) -> Result<RlSummary, StageError> {
    let ranks = &*ctx.ranks;
    let main = ranks.is_main();
    if main {
        check::note_clipping_off("max_grad_norm", s.max_grad_norm);
    }
    let started = Instant::now();
    let out = &ctx.out_dir;
    // Rank 0 owns the folder; the others read it once it is ready.
    let done = match main {
        true => prepare_out_dir(out, s.kind)?,
        false => None,
    };
    ranks.barrier()?;
    if let Some(summary) = done.or_else(|| finished_summary(out)) {
        return Ok(summary);
    }
    tch::manual_seed(s.seed as i64);
    let (mut learner, state) = start()?;
    let eval_before = match (&state, main) {
        (_, false) => None,
        (fresh, true) => learner.with_reference(|r| {
            ctx.judged_start(
                r,
                s.eval_prompts.as_deref(),
                s.max_new_tokens,
                fresh.is_none(),
            )
        })?,
    };
    let first = state.as_ref().and_then(|s| s.first_mean_score);
    let from = state.map_or(0, |s| s.iteration);
    same_on_every_rank(ranks, from, "resumed from iteration")?;
    let mut tallies = Tallies::new(first);
    let mut run = Iterations {
        s,
        ctx,
        metrics: match main {
            true => MetricsLog::open(&out.join(METRICS_FILE), Some(from).filter(|&i| i > 0))?,
            false => MetricsLog::disabled(),
        },
        bar: match main {
            true => stage_progress(out, s.iterations, from, s.kind),
            false => indicatif::ProgressBar::hidden(),
        },
        checkpointer: Checkpointer {
            out_dir: out.clone(),
            every: s.checkpoint_every,
            total_steps: s.iterations,
            stop_after: ctx.stop_after,
            writes: main,
        },
    };
    for iteration in from..s.iterations {
        run.one(&mut learner, &mut tallies, iteration)?;
        crate::memory::release_free_memory();
    }
    run.bar.finish_and_clear();
    let state = tallies.state(s, s.iterations, learner.own_state());
    run.checkpointer
        .finish(|| learner.save_final(out, &state))?;
    let mut summary = tallies.summary(s, started, learner.summary_fields());
    if !main {
        return Ok(summary);
    }
    let prompts = s.eval_prompts.as_deref();
    let eval_after = ctx.judged_eval(learner.policy(), prompts, s.max_new_tokens, SAMPLES_AFTER)?;
    summary.judged([eval_before, eval_after]);
    summary.flags = learning::flags(
        true,
        [
            score_did_not_rise(&out.join(METRICS_FILE), s.kind, s.kl_setting),
            learning::no_judge_gain(
                s.kind,
                "the reference's (its starting policy)",
                summary.eval_gold_before,
                summary.eval_gold_after,
            ),
        ],
    );
    write_summary(out, &summary)?;
    Ok(summary)
}

/// The loop's writers: metrics, progress, checkpoints.
struct Iterations<'a> {
    s: &'a Schedule,
    ctx: &'a StageContext,
    metrics: MetricsLog,
    bar: indicatif::ProgressBar,
    checkpointer: Checkpointer,
}

impl Iterations<'_> {
    /// One iteration: seeded, run, logged, shown, saved as due.
    fn one<L: Learner>(
        &mut self,
        learner: &mut L,
        tallies: &mut Tallies,
        iteration: i64,
    ) -> Result<(), StageError> {
        let (s, ranks) = (self.s, &*self.ctx.ranks);
        let (it, main) = (iteration + 1, ranks.is_main());
        let t0 = Instant::now();
        // Each rank samples its own share: its own draws (rank 0's are a
        // single process's).
        tch::manual_seed(step_seed(s.seed, iteration).wrapping_add((ranks.rank() as i64) << 32));
        let comm_before = ranks.comm_seconds();
        let step = learner.iterate(iteration, ranks, s.save_rollouts && main)?;
        tallies.add(&step);
        let mut record = step.record;
        for (k, v) in [
            ("step", it.into()),
            ("iteration", it.into()),
            ("score", step.mean_score.into()),
            ("kl", step.mean_kl.into()),
            ("generation_seconds", tallies.generation_seconds.into()),
            ("training_seconds", tallies.training_seconds.into()),
            // Rollout, scoring and update of this iteration alone.
            ("iteration_seconds", t0.elapsed().as_secs_f64().into()),
        ] {
            record[k] = v;
        }
        if ranks.world() > 1 {
            // Rank 0's time in the iteration's collectives (gathers, sums,
            // gradients), waiting for the others included.
            record["allreduce_s"] = (ranks.comm_seconds() - comm_before).into();
        }
        self.metrics.write(&record);
        if s.save_rollouts && main {
            let path = rlhf_datasets::rollout::rollouts_file(&self.ctx.out_dir, it);
            write_rollouts(&path, &step.rows)?;
        }
        let (score, kl) = (step.mean_score, step.mean_kl);
        self.bar.set_position(it as u64);
        self.bar.set_message(format!("score {score:.3} kl {kl:.3}"));
        if it % 5 == 0 || it == s.iterations {
            tracing::info!(
                "{}: iteration {it}/{} score {score:.4} kl {kl:.3}{}",
                s.kind,
                s.iterations,
                step.note
            );
        }
        let state = tallies.state(s, it, learner.own_state());
        let interrupted = any_interrupted(ranks)?;
        self.checkpointer
            .after_step_or_stop(it, interrupted, |dir| learner.save(dir, &state))
            .inspect_err(|_| self.bar.abandon())
    }
}

/// What the run reports across iterations.
#[derive(Debug)]
struct Tallies {
    first_score: f64,
    last_score: f64,
    last_kl: f64,
    generation_seconds: f64,
    training_seconds: f64,
}

impl Tallies {
    /// `first`: iteration 1's score, kept by the checkpoint resumed from.
    fn new(first: Option<f64>) -> Self {
        Self {
            first_score: first.unwrap_or(f64::NAN),
            last_score: f64::NAN,
            last_kl: f64::NAN,
            generation_seconds: 0.0,
            training_seconds: 0.0,
        }
    }

    fn add(&mut self, step: &Outcome) {
        if self.first_score.is_nan() {
            self.first_score = step.mean_score;
        }
        (self.last_score, self.last_kl) = (step.mean_score, step.mean_kl);
        self.generation_seconds += step.generation_seconds;
        self.training_seconds += step.training_seconds;
    }

    /// The state a checkpoint after iteration `it` (1-based) records.
    fn state<K>(&self, s: &Schedule, it: i64, own: K) -> RlState<K> {
        RlState {
            stage: s.kind.into(),
            iteration: it,
            iterations: s.iterations,
            done: it == s.iterations,
            first_mean_score: self.first_score.is_finite().then_some(self.first_score),
            own,
        }
    }

    fn summary(
        &self,
        s: &Schedule,
        started: Instant,
        own: BTreeMap<String, serde_json::Value>,
    ) -> RlSummary {
        RlSummary {
            iterations: s.iterations,
            first_mean_score: self.first_score,
            last_mean_score: self.last_score,
            last_kl: self.last_kl,
            eval_gold_before: None,
            eval_gold_after: None,
            eval_exact_before: None,
            eval_exact_after: None,
            generation_seconds: self.generation_seconds,
            training_seconds: self.training_seconds,
            wall_seconds: started.elapsed().as_secs_f64(),
            flags: vec![],
            own,
        }
    }
}

impl RlSummary {
    /// The judge's scores of the reference's and the final policy's answers.
    fn judged(&mut self, [before, after]: [Option<JudgedScore>; 2]) {
        self.eval_gold_before = before.as_ref().map(|e| e.mean);
        self.eval_gold_after = after.as_ref().map(|e| e.mean);
        self.eval_exact_before = before.map(|e| e.exact);
        self.eval_exact_after = after.map(|e| e.exact);
    }
}

/// Whether any rank was interrupted: every rank stops after the same
/// iteration.
fn any_interrupted(ranks: &Ranks) -> Result<bool, StageError> {
    let mine = f64::from(u8::from(crate::train::interrupt_requested()));
    Ok(ranks.sum(&[mine])?[0] > 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Summaries and checkpoint states written before the driver (PPO's
    /// with `beta`, GRPO's without timings) still read, so a finished or
    /// interrupted stage of an older run is found done or resumed.
    #[test]
    fn older_summaries_and_states_still_read() {
        let ppo = r#"{"iterations":2,"first_mean_score":-0.6,"last_mean_score":-0.2,"last_kl":0.1,"beta":0.3,"eval_gold_before":0.05,"eval_gold_after":0.06,"eval_exact_before":0.0,"eval_exact_after":0.0,"generation_seconds":2.6,"training_seconds":11.9,"wall_seconds":20.4}"#;
        let s: RlSummary = serde_json::from_str(ppo).unwrap();
        assert_eq!(s.own["beta"], 0.3);
        let grpo = r#"{"iterations":5,"first_mean_score":0.1,"last_mean_score":0.6,"last_kl":1.0,"zero_spread_share":0.25,"wall_seconds":3.0}"#;
        let s: RlSummary = serde_json::from_str(grpo).unwrap();
        assert_eq!(
            (s.own["zero_spread_share"].as_f64(), s.eval_gold_after),
            (Some(0.25), None)
        );
        #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
        struct Groups {
            groups: usize,
            zero_spread: usize,
        }
        let state = r#"{"stage":"grpo","iteration":3,"iterations":5,"first_mean_score":0.1,"groups":12,"zero_spread":3,"done":false}"#;
        let s: RlState<Groups> = serde_json::from_str(state).unwrap();
        assert_eq!((s.iteration, s.own.zero_spread), (3, 3));
    }
}
