//! What the pipeline passes a stage to run users' reward programs (it
//! owns process groups and deadlines), and what travels through it.

#[cfg(target_os = "linux")]
pub mod code_check;
#[cfg(target_os = "linux")]
pub mod sandbox;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// One answer to score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreItem {
    pub prompt: String,
    pub response: String,
    /// The prompt's reference answer (its `answer` column), if it has one.
    pub answer: Option<String>,
}

/// An answer's score and its named parts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    pub score: f64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub components: BTreeMap<String, f64>,
}

/// The largest score magnitude a program or server may give: far above
/// any scale in use, low enough that means and differences stay finite.
pub const MAX_SCORE: f64 = 1e15;

impl Scored {
    /// A program's or server's result, `{"score": x, "components": {name:
    /// x}}` (components optional or null), every number finite within
    /// [`MAX_SCORE`].
    pub fn from_json(v: &serde_json::Value) -> Result<Self, String> {
        let number = |x: &serde_json::Value| x.as_f64().filter(|s| s.abs() <= MAX_SCORE);
        let score = v
            .get("score")
            .ok_or("expected {\"score\": x}")
            .and_then(|s| number(s).ok_or("the score must be a finite number within ±1e15"))?;
        let mut components = BTreeMap::new();
        if let Some(c) = v.get("components").filter(|c| !c.is_null()) {
            let c = c
                .as_object()
                .ok_or("components must be an object {name: number}")?;
            for (name, x) in c {
                let x = number(x).ok_or_else(|| {
                    format!("component {name:?} is not a finite number within ±1e15")
                })?;
                components.insert(name.clone(), x);
            }
        }
        Ok(Self { score, components })
    }
}

/// Where a reward comes from outside the stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint<'a> {
    /// A program and its arguments, speaking JSON lines.
    Command(&'a [String]),
    /// A reward server: `POST` a JSON array of items, get one back.
    Url(&'a str),
}

/// Runs a reward program or asks a reward server once about some
/// answers: `(endpoint, timeout seconds, items)` to one [`Scored`] per
/// item, passed in by the pipeline (which runs programs in their own
/// process groups).
pub type ProgramRunner =
    Arc<dyn Fn(Endpoint<'_>, f64, &[ScoreItem]) -> Result<Vec<Scored>, String> + Send + Sync>;

/// `call` until it gives `want` results, at most `retries + 1` times; a
/// wrong count counts as a failure (`"{n} {results} for {want} {items}"`),
/// each retry is logged as `role`'s, and the last failure is returned
/// with the number of tries.
pub fn call_with_retries<T>(
    role: &str,
    retries: usize,
    (want, results, items): (usize, &str, &str),
    mut call: impl FnMut() -> Result<Vec<T>, String>,
) -> Result<Vec<T>, String> {
    let mut last = String::new();
    for attempt in 0..=retries {
        match call() {
            Ok(got) if got.len() == want => return Ok(got),
            Ok(got) => last = format!("{} {results} for {want} {items}", got.len()),
            Err(e) => last = e,
        }
        if attempt < retries {
            tracing::warn!("{role}: {last}; trying again ({}/{retries})", attempt + 1);
        }
    }
    Err(format!("{last} (after {} tries)", retries + 1))
}
