//! Paths as the experiment resolves them: absolute against the file's
//! folder, cleaned; a stage's path settings placed (`Places`): other
//! stages' checkpoints or files.

use super::*;

/// `p` made absolute against `base` (the experiment file's folder), cleaned.
pub(super) fn absolute_from(base: &Path, p: &Path) -> PathBuf {
    clean_path(&if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    })
}

/// `a/b/../c` -> `a/c`, without touching the file system (the folder may
/// not exist yet), so messages and manifests show plain paths.
pub(super) fn clean_path(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    if out.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        out
    }
}

/// What a stage's path settings resolve against.
pub(super) struct Places<'a> {
    pub(super) stage: &'a str,
    pub(super) stages: &'a [String],
    pub(super) run_dir: &'a Path,
    /// The experiment file's folder: relative paths start there.
    pub(super) base: &'a Path,
}

impl Places<'_> {
    fn abs(&self, p: &Path) -> PathBuf {
        absolute_from(self.base, p)
    }

    /// Makes a stage's data paths absolute and its model references
    /// checkpoint folders; returns the stages it reads from.
    pub(super) fn resolve(&self, stage: &mut dyn StageConfig) -> Result<BTreeSet<String>, String> {
        let mut refs = BTreeSet::new();
        for mut p in stage.paths() {
            refs.extend(self.place(&mut p)?);
        }
        Ok(refs)
    }

    /// Like `resolve`, for a copy of `original` with some settings changed
    /// (a loop round's `set`): only the paths that differ are placed, the
    /// others are `original`'s, placed already.
    pub(super) fn resolve_changed(
        &self,
        stage: &mut dyn StageConfig,
        original: &dyn StageConfig,
    ) -> Result<(), String> {
        let mut original = original.clone_box();
        let before: Vec<Option<PathBuf>> =
            original.paths().iter().map(|p| p.get().cloned()).collect();
        for (mut p, old) in stage.paths().into_iter().zip(before) {
            if p.get() != old.as_ref() {
                self.place(&mut p)?;
            }
        }
        Ok(())
    }

    /// One path setting placed; the stage it names, if it names one.
    fn place(&self, p: &mut rlhf_stages::kind::PathSetting) -> Result<Option<String>, String> {
        let name = self.stage;
        let field = p.field;
        let Some(value) = p.get().cloned() else {
            if p.is_required() {
                return Err(format!(
                    "stages.{name}: missing field `{field}` ({})",
                    p.about
                ));
            }
            return Ok(None);
        };
        if p.role == PathRole::Data {
            let file = self.abs(&value);
            if let Some(kind) = rlhf_datasets::files::not_a_regular_file(&file) {
                return Err(format!(
                    "stages.{name}.{field}: {} is {kind}, not a regular file",
                    file.display()
                ));
            }
            p.set(file);
            return Ok(None);
        }
        // A model reference: another stage's name (its final checkpoint,
        // and a dependency) or a model folder on disk.
        let s = value.to_string_lossy().into_owned();
        if !self.stages.contains(&s) {
            let folder = self.abs(&value);
            if !folder.is_dir() {
                return Err(format!(
                    "stages.{name}.{field}: \"{s}\" is neither a stage of this file ({}) nor an existing model folder",
                    self.stages.join(", ")
                ));
            }
            p.set(folder);
            return Ok(None);
        }
        if s == name {
            return Err(format!(
                "stages.{name}.{field}: a stage cannot start from itself"
            ));
        }
        p.set(stage_checkpoint(self.run_dir, &s));
        Ok(Some(s))
    }
}

/// Where stage `name` of the run in `run_dir` leaves its final checkpoint.
pub(super) fn stage_checkpoint(run_dir: &Path, name: &str) -> PathBuf {
    run_dir
        .join(crate::experiment::sweep::folder_of(name))
        .join(rlhf_stages::train::FINAL_DIR)
}
