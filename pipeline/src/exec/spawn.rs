//! Running `rlhf` children for the runner: one process, or the N ranks of
//! a data-parallel stage on this machine (with the variables torchrun
//! would set). Their output is echoed with a prefix, a Ctrl-C is forwarded
//! once, and a rank that fails takes the others down after a grace period
//! instead of leaving them waiting.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long the other ranks may take to notice a failed one (they fail at
/// their next collective) before they are stopped, at most.
const PEER_GRACE: Duration = Duration::from_secs(30);

/// One started child and the threads that echo its output.
struct Running {
    child: Child,
    pid: u32,
    echo: Vec<JoinHandle<Option<String>>>,
}

/// Runs `rlhf ARGS` as `ranks` processes (1: alone), prefixing their
/// output lines with `label` (and the rank); returns the JSON summary rank
/// 0 prints last. Once a rank has failed, the others get `grace` (at most
/// [`PEER_GRACE`]) to fail at their next collective before they are
/// stopped and named. `side_by_side`: how many stages share this
/// machine's cores with this one, itself included.
pub fn run_ranks(
    label: &str,
    args: &[String],
    ranks: usize,
    grace: Duration,
    side_by_side: usize,
) -> anyhow::Result<serde_json::Value> {
    let port = match ranks {
        1 => 0,
        _ => free_port()?,
    };
    let mut running = Vec::new();
    for rank in 0..ranks {
        let prefix = match rank {
            0 => format!("[{label}] "),
            r => format!("[{label} r{r}] "),
        };
        let env = rank_env(rank, ranks, port, side_by_side);
        match start(label, args, &env, prefix) {
            Ok(r) => running.push(r),
            Err(e) => {
                // The ranks already started would wait for this one.
                for r in &running {
                    crate::exec::children::stop_group(r.pid);
                    crate::exec::children::unregister(r.pid);
                }
                return Err(e);
            }
        }
    }
    let pids: Vec<u32> = running.iter().map(|r| r.pid).collect();
    let done = Arc::new(AtomicBool::new(false));
    let watcher = forward_interrupt(pids.clone(), done.clone());
    let (statuses, first_failed, stopped) = wait_all(&mut running, grace.min(PEER_GRACE))?;
    done.store(true, Ordering::SeqCst);
    let _ = watcher.join();
    let mut last = None;
    for (rank, r) in running.into_iter().enumerate() {
        crate::exec::children::unregister(r.pid);
        for e in r.echo {
            let line = e.join().ok().flatten();
            if rank == 0 && line.is_some() {
                last = line;
            }
        }
    }
    // A stop every rank agreed on (130) is no rank's failure, but still no
    // success.
    let first_failed = first_failed.or_else(|| statuses.iter().position(|s| !s.success()));
    if let Some(rank) = first_failed {
        let status = statuses[rank];
        if rlhf_stages::train::interrupt_requested() || status.code() == Some(130) {
            bail!("{label} was interrupted");
        }
        let waited = grace.min(PEER_GRACE).as_secs();
        match (ranks, stopped.as_slice()) {
            (1, _) => bail!("{label} failed ({status})"),
            (_, []) => bail!(
                "{label}: rank {rank} of {ranks} failed first ({status}); the other ranks stopped after it"
            ),
            // The hung ranks lead: the one that failed first most likely
            // gave up waiting for them.
            (_, hung) => bail!(
                "{label}: rank(s) {hung:?} of {ranks} hung (still running {waited} s after rank {rank} failed ({status}), blocked in a collective or stopped) and were stopped"
            ),
        }
    }
    let last = last.unwrap_or_default();
    Ok(serde_json::from_str(&last).unwrap_or(serde_json::Value::Null))
}

/// The variables torchrun sets, for rank `rank` of `world` on this
/// machine, and how many stages share its cores.
fn rank_env(
    rank: usize,
    world: usize,
    port: u16,
    side_by_side: usize,
) -> Vec<(&'static str, String)> {
    let mut env = torchrun_env(rank, world, port);
    env.push((
        crate::threads::SIDE_BY_SIDE_ENV,
        side_by_side.max(1).to_string(),
    ));
    env
}

fn torchrun_env(rank: usize, world: usize, port: u16) -> Vec<(&'static str, String)> {
    if world == 1 {
        // One process, even inside a Slurm job of many tasks.
        return vec![("RANK", "0".into()), ("WORLD_SIZE", "1".into())];
    }
    vec![
        ("RANK", rank.to_string()),
        ("LOCAL_RANK", rank.to_string()),
        ("WORLD_SIZE", world.to_string()),
        ("LOCAL_WORLD_SIZE", world.to_string()),
        ("MASTER_ADDR", "127.0.0.1".into()),
        ("MASTER_PORT", port.to_string()),
    ]
}

/// A port free now on 127.0.0.1, for the ranks' rendezvous.
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

fn start(
    label: &str,
    args: &[String],
    env: &[(&'static str, String)],
    prefix: String,
) -> anyhow::Result<Running> {
    use std::os::unix::process::CommandExt;
    let exe = crate::exec::own_binary()?;
    // The child gets its own process group: a terminal's Ctrl-C reaches only
    // the runner, which forwards it once (a second signal would make the
    // child stop without its checkpoint).
    let mut child = Command::new(exe)
        .arg0("rlhf")
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {label}"))?;
    let pid = child.id();
    crate::exec::children::register(pid);
    let stderr = child.stderr.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let err_prefix = prefix.clone();
    let echo = vec![
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{err_prefix}{line}");
            }
            None
        }),
        std::thread::spawn(move || {
            let mut last = None;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("{prefix}{line}");
                last = Some(line);
            }
            last
        }),
    ];
    Ok(Running { child, pid, echo })
}

/// Sends every child SIGINT once the runner is interrupted.
fn forward_interrupt(pids: Vec<u32>, done: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        while !done.load(Ordering::SeqCst) {
            if rlhf_stages::train::interrupt_requested() {
                for pid in &pids {
                    let _ = Command::new("kill")
                        .args(["-INT", &pid.to_string()])
                        .status();
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

/// What the ranks did: every exit status, the rank that failed first, and
/// the ranks the runner stopped.
type Exits = (Vec<ExitStatus>, Option<usize>, Vec<usize>);

/// Waits for every child; once one has failed, the others get `grace` to
/// notice before their process groups are stopped.
fn wait_all(running: &mut [Running], grace: Duration) -> anyhow::Result<Exits> {
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; running.len()];
    let mut failed: Option<(usize, Instant)> = None;
    let mut stopped = Vec::new();
    while statuses.iter().any(Option::is_none) {
        for (rank, (r, status)) in running.iter_mut().zip(statuses.iter_mut()).enumerate() {
            if status.is_none() {
                *status = r.child.try_wait()?;
                // An agreed stop (Ctrl-C: 130) is no failure: rank 0 may
                // still be writing its checkpoint.
                let stop = |s: ExitStatus| s.code() == Some(130);
                if status.is_some_and(|s| !s.success() && !stop(s)) {
                    // Of ranks seen ending in one poll, one killed by a
                    // signal is the cause; the others exit with an error.
                    let killed = status.is_some_and(|s| s.signal().is_some());
                    match failed {
                        None => failed = Some((rank, Instant::now())),
                        Some((_, at)) if killed && at.elapsed() < Duration::from_millis(1) => {
                            failed = Some((rank, at));
                        }
                        _ => {}
                    }
                }
            }
        }
        let failed_at = failed.map(|(_, t)| t);
        if failed_at.is_some_and(|t| t.elapsed() > grace) {
            for (rank, (r, status)) in running.iter().zip(&statuses).enumerate() {
                if status.is_none() && !stopped.contains(&rank) {
                    crate::exec::children::stop_group(r.pid);
                    stopped.push(rank);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let statuses = statuses
        .into_iter()
        .map(|s| s.expect("all exited"))
        .collect();
    Ok((statuses, failed.map(|(rank, _)| rank), stopped))
}
