//! `openspan-relay`: the standalone relay server.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use openspan_relay::clusters::Clusters;
use openspan_relay::metrics::RelayMetrics;
use openspan_relay::ratelimit::Rate;
use openspan_relay::tls::TlsFiles;
use openspan_relay::{RelayConfig, RelayLimits};
use tokio_util::sync::CancellationToken;

/// Relays WireGuard packets over QUIC between mesh nodes that cannot reach each other directly.
///
/// Clients (openspan agents) register with their cluster id, WireGuard public key and an access
/// token derived from the cluster secret; packets are forwarded by public key, only within a
/// cluster. The relay is told each cluster's verifier (SHA-256 of the token), never the secret.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    /// UDP listen address (`:3479` = every IPv4 interface, `[::]:3479` for IPv6 too).
    #[arg(long, env = "RELAY_ADDR", default_value = ":3479")]
    addr: String,

    /// TLS certificate chain (PEM); re-read when it changes.
    #[arg(long, env = "RELAY_CERT_FILE")]
    cert_file: PathBuf,

    /// TLS private key (PEM); re-read when it changes.
    #[arg(long, env = "RELAY_KEY_FILE")]
    key_file: PathBuf,

    /// A cluster allowed to use the relay: `<cluster-id>=<verifier-hex>` (the verifier is the
    /// SHA-256 of the cluster's relay access token). Repeat for more clusters.
    #[arg(long = "cluster", env = "RELAY_CLUSTERS", value_delimiter = ',')]
    clusters: Vec<String>,

    /// File of clusters, one `<cluster-id> <verifier-hex>` per line (`#` comments). Re-read when
    /// it changes and on SIGHUP; clients of a removed cluster (or a changed verifier) are
    /// disconnected.
    #[arg(long, env = "RELAY_CLUSTERS_FILE")]
    clusters_file: Option<PathBuf>,

    /// How often the certificate and clusters files are checked for changes.
    #[arg(long, env = "RELAY_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    reload_interval: Duration,

    /// Prometheus metrics (`/metrics`) and `/healthz` over HTTP; empty disables it.
    #[arg(long, env = "RELAY_METRICS_ADDR", default_value = ":2123")]
    metrics_addr: String,

    /// Open connections in all; beyond it new ones are refused.
    #[arg(long, env = "RELAY_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,

    /// Open connections from one IP address (one /64 for IPv6). Fits a whole cluster behind
    /// one NAT address by default.
    #[arg(long, env = "RELAY_MAX_CONNECTIONS_PER_IP", default_value_t = 1024)]
    max_connections_per_ip: usize,

    /// Registered clients in one cluster.
    #[arg(long, env = "RELAY_MAX_CLIENTS_PER_CLUSTER", default_value_t = 1024)]
    max_clients_per_cluster: usize,

    /// Packets per second one client may send (0 = unlimited); excess is dropped and counted.
    #[arg(long, env = "RELAY_PACKET_RATE", default_value_t = 20_000.0)]
    packet_rate: f64,

    /// Packets one client may send at once above the rate.
    #[arg(long, env = "RELAY_PACKET_BURST", default_value_t = 5_000.0)]
    packet_burst: f64,

    /// Bytes per second one client may send (0 = unlimited); 25000000 = 200 Mbit/s.
    #[arg(long, env = "RELAY_BYTE_RATE", default_value_t = 25_000_000.0)]
    byte_rate: f64,

    /// Bytes one client may send at once above the rate.
    #[arg(long, env = "RELAY_BYTE_BURST", default_value_t = 6_250_000.0)]
    byte_burst: f64,

    /// A connection silent this long is closed (clients keep alive every 10 s).
    #[arg(long, env = "RELAY_IDLE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    idle_timeout: Duration,

    /// Time a new connection has to finish TLS and its Hello.
    #[arg(long, env = "RELAY_HELLO_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    hello_timeout: Duration,

    /// Bytes waiting to be sent to one client, per transport; packets beyond it are dropped.
    #[arg(long, env = "RELAY_SEND_QUEUE_BYTES", default_value_t = 256 * 1024)]
    send_queue_bytes: usize,

    /// Debug logging (RUST_LOG, when set, takes precedence).
    #[arg(long, env = "RELAY_DEBUG")]
    debug: bool,

    /// Log format.
    #[arg(long, env = "RELAY_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// `30s`, `500ms`, `2m`, or plain seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a duration like 30s, 500ms or 2m"))?;
    let seconds = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{text:?}: unit must be ms, s, m or h")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

fn rate(name: &str, per_second: f64, burst: f64) -> anyhow::Result<Rate> {
    if !(per_second.is_finite() && per_second >= 0.0 && burst.is_finite() && burst >= 0.0) {
        anyhow::bail!("--{name}-rate and --{name}-burst must be non-negative numbers");
    }
    if per_second > 0.0 && burst < 1.0 {
        anyhow::bail!("--{name}-burst must be at least 1 when --{name}-rate is set");
    }
    Ok(Rate { per_second, burst })
}

impl Args {
    fn into_config(self) -> anyhow::Result<RelayConfig> {
        let mut clusters = Clusters::default();
        for value in self.clusters.iter().filter(|v| !v.trim().is_empty()) {
            let (id, verifier) = Clusters::parse_flag(value)?;
            clusters.insert("--cluster", id, verifier)?;
        }
        if clusters.is_empty() && self.clusters_file.is_none() {
            anyhow::bail!("no cluster may use the relay: give --cluster or --clusters-file");
        }
        let limits = RelayLimits {
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            max_clients_per_cluster: self.max_clients_per_cluster,
            packet_rate: rate("packet", self.packet_rate, self.packet_burst)?,
            byte_rate: rate("byte", self.byte_rate, self.byte_burst)?,
            idle_timeout: self.idle_timeout,
            hello_timeout: self.hello_timeout,
            send_queue_bytes: self.send_queue_bytes,
        };
        let metrics_addr = Some(self.metrics_addr.trim().to_owned()).filter(|a| !a.is_empty());
        Ok(RelayConfig {
            addr: self.addr,
            tls: TlsFiles {
                certificate: self.cert_file,
                key: self.key_file,
            },
            reload_interval: self.reload_interval,
            clusters,
            clusters_file: self.clusters_file,
            limits,
            metrics: Arc::new(RelayMetrics::default()),
            metrics_addr,
            reload_on_sighup: true,
        })
    }
}

fn main() -> std::process::ExitCode {
    if let Some(code) = openspan_runtime::manpages::generate_if_asked(
        Args::command,
        openspan_runtime::manpages::Section::Admin,
    ) {
        return code;
    }
    openspan_runtime::exit_with(run())
}

#[tokio::main]
async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    openspan_runtime::init_logging(args.debug, args.log_format == "json");
    let config = args.into_config()?;
    let shutdown = CancellationToken::new();
    let relay = openspan_relay::Relay::bind(config)
        .await
        .context("cannot start the relay")?;
    let serving = tokio::spawn(relay.run(shutdown.clone()));
    let signal = openspan_runtime::shutdown_signal()
        .await
        .context("cannot install the SIGTERM and SIGINT handlers")?;
    tracing::info!(signal, "shutting down");
    shutdown.cancel();
    serving.await.context("relay task failed")??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse() {
        let verifier = "ab".repeat(32);
        let args = Args::try_parse_from([
            "openspan-relay",
            "--cert-file=/c.pem",
            "--key-file=/k.pem",
            &format!("--cluster=a={verifier}"),
            &format!("--cluster=b={verifier}"),
            "--idle-timeout=3s",
            "--metrics-addr=",
        ])
        .unwrap();
        let config = args.into_config().unwrap();
        assert_eq!(config.clusters.len(), 2);
        assert_eq!(config.limits.idle_timeout, Duration::from_secs(3));
        assert_eq!(config.metrics_addr, None);
        assert_eq!(config.limits.hello_timeout, Duration::from_secs(5));
    }

    #[test]
    fn no_clusters_is_an_error() {
        let args =
            Args::try_parse_from(["openspan-relay", "--cert-file=c", "--key-file=k"]).unwrap();
        let Err(error) = args.into_config() else {
            panic!("a relay without clusters was accepted")
        };
        let error = error.to_string();
        assert!(error.contains("--cluster"), "{error}");
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("soon").is_err());
    }
}
