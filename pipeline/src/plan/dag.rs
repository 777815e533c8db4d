//! Stages and their references -> the order to run them in.

use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DagError {
    #[error("the stages form a cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
    #[error("no stage named \"{0}\"")]
    UnknownStage(String),
}

/// A topological order of `deps` (stage -> the stages it reads); among
/// stages that are ready together, alphabetical, so plans are stable.
pub fn plan(deps: &BTreeMap<String, BTreeSet<String>>) -> Result<Vec<String>, DagError> {
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut order = Vec::with_capacity(deps.len());
    while order.len() < deps.len() {
        let ready = deps.iter().find(|(name, up)| {
            !done.contains(name.as_str()) && up.iter().all(|u| done.contains(u.as_str()))
        });
        match ready {
            Some((name, _)) => {
                done.insert(name);
                order.push(name.clone());
            }
            None => return Err(DagError::Cycle(find_cycle(deps, &done))),
        }
    }
    Ok(order)
}

/// A cycle among the stages not yet placed, as `a -> b -> a`.
fn find_cycle(deps: &BTreeMap<String, BTreeSet<String>>, done: &BTreeSet<&str>) -> Vec<String> {
    let start = deps
        .keys()
        .find(|k| !done.contains(k.as_str()))
        .expect("some stage is left");
    let mut path = vec![start.clone()];
    let mut node = start.clone();
    loop {
        // Every stage left has an upstream stage left (else it was ready).
        let next = deps[&node]
            .iter()
            .find(|u| !done.contains(u.as_str()))
            .expect("a stage left waits on another stage left")
            .clone();
        if let Some(i) = path.iter().position(|p| *p == next) {
            let mut cycle = path[i..].to_vec();
            cycle.push(next);
            return cycle;
        }
        path.push(next.clone());
        node = next;
    }
}

/// `target` and every stage it depends on, in plan order.
pub fn with_ancestors(
    order: &[String],
    deps: &BTreeMap<String, BTreeSet<String>>,
    target: &str,
) -> Result<Vec<String>, DagError> {
    if !deps.contains_key(target) {
        return Err(DagError::UnknownStage(target.into()));
    }
    let mut keep = BTreeSet::from([target.to_owned()]);
    let mut stack = vec![target.to_owned()];
    while let Some(s) = stack.pop() {
        for u in &deps[&s] {
            if keep.insert(u.clone()) {
                stack.push(u.clone());
            }
        }
    }
    Ok(order
        .iter()
        .filter(|s| keep.contains(*s))
        .cloned()
        .collect())
}

/// `roots` and every stage downstream of them.
pub fn with_descendants(
    deps: &BTreeMap<String, BTreeSet<String>>,
    roots: &[String],
) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = roots.iter().cloned().collect();
    let mut changed = true;
    while changed {
        changed = false;
        for (name, up) in deps {
            if !out.contains(name) && up.iter().any(|u| out.contains(u)) {
                out.insert(name.clone());
                changed = true;
            }
        }
    }
    out
}

/// The most of `jobs` that can run at once: the largest set of them none
/// of which is upstream of another, through any stage (Dilworth: the jobs
/// less a maximum matching of the "upstream of" order).
pub fn width(jobs: &BTreeSet<String>, deps: &BTreeMap<String, BTreeSet<String>>) -> usize {
    let list: Vec<&String> = jobs.iter().collect();
    // below[i]: the jobs downstream of job i.
    let below: Vec<Vec<usize>> = list
        .iter()
        .map(|j| {
            let down = with_descendants(deps, std::slice::from_ref(*j));
            (0..list.len())
                .filter(|&k| list[k] != *j && down.contains(list[k]))
                .collect()
        })
        .collect();
    let mut matched_to: Vec<Option<usize>> = vec![None; list.len()];
    let mut matching = 0;
    for i in 0..list.len() {
        let mut seen = vec![false; list.len()];
        if augment(i, &below, &mut matched_to, &mut seen) {
            matching += 1;
        }
    }
    list.len() - matching
}

/// Kuhn's augmenting path from job `i` to a job below it.
fn augment(
    i: usize,
    below: &[Vec<usize>],
    matched_to: &mut [Option<usize>],
    seen: &mut [bool],
) -> bool {
    for &k in &below[i] {
        if seen[k] {
            continue;
        }
        seen[k] = true;
        if matched_to[k].is_none_or(|m| augment(m, below, matched_to, seen)) {
            matched_to[k] = Some(i);
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    #[test]
    fn width_counts_the_jobs_that_can_run_at_once() {
        let d = deps(&[
            ("sft", &[]),
            ("rm", &["sft"]),
            ("ppo", &["sft", "rm"]),
            ("dpo", &["sft"]),
            ("grpo", &["rm"]),
        ]);
        let set = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<BTreeSet<_>>();
        // dpo beside rm, or ppo, grpo and dpo together.
        assert_eq!(width(&set(&["sft", "rm", "ppo", "dpo", "grpo"]), &d), 3);
        // A chain runs one at a time, also through a stage left out (rm).
        assert_eq!(width(&set(&["sft", "ppo"]), &d), 1);
        assert_eq!(width(&set(&["sft", "grpo"]), &d), 1);
        assert_eq!(width(&set(&[]), &d), 0);
    }

    use super::*;

    fn deps(edges: &[(&str, &[&str])]) -> BTreeMap<String, BTreeSet<String>> {
        edges
            .iter()
            .map(|(n, ups)| (n.to_string(), ups.iter().map(|u| u.to_string()).collect()))
            .collect()
    }

    #[test]
    fn orders_upstream_first() {
        let d = deps(&[
            ("ppo", &["sft", "rm"]),
            ("rm", &["sft"]),
            ("sft", &[]),
            ("eval", &["ppo"]),
        ]);
        assert_eq!(plan(&d).unwrap(), vec!["sft", "rm", "ppo", "eval"]);
        assert_eq!(
            with_ancestors(&plan(&d).unwrap(), &d, "rm").unwrap(),
            vec!["sft", "rm"]
        );
        let down = with_descendants(&d, &["rm".into()]);
        assert_eq!(
            down.into_iter().collect::<Vec<_>>(),
            vec!["eval", "ppo", "rm"]
        );
    }

    #[test]
    fn cycles_are_named() {
        let d = deps(&[("a", &["c"]), ("b", &["a"]), ("c", &["b"]), ("s", &[])]);
        assert_eq!(
            plan(&d).unwrap_err(),
            DagError::Cycle(vec!["a".into(), "c".into(), "b".into(), "a".into()])
        );
        assert_eq!(
            plan(&d).unwrap_err().to_string(),
            "the stages form a cycle: a -> c -> b -> a"
        );
    }
}
