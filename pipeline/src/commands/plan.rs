//! `rlhf plan` and `rlhf run`.

use crate::cli::{PlanArgs, RunArgs};
use crate::exec::runner::{self, Outcome, RunOptions};
use crate::experiment::Experiment;

pub fn plan(args: PlanArgs) -> anyhow::Result<()> {
    let exp = Experiment::load(&args.config, &args.overrides)?;
    let runs = exp.seed_runs()?;
    if runs.len() > 1 {
        println!(
            "{} runs once per seed ({}), sharing nothing:",
            exp.file.display(),
            seed_list(&exp)
        );
    }
    for run in &runs {
        print!("{}", runner::describe_plan(run)?);
    }
    Ok(())
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let exp = Experiment::load(&args.config, &args.overrides)?;
    let opts = RunOptions {
        force: args.force,
        only: args.only,
    };
    if exp.spec.seeds.is_empty() {
        return run_one(&exp, &opts);
    }
    // Each seed's experiment, resolved (and so checked) before any runs.
    let runs = exp.seed_runs()?;
    // The seeds' folder, where `rlhf eval` writes their report.
    let _lock = crate::run_folder::lock::lock_run_folder(&exp.run_dir)?;
    crate::run_folder::write_seeds(&exp.run_dir, &exp.spec.seeds)?;
    tracing::info!(
        "{}: one run per seed ({}), each in its own folder under {}",
        exp.spec.name,
        seed_list(&exp),
        exp.run_dir.display()
    );
    // The seeds share nothing: one that fails leaves the others to run.
    let mut failed = Vec::new();
    for run in &runs {
        let seed = run.spec.seed;
        if let Err(e) = run_one(run, &opts) {
            tracing::error!("seed {seed} failed: {e:#}");
            failed.push(format!("seed {seed}: {e:#}"));
            if rlhf_stages::train::interrupt_requested() {
                break;
            }
        }
    }
    anyhow::ensure!(
        failed.is_empty(),
        "{} of {} seed runs did not finish:\n{}",
        failed.len(),
        runs.len(),
        failed.join("\n")
    );
    Ok(())
}

/// One run folder brought up to date.
fn run_one(exp: &Experiment, opts: &RunOptions) -> anyhow::Result<()> {
    let _lock = crate::run_folder::lock::lock_run_folder(&exp.run_dir)?;
    let experiment_dir = match exp.file.parent() {
        Some(p) if !p.as_os_str().is_empty() => std::path::absolute(p)?,
        _ => std::env::current_dir()?,
    };
    crate::report::judge::record(&exp.run_dir, &exp.spec.judge, &experiment_dir)?;
    let outcomes = runner::run(exp, opts)?;
    let ran = outcomes.iter().filter(|(_, o)| *o == Outcome::Ran).count();
    tracing::info!(
        "{}: {} stage(s) ran, {} cached; results in {}",
        exp.spec.name,
        ran,
        outcomes.len() - ran,
        exp.run_dir.display()
    );
    Ok(())
}

fn seed_list(exp: &Experiment) -> String {
    let seeds: Vec<String> = exp.spec.seeds.iter().map(u64::to_string).collect();
    format!("seeds {}", seeds.join(", "))
}
