//! `discovery-server`: flags compatible with the reference server's, plus openspan's own.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use discovery_server::bytesize::parse_byte_size;
use discovery_server::duration::parse_go_duration;
use discovery_server::etcd::EtcdConfig;
use discovery_server::grpc::AdmissionConfig;
use discovery_server::limits::Limits;
use discovery_server::net::ConnectionLimits;
use discovery_server::ratelimit::RateLimit;
use discovery_server::server::{self, Config, SnapshotConfig, StoreKind};
use discovery_server::stun::StunConfig;
use discovery_server::tls::TlsFiles;

/// Discovery service for KubeSpan-style WireGuard meshes.
///
/// Stores client-encrypted member records ("affiliates") per cluster and streams changes to
/// watchers over the `sidero.discovery.server.Cluster` gRPC API, so Talos nodes and openspan
/// agents can use it. Flags follow the reference server's (Go-style single-dash spellings such as
/// `-addr=:3000` work too); each can also be set through the environment variable shown.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    /// gRPC listen address (`:3000` = every interface); empty disables the API.
    #[arg(long, env = "DISCOVERY_ADDR", default_value = ":3000")]
    addr: String,

    /// HTTP landing page and cluster inspector; empty disables it.
    #[arg(long, env = "DISCOVERY_LANDING_ADDR", default_value = ":3001")]
    landing_addr: String,

    /// Prometheus metrics (`/metrics`) and probes (`/healthz`, `/readyz`); empty disables it.
    #[arg(long, env = "DISCOVERY_METRICS_ADDR", default_value = ":2122")]
    metrics_addr: String,

    /// Answer STUN binding requests (RFC 8489) on this UDP address (`:3478` = every interface)
    /// so agents learn the ip:port their NAT maps their WireGuard port to; empty (the default)
    /// turns it off. The answer is the source address the server sees, so behind a load
    /// balancer UDP must be forwarded 1:1 without source NAT (else every node learns the
    /// balancer's address). At most 20 answers/s (bursts of 40) per source IP, IPv6 per /64.
    #[arg(long, env = "DISCOVERY_STUN_ADDR", default_value = "")]
    stun_addr: String,

    /// Relay WireGuard packets over QUIC on this UDP address (`:3479` = every IPv4 interface)
    /// for nodes that cannot reach each other directly; empty (the default) turns it off.
    /// Needs a certificate (--relay-cert-file, else --certificate-path) and clusters
    /// (--relay-cluster or --relay-clusters-file). Metrics join ours on --metrics-addr.
    #[arg(long, env = "DISCOVERY_RELAY_ADDR", default_value = "")]
    relay_addr: String,

    /// The relay's TLS certificate chain (PEM); defaults to --certificate-path. Re-read when it
    /// changes.
    #[arg(long, env = "DISCOVERY_RELAY_CERT_FILE", default_value = "")]
    relay_cert_file: String,

    /// The relay's TLS private key (PEM); defaults to --key-path.
    #[arg(long, env = "DISCOVERY_RELAY_KEY_FILE", default_value = "")]
    relay_key_file: String,

    /// A cluster allowed to use the relay: `<cluster-id>=<verifier-hex>` (SHA-256 of the
    /// cluster's relay access token). Repeatable.
    #[arg(
        long = "relay-cluster",
        env = "DISCOVERY_RELAY_CLUSTERS",
        value_delimiter = ','
    )]
    relay_clusters: Vec<String>,

    /// File of clusters allowed to use the relay, one `<cluster-id> <verifier-hex>` per line;
    /// re-read when it changes and on SIGHUP.
    #[arg(long, env = "DISCOVERY_RELAY_CLUSTERS_FILE", default_value = "")]
    relay_clusters_file: String,

    /// Where the state lives: `memory` (this process, with snapshot files; one replica) or
    /// `etcd` (shared by every replica that names the same etcd and --etcd-prefix).
    #[arg(long, env = "DISCOVERY_STORE", default_value = "memory", value_parser = ["memory", "etcd"])]
    store: String,

    /// etcd endpoints, comma-separated (with --store etcd): http://host:2379 or https://…
    #[arg(
        long,
        env = "DISCOVERY_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    etcd_endpoints: Vec<String>,

    /// Key prefix of the state in etcd; replicas that share a state use the same one.
    #[arg(
        long,
        env = "DISCOVERY_ETCD_PREFIX",
        default_value = "/openspan/discovery/v1/"
    )]
    etcd_prefix: String,

    /// Records whose expiries fall in the same bucket of this width share one etcd lease; a
    /// record is removed at most this long after its TTL ran out.
    #[arg(long, env = "DISCOVERY_ETCD_LEASE_BUCKET", default_value = "1m", value_parser = parse_go_duration)]
    etcd_lease_bucket: Duration,

    /// etcd user (authentication on); the password comes from DISCOVERY_ETCD_PASSWORD.
    #[arg(long, env = "DISCOVERY_ETCD_USERNAME", default_value = "")]
    etcd_username: String,

    #[arg(
        long,
        env = "DISCOVERY_ETCD_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    etcd_password: String,

    /// CA certificate (PEM) that signed etcd's server certificate: TLS to etcd.
    #[arg(long, env = "DISCOVERY_ETCD_CA_PATH", default_value = "")]
    etcd_ca_path: String,

    /// Client certificate and key (PEM) for etcd's mutual TLS.
    #[arg(long, env = "DISCOVERY_ETCD_CERT_PATH", default_value = "")]
    etcd_cert_path: String,

    #[arg(long, env = "DISCOVERY_ETCD_KEY_PATH", default_value = "")]
    etcd_key_path: String,

    /// Persist state to --snapshot-path on a timer and at shutdown, and load it at start
    /// (memory store only: with etcd, etcd holds the state).
    #[arg(long, env = "DISCOVERY_SNAPSHOTS_ENABLED", default_value_t = true, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    snapshots_enabled: bool,

    /// Snapshot file. Written atomically; a corrupt one is moved aside, never overwritten.
    #[arg(
        long,
        env = "DISCOVERY_SNAPSHOT_PATH",
        default_value = "/var/lib/discovery-server/state.snapshot"
    )]
    snapshot_path: PathBuf,

    /// How often to write a snapshot (Go duration: 30s, 10m, 1h30m).
    #[arg(long, env = "DISCOVERY_SNAPSHOT_INTERVAL", default_value = "10m", value_parser = parse_go_duration)]
    snapshot_interval: Duration,

    /// Largest snapshot file loaded at start (bytes; KiB, MiB, GiB suffixes work). A larger
    /// file is moved aside, not read, so a foreign or runaway file cannot exhaust memory.
    #[arg(long, env = "DISCOVERY_SNAPSHOT_MAX_SIZE", default_value = "1GiB", value_parser = parse_byte_size)]
    snapshot_max_size: u64,

    /// How often expired affiliates and endpoints are collected.
    #[arg(long, env = "DISCOVERY_GC_INTERVAL", default_value = "1m", value_parser = parse_go_duration)]
    gc_interval: Duration,

    /// Tell every client to reconnect to this host:port instead (moving clients between servers).
    #[arg(long, env = "DISCOVERY_REDIRECT_ENDPOINT", default_value = "")]
    redirect_endpoint: String,

    /// Take the client IP from the X-Real-IP header, as the reference server does; only
    /// believed when the TCP peer is inside --trusted-proxies.
    #[arg(long, env = "DISCOVERY_TRUST_X_REAL_IP", default_value_t = true, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    trust_x_real_ip: bool,

    /// Take the client IP from the first X-Forwarded-For entry (only behind a proxy that sets it);
    /// only believed when the TCP peer is inside --trusted-proxies.
    #[arg(long, env = "DISCOVERY_TRUST_FIRST_X_FORWARDED_FOR", default_value_t = false, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    trust_first_x_forwarded_for: bool,

    /// Networks (comma-separated CIDRs) whose connections may set the client IP through
    /// X-Real-IP / X-Forwarded-For; they are also exempt from --max-connections-per-ip. Empty
    /// trusts nobody.
    #[arg(
        long,
        env = "DISCOVERY_TRUSTED_PROXIES",
        value_delimiter = ',',
        default_value = "127.0.0.0/8,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,::1/128,fc00::/7"
    )]
    trusted_proxies: Vec<String>,

    /// Open connections over all listeners; beyond it new connections are closed at once.
    #[arg(long, env = "DISCOVERY_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,

    /// Open connections from one client IP (one /64 for IPv6); trusted proxies are exempt. The
    /// default fits a whole cluster (1,024 affiliates) behind one NAT address.
    #[arg(long, env = "DISCOVERY_MAX_CONNECTIONS_PER_IP", default_value_t = 1024)]
    max_connections_per_ip: usize,

    /// Time a new connection has to finish its TLS handshake and send the protocol preface
    /// (HTTP/2) or its first request bytes (HTTP/1); slower connections are closed.
    #[arg(long, env = "DISCOVERY_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_go_duration)]
    handshake_timeout: Duration,

    /// A gRPC connection with no call open for this long is closed (clients reconnect).
    #[arg(long, env = "DISCOVERY_GRPC_IDLE_TIMEOUT", default_value = "2m", value_parser = parse_go_duration)]
    grpc_idle_timeout: Duration,

    /// An HTTP connection (landing page, metrics) with no request open for this long is closed.
    #[arg(long, env = "DISCOVERY_HTTP_IDLE_TIMEOUT", default_value = "30s", value_parser = parse_go_duration)]
    http_idle_timeout: Duration,

    /// A call must have sent its whole request within this time of being let in.
    #[arg(long, env = "DISCOVERY_REQUEST_BODY_TIMEOUT", default_value = "10s", value_parser = parse_go_duration)]
    request_body_timeout: Duration,

    /// A connection whose response (a Watch change, a List answer) has waited this long for the
    /// client to read it is closed, and what the response held is released.
    #[arg(long, env = "DISCOVERY_RESPONSE_STALL_TIMEOUT", default_value = "30s", value_parser = parse_go_duration)]
    response_stall_timeout: Duration,

    /// HTTP/2 streams (calls) one connection may have open at once.
    #[arg(long, env = "DISCOVERY_MAX_CONCURRENT_STREAMS", default_value_t = 100)]
    max_concurrent_streams: u32,

    /// Largest request header block, in bytes.
    #[arg(long, env = "DISCOVERY_MAX_HEADER_LIST_SIZE", default_value_t = 16384)]
    max_header_list_size: u32,

    /// How often the server pings each HTTP/2 connection.
    #[arg(long, env = "DISCOVERY_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = parse_go_duration)]
    keepalive_interval: Duration,

    /// A connection that does not answer a ping within this time is closed.
    #[arg(long, env = "DISCOVERY_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = parse_go_duration)]
    keepalive_timeout: Duration,

    /// TLS certificate chain (PEM). With --key-path, gRPC is served over TLS; files are
    /// re-read when they change.
    #[arg(long, env = "DISCOVERY_CERTIFICATE_PATH", default_value = "")]
    certificate_path: String,

    /// TLS private key (PEM).
    #[arg(long, env = "DISCOVERY_KEY_PATH", default_value = "")]
    key_path: String,

    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, env = "DISCOVERY_CLIENT_CA_PATH", default_value = "")]
    client_ca_path: String,

    /// How often the TLS files are checked for changes.
    #[arg(long, env = "DISCOVERY_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_go_duration)]
    tls_reload_interval: Duration,

    /// Requests per second allowed per client IP (0 disables rate limiting).
    #[arg(long, env = "DISCOVERY_IP_RATE_LIMIT", default_value_t = 15.0)]
    ip_rate_limit: f64,

    /// Requests a client IP may make at once above the sustained rate.
    #[arg(long, env = "DISCOVERY_IP_RATE_BURST", default_value_t = 60)]
    ip_rate_burst: u32,

    /// Client IPs the rate limiter tracks at once; beyond it newcomers share one bucket.
    #[arg(long, env = "DISCOVERY_IP_RATE_MAX_CLIENTS", default_value_t = 100_000)]
    ip_rate_max_clients: usize,

    /// Messages a watcher may fall behind before its stream ends with Aborted (it then re-syncs).
    #[arg(long, env = "DISCOVERY_WATCH_BUFFER", default_value_t = 32)]
    watch_buffer: usize,

    /// Bytes queued for one watcher, its snapshot included, before its stream ends with
    /// Aborted and the memory is released. Must hold a full cluster's snapshot.
    #[arg(long, env = "DISCOVERY_WATCH_MAX_BYTES", default_value = "8MiB", value_parser = parse_byte_size)]
    watch_max_bytes: u64,

    /// Bytes of superseded cluster snapshots and List answers (of versions that have since
    /// changed) that streams of slow clients may still hold; over it new Watch and List calls
    /// get ResourceExhausted until --response-stall-timeout cuts the slow clients off.
    #[arg(long, env = "DISCOVERY_MAX_SUPERSEDED_BYTES", default_value = "64MiB", value_parser = parse_byte_size)]
    max_superseded_bytes: u64,

    /// Longest cluster id, in bytes.
    #[arg(long, env = "DISCOVERY_MAX_CLUSTER_ID_LEN", default_value_t = 256)]
    max_cluster_id_len: usize,

    /// Longest affiliate id, in bytes.
    #[arg(long, env = "DISCOVERY_MAX_AFFILIATE_ID_LEN", default_value_t = 256)]
    max_affiliate_id_len: usize,

    /// Largest affiliate data, in bytes.
    #[arg(long, env = "DISCOVERY_MAX_AFFILIATE_DATA", default_value_t = 2048)]
    max_affiliate_data: usize,

    /// Largest single encrypted endpoint, in bytes.
    #[arg(long, env = "DISCOVERY_MAX_ENDPOINT_SIZE", default_value_t = 32)]
    max_endpoint_size: usize,

    /// Longest TTL a client may ask for.
    #[arg(long, env = "DISCOVERY_MAX_TTL", default_value = "30m", value_parser = parse_go_duration)]
    max_ttl: Duration,

    /// Most affiliates in one cluster.
    #[arg(long, env = "DISCOVERY_MAX_AFFILIATES", default_value_t = 1024)]
    max_affiliates: usize,

    /// Most endpoints of one affiliate.
    #[arg(long, env = "DISCOVERY_MAX_ENDPOINTS", default_value_t = 64)]
    max_endpoints: usize,

    /// How long shutdown waits for open calls before closing them.
    #[arg(long, env = "DISCOVERY_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_go_duration)]
    shutdown_grace: Duration,

    /// Debug logging (RUST_LOG, when set, takes precedence).
    #[arg(long, env = "DISCOVERY_DEBUG", default_value_t = false, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    debug: bool,

    /// Log format.
    #[arg(long, env = "DISCOVERY_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn non_empty(s: &str) -> Option<String> {
    (!s.trim().is_empty()).then(|| s.trim().to_owned())
}

impl Args {
    fn into_config(self) -> anyhow::Result<Config> {
        let tls = match (
            non_empty(&self.certificate_path).map(PathBuf::from),
            non_empty(&self.key_path).map(PathBuf::from),
        ) {
            (Some(certificate), Some(key)) => Some(TlsFiles {
                certificate,
                key,
                client_ca: non_empty(&self.client_ca_path).map(PathBuf::from),
            }),
            (None, None) if non_empty(&self.client_ca_path).map(PathBuf::from).is_some() => {
                anyhow::bail!(
                    "--client-ca-path needs --certificate-path and --key-path (mTLS is TLS first)"
                )
            }
            (None, None) => None,
            _ => anyhow::bail!("--certificate-path and --key-path must be given together"),
        };
        let trusted_proxies = self
            .trusted_proxies
            .iter()
            .filter(|n| !n.trim().is_empty())
            .map(|n| {
                let n = n.trim();
                n.parse::<ipnet::IpNet>()
                    .or_else(|_| n.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .with_context(|| {
                        format!("--trusted-proxies: {n:?} is not a CIDR network (like 10.0.0.0/8) or an IP address")
                    })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        if !(self.ip_rate_limit >= 0.0 && self.ip_rate_limit.is_finite()) {
            anyhow::bail!(
                "--ip-rate-limit must be a non-negative number of requests per second (0 disables)"
            );
        }
        let store = match self.store.as_str() {
            "etcd" => {
                if non_empty(&self.etcd_username).is_some()
                    != non_empty(&self.etcd_password).is_some()
                {
                    anyhow::bail!("--etcd-username and DISCOVERY_ETCD_PASSWORD go together");
                }
                StoreKind::Etcd(Box::new(EtcdConfig {
                    endpoints: self
                        .etcd_endpoints
                        .iter()
                        .map(|e| e.trim().to_owned())
                        .filter(|e| !e.is_empty())
                        .collect(),
                    prefix: self.etcd_prefix.clone(),
                    lease_bucket: self.etcd_lease_bucket,
                    username: non_empty(&self.etcd_username),
                    password: non_empty(&self.etcd_password),
                    ca: non_empty(&self.etcd_ca_path).map(PathBuf::from),
                    cert: non_empty(&self.etcd_cert_path).map(PathBuf::from),
                    key: non_empty(&self.etcd_key_path).map(PathBuf::from),
                    ..EtcdConfig::default()
                }))
            }
            _ => StoreKind::Memory,
        };
        let relay = self.relay_config()?;
        let snapshots = self.snapshots_enabled && matches!(store, StoreKind::Memory);
        Ok(Config {
            store,
            grpc_addr: non_empty(&self.addr),
            landing_addr: non_empty(&self.landing_addr),
            metrics_addr: non_empty(&self.metrics_addr),
            snapshot: snapshots.then(|| SnapshotConfig {
                path: self.snapshot_path.clone(),
                interval: self.snapshot_interval,
                max_size: self.snapshot_max_size,
            }),
            gc_interval: self.gc_interval,
            redirect_endpoint: non_empty(&self.redirect_endpoint),
            admission: AdmissionConfig {
                trust_x_real_ip: self.trust_x_real_ip,
                trust_first_x_forwarded_for: self.trust_first_x_forwarded_for,
                rate_limit: RateLimit {
                    per_second: self.ip_rate_limit,
                    burst: self.ip_rate_burst,
                },
                max_tracked_clients: self.ip_rate_max_clients,
                trusted_proxies,
                request_body_timeout: self.request_body_timeout,
            },
            tls,
            tls_reload_interval: self.tls_reload_interval,
            limits: Limits {
                max_cluster_id_len: self.max_cluster_id_len,
                max_affiliate_id_len: self.max_affiliate_id_len,
                max_data_len: self.max_affiliate_data,
                max_endpoint_len: self.max_endpoint_size,
                max_ttl: self.max_ttl,
                max_affiliates_per_cluster: self.max_affiliates,
                max_endpoints_per_affiliate: self.max_endpoints,
            },
            watch_buffer: self.watch_buffer,
            watch_max_bytes: usize::try_from(self.watch_max_bytes).unwrap_or(usize::MAX),
            max_superseded_bytes: usize::try_from(self.max_superseded_bytes).unwrap_or(usize::MAX),
            connections: ConnectionLimits {
                max_connections: self.max_connections,
                max_connections_per_ip: self.max_connections_per_ip,
                handshake_timeout: self.handshake_timeout,
                grpc_idle_timeout: self.grpc_idle_timeout,
                http_idle_timeout: self.http_idle_timeout,
                max_concurrent_streams: self.max_concurrent_streams,
                max_header_list_size: self.max_header_list_size,
                keepalive_interval: self.keepalive_interval,
                keepalive_timeout: self.keepalive_timeout,
                close_grace: self.shutdown_grace,
                response_stall_timeout: self.response_stall_timeout,
            },
            shutdown_grace: self.shutdown_grace,
            stun: non_empty(&self.stun_addr).map(StunConfig::new),
            relay,
        })
    }

    fn relay_config(&self) -> anyhow::Result<Option<openspan_relay::RelayConfig>> {
        let Some(addr) = non_empty(&self.relay_addr) else {
            let relay_flag_given = non_empty(&self.relay_clusters_file).is_some()
                || self.relay_clusters.iter().any(|c| !c.trim().is_empty());
            if relay_flag_given {
                anyhow::bail!("--relay-cluster and --relay-clusters-file need --relay-addr");
            }
            return Ok(None);
        };
        let certificate = non_empty(&self.relay_cert_file)
            .or_else(|| non_empty(&self.certificate_path))
            .context("--relay-addr needs a certificate: --relay-cert-file or --certificate-path")?;
        let key = non_empty(&self.relay_key_file)
            .or_else(|| non_empty(&self.key_path))
            .context("--relay-addr needs a private key: --relay-key-file or --key-path")?;
        let mut clusters = openspan_relay::clusters::Clusters::default();
        for value in self.relay_clusters.iter().filter(|v| !v.trim().is_empty()) {
            let (id, verifier) = openspan_relay::clusters::Clusters::parse_flag(value)
                .map_err(|e| anyhow::anyhow!("--relay-cluster: {e}"))?;
            clusters.insert("--relay-cluster", id, verifier)?;
        }
        let clusters_file = non_empty(&self.relay_clusters_file).map(PathBuf::from);
        if clusters.is_empty() && clusters_file.is_none() {
            anyhow::bail!(
                "--relay-addr needs the clusters that may use it: --relay-cluster or --relay-clusters-file"
            );
        }
        let mut config = openspan_relay::RelayConfig::new(
            addr,
            openspan_relay::tls::TlsFiles {
                certificate: PathBuf::from(certificate),
                key: PathBuf::from(key),
            },
        );
        config.clusters = clusters;
        config.clusters_file = clusters_file;
        config.reload_interval = self.tls_reload_interval;
        config.reload_on_sighup = true;
        Ok(Some(config))
    }
}

/// Go's flag package accepts `-name` as well as `--name`; existing deployments use both.
fn go_style_flags(args: impl Iterator<Item = String>) -> Vec<String> {
    args.enumerate()
        .map(|(i, arg)| {
            let single_dash_long = i > 0
                && arg.starts_with('-')
                && !arg.starts_with("--")
                && arg.len() > 2
                && arg.as_bytes()[1].is_ascii_alphabetic();
            if single_dash_long {
                format!("-{arg}")
            } else {
                arg
            }
        })
        .collect()
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
    let args = Args::parse_from(go_style_flags(std::env::args()));
    openspan_runtime::init_logging(args.debug, args.log_format == "json");
    let config = args.into_config()?;
    server::validate(&config)?;
    let running = server::start(config).await?;
    let stop = running.stop_token();
    tokio::select! {
        signal = openspan_runtime::shutdown_signal() => {
            tracing::info!(signal = signal.context("cannot install the SIGTERM and SIGINT handlers")?, "shutting down");
            running.shutdown().await?;
        }
        _ = stop.cancelled() => {
            running.wait().await?;
        }
    }
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_dash_go_flags_become_long_flags() {
        let argv = [
            "discovery-server",
            "-addr=:4000",
            "--debug",
            "-h",
            "-snapshots-enabled=false",
        ];
        let converted = go_style_flags(argv.iter().map(|s| s.to_string()));
        assert_eq!(
            converted,
            [
                "discovery-server",
                "--addr=:4000",
                "--debug",
                "-h",
                "--snapshots-enabled=false"
            ]
        );
    }

    #[test]
    fn a_bare_port_is_refused_with_the_go_notation() {
        let argv = ["discovery-server", "--addr", "3000"].map(String::from);
        let config = Args::try_parse_from(go_style_flags(argv.into_iter()))
            .unwrap()
            .into_config()
            .unwrap();
        let message = server::validate(&config).unwrap_err().to_string();
        assert!(message.contains("--addr \"3000\""), "{message}");
        assert!(message.contains("`:3000`"), "{message}");
    }

    #[test]
    fn reference_flags_parse() {
        let args = Args::try_parse_from([
            "discovery-server",
            "--addr=:4000",
            "--landing-addr=",
            "--snapshots-enabled=false",
            "--snapshot-interval=1h30m",
            "--gc-interval",
            "30s",
            "--trust-x-real-ip",
            "--redirect-endpoint=other:3000",
        ])
        .unwrap();
        let config = args.into_config().unwrap();
        assert_eq!(config.grpc_addr.as_deref(), Some(":4000"));
        assert_eq!(config.landing_addr, None);
        assert!(config.snapshot.is_none());
        assert_eq!(config.gc_interval, Duration::from_secs(30));
        assert!(config.admission.trust_x_real_ip);
        assert_eq!(config.redirect_endpoint.as_deref(), Some("other:3000"));
        assert_eq!(config.stun, None, "the STUN responder is off by default");
        assert!(config.relay.is_none(), "the relay is off by default");
    }

    #[test]
    fn stun_addr_turns_the_responder_on() {
        // Go-style spelling, as every other flag.
        let argv = ["discovery-server", "-stun-addr=:3478"].map(String::from);
        let config = Args::try_parse_from(go_style_flags(argv.into_iter()))
            .unwrap()
            .into_config()
            .unwrap();
        let stun = config.stun.expect("--stun-addr given");
        assert_eq!(stun.addr, ":3478");
        assert_eq!(stun.rate_limit, discovery_server::stun::RATE_LIMIT);
        let blank = Args::try_parse_from(["discovery-server", "--stun-addr= "])
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(blank.stun, None);
    }

    #[test]
    fn snapshot_max_size_takes_units_and_refuses_nonsense() {
        let config = Args::try_parse_from(["discovery-server", "--snapshot-max-size=512MiB"])
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(config.snapshot.unwrap().max_size, 512 << 20);
        let default = Args::try_parse_from(["discovery-server"])
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(default.snapshot.unwrap().max_size, 1 << 30);
        let error = Args::try_parse_from(["discovery-server", "--snapshot-max-size=lots"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("KiB, MiB or GiB"), "{error}");
    }

    #[test]
    fn defaults_trust_x_real_ip_only_from_private_peers_and_bound_connections() {
        let config = Args::try_parse_from(["discovery-server"])
            .unwrap()
            .into_config()
            .unwrap();
        assert!(config.admission.trust_x_real_ip);
        assert!(!config.admission.trust_first_x_forwarded_for);
        assert_eq!(
            config.admission.trusted_proxies,
            discovery_server::grpc::default_trusted_proxies()
        );
        assert_eq!(config.connections, ConnectionLimits::default());
        // Silent and idle connections are closed well within 30 s by default.
        assert!(config.connections.handshake_timeout <= Duration::from_secs(10));
        assert!(config.connections.http_idle_timeout <= Duration::from_secs(30));
        server::validate(&config).unwrap();

        let none = Args::try_parse_from(["discovery-server", "--trusted-proxies="])
            .unwrap()
            .into_config()
            .unwrap();
        assert!(none.admission.trusted_proxies.is_empty());
        let bad = Args::try_parse_from(["discovery-server", "--trusted-proxies=10.0.0.0/99"])
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(format!("{bad:#}").contains("--trusted-proxies"), "{bad:#}");
    }

    #[test]
    fn a_watch_budget_below_a_full_cluster_is_refused() {
        let config = Args::try_parse_from(["discovery-server", "--watch-max-bytes=1000000"])
            .unwrap()
            .into_config()
            .unwrap();
        let error = server::validate(&config).unwrap_err().to_string();
        assert!(error.contains("--watch-max-bytes"), "{error}");
    }

    #[test]
    fn relay_addr_turns_the_relay_on_with_the_server_certificate() {
        let verifier = "cd".repeat(32);
        let config = Args::try_parse_from([
            "discovery-server",
            "--relay-addr=:3479",
            "--certificate-path=/c.pem",
            "--key-path=/k.pem",
            &format!("--relay-cluster=prod={verifier}"),
        ])
        .unwrap()
        .into_config()
        .unwrap();
        let relay = config.relay.expect("--relay-addr given");
        assert_eq!(relay.addr, ":3479");
        assert_eq!(relay.tls.certificate, PathBuf::from("/c.pem"));
        assert_eq!(relay.clusters.len(), 1);

        let own = Args::try_parse_from([
            "discovery-server",
            "--relay-addr=127.0.0.1:3479",
            "--relay-cert-file=/r.pem",
            "--relay-key-file=/rk.pem",
            "--relay-clusters-file=/clusters",
        ])
        .unwrap()
        .into_config()
        .unwrap()
        .relay
        .unwrap();
        assert_eq!(own.tls.key, PathBuf::from("/rk.pem"));
        assert_eq!(own.clusters_file, Some(PathBuf::from("/clusters")));

        for (argv, expected) in [
            (
                vec![
                    "discovery-server",
                    "--relay-addr=:3479",
                    "--relay-clusters-file=/c",
                ],
                "certificate",
            ),
            (
                vec![
                    "discovery-server",
                    "--relay-addr=:3479",
                    "--certificate-path=/c",
                    "--key-path=/k",
                ],
                "--relay-cluster",
            ),
            (
                vec!["discovery-server", "--relay-clusters-file=/c"],
                "--relay-addr",
            ),
        ] {
            let error = Args::try_parse_from(argv)
                .unwrap()
                .into_config()
                .unwrap_err();
            assert!(format!("{error:#}").contains(expected), "{error:#}");
        }
    }

    #[test]
    fn half_a_tls_pair_is_an_error() {
        let args =
            Args::try_parse_from(["discovery-server", "--certificate-path=/tmp/c.pem"]).unwrap();
        let error = args.into_config().unwrap_err().to_string();
        assert!(error.contains("--key-path"), "{error}");
    }
}
