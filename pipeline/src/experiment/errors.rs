//! Config errors and where they are: serde's messages turned into the
//! setting's dotted path and its line in the file (or the `--set` that
//! gave it).

use super::*;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
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

/// Where a setting's error comes from: `(from --set KEY=VALUE)` when a
/// `--set` wrote it, else its line in `text` (when the file's lines still
/// describe what was parsed).
pub(super) fn place_error(message: String, overrides: &[String], text: Option<&str>) -> String {
    match (set_by_override(&message, overrides), text) {
        (Some(o), _) => format!("{message} (from --set {o})"),
        (None, Some(text)) => locate_stage_error(text, &message),
        (None, None) => message,
    }
}

/// Appends the file line of a `stages.NAME[.FIELD...]: ...` error: the
/// field's line where it is written on its own line in the stage's
/// block, else the stage's.
pub(super) fn locate_stage_error(text: &str, message: &str) -> String {
    let Some(rest) = message.strip_prefix("stages.") else {
        return message.to_owned();
    };
    if message.contains(" at line ") {
        return message.to_owned();
    }
    let Some((path, _)) = rest.split_once(": ") else {
        return message.to_owned();
    };
    let mut parts = path.split('.');
    let Some(name) = parts.next() else {
        return message.to_owned();
    };
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let key_line =
        |from: usize, to: usize, key: &str| (from..to).find(|&i| is_key_line(lines[i], key));
    let Some(stages) = (0..lines.len()).find(|&i| lines[i].trim_end() == "stages:") else {
        return message.to_owned();
    };
    let Some(stage) = key_line(stages + 1, lines.len(), name) else {
        return message.to_owned();
    };
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
    format!("{message} at line {}", at + 1)
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

/// Serde reports some unknown keys at their mapping's first line; point at
/// the key's own line instead.
pub(super) fn pinpoint_unknown_field(text: &str, message: &str) -> String {
    let field = unknown_field(message);
    let at = message.rfind(" at line ").and_then(|i| {
        let line: usize = message[i + 9..].split_whitespace().next()?.parse().ok()?;
        Some((i, line))
    });
    let (Some(field), Some((cut, line))) = (field, at) else {
        return message.to_owned();
    };
    let found = text
        .lines()
        .enumerate()
        .skip(line.saturating_sub(1))
        .find(|(_, l)| is_key_line(l, field));
    match found {
        Some((i, _)) => format!("{} at line {}", &message[..cut], i + 1),
        None => message.to_owned(),
    }
}

/// Serde reports a duplicate key at its mapping's first line; point at
/// the key's second occurrence (the one to remove) instead.
pub(super) fn pinpoint_duplicate_key(text: &str, message: &str) -> String {
    let Some((head, rest)) = message.split_once("duplicate entry with key \"") else {
        return message.to_owned();
    };
    let Some((key, place)) = rest.split_once('"') else {
        return message.to_owned();
    };
    let numbers: Vec<usize> = place
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    let [line, column] = numbers[..] else {
        return message.to_owned();
    };
    let indent = column.saturating_sub(1);
    let second = text
        .lines()
        .enumerate()
        .skip(line.saturating_sub(1))
        .filter(|(_, l)| l.len() - l.trim_start().len() == indent && is_key_line(l, key))
        .nth(1);
    match second {
        Some((i, _)) => format!("{head}duplicate entry with key \"{key}\" at line {}", i + 1),
        None => message.to_owned(),
    }
}

/// ` at line N` for the first line that sets `key`, or nothing.
pub(super) fn at_key_line(text: &str, key: &str) -> String {
    // A key with a backslash or quote is written escaped in double quotes.
    let escaped = serde_json::to_string(key).unwrap_or_default();
    let escaped = escaped.trim_matches('"');
    let line = text
        .lines()
        .position(|l| is_key_line(l, key) || is_key_line(l, escaped));
    line.map_or(String::new(), |i| format!(" at line {}", i + 1))
}
