//! JSON-lines input for the commands that take texts: a file, or `-` for
//! stdin; errors name the file and line.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use anyhow::Context;
use serde_json::Value;

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
