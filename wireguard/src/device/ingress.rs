//! Network → TUN: receives batches of datagrams (UDP GRO), decrypts them, keeps the packets
//! whose source the sending peer owns and writes them to the TUN device, coalescing the TCP
//! segments of a flow into super-packets.

use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use quinn_udp::RecvMeta;
use tun_rs::{GROTable, VIRTIO_NET_HDR_LEN};

use super::egress::{Pumped, hand_over_tun};
use super::gate::{Admission, HANDSHAKE_RATE_LIMIT, HandshakeGate};
use super::peers::{Peer, PeerTable};
use super::{
    DATA_MESSAGE, HANDSHAKE_INITIATION, HANDSHAKE_RESPONSE, Keys, RX_PUMP_READS, STUN_INBOX,
    Shared, TUN_BATCH, TUN_BUFFER, UDP_BATCH, UDP_BUFFER, lock, read,
};
use crate::wake::wait_readable;

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

/// Whether a datagram looks like a handshake message (initiation or response): the ones that
/// can cost a DH, so the gate decides about them.
fn is_handshake(datagram: &[u8]) -> bool {
    matches!(
        datagram.first(),
        Some(&HANDSHAKE_INITIATION | &HANDSHAKE_RESPONSE)
    )
}

/// Peers → TUN: receives batches of datagrams, decrypts them and writes the packets to the TUN
/// device, coalescing TCP segments of a flow into super-packets. In each batch the data goes
/// first and to the TUN device at once; the handshakes follow, through the [`HandshakeGate`],
/// so a handshake flood delays no packet of an established session by more than one batch.
pub(super) fn network_to_tun(shared: &Shared) {
    let mut gate = HandshakeGate::new(HANDSHAKE_RATE_LIMIT);
    let mut storage = vec![vec![0u8; UDP_BUFFER]; UDP_BATCH];
    let mut meta = vec![RecvMeta::default(); UDP_BATCH];
    let mut batch = TunBatch::new();
    // Room for any message boringtun may write, including a queued packet of the largest MTU.
    let mut scratch = vec![0u8; 2 * 65_536];
    // Handshake answers and packets released by a new session, sent once no lock is held.
    let mut outbox: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
    while !shared.stop.load(Ordering::Relaxed) {
        let Some(socket) = shared.socket() else {
            let _ = wait_readable([shared.rx_wake.fd(), shared.stopping.fd()], None);
            shared.rx_wake.clear();
            continue;
        };
        // Relayed packets take at most half of the batch, and the socket is read every time:
        // a busy relay must not starve direct peers (or the handshakes that move a peer off it).
        let relayed = take_relayed(
            shared,
            &mut storage[..UDP_BATCH / 2],
            &mut meta[..UDP_BATCH / 2],
        );
        let received = {
            let mut slices: Vec<IoSliceMut<'_>> = storage[relayed..]
                .iter_mut()
                .map(|b| IoSliceMut::new(b))
                .collect();
            match socket.recv(&mut slices, &mut meta[relayed..]) {
                Ok(count) => Ok(relayed + count),
                Err(_) if relayed > 0 => Ok(relayed),
                Err(e) => Err(e),
            }
        };
        let count = match received {
            Ok(0) => {
                if !shared.tx_active.load(Ordering::Acquire) {
                    // The TUN device is ours to watch too.
                    if let Ok(mut egress) = shared.egress.try_lock()
                        && let Pumped::Busy = egress.pump(shared, RX_PUMP_READS)
                    {
                        hand_over_tun(shared);
                        continue;
                    }
                    let fds = [
                        socket.as_fd(),
                        shared.rx_wake.fd(),
                        shared.stopping.fd(),
                        shared.tun.as_fd(),
                    ];
                    if let Ok([_, true, _, _]) = wait_readable(fds, None) {
                        shared.rx_wake.clear();
                    }
                } else {
                    let fds = [socket.as_fd(), shared.rx_wake.fd(), shared.stopping.fd()];
                    if let Ok([_, true, _]) = wait_readable(fds, None) {
                        shared.rx_wake.clear();
                    }
                }
                continue;
            }
            Ok(count) => count,
            Err(e) => {
                tracing::debug!(interface = %shared.interface, error = %e, "UDP receive failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let datagrams = || {
            meta[..count]
                .iter()
                .zip(&storage)
                .flat_map(|(received, buffer)| {
                    buffer[..received.len]
                        .chunks(received.stride.max(1))
                        .map(|datagram| (received.addr, datagram))
                })
        };
        // STUN shares the socket (the agent learns this socket's NAT mapping): recognised by
        // its magic cookie, which no WireGuard message has where STUN keeps it.
        // Only answers from servers asked recently are kept: anyone can send the cookie.
        if datagrams().any(|(_, d)| openspan_stun::is_stun(d)) {
            let now = Instant::now();
            let mut inbox = lock(&shared.stun_inbox);
            for (from, datagram) in datagrams().filter(|(_, d)| openspan_stun::is_stun(d)) {
                if inbox.len() < STUN_INBOX && shared.stun_expected(from, now) {
                    inbox.push_back((from, datagram.to_vec()));
                }
            }
        }
        let keys_guard = read(&shared.keys);
        let Some(keys) = keys_guard.as_ref() else {
            continue;
        };
        let peers = read(&shared.peers);
        let wireguard = |(_, d): &(SocketAddr, &[u8])| !openspan_stun::is_stun(d);
        let mut undecryptable = 0;
        for (from, datagram) in datagrams()
            .filter(wireguard)
            .filter(|(_, d)| !is_handshake(d))
        {
            if batch.count == batch.packets.len() {
                batch.flush(shared);
            }
            let received = receive_datagram(
                keys,
                &peers,
                from,
                datagram,
                &mut batch,
                &mut scratch,
                &mut outbox,
            );
            if received == Received::Undecryptable {
                undecryptable += 1;
            }
        }
        if undecryptable > 0 {
            shared
                .decrypt_failures
                .fetch_add(undecryptable, Ordering::Relaxed);
        }
        batch.flush(shared);
        let now = Instant::now();
        gate.set_limit(keys.handshake_limit);
        for (from, datagram) in datagrams()
            .filter(wireguard)
            .filter(|(_, d)| is_handshake(d))
        {
            if batch.count == batch.packets.len() {
                batch.flush(shared);
            }
            receive_handshake(
                &mut gate,
                now,
                keys,
                &peers,
                from,
                datagram,
                &mut batch,
                &mut scratch,
                &mut outbox,
            );
        }
        drop(peers);
        drop(keys_guard);
        batch.flush(shared);
        for (destination, message) in outbox.drain(..) {
            shared.send_to(Some(destination), &message);
        }
        // Writing to the TUN device usually made the kernel answer at once (an ACK, an echo
        // reply): send it from here unless the transmit thread has the TUN device.
        if !shared.tx_active.load(Ordering::Acquire)
            && let Ok(mut egress) = shared.egress.try_lock()
            && let Pumped::Busy = egress.pump(shared, RX_PUMP_READS)
        {
            hand_over_tun(shared);
        }
    }
}

/// Moves packets relays delivered into the receive buffers, as if the socket had received them
/// from their placeholder addresses; returns how many.
fn take_relayed(shared: &Shared, storage: &mut [Vec<u8>], meta: &mut [RecvMeta]) -> usize {
    let mut inbox = lock(&shared.relay_inbox);
    let mut count = 0;
    while count < storage.len()
        && let Some((from, packet)) = inbox.pop_front()
    {
        if packet.len() > storage[count].len() {
            continue;
        }
        storage[count][..packet.len()].copy_from_slice(&packet);
        let mut received = RecvMeta::default();
        received.addr = from;
        received.len = packet.len();
        received.stride = packet.len();
        meta[count] = received;
        count += 1;
    }
    count
}

/// A handshake message: the gate decides whether it is worth a DH, a cookie reply or nothing.
#[allow(clippy::too_many_arguments)]
fn receive_handshake(
    gate: &mut HandshakeGate,
    now: Instant,
    keys: &Keys,
    peers: &PeerTable,
    from: SocketAddr,
    datagram: &[u8],
    batch: &mut TunBatch,
    scratch: &mut [u8],
    outbox: &mut Vec<(SocketAddr, Vec<u8>)>,
) {
    match gate.admit(keys, now, from, datagram, scratch) {
        Admission::Drop => {}
        Admission::CookieReply(len) => outbox.push((from, scratch[..len].to_vec())),
        Admission::Process => {
            // Handshakes are not data: whatever happened, it is no decrypt failure.
            let _ = receive_datagram(keys, peers, from, datagram, batch, scratch, outbox);
        }
    }
}

/// What became of one datagram, as far as the device's counters care.
#[derive(Debug, PartialEq, Eq)]
enum Received {
    /// Handled: decrypted, answered, or a handshake (whatever its fate).
    Handled,
    /// A data message that did not decrypt: no session has its receiver index, or its
    /// authentication tag or counter failed.
    Undecryptable,
}

#[allow(clippy::too_many_arguments)]
fn receive_datagram(
    keys: &Keys,
    peers: &PeerTable,
    from: SocketAddr,
    datagram: &[u8],
    batch: &mut TunBatch,
    scratch: &mut [u8],
    outbox: &mut Vec<(SocketAddr, Vec<u8>)>,
) -> Received {
    let data_message = datagram.first() == Some(&DATA_MESSAGE);
    let failed = if data_message {
        Received::Undecryptable
    } else {
        Received::Handled
    };
    // Handshakes passed the gate already (which decided about load and cookies); this parses
    // and checks mac1: sealed to our key, or during a rotation's grace to the previous one.
    let (packet, to_previous_key) =
        match keys
            .unlimited
            .verify_packet(Some(from.ip()), datagram, scratch)
        {
            Ok(packet) => (packet, false),
            Err(_) => {
                let Some(Ok(packet)) = keys.previous.as_ref().map(|previous| {
                    previous
                        .unlimited
                        .verify_packet(Some(from.ip()), datagram, scratch)
                }) else {
                    return failed;
                };
                (packet, true)
            }
        };
    // The receiver index says which of a peer's Tunns a message is for (the one from before a
    // key change has its own); an initiation, which key it was sealed to.
    let found = match &packet {
        Packet::HandshakeInit(init) => {
            let (private, public) = match (&keys.previous, to_previous_key) {
                (Some(previous), true) => (&previous.private, &previous.public),
                _ => (&keys.private, &keys.public),
            };
            parse_handshake_anon(private, public, init)
                .ok()
                .and_then(|half| peers.by_key.get(&half.peer_static_public))
                .map(|peer| (peer, to_previous_key))
        }
        Packet::HandshakeResponse(response) => by_index(peers, response.receiver_idx),
        Packet::PacketCookieReply(reply) => by_index(peers, reply.receiver_idx),
        Packet::PacketData(data) => by_index(peers, data.receiver_idx),
    };
    let Some((peer, previous)) = found else {
        return failed;
    };
    let is_data = matches!(packet, Packet::PacketData(_));
    let is_cookie = matches!(packet, Packet::PacketCookieReply(_));
    let buffer = &mut batch.packets[batch.count];
    buffer.resize(VIRTIO_NET_HDR_LEN + datagram.len(), 0);
    let mut current_guard;
    let mut previous_guard;
    let tunn: &mut Tunn = if previous {
        previous_guard = lock(&peer.previous);
        match previous_guard.as_mut() {
            Some(previous) => &mut previous.tunn,
            None => return failed,
        }
    } else {
        current_guard = lock(&peer.tunn);
        &mut current_guard
    };
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
            let authenticated =
                matches!(message.first(), Some(&HANDSHAKE_RESPONSE | &DATA_MESSAGE));
            outbox.push((from, message.to_vec()));
            // A handshake answer (to an authenticated initiation or response) moves the peer
            // here and releases what waited for the session; a cookie reply does neither.
            if authenticated {
                peer.roam(from);
                while let TunnResult::WriteToNetwork(queued) = tunn.decapsulate(None, &[], scratch)
                {
                    outbox.push((from, queued.to_vec()));
                }
            }
        }
        TunnResult::Done => {
            // A keepalive (or a cookie): authenticated data moves the endpoint too.
            if is_data {
                peer.roam(from);
            }
            // The responder is under load and sent a valid cookie for our last message: send
            // the initiation again now, with mac2, rather than after REKEY_TIMEOUT (5 s). A
            // cookie reply answers one message (it is sealed to that message's mac1), so this
            // sends at most one initiation per message of ours.
            if is_cookie
                && let TunnResult::WriteToNetwork(initiation) =
                    tunn.format_handshake_initiation(scratch, true)
            {
                outbox.push((peer.endpoint().unwrap_or(from), initiation.to_vec()));
            }
        }
        TunnResult::Err(e) => {
            tracing::trace!(peer = %hex::encode(peer.public_key), error = ?e, "decapsulate failed");
            return failed;
        }
    }
    Received::Handled
}

/// The peer a receiver index belongs to, and whether it is its session from before a key
/// change.
fn by_index(peers: &PeerTable, receiver: u32) -> Option<(&Arc<Peer>, bool)> {
    let index = receiver >> 8;
    let peer = peers.by_index.get(&index)?;
    Some((peer, peer.index != index))
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
    // The owner may be the re-created successor of `peer`, whose previous session decrypted
    // this packet (see `RETIRED_FOR`): the same key owns the same addresses.
    let Some(owner) = peers
        .routes
        .lookup(source)
        .filter(|owner| Arc::ptr_eq(owner, peer) || owner.public_key == peer.public_key)
    else {
        tracing::trace!(%source, "dropped a packet from an address the peer does not own");
        return;
    };
    // boringtun checks the IP length field against the packet, not a minimum; a header-less
    // packet would make the TUN write of the whole batch fail.
    let minimum = if source.is_ipv4() { 20 } else { 40 };
    if len < minimum {
        return;
    }
    // The live peer roams (the owner), not a re-created one's retiring entry.
    owner.roam(from);
    batch.packets[batch.count].truncate(VIRTIO_NET_HDR_LEN + len);
    batch.count += 1;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use boringtun::noise::Tunn;
    use boringtun::noise::rate_limiter::RateLimiter;
    use boringtun::x25519::{PublicKey, StaticSecret};

    use super::*;
    use crate::PeerConfig;

    const COOKIE_REPLY: u8 = 3;
    const OURS: [u8; 32] = [7; 32];
    const THEIRS: [u8; 32] = [9; 32];

    fn keys() -> Keys {
        let private = StaticSecret::from(OURS);
        let public = PublicKey::from(&private);
        Keys {
            cookies: Arc::new(RateLimiter::new(&public, 0)),
            handshake_limit: 100,
            unlimited: Arc::new(RateLimiter::new(&public, u64::MAX)),
            private,
            public,
            previous: None,
        }
    }

    /// Our device's table with the one peer `THEIRS`, last seen at `endpoint`.
    fn table(keys: &Keys, endpoint: SocketAddr) -> PeerTable {
        let mut table = PeerTable::default();
        let index = table.allocate_index();
        let config = PeerConfig {
            public_key: PublicKey::from(&StaticSecret::from(THEIRS)).to_bytes(),
            preshared_key: [0; 32],
            endpoint: Some(endpoint),
            allowed_ips: vec!["10.0.0.2/32".parse().unwrap()],
            persistent_keepalive: Duration::ZERO,
        };
        let tunn = super::super::new_tunn(keys, &config, index);
        table.insert(Peer::new(&config, index, tunn, Some(endpoint)));
        table
    }

    /// A genuine handshake initiation from the peer.
    fn initiation(remote: &mut Tunn) -> Vec<u8> {
        let mut buffer = [0u8; 256];
        match remote.format_handshake_initiation(&mut buffer, true) {
            TunnResult::WriteToNetwork(message) => message.to_vec(),
            other => panic!("no initiation: {other:?}"),
        }
    }

    fn endpoint(table: &PeerTable) -> Option<SocketAddr> {
        table.by_key.values().next().and_then(|p| p.endpoint())
    }

    /// The peer `THEIRS` as a bare Tunn, talking to our device.
    fn remote(keys: &Keys) -> Tunn {
        Tunn::new(
            StaticSecret::from(THEIRS),
            keys.public,
            Some([0; 32]),
            None,
            1,
            None,
        )
    }

    #[test]
    fn an_initiation_is_answered_and_moves_the_peer_but_a_cookie_never_does() {
        let keys = keys();
        let mut gate = HandshakeGate::new(1);
        let now = Instant::now();
        let home: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let roamed: SocketAddr = "192.0.2.2:51820".parse().unwrap();
        let flooder: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let peers = table(&keys, home);
        let mut remote = remote(&keys);
        let mut batch = TunBatch::new();
        let mut scratch = vec![0u8; 2 * 65_536];
        let mut outbox = Vec::new();

        // Within the limit: answered with a handshake response, and the peer roams.
        let first = initiation(&mut remote);
        receive_handshake(
            &mut gate,
            now,
            &keys,
            &peers,
            roamed,
            &first,
            &mut batch,
            &mut scratch,
            &mut outbox,
        );
        assert_eq!(outbox.len(), 1);
        assert_eq!((outbox[0].0, outbox[0].1[0]), (roamed, HANDSHAKE_RESPONSE));
        assert_eq!(endpoint(&peers), Some(roamed));

        // Over the limit: a cookie reply (type 3) to the sender, no DH, and no roaming.
        outbox.clear();
        let second = initiation(&mut remote);
        receive_handshake(
            &mut gate,
            now,
            &keys,
            &peers,
            flooder,
            &second,
            &mut batch,
            &mut scratch,
            &mut outbox,
        );
        assert_eq!(outbox.len(), 1);
        assert_eq!((outbox[0].0, outbox[0].1[0]), (flooder, COOKIE_REPLY));
        assert_eq!(
            endpoint(&peers),
            Some(roamed),
            "a cookie reply moved the peer"
        );
        assert_eq!(batch.count, 0);

        // The flooder's source gets its burst of answers, then nothing.
        outbox.clear();
        for _ in 0..20 {
            receive_handshake(
                &mut gate,
                now,
                &keys,
                &peers,
                flooder,
                &second,
                &mut batch,
                &mut scratch,
                &mut outbox,
            );
        }
        assert_eq!(
            outbox.len() as u64,
            super::super::gate::PER_SOURCE_BURST - 1
        );
    }

    #[test]
    fn under_load_an_initiation_with_the_cookie_is_answered() {
        let keys = keys();
        let mut gate = HandshakeGate::new(0);
        let now = Instant::now();
        let home: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let peers = table(&keys, home);
        let mut remote = remote(&keys);
        let mut batch = TunBatch::new();
        let mut scratch = vec![0u8; 2 * 65_536];
        let mut outbox = Vec::new();
        let first = initiation(&mut remote);
        receive_handshake(
            &mut gate,
            now,
            &keys,
            &peers,
            home,
            &first,
            &mut batch,
            &mut scratch,
            &mut outbox,
        );
        let (_, cookie) = outbox.pop().expect("a cookie reply");
        assert_eq!(cookie[0], COOKIE_REPLY);
        let mut buffer = [0u8; 256];
        assert!(matches!(
            remote.decapsulate(Some(home.ip()), &cookie, &mut buffer),
            TunnResult::Done
        ));
        let second = match remote.format_handshake_initiation(&mut buffer, true) {
            TunnResult::WriteToNetwork(message) => message.to_vec(),
            other => panic!("no initiation: {other:?}"),
        };
        assert_ne!(second[132..], [0; 16], "no mac2 with the cookie");
        receive_handshake(
            &mut gate,
            now,
            &keys,
            &peers,
            home,
            &second,
            &mut batch,
            &mut scratch,
            &mut outbox,
        );
        assert_eq!(outbox.len(), 1);
        assert_eq!(outbox[0].1[0], HANDSHAKE_RESPONSE);
    }

    #[test]
    fn a_cookie_reply_makes_our_device_initiate_again_at_once_with_mac2() {
        let keys = keys();
        let responder: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let ours: IpAddr = "192.0.2.9".parse().unwrap();
        let peers = table(&keys, responder);
        let peer = peers.by_key.values().next().unwrap().clone();
        let mut buffer = [0u8; 256];
        let first = match lock(&peer.tunn).format_handshake_initiation(&mut buffer, false) {
            TunnResult::WriteToNetwork(message) => message.to_vec(),
            other => panic!("no initiation: {other:?}"),
        };
        // The responder is under load (a limiter that always is): a cookie reply.
        let theirs = PublicKey::from(&StaticSecret::from(THEIRS));
        let under_load = RateLimiter::new(&theirs, 0);
        let mut reply = [0u8; 64];
        let cookie = match under_load.verify_packet(Some(ours), &first, &mut reply) {
            Err(TunnResult::WriteToNetwork(cookie)) => cookie.to_vec(),
            other => panic!("no cookie reply: {:?}", other.map(|_| ())),
        };
        let mut batch = TunBatch::new();
        let mut scratch = vec![0u8; 2 * 65_536];
        let mut outbox = Vec::new();
        receive_datagram(
            &keys,
            &peers,
            responder,
            &cookie,
            &mut batch,
            &mut scratch,
            &mut outbox,
        );
        assert_eq!(outbox.len(), 1, "no new initiation after the cookie");
        let (to, again) = &outbox[0];
        assert_eq!((*to, again[0]), (responder, HANDSHAKE_INITIATION));
        assert!(
            under_load
                .verify_packet(Some(ours), again, &mut reply)
                .is_ok(),
            "the new initiation has no valid mac2"
        );
        // The old cookie reply, replayed, answers nothing any more.
        outbox.clear();
        receive_datagram(
            &keys,
            &peers,
            responder,
            &cookie,
            &mut batch,
            &mut scratch,
            &mut outbox,
        );
        assert!(outbox.is_empty(), "a replayed cookie made us initiate");
    }

    /// Our keys after a rotation from `OURS` to `NEW`, the old one still answered.
    fn rotated_keys() -> Keys {
        const NEW: [u8; 32] = [8; 32];
        let old = keys();
        let private = StaticSecret::from(NEW);
        let public = PublicKey::from(&private);
        Keys {
            cookies: Arc::new(RateLimiter::new(&public, 0)),
            handshake_limit: 100,
            unlimited: Arc::new(RateLimiter::new(&public, u64::MAX)),
            private,
            public,
            previous: Some(super::super::PreviousKey {
                private: old.private,
                public: old.public,
                cookies: old.cookies,
                unlimited: old.unlimited,
                deadline: Instant::now() + Duration::from_secs(180),
            }),
        }
    }

    /// An IPv4 packet from the peer's allowed address to ours.
    fn ping_packet() -> Vec<u8> {
        let mut packet = vec![0u8; 28];
        packet[0] = 0x45;
        packet[2..4].copy_from_slice(&28u16.to_be_bytes());
        packet[8] = 64;
        packet[9] = 1;
        packet[12..16].copy_from_slice(&[10, 0, 0, 2]);
        packet[16..20].copy_from_slice(&[10, 0, 0, 1]);
        packet
    }

    #[test]
    fn during_a_rotation_a_peer_that_knows_only_the_old_key_is_answered_and_decrypted() {
        let old_keys = keys();
        let keys = rotated_keys();
        let home: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        // The peer as it was before the rotation, its Tunn kept as the previous session, and a
        // new one under the new key.
        let mut peers = table(&old_keys, home);
        let before = peers.by_key.values().next().unwrap().clone();
        let new_index = peers.allocate_index();
        let config = super::super::peer_config(&before);
        let peer = Peer::new(
            &config,
            new_index,
            super::super::new_tunn(&keys, &config, new_index),
            Some(home),
        );
        super::super::keep_previous(
            &before,
            &peer,
            &keys,
            &config,
            Instant::now(),
            Duration::from_secs(180),
        );
        peers.insert(peer.clone());
        assert_eq!(peers.by_index.len(), 2, "both receiver indexes lead to it");
        let mut remote = remote(&old_keys);
        let mut batch = TunBatch::new();
        let mut scratch = vec![0u8; 2 * 65_536];
        let mut outbox = Vec::new();

        // An initiation sealed to the old key passes the gate and is answered under it.
        let mut gate = HandshakeGate::new(100);
        let first = initiation(&mut remote);
        receive_handshake(
            &mut gate,
            Instant::now(),
            &keys,
            &peers,
            home,
            &first,
            &mut batch,
            &mut scratch,
            &mut outbox,
        );
        assert_eq!(outbox.len(), 1, "the old key's initiation was not answered");
        assert_eq!(outbox[0].1[0], HANDSHAKE_RESPONSE);
        let mut buffer = vec![0u8; 2_048];
        let keepalive = match remote.decapsulate(Some(home.ip()), &outbox[0].1, &mut buffer) {
            TunnResult::WriteToNetwork(message) => message.to_vec(),
            other => panic!("the response did not complete the handshake: {other:?}"),
        };
        assert!(lock(&peer.tunn).time_since_last_handshake().is_none());
        outbox.clear();
        receive_datagram(
            &keys,
            &peers,
            home,
            &keepalive,
            &mut batch,
            &mut scratch,
            &mut outbox,
        );
        // Data on that session decrypts through the previous Tunn and reaches the TUN batch.
        let data = match remote.encapsulate(&ping_packet(), &mut buffer) {
            TunnResult::WriteToNetwork(message) => message.to_vec(),
            other => panic!("no data message: {other:?}"),
        };
        receive_datagram(
            &keys,
            &peers,
            home,
            &data,
            &mut batch,
            &mut scratch,
            &mut outbox,
        );
        assert_eq!(batch.count, 1, "data under the old key was dropped");
        assert!(outbox.is_empty(), "{outbox:?}");

        // Once the grace is over, the old key answers nothing.
        let mut over = rotated_keys();
        over.previous = None;
        let late = initiation(&mut remote);
        receive_datagram(
            &over,
            &peers,
            home,
            &late,
            &mut batch,
            &mut scratch,
            &mut outbox,
        );
        assert!(outbox.is_empty(), "answered the retired key: {outbox:?}");
    }

    #[test]
    fn garbage_and_unknown_senders_change_nothing() {
        let keys = keys();
        let home: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let stranger: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let peers = table(&keys, home);
        let mut batch = TunBatch::new();
        let mut scratch = vec![0u8; 2 * 65_536];
        let mut outbox = Vec::new();
        // An initiation from a key that is not a peer.
        let mut unknown = Tunn::new(
            StaticSecret::from([5; 32]),
            keys.public,
            None,
            None,
            1,
            None,
        );
        let foreign = initiation(&mut unknown);
        // A data message for a receiver index nobody has, and bytes that are no message.
        let mut data = vec![4u8, 0, 0, 0];
        data.extend_from_slice(&0x00ab_cdefu32.to_le_bytes());
        data.extend_from_slice(&[0; 40]);
        // A data message for the peer's own index whose tag cannot verify (no session, and
        // forged bytes anyway).
        let index = *peers.by_index.keys().next().unwrap();
        let mut forged = vec![4u8, 0, 0, 0];
        forged.extend_from_slice(&(index << 8).to_le_bytes());
        forged.extend_from_slice(&[0x5a; 48]);
        let outcomes: Vec<Received> = [
            &foreign[..],
            &data[..],
            &forged[..],
            &[1, 2, 3][..],
            &[][..],
        ]
        .into_iter()
        .map(|datagram| {
            receive_datagram(
                &keys,
                &peers,
                stranger,
                datagram,
                &mut batch,
                &mut scratch,
                &mut outbox,
            )
        })
        .collect();
        // Only the data messages count as decrypt failures (the device's metric).
        assert_eq!(
            outcomes,
            [
                Received::Handled,
                Received::Undecryptable,
                Received::Undecryptable,
                Received::Handled,
                Received::Handled,
            ]
        );
        assert!(outbox.is_empty(), "answered garbage: {outbox:?}");
        assert_eq!(batch.count, 0);
        assert_eq!(endpoint(&peers), Some(home));
    }
}
