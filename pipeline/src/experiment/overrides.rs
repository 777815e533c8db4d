//! `--set KEY=VALUE`: a setting changed in the parsed YAML before it is
//! read.

/// Applies `a.b.c=value` to a YAML tree; the value is parsed as YAML
/// (`0.05` is a number, `[1, 2]` a list, `cpu` a string).
pub fn apply_override(root: &mut serde_norway::Value, assignment: &str) -> Result<(), String> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| "expected KEY=VALUE, e.g. stages.sft.epochs=3".to_string())?;
    let value: serde_norway::Value = serde_norway::from_str(raw)
        .map_err(|e| format!("value `{raw}` is not valid YAML ({e})"))?;
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!("key `{key}` has an empty part"));
    }
    set_path(root, &parts, value)
}

/// Sets `root.a.b.c` (`parts`) to `value`, making the mappings on the way.
pub fn set_path(
    root: &mut serde_norway::Value,
    parts: &[&str],
    value: serde_norway::Value,
) -> Result<(), String> {
    let mut node = root;
    for (i, part) in parts.iter().enumerate() {
        let map = node
            .as_mapping_mut()
            .ok_or_else(|| format!("`{}` is not a mapping", parts[..i].join(".")))?;
        let k = serde_norway::Value::String((*part).to_owned());
        if i + 1 == parts.len() {
            map.insert(k, value);
            return Ok(());
        }
        node = map
            .entry(k)
            .or_insert_with(|| serde_norway::Value::Mapping(Default::default()));
    }
    Ok(())
}
