//! [`Queue`]: one writer's view of a queue folder. Opening it takes the
//! folder's OS lock, so two servers, or an import beside a server, cannot
//! each rewrite the files from their own memory; the counts a request
//! needs (labels per group, who answered what, groups shown and not yet
//! answered) are kept as labels arrive, so a request never scans them all.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::*;
use crate::append_log::AppendLog;

/// The queue folder's lock file.
pub const LOCK_FILE: &str = ".lock";

/// How long a group shown to a labeller and not yet answered counts as
/// taken, so that people working at once are given different groups.
pub const DEFAULT_LEASE_MS: i64 = 10 * 60 * 1000;

/// The counts every request reads, kept as labels arrive.
#[derive(Debug, Default)]
struct Counts {
    /// Labels that count per group: rankings and "not rankable", not skips.
    labels: Vec<usize>,
    /// Groups each labeller answered (skips too).
    answered: HashMap<String, HashSet<usize>>,
    /// Groups shown to each labeller and not yet answered.
    open: HashMap<String, BTreeSet<usize>>,
    /// Per group, who holds it open and since when (Unix ms).
    leases: Vec<HashMap<String, i64>>,
    /// Groups that still need labels.
    left: usize,
    /// Below this index every group has its labels.
    first_open: usize,
}

/// A round's queue, opened for writing.
#[derive(Debug)]
pub struct Queue {
    dir: PathBuf,
    groups: Vec<Group>,
    labels_per_group: usize,
    lease_ms: i64,
    served: HashMap<(usize, String), Served>,
    rows: Vec<Arc<LabelRow>>,
    counts: Counts,
    served_log: AppendLog,
    labels_log: AppendLog,
    /// Rows in `labels.parquet` as last written.
    in_parquet: usize,
    _lock: File,
}

/// Takes the queue folder's lock, or says which process holds it.
fn lock(dir: &Path) -> Result<File, LabelError> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| file_err(&path, e))?;
    match file.try_lock() {
        Ok(()) => {
            let _ = file.set_len(0);
            let _ = write!(file, "{}", std::process::id());
            Ok(file)
        }
        Err(TryLockError::WouldBlock) => {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            let pid = pid.trim();
            Err(LabelError::Busy {
                dir: dir.to_owned(),
                pid: if pid.is_empty() {
                    "unknown".into()
                } else {
                    pid.into()
                },
            })
        }
        Err(TryLockError::Error(e)) => Err(file_err(&path, e)),
    }
}

/// The queue's groups, read without taking the lock (for an export).
pub fn read_groups(dir: &Path) -> Result<Vec<Group>, LabelError> {
    let path = dir.join(GROUPS_FILE);
    crate::files::bounded_size(&path, 1 << 32, "the limit for a queue's groups")
        .map_err(|e| file_err(&path, e))?;
    let text = std::fs::read_to_string(&path).map_err(|e| file_err(&path, e))?;
    serde_json::from_str(&text).map_err(|e| file_err(&path, e))
}

/// A queue's number of groups and its labels, read without its lock and
/// without mending anything (a torn last line is left out), for a page
/// that watches a round while its server writes.
pub fn peek(dir: &Path) -> Result<(usize, Vec<Arc<LabelRow>>), LabelError> {
    let groups = read_groups(dir)?.len();
    let path = dir.join(LABELS_FILE);
    let text = match std::fs::read(&path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(file_err(&path, e)),
    };
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    let rows = complete
        .lines()
        .filter_map(|l| serde_json::from_str::<LabelRow>(l).ok())
        .map(Arc::new)
        .collect();
    Ok((groups, rows))
}

impl Queue {
    /// The queue in `dir`: created with `groups` the first time, read back
    /// (its groups unchanged, its labels kept) after that. Fails with
    /// [`LabelError::Busy`] while another process has it open.
    pub fn open(dir: &Path, groups: &[Group], labels_per_group: usize) -> Result<Self, LabelError> {
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
        let lock = lock(dir)?;
        Self::open_locked(dir, groups, labels_per_group, lock)
    }

    fn open_locked(
        dir: &Path,
        groups: &[Group],
        labels_per_group: usize,
        lock: File,
    ) -> Result<Self, LabelError> {
        // A killed writer's temporary files; no writer is at work now.
        crate::atomic::clean_stale(dir);
        let path = dir.join(GROUPS_FILE);
        let groups = if path.exists() {
            read_groups(dir)?
        } else {
            let text = serde_json::to_string_pretty(groups).expect("groups serialise");
            atomic::write_file(&path, text.as_bytes()).map_err(|e| file_err(&path, e))?;
            groups.to_vec()
        };
        let (served_log, served) = AppendLog::open::<Served>(&dir.join(SERVED_FILE))?;
        let (labels_log, rows) = AppendLog::open::<LabelRow>(&dir.join(LABELS_FILE))?;
        let mut queue = Self {
            dir: dir.to_owned(),
            counts: Counts {
                labels: vec![0; groups.len()],
                leases: vec![HashMap::new(); groups.len()],
                ..Counts::default()
            },
            groups,
            labels_per_group: labels_per_group.max(1),
            lease_ms: DEFAULT_LEASE_MS,
            served: HashMap::new(),
            rows: Vec::new(),
            served_log,
            labels_log,
            in_parquet: usize::MAX,
            _lock: lock,
        };
        let n = queue.groups.len();
        for s in served.into_iter().filter(|s| s.group < n) {
            queue.note_served(s);
        }
        for r in rows {
            queue.note_row(Arc::new(r));
        }
        let need = queue.labels_per_group;
        let labels = &queue.counts.labels;
        queue.counts.left = labels.iter().filter(|&&n| n < need).count();
        queue.counts.first_open = labels
            .iter()
            .position(|&n| n < need)
            .unwrap_or(labels.len());
        queue.flush()?;
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
        let mut moved = None;
        if dir.join(GROUPS_FILE).exists() {
            let held = lock(dir)?;
            if read_groups(dir)? != groups {
                let name = dir
                    .file_name()
                    .map_or_else(|| "queue".into(), |n| n.to_string_lossy().into_owned());
                let to = (1..)
                    .map(|n| dir.with_file_name(format!("{name}-superseded-{n}")))
                    .find(|p| !p.exists())
                    .expect("a free name");
                // Moved while locked: no writer can be inside it.
                std::fs::rename(dir, &to).map_err(|e| file_err(dir, e))?;
                moved = Some(to);
            } else {
                return Ok((
                    Self::open_locked(dir, groups, labels_per_group, held)?,
                    None,
                ));
            }
        }
        Ok((Self::open(dir, groups, labels_per_group)?, moved))
    }

    /// How long a shown, unanswered group stays with its labeller.
    pub fn set_lease(&mut self, ms: i64) {
        self.lease_ms = ms.max(0);
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    pub fn rows(&self) -> &[Arc<LabelRow>] {
        &self.rows
    }

    pub fn labels_per_group(&self) -> usize {
        self.labels_per_group
    }

    /// Groups still needing labels, and all groups.
    pub fn progress(&self) -> (usize, usize) {
        (self.counts.left, self.groups.len())
    }

    pub fn done(&self) -> bool {
        self.counts.left == 0
    }

    /// Groups `labeller` has answered.
    pub fn answered_by(&self, labeller: &str) -> usize {
        self.counts.answered.get(labeller).map_or(0, HashSet::len)
    }

    fn answered(&self, group: usize, labeller: &str) -> bool {
        self.counts
            .answered
            .get(labeller)
            .is_some_and(|g| g.contains(&group))
    }

    fn note_served(&mut self, s: Served) {
        let key = (s.group, s.labeller.clone());
        if !self.answered(s.group, &s.labeller) {
            let open = self.counts.open.entry(s.labeller.clone()).or_default();
            open.insert(s.group);
            self.counts.leases[s.group].insert(s.labeller.clone(), s.shown_at);
        }
        self.served.insert(key, s);
    }

    /// Counts a stored row (before `left` is known, or as it arrives).
    fn note_row(&mut self, row: Arc<LabelRow>) -> bool {
        let g = row.group as usize;
        let mut completes = false;
        if g < self.groups.len() {
            let who = &row.labeller;
            self.counts
                .answered
                .entry(who.clone())
                .or_default()
                .insert(g);
            if let Some(open) = self.counts.open.get_mut(who) {
                open.remove(&g);
            }
            self.counts.leases[g].remove(who);
            if !row.skipped {
                self.counts.labels[g] += 1;
                completes = self.counts.labels[g] == self.labels_per_group;
            }
        }
        self.rows.push(row);
        completes
    }

    /// Stores rows: on disk (fsync) before they count.
    fn store(&mut self, rows: Vec<LabelRow>) -> Result<(), LabelError> {
        self.labels_log.append(&rows, true)?;
        for r in rows {
            if self.note_row(Arc::new(r)) {
                self.counts.left -= 1;
            }
        }
        while self.counts.first_open < self.groups.len()
            && self.counts.labels[self.counts.first_open] >= self.labels_per_group
        {
            self.counts.first_open += 1;
        }
        Ok(())
    }

    /// Labellers holding `group` open within the lease.
    fn held(&self, group: usize, now: i64) -> usize {
        self.counts.leases[group]
            .values()
            .filter(|&&at| now - at < self.lease_ms)
            .count()
    }

    /// The group to show `labeller` next: the first that still needs
    /// labels once those others hold are counted; when every such group
    /// is held, the one held by the fewest.
    fn pick(&self, labeller: &str) -> Option<usize> {
        let now = now_ms();
        let need = self.labels_per_group;
        let mine = self.counts.answered.get(labeller);
        let mut fallback: Option<(usize, usize)> = None;
        for g in self.counts.first_open..self.groups.len() {
            let given = self.counts.labels[g];
            if given >= need || mine.is_some_and(|m| m.contains(&g)) {
                continue;
            }
            let held = self.held(g, now);
            if given + held < need {
                return Some(g);
            }
            if fallback.is_none_or(|(_, h)| held < h) {
                fallback = Some((g, held));
            }
        }
        fallback.map(|(g, _)| g)
    }

    /// The next group for `labeller` (one they were shown and did not
    /// answer comes first), its answers shuffled for them; recorded.
    pub fn serve(&mut self, labeller: &str) -> Result<Option<Served>, LabelError> {
        if let Some(&g) = self.counts.open.get(labeller).and_then(|o| o.first()) {
            return Ok(Some(self.served[&(g, labeller.to_owned())].clone()));
        }
        let Some(group) = self.pick(labeller) else {
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
        // Not fsynced: a lost line only means the group is shown again,
        // in the same order (the shuffle is seeded by group and name).
        self.served_log
            .append(std::slice::from_ref(&served), false)?;
        self.note_served(served.clone());
        Ok(Some(served))
    }

    /// Checks and stores a submission; nothing changes when it is refused.
    pub fn submit(&mut self, s: &Submission) -> Result<Arc<LabelRow>, LabelError> {
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
        says_something(s.skipped, s.not_rankable, &s.ranking, s.label, k)?;
        let ranked = !(s.skipped || s.not_rankable) && s.label.is_none();
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
            label: s.label,
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
        self.store(vec![row])?;
        Ok(self.rows.last().expect("just stored").clone())
    }

    /// Adds labels given elsewhere, checked as submissions are (the group
    /// exists, K ranks in 0..K); one a labeller already gave for a group
    /// is counted and left out, so importing a file twice adds nothing,
    /// and so is one that says nothing (every answer tied). All or
    /// nothing: one malformed label refuses the whole import.
    pub fn import(&mut self, labels: &[Imported]) -> Result<ImportCounts, LabelError> {
        for l in labels {
            let group = self
                .groups
                .get(l.group)
                .ok_or(LabelError::NoSuchGroup(l.group))?;
            if group.responses.len() == 1 {
                return Err(LabelError::SaysNothing(format!(
                    "group {} holds one answer, labelled thumbs up or down on rlhf's own page, not imported",
                    l.group
                )));
            }
            let ranked = !(l.skipped || l.not_rankable);
            check_ranking(ranked, &l.ranking, group.responses.len())?;
        }
        let mut counts = ImportCounts::default();
        let mut new = Vec::new();
        let mut seen = HashSet::new();
        for l in labels {
            let group = &self.groups[l.group];
            let k = group.responses.len();
            if self.answered(l.group, &l.labeller) || !seen.insert((l.group, &l.labeller)) {
                counts.already_there += 1;
                continue;
            }
            if says_something(l.skipped, l.not_rankable, &l.ranking, None, k).is_err() {
                counts.says_nothing += 1;
                continue;
            }
            new.push(imported_row(group, l));
            counts.added += 1;
        }
        if !new.is_empty() {
            self.store(new)?;
            self.flush()?;
        }
        Ok(counts)
    }

    /// Writes `labels.parquet` when it lags the rows.
    pub fn flush(&mut self) -> Result<(), LabelError> {
        if self.in_parquet != self.rows.len() {
            table::write(&self.dir.join(LABELS_PARQUET), &self.rows)?;
            self.in_parquet = self.rows.len();
        }
        Ok(())
    }

    /// Rows not yet in `labels.parquet` (for a writer off the request
    /// path): the rows to write, or `None` when it is current.
    pub fn parquet_snapshot(&self) -> Option<Vec<Arc<LabelRow>>> {
        (self.in_parquet != self.rows.len()).then(|| self.rows.clone())
    }

    /// Writes a snapshot taken by [`Queue::parquet_snapshot`]; call
    /// [`Queue::parquet_written`] with its length afterwards.
    pub fn write_snapshot(dir: &Path, rows: &[Arc<LabelRow>]) -> Result<(), LabelError> {
        table::write(&dir.join(LABELS_PARQUET), rows)
    }

    pub fn parquet_written(&mut self, rows: usize) {
        self.in_parquet = rows;
    }
}

impl Drop for Queue {
    /// The table catches up with the rows a last time.
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

fn imported_row(group: &Group, l: &Imported) -> LabelRow {
    let ranked = !(l.skipped || l.not_rankable);
    let seconds = if l.seconds.is_finite() {
        l.seconds.max(0.0)
    } else {
        0.0
    };
    LabelRow {
        group: l.group as i64,
        prompt: group.prompt.clone(),
        responses: group.responses.clone(),
        ranking: if ranked { l.ranking.clone() } else { vec![] },
        label: None,
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
    }
}

/// A label must say something: a ranking that orders at least two answers,
/// a thumbs label for a group of one answer, or a skip, or "not rankable"
/// (one of them, with no ranking and no thumbs).
fn says_something(
    skipped: bool,
    not_rankable: bool,
    ranking: &[i64],
    label: Option<bool>,
    k: usize,
) -> Result<(), LabelError> {
    let refuse = |why: &str| Err(LabelError::SaysNothing(why.to_owned()));
    if skipped && not_rankable {
        return refuse("a label is a skip or \"not rankable\", not both");
    }
    if (skipped || not_rankable) && (!ranking.is_empty() || label.is_some()) {
        return refuse("a skip or \"not rankable\" carries no ranking and no thumbs label");
    }
    if k == 1 && !(skipped || not_rankable) {
        return match (label, ranking.is_empty()) {
            (Some(_), true) => Ok(()),
            (Some(_), false) => refuse("a thumbs label carries no ranking"),
            (None, _) => refuse(
                "a group of one answer takes a thumbs label: `label: true` (good) or `false` (bad), or a skip",
            ),
        };
    }
    if label.is_some() {
        return refuse("a thumbs `label` is for groups of one answer; rank this group's answers");
    }
    check_ranking(!(skipped || not_rankable), ranking, k)?;
    if !(skipped || not_rankable) && k >= 2 && ranking.iter().all(|&r| r == ranking[0]) {
        return refuse(
            "every answer is tied, which says nothing: order them, or mark the group \"not rankable\"",
        );
    }
    Ok(())
}
