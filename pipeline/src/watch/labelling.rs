//! Each loop round's labelling queue as the page shows it: how many groups
//! have all their labels, by how many labellers, and how far they agree.
//! Read without the queue's lock (the round's server holds it).

use std::path::Path;

use rlhf_datasets::labels::LabelSummary;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct QueueState {
    /// `round-1/queue`.
    pub queue: String,
    /// Groups with all the labels they need.
    pub done: usize,
    pub summary: LabelSummary,
}

/// The queues of the run's rounds, in round order.
pub fn queues(run_dir: &Path) -> Vec<QueueState> {
    let mut rounds: Vec<(usize, String)> = std::fs::read_dir(run_dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| Some((crate::run_folder::round_of(&n)?, n)))
        .collect();
    rounds.sort();
    rounds
        .into_iter()
        .filter_map(|(_, round)| queue_state(run_dir, &round))
        .collect()
}

fn queue_state(run_dir: &Path, round: &str) -> Option<QueueState> {
    let dir = run_dir.join(round).join(crate::run_folder::QUEUE_DIR);
    let (groups, rows) = rlhf_datasets::labels::peek(&dir).ok()?;
    let per_group = labels_per_group(&run_dir.join(round));
    let mut counts = vec![0usize; groups];
    for r in &rows {
        if let Some(n) = usize::try_from(r.group)
            .ok()
            .and_then(|g| counts.get_mut(g))
        {
            *n += 1;
        }
    }
    Some(QueueState {
        queue: format!("{round}/{}", crate::run_folder::QUEUE_DIR),
        done: counts.iter().filter(|&&n| n >= per_group).count(),
        summary: LabelSummary::of(&rows, groups, per_group),
    })
}

/// What the round's collect stage asked of each group (its stage.json),
/// else one label.
fn labels_per_group(round_dir: &Path) -> usize {
    let path = round_dir
        .join(crate::experiment::COLLECT_KIND)
        .join(crate::exec::planned::STAGE_FILE);
    rlhf_datasets::files::read_bounded(&path, 16 << 20, "the limit for a stage file")
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["settings"]["labeller"]["labels_per_group"].as_u64())
        .map_or(1, |n| n.max(1) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rlhf_datasets::labels::{Group, Queue, Submission};

    #[test]
    fn a_rounds_queue_is_read_while_its_server_holds_it() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path();
        let collect = run.join("round-1/collect");
        std::fs::create_dir_all(&collect).unwrap();
        std::fs::write(
            collect.join("stage.json"),
            r#"{"settings": {"labeller": {"kind": "web", "labels_per_group": 2}}}"#,
        )
        .unwrap();
        let groups: Vec<Group> = (0..3)
            .map(|i| Group {
                prompt: format!("p{i}"),
                responses: vec!["a".into(), "b".into(), "c".into()],
                round: 1,
                policy: "round-1/ppo".into(),
            })
            .collect();
        // Held open (locked) as the round's server holds it.
        let mut queue = Queue::open(&run.join("round-1/queue"), &groups, 2).unwrap();
        for who in ["ann", "bob"] {
            for ranking in [vec![0, 1, 2], vec![2, 1, 0]] {
                let served = queue.serve(who).unwrap().unwrap();
                let submission = Submission {
                    group: served.group,
                    labeller: who.into(),
                    ranking,
                    ..Default::default()
                };
                queue.submit(&submission).unwrap();
            }
        }
        let shown = queues(run);
        assert_eq!(shown.len(), 1);
        assert_eq!(shown[0].queue, "round-1/queue");
        assert_eq!(shown[0].summary, queue.summary());
        assert_eq!(shown[0].summary.labellers, 2);
        assert_eq!(shown[0].done, 2, "two groups have both their labels");
        assert!(shown[0].summary.agreement.is_some());
    }
}
