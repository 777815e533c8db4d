//! Runs an experiment's plan: each stage as a child process (`rlhf stage`)
//! with its output streamed and prefixed, skipping stages whose manifest
//! matches, and recording a manifest after each success.
//!
//! A crash in one stage cannot corrupt another, and a rerun continues: done
//! stages are cached and an interrupted stage resumes from its checkpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use anyhow::{bail, Context};

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use rlhf_stages::kinds::dpo::DpoConfig;
use rlhf_stages::kinds::reward::RewardConfig;
use rlhf_stages::rl::grpo::GrpoConfig;
use rlhf_stages::rl::ppo::PpoConfig;

use crate::exec::key::stage_key;
use crate::exec::planned::PlannedStage;
use crate::exec::sibling_cache;
use crate::experiment::{ExecutorKind, Experiment, LoopFile, PolicyInit, RewardInit};
use crate::plan::dag;
use crate::run_folder::manifest::{
    is_cached, read_manifest, sha256_file, write_manifest, Manifest, Status, KEY_FILE,
};

#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Rerun these and everything downstream.
    pub force: Vec<String>,
    /// Run only this stage (and what it needs).
    pub only: Option<String>,
    /// `--set` overrides, passed on to each child.
    pub overrides: Vec<String>,
}

/// What happened to each stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Cached,
    Ran,
}

pub fn run(exp: &Experiment, opts: &RunOptions) -> anyhow::Result<Vec<(String, Outcome)>> {
    let order = dag::plan(&exp.deps).with_context(|| exp.file.display().to_string())?;
    let order = match &opts.only {
        Some(s) => dag::with_ancestors(&order, &exp.deps, s)?,
        None => order,
    };
    for f in &opts.force {
        exp.stage(f)?;
    }
    let forced = dag::with_descendants(&exp.deps, &opts.force);
    let parallel = exp.spec.max_parallel;
    let shares = core_shares(exp, &stages_to_run(exp, &order, &forced)?, parallel);
    if let Some(most) = shares.values().max().filter(|&&n| n > 1) {
        tracing::info!(
            "up to {most} stages run side by side (max_parallel {parallel}), each on its share of the {} cores",
            crate::threads::cores()
        );
    }
    let finished = crate::plan::schedule::run_dag(
        &order,
        &exp.deps,
        parallel,
        |name, upstream: &BTreeMap<String, (String, Outcome)>| {
            let job = StageRun {
                exp,
                name,
                label: name,
                out_dir: exp.stage_dir(name),
                extra: vec![],
                upstream: upstream
                    .iter()
                    .map(|(u, (k, _))| (u.clone(), k.clone()))
                    .collect(),
                force: forced.contains(name),
                side_by_side: shares.get(name).copied().unwrap_or(1),
            };
            let result = ensure_stage(&job, &opts.overrides);
            if let Err(e) = &result {
                tracing::error!("[{name}] failed: {e:#}");
            }
            result
        },
        rlhf_stages::train::interrupt_requested,
    );
    if !finished.failed.is_empty() {
        bail!("{}", failure_report(&finished));
    }
    let keys: BTreeMap<String, String> = finished
        .done
        .iter()
        .map(|(n, (k, _))| (n.clone(), k.clone()))
        .collect();
    let mut outcomes: Vec<(String, Outcome)> = order
        .iter()
        .filter_map(|n| Some((n.clone(), finished.done.get(n)?.1.clone())))
        .collect();
    if !finished.not_run.is_empty() {
        // Interrupted between stages.
        refuse_after_interrupt(&finished.not_run[0])?;
    }
    if opts.only.is_none() {
        if let Some(spec) = &exp.spec.rounds {
            outcomes.extend(run_rounds(
                exp,
                spec,
                &keys,
                !opts.force.is_empty(),
                &opts.overrides,
            )?);
        }
    }
    Ok(outcomes)
}

/// The stages of `order` that will run rather than be found done (here or
/// in another run folder beside this one), as far as their manifests say.
fn stages_to_run(
    exp: &Experiment,
    order: &[String],
    forced: &BTreeSet<String>,
) -> anyhow::Result<BTreeSet<String>> {
    let mut keys = BTreeMap::new();
    let mut out = BTreeSet::new();
    for name in order {
        let upstream: BTreeMap<String, String> = exp.deps[name]
            .iter()
            .map(|u| (u.clone(), keys.get(u).cloned().unwrap_or_default()))
            .collect();
        let (key, _, _) = stage_key(exp, name, &upstream)?;
        // Only to size the core shares: checksums are read when the stage
        // is reached, not twice.
        let done = crate::run_folder::manifest::looks_cached(&exp.stage_dir(name), &key)
            || sibling_cache::seems_done(exp, &key);
        if forced.contains(name) || !done {
            out.insert(name.clone());
        }
        keys.insert(name.clone(), key);
    }
    Ok(out)
}

/// For each stage that runs here, how many stages may share the cores
/// with it: itself and the most of the stages left to run here that are
/// neither upstream nor downstream of it (at most `parallel`). A stage
/// that can only run alone, like the SFT every branch starts from, gets
/// every core.
fn core_shares(
    exp: &Experiment,
    to_run: &BTreeSet<String>,
    parallel: usize,
) -> BTreeMap<String, usize> {
    let here: BTreeSet<String> = to_run
        .iter()
        .filter(|n| exp.executor(n).0 == ExecutorKind::Local)
        .cloned()
        .collect();
    here.iter()
        .map(|name| {
            let related: BTreeSet<String> =
                dag::with_descendants(&exp.deps, std::slice::from_ref(name))
                    .into_iter()
                    .chain(
                        dag::with_ancestors(
                            &here.iter().cloned().collect::<Vec<_>>(),
                            &exp.deps,
                            name,
                        )
                        .unwrap_or_default(),
                    )
                    .collect();
            let beside: BTreeSet<String> = here.difference(&related).cloned().collect();
            (
                name.clone(),
                parallel.min(1 + dag::width(&beside, &exp.deps)),
            )
        })
        .collect()
}

/// The first failure's error, then the others' and the stages left
/// waiting on them.
fn failure_report<T>(finished: &crate::plan::schedule::Finished<T>) -> String {
    let mut text = format!("{:#}", finished.failed[0].error);
    for f in &finished.failed[1..] {
        text.push_str(&format!("\n{} failed too: {:#}", f.job, f.error));
    }
    if !finished.not_run.is_empty() {
        let why = match rlhf_stages::train::interrupt_requested() {
            true => "not started (interrupted, or downstream of a failure)",
            false => "not run (downstream of a failure)",
        };
        text.push_str(&format!("\n{why}: {}", finished.not_run.join(", ")));
    }
    let done: Vec<&str> = finished.done.keys().map(String::as_str).collect();
    if !done.is_empty() {
        text.push_str(&format!("\nfinished: {}", done.join(", ")));
    }
    text
}

/// One stage to bring up to date: a stage of the file, or a round's copy
/// of one (another folder, extra overrides).
struct StageRun<'a> {
    exp: &'a Experiment,
    name: &'a str,
    /// How logs name it (`rm`, `round-1/rm`).
    label: &'a str,
    out_dir: PathBuf,
    extra: Vec<String>,
    upstream: BTreeMap<String, String>,
    force: bool,
    /// Stages sharing this machine's cores with it, itself included.
    side_by_side: usize,
}

/// Skips the stage if its manifest matches, else runs it as a child and
/// writes its manifest. Returns its key.
fn ensure_stage(job: &StageRun, overrides: &[String]) -> anyhow::Result<(String, Outcome)> {
    refuse_after_interrupt(job.label)?;
    let all: Vec<String> = overrides.iter().chain(&job.extra).cloned().collect();
    let exp = if job.extra.is_empty() {
        job.exp.clone()
    } else {
        Experiment::load(&job.exp.file, &all)?
    };
    let (key, inputs, config) = stage_key(&exp, job.name, &job.upstream)?;
    let dir = &job.out_dir;
    let label = job.label;
    if !job.force && is_cached(dir, &key) {
        tracing::info!("[{label}] cached ({})", dir.display());
        return Ok((key, Outcome::Cached));
    }
    crate::run_folder::manifest::refuse_foreign_folder(dir, label)?;
    if let Some(from) = (!job.force)
        .then(|| sibling_cache::find(&exp, &key))
        .flatten()
    {
        match sibling_cache::copy_in(&exp, &from, dir, label, &key) {
            Ok(()) => return Ok((key, Outcome::Cached)),
            Err(e) => tracing::warn!(
                "[{label}] not copied from {}: {e:#}; running it",
                from.display()
            ),
        }
    }
    // A folder started with other settings (or forced), or a finished one
    // whose checkpoint is gone or damaged, starts over; one started with
    // these settings and stopped resumes from its last good checkpoint.
    let started_key = crate::run_folder::manifest::started_key(dir);
    let finished = read_manifest(dir).is_some_and(|m| m.status == Status::Complete);
    exp.check_inside(dir)?;
    if dir.exists() && (job.force || finished || started_key.as_deref() != Some(key.as_str())) {
        crate::exec::slurm::cancel_recorded(dir);
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    rlhf_datasets::atomic::write_file(&dir.join(KEY_FILE), key.as_bytes())?;
    let (t0, started_at) = (Instant::now(), crate::run_folder::manifest::unix_now());
    let result = launch(&exp, job, &key);
    let (status, summary) = match &result {
        Ok(summary) => (Status::Complete, summary.clone()),
        Err(e) => {
            let status = if rlhf_stages::train::interrupt_requested() {
                Status::Interrupted
            } else {
                Status::Failed
            };
            (status, serde_json::json!({"error": format!("{e:#}")}))
        }
    };
    let manifest = Manifest {
        stage: label.into(),
        kind: exp.stage(job.name)?.kind().into(),
        key: key.clone(),
        inputs,
        upstream: job.upstream.clone(),
        config,
        status,
        seconds: t0.elapsed().as_secs_f64(),
        summary,
        copied_from: None,
        started_at: Some(started_at),
        ended_at: Some(crate::run_folder::manifest::unix_now()),
    };
    write_manifest(dir, &manifest)?;
    match result {
        Ok(_) => Ok((key, Outcome::Ran)),
        Err(e) => bail!("{e:#}; {}", rerun_hint(dir)),
    }
}

/// What a rerun of a failed stage does: resume only where there is
/// something to resume.
fn rerun_hint(dir: &Path) -> String {
    let checkpoint = rlhf_stages::train::periodic_checkpoints(dir)
        .last()
        .map(|c| c.0);
    match (checkpoint, rlhf_stages::train::interrupt_requested()) {
        (Some(step), _) => format!("rerun to resume it from its checkpoint at step {step}"),
        (None, true) => "it stopped before its first checkpoint: rerun to start it again".into(),
        (None, false) => "it left no checkpoint: fix what the error says, then rerun".into(),
    }
}

/// Runs the stage where its executor says: as child processes here (its
/// ranks), or as a Slurm job, each reading the stage.json written here.
/// Returns its summary (its `summary.json`).
fn launch(exp: &Experiment, job: &StageRun, key: &str) -> anyhow::Result<serde_json::Value> {
    let (label, dir) = (job.label, &job.out_dir);
    let planned = PlannedStage::of(exp, job.name, label, dir, key, &job.upstream)?.write()?;
    let mut args = vec![
        "stage".to_owned(),
        "--managed".into(),
        "--planned".into(),
        planned.display().to_string(),
    ];
    let ranks = exp.ranks(job.name);
    if ranks == 1 && exp.spec.distributed.nproc_per_node > 1 {
        tracing::info!(
            "{label} ({}) runs as one process: this kind does not run data-parallel",
            exp.stage(job.name)?.kind()
        );
    }
    let grace = std::time::Duration::from_secs(exp.spec.distributed.timeout_seconds);
    match exp.executor(job.name) {
        (ExecutorKind::Local, _) => {
            crate::exec::spawn::run_ranks(label, &args, ranks, grace, job.side_by_side)?;
            crate::run_folder::read_summary(dir)
        }
        (ExecutorKind::Slurm, mut settings) => {
            if exp.stage(job.name)?.config.shared_batches().is_empty()
                && settings.nodes.unwrap_or(1) > 1
            {
                tracing::info!(
                    "{label} runs as one process: one node of the slurm.nodes asked for"
                );
                settings.nodes = Some(1);
            }
            // The job is no child of the runner: it neither watches it nor
            // takes the lock the runner holds.
            args[1] = "--scheduled".into();
            let stage = crate::exec::slurm::SlurmStage {
                label,
                dir,
                key,
                args: &args,
                tasks_per_node: ranks,
                settings,
            };
            stage.run()
        }
    }
}

/// After Ctrl-C or SIGTERM the runner starts nothing new.
fn refuse_after_interrupt(label: &str) -> anyhow::Result<()> {
    if rlhf_stages::train::interrupt_requested() {
        bail!("interrupted: {label} and what follows it were not started");
    }
    Ok(())
}

/// A round's collection of fresh rankings: the policy to sample (folder
/// and key) and the rankings so far (file and key).
struct Collect<'a> {
    exp: &'a Experiment,
    spec: &'a LoopFile,
    round: usize,
    policy: (&'a Path, &'a str),
    prefs: (&'a Path, &'a str),
}

impl Collect<'_> {
    /// Runs `rlhf collect` unless its output with this key exists; returns
    /// its key and the round's preference file.
    fn ensure(
        &self,
        round_dir: &Path,
        force: bool,
        overrides: &[String],
    ) -> anyhow::Result<(String, PathBuf, Outcome)> {
        let label = crate::run_folder::round_stage(self.round, "collect");
        let dir = round_dir.join("collect");
        let out_prefs = round_dir.join("preferences.parquet");
        let ((prefs, prefs_key), (policy, policy_key)) = (self.prefs, self.policy);
        let prefs_hash = sha256_file(prefs)?;
        let mut h = Sha256::new();
        h.update(serde_json::to_string(self.spec)?.as_bytes());
        h.update(format!("{}|{policy_key}|{prefs_key}|{prefs_hash}", self.round).as_bytes());
        let key = format!("{:x}", h.finalize());
        if !force && read_manifest(&dir).is_some_and(|m| m.key == key) && out_prefs.exists() {
            tracing::info!("[{label}] cached ({})", out_prefs.display());
            return Ok((key, out_prefs, Outcome::Cached));
        }
        refuse_after_interrupt(&label)?;
        self.exp.check_inside(&dir)?;
        crate::run_folder::manifest::refuse_foreign_folder(&dir, &label)?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let t0 = Instant::now();
        let mut args: Vec<String> = vec!["collect".into(), "--config".into()];
        args.push(self.exp.file.display().to_string());
        for (flag, value) in [
            ("--round", self.round.to_string()),
            ("--policy", policy.display().to_string()),
            ("--base", prefs.display().to_string()),
            ("--out", out_prefs.display().to_string()),
        ] {
            args.extend([flag.to_owned(), value]);
        }
        for o in overrides {
            args.extend(["--set".into(), o.clone()]);
        }
        let ranks = self.exp.spec.distributed.nproc_per_node;
        let grace = std::time::Duration::from_secs(self.exp.spec.distributed.timeout_seconds);
        let summary = crate::exec::spawn::run_ranks(&label, &args, ranks, grace, 1)?;
        let manifest = Manifest {
            stage: label,
            kind: "collect".into(),
            key: key.clone(),
            inputs: BTreeMap::from([(prefs.display().to_string(), prefs_hash)]),
            upstream: BTreeMap::from([("policy".into(), policy_key.to_owned())]),
            config: serde_json::to_value(self.spec)?,
            status: Status::Complete,
            seconds: t0.elapsed().as_secs_f64(),
            summary,
            copied_from: None,
            started_at: None,
            ended_at: Some(crate::run_folder::manifest::unix_now()),
        };
        write_manifest(&dir, &manifest)?;
        Ok((key, out_prefs, Outcome::Ran))
    }
}

/// The stages a loop round repeats after sampling and ranking.
enum Repeat<'a> {
    /// The reward model retrained on every ranking so far, then PPO (or
    /// GRPO) against it (InstructGPT's iteration).
    RewardThenPpo {
        rm: &'a str,
        ppo: &'a str,
        rm_cfg: &'a RewardConfig,
    },
    /// DPO on every ranking so far (iterated, online DPO).
    Dpo { dpo: &'a str },
}

impl<'a> Repeat<'a> {
    /// The repeated stages, and the policy the rounds start from, its
    /// reference, and the rankings the first round adds to.
    fn of(
        exp: &'a Experiment,
        spec: &'a LoopFile,
    ) -> anyhow::Result<(Self, PathBuf, PathBuf, PathBuf)> {
        match spec.repeat.as_slice() {
            [rm, ppo] => {
                let rl = exp.stage(ppo)?;
                let policy_and_reference = match (rl.get::<PpoConfig>(), rl.get::<GrpoConfig>()) {
                    (Some(c), _) => Some((c.policy.clone(), c.reference.clone())),
                    (_, Some(c)) => Some((c.policy.clone(), c.reference.clone())),
                    _ => None,
                };
                let (Some(rm_cfg), Some((policy, reference))) =
                    (exp.stage(rm)?.get::<RewardConfig>(), policy_and_reference)
                else {
                    bail!("loop.repeat must name a reward stage then a ppo or grpo stage, or one dpo stage");
                };
                let reference = reference.unwrap_or_else(|| policy.clone());
                let repeat = Repeat::RewardThenPpo { rm, ppo, rm_cfg };
                Ok((repeat, policy, reference, rm_cfg.data.clone()))
            }
            [dpo] => {
                let Some(cfg) = exp.stage(dpo)?.get::<DpoConfig>() else {
                    bail!(
                        "loop.repeat must name a reward stage then a ppo or grpo stage, or one dpo stage"
                    );
                };
                let policy = cfg.policy.clone().context("loop.repeat: [dpo] needs the dpo stage's `policy` (the model rounds start from)")?;
                let reference = cfg.reference.clone().unwrap_or_else(|| policy.clone());
                Ok((Repeat::Dpo { dpo }, policy, reference, cfg.data.clone()))
            }
            _ => bail!(
                "loop.repeat must name a reward stage then a ppo or grpo stage, or one dpo stage"
            ),
        }
    }

    /// The stage whose checkpoint is the rounds' policy.
    fn policy_stage(&self) -> &'a str {
        match self {
            Repeat::RewardThenPpo { ppo, .. } => ppo,
            Repeat::Dpo { dpo } => dpo,
        }
    }
}

/// The loop: each round samples the latest policy, ranks its answers,
/// appends them to the preference data, and trains on everything so far:
/// the reward model then PPO from the latest policy, or DPO. Rounds live
/// in `round-N/`.
fn run_rounds(
    exp: &Experiment,
    spec: &LoopFile,
    keys: &BTreeMap<String, String>,
    force: bool,
    overrides: &[String],
) -> anyhow::Result<Vec<(String, Outcome)>> {
    let (repeat, _, reference, data) = Repeat::of(exp, spec)?;
    let final_of = |dir: &Path| dir.join(rlhf_stages::train::FINAL_DIR);
    let trained = repeat.policy_stage();
    let (mut policy_dir, mut policy_key) =
        (final_of(&exp.stage_dir(trained)), keys[trained].clone());
    // The reference's key: its stage's, or its folder for an outside model
    // (whose files the trained stage's inputs hash).
    let reference_key = keys
        .iter()
        .find(|(name, _)| final_of(&exp.stage_dir(name)) == reference)
        .map_or_else(|| reference.display().to_string(), |(_, k)| k.clone());
    let mut rm_state = match &repeat {
        Repeat::RewardThenPpo { rm, .. } => Some((final_of(&exp.stage_dir(rm)), keys[*rm].clone())),
        Repeat::Dpo { .. } => None,
    };
    let (mut prefs, mut prefs_key) = (data, String::new());
    let mut outcomes = Vec::new();
    let mut rounds_log = String::new();
    for round in 1..=spec.rounds {
        let round_dir = exp.run_dir.join(crate::run_folder::round_folder(round));
        // 1. Fresh comparisons of the current policy's answers.
        let collect = Collect {
            exp,
            spec,
            round,
            policy: (&policy_dir, &policy_key),
            prefs: (&prefs, &prefs_key),
        };
        let (collect_key, out_prefs, outcome) = collect.ensure(&round_dir, force, overrides)?;
        outcomes.push((crate::run_folder::round_stage(round, "collect"), outcome));
        let round_run = RoundRun {
            exp,
            round_dir: &round_dir,
            force,
            overrides,
        };
        // 2. Training on everything so far, from the latest (or the
        // reference) policy.
        let (start_dir, start_key) = match spec.policy_init {
            PolicyInit::Previous => (policy_dir.clone(), policy_key.clone()),
            PolicyInit::Reference => (reference.clone(), reference_key.clone()),
        };
        let mut extra = spec.set.clone();
        let line = match &repeat {
            Repeat::RewardThenPpo { rm, ppo, rm_cfg } => {
                let (rm_dir, rm_key) = rm_state.as_mut().expect("a reward stage");
                let rm_init = match spec.reward_init {
                    RewardInit::Previous => Some(rm_dir.clone()),
                    RewardInit::Stage => rm_cfg.init.clone(),
                };
                let mut rm_extra = extra.clone();
                rm_extra.push(format!("stages.{rm}.data={}", out_prefs.display()));
                if let Some(init) = &rm_init {
                    rm_extra.push(format!("stages.{rm}.init={}", init.display()));
                }
                let upstream = [("collect", &collect_key), ("init", &*rm_key)];
                (*rm_dir, *rm_key) = round_run.ensure(rm, rm_extra, upstream, &mut outcomes)?;
                extra.extend([
                    format!("stages.{ppo}.policy={}", start_dir.display()),
                    format!("stages.{ppo}.reference={}", reference.display()),
                    format!("stages.{ppo}.reward_model={}", rm_dir.display()),
                ]);
                let upstream = [("policy", &start_key), ("reward_model", &*rm_key)];
                (policy_dir, policy_key) = round_run.ensure(ppo, extra, upstream, &mut outcomes)?;
                round_line(round, &round_dir, rm, ppo)
            }
            Repeat::Dpo { dpo } => {
                extra.extend([
                    format!("stages.{dpo}.data={}", out_prefs.display()),
                    format!("stages.{dpo}.policy={}", start_dir.display()),
                    format!("stages.{dpo}.reference={}", reference.display()),
                ]);
                let upstream = [("collect", &collect_key), ("policy", &start_key)];
                (policy_dir, policy_key) = round_run.ensure(dpo, extra, upstream, &mut outcomes)?;
                dpo_round_line(round, &round_dir, dpo)
            }
        };
        (prefs, prefs_key) = (out_prefs, collect_key);
        rounds_log.push_str(&format!("{line}\n"));
    }
    rlhf_datasets::atomic::write_file(
        &exp.run_dir.join(crate::run_folder::ROUNDS_LOG),
        rounds_log.as_bytes(),
    )?;
    Ok(outcomes)
}

/// Where a round's copies of stages run.
struct RoundRun<'a> {
    exp: &'a Experiment,
    round_dir: &'a Path,
    force: bool,
    overrides: &'a [String],
}

impl RoundRun<'_> {
    /// Brings the round's copy of stage `name` up to date with `extra`
    /// settings; returns its final checkpoint and its key.
    fn ensure(
        &self,
        name: &str,
        extra: Vec<String>,
        upstream: [(&str, &String); 2],
        outcomes: &mut Vec<(String, Outcome)>,
    ) -> anyhow::Result<(PathBuf, String)> {
        let dir = self.round_dir.join(name);
        let round = self
            .round_dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        let label = format!("{round}/{name}");
        let job = StageRun {
            exp: self.exp,
            name,
            label: &label,
            out_dir: dir.clone(),
            extra,
            upstream: upstream
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).clone()))
                .collect(),
            force: self.force,
            side_by_side: 1,
        };
        let (key, outcome) = ensure_stage(&job, self.overrides)?;
        outcomes.push((label, outcome));
        Ok((dir.join(rlhf_stages::train::FINAL_DIR), key))
    }
}

/// A round's line of `rounds.jsonl`, from its stages' manifests.
fn round_line(round: usize, round_dir: &Path, rm: &str, ppo: &str) -> serde_json::Value {
    let summary = |dir: &Path| read_manifest(dir).map(|m| m.summary).unwrap_or_default();
    let (c, r, p) = (
        summary(&round_dir.join("collect")),
        summary(&round_dir.join(rm)),
        summary(&round_dir.join(ppo)),
    );
    serde_json::json!({
        "round": round, "new_groups": c["new_groups"], "total_groups": c["total_groups"],
        "rm_eval_accuracy": r["eval"]["accuracy"], "ppo_first_score": p["first_mean_score"],
        "ppo_last_score": p["last_mean_score"], "kl": p["last_kl"],
        "eval_gold_before": p["eval_gold_before"], "eval_gold_after": p["eval_gold_after"],
        "labels": c["labels"],
    })
}

/// A DPO round's line of `rounds.jsonl`.
fn dpo_round_line(round: usize, round_dir: &Path, dpo: &str) -> serde_json::Value {
    let summary = |dir: &Path| read_manifest(dir).map(|m| m.summary).unwrap_or_default();
    let (c, d) = (
        summary(&round_dir.join("collect")),
        summary(&round_dir.join(dpo)),
    );
    serde_json::json!({
        "round": round, "new_groups": c["new_groups"], "total_groups": c["total_groups"],
        "dpo_eval_accuracy": d["eval"]["accuracy"], "dpo_eval_margins": d["eval"]["margins"],
        "labels": c["labels"],
    })
}

/// Where a stage runs and with what: `on this machine, 1 process` or
/// `as a Slurm job: 1 node x 2 tasks, partition gpu, ...`.
fn describe_executor(exp: &Experiment, name: &str) -> String {
    let ranks = exp.ranks(name);
    match exp.executor(name) {
        (ExecutorKind::Local, _) => match ranks {
            1 => "on this machine, 1 process".into(),
            n => format!("on this machine, {n} ranks"),
        },
        (ExecutorKind::Slurm, s) => {
            let nodes = s.nodes.unwrap_or(1);
            let mut parts = vec![format!("{nodes} node(s) x {ranks} task(s)")];
            let fields = [
                ("partition", s.partition.clone()),
                ("account", s.account.clone()),
                ("time", s.time.clone()),
                ("cpus/task", s.cpus_per_task.map(|n| n.to_string())),
                ("gpus/node", s.gpus_per_node.map(|n| n.to_string())),
            ];
            parts.extend(
                fields
                    .into_iter()
                    .filter_map(|(k, v)| Some(format!("{k} {}", v?))),
            );
            if let Some(f) = s.sbatch_flags.as_ref().filter(|f| !f.is_empty()) {
                parts.push(format!("sbatch {}", f.join(" ")));
            }
            format!("as a Slurm job: {}", parts.join(", "))
        }
    }
}

/// The plan as text: order, dependencies and whether each stage is cached.
pub fn describe_plan(exp: &Experiment) -> anyhow::Result<String> {
    let order = dag::plan(&exp.deps).with_context(|| exp.file.display().to_string())?;
    let mut keys = BTreeMap::new();
    let mut out = format!("{} -> {}\n", exp.file.display(), exp.run_dir.display());
    for (i, name) in order.iter().enumerate() {
        let upstream: BTreeMap<String, String> = exp.deps[name]
            .iter()
            .map(|u| (u.clone(), keys.get(u).cloned().unwrap_or_default()))
            .collect();
        let (key, _, _) = stage_key(exp, name, &upstream)?;
        let state = if is_cached(&exp.stage_dir(name), &key) {
            "cached".to_owned()
        } else if let Some(from) = sibling_cache::find(exp, &key) {
            format!(
                "finished in {} (copied)",
                crate::run_folder::relative_to(&from, &exp.run_dir).display()
            )
        } else {
            "to run".to_owned()
        };
        let after: Vec<&String> = exp.deps[name]
            .iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let after = if after.is_empty() {
            String::new()
        } else {
            format!(
                " after {}",
                after
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        out.push_str(&format!(
            "{}. {name} ({}){after}: {state}\n",
            i + 1,
            exp.stage(name)?.kind()
        ));
        if let Some(b) = exp.batch_arithmetic(name) {
            out.push_str(&format!("   {b}\n"));
        }
        out.push_str(&format!("   runs {}\n", describe_executor(exp, name)));
        keys.insert(name.clone(), key);
    }
    if let Some(l) = &exp.spec.rounds {
        out.push_str(&format!(
            "then {} round(s) of: collect ({} prompts x {} answers, {:?} labeller) -> {}\n",
            l.rounds,
            l.prompts_per_round,
            l.k,
            l.labeller,
            l.repeat.join(" -> ")
        ));
    }
    Ok(out)
}
