//! The HTTP side: a landing page with live totals and a per-cluster inspect view, health and
//! readiness probes, and Prometheus metrics.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use crate::backend::Backend;
use crate::clock::UnixMillis;
use crate::metrics::Metrics;

pub struct HttpState<B> {
    pub backend: Arc<B>,
    pub metrics: Arc<Metrics>,
    /// True once state is loaded and listeners are up; false again while shutting down.
    pub ready: Arc<AtomicBool>,
    pub now: Arc<dyn Fn() -> UnixMillis + Send + Sync>,
    pub version: &'static str,
}

type Shared<B> = Arc<HttpState<B>>;

/// `/`, `/inspect`, `/healthz`, `/readyz`.
pub fn landing_router<B: Backend>(state: Shared<B>) -> Router {
    Router::new()
        .route("/", get(landing::<B>))
        .route("/inspect", get(inspect::<B>))
        .merge(probe_router())
        .with_state(state)
}

/// `/metrics`, `/healthz`, `/readyz`.
pub fn metrics_router<B: Backend>(state: Shared<B>) -> Router {
    Router::new()
        .route("/metrics", get(metrics::<B>))
        .merge(probe_router())
        .with_state(state)
}

fn probe_router<B: Backend>() -> Router<Shared<B>> {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<B>))
}

async fn readyz<B: Backend>(State(state): State<Shared<B>>) -> Response {
    if state.ready.load(Ordering::SeqCst) && state.backend.ready() {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics<B: Backend>(State(state): State<Shared<B>>) -> Response {
    let (totals, watchers) = state.backend.totals();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state
            .metrics
            .render(totals, watchers, state.backend.superseded_bytes()),
    )
        .into_response()
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:56rem;margin:2rem auto;padding:0 1rem;color:#222}\
table{border-collapse:collapse}td,th{padding:.25rem .75rem;border-bottom:1px solid #ddd;text-align:left}\
code{background:#f4f4f4;padding:0 .2rem}";

async fn landing<B: Backend>(State(state): State<Shared<B>>) -> Html<String> {
    let (totals, watchers) = state.backend.totals();
    Html(format!(
        "<!doctype html><html><head><meta charset=utf-8><title>openspan discovery server</title>\
<style>{STYLE}</style></head><body><h1>openspan discovery server</h1>\
<p>A rendezvous point for KubeSpan-style WireGuard meshes, wire-compatible with the \
<code>sidero.discovery.server.Cluster</code> gRPC API used by Talos Linux and openspan agents. \
Nodes publish end-to-end encrypted member records here and watch each other's; this server never \
sees their contents.</p>\
<table><tr><th>clusters</th><td>{}</td></tr><tr><th>affiliates</th><td>{}</td></tr>\
<tr><th>endpoints</th><td>{}</td></tr><tr><th>open watch streams</th><td>{}</td></tr>\
<tr><th>version</th><td>{}</td></tr></table>\
<h2>Inspect a cluster</h2><form action=/inspect method=get>\
<input name=cluster size=50 placeholder=\"cluster id\"> <button>Inspect</button></form>\
</body></html>",
        totals.clusters, totals.affiliates, totals.endpoints, watchers, state.version
    ))
}

#[derive(serde::Deserialize)]
struct InspectQuery {
    cluster: Option<String>,
    format: Option<String>,
}

async fn inspect<B: Backend>(
    State(state): State<Shared<B>>,
    Query(query): Query<InspectQuery>,
) -> Response {
    let Some(cluster) = query.cluster.filter(|c| !c.is_empty()) else {
        return (
            StatusCode::BAD_REQUEST,
            "give a cluster id: /inspect?cluster=<id>\n",
        )
            .into_response();
    };
    let affiliates = state.backend.inspect(&cluster);
    if query.format.as_deref() == Some("json") {
        return axum::Json(serde_json::json!({ "cluster": cluster, "affiliates": affiliates }))
            .into_response();
    }
    let now = (state.now)();
    let mut rows = String::new();
    for a in &affiliates {
        let _ = write!(
            rows,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&a.id),
            a.endpoints,
            a.data_bytes,
            describe_expiry(a.expires_at_unix_ms - now)
        );
    }
    Html(format!(
        "<!doctype html><html><head><meta charset=utf-8><title>cluster {id}</title><style>{STYLE}</style></head>\
<body><p><a href=/>&larr; discovery server</a></p><h1>Cluster <code>{id}</code></h1>\
<p>{n} affiliates. Records are encrypted by the nodes; only sizes and expiry are shown.</p>\
<table><tr><th>affiliate id</th><th>endpoints</th><th>data bytes</th><th>expires</th></tr>{rows}</table>\
</body></html>",
        id = escape(&cluster),
        n = affiliates.len(),
    ))
    .into_response()
}

fn describe_expiry(in_ms: i64) -> String {
    if in_ms <= 0 {
        return "expired (awaiting collection)".into();
    }
    let secs = in_ms / 1000;
    format!("in {}m{:02}s", secs / 60, secs % 60)
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_markup() {
        assert_eq!(
            super::escape("<a href='x'>&</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&lt;/a&gt;"
        );
    }
}
