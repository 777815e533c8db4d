//! Runs an experiment's plan: each stage as a child process (`rlhf stage`)
//! with its output streamed and prefixed, skipping stages whose manifest
//! matches, and recording a manifest after each success.
//!
//! A crash in one stage cannot corrupt another, and a rerun continues: done
//! stages are cached and an interrupted stage resumes from its checkpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};

use crate::artifact::{is_cached, stage_key, write_manifest, Manifest, KEY_FILE};
use crate::config::Experiment;
use crate::dag;

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
    let mut keys: BTreeMap<String, String> = BTreeMap::new();
    let mut outcomes = Vec::new();
    for name in &order {
        let upstream: BTreeMap<String, String> = exp.deps[name]
            .iter()
            .map(|u| (u.clone(), keys[u].clone()))
            .collect();
        let (key, inputs, config) = stage_key(exp, name, &upstream)?;
        let dir = exp.stage_dir(name);
        if !forced.contains(name) && is_cached(&dir, &key) {
            tracing::info!("[{name}] cached ({})", dir.display());
            keys.insert(name.clone(), key);
            outcomes.push((name.clone(), Outcome::Cached));
            continue;
        }
        // A folder started with other settings (or forced) starts over; one
        // started with these settings resumes from its last checkpoint.
        let started_key = std::fs::read_to_string(dir.join(KEY_FILE)).ok();
        if dir.exists() && (forced.contains(name) || started_key.as_deref() != Some(key.as_str())) {
            std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)?;
        rlhf_datasets::atomic::write_file(&dir.join(KEY_FILE), key.as_bytes())?;
        let t0 = Instant::now();
        let summary = run_child(exp, name, &opts.overrides)?;
        let manifest = Manifest {
            stage: name.clone(),
            kind: exp.stage(name)?.kind().into(),
            key: key.clone(),
            inputs,
            upstream,
            config,
            status: "complete".into(),
            seconds: t0.elapsed().as_secs_f64(),
            summary,
        };
        write_manifest(&dir, &manifest)?;
        keys.insert(name.clone(), key);
        outcomes.push((name.clone(), Outcome::Ran));
    }
    Ok(outcomes)
}

/// Runs `rlhf stage` for one stage, prefixing its output lines with the
/// stage name; returns the JSON summary it prints last.
fn run_child(
    exp: &Experiment,
    name: &str,
    overrides: &[String],
) -> anyhow::Result<serde_json::Value> {
    let exe = std::env::current_exe().context("locating the rlhf binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("stage").arg("--config").arg(&exp.file).arg(name);
    for o in overrides {
        cmd.arg("--set").arg(o);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting stage {name}"))?;
    let stderr = child.stderr.take().expect("piped");
    let prefix = format!("[{name}] ");
    let echo = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{prefix}{line}");
        }
    });
    let mut last = String::new();
    for line in BufReader::new(child.stdout.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
    {
        println!("[{name}] {line}");
        last = line;
    }
    let status = child.wait()?;
    let _ = echo.join();
    if !status.success() {
        bail!("stage {name} failed ({status}); rerun to resume it from its last checkpoint");
    }
    Ok(serde_json::from_str(&last).unwrap_or(serde_json::Value::Null))
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
            "cached"
        } else {
            "to run"
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
        keys.insert(name.clone(), key);
    }
    Ok(out)
}
