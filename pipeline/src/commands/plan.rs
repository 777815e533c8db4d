//! `rlhf plan` and `rlhf run`.

use crate::cli::{PlanArgs, RunArgs};
use crate::exec::runner::{self, Outcome, RunOptions};
use crate::experiment::Experiment;

pub fn plan(args: PlanArgs) -> anyhow::Result<()> {
    let exp = Experiment::load(&args.config, &args.overrides)?;
    print!("{}", runner::describe_plan(&exp)?);
    Ok(())
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let exp = Experiment::load(&args.config, &args.overrides)?;
    let _lock = crate::run_folder::lock::lock_run_folder(&exp.run_dir)?;
    let experiment_dir = match exp.file.parent() {
        Some(p) if !p.as_os_str().is_empty() => std::path::absolute(p)?,
        _ => std::env::current_dir()?,
    };
    crate::report::judge::record(&exp.run_dir, &exp.spec.judge, &experiment_dir)?;
    let opts = RunOptions {
        force: args.force,
        only: args.only,
    };
    let outcomes = runner::run(&exp, &opts)?;
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
