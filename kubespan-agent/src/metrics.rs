//! Prometheus metrics of the agent on `metricsAddr` (`/metrics`, plus `/healthz`).

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::agent::Shared;
use crate::api::PeerStatusProvider;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
    public_key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

/// Renders the current state. Gauges are rebuilt on every scrape, so peers and endpoints that
/// went away do not linger.
pub fn render(shared: &Shared, data_plane: &dyn PeerStatusProvider) -> String {
    let mut registry = Registry::with_prefix("kubespan");
    let view = shared.view.borrow().clone();
    let members = Gauge::<i64>::default();
    members.set(view.members.len() as i64);
    registry.register("members", "Cluster members, this node included", members);
    let warnings = Gauge::<i64>::default();
    warnings.set(view.warnings.len() as i64);
    registry.register(
        "warnings",
        "Active membership warnings (see kubespanctl status)",
        warnings,
    );

    let retained = Gauge::<i64>::default();
    retained.set(view.retained as i64);
    registry.register(
        "members_retained",
        "Members no discovery service lists, kept as peers because their tunnels are alive",
        retained,
    );
    let counters = &shared.counters;
    for (name, help, value) in [
        (
            "discovery_own_record_tampered",
            "Times this node's record was found deleted or changed by someone else (and restored)",
            &counters.own_record_tampered,
        ),
        (
            "discovery_publish_failures",
            "Updates of this node's record that failed (retried with back-off)",
            &counters.publish_failures,
        ),
        (
            "discovery_endpoints_refused",
            "Times the discovery service refused this node's endpoints (endpoint list full)",
            &counters.endpoints_refused,
        ),
        (
            "discovery_unreadable_records",
            "Records of other affiliates that did not open with this cluster's keys (ignored)",
            &counters.unreadable_records,
        ),
    ] {
        let counter = Counter::<u64>::default();
        counter.inc_by(value.load(std::sync::atomic::Ordering::Relaxed));
        registry.register(name, help, counter);
    }

    if let Some(relayed) = &shared.relay_counters {
        for (name, help, value) in [
            (
                "relay_transmit_bytes",
                "WireGuard bytes sent to peers through relays",
                &relayed.tx_bytes,
            ),
            (
                "relay_receive_bytes",
                "WireGuard bytes received from peers through relays",
                &relayed.rx_bytes,
            ),
            (
                "relay_dropped_packets",
                "Packets for relayed peers dropped (no shared relay connected, or its queue full)",
                &relayed.dropped,
            ),
        ] {
            let counter = Counter::<u64>::default();
            counter.inc_by(value.load(std::sync::atomic::Ordering::Relaxed));
            registry.register(name, help, counter);
        }
    }

    // Only where the data plane counts them: an absent series says "not measured", where a
    // zero from kernel WireGuard would claim a health nobody checked.
    if let Some(failures) = data_plane.decrypt_failures() {
        let counter = Counter::<u64>::default();
        counter.inc_by(failures);
        registry.register(
            "wireguard_decrypt_failures",
            "WireGuard data messages that did not decrypt (unknown session, bad tag, replay); userspace device only",
            counter,
        );
    }

    let connected = Family::<EndpointLabels, Gauge>::default();
    let affiliates = Family::<EndpointLabels, Gauge>::default();
    for status in shared.connection_statuses() {
        let labels = EndpointLabels {
            endpoint: status.endpoint.clone(),
        };
        connected
            .get_or_create(&labels)
            .set(i64::from(status.state == "connected"));
        affiliates
            .get_or_create(&labels)
            .set(status.affiliates as i64);
    }
    registry.register(
        "discovery_connected",
        "1 while the discovery service's watch stream is open",
        connected,
    );
    registry.register(
        "discovery_affiliates",
        "Readable records in the last snapshot of each discovery service",
        affiliates,
    );

    let by_state = Family::<StateLabels, Gauge>::default();
    for state in ["up", "down", "unknown"] {
        let _ = by_state.get_or_create(&StateLabels {
            state: state.into(),
        });
    }
    let peer_up = Family::<PeerLabels, Gauge>::default();
    let handshake_age = Family::<PeerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let rx = Family::<PeerLabels, Gauge>::default();
    let tx = Family::<PeerLabels, Gauge>::default();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    for peer in &view.peers {
        let status = data_plane.peer_status(&peer.public_key).unwrap_or_default();
        let state = if status.state.is_empty() {
            "unknown"
        } else {
            status.state
        };
        by_state
            .get_or_create(&StateLabels {
                state: state.into(),
            })
            .inc();
        let labels = PeerLabels {
            peer: peer.label.clone(),
            public_key: peer.public_key.clone(),
        };
        peer_up.get_or_create(&labels).set(i64::from(state == "up"));
        if status.last_handshake_unix_ms > 0 {
            handshake_age
                .get_or_create(&labels)
                .set((now_ms - status.last_handshake_unix_ms) as f64 / 1000.0);
        }
        rx.get_or_create(&labels).set(status.rx_bytes as i64);
        tx.get_or_create(&labels).set(status.tx_bytes as i64);
    }
    registry.register("peers", "WireGuard peers by state", by_state);
    registry.register("peer_up", "1 when the peer is up", peer_up);
    registry.register(
        "peer_last_handshake_age_seconds",
        "Seconds since the peer's last handshake",
        handshake_age,
    );
    registry.register("peer_receive_bytes", "Bytes received from the peer", rx);
    registry.register("peer_transmit_bytes", "Bytes sent to the peer", tx);

    let mut text = String::new();
    let _ = encode(&mut text, &registry);
    text
}

/// Claims the metrics listener before anything else starts.
pub async fn bind(addr: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on metricsAddr {addr:?}: {e}"))
}

/// Serves `/metrics` and `/healthz` on a listener from [`bind`] until `stop`.
pub fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    data_plane: Arc<dyn PeerStatusProvider>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving metrics");
    }
    let router = Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = render(&shared, data_plane.as_ref());
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                        .into_response()
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
        {
            tracing::error!(error = %e, "metrics server failed");
        }
    })
}
