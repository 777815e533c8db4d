//! Files the page follows as they grow: a stage's `metrics.jsonl` from the
//! byte the page has read up to, and the newest rollouts of an RL stage.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::Serialize;

/// Most bytes of metrics one request returns; the page asks again.
const CHUNK: u64 = 1 << 20;

#[derive(Debug, Serialize)]
pub struct MetricsChunk {
    /// Where the next request starts.
    pub offset: u64,
    /// The file is shorter than the page had read (a resumed stage cut
    /// its later lines, or the stage started over): rows are from 0.
    pub reset: bool,
    pub rows: Vec<serde_json::Value>,
    /// More whole lines wait past `offset`.
    pub more: bool,
}

/// The whole lines of `path` from byte `from` on (at most [`CHUNK`]
/// bytes); a line still being written waits for the next request.
pub fn metrics_from(path: &Path, from: u64) -> std::io::Result<MetricsChunk> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(MetricsChunk {
                offset: 0,
                reset: from > 0,
                rows: Vec::new(),
                more: false,
            })
        }
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let reset = from > len;
    let start = if reset { 0 } else { from };
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.take(CHUNK).read_to_end(&mut bytes)?;
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let rows = String::from_utf8_lossy(&bytes[..whole])
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let offset = start + whole as u64;
    Ok(MetricsChunk {
        offset,
        reset,
        rows,
        more: offset + 1 < len && whole > 0,
    })
}

/// An answer of a rollouts file as the page shows it.
#[derive(Debug, Serialize)]
pub struct ShownAnswer {
    pub prompt: String,
    pub answer: String,
    pub score: f64,
}

/// The first `n` answers of a rollouts file.
pub fn rollouts(path: &Path, n: usize) -> Result<Vec<ShownAnswer>, rlhf_datasets::load::DataError> {
    Ok(rlhf_datasets::rollout::read_scored(path)?
        .into_iter()
        .take(n)
        .map(|(prompt, answer, score)| ShownAnswer {
            prompt,
            answer,
            score,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_lines_are_followed_and_a_shorter_file_starts_over() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("metrics.jsonl");
        let chunk = metrics_from(&path, 0).unwrap();
        assert!(chunk.rows.is_empty() && chunk.offset == 0);
        std::fs::write(&path, "{\"step\":1}\n{\"step\":2}\n{\"ste").unwrap();
        let first = metrics_from(&path, 0).unwrap();
        assert_eq!(first.rows.len(), 2);
        assert_eq!(first.offset, 22);
        std::fs::write(&path, "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n").unwrap();
        let next = metrics_from(&path, first.offset).unwrap();
        assert_eq!(next.rows, vec![serde_json::json!({"step": 3})]);
        assert!(!next.reset);
        std::fs::write(&path, "{\"step\":1}\n").unwrap();
        let over = metrics_from(&path, next.offset).unwrap();
        assert!(over.reset);
        assert_eq!(over.rows, vec![serde_json::json!({"step": 1})]);
    }
}
