//! The storage seam: what the gRPC layer needs from a store, and the embedded in-memory backend.
//! Watch fan-out, common to every backend, is in [`crate::fanout`].

use std::future::Future;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;

use crate::clock::{Clock, MonoMillis};
use crate::limits::{Limits, StoreError, Update};
use crate::store::{Store, Totals};

pub use crate::fanout::{
    AffiliateSummary, Encoded, Fanout, MAX_WATCH_MESSAGE, Progress, SNAPSHOT_PIECE, StallProbe,
    SupersededBytes, WatchItem, WatchLimits, WatchSubscription, grpc_frame, snapshot_messages,
    wire_affiliate,
};

/// What a storage backend provides to the gRPC layer.
pub trait Backend: Send + Sync + 'static {
    fn limits(&self) -> &Limits;
    fn update(&self, update: Update) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn delete(
        &self,
        cluster_id: &str,
        affiliate_id: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The List answer: one framed `ListResponse`, shared by every List of this version.
    fn list(
        &self,
        cluster_id: &str,
    ) -> impl Future<Output = Result<Arc<Encoded>, StoreError>> + Send;
    fn watch(
        &self,
        cluster_id: &str,
    ) -> impl Future<Output = Result<WatchSubscription, StoreError>> + Send;
    /// Totals over every cluster, and the number of open watch streams.
    fn totals(&self) -> (Totals, usize);
    /// Bytes of superseded encodings still held by streams (see [`Encoded`]).
    fn superseded_bytes(&self) -> usize;
    /// The affiliates of one cluster, for the inspect page.
    fn inspect(&self, cluster_id: &str) -> Vec<AffiliateSummary>;
    /// Ends every watch stream (shutdown).
    fn close_watchers(&self);
    /// Whether the backend can serve right now (readiness probe, gRPC health).
    fn ready(&self) -> bool {
        true
    }
    /// Removes what expired and tells watchers; returns (affiliates removed, affiliates that
    /// lost endpoints). Backends whose store expires records itself only tidy up here.
    fn collect_garbage(&self) -> (usize, usize);
    /// A snapshot file of the whole state, for backends that keep state only in memory.
    fn snapshot_file(&self) -> Option<Vec<u8>> {
        None
    }
}

/// The embedded default: all state in memory, snapshots to a file (see `persist`).
pub struct MemoryBackend {
    fanout: Fanout,
    clock: Arc<dyn Clock>,
    limits: Limits,
}

impl MemoryBackend {
    /// `watch` bounds how far a watcher may fall behind before it is aborted; each abort is
    /// counted in `aborted`.
    pub fn new(store: Store, clock: Arc<dyn Clock>, watch: WatchLimits, aborted: Counter) -> Self {
        Self {
            limits: store.limits().clone(),
            fanout: Fanout::new(store, watch, aborted),
            clock,
        }
    }

    /// The store's time: monotonic, so a stepped wall clock moves no expiry.
    pub fn now(&self) -> MonoMillis {
        self.clock.monotonic()
    }

    /// A snapshot file of the whole store. The lock is held for one cluster at a time (a
    /// consistent copy of that cluster), never for the whole store, so serving goes on.
    fn encode_snapshot(&self) -> Vec<u8> {
        let now = self.now();
        let ids: Vec<String> = self
            .fanout
            .lock()
            .store
            .clusters()
            .map(|(id, _)| id.clone())
            .collect();
        let mut builder = crate::persist::SnapshotBuilder::new(crate::persist::Moment {
            wall: self.clock.wall(),
            boot: self.clock.boot(),
        });
        for id in ids {
            let cluster = {
                let mirror = self.fanout.lock();
                match mirror.store.cluster(&id) {
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

impl Backend for MemoryBackend {
    fn limits(&self) -> &Limits {
        &self.limits
    }

    async fn update(&self, update: Update) -> Result<(), StoreError> {
        let now = self.now();
        let mut mirror = self.fanout.lock();
        if let Some(change) = mirror.store.update(update, now)? {
            self.fanout.publish(&mut mirror, change);
        }
        Ok(())
    }

    async fn delete(&self, cluster_id: &str, affiliate_id: &str) -> Result<(), StoreError> {
        let mut mirror = self.fanout.lock();
        if let Some(change) = mirror.store.delete(cluster_id, affiliate_id)? {
            self.fanout.publish(&mut mirror, change);
        }
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

    fn superseded_bytes(&self) -> usize {
        self.fanout.superseded_bytes()
    }

    fn totals(&self) -> (Totals, usize) {
        self.fanout.totals()
    }

    fn inspect(&self, cluster_id: &str) -> Vec<AffiliateSummary> {
        // Expiry is monotonic; people read wall-clock times.
        self.fanout
            .inspect(cluster_id, self.now(), self.clock.wall())
    }

    fn close_watchers(&self) {
        self.fanout.close_watchers();
    }

    fn collect_garbage(&self) -> (usize, usize) {
        // A cluster exists while it has affiliates or watchers.
        self.fanout.collect_garbage(self.now())
    }

    fn snapshot_file(&self) -> Option<Vec<u8>> {
        Some(self.encode_snapshot())
    }
}
