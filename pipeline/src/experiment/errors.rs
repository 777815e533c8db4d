//! Config errors and where they are. An error is typed: the file, the
//! message (a setting's dotted path first, where it has one) and its
//! place: a line of the file, the `--set` that wrote the setting, or the
//! file as a whole. [`ConfigError::located`] finds the place, in one
//! place, from serde's position, the message's path or the key a check
//! names.

use super::*;

/// Where in the experiment a config error is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A line of the file (and serde's column, when it gave one).
    Line { line: usize, column: Option<usize> },
    /// The `--set KEY=VALUE` that wrote the setting.
    Set(String),
    /// No more precise than the file.
    File,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Line { line, column } => {
                write!(f, " at line {line}")?;
                match column {
                    Some(c) => write!(f, " column {c}"),
                    None => Ok(()),
                }
            }
            Place::Set(o) => write!(f, " (from --set {o})"),
            Place::File => Ok(()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}{place}")]
    Invalid {
        path: PathBuf,
        message: String,
        place: Place,
    },
}

/// A config error before it is placed: its message, and the top-level
/// key whose line it is at when the message's own path does not say
/// (`name`, `judge`).
#[derive(Debug)]
pub(super) struct Problem {
    pub message: String,
    pub key: Option<String>,
}

impl Problem {
    pub fn at_key(key: &str, message: String) -> Self {
        Self {
            message,
            key: Some(key.to_owned()),
        }
    }
}

impl From<String> for Problem {
    fn from(message: String) -> Self {
        Self { message, key: None }
    }
}

impl From<&str> for Problem {
    fn from(message: &str) -> Self {
        message.to_owned().into()
    }
}

impl ConfigError {
    /// An error about the file as a whole.
    pub fn in_file(path: &Path, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: path.to_owned(),
            message: message.into(),
            place: Place::File,
        }
    }

    /// Places `problem`: serde's own position (moved to a duplicate key's
    /// second line, or an unknown key's own line), else the `--set` that
    /// wrote the setting, else the line of the key the problem names or
    /// of the `stages.NAME.FIELD` its message starts with; `text` is the
    /// file when its lines still describe what was parsed.
    pub(super) fn located(
        path: &Path,
        text: Option<&str>,
        overrides: &[String],
        problem: Problem,
    ) -> Self {
        let (message, position) = split_position(&problem.message);
        let mut place = Place::File;
        if let Some((line, column)) = position {
            place = Place::Line { line, column };
            if let Some(text) = text {
                place = pinpoint_duplicate_key(text, message, line, column)
                    .or_else(|| pinpoint_unknown_field(text, message, line))
                    .unwrap_or(place);
            }
        } else if let Some(o) = set_by_override(message, overrides) {
            place = Place::Set(o.to_owned());
        } else if let Some(text) = text {
            let line = match &problem.key {
                Some(key) => at_key_line(text, key),
                None => locate_stage_error(text, message),
            };
            place = line.map_or(Place::File, |line| Place::Line { line, column: None });
        }
        ConfigError::Invalid {
            path: path.to_owned(),
            message: message.to_owned(),
            place,
        }
    }
}

/// A message without serde's trailing ` at line N[ column M]`, and N, M.
fn split_position(message: &str) -> (&str, Option<(usize, Option<usize>)>) {
    let Some(i) = message.rfind(" at line ") else {
        return (message, None);
    };
    let mut numbers = message[i + " at line ".len()..].split(" column ");
    let line = numbers.next().and_then(|n| n.parse().ok());
    let column = numbers.next().map(|c| c.parse().ok());
    match (line, column, numbers.next()) {
        (Some(line), None, None) => (&message[..i], Some((line, None))),
        (Some(line), Some(Some(c)), None) => (&message[..i], Some((line, Some(c)))),
        _ => (message, None),
    }
}

/// `model: layer_norm_epsilon: ...` (serde's field, then a custom
/// error's own field) as one path: `model.layer_norm_epsilon: ...`.
pub(super) fn dotted(message: &str) -> String {
    let mut path: Vec<&str> = Vec::new();
    let mut rest = message;
    while let Some((head, tail)) = rest.split_once(": ") {
        let is_path = !head.is_empty()
            && head
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.[]=-".contains(c));
        if !is_path {
            break;
        }
        path.push(head);
        rest = tail;
    }
    match path.is_empty() {
        true => message.to_owned(),
        false => format!("{}: {rest}", path.join(".")),
    }
}

/// A serde message without its " at line N column M" (of re-serialised
/// text, not the user's file).
pub(super) fn without_position(message: &str) -> &str {
    message
        .rfind(" at line ")
        .map_or(message, |i| &message[..i])
}

/// A stage's validation error, named by the stage and, for a setting, by
/// its path inside the stage.
pub(super) fn stage_error(name: &str, e: StageError) -> String {
    match e {
        StageError::Setting { field, message } => format!("stages.{name}.{field}: {message}"),
        other => format!("stages.{name}: {other}"),
    }
}

/// The `--set` that wrote the setting a `PATH: ...` error names, if one
/// did (the last one wins, as when they are applied).
pub(super) fn set_by_override<'a>(message: &str, overrides: &'a [String]) -> Option<&'a str> {
    let (path, _) = message.split_once(": ")?;
    overrides
        .iter()
        .rev()
        .find(|o| {
            o.split_once('=').is_some_and(|(key, _)| {
                let key = key.trim();
                path == key || path.starts_with(&format!("{key}."))
            })
        })
        .map(String::as_str)
}

/// The file line of a `stages.NAME[.FIELD...]: ...` error: the field's
/// line where it is written on its own line in the stage's block, else
/// the stage's.
fn locate_stage_error(text: &str, message: &str) -> Option<usize> {
    let rest = message.strip_prefix("stages.")?;
    let (path, _) = rest.split_once(": ")?;
    let mut parts = path.split('.');
    let name = parts.next()?;
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let key_line =
        |from: usize, to: usize, key: &str| (from..to).find(|&i| is_key_line(lines[i], key));
    let stages = (0..lines.len()).find(|&i| lines[i].trim_end() == "stages:")?;
    let stage = key_line(stages + 1, lines.len(), name)?;
    let end = (stage + 1..lines.len())
        .find(|&i| !lines[i].trim().is_empty() && indent(lines[i]) <= indent(lines[stage]))
        .unwrap_or(lines.len());
    // An unknown field is searched for like one more part of the path.
    let mut at = stage;
    for part in parts.chain(unknown_field(message)) {
        // `epochs` or `sampling` (a list index like `ptx[0]` names its key).
        let key = part.split('[').next().unwrap_or(part);
        match key_line(at + 1, end, key) {
            Some(i) => at = i,
            None => break,
        }
    }
    Some(at + 1)
}

/// The field named by serde's "unknown field `X`" message.
pub(super) fn unknown_field(message: &str) -> Option<&str> {
    message
        .split_once("unknown field `")
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(f, _)| f)
}

/// Whether a YAML line sets `key` (`key:`, `- key:`, `"key":`).
pub(super) fn is_key_line(line: &str, key: &str) -> bool {
    let l = line.trim_start().trim_start_matches("- ");
    l.trim_start_matches(['"', '\''])
        .strip_prefix(key)
        .is_some_and(|r| {
            r.trim_start_matches(['"', '\''])
                .trim_start()
                .starts_with(':')
        })
}

/// Serde reports some unknown keys at their mapping's first line: the
/// key's own line instead.
fn pinpoint_unknown_field(text: &str, message: &str, line: usize) -> Option<Place> {
    let field = unknown_field(message)?;
    let (i, _) = text
        .lines()
        .enumerate()
        .skip(line.saturating_sub(1))
        .find(|(_, l)| is_key_line(l, field))?;
    Some(Place::Line {
        line: i + 1,
        column: None,
    })
}

/// Serde reports a duplicate key at its mapping's first line: the key's
/// second occurrence (the one to remove) instead.
fn pinpoint_duplicate_key(
    text: &str,
    message: &str,
    line: usize,
    column: Option<usize>,
) -> Option<Place> {
    let (_, rest) = message.split_once("duplicate entry with key \"")?;
    let (key, _) = rest.split_once('"')?;
    let indent = column?.saturating_sub(1);
    let (i, _) = text
        .lines()
        .enumerate()
        .skip(line.saturating_sub(1))
        .filter(|(_, l)| l.len() - l.trim_start().len() == indent && is_key_line(l, key))
        .nth(1)?;
    Some(Place::Line {
        line: i + 1,
        column: None,
    })
}

/// The first line that sets `key`.
pub(super) fn at_key_line(text: &str, key: &str) -> Option<usize> {
    // A key with a backslash or quote is written escaped in double quotes.
    let escaped = serde_json::to_string(key).unwrap_or_default();
    let escaped = escaped.trim_matches('"');
    text.lines()
        .position(|l| is_key_line(l, key) || is_key_line(l, escaped))
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place_of(text: &str, overrides: &[&str]) -> (String, Place) {
        let d = tempfile::tempdir().unwrap();
        let p = crate::experiment::tests::write(d.path(), text);
        let sets: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        match Experiment::load(&p, &sets).unwrap_err() {
            ConfigError::Invalid { message, place, .. } => (message, place),
            other => panic!("{other}"),
        }
    }

    fn line(n: usize) -> Place {
        Place::Line {
            line: n,
            column: None,
        }
    }

    /// Every error says where it is as data: a line (serde's, moved to
    /// the key at fault), the `--set` that wrote the setting, or the file.
    #[test]
    fn errors_carry_their_place() {
        let good = "name: t\nstages:\n  sft:\n    kind: sft\n    data: a.jsonl\n";
        let (m, at) = place_of(&good.replace("    data: a.jsonl\n", ""), &[]);
        assert!(m.starts_with("stages.sft: missing field `data`"), "{m}");
        assert_eq!(at, line(3), "the stage's line");
        let (m, at) = place_of(&format!("{good}    epocs: 2\n"), &[]);
        assert!(m.contains("unknown field `epocs`"), "{m}");
        assert_eq!(at, line(6), "the unknown key's own line");
        let (m, at) = place_of(&format!("{good}    data: b.jsonl\n"), &[]);
        assert!(m.contains("duplicate entry with key \"data\""), "{m}");
        assert_eq!(at, line(6), "the duplicate's second line");
        let (_, at) = place_of(good, &["stages.sft.epochs=many"]);
        assert_eq!(at, Place::Set("stages.sft.epochs=many".into()));
        let (m, at) = place_of(&good.replace("name: t", "name: a/b"), &[]);
        assert!(m.starts_with("name \"a/b\""), "{m}");
        assert_eq!(at, line(1));
        let (m, at) = place_of("name: t\nstages: {}\n", &[]);
        assert_eq!((m.as_str(), at), ("stages: no stages defined", Place::File));
        // A YAML syntax error keeps serde's column.
        let (_, at) = place_of("name: t\nstages: a: b\n", &[]);
        assert!(
            matches!(
                at,
                Place::Line {
                    column: Some(_),
                    ..
                }
            ),
            "{at:?}"
        );
    }
}
