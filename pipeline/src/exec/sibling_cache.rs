//! Finished stages shared between experiments: a stage whose key (its
//! settings, input files and upstream stages' keys) matches a finished,
//! intact stage in another run folder beside this one (the same
//! `out_dir`) would compute the same thing, so it is copied in instead of
//! run again. Two experiment files that share an SFT stage train it once.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::experiment::Experiment;
use crate::run_folder::manifest::{is_cached, looks_cached, read_manifest, write_manifest};
use crate::run_folder::{sorted_dirs, stage_dirs};

/// A stage folder of another run under `exp`'s `out_dir` holding a
/// finished, intact stage with `key`.
pub fn find(exp: &Experiment, key: &str) -> Option<PathBuf> {
    search(exp, key, is_cached)
}

/// Whether another run seems to hold a finished stage with `key`, its
/// checksums unread: enough to plan with.
pub fn seems_done(exp: &Experiment, key: &str) -> bool {
    search(exp, key, looks_cached).is_some()
}

/// The first stage folder of another run for which `done(folder, key)`.
fn search(exp: &Experiment, key: &str, done: fn(&Path, &str) -> bool) -> Option<PathBuf> {
    let out_dir = exp.run_dir.parent()?;
    let runs = sorted_dirs(out_dir);
    runs.into_iter()
        .filter(|run| run != &exp.run_dir)
        .flat_map(|run| stage_dirs(&run))
        .find(|dir| done(dir, key))
}

/// Copies the stage folder `from` to `to` (absent, inside `exp`'s run
/// folder) through a temporary folder renamed at the end, so that a copy
/// cut short leaves nothing that looks finished; then names the copy
/// `label` and where it came from in its manifest.
pub fn copy_in(
    exp: &Experiment,
    from: &Path,
    to: &Path,
    label: &str,
    key: &str,
) -> anyhow::Result<()> {
    exp.check_inside(to)?;
    let tmp = to.with_file_name(format!(
        ".{}.copying",
        to.file_name().unwrap_or_default().to_string_lossy()
    ));
    exp.check_inside(&tmp)?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("clearing {}", tmp.display()))?;
    }
    let copied = copy_checked(exp, from, &tmp, label, key);
    let bytes = match copied {
        Ok(bytes) => bytes,
        Err(e) => {
            // Nothing half-copied stays behind; `to` was not touched.
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if to.exists() {
        std::fs::remove_dir_all(to).with_context(|| format!("clearing {}", to.display()))?;
    }
    std::fs::rename(&tmp, to)
        .with_context(|| format!("renaming {} to {}", tmp.display(), to.display()))?;
    tracing::info!(
        "[{label}] copied from {} ({:.1} MB): the same settings, inputs and upstream stages finished there",
        from.display(),
        bytes as f64 / 1e6
    );
    Ok(())
}

/// Copies `from` into `tmp`, names the copy `label` and its source in its
/// manifest, and checks it against its checksums. Returns the bytes.
fn copy_checked(
    exp: &Experiment,
    from: &Path,
    tmp: &Path,
    label: &str,
    key: &str,
) -> anyhow::Result<u64> {
    let bytes = copy_stage(from, tmp)?;
    let mut manifest = read_manifest(tmp).context("the copied manifest.json is unreadable")?;
    manifest.stage = label.to_owned();
    manifest.copied_from = Some(
        crate::run_folder::relative_to(from, &exp.run_dir)
            .display()
            .to_string(),
    );
    write_manifest(tmp, &manifest)?;
    if !is_cached(tmp, key) {
        bail!(
            "the copy of {} does not check out against its checksums",
            from.display()
        );
    }
    Ok(bytes)
}

/// The files of a finished stage folder that are copied besides its
/// checkpoint, when they are there: the record of the run, its samples.
const STAGE_FILES: [&str; 6] = [
    crate::run_folder::MANIFEST_FILE,
    crate::run_folder::SUMMARY_FILE,
    crate::run_folder::METRICS_FILE,
    "samples.jsonl",
    "samples_before.jsonl",
    "reference_logps.json",
];

/// Copies what a finished stage is: the files above and the checkpoint's
/// files its checksum lists name (the adapter's too), nothing else, so a
/// stray file in another run's folder is never copied. A checkpoint
/// without its list is refused. Returns the bytes copied.
fn copy_stage(from: &Path, to: &Path) -> anyhow::Result<u64> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    let mut bytes = 0;
    for name in STAGE_FILES {
        if from.join(name).symlink_metadata().is_ok() {
            bytes += copy_file(&from.join(name), &to.join(name))?;
        }
    }
    // Its TensorBoard events (what metrics.jsonl holds), regular files only.
    for events in rlhf_stages::train::tensorboard::event_files(from) {
        if let (Some(name), true) = (
            events.file_name(),
            events.symlink_metadata().is_ok_and(|m| m.is_file()),
        ) {
            bytes += copy_file(&events, &to.join(name))?;
        }
    }
    let checkpoint = Path::new(rlhf_stages::train::FINAL_DIR);
    bytes += copy_listed(&from.join(checkpoint), &to.join(checkpoint))?;
    let adapter = checkpoint.join("adapter");
    if from.join(&adapter).is_dir() {
        bytes += copy_listed(&from.join(&adapter), &to.join(&adapter))?;
    }
    Ok(bytes)
}

/// Copies the checksum list of `from` and the files it names.
fn copy_listed(from: &Path, to: &Path) -> anyhow::Result<u64> {
    let list = rlhf_datasets::checksum::CHECKSUM_FILE;
    let names = rlhf_datasets::checksum::listed(from)?.with_context(|| {
        format!(
            "{}: no {list}, so nothing says what it holds",
            from.display()
        )
    })?;
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    let mut bytes = copy_file(&from.join(list), &to.join(list))?;
    for (_, name) in names {
        bytes += copy_file(&from.join(&name), &to.join(&name))?;
    }
    Ok(bytes)
}

/// Copies a regular file; refuses links and anything else.
fn copy_file(src: &Path, dst: &Path) -> anyhow::Result<u64> {
    let kind = src
        .symlink_metadata()
        .with_context(|| format!("reading {}", src.display()))?
        .file_type();
    if !kind.is_file() {
        bail!("{}: not a regular file; not copied", src.display());
    }
    std::fs::copy(src, dst)
        .with_context(|| format!("copying {} to {}", src.display(), dst.display()))
}
