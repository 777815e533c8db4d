//! The process groups this process started (stage children, and their
//! labellers), so that a second Ctrl-C or SIGTERM ends them all rather
//! than leaving them running, parented to init; and, in a child, the
//! watch that stops it when the runner that started it dies.

use std::io::Write;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a stopped process group may take to exit before it is killed.
pub const GRACE: Duration = Duration::from_secs(5);

static GROUPS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Remembers a child that leads its own process group.
pub fn register(pid: u32) {
    GROUPS.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
}

pub fn unregister(pid: u32) {
    GROUPS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|&p| p != pid);
}

fn signal_group(signal: &str, pid: u32) {
    let group = format!("-{pid}");
    // A group that already ended is no error: `kill`'s complaint is dropped.
    let _ = Command::new("kill")
        .args([signal, "--", &group])
        .stderr(std::process::Stdio::null())
        .status();
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Kills one group at once: a rank left waiting on a failed one.
pub fn stop_group(pid: u32) {
    signal_group("-KILL", pid);
}

/// SIGTERM to every registered group, then SIGKILL to those still there
/// after [`GRACE`].
pub fn stop_all() {
    let groups: Vec<u32> = GROUPS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for &pid in &groups {
        signal_group("-TERM", pid);
    }
    let deadline = Instant::now() + GRACE;
    while Instant::now() < deadline && groups.iter().any(|&p| alive(p)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for &pid in &groups {
        signal_group("-KILL", pid);
    }
}

/// In a child of `rlhf run`: when the runner dies (this process is
/// re-parented), stop after the current step as Ctrl-C would, and exit
/// if that takes longer than [`GRACE`] twice over.
pub fn stop_when_orphaned() {
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || {
        while std::os::unix::process::parent_id() == parent {
            std::thread::sleep(Duration::from_millis(200));
        }
        // Not eprintln!: the runner read this process's stderr, and with
        // it gone the write fails; eprintln! would panic this thread and
        // the stage would never stop.
        let _ = writeln!(
            std::io::stderr(),
            "the runner that started this stage is gone: stopping after the current step"
        );
        rlhf_stages::train::request_interrupt();
        std::thread::sleep(2 * GRACE);
        stop_all();
        std::process::exit(130);
    });
}
