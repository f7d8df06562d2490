//! The agent's view of cluster members, independent of wire formats and crypto.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// One node's published record after decryption (`sidero.discovery.client.Affiliate` plus its
/// decrypted endpoints).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AffiliateRecord {
    /// Node id = affiliate id at the discovery service.
    pub node_id: String,
    pub addresses: Vec<IpAddr>,
    pub hostname: String,
    pub nodename: String,
    pub machine_type: String,
    pub operating_system: String,
    pub kubespan: Option<KubeSpanInfo>,
    pub control_plane_port: Option<u16>,
    /// WireGuard endpoints, in the order peers should try them.
    pub endpoints: Vec<SocketAddr>,
}

/// The KubeSpan part of a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeSpanInfo {
    /// WireGuard public key, standard base64 (44 characters).
    pub public_key: String,
    /// The node's mesh (ULA) address.
    pub address: Ipv6Addr,
    /// Networks routed to this node through the mesh besides its own addresses.
    pub additional_addresses: Vec<IpNet>,
    /// Networks receivers must not route to this node through the mesh.
    pub exclude_advertised_networks: Vec<IpNet>,
    /// Announced endpoints the node learned behind NAT, with how (openspan's extension).
    pub learned_endpoints: Vec<(SocketAddr, LearnedKind)>,
    /// The relays that reach the node (`host:port` as configured), best first.
    pub relays: Vec<String>,
    /// Not on the wire: the WireGuard pre-shared key of the secret this record opened with (so,
    /// the secret the node seals with); `None` for records not opened here (this node's own, the
    /// warm-start cache). Tunnels to the node use [`crate::crypto::pair_psk`] of it and ours.
    pub sealed_psk: Option<[u8; 32]>,
}

/// How a node learned one of its endpoints behind NAT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LearnedKind {
    /// Its NAT's mapping of the WireGuard socket, as STUN servers see it.
    Reflexive,
    /// A port its gateway forwards (PCP, NAT-PMP, UPnP-IGD).
    Mapped,
}

impl LearnedKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LearnedKind::Reflexive => "reflexive",
            LearnedKind::Mapped => "mapped",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "reflexive" => Some(LearnedKind::Reflexive),
            "mapped" => Some(LearnedKind::Mapped),
            _ => None,
        }
    }
}
