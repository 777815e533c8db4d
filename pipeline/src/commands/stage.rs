//! `rlhf stage`: one stage of an experiment, in this process. The runner
//! spawns this as a child per stage; people use it to run one stage alone.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use rlhf_datasets::{task, Tokenizer};
use rlhf_stages::dist::{Ranks, Topology};
use rlhf_stages::model::device::{device_name, parse_device};
use rlhf_stages::train::{ScratchModel, StageContext};

use crate::cli::StageArgs;
use crate::exec::key::stage_key;
use crate::experiment::Experiment;
use crate::run_folder::KEY_FILE;

pub fn run(args: StageArgs) -> anyhow::Result<()> {
    let exp = Experiment::load(&args.config, &args.overrides)?;
    let stage = exp.stage(&args.name)?;
    let topology = Topology::from_env()?;
    let device = rank_device(parse_device(&exp.spec.device)?, topology.as_ref());
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| exp.stage_dir(&args.name));
    tracing::info!(
        "stage {} ({}) of {} on {} -> {}",
        args.name,
        stage.kind(),
        exp.file.display(),
        device_name(device),
        out_dir.display()
    );
    crate::threads::apply(stage.threads, exp.spec.threads)?;
    let ranks = join_ranks(
        topology.as_ref(),
        device,
        exp.spec.distributed.timeout_seconds,
    )?;
    // Run by `rlhf run`, the runner holds the run folder's lock; of
    // several ranks, rank 0 holds it.
    let _lock = match (args.managed || args.scheduled, ranks.is_main()) {
        (true, _) => {
            if args.managed {
                crate::exec::children::stop_when_orphaned();
            }
            None
        }
        (false, false) => None,
        (false, true) => {
            let lock = crate::run_folder::lock::lock_run_folder(&exp.run_dir)?;
            // A folder outside the run folder is locked on its own: another
            // experiment's stage may be given the same --out.
            let outside =
                !std::path::absolute(&out_dir)?.starts_with(std::path::absolute(&exp.run_dir)?);
            let out_lock = outside
                .then(|| crate::run_folder::lock::lock_stage_folder(&out_dir))
                .transpose()?;
            prepare_standalone(&exp, &args.name, &out_dir)?;
            Some((lock, out_lock))
        }
    };
    let tokenizer = match &exp.spec.tokenizer {
        Some(p) if p.is_dir() => Tokenizer::from_model_dir(p)?,
        Some(p) => Tokenizer::from_file(p)?,
        None => Tokenizer::bytes(),
    };
    let scratch = scratch_model(exp.spec.model.clone(), tokenizer);
    let base = exp
        .file
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_owned);
    let base = if base.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base
    };
    let ctx = StageContext {
        out_dir,
        device,
        scratch,
        // The bundled task's judge scores the prompts it knows.
        judge: Some(Arc::new(task::judge)),
        stop_after: args.stop_after_step,
        ranks: Arc::new(ranks),
        // A stage's ranking program runs in the experiment file's folder,
        // where its relative paths point.
        ranker: Some(Arc::new(move |command, timeout, groups| {
            let timeout = std::time::Duration::from_secs_f64(timeout);
            let limit = "ranker_timeout_seconds";
            crate::label::programs::rank_with_command(command, groups, timeout, limit, Some(&base))
                .map_err(|e| format!("{e:#}"))
        })),
    };
    let summary = stage
        .config
        .run(&ctx)
        .with_context(|| format!("stage {} failed", args.name))?;
    println!("{summary}");
    Ok(())
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
const STAGE_MARKS: [&str; 5] = [
    KEY_FILE,
    crate::run_folder::SUMMARY_FILE,
    crate::run_folder::METRICS_FILE,
    crate::run_folder::CHECKPOINT_DIR,
    "checkpoints",
];

/// Run alone, a stage folder made with other settings or inputs starts
/// over (a finished one would otherwise be reported as done); one made
/// with these resumes. A non-empty folder that is not a stage's is refused.
fn prepare_standalone(exp: &Experiment, name: &str, out_dir: &Path) -> anyhow::Result<()> {
    let (key, _, _) = stage_key(exp, name, &Default::default())?;
    let started = crate::run_folder::manifest::started_key(out_dir);
    if out_dir.exists() && started.as_deref() != Some(key.as_str()) {
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
