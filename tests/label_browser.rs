//! The labelling page in a real headless Chromium, driven through
//! WebDriver (chromedriver): a labeller ranks two groups by drag and drop
//! and one by keyboard with a tie, skips one and marks one not rankable;
//! the server is killed and restarted; the Parquet rows are exactly what
//! was entered and the page serves only what is left. Model text that
//! looks like HTML stays text.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`just setup` and
//! `.ci/run` install them). `RLHF_SCREENSHOT=FILE` keeps the screenshot
//! the README shows.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::actions::{InputSource, MouseActions, PointerAction, MOUSE_BUTTON_LEFT};
use fantoccini::{Client, ClientBuilder, Locator};

const XSS: &str = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">";

/// Six groups of three distinct answers; group 2 holds the HTML attack.
fn groups() -> Vec<(String, Vec<String>)> {
    (0..6)
        .map(|g| {
            let mut answers: Vec<String> = (0..3)
                .map(|a| format!("answer {a} to question {g}"))
                .collect();
            if g == 2 {
                answers[1] = XSS.into();
            }
            (format!("Question {g}: what is {g} + {g}?"), answers)
        })
        .collect()
}

fn chromedriver() -> PathBuf {
    let path = std::env::var_os("RLHF_CHROMEDRIVER")
        .map_or_else(|| PathBuf::from("/usr/bin/chromedriver"), PathBuf::from);
    assert!(
        path.exists() && Path::new("/usr/bin/chromium").exists(),
        "this test needs Debian's chromium and chromium-driver (`just setup` installs them)"
    );
    path
}

/// chromedriver on a free port, once it accepts connections.
pub(crate) fn start_driver(dir: &Path) -> (Child, u16) {
    let port = common::free_port();
    let mut child = Command::new(chromedriver())
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("chromedriver.log")).unwrap())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (child, port);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("chromedriver did not listen on {port}");
}

pub(crate) async fn browser(driver_port: u16, profile: &Path) -> Client {
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1100,1400",
    ];
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.push(format!("--user-data-dir={}", profile.display()));
    let caps = serde_json::json!({
        "browserName": "chrome",
        "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args},
    });
    let serde_json::Value::Object(caps) = caps else {
        unreachable!()
    };
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{driver_port}"))
        .await
        .expect("a Chromium session through chromedriver")
}

pub(crate) async fn js(c: &Client, script: &str) -> serde_json::Value {
    c.execute(script, vec![]).await.unwrap()
}

/// The group the page shows, found by its prompt; waits for a new one.
async fn shown_group(c: &Client, groups: &[(String, Vec<String>)], not: Option<usize>) -> usize {
    for _ in 0..200 {
        let prompt = js(c, "return document.getElementById('prompt').textContent").await;
        let cards = js(c, "return document.querySelectorAll('#board .card').length").await;
        if let Some(g) = groups
            .iter()
            .position(|(p, _)| Some(p.as_str()) == prompt.as_str())
        {
            if Some(g) != not && cards.as_u64() == Some(groups[g].1.len() as u64) {
                return g;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the page showed no new group");
}

/// For each card shown (`answer-1`, ...), the index of its answer in the group.
async fn shown_order(c: &Client, answers: &[String]) -> Vec<usize> {
    let mut order = Vec::new();
    for i in 1..=answers.len() {
        let text = js(
            c,
            &format!("return document.querySelector('#answer-{i} pre').textContent"),
        )
        .await;
        order.push(
            answers
                .iter()
                .position(|a| Some(a.as_str()) == text.as_str())
                .expect("a card shows an answer verbatim"),
        );
    }
    order
}

/// Drags `#answer-{card}` onto the bucket of rank `rank` (0 the best).
async fn drag(c: &Client, card: usize, rank: usize) {
    let from = c
        .find(Locator::Id(&format!("answer-{card}")))
        .await
        .unwrap();
    let to = c
        .find(Locator::Css(&format!("#rank-{} .label", rank + 1)))
        .await
        .unwrap();
    let mouse = MouseActions::new("mouse".into())
        .then(PointerAction::MoveToElement {
            element: from,
            duration: None,
            x: 0.0,
            y: 0.0,
        })
        .then(PointerAction::Down {
            button: MOUSE_BUTTON_LEFT,
        })
        .then(PointerAction::MoveToElement {
            element: to.clone(),
            duration: Some(Duration::from_millis(150)),
            x: 5.0,
            y: 0.0,
        })
        .then(PointerAction::MoveToElement {
            element: to,
            duration: Some(Duration::from_millis(50)),
            x: 0.0,
            y: 0.0,
        })
        .then(PointerAction::Up {
            button: MOUSE_BUTTON_LEFT,
        });
    c.perform_actions(mouse).await.unwrap();
}

async fn click(c: &Client, id: &str) {
    c.find(Locator::Id(id))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

async fn type_into(c: &Client, id: &str, text: &str) {
    c.find(Locator::Id(id))
        .await
        .unwrap()
        .send_keys(text)
        .await
        .unwrap();
}

/// What the labeller entered for a group: ranks in the group's own order,
/// or a skip (with its reason) or "not rankable" (with its comment).
#[derive(Debug, PartialEq)]
struct Entered {
    group: i64,
    ranking: Vec<i64>,
    skipped: bool,
    not_rankable: bool,
    reason: String,
    comment: String,
}

impl Entered {
    fn ranked(group: usize, ranking: &[i64], comment: &str) -> Self {
        Self {
            group: group as i64,
            ranking: ranking.to_vec(),
            skipped: false,
            not_rankable: false,
            reason: String::new(),
            comment: comment.into(),
        }
    }
}

/// Ranks the shown group by dragging each card to its rank.
async fn rank_by_dragging(
    c: &Client,
    groups: &[(String, Vec<String>)],
    g: usize,
    own: &[i64],
    screenshot: Option<&Path>,
) -> Entered {
    let order = shown_order(c, &groups[g].1).await;
    assert_eq!(
        js(c, "return document.getElementById('submit').disabled").await,
        true,
        "nothing ranked yet"
    );
    for (i, &index) in order.iter().enumerate() {
        drag(c, i + 1, own[index] as usize).await;
        if i == 1 {
            if let Some(path) = screenshot {
                std::fs::write(path, c.screenshot().await.unwrap()).unwrap();
            }
        }
    }
    let left = js(
        c,
        "return document.querySelectorAll('#unranked .card').length",
    )
    .await;
    assert_eq!(left, 0, "every card was dropped on a rank");
    type_into(c, "comment", "dragged").await;
    click(c, "submit").await;
    Entered::ranked(g, own, "dragged")
}

/// Ranks the shown group with number keys on each card.
async fn rank_by_keys(
    c: &Client,
    groups: &[(String, Vec<String>)],
    g: usize,
    own: &[i64],
) -> Entered {
    let order = shown_order(c, &groups[g].1).await;
    for (i, &index) in order.iter().enumerate() {
        let card = c
            .find(Locator::Id(&format!("answer-{}", i + 1)))
            .await
            .unwrap();
        card.send_keys(&(own[index] + 1).to_string()).await.unwrap();
    }
    click(c, "submit").await;
    Entered::ranked(g, own, "")
}

fn rows(queue: &Path) -> Vec<Entered> {
    let path = queue.join("labels.parquet");
    let t = rlhf_datasets::load::read_table(&path).unwrap();
    let s = |name: &str, i: usize| {
        t.column(name)
            .unwrap()
            .str()
            .unwrap()
            .get(i)
            .unwrap()
            .to_owned()
    };
    let b = |name: &str, i: usize| t.column(name).unwrap().bool().unwrap().get(i).unwrap();
    (0..t.height())
        .map(|i| {
            assert_eq!(s("labeller", i), "ann");
            let ranking = t
                .column("ranking")
                .unwrap()
                .list()
                .unwrap()
                .get_as_series(i)
                .unwrap();
            Entered {
                group: t.column("group").unwrap().i64().unwrap().get(i).unwrap(),
                ranking: ranking.i64().unwrap().into_no_null_iter().collect(),
                skipped: b("skipped", i),
                not_rankable: b("not_rankable", i),
                reason: s("reason", i),
                comment: s("comment", i),
            }
        })
        .collect()
}

#[test]
fn a_labeller_ranks_skips_and_resumes_in_a_real_browser() {
    let d = tempfile::tempdir().unwrap();
    let queue = d.path().join("queue");
    std::fs::create_dir(&queue).unwrap();
    let groups = groups();
    let json: Vec<_> = groups
        .iter()
        .map(|(p, r)| serde_json::json!({"prompt": p, "responses": r, "round": 1, "policy": "round-1/ppo"}))
        .collect();
    std::fs::write(
        queue.join("groups.json"),
        serde_json::to_string(&json).unwrap(),
    )
    .unwrap();
    std::fs::write(
        queue.join("guidelines.md"),
        "Prefer **correct** answers; tie answers you cannot tell apart.\n",
    )
    .unwrap();
    let token = common::rlhf_ok(&["label", "token", "ann", "--queue", queue.to_str().unwrap()]);
    let token = token.trim().to_owned();
    let (mut server, port) = common::label_serve(&queue);
    let (mut driver, driver_port) = start_driver(d.path());
    let screenshot = std::env::var_os("RLHF_SCREENSHOT")
        .map_or_else(|| d.path().join("page.png"), PathBuf::from);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (entered, c) = runtime.block_on(async {
        let c = browser(driver_port, &d.path().join("profile")).await;
        c.goto(&format!("http://127.0.0.1:{port}/?token={token}"))
            .await
            .unwrap();
        let bold = js(
            &c,
            "return document.querySelector('#guidelines strong').textContent",
        )
        .await;
        assert_eq!(bold, "correct", "the guidelines' Markdown is rendered");
        let mut entered = Vec::new();
        let g = shown_group(&c, &groups, None).await;
        // A ranking page shows no thumbs (the flex rule must not win over `hidden`).
        let shown = "return getComputedStyle(document.getElementById('thumbs')).display";
        assert_eq!(js(&c, shown).await, "none");
        entered.push(rank_by_dragging(&c, &groups, g, &[2, 0, 1], Some(&screenshot)).await);
        let g = shown_group(&c, &groups, Some(g)).await;
        entered.push(rank_by_dragging(&c, &groups, g, &[0, 2, 1], None).await);
        let g = shown_group(&c, &groups, Some(g)).await;
        // The attack is shown as its own text and never runs.
        let order = shown_order(&c, &groups[g].1).await;
        assert!(
            order.contains(&1),
            "group {g} shows the HTML answer verbatim"
        );
        assert_eq!(
            js(
                &c,
                "return document.querySelectorAll('#board img, #board script').length"
            )
            .await,
            0
        );
        assert_eq!(js(&c, "return window.__pwned === undefined").await, true);
        entered.push(rank_by_keys(&c, &groups, g, &[1, 0, 1]).await);
        let g = shown_group(&c, &groups, Some(g)).await;
        type_into(&c, "reason", "I cannot tell").await;
        click(&c, "skip").await;
        entered.push(Entered {
            group: g as i64,
            ranking: vec![],
            skipped: true,
            not_rankable: false,
            reason: "I cannot tell".into(),
            comment: String::new(),
        });
        let g = shown_group(&c, &groups, Some(g)).await;
        type_into(&c, "comment", "all wrong").await;
        click(&c, "notrankable").await;
        entered.push(Entered {
            group: g as i64,
            ranking: vec![],
            skipped: false,
            not_rankable: true,
            reason: String::new(),
            comment: "all wrong".into(),
        });
        shown_group(&c, &groups, Some(g)).await;
        (entered, c)
    });
    assert_eq!(
        entered.iter().map(|e| e.group).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    // The server writes labels.parquet off the request path: give it a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while rows(&queue).len() != entered.len() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(rows(&queue), entered, "the rows are what was entered");

    // Killed and restarted: every label kept, only group 5 left for ann.
    server.kill().unwrap();
    server.wait().unwrap();
    let (mut server, port) = common::label_serve(&queue);
    runtime.block_on(async {
        c.goto(&format!("http://127.0.0.1:{port}/?token={token}"))
            .await
            .unwrap();
        assert_eq!(shown_group(&c, &groups, None).await, 5);
        let progress = js(&c, "return document.getElementById('progress').textContent").await;
        assert!(
            progress
                .as_str()
                .unwrap()
                .starts_with("4 of 6 groups done, 2 left"),
            "{progress}"
        );
        c.close().await.unwrap();
    });
    assert_eq!(rows(&queue), entered);
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a screenshot of the page");
    server.kill().unwrap();
    server.wait().unwrap();
    driver.kill().unwrap();
    driver.wait().unwrap();
}

/// Groups of one answer are judged thumbs up or down: ann clicks Good,
/// presses B, types a comment holding both keys (which must not submit)
/// and clicks Good, then skips one. `labels.parquet` holds exactly those
/// labels, and a KTO stage (`kind: dpo, loss: kto`) trains on the file.
#[test]
fn a_labeller_gives_thumbs_that_a_kto_stage_trains_on_in_a_real_browser() {
    let d = tempfile::tempdir().unwrap();
    let queue = d.path().join("queue");
    std::fs::create_dir(&queue).unwrap();
    let groups: Vec<(String, Vec<String>)> = (0..4)
        .map(|g| {
            (
                format!("Question {g}: what is {g} + {g}?"),
                vec![format!("{}", 2 * g + g % 2)],
            )
        })
        .collect();
    let json: Vec<_> = groups
        .iter()
        .map(|(p, r)| serde_json::json!({"prompt": p, "responses": r, "round": 0, "policy": "sft"}))
        .collect();
    std::fs::write(
        queue.join("groups.json"),
        serde_json::to_string(&json).unwrap(),
    )
    .unwrap();
    let token = common::rlhf_ok(&["label", "token", "ann", "--queue", queue.to_str().unwrap()]);
    let token = token.trim().to_owned();
    let (mut server, port) = common::label_serve(&queue);
    let (mut driver, driver_port) = start_driver(d.path());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let entered = runtime.block_on(async {
        let c = browser(driver_port, &d.path().join("profile")).await;
        c.goto(&format!("http://127.0.0.1:{port}/?token={token}"))
            .await
            .unwrap();
        let mut entered: Vec<(i64, Option<bool>, String)> = Vec::new();
        let g = shown_group(&c, &groups, None).await;
        let title = js(&c, "return document.getElementById('title').textContent").await;
        assert_eq!(title, "Is this answer good?");
        let shown = "const d = id => getComputedStyle(document.getElementById(id)).display; return [d('submit'), d('notrankable'), d('thumbs'), document.querySelectorAll('.bucket').length]";
        assert_eq!(js(&c, shown).await, serde_json::json!(["none", "none", "flex", 0]));
        click(&c, "good").await;
        entered.push((g as i64, Some(true), String::new()));
        let g = shown_group(&c, &groups, Some(g)).await;
        c.find(Locator::Id("good")).await.unwrap().send_keys("b").await.unwrap();
        entered.push((g as i64, Some(false), String::new()));
        let g = shown_group(&c, &groups, Some(g)).await;
        type_into(&c, "comment", "a bug, but good").await;
        click(&c, "good").await;
        entered.push((g as i64, Some(true), "a bug, but good".into()));
        let g = shown_group(&c, &groups, Some(g)).await;
        type_into(&c, "reason", "unsure").await;
        click(&c, "skip").await;
        entered.push((g as i64, None, String::new()));
        for _ in 0..200 {
            let p = js(&c, "return document.getElementById('progress').textContent").await;
            if p.as_str().is_some_and(|p| p.starts_with("Nothing left")) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        c.close().await.unwrap();
        entered
    });
    let path = queue.join("labels.parquet");
    let read = || {
        let t = rlhf_datasets::load::read_table(&path).unwrap();
        let labels = t.column("label").unwrap().bool().unwrap().clone();
        let comments = t.column("comment").unwrap().str().unwrap().clone();
        let groups = t.column("group").unwrap().i64().unwrap().clone();
        (0..t.height())
            .map(|i| {
                let comment = comments.get(i).unwrap().to_owned();
                (groups.get(i).unwrap(), labels.get(i), comment)
            })
            .collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while (!path.exists() || read().len() != entered.len()) && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(read(), entered, "the rows are the thumbs given");
    server.kill().unwrap();
    server.wait().unwrap();
    driver.kill().unwrap();
    driver.wait().unwrap();

    let exp = d.path().join("exp.yaml");
    std::fs::write(
        &exp,
        format!(
            "name: thumbs\ndevice: cpu\nmodel: {{n_layer: 1, n_head: 2, n_embd: 16, n_positions: 64}}\nstages:\n  kto: {{kind: dpo, loss: kto, data: \"{}\", batch_size: 2, max_steps: 2, eval_fraction: 0.0}}\n",
            path.display()
        ),
    )
    .unwrap();
    let out = d.path().join("kto");
    common::rlhf_ok(&[
        "stage",
        "--config",
        exp.to_str().unwrap(),
        "kto",
        "--out",
        out.to_str().unwrap(),
    ]);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(
        summary["labelled"],
        serde_json::json!({"desirable": 2, "undesirable": 1}),
        "{summary}"
    );
    assert_eq!(summary["skipped_rows"], 1, "the skip, counted");
}
