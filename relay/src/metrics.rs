//! Prometheus metrics of the relay (OpenMetrics text on `--metrics-addr`, or appended to the
//! discovery server's `/metrics` when the relay runs inside it).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    /// `datagram` or `stream`.
    pub transport: &'static str,
}

pub struct RelayMetrics {
    registry: Registry,
    pub connections: Gauge,
    pub connections_refused: Family<ReasonLabels, Counter>,
    pub registrations: Gauge,
    pub registrations_total: Counter,
    pub registrations_replaced: Counter,
    pub auth_failures: Family<ReasonLabels, Counter>,
    pub packets: Family<TransportLabels, Counter>,
    pub bytes: Family<TransportLabels, Counter>,
    pub drops: Family<ReasonLabels, Counter>,
    pub clusters_configured: Gauge,
    pub reloads: Family<ReasonLabels, Counter>,
}

impl Default for RelayMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("relay");
        let m = Self {
            connections: Gauge::default(),
            connections_refused: Family::default(),
            registrations: Gauge::default(),
            registrations_total: Counter::default(),
            registrations_replaced: Counter::default(),
            auth_failures: Family::default(),
            packets: Family::default(),
            bytes: Family::default(),
            drops: Family::default(),
            clusters_configured: Gauge::default(),
            reloads: Family::default(),
            registry: Registry::default(),
        };
        // Every known label value exists from the start, at zero: a query or an alert finds the
        // family before the first event, and increase() counts that first event.
        for reason in [
            "unauthorized",
            "malformed",
            "timeout",
            "handshake",
            "cluster_full",
        ] {
            let _ = m.auth_failures.get_or_create(&ReasonLabels { reason });
        }
        for transport in ["datagram", "stream"] {
            let _ = m.packets.get_or_create(&TransportLabels { transport });
            let _ = m.bytes.get_or_create(&TransportLabels { transport });
        }
        for reason in [
            "unknown_destination",
            "to_self",
            "packet_rate",
            "byte_rate",
            "queue_full",
            "too_large",
            "closed",
            "malformed",
        ] {
            let _ = m.drops.get_or_create(&ReasonLabels { reason });
        }
        registry.register(
            "connections",
            "Open QUIC connections (registered or still in their Hello)",
            m.connections.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections refused at once, by limit",
            m.connections_refused.clone(),
        );
        registry.register(
            "registrations",
            "Registered clients (cluster, public key)",
            m.registrations.clone(),
        );
        registry.register(
            "hellos_accepted",
            "Successful Hellos (registrations made)",
            m.registrations_total.clone(),
        );
        registry.register(
            "registrations_replaced",
            "Registrations that replaced an older connection of the same key",
            m.registrations_replaced.clone(),
        );
        registry.register(
            "auth_failures",
            "Hellos refused: unauthorized (unknown cluster or wrong token), malformed, timeout, cluster_full",
            m.auth_failures.clone(),
        );
        registry.register(
            "packets_relayed",
            "Packets handed to the destination's connection, by transport",
            m.packets.clone(),
        );
        registry.register(
            "bytes_relayed",
            "WireGuard packet bytes handed to the destination's connection, by transport",
            m.bytes.clone(),
        );
        registry.register(
            "packets_dropped",
            "Packets dropped, by reason",
            m.drops.clone(),
        );
        registry.register(
            "clusters_configured",
            "Clusters allowed to use the relay",
            m.clusters_configured.clone(),
        );
        registry.register(
            "config_reloads",
            "Reloads of the certificate and the clusters file, by outcome",
            m.reloads.clone(),
        );
        Self { registry, ..m }
    }
}

impl RelayMetrics {
    pub fn count_drop(&self, reason: &'static str) {
        self.drops.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn relayed(&self, transport: &'static str, bytes: usize) {
        let labels = TransportLabels { transport };
        self.packets.get_or_create(&labels).inc();
        self.bytes.get_or_create(&labels).inc_by(bytes as u64);
    }

    pub fn dropped(&self, reason: &'static str) -> u64 {
        self.drops.get_or_create(&ReasonLabels { reason }).get()
    }

    pub fn auth_failed(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn auth_failures(&self, reason: &'static str) -> u64 {
        self.auth_failures
            .get_or_create(&ReasonLabels { reason })
            .get()
    }

    pub fn relayed_packets(&self, transport: &'static str) -> u64 {
        self.packets
            .get_or_create(&TransportLabels { transport })
            .get()
    }

    /// The metrics without the closing `# EOF`, for a server that appends them to its own.
    pub fn encode_into(&self, text: &mut String) {
        // Writing into a String cannot fail.
        let _ = encode_registry(text, &self.registry);
    }

    /// A complete OpenMetrics exposition.
    pub fn render(&self) -> String {
        let mut text = String::new();
        self.encode_into(&mut text);
        let _ = encode_eof(&mut text);
        text
    }
}
