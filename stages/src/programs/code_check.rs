//! The code checker (`reward: {checker: code}`, `rlhf eval --checker
//! code`): an answer's Python (its last fenced code block, else the whole
//! answer) is run against the prompt's tests (its `answer` column: Python
//! statements, asserts as a rule) in a throwaway folder, confined (see
//! [`super::sandbox`]). It passes when the tests ran to the end: the
//! interpreter exited 0 after writing a token it read on stdin, so an
//! answer that exits early (`sys.exit(0)` before the tests) fails.

use std::path::Path;

use super::sandbox::{Ending, Limits, Sandbox};

/// Runs answers' code against tests.
#[derive(Debug, Clone)]
pub struct CodeChecker {
    sandbox: Sandbox,
    limits: Limits,
}

/// Runs the answer, then the tests, in one namespace; the answer does
/// not run as `__main__`, so its own `if __name__ == "__main__":` part
/// (reading input, say) stays out.
const HARNESS: &str = r#"import sys
token = sys.stdin.readline().strip()
sys.stdin.close()
scope = {"__name__": "solution"}
for name in ("solution.py", "tests.py"):
    with open(name, encoding="utf-8") as f:
        source = f.read()
    exec(compile(source, name, "exec"), scope)
sys.stdout.write("\n" + token + "\n")
"#;

/// How one answer fared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Passed,
    /// The tests failed or the code did not run; the end of its stderr.
    Failed(String),
    /// Stopped at a limit (the deadline, CPU time, file size).
    Stopped(Ending),
}

impl CodeChecker {
    /// A checker running `python` confined within `limits`; fails when
    /// confinement does not work here.
    pub fn new(python: &str, limits: Limits) -> Result<Self, String> {
        Ok(Self {
            sandbox: Sandbox::new(python)?,
            limits,
        })
    }

    /// Runs `response`'s code against `tests`; `Err` only when the run
    /// could not be made (no scratch folder, the interpreter not started).
    pub fn check(&self, response: &str, tests: &str) -> Result<Verdict, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("no scratch folder: {e}"))?;
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text)
                .map_err(|e| format!("could not write {name} in a scratch folder: {e}"))
        };
        write("main.py", HARNESS)?;
        write("solution.py", solution_code(response))?;
        write("tests.py", tests)?;
        let token = fresh_token();
        let done = self
            .sandbox
            .run(
                dir.path(),
                "main.py",
                format!("{token}\n").as_bytes(),
                &self.limits,
            )
            .map_err(|e| format!("the code checker could not run Python: {e}"))?;
        Ok(match done.ending {
            Ending::Exited(0) if last_line(dir.path()) == token => Verdict::Passed,
            Ending::Exited(0) => Verdict::Failed("exited before the tests ended".into()),
            Ending::Exited(_) => Verdict::Failed(done.stderr_tail),
            stopped => Verdict::Stopped(stopped),
        })
    }
}

/// The code in an answer: its last fenced block tagged Python (or
/// untagged), else the whole answer.
pub fn solution_code(response: &str) -> &str {
    let mut blocks: Vec<(&str, usize, usize)> = vec![];
    let mut open: Option<(&str, usize)> = None;
    let mut at = 0;
    for line in response.split_inclusive('\n') {
        let trimmed = line.trim();
        if let Some(info) = trimmed.strip_prefix("```") {
            open = match open {
                None => Some((info.trim(), at + line.len())),
                Some((lang, start)) => {
                    blocks.push((lang, start, at));
                    None
                }
            };
        }
        at += line.len();
    }
    let python = |lang: &str| matches!(lang, "" | "python" | "py" | "python3");
    blocks
        .iter()
        .rev()
        .find(|(lang, ..)| python(lang))
        .map_or(response, |&(_, start, end)| &response[start..end])
}

fn last_line(dir: &Path) -> String {
    let out = std::fs::read(dir.join("stdout.txt")).unwrap_or_default();
    let text = String::from_utf8_lossy(&out[out.len().saturating_sub(256)..]).into_owned();
    text.trim_end().rsplit('\n').next().unwrap_or("").to_owned()
}

/// A token the answer cannot guess: 128 bits from the OS.
fn fresh_token() -> String {
    let mut bytes = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut bytes);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checker(wall_seconds: f64) -> CodeChecker {
        let python = std::env::var("RLHF_PYTHON").unwrap_or_else(|_| "python3".into());
        let limits = Limits {
            wall_seconds,
            memory_mb: 512,
            file_mb: 1,
        };
        CodeChecker::new(&python, limits).expect("confinement works on Linux 5.13+")
    }

    const STOPPED: &str = "stopped at the deadline";
    const TESTS: &str = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n";

    fn failed(v: &Verdict) -> bool {
        matches!(v, Verdict::Failed(_))
    }

    /// Right code passes, wrong code fails, code that exits before the
    /// tests fails, threads and files in its folder are allowed.
    #[test]
    fn answers_pass_by_passing_the_tests() {
        let c = checker(20.0);
        let check = |code: &str| c.check(code, TESTS).unwrap();
        let right = "Here:\n```python\ndef add(a, b):\n    return a + b\n```\n";
        assert_eq!(check(right), Verdict::Passed);
        assert!(failed(&check("def add(a, b):\n    return a - b\n")));
        assert!(failed(&check("import sys\nsys.exit(0)\n")));
        assert!(failed(&check("import os\nos._exit(0)\n")));
        let threads_and_files = "import threading\nbox = []\nt = threading.Thread(target=lambda: box.append(1))\nt.start(); t.join()\nopen('notes.txt', 'w').write('x' * 1000)\ndef add(a, b):\n    return a + b + len(box) - 1\n";
        assert_eq!(check(threads_and_files), Verdict::Passed);
    }

    /// Hostile code: each is stopped or refused, and none passes.
    #[test]
    fn code_that_loops_forks_fills_the_disk_reads_outside_or_dials_out_fails() {
        let c = checker(3.0);
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret.txt");
        std::fs::write(&secret, "hunter2").unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let add = "\ndef add(a, b):\n    return a + b\n";
        // Each case with why it must fail: stopped at the deadline, or
        // refused with this error in its stderr.
        let cases = [
            ("loops", "while True:\n    pass\n".to_string(), STOPPED),
            ("sleeps", "import time\ntime.sleep(600)\n".into(), STOPPED),
            (
                "forks",
                "import os\nif os.fork() == 0:\n    os._exit(0)\n".into(),
                "PermissionError",
            ),
            (
                "runs a program",
                "import subprocess\nsubprocess.run(['true'])\n".into(),
                "PermissionError",
            ),
            (
                "fills the disk",
                "with open('big', 'wb') as f:\n    while True:\n        f.write(b'0' * 65536)\n"
                    .into(),
                "File too large",
            ),
            (
                "reads outside",
                format!(
                    "assert open({:?}).read() == 'hunter2'\n",
                    secret.to_str().unwrap()
                ),
                "PermissionError",
            ),
            (
                "lists outside",
                "import os\nos.listdir('/')\n".into(),
                "PermissionError",
            ),
            (
                "dials out",
                format!(
                    "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                ),
                "PermissionError",
            ),
            (
                "eats memory",
                "x = bytearray(2 << 30)\n".into(),
                "MemoryError",
            ),
            (
                "lifts its limits",
                "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (-1, -1))\n".into(),
                "not allowed to raise",
            ),
        ];
        for (what, code, why) in &cases {
            let v = c.check(&format!("{code}{add}"), TESTS).unwrap();
            match (&v, *why) {
                (Verdict::Stopped(Ending::TimedOut), STOPPED) => {}
                (Verdict::Failed(stderr), why) if why != STOPPED && stderr.contains(why) => {}
                _ => panic!("code that {what}: expected {why}, got {v:?}"),
            }
        }
        listener.set_nonblocking(true).unwrap();
        assert!(listener.accept().is_err(), "nothing connected");
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "hunter2");
    }

    #[test]
    fn the_code_is_the_last_python_block_else_the_answer() {
        let a = "Try:\n```python\nx = 1\n```\nor better\n```py\ndef f():\n    return 2\n```\nand\n```text\nnot code\n```\n";
        assert_eq!(solution_code(a), "def f():\n    return 2\n");
        assert_eq!(solution_code("def f(): return 1"), "def f(): return 1");
        assert_eq!(solution_code("```\ny = 3\n```"), "y = 3\n");
        // An unclosed fence is not a block.
        assert_eq!(solution_code("```python\nz = 1"), "```python\nz = 1");
    }
}
