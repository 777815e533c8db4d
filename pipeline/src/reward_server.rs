//! Asking a user's reward server (`reward: {url: ...}`) for scores: one
//! `POST` of a JSON array of `{prompt, response, answer}` items, answered
//! by a JSON array of `{score, components}` results in the same order.
//! Plain HTTP/1.1 (put a local proxy in front of an https server); the
//! reply is read up to a bound, and the call is abandoned at its deadline.

use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rlhf_stages::programs::{ScoreItem, Scored};

/// The largest reply read: far above any batch of scores.
const MAX_REPLY: usize = 64 << 20;

/// One score per item from the server at `url`, within `timeout`.
pub fn scores(url: &str, timeout: Duration, items: &[ScoreItem]) -> anyhow::Result<Vec<Scored>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the HTTP client")?;
    let reply = runtime.block_on(async {
        tokio::time::timeout(timeout, post(url, items))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "reward server {url} did not answer within {} s (reward.timeout_seconds)",
                    timeout.as_secs_f64()
                )
            })?
    });
    // A lookup still running in the background is left behind, not waited for.
    runtime.shutdown_timeout(Duration::from_millis(100));
    parse(url, &reply?, items.len())
}

async fn post(url: &str, items: &[ScoreItem]) -> anyhow::Result<Bytes> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = serde_json::to_vec(items).expect("items serialise");
    let request = http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .with_context(|| format!("reward server {url}: not a valid address"))?;
    let response = client
        .request(request)
        .await
        .with_context(|| format!("reward server {url}"))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_REPLY)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reward server {url}: reading its reply: {e}"))?
        .to_bytes();
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned();
        bail!("reward server {url} answered {status}: {text}");
    }
    Ok(body)
}

fn parse(url: &str, reply: &[u8], n: usize) -> anyhow::Result<Vec<Scored>> {
    let bad = |m: String| anyhow::anyhow!("reward server {url}: {m}");
    let values: Vec<serde_json::Value> = serde_json::from_slice(reply).map_err(|e| {
        bad(format!(
            "expected a JSON array of {{\"score\": x}} results ({e})"
        ))
    })?;
    if values.len() != n {
        return Err(bad(format!("{} results for {n} answers", values.len())));
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| Scored::from_json(v).map_err(|e| bad(format!("result {}: {e}", i + 1))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::post;

    fn item(r: &str) -> ScoreItem {
        ScoreItem {
            prompt: "p".into(),
            response: r.into(),
            answer: None,
        }
    }

    /// A server on a free port answering with `reply(items)`.
    fn serve(reply: fn(Vec<ScoreItem>) -> (u16, String)) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let app = axum::Router::new().route(
                    "/score",
                    post(
                        move |axum::Json(items): axum::Json<Vec<ScoreItem>>| async move {
                            let (status, body) = reply(items);
                            (axum::http::StatusCode::from_u16(status).unwrap(), body)
                        },
                    ),
                );
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        format!("http://{addr}/score")
    }

    #[test]
    fn a_reward_server_scores_answers_in_order() {
        let url = serve(|items| {
            let out: Vec<serde_json::Value> = items
                .iter()
                .map(|i| serde_json::json!({"score": i.response.len(), "components": {"len": i.response.len()}}))
                .collect();
            (200, serde_json::to_string(&out).unwrap())
        });
        let got = scores(&url, Duration::from_secs(10), &[item("ab"), item("abcd")]).unwrap();
        assert_eq!((got[0].score, got[1].score), (2.0, 4.0));
        assert_eq!(got[1].components["len"], 4.0);
    }

    #[test]
    fn bad_replies_are_named() {
        let url = serve(|_| (200, "[{\"score\": 1}]".into()));
        let e = scores(&url, Duration::from_secs(10), &[item("a"), item("b")]).unwrap_err();
        assert!(e.to_string().contains("1 results for 2 answers"), "{e}");
        let url = serve(|_| (500, "model not loaded".into()));
        let e = scores(&url, Duration::from_secs(10), &[item("a")]).unwrap_err();
        assert!(
            format!("{e:#}").contains("500") && format!("{e:#}").contains("model not loaded"),
            "{e:#}"
        );
        let url = serve(|_| (200, "[{\"score\": 1, \"components\": null}]".into()));
        let got = scores(&url, Duration::from_secs(10), &[item("a")]).unwrap();
        assert!(got[0].components.is_empty(), "null components are none");
        let url = serve(|_| (200, "[{\"score\": \"high\"}]".into()));
        let e = scores(&url, Duration::from_secs(10), &[item("a")]).unwrap_err();
        assert!(e.to_string().contains("result 1"), "{e}");
        let e = scores(
            "http://127.0.0.1:1/score",
            Duration::from_secs(10),
            &[item("a")],
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("reward server http://127.0.0.1:1/score"),
            "{e:#}"
        );
    }
}
