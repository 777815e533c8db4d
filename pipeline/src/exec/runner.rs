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

use crate::exec::key::stage_key;
use crate::exec::planned::PlannedStage;
use crate::exec::sibling_cache;
use crate::experiment::{ExecutorKind, Experiment, LoopFile};
use crate::plan::dag;
use crate::run_folder::manifest::{
    is_cached, read_manifest, write_manifest, Manifest, Status, KEY_FILE,
};

#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Rerun these and everything downstream.
    pub force: Vec<String>,
    /// Run only this stage (and what it needs).
    pub only: Option<String>,
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
    write_plan(exp, &order)?;
    let finished = crate::plan::schedule::run_dag(
        &order,
        &exp.deps,
        parallel,
        |name, upstream: &BTreeMap<String, (String, Outcome)>| {
            let job = StageRun {
                exp,
                name,
                out_dir: exp.stage_dir(name),
                upstream: upstream
                    .iter()
                    .map(|(u, (k, _))| (u.clone(), k.clone()))
                    .collect(),
                force: forced.contains(name),
                side_by_side: shares.get(name).copied().unwrap_or(1),
            };
            let result = ensure_stage(&job)
                .and_then(|done| stop_if_flagged(exp, name, &job.out_dir).map(|()| done));
            match &result {
                Err(e) if e.is::<Flagged>() => tracing::error!(
                    "[{name}] flagged as not learning: what depends on it will not start (fail_if_not_learning)"
                ),
                Err(e) => tracing::error!("[{name}] failed: {e:#}"),
                Ok(_) => {}
            }
            result
        },
        rlhf_stages::train::interrupt_requested,
    );
    if !finished.failed.is_empty() {
        bail!("{}", failure_report(&finished));
    }
    let outcomes: Vec<(String, Outcome)> = order
        .iter()
        .filter_map(|n| Some((n.clone(), finished.done.get(n)?.1.clone())))
        .collect();
    if !finished.not_run.is_empty() {
        // Interrupted between stages.
        refuse_after_interrupt(&finished.not_run[0])?;
    }
    if let Some(spec) = &exp.spec.rounds {
        write_rounds_log(exp, spec)?;
    }
    Ok(outcomes)
}

/// `plan.json` in the run folder: the stages this run will bring up to
/// date, for `rlhf watch`.
fn write_plan(exp: &Experiment, order: &[String]) -> anyhow::Result<()> {
    use crate::run_folder::plan_file::{PlannedEntry, RunPlan};
    let mut stages = Vec::new();
    for name in order {
        let folder = exp.stage_dir(name);
        let folder = folder.strip_prefix(&exp.run_dir).unwrap_or(&folder);
        stages.push(PlannedEntry {
            label: name.clone(),
            kind: exp.stage(name)?.kind().into(),
            folder: folder.to_string_lossy().into_owned(),
            upstream: exp.deps.get(name).into_iter().flatten().cloned().collect(),
            executor: match exp.executor(name).0 {
                ExecutorKind::Local => "local".into(),
                ExecutorKind::Slurm => "slurm".into(),
            },
        });
    }
    let plan = RunPlan {
        experiment: exp
            .file
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        started_at: crate::run_folder::manifest::unix_now(),
        pid: std::process::id(),
        stages,
    };
    plan.write(&exp.run_dir)
        .with_context(|| format!("writing the plan into {}", exp.run_dir.display()))
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

/// A finished stage flagged as not learning, where the run must not go on
/// past it (`fail_if_not_learning`): its dependents are not started.
#[derive(Debug, thiserror::Error)]
#[error("{stage} finished but was flagged as not learning, and fail_if_not_learning stops the run before the stages that depend on it:\n  {}", flags.join("\n  "))]
pub struct Flagged {
    pub stage: String,
    pub flags: Vec<String>,
}

/// Whether the run stops after stage `name` when it is flagged: the
/// experiment's `fail_if_not_learning`, or the stage's own.
pub fn stops_when_flagged(exp: &Experiment, name: &str) -> bool {
    let own = exp
        .stage(name)
        .ok()
        .and_then(|s| s.config.to_json()["fail_if_not_learning"].as_bool());
    exp.spec.fail_if_not_learning || own == Some(true)
}

/// Fails with [`Flagged`] when the finished stage in `dir` is flagged and
/// the run must stop before what depends on it.
fn stop_if_flagged(exp: &Experiment, name: &str, dir: &Path) -> anyhow::Result<()> {
    let flags =
        read_manifest(dir).map_or_else(Vec::new, |m| crate::run_folder::summary_flags(&m.summary));
    if flags.is_empty() || !stops_when_flagged(exp, name) {
        return Ok(());
    }
    Err(Flagged {
        stage: name.to_owned(),
        flags,
    }
    .into())
}

/// The first failure's error, then the others' and the stages left
/// waiting on them.
fn failure_report<T>(finished: &crate::plan::schedule::Finished<T>) -> String {
    let mut text = format!("{:#}", finished.failed[0].error);
    for f in &finished.failed[1..] {
        match f.error.is::<Flagged>() {
            true => text.push_str(&format!("\n{:#}", f.error)),
            false => text.push_str(&format!("\n{} failed too: {:#}", f.job, f.error)),
        }
    }
    if !finished.not_run.is_empty() {
        let flagged = finished.failed.iter().filter(|f| f.error.is::<Flagged>());
        let why = match (rlhf_stages::train::interrupt_requested(), flagged.count()) {
            (true, _) => "not started (interrupted, or downstream of a failure)",
            (false, 0) => "not run (downstream of a failure)",
            (false, n) if n == finished.failed.len() => "not run (downstream of a flagged stage)",
            (false, _) => "not run (downstream of a failure or a flagged stage)",
        };
        text.push_str(&format!("\n{why}: {}", finished.not_run.join(", ")));
    }
    let done: Vec<&str> = finished.done.keys().map(String::as_str).collect();
    if !done.is_empty() {
        text.push_str(&format!("\nfinished: {}", done.join(", ")));
    }
    text
}

/// One stage to bring up to date.
struct StageRun<'a> {
    exp: &'a Experiment,
    /// Its name, which logs show too (`rm`, `round-1/rm`).
    name: &'a str,
    out_dir: PathBuf,
    upstream: BTreeMap<String, String>,
    force: bool,
    /// Stages sharing this machine's cores with it, itself included.
    side_by_side: usize,
}

/// Skips the stage if its manifest matches, else runs it as a child and
/// writes its manifest. Returns its key.
fn ensure_stage(job: &StageRun) -> anyhow::Result<(String, Outcome)> {
    let (exp, label, dir) = (job.exp, job.name, &job.out_dir);
    refuse_after_interrupt(label)?;
    let (key, inputs, config) = stage_key(exp, label, &job.upstream)?;
    if !job.force && is_cached(dir, &key) {
        tracing::info!("[{label}] cached ({})", dir.display());
        return Ok((key, Outcome::Cached));
    }
    crate::run_folder::manifest::refuse_foreign_folder(dir, label)?;
    if let Some(from) = (!job.force)
        .then(|| sibling_cache::find(exp, &key))
        .flatten()
    {
        match sibling_cache::copy_in(exp, &from, dir, label, &key) {
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
    // A failed or interrupted attempt's manifest says nothing of this one
    // (a watcher would show it failed while it runs); its successor is
    // written when this attempt ends.
    let _ = std::fs::remove_file(dir.join(crate::run_folder::MANIFEST_FILE));
    let (t0, started_at) = (Instant::now(), crate::run_folder::manifest::unix_now());
    let result = launch(exp, job, &key);
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
    let (label, dir) = (job.name, &job.out_dir);
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

/// `rounds.jsonl`: a line per loop round whose stages have finished,
/// from their manifests.
fn write_rounds_log(exp: &Experiment, spec: &LoopFile) -> anyhow::Result<()> {
    let mut text = String::new();
    for round in 1..=spec.rounds {
        let round_dir = exp.run_dir.join(crate::run_folder::round_folder(round));
        let trained = spec.repeat.last().expect("a loop repeats a stage");
        let finished =
            read_manifest(&round_dir.join(trained)).is_some_and(|m| m.status == Status::Complete);
        if !finished {
            break;
        }
        let line = match spec.repeat.as_slice() {
            [rm, ppo] => round_line(round, &round_dir, rm, ppo),
            _ => dpo_round_line(round, &round_dir, trained),
        };
        text.push_str(&format!("{line}\n"));
    }
    rlhf_datasets::atomic::write_file(
        &exp.run_dir.join(crate::run_folder::ROUNDS_LOG),
        text.as_bytes(),
    )?;
    Ok(())
}

/// A round's line of `rounds.jsonl`, from its stages' manifests.
fn round_line(round: usize, round_dir: &Path, rm: &str, ppo: &str) -> serde_json::Value {
    let summary = |dir: &Path| read_manifest(dir).map(|m| m.summary).unwrap_or_default();
    let (c, r, p) = (
        summary(&round_dir.join(crate::experiment::COLLECT_KIND)),
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
        summary(&round_dir.join(crate::experiment::COLLECT_KIND)),
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

/// A finished stage's flags for `rlhf plan`, and whether the run stops
/// there; nothing for a stage not finished or not flagged.
fn describe_flags(exp: &Experiment, name: &str, done_in: Option<&Path>) -> String {
    let summary = done_in.and_then(read_manifest).map(|m| m.summary);
    let flags = summary.map_or_else(Vec::new, |s| crate::run_folder::summary_flags(&s));
    if flags.is_empty() {
        return String::new();
    }
    let mut out = String::new();
    for f in &flags {
        out.push_str(&format!("   flagged: {f}\n"));
    }
    if stops_when_flagged(exp, name) {
        out.push_str(
            "   fail_if_not_learning: the run stops here, before the stages that depend on it\n",
        );
    }
    out
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
        let (state, done_in) = if is_cached(&exp.stage_dir(name), &key) {
            ("cached".to_owned(), Some(exp.stage_dir(name)))
        } else if let Some(from) = sibling_cache::find(exp, &key) {
            let shown = crate::run_folder::relative_to(&from, &exp.run_dir);
            (
                format!("finished in {} (copied)", shown.display()),
                Some(from),
            )
        } else {
            ("to run".to_owned(), None)
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
        out.push_str(&describe_flags(exp, name, done_in.as_deref()));
        out.push_str(&format!("   runs {}\n", describe_executor(exp, name)));
        keys.insert(name.clone(), key);
    }
    if let Some(l) = &exp.spec.rounds {
        out.push_str(&format!(
            "loop: {} round(s) (the round-N stages above), each collect ({} prompts x {} answers, {} labeller) -> {}\n",
            l.rounds,
            l.prompts_per_round,
            l.k,
            l.labeller.name(),
            l.repeat.join(" -> ")
        ));
    }
    Ok(out)
}
