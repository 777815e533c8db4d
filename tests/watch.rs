//! `rlhf watch` on a live run, in a real headless Chromium: an SFT stage
//! taught to answer with a `<script>`, then PPO on the gold judge. While
//! it runs the page shows SFT running and its loss chart gaining points,
//! then PPO running and its newest rollouts, whose answers stay text;
//! at the end every stage is finished. The same run folder copied
//! elsewhere reads the same, and the API serves nothing outside the run.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`just test` installs
//! them). `RLHF_SCREENSHOT_WATCH=FILE` keeps the screenshot the README
//! shows.

use crate::common;
use crate::label_browser::{browser, js, start_driver};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const XSS: &str = "<script>window.__pwned=1</script>";

/// The bundled task's first prompts, every demonstration answered with
/// the attack, and its PPO prompts.
fn experiment(dir: &Path) -> PathBuf {
    let text =
        std::fs::read_to_string(common::workspace().join("datasets/task/sft.jsonl")).unwrap();
    let demos: String = text
        .lines()
        .take(64)
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["completion"] = XSS.into();
            format!("{v}\n")
        })
        .collect();
    std::fs::write(dir.join("sft.jsonl"), demos).unwrap();
    common::task_head("prompts.jsonl", &dir.join("prompts.jsonl"), 16);
    let exp = dir.join("live.yaml");
    std::fs::write(
        &exp,
        "name: live\ndevice: cpu\nthreads: 1\n\
         model: {n_layer: 2, n_head: 2, n_embd: 48, n_positions: 96}\nstages:\n\
         \x20 sft: {kind: sft, data: sft.jsonl, max_steps: 1500, batch_size: 8, optimizer: {lr: 0.003}, checkpoint_every: 1000, eval_every: 100000}\n\
         \x20 ppo: {kind: ppo, policy: sft, gold_reward: true, prompts: prompts.jsonl, iterations: 8, rollout_batch: 8, minibatch_size: 8,\n\
         \x20       sampling: {max_new_tokens: 40, temperature: 0.5}, save_rollouts: true}\n",
    )
    .unwrap();
    exp
}

/// A server or driver, killed when the test ends, failed or not.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (polling the page) until `check` holds, or fails naming `what`.
async fn until(
    c: &fantoccini::Client,
    what: &str,
    limit: Duration,
    check: &str,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let got = js(c, check).await;
        if !got.is_null() && got != serde_json::Value::Bool(false) {
            return got;
        }
        assert!(Instant::now() < deadline, "the page never showed {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A script: whether the stage's row shows one of `states`.
fn state_is(stage: &str, states: &[&str]) -> String {
    format!("const r = document.querySelector('#stages tr[data-stage=\"{stage}\"]'); return !!r && {states:?}.includes(r.dataset.state);")
}

/// A script: the state the stage's row shows.
fn state_of(stage: &str) -> String {
    format!("const r = document.querySelector('#stages tr[data-stage=\"{stage}\"]'); return r && r.dataset.state;")
}

/// An expression: the points on SFT's loss chart.
const LOSS_POINTS: &str = "(() => { const c = document.querySelector('#charts svg[data-metric=\"loss\"]'); return c ? Number(c.dataset.points) : 0; })()";

#[test]
fn the_run_page_follows_a_live_run_in_a_real_browser() {
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path());
    let run_dir = d.path().join("runs/live");
    let mut run = common::Rlhf::new(["run", exp.to_str().unwrap()])
        .dir(d.path())
        .spawn();
    run.wait_until("the run's plan", Duration::from_secs(60), || {
        run_dir.join("plan.json").exists()
    });
    let (watch, port) = common::serve(&["watch", run_dir.to_str().unwrap()]);
    let watch = Killed(watch);
    let (driver, driver_port) = start_driver(d.path());
    let driver = Killed(driver);
    let screenshot = std::env::var_os("RLHF_SCREENSHOT_WATCH")
        .map_or_else(|| d.path().join("watch.png"), PathBuf::from);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let c = browser(driver_port, &d.path().join("profile")).await;
        c.goto(&format!("http://127.0.0.1:{port}/")).await.unwrap();
        // PPO waits on SFT; SFT runs, and its loss curve grows while it does.
        until(&c, "SFT running", Duration::from_secs(60), &state_is("sft", &["running"])).await;
        let first = until(&c, "SFT's loss", Duration::from_secs(60), &format!("return {LOSS_POINTS} || false")).await;
        let ppo = js(&c, &state_of("ppo")).await;
        assert_eq!(ppo, "waiting", "PPO waits for SFT");
        let later = until(
            &c,
            "SFT's loss gaining points",
            Duration::from_secs(60),
            &format!("const n = {LOSS_POINTS}; return n > {first} ? n : false;"),
        )
        .await;
        assert!(later.as_u64() > first.as_u64(), "{later} after {first}");
        let progress = js(&c, "return document.querySelector('#stages tr[data-stage=\"sft\"] td:nth-child(4)').textContent").await;
        assert!(progress.as_str().unwrap().contains("/ 1500"), "{progress}");

        // Then PPO runs; its rollouts show, the model's HTML as text.
        until(&c, "PPO running or done", Duration::from_secs(120), &state_is("ppo", &["running", "finished"])).await;
        assert_eq!(js(&c, &state_of("sft")).await, "finished");
        until(&c, "rollouts", Duration::from_secs(120), "return document.querySelectorAll('#rollouts td.answer').length > 0").await;
        c.screenshot().await.map(|png| std::fs::write(&screenshot, png).unwrap()).unwrap();
        let answers = js(&c, "return [...document.querySelectorAll('#rollouts td.answer')].map(td => td.textContent)").await;
        assert!(
            answers.as_array().unwrap().iter().any(|a| a.as_str().unwrap().contains("<script>")),
            "the policy answers with the script it learned: {answers}"
        );
        let elements = js(&c, "return document.querySelectorAll('#rollouts td.answer *').length + document.querySelectorAll('body script').length").await;
        assert_eq!(elements, 0, "answers are text, no script element came in");
        assert_eq!(js(&c, "return window.__pwned === undefined").await, true);

        until(&c, "the run ending", Duration::from_secs(180), "return document.getElementById('live').textContent === 'not running'").await;
        assert_eq!(js(&c, &state_of("ppo")).await, "finished");
        zoom_in_and_out(&c).await;

        // A round's labelling and the report appear as they are written.
        label_one_of_two_groups(&run_dir.join("round-1/queue"));
        std::fs::create_dir_all(run_dir.join("report")).unwrap();
        std::fs::write(
            run_dir.join("report/report.md"),
            format!("# The report\n\n{XSS}\n\n| policy | gold |\n|---|---|\n| ppo | 0.5 |\n"),
        )
        .unwrap();
        let row = until(&c, "the round's labelling", Duration::from_secs(30), "const r = document.querySelector('#labelling tr[data-queue=\"round-1/queue\"]'); return r && r.textContent;").await;
        assert!(row.as_str().unwrap().contains("1 / 2"), "{row}");
        let report = until(&c, "the report", Duration::from_secs(30), "const h = document.querySelector('#report h1'); return h && document.getElementById('report').textContent;").await;
        assert!(report.as_str().unwrap().contains(XSS), "the report's HTML shown as text: {report}");
        assert_eq!(js(&c, "return document.querySelectorAll('#report script, #report table').length").await, 1, "a table, no script");
        assert_eq!(js(&c, "return window.__pwned === undefined").await, true);
        c.close().await.unwrap();
    });
    let (status, log) = run.wait();
    assert!(status.success(), "{log}");
    drop((watch, driver));
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a screenshot of the page");
    copied_run_reads_the_same(d.path(), &run_dir);
}

/// Dragging across SFT's loss chart keeps only the steps in between;
/// a double-click shows them all again.
async fn zoom_in_and_out(c: &fantoccini::Client) {
    let all = js(c, &format!("return {LOSS_POINTS}"))
        .await
        .as_u64()
        .unwrap();
    let drag = "const c = document.querySelector('#charts svg[data-metric=\"loss\"]'); const r = c.getBoundingClientRect();\
                const at = (type, f) => c.dispatchEvent(new MouseEvent(type, {bubbles: true, clientX: r.left + r.width * f, clientY: r.top + r.height / 2}));\
                at('mousedown', 0.4); at('mousemove', 0.6); at('mouseup', 0.6);";
    js(c, drag).await;
    let zoomed = js(c, &format!("return {LOSS_POINTS}"))
        .await
        .as_u64()
        .unwrap();
    assert!(
        zoomed > 0 && zoomed < all / 2,
        "{zoomed} of {all} points after zooming in"
    );
    js(c, "document.querySelector('#charts svg[data-metric=\"loss\"]').dispatchEvent(new MouseEvent('dblclick', {bubbles: true}))").await;
    let again = js(c, &format!("return {LOSS_POINTS}"))
        .await
        .as_u64()
        .unwrap();
    assert_eq!(again, all, "a double-click shows every step again");
}

/// A round's queue of two groups, one labelled by ann.
fn label_one_of_two_groups(dir: &Path) {
    use rlhf_datasets::labels::{Group, Queue, Submission};
    let groups: Vec<Group> = (0..2)
        .map(|i| Group {
            prompt: format!("Upper: q{i}\n"),
            responses: vec!["A".into(), "B".into()],
            round: 1,
            policy: "ppo".into(),
        })
        .collect();
    let mut queue = Queue::open(dir, &groups, 1).unwrap();
    let served = queue.serve("ann").unwrap().unwrap();
    queue
        .submit(&Submission {
            group: served.group,
            labeller: "ann".into(),
            ranking: vec![0, 1],
            ..Default::default()
        })
        .unwrap();
}

/// The run folder copied elsewhere: the same stages, finished, and the
/// same metrics; nothing outside the run is served.
fn copied_run_reads_the_same(dir: &Path, run_dir: &Path) {
    let copy = dir.join("elsewhere/live");
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    let status = std::process::Command::new("cp")
        .args(["-a", run_dir.to_str().unwrap(), copy.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::write(dir.join("elsewhere/secret.txt"), "{\"step\": 1}\n").unwrap();
    let (watch, port) = common::serve(&["watch", copy.to_str().unwrap()]);
    let _watch = Killed(watch);
    let (code, body) = common::http(port, "GET", "/api/state", None, "");
    assert_eq!(code, 200, "{body}");
    let state: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(state["live"], false);
    let states: Vec<(&str, &str)> = state["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["label"].as_str().unwrap(), s["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states, [("sft", "finished"), ("ppo", "finished")]);
    let (code, body) = common::http(port, "GET", "/api/metrics?stage=ppo&from=0", None, "");
    assert_eq!(code, 200);
    let chunk: serde_json::Value = serde_json::from_str(&body).unwrap();
    let lines = std::fs::read_to_string(run_dir.join("ppo/metrics.jsonl")).unwrap();
    assert_eq!(
        chunk["rows"].as_array().unwrap().len(),
        lines.lines().count()
    );
    for bad in [
        "/api/metrics?stage=..%2Fsecret.txt",
        "/api/metrics?stage=nope",
        "/report/..%2F..%2Fsecret.txt",
        "/report/secret.txt",
        "/api/rollouts?stage=%2Fetc",
    ] {
        let (code, body) = common::http(port, "GET", bad, None, "");
        assert_eq!(code, 404, "{bad}: {body}");
        assert!(!body.contains("step"), "{bad}: {body}");
    }
    // A site whose name was rebound to 127.0.0.1 is refused.
    let rebound = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            s,
            "GET /api/state HTTP/1.1\r\nHost: evil.example:{port}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(
        rebound.starts_with("HTTP/1.1 403") && !rebound.contains("sft"),
        "{rebound}"
    );
    let (_, page) = common::http(port, "GET", "/", None, "");
    assert!(page.contains("watch.js") && !page.contains("<script>\n"));
}
