//! Tables from files, through Polars: JSON lines (plain or gzip, as public
//! preference sets ship), Parquet and CSV, chosen by extension.
//!
//! Errors name the file and, where one is to blame, the line or row.

use std::io::Read;
use std::path::{Path, PathBuf};

use polars::prelude::*;

/// Something wrong with a data file.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: unknown data format; expected .jsonl, .jsonl.gz, .json, .parquet or .csv")]
    UnknownFormat { path: PathBuf },
    #[error("{path}: the file has no rows")]
    Empty { path: PathBuf },
    #[error("{path}: line {line}: not valid UTF-8 text")]
    InvalidUtf8 { path: PathBuf, line: usize },
    #[error("{path}: line {line}: {message}")]
    BadLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: missing column `{column}` (the file has: {found}); expected {expected}")]
    MissingColumn {
        path: PathBuf,
        column: String,
        found: String,
        expected: String,
    },
    #[error("{path}: column `{column}` holds {found}, expected {expected}")]
    WrongType {
        path: PathBuf,
        column: String,
        expected: String,
        found: String,
    },
    #[error("{path}: row {row}: `{column}` {message}")]
    BadValue {
        path: PathBuf,
        row: usize,
        column: String,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    JsonLines { gzip: bool },
    Parquet,
    Csv,
}

impl Format {
    pub fn of(path: &Path) -> Result<Self, DataError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let (stem, gzip) = match name.strip_suffix(".gz") {
            Some(stem) => (stem.to_owned(), true),
            None => (name.clone(), false),
        };
        let ext = stem.rsplit('.').next().unwrap_or("");
        match (ext, gzip) {
            ("jsonl" | "ndjson" | "json", gzip) => Ok(Format::JsonLines { gzip }),
            ("parquet", false) => Ok(Format::Parquet),
            ("csv", false) => Ok(Format::Csv),
            _ => Err(DataError::UnknownFormat {
                path: path.to_owned(),
            }),
        }
    }
}

/// The most one line (JSON lines) or one text cell may hold: far beyond
/// any context window, and small enough that tokenizing it cannot exhaust
/// memory.
pub const MAX_TEXT_BYTES: usize = 4_000_000;

/// A table as [`read_table`] reads it, for crates that do not name Polars.
pub type Table = DataFrame;

/// Reads a whole table. An empty file is an error.
pub fn read_table(path: &Path) -> Result<DataFrame, DataError> {
    let io = |source| DataError::Io {
        path: path.to_owned(),
        source,
    };
    // Larger than memory (or a device, a FIFO): refused by name, not read
    // until the process is killed.
    let memory = crate::files::memory_bytes().unwrap_or(u64::MAX);
    crate::files::bounded_size(path, memory, "this machine's memory").map_err(|message| {
        DataError::Parse {
            path: path.to_owned(),
            message,
        }
    })?;
    let df = match Format::of(path)? {
        Format::JsonLines { gzip } => {
            let raw = std::fs::read(path).map_err(io)?;
            let bytes = if gzip { gunzip(path, &raw)? } else { raw };
            read_json_lines(path, without_bom(bytes))?
        }
        Format::Parquet => {
            let file = std::fs::File::open(path).map_err(io)?;
            ParquetReader::new(file)
                .finish()
                .map_err(|e| DataError::Parse {
                    path: path.to_owned(),
                    message: format!("not a readable Parquet file ({e})"),
                })?
        }
        Format::Csv => {
            let raw = without_bom(std::fs::read(path).map_err(io)?);
            check_text(path, &raw)?;
            CsvReadOptions::default()
                .with_has_header(true)
                .into_reader_with_file_handle(std::io::Cursor::new(raw))
                .finish()
                .map_err(|e| DataError::Parse {
                    path: path.to_owned(),
                    message: format!("not a readable CSV file ({e})"),
                })?
        }
    };
    if df.height() == 0 {
        return Err(DataError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(df)
}

/// Text editors on Windows start UTF-8 files with a byte-order mark; it
/// carries nothing, so drop it rather than fail on it.
fn without_bom(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.starts_with(&[0xEF, 0xBB, 0xBF]) {
        bytes.drain(..3);
    }
    bytes
}

fn gunzip(path: &Path, raw: &[u8]) -> Result<Vec<u8>, DataError> {
    // A small file can inflate without end (a gzip bomb): stop at memory.
    let limit = crate::files::memory_bytes().unwrap_or(u64::MAX);
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(raw)
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|e| DataError::Parse {
            path: path.to_owned(),
            message: format!("not a valid gzip file ({e})"),
        })?;
    if out.len() as u64 >= limit {
        return Err(DataError::Parse {
            path: path.to_owned(),
            message: format!(
                "inflates to more than this machine's memory ({})",
                crate::files::human_bytes(limit)
            ),
        });
    }
    Ok(out)
}

/// UTF-8 and non-empty, with the line of the first bad byte.
fn check_text(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    if let Err(e) = std::str::from_utf8(bytes) {
        let line = 1 + bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        return Err(DataError::InvalidUtf8 {
            path: path.to_owned(),
            line,
        });
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(DataError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(())
}

fn read_json_lines(path: &Path, bytes: Vec<u8>) -> Result<DataFrame, DataError> {
    check_text(path, &bytes)?;
    // Polars' messages do not say which line is bad; find it ourselves
    // first (cheap next to training, and the error is the user's only clue).
    let text = std::str::from_utf8(&bytes).expect("checked above");
    let mut types = FieldTypes::default();
    for (i, line) in text.lines().enumerate() {
        let bad = |message: String| DataError::BadLine {
            path: path.to_owned(),
            line: i + 1,
            message,
        };
        if line.trim().is_empty() {
            continue;
        }
        if line.len() > MAX_TEXT_BYTES {
            return Err(bad(format!(
                "{} long, more than the {} a row may hold",
                crate::files::human_bytes(line.len() as u64),
                crate::files::human_bytes(MAX_TEXT_BYTES as u64)
            )));
        }
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(serde_json::Value::Object(row)) => {
                types.check(&row, i + 1).map_err(bad)?;
                if let Some(key) = repeated_key(line) {
                    // serde_json (and Polars) would keep one of the two silently.
                    return Err(bad(format!("the key \"{key}\" appears twice")));
                }
            }
            Ok(_) => return Err(bad("expected a JSON object".into())),
            Err(e) => return Err(bad(format!("invalid JSON ({e})"))),
        }
    }
    JsonReader::new(std::io::Cursor::new(bytes))
        .with_json_format(JsonFormat::JsonLines)
        .infer_schema_len(None)
        .finish()
        .map_err(|e| DataError::Parse {
            path: path.to_owned(),
            message: format!("cannot read JSON lines ({e})"),
        })
}

/// A key that appears twice in a line's top-level object.
fn repeated_key(line: &str) -> Option<String> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                if !seen.insert(key.clone()) {
                    return Ok(Some(key));
                }
            }
            Ok(None)
        }
    }
    let mut de = serde_json::Deserializer::from_str(line);
    de.deserialize_map(Keys).ok().flatten()
}

/// The JSON type each field first had, so that a row whose value is of
/// another type is named instead of being coerced to text by Polars (an
/// integer completion would be trained as its digits).
#[derive(Default)]
struct FieldTypes(std::collections::HashMap<String, (&'static str, usize)>);

impl FieldTypes {
    fn check(
        &mut self,
        row: &serde_json::Map<String, serde_json::Value>,
        line: usize,
    ) -> Result<(), String> {
        for (key, value) in row {
            let Some(kind) = json_kind(value) else {
                continue;
            };
            let (first, at) = *self.0.entry(key.clone()).or_insert((kind, line));
            if first != kind {
                return Err(format!(
                    "`{key}` is {kind}, but {first} at line {at}; a field must have one type"
                ));
            }
        }
        Ok(())
    }
}

/// A JSON value's type as a person reads it; `None` for null (missing).
fn json_kind(value: &serde_json::Value) -> Option<&'static str> {
    use serde_json::Value;
    match value {
        Value::Null => None,
        Value::Bool(_) => Some("a boolean"),
        Value::Number(_) => Some("a number"),
        Value::String(_) => Some("a string"),
        Value::Array(_) => Some("a list"),
        Value::Object(_) => Some("an object"),
    }
}

/// Writes a table as Parquet, atomically.
pub fn write_parquet(path: &Path, df: &mut DataFrame) -> Result<(), DataError> {
    let mut buf = Vec::new();
    ParquetWriter::new(&mut buf)
        .finish(df)
        .map_err(|e| DataError::Parse {
            path: path.to_owned(),
            message: format!("cannot encode Parquet ({e})"),
        })?;
    crate::atomic::write_file(path, &buf).map_err(|e| DataError::Io {
        path: path.to_owned(),
        source: e.source,
    })
}

/// A required string column, with the row of any null.
pub fn string_column(
    df: &DataFrame,
    path: &Path,
    name: &str,
    expected: &str,
) -> Result<Vec<String>, DataError> {
    let column = require(df, path, name, expected)?;
    let strings = column.str().map_err(|_| DataError::WrongType {
        path: path.to_owned(),
        column: name.into(),
        expected: "strings".into(),
        found: describe(column.dtype()),
    })?;
    strings
        .iter()
        .enumerate()
        .map(|(row, v)| {
            let bad = |message: String| DataError::BadValue {
                path: path.to_owned(),
                row: row + 1,
                column: name.into(),
                message,
            };
            match v {
                None => Err(bad("is missing (null)".into())),
                Some(s) if s.len() > MAX_TEXT_BYTES => Err(bad(format!(
                    "is {} long, more than the {} a text may hold",
                    crate::files::human_bytes(s.len() as u64),
                    crate::files::human_bytes(MAX_TEXT_BYTES as u64)
                ))),
                Some(s) => Ok(s.to_owned()),
            }
        })
        .collect()
}

/// A column of strings or numbers (read as text) that may be absent,
/// with nulls where a row has no value: e.g. each prompt's reference
/// answer.
pub fn optional_text_column(
    df: &DataFrame,
    path: &Path,
    name: &str,
) -> Result<Option<Vec<Option<String>>>, DataError> {
    let Ok(column) = df.column(name) else {
        return Ok(None);
    };
    let wrong = || DataError::WrongType {
        path: path.to_owned(),
        column: name.into(),
        expected: "strings or numbers".into(),
        found: describe(column.dtype()),
    };
    let dtype = column.dtype();
    if !(dtype.is_primitive_numeric() || matches!(dtype, DataType::String | DataType::Null)) {
        return Err(wrong());
    }
    let text = column.cast(&DataType::String).map_err(|_| wrong())?;
    let text = text.str().map_err(|_| wrong())?;
    Ok(Some(text.iter().map(|v| v.map(str::to_owned)).collect()))
}

/// A column that must exist.
pub fn require<'a>(
    df: &'a DataFrame,
    path: &Path,
    name: &str,
    expected: &str,
) -> Result<&'a Column, DataError> {
    df.column(name).map_err(|_| DataError::MissingColumn {
        path: path.to_owned(),
        column: name.into(),
        found: df
            .get_column_names()
            .iter()
            .map(|c| c.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        expected: expected.into(),
    })
}

/// A type as a person reads it.
pub fn describe(dtype: &DataType) -> String {
    match dtype {
        DataType::String => "strings".into(),
        DataType::Null => "only nulls".into(),
        DataType::Boolean => "booleans".into(),
        d if d.is_integer() => "integers".into(),
        d if d.is_float() => "numbers".into(),
        DataType::List(inner) => format!("lists of {}", describe(inner)),
        DataType::Struct(fields) => format!(
            "objects {{{}}}",
            fields
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn reads_jsonl_gzip_csv_and_parquet_alike() {
        let d = tempfile::tempdir().unwrap();
        let jsonl = b"{\"prompt\": \"a\", \"completion\": \"b\"}\n\n{\"prompt\": \"c\", \"completion\": \"d\"}\n";
        let p = write(d.path(), "x.jsonl", jsonl);
        let df = read_table(&p).unwrap();
        assert_eq!(
            string_column(&df, &p, "completion", "").unwrap(),
            vec!["b", "d"]
        );

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(jsonl).unwrap();
        let pg = write(d.path(), "x.jsonl.gz", &gz.finish().unwrap());
        assert!(read_table(&pg).unwrap().equals(&df));

        let pc = write(d.path(), "x.csv", b"prompt,completion\na,b\nc,d\n");
        assert!(read_table(&pc).unwrap().equals(&df));

        let pq = d.path().join("x.parquet");
        write_parquet(&pq, &mut df.clone()).unwrap();
        assert!(read_table(&pq).unwrap().equals(&df));
    }

    #[test]
    fn errors_name_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        let msg = |p: PathBuf| read_table(&p).unwrap_err().to_string();
        let m = msg(write(d.path(), "e.jsonl", b"  \n"));
        assert!(m.contains("e.jsonl") && m.contains("no rows"), "{m}");
        let m = msg(write(
            d.path(),
            "u.jsonl",
            b"{\"a\": \"x\"}\n{\"a\": \"\xff\"}\n",
        ));
        assert!(m.contains("line 2") && m.contains("UTF-8"), "{m}");
        let m = msg(write(d.path(), "j.jsonl", b"{\"a\": 1}\n{\"a\": 2\n"));
        assert!(m.contains("line 2") && m.contains("invalid JSON"), "{m}");
        let m = msg(write(d.path(), "l.jsonl", b"[1, 2]\n"));
        assert!(m.contains("line 1") && m.contains("object"), "{m}");
        let m = msg(write(d.path(), "x.txt", b"hi"));
        assert!(m.contains("unknown data format"), "{m}");
        let m = msg(write(d.path(), "g.jsonl.gz", b"not gzip"));
        assert!(m.contains("gzip"), "{m}");
        let m = msg(write(d.path(), "p.parquet", b"not parquet"));
        assert!(m.contains("Parquet"), "{m}");
    }

    #[test]
    fn mixed_types_long_lines_and_devices_are_named_and_boms_are_dropped() {
        let d = tempfile::tempdir().unwrap();
        let msg = |p: PathBuf| read_table(&p).unwrap_err().to_string();
        let m = msg(write(
            d.path(),
            "t.jsonl",
            b"{\"c\": \"x\", \"n\": 1}\n{\"c\": null, \"n\": 2.5}\n{\"c\": 5}\n",
        ));
        assert!(
            m.contains("t.jsonl: line 3: `c` is a number, but a string at line 1"),
            "{m}"
        );
        let long = format!("{{\"c\": \"{}\"}}\n", "a".repeat(MAX_TEXT_BYTES));
        let m = msg(write(d.path(), "long.jsonl", long.as_bytes()));
        assert!(
            m.contains("long.jsonl: line 1: 4.0 MB long, more than the 4.0 MB a row may hold"),
            "{m}"
        );
        let m = msg(PathBuf::from("/dev/zero"));
        assert!(
            m.contains("/dev/zero: is a device, expected a regular file"),
            "{m}"
        );
        for (name, bytes) in [
            ("b.jsonl", &b"\xef\xbb\xbf{\"c\": \"x\"}\n"[..]),
            ("b.csv", &b"\xef\xbb\xbfc\nx\n"[..]),
        ] {
            let df = read_table(&write(d.path(), name, bytes)).unwrap();
            let c = string_column(&df, Path::new(name), "c", "text").unwrap();
            assert_eq!(c, ["x"], "{name}");
        }
    }

    #[test]
    fn column_checks_name_column_row_and_types() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "t.jsonl",
            b"{\"prompt\": \"a\", \"n\": 1}\n{\"prompt\": null, \"n\": 2}\n",
        );
        let df = read_table(&p).unwrap();
        let m = string_column(&df, &p, "completion", "{prompt, completion}")
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("missing column `completion`") && m.contains("prompt, n"),
            "{m}"
        );
        let m = string_column(&df, &p, "n", "").unwrap_err().to_string();
        assert!(m.contains("`n` holds integers, expected strings"), "{m}");
        let m = string_column(&df, &p, "prompt", "")
            .unwrap_err()
            .to_string();
        assert!(m.contains("row 2") && m.contains("null"), "{m}");
    }
}
