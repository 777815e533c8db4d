//! How many threads libtorch computes with. Its default counts the
//! machine's cores even when another process is busy on some of them, and
//! its OpenMP threads then spin-wait for each other on the cores left:
//! a stage sharing two cores with a busy process ran 7 to 28 times slower.
//! So the count is a setting, logged at the start of every stage.
//!
//! Precedence: `--threads` (or `RLHF_THREADS`, which `rlhf run` passes on
//! to its stages), the stage's `threads:`, the experiment's `threads:`,
//! else the cores this process may use.

use anyhow::bail;

/// The environment variable that carries `--threads` to child processes.
pub const ENV: &str = "RLHF_THREADS";

/// How many stages `rlhf run` runs side by side on this machine
/// (`max_parallel`): each takes its share of the cores.
pub const SIDE_BY_SIDE_ENV: &str = "RLHF_SIDE_BY_SIDE";

/// The most threads a setting may ask for.
pub const MAX_THREADS: usize = 1024;

/// Where a thread count came from, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Flag,
    Stage,
    Experiment,
    Cores,
}

/// Records `--threads` for this process and the stages it starts, and
/// sets libtorch's count to it or to the cores available.
pub fn init(flag: Option<usize>) -> anyhow::Result<()> {
    if let Some(n) = flag {
        check(n, "--threads")?;
        // Still single-threaded here: setting the environment is safe.
        std::env::set_var(ENV, n.to_string());
    }
    let (n, _) = choose(None, None)?;
    tch::set_num_threads(n as i32);
    Ok(())
}

/// Sets libtorch's thread count from the settings and logs it.
pub fn apply(stage: Option<usize>, experiment: Option<usize>) -> anyhow::Result<usize> {
    let (n, source) = choose(stage, experiment)?;
    tch::set_num_threads(n as i32);
    let from = match source {
        Source::Flag => "--threads",
        Source::Stage => "the stage's threads",
        Source::Experiment => "the experiment's threads",
        Source::Cores => "the cores this process may use",
    };
    let shared = match side_by_side() {
        1 => String::new(),
        k => format!(", shared by {k} stages side by side"),
    };
    tracing::info!(
        "threads: {n} (from {from}; {} cores available{shared})",
        cores()
    );
    Ok(n)
}

/// The count and where it came from.
pub fn choose(stage: Option<usize>, experiment: Option<usize>) -> anyhow::Result<(usize, Source)> {
    if let Ok(text) = std::env::var(ENV) {
        let Ok(n) = text.trim().parse::<usize>() else {
            bail!("{ENV}=\"{text}\": expected a whole number of threads");
        };
        check(n, ENV)?;
        return Ok((n, Source::Flag));
    }
    Ok(match (stage, experiment) {
        (Some(n), _) => (n, Source::Stage),
        (None, Some(n)) => (n, Source::Experiment),
        (None, None) => (cores_per_rank(), Source::Cores),
    })
}

/// The cores this process may run on (its CPU affinity and quota).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The cores shared among the ranks on this machine (torchrun's and
/// `rlhf run`'s `LOCAL_WORLD_SIZE`, Slurm's `SLURM_NTASKS_PER_NODE`):
/// N ranks each with every core would spin-wait for each other.
fn cores_per_rank() -> usize {
    let local = ["LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"]
        .iter()
        .find_map(|v| {
            let text = std::env::var(v).ok()?;
            // Slurm writes `4` or `4(x2)`.
            let digits: String = text.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<usize>().ok().filter(|&n| n > 0)
        })
        .unwrap_or(1);
    (cores() / (local * side_by_side())).max(1)
}

/// The stages sharing this machine's cores (`RLHF_SIDE_BY_SIDE`, else 1).
fn side_by_side() -> usize {
    std::env::var(SIDE_BY_SIDE_ENV)
        .ok()
        .and_then(|t| t.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

/// A thread count's range, for `--threads` and the config.
pub fn check(n: usize, what: &str) -> anyhow::Result<()> {
    if !(1..=MAX_THREADS).contains(&n) {
        bail!("{what}: must be in [1, {MAX_THREADS}], got {n}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stage_beats_the_experiment_and_both_beat_the_cores() {
        // The flag's variable is process-wide; this test runs without it.
        if std::env::var(ENV).is_ok() {
            return;
        }
        assert_eq!(choose(Some(1), Some(3)).unwrap(), (1, Source::Stage));
        assert_eq!(choose(None, Some(3)).unwrap(), (3, Source::Experiment));
        if std::env::var("LOCAL_WORLD_SIZE").is_err()
            && std::env::var("SLURM_NTASKS_PER_NODE").is_err()
        {
            assert_eq!(choose(None, None).unwrap(), (cores(), Source::Cores));
        }
        assert!(check(0, "threads").is_err() && check(MAX_THREADS + 1, "x").is_err());
    }
}
