//! What a finished run folder holds: its stages (top level and loop
//! rounds) as their manifests describe them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rlhf_stages::kind::{Kind, LoopRole, Produces};

use crate::run_folder::manifest::{read_manifest, Manifest};

/// A stage that finished, found in a run folder.
#[derive(Debug, Clone)]
pub struct FinishedStage {
    /// How the runner names it: `sft`, `rm`, `round-1/ppo`.
    pub label: String,
    /// `sft`, `reward` or `ppo`.
    pub kind: String,
    /// 0 for the stages before the loop, N for `round-N/`.
    pub round: usize,
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl FinishedStage {
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join(super::CHECKPOINT_DIR)
    }

    pub fn metrics(&self) -> PathBuf {
        self.dir.join(super::METRICS_FILE)
    }

    /// Its kind as registered; every finished stage found has one.
    pub fn kind(&self) -> Option<&'static Kind> {
        rlhf_stages::kinds::kind(&self.kind)
    }

    /// Whether its checkpoint is a policy (not a reward model).
    pub fn is_policy(&self) -> bool {
        self.kind().is_some_and(|k| k.produces == Produces::Policy)
    }

    pub fn is_reward_model(&self) -> bool {
        self.kind()
            .is_some_and(|k| k.produces == Produces::RewardModel)
    }

    /// Whether its kind optimises a scorer against a reference (PPO, GRPO).
    pub fn optimises_scorer(&self) -> bool {
        self.kind()
            .is_some_and(|k| k.loop_role == LoopRole::OptimisesScorer)
    }

    /// A path setting of the stage (`eval_prompts`, `reference`, ...).
    pub fn path_setting(&self, key: &str) -> Option<PathBuf> {
        self.manifest.config["stage"][key]
            .as_str()
            .map(PathBuf::from)
    }
}

/// The run's finished stages: those before the loop first, then each
/// round's; within a group SFT, reward models, then PPO.
pub fn finished_stages(run_dir: &Path) -> anyhow::Result<Vec<FinishedStage>> {
    if !run_dir.is_dir() {
        bail!(
            "{}: no such run folder; give the folder `rlhf run` wrote (runs/<experiment name>)",
            run_dir.display()
        );
    }
    let mut found = Vec::new();
    collect(run_dir, "", 0, &mut found)?;
    for entry in sorted_entries(run_dir)? {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(round) = super::round_of(&name) {
            collect(&entry.path(), &format!("{name}/"), round, &mut found)?;
        }
    }
    found.sort_by_key(|s| (s.round, kind_order(&s.kind), s.label.clone()));
    if found.is_empty() {
        bail!(
            "{}: no finished stages (no complete manifest.json in its stage folders); run `rlhf run` first",
            run_dir.display()
        );
    }
    Ok(found)
}

/// A kind's place in the registry: stages of one round sort as the
/// kinds are listed (SFT, reward, PPO, DPO, GRPO, then registered ones).
fn kind_order(kind: &str) -> usize {
    let kinds = rlhf_stages::kinds::all();
    kinds
        .iter()
        .position(|k| k.name == kind)
        .unwrap_or(kinds.len())
}

fn sorted_entries(dir: &Path) -> anyhow::Result<Vec<std::fs::DirEntry>> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .collect();
    entries.sort_by_key(std::fs::DirEntry::file_name);
    Ok(entries)
}

fn collect(
    dir: &Path,
    prefix: &str,
    round: usize,
    out: &mut Vec<FinishedStage>,
) -> anyhow::Result<()> {
    for entry in sorted_entries(dir)? {
        let path = entry.path();
        if !path
            .join(crate::run_folder::manifest::MANIFEST_FILE)
            .exists()
        {
            continue;
        }
        let Some(manifest) = read_manifest(&path) else {
            tracing::warn!("{}: unreadable manifest.json; skipped", path.display());
            continue;
        };
        if manifest.status != crate::run_folder::manifest::Status::Complete
            || !path.join(super::CHECKPOINT_DIR).exists()
        {
            continue;
        }
        if rlhf_stages::kinds::kind(&manifest.kind).is_none() {
            continue;
        }
        out.push(FinishedStage {
            // A swept stage's name (`ppo[kl_coef=0.1]`), not its folder's.
            label: match manifest.stage.is_empty() {
                true => format!("{prefix}{}", entry.file_name().to_string_lossy()),
                false => manifest.stage.clone(),
            },
            kind: manifest.kind.clone(),
            round,
            dir: path,
            manifest,
        });
    }
    Ok(())
}

/// Every finished stage's wall time and upstream keys, by key, in these
/// run folders (labelling steps included), for the routes' times.
pub fn stage_times(run_dirs: &[&Path]) -> BTreeMap<String, (f64, Vec<String>)> {
    run_dirs
        .iter()
        .flat_map(|run| crate::run_folder::stage_dirs(run))
        .filter_map(|dir| read_manifest(&dir))
        .filter(|m| m.status == crate::run_folder::manifest::Status::Complete)
        .map(|m| (m.key, (m.seconds, m.upstream.into_values().collect())))
        .collect()
}

/// The wall time of the stage with `key` and of every stage upstream of
/// it, each counted once: what it took to get this model from nothing.
/// `None` when an upstream stage is not among `times`.
pub fn route_seconds(key: &str, times: &BTreeMap<String, (f64, Vec<String>)>) -> Option<f64> {
    let mut seen = std::collections::BTreeSet::new();
    let mut todo = vec![key.to_owned()];
    let mut total = 0.0;
    while let Some(k) = todo.pop() {
        if !seen.insert(k.clone()) {
            continue;
        }
        let (seconds, upstream) = times.get(&k)?;
        total += seconds;
        todo.extend(upstream.iter().cloned());
    }
    Some(total)
}

/// The finished stages of other run folders (`rlhf eval --with`), named
/// `<run>/<stage>`, less those with the key of a stage already in
/// `stages` (the same model, copied between runs).
pub fn stages_of_other_runs(
    stages: &[FinishedStage],
    others: &[PathBuf],
) -> anyhow::Result<Vec<FinishedStage>> {
    let mut keys: std::collections::BTreeSet<String> =
        stages.iter().map(|s| s.manifest.key.clone()).collect();
    let mut out = Vec::new();
    for run in others {
        let name = run
            .file_name()
            .unwrap_or(run.as_os_str())
            .to_string_lossy()
            .into_owned();
        for mut s in finished_stages(run)? {
            if keys.insert(s.manifest.key.clone()) {
                s.label = format!("{name}/{}", s.label);
                out.push(s);
            }
        }
    }
    Ok(out)
}
