//! Runs a DAG's jobs side by side: every job whose upstream jobs have
//! finished starts, up to `parallel` at once, each on its own thread (the
//! jobs themselves wait on child processes or cluster jobs). A job that
//! fails stops its descendants only; the other branches finish. After an
//! interrupt nothing new starts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc;

/// A job that failed, and its error.
#[derive(Debug)]
pub struct Failure {
    pub job: String,
    pub error: anyhow::Error,
}

/// What a run of the DAG did.
#[derive(Debug)]
pub struct Finished<T> {
    /// Each finished job's result.
    pub done: BTreeMap<String, T>,
    /// In the order they failed.
    pub failed: Vec<Failure>,
    /// Jobs not started: downstream of a failure, or after an interrupt.
    pub not_run: Vec<String>,
}

/// Runs `order` (a topological order of `deps`' jobs, or a part of one
/// closed under upstream jobs): `job(name, upstream results)` once each
/// job's upstream jobs have succeeded, at most `parallel` at once, ready
/// jobs started in `order`'s order. `stop()` true starts nothing more.
pub fn run_dag<T, J, S>(
    order: &[String],
    deps: &BTreeMap<String, BTreeSet<String>>,
    parallel: usize,
    job: J,
    stop: S,
) -> Finished<T>
where
    T: Send + Clone,
    J: Fn(&str, &BTreeMap<String, T>) -> anyhow::Result<T> + Sync,
    S: Fn() -> bool,
{
    let parallel = parallel.max(1);
    let mut pending: Vec<&String> = order.iter().collect();
    let mut out: Finished<T> = Finished {
        done: BTreeMap::new(),
        failed: Vec::new(),
        not_run: Vec::new(),
    };
    let (tx, rx) = mpsc::channel::<(String, anyhow::Result<T>)>();
    std::thread::scope(|scope| {
        let mut running = 0usize;
        loop {
            while running < parallel && !stop() {
                let ready = pending
                    .iter()
                    .position(|name| upstream_of(deps, name).all(|u| out.done.contains_key(u)));
                let Some(i) = ready else { break };
                let name = pending.remove(i).clone();
                let inputs: BTreeMap<String, T> = upstream_of(deps, &name)
                    .map(|u| (u.clone(), out.done[u].clone()))
                    .collect();
                let (tx, job) = (tx.clone(), &job);
                scope.spawn(move || {
                    // A panic is this job's failure, not a hang of the run.
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        job(&name, &inputs)
                    }))
                    .unwrap_or_else(|_| {
                        Err(anyhow::anyhow!(
                            "{name}: the runner's thread for it panicked"
                        ))
                    });
                    let _ = tx.send((name, r));
                });
                running += 1;
            }
            if running == 0 {
                break;
            }
            let Ok((name, result)) = rx.recv() else { break };
            running -= 1;
            match result {
                Ok(value) => {
                    out.done.insert(name, value);
                }
                Err(error) => {
                    let below =
                        crate::plan::dag::with_descendants(deps, std::slice::from_ref(&name));
                    pending.retain(|p| {
                        let blocked = below.contains(p.as_str());
                        if blocked {
                            out.not_run.push((*p).clone());
                        }
                        !blocked
                    });
                    out.failed.push(Failure { job: name, error });
                }
            }
        }
    });
    out.not_run.extend(pending.into_iter().cloned());
    out
}

fn upstream_of<'a>(
    deps: &'a BTreeMap<String, BTreeSet<String>>,
    name: &str,
) -> impl Iterator<Item = &'a String> {
    deps.get(name).into_iter().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    fn deps(edges: &[(&str, &[&str])]) -> BTreeMap<String, BTreeSet<String>> {
        edges
            .iter()
            .map(|(n, up)| (n.to_string(), up.iter().map(|u| u.to_string()).collect()))
            .collect()
    }

    fn names(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|x| x.to_string()).collect()
    }

    /// Runs jobs that sleep 150 ms; returns each job's start and end.
    fn timed(parallel: usize) -> BTreeMap<String, (Instant, Instant)> {
        let d = deps(&[("a", &[]), ("b", &[]), ("c", &["a", "b"])]);
        let spans = Mutex::new(BTreeMap::new());
        let out = run_dag(
            &names(&["a", "b", "c"]),
            &d,
            parallel,
            |name, up: &BTreeMap<String, u32>| {
                let t0 = Instant::now();
                std::thread::sleep(Duration::from_millis(150));
                spans
                    .lock()
                    .unwrap()
                    .insert(name.to_owned(), (t0, Instant::now()));
                Ok(up.values().sum::<u32>() + 1)
            },
            || false,
        );
        assert!(out.failed.is_empty() && out.not_run.is_empty());
        assert_eq!(out.done["c"], 3, "c sees both upstream results");
        spans.into_inner().unwrap()
    }

    #[test]
    fn independent_jobs_overlap_up_to_the_limit() {
        let s = timed(2);
        assert!(
            s["a"].0 < s["b"].1 && s["b"].0 < s["a"].1,
            "a and b overlapped"
        );
        assert!(
            s["c"].0 >= s["a"].1 && s["c"].0 >= s["b"].1,
            "c waited for both"
        );
        let s = timed(1);
        assert!(s["b"].0 >= s["a"].1, "one at a time");
    }

    #[test]
    fn a_failure_stops_its_descendants_only() {
        let d = deps(&[
            ("a", &[]),
            ("b", &["a"]),
            ("c", &["b"]),
            ("x", &[]),
            ("y", &["x"]),
        ]);
        let out = run_dag(
            &names(&["a", "x", "b", "y", "c"]),
            &d,
            2,
            |name, _: &BTreeMap<String, ()>| match name {
                "a" => anyhow::bail!("a broke"),
                _ => Ok(()),
            },
            || false,
        );
        assert_eq!(out.failed.len(), 1);
        assert_eq!(out.failed[0].job, "a");
        assert_eq!(out.done.keys().collect::<Vec<_>>(), ["x", "y"]);
        let mut not_run = out.not_run.clone();
        not_run.sort();
        assert_eq!(not_run, ["b", "c"]);
    }

    #[test]
    fn nothing_starts_after_a_stop() {
        let d = deps(&[("a", &[]), ("b", &["a"])]);
        let started = Mutex::new(0);
        let out = run_dag(
            &names(&["a", "b"]),
            &d,
            2,
            |_, _: &BTreeMap<String, ()>| {
                *started.lock().unwrap() += 1;
                Ok(())
            },
            || *started.lock().unwrap() >= 1,
        );
        assert_eq!(*started.lock().unwrap(), 1);
        assert_eq!(out.not_run, ["b"]);
    }
}
