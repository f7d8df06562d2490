//! openspan's userspace WireGuard device: boringtun's noise protocol (handshakes, sessions,
//! timers, cookies) driven by I/O loops built for throughput. The TUN device runs with
//! virtio-net offloads, so the kernel hands over TCP super-packets of up to 64 KiB and takes
//! coalesced ones back (`tun-rs` splits and coalesces), and the UDP socket sends and receives
//! batches of datagrams with one call (UDP GSO/GRO). A bulk TCP flow costs a few system calls
//! per 64 KiB instead of four per 1.4 KiB packet.
//!
//! Threads, named after the interface so `top -H` shows them: `wg-<if>-rx` (UDP → decrypt →
//! TUN, and at low load also TUN → encrypt → UDP), `wg-<if>-tx` (TUN → encrypt → UDP when the
//! receive thread hands it the TUN device under load) and `wg-<if>-timer` (handshake retries,
//! keepalives, rekeys).
//!
//! Modules: [`peers`] (who owns which address, receiver indexes), [`egress`] (TUN → network),
//! [`ingress`] (network → TUN), [`gate`] (cookies and per-source limits for handshakes under
//! load); blocking waits are in [`crate::wake`].

mod egress;
mod gate;
mod ingress;
mod peers;
mod race;
mod rotation;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use tun_rs::{DeviceBuilder, SyncDevice, VIRTIO_NET_HDR_LEN};

use self::egress::{Egress, tun_to_network};
use self::ingress::network_to_tun;
use self::peers::{Peer, PeerTable};
use self::rotation::{Previous, Retirement};
use super::uapi::{DeviceView, PeerView, SetRequest, render_get};
use super::udp::UdpTransport;
use super::wake::{Wake, wait_readable};
use super::{DeviceSettings, Key, PeerConfig, PeerState, RelayInjector, RelayLink, WgError};

/// Handshake messages per second allowed per configured peer. When a whole cluster starts at
/// once, each peer sends its initiation, its response to ours and often a second initiation
/// within the same second: up to 84 from 39 peers in a second (about 2.2 each) were measured in
/// a 40-node mesh. Past the limit the initiator gets a cookie and boringtun retries only after
/// REKEY_TIMEOUT (5 s), so a fixed limit of 100 stalled every pair over it by 5 s.
const HANDSHAKES_PER_PEER: u64 = 4;
/// The peer count the limit is sized for is rounded up to this step, so adding peers one by one
/// does not replace the limiter (and the cookies it issued) on every change.
const PEER_STEP: usize = 32;
/// boringtun's timers want a tick at least this often.
const TIMER_TICK: Duration = Duration::from_millis(250);
/// TUN reads the receive thread does itself before it hands the TUN device to the transmit
/// thread (a bulk flow fills them at once; requests and answers do not).
const RX_PUMP_READS: usize = 4;
/// How long the TUN device stays with the transmit thread after it went quiet.
const HELPER_IDLE: Duration = Duration::from_millis(2);
/// Packets taken from the TUN device per read (a 64 KiB super-packet splits into ~48).
const TUN_BATCH: usize = 128;
/// Receive buffers per UDP read; each holds up to 64 KiB of coalesced datagrams.
const UDP_BATCH: usize = 8;
const UDP_BUFFER: usize = 65_536;
/// A decrypted packet plus room for the TUN's virtio header; coalescing grows the first
/// packet of a flow to up to 64 KiB.
const TUN_BUFFER: usize = VIRTIO_NET_HDR_LEN + 65_536;
/// Encrypted size of a packet: WireGuard's 16-byte header and 16-byte tag.
const DATA_OVERHEAD: usize = 32;
/// boringtun needs this much room for any message it may write (a handshake initiation).
const MIN_MESSAGE_ROOM: usize = 148;
/// STUN messages received on the WireGuard socket kept for the agent; more are dropped (the
/// agent sends a handful of binding requests every 20–30 s).
const STUN_INBOX: usize = 64;
/// STUN messages are kept only from addresses a request went to this long ago at most: anyone
/// can send a datagram with STUN's magic cookie, and unsolicited ones would fill the inbox.
const STUN_ANSWER_WINDOW: Duration = Duration::from_secs(10);
/// Servers remembered for [`STUN_ANSWER_WINDOW`]; the agent asks a handful.
const STUN_SERVERS: usize = 16;
/// Packets from relays waiting for the receive thread; more are dropped (as a full socket
/// buffer would).
const RELAY_INBOX: usize = 1_024;
const HANDSHAKE_INITIATION: u8 = 1;
const HANDSHAKE_RESPONSE: u8 = 2;
const DATA_MESSAGE: u8 = 4;

struct Keys {
    private: StaticSecret,
    public: PublicKey,
    /// Always under load: checks mac1 and mac2 and writes cookie replies, for the handshakes
    /// the receive thread's [`gate::HandshakeGate`] decides need a cookie.
    cookies: Arc<RateLimiter>,
    /// Handshake messages per second before the gate demands cookies: [`handshake_limit`] of
    /// the peer count.
    handshake_limit: u64,
    /// Checks mac1 only; also what the peers' Tunns check again internally, so a Tunn never
    /// answers with a cookie of its own (the gate decides about load).
    unlimited: Arc<RateLimiter>,
    /// The key before the last rotation, while peers may still handshake to it.
    previous: Option<PreviousKey>,
}

/// The static key before a rotation: initiations sealed to it are answered by the peers'
/// previous Tunns until their deadline.
struct PreviousKey {
    private: StaticSecret,
    public: PublicKey,
    cookies: Arc<RateLimiter>,
    unlimited: Arc<RateLimiter>,
    deadline: Instant,
}

struct Shared {
    interface: String,
    stop: AtomicBool,
    keys: RwLock<Option<Keys>>,
    fwmark: RwLock<u32>,
    peers: RwLock<PeerTable>,
    socket: RwLock<Option<Arc<UdpTransport>>>,
    tun: SyncDevice,
    /// Set (for good) when the device stops: wakes every thread.
    stopping: Wake,
    /// Wakes the receive thread to pick up a new socket or to watch the TUN device again.
    rx_wake: Wake,
    /// Wakes the transmit thread to take the TUN device over.
    tx_wake: Wake,
    /// Wakes the timer thread for a race's staggered sends.
    timer_wake: Wake,
    /// STUN messages that arrived on the WireGuard socket (source, bytes), for the agent.
    stun_inbox: Mutex<VecDeque<(SocketAddr, Vec<u8>)>>,
    /// Where STUN requests went and when: only those addresses' answers enter the inbox.
    stun_asked: Mutex<VecDeque<(SocketAddr, Instant)>>,
    /// Where packets for relayed peers go, when the agent attached its relays.
    relay: RwLock<Option<Arc<dyn RelayLink>>>,
    /// Packets relays delivered (placeholder source, bytes), for the receive thread.
    relay_inbox: Mutex<VecDeque<(SocketAddr, Vec<u8>)>>,
    /// Whether the transmit thread is watching the TUN device (under load); otherwise the
    /// receive thread does, and one thread carries everything.
    tx_active: AtomicBool,
    egress: Mutex<Egress>,
    /// Data messages that did not decrypt (see [`Device::decrypt_failures`]).
    decrypt_failures: AtomicU64,
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Whether a STUN message from `from` answers a recent request of ours.
    fn stun_expected(&self, from: SocketAddr, now: Instant) -> bool {
        let from = canonical(from);
        lock(&self.stun_asked).iter().any(|(address, at)| {
            *address == from && now.saturating_duration_since(*at) <= STUN_ANSWER_WINDOW
        })
    }

    fn socket(&self) -> Option<Arc<UdpTransport>> {
        read(&self.socket).clone()
    }

    /// The relay link when it owns `destination`.
    fn relay_for(&self, destination: SocketAddr) -> Option<Arc<dyn RelayLink>> {
        if !destination.ip().is_loopback() {
            return None;
        }
        read(&self.relay)
            .as_ref()
            .filter(|link| link.owns(destination))
            .cloned()
    }

    fn send_to(&self, destination: Option<SocketAddr>, message: &[u8]) {
        let Some(destination) = destination else {
            return;
        };
        if let Some(link) = self.relay_for(destination) {
            link.send(destination, message);
            return;
        }
        let Some(socket) = self.socket() else {
            return;
        };
        if let Err(e) = socket.send(destination, message, None) {
            tracing::debug!(interface = %self.interface, %destination, error = %e, "WireGuard send failed");
        }
    }
}

/// The running device. Dropping it stops the threads and removes the interface.
pub struct Device {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

fn device_error(interface: &str, message: String) -> WgError {
    WgError::Device {
        interface: interface.to_owned(),
        message,
    }
}

/// IPv4 peers of a dual-stack socket appear as IPv4-mapped IPv6 addresses.
fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

impl Device {
    /// Creates the TUN interface (with offloads) and starts the device threads. The interface
    /// is brought up and addressed by the caller.
    pub fn create(interface: &str) -> Result<Self, WgError> {
        let tun = DeviceBuilder::new()
            .name(interface)
            .offload(true)
            .build_sync()
            .map_err(|e| {
                device_error(
                    interface,
                    format!(
                        "cannot create the TUN device ({e}); is /dev/net/tun available and are we root (CAP_NET_ADMIN)?"
                    ),
                )
            })?;
        tun.set_nonblocking(true)?;
        if !tun.tcp_gso() {
            tracing::info!(
                interface,
                "the TUN device has no offloads here; packets are handled one by one"
            );
        }
        let shared = Arc::new(Shared {
            interface: interface.to_owned(),
            stop: AtomicBool::new(false),
            keys: RwLock::new(None),
            fwmark: RwLock::new(0),
            peers: RwLock::new(PeerTable {
                next_index: rand::random::<u32>() & 0x00ff_ffff,
                ..PeerTable::default()
            }),
            socket: RwLock::new(None),
            tun,
            stopping: Wake::new()?,
            rx_wake: Wake::new()?,
            tx_wake: Wake::new()?,
            timer_wake: Wake::new()?,
            stun_inbox: Mutex::new(VecDeque::new()),
            stun_asked: Mutex::new(VecDeque::new()),
            relay: RwLock::new(None),
            relay_inbox: Mutex::new(VecDeque::new()),
            tx_active: AtomicBool::new(false),
            egress: Mutex::new(Egress::new()),
            decrypt_failures: AtomicU64::new(0),
        });
        let mut threads = Vec::new();
        for (role, body) in [
            ("tx", tun_to_network as fn(&Shared)),
            ("rx", network_to_tun),
            ("timer", timers),
        ] {
            let worker = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("wg-{interface}-{role}"))
                .spawn(move || body(&worker));
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    let device = Self { shared, threads };
                    drop(device);
                    return Err(e.into());
                }
            }
        }
        Ok(Self { shared, threads })
    }

    /// Sets the private key, listen port and fwmark. A new key ends every session (peers
    /// handshake again); a new port or mark re-binds the socket.
    pub fn configure(&self, settings: &DeviceSettings) -> Result<(), WgError> {
        self.set_private_key(&settings.private_key);
        self.listen(settings.listen_port, settings.fwmark)
    }

    /// What the kernel lets the device batch, e.g. "TSO on, GSO 64, GRO 64".
    pub fn offloads(&self) -> String {
        let tso = if self.shared.tun.tcp_gso() {
            "on"
        } else {
            "off"
        };
        match self.shared.socket() {
            Some(socket) => format!(
                "TSO {tso}, GSO {}, GRO {}",
                socket.max_segments(),
                socket.gro_segments()
            ),
            None => format!("TSO {tso}"),
        }
    }

    /// The TUN interface's index.
    pub fn if_index(&self) -> Result<u32, WgError> {
        self.shared.tun.if_index().map_err(WgError::from)
    }

    /// The most segments one TUN read is split into.
    pub fn max_tun_segments(&self) -> u32 {
        TUN_BATCH as u32
    }

    /// Sets the private key; a new key ends every session (peers handshake again).
    pub fn set_private_key(&self, private_key: &Key) {
        let private = StaticSecret::from(*private_key);
        let public = PublicKey::from(&private);
        let key_changed = read(&self.shared.keys)
            .as_ref()
            .is_none_or(|keys| keys.public != public);
        if key_changed {
            let cookies = Arc::new(RateLimiter::new(&public, 0));
            let mut peers = write(&self.shared.peers);
            let limit = handshake_limit(peers.by_key.len());
            let unlimited = Arc::new(RateLimiter::new(&public, u64::MAX));
            let all: Vec<Arc<Peer>> = peers.by_key.values().cloned().collect();
            for peer in all {
                lock(&peer.tunn).set_static_private(
                    private.clone(),
                    public,
                    Some(unlimited.clone()),
                );
                // Sessions under another key end here too: their bytes stay counted and their
                // receiver index is freed.
                if let Some(previous) = lock(&peer.previous).take() {
                    let (_, tx, rx, _, _) = previous.tunn.stats();
                    let mut bytes = lock(&peer.retired_bytes);
                    bytes.0 += tx as u64;
                    bytes.1 += rx as u64;
                    drop(bytes);
                    peers.forget_index(previous.index, &peer);
                }
            }
            drop(peers);
            *write(&self.shared.keys) = Some(Keys {
                private,
                public,
                cookies,
                handshake_limit: limit,
                unlimited,
                previous: None,
            });
        }
    }

    /// Replaces the private key without a traffic gap: every peer gets a new session under the
    /// new key, while its session under the old key carries packets and the old key answers
    /// handshakes until the peer has a session under the new key, or for `grace` at most (see
    /// [`rotation`]). Without a key yet, or with the same key, this is
    /// [`Device::set_private_key`].
    pub fn rotate_private_key(&self, private_key: &Key, grace: Duration) {
        let private = StaticSecret::from(*private_key);
        let public = PublicKey::from(&private);
        let mut keys_guard = write(&self.shared.keys);
        let Some(old) = keys_guard.take_if(|keys| keys.public != public) else {
            drop(keys_guard);
            self.set_private_key(private_key);
            return;
        };
        let now = Instant::now();
        let keys = Keys {
            cookies: Arc::new(RateLimiter::new(&public, 0)),
            handshake_limit: old.handshake_limit,
            unlimited: Arc::new(RateLimiter::new(&public, u64::MAX)),
            private,
            public,
            previous: Some(PreviousKey {
                private: old.private,
                public: old.public,
                cookies: old.cookies,
                unlimited: old.unlimited,
                deadline: now + grace,
            }),
        };
        let mut peers = write(&self.shared.peers);
        let existing: Vec<Arc<Peer>> = peers.by_key.values().cloned().collect();
        for old_peer in existing {
            // A session kept from an earlier change ends now (keep_previous); its receiver
            // index goes with it, before `insert` forgets only the indexes `old_peer` has then.
            if let Some(earlier) = old_peer.previous_index() {
                peers.forget_index(earlier, &old_peer);
            }
            let config = peer_config(&old_peer);
            let index = peers.allocate_index();
            let peer = Peer::new(
                &config,
                index,
                new_tunn(&keys, &config, index),
                old_peer.endpoint(),
            );
            keep_previous(&old_peer, &peer, &keys, &config, now, grace);
            peers.insert(peer);
        }
        drop(peers);
        *keys_guard = Some(keys);
    }

    /// Replaces the peer `old_key` by `config` (the same node under a new key) without a
    /// traffic gap: the old entry's session carries packets until the new key has one, and a
    /// handshake under the new key starts at once. An unknown `old_key` makes this a plain
    /// [`Device::set_peer`] with a new session.
    pub fn replace_peer(
        &self,
        old_key: &Key,
        config: &PeerConfig,
        grace: Duration,
    ) -> Result<(), WgError> {
        let keys_guard = read(&self.shared.keys);
        let Some(keys) = keys_guard.as_ref() else {
            return Err(device_error(
                &self.shared.interface,
                "set the private key before adding peers".into(),
            ));
        };
        let mut peers = write(&self.shared.peers);
        let Some(old_peer) = peers.remove(old_key) else {
            drop(peers);
            drop(keys_guard);
            return self.set_peer(config, true);
        };
        let endpoint = config.endpoint.or_else(|| old_peer.endpoint());
        let index = peers.allocate_index();
        let peer = Peer::new(config, index, new_tunn(keys, config, index), endpoint);
        keep_previous(&old_peer, &peer, keys, config, Instant::now(), grace);
        peers.insert(peer.clone());
        drop(peers);
        drop(keys_guard);
        self.initiate(&peer, endpoint);
        Ok(())
    }

    /// Sends a handshake initiation for `peer` to `endpoint` now (unless one is under way).
    fn initiate(&self, peer: &Peer, endpoint: Option<SocketAddr>) {
        let mut message = [0u8; MIN_MESSAGE_ROOM];
        let initiation = match lock(&peer.tunn).format_handshake_initiation(&mut message, false) {
            TunnResult::WriteToNetwork(m) => Some(m.len()),
            _ => None,
        };
        if let Some(len) = initiation {
            self.shared.send_to(endpoint, &message[..len]);
        }
    }

    /// Listens on `port` (0: keep the current port, or any free one) with `fwmark` on the
    /// socket's packets; a new port re-binds the socket.
    pub fn listen(&self, port: u16, fwmark: u32) -> Result<(), WgError> {
        let current = self.shared.socket();
        let port_changed = current
            .as_ref()
            .is_none_or(|s| port != 0 && s.port() != port);
        if port_changed {
            let socket = UdpTransport::bind(port, fwmark).map_err(|e| {
                device_error(
                    &self.shared.interface,
                    format!(
                        "cannot listen on UDP port {port} ({e}); is another WireGuard or agent using it?"
                    ),
                )
            })?;
            tracing::debug!(
                interface = %self.shared.interface,
                port = socket.port(),
                gso_segments = socket.max_segments(),
                gro_segments = socket.gro_segments(),
                "WireGuard socket bound"
            );
            // The receive thread lets go of the old socket (closing it) when woken.
            *write(&self.shared.socket) = Some(Arc::new(socket));
            self.shared.rx_wake.notify();
        } else if let Some(socket) = current
            && *read(&self.shared.fwmark) != fwmark
        {
            socket.set_mark(fwmark).map_err(|e| {
                device_error(
                    &self.shared.interface,
                    format!("cannot set fwmark {fwmark} on the socket ({e})"),
                )
            })?;
        }
        *write(&self.shared.fwmark) = fwmark;
        Ok(())
    }

    /// Adds or updates a peer. Allowed IPs, keepalive-free changes and endpoints are updated in
    /// place (the session stays); with `reset_session` (or a new preshared key or keepalive)
    /// the peer gets a fresh session and a handshake toward its endpoint starts at once.
    pub fn set_peer(&self, config: &PeerConfig, reset_session: bool) -> Result<(), WgError> {
        let keys_guard = read(&self.shared.keys);
        let Some(keys) = keys_guard.as_ref() else {
            return Err(device_error(
                &self.shared.interface,
                "set the private key before adding peers".into(),
            ));
        };
        let mut peers = write(&self.shared.peers);
        let existing = peers.by_key.get(&config.public_key).cloned();
        let keeps_session = existing.as_ref().is_some_and(|old| {
            !reset_session
                && old.preshared_key == config.preshared_key
                && old.keepalive == config.persistent_keepalive
        });
        let endpoint = config
            .endpoint
            .or_else(|| existing.as_ref().and_then(|old| old.endpoint()));
        if let (true, Some(old)) = (keeps_session, &existing) {
            if old.allowed_ips != config.allowed_ips {
                // Same peer, new allowed IPs: a new entry sharing the session (the Tunn moves
                // over under the table's write lock, so no packet sees the peer missing), and
                // the session from before a key change if there is one.
                let tunn =
                    std::mem::replace(&mut *lock(&old.tunn), new_tunn(keys, config, old.index));
                let peer = Peer::new(config, old.index, tunn, endpoint);
                *lock(&peer.previous) = lock(&old.previous).take();
                *lock(&peer.retired_bytes) = *lock(&old.retired_bytes);
                peers.insert(peer);
            } else if endpoint != old.endpoint() {
                *write(&old.endpoint) = endpoint;
            }
            return Ok(());
        }
        let index = peers.allocate_index();
        let peer = Peer::new(config, index, new_tunn(keys, config, index), endpoint);
        if let Some(old) = &existing {
            // Re-created (a new session): a key rotation's previous session carries on with
            // it (peers may still send on it during the grace), and the counters never go back.
            *lock(&peer.previous) = lock(&old.previous).take();
            let (_, tx, rx, _, _) = lock(&old.tunn).stats();
            let (retired_tx, retired_rx) = *lock(&old.retired_bytes);
            *lock(&peer.retired_bytes) = (retired_tx + tx as u64, retired_rx + rx as u64);
        }
        peers.insert(peer.clone());
        drop(peers);
        drop(keys_guard);
        if existing.is_none() {
            self.fit_handshake_limit();
        }
        // Start the handshake now rather than on the first packet or keepalive.
        self.initiate(&peer, endpoint);
        Ok(())
    }

    /// A peer as it is configured now (its current endpoint, which may have roamed).
    pub fn peer_config(&self, public_key: &Key) -> Option<PeerConfig> {
        let peers = read(&self.shared.peers);
        peers.by_key.get(public_key).map(|peer| peer_config(peer))
    }

    /// Sends one fresh handshake initiation to each of `candidates` (most promising first, the
    /// others [`race::STAGGER`] apart) and keeps sending boringtun's retries to all of them
    /// until a handshake completes; the first answer moves the peer to its address. Returns
    /// false when the peer is unknown or no initiation can be made (no key yet).
    pub fn race(&self, public_key: &Key, candidates: &[SocketAddr]) -> bool {
        let Some(peer) = read(&self.shared.peers).by_key.get(public_key).cloned() else {
            return false;
        };
        let mut message = [0u8; MIN_MESSAGE_ROOM];
        let len = match lock(&peer.tunn).format_handshake_initiation(&mut message, true) {
            TunnResult::WriteToNetwork(m) => m.len(),
            _ => return false,
        };
        let first = lock(&peer.race).start(candidates, &message[..len], Instant::now());
        if let Some(first) = first {
            self.shared.send_to(Some(first), &message[..len]);
            if peer.endpoint().is_none() {
                *write(&peer.endpoint) = Some(first);
            }
        }
        self.shared.timer_wake.notify();
        true
    }

    /// Asks a quiet peer for an answer: a handshake initiation to its endpoint (answered by any
    /// live WireGuard peer, openspan or not). Nothing is sent while a handshake is under way.
    pub fn probe(&self, public_key: &Key) -> bool {
        let Some(peer) = read(&self.shared.peers).by_key.get(public_key).cloned() else {
            return false;
        };
        let mut message = [0u8; MIN_MESSAGE_ROOM];
        let len = match lock(&peer.tunn).format_handshake_initiation(&mut message, false) {
            TunnResult::WriteToNetwork(m) => m.len(),
            _ => return false,
        };
        self.shared.send_to(peer.endpoint(), &message[..len]);
        true
    }

    /// Sends a STUN message from the WireGuard socket (so the NAT mapping learned is the one
    /// WireGuard uses); false when the socket is not bound yet.
    pub fn send_stun(&self, destination: SocketAddr, message: &[u8]) -> bool {
        let Some(socket) = self.shared.socket() else {
            return false;
        };
        let destination_seen = canonical(destination);
        {
            let mut asked = lock(&self.shared.stun_asked);
            asked.retain(|(address, _)| *address != destination_seen);
            if asked.len() == STUN_SERVERS {
                asked.pop_front();
            }
            asked.push_back((destination_seen, Instant::now()));
        }
        socket.send(destination, message, None).is_ok()
    }

    /// Sends the link's endpoints' packets through it; returns how relays hand packets back.
    pub fn attach_relay(self: &Arc<Self>, link: Arc<dyn RelayLink>) -> RelayInjector {
        *write(&self.shared.relay) = Some(link);
        let shared = Arc::downgrade(&self.shared);
        Arc::new(move |from: SocketAddr, packet: &[u8]| {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let mut inbox = lock(&shared.relay_inbox);
            // The receive thread drains the inbox before it waits again, so only the first
            // packet into an empty one needs to wake it (a system call per packet otherwise).
            let was_empty = inbox.is_empty();
            if inbox.len() < RELAY_INBOX {
                inbox.push_back((from, packet.to_vec()));
            }
            drop(inbox);
            if was_empty {
                shared.rx_wake.notify();
            }
        })
    }

    /// STUN messages received since the last call (source, bytes), oldest first.
    pub fn take_stun(&self) -> Vec<(SocketAddr, Vec<u8>)> {
        lock(&self.shared.stun_inbox).drain(..).collect()
    }

    /// Data messages received that did not decrypt since the device started: an unknown
    /// receiver index (a session this device no longer has, or forged), a failed authentication
    /// tag, or a replayed counter. A steady rate means a peer with stale keys or someone sending
    /// junk to the port; either way packets are being lost or refused.
    pub fn decrypt_failures(&self) -> u64 {
        self.shared.decrypt_failures.load(Ordering::Relaxed)
    }

    /// The device's UDP port, once bound.
    pub fn port(&self) -> Option<u16> {
        self.shared.socket().map(|s| s.port())
    }

    /// Applies a `wg(8)` `set` request (for the standalone device, configured like
    /// wireguard-go).
    pub fn apply(&self, request: &SetRequest) -> Result<(), WgError> {
        if let Some(key) = &request.private_key {
            self.set_private_key(key);
        }
        if request.listen_port.is_some() || request.fwmark.is_some() {
            let port = request
                .listen_port
                .unwrap_or_else(|| self.shared.socket().map_or(0, |s| s.port()));
            let fwmark = request.fwmark.unwrap_or_else(|| *read(&self.shared.fwmark));
            self.listen(port, fwmark)?;
        }
        if request.replace_peers {
            let keys: Vec<Key> = read(&self.shared.peers).by_key.keys().copied().collect();
            keys.iter().for_each(|key| self.remove_peer(key));
        }
        for change in &request.peers {
            if change.remove {
                self.remove_peer(&change.public_key);
                continue;
            }
            let existing = self.peer_config(&change.public_key);
            if change.update_only && existing.is_none() {
                continue;
            }
            let mut config = existing.unwrap_or(PeerConfig {
                public_key: change.public_key,
                preshared_key: [0; 32],
                endpoint: None,
                allowed_ips: Vec::new(),
                persistent_keepalive: Duration::ZERO,
            });
            if let Some(psk) = change.preshared_key {
                config.preshared_key = psk;
            }
            if change.endpoint.is_some() {
                config.endpoint = change.endpoint;
            }
            if let Some(seconds) = change.persistent_keepalive {
                config.persistent_keepalive = Duration::from_secs(seconds.into());
            }
            if change.replace_allowed_ips {
                config.allowed_ips.clear();
            }
            for ip in &change.allowed_ips {
                if !config.allowed_ips.contains(ip) {
                    config.allowed_ips.push(*ip);
                }
            }
            self.set_peer(&config, false)?;
        }
        Ok(())
    }

    pub fn remove_peer(&self, public_key: &Key) {
        write(&self.shared.peers).remove(public_key);
        self.fit_handshake_limit();
    }

    /// Sets the gate's handshake rate for the peer count (the step in [`handshake_limit`]
    /// keeps changes rare).
    fn fit_handshake_limit(&self) {
        let limit = handshake_limit(read(&self.shared.peers).by_key.len());
        let mut keys = write(&self.shared.keys);
        if let Some(keys) = keys.as_mut()
            && keys.handshake_limit != limit
        {
            tracing::debug!(interface = %self.shared.interface, limit, "handshake rate limit");
            keys.handshake_limit = limit;
        }
    }

    pub fn peers(&self) -> Vec<PeerState> {
        self.peer_views()
            .into_iter()
            .map(|view| view.state)
            .collect()
    }

    /// Every peer's state and settings, by public key.
    fn peer_views(&self) -> Vec<PeerView> {
        let peers = read(&self.shared.peers);
        let mut views: Vec<PeerView> = peers
            .by_key
            .values()
            .map(|peer| PeerView {
                state: peer_state(peer),
                preshared_key: peer.preshared_key,
                keepalive: peer.keepalive,
            })
            .collect();
        views.sort_by_key(|view| view.state.public_key);
        views
    }

    /// The device in `wg(8)`'s userspace-API `get` format (without the final `errno=`).
    pub fn uapi_get(&self) -> String {
        render_get(&DeviceView {
            private_key: read(&self.shared.keys)
                .as_ref()
                .map(|keys| keys.private.to_bytes()),
            listen_port: self.shared.socket().map(|s| s.port()),
            fwmark: *read(&self.shared.fwmark),
            peers: self.peer_views(),
        })
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.stopping.notify();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Handshake messages per second the device takes from `peers` configured peers before it
/// answers with cookies: what they legitimately send when all start at once, and never less
/// than boringtun's default. The peer count is rounded up to [`PEER_STEP`].
fn handshake_limit(peers: usize) -> u64 {
    let sized_for = peers.next_multiple_of(PEER_STEP) as u64;
    u64::from(gate::HANDSHAKE_RATE_LIMIT).max(HANDSHAKES_PER_PEER * sized_for)
}

fn new_tunn(keys: &Keys, config: &PeerConfig, index: u32) -> Tunn {
    let keepalive = u16::try_from(config.persistent_keepalive.as_secs())
        .ok()
        .filter(|&s| s > 0);
    Tunn::new(
        keys.private.clone(),
        PublicKey::from(config.public_key),
        Some(config.preshared_key),
        keepalive,
        index,
        Some(keys.unlimited.clone()),
    )
}

fn peer_config(peer: &Peer) -> PeerConfig {
    PeerConfig {
        public_key: peer.public_key,
        preshared_key: peer.preshared_key,
        endpoint: peer.endpoint(),
        allowed_ips: peer.allowed_ips.clone(),
        persistent_keepalive: peer.keepalive,
    }
}

/// Moves `old`'s session to `new` as its previous one (see [`rotation`]), retired by `grace`
/// at the latest. `old` keeps a fresh Tunn without sessions, for a thread that still holds it.
fn keep_previous(
    old: &Peer,
    new: &Peer,
    keys: &Keys,
    config: &PeerConfig,
    now: Instant,
    grace: Duration,
) {
    let quiet = PeerConfig {
        persistent_keepalive: Duration::ZERO,
        ..config.clone()
    };
    let tunn = std::mem::replace(&mut *lock(&old.tunn), new_tunn(keys, &quiet, old.index));
    // A previous session of `old` (a second change within the grace) goes now.
    let (mut retired_tx, mut retired_rx) = *lock(&old.retired_bytes);
    if let Some(earlier) = lock(&old.previous).take() {
        let (_, tx, rx, _, _) = earlier.tunn.stats();
        retired_tx += tx as u64;
        retired_rx += rx as u64;
    }
    *lock(&new.retired_bytes) = (retired_tx, retired_rx);
    *lock(&new.previous) = Some(Previous {
        tunn,
        index: old.index,
        retirement: Retirement::new(now, grace),
    });
}

fn peer_state(peer: &Peer) -> PeerState {
    let tunn = lock(&peer.tunn);
    let (_, mut tx_bytes, mut rx_bytes, _, _) = tunn.stats();
    let mut handshake_age = tunn.time_since_last_handshake();
    drop(tunn);
    if let Some(previous) = lock(&peer.previous).as_ref() {
        // The previous session counts until the new one exists: the peer is alive through it.
        let (_, tx, rx, _, _) = previous.tunn.stats();
        tx_bytes += tx;
        rx_bytes += rx;
        handshake_age = handshake_age.or_else(|| previous.tunn.time_since_last_handshake());
    }
    let (retired_tx, retired_rx) = *lock(&peer.retired_bytes);
    let tx_bytes = tx_bytes as u64 + retired_tx;
    let rx_bytes = rx_bytes as u64 + retired_rx;
    // For display; the agent's timers use the age (monotonic).
    let last_handshake = handshake_age.and_then(|age| SystemTime::now().checked_sub(age));
    PeerState {
        public_key: peer.public_key,
        endpoint: peer.endpoint(),
        last_handshake,
        handshake_age,
        rx_bytes,
        tx_bytes,
        allowed_ips: peer.allowed_ips.clone(),
    }
}

/// boringtun's timers: handshake retries and rekeys, keepalives, session expiry; and the
/// staggered sends of endpoint races.
fn timers(shared: &Shared) {
    let mut message = vec![0u8; 2_048];
    let mut next_tick = Instant::now();
    let mut next_race: Option<Instant> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        let wake_at = next_race.map_or(next_tick, |race| race.min(next_tick));
        let timeout = wake_at.saturating_duration_since(Instant::now());
        if let Ok([_, true]) = wait_readable(
            [shared.stopping.fd(), shared.timer_wake.fd()],
            Some(timeout),
        ) {
            shared.timer_wake.clear();
        }
        let now = Instant::now();
        let peers: Vec<Arc<Peer>> = read(&shared.peers).by_key.values().cloned().collect();
        next_race = None;
        for peer in &peers {
            if let Some(due) = race_sends(shared, peer, now) {
                next_race = Some(next_race.map_or(due, |earlier: Instant| earlier.min(due)));
            }
        }
        if now < next_tick {
            continue;
        }
        next_tick = now + TIMER_TICK;
        retire_previous(shared, &peers, now, &mut message);
        for peer in peers {
            let len = match lock(&peer.tunn).update_timers(&mut message) {
                TunnResult::WriteToNetwork(m) => m.len(),
                _ => continue,
            };
            let retry_to = if message[0] == HANDSHAKE_INITIATION {
                lock(&peer.race).candidates(now).to_vec()
            } else {
                Vec::new()
            };
            if retry_to.is_empty() {
                shared.send_to(peer.endpoint(), &message[..len]);
            } else {
                // A handshake retry during a race goes to every candidate again.
                for destination in retry_to {
                    shared.send_to(Some(destination), &message[..len]);
                }
            }
        }
    }
}

/// Runs the timers of the peers' previous sessions (keepalives, their own rekeys) and retires
/// the ones that are due ([`Retirement`]); the previous key goes with the last of them, or at
/// its deadline.
fn retire_previous(shared: &Shared, peers: &[Arc<Peer>], now: Instant, message: &mut [u8]) {
    let mut retired: Vec<(Arc<Peer>, u32)> = Vec::new();
    let mut remaining = 0;
    for peer in peers {
        let new_has_session = lock(&peer.tunn).time_since_last_handshake().is_some();
        let mut previous_guard = lock(&peer.previous);
        let Some(previous) = previous_guard.as_mut() else {
            continue;
        };
        if previous.retirement.due(now, new_has_session) {
            let (_, tx, rx, _, _) = previous.tunn.stats();
            let mut bytes = lock(&peer.retired_bytes);
            bytes.0 += tx as u64;
            bytes.1 += rx as u64;
            drop(bytes);
            retired.push((peer.clone(), previous.index));
            *previous_guard = None;
            continue;
        }
        remaining += 1;
        let len = match previous.tunn.update_timers(message) {
            TunnResult::WriteToNetwork(m) => m.len(),
            _ => continue,
        };
        drop(previous_guard);
        shared.send_to(peer.endpoint(), &message[..len]);
    }
    if !retired.is_empty() {
        tracing::debug!(interface = %shared.interface, retired = retired.len(), remaining, "sessions from before a key change retired");
        let mut table = write(&shared.peers);
        for (peer, index) in &retired {
            table.forget_index(*index, peer);
        }
    }
    // Re-created peers' sessions stop decrypting after RETIRED_FOR even when no peer is added
    // again (pruning otherwise only runs on insert).
    if !read(&shared.peers).retired.is_empty() {
        write(&shared.peers).prune_retired(now);
    }
    // Looked at under the read lock first: the receive thread holds it for every batch.
    let due = |keys: &Option<Keys>, remaining: usize| {
        keys.as_ref().is_some_and(|keys| {
            keys.previous
                .as_ref()
                .is_some_and(|previous| remaining == 0 || now >= previous.deadline)
        })
    };
    if due(&read(&shared.keys), remaining) {
        let mut keys = write(&shared.keys);
        // Counted again under the keys lock from the table as it is now: a rotation since the
        // snapshot above gave every peer a previous session the snapshot does not show, and
        // its old key must not go with the snapshot's count of 0.
        let remaining_now = read(&shared.peers)
            .by_key
            .values()
            .filter(|peer| lock(&peer.previous).is_some())
            .count();
        if due(&keys, remaining_now)
            && let Some(keys) = keys.as_mut()
        {
            keys.previous = None;
            tracing::info!(interface = %shared.interface, "the previous WireGuard key is no longer answered");
        }
    }
}

/// Sends what a peer's race has due now and ends the race once a handshake completed after
/// it began; returns when the next staggered send is due.
fn race_sends(shared: &Shared, peer: &Peer, now: Instant) -> Option<Instant> {
    let mut race = lock(&peer.race);
    let started = race.started()?;
    let handshake_age = lock(&peer.tunn).time_since_last_handshake();
    // boringtun dates a handshake by its last timer tick: up to a tick before the real moment.
    let since = started.checked_sub(TIMER_TICK).unwrap_or(started);
    let answered =
        handshake_age.is_some_and(|age| now.checked_sub(age).is_some_and(|at| at >= since));
    if answered || !race.is_running(now) {
        race.finish();
        return None;
    }
    let (due, message) = race.due(now);
    for destination in due {
        shared.send_to(Some(destination), message);
    }
    race.next_due()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handshake_limit_grows_with_the_peers_in_steps() {
        // No peers: boringtun's default; a few: sized for the first step.
        assert_eq!(handshake_limit(0), u64::from(gate::HANDSHAKE_RATE_LIMIT));
        assert_eq!(handshake_limit(3), 32 * HANDSHAKES_PER_PEER);
        // A 40-node mesh (39 peers) is sized for 64, a 100-node one for 128.
        assert_eq!(handshake_limit(39), 64 * HANDSHAKES_PER_PEER);
        assert_eq!(handshake_limit(40), handshake_limit(64));
        assert_eq!(handshake_limit(99), 128 * HANDSHAKES_PER_PEER);
        assert!(handshake_limit(1000) >= 1000 * HANDSHAKES_PER_PEER);
    }
}
