//! `rlhf label serve` over HTTP, as a scripted labeller sees it: tokens
//! are required (401 without, 403 unknown), bad submissions are refused
//! with a 4xx and change nothing, a replay adds no row, and a restarted
//! server keeps every label and serves only what is left.

use crate::common;

use std::path::Path;

/// Rows in `labels.parquet` once it holds `n` (a running server writes it
/// off the request path, within a second), or what it holds after 20 s.
fn labelled_rows(queue: &Path, n: usize) -> usize {
    let path = queue.join("labels.parquet");
    let read = || rlhf_datasets::load::read_table(&path).map_or(0, |t| t.height());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while read() != n && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    read()
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

    let (mut server, port) = common::label_serve(&queue);
    assert_eq!(common::http(port, "GET", "/api/next", None, "").0, 401);
    assert_eq!(
        common::http(port, "GET", "/api/next", Some("nope"), "").0,
        403
    );
    let (status, page) = common::http(port, "GET", &format!("/?token={token}"), None, "");
    assert_eq!(status, 200);
    assert!(page.contains("textContent") && !page.contains("innerHTML"));

    let (status, body) = common::http(port, "GET", "/api/next", Some(token), "");
    assert_eq!(status, 200, "{body}");
    let next: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(next["group"], 0);
    let submit = |body: &str| common::http(port, "POST", "/api/submit", Some(token), body);
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
    // A label that says nothing: every answer tied, or skip and "not
    // rankable" at once.
    for nothing in [
        "{\"group\": 0, \"ranking\": [1, 1, 1]}",
        "{\"group\": 0, \"skipped\": true, \"not_rankable\": true}",
    ] {
        let (status, body) = submit(nothing);
        assert_eq!(status, 400, "{nothing}: {body}");
    }
    assert_eq!(submit("{\"group\": 0, \"ranking\": [0, 0, 2]}").0, 200);
    assert_eq!(
        submit("{\"group\": 0, \"ranking\": [0, 0, 2]}").0,
        409,
        "a replay"
    );
    assert_eq!(labelled_rows(&queue, 1), 1);
    server.kill().unwrap();
    server.wait().unwrap();

    // Restarted: the label is kept, and group 0 is not served again.
    let (mut server, port) = common::label_serve(&queue);
    let (status, body) = common::http(port, "GET", "/api/next", Some(token), "");
    assert_eq!(status, 200);
    let next: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (next["group"].as_i64(), next["left"].as_i64()),
        (Some(1), Some(2))
    );
    assert_eq!(labelled_rows(&queue, 1), 1);
    server.kill().unwrap();
    server.wait().unwrap();
}

/// `rlhf label import QUEUE --format FORMAT FILE`.
fn label_import(queue: &str, format: &str, file: &str) -> std::process::Output {
    common::rlhf(&["label", "import", queue, "--format", format, file])
}

fn write_groups(queue: &Path, n: usize) {
    std::fs::create_dir_all(queue).unwrap();
    let groups: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({"prompt": format!("Sort: {i} 1"), "round": 1, "policy": "ppo", "responses": ["1 0", "0 1", "1 1"]}))
        .collect();
    std::fs::write(
        queue.join("groups.json"),
        serde_json::to_string(&groups).unwrap(),
    )
    .unwrap();
}

/// A served queue has one writer: a second server and an import are
/// refused naming the first's pid, and every acknowledged label is on
/// disk. A re-issued token stops working at the next request, and a
/// token for a folder that is not a queue is refused.
#[test]
fn a_served_queue_has_one_writer_and_a_revoked_token_stops_at_once() {
    let d = tempfile::tempdir().unwrap();
    let queue = d.path().join("queue");
    let q = queue.to_str().unwrap();
    let missing = common::rlhf(&[
        "label",
        "token",
        "ann",
        "--queue",
        d.path().join("nope").to_str().unwrap(),
    ]);
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("not a labelling queue"), "{err}");
    assert!(
        !d.path().join("nope").exists(),
        "nothing made for a mistyped path"
    );
    write_groups(&queue, 4);
    let old = common::rlhf_ok(&["label", "token", "ann", "--queue", q]);
    let (mut server, port) = common::label_serve(&queue);
    let take = |token: &str| {
        let (status, body) = common::http(port, "GET", "/api/next", Some(token), "");
        assert_eq!(status, 200, "{body}");
        let next: serde_json::Value = serde_json::from_str(&body).unwrap();
        let group = next["group"].as_i64().unwrap();
        let body = format!("{{\"group\": {group}, \"ranking\": [0, 1, 2]}}");
        common::http(port, "POST", "/api/submit", Some(token), &body).0
    };
    assert_eq!(take(old.trim()), 200);

    let second = common::rlhf(&["label", "serve", q, "--bind", "127.0.0.1:0"]);
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second server is refused");
    assert!(err.contains(&format!("pid {}", server.id())), "{err}");
    let export = d.path().join("ls.json");
    common::rlhf_ok(&[
        "label",
        "export",
        q,
        "--format",
        "label-studio",
        "--out",
        export.to_str().unwrap(),
    ]);
    let mut tasks: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&export).unwrap()).unwrap();
    tasks[3]["annotations"] = serde_json::json!([{"completed_by": 3, "was_cancelled": false,
        "result": [{"type": "ranker", "from_name": "rank", "to_name": "answers",
                    "value": {"ranker": {"rank_1": ["a1"], "rank_2": ["a0"], "rank_3": ["a2"]}}}]}]);
    std::fs::write(&export, tasks.to_string()).unwrap();
    let import = label_import(q, "label-studio", export.to_str().unwrap());
    let err = String::from_utf8_lossy(&import.stderr);
    assert!(
        !import.status.success(),
        "an import beside the server is refused"
    );
    assert!(err.contains(&format!("pid {}", server.id())), "{err}");

    // Re-issued: the old token is refused at once, the new one works.
    let new = common::rlhf_ok(&["label", "token", "ann", "--queue", q]);
    assert_eq!(
        common::http(port, "GET", "/api/next", Some(old.trim()), "").0,
        403
    );
    assert_eq!(take(new.trim()), 200);
    // Deleted from tokens.json: refused too.
    std::fs::write(queue.join("tokens.json"), "{}").unwrap();
    assert_eq!(
        common::http(port, "GET", "/api/next", Some(new.trim()), "").0,
        403
    );
    // Two labels acknowledged, two on disk.
    assert_eq!(labelled_rows(&queue, 2), 2);
    server.kill().unwrap();
    server.wait().unwrap();
    // With the server gone the import goes through, beside the two labels.
    let out = common::rlhf_ok(&[
        "label",
        "import",
        q,
        "--format",
        "label-studio",
        export.to_str().unwrap(),
    ]);
    assert!(out.contains("\"added\":1"), "{out}");
    assert_eq!(labelled_rows(&queue, 3), 3);
}

/// A tiny experiment whose one loop round is labelled through the web
/// page (2 labels per group, 3 groups).
fn web_experiment(dir: &Path) -> std::path::PathBuf {
    common::task_head("sft.jsonl", &dir.join("sft.jsonl"), 40);
    common::task_head("preferences.jsonl", &dir.join("prefs.jsonl"), 20);
    common::task_head("prompts.jsonl", &dir.join("prompts.jsonl"), 8);
    let exp = dir.join("exp.yaml");
    std::fs::write(
        &exp,
        "name: web\ndevice: cpu\nmodel: {n_layer: 1, n_head: 2, n_embd: 16, n_positions: 48}\nstages:\n\
         \x20 sft: {kind: sft, data: sft.jsonl, max_steps: 2, batch_size: 4}\n\
         \x20 rm: {kind: reward, init: sft, data: prefs.jsonl, max_steps: 2, batch_size: 2, max_len: 48}\n\
         \x20 ppo: {kind: ppo, policy: sft, reward_model: rm, prompts: prompts.jsonl, iterations: 1, rollout_batch: 4, minibatch_size: 4, sampling: {max_new_tokens: 4}}\n\
         loop: {repeat: [rm, ppo], rounds: 1, prompts: prompts.jsonl, prompts_per_round: 3, k: 2, sampling: {max_new_tokens: 4}, \
         labeller: {kind: web, labels_per_group: 2, bind: '127.0.0.1:0', timeout_seconds: 600}}\n",
    )
    .unwrap();
    exp
}

fn spawn_run(exp: &Path) -> common::Drained {
    common::Rlhf::new(["run".as_ref(), exp.as_os_str()])
        .one_thread()
        .spawn()
}

/// The page's port once `queue/address` is written (by a server started
/// after `since`).
fn page_port(run: &mut common::Drained, queue: &Path, since: std::time::SystemTime) -> u16 {
    let address = queue.join("address");
    run.wait_until(
        "the round's labelling page",
        std::time::Duration::from_secs(600),
        || {
            std::fs::metadata(&address)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= since)
        },
    );
    let text = std::fs::read_to_string(&address).unwrap();
    text.rsplit(':').next().unwrap().parse().unwrap()
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// A round's page is a child of its runner: SIGKILL the runner and the
/// page stops within seconds (it is the queue's one writer, so it must not
/// outlive the run); the rerun serves the queue again, its label kept.
#[test]
fn a_rounds_page_ends_with_its_runner_and_the_rerun_serves_its_queue() {
    let d = tempfile::tempdir().unwrap();
    let exp = web_experiment(d.path());
    let queue = d.path().join("runs/web/round-1/queue");
    let mut run = spawn_run(&exp);
    let port = page_port(&mut run, &queue, std::time::UNIX_EPOCH);
    let token = common::rlhf_ok(&["label", "token", "ann", "--queue", queue.to_str().unwrap()]);
    let token = token.trim();
    let (status, body) = common::http(port, "GET", "/api/next", Some(token), "");
    assert_eq!(status, 200, "{body}");
    let next: serde_json::Value = serde_json::from_str(&body).unwrap();
    let shown = next["responses"].as_array().unwrap();
    let submit = match shown[0] == shown[1] {
        true => serde_json::json!({"group": next["group"], "not_rankable": true}),
        false => serde_json::json!({"group": next["group"], "ranking": [0, 1]}),
    };
    let (status, body) = common::http(
        port,
        "POST",
        "/api/submit",
        Some(token),
        &submit.to_string(),
    );
    assert_eq!(status, 200, "{body}");

    run.kill();
    let t0 = std::time::Instant::now();
    while listening(port) && t0.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(!listening(port), "the page outlived its runner");
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(15),
        "{:?}",
        t0.elapsed()
    );

    let since = std::time::SystemTime::now();
    let mut rerun = spawn_run(&exp);
    let port = page_port(&mut rerun, &queue, since);
    let (status, body) = common::http(port, "GET", "/api/next", Some(token), "");
    assert_eq!(status, 200, "{body}");
    let next: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        next["yours"], 1,
        "the label given before the kill is kept: {body}"
    );
    rerun.kill();
    let t0 = std::time::Instant::now();
    while listening(port) && t0.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A loop round with `labeller: {kind: web}`: the run waits while a
/// scripted labeller ranks the round's groups through the API, then the
/// round's reward model trains on them.
#[test]
fn a_web_round_waits_for_people_and_trains_on_their_rankings() {
    let d = tempfile::tempdir().unwrap();
    let exp = web_experiment(d.path());
    let mut run = spawn_run(&exp);
    let queue = d.path().join("runs/web/round-1/queue");
    run.wait_until(
        "the round's labelling page",
        std::time::Duration::from_secs(600),
        || queue.join("address").exists(),
    );
    let address = std::fs::read_to_string(queue.join("address")).unwrap();
    let port: u16 = address.rsplit(':').next().unwrap().parse().unwrap();
    // Two labellers rank by the answers' text; bob reverses group 0.
    let mut answers = std::collections::BTreeMap::new();
    for who in ["ann", "bob"] {
        let token = common::rlhf_ok(&["label", "token", who, "--queue", queue.to_str().unwrap()]);
        let mut ranked = 0;
        loop {
            let (status, body) = common::http(port, "GET", "/api/next", Some(token.trim()), "");
            if status == 204 {
                break;
            }
            assert_eq!(status, 200, "{body}");
            let next: serde_json::Value = serde_json::from_str(&body).unwrap();
            let shown: Vec<&str> = next["responses"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap())
                .collect();
            let group = next["group"].as_i64().unwrap();
            let reverse = who == "bob" && group == 0;
            let ranks: Vec<usize> = shown
                .iter()
                .map(|a| {
                    shown
                        .iter()
                        .filter(|b| if reverse { *b > a } else { *b < a })
                        .count()
                })
                .collect();
            answers.insert(group, (shown[0].to_owned(), shown[1].to_owned()));
            // Two equal answers cannot be ranked: a tie says nothing.
            let submit = if shown[0] == shown[1] {
                serde_json::json!({"group": group, "not_rankable": true}).to_string()
            } else {
                serde_json::json!({"group": group, "ranking": ranks}).to_string()
            };
            let (status, body) =
                common::http(port, "POST", "/api/submit", Some(token.trim()), &submit);
            assert_eq!(status, 200, "{body}");
            ranked += 1;
        }
        assert_eq!(ranked, 3, "{who} ranks every group");
    }
    // One pair per ranked group: they agree where bob did not reverse.
    let tied = |g: i64| answers[&g].0 == answers[&g].1;
    let untied = (0..3).filter(|&g| !tied(g)).count();
    let agree = (0..3).filter(|&g| g != 0 && !tied(g)).count() as f64 / untied.max(1) as f64;
    let taus: Vec<f64> = (0..3)
        .filter(|&g| !tied(g))
        .map(|g| if g == 0 { -1.0 } else { 1.0 })
        .collect();
    let (status, stderr) = run.wait();
    assert!(status.success(), "{stderr}");
    let prefs = d
        .path()
        .join("runs/web/round-1/collect/checkpoint/preferences.parquet");
    let table = rlhf_datasets::load::read_table(&prefs).unwrap();
    let rounds = table.column("round").unwrap().i64().unwrap();
    let new = (0..rounds.len())
        .filter(|&i| rounds.get(i) == Some(1))
        .count();
    assert_eq!(
        new,
        2 * untied,
        "each labeller's ranking of the groups ranked through the page"
    );
    assert!(d.path().join("runs/web/round-1/rm/checkpoint").exists());

    // Agreement in the round's line and in `rlhf eval`'s report.
    let rounds = std::fs::read_to_string(d.path().join("runs/web/rounds.jsonl")).unwrap();
    let round: serde_json::Value = serde_json::from_str(rounds.lines().next().unwrap()).unwrap();
    let labels = &round["labels"];
    let ranked = 2 * untied as i64;
    assert_eq!(
        (
            labels["labellers"].as_i64(),
            labels["ranked"].as_i64(),
            labels["not_rankable"].as_i64()
        ),
        (Some(2), Some(ranked), Some(6 - ranked))
    );
    if untied > 0 {
        assert!(
            (labels["agreement"].as_f64().unwrap() - agree).abs() < 1e-9,
            "{labels}"
        );
    }
    if !taus.is_empty() {
        let tau = taus.iter().sum::<f64>() / taus.len() as f64;
        assert!(
            (labels["kendall_tau"].as_f64().unwrap() - tau).abs() < 1e-9,
            "{labels}"
        );
    }
    let run_dir = d.path().join("runs/web");
    common::rlhf_ok(&[
        "eval",
        run_dir.to_str().unwrap(),
        "--max-new-tokens",
        "4",
        "--max-prompts",
        "4",
        "--kl-samples",
        "1",
        "--prompts",
        d.path().join("prompts.jsonl").to_str().unwrap(),
    ]);
    let report = std::fs::read_to_string(run_dir.join("report/report.md")).unwrap();
    let row = format!("| 1 | 3 | 2 | {ranked} | 0 | {} |", 6 - ranked);
    let row = match untied {
        0 => row,
        _ => format!("{row} {:.1}% |", 100.0 * agree),
    };
    assert!(
        report.contains("## Labelling") && report.contains(&row),
        "{report}"
    );
}

/// `rlhf label export` then `import`: the groups go out as Label Studio
/// tasks (with their config) and Argilla records, the tools' exports come
/// back as rows of the queue, and a second import adds nothing.
#[test]
fn a_queue_goes_to_label_studio_and_argilla_and_its_labels_come_back() {
    let d = tempfile::tempdir().unwrap();
    let queue = d.path().join("queue");
    write_groups(&queue, 2);
    let q = queue.to_str().unwrap();
    let tasks_file = d.path().join("tasks.json");
    common::rlhf_ok(&[
        "label",
        "export",
        q,
        "--format",
        "label-studio",
        "--out",
        tasks_file.to_str().unwrap(),
    ]);
    let config = std::fs::read_to_string(d.path().join("tasks.xml")).unwrap();
    assert!(config.contains("<Bucket name=\"rank_3\""), "{config}");
    let mut tasks: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&tasks_file).unwrap()).unwrap();
    // What Label Studio's JSON export holds once ann has ranked task 0
    // with a tie and skipped task 1.
    tasks[0]["annotations"] = serde_json::json!([{"completed_by": {"id": 3, "email": "ann@example.org"}, "was_cancelled": false,
        "created_at": "2026-11-30T10:00:00Z", "lead_time": 9.5,
        "result": [{"type": "ranker", "from_name": "rank", "to_name": "answers",
                    "value": {"ranker": {"_": [], "rank_1": ["a1"], "rank_2": ["a0", "a2"], "rank_3": []}}}]}]);
    tasks[1]["annotations"] =
        serde_json::json!([{"completed_by": 3, "was_cancelled": true, "result": []}]);
    let done = d.path().join("ls-export.json");
    std::fs::write(&done, tasks.to_string()).unwrap();
    let import = |format: &str, file: &std::path::Path| -> serde_json::Value {
        let out = common::rlhf_ok(&[
            "label",
            "import",
            q,
            "--format",
            format,
            file.to_str().unwrap(),
        ]);
        serde_json::from_str(out.trim()).unwrap()
    };
    let counts = import("label-studio", &done);
    assert_eq!(
        (counts["added"].as_i64(), counts["groups_left"].as_i64()),
        (Some(2), Some(1))
    );
    assert_eq!(
        import("label-studio", &done)["already_there"],
        2,
        "a second import adds nothing"
    );

    let records_file = d.path().join("records.json");
    // A round's folder names its queue.
    common::rlhf_ok(&[
        "label",
        "export",
        d.path().to_str().unwrap(),
        "--format",
        "argilla",
        "--out",
        records_file.to_str().unwrap(),
    ]);
    let mut records: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&records_file).unwrap()).unwrap();
    records[1]["responses"] = serde_json::json!({"ranking": [{"user_id": "b0b", "status": "submitted",
        "value": [{"value": "response_1", "rank": 3}, {"value": "response_2", "rank": 1}, {"value": "response_3", "rank": 2}]}]});
    std::fs::write(&records_file, records.to_string()).unwrap();
    assert_eq!(import("argilla", &records_file)["groups_left"], 0);

    let table = rlhf_datasets::load::read_table(&queue.join("labels.parquet")).unwrap();
    let column = |name: &str| table.column(name).unwrap().clone();
    let labeller = column("labeller");
    let labellers: Vec<&str> = (0..3)
        .map(|i| labeller.str().unwrap().get(i).unwrap())
        .collect();
    assert_eq!(
        labellers,
        [
            "label-studio:ann@example.org",
            "label-studio:3",
            "argilla:b0b"
        ]
    );
    let ranking = |i: usize| -> Vec<i64> {
        let s = table
            .column("ranking")
            .unwrap()
            .list()
            .unwrap()
            .get_as_series(i)
            .unwrap();
        s.i64().unwrap().into_no_null_iter().collect()
    };
    assert_eq!(
        (ranking(0), ranking(1), ranking(2)),
        (vec![1, 0, 1], vec![], vec![2, 0, 1])
    );
    let skipped: Vec<bool> = (0..3)
        .map(|i| column("skipped").bool().unwrap().get(i).unwrap())
        .collect();
    assert_eq!(skipped, [false, true, false]);

    // Another queue's export is refused by name, and adds nothing.
    records[0]["fields"]["prompt"] = serde_json::json!("Sort: 9 9");
    std::fs::write(&records_file, records.to_string()).unwrap();
    let out = label_import(q, "argilla", records_file.to_str().unwrap());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("records.json: record 0: its prompt differs from group 0's"),
        "{stderr}"
    );
    assert_eq!(labelled_rows(&queue, 3), 3);
}
