//! `rlhf eval RUN`: evaluate a finished run and write its report.

use rlhf_stages::eval::EvalSettings;
use rlhf_stages::model::device::parse_device;

use rlhf_stages::eval::verifiable::AnswerChecker;
use rlhf_stages::programs::code_check::CodeChecker;
use rlhf_stages::programs::sandbox::Limits;
use rlhf_stages::rl::reward::RewardConfig;

use crate::cli::{CheckerArg, EvalArgs};
use crate::report::judge::CommandJudge;
use crate::report::{evaluate_run, write_report, EvalOptions, REPORT_JSON, REPORT_MD};

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device.device)?;
    let reward_program = reward_program(&args)?;
    let (checker, judge) = (checker(&args)?, judge(&args)?);
    let opts = EvalOptions {
        prompts: args.prompts,
        preferences: args.preferences,
        max_prompts: args.max_prompts,
        settings: EvalSettings {
            max_new_tokens: args.max_new_tokens,
            kl_samples_per_prompt: args.kl_samples,
            seed: args.seed,
            precision: args.precision.into(),
            ..EvalSettings::default()
        },
        skip_kl: false,
        checker,
        reward_program,
        with_runs: args.with.clone(),
        judge,
    };
    anyhow::ensure!(
        args.run.is_dir(),
        "{}: no such run folder",
        args.run.display()
    );
    let seeds = crate::run_folder::listed_seed_runs(&args.run);
    if !seeds.is_empty() {
        anyhow::ensure!(
            args.with.is_empty(),
            "--with: {} holds one run per seed; compare other runs with one seed's folder ({}/seed-N)",
            args.run.display(),
            args.run.display()
        );
        return evaluate_seeds(&args.run, &seeds, &opts, device);
    }
    let _lock = crate::run_folder::lock::lock_run_folder(&args.run)?;
    let mut _other_locks = Vec::new();
    for other in &args.with {
        anyhow::ensure!(
            other.is_dir(),
            "--with {}: no such run folder",
            other.display()
        );
        anyhow::ensure!(
            std::path::absolute(other)? != std::path::absolute(&args.run)?,
            "--with {}: that is the run being evaluated",
            other.display()
        );
        _other_locks.push(crate::run_folder::lock::lock_run_folder(other)?);
    }
    let precision = opts.settings.precision;
    let mut evaluation = precision.run(device, || evaluate_run(&args.run, &opts, device))?;
    let dir = write_report(&mut evaluation)?;
    print!("{}", crate::report::markdown::render(&evaluation.report));
    eprintln!(
        "report: {} and {} (plots and answers.jsonl beside them)",
        dir.join(REPORT_MD).display(),
        dir.join(REPORT_JSON).display()
    );
    Ok(())
}

/// A folder of seed runs (`seeds:`): each seed's report in its folder,
/// then the report over the seeds in `RUN/report/`.
fn evaluate_seeds(
    run: &std::path::Path,
    seeds: &[(u64, std::path::PathBuf)],
    opts: &EvalOptions,
    device: tch::Device,
) -> anyhow::Result<()> {
    let _lock = crate::run_folder::lock::lock_run_folder(run)?;
    let (mut reports, mut left_out) = (Vec::new(), Vec::new());
    for (seed, dir) in seeds {
        tracing::info!("seed {seed}: evaluating {}", dir.display());
        let _seed_lock = crate::run_folder::lock::lock_run_folder(dir)?;
        let precision = opts.settings.precision;
        // A seed whose run finished nothing to evaluate is left out (and
        // said so); the others are still reported.
        match precision.run(device, || evaluate_run(dir, opts, device)) {
            Ok(mut evaluation) => {
                write_report(&mut evaluation)?;
                reports.push((*seed, evaluation.report));
            }
            Err(e) => {
                let folder = crate::run_folder::seed_folder(*seed);
                let why = format!("seed {seed} ({folder}): {e:#}");
                tracing::warn!("left out: {why}");
                left_out.push(why);
            }
        }
    }
    anyhow::ensure!(
        !reports.is_empty(),
        "no seed of {} could be evaluated:\n{}",
        run.display(),
        left_out.join("\n")
    );
    let over = crate::report::seeds::aggregate(run, &reports, left_out);
    let dir = crate::report::seeds::write(run, &over)?;
    print!("{}", crate::report::seeds::render(&over));
    eprintln!(
        "report over {} seeds: {} and {} (each seed's report in its own folder)",
        seeds.len(),
        dir.join(REPORT_MD).display(),
        dir.join(REPORT_JSON).display()
    );
    Ok(())
}

/// `--checker code`: the first `python3` on PATH, 10 s, 1 GiB and 16 MiB
/// files per answer.
fn code_checker() -> anyhow::Result<CodeChecker> {
    let limits = Limits {
        wall_seconds: 10.0,
        memory_mb: 1024,
        file_mb: 16,
    };
    CodeChecker::new("python3", limits).map_err(|e| anyhow::anyhow!("--checker code: {e}"))
}

/// `--reward-command` or `--reward-url` as a stage's `reward:` block.
fn reward_program(args: &EvalArgs) -> anyhow::Result<Option<RewardConfig>> {
    let command = match &args.reward_command {
        Some(line) => Some(shlex::split(line).filter(|c| !c.is_empty()).ok_or_else(|| {
            anyhow::anyhow!(
                "--reward-command {line:?}: name the program to run, quoted as a shell would, e.g. --reward-command 'python3 reward.py'"
            )
        })?),
        None => None,
    };
    if command.is_none() && args.reward_url.is_none() {
        return Ok(None);
    }
    let cfg = RewardConfig {
        command,
        url: args.reward_url.clone(),
        timeout_seconds: args.reward_timeout,
        workers: args.reward_workers,
        ..RewardConfig::default()
    };
    cfg.validate().map_err(|e| {
        let e = e.to_string();
        let e = e.replace("reward.timeout_seconds", "--reward-timeout");
        let e = e.replace("reward.workers", "--reward-workers");
        anyhow::anyhow!("{}", e.replace("reward.url", "--reward-url"))
    })?;
    Ok(Some(cfg))
}

/// `--checker` with its sample count.
fn checker(args: &EvalArgs) -> anyhow::Result<Option<(AnswerChecker, usize)>> {
    anyhow::ensure!(
        (1..=1024).contains(&args.checker_samples),
        "--checker-samples: must be in [1, 1024], got {}",
        args.checker_samples
    );
    let Some(arg) = args.checker else {
        return Ok(None);
    };
    let checker = match arg {
        CheckerArg::Math => AnswerChecker::Math,
        CheckerArg::Code => AnswerChecker::Code(code_checker()?),
    };
    Ok(Some((checker, args.checker_samples)))
}

/// `--judge` (split as a shell would) with `--judge-timeout`.
fn judge(args: &EvalArgs) -> anyhow::Result<Option<CommandJudge>> {
    let Some(line) = args.judge.as_deref() else {
        return Ok(None);
    };
    let command = shlex::split(line).ok_or_else(|| {
        anyhow::anyhow!(
            "--judge {line:?}: unbalanced quotes or a trailing backslash; quote it as a shell would"
        )
    })?;
    anyhow::ensure!(
        !command.is_empty(),
        "--judge: name the program to run, e.g. --judge 'python3 judge.py'"
    );
    anyhow::ensure!(
        args.judge_timeout > 0.0 && args.judge_timeout <= 1e9,
        "--judge-timeout: must be in (0, 1e9] seconds, got {}",
        rlhf_stages::check::shown(args.judge_timeout)
    );
    Ok(Some(CommandJudge {
        command,
        timeout_seconds: args.judge_timeout,
        cwd: None,
    }))
}
