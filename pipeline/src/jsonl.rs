//! JSON-lines input for the commands that take texts: a file, or `-` for
//! stdin; errors name the file and line.

use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::Context;
use serde_json::Value;

/// The lines of a log the program itself appends to (`metrics.jsonl`,
/// `rounds.jsonl`) that parse; none if the file is absent. A line cut short
/// by a crash is skipped rather than failing a report.
pub fn read_log_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Each non-blank line parsed, with its 1-based line number.
pub fn read_json_lines(path: &Path) -> anyhow::Result<Vec<(usize, Value)>> {
    let name = path.display().to_string();
    let reader: Box<dyn BufRead> = if name == "-" {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        Box::new(BufReader::new(
            std::fs::File::open(path).with_context(|| format!("cannot open {name}"))?,
        ))
    };
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let row = i + 1;
        let line = line.with_context(|| format!("{name}: line {row}: not valid UTF-8 text"))?;
        if line.trim().is_empty() {
            continue;
        }
        let v = serde_json::from_str(&line)
            .with_context(|| format!("{name}: line {row}: invalid JSON"))?;
        out.push((row, v));
    }
    Ok(out)
}
