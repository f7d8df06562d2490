//! The relay's I/O shell: a quinn endpoint, one task per connection, the reload timers and the
//! HTTP listener. Decisions are made by the pure [`Router`], [`ConnectionLimiter`] and
//! [`ClientLimiter`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Connection, Endpoint, IdleTimeout, TransportConfig, VarInt};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::clusters::{Clusters, ClustersError};
use crate::metrics::RelayMetrics;
use crate::protocol::{self, Answer, Code, Hello, PublicKey, close};
use crate::ratelimit::{ClientLimiter, Rate, Refusal};
use crate::router::{ConnectionLimiter, RegisterError, Route, Router};
use crate::tls::{ReloadingCert, TlsError, TlsFiles};
use crate::transport::{PacketSender, read_frames};

/// Bounds on what clients may use.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayLimits {
    /// Open connections in all.
    pub max_connections: usize,
    /// Open connections from one IP address (IPv6: one /64). Must fit a cluster behind one NAT.
    pub max_connections_per_ip: usize,
    /// Registrations in one cluster.
    pub max_clients_per_cluster: usize,
    /// Packets per second a client may send through the relay.
    pub packet_rate: Rate,
    /// Bytes (of WireGuard packets) per second a client may send through the relay.
    pub byte_rate: Rate,
    /// A connection silent for this long is closed (clients send keepalives every 10 s).
    pub idle_timeout: Duration,
    /// Time from the first packet of a connection to a complete Hello.
    pub hello_timeout: Duration,
    /// Bytes waiting to be sent to one client, per transport (datagram buffer, stream queue);
    /// packets beyond it are dropped.
    pub send_queue_bytes: usize,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_connections_per_ip: 1024,
            max_clients_per_cluster: 1024,
            // 20,000 packets/s and 25 MB/s (200 Mbit/s) sustained per client, bursts of a
            // quarter second: far above a relayed WireGuard link's usual needs, far below what
            // lets one client starve the others on a small relay.
            packet_rate: Rate {
                per_second: 20_000.0,
                burst: 5_000.0,
            },
            byte_rate: Rate {
                per_second: 25_000_000.0,
                burst: 6_250_000.0,
            },
            idle_timeout: Duration::from_secs(30),
            hello_timeout: Duration::from_secs(5),
            send_queue_bytes: 256 * 1024,
        }
    }
}

#[derive(Clone)]
pub struct RelayConfig {
    /// UDP listen address, `host:port` or `:port` (every IPv4 interface).
    pub addr: String,
    pub tls: TlsFiles,
    /// How often the certificate files and the clusters file are checked for changes.
    pub reload_interval: Duration,
    /// Clusters given on the command line.
    pub clusters: Clusters,
    /// Clusters file (`<cluster-id> <verifier-hex>` per line), re-read when it changes and on
    /// SIGHUP; merged with `clusters`.
    pub clusters_file: Option<PathBuf>,
    pub limits: RelayLimits,
    pub metrics: Arc<RelayMetrics>,
    /// `/metrics` and `/healthz` over HTTP (a standalone relay; embedded, the host serves them).
    pub metrics_addr: Option<String>,
    /// Re-read the clusters file and certificate on SIGHUP.
    pub reload_on_sighup: bool,
}

impl std::fmt::Debug for RelayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayConfig")
            .field("addr", &self.addr)
            .field("tls", &self.tls)
            .field("reload_interval", &self.reload_interval)
            .field("clusters", &self.clusters.len())
            .field("clusters_file", &self.clusters_file)
            .field("limits", &self.limits)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

impl RelayConfig {
    pub fn new(addr: impl Into<String>, tls: TlsFiles) -> Self {
        Self {
            addr: addr.into(),
            tls,
            reload_interval: Duration::from_secs(10),
            clusters: Clusters::default(),
            clusters_file: None,
            limits: RelayLimits::default(),
            metrics: Arc::new(RelayMetrics::default()),
            metrics_addr: None,
            reload_on_sighup: false,
        }
    }
}

#[derive(Debug, Error)]
pub enum RelayServeError {
    #[error("relay TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("relay clusters: {0}")]
    Clusters(#[from] ClustersError),
    #[error("no cluster may use the relay: give --cluster or --clusters-file")]
    NoClusters,
    #[error("cannot bind {what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("invalid relay configuration: {0}")]
    Config(String),
}

/// What one registered client is reached through.
#[derive(Debug)]
struct Peer {
    sender: PacketSender,
}

/// Per-connection sender state.
struct ClientState {
    cluster: String,
    key: PublicKey,
    limiter: Mutex<ClientLimiter>,
}

struct State {
    router: Mutex<Router<Arc<Peer>>>,
    connections: Mutex<ConnectionLimiter>,
    clusters: ArcSwap<Clusters>,
    flag_clusters: Clusters,
    clusters_file: Option<PathBuf>,
    clusters_stamp: Mutex<Option<(SystemTime, u64)>>,
    cert: Arc<ReloadingCert>,
    limits: RelayLimits,
    metrics: Arc<RelayMetrics>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves the state consistent (all updates are one step).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A bound relay, not yet serving.
pub struct Relay {
    endpoint: Endpoint,
    http: Option<TcpListener>,
    state: Arc<State>,
    reload_interval: Duration,
    reload_on_sighup: bool,
}

/// Binds and serves until `shutdown` is cancelled; what both `openspan-relay` and
/// `discovery-server --relay-addr` run.
pub async fn serve(
    config: RelayConfig,
    shutdown: CancellationToken,
) -> Result<(), RelayServeError> {
    Relay::bind(config).await?.run(shutdown).await
}

/// `:port` means every IPv4 interface, as the discovery server's flags do.
pub async fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    let addr = match addr.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => addr.to_owned(),
    };
    tokio::net::lookup_host(&addr)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{addr} resolves to no address")))
}

pub(crate) fn transport_config(
    limits: &RelayLimits,
    keep_alive: Option<Duration>,
    datagrams: bool,
) -> Result<TransportConfig, String> {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(Some(
        IdleTimeout::try_from(limits.idle_timeout).map_err(|e| format!("idle timeout: {e}"))?,
    ));
    t.keep_alive_interval(keep_alive);
    // One control stream (client → relay) and one packet stream per direction.
    t.max_concurrent_bidi_streams(VarInt::from_u32(1));
    t.max_concurrent_uni_streams(VarInt::from_u32(1));
    let queue = limits.send_queue_bytes.max(16 * 1024);
    t.datagram_receive_buffer_size(datagrams.then_some(queue));
    t.datagram_send_buffer_size(queue);
    // Stream flow control bounds what a peer can make us buffer, in both directions.
    let window = VarInt::from_u32(u32::try_from(queue).unwrap_or(u32::MAX));
    t.stream_receive_window(window);
    t.receive_window(window);
    t.send_window(queue as u64);
    Ok(t)
}

impl Relay {
    pub async fn bind(config: RelayConfig) -> Result<Self, RelayServeError> {
        let file_clusters = match &config.clusters_file {
            Some(path) => Clusters::load_file(path)?,
            None => Clusters::default(),
        };
        let clusters = config.clusters.merged(&file_clusters)?;
        if clusters.is_empty() && config.clusters_file.is_none() {
            return Err(RelayServeError::NoClusters);
        }
        config
            .metrics
            .clusters_configured
            .set(clusters.len() as i64);
        let cert = Arc::new(ReloadingCert::load(config.tls.clone())?);
        let crypto = QuicServerConfig::try_from(crate::tls::server_config(cert.clone())?)
            .map_err(|e| RelayServeError::Config(e.to_string()))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server_config.transport_config(Arc::new(
            transport_config(&config.limits, None, true).map_err(RelayServeError::Config)?,
        ));
        // Handshakes waiting to be accepted; our own limits decide right after.
        server_config.max_incoming(config.limits.max_connections.saturating_add(256));
        let bind_error = |what, addr: &str| {
            let addr = addr.to_owned();
            move |source| RelayServeError::Bind { what, addr, source }
        };
        let addr = resolve(&config.addr)
            .await
            .map_err(bind_error("the relay on UDP", &config.addr))?;
        let endpoint = Endpoint::server(server_config, addr)
            .map_err(bind_error("the relay on UDP", &config.addr))?;
        let http = match &config.metrics_addr {
            Some(a) => {
                let addr = resolve(a).await.map_err(bind_error("--metrics-addr", a))?;
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(bind_error("--metrics-addr", a))?,
                )
            }
            None => None,
        };
        let stamp = config.clusters_file.as_deref().and_then(file_stamp);
        Ok(Self {
            endpoint,
            http,
            state: Arc::new(State {
                router: Mutex::new(Router::new(config.limits.max_clients_per_cluster)),
                connections: Mutex::new(ConnectionLimiter::new(
                    config.limits.max_connections,
                    config.limits.max_connections_per_ip,
                )),
                clusters: ArcSwap::from_pointee(clusters),
                flag_clusters: config.clusters,
                clusters_file: config.clusters_file,
                clusters_stamp: Mutex::new(stamp),
                cert,
                limits: config.limits,
                metrics: config.metrics,
            }),
            reload_interval: config.reload_interval,
            reload_on_sighup: config.reload_on_sighup,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn metrics(&self) -> Arc<RelayMetrics> {
        self.state.metrics.clone()
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RelayServeError> {
        let Self {
            endpoint,
            http,
            state,
            reload_interval,
            reload_on_sighup,
        } = self;
        tracing::info!(
            addr = %endpoint.local_addr().map_err(|e| RelayServeError::Config(e.to_string()))?,
            clusters = state.clusters.load().len(),
            "relaying WireGuard packets over QUIC"
        );
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(listener) = http {
            tracing::info!(addr = ?listener.local_addr().ok(), "serving relay metrics over HTTP");
            let (metrics, stop) = (state.metrics.clone(), shutdown.clone());
            tasks.spawn(async move {
                let app = crate::http::router(metrics);
                if let Err(e) = axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
                {
                    tracing::warn!(error = %e, "relay metrics listener failed");
                }
            });
        }
        tasks.spawn(reload_loop(
            state.clone(),
            reload_interval,
            reload_on_sighup,
            shutdown.clone(),
        ));

        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => break,
                incoming = endpoint.accept() => match incoming {
                    Some(incoming) => incoming,
                    None => break,
                },
            };
            let ip = incoming.remote_address().ip();
            let refusal = lock(&state.connections).acquire(ip);
            if let Err(refusal) = refusal {
                state
                    .metrics
                    .connections_refused
                    .get_or_create(&crate::metrics::ReasonLabels {
                        reason: refusal.label(),
                    })
                    .inc();
                incoming.refuse();
                continue;
            }
            state.metrics.connections.inc();
            let (state, stop) = (state.clone(), shutdown.clone());
            tasks.spawn(async move {
                handle(&state, incoming, stop).await;
                lock(&state.connections).release(ip);
                state.metrics.connections.dec();
            });
            // Reap finished connection tasks so the set stays as large as the open connections.
            while tasks.try_join_next().is_some() {}
        }
        endpoint.close(VarInt::from_u32(close::SHUTDOWN), b"relay shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        tracing::info!("relay stopped");
        Ok(())
    }
}

fn file_stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Re-reads the certificate and the clusters file when they change (checked every `interval`)
/// and on SIGHUP.
async fn reload_loop(
    state: Arc<State>,
    interval: Duration,
    sighup: bool,
    shutdown: CancellationToken,
) {
    let mut hangup = if sighup {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot install the SIGHUP handler; reloading on file changes only");
                None
            }
        }
    } else {
        None
    };
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => false,
            _ = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
        };
        reload_cert(&state);
        reload_clusters(&state, forced);
    }
}

fn reload_cert(state: &State) {
    let label = |reason| crate::metrics::ReasonLabels { reason };
    match state.cert.reload_if_changed() {
        Ok(false) => {}
        Ok(true) => {
            state
                .metrics
                .reloads
                .get_or_create(&label("certificate"))
                .inc();
            tracing::info!("relay certificate reloaded");
        }
        Err(e) => {
            // Logged on every check until fixed: a broken certificate file needs attention.
            state
                .metrics
                .reloads
                .get_or_create(&label("certificate_failed"))
                .inc();
            tracing::warn!(error = %e, "cannot reload the relay certificate; keeping the old one");
        }
    }
}

fn reload_clusters(state: &State, forced: bool) {
    let Some(path) = &state.clusters_file else {
        return;
    };
    let stamp = file_stamp(path);
    {
        let mut last = lock(&state.clusters_stamp);
        if !forced && *last == stamp {
            return;
        }
        // Updated before parsing: a broken file is reported once per change, not every tick.
        *last = stamp;
    }
    let label = |reason| crate::metrics::ReasonLabels { reason };
    let loaded = Clusters::load_file(path).and_then(|f| state.flag_clusters.merged(&f));
    let clusters = match loaded {
        Ok(c) => c,
        Err(e) => {
            state
                .metrics
                .reloads
                .get_or_create(&label("clusters_failed"))
                .inc();
            tracing::warn!(error = %e, "cannot reload the clusters file; keeping the old clusters");
            return;
        }
    };
    let count = clusters.len();
    state.clusters.store(Arc::new(clusters));
    state.metrics.clusters_configured.set(count as i64);
    state
        .metrics
        .reloads
        .get_or_create(&label("clusters"))
        .inc();
    let current = state.clusters.load();
    let revoked =
        lock(&state.router).revoke(|cluster, verifier| current.accepts(cluster, verifier));
    for peer in &revoked {
        peer.sender.connection().close(
            VarInt::from_u32(close::REVOKED),
            b"cluster removed from the relay or its verifier changed",
        );
    }
    state.metrics.registrations.dec_by(revoked.len() as i64);
    tracing::info!(
        clusters = count,
        revoked = revoked.len(),
        "relay clusters reloaded"
    );
}

/// Why a Hello was not accepted.
struct Refused {
    code: Code,
    metric: &'static str,
    message: String,
}

async fn read_hello(
    conn: &Connection,
) -> Result<(quinn::SendStream, Hello), (Option<quinn::SendStream>, Refused)> {
    let malformed = |message: String| Refused {
        code: Code::Malformed,
        metric: "malformed",
        message,
    };
    let (send, mut recv) = conn
        .accept_bi()
        .await
        .map_err(|e| (None, malformed(format!("no control stream: {e}"))))?;
    let mut header = [0u8; 2];
    if let Err(e) = recv.read_exact(&mut header).await {
        return Err((Some(send), malformed(format!("Hello truncated: {e}"))));
    }
    let len = match protocol::control_frame_len(header) {
        Ok(len) => len,
        Err(e) => return Err((Some(send), malformed(e.to_string()))),
    };
    let mut body = vec![0u8; len];
    if let Err(e) = recv.read_exact(&mut body).await {
        return Err((Some(send), malformed(format!("Hello truncated: {e}"))));
    }
    match Hello::decode(&body) {
        Ok(hello) => Ok((send, hello)),
        Err(e) => Err((Some(send), malformed(format!("bad Hello: {e}")))),
    }
}

async fn answer(send: &mut quinn::SendStream, code: Code, message: String) -> bool {
    let body = Answer { code, message }.encode();
    match protocol::frame(&body) {
        Ok(frame) => send.write_all(&frame).await.is_ok() && send.finish().is_ok(),
        Err(_) => false,
    }
}

/// Refuses a client: the answer on the control stream, then the connection is closed with the
/// same message as the reason (whichever the client reads first, it learns why).
async fn refuse(conn: &Connection, send: Option<quinn::SendStream>, refused: Refused) {
    if let Some(mut send) = send {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            answer(&mut send, refused.code, refused.message.clone()),
        )
        .await;
        // Give the answer a moment to arrive; the client closes once it read it.
        let _ = tokio::time::timeout(Duration::from_millis(500), conn.closed()).await;
    }
    conn.close(VarInt::from_u32(close::REFUSED), refused.message.as_bytes());
}

async fn handle(state: &Arc<State>, incoming: quinn::Incoming, shutdown: CancellationToken) {
    let deadline = tokio::time::Instant::now() + state.limits.hello_timeout;
    let conn = match tokio::time::timeout_at(deadline, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "relay handshake failed");
            state.metrics.auth_failed("handshake");
            return;
        }
        Err(_) => {
            state.metrics.auth_failed("timeout");
            return;
        }
    };
    let remote = conn.remote_address();
    let (mut send, hello) = match tokio::time::timeout_at(deadline, read_hello(&conn)).await {
        Ok(Ok(ok)) => ok,
        Ok(Err((send, refused))) => {
            state.metrics.auth_failed(refused.metric);
            tracing::debug!(%remote, reason = %refused.message, "relay Hello refused");
            refuse(&conn, send, refused).await;
            return;
        }
        Err(_) => {
            state.metrics.auth_failed("timeout");
            conn.close(VarInt::from_u32(close::REFUSED), b"no Hello in time");
            return;
        }
    };
    let Some(verifier) = state
        .clusters
        .load()
        .authenticate(&hello.cluster_id, &hello.token)
    else {
        state.metrics.auth_failed("unauthorized");
        tracing::info!(%remote, cluster = %hello.cluster_id, "relay Hello refused: unknown cluster or wrong token");
        let refused = Refused {
            code: Code::Unauthorized,
            metric: "unauthorized",
            message: "unknown cluster or wrong access token".into(),
        };
        refuse(&conn, Some(send), refused).await;
        return;
    };

    let peer = Arc::new(Peer {
        sender: PacketSender::new(conn.clone(), state.limits.send_queue_bytes),
    });
    let registered =
        lock(&state.router).register(&hello.cluster_id, hello.public_key, verifier, peer.clone());
    let registration = match registered {
        Ok(r) => r,
        Err(RegisterError::ClusterFull { max }) => {
            state.metrics.auth_failed("cluster_full");
            let refused = Refused {
                code: Code::LimitReached,
                metric: "cluster_full",
                message: format!("the cluster already has {max} clients on this relay"),
            };
            refuse(&conn, Some(send), refused).await;
            return;
        }
    };
    state.metrics.registrations_total.inc();
    match registration.replaced {
        Some(old) => {
            state.metrics.registrations_replaced.inc();
            old.sender.connection().close(
                VarInt::from_u32(close::REPLACED),
                b"replaced by a newer connection of the same key",
            );
        }
        None => {
            state.metrics.registrations.inc();
        }
    }
    tracing::debug!(%remote, cluster = %hello.cluster_id, key = %hex::encode(hello.public_key), "relay client registered");
    if !answer(&mut send, Code::Ok, String::new()).await {
        // Gone already; unregistered below.
        conn.close(VarInt::from_u32(close::NORMAL), b"");
    }

    let client = Arc::new(ClientState {
        cluster: hello.cluster_id.clone(),
        key: hello.public_key,
        limiter: Mutex::new(ClientLimiter::new(
            state.limits.packet_rate,
            state.limits.byte_rate,
            Instant::now(),
        )),
    });
    let mut readers = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                conn.close(VarInt::from_u32(close::SHUTDOWN), b"relay shutting down");
                break;
            }
            datagram = conn.read_datagram() => match datagram {
                Ok(body) => forward(state, &client, body),
                Err(_) => break,
            },
            stream = conn.accept_uni() => match stream {
                Ok(recv) => {
                    let (state, client, conn) = (state.clone(), client.clone(), conn.clone());
                    readers.spawn(async move {
                        let result = read_frames(recv, |key, packet| {
                            forward_packet(&state, &client, key, packet)
                        })
                        .await;
                        if let Err(e) = result {
                            state.metrics.count_drop("malformed");
                            conn.close(VarInt::from_u32(close::PROTOCOL), format!("bad stream frame: {e}").as_bytes());
                        }
                    });
                }
                Err(_) => break,
            },
        }
    }
    readers.abort_all();
    if lock(&state.router).unregister(&hello.cluster_id, &hello.public_key, registration.id) {
        state.metrics.registrations.dec();
    }
}

fn forward(state: &State, client: &ClientState, body: Bytes) {
    match protocol::decode_packet(body) {
        Ok((to, packet)) => forward_packet(state, client, to, packet),
        Err(_) => state.metrics.count_drop("malformed"),
    }
}

fn forward_packet(state: &State, client: &ClientState, to: PublicKey, packet: Bytes) {
    if let Err(refusal) = lock(&client.limiter).check(packet.len(), Instant::now()) {
        state.metrics.count_drop(match refusal {
            Refusal::PacketRate => "packet_rate",
            Refusal::ByteRate => "byte_rate",
        });
        return;
    }
    let peer = match lock(&state.router).route(&client.cluster, &client.key, &to) {
        Route::Deliver(peer) => peer.clone(),
        Route::UnknownDestination => {
            state.metrics.count_drop("unknown_destination");
            return;
        }
        Route::ToSelf => {
            state.metrics.count_drop("to_self");
            return;
        }
    };
    match peer.sender.send(&client.key, &packet) {
        Ok(transport) => state.metrics.relayed(transport, packet.len()),
        Err(failure) => state.metrics.count_drop(failure.label()),
    }
}
