//! The queue over HTTP (axum on tokio):
//!
//! - `GET /` the page; `GET /api/next` the labeller's next group (answers
//!   in the order shown to them) or 204 when none is left;
//! - `POST /api/submit` a ranking, skip or "not rankable" for a group;
//! - `GET /api/progress` groups left and all.
//!
//! 401 without a token, 403 with an unknown one (tokens are read on every
//! request, so a revoked one stops working at once); a refused submission
//! is 400 (malformed, or it says nothing), 403 (not shown to this
//! labeller) or 409 (answered).
//!
//! The server is the queue's one writer while it runs (it holds the
//! queue's lock); `labels.parquet` is rewritten off the request path.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rlhf_datasets::labels::{LabelError, Queue, Submission};
use serde::Deserialize;
use serde_json::json;

use super::tokens::Tokens;

/// A queue's own guidelines, copied in by the loop from `labeller.guidelines`.
pub const GUIDELINES_FILE: &str = "guidelines.md";

struct App {
    dir: PathBuf,
    /// The page with the guidelines in it, rendered once.
    page: String,
    queue: Mutex<Queue>,
}

type Shared = Arc<App>;

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

/// Why a request's token was refused.
enum Denied {
    Missing,
    Unknown,
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        match self {
            Denied::Missing => error(StatusCode::UNAUTHORIZED, "a labeller token is required"),
            Denied::Unknown => error(StatusCode::FORBIDDEN, "unknown token"),
        }
    }
}

/// The labeller the request's token names.
fn labeller(app: &App, headers: &HeaderMap, query: &TokenQuery) -> Result<String, Denied> {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let token = bearer
        .or(query.token.as_deref())
        .ok_or(Denied::Missing)?
        .trim();
    // Read each time: a token made, re-issued or deleted since the last
    // request counts now. An unreadable file admits nobody.
    Tokens::read(&app.dir)
        .unwrap_or_default()
        .labeller(token)
        .map(str::to_owned)
        .ok_or(Denied::Unknown)
}

async fn page(
    State(app): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
) -> Response {
    match labeller(&app, &headers, &q) {
        Ok(_) => Html(app.page.clone()).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn next(
    State(app): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
) -> Response {
    let who = match labeller(&app, &headers, &q) {
        Ok(w) => w,
        Err(e) => return e.into_response(),
    };
    let mut queue = app.queue.lock().unwrap_or_else(|e| e.into_inner());
    let (left, total) = queue.progress();
    let yours = queue.answered_by(&who);
    match queue.serve(&who) {
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Ok(None) => StatusCode::NO_CONTENT.into_response(),
        Ok(Some(s)) => {
            let group = &queue.groups()[s.group];
            let shown: Vec<&str> = s
                .order
                .iter()
                .map(|&i| group.responses[i].as_str())
                .collect();
            Json(json!({
                "group": s.group, "prompt": group.prompt, "responses": shown,
                "labeller": who, "left": left, "total": total, "yours": yours,
            }))
            .into_response()
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitBody {
    group: usize,
    #[serde(default)]
    ranking: Vec<i64>,
    #[serde(default)]
    label: Option<bool>,
    #[serde(default)]
    not_rankable: bool,
    #[serde(default)]
    skipped: bool,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    comment: String,
}

async fn submit(
    State(app): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
    body: axum::body::Bytes,
) -> Response {
    let who = match labeller(&app, &headers, &q) {
        Ok(w) => w,
        Err(e) => return e.into_response(),
    };
    let body: SubmitBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("the body: {e}")),
    };
    if body.reason.len() > 4096 || body.comment.len() > 4096 {
        return error(
            StatusCode::BAD_REQUEST,
            "reason and comment hold at most 4096 bytes",
        );
    }
    let submission = Submission {
        group: body.group,
        labeller: who,
        ranking: body.ranking,
        label: body.label,
        not_rankable: body.not_rankable,
        skipped: body.skipped,
        reason: body.reason,
        comment: body.comment,
    };
    let mut queue = app.queue.lock().unwrap_or_else(|e| e.into_inner());
    match queue.submit(&submission) {
        Ok(_) => {
            let (left, total) = queue.progress();
            Json(json!({"ok": true, "left": left, "total": total})).into_response()
        }
        Err(e) => {
            let status = match &e {
                LabelError::NotServed { .. } => StatusCode::FORBIDDEN,
                LabelError::Answered { .. } => StatusCode::CONFLICT,
                LabelError::NoSuchGroup(_)
                | LabelError::BadRanking { .. }
                | LabelError::SaysNothing(_) => StatusCode::BAD_REQUEST,
                LabelError::File { .. } | LabelError::Busy { .. } => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            };
            error(status, e.to_string())
        }
    }
}

async fn progress(
    State(app): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
) -> Response {
    if let Err(e) = labeller(&app, &headers, &q) {
        return e.into_response();
    }
    let queue = app.queue.lock().unwrap_or_else(|e| e.into_inner());
    let (left, total) = queue.progress();
    Json(json!({"left": left, "total": total, "done": left == 0})).into_response()
}

/// How a queue is served.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub bind: SocketAddr,
    /// Labels each group needs.
    pub labels_per_group: usize,
    /// Markdown shown above the prompt; default: the queue's
    /// `guidelines.md`, when it has one.
    pub guidelines: Option<PathBuf>,
}

/// Serves the queue in `dir` until Ctrl-C (or, with `until_done`, until
/// every group has its labels). Prints the address it listens on as the
/// first line of stdout.
pub fn serve(dir: PathBuf, options: &ServeOptions, until_done: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        dir.join(rlhf_datasets::labels::GROUPS_FILE).exists(),
        "{}: not a labelling queue (no {})",
        dir.display(),
        rlhf_datasets::labels::GROUPS_FILE
    );
    let queue = Queue::open(&dir, &[], options.labels_per_group)?;
    let stop = Stop {
        until_done,
        timeout: None,
    };
    run(queue, options, stop).map(|_| ())
}

/// A loop round's wait: serves `queue` until every group has its labels
/// and gives it back; fails after `timeout` or on Ctrl-C (labels given so
/// far are kept).
pub fn serve_until_labelled(
    queue: Queue,
    options: &ServeOptions,
    timeout: std::time::Duration,
) -> anyhow::Result<Queue> {
    let stop = Stop {
        until_done: true,
        timeout: Some(timeout),
    };
    let dir = queue.dir().to_owned();
    match run(queue, options, stop)? {
        (Ended::Done, queue) => Ok(queue),
        (Ended::Interrupted, _) => anyhow::bail!(
            "labelling was interrupted; the labels given are kept in {}: rerun to continue",
            dir.display()
        ),
        (Ended::TimedOut, _) => anyhow::bail!(
            "{}: the labels were not all in after {} s (labeller.timeout_seconds); those given are kept",
            dir.display(),
            timeout.as_secs()
        ),
    }
}

/// When the server stops by itself.
struct Stop {
    until_done: bool,
    timeout: Option<std::time::Duration>,
}

enum Ended {
    Done,
    Interrupted,
    TimedOut,
}

/// The guidelines' Markdown: the file named, else the queue's own.
fn read_guidelines(
    dir: &std::path::Path,
    named: Option<&PathBuf>,
) -> anyhow::Result<Option<String>> {
    let own = dir.join(GUIDELINES_FILE);
    let path = match named {
        Some(p) => p.clone(),
        None if own.exists() => own,
        None => return Ok(None),
    };
    rlhf_datasets::files::bounded_size(&path, 1 << 20, "the limit for guidelines")
        .map_err(|e| anyhow::anyhow!("guidelines {}: {e}", path.display()))?;
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "guidelines {}: expected a UTF-8 Markdown file",
            path.display()
        )
    })?;
    Ok(Some(text))
}

/// How long open connections (a browser's keep-alive) may hold the
/// server after it was told to stop.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

fn run(queue: Queue, options: &ServeOptions, stop: Stop) -> anyhow::Result<(Ended, Queue)> {
    let dir = queue.dir().to_owned();
    if Tokens::read(&dir)?.is_empty() {
        tracing::warn!(
            "{}: no labeller has a token yet; make one with `rlhf label token NAME --queue {}`",
            dir.display(),
            dir.display()
        );
    }
    let guidelines = read_guidelines(&dir, options.guidelines.as_ref())?;
    let app = Arc::new(App {
        page: super::page::render(guidelines.as_deref()),
        dir: dir.clone(),
        queue: Mutex::new(queue),
    });
    let router = Router::new()
        .route("/", get(page))
        .route("/api/next", get(next))
        .route("/api/submit", post(submit))
        .route("/api/progress", get(progress))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .with_state(app.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let ended = runtime.block_on(listen(options.bind, router, app.clone(), stop))?;
    drop(runtime);
    let app = Arc::try_unwrap(app)
        .map_err(|_| anyhow::anyhow!("the labelling server still held its queue"))?;
    let mut queue = app.queue.into_inner().unwrap_or_else(|e| e.into_inner());
    queue.flush()?;
    Ok((ended, queue))
}

/// Serves `router` on `bind` until `stop` says so.
async fn listen(
    bind: SocketAddr,
    router: Router,
    app: Shared,
    stop: Stop,
) -> anyhow::Result<Ended> {
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .with_context(|| format!("cannot listen on {bind}"))?;
    let url = format!("http://{}", listener.local_addr()?);
    println!("listening on {url}");
    tracing::info!("labelling page: {url}/?token=TOKEN");
    rlhf_datasets::atomic::write_file(&app.dir.join("address"), url.as_bytes())?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let stopped = Arc::new(tokio::sync::Notify::new());
    let watch = {
        let (app, stopped) = (app.clone(), stopped.clone());
        async move {
            let _ = tx.send(watch(&app, &stop).await);
            stopped.notify_one();
        }
    };
    let server = axum::serve(listener, router).with_graceful_shutdown(watch);
    let deadline = async {
        stopped.notified().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        served = server => served?,
        () = deadline => {}
    }
    Ok(rx.await.unwrap_or(Ended::Interrupted))
}

/// Waits for the reason to stop, keeping `labels.parquet` up with the
/// labels meanwhile (written from a snapshot, outside the queue's lock).
async fn watch(app: &Shared, stop: &Stop) -> Ended {
    let started = std::time::Instant::now();
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let snapshot = app.queue.lock().ok().and_then(|q| q.parquet_snapshot());
        if let Some(rows) = snapshot {
            let dir = app.dir.clone();
            let n = rows.len();
            let written =
                tokio::task::spawn_blocking(move || Queue::write_snapshot(&dir, &rows)).await;
            match written {
                Ok(Ok(())) => {
                    if let Ok(mut q) = app.queue.lock() {
                        q.parquet_written(n);
                    }
                }
                Ok(Err(e)) => tracing::warn!("{e}"),
                Err(e) => tracing::warn!("writing labels.parquet: {e}"),
            }
        }
        if stop.until_done && app.queue.lock().map(|q| q.done()).unwrap_or(false) {
            return Ended::Done;
        }
        if rlhf_stages::train::interrupt_requested() {
            return Ended::Interrupted;
        }
        if stop.timeout.is_some_and(|t| started.elapsed() > t) {
            return Ended::TimedOut;
        }
    }
}
