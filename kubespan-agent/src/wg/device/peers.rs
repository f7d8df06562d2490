//! The device's peers: lookups by public key, by receiver index (incoming sessions) and by
//! inner address (allowed IPs, longest prefix first).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use boringtun::noise::Tunn;
use ip_network::IpNetwork;
use ip_network_table::IpNetworkTable;
use ipnet::IpNet;

use super::{read, write};
use crate::wg::Key;

pub(super) struct Peer {
    pub(super) public_key: Key,
    pub(super) preshared_key: Key,
    pub(super) keepalive: Duration,
    pub(super) allowed_ips: Vec<IpNet>,
    /// Our receiver index for this peer's sessions (the top 24 bits; boringtun adds 8).
    pub(super) index: u32,
    pub(super) tunn: Mutex<Tunn>,
    pub(super) endpoint: RwLock<Option<SocketAddr>>,
}

impl Peer {
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
}

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
        if let Some(old) = self.by_key.insert(peer.public_key, peer.clone()) {
            self.by_index.remove(&old.index);
            self.routes.remove(&old);
        }
        self.by_index.insert(peer.index, peer.clone());
        self.routes.insert(&peer);
    }

    pub(super) fn remove(&mut self, key: &Key) -> Option<Arc<Peer>> {
        let old = self.by_key.remove(key)?;
        self.by_index.remove(&old.index);
        self.routes.remove(&old);
        Some(old)
    }
}
