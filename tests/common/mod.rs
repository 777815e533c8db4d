//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root (tests/ sits in it).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// The venv's Python (`just setup` makes it); `RLHF_PYTHON` overrides.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("RLHF_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = std::env::var("RLHF_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace().join(".venv"));
    let p = venv.join("bin/python");
    assert!(
        p.exists(),
        "no Python at {}: run `just setup` (or set RLHF_PYTHON)",
        p.display()
    );
    p
}

/// Runs a Python script from tests/python with arguments; panics with its
/// stderr if it fails. Its stdout.
pub fn run_python(script: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(workspace().join("tests/python").join(script))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The tensors of a safetensors file (a Python reference's output), by name.
pub fn tensors(path: &Path) -> std::collections::HashMap<String, tch::Tensor> {
    tch::Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

/// `rlhf eval RUN` made quick for tests: `prompts`, answers of 4 tokens,
/// one KL sample, then `extra` arguments.
pub fn eval_quick(run: &Path, prompts: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "eval",
        run.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
    ];
    args.extend(["--max-new-tokens", "4", "--kl-samples", "1"]);
    args.extend_from_slice(extra);
    rlhf(&args)
}

/// An `rlhf` command being built: arguments, `--set`s, environment and
/// folder, then run to its output, to success or to failure, or started.
///
/// `Rlhf::new(["run", exp]).set("ppo.steps=2").one_thread().ok()`
pub struct Rlhf {
    cmd: Command,
    shown: String,
}

impl Rlhf {
    /// `rlhf ARGS…` with `RUST_LOG=info`.
    pub fn new<S: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = S>) -> Self {
        Self::binary(env!("CARGO_BIN_EXE_rlhf"), args)
    }

    /// The same with another copy of the binary.
    pub fn binary<S: AsRef<std::ffi::OsStr>>(
        exe: impl AsRef<std::ffi::OsStr>,
        args: impl IntoIterator<Item = S>,
    ) -> Self {
        let mut cmd = Command::new(exe);
        cmd.env("RUST_LOG", "info");
        let mut this = Self {
            cmd,
            shown: String::from("rlhf"),
        };
        for a in args {
            this = this.arg(a);
        }
        this
    }

    pub fn arg(mut self, a: impl AsRef<std::ffi::OsStr>) -> Self {
        self.shown.push(' ');
        self.shown.push_str(&a.as_ref().to_string_lossy());
        self.cmd.arg(a);
        self
    }

    /// `--set KEY=VALUE`.
    pub fn set(self, key_value: &str) -> Self {
        self.arg("--set").arg(key_value)
    }

    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.cmd.env(key, value);
        self
    }

    pub fn dir(mut self, dir: &Path) -> Self {
        self.cmd.current_dir(dir);
        self
    }

    /// One libtorch thread: tests run side by side on a small machine,
    /// where the spinning threads of several processes slow all of them.
    pub fn one_thread(self) -> Self {
        self.env("RLHF_THREADS", "1")
    }

    /// Runs it to the end: status, stdout and stderr.
    pub fn output(mut self) -> Output {
        self.cmd.output().expect("rlhf runs")
    }

    /// Runs it; panics with its stderr unless it succeeds. Its stdout.
    pub fn ok(self) -> String {
        let shown = self.shown.clone();
        let out = self.output();
        assert!(
            out.status.success(),
            "`{shown}` failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Runs it; panics with its stdout unless it fails. Its stderr.
    pub fn fails(self) -> String {
        let shown = self.shown.clone();
        let out = self.output();
        assert!(
            !out.status.success(),
            "`{shown}` succeeded:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Starts it with stdout dropped and stderr read as it comes.
    pub fn spawn(mut self) -> Drained {
        let child = self
            .cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("rlhf starts");
        Drained::new(child)
    }
}

/// Runs the `rlhf` binary.
pub fn rlhf(args: &[&str]) -> Output {
    Rlhf::new(args).output()
}

/// Runs `rlhf` and returns stdout, panicking with stderr on failure.
pub fn rlhf_ok(args: &[&str]) -> String {
    Rlhf::new(args).ok()
}

/// The first `n` lines of a bundled task file (`datasets/task/SRC`), written to `dst`.
pub fn task_head(src: &str, dst: &Path, n: usize) {
    let text = std::fs::read_to_string(workspace().join("datasets/task").join(src)).unwrap();
    std::fs::write(
        dst,
        text.lines().take(n).collect::<Vec<_>>().join("\n") + "\n",
    )
    .unwrap();
}

/// A started child whose stderr is read as it comes (a full pipe would
/// block it), so a test can poll it and still show what it printed.
pub struct Drained {
    child: std::process::Child,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Drained {
    /// `child` must have been spawned with `stderr(Stdio::piped())`.
    pub fn new(mut child: std::process::Child) -> Self {
        use std::io::Read;
        let mut pipe = child.stderr.take().expect("stderr must be piped");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = stderr.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self {
            child,
            stderr,
            reader: Some(reader),
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, if it has ended.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.wait();
    }

    /// What it printed to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends it SIGINT (Ctrl-C), then waits for its end.
    pub fn interrupt(self) -> (std::process::ExitStatus, String) {
        let pid = self.id().to_string();
        assert!(Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success());
        self.wait()
    }

    /// Waits for its end: its status and all it printed to stderr.
    pub fn wait(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.wait().unwrap();
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        (status, self.stderr())
    }

    /// Polls until `ready()` holds; panics, showing stderr, if the child
    /// ends first or `limit` passes.
    pub fn wait_until(&mut self, what: &str, limit: std::time::Duration, ready: impl Fn() -> bool) {
        let started = std::time::Instant::now();
        while !ready() {
            if let Some(status) = self.try_wait() {
                panic!("it ended ({status}) before {what}:\n{}", self.stderr());
            }
            assert!(
                started.elapsed() < limit,
                "no {what} after {limit:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// One HTTP/1.1 request to 127.0.0.1:`port` with an optional bearer
/// token; the status and the body.
pub fn http(port: u16, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

/// `rlhf label serve QUEUE` on a free port: the server and its port.
pub fn label_serve(queue: &Path) -> (std::process::Child, u16) {
    serve(&["label", "serve", queue.to_str().unwrap()])
}

/// Starts a server command of `rlhf` (`label serve`, `watch`) on a free
/// port; it and the port its first line of stdout names.
pub fn serve(args: &[&str]) -> (std::process::Child, u16) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(args)
        .args(["--bind", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line.trim().rsplit(':').next().unwrap().parse().unwrap();
    (child, port)
}

/// A port nobody listens on now (the OS picks it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
