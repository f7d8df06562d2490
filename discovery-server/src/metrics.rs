//! Prometheus metrics of the discovery server (OpenMetrics text on `--metrics-addr`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::{
    counter::Counter, family::Family, gauge::Gauge, histogram::Histogram,
};
use prometheus_client::registry::Registry;

use crate::store::Totals;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub clusters: Gauge,
    pub affiliates: Gauge,
    pub endpoints: Gauge,
    pub payload_bytes: Gauge,
    pub watchers: Gauge,
    pub superseded_bytes: Gauge,
    pub rpcs: Family<RpcLabels, Counter>,
    pub rate_limited: Family<OutcomeLabels, Counter>,
    pub watch_aborted: Counter,
    pub snapshot_duration: Histogram,
    pub snapshot_size_bytes: Gauge,
    pub snapshot_failures: Counter,
    pub gc_removed: Family<KindLabels, Counter>,
    pub connections: Gauge,
    pub connections_refused: Family<OutcomeLabels, Counter>,
    pub connections_closed: Family<OutcomeLabels, Counter>,
    pub stun_answered: Counter,
    pub stun_rate_limited: Counter,
    pub stun_malformed: Counter,
    /// The embedded relay's metrics (`--relay-addr`), served with ours.
    pub relay: std::sync::OnceLock<std::sync::Arc<openspan_relay::metrics::RelayMetrics>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("discovery");
        let metrics = Self {
            clusters: Gauge::default(),
            affiliates: Gauge::default(),
            endpoints: Gauge::default(),
            payload_bytes: Gauge::default(),
            watchers: Gauge::default(),
            superseded_bytes: Gauge::default(),
            rpcs: Family::default(),
            rate_limited: Family::default(),
            watch_aborted: Counter::default(),
            snapshot_duration: Histogram::new([0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            snapshot_size_bytes: Gauge::default(),
            snapshot_failures: Counter::default(),
            gc_removed: Family::default(),
            connections: Gauge::default(),
            connections_refused: Family::default(),
            connections_closed: Family::default(),
            stun_answered: Counter::default(),
            stun_rate_limited: Counter::default(),
            stun_malformed: Counter::default(),
            relay: std::sync::OnceLock::new(),
            registry: Registry::default(),
        };
        // Every known label value exists from the start, at zero: a query or an alert finds the
        // family before the first event, and increase() counts that first event (a series that
        // appears at 1 has no increase to show).
        for outcome in ["delayed", "refused"] {
            let _ = metrics
                .rate_limited
                .get_or_create(&OutcomeLabels { outcome });
        }
        for outcome in ["global_limit", "per_ip_limit"] {
            let _ = metrics
                .connections_refused
                .get_or_create(&OutcomeLabels { outcome });
        }
        for outcome in ["handshake_timeout", "idle", "no_call", "response_stalled"] {
            let _ = metrics
                .connections_closed
                .get_or_create(&OutcomeLabels { outcome });
        }
        for kind in ["affiliate", "endpoints_of_affiliate"] {
            let _ = metrics.gc_removed.get_or_create(&KindLabels { kind });
        }
        registry.register(
            "clusters",
            "Clusters with at least one affiliate",
            metrics.clusters.clone(),
        );
        registry.register(
            "affiliates",
            "Stored affiliates",
            metrics.affiliates.clone(),
        );
        registry.register(
            "endpoints",
            "Stored affiliate endpoints",
            metrics.endpoints.clone(),
        );
        registry.register(
            "payload_bytes",
            "Bytes of stored affiliate data and endpoints",
            metrics.payload_bytes.clone(),
        );
        registry.register("watchers", "Open Watch streams", metrics.watchers.clone());
        registry.register(
            "superseded_bytes",
            "Bytes of superseded cluster snapshots and List answers still held by slow streams",
            metrics.superseded_bytes.clone(),
        );
        registry.register(
            "rpcs",
            "Finished RPCs by method and gRPC status code",
            metrics.rpcs.clone(),
        );
        registry.register(
            "rate_limited_requests",
            "Requests over their client's rate: delayed, or refused with ResourceExhausted",
            metrics.rate_limited.clone(),
        );
        registry.register(
            "watch_aborted",
            "Watch streams ended because the watcher fell behind",
            metrics.watch_aborted.clone(),
        );
        registry.register(
            "snapshot_duration_seconds",
            "Time to take and write one snapshot",
            metrics.snapshot_duration.clone(),
        );
        registry.register(
            "snapshot_size_bytes",
            "Size of the last snapshot written",
            metrics.snapshot_size_bytes.clone(),
        );
        registry.register(
            "snapshot_failures",
            "Snapshots that could not be written",
            metrics.snapshot_failures.clone(),
        );
        registry.register(
            "gc_removed",
            "Affiliates and endpoints removed because they expired",
            metrics.gc_removed.clone(),
        );
        registry.register(
            "connections",
            "Open connections over all listeners",
            metrics.connections.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed at accept because a connection cap was reached (global_limit, per_ip_limit)",
            metrics.connections_refused.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections the server closed: handshake_timeout (no TLS handshake or protocol preface in time) or idle",
            metrics.connections_closed.clone(),
        );
        registry.register(
            "stun_answered",
            "STUN Binding requests answered on --stun-addr",
            metrics.stun_answered.clone(),
        );
        registry.register(
            "stun_rate_limited",
            "STUN Binding requests left unanswered because their source IP (IPv6: /64) was over its rate",
            metrics.stun_rate_limited.clone(),
        );
        registry.register(
            "stun_malformed",
            "UDP packets on --stun-addr dropped unanswered because they were not a well-formed STUN Binding request",
            metrics.stun_malformed.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }
}

impl Metrics {
    pub fn rpc(&self, method: &'static str, code: tonic::Code) {
        self.rpcs
            .get_or_create(&RpcLabels {
                method,
                code: code_name(code),
            })
            .inc();
    }

    /// Sets the state gauges and renders everything in the OpenMetrics text format.
    pub fn render(&self, totals: Totals, watchers: usize, superseded_bytes: usize) -> String {
        self.superseded_bytes.set(superseded_bytes as i64);
        self.clusters.set(totals.clusters as i64);
        self.affiliates.set(totals.affiliates as i64);
        self.endpoints.set(totals.endpoints as i64);
        self.payload_bytes.set(totals.payload_bytes as i64);
        self.watchers.set(watchers as i64);
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut text, &self.registry);
        if let Some(relay) = self.relay.get() {
            relay.encode_into(&mut text);
        }
        let _ = encode_eof(&mut text);
        text
    }
}

pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}
