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
/// stderr if it fails.
pub fn run_python(script: &str, args: &[&str]) {
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
}

/// Runs the `rlhf` binary.
pub fn rlhf(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("rlhf runs")
}

/// Runs `rlhf` and returns stdout, panicking with stderr on failure.
pub fn rlhf_ok(args: &[&str]) -> String {
    let out = rlhf(args);
    assert!(
        out.status.success(),
        "rlhf {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
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
