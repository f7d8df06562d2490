//! Serving TCP connections for every listener (gRPC and the HTTP pages), with the limits an
//! internet-facing server needs: connection caps (overall and per client IP), a deadline for the
//! TLS handshake and the first bytes of the protocol, idle timeouts, HTTP/2 stream and header
//! limits and keepalive. hyper and hyper-util provide the HTTP/2 and HTTP/1 knobs; what they
//! do not offer (caps, the preface deadline, idle connections) is done here around them.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::codegen::{BoxFuture, Service};
use tonic::transport::server::TcpConnectInfo;

use crate::backend::{Progress, StallProbe};
use crate::metrics::{Metrics, OutcomeLabels};
use crate::ratelimit::bucket;
use crate::tls::ReloadingTls;

/// Limits on connections, shared by every listener. Defaults suit a public server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open connections over all listeners; beyond it new ones are closed at once.
    pub max_connections: usize,
    /// Open connections from one client IP (one /64 for IPv6). Trusted proxies are exempt:
    /// every client behind them shares their address.
    pub max_connections_per_ip: usize,
    /// From accept until the TLS handshake is done and the protocol's first bytes (the HTTP/2
    /// preface, or an HTTP/1 request line) have arrived.
    pub handshake_timeout: Duration,
    /// A gRPC connection with no call open for this long is closed (GOAWAY).
    pub grpc_idle_timeout: Duration,
    /// An HTTP (landing page, metrics) connection with no request open for this long is closed.
    pub http_idle_timeout: Duration,
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Largest header block of one request, in bytes.
    pub max_header_list_size: u32,
    /// HTTP/2 PING interval; a peer that does not answer within the timeout is disconnected.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// How long a connection may take to finish its calls once it is asked to close.
    pub close_grace: Duration,
    /// A connection whose response (a Watch change or status, a List answer) has waited this
    /// long for the client to take it is closed: a client that stops reading would otherwise
    /// pin what the response holds for as long as it keeps the connection.
    pub response_stall_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_connections_per_ip: 1024,
            handshake_timeout: Duration::from_secs(10),
            grpc_idle_timeout: Duration::from_secs(120),
            http_idle_timeout: Duration::from_secs(30),
            max_concurrent_streams: 100,
            max_header_list_size: 16 << 10,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            close_grace: Duration::from_secs(10),
            response_stall_timeout: Duration::from_secs(30),
        }
    }
}

/// What a listener speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// gRPC: HTTP/2 only (prior knowledge or ALPN `h2`).
    Grpc,
    /// The HTTP pages: HTTP/1.1 or HTTP/2.
    Http,
}

/// The HTTP/2 client preface (RFC 9113 §3.4).
const H2_PREFACE_LEN: u64 = 24;

/// Open-connection accounting shared by all listeners.
pub struct Connections {
    limits: ConnectionLimits,
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    metrics: Arc<Metrics>,
    is_trusted: Box<dyn Fn(IpAddr) -> bool + Send + Sync>,
}

impl Connections {
    pub fn new(
        limits: ConnectionLimits,
        metrics: Arc<Metrics>,
        is_trusted: impl Fn(IpAddr) -> bool + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            limits,
            open: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            metrics,
            is_trusted: Box::new(is_trusted),
        })
    }

    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    /// Takes a slot for a new connection from `ip`, or says which cap refused it.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, &'static str> {
        let ip = crate::grpc::canonical_ip(ip);
        if self.open.fetch_add(1, Ordering::SeqCst) >= self.limits.max_connections {
            self.open.fetch_sub(1, Ordering::SeqCst);
            return Err("global_limit");
        }
        let key = if (self.is_trusted)(ip) {
            None
        } else {
            let key = bucket(ip);
            let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            let count = per_ip.entry(key).or_insert(0);
            if *count >= self.limits.max_connections_per_ip {
                drop(per_ip);
                self.open.fetch_sub(1, Ordering::SeqCst);
                return Err("per_ip_limit");
            }
            *count += 1;
            Some(key)
        };
        self.metrics.connections.inc();
        Ok(Slot {
            connections: self.clone(),
            key,
        })
    }

    /// Connections open right now over all listeners.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Whether over half of the connection slots are taken.
    fn under_pressure(&self) -> bool {
        self.open() * 2 > self.limits.max_connections
    }
}

/// One open connection's place in the caps; released when dropped.
struct Slot {
    connections: Arc<Connections>,
    key: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let c = &self.connections;
        if let Some(key) = self.key {
            let mut per_ip = c.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(count) = per_ip.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    per_ip.remove(&key);
                }
            }
        }
        c.open.fetch_sub(1, Ordering::SeqCst);
        c.metrics.connections.dec();
    }
}

/// Raises this process's open-file limit to its hard limit (as Go programs do at start), so
/// the connection caps, not the file limit, decide when connections are refused. Returns the
/// soft limit now in force.
pub fn raise_fd_limit() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some(hard);
    }
    Some(soft)
}

/// What one connection is doing, for the preface deadline and the idle timeout.
struct Activity {
    bytes_read: AtomicU64,
    /// Bytes that make the greeting (the HTTP/2 preface); `greeted` fires once they are in.
    greeting: u64,
    greeted: tokio::sync::Notify,
    open_calls: AtomicUsize,
    /// Whether a call was ever opened on this connection.
    called: std::sync::atomic::AtomicBool,
    /// When the last call ended, in ms after `started`.
    idle_since_ms: AtomicU64,
    started: Instant,
    /// The progress of the responses that report it, while their bodies live.
    responses: Mutex<Vec<std::sync::Weak<dyn Progress>>>,
}

impl Activity {
    fn new(greeting: u64) -> Self {
        Self {
            bytes_read: AtomicU64::new(0),
            greeting,
            greeted: tokio::sync::Notify::new(),
            open_calls: AtomicUsize::new(0),
            called: std::sync::atomic::AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(0),
            started: Instant::now(),
            responses: Mutex::new(Vec::new()),
        }
    }

    /// Since when the longest-waiting response has had bytes its client has not taken.
    fn stalled_since(&self) -> Option<Instant> {
        let mut responses = self.responses.lock().unwrap_or_else(|p| p.into_inner());
        let mut oldest: Option<std::time::Instant> = None;
        responses.retain(|weak| match weak.upgrade() {
            Some(progress) => {
                if let Some(since) = progress.waiting_since() {
                    oldest = Some(oldest.map_or(since, |o| o.min(since)));
                }
                true
            }
            None => false,
        });
        oldest.map(Instant::from_std)
    }

    fn idle_since(&self) -> Instant {
        self.started + Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst))
    }
}

/// Counts a call open until its response body is dropped (the stream is over).
struct CallGuard(Arc<Activity>);

impl CallGuard {
    fn new(activity: Arc<Activity>) -> Self {
        activity.open_calls.fetch_add(1, Ordering::SeqCst);
        activity.called.store(true, Ordering::SeqCst);
        Self(activity)
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since_ms
            .store(a.started.elapsed().as_millis() as u64, Ordering::SeqCst);
        a.open_calls.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its call counted as open.
pub struct TrackedBody<B> {
    inner: B,
    _guard: CallGuard,
}

impl<B> http_body::Body for TrackedBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The per-connection service: tells the application the TCP addresses and tracks open calls.
#[derive(Clone)]
struct ConnService<S> {
    inner: S,
    info: TcpConnectInfo,
    activity: Arc<Activity>,
}

impl<S, B> Service<http::Request<Incoming>> for ConnService<S>
where
    S: Service<http::Request<Incoming>, Response = http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
{
    type Response = http::Response<TrackedBody<B>>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Incoming>) -> Self::Future {
        let guard = CallGuard::new(self.activity.clone());
        request.extensions_mut().insert(self.info.clone());
        let future = self.inner.call(request);
        let activity = self.activity.clone();
        Box::pin(async move {
            let response = future.await?;
            // Held weakly: the body owns its progress and ends it when the stream is over.
            if let Some(StallProbe(progress)) = response.extensions().get::<StallProbe>() {
                activity
                    .responses
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Arc::downgrade(progress));
            }
            Ok(response.map(|inner| TrackedBody {
                inner,
                _guard: guard,
            }))
        })
    }
}

/// A plain or TLS stream whose reads are counted.
struct Counted {
    stream: Stream,
    activity: Arc<Activity>,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = match &mut this.stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        let read = buf.filled().len() - before;
        if read > 0 {
            let a = &this.activity;
            let before = a.bytes_read.fetch_add(read as u64, Ordering::Relaxed);
            if before < a.greeting && before + read as u64 >= a.greeting {
                a.greeted.notify_one();
            }
        }
        result
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

fn builder(protocol: Protocol, limits: &ConnectionLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    if protocol == Protocol::Grpc {
        builder = builder.http2_only();
    }
    builder
        .http1()
        .timer(TokioTimer::new())
        // A request line and headers dribbled in slowly cannot hold a connection forever.
        .header_read_timeout(limits.handshake_timeout)
        .max_buf_size((limits.max_header_list_size as usize).max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_list_size)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        // What a client may send before the server reads it. Requests are at most a few KiB
        // (256 KiB by the limits); small windows bound what calls waiting for their rate-limit
        // token can park in memory per stream and per connection.
        .initial_connection_window_size(1 << 20)
        .initial_stream_window_size(256 << 10);
    builder
}

/// Serves `listener` until `stop`, then closes connections gracefully (each gets
/// `close_grace` to finish its calls).
pub async fn serve<S, B>(
    listener: TcpListener,
    protocol: Protocol,
    tls: Option<Arc<ReloadingTls>>,
    service: S,
    connections: Arc<Connections>,
    stop: CancellationToken,
) where
    S: Service<http::Request<Incoming>, Response = http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = Arc::new(builder(protocol, connections.limits()));
    let mut tasks = JoinSet::new();
    loop {
        let (tcp, remote) = tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Usually out of file descriptors: wait for some to be released.
                    tracing::warn!(error = %e, "accepting a connection failed; is the open-file limit (ulimit -n) below --max-connections?");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let slot = match connections.admit(remote.ip()) {
            Ok(slot) => slot,
            Err(reason) => {
                connections
                    .metrics
                    .connections_refused
                    .get_or_create(&OutcomeLabels { outcome: reason })
                    .inc();
                tracing::debug!(%remote, reason, "connection refused: over the connection cap");
                drop(tcp);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (builder, service, tls, stop, connections) = (
            builder.clone(),
            service.clone(),
            tls.clone(),
            stop.clone(),
            connections.clone(),
        );
        tasks.spawn(async move {
            connection(
                tcp,
                remote,
                protocol,
                tls,
                &builder,
                service,
                &connections,
                stop,
            )
            .await;
            drop(slot);
        });
    }
    drop(listener);
    while tasks.join_next().await.is_some() {}
}

#[allow(clippy::too_many_arguments)]
async fn connection<S, B>(
    tcp: TcpStream,
    remote: SocketAddr,
    protocol: Protocol,
    tls: Option<Arc<ReloadingTls>>,
    builder: &auto::Builder<TokioExecutor>,
    service: S,
    connections: &Connections,
    stop: CancellationToken,
) where
    S: Service<http::Request<Incoming>, Response = http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limits = connections.limits();
    let closed = |reason: &'static str| {
        connections
            .metrics
            .connections_closed
            .get_or_create(&OutcomeLabels { outcome: reason })
            .inc();
    };
    let handshake_deadline = Instant::now() + limits.handshake_timeout;
    let info = TcpConnectInfo {
        local_addr: tcp.local_addr().ok(),
        remote_addr: Some(remote),
    };
    let stream = match tls {
        None => Stream::Plain(tcp),
        Some(tls) => {
            let handshake = tls.acceptor().accept(tcp);
            match tokio::time::timeout_at(handshake_deadline, handshake).await {
                Ok(Ok(stream)) => Stream::Tls(Box::new(stream)),
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    closed("handshake_timeout");
                    tracing::debug!(%remote, "TLS handshake timed out");
                    return;
                }
            }
        }
    };
    let (needed, idle_timeout) = match protocol {
        Protocol::Grpc => (H2_PREFACE_LEN, limits.grpc_idle_timeout),
        Protocol::Http => (1, limits.http_idle_timeout),
    };
    let activity = Arc::new(Activity::new(needed));
    let io = Counted {
        stream,
        activity: activity.clone(),
    };
    let service = ConnService {
        inner: service,
        info,
        activity: activity.clone(),
    };
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
    tokio::pin!(conn);
    let mut greeted = false;
    // While connections are scarce (over half of --max-connections open), a gRPC client that
    // greets must open its first call soon after: connections that only greet would otherwise
    // hold their slots for the whole idle timeout. Otherwise a client's spare warm connections
    // (round-robin over replicas) are left to the idle timeout, not churned.
    let mut first_call_deadline: Option<Instant> = None;
    let mut closing: Option<Instant> = None;
    // Stalled responses are looked for a few times per timeout while calls are open.
    let stall_timeout = limits.response_stall_timeout;
    let stall_every = (stall_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let check = if !greeted {
            handshake_deadline
        } else {
            let check = (activity.idle_since().max(activity.started) + idle_timeout)
                .min(Instant::now() + stall_every);
            match first_call_deadline {
                Some(deadline) if !activity.called.load(Ordering::SeqCst) => check.min(deadline),
                _ => check,
            }
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%remote, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = activity.greeted.notified(), if !greeted => {
                greeted = true;
                if protocol == Protocol::Grpc {
                    first_call_deadline = Some(Instant::now() + limits.handshake_timeout);
                }
            }
            _ = stop.cancelled(), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(Instant::now() + limits.close_grace);
            }
            _ = sleep_until(closing.unwrap_or_else(Instant::now)), if closing.is_some() => {
                tracing::debug!(%remote, "connection still busy after the close grace period; dropping it");
                return;
            }
            _ = sleep_until(check), if closing.is_none() => {
                if !greeted {
                    closed("handshake_timeout");
                    tracing::debug!(%remote, "no protocol preface within --handshake-timeout; closing");
                    return;
                }
                if first_call_deadline.is_some_and(|deadline| deadline <= Instant::now())
                    && !activity.called.load(Ordering::SeqCst)
                    && connections.under_pressure()
                {
                    // Nothing to finish: closed at once, not after a GOAWAY round trip the
                    // client may never answer.
                    closed("no_call");
                    tracing::debug!(%remote, "no call within --handshake-timeout of the preface; closing");
                    return;
                }
                if let Some(since) = activity.stalled_since()
                    && since + stall_timeout <= Instant::now()
                {
                    // Dropping the connection resets its streams and frees what they hold;
                    // a graceful close would wait for the very stream that does not move.
                    closed("response_stalled");
                    tracing::debug!(%remote, "a response waited over --response-stall-timeout for the client to read it; closing the connection");
                    return;
                }
                if activity.open_calls.load(Ordering::SeqCst) == 0
                    && activity.idle_since() + idle_timeout <= Instant::now()
                {
                    closed("idle");
                    tracing::debug!(%remote, "connection idle; closing it");
                    conn.as_mut().graceful_shutdown();
                    closing = Some(Instant::now() + limits.close_grace);
                } else if activity.open_calls.load(Ordering::SeqCst) > 0 {
                    // Busy: look again one idle period from now.
                    activity.idle_since_ms.store(activity.started.elapsed().as_millis() as u64, Ordering::SeqCst);
                }
            }
        }
    }
}
