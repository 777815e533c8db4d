//! An append-only JSON-lines file: each record is one line added at the
//! end, so a write costs the line, not the file. A torn last line (a crash
//! while it was written, before it was acknowledged) is cut off when the
//! file is opened, so the next line starts clean. A labelling queue keeps
//! its submissions in one; an RL stage its reward programs' scores.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why a log could not be read or added to.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct AppendLogError {
    pub path: PathBuf,
    pub message: String,
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> AppendLogError {
    AppendLogError {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Largest line read back: a label holds a prompt, K answers and two
/// 4 KiB notes, a score a prompt and an answer; 64 MiB is far above that
/// and keeps a damaged file bounded.
const MAX_LINE: usize = 64 << 20;

#[derive(Debug)]
pub struct AppendLog {
    path: PathBuf,
    file: File,
    /// Bytes known to be whole lines; a failed append is cut back to it.
    len: u64,
}

impl AppendLog {
    /// Opens `path` (made if missing) and reads its records; a torn last
    /// line is dropped from the file too.
    pub fn open<T: serde::de::DeserializeOwned>(
        path: &Path,
    ) -> Result<(Self, Vec<T>), AppendLogError> {
        let err = |e: std::io::Error| file_err(path, e);
        if let Some(kind) = crate::files::not_a_regular_file(path) {
            return Err(file_err(
                path,
                format!("is {kind}, expected a regular file"),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(err)?;
        let bytes = std::fs::read(path).map_err(err)?;
        let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let text = std::str::from_utf8(&bytes[..whole])
            .map_err(|e| file_err(path, format!("not UTF-8: {e}")))?;
        let mut records = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            if line.len() > MAX_LINE {
                return Err(file_err(path, format!("line {} is over 64 MiB", i + 1)));
            }
            let record = serde_json::from_str(line)
                .map_err(|e| file_err(path, format!("line {}: {e}", i + 1)))?;
            records.push(record);
        }
        if whole < bytes.len() {
            file.set_len(whole as u64).map_err(err)?;
        }
        let log = Self {
            path: path.to_owned(),
            file,
            len: whole as u64,
        };
        Ok((log, records))
    }

    /// Appends one line per record; with `durable`, on disk (fsync) before
    /// it returns. On failure the file is cut back: nothing half-written.
    pub fn append<T: serde::Serialize>(
        &mut self,
        records: &[T],
        durable: bool,
    ) -> Result<(), AppendLogError> {
        let mut text = String::new();
        for r in records {
            text.push_str(&serde_json::to_string(r).expect("records serialise"));
            text.push('\n');
        }
        let written = self.file.write_all(text.as_bytes()).and_then(|()| {
            if durable {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        match written {
            Ok(()) => {
                self.len += text.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.len);
                Err(file_err(&self.path, e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_cut_off_and_the_next_append_starts_clean() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("x.jsonl");
        std::fs::write(&path, "{\"a\":1}\n{\"a\":").unwrap();
        let (mut log, rows) = AppendLog::open::<serde_json::Value>(&path).unwrap();
        assert_eq!(rows.len(), 1);
        log.append(&[serde_json::json!({"a": 2})], true).unwrap();
        drop(log);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"a\":2}\n"
        );
        std::fs::write(&path, "{\"a\":1}\nnot json\n{\"a\":3}\n").unwrap();
        let e = AppendLog::open::<serde_json::Value>(&path).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }
}
