//! Discovery service client: one task per configured endpoint.
//!
//! Each task connects, says Hello (following redirects, learning this node's public IP), opens
//! the Watch stream, publishes this node's sealed record, and then keeps publishing on change and
//! every TTL/2 while it turns watch messages into decrypted [`DiscoveryEvent`]s. Errors end the
//! session and a new one starts after a jittered exponential backoff; the last known affiliates
//! are kept meanwhile, so a discovery outage never tears down the mesh.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
use crate::record::{self, SealedAffiliate};

pub const DEFAULT_TTL: Duration = Duration::from_secs(30 * 60);
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_REDIRECTS: usize = 5;
const MAX_FAILURES_AT_REDIRECT: usize = 3;

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
    /// The watch snapshot: replaces everything this endpoint said before.
    Snapshot {
        index: usize,
        affiliates: Vec<AffiliateRecord>,
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
}

pub type SharedStatus = Arc<Mutex<ConnectionStatus>>;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn set_state(status: &SharedStatus, state: &'static str, error: Option<String>) {
    let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
    if s.state != state {
        s.since_unix_ms = now_ms();
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
}

/// Exponential backoff with jitter: 0.5 s, ×1.5, at most 60 s, ±50 % (the discovery client's).
#[derive(Clone, Copy, Debug)]
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
        settings,
        publication,
        events,
        status,
        warned: HashSet::new(),
        known: HashSet::new(),
        reached_watch: false,
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
    /// (affiliate id, blob hash) pairs already reported as unreadable: log each once.
    warned: HashSet<(String, u64)>,
    /// Readable affiliates this session currently knows, for the status count.
    known: HashSet<String>,
    reached_watch: bool,
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
        tracing::warn!(endpoint = %self.status.lock().unwrap_or_else(|p| p.into_inner()).endpoint, %error, "discovery connection lost; retrying");
        set_state(&self.status, "backoff", Some(error.clone()));
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
            .map_err(|s| format!("Hello failed: {}", crate::discovery_tls::status_chain(&s)))?
            .into_inner();
        if let Some(redirect) = hello.redirect.filter(|r| !r.endpoint.is_empty()) {
            let next = target
                .redirected(&redirect.endpoint)
                .map_err(|e| format!("bad redirect {:?}: {e}", redirect.endpoint))?;
            return Ok(SessionEnd::Redirect(next));
        }
        let public_ip = record::ip_from_bytes(&hello.client_ip);
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .public_ip = public_ip;
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
            .map_err(|s| format!("Watch failed: {}", s.message()))?
            .into_inner();
        set_state(&self.status, "connected", Some(String::new()));
        tracing::info!(endpoint = %target.authority, ?public_ip, "connected to discovery service");

        let mut publication = self.publication.borrow_and_update().clone();
        self.publish(&mut client, &publication).await?;
        let mut refresh = tokio::time::interval_at(
            tokio::time::Instant::now() + self.settings.ttl / 2,
            self.settings.ttl / 2,
        );
        let mut first = true;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(SessionEnd::Stopped),
                changed = self.publication.changed() => {
                    if changed.is_err() {
                        return Ok(SessionEnd::Stopped);
                    }
                    publication = self.publication.borrow_and_update().clone();
                    self.publish(&mut client, &publication).await?;
                }
                _ = refresh.tick() => self.publish(&mut client, &publication).await?,
                message = stream.message() => match message {
                    Ok(Some(message)) => {
                        self.reached_watch = true;
                        self.handle_watch(message, first).await?;
                        first = false;
                    }
                    Ok(None) => return Err("the discovery service closed the watch stream".into()),
                    Err(status) => return Err(format!("watch stream ended: {:?}: {}", status.code(), status.message())),
                }
            }
        }
    }

    async fn publish(
        &mut self,
        client: &mut ClusterClient<Channel>,
        publication: &Publication,
    ) -> Result<(), String> {
        if publication.leaving {
            self.delete_own(client).await;
            return Ok(());
        }
        let Some(own) = &publication.own else {
            return Ok(());
        };
        let ttl = prost_types::Duration::try_from(self.settings.ttl).ok();
        let mut updates = vec![AffiliateUpdateRequest {
            cluster_id: self.settings.cluster_id.clone(),
            affiliate_id: self.settings.node_id.clone(),
            affiliate_data: Some(own.data.clone()),
            affiliate_endpoints: own.endpoints.clone(),
            ttl,
        }];
        for (affiliate_id, endpoints) in &publication.harvested {
            updates.push(AffiliateUpdateRequest {
                cluster_id: self.settings.cluster_id.clone(),
                affiliate_id: affiliate_id.clone(),
                affiliate_data: None,
                affiliate_endpoints: endpoints.clone(),
                ttl,
            });
        }
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        for (index, update) in updates.into_iter().enumerate() {
            let affiliate = update.affiliate_id.clone();
            let mut request = tonic::Request::new(update);
            request.set_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
            match client.affiliate_update(request).await {
                Ok(_) => {}
                // This node's own record must get through; otherwise the session starts over.
                Err(s) if index == 0 => {
                    return Err(format!(
                        "AffiliateUpdate failed: {:?}: {}",
                        s.code(),
                        s.message()
                    ));
                }
                // Endpoints harvested for another node are best effort (the server may refuse
                // them, e.g. at its per-affiliate endpoint limit); they never end the session.
                Err(s) => {
                    tracing::debug!(%affiliate, code = ?s.code(), error = %s.message(), "harvested endpoints not published")
                }
            }
        }
        self.status.lock().unwrap_or_else(|p| p.into_inner()).left = false;
        Ok(())
    }

    async fn delete_own(&mut self, client: &mut ClusterClient<Channel>) {
        let mut request = tonic::Request::new(AffiliateDeleteRequest {
            cluster_id: self.settings.cluster_id.clone(),
            affiliate_id: self.settings.node_id.clone(),
        });
        request.set_timeout(Duration::from_secs(5));
        match client.affiliate_delete(request).await {
            Ok(_) => {
                tracing::info!("deleted this node's record from the discovery service");
                self.status.lock().unwrap_or_else(|p| p.into_inner()).left = true;
            }
            Err(s) => {
                tracing::warn!(error = %s.message(), "could not delete this node's record; it expires with its TTL")
            }
        }
    }

    /// Decrypts what can be decrypted; skips this node, records without data, and (logging each
    /// once) records that do not open with this cluster's keys.
    fn open(
        &mut self,
        affiliate: &openspan_proto::discovery::server::Affiliate,
    ) -> Option<AffiliateRecord> {
        if affiliate.id == self.settings.node_id || affiliate.data.is_empty() {
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
                if self
                    .warned
                    .insert((affiliate.id.clone(), hash(&affiliate.data)))
                {
                    tracing::warn!(affiliate = %affiliate.id, %error, "ignoring a discovery record");
                }
                None
            }
        }
    }

    async fn handle_watch(&mut self, message: WatchResponse, first: bool) -> Result<(), String> {
        let index = self.index;
        if first {
            let affiliates: Vec<_> = message
                .affiliates
                .iter()
                .filter_map(|a| self.open(a))
                .collect();
            self.known = affiliates.iter().map(|r| r.node_id.clone()).collect();
            self.status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .affiliates = self.known.len();
            return self
                .send(DiscoveryEvent::Snapshot { index, affiliates })
                .await;
        }
        for affiliate in &message.affiliates {
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
                    // Unreadable now: whatever we knew of it is no longer current.
                    None if affiliate.id != self.settings.node_id => DiscoveryEvent::Remove {
                        index,
                        node_id: affiliate.id.clone(),
                    },
                    None => continue,
                }
            };
            match &event {
                DiscoveryEvent::Upsert { record, .. } => self.known.insert(record.node_id.clone()),
                DiscoveryEvent::Remove { node_id, .. } => self.known.remove(node_id),
                _ => false,
            };
            self.send(event).await?;
        }
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .affiliates = self.known.len();
        Ok(())
    }
}

/// What each endpoint last told us, merged by the agent.
#[derive(Debug, Default)]
pub struct RegistryCache {
    per_endpoint: Vec<HashMap<String, AffiliateRecord>>,
    public_ips: Vec<Option<IpAddr>>,
}

impl RegistryCache {
    pub fn new(endpoints: usize) -> Self {
        Self {
            per_endpoint: vec![HashMap::new(); endpoints],
            public_ips: vec![None; endpoints],
        }
    }

    /// Applies one event; returns true when the set of known records changed.
    pub fn apply(&mut self, event: DiscoveryEvent) -> bool {
        match event {
            DiscoveryEvent::Connected { index, public_ip } => {
                if let Some(slot) = self.public_ips.get_mut(index) {
                    let changed = *slot != public_ip;
                    *slot = public_ip;
                    return changed;
                }
                false
            }
            DiscoveryEvent::Snapshot { index, affiliates } => {
                let Some(cache) = self.per_endpoint.get_mut(index) else {
                    return false;
                };
                let fresh: HashMap<_, _> = affiliates
                    .into_iter()
                    .map(|r| (r.node_id.clone(), r))
                    .collect();
                let changed = *cache != fresh;
                *cache = fresh;
                changed
            }
            DiscoveryEvent::Upsert { index, record } => {
                let Some(cache) = self.per_endpoint.get_mut(index) else {
                    return false;
                };
                cache.insert(record.node_id.clone(), (*record).clone()) != Some(*record)
            }
            DiscoveryEvent::Remove { index, node_id } => self
                .per_endpoint
                .get_mut(index)
                .is_some_and(|cache| cache.remove(&node_id).is_some()),
            // Keep what we knew: a discovery outage must not tear down the mesh.
            DiscoveryEvent::Disconnected { .. } => false,
        }
    }

    /// Raw records keyed `service/<endpoint index>/<node id>`, for merging.
    pub fn raw(&self) -> Vec<(String, &AffiliateRecord)> {
        let mut raw: Vec<_> = self
            .per_endpoint
            .iter()
            .enumerate()
            .flat_map(|(i, cache)| {
                cache
                    .values()
                    .map(move |r| (format!("service/{i:03}/{}", r.node_id), r))
            })
            .collect();
        raw.sort_by(|a, b| a.0.cmp(&b.0));
        raw
    }

    /// Distinct public IPs reported by the discovery services, in endpoint order.
    pub fn public_ips(&self) -> Vec<IpAddr> {
        let mut ips = Vec::new();
        for ip in self.public_ips.iter().flatten() {
            if !ips.contains(ip) {
                ips.push(*ip);
            }
        }
        ips
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let b = Backoff::default();
        assert_eq!(b.delay(0, 0.5), Duration::from_millis(500));
        assert_eq!(b.delay(1, 0.5), Duration::from_millis(750));
        assert_eq!(b.delay(100, 0.5), Duration::from_secs(60));
        assert_eq!(b.delay(0, 0.0), Duration::from_millis(250));
        assert_eq!(b.delay(0, 1.0), Duration::from_millis(750));
    }

    fn rec(id: &str) -> AffiliateRecord {
        AffiliateRecord {
            node_id: id.into(),
            nodename: id.into(),
            ..AffiliateRecord::default()
        }
    }

    #[test]
    fn cache_snapshot_replaces_and_disconnect_keeps() {
        let mut cache = RegistryCache::new(2);
        assert!(cache.apply(DiscoveryEvent::Snapshot {
            index: 0,
            affiliates: vec![rec("a"), rec("b")]
        }));
        assert!(cache.apply(DiscoveryEvent::Upsert {
            index: 1,
            record: Box::new(rec("a"))
        }));
        assert!(
            !cache.apply(DiscoveryEvent::Upsert {
                index: 1,
                record: Box::new(rec("a"))
            }),
            "same record: no change"
        );
        assert!(!cache.apply(DiscoveryEvent::Disconnected {
            index: 0,
            error: "x".into()
        }));
        assert_eq!(cache.raw().len(), 3);
        assert!(cache.apply(DiscoveryEvent::Snapshot {
            index: 0,
            affiliates: vec![rec("b")]
        }));
        assert!(cache.apply(DiscoveryEvent::Remove {
            index: 1,
            node_id: "a".into()
        }));
        let ids: Vec<_> = cache.raw().into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ["service/000/b"]);
    }

    #[test]
    fn public_ips_are_distinct_in_endpoint_order() {
        let mut cache = RegistryCache::new(3);
        for (index, ip) in [(0, "203.0.113.1"), (1, "203.0.113.1"), (2, "198.51.100.2")] {
            cache.apply(DiscoveryEvent::Connected {
                index,
                public_ip: Some(ip.parse().unwrap()),
            });
        }
        assert_eq!(
            cache.public_ips(),
            [
                "203.0.113.1".parse::<IpAddr>().unwrap(),
                "198.51.100.2".parse().unwrap()
            ]
        );
    }
}
