//! The device's peers: lookups by public key, by receiver index (incoming sessions) and by
//! inner address (allowed IPs, longest prefix first).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use boringtun::noise::Tunn;
use ip_network::IpNetwork;
use ip_network_table::IpNetworkTable;
use ipnet::IpNet;

use super::race::Race;
use super::rotation::Previous;
use super::{lock, read, write};
use crate::{Key, PeerConfig};

pub(super) struct Peer {
    pub(super) public_key: Key,
    pub(super) preshared_key: Key,
    pub(super) keepalive: Duration,
    pub(super) allowed_ips: Vec<IpNet>,
    /// Our receiver index for this peer's sessions (the top 24 bits; boringtun adds 8).
    pub(super) index: u32,
    pub(super) tunn: Mutex<Tunn>,
    pub(super) endpoint: RwLock<Option<SocketAddr>>,
    /// The endpoint race in progress, if any ([`Race`]).
    pub(super) race: Mutex<Race>,
    /// The session from before a key change (ours or the peer's), kept until the new key has a
    /// session ([`Previous`]). Locked after `tunn` when both are.
    pub(super) previous: Mutex<Option<Previous>>,
    /// Bytes (sent, received) of retired previous sessions, so the counters never go back.
    pub(super) retired_bytes: Mutex<(u64, u64)>,
}

impl Peer {
    pub(super) fn new(
        config: &PeerConfig,
        index: u32,
        tunn: Tunn,
        endpoint: Option<SocketAddr>,
    ) -> Arc<Self> {
        Arc::new(Self {
            public_key: config.public_key,
            preshared_key: config.preshared_key,
            keepalive: config.persistent_keepalive,
            allowed_ips: config.allowed_ips.clone(),
            index,
            tunn: Mutex::new(tunn),
            endpoint: RwLock::new(endpoint),
            race: Mutex::new(Race::default()),
            previous: Mutex::new(None),
            retired_bytes: Mutex::new((0, 0)),
        })
    }

    /// The receiver index of the previous session's Tunn, while there is one.
    pub(super) fn previous_index(&self) -> Option<u32> {
        lock(&self.previous).as_ref().map(|p| p.index)
    }

    pub(super) fn endpoint(&self) -> Option<SocketAddr> {
        *read(&self.endpoint)
    }

    /// Roaming: an authenticated packet from a new address moves the peer there.
    pub(super) fn roam(&self, from: SocketAddr) {
        if self.endpoint() != Some(from) {
            *write(&self.endpoint) = Some(from);
        }
    }
}

#[derive(Default)]
pub(super) struct PeerTable {
    pub(super) by_key: HashMap<Key, Arc<Peer>>,
    pub(super) by_index: HashMap<u32, Arc<Peer>>,
    pub(super) routes: Routes,
    pub(super) next_index: u32,
    /// Receiver indexes of replaced peers, still in `by_index` until [`RETIRED_FOR`] after
    /// their replacement.
    pub(super) retired: Vec<(u32, Arc<Peer>, Instant)>,
}

/// How long a re-created peer's previous session still decrypts what arrives for it. A new
/// pre-shared key or keepalive re-creates the peer (boringtun cannot change them in a running
/// session); the other end keeps sending on the old session until it re-configures too (a
/// secret rotation: until it reads the promoted record), and those packets are not lost.
/// WireGuard itself accepts a session's packets for up to 180 s; a few seconds cover the
/// other end's re-configuration.
pub(super) const RETIRED_FOR: Duration = Duration::from_secs(10);

/// Longest-prefix match from an inner address to the peer that owns it (allowed IPs).
pub(super) struct Routes(IpNetworkTable<Arc<Peer>>);

impl Default for Routes {
    fn default() -> Self {
        Self(IpNetworkTable::new())
    }
}

pub(super) fn network(net: &IpNet) -> Option<IpNetwork> {
    IpNetwork::new_truncate(net.addr(), net.prefix_len()).ok()
}

impl Routes {
    pub(super) fn lookup(&self, address: IpAddr) -> Option<&Arc<Peer>> {
        self.0.longest_match(address).map(|(_, peer)| peer)
    }

    pub(super) fn insert(&mut self, peer: &Arc<Peer>) {
        for net in peer.allowed_ips.iter().filter_map(network) {
            self.0.insert(net, peer.clone());
        }
    }

    /// Removes the networks that still point at `peer` (another peer may have taken one over).
    pub(super) fn remove(&mut self, peer: &Arc<Peer>) {
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
    pub(super) fn allocate_index(&mut self) -> u32 {
        loop {
            self.next_index = (self.next_index + 1) & 0x00ff_ffff;
            if !self.by_index.contains_key(&self.next_index) {
                return self.next_index;
            }
        }
    }

    pub(super) fn insert(&mut self, peer: Arc<Peer>) {
        let now = Instant::now();
        self.prune_retired(now);
        if let Some(old) = self.by_key.insert(peer.public_key, peer.clone()) {
            self.routes.remove(&old);
            let carried = peer.previous_index();
            // A session `old` kept from a key change ends with it, unless `peer` carries it on.
            if let Some(earlier) = old.previous_index()
                && carried != Some(earlier)
            {
                self.forget_index(earlier, &old);
            }
            if old.index != peer.index && carried != Some(old.index) {
                // Re-created (a new pre-shared key or keepalive): its session keeps decrypting
                // for a while (its index is not reused meanwhile: `allocate_index` skips
                // indexes in `by_index`). A session `peer` carries on as its previous one is
                // re-pointed to `peer` below instead.
                self.retired.push((old.index, old.clone(), now));
            }
        }
        self.by_index.insert(peer.index, peer.clone());
        if let Some(previous) = peer.previous_index() {
            self.by_index.insert(previous, peer.clone());
        }
        self.routes.insert(&peer);
    }

    pub(super) fn remove(&mut self, key: &Key) -> Option<Arc<Peer>> {
        let old = self.by_key.remove(key)?;
        self.forget_indexes(&old);
        self.routes.remove(&old);
        // A peer that leaves takes its re-created predecessors' sessions along.
        let mut gone = Vec::new();
        self.retired.retain(|(index, predecessor, _)| {
            let same = predecessor.public_key == *key;
            if same {
                gone.push((*index, predecessor.clone()));
            }
            !same
        });
        for (index, predecessor) in gone {
            self.forget_index(index, &predecessor);
        }
        Some(old)
    }

    /// Removes the receiver indexes that still lead to `peer` (its own and its previous
    /// session's).
    fn forget_indexes(&mut self, peer: &Arc<Peer>) {
        for index in std::iter::once(peer.index).chain(peer.previous_index()) {
            self.forget_index(index, peer);
        }
    }

    /// Removes `index` if it still leads to `peer` (a session of `peer` that ended).
    pub(super) fn forget_index(&mut self, index: u32, peer: &Arc<Peer>) {
        if self
            .by_index
            .get(&index)
            .is_some_and(|owner| Arc::ptr_eq(owner, peer))
        {
            self.by_index.remove(&index);
        }
    }

    /// Forgets the sessions of peers re-created [`RETIRED_FOR`] or longer before `now`.
    pub(super) fn prune_retired(&mut self, now: Instant) {
        let mut expired = Vec::new();
        self.retired.retain(|(index, predecessor, at)| {
            let done = now.saturating_duration_since(*at) >= RETIRED_FOR;
            if done {
                expired.push((*index, predecessor.clone()));
            }
            !done
        });
        for (index, predecessor) in expired {
            self.forget_index(index, &predecessor);
        }
    }
}

#[cfg(test)]
mod tests {
    use boringtun::x25519::{PublicKey, StaticSecret};

    use super::*;

    fn peer(table: &mut PeerTable, key: u8, allowed: &[&str]) -> Arc<Peer> {
        let index = table.allocate_index();
        let config = PeerConfig {
            public_key: [key; 32],
            preshared_key: [0; 32],
            endpoint: None,
            allowed_ips: allowed.iter().map(|a| a.parse().unwrap()).collect(),
            persistent_keepalive: Duration::ZERO,
        };
        let tunn = Tunn::new(
            StaticSecret::from([1; 32]),
            PublicKey::from(&StaticSecret::from([key; 32])),
            None,
            None,
            index,
            None,
        );
        Peer::new(&config, index, tunn, None)
    }

    fn owner(table: &PeerTable, address: &str) -> Option<u8> {
        let address: IpAddr = address.parse().unwrap();
        table.routes.lookup(address).map(|p| p.public_key[0])
    }

    #[test]
    fn the_longest_prefix_owns_an_address() {
        let mut table = PeerTable::default();
        let a = peer(&mut table, 1, &["10.0.0.0/8", "fd00::/64"]);
        let b = peer(&mut table, 2, &["10.1.0.0/16", "10.1.2.3/32"]);
        table.insert(a);
        table.insert(b);
        assert_eq!(owner(&table, "10.2.0.1"), Some(1));
        assert_eq!(owner(&table, "10.1.9.9"), Some(2));
        assert_eq!(owner(&table, "fd00::5"), Some(1));
        assert_eq!(owner(&table, "192.0.2.1"), None);
        // Host bits in an allowed IP are ignored, as WireGuard does.
        let c = peer(&mut table, 3, &["192.168.1.77/24"]);
        table.insert(c);
        assert_eq!(owner(&table, "192.168.1.1"), Some(3));
    }

    #[test]
    fn replacing_a_peer_swaps_its_networks_and_keeps_others() {
        let mut table = PeerTable::default();
        let a = peer(&mut table, 1, &["10.0.0.0/24", "10.0.1.0/24"]);
        let b = peer(&mut table, 2, &["10.0.2.0/24"]);
        table.insert(a);
        table.insert(b.clone());
        let a2 = peer(&mut table, 1, &["10.0.1.0/24", "10.0.3.0/24"]);
        table.insert(a2.clone());
        assert_eq!(
            owner(&table, "10.0.0.1"),
            None,
            "a network the peer no longer has"
        );
        assert_eq!(owner(&table, "10.0.1.1"), Some(1));
        assert_eq!(owner(&table, "10.0.3.1"), Some(1));
        assert_eq!(owner(&table, "10.0.2.1"), Some(2));
        assert_eq!(table.by_key.len(), 2);
        // The replaced peer's previous index stays for a while (see RETIRED_FOR).
        assert!(table.by_index.contains_key(&a2.index) && table.by_index.len() == 3);
        // A network moved to another peer stays with it when the first one goes.
        let b2 = peer(&mut table, 2, &["10.0.2.0/24", "10.0.3.0/24"]);
        table.insert(b2);
        table.remove(&[1; 32]);
        assert_eq!(owner(&table, "10.0.3.1"), Some(2));
        assert_eq!(owner(&table, "10.0.1.1"), None);
        // b2 and b's previous session; nothing of peer 1.
        assert_eq!(table.by_index.len(), 2);
        assert!(table.by_index.values().all(|p| p.public_key == [2; 32]));
        assert!(table.remove(&[1; 32]).is_none());
    }

    #[test]
    fn receiver_indexes_are_24_bit_and_unique() {
        let mut table = PeerTable {
            next_index: 0x00ff_fffe,
            ..PeerTable::default()
        };
        let first = peer(&mut table, 1, &[]);
        table.insert(first.clone());
        assert_eq!(first.index, 0x00ff_ffff);
        let second = peer(&mut table, 2, &[]);
        assert_eq!(second.index, 0, "wraps within 24 bits");
        table.insert(second);
        table.next_index = 0x00ff_fffe;
        let third = peer(&mut table, 3, &[]);
        assert_eq!(third.index, 1, "skips indexes in use");
    }

    /// A re-created peer's previous session still receives for a while, then goes; a peer
    /// that leaves takes it along.
    #[test]
    fn a_replaced_peers_previous_index_receives_until_it_expires() {
        let mut table = PeerTable::default();
        let a1 = peer(&mut table, 1, &["10.0.1.0/24"]);
        table.insert(a1.clone());
        let a2 = peer(&mut table, 1, &["10.0.1.0/24"]);
        table.insert(a2.clone());
        assert!(
            Arc::ptr_eq(&table.by_index[&a1.index], &a1),
            "the old session"
        );
        assert!(Arc::ptr_eq(&table.by_index[&a2.index], &a2));
        assert!(
            Arc::ptr_eq(&table.by_key[&[1; 32]], &a2),
            "the peer is the new one"
        );
        assert_eq!(owner(&table, "10.0.1.1"), Some(1));
        assert_ne!(
            table.allocate_index(),
            a1.index,
            "a retired index is not reused"
        );
        table.prune_retired(Instant::now() + RETIRED_FOR);
        assert!(!table.by_index.contains_key(&a1.index));
        assert!(table.by_index.contains_key(&a2.index));
        // Replaced again, then removed: nothing of it stays.
        let a3 = peer(&mut table, 1, &["10.0.1.0/24"]);
        table.insert(a3);
        assert_eq!(table.by_index.len(), 2);
        table.remove(&[1; 32]);
        assert!(table.by_index.is_empty() && table.retired.is_empty());
    }
}
