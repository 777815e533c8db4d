//! JSON-lines input for the commands that take texts: a file, or `-` for
//! stdin; errors name the file and line.

use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::Context;
use serde_json::Value;

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
