//! The storage seam: what the gRPC layer needs from a store, and the embedded in-memory backend.
//!
//! Watch fan-out is done here once per change, not once per watcher: a change is encoded as a
//! complete gRPC message frame a single time, and every watcher's stream gets a reference to the
//! same bytes. A cluster's snapshot is likewise encoded once per version and shared by every
//! watcher that subscribes while it is current, so a thousand nodes reconnecting at once cost one
//! encoding and one copy of the cluster, not a thousand.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use openspan_proto::discovery::server::{Affiliate, WatchResponse};
use prost::Message;
use tokio::sync::broadcast;

use crate::clock::{Clock, MonoMillis, UnixMillis};
use crate::limits::{Limits, StoreError, Update};
use crate::store::{Change, Store, StoredAffiliate, Totals};

/// A new Watch: the cluster's current state and every change after it, as gRPC frames.
pub struct WatchSubscription {
    /// The first message (the snapshot), framed for the wire.
    pub snapshot: Bytes,
    /// Each later message, framed for the wire. Lagging past the buffer means the watcher must
    /// be dropped and re-synced.
    pub changes: broadcast::Receiver<Bytes>,
}

/// One affiliate as the inspect page shows it: sizes and times, never the encrypted bytes.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AffiliateSummary {
    pub id: String,
    pub data_bytes: usize,
    pub endpoints: usize,
    pub expires_at_unix_ms: UnixMillis,
}

/// What a storage backend provides to the gRPC layer.
pub trait Backend: Send + Sync + 'static {
    fn limits(&self) -> &Limits;
    fn update(&self, update: Update) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn delete(
        &self,
        cluster_id: &str,
        affiliate_id: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn list(
        &self,
        cluster_id: &str,
    ) -> impl Future<Output = Result<Vec<Affiliate>, StoreError>> + Send;
    fn watch(
        &self,
        cluster_id: &str,
    ) -> impl Future<Output = Result<WatchSubscription, StoreError>> + Send;
    /// Totals over every cluster, and the number of open watch streams.
    fn totals(&self) -> (Totals, usize);
    /// The affiliates of one cluster, for the inspect page.
    fn inspect(&self, cluster_id: &str) -> Vec<AffiliateSummary>;
    /// Ends every watch stream (shutdown).
    fn close_watchers(&self);
}

/// Frames an encoded protobuf message as one gRPC length-prefixed message (uncompressed).
pub fn grpc_frame(message: &impl Message) -> Bytes {
    let len = message.encoded_len();
    let mut frame = Vec::with_capacity(5 + len);
    frame.push(0);
    frame.extend_from_slice(&(len as u32).to_be_bytes());
    message.encode_raw(&mut frame);
    Bytes::from(frame)
}

pub fn wire_affiliate(id: &str, stored: &StoredAffiliate) -> Affiliate {
    Affiliate {
        id: id.to_owned(),
        data: stored.data.clone(),
        endpoints: stored.endpoints.iter().map(|e| e.data.clone()).collect(),
    }
}

struct Hub {
    changes: broadcast::Sender<Bytes>,
    /// The framed snapshot of the current version, built on first demand after a change.
    snapshot: Option<Bytes>,
}

struct State {
    store: Store,
    hubs: HashMap<String, Hub>,
    closed: bool,
}

/// The embedded default: all state in memory, snapshots to a file (see `persist`).
pub struct MemoryBackend {
    state: Mutex<State>,
    clock: Arc<dyn Clock>,
    limits: Limits,
    watch_buffer: usize,
}

impl MemoryBackend {
    /// `watch_buffer` is how many messages a watcher may fall behind before it is dropped.
    pub fn new(store: Store, clock: Arc<dyn Clock>, watch_buffer: usize) -> Self {
        Self {
            limits: store.limits().clone(),
            state: Mutex::new(State {
                store,
                hubs: HashMap::new(),
                closed: false,
            }),
            clock,
            watch_buffer: watch_buffer.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent after every operation, so a panic elsewhere cannot poison it
        // in a way that matters; keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The store's time: monotonic, so a stepped wall clock moves no expiry.
    pub fn now(&self) -> MonoMillis {
        self.clock.monotonic()
    }

    /// Removes what expired and tells watchers. Returns (affiliates removed, affiliates that lost endpoints).
    pub fn collect_garbage(&self) -> (usize, usize) {
        let now = self.now();
        let mut state = self.lock();
        let changes = state.store.collect_garbage(now);
        let removed = changes
            .iter()
            .filter(|c| matches!(c, Change::Removed { .. }))
            .count();
        let trimmed = changes.len() - removed;
        for change in changes {
            state.publish(change);
        }
        // A cluster exists while it has affiliates or watchers.
        state.hubs.retain(|_, hub| hub.changes.receiver_count() > 0);
        (removed, trimmed)
    }

    /// A snapshot file of the whole store. The lock is held for one cluster at a time (a
    /// consistent copy of that cluster), never for the whole store, so serving goes on.
    pub fn snapshot_file(&self) -> Vec<u8> {
        let now = self.now();
        let ids: Vec<String> = self
            .lock()
            .store
            .clusters()
            .map(|(id, _)| id.clone())
            .collect();
        let mut builder = crate::persist::SnapshotBuilder::new(self.clock.wall());
        for id in ids {
            let cluster = {
                let state = self.lock();
                match state.store.cluster(&id) {
                    Some(affiliates) => {
                        crate::persist::SnapshotBuilder::cluster_state(&id, affiliates, now)
                    }
                    None => continue,
                }
            };
            builder.add(&cluster);
        }
        builder.finish()
    }
}

impl State {
    fn publish(&mut self, change: Change) {
        let Some(hub) = self.hubs.get_mut(change.cluster_id()) else {
            return;
        };
        hub.snapshot = None;
        let message = match &change {
            Change::Upserted {
                cluster_id,
                affiliate_id,
            } => match self
                .store
                .cluster(cluster_id)
                .and_then(|c| c.get(affiliate_id))
            {
                Some(affiliate) => WatchResponse {
                    affiliates: vec![wire_affiliate(affiliate_id, affiliate)],
                    deleted: false,
                },
                None => return,
            },
            Change::Removed { affiliate_id, .. } => WatchResponse {
                affiliates: vec![Affiliate {
                    id: affiliate_id.clone(),
                    ..Affiliate::default()
                }],
                deleted: true,
            },
        };
        // No receivers is fine: the hub is dropped at the next collection.
        let _ = hub.changes.send(grpc_frame(&message));
    }
}

impl Backend for MemoryBackend {
    fn limits(&self) -> &Limits {
        &self.limits
    }

    async fn update(&self, update: Update) -> Result<(), StoreError> {
        let now = self.now();
        let mut state = self.lock();
        if let Some(change) = state.store.update(update, now)? {
            state.publish(change);
        }
        Ok(())
    }

    async fn delete(&self, cluster_id: &str, affiliate_id: &str) -> Result<(), StoreError> {
        let mut state = self.lock();
        if let Some(change) = state.store.delete(cluster_id, affiliate_id)? {
            state.publish(change);
        }
        Ok(())
    }

    async fn list(&self, cluster_id: &str) -> Result<Vec<Affiliate>, StoreError> {
        let state = self.lock();
        state.store.limits().check_cluster_id(cluster_id)?;
        Ok(state
            .store
            .cluster(cluster_id)
            .map(|c| c.iter().map(|(id, a)| wire_affiliate(id, a)).collect())
            .unwrap_or_default())
    }

    async fn watch(&self, cluster_id: &str) -> Result<WatchSubscription, StoreError> {
        self.limits.check_cluster_id(cluster_id)?;
        let mut guard = self.lock();
        let state = &mut *guard;
        if state.closed {
            return Err(StoreError::Unavailable(
                "the server is shutting down".into(),
            ));
        }
        let hub = state
            .hubs
            .entry(cluster_id.to_owned())
            .or_insert_with(|| Hub {
                changes: broadcast::channel(self.watch_buffer).0,
                snapshot: None,
            });
        // Subscribing and reading the snapshot under one lock: no change falls between them.
        let changes = hub.changes.subscribe();
        let snapshot = hub
            .snapshot
            .get_or_insert_with(|| {
                let affiliates = state
                    .store
                    .cluster(cluster_id)
                    .map(|c| c.iter().map(|(id, a)| wire_affiliate(id, a)).collect())
                    .unwrap_or_default();
                grpc_frame(&WatchResponse {
                    affiliates,
                    deleted: false,
                })
            })
            .clone();
        Ok(WatchSubscription { snapshot, changes })
    }

    fn totals(&self) -> (Totals, usize) {
        let state = self.lock();
        let watchers = state
            .hubs
            .values()
            .map(|h| h.changes.receiver_count())
            .sum();
        (state.store.totals(), watchers)
    }

    fn inspect(&self, cluster_id: &str) -> Vec<AffiliateSummary> {
        // Expiry is monotonic; people read wall-clock times.
        let (now, wall) = (self.now(), self.clock.wall());
        let state = self.lock();
        state
            .store
            .cluster(cluster_id)
            .map(|c| {
                c.iter()
                    .map(|(id, a)| AffiliateSummary {
                        id: id.clone(),
                        data_bytes: a.data.len(),
                        endpoints: a.endpoints.len(),
                        expires_at_unix_ms: wall.saturating_add(a.expires_at - now),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn close_watchers(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.hubs.clear();
    }
}
