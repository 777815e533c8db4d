//! Files and folders that are never half-written: write beside the target
//! under a temporary name, fsync, then rename over it.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}")]
pub struct AtomicWriteError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn err(path: &Path) -> impl FnOnce(std::io::Error) -> AtomicWriteError + '_ {
    move |source| AtomicWriteError {
        path: path.to_owned(),
        source,
    }
}

/// A sibling path: `.{name}.{tag}-{pid}`, hidden and unique to this process.
fn sibling(target: &Path, tag: &str) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    target.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` atomically.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), AtomicWriteError> {
    fs::create_dir_all(parent_of(path)).map_err(err(path))?;
    let tmp = sibling(path, "tmp");
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(parent_of(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err(path))
}

/// Writes a whole folder atomically: `fill` writes into an empty temporary
/// folder, every file in it is fsynced, then it replaces `dir`.
///
/// Readers see the old folder or the new one, never a mix. If the process
/// dies between the two renames, [`recover_dir`] restores the old folder.
pub fn write_dir<E>(dir: &Path, fill: impl FnOnce(&Path) -> Result<(), E>) -> Result<(), E>
where
    E: From<AtomicWriteError>,
{
    fs::create_dir_all(parent_of(dir)).map_err(err(dir))?;
    if dir.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
        // Never swap a file (or a link) out for a folder.
        let e = std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "exists and is not a folder",
        );
        return Err(err(dir)(e).into());
    }
    let tmp = sibling(dir, "tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(err(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(err(&tmp))?;
    if let Err(e) = fill(&tmp) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let swap = || -> std::io::Result<()> {
        for entry in fs::read_dir(&tmp)? {
            let path = entry?.path();
            if path.is_file() {
                fs::File::open(&path)?.sync_all()?;
            }
        }
        sync_dir(&tmp)?;
        let old = sibling(dir, "old");
        if dir.exists() {
            if old.exists() {
                fs::remove_dir_all(&old)?;
            }
            fs::rename(dir, &old)?;
        }
        fs::rename(&tmp, dir)?;
        sync_dir(parent_of(dir))?;
        if old.exists() {
            fs::remove_dir_all(&old)?;
        }
        Ok(())
    };
    swap().map_err(|e| err(dir)(e).into())
}

/// Removes the temporary files and folders that a killed writer left in
/// `dir` (`.{name}.tmp-{pid}` of a process that is gone); returns how many.
pub fn clean_stale(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix('.')
            .and_then(|n| n.rsplit_once(".tmp-"))
            .and_then(|(_, pid)| pid.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue; // its writer is still at work
        }
        let path = entry.path();
        let gone = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed += usize::from(gone.is_ok());
    }
    removed
}

/// Puts back a folder that a crash left renamed aside by [`write_dir`]
/// (only the `.old` copy exists). Returns true if it restored one.
pub fn recover_dir(dir: &Path) -> Result<bool, AtomicWriteError> {
    if dir.exists() {
        return Ok(false);
    }
    let Some(name) = dir.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Ok(false);
    };
    let prefix = format!(".{name}.old-");
    let parent = parent_of(dir);
    let Ok(entries) = fs::read_dir(parent) else {
        return Ok(false);
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            fs::rename(entry.path(), dir).map_err(err(dir))?;
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_file_replaces_whole_content() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/a.json");
        write_file(&p, b"first").unwrap();
        write_file(&p, b"second").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second");
        let names: Vec<_> = fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary files left");
    }

    #[test]
    fn failed_fill_leaves_old_folder_untouched() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("ckpt");
        write_dir::<AtomicWriteError>(&dir, |tmp| write_file(&tmp.join("w"), b"v1")).unwrap();
        // A dead writer's leftovers go; a live one's (this process) stay.
        let parent = dir.parent().unwrap();
        std::fs::create_dir(parent.join(".step-1.tmp-4294967294")).unwrap();
        std::fs::write(parent.join(".f.json.tmp-4294967294"), "x").unwrap();
        let live = parent.join(format!(".g.tmp-{}", std::process::id()));
        std::fs::write(&live, "x").unwrap();
        assert_eq!(clean_stale(parent), 2);
        assert!(live.exists() && dir.join("w").exists());
        std::fs::remove_file(&live).unwrap();
        let r: Result<(), AtomicWriteError> = write_dir(&dir, |tmp| {
            write_file(&tmp.join("w"), b"v2")?;
            Err(AtomicWriteError {
                path: tmp.to_owned(),
                source: std::io::Error::other("disk full"),
            })
        });
        assert!(r.is_err());
        assert_eq!(fs::read(dir.join("w")).unwrap(), b"v1");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn recover_dir_restores_renamed_folder() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("ckpt");
        let old = sibling(&dir, "old");
        fs::create_dir(&old).unwrap();
        fs::write(old.join("w"), b"v1").unwrap();
        assert!(recover_dir(&dir).unwrap());
        assert_eq!(fs::read(dir.join("w")).unwrap(), b"v1");
    }
}
