//! What a finished run folder holds: its stages (top level and loop
//! rounds) as their manifests describe them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::artifact::{read_manifest, Manifest};

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
        self.dir.join("checkpoint")
    }

    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
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
        if let Some(round) = name
            .strip_prefix("round-")
            .and_then(|n| n.parse::<usize>().ok())
        {
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

fn kind_order(kind: &str) -> usize {
    match kind {
        "sft" => 0,
        "reward" => 1,
        "ppo" => 2,
        "dpo" => 3,
        "grpo" => 4,
        _ => 5,
    }
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
        if !path.join(crate::artifact::MANIFEST_FILE).exists() {
            continue;
        }
        let Some(manifest) = read_manifest(&path) else {
            tracing::warn!("{}: unreadable manifest.json; skipped", path.display());
            continue;
        };
        if manifest.status != crate::artifact::Status::Complete || !path.join("checkpoint").exists()
        {
            continue;
        }
        if !matches!(
            manifest.kind.as_str(),
            "sft" | "reward" | "ppo" | "dpo" | "grpo"
        ) {
            continue;
        }
        out.push(FinishedStage {
            label: format!("{prefix}{}", entry.file_name().to_string_lossy()),
            kind: manifest.kind.clone(),
            round,
            dir: path,
            manifest,
        });
    }
    Ok(())
}
