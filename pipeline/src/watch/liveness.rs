//! Whether a process is at work in a run folder, without touching its
//! lock: the kernel lists held `flock`s in `/proc/locks`, and the holder
//! wrote its pid into `.lock`. Taking the lock to test it could make a
//! runner starting at that moment fail, so the page only looks.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::run_folder::lock::LOCK_FILE;

/// (a process holds the run's lock, the pid `.lock` names).
pub fn holder(run_dir: &Path) -> (bool, Option<u32>) {
    let path = run_dir.join(LOCK_FILE);
    let pid = rlhf_datasets::files::read_bounded(&path, 64, "the limit for a lock file")
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok());
    let Some(pid) = pid else {
        return (false, None);
    };
    let held = match (
        std::fs::metadata(&path),
        std::fs::read_to_string("/proc/locks"),
    ) {
        (Ok(meta), Ok(locks)) => flock_held(&locks, meta.ino(), pid),
        // No /proc/locks: the named process being alive is the best sign.
        _ => Path::new(&format!("/proc/{pid}")).exists(),
    };
    (held, Some(pid))
}

/// Whether `locks` (the text of `/proc/locks`) holds a FLOCK by `pid` on
/// inode `ino`. A line reads `1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF`.
fn flock_held(locks: &str, ino: u64, pid: u32) -> bool {
    locks.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(at) = fields.iter().position(|f| *f == "FLOCK") else {
            return false;
        };
        let holder = fields.get(at + 3).and_then(|p| p.parse::<u32>().ok());
        let inode = fields
            .get(at + 4)
            .and_then(|d| d.rsplit(':').next())
            .and_then(|i| i.parse::<u64>().ok());
        holder == Some(pid) && inode == Some(ino)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_seen_and_a_released_one_not() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(holder(d.path()), (false, None));
        let lock = crate::run_folder::lock::lock_run_folder(d.path()).unwrap();
        assert_eq!(holder(d.path()), (true, Some(std::process::id())));
        drop(lock);
        // The file still names this (live) process, but nobody holds it.
        assert_eq!(holder(d.path()), (false, Some(std::process::id())));
    }

    #[test]
    fn proc_locks_lines_are_matched_by_pid_and_inode() {
        let text = "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF\n\
                    2: POSIX  ADVISORY  WRITE 99 fd:01:42 0 EOF\n";
        assert!(flock_held(text, 5678, 1234));
        assert!(!flock_held(text, 5678, 1235));
        assert!(!flock_held(text, 42, 99));
    }
}
