//! The labelling queue of a loop round (first step of the labelling web
//! page): groups of sampled answers waiting for people's rankings, who was
//! shown what, and every submission.
//!
//! A queue folder holds `groups.json` (written once: a rerun resumes the
//! same groups), `served.jsonl` (each group shown to a labeller, with the
//! order its answers were shown in) and the submissions: `labels.jsonl`,
//! the record read back on a restart, and `labels.parquet`, the same rows
//! for people and the reward model's loader. A submission is appended to
//! `labels.jsonl` and on disk (fsync) before it is acknowledged, so a crash
//! loses no acknowledged label; `labels.parquet` is rewritten whole, off the
//! request path, and always when the queue is opened, done or closed.
//!
//! A group of one answer is labelled thumbs up or down (`label`: true or
//! false) instead of ranked: KTO's unpaired labels. Its rows in
//! `labels.parquet` carry the label and no ranking.
//!
//! One process writes a queue at a time: [`Queue::open`] takes the
//! folder's OS lock (`.lock`), and a second server or an import beside a
//! running one is refused naming the holder's pid.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    #[error("{0}")]
    SaysNothing(String),
    #[error("{dir}: another rlhf process (pid {pid}) has this labelling queue open; labels reach it only through that process (its page), or stop it first")]
    Busy { dir: PathBuf, pid: String },
}

impl From<crate::append_log::AppendLogError> for LabelError {
    fn from(e: crate::append_log::AppendLogError) -> Self {
        LabelError::File {
            path: e.path,
            message: e.message,
        }
    }
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
/// were shown (for one answer: a thumbs `label`), or a skip, or "not
/// rankable".
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Submission {
    pub group: usize,
    pub labeller: String,
    #[serde(default)]
    pub ranking: Vec<i64>,
    /// A group of one answer: good (thumbs up) or bad.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<bool>,
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
    /// A thumbs label (groups of one answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<bool>,
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
    /// Labels that say nothing (every answer tied), left out.
    pub says_nothing: usize,
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

mod queue;
mod table;

pub use queue::{peek, read_groups, Queue, DEFAULT_LEASE_MS, LOCK_FILE};

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

impl Queue {
    /// The rankings the reward model learns from: one group per ranked
    /// label (skips, "not rankable" and thumbs dropped), and how many were
    /// dropped.
    pub fn ranked_groups(&self) -> (Vec<RankedGroup>, usize) {
        let mut dropped = 0;
        let mut out = Vec::new();
        for r in self.rows() {
            if r.skipped || r.not_rankable || r.label.is_some() {
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
    /// pairs every two labellers order alike (ties count as an order; for
    /// thumbs, the share of labels alike), and the mean Kendall's tau-b
    /// between two labellers' rankings (0 for thumbs alone).
    pub fn agreement(&self) -> Option<(f64, f64)> {
        agreement_of(self.rows())
    }

    /// The labels in numbers.
    pub fn summary(&self) -> LabelSummary {
        LabelSummary::of(self.rows(), self.groups().len(), self.labels_per_group())
    }

    /// Labellers who answered at least one group.
    pub fn labellers(&self) -> BTreeSet<String> {
        self.rows().iter().map(|r| r.labeller.clone()).collect()
    }
}

/// [`Queue::agreement`] of any labels.
pub fn agreement_of(rows: &[Arc<LabelRow>]) -> Option<(f64, f64)> {
    let mut by_group: BTreeMap<i64, Vec<&LabelRow>> = BTreeMap::new();
    for r in rows.iter().filter(|r| !r.skipped && !r.not_rankable) {
        by_group.entry(r.group).or_default().push(r.as_ref());
    }
    let (mut agree, mut pairs, mut taus) = (0usize, 0usize, Vec::new());
    for rows in by_group.values().filter(|v| v.len() >= 2) {
        for (i, a) in rows.iter().enumerate() {
            for b in &rows[i + 1..] {
                if let (Some(x), Some(y)) = (a.label, b.label) {
                    agree += usize::from(x == y);
                    pairs += 1;
                    continue;
                }
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

impl LabelSummary {
    /// The numbers of `rows`, labels of a queue of `groups` groups that
    /// each want `labels_per_group` labels.
    pub fn of(rows: &[Arc<LabelRow>], groups: usize, labels_per_group: usize) -> Self {
        let count = |f: fn(&LabelRow) -> bool| rows.iter().filter(|r| f(r)).count();
        // Ranked labels with a known time (an import may not say).
        let mut seconds: Vec<f64> = rows
            .iter()
            .filter(|r| !r.skipped && !r.not_rankable && r.seconds > 0.0)
            .map(|r| r.seconds)
            .collect();
        seconds.sort_by(f64::total_cmp);
        let agreement = agreement_of(rows);
        let labellers: BTreeSet<&str> = rows.iter().map(|r| r.labeller.as_str()).collect();
        LabelSummary {
            groups,
            labels_per_group,
            labellers: labellers.len(),
            ranked: count(|r| !r.skipped && !r.not_rankable),
            skipped: count(|r| r.skipped),
            not_rankable: count(|r| r.not_rankable),
            agreement: agreement.map(|a| a.0),
            kendall_tau: agreement.map(|a| a.1),
            median_seconds: seconds.get(seconds.len() / 2).copied(),
        }
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
    use std::sync::Arc;

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
        assert_eq!(table.width(), 15);
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
        let mut shown = None;
        for (i, (skipped, not_rankable)) in [(false, false), (true, false), (false, true)]
            .into_iter()
            .enumerate()
        {
            let s = q.serve("ann").unwrap().unwrap();
            assert_eq!(s.group, i);
            shown.get_or_insert(s.order.clone());
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
        q.flush().unwrap();
        let path = d.path().join(LABELS_PARQUET);
        let r = crate::preference::ranked_groups(&crate::load::read_table(&path).unwrap(), &path)
            .unwrap();
        assert_eq!(
            (r.groups.len(), r.unlabelled, r.rows.clone()),
            (1, 2, vec![0])
        );
        // The tie survives: answers 0 and 2 share rank 1 in the shown order.
        let shown = shown.unwrap();
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

    /// One answer per group: thumbs up or down, two labellers, read back
    /// by KTO's loader from `labels.parquet`.
    #[test]
    fn one_answer_groups_take_thumbs_labels_that_ktos_loader_reads() {
        let d = tempfile::tempdir().unwrap();
        let one: Vec<Group> = groups()
            .into_iter()
            .map(|g| Group {
                responses: vec![g.responses[g.prompt.len() % 3].clone()],
                ..g
            })
            .collect();
        let mut q = Queue::open(d.path(), &one, 2).unwrap();
        let mut give = |who: &str, label: Option<bool>, skipped: bool| {
            let s = q.serve(who).unwrap().unwrap();
            let thumbs = Submission {
                group: s.group,
                labeller: who.into(),
                label,
                skipped,
                ..Default::default()
            };
            for bad in [vec![0], vec![0, 1]]
                .into_iter()
                .filter(|_| label.is_some() || skipped)
            {
                let wrong = Submission {
                    ranking: bad,
                    ..thumbs.clone()
                };
                let e = q.submit(&wrong).unwrap_err();
                assert!(e.to_string().contains("carries no ranking"), "{e}");
            }
            q.submit(&thumbs).map(|r| (s.group, r.label))
        };
        let e = give("ann", None, false).unwrap_err();
        assert!(e.to_string().contains("takes a thumbs label"), "{e}");
        assert_eq!(give("ann", Some(true), false).unwrap(), (0, Some(true)));
        assert_eq!(give("bob", Some(false), false).unwrap(), (0, Some(false)));
        assert_eq!(give("ann", Some(false), false).unwrap(), (1, Some(false)));
        assert_eq!(give("bob", Some(false), false).unwrap(), (1, Some(false)));
        assert_eq!(give("ann", None, true).unwrap(), (2, None));
        // Labellers agree on one group of two.
        assert_eq!(q.agreement().map(|a| a.0), Some(0.5));
        assert_eq!(q.ranked_groups().0.len(), 0, "thumbs are no rankings");
        q.flush().unwrap();
        let path = d.path().join(LABELS_PARQUET);
        let u = crate::unpaired::labelled_answers(&crate::load::read_table(&path).unwrap(), &path)
            .unwrap();
        let got: Vec<(&str, bool)> = u
            .answers
            .iter()
            .map(|a| (a.answer.as_str(), a.desirable))
            .collect();
        assert_eq!(
            got,
            [
                (one[0].responses[0].as_str(), true),
                (one[0].responses[0].as_str(), false),
                (one[1].responses[0].as_str(), false),
                (one[1].responses[0].as_str(), false)
            ]
        );
        assert_eq!(u.unlabelled, 1, "the skip");
        // A ranked group refuses a thumbs label.
        let d2 = tempfile::tempdir().unwrap();
        let mut ranked_queue = Queue::open(d2.path(), &groups(), 1).unwrap();
        let s = ranked_queue.serve("ann").unwrap().unwrap();
        let e = ranked_queue
            .submit(&Submission {
                group: s.group,
                labeller: "ann".into(),
                label: Some(true),
                ..Default::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains("for groups of one answer"), "{e}");
        // Its table's all-null label column does not hide its rankings.
        ranked(&mut ranked_queue, "bob");
        ranked_queue.flush().unwrap();
        let path = d2.path().join(LABELS_PARQUET);
        let u = crate::unpaired::labelled_answers(&crate::load::read_table(&path).unwrap(), &path)
            .unwrap();
        assert_eq!(u.answers.len(), 2, "best and worst of the ranking");
    }

    fn ranked(q: &mut Queue, who: &str) -> Arc<LabelRow> {
        let s = q.serve(who).unwrap().unwrap();
        q.submit(&Submission {
            group: s.group,
            labeller: who.into(),
            ranking: in_shown_order(&s),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn one_process_writes_a_queue_and_a_second_is_refused_naming_the_first() {
        let d = tempfile::tempdir().unwrap();
        let mut q = Queue::open(d.path(), &groups(), 1).unwrap();
        ranked(&mut q, "ann");
        let e = Queue::open(d.path(), &[], 1).unwrap_err();
        assert!(matches!(e, LabelError::Busy { .. }), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        let e = Queue::open_for_round(d.path(), &groups(), 1).unwrap_err();
        assert!(matches!(e, LabelError::Busy { .. }), "{e}");
        // The groups can still be read, without the lock (an export).
        assert_eq!(read_groups(d.path()).unwrap().len(), 3);
        drop(q);
        let q = Queue::open(d.path(), &[], 1).unwrap();
        assert_eq!((q.rows().len(), q.progress()), (1, (2, 3)));
    }

    #[test]
    fn people_working_at_once_are_given_different_groups_until_a_lease_runs_out() {
        let d = tempfile::tempdir().unwrap();
        let mut q = Queue::open(d.path(), &groups(), 1).unwrap();
        let shown: Vec<usize> = ["ann", "bob", "cy"]
            .iter()
            .map(|who| q.serve(who).unwrap().unwrap().group)
            .collect();
        assert_eq!(shown, [0, 1, 2], "each is given a group nobody holds");
        // All held: the next person gets one anyway (the least held).
        assert_eq!(q.serve("dee").unwrap().unwrap().group, 0);
        // bob answers; his group is done and nobody is given it again.
        q.submit(&Submission {
            group: 1,
            labeller: "bob".into(),
            ranking: vec![0, 1, 2],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(q.serve("bob").unwrap().unwrap().group, 2, "the least held");
        // A lease that has run out no longer holds its group.
        let mut q2 = {
            drop(q);
            Queue::open(d.path(), &[], 1).unwrap()
        };
        q2.set_lease(0);
        assert_eq!(q2.serve("eve").unwrap().unwrap().group, 0);
        assert_eq!(q2.progress(), (2, 3));
    }

    #[test]
    fn labels_that_say_nothing_are_refused_and_an_import_leaves_them_out() {
        let d = tempfile::tempdir().unwrap();
        let mut q = Queue::open(d.path(), &groups(), 1).unwrap();
        let s = q.serve("ann").unwrap().unwrap();
        let sub = |ranking: Vec<i64>, skipped: bool, not_rankable: bool| Submission {
            group: s.group,
            labeller: "ann".into(),
            ranking,
            skipped,
            not_rankable,
            ..Default::default()
        };
        for bad in [
            sub(vec![], true, true),
            sub(vec![1, 1, 1], false, false),
            sub(vec![0, 1, 2], true, false),
            sub(vec![0, 1, 2], false, true),
        ] {
            let e = q.submit(&bad).unwrap_err();
            assert!(matches!(e, LabelError::SaysNothing(_)), "{e}");
        }
        assert!(q.rows().is_empty() && q.answered_by("ann") == 0);
        let tied = Imported {
            group: 1,
            labeller: "ls:1".into(),
            ranking: vec![2, 2, 2],
            ..Default::default()
        };
        let ok = Imported {
            group: 2,
            ranking: vec![0, 1, 2],
            ..tied.clone()
        };
        let counts = q.import(&[tied, ok]).unwrap();
        assert_eq!((counts.added, counts.says_nothing), (1, 1));
        assert_eq!(q.progress(), (2, 3));
    }

    #[test]
    fn a_killed_writers_temporary_files_are_removed_when_the_queue_opens() {
        let d = tempfile::tempdir().unwrap();
        drop(Queue::open(d.path(), &groups(), 1).unwrap());
        let stale = d.path().join(".labels.parquet.tmp-4294967294");
        std::fs::write(&stale, "half").unwrap();
        drop(Queue::open(d.path(), &[], 1).unwrap());
        assert!(!stale.exists());
    }

    #[test]
    fn counts_kept_as_labels_arrive_equal_those_read_back() {
        let d = tempfile::tempdir().unwrap();
        let mut q = Queue::open(d.path(), &groups(), 2).unwrap();
        for who in ["ann", "bob", "ann", "cy"] {
            ranked(&mut q, who);
        }
        let live = (q.progress(), q.answered_by("ann"), q.rows().len());
        drop(q);
        let q = Queue::open(d.path(), &[], 2).unwrap();
        assert_eq!(live, (q.progress(), q.answered_by("ann"), q.rows().len()));
        assert_eq!(live, ((1, 3), 2, 4));
    }
}
