//! sha256 checksums of a folder's files, kept in `checksums.sha256` in the
//! format `sha256sum -c` reads. Written with every checkpoint and checked
//! when it is loaded, so a truncated or altered file is named and refused
//! instead of loaded.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::atomic::{self, AtomicWriteError};

pub const CHECKSUM_FILE: &str = "checksums.sha256";

#[derive(Debug, thiserror::Error)]
pub enum ChecksumError {
    #[error("{path}: cannot read ({source})")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: corrupt: its sha256 is {found} but {CHECKSUM_FILE} recorded {expected} when it was written (truncated or changed on disk; if you edited it on purpose, delete {CHECKSUM_FILE})")]
    Mismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{path}: missing, though {CHECKSUM_FILE} lists it")]
    Missing { path: PathBuf },
    #[error("{path}: {CHECKSUM_FILE} lists it, but it {what}; a checked file must be a regular file inside the folder")]
    Outside { path: PathBuf, what: String },
    #[error("{path}: line {line}: expected `<64 hex digits>  <file name>`")]
    BadList { path: PathBuf, line: usize },
    #[error(transparent)]
    Write(#[from] AtomicWriteError),
}

/// sha256 of a file's bytes, streamed, as lowercase hex. A FIFO or a
/// device (which would block or never end) is refused.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    if let Some(kind) = crate::files::not_a_regular_file(path) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is {kind}, expected a regular file", path.display()),
        ));
    }
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Writes `dir/checksums.sha256` for every regular file in `dir`.
pub fn write(dir: &Path) -> Result<(), ChecksumError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ChecksumError::Io { path, source }
    };
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != CHECKSUM_FILE)
        .collect();
    names.sort();
    let mut list = String::new();
    for name in names {
        let path = dir.join(&name);
        let hash = sha256_file(&path).map_err(io(&path))?;
        list.push_str(&format!("{hash}  {name}\n"));
    }
    atomic::write_file(&dir.join(CHECKSUM_FILE), list.as_bytes())?;
    Ok(())
}

/// The (hash, file name) pairs `dir/checksums.sha256` lists, checked for
/// form; `None` when there is no list.
pub fn listed(dir: &Path) -> Result<Option<Vec<(String, String)>>, ChecksumError> {
    let list_path = dir.join(CHECKSUM_FILE);
    // A list names a few files: a large one (or a device) is damage.
    if list_path.exists() {
        crate::files::bounded_size(&list_path, 1 << 20, "a checksum list's limit").map_err(
            |message| ChecksumError::Io {
                path: list_path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, message),
            },
        )?;
    }
    let text = match fs::read_to_string(&list_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ChecksumError::Io {
                path: list_path,
                source,
            })
        }
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let bad = || ChecksumError::BadList {
            path: list_path.clone(),
            line: i + 1,
        };
        let (hash, name) = line.split_once("  ").ok_or_else(bad)?;
        if hash.len() != 64
            || !hash.bytes().all(|b| b.is_ascii_hexdigit())
            || name.is_empty()
            || name.contains('/')
            || name == "."
            || name == ".."
        {
            return Err(bad());
        }
        out.push((hash.to_owned(), name.to_owned()));
    }
    Ok(Some(out))
}

/// Checks every file `dir/checksums.sha256` lists. Returns whether there
/// was a list (folders from elsewhere, such as HF downloads, have none).
pub fn verify(dir: &Path) -> Result<bool, ChecksumError> {
    let Some(list) = listed(dir)? else {
        return Ok(false);
    };
    for (hash, name) in &list {
        let hash = hash.as_str();
        let path = dir.join(name);
        if let Some(what) = leaves_folder(dir, &path) {
            return Err(ChecksumError::Outside { path, what });
        }
        let found = match sha256_file(&path) {
            Ok(h) => h,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ChecksumError::Missing { path })
            }
            Err(source) => return Err(ChecksumError::Io { path, source }),
        };
        if found != hash {
            return Err(ChecksumError::Mismatch {
                path,
                expected: hash.to_owned(),
                found,
            });
        }
    }
    Ok(true)
}

/// Why a listed file may not be read: a link out of the folder (the list
/// must not make us hash, and so read, files elsewhere) or not a regular
/// file (a FIFO blocks, a device never ends). `None` when it is fine or
/// missing (reported as missing by the caller).
fn leaves_folder(dir: &Path, path: &Path) -> Option<String> {
    let (Ok(real), Ok(home)) = (fs::canonicalize(path), fs::canonicalize(dir)) else {
        return None;
    };
    if !real.starts_with(&home) {
        return Some(format!("links outside the folder (to {})", real.display()));
    }
    crate::files::not_a_regular_file(path).map(|kind| format!("is {kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_links_out_of_the_folder_and_devices_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), b"x").unwrap();
        let hash = "0".repeat(64);
        for (name, target) in [
            ("a.bin", outside.path().join("secret")),
            ("b.bin", PathBuf::from("/dev/zero")),
        ] {
            let sub = d.path().join(name.replace('.', "_"));
            fs::create_dir(&sub).unwrap();
            std::os::unix::fs::symlink(&target, sub.join(name)).unwrap();
            fs::write(sub.join(CHECKSUM_FILE), format!("{hash}  {name}\n")).unwrap();
            let m = verify(&sub).unwrap_err().to_string();
            assert!(
                m.contains("a checked file must be a regular file inside the folder"),
                "{m}"
            );
        }
        let m = verify(&d.path().join("a_bin")).unwrap_err().to_string();
        assert!(m.contains("links outside the folder"), "{m}");
        let m = verify(&d.path().join("b_bin")).unwrap_err().to_string();
        assert!(m.contains("links outside the folder (to /dev/zero)"), "{m}");
    }

    #[test]
    fn a_written_folder_verifies_and_any_change_is_named() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("a.bin"), b"hello").unwrap();
        fs::write(d.path().join("b.json"), b"{}").unwrap();
        assert!(!verify(d.path()).unwrap(), "no list yet");
        write(d.path()).unwrap();
        let list = fs::read_to_string(d.path().join(CHECKSUM_FILE)).unwrap();
        // sha256("hello"), as sha256sum prints it.
        assert!(list.starts_with(
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824  a.bin\n"
        ));
        assert!(verify(d.path()).unwrap());

        // Truncated.
        fs::write(d.path().join("a.bin"), b"hel").unwrap();
        let e = verify(d.path()).unwrap_err().to_string();
        assert!(e.contains("a.bin") && e.contains("corrupt"), "{e}");
        fs::write(d.path().join("a.bin"), b"hello").unwrap();
        // Deleted.
        fs::remove_file(d.path().join("b.json")).unwrap();
        let e = verify(d.path()).unwrap_err().to_string();
        assert!(e.contains("b.json") && e.contains("missing"), "{e}");
        // A mangled list.
        fs::write(d.path().join(CHECKSUM_FILE), "nonsense\n").unwrap();
        let e = verify(d.path()).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }
}
