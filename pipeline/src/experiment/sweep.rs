//! `sweep:`: one line of YAML per setting to try.
//!
//! ```yaml
//! sweep:
//!   stages.ppo.kl_coef: [0.1, 0.2, 0.3]
//! ```
//!
//! turns the stage a setting belongs to, and every stage downstream of
//! it, into one stage per value (several settings: their product), named
//! `ppo[kl_coef=0.1]` and written to folders a shell can type
//! (`ppo.kl_coef=0.1`). Stages upstream of every swept setting stay one
//! stage each, so every variant shares them (and the runner's cache).
//! The expansion happens on the file's YAML, before it is parsed, so that
//! every process (`rlhf run`, each `rlhf stage`) sees the same stages.

use std::collections::{BTreeMap, BTreeSet};

use serde_norway::{Mapping, Value};

/// Most variants a sweep may make.
const MAX_VARIANTS: usize = 1000;

/// One swept setting.
struct Axis {
    /// The stage it belongs to.
    stage: String,
    /// Its path inside the stage (`kl_coef`, `optimizer.lr`).
    field: Vec<String>,
    /// How variant names show it (`kl_coef`, or `ppo.kl_coef` where two
    /// axes end in the same word).
    label: String,
    values: Vec<Value>,
}

/// A stage's references to other stages: (setting path, stage name).
pub type Refs = Vec<(String, String)>;

/// Expands `root`'s `sweep:` (removed from it) into variant stages.
/// `refs(name, stage mapping)` finds the settings where a stage names
/// another stage it reads.
pub fn expand(root: &mut Value, refs: impl Fn(&str, &Value) -> Refs) -> Result<(), String> {
    let Some(map) = root.as_mapping_mut() else {
        return Ok(());
    };
    let Some(sweep) = map.remove("sweep") else {
        return Ok(());
    };
    let Some(Value::Mapping(stages)) = map.get("stages").cloned() else {
        return Ok(());
    };
    let names: BTreeSet<String> = stages
        .keys()
        .filter_map(|k| k.as_str().map(str::to_owned))
        .collect();
    let axes = axes(&sweep, &names)?;
    let reads: BTreeMap<String, Refs> = names
        .iter()
        .map(|n| (n.clone(), refs(n, &stages[n.as_str()])))
        .collect();
    let deps: BTreeMap<String, BTreeSet<String>> = reads
        .iter()
        .map(|(n, r)| (n.clone(), r.iter().map(|(_, s)| s.clone()).collect()))
        .collect();
    // The axes each stage varies over: its own and its ancestors'.
    let mut varies: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, axis) in axes.iter().enumerate() {
        for s in crate::plan::dag::with_descendants(&deps, std::slice::from_ref(&axis.stage)) {
            varies.entry(s).or_default().push(i);
        }
    }
    check_loop(map, &varies)?;
    let mut out = Mapping::new();
    for (name, stage) in &stages {
        let name = name.as_str().unwrap_or_default();
        let Some(own) = varies.get(name) else {
            out.insert(Value::from(name), stage.clone());
            continue;
        };
        for combo in product(own.iter().map(|&i| axes[i].values.len()).collect()) {
            let pick: BTreeMap<usize, usize> = own.iter().copied().zip(combo).collect();
            let variant = variant_of(name, stage, &pick, &axes, &reads[name], &varies)?;
            let new = variant_name(name, &pick, &axes)?;
            let taken = out
                .keys()
                .filter_map(Value::as_str)
                .any(|k| k == new || folder_of(k) == folder_of(&new));
            if taken || names.contains(&new) {
                return Err(format!("sweep: two stages would be named {new} (or share its folder {}); give values and stage names that differ as written", folder_of(&new)));
            }
            out.insert(Value::from(new), variant);
        }
    }
    map.insert(Value::from("stages"), Value::Mapping(out));
    Ok(())
}

/// A `--set` of a setting the sweep sets would be overwritten by it
/// without a word: refused instead.
pub fn check_overrides(root: &Value, overrides: &[String]) -> Result<(), String> {
    let Some(Value::Mapping(sweep)) = root.get("sweep") else {
        return Ok(());
    };
    for o in overrides {
        let key = o.split_once('=').map_or(o.as_str(), |(k, _)| k).trim();
        let clash = sweep.keys().filter_map(Value::as_str).find(|s| {
            *s == key || s.starts_with(&format!("{key}.")) || key.starts_with(&format!("{s}."))
        });
        if let Some(swept) = clash {
            return Err(format!(
                "--set {o}: the sweep sets {swept} (one stage per value); change the sweep's values instead"
            ));
        }
    }
    Ok(())
}

/// The sweep's settings, checked.
fn axes(sweep: &Value, stages: &BTreeSet<String>) -> Result<Vec<Axis>, String> {
    let Value::Mapping(entries) = sweep else {
        return Err("sweep: expected a mapping of settings to lists of values, e.g. `stages.ppo.kl_coef: [0.1, 0.2]`".into());
    };
    let mut axes = Vec::new();
    let mut count = 1usize;
    for (key, values) in entries {
        let key = key.as_str().unwrap_or_default();
        let parts: Vec<&str> = key.split('.').collect();
        let (["stages", stage, field @ ..], false) =
            (parts.as_slice(), parts.iter().any(|p| p.is_empty()))
        else {
            return Err(format!("sweep.{key}: expected `stages.<stage>.<setting>`"));
        };
        if field.is_empty() || field[0] == "kind" {
            return Err(format!(
                "sweep.{key}: name one of the stage's settings (not its kind)"
            ));
        }
        if !stages.contains(*stage) {
            return Err(format!(
                "sweep.{key}: no stage named \"{stage}\"; the file defines: {}",
                stages.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        let Value::Sequence(values) = values else {
            return Err(format!("sweep.{key}: expected a list of values"));
        };
        if values.is_empty() {
            return Err(format!("sweep.{key}: an empty list makes no stage"));
        }
        count = count.saturating_mul(values.len());
        if count > MAX_VARIANTS {
            return Err(format!("sweep: more than {MAX_VARIANTS} variants"));
        }
        axes.push(Axis {
            stage: (*stage).to_owned(),
            field: field.iter().map(|f| (*f).to_owned()).collect(),
            label: field.join("."),
            values: values.clone(),
        });
    }
    // Where two axes show the same name, the stage tells them apart.
    let labels: Vec<String> = axes.iter().map(|a| a.label.clone()).collect();
    for a in &mut axes {
        if labels.iter().filter(|l| **l == a.label).count() > 1 {
            a.label = format!("{}.{}", a.stage, a.label);
        }
    }
    Ok(axes)
}

/// A loop whose stages a sweep would multiply is refused: a round runs
/// one reward model and one policy.
fn check_loop(root: &Mapping, varies: &BTreeMap<String, Vec<usize>>) -> Result<(), String> {
    let repeat = root
        .get("loop")
        .and_then(|l| l.get("repeat"))
        .and_then(Value::as_sequence);
    for s in repeat.into_iter().flatten().filter_map(Value::as_str) {
        if varies.contains_key(s) {
            return Err(format!(
                "sweep: loop.repeat names `{s}`, which the sweep turns into one stage per value; sweep stages outside the loop, or run one experiment per value"
            ));
        }
    }
    Ok(())
}

/// Every combination of indices below `sizes`, the last one fastest.
fn product(sizes: Vec<usize>) -> Vec<Vec<usize>> {
    let mut out = vec![vec![]];
    for n in sizes {
        out = out
            .into_iter()
            .flat_map(|prefix| {
                (0..n).map(move |i| {
                    let mut next = prefix.clone();
                    next.push(i);
                    next
                })
            })
            .collect();
    }
    out
}

/// `ppo[kl_coef=0.1]`: the stage and the values it was made with.
fn variant_name(
    stage: &str,
    pick: &BTreeMap<usize, usize>,
    axes: &[Axis],
) -> Result<String, String> {
    let parts: Vec<String> = pick
        .iter()
        .map(|(&a, &v)| Ok(format!("{}={}", axes[a].label, shown(&axes[a].values[v])?)))
        .collect::<Result<_, String>>()?;
    let name = format!("{stage}[{}]", parts.join(","));
    if folder_of(&name).len() > 100 {
        return Err(format!("sweep: the stage name {name} is over 100 bytes; sweep fewer settings or shorter values"));
    }
    Ok(name)
}

/// A value as a variant's name shows it; only what a shell and a file
/// name take as they are.
fn shown(v: &Value) -> Result<String, String> {
    let text = serde_norway::to_string(v).unwrap_or_default();
    let text = text.trim().trim_start_matches("---").trim();
    if text.is_empty()
        || !text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c))
    {
        return Err(format!(
            "sweep: the value `{text}` cannot name a stage folder; swept values are numbers or words of letters, digits and . _ + -"
        ));
    }
    Ok(text.to_owned())
}

/// One variant of `stage`: the swept settings set, and its references to
/// other swept stages pointed at their variants with the same values.
fn variant_of(
    name: &str,
    stage: &Value,
    pick: &BTreeMap<usize, usize>,
    axes: &[Axis],
    reads: &Refs,
    varies: &BTreeMap<String, Vec<usize>>,
) -> Result<Value, String> {
    let mut stage = stage.clone();
    for (&a, &v) in pick {
        if axes[a].stage == name {
            set(&mut stage, &axes[a].field, axes[a].values[v].clone())?;
        }
    }
    for (field, up) in reads {
        let Some(theirs) = varies.get(up) else {
            continue;
        };
        let theirs: BTreeMap<usize, usize> = theirs.iter().map(|a| (*a, pick[a])).collect();
        let path: Vec<String> = field.split('.').map(str::to_owned).collect();
        set(
            &mut stage,
            &path,
            Value::from(variant_name(up, &theirs, axes)?),
        )?;
    }
    Ok(stage)
}

/// Sets `path` inside a stage's mapping.
fn set(stage: &mut Value, path: &[String], value: Value) -> Result<(), String> {
    let parts: Vec<&str> = path.iter().map(String::as_str).collect();
    crate::experiment::set_path(stage, &parts, value).map_err(|m| format!("sweep: {m}"))
}

/// The folder of a stage: a variant's name with its brackets turned into
/// what a shell types as it is (`ppo[kl_coef=0.1]` -> `ppo.kl_coef=0.1`).
pub fn folder_of(name: &str) -> String {
    match name.split_once('[') {
        Some((stage, rest)) => format!("{stage}.{}", rest.trim_end_matches(']')),
        None => name.to_owned(),
    }
}

/// Whether `name` is a variant's name as [`expand`] makes it.
pub fn is_variant_name(name: &str) -> bool {
    let Some((stage, rest)) = name.split_once('[') else {
        return false;
    };
    let Some(inner) = rest.strip_suffix(']') else {
        return false;
    };
    crate::experiment::is_folder_name(stage)
        && !inner.is_empty()
        && inner.split(',').all(|p| {
            p.split_once('=').is_some_and(|(k, v)| {
                !k.is_empty()
                    && !v.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._".contains(c))
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c))
            })
        })
        && folder_of(name).len() <= 100
}
