//! Opening a file a user named, bounded: it must be a regular file (a FIFO
//! would block the reader, a device never ends) no larger than a limit, so
//! a hostile path fails with its name instead of hanging or exhausting
//! memory.

use std::path::Path;

/// What `path` is when it exists and is not a regular file; `None` for a
/// regular file (symlinks followed) or nothing at all.
pub fn not_a_regular_file(path: &Path) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let t = std::fs::metadata(path).ok()?.file_type();
    let kinds = [
        (t.is_dir(), "a folder"),
        (t.is_fifo(), "a FIFO (named pipe)"),
        (t.is_char_device() || t.is_block_device(), "a device"),
        (t.is_socket(), "a socket"),
    ];
    match t.is_file() {
        true => None,
        false => Some(kinds.iter().find(|k| k.0).map_or("not a file", |k| k.1)),
    }
}

/// The size of a regular file of at most `limit` bytes, else a message
/// that says what is wrong (`what` names the limit, e.g. "this machine's
/// memory").
pub fn bounded_size(path: &Path, limit: u64, what: &str) -> Result<u64, String> {
    if let Some(kind) = not_a_regular_file(path) {
        return Err(format!("is {kind}, expected a regular file"));
    }
    let size = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if size > limit {
        return Err(format!(
            "is {}, larger than {} ({what})",
            human_bytes(size),
            human_bytes(limit)
        ));
    }
    Ok(size)
}

/// This machine's memory in bytes (`/proc/meminfo`), if it can be read.
pub fn memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// `1.5 GB`, `12 MB`, `900 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [(&str, f64); 3] = [("GB", 1e9), ("MB", 1e6), ("kB", 1e3)];
    let x = n as f64;
    match UNITS.iter().find(|(_, size)| x >= *size) {
        Some((unit, size)) => format!("{:.1} {unit}", x / size),
        None => format!("{n} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_folders_and_big_files_are_named() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(not_a_regular_file(d.path()), Some("a folder"));
        assert_eq!(not_a_regular_file(Path::new("/dev/zero")), Some("a device"));
        assert_eq!(not_a_regular_file(&d.path().join("none")), None);
        let f = d.path().join("f");
        std::fs::write(&f, [0u8; 5000]).unwrap();
        assert_eq!(bounded_size(&f, 5000, "the cap"), Ok(5000));
        assert_eq!(
            bounded_size(&f, 2000, "the cap"),
            Err("is 5.0 kB, larger than 2.0 kB (the cap)".into())
        );
        let m = bounded_size(Path::new("/dev/zero"), u64::MAX, "x").unwrap_err();
        assert_eq!(m, "is a device, expected a regular file");
    }
}
