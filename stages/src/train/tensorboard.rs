//! TensorBoard event files beside `metrics.jsonl`: every number of a
//! metrics line becomes a scalar (its key the tag) at the line's `step`
//! (else `iteration`), so `tensorboard --logdir runs/NAME` shows each
//! stage folder as a run. The format is TensorBoard's documented one:
//! TFRecord framing (length, masked CRC-32C of the length, the record,
//! masked CRC-32C of the record) around `Event` protocol buffers, which
//! are small enough to write by hand.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Event files start with this; the rest of the name is the time and
/// `rlhf` (TensorBoard reads any file whose name holds `tfevents`).
pub const EVENTS_PREFIX: &str = "events.out.tfevents.";

/// An event file being written.
#[derive(Debug)]
pub struct EventWriter {
    file: fs::File,
}

impl EventWriter {
    /// A fresh event file in `dir`, replacing the folder's older ones
    /// (a resumed stage rewrites what it keeps of its metrics).
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        for old in event_files(dir) {
            let _ = fs::remove_file(old);
        }
        let secs = now();
        let path = dir.join(format!("{EVENTS_PREFIX}{}.rlhf", secs as u64));
        let mut w = Self {
            file: fs::File::create(path)?,
        };
        let mut version = Vec::new();
        put_double(&mut version, 1, secs);
        put_bytes(&mut version, 3, b"brain.Event:2");
        w.record(&version)?;
        Ok(w)
    }

    /// The numbers of one metrics line as scalars, flushed at once.
    pub fn write(&mut self, record: &serde_json::Value) -> std::io::Result<()> {
        let Some(fields) = record.as_object() else {
            return Ok(());
        };
        let step = ["step", "iteration"]
            .iter()
            .find_map(|k| fields.get(*k)?.as_i64())
            .unwrap_or(0);
        let mut summary = Vec::new();
        for (tag, value) in fields {
            if let (false, Some(x)) = (tag == "step", value.as_f64()) {
                let mut v = Vec::new();
                put_bytes(&mut v, 1, tag.as_bytes());
                put_float(&mut v, 2, x as f32);
                put_bytes(&mut summary, 1, &v);
            }
        }
        let mut event = Vec::new();
        put_double(&mut event, 1, now());
        put_varint_field(&mut event, 2, step as u64);
        put_bytes(&mut event, 5, &summary);
        self.record(&event)?;
        self.file.flush()
    }

    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut out = Vec::with_capacity(data.len() + 16);
        out.extend_from_slice(&len);
        out.extend_from_slice(&masked_crc(&len).to_le_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file.write_all(&out)
    }
}

/// The event files in `dir`.
pub fn event_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return vec![];
    };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(EVENTS_PREFIX))
        })
        .collect()
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn put_varint(out: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        out.push((x as u8) | 0x80);
        x >>= 7;
    }
    out.push(x as u8);
}

fn put_varint_field(out: &mut Vec<u8>, field: u64, x: u64) {
    put_varint(out, field << 3);
    put_varint(out, x);
}

fn put_double(out: &mut Vec<u8>, field: u64, x: f64) {
    put_varint(out, (field << 3) | 1);
    out.extend_from_slice(&x.to_le_bytes());
}

fn put_float(out: &mut Vec<u8>, field: u64, x: f32) {
    put_varint(out, (field << 3) | 5);
    out.extend_from_slice(&x.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, (field << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// CRC-32C (Castagnoli), bit by bit: event records are small.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82F6_3B78 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// TFRecord's masked CRC.
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_of_the_check_string() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn a_new_writer_replaces_older_event_files() {
        let d = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(d.path()).unwrap();
        w.write(&serde_json::json!({"step": 1, "loss": 2.5}))
            .unwrap();
        std::fs::write(d.path().join(format!("{EVENTS_PREFIX}1.old")), b"x").unwrap();
        drop(w);
        EventWriter::create(d.path()).unwrap();
        assert_eq!(event_files(d.path()).len(), 1);
    }
}
