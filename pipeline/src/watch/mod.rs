//! `rlhf watch RUN`: a read-only page on a run folder while it runs (or
//! after, or copied from elsewhere). It reads the folder's files on each
//! request and writes nothing: the DAG with each stage's state
//! (`state`), the metrics as they grow and the newest rollouts
//! (`follow`), the rounds' labelling (`labelling`), and the report once
//! `rlhf eval` wrote it. Served by axum like the labelling page, on
//! 127.0.0.1 unless told otherwise.
//!
//! Imports run_folder, exec (Slurm job records), experiment (names) and
//! label (the Markdown renderer); nothing imports it but commands.

mod follow;
mod labelling;
mod liveness;
mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

const PAGE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("watch.js");
const STYLE: &str = include_str!("watch.css");
/// Scripts only from the page's own files: a model's answer that slipped
/// into the page as HTML could still not run.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                      img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'";
/// Answers shown of the newest rollouts.
const SHOWN_ANSWERS: usize = 16;

struct App {
    run: PathBuf,
}

type Shared = Arc<App>;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// Runs `read` (file reads, a Parquet decode) off the server's thread;
/// its value as JSON, or a 500 naming what failed.
async fn off_thread<T, E>(read: impl FnOnce() -> Result<T, E> + Send + 'static) -> Response
where
    T: serde::Serialize + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    match tokio::task::spawn_blocking(read).await {
        Ok(Ok(value)) => Json(value).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn run_state(State(app): State<Shared>) -> Response {
    let run = app.run.clone();
    off_thread(move || Ok::<_, std::convert::Infallible>(state::read(&run))).await
}

#[derive(Deserialize)]
struct StageQuery {
    stage: String,
    #[serde(default)]
    from: u64,
}

/// The 404 for a query naming no stage of this run.
fn no_stage(q: &StageQuery) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no stage {:?} in this run", q.stage),
    )
}

async fn metrics(State(app): State<Shared>, Query(q): Query<StageQuery>) -> Response {
    let Some(dir) = state::folder_of(&app.run, &q.stage) else {
        return no_stage(&q);
    };
    let path = dir.join(rlhf_stages::train::metrics::METRICS_FILE);
    off_thread(move || follow::metrics_from(&path, q.from)).await
}

async fn rollouts(State(app): State<Shared>, Query(q): Query<StageQuery>) -> Response {
    let Some(dir) = state::folder_of(&app.run, &q.stage) else {
        return no_stage(&q);
    };
    let Some(file) = state::newest_rollouts(&dir) else {
        return Json(json!({"file": null, "rows": []})).into_response();
    };
    let path = dir.join(rlhf_datasets::rollout::ROLLOUTS_DIR).join(&file);
    off_thread(move || {
        follow::rollouts(&path, SHOWN_ANSWERS).map(|rows| json!({"file": file, "rows": rows}))
    })
    .await
}

fn report_dir(app: &App) -> PathBuf {
    app.run.join(crate::run_folder::REPORT_DIR)
}

/// `report.md` as HTML (its HTML escaped, its plots served from here).
async fn report(State(app): State<Shared>) -> Response {
    let path = report_dir(&app).join("report.md");
    let text = rlhf_datasets::files::read_bounded(&path, 16 << 20, "the limit for a report");
    match text {
        Ok(md) => Json(json!({
            "html": crate::label::page::markdown_to_html(&md, Some("report/"))
        }))
        .into_response(),
        Err(_) => Json(json!({"html": null})).into_response(),
    }
}

/// A plot of the report: a plain file name, PNG or SVG.
async fn report_file(State(app): State<Shared>, UrlPath(name): UrlPath<String>) -> Response {
    let kind = match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("png") => "image/png",
        Some("svg") => "image/svg+xml",
        _ => return error(StatusCode::NOT_FOUND, "only the report's plots are served"),
    };
    if !crate::label::page::is_plain_file_name(&name) {
        return error(StatusCode::NOT_FOUND, "not a file of the report");
    }
    let path = report_dir(&app).join(&name);
    match rlhf_datasets::files::bounded_size(&path, 64 << 20, "the limit for a plot")
        .ok()
        .and_then(|_| std::fs::read(&path).ok())
    {
        Some(bytes) => (
            [
                (header::CONTENT_TYPE, kind),
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'none'; style-src 'unsafe-inline'",
                ),
            ],
            bytes,
        )
            .into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no {name} in the report")),
    }
}

/// Whether a request's `Host` names this machine's loopback: a page of
/// another site that rebinds its name to 127.0.0.1 cannot read the run.
/// A server bound beyond loopback (`--bind 0.0.0.0:PORT`) was opened to
/// the network on purpose and answers any name.
fn host_allowed(host: Option<&str>, open_to_network: bool) -> bool {
    if open_to_network {
        return true;
    }
    let Some(host) = host else {
        return false;
    };
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    };
    ["127.0.0.1", "localhost", "[::1]"].contains(&name.to_ascii_lowercase().as_str())
}

fn router(app: Shared, open_to_network: bool) -> Router {
    let guard = move |request: axum::extract::Request, next: axum::middleware::Next| async move {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok());
        if host_allowed(host, open_to_network) {
            next.run(request).await
        } else {
            error(
                StatusCode::FORBIDDEN,
                "this page answers requests to 127.0.0.1 or localhost only",
            )
        }
    };
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", PAGE) }),
        )
        .route(
            "/watch.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/watch.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .route("/api/state", get(run_state))
        .route("/api/metrics", get(metrics))
        .route("/api/rollouts", get(rollouts))
        .route("/api/report", get(report))
        .route("/report/{name}", get(report_file))
        .layer(axum::middleware::from_fn(guard))
        .with_state(app)
}

/// Serves the page on `bind` until Ctrl-C; prints the address it listens
/// on as the first line of stdout.
pub fn serve(run: PathBuf, bind: SocketAddr) -> anyhow::Result<()> {
    anyhow::ensure!(
        run.is_dir() || !run.exists(),
        "{}: not a run folder (rlhf run writes runs/NAME)",
        run.display()
    );
    let seeds = crate::run_folder::listed_seed_runs(&run);
    if let Some((_, first)) = seeds.first() {
        anyhow::bail!(
            "{} holds one run per seed ({}): watch one of them, e.g. rlhf watch {}",
            run.display(),
            seeds
                .iter()
                .map(|(s, _)| crate::run_folder::seed_folder(*s))
                .collect::<Vec<_>>()
                .join(", "),
            first.display()
        );
    }
    if !run.exists() {
        // Started before `rlhf run` made it: the page fills once it does.
        tracing::warn!(
            "{}: no run folder yet; the page shows it once it appears",
            run.display()
        );
    }
    let app = Arc::new(App { run: run.clone() });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .with_context(|| format!("cannot listen on {bind}"))?;
        let url = format!("http://{}", listener.local_addr()?);
        println!("watching {} on {url}", run.display());
        tracing::info!("run page: {url}");
        let open_to_network = !bind.ip().is_loopback();
        let server = axum::serve(listener, router(app, open_to_network))
            .with_graceful_shutdown(interrupted());
        // A browser's keep-alive connection may not hold the stop up long.
        let deadline = async {
            interrupted().await;
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        };
        tokio::select! {
            served = server => served.context("serving the run page"),
            () = deadline => Ok(()),
        }
    })
}

/// Returns once Ctrl-C (or SIGTERM) was asked.
async fn interrupted() {
    while !rlhf_stages::train::interrupt_requested() {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_loopback_names_are_answered_unless_bound_beyond_it() {
        use super::host_allowed;
        for ok in ["127.0.0.1:8700", "localhost", "LOCALHOST:1", "[::1]:8700"] {
            assert!(host_allowed(Some(ok), false), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8700",
            "127.0.0.1.evil.example",
            "localhost.evil",
        ] {
            assert!(!host_allowed(Some(bad), false), "{bad}");
        }
        assert!(!host_allowed(None, false));
        assert!(host_allowed(Some("evil.example"), true));
    }
}
