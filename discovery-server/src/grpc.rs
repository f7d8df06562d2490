//! The `sidero.discovery.server.Cluster` gRPC service: request admission (client IP, rate
//! limit), status codes and metrics around a [`Backend`].
//!
//! Unary methods go through tonic's generated server. `Watch` and `List` are served by a small
//! handler of their own ([`ClusterRoutes`]) that writes the backend's pre-framed messages
//! straight into the HTTP/2 body: every watcher of a cluster sends the very same bytes, so
//! fan-out costs no per-watcher encoding or copying, and a thousand Lists of a large cluster
//! hold one encoding of it, not a thousand. Both bodies report their progress
//! ([`StallProbe`]), so a client that stops reading is cut off instead of pinning memory.
//!
//! Every call goes through [`Admitted`] first: the client IP is resolved and the rate limit
//! applied when the call opens, before its body is read, and the body must then arrive within
//! a deadline. A client can therefore not hold server memory with calls it never finishes.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use bytes::{Buf, Bytes};
use http_body::Frame;
use http_body_util::BodyExt;
use openspan_proto::discovery::server::{
    AffiliateDeleteRequest, AffiliateDeleteResponse, AffiliateUpdateRequest,
    AffiliateUpdateResponse, HelloRequest, HelloResponse, ListRequest, ListResponse,
    RedirectMessage, WatchRequest, WatchResponse,
    cluster_server::{Cluster, ClusterServer},
};
use prost::Message;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;
use tonic::transport::server::TcpConnectInfo;
use tonic::{Code, Request, Response, Status};

use crate::backend::{Backend, Encoded, StallProbe, WatchItem, WatchSubscription};
use crate::limits::{StoreError, Update};
use crate::metrics::{Metrics, OutcomeLabels};
use crate::ratelimit::{Admission, RateLimit, RateLimiter, bucket};

/// How requests are let in: where the client IP comes from and how fast one IP may go.
#[derive(Clone, Debug)]
pub struct AdmissionConfig {
    /// Take the client IP from `X-Real-IP` (reference default: on), but only from a peer
    /// inside `trusted_proxies`.
    pub trust_x_real_ip: bool,
    pub trust_first_x_forwarded_for: bool,
    /// TCP peers whose proxy headers are believed. Anyone else could pick a fresh rate-limit
    /// bucket per request by sending a made-up header.
    pub trusted_proxies: Vec<IpNet>,
    pub rate_limit: RateLimit,
    /// Bound on the number of client IPs the limiter tracks at once.
    pub max_tracked_clients: usize,
    /// How long a call may take to send its whole request body once it has been let in.
    pub request_body_timeout: Duration,
}

/// Loopback and private ranges: where a reverse proxy in front of the server usually is.
pub fn default_trusted_proxies() -> Vec<IpNet> {
    [
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "::1/128",
        "fc00::/7",
    ]
    .iter()
    .map(|n| n.parse().expect("valid built-in network"))
    .collect()
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            trust_x_real_ip: true,
            trust_first_x_forwarded_for: false,
            trusted_proxies: default_trusted_proxies(),
            rate_limit: RateLimit::default(),
            max_tracked_clients: 100_000,
            request_body_timeout: Duration::from_secs(10),
        }
    }
}

/// The client IP resolved when a call was let in (a request extension).
#[derive(Clone, Copy, Debug)]
pub struct ClientIp(pub Option<IpAddr>);

/// The longest a call without a `grpc-timeout` waits for its rate-limit token.
pub const MAX_WAIT_WITHOUT_DEADLINE: Duration = Duration::from_secs(30);

/// Client IP resolution and per-IP rate limiting, shared by every RPC.
pub struct Gate {
    config: AdmissionConfig,
    limiter: Mutex<RateLimiter>,
    metrics: Arc<Metrics>,
}

impl Gate {
    pub fn new(config: AdmissionConfig, metrics: Arc<Metrics>) -> Self {
        let limiter = RateLimiter::new(config.rate_limit, config.max_tracked_clients.max(1024));
        Self {
            config,
            limiter: Mutex::new(limiter),
            metrics,
        }
    }

    /// Whether `peer` is a proxy whose client-IP headers are believed.
    pub fn is_trusted_proxy(&self, peer: IpAddr) -> bool {
        let peer = canonical_ip(peer);
        self.config
            .trusted_proxies
            .iter()
            .any(|n| n.contains(&peer))
    }

    /// The caller's IP: a proxy header when enabled, present and sent by a trusted proxy,
    /// else the TCP peer.
    pub fn client_ip(
        &self,
        headers: &http::HeaderMap,
        remote: Option<SocketAddr>,
    ) -> Option<IpAddr> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let trusted = remote.is_some_and(|r| self.is_trusted_proxy(r.ip()));
        let from_header = if trusted && self.config.trust_x_real_ip {
            header("x-real-ip").and_then(parse_ip)
        } else {
            None
        };
        let from_header = from_header.or_else(|| {
            if trusted && self.config.trust_first_x_forwarded_for {
                header("x-forwarded-for")
                    .and_then(|v| v.split(',').next())
                    .and_then(parse_ip)
            } else {
                None
            }
        });
        from_header.or(remote.map(|a| a.ip())).map(canonical_ip)
    }

    /// Waits for the client's token, or refuses at once when it would come after the deadline.
    /// IPv6 clients share one bucket per /64, the block a single host usually gets.
    /// A call waits at most [`MAX_WAIT_WITHOUT_DEADLINE`], whatever deadline it carries: otherwise
    /// a client could push its bucket (or one it shares with others: a NAT, a /64, the overflow
    /// bucket) arbitrarily far into the future with long `grpc-timeout`s and cancelled calls.
    pub async fn admit(
        &self,
        ip: Option<IpAddr>,
        deadline: Option<Duration>,
    ) -> Result<(), Status> {
        let Some(ip) = ip else { return Ok(()) };
        let deadline = Some(deadline.map_or(MAX_WAIT_WITHOUT_DEADLINE, |d| {
            d.min(MAX_WAIT_WITHOUT_DEADLINE)
        }));
        let verdict = self
            .limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(bucket(ip), Instant::now(), deadline);
        match verdict {
            Admission::After(wait) if wait.is_zero() => Ok(()),
            Admission::After(wait) => {
                self.metrics
                    .rate_limited
                    .get_or_create(&OutcomeLabels { outcome: "delayed" })
                    .inc();
                tokio::time::sleep(wait).await;
                Ok(())
            }
            Admission::Refused { retry_after } => {
                self.metrics
                    .rate_limited
                    .get_or_create(&OutcomeLabels { outcome: "refused" })
                    .inc();
                Err(Status::resource_exhausted(format!(
                    "rate limit exceeded for {ip}: the next request can be served in {retry_after:.1?}, after this call's deadline"
                )))
            }
        }
    }

    /// Drops limiter entries of clients that have gone quiet.
    pub fn forget_idle_clients(&self) {
        self.limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget_idle(Instant::now());
    }
}

fn parse_ip(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    text.parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

/// IPv4 clients reaching a dual-stack socket appear as `::ffff:a.b.c.d`; report them as IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The wire form of an IP in `HelloResponse.client_ip`: 4 bytes for IPv4, 16 for IPv6.
pub fn ip_bytes(ip: IpAddr) -> Bytes {
    match ip {
        IpAddr::V4(v4) => Bytes::copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => Bytes::copy_from_slice(&v6.octets()),
    }
}

/// The `grpc-timeout` a client sent, if any.
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

fn store_status(error: StoreError) -> Status {
    match error {
        StoreError::InvalidArgument(m) => Status::invalid_argument(m),
        StoreError::ResourceExhausted(m) => Status::resource_exhausted(m),
        StoreError::Unavailable(m) => Status::unavailable(m),
    }
}

/// The unary half of the Cluster service.
pub struct ClusterService<B> {
    backend: Arc<B>,
    gate: Arc<Gate>,
    metrics: Arc<Metrics>,
    redirect_endpoint: Option<String>,
}

impl<B: Backend> ClusterService<B> {
    async fn observe<T>(
        &self,
        method: &'static str,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<Response<T>, Status> {
        let result = call.await;
        let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        self.metrics.rpc(method, code);
        if code != Code::Ok {
            tracing::debug!(method, ?code, "request refused");
        }
        result.map(Response::new)
    }

    /// The client IP [`Admitted`] resolved when it let the call in.
    fn admitted<T>(&self, request: &Request<T>) -> Option<IpAddr> {
        match request.extensions().get::<ClientIp>() {
            Some(ClientIp(ip)) => *ip,
            // Served without the admission layer (embedded use): resolve it here.
            None => self
                .gate
                .client_ip(request.metadata().as_ref(), request.remote_addr()),
        }
    }
}

#[tonic::async_trait]
impl<B: Backend> Cluster for ClusterService<B> {
    async fn hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloResponse>, Status> {
        self.observe("Hello", async {
            let ip = self.admitted(&request);
            let hello = request.get_ref();
            self.backend.limits().check_cluster_id(&hello.cluster_id).map_err(store_status)?;
            tracing::debug!(cluster = %hello.cluster_id, client_version = %hello.client_version, ?ip, "hello");
            Ok(HelloResponse {
                redirect: self.redirect_endpoint.clone().map(|endpoint| RedirectMessage { endpoint }),
                client_ip: ip.map(ip_bytes).unwrap_or_default(),
            })
        })
        .await
    }

    async fn affiliate_update(
        &self,
        request: Request<AffiliateUpdateRequest>,
    ) -> Result<Response<AffiliateUpdateResponse>, Status> {
        self.observe("AffiliateUpdate", async {
            let request = request.into_inner();
            let ttl = match request.ttl {
                None => Duration::ZERO,
                Some(ttl) => Duration::try_from(ttl)
                    .map_err(|_| Status::invalid_argument("ttl must be a non-negative duration"))?,
            };
            // Copy out of the request buffer so a stored record never pins a larger allocation.
            let update = Update {
                cluster_id: request.cluster_id,
                affiliate_id: request.affiliate_id,
                data: request.affiliate_data.map(|d| Bytes::copy_from_slice(&d)),
                endpoints: request
                    .affiliate_endpoints
                    .iter()
                    .map(|e| Bytes::copy_from_slice(e))
                    .collect(),
                ttl,
            };
            self.backend.update(update).await.map_err(store_status)?;
            Ok(AffiliateUpdateResponse {})
        })
        .await
    }

    async fn affiliate_delete(
        &self,
        request: Request<AffiliateDeleteRequest>,
    ) -> Result<Response<AffiliateDeleteResponse>, Status> {
        self.observe("AffiliateDelete", async {
            let request = request.get_ref();
            self.backend
                .delete(&request.cluster_id, &request.affiliate_id)
                .await
                .map_err(store_status)?;
            Ok(AffiliateDeleteResponse {})
        })
        .await
    }

    async fn list(&self, _request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        // ClusterRoutes answers List before a request can get here.
        Err(Status::internal(
            "List is served by the shared-encoding handler",
        ))
    }

    type WatchStream = futures::stream::Empty<Result<WatchResponse, Status>>;

    async fn watch(
        &self,
        _request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // ClusterRoutes answers Watch before a request can get here.
        Err(Status::internal("Watch is served by the fan-out handler"))
    }
}

/// The whole Cluster service as one tonic route: Watch and List handled here, the rest by tonic.
pub struct ClusterRoutes<B> {
    unary: ClusterServer<ClusterService<B>>,
    backend: Arc<B>,
    gate: Arc<Gate>,
    metrics: Arc<Metrics>,
}

impl<B> Clone for ClusterRoutes<B> {
    fn clone(&self) -> Self {
        Self {
            unary: self.unary.clone(),
            backend: self.backend.clone(),
            gate: self.gate.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

impl<B: Backend> ClusterRoutes<B> {
    pub fn new(
        backend: Arc<B>,
        gate: Arc<Gate>,
        metrics: Arc<Metrics>,
        redirect_endpoint: Option<String>,
    ) -> Self {
        let service = ClusterService {
            backend: backend.clone(),
            gate: gate.clone(),
            metrics: metrics.clone(),
            redirect_endpoint,
        };
        Self {
            unary: ClusterServer::new(service).max_decoding_message_size(256 * 1024),
            backend,
            gate,
            metrics,
        }
    }
}

impl<B> NamedService for ClusterRoutes<B> {
    const NAME: &'static str = "sidero.discovery.server.Cluster";
}

const WATCH_PATH: &str = "/sidero.discovery.server.Cluster/Watch";
const LIST_PATH: &str = "/sidero.discovery.server.Cluster/List";

impl<B: Backend> Service<http::Request<Body>> for ClusterRoutes<B> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let method = match request.uri().path() {
            WATCH_PATH => "Watch",
            LIST_PATH => "List",
            _ => return self.unary.call(request),
        };
        let this = self.clone();
        Box::pin(async move {
            let result = match method {
                "Watch" => this.open_watch(request).await,
                _ => this.list(request).await,
            };
            let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
            this.metrics.rpc(method, code);
            if code != Code::Ok {
                tracing::debug!(method, ?code, "request refused");
            }
            Ok(match result {
                Ok(response) => response,
                Err(status) => status.into_http(),
            })
        })
    }
}

impl<B: Backend> ClusterRoutes<B> {
    /// Reads the one request message of a Watch or List call.
    async fn read_request<M: Message + Default>(
        &self,
        request: http::Request<Body>,
        method: &str,
    ) -> Result<(M, Option<IpAddr>), Status> {
        let ip = match request.extensions().get::<ClientIp>() {
            Some(ClientIp(ip)) => *ip,
            None => {
                // Served without the admission layer (embedded use): admit here.
                let remote = request
                    .extensions()
                    .get::<TcpConnectInfo>()
                    .and_then(|i| i.remote_addr);
                let ip = self.gate.client_ip(request.headers(), remote);
                self.gate.admit(ip, grpc_timeout(request.headers())).await?;
                ip
            }
        };
        if request
            .headers()
            .get("grpc-encoding")
            .is_some_and(|v| v != "identity")
        {
            return Err(Status::unimplemented(format!(
                "compressed {method} requests are not supported"
            )));
        }
        let body = http_body_util::Limited::new(request.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| match e.downcast::<Status>() {
                Ok(status) => *status,
                Err(e) => Status::invalid_argument(format!("cannot read {method} request: {e}")),
            })?
            .to_bytes();
        Ok((decode_unary_frame::<M>(body)?, ip))
    }

    async fn list(&self, request: http::Request<Body>) -> Result<http::Response<Body>, Status> {
        let (list, _) = self.read_request::<ListRequest>(request, "List").await?;
        let encoded = self
            .backend
            .list(&list.cluster_id)
            .await
            .map_err(store_status)?;
        let body = ListBody::new(encoded);
        let probe = StallProbe(body.progress.clone());
        let mut response = http::Response::new(Body::new(body));
        response.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/grpc"),
        );
        response.extensions_mut().insert(probe);
        Ok(response)
    }

    async fn open_watch(
        &self,
        request: http::Request<Body>,
    ) -> Result<http::Response<Body>, Status> {
        let (watch, ip) = self.read_request::<WatchRequest>(request, "Watch").await?;
        let subscription = self
            .backend
            .watch(&watch.cluster_id)
            .await
            .map_err(store_status)?;
        tracing::debug!(cluster = %watch.cluster_id, ?ip, "watch opened");
        let probe = subscription.probe();
        let mut response = http::Response::new(Body::new(WatchBody::new(subscription)));
        response.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/grpc"),
        );
        response.extensions_mut().insert(probe);
        Ok(response)
    }
}

/// A List answer: the pieces of the cluster's shared encoding, then an OK status.
struct ListBody {
    encoded: Option<Arc<Encoded>>,
    next: usize,
    progress: Arc<ListProgress>,
}

/// Since when a List answer has had a piece ready that the client has not taken.
struct ListProgress(Mutex<Option<Instant>>);

impl crate::backend::Progress for ListProgress {
    fn waiting_since(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ListBody {
    fn new(encoded: Arc<Encoded>) -> Self {
        Self {
            encoded: Some(encoded),
            next: 0,
            progress: Arc::new(ListProgress(Mutex::new(Some(Instant::now())))),
        }
    }
}

impl http_body::Body for ListBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        let Some(encoded) = &this.encoded else {
            return Poll::Ready(None);
        };
        let mut waiting = this.progress.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(piece) = encoded.pieces().get(this.next) {
            this.next += 1;
            *waiting = Some(Instant::now());
            return Poll::Ready(Some(Ok(Frame::data(piece.clone()))));
        }
        // All sent: let go of the encoding before the status goes out.
        *waiting = None;
        drop(waiting);
        this.encoded = None;
        let mut trailers = http::HeaderMap::new();
        let _ = Status::ok("").add_header(&mut trailers);
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }
}

/// Parses a Watch request body: exactly one uncompressed gRPC frame (public for the fuzz tests).
pub fn decode_unary_frame<M: Message + Default>(mut body: Bytes) -> Result<M, Status> {
    if body.len() < 5 {
        return Err(Status::invalid_argument("request has no gRPC message"));
    }
    let compressed = body.get_u8();
    let len = body.get_u32() as usize;
    if compressed != 0 {
        // Compressed requests are refused by their grpc-encoding header (Unimplemented) before
        // this; a set flag without one is a malformed request, as tonic's methods also say.
        return Err(Status::invalid_argument(
            "the request's message is marked compressed but the call names no grpc-encoding",
        ));
    }
    if body.len() != len {
        return Err(Status::invalid_argument(
            "request is not exactly one gRPC message",
        ));
    }
    M::decode(body).map_err(|e| Status::invalid_argument(format!("cannot decode request: {e}")))
}

/// A Watch response body: the watcher's queue of shared frames, then a status.
struct WatchBody {
    subscription: WatchSubscription,
    finished: bool,
}

impl WatchBody {
    fn new(subscription: WatchSubscription) -> Self {
        Self {
            subscription,
            finished: false,
        }
    }

    fn end_with(&mut self, status: Status) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.finished = true;
        let mut trailers = http::HeaderMap::new();
        let _ = status.add_header(&mut trailers);
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }
}

impl http_body::Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match self.subscription.poll_next(cx) {
            Poll::Ready(WatchItem::Data(frame)) => Poll::Ready(Some(Ok(Frame::data(frame)))),
            // Counted in `discovery_watch_aborted_total` by the backend when it aborted the
            // watcher: a watcher that never reads is never polled, so it cannot count here.
            Poll::Ready(WatchItem::Aborted(reason)) => {
                tracing::info!(%reason, "watcher fell behind; ended its stream so it re-syncs");
                self.end_with(Status::aborted(reason))
            }
            Poll::Ready(WatchItem::Closed) => self.end_with(Status::unavailable(
                "the server is shutting down; reconnect",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Admission for every gRPC call, applied when the call opens: client IP, rate limit, and a
/// deadline for the request body. Also gives malformed requests `InvalidArgument` everywhere.
#[derive(Clone)]
pub struct Admitted<S> {
    inner: S,
    gate: Arc<Gate>,
    metrics: Arc<Metrics>,
    body_timeout: Duration,
}

impl<S> Admitted<S> {
    pub fn new(inner: S, gate: Arc<Gate>, metrics: Arc<Metrics>) -> Self {
        let body_timeout = gate.config.request_body_timeout;
        Self {
            inner,
            gate,
            metrics,
            body_timeout,
        }
    }
}

/// The method name of a Cluster call, for metrics (`None` for other services).
fn cluster_method(path: &str) -> Option<&'static str> {
    let method = path.strip_prefix("/sidero.discovery.server.Cluster/")?;
    [
        "Hello",
        "AffiliateUpdate",
        "AffiliateDelete",
        "List",
        "Watch",
    ]
    .into_iter()
    .find(|m| *m == method)
}

impl<S, B> Service<http::Request<B>> for Admitted<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // Take the clone that was driven to readiness; leave a fresh one for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (gate, metrics, body_timeout) =
            (self.gate.clone(), self.metrics.clone(), self.body_timeout);
        Box::pin(async move {
            let remote = request
                .extensions()
                .get::<TcpConnectInfo>()
                .and_then(|i| i.remote_addr);
            let ip = gate.client_ip(request.headers(), remote);
            if let Err(status) = gate.admit(ip, grpc_timeout(request.headers())).await {
                if let Some(method) = cluster_method(request.uri().path()) {
                    metrics.rpc(method, status.code());
                }
                tracing::debug!(
                    ?ip,
                    path = request.uri().path(),
                    "call refused by the rate limit"
                );
                return Ok(status.into_http());
            }
            let (mut parts, body) = request.into_parts();
            parts.extensions.insert(ClientIp(ip));
            let body = Body::new(DeadlineBody::new(body, body_timeout));
            let response = inner.call(http::Request::from_parts(parts, body)).await?;
            Ok(invalid_argument_for_decode_errors(response))
        })
    }
}

/// tonic's decoder reports a malformed request (undecodable protobuf, a missing, truncated or
/// over-long message, a bad compression flag) as `Internal` or `OutOfRange`; it is the client's
/// fault, so the unary methods answer `InvalidArgument`, as the Watch route does.
fn invalid_argument_for_decode_errors(mut response: http::Response<Body>) -> http::Response<Body> {
    /// The beginnings of tonic's (0.14) messages for a request it could not decode.
    const DECODE_ERRORS: [(&str, &str); 6] = [
        ("13", "failed to decode Protobuf message"),
        ("13", "Missing request message."),
        ("13", "Unexpected EOF decoding stream."),
        ("13", "protocol error: received message with"),
        ("13", "Error decompressing:"),
        ("11", "Error, decoded message length too large"),
    ];
    let headers = response.headers_mut();
    let status = headers.get("grpc-status").and_then(|v| v.to_str().ok());
    // grpc-message is percent-encoded; these messages only need spaces decoded.
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(|m| m.replace("%20", " "));
    let is_decode_error = status
        .zip(message.as_deref())
        .is_some_and(|(status, message)| {
            DECODE_ERRORS
                .iter()
                .any(|(code, start)| status == *code && message.starts_with(start))
        });
    if is_decode_error {
        headers.insert(
            "grpc-status",
            http::HeaderValue::from_static("3"), // InvalidArgument
        );
    }
    response
}

/// A request body that must end within a deadline of the call being let in. Without it a
/// client could open streams and never finish them, holding their buffers forever.
struct DeadlineBody<B> {
    inner: B,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    timeout: Duration,
}

impl<B> DeadlineBody<B> {
    fn new(inner: B, timeout: Duration) -> Self {
        Self {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
            timeout,
        }
    }
}

impl<B> http_body::Body for DeadlineBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if frame.is_none() || this.inner.is_end_stream() {
                    this.deadline = None;
                }
                Poll::Ready(frame.map(|f| f.map_err(|e| Status::from_error(e.into()))))
            }
            Poll::Pending => match this.deadline.as_mut().map(|d| d.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => {
                    this.deadline = None;
                    Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                        "the request body did not arrive within {:?} (--request-body-timeout); send the whole request at once",
                        this.timeout
                    )))))
                }
                _ => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
