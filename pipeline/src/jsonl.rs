//! JSON-lines input for the commands that take texts: a file, or `-` for
//! stdin; errors name the file and line.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use anyhow::Context;
use serde_json::Value;

/// Largest log read back: far above a long run's metrics.
const MAX_LOG_BYTES: u64 = 1 << 30;

/// The lines of a log the program itself appends to (`metrics.jsonl`,
/// `rounds.jsonl`) that parse; none if the file is absent. A line cut short
/// by a crash is skipped rather than failing a report. The file is read
/// bounded: a FIFO or a device put in its place is named and passed over,
/// never waited on or read without end.
pub fn read_log_lines(path: &Path) -> Vec<Value> {
    if path.symlink_metadata().is_err() {
        return vec![];
    }
    match rlhf_datasets::files::read_bounded(path, MAX_LOG_BYTES, "the limit for a log") {
        Ok(t) => t
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect(),
        Err(e) => {
            tracing::warn!("{}: {e}; passed over", path.display());
            vec![]
        }
    }
}

/// Each non-blank line parsed, with its 1-based line number. A named
/// file must be a regular file (a FIFO or a device is refused by name); a
/// line may hold at most `MAX_TEXT_BYTES`; a UTF-8 BOM is skipped.
pub fn read_json_lines(path: &Path) -> anyhow::Result<Vec<(usize, Value)>> {
    use rlhf_datasets::load::MAX_TEXT_BYTES;
    let name = path.display().to_string();
    let mut reader: Box<dyn BufRead> = if name == "-" {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        if let Some(kind) = rlhf_datasets::files::not_a_regular_file(path) {
            anyhow::bail!("{name} is {kind}, expected a JSON-lines file");
        }
        Box::new(BufReader::new(
            std::fs::File::open(path).with_context(|| format!("cannot open {name}"))?,
        ))
    };
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for row in 1.. {
        buf.clear();
        let limit = MAX_TEXT_BYTES as u64 + 1;
        let n = (&mut reader)
            .take(limit)
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("{name}: line {row}: cannot be read"))?;
        if n == 0 {
            break;
        }
        if n as u64 == limit && buf.last() != Some(&b'\n') {
            anyhow::bail!(
                "{name}: line {row}: longer than {} (the most a line may hold)",
                rlhf_datasets::files::human_bytes(MAX_TEXT_BYTES as u64)
            );
        }
        let line = std::str::from_utf8(&buf)
            .with_context(|| format!("{name}: line {row}: not valid UTF-8 text"))?;
        let line = if row == 1 {
            line.trim_start_matches('\u{feff}')
        } else {
            line
        };
        if line.trim().is_empty() {
            continue;
        }
        let v = serde_json::from_str(line)
            .with_context(|| format!("{name}: line {row}: invalid JSON"))?;
        out.push((row, v));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FIFO or a device where a log should be is passed over at once.
    #[test]
    fn a_log_that_is_not_a_regular_file_is_passed_over() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("metrics.jsonl");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        assert!(read_log_lines(&fifo).is_empty());
        let zero = d.path().join("rounds.jsonl");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert!(read_log_lines(&zero).is_empty());
        let ok = d.path().join("ok.jsonl");
        std::fs::write(&ok, "{\"step\": 1}\n{\"step\": 2, \"loss\"").unwrap();
        assert_eq!(read_log_lines(&ok).len(), 1);
    }
}
