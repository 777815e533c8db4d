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

/// The text of a regular file of at most `limit` bytes, else a message
/// that says what is wrong. Opened without blocking, so a FIFO put where a
/// file was expected is named instead of waited on; the type is checked on
/// the opened file, so a swap after the check cannot slip a device in.
pub fn read_bounded(path: &Path, limit: u64, what: &str) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    const O_NONBLOCK: i32 = 0o4000;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(path)
        .map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        let kind = not_a_regular_file(path).unwrap_or("not a regular file");
        return Err(format!("is {kind}, expected a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > limit {
        return Err(format!("is larger than {} ({what})", human_bytes(limit)));
    }
    String::from_utf8(bytes).map_err(|e| format!("is not UTF-8 text: {e}"))
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

    #[test]
    fn a_bounded_read_names_fifos_devices_and_big_files_without_waiting() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let e = read_bounded(&fifo, 100, "x").unwrap_err();
        assert_eq!(e, "is a FIFO (named pipe), expected a regular file");
        let link = d.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert_eq!(
            read_bounded(&link, 100, "x").unwrap_err(),
            "is a device, expected a regular file"
        );
        let f = d.path().join("f");
        std::fs::write(&f, "hello").unwrap();
        assert_eq!(read_bounded(&f, 5, "x").unwrap(), "hello");
        assert!(read_bounded(&f, 4, "the cap")
            .unwrap_err()
            .contains("the cap"));
    }
}
