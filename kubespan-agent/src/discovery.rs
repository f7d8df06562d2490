//! Discovery service client: one task per configured endpoint.
//!
//! Each task connects, says Hello (following redirects, learning this node's public IP), opens
//! the Watch stream, publishes this node's sealed record, and then keeps publishing on change and
//! every TTL/2 while it turns watch messages into decrypted [`DiscoveryEvent`]s. Publishing and
//! watching are independent: a refused update is retried on its own back-off
//! ([`PublishPlan`]) and never ends the watch. When the service shows this node's record deleted
//! or changed by someone else, it is restored ([`check_own`]). A record that does not open never
//! replaces the last good one. Watch errors end the session and a new one starts after a
//! jittered exponential backoff; the last known affiliates are kept meanwhile, so a discovery
//! outage never tears down the mesh.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use openspan_proto::discovery::server::{
    AffiliateDeleteRequest, AffiliateUpdateRequest, HelloRequest, WatchRequest, WatchResponse,
    cluster_client::ClusterClient,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::config::DiscoveryEndpoint;
use crate::crypto::ClusterKeys;
use crate::model::AffiliateRecord;
use crate::publish::{
    ECHO_GRACE, PublishPlan, PublishStep, Published, Warn, WarnLimiter, check_own,
};
use crate::record::{self, SealedAffiliate};
use crate::wg::uapi::unix_ms;

pub const DEFAULT_TTL: Duration = Duration::from_secs(30 * 60);
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_REDIRECTS: usize = 5;
const MAX_FAILURES_AT_REDIRECT: usize = 3;
/// Unreadable records remembered (to log each once) per connection.
const WARN_MEMORY: usize = 4096;
/// At most one line about unreadable records per this interval.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// What this node publishes, shared by every client.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Publication {
    /// This node's sealed record; `None` until it is known.
    pub own: Option<SealedAffiliate>,
    /// Endpoints observed for other nodes, pushed under their ids (endpoint harvesting).
    pub harvested: Vec<(String, Vec<Bytes>)>,
    /// Set by `Leave` and at shutdown: delete this node's record and stop publishing it.
    pub leaving: bool,
}

#[derive(Clone, Debug)]
pub enum DiscoveryEvent {
    /// Hello answered; `public_ip` is how the server sees this node.
    Connected {
        index: usize,
        public_ip: Option<IpAddr>,
    },
    /// The watch snapshot: replaces everything this endpoint said before, except the records
    /// named in `unreadable`, whose last good version is kept.
    Snapshot {
        index: usize,
        affiliates: Vec<AffiliateRecord>,
        unreadable: Vec<String>,
    },
    /// A record that does not open (garbage, another secret): the last good one is kept.
    Unreadable {
        index: usize,
        node_id: String,
    },
    Upsert {
        index: usize,
        record: Box<AffiliateRecord>,
    },
    Remove {
        index: usize,
        node_id: String,
    },
    Disconnected {
        index: usize,
        error: String,
    },
}

/// The state of one discovery connection, for `kubespanctl status`.
#[derive(Clone, Debug, Default)]
pub struct ConnectionStatus {
    pub endpoint: String,
    pub state: &'static str,
    pub last_error: String,
    pub since_unix_ms: i64,
    pub affiliates: usize,
    pub public_ip: Option<IpAddr>,
    /// This node's record was deleted from this service (leave).
    pub left: bool,
    /// Affiliates this service lists whose records do not open with this cluster's keys now.
    pub unreadable_affiliates: usize,
    /// The service's clock minus this node's, from the `date` header of its last Hello answer
    /// (one-second resolution).
    pub clock_offset_ms: Option<i64>,
}

pub type SharedStatus = Arc<Mutex<ConnectionStatus>>;

/// What went wrong with discovery, for metrics (shared by every client of the agent).
#[derive(Debug, Default)]
pub struct DiscoveryCounters {
    /// This node's record found deleted or changed by someone else.
    pub own_record_tampered: AtomicU64,
    /// Updates of this node's record that failed (any reason).
    pub publish_failures: AtomicU64,
    /// This node's endpoints refused because its endpoint list was full.
    pub endpoints_refused: AtomicU64,
    /// Records of other affiliates that did not open.
    pub unreadable_records: AtomicU64,
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn set_state(status: &SharedStatus, state: &'static str, error: Option<String>) {
    let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
    if s.state != state {
        s.since_unix_ms = unix_ms(SystemTime::now());
    }
    s.state = state;
    if let Some(error) = error {
        s.last_error = error;
    }
}

/// Settings shared by every client of this agent.
#[derive(Clone)]
pub struct ClientSettings {
    pub cluster_id: String,
    pub node_id: String,
    pub keys: Arc<ClusterKeys>,
    pub ttl: Duration,
    pub client_version: String,
    pub backoff: Backoff,
    pub counters: Arc<DiscoveryCounters>,
}

/// Exponential backoff with jitter: 0.5 s, ×1.5, at most 60 s, ±50 % (the discovery client's).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub factor: f64,
    pub max: Duration,
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            factor: 1.5,
            max: Duration::from_secs(60),
            jitter: 0.5,
        }
    }
}

impl Backoff {
    /// The delay before attempt `attempt` (0-based), jittered with `unit` in [0, 1).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let base = self.initial.as_secs_f64() * self.factor.powi(attempt.min(64) as i32);
        let base = base.min(self.max.as_secs_f64());
        let jittered = base * (1.0 - self.jitter + 2.0 * self.jitter * unit.clamp(0.0, 1.0));
        Duration::from_secs_f64(jittered.max(0.0))
    }
}

enum SessionEnd {
    Redirect(DiscoveryEndpoint),
    Stopped,
}

/// One discovery client, until `stop` is cancelled.
pub async fn run_client(
    index: usize,
    endpoint: DiscoveryEndpoint,
    settings: ClientSettings,
    publication: watch::Receiver<Publication>,
    events: mpsc::Sender<DiscoveryEvent>,
    status: SharedStatus,
    stop: CancellationToken,
) {
    let mut session = Session {
        index,
        plan: PublishPlan::new(settings.backoff),
        settings,
        publication,
        events,
        status,
        warned: WarnLimiter::new(WARN_MEMORY, WARN_INTERVAL),
        known: HashSet::new(),
        unreadable: HashSet::new(),
        reached_watch: false,
        connected: false,
        published: Published::default(),
        expect_own_delete: None,
        own_foreign_endpoints: 0,
        publish_failing: false,
    };
    let mut target = endpoint.clone();
    let mut redirects = 0;
    let mut failures_at_redirect = 0;
    let mut attempt = 0u32;
    loop {
        if stop.is_cancelled() {
            return;
        }
        session.reached_watch = false;
        set_state(&session.status, "connecting", None);
        // Leaving (the delete) happens before `stop`; after it nothing is worth waiting for.
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            outcome = session.run(&target, &stop) => outcome,
        };
        match outcome {
            Ok(SessionEnd::Stopped) => return,
            Ok(SessionEnd::Redirect(next)) if redirects < MAX_REDIRECTS => {
                tracing::info!(from = %target.authority, to = %next.authority, "discovery service redirected us");
                target = next;
                redirects += 1;
                continue;
            }
            Ok(SessionEnd::Redirect(next)) => {
                let error = format!(
                    "too many redirects (last to {}); starting over at {}",
                    next.authority, endpoint.url
                );
                session.disconnected(error).await;
                target = endpoint.clone();
                redirects = 0;
            }
            Err(error) => {
                session.disconnected(error).await;
                // A redirect target that keeps failing is abandoned for the configured service,
                // which can redirect again if it still wants to.
                if target != endpoint && !session.reached_watch {
                    failures_at_redirect += 1;
                    if failures_at_redirect >= MAX_FAILURES_AT_REDIRECT {
                        tracing::warn!(redirect = %target.authority, configured = %endpoint.url, "redirect target keeps failing; going back to the configured discovery service");
                        target = endpoint.clone();
                        redirects = 0;
                        failures_at_redirect = 0;
                    }
                }
            }
        }
        if session.reached_watch {
            attempt = 0;
            redirects = 0;
            failures_at_redirect = 0;
        }
        let delay = session
            .settings
            .backoff
            .delay(attempt, rand::random_range(0.0..1.0));
        attempt = attempt.saturating_add(1);
        set_state(&session.status, "backoff", None);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

struct Session {
    index: usize,
    settings: ClientSettings,
    publication: watch::Receiver<Publication>,
    events: mpsc::Sender<DiscoveryEvent>,
    status: SharedStatus,
    /// Unreadable records already reported: log each once, at a bounded rate.
    warned: WarnLimiter,
    /// Readable affiliates this session currently knows, for the status count.
    known: HashSet<String>,
    /// Affiliates whose current record does not open (for `kubespanctl health`).
    unreadable: HashSet<String>,
    reached_watch: bool,
    /// This session opened its watch (else its failure is "cannot connect", not "lost").
    connected: bool,
    /// When to publish this node's record next.
    plan: PublishPlan,
    /// What this client last got accepted (kept across sessions).
    published: Published,
    /// This client deleted its own record (to clear it) then: that delete's echo, arriving
    /// within [`ECHO_GRACE`], is not tampering.
    expect_own_delete: Option<Instant>,
    /// Endpoints under this node's id that did not open, in the last own record seen.
    own_foreign_endpoints: usize,
    /// The last publish failed (log the failure and the recovery once each).
    publish_failing: bool,
}

/// How one publish went.
enum PublishOutcome {
    Done,
    /// The data was taken but the endpoints were refused (the endpoint list is full).
    EndpointsRefused(String),
}

/// Deletes this node's record from a discovery service no longer configured (a reload removed
/// it), so other nodes using only that service drop this node now rather than at the record's
/// TTL. One attempt, bounded to 5 s: a failure leaves the record to expire.
pub async fn delete_record(
    endpoint: &DiscoveryEndpoint,
    settings: &ClientSettings,
) -> Result<(), String> {
    let connect = async {
        connect_endpoint(endpoint, settings.ttl)?
            .connect()
            .await
            .map_err(|e| format!("cannot connect: {}", crate::discovery_tls::error_chain(&e)))
    };
    let channel = tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .map_err(|_| "cannot connect within 5 s".to_string())??;
    let mut request = tonic::Request::new(AffiliateDeleteRequest {
        cluster_id: settings.cluster_id.clone(),
        affiliate_id: settings.node_id.clone(),
    });
    request.set_timeout(Duration::from_secs(5));
    ClusterClient::new(channel)
        .affiliate_delete(request)
        .await
        .map(|_| ())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

fn connect_endpoint(target: &DiscoveryEndpoint, ttl: Duration) -> Result<Endpoint, String> {
    let scheme = if target.insecure { "http" } else { "https" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", target.authority))
        .map_err(|e| format!("invalid discovery endpoint {}: {e}", target.authority))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval((ttl / 10).max(Duration::from_secs(10)))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .initial_connection_window_size(Some(8 << 20))
        .initial_stream_window_size(Some(4 << 20));
    if !target.insecure {
        // Read per connection, so certificates rotated on disk are used at the next reconnect.
        let tls = crate::discovery_tls::client_tls(target)
            .map_err(|e| format!("TLS setup for {}: {e}", target.authority))?;
        endpoint = endpoint.tls_config(tls).map_err(|e| {
            format!(
                "TLS setup for {}: {}",
                target.authority,
                crate::discovery_tls::error_chain(&e)
            )
        })?;
    }
    Ok(endpoint)
}

fn hash(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

impl Session {
    async fn disconnected(&mut self, error: String) {
        let endpoint = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .endpoint
            .clone();
        if self.connected {
            tracing::warn!(%endpoint, %error, "discovery connection lost; retrying");
        } else {
            tracing::warn!(%endpoint, %error, "cannot reach the discovery service; retrying");
        }
        set_state(&self.status, "backoff", Some(error.clone()));
        // Measured at Hello: a value from a lost connection says nothing about the clock now.
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clock_offset_ms = None;
        let _ = self
            .events
            .send(DiscoveryEvent::Disconnected {
                index: self.index,
                error,
            })
            .await;
    }

    async fn send(&self, event: DiscoveryEvent) -> Result<(), String> {
        self.events
            .send(event)
            .await
            .map_err(|_| "agent is shutting down".to_string())
    }

    async fn run(
        &mut self,
        target: &DiscoveryEndpoint,
        stop: &CancellationToken,
    ) -> Result<SessionEnd, String> {
        self.connected = false;
        let channel: Channel = tokio::select! {
            _ = stop.cancelled() => return Ok(SessionEnd::Stopped),
            c = async { connect_endpoint(target, self.settings.ttl)?.connect().await.map_err(|e| format!("cannot connect to {}: {}", target.authority, crate::discovery_tls::error_chain(&e))) } => c?,
        };
        let mut client = ClusterClient::new(channel).max_decoding_message_size(64 << 20);
        let cluster_id = self.settings.cluster_id.clone();

        let mut hello = tonic::Request::new(HelloRequest {
            cluster_id: cluster_id.clone(),
            client_version: self.settings.client_version.clone(),
        });
        hello.set_timeout(HELLO_TIMEOUT);
        let hello = client
            .hello(hello)
            .await
            .map_err(|s| format!("Hello failed: {}", crate::discovery_tls::status_chain(&s)))?;
        let clock_offset_ms = server_clock_offset_ms(hello.metadata(), SystemTime::now());
        let hello = hello.into_inner();
        if let Some(redirect) = hello.redirect.filter(|r| !r.endpoint.is_empty()) {
            let next = target
                .redirected(&redirect.endpoint)
                .map_err(|e| format!("bad redirect {:?}: {e}", redirect.endpoint))?;
            return Ok(SessionEnd::Redirect(next));
        }
        let public_ip = record::ip_from_bytes(&hello.client_ip);
        {
            let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
            status.public_ip = public_ip;
            status.clock_offset_ms = clock_offset_ms;
        }
        self.send(DiscoveryEvent::Connected {
            index: self.index,
            public_ip,
        })
        .await?;

        let mut stream = client
            .watch(WatchRequest {
                cluster_id: cluster_id.clone(),
            })
            .await
            .map_err(|s| format!("Watch failed: {}", crate::discovery_tls::status_chain(&s)))?
            .into_inner();
        self.connected = true;
        set_state(&self.status, "connected", Some(String::new()));
        tracing::info!(endpoint = %target.authority, ?public_ip, "connected to discovery service");

        let mut publication = self.publication.borrow_and_update().clone();
        // What a previous session expected of the service does not carry over.
        self.expect_own_delete = None;
        self.plan.publish_now(Instant::now());
        let mut refresh = tokio::time::interval_at(
            tokio::time::Instant::now() + self.settings.ttl / 2,
            self.settings.ttl / 2,
        );
        let mut first = true;
        loop {
            let due = match self.plan.step(Instant::now()) {
                PublishStep::Publish { clear_first } => {
                    self.publish_step(&mut client, &publication, clear_first)
                        .await;
                    continue;
                }
                PublishStep::Wait(due) => due,
            };
            let publish_due = async {
                match due {
                    Some(due) => tokio::time::sleep_until(due.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return Ok(SessionEnd::Stopped),
                changed = self.publication.changed() => {
                    if changed.is_err() {
                        return Ok(SessionEnd::Stopped);
                    }
                    publication = self.publication.borrow_and_update().clone();
                    self.plan.publish_now(Instant::now());
                }
                _ = refresh.tick() => self.plan.publish_now(Instant::now()),
                _ = publish_due => {}
                message = stream.message() => match message {
                    Ok(Some(message)) => {
                        self.reached_watch = true;
                        self.handle_watch(message, first, publication.leaving).await?;
                        first = false;
                    }
                    Ok(None) => return Err("the discovery service closed the watch stream".into()),
                    Err(status) => return Err(format!("watch stream ended: {:?}: {}", status.code(), crate::discovery_tls::status_chain(&status))),
                }
            }
        }
    }

    /// Publishes (or, when leaving, deletes) this node's record and schedules what comes next.
    async fn publish_step(
        &mut self,
        client: &mut ClusterClient<Channel>,
        publication: &Publication,
        clear_first: bool,
    ) {
        let now = Instant::now();
        match self.publish(client, publication, clear_first).await {
            Ok(PublishOutcome::Done) => {
                if self.publish_failing {
                    tracing::info!("this node's record is published again");
                    self.publish_failing = false;
                }
                self.plan.succeeded();
            }
            Ok(PublishOutcome::EndpointsRefused(error)) => {
                count(&self.settings.counters.endpoints_refused);
                let response = self.plan.endpoints_refused(now);
                tracing::warn!(%error, retry_in = ?response.delay, "the discovery service refused this node's endpoints (its endpoint list is full, possibly filled by someone else); the data is published, and the record will be cleared and published again");
                if response.backing_off {
                    tracing::warn!(
                        "this node's record keeps being tampered with; restoring it with a growing delay (metric kubespan_discovery_own_record_tampered_total)"
                    );
                }
            }
            Err(error) => {
                count(&self.settings.counters.publish_failures);
                let delay = self.plan.failed(now, rand::random_range(0.0..1.0));
                if !self.publish_failing {
                    tracing::warn!(%error, retry_in = ?delay, "cannot publish this node's record; retrying (watching goes on)");
                    self.publish_failing = true;
                } else {
                    tracing::debug!(%error, retry_in = ?delay, "publishing still fails");
                }
                set_state(&self.status, "connected", Some(error));
            }
        }
    }

    async fn publish(
        &mut self,
        client: &mut ClusterClient<Channel>,
        publication: &Publication,
        clear_first: bool,
    ) -> Result<PublishOutcome, String> {
        if publication.leaving {
            return self.delete_own(client).await.map(|()| PublishOutcome::Done);
        }
        let Some(own) = &publication.own else {
            return Ok(PublishOutcome::Done);
        };
        if clear_first {
            // Endpoints can only be added, never removed, by updates: deleting the record is the
            // one way to drop what someone else filled the list with. Peers keep this node
            // meanwhile (its tunnels are alive).
            let mut request = tonic::Request::new(AffiliateDeleteRequest {
                cluster_id: self.settings.cluster_id.clone(),
                affiliate_id: self.settings.node_id.clone(),
            });
            request.set_timeout(CALL_TIMEOUT);
            client.affiliate_delete(request).await.map_err(|s| {
                format!(
                    "AffiliateDelete (to clear the record) failed: {:?}: {}",
                    s.code(),
                    s.message()
                )
            })?;
            self.expect_own_delete = Some(Instant::now());
            tracing::info!("cleared this node's record (foreign endpoints) to publish it again");
        }
        let ttl = prost_types::Duration::try_from(self.settings.ttl).ok();
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        let own_update = |endpoints: Vec<Bytes>| {
            let mut request = tonic::Request::new(AffiliateUpdateRequest {
                cluster_id: self.settings.cluster_id.clone(),
                affiliate_id: self.settings.node_id.clone(),
                affiliate_data: Some(own.data.clone()),
                affiliate_endpoints: endpoints,
                ttl,
            });
            request.set_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
            request
        };
        let mut outcome = PublishOutcome::Done;
        match client
            .affiliate_update(own_update(own.endpoints.clone()))
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::ResourceExhausted && !own.endpoints.is_empty() => {
                // Possibly the endpoint list is full: the data (and the record's TTL) must still
                // get through, so peers keep reading this node.
                client
                    .affiliate_update(own_update(Vec::new()))
                    .await
                    .map_err(|s| {
                        format!("AffiliateUpdate failed: {:?}: {}", s.code(), s.message())
                    })?;
                if self.own_foreign_endpoints == 0 {
                    // Nothing foreign under this node's id: the rate limit or a full cluster,
                    // not a stuffed list. Retried later, without clearing anything.
                    return Err(format!(
                        "AffiliateUpdate refused this node's endpoints: {:?}: {} (its data was published)",
                        s.code(),
                        s.message()
                    ));
                }
                outcome = PublishOutcome::EndpointsRefused(s.message().to_owned());
            }
            Err(s) => {
                return Err(format!(
                    "AffiliateUpdate failed: {:?}: {}",
                    s.code(),
                    s.message()
                ));
            }
        }
        self.published.set(own.clone(), Instant::now());
        for (affiliate_id, endpoints) in &publication.harvested {
            let mut request = tonic::Request::new(AffiliateUpdateRequest {
                cluster_id: self.settings.cluster_id.clone(),
                affiliate_id: affiliate_id.clone(),
                affiliate_data: None,
                affiliate_endpoints: endpoints.clone(),
                ttl,
            });
            request.set_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
            // Endpoints harvested for another node are best effort (the server may refuse
            // them, e.g. at its per-affiliate endpoint limit); they never end the session.
            if let Err(s) = client.affiliate_update(request).await {
                tracing::debug!(affiliate = %affiliate_id, code = ?s.code(), error = %s.message(), "harvested endpoints not published");
            }
        }
        self.status.lock().unwrap_or_else(|p| p.into_inner()).left = false;
        Ok(outcome)
    }

    /// Leaving: deletes this node's record; a failure is retried (and at worst the record
    /// expires with its TTL).
    async fn delete_own(&mut self, client: &mut ClusterClient<Channel>) -> Result<(), String> {
        let mut request = tonic::Request::new(AffiliateDeleteRequest {
            cluster_id: self.settings.cluster_id.clone(),
            affiliate_id: self.settings.node_id.clone(),
        });
        request.set_timeout(Duration::from_secs(5));
        client.affiliate_delete(request).await.map_err(|s| {
            format!(
                "could not delete this node's record (it expires with its TTL): {:?}: {}",
                s.code(),
                s.message()
            )
        })?;
        tracing::info!("deleted this node's record from the discovery service");
        self.status.lock().unwrap_or_else(|p| p.into_inner()).left = true;
        Ok(())
    }

    /// Decrypts what can be decrypted. `None` for records without data and (logging each once,
    /// at a bounded rate) records that do not open with this cluster's keys.
    fn open(
        &mut self,
        affiliate: &openspan_proto::discovery::server::Affiliate,
    ) -> Option<AffiliateRecord> {
        if affiliate.data.is_empty() {
            return None;
        }
        match record::open(
            &self.settings.keys,
            &affiliate.id,
            &affiliate.data,
            &affiliate.endpoints,
        ) {
            Ok((record, rejected)) => {
                if rejected > 0 {
                    tracing::debug!(affiliate = %affiliate.id, rejected, "ignored endpoints that do not open with this cluster's keys");
                }
                Some(record)
            }
            Err(error) => {
                count(&self.settings.counters.unreadable_records);
                match self
                    .warned
                    .unreadable(&affiliate.id, hash(&affiliate.data), Instant::now())
                {
                    Warn::Log { suppressed: 0 } => {
                        tracing::warn!(affiliate = %affiliate.id, %error, "ignoring a discovery record (the last good one is kept)")
                    }
                    Warn::Log { suppressed } => {
                        tracing::warn!(affiliate = %affiliate.id, %error, more = suppressed, "ignoring discovery records (the last good ones are kept)")
                    }
                    Warn::Quiet => {}
                }
                None
            }
        }
    }

    /// Restores this node's record when the service shows it deleted or changed by someone
    /// else (not while leaving, and not for the echo of its own clearing delete).
    fn check_own_record(
        &mut self,
        affiliate: &openspan_proto::discovery::server::Affiliate,
        deleted: bool,
        leaving: bool,
    ) {
        if leaving {
            return;
        }
        let now = Instant::now();
        let expected_delete = self
            .expect_own_delete
            .take()
            .is_some_and(|at| now.saturating_duration_since(at) < ECHO_GRACE);
        if deleted && expected_delete {
            return;
        }
        let seen = (!deleted).then_some((&affiliate.data[..], &affiliate.endpoints[..]));
        let verdict = check_own(
            &self.settings.keys,
            &self.settings.node_id,
            &mut self.published,
            seen,
            now,
        );
        self.own_foreign_endpoints = verdict.foreign;
        let verdict = verdict.record;
        if let Some(response) = self.plan.own_record_seen(verdict, now) {
            count(&self.settings.counters.own_record_tampered);
            tracing::warn!(
                change = verdict.as_str(),
                restore_in = ?response.delay,
                "this node's record was changed by someone else at the discovery service; restoring it"
            );
            if response.backing_off {
                tracing::warn!(
                    "this node's record keeps being tampered with; restoring it with a growing delay (metric kubespan_discovery_own_record_tampered_total)"
                );
            }
        }
    }

    async fn handle_watch(
        &mut self,
        message: WatchResponse,
        first: bool,
        leaving: bool,
    ) -> Result<(), String> {
        let index = self.index;
        if first {
            // This node's own entry is not judged here: the snapshot predates the publish this
            // session starts with.
            let mut affiliates = Vec::new();
            let mut unreadable = Vec::new();
            for affiliate in &message.affiliates {
                if affiliate.id == self.settings.node_id {
                    continue;
                }
                match self.open(affiliate) {
                    Some(record) => affiliates.push(record),
                    None => unreadable.push(affiliate.id.clone()),
                }
            }
            self.known = affiliates.iter().map(|r| r.node_id.clone()).collect();
            self.unreadable = unreadable.iter().cloned().collect();
            self.update_counts();
            return self
                .send(DiscoveryEvent::Snapshot {
                    index,
                    affiliates,
                    unreadable,
                })
                .await;
        }
        for affiliate in &message.affiliates {
            if affiliate.id == self.settings.node_id {
                self.check_own_record(affiliate, message.deleted, leaving);
                continue;
            }
            let event = if message.deleted {
                DiscoveryEvent::Remove {
                    index,
                    node_id: affiliate.id.clone(),
                }
            } else {
                match self.open(affiliate) {
                    Some(record) => DiscoveryEvent::Upsert {
                        index,
                        record: Box::new(record),
                    },
                    // Unreadable now: the last good record stays (a writer without the cluster
                    // secret cannot evict a node).
                    None => DiscoveryEvent::Unreadable {
                        index,
                        node_id: affiliate.id.clone(),
                    },
                }
            };
            match &event {
                DiscoveryEvent::Upsert { record, .. } => {
                    self.unreadable.remove(&record.node_id);
                    self.known.insert(record.node_id.clone());
                }
                DiscoveryEvent::Remove { node_id, .. } => {
                    self.unreadable.remove(node_id);
                    self.known.remove(node_id);
                }
                DiscoveryEvent::Unreadable { node_id, .. } => {
                    self.unreadable.insert(node_id.clone());
                }
                _ => {}
            }
            self.send(event).await?;
        }
        self.update_counts();
        Ok(())
    }

    fn update_counts(&self) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        status.affiliates = self.known.len();
        status.unreadable_affiliates = self.unreadable.len();
    }
}

/// The server's clock minus this node's, from an HTTP `date` header (RFC 9110 IMF-fixdate).
/// `None` without a parseable header: a proxy may strip it, and then nothing is known.
fn server_clock_offset_ms(metadata: &tonic::metadata::MetadataMap, now: SystemTime) -> Option<i64> {
    let date = metadata.get("date")?.to_str().ok()?;
    let server = httpdate::parse_http_date(date).ok()?;
    let offset = match server.duration_since(now) {
        Ok(ahead) => i64::try_from(ahead.as_millis()).ok()?,
        Err(behind) => -i64::try_from(behind.duration().as_millis()).ok()?,
    };
    // The header has whole seconds: a server less than a second ahead reads as behind.
    Some(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_servers_clock_offset_comes_from_the_date_header() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut metadata = tonic::metadata::MetadataMap::new();
        assert_eq!(server_clock_offset_ms(&metadata, now), None);
        metadata.insert(
            "date",
            httpdate::fmt_http_date(now + Duration::from_secs(90))
                .parse()
                .unwrap(),
        );
        assert_eq!(server_clock_offset_ms(&metadata, now), Some(90_000));
        metadata.insert(
            "date",
            httpdate::fmt_http_date(now - Duration::from_secs(30))
                .parse()
                .unwrap(),
        );
        assert_eq!(server_clock_offset_ms(&metadata, now), Some(-30_000));
        metadata.insert("date", "yesterday".parse().unwrap());
        assert_eq!(server_clock_offset_ms(&metadata, now), None);
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let b = Backoff::default();
        assert_eq!(b.delay(0, 0.5), Duration::from_millis(500));
        assert_eq!(b.delay(1, 0.5), Duration::from_millis(750));
        assert_eq!(b.delay(100, 0.5), Duration::from_secs(60));
        assert_eq!(b.delay(0, 0.0), Duration::from_millis(250));
        assert_eq!(b.delay(0, 1.0), Duration::from_millis(750));
    }
}
