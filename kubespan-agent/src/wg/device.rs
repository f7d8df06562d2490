//! openspan's userspace WireGuard device: boringtun's noise protocol (handshakes, sessions,
//! timers, cookies) driven by I/O loops built for throughput. The TUN device runs with
//! virtio-net offloads, so the kernel hands over TCP super-packets of up to 64 KiB and takes
//! coalesced ones back (`tun-rs` splits and coalesces), and the UDP socket sends and receives
//! batches of datagrams with one call (UDP GSO/GRO). A bulk TCP flow costs a few system calls
//! per 64 KiB instead of four per 1.4 KiB packet.
//!
//! Threads, named after the interface so `top -H` shows them:
//! `wg-<if>-tx` (TUN → encrypt → UDP), `wg-<if>-rx` (UDP → decrypt → TUN) and
//! `wg-<if>-timer` (handshake retries, keepalives, rekeys, handshake rate-limit resets).

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, UNIX_EPOCH};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ip_network::IpNetwork;
use ip_network_table::IpNetworkTable;
use ipnet::IpNet;
use quinn_udp::RecvMeta;
use tun_rs::{DeviceBuilder, GROTable, InterruptEvent, SyncDevice, VIRTIO_NET_HDR_LEN};

use super::udp::{MAX_GSO_BYTES, UdpTransport};
use super::{DeviceSettings, Key, PeerConfig, PeerState, WgError};

/// Handshake initiations per second before cookies are demanded (boringtun's device default).
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// boringtun's timers want a tick at least this often.
const TIMER_TICK: Duration = Duration::from_millis(250);
/// How long the I/O threads block before they look at the stop flag and the socket again.
const IO_WAIT: Duration = Duration::from_millis(250);
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
const DATA_MESSAGE: u8 = 4;

struct Keys {
    private: StaticSecret,
    public: PublicKey,
    rate_limiter: Arc<RateLimiter>,
}

struct Peer {
    public_key: Key,
    preshared_key: Key,
    keepalive: Duration,
    allowed_ips: Vec<IpNet>,
    /// Our receiver index for this peer's sessions (the top 24 bits; boringtun adds 8).
    index: u32,
    tunn: Mutex<Tunn>,
    endpoint: RwLock<Option<SocketAddr>>,
}

impl Peer {
    fn endpoint(&self) -> Option<SocketAddr> {
        *read(&self.endpoint)
    }

    /// Roaming: an authenticated packet from a new address moves the peer there.
    fn roam(&self, from: SocketAddr) {
        if self.endpoint() != Some(from) {
            *write(&self.endpoint) = Some(from);
        }
    }
}

#[derive(Default)]
struct PeerTable {
    by_key: HashMap<Key, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    routes: Routes,
    next_index: u32,
}

/// Longest-prefix match from an inner address to the peer that owns it (allowed IPs).
struct Routes(IpNetworkTable<Arc<Peer>>);

impl Default for Routes {
    fn default() -> Self {
        Self(IpNetworkTable::new())
    }
}

fn network(net: &IpNet) -> Option<IpNetwork> {
    IpNetwork::new_truncate(net.addr(), net.prefix_len()).ok()
}

impl Routes {
    fn lookup(&self, address: IpAddr) -> Option<&Arc<Peer>> {
        self.0.longest_match(address).map(|(_, peer)| peer)
    }

    fn insert(&mut self, peer: &Arc<Peer>) {
        for net in peer.allowed_ips.iter().filter_map(network) {
            self.0.insert(net, peer.clone());
        }
    }

    /// Removes the networks that still point at `peer` (another peer may have taken one over).
    fn remove(&mut self, peer: &Arc<Peer>) {
        for net in peer.allowed_ips.iter().filter_map(network) {
            if self
                .0
                .exact_match(net)
                .is_some_and(|owner| Arc::ptr_eq(owner, peer))
            {
                self.0.remove(net);
            }
        }
    }
}

impl PeerTable {
    fn allocate_index(&mut self) -> u32 {
        loop {
            self.next_index = (self.next_index + 1) & 0x00ff_ffff;
            if !self.by_index.contains_key(&self.next_index) {
                return self.next_index;
            }
        }
    }

    fn insert(&mut self, peer: Arc<Peer>) {
        if let Some(old) = self.by_key.insert(peer.public_key, peer.clone()) {
            self.by_index.remove(&old.index);
            self.routes.remove(&old);
        }
        self.by_index.insert(peer.index, peer.clone());
        self.routes.insert(&peer);
    }

    fn remove(&mut self, key: &Key) -> Option<Arc<Peer>> {
        let old = self.by_key.remove(key)?;
        self.by_index.remove(&old.index);
        self.routes.remove(&old);
        Some(old)
    }
}

struct Shared {
    interface: String,
    stop: AtomicBool,
    keys: RwLock<Option<Keys>>,
    fwmark: RwLock<u32>,
    peers: RwLock<PeerTable>,
    socket: RwLock<Option<Arc<UdpTransport>>>,
    tun: SyncDevice,
    interrupt: InterruptEvent,
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
    fn socket(&self) -> Option<Arc<UdpTransport>> {
        read(&self.socket).clone()
    }

    fn send_to(&self, destination: Option<SocketAddr>, message: &[u8]) {
        let (Some(destination), Some(socket)) = (destination, self.socket()) else {
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
            tracing::info!(interface, "the TUN device has no offloads here; packets are handled one by one");
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
            interrupt: InterruptEvent::new()?,
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
        let private = StaticSecret::from(settings.private_key);
        let public = PublicKey::from(&private);
        let key_changed = read(&self.shared.keys)
            .as_ref()
            .is_none_or(|keys| keys.public != public);
        if key_changed {
            let rate_limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
            for peer in read(&self.shared.peers).by_key.values() {
                lock(&peer.tunn).set_static_private(
                    private.clone(),
                    public,
                    Some(rate_limiter.clone()),
                );
            }
            *write(&self.shared.keys) = Some(Keys {
                private,
                public,
                rate_limiter,
            });
        }
        let current = self.shared.socket();
        let mark_changed = *read(&self.shared.fwmark) != settings.fwmark;
        let port_changed = current
            .as_ref()
            .is_none_or(|s| settings.listen_port != 0 && s.port() != settings.listen_port);
        if port_changed || mark_changed {
            // The old socket is closed first: it holds the port.
            *write(&self.shared.socket) = None;
            drop(current);
            let socket = UdpTransport::bind(settings.listen_port, settings.fwmark).map_err(|e| {
                device_error(
                    &self.shared.interface,
                    format!(
                        "cannot listen on UDP port {} ({e}); is another WireGuard or agent using it?",
                        settings.listen_port
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
            *write(&self.shared.socket) = Some(Arc::new(socket));
            *write(&self.shared.fwmark) = settings.fwmark;
        }
        Ok(())
    }

    /// Adds or updates a peer. Allowed IPs, keepalive-free changes and endpoints are updated in
    /// place (the session stays); with `reset_session` (or a new preshared key or keepalive)
    /// the peer gets a fresh session and a handshake toward its endpoint starts at once.
    pub fn set_peer(&self, config: &PeerConfig, reset_session: bool) -> Result<(), WgError> {
        let keys = read(&self.shared.keys);
        let Some(keys) = keys.as_ref() else {
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
                // over under the table's write lock, so no packet sees the peer missing).
                let tunn = std::mem::replace(
                    &mut *lock(&old.tunn),
                    new_tunn(keys, config, old.index),
                );
                let peer = Arc::new(Peer {
                    public_key: config.public_key,
                    preshared_key: config.preshared_key,
                    keepalive: config.persistent_keepalive,
                    allowed_ips: config.allowed_ips.clone(),
                    index: old.index,
                    tunn: Mutex::new(tunn),
                    endpoint: RwLock::new(endpoint),
                });
                peers.insert(peer);
            } else if endpoint != old.endpoint() {
                *write(&old.endpoint) = endpoint;
            }
            return Ok(());
        }
        let index = peers.allocate_index();
        let peer = Arc::new(Peer {
            public_key: config.public_key,
            preshared_key: config.preshared_key,
            keepalive: config.persistent_keepalive,
            allowed_ips: config.allowed_ips.clone(),
            index,
            tunn: Mutex::new(new_tunn(keys, config, index)),
            endpoint: RwLock::new(endpoint),
        });
        peers.insert(peer.clone());
        drop(peers);
        // Start the handshake now rather than on the first packet or keepalive.
        let mut message = [0u8; MIN_MESSAGE_ROOM];
        let initiation = match lock(&peer.tunn).format_handshake_initiation(&mut message, false) {
            TunnResult::WriteToNetwork(m) => Some(m.len()),
            _ => None,
        };
        if let Some(len) = initiation {
            self.shared.send_to(endpoint, &message[..len]);
        }
        Ok(())
    }

    pub fn remove_peer(&self, public_key: &Key) {
        write(&self.shared.peers).remove(public_key);
    }

    pub fn peers(&self) -> Vec<PeerState> {
        let peers = read(&self.shared.peers);
        let mut list: Vec<PeerState> = peers.by_key.values().map(|p| peer_state(p)).collect();
        list.sort_by_key(|p| p.public_key);
        list
    }

    /// The device in `wg(8)`'s userspace-API `get` format (without the final `errno=`).
    pub fn uapi_get(&self) -> String {
        let mut out = String::new();
        if let Some(keys) = read(&self.shared.keys).as_ref() {
            out += &format!("private_key={}\n", hex::encode(keys.private.to_bytes()));
        }
        if let Some(socket) = self.shared.socket() {
            out += &format!("listen_port={}\n", socket.port());
        }
        let fwmark = *read(&self.shared.fwmark);
        if fwmark != 0 {
            out += &format!("fwmark={fwmark}\n");
        }
        let peers = read(&self.shared.peers);
        let mut list: Vec<&Arc<Peer>> = peers.by_key.values().collect();
        list.sort_by_key(|p| p.public_key);
        for peer in list {
            let state = peer_state(peer);
            out += &format!("public_key={}\n", hex::encode(peer.public_key));
            if peer.preshared_key != [0; 32] {
                out += &format!("preshared_key={}\n", hex::encode(peer.preshared_key));
            }
            out += "protocol_version=1\n";
            if let Some(endpoint) = state.endpoint {
                out += &format!("endpoint={endpoint}\n");
            }
            out += &format!(
                "persistent_keepalive_interval={}\n",
                peer.keepalive.as_secs()
            );
            for ip in &peer.allowed_ips {
                out += &format!("allowed_ip={ip}\n");
            }
            if let Some(time) = state.last_handshake {
                let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
                out += &format!(
                    "last_handshake_time_sec={}\nlast_handshake_time_nsec={}\n",
                    since.as_secs(),
                    since.subsec_nanos()
                );
            }
            out += &format!("rx_bytes={}\ntx_bytes={}\n", state.rx_bytes, state.tx_bytes);
        }
        out
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.shared.interrupt.trigger();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
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
        Some(keys.rate_limiter.clone()),
    )
}

fn peer_state(peer: &Peer) -> PeerState {
    let tunn = lock(&peer.tunn);
    let (_, tx_bytes, rx_bytes, _, _) = tunn.stats();
    let last_handshake = tunn.last_handshake_time().map(|since| UNIX_EPOCH + since);
    drop(tunn);
    PeerState {
        public_key: peer.public_key,
        endpoint: peer.endpoint(),
        last_handshake,
        rx_bytes: rx_bytes as u64,
        tx_bytes: tx_bytes as u64,
        allowed_ips: peer.allowed_ips.clone(),
    }
}

/// Consecutive encrypted datagrams in the send buffer that go to one destination in one call:
/// all `segment` bytes long except the last, which may be shorter (and closes the batch).
#[derive(Debug, PartialEq, Eq)]
struct Batch {
    destination: SocketAddr,
    start: usize,
    end: usize,
    segment: usize,
    closed: bool,
}

/// Appends the datagram at `start..start + len` of the send buffer to the last batch when one
/// GSO send can carry it, else starts a new batch. Handshake messages travel alone.
fn add_to_batches(
    batches: &mut Vec<Batch>,
    destination: SocketAddr,
    start: usize,
    len: usize,
    is_data: bool,
    max_segments: usize,
) {
    if is_data
        && let Some(last) = batches.last_mut()
        && !last.closed
        && last.destination == destination
        && last.end == start
        && len <= last.segment
        && (last.end - last.start) / last.segment < max_segments
        && last.end - last.start + len <= MAX_GSO_BYTES
    {
        last.end += len;
        last.closed = len < last.segment;
        return;
    }
    batches.push(Batch {
        destination,
        start,
        end: start + len,
        segment: len,
        closed: !is_data,
    });
}

/// TUN → peers: reads (super-)packets, encrypts each for the peer owning its destination and
/// sends runs of equal-sized datagrams with one GSO call.
fn tun_to_network(shared: &Shared) {
    let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + 65_536];
    let mut packets = vec![vec![0u8; 65_536]; TUN_BATCH];
    let mut sizes = vec![0usize; TUN_BATCH];
    // One read's packets encrypted back to back: at most 64 KiB of payload plus headers
    // repeated per segment and WireGuard's overhead.
    let mut out = vec![0u8; 2 * 65_536 + TUN_BATCH * MIN_MESSAGE_ROOM];
    let mut batches: Vec<Batch> = Vec::new();
    while !shared.stop.load(Ordering::Relaxed) {
        let count = match shared.tun.recv_multiple(&mut original, &mut packets, &mut sizes, 0) {
            Ok(count) => count,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let _ = shared
                    .tun
                    .wait_readable_intr_timeout(&shared.interrupt, Some(IO_WAIT));
                continue;
            }
            Err(e) => {
                if !shared.stop.load(Ordering::Relaxed) {
                    tracing::debug!(interface = %shared.interface, error = %e, "TUN read failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
        };
        let Some(socket) = shared.socket() else {
            continue;
        };
        let max_segments = socket.max_segments();
        batches.clear();
        let peers = read(&shared.peers);
        let mut used = 0;
        let mut index = 0;
        while index < count {
            let Some(peer) = Tunn::dst_address(&packets[index][..sizes[index]])
                .and_then(|dst| peers.routes.lookup(dst))
                .cloned()
            else {
                index += 1;
                continue;
            };
            let destination = peer.endpoint();
            let mut tunn = lock(&peer.tunn);
            // This peer's consecutive packets (one super-packet's segments share a peer).
            while index < count {
                let packet = &packets[index][..sizes[index]];
                if index > 0
                    && Tunn::dst_address(packet)
                        .and_then(|dst| peers.routes.lookup(dst))
                        .is_none_or(|p| !Arc::ptr_eq(p, &peer))
                {
                    break;
                }
                index += 1;
                let room = (packet.len() + DATA_OVERHEAD).max(MIN_MESSAGE_ROOM);
                if used + room > out.len() {
                    // Cannot happen with TUN_BATCH packets of at most 64 KiB in total; drop
                    // rather than overrun.
                    continue;
                }
                let len = match tunn.encapsulate(packet, &mut out[used..used + room]) {
                    TunnResult::WriteToNetwork(message) => message.len(),
                    TunnResult::Err(e) => {
                        tracing::trace!(error = ?e, "encapsulate failed");
                        continue;
                    }
                    // Queued until a handshake completes.
                    _ => continue,
                };
                let Some(destination) = destination else {
                    continue;
                };
                let is_data = out[used] == DATA_MESSAGE;
                add_to_batches(&mut batches, destination, used, len, is_data, max_segments);
                used += len;
            }
        }
        drop(peers);
        for batch in &batches {
            let contents = &out[batch.start..batch.end];
            if let Err(e) = socket.send(batch.destination, contents, Some(batch.segment)) {
                tracing::debug!(interface = %shared.interface, destination = %batch.destination, error = %e, "WireGuard send failed");
            }
        }
    }
}

/// Decrypted packets waiting to be written to the TUN device in one coalescing batch.
struct TunBatch {
    packets: Vec<Vec<u8>>,
    count: usize,
    gro: GROTable,
}

impl TunBatch {
    fn new() -> Self {
        Self {
            packets: (0..TUN_BATCH)
                .map(|_| Vec::with_capacity(TUN_BUFFER))
                .collect(),
            count: 0,
            gro: GROTable::new(),
        }
    }

    fn flush(&mut self, shared: &Shared) {
        if self.count == 0 {
            return;
        }
        let written = shared.tun.send_multiple(
            &mut self.gro,
            &mut self.packets[..self.count],
            VIRTIO_NET_HDR_LEN,
        );
        if let Err(e) = written {
            tracing::debug!(interface = %shared.interface, error = %e, "TUN write failed");
        }
        self.count = 0;
    }
}

/// Peers → TUN: receives batches of datagrams, decrypts them and writes the packets to the TUN
/// device, coalescing TCP segments of a flow into super-packets.
fn network_to_tun(shared: &Shared) {
    let mut storage = vec![vec![0u8; UDP_BUFFER]; UDP_BATCH];
    let mut meta = vec![RecvMeta::default(); UDP_BATCH];
    let mut batch = TunBatch::new();
    let mut scratch = vec![0u8; 65_536];
    while !shared.stop.load(Ordering::Relaxed) {
        let Some(socket) = shared.socket() else {
            std::thread::sleep(IO_WAIT);
            continue;
        };
        let received = {
            let mut slices: Vec<IoSliceMut<'_>> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            socket.recv(&mut slices, &mut meta)
        };
        let count = match received {
            Ok(0) => {
                let _ = socket.wait_readable(IO_WAIT);
                continue;
            }
            Ok(count) => count,
            Err(e) => {
                tracing::debug!(interface = %shared.interface, error = %e, "UDP receive failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let keys = read(&shared.keys);
        let Some(keys) = keys.as_ref() else {
            continue;
        };
        let peers = read(&shared.peers);
        for (received, buffer) in meta[..count].iter().zip(&storage) {
            let stride = received.stride.max(1);
            for datagram in buffer[..received.len].chunks(stride) {
                if batch.count == batch.packets.len() {
                    batch.flush(shared);
                }
                receive_datagram(
                    shared,
                    keys,
                    &peers,
                    received.addr,
                    datagram,
                    &mut batch,
                    &mut scratch,
                );
            }
        }
        drop(peers);
        batch.flush(shared);
    }
}

fn receive_datagram(
    shared: &Shared,
    keys: &Keys,
    peers: &PeerTable,
    from: SocketAddr,
    datagram: &[u8],
    batch: &mut TunBatch,
    scratch: &mut [u8],
) {
    let packet = match keys
        .rate_limiter
        .verify_packet(Some(from.ip()), datagram, scratch)
    {
        Ok(packet) => packet,
        Err(TunnResult::WriteToNetwork(cookie)) => {
            // Under a handshake flood: answer with a cookie instead of doing the DH.
            shared.send_to(Some(from), cookie);
            return;
        }
        Err(_) => return,
    };
    let peer = match &packet {
        Packet::HandshakeInit(init) => parse_handshake_anon(&keys.private, &keys.public, init)
            .ok()
            .and_then(|half| peers.by_key.get(&half.peer_static_public)),
        Packet::HandshakeResponse(response) => peers.by_index.get(&(response.receiver_idx >> 8)),
        Packet::PacketCookieReply(reply) => peers.by_index.get(&(reply.receiver_idx >> 8)),
        Packet::PacketData(data) => peers.by_index.get(&(data.receiver_idx >> 8)),
    };
    let Some(peer) = peer else {
        return;
    };
    let is_data = matches!(packet, Packet::PacketData(_));
    let buffer = &mut batch.packets[batch.count];
    buffer.resize(VIRTIO_NET_HDR_LEN + datagram.len(), 0);
    let mut tunn = lock(&peer.tunn);
    match tunn.decapsulate(Some(from.ip()), datagram, &mut buffer[VIRTIO_NET_HDR_LEN..]) {
        TunnResult::WriteToTunnelV4(inner, source) => {
            let len = inner.len();
            accept_inner(peers, peer, IpAddr::V4(source), len, batch, from);
        }
        TunnResult::WriteToTunnelV6(inner, source) => {
            let len = inner.len();
            accept_inner(peers, peer, IpAddr::V6(source), len, batch, from);
        }
        TunnResult::WriteToNetwork(message) => {
            // A handshake answer; then whatever waited for the new session.
            peer.roam(from);
            shared.send_to(Some(from), message);
            while let TunnResult::WriteToNetwork(queued) = tunn.decapsulate(None, &[], scratch) {
                shared.send_to(Some(from), queued);
            }
        }
        TunnResult::Done => {
            // A keepalive (or a cookie): authenticated data moves the endpoint too.
            if is_data {
                peer.roam(from);
            }
        }
        TunnResult::Err(e) => {
            tracing::trace!(peer = %hex::encode(peer.public_key), error = ?e, "decapsulate failed");
        }
    }
}

/// Keeps a decrypted packet when its source address belongs to the peer that sent it
/// (WireGuard's cryptokey routing); anything else is dropped.
fn accept_inner(
    peers: &PeerTable,
    peer: &Arc<Peer>,
    source: IpAddr,
    len: usize,
    batch: &mut TunBatch,
    from: SocketAddr,
) {
    let owned = peers
        .routes
        .lookup(source)
        .is_some_and(|owner| Arc::ptr_eq(owner, peer));
    if !owned {
        tracing::trace!(%source, "dropped a packet from an address the peer does not own");
        return;
    }
    peer.roam(from);
    batch.packets[batch.count].truncate(VIRTIO_NET_HDR_LEN + len);
    batch.count += 1;
}

/// boringtun's timers: handshake retries and rekeys, keepalives, session expiry; and the
/// once-a-second reset of the handshake rate limiter.
fn timers(shared: &Shared) {
    let mut message = vec![0u8; 2_048];
    let mut last_reset = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        std::thread::sleep(TIMER_TICK);
        if last_reset.elapsed() >= Duration::from_secs(1) {
            if let Some(keys) = read(&shared.keys).as_ref() {
                keys.rate_limiter.reset_count();
            }
            last_reset = Instant::now();
        }
        let peers: Vec<Arc<Peer>> = read(&shared.peers).by_key.values().cloned().collect();
        for peer in peers {
            let len = match lock(&peer.tunn).update_timers(&mut message) {
                TunnResult::WriteToNetwork(m) => m.len(),
                _ => continue,
            };
            shared.send_to(peer.endpoint(), &message[..len]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    #[test]
    fn equal_datagrams_share_a_batch_and_a_shorter_one_closes_it() {
        let mut batches = Vec::new();
        for i in 0..3 {
            add_to_batches(&mut batches, addr(1), i * 100, 100, true, 64);
        }
        add_to_batches(&mut batches, addr(1), 300, 60, true, 64);
        add_to_batches(&mut batches, addr(1), 360, 60, true, 64);
        assert_eq!(
            batches,
            vec![
                Batch { destination: addr(1), start: 0, end: 360, segment: 100, closed: true },
                Batch { destination: addr(1), start: 360, end: 420, segment: 60, closed: false },
            ]
        );
    }

    #[test]
    fn batches_split_on_destination_size_limits_and_handshakes() {
        let mut batches = Vec::new();
        add_to_batches(&mut batches, addr(1), 0, 100, true, 2);
        add_to_batches(&mut batches, addr(1), 100, 100, true, 2);
        // Segment limit reached.
        add_to_batches(&mut batches, addr(1), 200, 100, true, 2);
        // Another destination.
        add_to_batches(&mut batches, addr(2), 300, 100, true, 2);
        // A larger datagram cannot join.
        add_to_batches(&mut batches, addr(2), 400, 200, true, 2);
        // A handshake travels alone, and nothing joins it.
        add_to_batches(&mut batches, addr(2), 600, 148, false, 2);
        add_to_batches(&mut batches, addr(2), 748, 148, true, 2);
        let starts: Vec<usize> = batches.iter().map(|b| b.start).collect();
        assert_eq!(starts, vec![0, 200, 300, 400, 600, 748]);
        let mut big = Vec::new();
        for i in 0..50 {
            add_to_batches(&mut big, addr(1), i * 1_452, 1_452, true, 64);
        }
        assert!(big.iter().all(|b| b.end - b.start <= MAX_GSO_BYTES));
        assert_eq!(big.len(), 2);
    }
}
