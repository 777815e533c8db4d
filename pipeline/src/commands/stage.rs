//! `rlhf stage`: one stage of an experiment, in this process. The runner
//! spawns this as a child per stage; people use it to run one stage alone.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rlhf_datasets::{task, Tokenizer};
use rlhf_stages::dist::{Ranks, Topology};
use rlhf_stages::model::device::{device_name, parse_device};
use rlhf_stages::train::{ScratchModel, StageContext};

use crate::cli::StageArgs;
use crate::exec::key::stage_key;
use crate::exec::planned::PlannedStage;
use crate::experiment::Experiment;
use crate::run_folder::KEY_FILE;

pub fn run(args: StageArgs) -> anyhow::Result<()> {
    let (planned, exp) = match (&args.planned, &args.config, &args.name) {
        (Some(path), _, _) => (PlannedStage::read(path)?, None),
        (None, Some(config), Some(name)) => {
            let exp = Experiment::load(config, &args.overrides)?;
            anyhow::ensure!(
                exp.spec.seeds.is_empty(),
                "{}: the experiment runs once per seed (seeds: {:?}), each in its own folder: run one stage of every seed with `rlhf run FILE --only STAGE`",
                config.display(),
                exp.spec.seeds
            );
            let out_dir = args.out.clone().unwrap_or_else(|| exp.stage_dir(name));
            let (key, _, _) = stage_key(&exp, name, &Default::default())?;
            let planned = PlannedStage::of(&exp, name, name, &out_dir, &key, &Default::default())?;
            (planned, Some(exp))
        }
        _ => anyhow::bail!("give --planned STAGE_FILE, or --config FILE and the stage's name"),
    };
    let config = planned.config()?;
    let topology = Topology::from_env()?;
    let device = rank_device(parse_device(&planned.device)?, topology.as_ref());
    tracing::info!(
        "stage {} ({}) of {} on {} -> {}",
        planned.label,
        config.kind(),
        planned.experiment.display(),
        device_name(device),
        planned.out_dir.display()
    );
    crate::threads::apply(planned.threads, planned.experiment_threads)?;
    let ranks = join_ranks(topology.as_ref(), device, planned.rank_timeout_seconds)?;
    // Run by `rlhf run`, the runner holds the run folder's lock; of
    // several ranks, rank 0 holds it.
    let _lock = match (args.managed || args.scheduled, ranks.is_main(), &exp) {
        (true, _, _) => {
            if args.managed {
                crate::exec::children::stop_when_orphaned();
            }
            None
        }
        (false, true, Some(exp)) => Some(lock_standalone(exp, &planned)?),
        (false, _, _) => None,
    };
    let ctx = context(&planned, device, ranks, args.stop_after_step)?;
    let summary = config
        .run(&ctx)
        .with_context(|| format!("stage {} failed", planned.label))?;
    tracing::debug!("{}: {summary}", planned.label);
    Ok(())
}

/// A stage run alone: the run folder's lock (and the stage folder's, when
/// it lies outside), its folder made ready, and its stage.json written.
fn lock_standalone(
    exp: &Experiment,
    planned: &PlannedStage,
) -> anyhow::Result<(
    crate::run_folder::lock::RunLock,
    Option<crate::run_folder::lock::RunLock>,
)> {
    let out_dir = &planned.out_dir;
    let lock = crate::run_folder::lock::lock_run_folder(&exp.run_dir)?;
    // A folder outside the run folder is locked on its own: another
    // experiment's stage may be given the same --out.
    let outside = !out_dir.starts_with(std::path::absolute(&exp.run_dir)?);
    let out_lock = outside
        .then(|| crate::run_folder::lock::lock_stage_folder(out_dir))
        .transpose()?;
    prepare_standalone(out_dir, &planned.key)?;
    planned.write()?;
    Ok((lock, out_lock))
}

/// What the stage runs with: its folder, device, model shape, ranks, and
/// the judge and ranking programs.
fn context(
    planned: &PlannedStage,
    device: tch::Device,
    ranks: Ranks,
    stop_after: Option<i64>,
) -> anyhow::Result<StageContext> {
    let tokenizer = match &planned.tokenizer {
        Some(p) if p.is_dir() => Tokenizer::from_model_dir(p)?,
        Some(p) => Tokenizer::from_file(p)?,
        None => Tokenizer::bytes(),
    };
    let base = planned.experiment_dir();
    let reward_base = base.clone();
    let env_base = base.clone();
    Ok(StageContext {
        out_dir: planned.out_dir.clone(),
        device,
        scratch: scratch_model(planned.model_config()?, tokenizer),
        // The bundled task's judge scores the prompts it knows.
        judge: Some(Arc::new(task::judge)),
        // The experiment's judge program, where it names one, scores the
        // stage's evals instead, from the experiment file's folder.
        eval_judge: planned.judge.as_ref().map(|j| {
            let judge = crate::report::judge::CommandJudge {
                command: j.command.clone(),
                timeout_seconds: j.timeout_seconds,
                cwd: Some(planned.experiment_dir()),
            };
            let batch: rlhf_stages::eval::answer::BatchJudge =
                Arc::new(move |pairs| judge.score_pairs(pairs).map_err(|e| format!("{e:#}")));
            batch
        }),
        stop_after,
        ranks: Arc::new(ranks),
        // A stage's ranking program runs in the experiment file's folder,
        // where its relative paths point.
        ranker: Some(Arc::new(move |command, timeout, groups| {
            let timeout = std::time::Duration::from_secs_f64(timeout);
            let limit = "ranker_timeout_seconds";
            crate::label::programs::rank_with_command(command, groups, timeout, limit, Some(&base))
                .map_err(|e| format!("{e:#}"))
        })),
        // So does a reward program.
        reward_runner: Some(crate::label::programs::reward_runner(
            reward_base,
            "reward.timeout_seconds",
        )),
        // And a multi-turn stage's environment.
        env_runner: Some(Arc::new(move |command, timeout, requests| {
            let program = crate::label::programs::LineProgram {
                command,
                role: "environment",
                timeout: std::time::Duration::from_secs_f64(timeout),
                limit: "env.timeout_seconds",
                cwd: Some(&env_base),
            };
            crate::label::programs::env_with_command(&program, requests)
                .map_err(|e| format!("{e:#}"))
        })),
    })
}

/// The model a stage builds from nothing: the experiment's shape, with
/// room for every id of its tokenizer (a GPT-2 `tokenizer.json` needs
/// 50257, not the byte tokenizer's 264), rounded up to a multiple of 8.
fn scratch_model(mut config: rlhf_stages::ModelConfig, tokenizer: Tokenizer) -> ScratchModel {
    let needed = tokenizer.vocab_size() as i64;
    if needed > config.vocab_size() {
        let vocab = rlhf_stages::GptConfig::vocab_for(needed as usize);
        tracing::info!(
            "model.vocab_size: {} -> {vocab} to hold the tokenizer's {needed} ids",
            config.vocab_size()
        );
        config.set_vocab_size(vocab);
    }
    ScratchModel { config, tokenizer }
}

/// Files that mark a folder as a stage's (safe to clear and redo).
const STAGE_MARKS: [&str; 6] = [
    KEY_FILE,
    crate::exec::planned::STAGE_FILE,
    crate::run_folder::SUMMARY_FILE,
    crate::run_folder::METRICS_FILE,
    crate::run_folder::CHECKPOINT_DIR,
    "checkpoints",
];

/// Run alone, a stage folder made with other settings or inputs starts
/// over (a finished one would otherwise be reported as done); one made
/// with these resumes. A non-empty folder that is not a stage's is refused.
fn prepare_standalone(out_dir: &Path, key: &str) -> anyhow::Result<()> {
    let started = crate::run_folder::manifest::started_key(out_dir);
    if out_dir.exists() && started.as_deref() != Some(key) {
        let is_stage = STAGE_MARKS.iter().any(|m| out_dir.join(m).exists());
        let empty = std::fs::read_dir(out_dir)
            .with_context(|| format!("reading {}", out_dir.display()))?
            .next()
            .is_none();
        if is_stage {
            tracing::info!(
                "{}: made with other settings or inputs; starting over",
                out_dir.display()
            );
            std::fs::remove_dir_all(out_dir)
                .with_context(|| format!("clearing {}", out_dir.display()))?;
        } else if !empty {
            anyhow::bail!(
                "{}: not empty and not a stage folder; give --out a new or empty folder",
                out_dir.display()
            );
        }
    }
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    rlhf_datasets::atomic::write_file(&out_dir.join(KEY_FILE), key.as_bytes())?;
    Ok(())
}

/// The variable that bounds how long a rank waits for the others (joining,
/// each collective) before it fails; seconds.
pub const TIMEOUT_ENV: &str = "RLHF_DIST_TIMEOUT_SECONDS";

/// One GPU per rank: the node's ranks take its GPUs in order.
pub fn rank_device(device: tch::Device, topology: Option<&Topology>) -> tch::Device {
    match (device, topology) {
        (tch::Device::Cuda(_), Some(t)) => tch::Device::Cuda(t.local_rank),
        (d, _) => d,
    }
}

/// This process's ranks: alone, or joined with the others that torchrun,
/// Slurm or `rlhf run` started.
pub fn join_ranks(
    topology: Option<&Topology>,
    device: tch::Device,
    configured: u64,
) -> anyhow::Result<Ranks> {
    let Some(t) = topology else {
        return Ok(Ranks::single());
    };
    let timeout = match std::env::var(TIMEOUT_ENV) {
        Err(_) => configured,
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|&s| s > 0)
            .with_context(|| format!("{TIMEOUT_ENV}=\"{v}\": expected whole seconds > 0"))?,
    };
    tracing::info!(
        "rank {} of {} (local {}, {:?}) joining at {}:{} on {}, timeout {timeout} s",
        t.rank,
        t.world,
        t.local_rank,
        t.launcher,
        t.master_addr,
        t.master_port,
        device_name(device)
    );
    Ok(Ranks::join(t, device, timeout)?)
}
