//! The labelling queue of a loop round (first step of the labelling web
//! page): groups of sampled answers waiting for people's rankings, who was
//! shown what, and every submission.
//!
//! A queue folder holds `groups.json` (written once: a rerun resumes the
//! same groups), `served.jsonl` (each group shown to a labeller, with the
//! order its answers were shown in) and the submissions: `labels.jsonl`,
//! the record read back on a restart, and `labels.parquet`, the same rows
//! for people and the reward model's loader. Both are rewritten whole and
//! renamed into place before a submission is acknowledged, so a crash
//! loses no acknowledged label and leaves no half-written file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use polars::prelude::*;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::atomic;
use crate::preference::RankedGroup;

pub const GROUPS_FILE: &str = "groups.json";
pub const SERVED_FILE: &str = "served.jsonl";
pub const LABELS_FILE: &str = "labels.jsonl";
pub const LABELS_PARQUET: &str = "labels.parquet";

/// Why a queue could not be read or a submission was refused. A refusal
/// changes nothing.
#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("group {0} does not exist")]
    NoSuchGroup(usize),
    #[error("group {group} was not shown to {labeller}")]
    NotServed { group: usize, labeller: String },
    #[error("{labeller} has already answered group {group}")]
    Answered { group: usize, labeller: String },
    #[error("ranking {ranking:?}: expected {k} ranks, each in 0..{k} (0 the best; equal ranks are ties)")]
    BadRanking { ranking: Vec<i64>, k: usize },
}

/// One prompt and its sampled answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub prompt: String,
    pub responses: Vec<String>,
    pub round: i64,
    pub policy: String,
}

/// A group as shown to one labeller: its answers in `order`
/// (`order[i]` is the index of the i-th answer shown).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Served {
    pub group: usize,
    pub labeller: String,
    pub order: Vec<usize>,
    /// Unix milliseconds.
    pub shown_at: i64,
}

/// What a labeller sends back for a group: ranks in the order the answers
/// were shown, or a skip, or "not rankable".
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Submission {
    pub group: usize,
    pub labeller: String,
    #[serde(default)]
    pub ranking: Vec<i64>,
    #[serde(default)]
    pub not_rankable: bool,
    #[serde(default)]
    pub skipped: bool,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub comment: String,
}

/// One stored submission, the ranking in the group's own answer order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelRow {
    pub group: i64,
    pub prompt: String,
    pub responses: Vec<String>,
    pub ranking: Vec<i64>,
    pub labeller: String,
    pub shown_at: i64,
    pub submitted_at: i64,
    pub seconds: f64,
    pub not_rankable: bool,
    pub skipped: bool,
    pub reason: String,
    pub comment: String,
    pub round: i64,
    pub policy: String,
}

/// A label given in another tool (Label Studio, Argilla), for
/// [`Queue::import`]: the ranking in the group's own answer order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Imported {
    pub group: usize,
    pub labeller: String,
    pub ranking: Vec<i64>,
    pub not_rankable: bool,
    pub skipped: bool,
    pub reason: String,
    pub comment: String,
    /// Unix milliseconds; 0 when the tool did not say.
    pub submitted_at: i64,
    pub seconds: f64,
}

/// What an import added, and what it left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImportCounts {
    pub added: usize,
    /// Labels the queue already holds (same group, same labeller).
    pub already_there: usize,
}

/// A queue's labels in numbers, for a round's summary and `rlhf eval`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelSummary {
    pub groups: usize,
    pub labels_per_group: usize,
    pub labellers: usize,
    /// Rankings given (skips and "not rankable" not counted).
    pub ranked: usize,
    pub skipped: usize,
    pub not_rankable: usize,
    /// Share of answer pairs two labellers of a group order alike.
    pub agreement: Option<f64>,
    /// Mean Kendall's tau-b between two labellers of a group.
    pub kendall_tau: Option<f64>,
    pub median_seconds: Option<f64>,
}

/// A round's queue, loaded.
#[derive(Debug)]
pub struct Queue {
    dir: PathBuf,
    groups: Vec<Group>,
    labels_per_group: usize,
    served: BTreeMap<(usize, String), Served>,
    rows: Vec<LabelRow>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> LabelError {
    LabelError::File {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Each line of a JSON-lines file; a torn last line (a crash while it was
/// written, before it was acknowledged) is dropped.
fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, LabelError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(file_err(path, e)),
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(v) => out.push(v),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
            Err(e) => return Err(file_err(path, format!("line {}: {e}", i + 1))),
        }
    }
    Ok(out)
}

impl Queue {
    /// The queue in `dir`: created with `groups` the first time, read back
    /// (its groups unchanged, its labels kept) after that.
    pub fn open(dir: &Path, groups: &[Group], labels_per_group: usize) -> Result<Self, LabelError> {
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
        let path = dir.join(GROUPS_FILE);
        let groups = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| file_err(&path, e))?,
            Err(_) => {
                let text = serde_json::to_string_pretty(groups).expect("groups serialise");
                atomic::write_file(&path, text.as_bytes()).map_err(|e| file_err(&path, e))?;
                groups.to_vec()
            }
        };
        let served = read_jsonl::<Served>(&dir.join(SERVED_FILE))?
            .into_iter()
            .map(|s| ((s.group, s.labeller.clone()), s))
            .collect();
        let rows = read_jsonl(&dir.join(LABELS_FILE))?;
        let queue = Self {
            dir: dir.to_owned(),
            groups,
            labels_per_group: labels_per_group.max(1),
            served,
            rows,
        };
        queue.write_parquet()?;
        Ok(queue)
    }

    /// A round's queue for `groups`: resumed when it was made for these
    /// same groups. When it holds others (the round sampled again, from a
    /// retrained policy), it is moved aside whole to `<dir>-superseded-N`
    /// (people's labels are never deleted, nor used for answers they did
    /// not see) and a new one is made; returns where the old one went.
    pub fn open_for_round(
        dir: &Path,
        groups: &[Group],
        labels_per_group: usize,
    ) -> Result<(Self, Option<PathBuf>), LabelError> {
        let path = dir.join(GROUPS_FILE);
        let mut moved = None;
        if let Ok(text) = std::fs::read_to_string(&path) {
            let kept: Vec<Group> = serde_json::from_str(&text).map_err(|e| file_err(&path, e))?;
            if kept != groups {
                let name = dir
                    .file_name()
                    .map_or_else(|| "queue".into(), |n| n.to_string_lossy().into_owned());
                let to = (1..)
                    .map(|n| dir.with_file_name(format!("{name}-superseded-{n}")))
                    .find(|p| !p.exists())
                    .expect("a free name");
                std::fs::rename(dir, &to).map_err(|e| file_err(dir, e))?;
                moved = Some(to);
            }
        }
        Ok((Self::open(dir, groups, labels_per_group)?, moved))
    }

    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    pub fn rows(&self) -> &[LabelRow] {
        &self.rows
    }

    /// Labels that count for a group: rankings and "not rankable", not skips.
    fn labels_of(&self, group: usize) -> usize {
        self.rows
            .iter()
            .filter(|r| r.group as usize == group && !r.skipped)
            .count()
    }

    fn answered(&self, group: usize, labeller: &str) -> bool {
        self.rows
            .iter()
            .any(|r| r.group as usize == group && r.labeller == labeller)
    }

    /// Groups still needing labels, and all groups.
    pub fn progress(&self) -> (usize, usize) {
        let left = (0..self.groups.len())
            .filter(|&g| self.labels_of(g) < self.labels_per_group)
            .count();
        (left, self.groups.len())
    }

    pub fn done(&self) -> bool {
        self.progress().0 == 0
    }

    /// The next group for `labeller` (one they were shown and did not
    /// answer comes first), its answers shuffled for them; recorded.
    pub fn serve(&mut self, labeller: &str) -> Result<Option<Served>, LabelError> {
        let open = |g: usize| !self.answered(g, labeller);
        if let Some(s) = self
            .served
            .values()
            .find(|s| s.labeller == labeller && open(s.group))
        {
            return Ok(Some(s.clone()));
        }
        let Some(group) =
            (0..self.groups.len()).find(|&g| open(g) && self.labels_of(g) < self.labels_per_group)
        else {
            return Ok(None);
        };
        let mut order: Vec<usize> = (0..self.groups[group].responses.len()).collect();
        let seed = group as u64
            ^ labeller
                .bytes()
                .fold(0u64, |h, b| h.wrapping_mul(31) ^ b as u64);
        order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        let served = Served {
            group,
            labeller: labeller.to_owned(),
            order,
            shown_at: now_ms(),
        };
        let path = self.dir.join(SERVED_FILE);
        let mut text = std::fs::read_to_string(&path).unwrap_or_default();
        text.push_str(&serde_json::to_string(&served).expect("serialises"));
        text.push('\n');
        atomic::write_file(&path, text.as_bytes()).map_err(|e| file_err(&path, e))?;
        self.served
            .insert((group, labeller.to_owned()), served.clone());
        Ok(Some(served))
    }

    /// Checks and stores a submission; nothing changes when it is refused.
    pub fn submit(&mut self, s: &Submission) -> Result<&LabelRow, LabelError> {
        let group = self
            .groups
            .get(s.group)
            .ok_or(LabelError::NoSuchGroup(s.group))?;
        let served = self
            .served
            .get(&(s.group, s.labeller.clone()))
            .ok_or_else(|| LabelError::NotServed {
                group: s.group,
                labeller: s.labeller.clone(),
            })?;
        if self.answered(s.group, &s.labeller) {
            return Err(LabelError::Answered {
                group: s.group,
                labeller: s.labeller.clone(),
            });
        }
        let k = group.responses.len();
        let ranked = !(s.skipped || s.not_rankable);
        check_ranking(ranked, &s.ranking, k)?;
        // Back from the shown order to the group's own.
        let mut ranking = vec![0; if ranked { k } else { 0 }];
        if ranked {
            for (shown, &index) in served.order.iter().enumerate() {
                ranking[index] = s.ranking[shown];
            }
        }
        let submitted_at = now_ms();
        let row = LabelRow {
            group: s.group as i64,
            prompt: group.prompt.clone(),
            responses: group.responses.clone(),
            ranking,
            labeller: s.labeller.clone(),
            shown_at: served.shown_at,
            submitted_at,
            seconds: (submitted_at - served.shown_at) as f64 / 1000.0,
            not_rankable: s.not_rankable,
            skipped: s.skipped,
            reason: s.reason.clone(),
            comment: s.comment.clone(),
            round: group.round,
            policy: group.policy.clone(),
        };
        self.rows.push(row);
        if let Err(e) = self.write_rows() {
            self.rows.pop();
            return Err(e);
        }
        Ok(self.rows.last().expect("just pushed"))
    }

    /// Adds labels given elsewhere, checked as submissions are (the group
    /// exists, K ranks in 0..K); one a labeller already gave for a group
    /// is counted and left out, so importing a file twice adds nothing.
    /// All or nothing: one bad label refuses the whole import.
    pub fn import(&mut self, labels: &[Imported]) -> Result<ImportCounts, LabelError> {
        for l in labels {
            let group = self
                .groups
                .get(l.group)
                .ok_or(LabelError::NoSuchGroup(l.group))?;
            let ranked = !(l.skipped || l.not_rankable);
            check_ranking(ranked, &l.ranking, group.responses.len())?;
        }
        let mut counts = ImportCounts::default();
        let before = self.rows.len();
        for l in labels {
            let group = &self.groups[l.group];
            let ranked = !(l.skipped || l.not_rankable);
            if self.answered(l.group, &l.labeller) {
                counts.already_there += 1;
                continue;
            }
            let seconds = if l.seconds.is_finite() {
                l.seconds.max(0.0)
            } else {
                0.0
            };
            self.rows.push(LabelRow {
                group: l.group as i64,
                prompt: group.prompt.clone(),
                responses: group.responses.clone(),
                ranking: if ranked { l.ranking.clone() } else { vec![] },
                labeller: l.labeller.clone(),
                shown_at: l.submitted_at - (seconds * 1000.0) as i64,
                submitted_at: l.submitted_at,
                seconds,
                not_rankable: l.not_rankable,
                skipped: l.skipped,
                reason: l.reason.clone(),
                comment: l.comment.clone(),
                round: group.round,
                policy: group.policy.clone(),
            });
            counts.added += 1;
        }
        if counts.added > 0 {
            if let Err(e) = self.write_rows() {
                self.rows.truncate(before);
                return Err(e);
            }
        }
        Ok(counts)
    }

    fn write_rows(&self) -> Result<(), LabelError> {
        let path = self.dir.join(LABELS_FILE);
        let mut text = String::new();
        for r in &self.rows {
            text.push_str(&serde_json::to_string(r).expect("rows serialise"));
            text.push('\n');
        }
        atomic::write_file(&path, text.as_bytes()).map_err(|e| file_err(&path, e))?;
        self.write_parquet()
    }

    fn write_parquet(&self) -> Result<(), LabelError> {
        let path = self.dir.join(LABELS_PARQUET);
        let rows = &self.rows;
        let list = |f: &dyn Fn(&LabelRow) -> Series| -> Series {
            Series::new("".into(), rows.iter().map(f).collect::<Vec<_>>())
        };
        let col = |name: &str, s: Series| -> Column { s.with_name(name.into()).into() };
        let strings = |f: fn(&LabelRow) -> &str| {
            Series::new("".into(), rows.iter().map(f).collect::<Vec<_>>())
        };
        let mut df = DataFrame::new_infer_height(vec![
            col(
                "group",
                Series::new("".into(), rows.iter().map(|r| r.group).collect::<Vec<_>>()),
            ),
            col("prompt", strings(|r| &r.prompt)),
            col(
                "responses",
                list(&|r| {
                    Series::new(
                        "".into(),
                        r.responses.iter().map(String::as_str).collect::<Vec<_>>(),
                    )
                }),
            ),
            col(
                "ranking",
                list(&|r| Series::new("".into(), r.ranking.clone())),
            ),
            col("labeller", strings(|r| &r.labeller)),
            col(
                "shown_at",
                Series::new(
                    "".into(),
                    rows.iter().map(|r| r.shown_at).collect::<Vec<_>>(),
                ),
            ),
            col(
                "submitted_at",
                Series::new(
                    "".into(),
                    rows.iter().map(|r| r.submitted_at).collect::<Vec<_>>(),
                ),
            ),
            col(
                "seconds",
                Series::new(
                    "".into(),
                    rows.iter().map(|r| r.seconds).collect::<Vec<_>>(),
                ),
            ),
            col(
                "not_rankable",
                Series::new(
                    "".into(),
                    rows.iter().map(|r| r.not_rankable).collect::<Vec<_>>(),
                ),
            ),
            col(
                "skipped",
                Series::new(
                    "".into(),
                    rows.iter().map(|r| r.skipped).collect::<Vec<_>>(),
                ),
            ),
            col("reason", strings(|r| &r.reason)),
            col("comment", strings(|r| &r.comment)),
            col(
                "round",
                Series::new("".into(), rows.iter().map(|r| r.round).collect::<Vec<_>>()),
            ),
            col("policy", strings(|r| &r.policy)),
        ])
        .map_err(|e| file_err(&path, e))?;
        crate::load::write_parquet(&path, &mut df).map_err(|e| file_err(&path, e))
    }

    /// The rankings the reward model learns from: one group per ranked
    /// label (skips and "not rankable" dropped), and how many were dropped.
    pub fn ranked_groups(&self) -> (Vec<RankedGroup>, usize) {
        let mut dropped = 0;
        let mut out = Vec::new();
        for r in &self.rows {
            if r.skipped || r.not_rankable {
                dropped += 1;
                continue;
            }
            out.push(RankedGroup {
                prompt: r.prompt.clone(),
                responses: r.responses.clone(),
                ranking: r.ranking.iter().map(|&x| x as usize).collect(),
                margin: 0.0,
            });
        }
        (out, dropped)
    }

    /// Over groups ranked by two or more labellers: the share of answer
    /// pairs every two labellers order alike (ties count as an order), and
    /// the mean Kendall's tau-b between two labellers' rankings.
    pub fn agreement(&self) -> Option<(f64, f64)> {
        let mut by_group: BTreeMap<i64, Vec<&LabelRow>> = BTreeMap::new();
        for r in self.rows.iter().filter(|r| !r.skipped && !r.not_rankable) {
            by_group.entry(r.group).or_default().push(r);
        }
        let (mut agree, mut pairs, mut taus) = (0usize, 0usize, Vec::new());
        for rows in by_group.values().filter(|v| v.len() >= 2) {
            for (i, a) in rows.iter().enumerate() {
                for b in &rows[i + 1..] {
                    let (same, total, tau) = compare(&a.ranking, &b.ranking);
                    agree += same;
                    pairs += total;
                    taus.extend(tau);
                }
            }
        }
        (pairs > 0).then(|| {
            let tau = taus.iter().sum::<f64>() / taus.len().max(1) as f64;
            (agree as f64 / pairs as f64, tau)
        })
    }

    /// The labels in numbers.
    pub fn summary(&self) -> LabelSummary {
        let count = |f: fn(&LabelRow) -> bool| self.rows.iter().filter(|r| f(r)).count();
        // Ranked labels with a known time (an import may not say).
        let mut seconds: Vec<f64> = self
            .rows
            .iter()
            .filter(|r| !r.skipped && !r.not_rankable && r.seconds > 0.0)
            .map(|r| r.seconds)
            .collect();
        seconds.sort_by(f64::total_cmp);
        let agreement = self.agreement();
        LabelSummary {
            groups: self.groups.len(),
            labels_per_group: self.labels_per_group,
            labellers: self.labellers().len(),
            ranked: count(|r| !r.skipped && !r.not_rankable),
            skipped: count(|r| r.skipped),
            not_rankable: count(|r| r.not_rankable),
            agreement: agreement.map(|a| a.0),
            kendall_tau: agreement.map(|a| a.1),
            median_seconds: seconds.get(seconds.len() / 2).copied(),
        }
    }

    /// Labellers who answered at least one group.
    pub fn labellers(&self) -> BTreeSet<String> {
        self.rows.iter().map(|r| r.labeller.clone()).collect()
    }
}

/// A ranking of `k` answers is `k` ranks in `0..k` (ties allowed); an
/// answer that is not a ranking (a skip, "not rankable") holds none.
fn check_ranking(ranked: bool, ranking: &[i64], k: usize) -> Result<(), LabelError> {
    let fits = ranking.len() == k && ranking.iter().all(|&r| (0..k as i64).contains(&r));
    if ranked && !fits {
        return Err(LabelError::BadRanking {
            ranking: ranking.to_vec(),
            k,
        });
    }
    Ok(())
}

/// Answer pairs two rankings order alike, all pairs, and Kendall's tau-b
/// (`None` when either ranking ties everything).
fn compare(a: &[i64], b: &[i64]) -> (usize, usize, Option<f64>) {
    let (mut same, mut total) = (0, 0);
    let (mut concordant, mut discordant, mut ties_a, mut ties_b) = (0f64, 0f64, 0f64, 0f64);
    for i in 0..a.len() {
        for j in i + 1..a.len() {
            let (x, y) = ((a[i] - a[j]).signum(), (b[i] - b[j]).signum());
            total += 1;
            same += usize::from(x == y);
            match (x, y) {
                (0, 0) => {}
                (0, _) => ties_a += 1.0,
                (_, 0) => ties_b += 1.0,
                _ if x == y => concordant += 1.0,
                _ => discordant += 1.0,
            }
        }
    }
    let n1 = concordant + discordant + ties_a;
    let n2 = concordant + discordant + ties_b;
    let tau = (n1 > 0.0 && n2 > 0.0).then(|| (concordant - discordant) / (n1 * n2).sqrt());
    (same, total, tau)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups() -> Vec<Group> {
        (0..3)
            .map(|i| Group {
                prompt: format!("Sort: {i} 1"),
                responses: vec!["a".into(), "b".into(), "<script>alert(1)</script>".into()],
                round: 1,
                policy: "ppo".into(),
            })
            .collect()
    }

    /// A ranking for what `s` showed: the answer shown first is best.
    fn in_shown_order(s: &Served) -> Vec<i64> {
        (0..s.order.len() as i64).collect()
    }

    #[test]
    fn a_restarted_queue_keeps_labels_and_serves_only_what_is_left() {
        let d = tempfile::tempdir().unwrap();
        let mut q = Queue::open(d.path(), &groups(), 1).unwrap();
        let s = q.serve("ann").unwrap().unwrap();
        let row = q
            .submit(&Submission {
                group: s.group,
                labeller: "ann".into(),
                ranking: in_shown_order(&s),
                ..Default::default()
            })
            .unwrap()
            .clone();
        // The row holds the ranking in the group's own order.
        assert_eq!(row.ranking[s.order[0]], 0);
        let s2 = q.serve("ann").unwrap().unwrap();
        q.submit(&Submission {
            group: s2.group,
            labeller: "ann".into(),
            skipped: true,
            reason: "cannot tell".into(),
            ..Default::default()
        })
        .unwrap();
        drop(q);
        // Other groups than these are fed in the second time: ignored.
        let mut q = Queue::open(d.path(), &groups()[..1], 1).unwrap();
        assert_eq!(q.rows().len(), 2);
        assert_eq!(
            q.progress(),
            (2, 3),
            "the skipped group still needs a label"
        );
        let next = q.serve("ann").unwrap().unwrap();
        assert_eq!(
            next.group, 2,
            "ann is not shown what she answered or skipped"
        );
        let bob = q.serve("bob").unwrap().unwrap();
        assert_eq!(bob.group, 1, "bob gets the group ann skipped");
        let table = crate::load::read_table(&d.path().join(LABELS_PARQUET)).unwrap();
        assert_eq!(table.height(), 2);
        assert_eq!(table.width(), 14);
    }

    #[test]
    fn a_round_sampled_again_moves_its_old_queue_aside_with_its_labels() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("queue");
        let (mut q, moved) = Queue::open_for_round(&dir, &groups(), 1).unwrap();
        assert_eq!(moved, None);
        let s = q.serve("ann").unwrap().unwrap();
        let ranking = in_shown_order(&s);
        q.submit(&Submission {
            group: s.group,
            labeller: "ann".into(),
            ranking,
            ..Default::default()
        })
        .unwrap();
        drop(q);
        // The same groups (a rerun after a stop): resumed, the label kept.
        let (q, moved) = Queue::open_for_round(&dir, &groups(), 1).unwrap();
        assert_eq!((moved, q.rows().len()), (None, 1));
        drop(q);
        // Other answers (the policy changed): a new queue; the old one kept.
        let mut other = groups();
        other[0].responses[0] = "c".into();
        let (q, moved) = Queue::open_for_round(&dir, &other, 1).unwrap();
        let moved = moved.unwrap();
        assert_eq!(moved, d.path().join("queue-superseded-1"));
        assert_eq!(
            (q.rows().len(), q.groups()[0].responses[0].as_str()),
            (0, "c")
        );
        let old = Queue::open(&moved, &[], 1).unwrap();
        assert_eq!(old.rows().len(), 1, "the labels people gave are kept");
    }

    #[test]
    fn bad_submissions_are_refused_and_change_nothing() {
        let d = tempfile::tempdir().unwrap();
        let mut q = Queue::open(d.path(), &groups(), 2).unwrap();
        let s = q.serve("ann").unwrap().unwrap();
        let sub = |ranking: Vec<i64>| Submission {
            group: s.group,
            labeller: "ann".into(),
            ranking,
            ..Default::default()
        };
        for bad in [vec![0, 1], vec![0, 1, 3], vec![-1, 0, 1]] {
            let e = q.submit(&sub(bad)).unwrap_err();
            assert!(matches!(e, LabelError::BadRanking { .. }), "{e}");
        }
        let e = q
            .submit(&Submission {
                labeller: "eve".into(),
                ..sub(vec![0, 0, 1])
            })
            .unwrap_err();
        assert!(matches!(e, LabelError::NotServed { .. }), "{e}");
        assert!(matches!(
            q.submit(&Submission {
                group: 9,
                ..sub(vec![0, 0, 1])
            }),
            Err(LabelError::NoSuchGroup(9))
        ));
        assert!(q.rows().is_empty());
        q.submit(&sub(vec![0, 0, 1])).unwrap(); // a tie is a ranking
        let e = q.submit(&sub(vec![0, 1, 2])).unwrap_err();
        assert!(
            matches!(e, LabelError::Answered { .. }),
            "a replay adds no row: {e}"
        );
        assert_eq!(q.rows().len(), 1);
    }

    #[test]
    fn imports_are_checked_whole_and_a_second_import_adds_nothing() {
        let d = tempfile::tempdir().unwrap();
        let mut q = Queue::open(d.path(), &groups(), 1).unwrap();
        let label = |group: usize, ranking: Vec<i64>| Imported {
            group,
            labeller: "label-studio:7".into(),
            ranking,
            submitted_at: 10_000,
            seconds: 4.0,
            ..Default::default()
        };
        let bad = [label(0, vec![0, 1, 1]), label(1, vec![0, 3, 1])];
        assert!(matches!(q.import(&bad), Err(LabelError::BadRanking { .. })));
        assert!(matches!(
            q.import(&[label(5, vec![0, 1, 2])]),
            Err(LabelError::NoSuchGroup(5))
        ));
        assert!(q.rows().is_empty(), "a refused import adds nothing");
        let good = [label(0, vec![0, 1, 1]), label(2, vec![2, 1, 0])];
        let counts = q.import(&good).unwrap();
        assert_eq!((counts.added, counts.already_there), (2, 0));
        assert_eq!((q.rows()[0].shown_at, q.rows()[0].seconds), (6_000, 4.0));
        let counts = q.import(&good).unwrap();
        assert_eq!((counts.added, counts.already_there), (0, 2));
        drop(q);
        let q = Queue::open(d.path(), &[], 1).unwrap();
        assert_eq!(q.progress(), (1, 3));
        assert_eq!(q.rows()[1].ranking, vec![2, 1, 0]);
    }

    #[test]
    fn two_labellers_agreement_and_rankings_for_the_reward_model() {
        let d = tempfile::tempdir().unwrap();
        let mut q = Queue::open(d.path(), &groups()[..1], 2).unwrap();
        let mut give = |who: &str, own: Vec<i64>, not_rankable: bool| {
            let s = q.serve(who).unwrap().unwrap();
            // Ranks in the shown order for the ranking `own` in the group's order.
            let shown = s.order.iter().map(|&i| own[i]).collect();
            q.submit(&Submission {
                group: s.group,
                labeller: who.into(),
                ranking: shown,
                not_rankable,
                ..Default::default()
            })
            .unwrap();
        };
        give("ann", vec![0, 1, 2], false);
        give("bob", vec![0, 2, 1], false);
        assert!(q.done());
        let (agree, tau) = q.agreement().unwrap();
        assert!((agree - 2.0 / 3.0).abs() < 1e-9, "{agree}");
        assert!((tau - 1.0 / 3.0).abs() < 1e-9, "{tau}");
        let summary = q.summary();
        assert_eq!(
            (summary.labellers, summary.ranked, summary.skipped),
            (2, 2, 0)
        );
        assert_eq!(
            (summary.agreement, summary.kendall_tau),
            (Some(agree), Some(tau))
        );
        let (ranked, dropped) = q.ranked_groups();
        assert_eq!((ranked.len(), dropped), (2, 0));
        assert_eq!(ranked[1].ranking, vec![0, 2, 1]);
    }

    #[test]
    fn the_reward_models_loader_reads_the_parquet_rows_and_counts_the_skips() {
        let d = tempfile::tempdir().unwrap();
        let mut q = Queue::open(d.path(), &groups(), 1).unwrap();
        for (i, (skipped, not_rankable)) in [(false, false), (true, false), (false, true)]
            .into_iter()
            .enumerate()
        {
            let s = q.serve("ann").unwrap().unwrap();
            assert_eq!(s.group, i);
            q.submit(&Submission {
                group: s.group,
                labeller: "ann".into(),
                ranking: if skipped || not_rankable {
                    vec![]
                } else {
                    vec![1, 0, 1]
                },
                skipped,
                not_rankable,
                ..Default::default()
            })
            .unwrap();
        }
        let path = d.path().join(LABELS_PARQUET);
        let r = crate::preference::ranked_groups(&crate::load::read_table(&path).unwrap(), &path)
            .unwrap();
        assert_eq!(
            (r.groups.len(), r.unlabelled, r.rows.clone()),
            (1, 2, vec![0])
        );
        // The tie survives: answers 0 and 2 share rank 1 in the shown order.
        let shown = &q.served[&(0, "ann".to_owned())].order;
        let mut own = [0i64; 3];
        for (pos, &idx) in shown.iter().enumerate() {
            own[idx] = [1, 0, 1][pos];
        }
        let own: Vec<usize> = own.iter().map(|&x| x as usize).collect();
        assert_eq!(r.groups[0].ranking, own);
        assert!(r
            .skipped_note()
            .unwrap()
            .contains("2 skipped or not rankable"));
    }
}
