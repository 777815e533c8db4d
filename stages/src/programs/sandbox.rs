//! Runs untrusted Python (a policy's code answer) confined: in a
//! throwaway folder it may read and write, with the interpreter's own
//! folders readable and nothing else (Landlock); no new processes, no
//! sockets but Unix ones, no raising its limits and none of root's other
//! powers (seccomp); CPU time, memory, file size and open files bounded
//! (rlimits); a wall-clock deadline that kills its process group; and
//! killed when the thread that started it dies.
//!
//! Root keeps its uid (CI runs as root, and the interpreter may live in
//! root's home): the system calls through which root's capabilities act
//! beyond the file system are refused instead.

#![allow(unsafe_code)] // `pre_exec`, the only way to confine a child before it runs

use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use landlock::{
    path_beneath_rules, Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd,
    Ruleset, RulesetAttr, RulesetCreated, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What one run may use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Killed (with what it started) after this long.
    pub wall_seconds: f64,
    /// Address space, in MiB.
    pub memory_mb: u64,
    /// The largest file it may write, in MiB.
    pub file_mb: u64,
}

/// How a confined run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// It exited with this status.
    Exited(i32),
    /// A signal ended it (SIGXCPU at the CPU limit, SIGXFSZ past the file size).
    Signalled(i32),
    /// It was killed at the wall-clock deadline.
    TimedOut,
}

/// A confined run's ending and the end of what it wrote to stderr.
#[derive(Debug, Clone)]
pub struct Finished {
    pub ending: Ending,
    pub stderr_tail: String,
}

/// A Python interpreter to run confined, with the folders it reads.
#[derive(Debug, Clone)]
pub struct Sandbox {
    python: PathBuf,
    readable: Vec<PathBuf>,
}

/// Readable by every confined run: the loader, libraries and binaries.
const SYSTEM_DIRS: [&str; 5] = ["/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache"];
/// Character devices a program may open.
const DEVICES: [&str; 3] = ["/dev/null", "/dev/zero", "/dev/urandom"];
const ABI_USED: ABI = ABI::V6;

impl Sandbox {
    /// `python` (a name on PATH or a path) confined, after checking that
    /// confinement works here and that the interpreter runs under it.
    pub fn new(python: &str) -> Result<Self, String> {
        let python = which(python)?;
        let prefixes = Command::new(&python)
            .args(["-I", "-c", "import sys; print(sys.executable); print(sys.base_prefix); print(sys.base_exec_prefix)"])
            .stderr(Stdio::null())
            .output()
            .map_err(|e| format!("{} could not start: {e}", python.display()))?;
        if !prefixes.status.success() {
            return Err(format!(
                "{} failed to start ({})",
                python.display(),
                prefixes.status
            ));
        }
        // The interpreter itself, not a venv's link or pyenv's shim
        // script: confined, it starts with its standard library only.
        let text = String::from_utf8_lossy(&prefixes.stdout).into_owned();
        let mut lines = text.lines();
        let python = lines
            .next()
            .and_then(|exe| std::fs::canonicalize(exe).ok())
            .ok_or_else(|| format!("{} did not name its interpreter", python.display()))?;
        let mut readable: Vec<PathBuf> = lines
            .map(PathBuf::from)
            .chain(python.parent().map(Path::to_path_buf))
            .chain(SYSTEM_DIRS.iter().map(PathBuf::from))
            .filter(|p| p.exists())
            .collect();
        readable.sort();
        readable.dedup();
        let sandbox = Self { python, readable };
        sandbox.self_test()?;
        Ok(sandbox)
    }

    /// Runs `print(6 * 7)` confined: the interpreter starts and its output
    /// comes back, or the error says why not.
    fn self_test(&self) -> Result<(), String> {
        let dir = tempfile::tempdir().map_err(|e| format!("no scratch folder: {e}"))?;
        let limits = Limits {
            wall_seconds: 30.0,
            memory_mb: 1024,
            file_mb: 1,
        };
        std::fs::write(dir.path().join("main.py"), "print(6 * 7)\n")
            .map_err(|e| format!("could not write to a scratch folder: {e}"))?;
        let done = self
            .run(dir.path(), "main.py", b"", &limits)
            .map_err(|e| e.to_string())?;
        let out = std::fs::read_to_string(dir.path().join(STDOUT)).unwrap_or_default();
        match (&done.ending, out.trim()) {
            (Ending::Exited(0), "42") => Ok(()),
            _ => Err(format!(
                "{} does not run confined ({:?}): {}",
                self.python.display(),
                done.ending,
                done.stderr_tail.trim()
            )),
        }
    }

    /// Runs `script` (a file in `dir`) confined to `dir`, `stdin` its
    /// input (small: written before waiting); its stdout is left in
    /// `dir/stdout.txt`.
    pub fn run(
        &self,
        dir: &Path,
        script: &str,
        stdin: &[u8],
        limits: &Limits,
    ) -> io::Result<Finished> {
        let ruleset = Mutex::new(Some(self.ruleset(dir).map_err(io::Error::other)?));
        let filters = filters().map_err(io::Error::other)?;
        let rlimits = rlimits(limits);
        let file = |name: &str| std::fs::File::create(dir.join(name));
        let mut cmd = Command::new(&self.python);
        cmd.args(["-I", "-B", script])
            .current_dir(dir)
            .env_clear()
            .envs([("HOME", dir.as_os_str()), ("TMPDIR", dir.as_os_str())])
            .env("PATH", "/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::piped())
            .stdout(file(STDOUT)?)
            .stderr(file(STDERR)?)
            .process_group(0);
        // SAFETY: between fork and exec the closure makes only system
        // calls (prctl, setrlimit, landlock_restrict_self, seccomp) on
        // values built before the fork; it allocates nothing on success.
        unsafe {
            cmd.pre_exec(move || confine(&rlimits, &ruleset, &filters));
        }
        let started = Instant::now();
        let mut child = cmd.spawn()?;
        if let Some(mut input) = child.stdin.take() {
            // A program that exits first leaves a broken pipe: not an error.
            let _ = std::io::Write::write_all(&mut input, stdin);
        }
        let deadline = started + Duration::from_secs_f64(limits.wall_seconds);
        let ending = loop {
            if let Some(status) = child.try_wait()? {
                break match (status.code(), status.signal()) {
                    (Some(c), _) => Ending::Exited(c),
                    (None, s) => Ending::Signalled(s.unwrap_or(0)),
                };
            }
            if Instant::now() >= deadline {
                kill_group(child.id());
                child.wait()?;
                break Ending::TimedOut;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        kill_group(child.id());
        Ok(Finished {
            ending,
            stderr_tail: tail(&dir.join(STDERR), 2000),
        })
    }

    /// Read-only access to the interpreter's and the system's folders,
    /// full access to `dir`, no TCP, no signals or abstract sockets
    /// beyond the sandbox. File access is required; the rest is applied
    /// where the kernel has it.
    fn ruleset(&self, dir: &Path) -> Result<RulesetCreated, String> {
        let refuse = |e: &dyn std::fmt::Display| {
            format!("could not confine the program (Landlock, Linux 5.13+): {e}")
        };
        let mut created = Ruleset::default()
            .set_compatibility(CompatLevel::HardRequirement)
            .handle_access(AccessFs::from_all(ABI::V1))
            .map_err(|e| refuse(&e))?
            .set_compatibility(CompatLevel::BestEffort)
            .handle_access(AccessFs::from_all(ABI_USED))
            .and_then(|r| r.handle_access(AccessNet::from_all(ABI_USED)))
            .and_then(|r| r.scope(Scope::from_all(ABI_USED)))
            .and_then(|r| r.create())
            .map_err(|e| refuse(&e))?;
        let read = AccessFs::from_read(ABI_USED);
        created = created
            .add_rules(path_beneath_rules(&self.readable, read))
            .and_then(|r| r.add_rules(path_beneath_rules(DEVICES, AccessFs::from_file(ABI_USED))))
            .map_err(|e| refuse(&e))?;
        let own = PathFd::new(dir).map_err(|e| refuse(&e))?;
        created
            .add_rule(PathBeneath::new(own, AccessFs::from_all(ABI_USED)))
            .map_err(|e| refuse(&e))
    }
}

const STDOUT: &str = "stdout.txt";
const STDERR: &str = "stderr.txt";

/// In the child, between fork and exec.
fn confine(
    rlimits: &[(RlimitResource, u64)],
    ruleset: &Mutex<Option<RulesetCreated>>,
    filters: &[BpfProgram],
) -> io::Result<()> {
    // SAFETY: plain system calls on plain integers.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(io::Error::last_os_error());
        }
        for &(resource, value) in rlimits {
            let limit = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            if libc::setrlimit(resource, &limit) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    let taken = ruleset.lock().ok().and_then(|mut r| r.take());
    let status = taken
        .ok_or_else(|| io::Error::other("ruleset used twice"))?
        .restrict_self()
        .map_err(|_| io::Error::other("landlock_restrict_self failed"))?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err(io::Error::other("Landlock is not enforced"));
    }
    for f in filters {
        seccompiler::apply_filter(f).map_err(|_| io::Error::other("seccomp failed"))?;
    }
    Ok(())
}

#[cfg(target_env = "gnu")]
type RlimitResource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
type RlimitResource = libc::c_int;

fn rlimits(l: &Limits) -> Vec<(RlimitResource, u64)> {
    let mib = 1 << 20;
    vec![
        (libc::RLIMIT_CPU, l.wall_seconds.ceil() as u64 + 1),
        (libc::RLIMIT_AS, l.memory_mb * mib),
        (libc::RLIMIT_FSIZE, l.file_mb * mib),
        (libc::RLIMIT_NOFILE, 64),
        (libc::RLIMIT_CORE, 0),
    ]
}

/// Two filters: `clone3` answers "not here" (so threads fall back to
/// `clone`); the other refused calls answer EPERM. Threads are allowed,
/// processes and non-Unix sockets are not.
fn filters() -> Result<Vec<BpfProgram>, String> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| e.to_string())?;
    let bad = |e: seccompiler::BackendError| e.to_string();
    let cond = |arg, op, value| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value).map_err(bad)
    };
    let only_if = |c: SeccompCondition| SeccompRule::new(vec![c]).map_err(bad);
    let thread = libc::CLONE_THREAD as u64;
    let mut refused: std::collections::BTreeMap<i64, Vec<SeccompRule>> =
        REFUSED.iter().map(|&call| (call, vec![])).collect();
    refused.insert(
        libc::SYS_clone,
        vec![only_if(cond(0, SeccompCmpOp::MaskedEq(thread), 0)?)?],
    );
    refused.insert(
        libc::SYS_socket,
        vec![only_if(cond(0, SeccompCmpOp::Ne, libc::AF_UNIX as u64)?)?],
    );
    // prlimit64(pid, resource, new, old): setting (new != NULL) is refused.
    refused.insert(
        libc::SYS_prlimit64,
        vec![only_if(cond(2, SeccompCmpOp::Ne, 0)?)?],
    );
    let program = |rules, errno| -> Result<BpfProgram, String> {
        let f = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno),
            arch,
        )
        .map_err(bad)?;
        BpfProgram::try_from(f).map_err(bad)
    };
    let clone3 = [(libc::SYS_clone3, vec![])].into_iter().collect();
    Ok(vec![
        program(clone3, libc::ENOSYS as u32)?,
        program(refused, libc::EPERM as u32)?,
    ])
}

/// Refused outright: new processes other than threads (`clone` is
/// checked by its flags), and what root could do outside the file system.
const REFUSED: &[i64] = &[
    #[cfg(target_arch = "x86_64")]
    libc::SYS_fork,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_vfork,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_setrlimit,
    libc::SYS_io_uring_setup,
    libc::SYS_ptrace,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_process_vm_writev,
    libc::SYS_process_vm_readv,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_getfd,
    libc::SYS_kill,
    libc::SYS_tkill,
];

/// Sends SIGKILL to a process group (nothing if it is gone).
fn kill_group(group: u32) {
    // SAFETY: a plain system call; a group that no longer exists is ESRCH.
    unsafe {
        libc::kill(-(group as i32), libc::SIGKILL);
    }
}

/// The last `n` bytes of a file, as text (empty when unreadable).
fn tail(path: &Path, n: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let from = bytes.len().saturating_sub(n);
    String::from_utf8_lossy(&bytes[from..]).into_owned()
}

/// `name` on PATH (or as given, when it has a slash), as an absolute path.
fn which(name: &str) -> Result<PathBuf, String> {
    let found = if name.contains('/') {
        Some(PathBuf::from(name))
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
    };
    let path = found.ok_or_else(|| format!("`{name}` is not on PATH"))?;
    std::fs::canonicalize(&path).map_err(|e| format!("{}: {e}", path.display()))
}
