//! `rlhf label serve` over HTTP, as a scripted labeller sees it: tokens
//! are required (401 without, 403 unknown), bad submissions are refused
//! with a 4xx and change nothing, a replay adds no row, and a restarted
//! server keeps every label and serves only what is left.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Starts the server on a free port; its port.
fn serve(queue: &Path) -> (Child, u16) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args([
            "label",
            "serve",
            queue.to_str().unwrap(),
            "--bind",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line.trim().rsplit(':').next().unwrap().parse().unwrap();
    (child, port)
}

/// One request; the status and the body.
fn request(port: u16, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
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

fn labelled_rows(queue: &Path) -> usize {
    let path = queue.join("labels.parquet");
    rlhf_datasets::load::read_table(&path).unwrap().height()
}

#[test]
fn a_scripted_labeller_through_the_http_api() {
    let d = tempfile::tempdir().unwrap();
    let queue = d.path().join("queue");
    std::fs::create_dir(&queue).unwrap();
    let groups: Vec<serde_json::Value> = (0..3)
        .map(|i| {
            serde_json::json!({"prompt": format!("Sort: {i} 1"), "round": 1, "policy": "ppo",
                "responses": ["1 0", "0 1", "<script>alert(1)</script><img src=x onerror=alert(2)>"]})
        })
        .collect();
    std::fs::write(
        queue.join("groups.json"),
        serde_json::to_string(&groups).unwrap(),
    )
    .unwrap();
    let token = common::rlhf_ok(&["label", "token", "ann", "--queue", queue.to_str().unwrap()]);
    let token = token.trim();
    assert_eq!(token.len(), 48);
    assert!(!std::fs::read_to_string(queue.join("tokens.json"))
        .unwrap()
        .contains(token));

    let (mut server, port) = serve(&queue);
    assert_eq!(request(port, "GET", "/api/next", None, "").0, 401);
    assert_eq!(request(port, "GET", "/api/next", Some("nope"), "").0, 403);
    let (status, page) = request(port, "GET", &format!("/?token={token}"), None, "");
    assert_eq!(status, 200);
    assert!(page.contains("textContent") && !page.contains("innerHTML"));

    let (status, body) = request(port, "GET", "/api/next", Some(token), "");
    assert_eq!(status, 200, "{body}");
    let next: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(next["group"], 0);
    let submit = |body: &str| request(port, "POST", "/api/submit", Some(token), body);
    for bad in [
        "{\"group\": 0, \"ranking\": [0, 1]}",
        "{\"group\": 0, \"ranking\": [0, 1, 3]}",
        "{\"group\": 0, \"ranking\": \"first\"}",
        "not json",
        "{\"group\": 0, \"ranking\": [0, 1, 2], \"extra\": 1}",
    ] {
        assert_eq!(submit(bad).0, 400, "{bad}");
    }
    assert_eq!(
        submit("{\"group\": 2, \"ranking\": [0, 1, 2]}").0,
        403,
        "never shown"
    );
    assert_eq!(submit("{\"group\": 0, \"ranking\": [0, 0, 2]}").0, 200);
    assert_eq!(
        submit("{\"group\": 0, \"ranking\": [0, 0, 2]}").0,
        409,
        "a replay"
    );
    assert_eq!(labelled_rows(&queue), 1);
    server.kill().unwrap();
    server.wait().unwrap();

    // Restarted: the label is kept, and group 0 is not served again.
    let (mut server, port) = serve(&queue);
    let (status, body) = request(port, "GET", "/api/next", Some(token), "");
    assert_eq!(status, 200);
    let next: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (next["group"].as_i64(), next["left"].as_i64()),
        (Some(1), Some(2))
    );
    assert_eq!(labelled_rows(&queue), 1);
    server.kill().unwrap();
    server.wait().unwrap();
}
