//! A planned stage's key: its settings, the hashes of the files it reads
//! and its upstream stages' keys. A stage whose key matches a finished
//! stage folder (here or in a sibling run) is not run again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use rlhf_stages::kind::PathRole;

use crate::experiment::{Experiment, StageFile};
use crate::run_folder::manifest::sha256_file;

/// Files a stage reads that are not other stages' outputs: its data files
/// and the files of outside model folders, from its kind's path settings.
pub fn input_files(exp: &Experiment, stage: &StageFile) -> Vec<PathBuf> {
    let model_files = |dir: &Path| -> Vec<PathBuf> {
        if dir.starts_with(&exp.run_dir) {
            return vec![]; // another stage's checkpoint: covered by its key
        }
        ["config.json", "model.safetensors", "tokenizer.json"]
            .iter()
            .map(|f| dir.join(f))
            .filter(|p| p.exists())
            .collect()
    };
    // A file in a stage's folder (a round's rankings) is that stage's
    // output: its key covers it, and it may not exist yet.
    let made_by_a_stage = |f: &Path| {
        exp.spec
            .stages
            .keys()
            .any(|s| f.starts_with(exp.stage_dir(s)))
    };
    let mut files: Vec<PathBuf> = exp.spec.tokenizer.iter().cloned().collect();
    let mut config = stage.config.clone();
    for p in config.paths() {
        match (p.role, p.get()) {
            (PathRole::Data, Some(f)) if made_by_a_stage(f) => {}
            (PathRole::Data, Some(f)) => files.push(f.clone()),
            (PathRole::Model, Some(dir)) => files.extend(model_files(dir)),
            (_, None) => {}
        }
    }
    files
}

/// The stage's key and the hashes it was made from.
pub fn stage_key(
    exp: &Experiment,
    name: &str,
    upstream_keys: &BTreeMap<String, String>,
) -> anyhow::Result<(String, BTreeMap<String, String>, serde_json::Value)> {
    let stage = exp.stage(name)?;
    let mut inputs = BTreeMap::new();
    for f in input_files(exp, stage) {
        let hash = hash_input(&f).map_err(|e| {
            anyhow::anyhow!(
                "{}: stage {name}: cannot read input {}: {e}",
                exp.file.display(),
                f.display()
            )
        })?;
        inputs.insert(f.display().to_string(), hash);
    }
    let mut config = serde_json::json!({
        "stage": serde_json::to_value(stage)?,
        "model": serde_json::to_value(&exp.spec.model)?,
    });
    // Whether the run stops after a flagged stage changes nothing the
    // stage makes: hashed as unset, switching it keeps the stage cached.
    if config["stage"]["fail_if_not_learning"] == true {
        config["stage"]["fail_if_not_learning"] = false.into();
    }
    // Paths inside the run folder are other stages' outputs, which the
    // upstream keys already identify: hashed relative to the run folder, a
    // copied or moved run folder stays cached.
    let run_dir = format!("{}/", exp.run_dir.display());
    let portable = |text: String| text.replace(&run_dir, "<run>/");
    let mut h = Sha256::new();
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(portable(config.to_string()).as_bytes());
    h.update(portable(serde_json::to_string(&inputs)?).as_bytes());
    h.update(serde_json::to_string(upstream_keys)?.as_bytes());
    Ok((format!("{:x}", h.finalize()), inputs, config))
}

/// An input file's sha256, remembered for this process while its size,
/// modification and change times stay the same: the runner keys every
/// stage before it starts (to size the side-by-side share) and again as
/// each starts, and a model folder's weights can be gigabytes.
fn hash_input(path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    type Stamp = (u64, i64, i64, i64, i64);
    static SEEN: std::sync::Mutex<BTreeMap<PathBuf, (Stamp, String)>> =
        std::sync::Mutex::new(BTreeMap::new());
    let m = std::fs::metadata(path)?;
    let stamp = (
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    );
    let seen = |s: &BTreeMap<PathBuf, (Stamp, String)>| {
        s.get(path)
            .filter(|(at, _)| *at == stamp)
            .map(|(_, h)| h.clone())
    };
    if let Some(h) = seen(&SEEN.lock().unwrap_or_else(|e| e.into_inner())) {
        return Ok(h);
    }
    let hash = sha256_file(path)?;
    SEEN.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(path.to_owned(), (stamp, hash.clone()));
    Ok(hash)
}
