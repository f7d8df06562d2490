//! Wiring: listeners, the gRPC server, HTTP pages, timers for expiry, snapshots and certificate
//! reloads, and an orderly shutdown that ends watch streams and writes a final snapshot.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic_health::ServingStatus;

use crate::backend::{Backend, MemoryBackend, WatchLimits};
use crate::clock::{Clock, SystemClock};
use crate::etcd::{EtcdBackend, EtcdConfig};
use crate::grpc::{AdmissionConfig, Admitted, ClusterRoutes, Gate};
use crate::http::{HttpState, landing_router, metrics_router};
use crate::limits::Limits;
use crate::metrics::{KindLabels, Metrics};
use crate::net::{ConnectionLimits, Connections, Protocol};
use crate::persist;
use crate::ratelimit::RateLimit;
use crate::store::Store;
use crate::stun::StunConfig;
use crate::tls::{ReloadingTls, TlsFiles};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Clone, Debug)]
pub struct SnapshotConfig {
    pub path: PathBuf,
    pub interval: Duration,
    /// Larger files are refused at load (moved aside) instead of read into memory.
    pub max_size: u64,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// gRPC listener; `None` disables it.
    pub grpc_addr: Option<String>,
    pub landing_addr: Option<String>,
    pub metrics_addr: Option<String>,
    pub snapshot: Option<SnapshotConfig>,
    pub gc_interval: Duration,
    pub redirect_endpoint: Option<String>,
    pub admission: AdmissionConfig,
    pub tls: Option<TlsFiles>,
    pub tls_reload_interval: Duration,
    pub limits: Limits,
    /// Change messages a watcher may fall behind before it is aborted.
    pub watch_buffer: usize,
    /// Bytes queued for one watcher (its snapshot included) before it is aborted.
    pub watch_max_bytes: usize,
    /// Bytes of superseded snapshots and List answers still held by slow streams before new
    /// Watch and List calls are refused.
    pub max_superseded_bytes: usize,
    /// Connection caps, deadlines and HTTP/2 limits of every listener.
    pub connections: ConnectionLimits,
    /// How long a graceful shutdown waits for in-flight calls.
    pub shutdown_grace: Duration,
    /// Where the state lives.
    pub store: StoreKind,
    /// The STUN responder; `None` (the default) turns it off.
    pub stun: Option<StunConfig>,
    /// The embedded QUIC relay (`--relay-addr`); `None` (the default) turns it off.
    pub relay: Option<openspan_relay::RelayConfig>,
}

/// Where the state lives.
#[derive(Clone, Debug, Default)]
pub enum StoreKind {
    /// In this process's memory, with snapshot files (one replica).
    #[default]
    Memory,
    /// In etcd, shared by every replica that names the same etcd and prefix.
    Etcd(Box<EtcdConfig>),
}

impl Default for Config {
    fn default() -> Self {
        Self {
            grpc_addr: Some(":3000".into()),
            landing_addr: Some(":3001".into()),
            metrics_addr: Some(":2122".into()),
            snapshot: None,
            gc_interval: Duration::from_secs(60),
            redirect_endpoint: None,
            admission: AdmissionConfig::default(),
            tls: None,
            tls_reload_interval: Duration::from_secs(10),
            limits: Limits::default(),
            watch_buffer: 32,
            watch_max_bytes: WatchLimits::default().max_bytes,
            max_superseded_bytes: WatchLimits::default().max_superseded_bytes,
            connections: ConnectionLimits::default(),
            shutdown_grace: Duration::from_secs(10),
            store: StoreKind::Memory,
            stun: None,
            relay: None,
        }
    }
}

impl Config {
    /// A server embedded in another program (or a test): gRPC on `grpc_addr` only, no HTTP
    /// pages or metrics listener, no snapshots, no per-IP rate limit, a 2 s shutdown grace.
    pub fn embedded(grpc_addr: &str) -> Self {
        Self {
            grpc_addr: Some(grpc_addr.into()),
            landing_addr: None,
            metrics_addr: None,
            admission: AdmissionConfig {
                rate_limit: RateLimit {
                    per_second: 0.0,
                    burst: 0,
                },
                ..AdmissionConfig::default()
            },
            shutdown_grace: Duration::from_secs(2),
            ..Self::default()
        }
    }
}

/// A started server. Dropping it does not stop it; call [`Running::shutdown`].
pub struct Running {
    pub grpc_addr: Option<SocketAddr>,
    pub landing_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    /// The STUN responder's UDP address, when it runs.
    pub stun_addr: Option<SocketAddr>,
    /// The embedded relay's UDP address, when it runs.
    pub relay_addr: Option<SocketAddr>,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Stops gracefully: ends watch streams, lets calls finish, writes the final snapshot.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.wait().await
    }

    /// Waits until the server stops (after [`Running::stop_token`] is cancelled).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("server task failed")?
    }

    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }
}

/// Refuses a bare port (`3000`), which no listener accepts, pointing at Go's `:3000`.
pub fn check_listen_addr(flag: &str, addr: &str) -> anyhow::Result<()> {
    if !addr.is_empty() && addr.parse::<u16>().is_ok() {
        bail!(
            "{flag} {addr:?} is a bare port: write `:{addr}` (every interface) or `127.0.0.1:{addr}` (this host only)"
        );
    }
    Ok(())
}

/// Binds an address in Go's notation: `:3000` means every interface (IPv6 and IPv4).
pub async fn bind(flag: &str, addr: &str) -> anyhow::Result<TcpListener> {
    check_listen_addr(flag, addr)?;
    let listener = if let Some(port) = addr.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .with_context(|| format!("{flag} {addr:?}: the port is not a number"))?;
        match TcpListener::bind(SocketAddr::from(([0u16; 8], port))).await {
            Ok(listener) => Ok(listener),
            // Hosts without IPv6 still get every IPv4 interface.
            Err(_) => TcpListener::bind(SocketAddr::from(([0u8; 4], port))).await,
        }
    } else {
        TcpListener::bind(addr).await
    };
    listener.with_context(|| {
        format!("cannot listen on {flag} {addr:?}: is the address valid, free and ours?")
    })
}

fn load_snapshot(store: &mut Store, config: &SnapshotConfig, clock: &dyn Clock) {
    let started = Instant::now();
    let path = &config.path;
    // Temp files of writers killed mid-write (SIGKILL, OOM) would otherwise pile up forever.
    match persist::remove_stale_temp_files(path) {
        Ok(removed) if !removed.is_empty() => tracing::info!(
            count = removed.len(), files = ?removed, "removed temporary snapshot files left by a killed server"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(
            path = %path.display(), error = %e,
            "cannot clean up temporary snapshot files left by a killed server; remove .<name>.tmp-<pid> files beside the snapshot by hand"
        ),
    }
    let (now, wall) = (clock.monotonic(), clock.wall());
    let at = persist::Moment {
        wall,
        boot: clock.boot(),
    };
    match persist::load(path, store, now, at, config.max_size) {
        Ok(Some(loaded)) => {
            let elapsed_ms = started.elapsed().as_millis() as u64;
            let affiliates = loaded.affiliates;
            match loaded.downtime {
                persist::Downtime::SameBoot(ms) => tracing::info!(
                    path = %path.display(), affiliates, elapsed_ms, downtime_ms = ms,
                    "loaded snapshot; the downtime, measured by the host's boot clock, was taken off every remaining TTL"
                ),
                persist::Downtime::Subtracted(ms) => tracing::info!(
                    path = %path.display(), affiliates, elapsed_ms, downtime_ms = ms,
                    "loaded snapshot; the downtime was taken off every remaining TTL"
                ),
                persist::Downtime::ClockBehind(ms) => tracing::warn!(
                    path = %path.display(), affiliates, elapsed_ms, clock_behind_ms = ms,
                    "loaded snapshot; the wall clock reads earlier than the snapshot's write time (stepped back?), so records keep the TTL they had when it was written"
                ),
                persist::Downtime::Implausible(ms) => tracing::warn!(
                    path = %path.display(), affiliates, elapsed_ms, wall_clock_gap_ms = ms,
                    "loaded snapshot; the wall clock moved on by more than the longest TTL since it was written (a clock step or a long stop), so records keep the TTL they had when it was written and expire within one TTL unless refreshed"
                ),
            }
            if loaded.format_version == persist::FORMAT_V1_ABSOLUTE {
                tracing::info!(
                    path = %path.display(), taken_at_unix_ms = loaded.taken_at_unix_ms,
                    "the snapshot was in format 1 (absolute wall-clock expiry times): converted them to remaining TTLs against its write time; the next snapshot is written in format {}",
                    persist::FORMAT_VERSION
                );
            }
        }
        Ok(None) => {
            tracing::info!(path = %path.display(), "no snapshot yet; starting empty")
        }
        Err(e @ persist::SnapshotError::TooLarge { .. }) => {
            match persist::move_aside(path, "too-large", wall) {
                Ok(aside) => tracing::error!(
                    error = %e, moved_to = %aside.display(),
                    "snapshot refused: moved it aside and starting empty; clients re-publish within their refresh interval"
                ),
                Err(move_error) => tracing::error!(
                    error = %e, move_error = %move_error,
                    "snapshot refused and could not be moved aside; starting empty"
                ),
            }
        }
        Err(persist::SnapshotError::Corrupt { path, reason }) => {
            match persist::move_aside(&path, "corrupt", wall) {
                Ok(aside) => tracing::error!(
                    path = %path.display(), moved_to = %aside.display(), %reason,
                    "snapshot is corrupt: moved it aside and starting empty; clients re-publish within their refresh interval"
                ),
                Err(e) => tracing::error!(
                    path = %path.display(), %reason, error = %e,
                    "snapshot is corrupt and could not be moved aside; starting empty"
                ),
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot read the snapshot; starting empty"),
    }
}

fn save_snapshot<B: Backend>(
    backend: &B,
    metrics: &Metrics,
    config: &SnapshotConfig,
) -> Result<(), persist::SnapshotError> {
    let started = Instant::now();
    let Some(bytes) = backend.snapshot_file() else {
        return Ok(());
    };
    if bytes.len() as u64 > config.max_size {
        tracing::warn!(
            path = %config.path.display(), bytes = bytes.len(), max = config.max_size,
            "the snapshot is larger than --snapshot-max-size: the next start will refuse it; raise the cap"
        );
    }
    match persist::write_atomic(&config.path, &bytes) {
        Ok(()) => {
            let elapsed = started.elapsed();
            metrics.snapshot_duration.observe(elapsed.as_secs_f64());
            metrics.snapshot_size_bytes.set(bytes.len() as i64);
            tracing::debug!(path = %config.path.display(), bytes = bytes.len(), elapsed_ms = elapsed.as_millis() as u64, "snapshot written");
            Ok(())
        }
        Err(e) => {
            metrics.snapshot_failures.inc();
            tracing::error!(error = %e, "snapshot not written; the previous one is kept");
            Err(e)
        }
    }
}

/// Starts the server with the wall clock.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    start_with_clock(config, Arc::new(SystemClock::new())).await
}

/// Connections the metrics listener takes, apart from the public listeners' caps.
const METRICS_MAX_CONNECTIONS: usize = 256;

pub async fn start_with_clock(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Running> {
    let metrics = Arc::new(Metrics::default());
    let watch = WatchLimits {
        buffer: config.watch_buffer,
        max_bytes: config.watch_max_bytes,
        max_superseded_bytes: config.max_superseded_bytes,
    };
    match &config.store {
        StoreKind::Memory => {
            let mut store = Store::new(config.limits.clone());
            if let Some(snapshot) = &config.snapshot {
                load_snapshot(&mut store, snapshot, clock.as_ref());
            }
            let backend = Arc::new(MemoryBackend::new(
                store,
                clock.clone(),
                watch,
                metrics.watch_aborted.clone(),
            ));
            serve_backend(config, clock, metrics, backend).await
        }
        StoreKind::Etcd(etcd) => {
            let backend = EtcdBackend::start(
                etcd,
                config.limits.clone(),
                clock.clone(),
                watch,
                metrics.watch_aborted.clone(),
            )
            .await?;
            tracing::info!(endpoints = %etcd.endpoints.join(","), prefix = %etcd.prefix, "state in etcd");
            let stopper = backend.clone();
            let running = serve_backend(config, clock, metrics, backend).await?;
            let stop = running.stop.clone();
            tokio::spawn(async move {
                stop.cancelled().await;
                stopper.stop();
            });
            Ok(running)
        }
    }
}

/// Serves `backend` on the configured listeners.
async fn serve_backend<B: Backend>(
    config: Config,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    backend: Arc<B>,
) -> anyhow::Result<Running> {
    let gate = Arc::new(Gate::new(config.admission.clone(), metrics.clone()));
    let connections = {
        let mut limits = config.connections.clone();
        limits.close_grace = config.shutdown_grace;
        let gate = gate.clone();
        Connections::new(limits, metrics.clone(), move |ip| gate.is_trusted_proxy(ip))
    };
    // The metrics listener has connection slots of its own, so clients that fill the public
    // listeners cannot blind monitoring and health probes.
    let metrics_connections = {
        let mut limits = config.connections.clone();
        limits.close_grace = config.shutdown_grace;
        limits.max_connections = METRICS_MAX_CONNECTIONS;
        limits.max_connections_per_ip = METRICS_MAX_CONNECTIONS;
        Connections::new(limits, metrics.clone(), |_| false)
    };
    let wanted = (config.connections.max_connections + METRICS_MAX_CONNECTIONS) as u64 + 64;
    match crate::net::raise_fd_limit() {
        Some(files) if files < wanted => tracing::warn!(
            open_file_limit = files,
            max_connections = config.connections.max_connections,
            "the open-file limit is below --max-connections: raise it (ulimit -n, LimitNOFILE=) or lower --max-connections, or new connections fail once the files run out"
        ),
        _ => {}
    }
    let tls = match &config.tls {
        Some(files) => Some(Arc::new(
            ReloadingTls::load(files.clone())
                .context("cannot set up TLS from --certificate-path/--key-path")?,
        )),
        None => None,
    };

    // Bound before the gRPC listener, so a server that accepts gRPC connections also has its
    // STUN socket (tests and probes rely on that order).
    let stun_socket = match &config.stun {
        Some(stun) => Some(crate::stun::bind(&stun.addr).await?),
        None => None,
    };
    let stun_addr = match &stun_socket {
        Some(socket) => Some(socket.local_addr()?),
        None => None,
    };
    let relay = match config.relay.clone() {
        Some(mut relay) => {
            // Served on our metrics listener, not one of its own.
            relay.metrics_addr = None;
            let _ = metrics.relay.set(relay.metrics.clone());
            Some(
                openspan_relay::Relay::bind(relay)
                    .await
                    .context("cannot start the relay (--relay-addr)")?,
            )
        }
        None => None,
    };
    let relay_addr = match &relay {
        Some(relay) => Some(relay.local_addr()?),
        None => None,
    };
    let grpc_listener = match &config.grpc_addr {
        Some(addr) => Some(bind("--addr", addr).await?),
        None => None,
    };
    let landing_listener = match &config.landing_addr {
        Some(addr) => Some(bind("--landing-addr", addr).await?),
        None => None,
    };
    let metrics_listener = match &config.metrics_addr {
        Some(addr) => Some(bind("--metrics-addr", addr).await?),
        None => None,
    };
    let local = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
    let (grpc_addr, landing_addr, metrics_addr) = (
        local(&grpc_listener),
        local(&landing_listener),
        local(&metrics_listener),
    );

    let stop = CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(false));
    let mut tasks: Vec<JoinHandle<anyhow::Result<()>>> = Vec::new();

    let http_state = Arc::new(HttpState {
        backend: backend.clone(),
        metrics: metrics.clone(),
        ready: ready.clone(),
        now: {
            let clock = clock.clone();
            Arc::new(move || clock.wall())
        },
        version: VERSION,
    });
    for (listener, router, name, connections) in [
        (
            landing_listener,
            landing_router(http_state.clone()),
            "landing page",
            &connections,
        ),
        (
            metrics_listener,
            metrics_router(http_state.clone()),
            "metrics",
            &metrics_connections,
        ),
    ] {
        let Some(listener) = listener else { continue };
        let (stop, connections) = (stop.clone(), connections.clone());
        tracing::info!(addr = %listener.local_addr()?, "serving {name} over HTTP");
        tasks.push(tokio::spawn(async move {
            crate::net::serve(listener, Protocol::Http, None, router, connections, stop).await;
            Ok(())
        }));
    }

    if let (Some(socket), Some(stun), Some(addr)) = (stun_socket, config.stun.clone(), stun_addr) {
        tracing::info!(
            %addr,
            per_second = stun.rate_limit.per_second,
            burst = stun.rate_limit.burst,
            "answering STUN binding requests over UDP"
        );
        let (metrics, stop) = (metrics.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            crate::stun::serve(socket, stun, metrics, stop).await;
            Ok(())
        }));
    }

    if let Some(relay) = relay {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            relay.run(stop).await.context("the relay failed")
        }));
    }

    if let Some(listener) = grpc_listener {
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_service_status("", ServingStatus::Serving).await;
        health
            .set_service_status("sidero.discovery.server.Cluster", ServingStatus::Serving)
            .await;
        // The gRPC health follows the backend (an etcd replica that lost etcd is not serving).
        {
            let (health, backend, stop) = (health.clone(), backend.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut serving = true;
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tick.tick() => {}
                    }
                    let ready = backend.ready();
                    if ready != serving {
                        serving = ready;
                        let status = if ready {
                            ServingStatus::Serving
                        } else {
                            ServingStatus::NotServing
                        };
                        health.set_service_status("", status).await;
                        health
                            .set_service_status("sidero.discovery.server.Cluster", status)
                            .await;
                        if ready {
                            tracing::info!("the backend is back: serving");
                        } else {
                            tracing::warn!(
                                "the backend cannot serve (etcd unreachable?): not ready"
                            );
                        }
                    }
                }
            }));
        }
        // Reflection lists what this server serves: the descriptor set also holds the agent's
        // API, which it does not.
        let reflection = |reflection_service: &str| {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(openspan_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name("sidero.discovery.server.Cluster")
                .with_service_name("grpc.health.v1.Health")
                .with_service_name(reflection_service)
        };
        let reflection_v1 = reflection("grpc.reflection.v1.ServerReflection").build_v1()?;
        let reflection_v1alpha =
            reflection("grpc.reflection.v1alpha.ServerReflection").build_v1alpha()?;
        let routes = ClusterRoutes::new(
            backend.clone(),
            gate.clone(),
            metrics.clone(),
            config.redirect_endpoint.clone(),
        );
        let routes = Routes::new(routes)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .prepare();
        let service = Admitted::new(routes, gate.clone(), metrics.clone());
        {
            let stop = stop.clone();
            let backend = backend.clone();
            tasks.push(tokio::spawn(async move {
                stop.cancelled().await;
                health
                    .set_service_status("", ServingStatus::NotServing)
                    .await;
                // Watch streams never end on their own; end them so connections can drain.
                backend.close_watchers();
                Ok(())
            }));
        }
        let addr = listener.local_addr()?;
        match &config.tls {
            Some(files) => {
                tracing::info!(%addr, mtls = files.client_ca.is_some(), "serving gRPC with TLS")
            }
            None => tracing::info!(%addr, "serving gRPC (plaintext)"),
        }
        let serve = crate::net::serve(
            listener,
            Protocol::Grpc,
            tls.clone(),
            service,
            connections.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(bounded(
            stop.clone(),
            config.shutdown_grace,
            serve,
        )));
    }

    // Expiry, idle rate-limiter entries.
    {
        let (backend, gate, metrics, stop) =
            (backend.clone(), gate.clone(), metrics.clone(), stop.clone());
        let interval = config.gc_interval.max(Duration::from_millis(10));
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tick.tick() => {}
                }
                let (removed, trimmed) = backend.collect_garbage();
                gate.forget_idle_clients();
                if removed + trimmed > 0 {
                    metrics
                        .gc_removed
                        .get_or_create(&KindLabels { kind: "affiliate" })
                        .inc_by(removed as u64);
                    metrics
                        .gc_removed
                        .get_or_create(&KindLabels {
                            kind: "endpoints_of_affiliate",
                        })
                        .inc_by(trimmed as u64);
                    tracing::debug!(
                        removed,
                        trimmed,
                        "expired affiliates and endpoints collected"
                    );
                }
            }
        }));
    }

    if let (Some(tls), Some(_)) = (tls.clone(), &config.tls) {
        let stop = stop.clone();
        let interval = config.tls_reload_interval.max(Duration::from_millis(10));
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tick.tick() => {}
                }
                match tls.reload_if_changed() {
                    Ok(true) => tracing::info!("TLS certificate files changed; new connections use them"),
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %e, "TLS files changed but cannot be used; still serving the previous certificate"),
                }
            }
        }));
    }

    let snapshot_config = config.snapshot.clone();
    if let Some(snapshot) = snapshot_config.clone() {
        let (backend, metrics, stop) = (backend.clone(), metrics.clone(), stop.clone());
        let interval = snapshot.interval.max(Duration::from_millis(10));
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tick.tick() => {}
                }
                let (backend, metrics, snapshot) =
                    (backend.clone(), metrics.clone(), snapshot.clone());
                // A failed timed snapshot is logged and counted; the next tick tries again.
                let _ = tokio::task::spawn_blocking(move || {
                    save_snapshot(backend.as_ref(), &metrics, &snapshot)
                })
                .await?;
            }
        }));
    }

    ready.store(true, Ordering::SeqCst);
    tracing::info!(version = VERSION, "discovery server ready");

    let task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut failure = None;
            let mut pending = tasks;
            // Run until asked to stop or until any part fails (then stop the rest).
            while !pending.is_empty() {
                let (result, _, rest) = futures::future::select_all(pending).await;
                pending = rest;
                let outcome = result.context("server task panicked").and_then(|r| r);
                if let Err(e) = outcome {
                    tracing::error!(error = %format!("{e:#}"), "stopping: a server part failed");
                    failure.get_or_insert(e);
                    stop.cancel();
                }
                if stop.is_cancelled() {
                    ready.store(false, Ordering::SeqCst);
                }
            }
            if let Some(snapshot) = &snapshot_config {
                match save_snapshot(backend.as_ref(), &metrics, snapshot) {
                    Ok(()) => {
                        tracing::info!(path = %snapshot.path.display(), "final snapshot written")
                    }
                    Err(e) => {
                        // Exiting 0 here would tell a supervisor all is well while the state
                        // since the last good snapshot is lost.
                        tracing::error!(error = %e, "final snapshot FAILED: the state since the last written snapshot is lost");
                        failure.get_or_insert(anyhow::Error::new(e).context(
                            "the final snapshot failed; make the snapshot directory writable (and check free space)",
                        ));
                    }
                }
            }
            match failure {
                Some(e) => Err(e),
                None => Ok(()),
            }
        })
    };
    Ok(Running {
        grpc_addr,
        landing_addr,
        metrics_addr,
        stun_addr,
        relay_addr,
        stop,
        task,
    })
}

/// Runs a gRPC server future, giving up on stragglers `grace` after shutdown began.
async fn bounded(
    stop: CancellationToken,
    grace: Duration,
    serve: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let deadline = async {
        stop.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        () = serve => Ok(()),
        _ = deadline => {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "gRPC calls still open after the shutdown grace period; closing them");
            Ok(())
        }
    }
}

pub fn validate(config: &Config) -> anyhow::Result<()> {
    for (flag, addr) in [
        ("--addr", &config.grpc_addr),
        ("--landing-addr", &config.landing_addr),
        ("--metrics-addr", &config.metrics_addr),
    ] {
        if let Some(addr) = addr {
            check_listen_addr(flag, addr)?;
        }
    }
    if config.grpc_addr.is_none() {
        tracing::warn!("--addr is empty: the gRPC API is disabled");
    }
    if config.watch_buffer == 0 {
        bail!("--watch-buffer must be at least 1");
    }
    let largest =
        largest_snapshot(&config.limits) + config.watch_buffer * largest_change(&config.limits);
    if config.watch_max_bytes < largest {
        bail!(
            "--watch-max-bytes {} is below what one watcher of a full cluster may need ({largest} bytes: the largest snapshot allowed by --max-affiliates, --max-affiliate-data, --max-endpoints and --max-endpoint-size, plus --watch-buffer changes); raise it or lower those limits",
            config.watch_max_bytes
        );
    }
    let c = &config.connections;
    if c.max_connections == 0 || c.max_connections_per_ip == 0 {
        bail!("--max-connections and --max-connections-per-ip must be at least 1");
    }
    if c.max_concurrent_streams == 0 {
        bail!("--max-concurrent-streams must be at least 1");
    }
    if c.handshake_timeout.is_zero()
        || c.keepalive_interval.is_zero()
        || c.keepalive_timeout.is_zero()
    {
        bail!(
            "--handshake-timeout, --keepalive-interval and --keepalive-timeout must be longer than 0"
        );
    }
    if c.grpc_idle_timeout.is_zero() || c.http_idle_timeout.is_zero() {
        bail!("--grpc-idle-timeout and --http-idle-timeout must be longer than 0");
    }
    if c.response_stall_timeout.is_zero() {
        bail!("--response-stall-timeout must be longer than 0");
    }
    if config.admission.request_body_timeout.is_zero() {
        bail!("--request-body-timeout must be longer than 0");
    }
    // Deadlines are instants from now: a duration beyond any clock's range would overflow.
    let mut durations = vec![
        ("--handshake-timeout", c.handshake_timeout),
        ("--grpc-idle-timeout", c.grpc_idle_timeout),
        ("--http-idle-timeout", c.http_idle_timeout),
        ("--keepalive-interval", c.keepalive_interval),
        ("--keepalive-timeout", c.keepalive_timeout),
        ("--response-stall-timeout", c.response_stall_timeout),
        (
            "--request-body-timeout",
            config.admission.request_body_timeout,
        ),
        ("--shutdown-grace", config.shutdown_grace),
        ("--gc-interval", config.gc_interval),
        ("--max-ttl", config.limits.max_ttl),
    ];
    if let Some(snapshot) = &config.snapshot {
        durations.push(("--snapshot-interval", snapshot.interval));
    }
    for (flag, duration) in durations {
        if duration > MAX_DURATION {
            bail!("{flag} {duration:?} is longer than the most this server accepts (10 years)");
        }
    }
    Ok(())
}

/// The longest duration any flag takes.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Wire size of the largest affiliate the limits allow (id, data, every endpoint, and tags).
fn largest_change(limits: &Limits) -> usize {
    let field = |len: usize| 1 + prost::encoding::encoded_len_varint(len as u64) as usize + len;
    let affiliate = field(limits.max_affiliate_id_len)
        + field(limits.max_data_len)
        + limits.max_endpoints_per_affiliate * field(limits.max_endpoint_len);
    5 + 2 + field(affiliate)
}

/// Wire size of the largest snapshot the limits allow (as several messages when over 4 MiB).
fn largest_snapshot(limits: &Limits) -> usize {
    limits.max_affiliates_per_cluster * largest_change(limits) + 5 * 64
}
