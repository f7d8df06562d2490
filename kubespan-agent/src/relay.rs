//! Relayed paths: WireGuard packets to and from peers that no direct path reaches, carried by
//! `openspan-relay` servers over QUIC and addressed by WireGuard public key.
//!
//! The agent stays connected to every configured relay and announces those that reach it, best
//! (lowest round trip) first. For a peer that announces a relay this node is connected to too,
//! the agent opens a UDP socket on loopback, a *proxy*: its address is the peer's relay
//! candidate endpoint. WireGuard (the kernel's or openspan's device) sends the peer's packets
//! there; the agent hands them to the best relay both nodes share. Packets the relays deliver
//! from the peer leave the proxy toward WireGuard's port, so WireGuard sees the peer at the
//! proxy. A relay that goes away changes nothing for WireGuard: the proxy's next packet takes
//! the next shared relay. The candidate is raced only after the direct ones failed
//! ([`crate::reconcile`]'s races rank it last), and the minute's path upgrade moves the peer off
//! the relay when a direct path appears.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use openspan_relay::client::{ClientOptions, RelayClient, RelayClientConfig};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::RelayConfig;
use crate::wg::{Key, RelayInjector, RelayLink};

/// Reconnection back-off bounds.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// A WireGuard packet never exceeds this (MTU 1420 + overhead, far below).
const MAX_PACKET: usize = 65_535;
/// A relay that stops answering (killed, unplugged) is given up after this, and its peers move
/// to the next shared relay: keepalives every 0.5 s make silence mean death quickly, for a few
/// dozen bytes per second per relay.
const RELAY_KEEPALIVE: Duration = Duration::from_millis(500);
const RELAY_DEAD_AFTER: Duration = Duration::from_secs(2);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Bytes carried through relays, for the metrics.
#[derive(Debug, Default)]
pub struct RelayCounters {
    pub tx_bytes: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub dropped: AtomicU64,
}

struct Slot {
    /// As configured (and announced).
    name: String,
    /// The connection, while connected (packets are sent on it from the proxies' tasks).
    client: Mutex<Option<RelayClient>>,
    rtt: Mutex<Option<Duration>>,
}

struct Proxy {
    socket: Arc<UdpSocket>,
    /// The relays the peer announces, best first.
    peer_relays: Mutex<Vec<String>>,
    /// The relay its last packet went through.
    via: Mutex<Option<String>>,
    /// Cancelled when the peer is gone: its task ends and the socket closes.
    closed: CancellationToken,
    /// Its address (the peer's relay candidate).
    address: SocketAddr,
    /// The relay connection packets go through, and when it was chosen.
    chosen: Mutex<Option<(String, RelayClient, tokio::time::Instant)>>,
}

impl Proxy {
    /// The relay connection to send on: the one chosen less than [`RECHOOSE`] ago if still
    /// open, else the best shared one now.
    fn client(&self, relays: &Relays, peer: &Key) -> Option<RelayClient> {
        let mut chosen = lock(&self.chosen);
        let stale = chosen
            .as_ref()
            .is_none_or(|(_, client, at)| client.is_closed() || at.elapsed() >= RECHOOSE);
        if stale {
            let wanted = lock(&self.peer_relays).clone();
            *chosen = relays
                .best_shared(&wanted)
                .map(|(name, client)| (name, client, tokio::time::Instant::now()));
            if let Some((name, _, _)) = chosen.as_ref() {
                let mut via = lock(&self.via);
                if via.as_deref() != Some(name.as_str()) {
                    tracing::info!(relay = %name, peer = %base64::engine::general_purpose::STANDARD.encode(peer), "relaying a peer's packets");
                    *via = Some(name.clone());
                }
            }
        }
        chosen.as_ref().map(|(_, client, _)| client.clone())
    }
}

/// The relay connections and the per-peer proxies.
pub struct Relays {
    slots: Vec<Arc<Slot>>,
    proxies: Mutex<HashMap<Key, Arc<Proxy>>>,
    /// Where WireGuard listens, for packets coming back from relays.
    wireguard: SocketAddr,
    counters: Arc<RelayCounters>,
    /// The connected relays, best first (announced in this node's record).
    connected_tx: watch::Sender<Vec<String>>,
    stop: CancellationToken,
    /// Proxy addresses → peers, for the device's relay link.
    by_address: Mutex<HashMap<SocketAddr, Key>>,
    /// Set when the WireGuard device takes relayed packets directly (openspan's userspace
    /// device): no loopback hop either way.
    direct: Mutex<Option<RelayInjector>>,
    /// The current peers (`None` until the data plane says): a relay delivering for any other
    /// key gets nothing from this node, not even a proxy.
    peers: Mutex<Option<std::collections::HashSet<Key>>>,
    /// This node's WireGuard public key, the one relays deliver to: a new one (a key rotation)
    /// makes every connection register again.
    public_key: watch::Sender<Key>,
}

impl Relays {
    /// Starts connecting to every configured relay; `public_key` is this node's, `token` the
    /// cluster's relay access token.
    pub fn start(
        config: &RelayConfig,
        cluster_id: &str,
        token: [u8; 32],
        public_key: Key,
        listen_port: u16,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let (connected_tx, _) = watch::channel(Vec::new());
        let relays = Arc::new(Self {
            slots: config
                .servers
                .iter()
                .map(|name| {
                    Arc::new(Slot {
                        name: name.clone(),
                        client: Mutex::new(None),
                        rtt: Mutex::new(None),
                    })
                })
                .collect(),
            proxies: Mutex::new(HashMap::new()),
            wireguard: SocketAddr::from((Ipv4Addr::LOCALHOST, listen_port)),
            counters: Arc::new(RelayCounters::default()),
            connected_tx,
            stop,
            by_address: Mutex::new(HashMap::new()),
            direct: Mutex::new(None),
            peers: Mutex::new(None),
            public_key: watch::Sender::new(public_key),
        });
        for slot in &relays.slots {
            let client_config = RelayClientConfig {
                address: slot.name.clone(),
                server_name: config.server_name.clone(),
                ca_file: config.ca_file.clone(),
                cluster_id: cluster_id.to_owned(),
                token,
                public_key,
            };
            tokio::spawn(connection(relays.clone(), slot.clone(), client_config));
        }
        relays
    }

    /// Registers this node under a new WireGuard public key (after a key rotation): each relay
    /// connection is made again with it.
    pub fn set_public_key(&self, public_key: Key) {
        self.public_key.send_if_modified(|current| {
            let changed = *current != public_key;
            *current = public_key;
            changed
        });
    }

    /// The device sends relayed peers' packets through [`RelayLink`] and takes theirs through
    /// `injector`, instead of the loopback sockets.
    pub fn attach_device(&self, injector: RelayInjector) {
        *lock(&self.direct) = Some(injector);
    }

    pub fn counters(&self) -> Arc<RelayCounters> {
        self.counters.clone()
    }

    /// The connected relays, best first, as they change.
    pub fn connected(&self) -> watch::Receiver<Vec<String>> {
        self.connected_tx.subscribe()
    }

    fn announce(&self) {
        // Round trips in 5 ms steps, then names: relays about as near do not swap places (and
        // make every node publish its record again) on every measurement.
        let mut up: Vec<(u128, String)> = self
            .slots
            .iter()
            .filter(|slot| lock(&slot.client).is_some())
            .map(|slot| {
                let rtt = lock(&slot.rtt).unwrap_or(Duration::MAX);
                (rtt.as_millis() / 5, slot.name.clone())
            })
            .collect();
        up.sort();
        let names: Vec<String> = up.into_iter().map(|(_, name)| name).collect();
        self.connected_tx.send_if_modified(|current| {
            let changed = *current != names;
            *current = names;
            changed
        });
    }

    /// The best connected relay among `wanted` (a peer's, best first by its measure; ours
    /// decides).
    fn best_shared(&self, wanted: &[String]) -> Option<(String, RelayClient)> {
        let mut best: Option<(Duration, String, RelayClient)> = None;
        for slot in &self.slots {
            if !wanted.contains(&slot.name) {
                continue;
            }
            let Some(sender) = lock(&slot.client).clone() else {
                continue;
            };
            let rtt = lock(&slot.rtt).unwrap_or(Duration::MAX);
            if best.as_ref().is_none_or(|(b, _, _)| rtt < *b) {
                best = Some((rtt, slot.name.clone(), sender));
            }
        }
        best.map(|(_, name, sender)| (name, sender))
    }

    /// The peer's relay candidate: the local address of its proxy, when a relay this node is
    /// connected to reaches the peer.
    pub async fn endpoint_for(
        self: &Arc<Self>,
        peer: Key,
        peer_relays: &[String],
    ) -> Option<SocketAddr> {
        self.best_shared(peer_relays)?;
        let proxy = self.proxy(peer).await?;
        *lock(&proxy.peer_relays) = peer_relays.to_vec();
        proxy.socket.local_addr().ok()
    }

    /// Which relay carries the peer whose WireGuard endpoint is `endpoint`, if it is a proxy.
    pub fn relayed_via(&self, peer: &Key, endpoint: Option<SocketAddr>) -> Option<String> {
        let proxies = lock(&self.proxies);
        let proxy = proxies.get(peer)?;
        let local = proxy.socket.local_addr().ok()?;
        if endpoint? != local {
            return None;
        }
        let via = lock(&proxy.via).clone();
        via.or_else(|| lock(&proxy.peer_relays).first().cloned())
    }

    /// Sets who the peers are (packets relays deliver from anyone else are dropped) and closes
    /// the proxies of peers that are gone.
    pub fn set_peers(&self, peers: std::collections::HashSet<Key>) {
        self.retain_peers(|key| peers.contains(key));
        *lock(&self.peers) = Some(peers);
    }

    /// Closes the proxies of peers that are gone.
    fn retain_peers(&self, keep: impl Fn(&Key) -> bool) {
        // Lock order everywhere: `proxies`, then `by_address` (never the other way round).
        let mut proxies = lock(&self.proxies);
        let mut gone = Vec::new();
        proxies.retain(|key, proxy| {
            let kept = keep(key);
            if !kept {
                proxy.closed.cancel();
                gone.push(proxy.address);
            }
            kept
        });
        drop(proxies);
        let mut by_address = lock(&self.by_address);
        for address in gone {
            by_address.remove(&address);
        }
    }

    async fn proxy(self: &Arc<Self>, peer: Key) -> Option<Arc<Proxy>> {
        if let Some(proxy) = lock(&self.proxies).get(&peer) {
            return Some(proxy.clone());
        }
        let socket = match UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await {
            Ok(socket) => Arc::new(socket),
            Err(e) => {
                tracing::warn!(error = %e, "cannot open a loopback socket for a relayed peer");
                return None;
            }
        };
        let Ok(address) = socket.local_addr() else {
            return None;
        };
        let proxy = Arc::new(Proxy {
            socket,
            peer_relays: Mutex::new(Vec::new()),
            via: Mutex::new(None),
            closed: self.stop.child_token(),
            address,
            chosen: Mutex::new(None),
        });
        let existing = {
            let mut proxies = lock(&self.proxies);
            if let Some(existing) = proxies.get(&peer) {
                Some(existing.clone())
            } else {
                proxies.insert(peer, proxy.clone());
                lock(&self.by_address).insert(address, peer);
                None
            }
        };
        if let Some(existing) = existing {
            return Some(existing);
        }
        tokio::spawn(outbound(self.clone(), peer, proxy.clone()));
        Some(proxy)
    }

    /// A packet a relay delivered from `peer`: to WireGuard, from the peer's proxy.
    async fn deliver(self: &Arc<Self>, peer: Key, relay: &str, packet: Bytes) {
        let known = lock(&self.peers)
            .as_ref()
            .is_some_and(|peers| peers.contains(&peer));
        if !known {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some(proxy) = self.proxy(peer).await else {
            return;
        };
        if lock(&proxy.peer_relays).is_empty() {
            // The peer used the relay before this node knew it does: answer the same way.
            *lock(&proxy.peer_relays) = vec![relay.to_owned()];
        }
        self.counters
            .rx_bytes
            .fetch_add(packet.len() as u64, Ordering::Relaxed);
        let direct = lock(&self.direct).clone();
        match direct {
            Some(inject) => inject(proxy.address, &packet),
            None => {
                let _ = proxy.socket.send_to(&packet, self.wireguard).await;
            }
        }
    }
}

/// How long a proxy keeps sending through the relay it picked before it looks again (a relay
/// that closes is left at once).
const RECHOOSE: Duration = Duration::from_millis(250);

/// WireGuard → relay for one peer over its loopback socket (kernel WireGuard), until the proxy
/// is closed or the agent stops.
async fn outbound(relays: Arc<Relays>, peer: Key, proxy: Arc<Proxy>) {
    let mut buffer = vec![0u8; MAX_PACKET];
    loop {
        let received = tokio::select! {
            _ = proxy.closed.cancelled() => return,
            received = proxy.socket.recv_from(&mut buffer) => received,
        };
        let Ok((len, from)) = received else { continue };
        // Only WireGuard on this host writes here.
        if from.port() != relays.wireguard.port() || !from.ip().is_loopback() {
            continue;
        }
        relays.send_via(&proxy, &peer, &buffer[..len]);
    }
}

impl Relays {
    fn send_via(&self, proxy: &Proxy, peer: &Key, packet: &[u8]) -> bool {
        let sent = proxy
            .client(self, peer)
            .is_some_and(|client| client.send(peer, packet).is_ok());
        if sent {
            self.counters
                .tx_bytes
                .fetch_add(packet.len() as u64, Ordering::Relaxed);
        } else {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }
}

impl RelayLink for Relays {
    fn owns(&self, endpoint: SocketAddr) -> bool {
        lock(&self.by_address).contains_key(&endpoint)
    }

    fn send(&self, endpoint: SocketAddr, packet: &[u8]) -> bool {
        let Some(peer) = lock(&self.by_address).get(&endpoint).copied() else {
            return false;
        };
        let Some(proxy) = lock(&self.proxies).get(&peer).cloned() else {
            return false;
        };
        self.send_via(&proxy, &peer, packet)
    }
}

/// Keeps one relay connected: connects (with back-off), then moves packets both ways until the
/// connection ends, and again.
async fn connection(relays: Arc<Relays>, slot: Arc<Slot>, mut config: RelayClientConfig) {
    let mut retry = RETRY_MIN;
    let mut failures_logged = false;
    let mut public_key = relays.public_key.subscribe();
    let options = ClientOptions {
        keep_alive: RELAY_KEEPALIVE,
        idle_timeout: RELAY_DEAD_AFTER,
        connect_timeout: Duration::from_secs(5),
        ..ClientOptions::default()
    };
    loop {
        config.public_key = *public_key.borrow_and_update();
        let connected = tokio::select! {
            _ = relays.stop.cancelled() => return,
            connected = RelayClient::connect_with(&config, &options) => connected,
        };
        let client = match connected {
            Ok(client) => client,
            Err(e) => {
                if !failures_logged {
                    tracing::warn!(relay = %slot.name, error = %e, "cannot connect to the relay; retrying with back-off");
                    failures_logged = true;
                }
                tokio::select! {
                    _ = relays.stop.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
        };
        tracing::info!(relay = %slot.name, rtt = ?client.rtt(), "connected to the relay");
        failures_logged = false;
        retry = RETRY_MIN;
        *lock(&slot.rtt) = Some(client.rtt());
        *lock(&slot.client) = Some(client.clone());
        relays.announce();
        let mut rtt_check = tokio::time::interval(Duration::from_secs(5));
        let mut rekeyed = false;
        loop {
            tokio::select! {
                _ = relays.stop.cancelled() => break,
                changed = public_key.changed() => {
                    // The sender lives in `relays`, so this only fails when it is gone too.
                    if changed.is_ok() {
                        rekeyed = true;
                    }
                    break;
                }
                received = client.recv() => match received {
                    Ok((peer, packet)) => relays.deliver(peer, &slot.name, packet).await,
                    Err(_) => break,
                },
                _ = rtt_check.tick() => {
                    if client.is_closed() {
                        break;
                    }
                    *lock(&slot.rtt) = Some(client.rtt());
                    relays.announce();
                }
            }
        }
        *lock(&slot.client) = None;
        relays.announce();
        if relays.stop.is_cancelled() {
            return;
        }
        if rekeyed {
            tracing::info!(relay = %slot.name, "registering this node's new WireGuard key with the relay");
            continue;
        }
        tracing::warn!(relay = %slot.name, "lost the relay; peers relayed through it move to another shared relay");
    }
}
