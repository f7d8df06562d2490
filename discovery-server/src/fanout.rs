//! Watch fan-out, shared by every backend.
//!
//! A change is encoded as a complete gRPC message frame a single time, and every watcher's
//! stream gets a reference to the same bytes. A cluster's snapshot (and its List answer) is
//! likewise encoded once per version and shared by every stream that sends it while it is
//! current, so a thousand nodes reconnecting at once cost one encoding and one copy of the
//! cluster, not a thousand.
//!
//! Memory is bounded per watcher by construction: each watcher has its own queue of shared
//! frames, and the bytes queued for it (shared bytes counted in full for every watcher that
//! holds them, since that is what it pins) count against a byte budget. The publisher, not the
//! watcher, checks the budget: a client that stops reading is never polled, so only the sender
//! can notice it. Over the budget or the message buffer the watcher is aborted at once and its
//! queue dropped, so nothing it pinned outlives the check.
//!
//! The fan-out knows nothing of where changes come from: the embedded backend applies updates
//! to the [`Mirror`]'s store itself; the etcd backend applies what its etcd watch reports.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use openspan_proto::discovery::server::{Affiliate, ListResponse, WatchResponse};
use prometheus_client::metrics::counter::Counter;
use prost::Message;

use crate::clock::{MonoMillis, UnixMillis};
use crate::limits::StoreError;
use crate::store::{Change, Store, StoredAffiliate, Totals};

/// The largest gRPC message a Watch stream sends. Default gRPC clients (Talos's included)
/// refuse messages over 4 MiB; a little is kept spare for framing.
pub const MAX_WATCH_MESSAGE: usize = (4 << 20) - (16 << 10);

/// Snapshot frames are cut into separately allocated pieces of at most this size. The HTTP/2
/// layer holds at most one piece per stream beyond the client's window, so a client that stops
/// reading pins one piece there, not the whole snapshot.
pub const SNAPSHOT_PIECE: usize = 64 << 10;

/// How far a watcher may fall behind before it is aborted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchLimits {
    /// Change messages queued and not yet taken by the stream (reference: 32).
    pub buffer: usize,
    /// Bytes queued for one watcher (snapshot pieces and changes), shared bytes counted in full.
    pub max_bytes: usize,
    /// Bytes of superseded encodings (snapshots and List answers of versions that have since
    /// changed) still held by streams that have not sent them. Over it, new Watch and List
    /// calls are refused until stalled clients are cut off (`--response-stall-timeout`).
    pub max_superseded_bytes: usize,
}

impl Default for WatchLimits {
    fn default() -> Self {
        Self {
            buffer: 32,
            max_bytes: 8 << 20,
            max_superseded_bytes: 64 << 20,
        }
    }
}

/// When a stream last had bytes ready that its client has not taken (`None`: nothing waiting).
/// The connection layer cuts off a connection whose stream waits longer than
/// `--response-stall-timeout`: HTTP/2 flow control lets a client stop reading without closing
/// anything, and whatever the stream holds would otherwise stay pinned.
pub trait Progress: Send + Sync {
    fn waiting_since(&self) -> Option<Instant>;
}

/// Set on a response whose body reports its [`Progress`] (found by the connection layer).
#[derive(Clone)]
pub struct StallProbe(pub Arc<dyn Progress>);

/// Bytes of superseded encodings still pinned by streams (see [`Encoded`]).
#[derive(Default)]
pub struct SupersededBytes(AtomicUsize);

impl SupersededBytes {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// One encoding of a cluster version, a Watch snapshot or a List answer, cut into pieces and
/// shared by every stream that sends it. While it is current the cluster's hub keeps it; once
/// the cluster changes, the streams that still hold it count its bytes as superseded until the
/// last of them lets go, so memory pinned by clients that stopped reading has a global bound.
pub struct Encoded {
    pieces: Box<[Bytes]>,
    bytes: usize,
    superseded: AtomicBool,
    account: Arc<SupersededBytes>,
}

impl Encoded {
    fn new(wire: &[u8], account: Arc<SupersededBytes>) -> Arc<Self> {
        Arc::new(Self {
            pieces: wire
                .chunks(SNAPSHOT_PIECE)
                .map(Bytes::copy_from_slice)
                .collect(),
            bytes: wire.len(),
            superseded: AtomicBool::new(false),
            account,
        })
    }

    pub fn pieces(&self) -> &[Bytes] {
        &self.pieces
    }

    pub fn len(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The cluster changed: if streams still hold this encoding, its bytes count as superseded
    /// until the last holder drops it.
    fn supersede(self: Arc<Self>) {
        // `self` is one reference, so `Drop` cannot run before the flag is set.
        if Arc::strong_count(&self) > 1 && !self.superseded.swap(true, Ordering::SeqCst) {
            self.account.0.fetch_add(self.bytes, Ordering::SeqCst);
        }
    }
}

impl Drop for Encoded {
    fn drop(&mut self) {
        if *self.superseded.get_mut() {
            self.account.0.fetch_sub(self.bytes, Ordering::SeqCst);
        }
    }
}

/// What a watch stream yields next.
#[derive(Debug)]
pub enum WatchItem {
    /// Wire bytes: a piece of the snapshot or one framed change.
    Data(Bytes),
    /// The watcher fell behind and was dropped; it must reconnect for a fresh snapshot.
    Aborted(String),
    /// The server is shutting down.
    Closed,
}

enum WatcherState {
    Open,
    Aborted(String),
    Closed,
}

struct WatcherQueue {
    frames: VecDeque<Bytes>,
    bytes: usize,
    changes: usize,
    /// The snapshot the queue's first frames come from, held until they are all taken.
    snapshot: Option<Arc<Encoded>>,
    /// Since when something (a frame, or the abort status) waits for the stream to take it.
    waiting_since: Option<Instant>,
    state: WatcherState,
    waker: Option<Waker>,
}

impl WatcherQueue {
    /// Drops everything queued and ends the stream with `state`.
    fn finish(&mut self, state: WatcherState) {
        self.frames = VecDeque::new();
        self.bytes = 0;
        self.changes = 0;
        self.snapshot = None;
        // An abort status still has to be sent; a closed stream has nothing left to send.
        self.waiting_since = match state {
            WatcherState::Aborted(_) => Some(Instant::now()),
            _ => None,
        };
        self.state = state;
    }
}

/// One watcher's queue, shared by the publisher (pushes) and the stream (pops).
struct Watcher {
    queue: Mutex<WatcherQueue>,
}

impl Watcher {
    fn lock(&self) -> MutexGuard<'_, WatcherQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_open(&self) -> bool {
        matches!(self.lock().state, WatcherState::Open)
    }

    /// Ends the watcher: drops what it pinned and wakes its stream.
    fn end(&self, state: WatcherState) {
        let waker = {
            let mut queue = self.lock();
            if !matches!(queue.state, WatcherState::Open) {
                return;
            }
            queue.finish(state);
            queue.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// A new Watch: the cluster's current state and every change after it, as gRPC frames.
/// Dropping it unsubscribes and frees its queue.
pub struct WatchSubscription {
    watcher: Arc<Watcher>,
}

impl WatchSubscription {
    /// The next piece of the stream, or `Pending` (waking `cx` when there is more).
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<WatchItem> {
        let mut queue = self.watcher.lock();
        if let Some(frame) = queue.frames.pop_front() {
            queue.bytes -= frame.len();
            // Snapshot pieces are queued before any change; once they are gone, every frame
            // left is one change message.
            if queue.frames.len() <= queue.changes {
                queue.changes = queue.frames.len();
                queue.snapshot = None;
            }
            queue.waiting_since = if queue.frames.is_empty() {
                None
            } else {
                Some(Instant::now())
            };
            return Poll::Ready(WatchItem::Data(frame));
        }
        if matches!(queue.state, WatcherState::Aborted(_) | WatcherState::Closed) {
            // The status is taken now.
            queue.waiting_since = None;
        }
        match &queue.state {
            WatcherState::Open => {
                if !queue
                    .waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    queue.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            WatcherState::Aborted(reason) => Poll::Ready(WatchItem::Aborted(reason.clone())),
            WatcherState::Closed => Poll::Ready(WatchItem::Closed),
        }
    }

    /// Bytes queued for this watcher (for tests and diagnostics).
    pub fn queued_bytes(&self) -> usize {
        self.watcher.lock().bytes
    }

    /// What the connection layer watches to cut off a client that stopped reading.
    pub fn probe(&self) -> StallProbe {
        StallProbe(self.watcher.clone())
    }
}

impl Progress for Watcher {
    fn waiting_since(&self) -> Option<Instant> {
        self.lock().waiting_since
    }
}

impl Drop for WatchSubscription {
    fn drop(&mut self) {
        self.watcher.end(WatcherState::Closed);
    }
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

/// The framed messages of a cluster snapshot: the first is the snapshot proper, the rest (only
/// for clusters over [`MAX_WATCH_MESSAGE`]) carry one affiliate each, like ordinary updates.
pub fn snapshot_messages(affiliates: Vec<Affiliate>) -> Vec<WatchResponse> {
    let mut messages = vec![WatchResponse {
        affiliates: Vec::new(),
        deleted: false,
    }];
    let mut first_len = 0;
    let mut overflow = false;
    for affiliate in affiliates {
        let len = prost::encoding::message::encoded_len(1, &affiliate);
        if !overflow && first_len + len <= MAX_WATCH_MESSAGE {
            first_len += len;
            messages[0].affiliates.push(affiliate);
        } else {
            overflow = true;
            messages.push(WatchResponse {
                affiliates: vec![affiliate],
                deleted: false,
            });
        }
    }
    messages
}

/// The wire bytes of a snapshot: its framed messages, one after the other.
fn snapshot_wire(affiliates: Vec<Affiliate>) -> Vec<u8> {
    let messages = snapshot_messages(affiliates);
    let mut wire = Vec::with_capacity(messages.iter().map(|m| 5 + m.encoded_len()).sum());
    for message in &messages {
        wire.push(0);
        wire.extend_from_slice(&(message.encoded_len() as u32).to_be_bytes());
        message.encode_raw(&mut wire);
    }
    wire
}

#[derive(Default)]
struct Hub {
    watchers: Vec<Arc<Watcher>>,
    /// The framed snapshot of the current version, built on first demand after a change.
    snapshot: Option<Arc<Encoded>>,
    /// The List answer of the current version (one message, however large), likewise.
    list: Option<Arc<Encoded>>,
}

impl Hub {
    /// The cluster changed: the cached encodings describe an old version.
    fn supersede(&mut self) {
        for encoded in [self.snapshot.take(), self.list.take()]
            .into_iter()
            .flatten()
        {
            encoded.supersede();
        }
    }
}

/// A replica's view of the store and its watchers: the in-memory store itself (embedded), or
/// the mirror of etcd that its watch keeps current.
pub struct Mirror {
    pub store: Store,
    hubs: HashMap<String, Hub>,
    closed: bool,
}

/// The fan-out of one replica: its [`Mirror`] under one lock, and the watch limits.
pub struct Fanout {
    mirror: Mutex<Mirror>,
    watch: WatchLimits,
    /// Counts watchers aborted for falling behind (`discovery_watch_aborted_total`).
    aborted: Counter,
    superseded: Arc<SupersededBytes>,
}

/// One affiliate as the inspect page shows it: sizes and times, never the encrypted bytes.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AffiliateSummary {
    pub id: String,
    pub data_bytes: usize,
    pub endpoints: usize,
    pub expires_at_unix_ms: UnixMillis,
}

impl Fanout {
    /// `watch` bounds how far a watcher may fall behind before it is aborted; each abort is
    /// counted in `aborted`.
    pub fn new(store: Store, watch: WatchLimits, aborted: Counter) -> Self {
        Self {
            mirror: Mutex::new(Mirror {
                store,
                hubs: HashMap::new(),
                closed: false,
            }),
            watch: WatchLimits {
                buffer: watch.buffer.max(1),
                ..watch
            },
            aborted,
            superseded: Arc::default(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Mirror> {
        // The state is consistent after every operation, so a panic elsewhere cannot poison it
        // in a way that matters; keep serving.
        self.mirror
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Tells the watchers of the change's cluster; `mirror` already holds the new state.
    pub fn publish(&self, mirror: &mut Mirror, change: Change) {
        mirror.publish(change, self.watch, &self.aborted);
    }

    /// Removes what expired by `now` (the store's time) and tells watchers, then drops the hubs
    /// of clusters nobody watches any more. Returns (affiliates removed, affiliates that lost
    /// endpoints).
    pub fn collect_garbage(&self, now: MonoMillis) -> (usize, usize) {
        let (removed, trimmed) = {
            let mut mirror = self.lock();
            let changes = mirror.store.collect_garbage(now);
            let removed = changes
                .iter()
                .filter(|c| matches!(c, Change::Removed { .. }))
                .count();
            let trimmed = changes.len() - removed;
            for change in changes {
                self.publish(&mut mirror, change);
            }
            (removed, trimmed)
        };
        self.prune_hubs();
        (removed, trimmed)
    }

    /// Drops the hubs of clusters nobody watches any more (and their cached encodings).
    pub fn prune_hubs(&self) {
        self.lock().hubs.retain(|_, hub| {
            hub.watchers.retain(|w| w.is_open());
            !hub.watchers.is_empty()
        });
    }

    /// Refuses a new Watch or List while superseded encodings over the budget are still held.
    fn check_superseded(&self) -> Result<(), StoreError> {
        let held = self.superseded.get();
        if held > self.watch.max_superseded_bytes {
            return Err(StoreError::ResourceExhausted(format!(
                "{held} bytes of superseded cluster snapshots are still held by clients that stopped reading (limit {}, --max-superseded-bytes); retry after --response-stall-timeout",
                self.watch.max_superseded_bytes
            )));
        }
        Ok(())
    }

    /// The encoded cluster state a Watch or List sends, built once per version.
    fn encoded(
        mirror: &mut Mirror,
        cluster_id: &str,
        list: bool,
        account: &Arc<SupersededBytes>,
    ) -> Arc<Encoded> {
        let store = &mirror.store;
        let hub = mirror.hubs.entry(cluster_id.to_owned()).or_default();
        let slot = if list {
            &mut hub.list
        } else {
            &mut hub.snapshot
        };
        slot.get_or_insert_with(|| {
            let affiliates: Vec<Affiliate> = store
                .cluster(cluster_id)
                .map(|c| c.iter().map(|(id, a)| wire_affiliate(id, a)).collect())
                .unwrap_or_default();
            let wire = if list {
                grpc_frame(&ListResponse { affiliates }).to_vec()
            } else {
                snapshot_wire(affiliates)
            };
            Encoded::new(&wire, account.clone())
        })
        .clone()
    }

    /// The List answer of a cluster (cluster id already validated).
    pub fn list(&self, cluster_id: &str) -> Result<Arc<Encoded>, StoreError> {
        self.check_superseded()?;
        let mut mirror = self.lock();
        if mirror.store.cluster(cluster_id).is_none() && !mirror.hubs.contains_key(cluster_id) {
            // Nothing to cache: no hub is made for a cluster nobody watches and nobody is in.
            return Ok(Encoded::new(
                &grpc_frame(&ListResponse::default()),
                self.superseded.clone(),
            ));
        }
        Ok(Self::encoded(
            &mut mirror,
            cluster_id,
            true,
            &self.superseded,
        ))
    }

    /// A new watcher of a cluster (cluster id already validated).
    pub fn watch(&self, cluster_id: &str) -> Result<WatchSubscription, StoreError> {
        self.check_superseded()?;
        let mut guard = self.lock();
        let mirror = &mut *guard;
        if mirror.closed {
            return Err(StoreError::Unavailable(
                "the server is shutting down".into(),
            ));
        }
        // Subscribing and reading the snapshot under one lock: no change falls between them.
        let snapshot = Self::encoded(mirror, cluster_id, false, &self.superseded);
        let bytes = snapshot.len();
        if bytes > self.watch.max_bytes {
            return Err(StoreError::ResourceExhausted(format!(
                "the cluster's snapshot is {bytes} bytes, over the per-watcher budget of {} bytes; the operator must raise --watch-max-bytes",
                self.watch.max_bytes
            )));
        }
        let hub = mirror.hubs.entry(cluster_id.to_owned()).or_default();
        // Closed watchers are pruned on every subscription too, so a cluster that is watched
        // and re-watched but never changes does not collect dead entries.
        hub.watchers.retain(|w| w.is_open());
        let watcher = Arc::new(Watcher {
            queue: Mutex::new(WatcherQueue {
                frames: snapshot.pieces().iter().cloned().collect(),
                bytes,
                changes: 0,
                waiting_since: Some(Instant::now()),
                snapshot: Some(snapshot),
                state: WatcherState::Open,
                waker: None,
            }),
        });
        hub.watchers.push(watcher.clone());
        Ok(WatchSubscription { watcher })
    }

    pub fn superseded_bytes(&self) -> usize {
        self.superseded.get()
    }

    /// Totals over every cluster, and the number of open watch streams.
    pub fn totals(&self) -> (Totals, usize) {
        let mirror = self.lock();
        let watchers = mirror
            .hubs
            .values()
            .map(|h| h.watchers.iter().filter(|w| w.is_open()).count())
            .sum();
        (mirror.store.totals(), watchers)
    }

    /// The affiliates of one cluster for the inspect page; expiries are turned into wall-clock
    /// times from `now` (the store's time) and `wall`.
    pub fn inspect(
        &self,
        cluster_id: &str,
        now: MonoMillis,
        wall: UnixMillis,
    ) -> Vec<AffiliateSummary> {
        let mirror = self.lock();
        mirror
            .store
            .cluster(cluster_id)
            .map(|c| {
                c.iter()
                    .map(|(id, a)| AffiliateSummary {
                        id: id.clone(),
                        data_bytes: a.data.len(),
                        endpoints: a.endpoints.len(),
                        expires_at_unix_ms: wall.saturating_add(a.expires_at.saturating_sub(now)),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Ends every watch stream (shutdown) and refuses new ones.
    pub fn close_watchers(&self) {
        let mut mirror = self.lock();
        mirror.closed = true;
        for (_, hub) in mirror.hubs.drain() {
            for watcher in hub.watchers {
                watcher.end(WatcherState::Closed);
            }
        }
    }
}

impl Mirror {
    fn publish(&mut self, change: Change, limits: WatchLimits, aborted: &Counter) {
        let Some(hub) = self.hubs.get_mut(change.cluster_id()) else {
            return;
        };
        hub.supersede();
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
        let frame = grpc_frame(&message);
        let now = Instant::now();
        let mut wake = Vec::new();
        hub.watchers.retain(|watcher| {
            let mut queue = watcher.lock();
            if !matches!(queue.state, WatcherState::Open) {
                return false;
            }
            if queue.changes + 1 > limits.buffer || queue.bytes + frame.len() > limits.max_bytes {
                let reason = format!(
                    "subscription canceled: the watcher fell behind ({} messages, {} bytes queued; limits {} and {}); reconnect to get a fresh snapshot",
                    queue.changes,
                    queue.bytes,
                    limits.buffer,
                    limits.max_bytes
                );
                queue.finish(WatcherState::Aborted(reason));
                aborted.inc();
                wake.extend(queue.waker.take());
                return false;
            }
            queue.frames.push_back(frame.clone());
            queue.bytes += frame.len();
            queue.changes += 1;
            queue.waiting_since.get_or_insert(now);
            wake.extend(queue.waker.take());
            true
        });
        for waker in wake {
            waker.wake();
        }
    }
}
