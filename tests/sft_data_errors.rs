//! Bad SFT data through `rlhf stage`: each case exits with a clear error
//! that names the file and what is wrong, and never panics.

use crate::common;

use std::path::Path;

/// Runs the sft stage on `data` (written to a file named `name`); returns
/// stderr after checking the run failed cleanly (exit 1, not a panic).
fn sft_error(name: &str, data: &[u8]) -> String {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join(name), data).unwrap();
    let exp = d.path().join("exp.yaml");
    std::fs::write(
        &exp,
        format!(
            "name: bad\nmodel: {{n_layer: 1, n_head: 2, n_embd: 16, n_positions: 32}}\n\
             stages:\n  sft:\n    kind: sft\n    data: {name}\n    max_steps: 2\n"
        ),
    )
    .unwrap();
    let out = common::rlhf(&[
        "stage",
        "--config",
        exp.to_str().unwrap(),
        "sft",
        "--set",
        "device=cpu",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected a clean failure, got {:?}:\n{stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains(name),
        "the error should name the file {name}:\n{stderr}"
    );
    assert!(!Path::new(&d.path().join("runs/bad/sft/checkpoint")).exists());
    stderr
}

#[test]
fn missing_column() {
    let e = sft_error("d.jsonl", b"{\"prompt\": \"a\", \"response\": \"b\"}\n");
    assert!(
        e.contains("missing column `completion`") && e.contains("prompt, response"),
        "{e}"
    );
}

#[test]
fn wrong_type() {
    let e = sft_error("d.jsonl", b"{\"prompt\": \"a\", \"completion\": 42}\n");
    assert!(
        e.contains("`completion` holds integers, expected strings"),
        "{e}"
    );
}

#[test]
fn empty_file() {
    let e = sft_error("d.jsonl", b"");
    assert!(e.contains("no rows"), "{e}");
}

#[test]
fn empty_completion() {
    let e = sft_error(
        "d.jsonl",
        b"{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"c\", \"completion\": \"\"}\n",
    );
    assert!(
        e.contains("row 2") && e.contains("`completion` is empty"),
        "{e}"
    );
}

#[test]
fn invalid_utf8() {
    let e = sft_error("d.jsonl", b"{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"\xc3\x28\", \"completion\": \"b\"}\n");
    assert!(e.contains("line 2") && e.contains("UTF-8"), "{e}");
}

#[test]
fn unknown_role() {
    let e = sft_error(
        "d.jsonl",
        b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"bot\", \"content\": \"yo\"}]}\n",
    );
    assert!(
        e.contains("row 1") && e.contains("unknown role \"bot\""),
        "{e}"
    );
}

#[test]
fn null_value_in_csv() {
    let e = sft_error("d.csv", b"prompt,completion\na,b\nc,\n");
    assert!(
        e.contains("row 2") && (e.contains("null") || e.contains("empty")),
        "{e}"
    );
}

#[test]
fn not_gzip() {
    let e = sft_error("d.jsonl.gz", b"not gzip at all");
    assert!(e.contains("gzip"), "{e}");
}
