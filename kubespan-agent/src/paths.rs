//! Which of a peer's endpoints look most promising from this node, and what kind of path the
//! one in use is. Pure: the data plane passes this node's networks.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::model::LearnedKind;

/// A peer's announced endpoints, most promising first: those inside one of this node's own
/// networks (the same LAN), then global IPv6 when this node has global IPv6 (no NAT on the
/// way), then the rest in the order the peer announced them (its own addresses first, then
/// mapped and reflexive ones). Endpoints on one of this node's own addresses are dropped: that
/// is this node (two LANs behind NAT often use the same private addresses).
pub fn rank(endpoints: &[SocketAddr], local: &[IpNet]) -> Vec<SocketAddr> {
    let has_global_v6 = local.iter().any(|net| is_global_v6(net.addr()));
    let class = |endpoint: &SocketAddr| {
        let ip = endpoint.ip();
        if local.iter().any(|net| net.contains(&ip)) {
            0
        } else if has_global_v6 && is_global_v6(ip) {
            1
        } else {
            2
        }
    };
    let mut ranked: Vec<SocketAddr> = endpoints
        .iter()
        .copied()
        .filter(|endpoint| !local.iter().any(|net| net.addr() == endpoint.ip()))
        .collect();
    // Stable: the peer's order holds within a class.
    ranked.sort_by_key(class);
    ranked
}

fn is_global_v6(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xe000) == 0x2000)
}

/// The kind of path a peer is reached on, for `kubespanctl peers`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    /// No endpoint yet.
    None,
    /// An address inside one of this node's networks.
    Lan,
    /// One of the addresses the peer has itself.
    Direct,
    /// The peer's NAT mapping as STUN servers saw it.
    Reflexive,
    /// A port the peer's gateway forwards to it (PCP, NAT-PMP, UPnP-IGD).
    Mapped,
    /// An endpoint the peer announces that is not one of its own addresses, learned some other
    /// way (e.g. `extraAnnouncedEndpoints`, a harvested NAT mapping).
    Nat,
    /// An address the peer reached this node from that it does not announce (it is behind a
    /// NAT and WireGuard followed it).
    Roamed,
}

impl PathKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::None => "none",
            PathKind::Lan => "direct LAN",
            PathKind::Direct => "direct",
            PathKind::Reflexive => "reflexive",
            PathKind::Mapped => "mapped",
            PathKind::Nat => "through the peer's NAT",
            PathKind::Roamed => "roamed (peer behind NAT)",
        }
    }
}

/// What kind of path `endpoint` is, given the peer's announced endpoints, those it says it
/// learned behind NAT, its own addresses (its allowed IPs hold them) and this node's networks.
pub fn kind(
    endpoint: Option<SocketAddr>,
    announced: &[SocketAddr],
    learned: &[(SocketAddr, LearnedKind)],
    peer_networks: &[IpNet],
    local: &[IpNet],
) -> PathKind {
    let Some(endpoint) = endpoint else {
        return PathKind::None;
    };
    let ip = endpoint.ip();
    if let Some((_, kind)) = learned.iter().find(|(e, _)| *e == endpoint) {
        return match kind {
            LearnedKind::Reflexive => PathKind::Reflexive,
            LearnedKind::Mapped => PathKind::Mapped,
        };
    }
    if local.iter().any(|net| net.contains(&ip)) {
        PathKind::Lan
    } else if !announced.contains(&endpoint) {
        PathKind::Roamed
    } else if peer_networks.iter().any(|net| net.contains(&ip)) {
        PathKind::Direct
    } else {
        PathKind::Nat
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn the_same_lan_goes_first_then_global_ipv6_then_the_peers_order() {
        let local = nets(&["10.0.0.5/24", "2001:db8:1::5/64"]);
        let announced = [
            sa("203.0.113.9:51820"),
            sa("[2001:db8:2::9]:51820"),
            sa("10.0.0.9:51820"),
            sa("198.51.100.1:40000"),
        ];
        assert_eq!(
            rank(&announced, &local),
            vec![
                sa("10.0.0.9:51820"),
                sa("[2001:db8:2::9]:51820"),
                sa("203.0.113.9:51820"),
                sa("198.51.100.1:40000"),
            ]
        );
        // Without global IPv6 here, IPv6 keeps the peer's order.
        let v4_only = nets(&["10.0.0.5/24"]);
        assert_eq!(rank(&announced, &v4_only)[1], sa("203.0.113.9:51820"));
    }

    #[test]
    fn an_endpoint_on_one_of_our_own_addresses_is_dropped() {
        // Two nodes behind two NATs with the same private LAN.
        let local = nets(&["192.168.1.2/24"]);
        let announced = [sa("192.168.1.2:51820"), sa("198.51.100.7:61000")];
        assert_eq!(rank(&announced, &local), vec![sa("198.51.100.7:61000")]);
    }

    #[test]
    fn path_kinds() {
        let local = nets(&["10.0.0.5/24"]);
        let announced = [
            sa("10.0.0.9:51820"),
            sa("203.0.113.9:51820"),
            sa("198.51.100.1:4000"),
        ];
        let peer_networks = nets(&["10.0.0.9/32", "203.0.113.9/32", "fd00::9/128"]);
        let k = |e: Option<&str>, learned: &[(SocketAddr, LearnedKind)]| {
            kind(e.map(sa), &announced, learned, &peer_networks, &local)
        };
        assert_eq!(k(None, &[]), PathKind::None);
        assert_eq!(k(Some("10.0.0.9:51820"), &[]), PathKind::Lan);
        assert_eq!(k(Some("203.0.113.9:51820"), &[]), PathKind::Direct);
        assert_eq!(k(Some("198.51.100.1:4000"), &[]), PathKind::Nat);
        let learned = [(sa("198.51.100.1:4000"), LearnedKind::Mapped)];
        assert_eq!(k(Some("198.51.100.1:4000"), &learned), PathKind::Mapped);
        let learned = [(sa("198.51.100.1:4000"), LearnedKind::Reflexive)];
        assert_eq!(k(Some("198.51.100.1:4000"), &learned), PathKind::Reflexive);
        assert_eq!(k(Some("192.0.2.44:1234"), &[]), PathKind::Roamed);
        assert_eq!(PathKind::Lan.as_str(), "direct LAN");
    }
}
