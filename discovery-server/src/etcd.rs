//! The etcd backend: several discovery-server replicas share one state in etcd.
//!
//! Each replica keeps a [`Mirror`] of the whole state in memory, fed by one etcd watch on the
//! root prefix, and serves List and Watch from it through the same fan-out as the embedded
//! backend. A write goes to etcd as one transaction and reaches every replica's watchers
//! (the writer's included) through that watch, in etcd's revision order.
//!
//! Key layout under the prefix (ids hex-encoded, so any bytes are safe and no id is a prefix of
//! another's keys):
//!
//! - `c/<cluster>/d/<affiliate>`: the affiliate's data; value = expiry (unix ms, 8 bytes BE)
//!   followed by the data.
//! - `c/<cluster>/e/<affiliate>/<endpoint>`: one encrypted endpoint; value = its expiry and
//!   when it was first stored (8 bytes BE each), so every replica keeps the arrival order.
//!
//! TTLs are etcd leases shared per expiry bucket (`--etcd-lease-bucket`, no lease per record):
//! a key is attached to the lease of the bucket its expiry falls in, and etcd deletes it (and
//! tells every replica) when that lease runs out, at most one bucket after the expiry. An
//! affiliate's data key carries the latest of its own and its endpoints' expiries, as the
//! reference keeps an affiliate while any endpoint lives.
//!
//! An update reads the affiliate's keys and the cluster's affiliate count at one revision,
//! merges with the same rules as the embedded store ([`Store::update`]), and writes in a
//! transaction that holds only if nothing it read changed since (optimistic concurrency, retried
//! a few times). Creating an affiliate also requires that no affiliate was created in the
//! cluster meanwhile, which makes the per-cluster limit exact across replicas.
//!
//! When the watch breaks (an etcd member dies, a connection drops) the replica watches again
//! from the revision after the last one it applied, so no event is lost or repeated. When etcd
//! no longer has that history (compaction) the replica lists the prefix again, turns the
//! difference with its mirror into upserts and tombstones for its watchers, and watches from
//! the listed revision. While etcd cannot be reached, writes fail with
//! `Unavailable`, the replica reports not ready, and its watchers keep what they have.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, WatchOptions,
};
use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::clock::Clock;
use crate::fanout::{AffiliateSummary, Encoded, Fanout, Mirror, WatchLimits, WatchSubscription};
use crate::limits::{Limits, StoreError, Update};
use crate::store::{Change, Store, StoredAffiliate, StoredEndpoint, Totals};

/// How often an update that lost a race is retried (nodes of one cluster booting together
/// serialize their creations).
const TXN_ATTEMPTS: usize = 64;

/// A creation that leaves fewer free places than this in its cluster checks that no other was
/// created meanwhile (the limit is exact); further from the limit creations do not conflict. Only
/// more than this many creations racing in the same instant could overshoot, by at most this.
const CREATE_MARGIN: usize = 128;

/// Largest etcd answer read at once; the state is listed in pages well below it.
const MAX_ETCD_MESSAGE: usize = 64 << 20;

/// Keys per page when the whole state is listed.
const LIST_PAGE: i64 = 2_000;

/// How often a quiet watch is asked for progress; three times this without an answer and the
/// watch counts as stalled.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Where and how to reach etcd.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Every key lives under this prefix; replicas sharing a state use the same one.
    pub prefix: String,
    /// Width of the expiry buckets that share a lease.
    pub lease_bucket: Duration,
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM files for TLS to etcd: the CA, and a client certificate and key for mutual TLS.
    pub ca: Option<std::path::PathBuf>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/openspan/discovery/v1/".into(),
            lease_bucket: Duration::from_secs(60),
            username: None,
            password: None,
            ca: None,
            cert: None,
            key: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// The etcd backend of one replica.
pub struct EtcdBackend {
    fanout: Arc<Fanout>,
    client: Client,
    keys: Keys,
    clock: Arc<dyn Clock>,
    limits: Limits,
    lease_bucket_ms: i64,
    /// Granted leases by expiry bucket (bucket end, unix ms).
    leases: tokio::sync::Mutex<BTreeMap<i64, i64>>,
    /// Whether the mirror follows etcd right now (the watch is established).
    in_sync: Arc<AtomicBool>,
    stop: CancellationToken,
}

/// The key layout.
#[derive(Clone, Debug)]
struct Keys {
    prefix: String,
}

/// What one key is.
#[derive(Debug, PartialEq, Eq)]
enum Key {
    Data {
        cluster: String,
        affiliate: String,
    },
    Endpoint {
        cluster: String,
        affiliate: String,
        endpoint: Bytes,
    },
}

impl Keys {
    fn cluster(&self, cluster: &str) -> String {
        format!("{}c/{}/", self.prefix, hex::encode(cluster))
    }

    fn data(&self, cluster: &str, affiliate: &str) -> String {
        format!("{}d/{}", self.cluster(cluster), hex::encode(affiliate))
    }

    fn data_prefix(&self, cluster: &str) -> String {
        format!("{}d/", self.cluster(cluster))
    }

    fn endpoints(&self, cluster: &str, affiliate: &str) -> String {
        format!("{}e/{}/", self.cluster(cluster), hex::encode(affiliate))
    }

    fn endpoint(&self, cluster: &str, affiliate: &str, endpoint: &[u8]) -> String {
        format!(
            "{}{}",
            self.endpoints(cluster, affiliate),
            hex::encode(endpoint)
        )
    }

    fn parse(&self, key: &[u8]) -> Option<Key> {
        let rest = std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?;
        let rest = rest.strip_prefix("c/")?;
        let (cluster, rest) = rest.split_once('/')?;
        let cluster = String::from_utf8(unhex(cluster)?).ok()?;
        if let Some(affiliate) = rest.strip_prefix("d/") {
            return Some(Key::Data {
                cluster,
                affiliate: String::from_utf8(unhex(affiliate)?).ok()?,
            });
        }
        let (affiliate, endpoint) = rest.strip_prefix("e/")?.split_once('/')?;
        Some(Key::Endpoint {
            cluster,
            affiliate: String::from_utf8(unhex(affiliate)?).ok()?,
            endpoint: Bytes::from(unhex(endpoint)?),
        })
    }
}

/// Lowercase hex only, as `hex::encode` writes it: one spelling per key, so no two keys are
/// the same affiliate or endpoint (`hex::decode` alone also takes uppercase).
fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    hex::decode(text).ok()
}

/// The end of the range of keys starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A data key's value: expiry, then the data.
fn data_value(expires_at: i64, data: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(8 + data.len());
    value.extend_from_slice(&expires_at.to_be_bytes());
    value.extend_from_slice(data);
    value
}

/// An endpoint key's value: expiry, then the arrival rank.
fn endpoint_value(expires_at: i64, rank: i64) -> Vec<u8> {
    let mut value = expires_at.to_be_bytes().to_vec();
    value.extend_from_slice(&rank.to_be_bytes());
    value
}

/// An endpoint value's arrival rank (0 when absent).
fn parse_rank(value: &[u8]) -> i64 {
    value
        .get(8..16)
        .and_then(|r| <[u8; 8]>::try_from(r).ok())
        .map_or(0, i64::from_be_bytes)
}

fn parse_expiry(value: &[u8]) -> Option<(i64, &[u8])> {
    let (expiry, rest) = value.split_first_chunk::<8>()?;
    Some((i64::from_be_bytes(*expiry), rest))
}

fn unavailable(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(format!("etcd: {e}; retry later"))
}

impl EtcdBackend {
    /// Connects, loads the state and starts following etcd. Fails when etcd cannot be reached
    /// within the connect timeout.
    pub async fn start(
        config: &EtcdConfig,
        limits: Limits,
        clock: Arc<dyn Clock>,
        watch: WatchLimits,
        aborted: Counter,
    ) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context;
        if config.endpoints.is_empty() {
            anyhow::bail!("--etcd-endpoints is empty: name at least one etcd endpoint");
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_timeout(config.request_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            // A member cut off from the quorum cancels our watch instead of keeping it open
            // with a frozen view (the replica then re-watches through another member).
            .with_require_leader(true);
        if let (Some(user), Some(password)) = (&config.username, &config.password) {
            options = options.with_user(user, password);
        }
        if config.ca.is_some() || config.cert.is_some() {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &config.ca {
                let pem = std::fs::read(ca)
                    .with_context(|| format!("cannot read --etcd-ca-path {}", ca.display()))?;
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
            }
            match (&config.cert, &config.key) {
                (Some(cert), Some(key)) => {
                    let cert_pem = std::fs::read(cert).with_context(|| {
                        format!("cannot read --etcd-cert-path {}", cert.display())
                    })?;
                    let key_pem = std::fs::read(key).with_context(|| {
                        format!("cannot read --etcd-key-path {}", key.display())
                    })?;
                    tls = tls.identity(etcd_client::Identity::from_pem(cert_pem, key_pem));
                }
                (None, None) => {}
                _ => anyhow::bail!("--etcd-cert-path and --etcd-key-path go together"),
            }
            options = options.with_tls(tls);
        }
        let client = Client::connect(&config.endpoints, Some(options))
            .await
            .with_context(|| format!("cannot connect to etcd at {}", config.endpoints.join(",")))?;
        let keys = Keys {
            prefix: config.prefix.clone(),
        };
        let fanout = Arc::new(Fanout::new(Store::new(limits.clone()), watch, aborted));
        let revision = load(&client, &keys, &fanout)
            .await
            .context("cannot read the state from etcd")?;
        let backend = Arc::new(Self {
            fanout: fanout.clone(),
            client: client.clone(),
            keys: keys.clone(),
            clock,
            limits,
            lease_bucket_ms: i64::try_from(config.lease_bucket.as_millis())
                .unwrap_or(60_000)
                .max(1000),
            leases: tokio::sync::Mutex::new(BTreeMap::new()),
            in_sync: Arc::new(AtomicBool::new(true)),
            stop: CancellationToken::new(),
        });
        tokio::spawn(follow(
            client,
            keys,
            fanout,
            revision,
            backend.in_sync.clone(),
            backend.stop.clone(),
        ));
        Ok(backend)
    }

    /// Whether this replica follows etcd right now (readiness).
    pub fn in_sync(&self) -> bool {
        self.in_sync.load(Ordering::SeqCst)
    }

    /// Stops following etcd.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Lists etcd and brings the mirror to its state, telling watchers every difference (what
    /// the replica does whenever its watch was lost). Returns how many changes that made.
    pub async fn catch_up(&self) -> Result<usize, StoreError> {
        resync(&self.client, &self.keys, &self.fanout)
            .await
            .map(|(_, changes)| changes)
            .map_err(unavailable)
    }

    /// The lease for keys expiring at `expires_at` (unix ms): one per bucket, granted once.
    async fn lease(&self, expires_at: i64) -> Result<i64, StoreError> {
        let bucket = self.lease_bucket_ms;
        let end = (expires_at.max(0) / bucket + 1) * bucket;
        let mut leases = self.leases.lock().await;
        let now = self.clock.wall();
        // Buckets that have ended are gone from etcd too.
        leases.retain(|&bucket_end, _| bucket_end > now);
        if let Some(&id) = leases.get(&end) {
            return Ok(id);
        }
        let ttl = ((end - now).max(1000) + 999) / 1000;
        let granted = self
            .client
            .lease_client()
            .grant(ttl, None)
            .await
            .map_err(unavailable)?;
        leases.insert(end, granted.id());
        Ok(granted.id())
    }

    async fn forget_leases(&self) {
        self.leases.lock().await.clear();
    }

    /// One attempt at an update: read, merge, write if nothing changed meanwhile.
    async fn try_update(&self, update: &Update) -> Result<bool, StoreError> {
        let (cluster, affiliate) = (&update.cluster_id, &update.affiliate_id);
        let data_key = self.keys.data(cluster, affiliate);
        let endpoints_prefix = self.keys.endpoints(cluster, affiliate);
        let data_prefix = self.keys.data_prefix(cluster);
        let read = Txn::new().and_then([
            TxnOp::get(data_key.clone(), None),
            TxnOp::get(
                endpoints_prefix.clone(),
                Some(GetOptions::new().with_prefix()),
            ),
            TxnOp::get(
                data_prefix.clone(),
                Some(GetOptions::new().with_prefix().with_count_only()),
            ),
        ]);
        let response = self
            .client
            .kv_client()
            .txn(read)
            .await
            .map_err(unavailable)?;
        let revision = response.header().map_or(0, |h| h.revision());
        let mut gets = response
            .op_responses()
            .into_iter()
            .filter_map(|op| match op {
                etcd_client::TxnOpResponse::Get(get) => Some(get),
                _ => None,
            });
        let (Some(data), Some(endpoints), Some(count)) = (gets.next(), gets.next(), gets.next())
        else {
            return Err(StoreError::Unavailable(
                "etcd answered a read with fewer results than asked; retry".into(),
            ));
        };
        // Arrival ranks of the stored endpoints, kept when they are written again.
        let ranks: HashMap<Bytes, i64> = endpoints
            .kvs()
            .iter()
            .filter_map(|kv| match self.keys.parse(kv.key()) {
                Some(Key::Endpoint { endpoint, .. }) => Some((endpoint, parse_rank(kv.value()))),
                _ => None,
            })
            .collect();
        // The affiliate as stored, in a scratch store that applies the embedded rules.
        let mut scratch = Store::new(self.limits.clone());
        let existing = data.kvs().first().and_then(|kv| {
            let (expires_at, data) = parse_expiry(kv.value())?;
            let mut stored: Vec<(i64, StoredEndpoint)> = endpoints
                .kvs()
                .iter()
                .filter_map(|kv| {
                    let Some(Key::Endpoint { endpoint, .. }) = self.keys.parse(kv.key()) else {
                        return None;
                    };
                    let (expires_at, _) = parse_expiry(kv.value())?;
                    Some((
                        parse_rank(kv.value()),
                        StoredEndpoint {
                            data: endpoint,
                            expires_at,
                        },
                    ))
                })
                .collect();
            stored.sort_by_key(|(rank, _)| *rank);
            Some(StoredAffiliate {
                data: Bytes::copy_from_slice(data),
                expires_at,
                endpoints: stored.into_iter().map(|(_, e)| e).collect(),
            })
        });
        let creating = existing.is_none();
        let mut near_full = false;
        if creating {
            let affiliates = usize::try_from(count.count()).unwrap_or(usize::MAX);
            near_full = affiliates + CREATE_MARGIN >= self.limits.max_affiliates_per_cluster;
            if affiliates >= self.limits.max_affiliates_per_cluster {
                return Err(StoreError::ResourceExhausted(format!(
                    "cluster has {affiliates} affiliates, the limit is {}",
                    self.limits.max_affiliates_per_cluster
                )));
            }
        } else if let Some(existing) = existing {
            scratch.restore_cluster(
                cluster.clone(),
                BTreeMap::from([(affiliate.clone(), existing)]),
            );
        }
        let now = self.clock.wall();
        scratch.update(update.clone(), now)?;
        let Some(merged) = scratch.cluster(cluster).and_then(|c| c.get(affiliate)) else {
            return Ok(true);
        };
        // Write what the update touched: the data key (its expiry moves with every update) and
        // the endpoints it named.
        let mut ops = vec![TxnOp::put(
            data_key.clone(),
            data_value(merged.expires_at, &merged.data),
            Some(etcd_client::PutOptions::new().with_lease(self.lease(merged.expires_at).await?)),
        )];
        for (position, endpoint) in merged.endpoints.iter().enumerate() {
            if !update.endpoints.contains(&endpoint.data) {
                continue;
            }
            // New endpoints rank after every stored one, in the update's order.
            let rank = ranks
                .get(&endpoint.data)
                .copied()
                .unwrap_or(now.saturating_mul(128).saturating_add(position as i64));
            ops.push(TxnOp::put(
                self.keys.endpoint(cluster, affiliate, &endpoint.data),
                endpoint_value(endpoint.expires_at, rank),
                Some(
                    etcd_client::PutOptions::new()
                        .with_lease(self.lease(endpoint.expires_at).await?),
                ),
            ));
        }
        // The data key exactly as read: the same revision if it existed (a delete or expiry in
        // between fails the write, which is retried as a creation), absent if it did not.
        let data_compare = match data.kvs().first() {
            Some(kv) => Compare::mod_revision(data_key, CompareOp::Equal, kv.mod_revision()),
            None => Compare::version(data_key, CompareOp::Equal, 0),
        };
        let mut compares = vec![
            data_compare,
            Compare::mod_revision(endpoints_prefix.clone(), CompareOp::Less, revision + 1)
                .with_range(prefix_end(&endpoints_prefix)),
        ];
        // Near the limit, no other affiliate may have been created since the read: the limit is
        // then exact. Far from it, creations do not check each other, so the nodes of a
        // cluster booting together do not serialize.
        if creating && near_full {
            compares.push(
                Compare::create_revision(data_prefix.clone(), CompareOp::Less, revision + 1)
                    .with_range(prefix_end(&data_prefix)),
            );
        }
        let write = Txn::new().when(compares).and_then(ops);
        match self.client.kv_client().txn(write).await {
            Ok(response) => Ok(response.succeeded()),
            Err(e) if e.to_string().contains("requested lease not found") => {
                // A lease this replica cached expired or was revoked: get fresh ones.
                self.forget_leases().await;
                Ok(false)
            }
            Err(e) => Err(unavailable(e)),
        }
    }
}

impl Drop for EtcdBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Backend for EtcdBackend {
    fn limits(&self) -> &Limits {
        &self.limits
    }

    async fn update(&self, update: Update) -> Result<(), StoreError> {
        self.limits.check_update(&update)?;
        for attempt in 0..TXN_ATTEMPTS {
            if self.try_update(&update).await? {
                return Ok(());
            }
            // Lost a race with another writer of the same affiliate or cluster: read again,
            // after a jittered pause that grows to 50 ms.
            let most = (2 + attempt as u64 * 4).min(50);
            tokio::time::sleep(Duration::from_millis(rand::random_range(1..=most))).await;
        }
        Err(StoreError::Unavailable(
            "the affiliate (or, near the cluster's limit, the cluster's membership) kept changing under this update; retry".into(),
        ))
    }

    async fn delete(&self, cluster_id: &str, affiliate_id: &str) -> Result<(), StoreError> {
        self.limits.check_cluster_id(cluster_id)?;
        self.limits.check_affiliate_id(affiliate_id)?;
        let endpoints = self.keys.endpoints(cluster_id, affiliate_id);
        let txn = Txn::new().and_then([
            TxnOp::delete(self.keys.data(cluster_id, affiliate_id), None),
            TxnOp::delete(
                endpoints,
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            ),
        ]);
        self.client
            .kv_client()
            .txn(txn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn list(&self, cluster_id: &str) -> Result<Arc<Encoded>, StoreError> {
        self.limits.check_cluster_id(cluster_id)?;
        self.fanout.list(cluster_id)
    }

    async fn watch(&self, cluster_id: &str) -> Result<WatchSubscription, StoreError> {
        self.limits.check_cluster_id(cluster_id)?;
        self.fanout.watch(cluster_id)
    }

    fn totals(&self) -> (Totals, usize) {
        self.fanout.totals()
    }

    fn superseded_bytes(&self) -> usize {
        self.fanout.superseded_bytes()
    }

    fn inspect(&self, cluster_id: &str) -> Vec<AffiliateSummary> {
        // The mirror's expiries are wall-clock times already.
        let wall = self.clock.wall();
        self.fanout.inspect(cluster_id, wall, wall)
    }

    fn close_watchers(&self) {
        self.fanout.close_watchers();
    }

    fn ready(&self) -> bool {
        self.in_sync()
    }

    fn collect_garbage(&self) -> (usize, usize) {
        // etcd deletes a record when its lease bucket ends, which can be a bucket late, and much
        // later after a leader election (etcd re-grants leases their full TTL). The mirror does
        // not wait: records past the expiry their writer stored are dropped and tombstoned here
        // (etcd's own delete then finds nothing left; a refresh that arrives later re-creates).
        self.fanout.collect_garbage(self.clock.wall())
    }
}

/// The whole state under the prefix, as clusters of affiliates, and the revision it was read at.
async fn read_all(
    client: &Client,
    keys: &Keys,
) -> Result<(HashMap<String, BTreeMap<String, StoredAffiliate>>, i64), etcd_client::Error> {
    // In pages, all at the revision of the first, so a large state is listed whole.
    let mut kv = client
        .kv_client()
        .max_decoding_message_size(MAX_ETCD_MESSAGE);
    let end = prefix_end(&keys.prefix);
    let mut from = keys.prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut kvs = Vec::new();
    loop {
        let mut options = GetOptions::new()
            .with_range(end.clone())
            .with_limit(LIST_PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let mut response = kv.get(from.clone(), Some(options)).await?;
        if revision == 0 {
            revision = response.header().map_or(0, |h| h.revision());
        }
        let more = response.more();
        let page = response.take_kvs();
        let Some(last) = page.last() else { break };
        from = last.key().to_vec();
        from.push(0);
        kvs.extend(page);
        if !more {
            break;
        }
    }
    let mut clusters: HashMap<String, BTreeMap<String, StoredAffiliate>> = HashMap::new();
    let mut endpoints = Vec::new();
    for kv in &kvs {
        match keys.parse(kv.key()) {
            Some(Key::Data { cluster, affiliate }) => {
                if let Some((expires_at, data)) = parse_expiry(kv.value()) {
                    clusters.entry(cluster).or_default().insert(
                        affiliate,
                        StoredAffiliate {
                            data: Bytes::copy_from_slice(data),
                            endpoints: Vec::new(),
                            expires_at,
                        },
                    );
                }
            }
            Some(Key::Endpoint {
                cluster,
                affiliate,
                endpoint,
            }) => {
                if let Some((expires_at, _)) = parse_expiry(kv.value()) {
                    endpoints.push((
                        parse_rank(kv.value()),
                        cluster,
                        affiliate,
                        endpoint,
                        expires_at,
                    ));
                }
            }
            None => {}
        }
    }
    // Arrival order, as the affiliate's writers saw it.
    endpoints.sort_by_key(|(rank, ..)| *rank);
    for (_, cluster, affiliate, endpoint, expires_at) in endpoints {
        if let Some(stored) = clusters
            .get_mut(&cluster)
            .and_then(|c| c.get_mut(&affiliate))
            && !stored.endpoints.iter().any(|e| e.data == endpoint)
        {
            stored.endpoints.push(StoredEndpoint {
                data: endpoint,
                expires_at,
            });
        }
    }
    Ok((clusters, revision))
}

/// Fills an empty mirror from etcd; returns the revision read.
async fn load(client: &Client, keys: &Keys, fanout: &Fanout) -> Result<i64, etcd_client::Error> {
    let (clusters, revision) = read_all(client, keys).await?;
    let mut mirror = fanout.lock();
    for (id, affiliates) in clusters {
        mirror.store.restore_cluster(id, affiliates);
    }
    Ok(revision)
}

/// Re-lists after the watch was lost and brings the mirror to etcd's state, telling watchers
/// about every difference (upserts and tombstones). Returns the revision read and the number of
/// changes.
async fn resync(
    client: &Client,
    keys: &Keys,
    fanout: &Fanout,
) -> Result<(i64, usize), etcd_client::Error> {
    let (clusters, revision) = read_all(client, keys).await?;
    let mut guard = fanout.lock();
    let mirror: &mut Mirror = &mut guard;
    let mut changes = Vec::new();
    let known: Vec<(String, Vec<String>)> = mirror
        .store
        .clusters()
        .map(|(id, c)| (id.clone(), c.keys().cloned().collect()))
        .collect();
    for (cluster, affiliates) in &known {
        for affiliate in affiliates {
            let gone = clusters
                .get(cluster)
                .is_none_or(|c| !c.contains_key(affiliate));
            if gone && let Ok(Some(change)) = mirror.store.delete(cluster, affiliate) {
                changes.push(change);
            }
        }
    }
    for (cluster, affiliates) in clusters {
        for (affiliate, stored) in affiliates {
            if mirror.store.put_affiliate(&cluster, &affiliate, stored) {
                changes.push(Change::Upserted {
                    cluster_id: cluster.clone(),
                    affiliate_id: affiliate,
                });
            }
        }
    }
    let count = changes.len();
    for change in changes {
        fanout.publish(mirror, change);
    }
    if count > 0 {
        tracing::info!(
            changes = count,
            revision,
            "caught up with etcd after the watch was lost"
        );
    }
    Ok((revision, count))
}

/// Applies one watch response (all events of one or more revisions) to the mirror and tells
/// watchers once per affiliate.
fn apply(fanout: &Fanout, keys: &Keys, events: &[etcd_client::Event]) {
    let mut guard = fanout.lock();
    let mirror: &mut Mirror = &mut guard;
    let mut touched: Vec<(String, String)> = Vec::new();
    let mut removed: Vec<(String, String)> = Vec::new();
    for event in events {
        let Some(kv) = event.kv() else { continue };
        let Some(key) = keys.parse(kv.key()) else {
            continue;
        };
        match (event.event_type(), key) {
            (EventType::Put, Key::Data { cluster, affiliate }) => {
                let Some((expires_at, data)) = parse_expiry(kv.value()) else {
                    continue;
                };
                let visible = mirror.store.put_data(
                    &cluster,
                    &affiliate,
                    Bytes::copy_from_slice(data),
                    expires_at,
                );
                removed.retain(|r| *r != (cluster.clone(), affiliate.clone()));
                // A refresh only moves the expiry: no news for watchers.
                if visible {
                    touched.push((cluster, affiliate));
                }
            }
            (
                EventType::Put,
                Key::Endpoint {
                    cluster,
                    affiliate,
                    endpoint,
                },
            ) => {
                let Some((expires_at, _)) = parse_expiry(kv.value()) else {
                    continue;
                };
                if mirror
                    .store
                    .put_endpoint(&cluster, &affiliate, endpoint, expires_at)
                {
                    touched.push((cluster, affiliate));
                }
            }
            (EventType::Delete, Key::Data { cluster, affiliate }) => {
                if let Ok(Some(_)) = mirror.store.delete(&cluster, &affiliate) {
                    touched.retain(|t| *t != (cluster.clone(), affiliate.clone()));
                    removed.push((cluster, affiliate));
                }
            }
            (
                EventType::Delete,
                Key::Endpoint {
                    cluster,
                    affiliate,
                    endpoint,
                },
            ) => {
                if mirror
                    .store
                    .remove_endpoint(&cluster, &affiliate, &endpoint)
                {
                    touched.push((cluster, affiliate));
                }
            }
        }
    }
    touched.sort();
    touched.dedup();
    for (cluster_id, affiliate_id) in touched {
        fanout.publish(
            mirror,
            Change::Upserted {
                cluster_id,
                affiliate_id,
            },
        );
    }
    for (cluster_id, affiliate_id) in removed {
        fanout.publish(
            mirror,
            Change::Removed {
                cluster_id,
                affiliate_id,
            },
        );
    }
}

/// Follows etcd from `revision` until stopped: watch, and re-list whenever the watch is lost.
async fn follow(
    client: Client,
    keys: Keys,
    fanout: Arc<Fanout>,
    mut revision: i64,
    in_sync: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let mut retry = Duration::from_millis(100);
    // A broken stream resumes from the next revision (no event lost, none twice); only when etcd
    // no longer has that history (compaction) is the state listed again.
    let mut relist = false;
    loop {
        if relist {
            in_sync.store(false, Ordering::SeqCst);
            match tokio::select! {
                _ = stop.cancelled() => return,
                r = resync(&client, &keys, &fanout) => r,
            } {
                Ok((listed, _)) => {
                    revision = listed;
                    relist = false;
                    retry = Duration::from_millis(100);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot re-list the state from etcd; trying again");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1)
            .with_progress_notify();
        let mut watch_client = client
            .watch_client()
            .max_decoding_message_size(MAX_ETCD_MESSAGE);
        let (mut requests, mut stream) =
            match watch_client.watch(keys.prefix.clone(), Some(options)).await {
                Ok(stream) => stream.split(),
                Err(e) => {
                    in_sync.store(false, Ordering::SeqCst);
                    tracing::warn!(error = %e, revision, "cannot watch etcd; trying again");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
        // A watch that goes quiet may be stalled (etcd's own progress notifications come every
        // ten minutes): ask for progress now and then, and treat silence as a broken stream.
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        progress.tick().await;
        let mut heard = tokio::time::Instant::now();
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => return,
                message = stream.message() => message,
                _ = progress.tick() => {
                    if heard.elapsed() > PROGRESS_EVERY * 3 {
                        tracing::warn!(revision, silent_for = ?heard.elapsed(), "the etcd watch answers nothing; resuming");
                        break;
                    }
                    let _ = requests.request_progress().await;
                    continue;
                }
            };
            heard = tokio::time::Instant::now();
            match message {
                Ok(Some(response)) => {
                    if response.compact_revision() > 0 {
                        tracing::warn!(
                            compact_revision = response.compact_revision(),
                            revision,
                            "etcd compacted the history this replica needs; re-listing"
                        );
                        relist = true;
                        break;
                    }
                    if response.canceled() {
                        tracing::warn!(
                            reason = response.cancel_reason(),
                            "the etcd watch was cancelled; watching again"
                        );
                        break;
                    }
                    if response.created() {
                        in_sync.store(true, Ordering::SeqCst);
                        retry = Duration::from_millis(100);
                    }
                    // Only events move the resume point: a progress notification's revision can
                    // run ahead of events still on their way in etcd before 3.4.25 / 3.5.8.
                    let events = response.events();
                    if !events.is_empty() {
                        apply(&fanout, &keys, events);
                        let last = events
                            .iter()
                            .filter_map(|e| e.kv().map(|kv| kv.mod_revision()))
                            .max()
                            .unwrap_or(revision);
                        revision = revision.max(last);
                    }
                }
                Ok(None) => {
                    tracing::warn!(revision, "the etcd watch ended; resuming");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, revision, "the etcd watch failed; resuming");
                    break;
                }
            }
        }
        in_sync.store(false, Ordering::SeqCst);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_never_prefix_each_other() {
        let keys = Keys {
            prefix: "/p/".into(),
        };
        let data = keys.data("cl/us", "ab");
        assert_eq!(
            keys.parse(data.as_bytes()),
            Some(Key::Data {
                cluster: "cl/us".into(),
                affiliate: "ab".into()
            })
        );
        let endpoint = keys.endpoint("cl/us", "ab", &[1, 2, 255]);
        assert_eq!(
            keys.parse(endpoint.as_bytes()),
            Some(Key::Endpoint {
                cluster: "cl/us".into(),
                affiliate: "ab".into(),
                endpoint: Bytes::from_static(&[1, 2, 255]),
            })
        );
        // "ab"'s endpoint range does not hold "abc"'s endpoints.
        let range = keys.endpoints("cl/us", "ab");
        assert!(!keys.endpoint("cl/us", "abc", b"x").starts_with(&range));
        assert_eq!(keys.parse(b"/p/c/zz/d/00"), None);
        // One spelling per id: no uppercase, no signs, no odd lengths.
        assert_eq!(keys.parse(b"/p/c/0F/d/00"), None);
        assert_eq!(keys.parse(b"/p/c/+f/d/00"), None);
        assert_eq!(keys.parse(b"/p/c/0/d/00"), None);
        assert_eq!(keys.parse(b"/other/c/00/d/00"), None);
        assert_eq!(prefix_end("/p/"), b"/p0".to_vec());
    }

    #[test]
    fn values_carry_the_expiry() {
        let value = data_value(1_234, b"data");
        assert_eq!(parse_expiry(&value), Some((1_234, &b"data"[..])));
        assert_eq!(parse_expiry(b"short"), None);
    }
}
