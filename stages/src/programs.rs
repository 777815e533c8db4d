//! What the pipeline passes a stage to run users' reward programs (it
//! owns process groups and deadlines), and what travels through it.

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
