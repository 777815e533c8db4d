//! Stage folders' manifests: what a stage read (content hashes), with what
//! settings, and how it ended. A stage whose key (settings + input hashes +
//! upstream keys) matches a complete manifest is not rerun.

use std::collections::BTreeMap;
use std::path::Path;

use rlhf_datasets::atomic;
use serde::{Deserialize, Serialize};

pub const MANIFEST_FILE: &str = "manifest.json";
/// The key a stage folder was started with, so a changed stage is redone
/// from scratch while an interrupted one resumes.
pub const KEY_FILE: &str = ".key";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub stage: String,
    pub kind: String,
    pub key: String,
    /// Input files and their sha256.
    pub inputs: BTreeMap<String, String>,
    /// Upstream stages and their keys.
    pub upstream: BTreeMap<String, String>,
    pub config: serde_json::Value,
    pub status: Status,
    pub seconds: f64,
    pub summary: serde_json::Value,
    /// Set when the finished stage was copied from another run folder
    /// (relative to this run's folder) rather than run here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copied_from: Option<String>,
    /// When the runner started and ended the stage, seconds since the Unix
    /// epoch: which stages ran side by side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<f64>,
}

/// Now, in seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// How a stage's last run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Complete,
    Failed,
    /// Stopped by Ctrl-C or SIGTERM after a checkpoint: a rerun resumes.
    Interrupted,
}

pub use rlhf_datasets::checksum::sha256_file;

/// The key a stage folder was started with, if it holds a readable one (a
/// FIFO or a device in its place is not waited on).
pub fn started_key(dir: &Path) -> Option<String> {
    rlhf_datasets::files::read_bounded(&dir.join(KEY_FILE), 4096, "the limit for a key").ok()
}

/// Largest manifest read: settings, input hashes and a summary.
const MAX_MANIFEST: u64 = 16 << 20;

/// A folder's manifest; none when it is missing, not a regular file (a
/// FIFO or a device put there is passed over, not waited on), too large
/// or not a manifest.
pub fn read_manifest(dir: &Path) -> Option<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let text = rlhf_datasets::files::read_bounded(&path, MAX_MANIFEST, "the limit for a manifest");
    match text {
        Ok(text) => serde_json::from_str(&text).ok(),
        Err(e) => {
            if path.symlink_metadata().is_ok() {
                tracing::warn!("{}: {e}; passed over", path.display());
            }
            None
        }
    }
}

/// What only rlhf writes in a stage folder: a folder holding neither is
/// someone else's, and is never cleared.
const STAGE_MARKS: [&str; 2] = [KEY_FILE, MANIFEST_FILE];

/// Refuses a folder that is in the way of stage `label` and was not made
/// by rlhf (not empty, with neither `.key` nor a manifest): a user's own
/// folder that happens to bear the stage's name.
pub fn refuse_foreign_folder(dir: &Path, label: &str) -> anyhow::Result<()> {
    let meta = match dir.symlink_metadata() {
        Ok(m) => m,
        Err(_) => return Ok(()),
    };
    anyhow::ensure!(
        meta.is_dir(),
        "{}: stage {label} writes here, but this is not a folder; move it or rename the stage",
        dir.display()
    );
    let ours = STAGE_MARKS
        .iter()
        .any(|m| dir.join(m).symlink_metadata().is_ok());
    let empty = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?
        .next()
        .is_none();
    anyhow::ensure!(
        ours || empty,
        "{}: stage {label} writes here, but this folder was not made by rlhf (no {KEY_FILE} or {MANIFEST_FILE}) and is not empty; it is left alone: move it, or rename the stage or the run (`name`, `out_dir`)",
        dir.display()
    );
    Ok(())
}

pub fn write_manifest(dir: &Path, m: &Manifest) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(m)?;
    atomic::write_file(&dir.join(MANIFEST_FILE), text.as_bytes())?;
    Ok(())
}

/// Complete, with this key, and its checkpoint still there and intact.
pub fn is_cached(dir: &Path, key: &str) -> bool {
    looks_cached(dir, key) && checkpoint_intact(&dir.join(rlhf_stages::train::FINAL_DIR))
}

/// Complete, with this key, and its `checkpoint/` (a model, or a round's
/// rankings) still there; its checksums unread (a damaged one is found
/// when the stage is reached).
pub fn looks_cached(dir: &Path, key: &str) -> bool {
    read_manifest(dir).is_some_and(|m| m.status == Status::Complete && m.key == key)
        && dir.join(rlhf_stages::train::FINAL_DIR).is_dir()
}

/// Whether a finished checkpoint still matches its checksums (and its
/// adapter's, when it has one); a damaged one, or one without its list
/// (rlhf always writes one), is named, and the stage is then run again
/// rather than trusted.
fn checkpoint_intact(dir: &Path) -> bool {
    let adapter = dir.join("adapter");
    let lists = std::iter::once(dir).chain(adapter.is_dir().then_some(adapter.as_path()));
    for d in lists {
        match rlhf_datasets::checksum::verify(d) {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    "{}: no {}, so nothing says it is whole; the stage will run again",
                    d.display(),
                    rlhf_datasets::checksum::CHECKSUM_FILE
                );
                return false;
            }
            Err(e) => {
                tracing::warn!("{e}; the stage will run again");
                return false;
            }
        }
    }
    true
}
