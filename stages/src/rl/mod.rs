//! Reinforcement learning from a scorer: PPO (`ppo`: GAE with a critic,
//! clipped updates, per-token KL to the reference) and GRPO (`grpo`:
//! group-normalised scores, no critic). What they share is here, written
//! once: the rollout (`rollout`: prompt order, sampling, old and
//! reference log-probabilities, scoring), its gathering over ranks
//! (`shard`), the optimiser step (`step`), the stage's lifecycle
//! (`driver`) and the checks of their settings and progress. The kinds
//! differ in how sampled answers become advantages and in their update.
//! It imports model, dist, optim, train, objectives and eval, never a
//! supervised kind.

pub mod driver;
pub mod episode;
pub mod grpo;
pub mod ppo;
pub mod reward;
pub mod rollout;
pub mod scorer;
mod shard;
mod step;

use crate::check;
use crate::train::StageError;

/// What an RL stage needs to run as `world` ranks: each batch in `shared`
/// divides among them, and `minibatch_size` divides the iteration's
/// answers (`answers`: how many, and what the setting calls them).
pub fn check_rank_shares(
    world: usize,
    shared: Vec<(&'static str, usize)>,
    minibatch_size: usize,
    (answers, what): (usize, &str),
) -> Result<(), StageError> {
    if world == 1 {
        return Ok(());
    }
    for (field, n) in shared {
        if !n.is_multiple_of(world) {
            return Err(StageError::setting(
                field,
                format!("{n} does not divide among the {world} ranks"),
            ));
        }
    }
    if !answers.is_multiple_of(minibatch_size) {
        return Err(StageError::setting(
            "minibatch_size",
            format!(
                "{minibatch_size} must divide {what} ({answers}) when the stage runs as {world} ranks"
            ),
        ));
    }
    Ok(())
}

/// What PPO and GRPO both need: something to score answers, and a
/// bounded number of iterations.
pub fn check_scorer_and_iterations(
    reward_model: bool,
    gold_reward: bool,
    iterations: i64,
) -> Result<(), StageError> {
    if !reward_model && !gold_reward {
        return Err(StageError::setting(
            "reward_model",
            "is required: set `reward_model` (e.g. `reward_model: rm`) or `gold_reward: true`",
        ));
    }
    let it = iterations;
    check::require(
        "iterations",
        (1..=1 << 32).contains(&it),
        "in [1, 2^32]",
        it,
    )?;
    Ok(())
}

/// A warning when the rollouts' mean score over the last quarter of the
/// iterations fell below the first quarter's by at least the difference's
/// standard error (runs of 4 or more). A fall within that noise says
/// nothing: GRPO scores a few prompts an iteration, and which prompts
/// were drawn moves its mean more than learning does. `stage` names the
/// stage in the message, `kl` its KL weight's setting.
pub fn score_did_not_rise(metrics: &std::path::Path, stage: &str, kl: &str) -> Option<String> {
    let text = std::fs::read_to_string(metrics).ok()?;
    let scores: Vec<f64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["score"].as_f64())
        .collect();
    let n = scores.len();
    if n < 4 {
        return None;
    }
    let q = n / 4;
    let (first, last) = (&scores[..q], &scores[n - q..]);
    let (first_mean, last_mean) = (mean(first), mean(last));
    let noise = (sample_variance(first) / q as f64 + sample_variance(last) / q as f64).sqrt();
    let rise = last_mean - first_mean;
    if rise > 0.0 {
        return None;
    }
    if rise > -noise {
        tracing::info!(
            "{stage}: the rollouts' mean score went from {first_mean:.4} to {last_mean:.4} (first and last {q} iterations), within its noise ({noise:.4}): too noisy to tell whether it learns"
        );
        return None;
    }
    Some(format!(
        "{stage} may not be learning: the rollouts' mean score went from {first_mean:.4} (first {q} iterations) to {last_mean:.4} (last {q}), a fall beyond its noise ({noise:.4}): check the reward model, the learning rate and {kl}"
    ))
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Unbiased; 0 for fewer than two values.
fn sample_variance(xs: &[f64]) -> f64 {
    if xs.len() < 2 {
        return 0.0;
    }
    let m = mean(xs);
    xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() - 1) as f64
}
