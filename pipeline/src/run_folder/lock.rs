//! One process per run folder: `rlhf run`, a stand-alone `rlhf stage` and
//! `rlhf eval` hold an OS lock on `<run>/.lock` while they work, so a
//! second one cannot train into (or delete) what the first is writing. The
//! lock is the kernel's: a holder that is killed releases it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::Path;

use anyhow::Context;

pub const LOCK_FILE: &str = ".lock";

/// Held while it lives.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

/// Locks `run_dir` (made if missing), or fails naming the holder's pid.
pub fn lock_run_folder(run_dir: &Path) -> anyhow::Result<RunLock> {
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("creating the run folder {}", run_dir.display()))?;
    lock_file(&run_dir.join(LOCK_FILE), run_dir, "run folder")
}

/// Locks a stage folder outside any run folder (`rlhf stage --out X`)
/// through `.X.lock` beside it, so that the folder itself holds only the
/// stage's files; or fails naming the holder's pid.
pub fn lock_stage_folder(out_dir: &Path) -> anyhow::Result<RunLock> {
    let parent = out_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = out_dir.file_name().unwrap_or_default().to_string_lossy();
    lock_file(
        &parent.join(format!(".{name}.lock")),
        out_dir,
        "stage folder",
    )
}

/// Takes the OS lock on `path` for `dir` (a `what`).
fn lock_file(path: &Path, dir: &Path, what: &str) -> anyhow::Result<RunLock> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            // Who holds it, for the error another process will show.
            file.set_len(0)?;
            write!(file, "{}", std::process::id())?;
            file.flush()?;
            Ok(RunLock { _file: file })
        }
        Err(TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(path).unwrap_or_default();
            let holder = holder.trim();
            anyhow::bail!(
                "{}: another rlhf process (pid {}) is working in this {what}; wait for it to finish or stop it (Ctrl-C, or kill {})",
                dir.display(),
                if holder.is_empty() { "unknown" } else { holder },
                if holder.is_empty() { "it" } else { holder },
            )
        }
        Err(TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_fails_naming_the_holder_and_a_dropped_one_frees_the_folder() {
        let d = tempfile::tempdir().unwrap();
        let first = lock_run_folder(d.path()).unwrap();
        let e = lock_run_folder(d.path()).unwrap_err().to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(first);
        lock_run_folder(d.path()).unwrap();
    }

    #[test]
    fn a_stage_folder_outside_a_run_is_locked_beside_it() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("mine");
        let first = lock_stage_folder(&out).unwrap();
        let e = lock_stage_folder(&out).unwrap_err().to_string();
        assert!(
            e.contains("working in this stage folder")
                && e.contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        assert!(d.path().join(".mine.lock").exists());
        assert!(!out.exists(), "the lock leaves the folder itself alone");
        drop(first);
        lock_stage_folder(&out).unwrap();
    }
}
