//! Labellers' tokens: a queue folder keeps each name with the sha256 of
//! its token, never the token itself.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use rand::Rng;
use sha2::{Digest, Sha256};

pub const TOKENS_FILE: &str = "tokens.json";

/// Name by token hash.
#[derive(Debug, Default, Clone)]
pub struct Tokens {
    by_hash: BTreeMap<String, String>,
}

fn hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Tokens {
    pub fn read(queue: &Path) -> anyhow::Result<Self> {
        let path = queue.join(TOKENS_FILE);
        let by_hash = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("{}: expected {{hash: name}}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Self { by_hash })
    }

    /// The labeller a token belongs to.
    pub fn labeller(&self, token: &str) -> Option<&str> {
        self.by_hash.get(&hash(token)).map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

/// A new token for `name` in the queue folder; returns it (shown once).
pub fn add_token(queue: &Path, name: &str) -> anyhow::Result<String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    anyhow::ensure!(
        valid,
        "labeller name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.'"
    );
    let groups = rlhf_datasets::labels::GROUPS_FILE;
    anyhow::ensure!(
        queue.join(groups).is_file(),
        "{}: not a labelling queue (no {groups}); a loop round's queue is made when the round has sampled its answers (its log names the folder)",
        queue.display()
    );
    let mut tokens = Tokens::read(queue)?;
    let token: String = (0..24)
        .map(|_| format!("{:02x}", rand::rng().random::<u8>()))
        .collect();
    tokens.by_hash.retain(|_, n| n != name);
    tokens.by_hash.insert(hash(&token), name.to_owned());
    let text = serde_json::to_string_pretty(&tokens.by_hash)?;
    rlhf_datasets::atomic::write_file(&queue.join(TOKENS_FILE), text.as_bytes())?;
    Ok(token)
}
