//! From raw registry records to the cluster view: merging records per node (spec §3.3),
//! members (§3.4) and WireGuard peer specs with their allowed IPs (§4.1).

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use serde::Serialize;

use crate::model::{AffiliateRecord, KubeSpanInfo, LearnedKind};
use crate::netset::PrefixSet;

/// The machine type that never overrides a known one when merging.
const UNKNOWN_MACHINE_TYPE: &str = "unknown";

/// §3.3: group raw records by node_id; process in sorted raw-id order ("k8s/..." before
/// "service/..."); first is the base; later ones: non-empty scalars override (hostname,
/// nodename, machine_type unless "unknown"/empty, control_plane_port, kubespan public_key,
/// kubespan address), lists are unioned preserving first-seen order (addresses,
/// additional_addresses, exclude_advertised_networks, endpoints); OS not merged (base wins).
///
/// A record with an empty `node_id` is grouped under its raw id's part after the first `/`
/// (`service/<nodeId>`), or the whole raw id if it has none; a record left without any node id
/// is dropped. Records with the same raw id are taken in the order given. Lists are also
/// de-duplicated within the base record. A KubeSpan address override needs a specified
/// (non-`::`) address.
pub fn merge_affiliates<'a>(
    raw: impl IntoIterator<Item = (&'a str, &'a AffiliateRecord)>,
) -> BTreeMap<String, AffiliateRecord> {
    let mut sorted: Vec<(&str, &AffiliateRecord)> = raw.into_iter().collect();
    // Stable: equal raw ids keep their input order.
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut merged: BTreeMap<String, AffiliateRecord> = BTreeMap::new();
    for (raw_id, record) in sorted {
        let node_id = if record.node_id.is_empty() {
            raw_id.split_once('/').map_or(raw_id, |(_, rest)| rest)
        } else {
            record.node_id.as_str()
        };
        if node_id.is_empty() {
            continue;
        }
        match merged.entry(node_id.to_owned()) {
            Entry::Vacant(slot) => {
                slot.insert(base_record(node_id, record));
            }
            Entry::Occupied(mut slot) => merge_into(slot.get_mut(), record),
        }
    }
    merged
}

/// The first record of a node, with its lists de-duplicated.
fn base_record(node_id: &str, record: &AffiliateRecord) -> AffiliateRecord {
    let mut base = record.clone();
    base.node_id = node_id.to_owned();
    dedup_in_place(&mut base.addresses);
    dedup_in_place(&mut base.endpoints);
    if let Some(ks) = &mut base.kubespan {
        dedup_in_place(&mut ks.additional_addresses);
        dedup_in_place(&mut ks.exclude_advertised_networks);
    }
    base
}

fn dedup_in_place<T: PartialEq + Clone>(list: &mut Vec<T>) {
    let mut unique = Vec::with_capacity(list.len());
    union_into(&mut unique, list);
    *list = unique;
}

/// Merges `next` into `into` following the §3.3 rules (everything except the OS).
fn merge_into(into: &mut AffiliateRecord, next: &AffiliateRecord) {
    if !next.hostname.is_empty() {
        into.hostname.clone_from(&next.hostname);
    }
    if !next.nodename.is_empty() {
        into.nodename.clone_from(&next.nodename);
    }
    if !next.machine_type.is_empty() && next.machine_type != UNKNOWN_MACHINE_TYPE {
        into.machine_type.clone_from(&next.machine_type);
    }
    if next.control_plane_port.is_some() {
        into.control_plane_port = next.control_plane_port;
    }
    union_into(&mut into.addresses, &next.addresses);
    union_into(&mut into.endpoints, &next.endpoints);
    if let Some(next_ks) = &next.kubespan {
        let ks = into.kubespan.get_or_insert_with(|| KubeSpanInfo {
            public_key: String::new(),
            address: Ipv6Addr::UNSPECIFIED,
            additional_addresses: Vec::new(),
            exclude_advertised_networks: Vec::new(),
            learned_endpoints: Vec::new(),
            relays: Vec::new(),
            sealed_psk: None,
        });
        if !next_ks.public_key.is_empty() {
            ks.public_key.clone_from(&next_ks.public_key);
        }
        if !next_ks.address.is_unspecified() {
            ks.address = next_ks.address;
        }
        union_into(&mut ks.additional_addresses, &next_ks.additional_addresses);
        union_into(
            &mut ks.exclude_advertised_networks,
            &next_ks.exclude_advertised_networks,
        );
        union_into(&mut ks.learned_endpoints, &next_ks.learned_endpoints);
        union_into(&mut ks.relays, &next_ks.relays);
        if next_ks.sealed_psk.is_some() {
            ks.sealed_psk = next_ks.sealed_psk;
        }
    }
}

/// Appends the items of `more` not yet in `list`, in order.
fn union_into<T: PartialEq + Clone>(list: &mut Vec<T>, more: &[T]) {
    for item in more {
        if !list.contains(item) {
            list.push(item.clone());
        }
    }
}

/// A cluster member as shown by the membership API (§3.4, plus the KubeSpan identity).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Member {
    pub nodename: String,
    pub node_id: String,
    pub hostname: String,
    pub machine_type: String,
    pub operating_system: String,
    pub addresses: Vec<IpAddr>,
    pub control_plane_port: Option<u16>,
    pub mesh_address: Option<Ipv6Addr>,
    pub public_key: Option<String>,
}

/// §3.4: one member per affiliate with a non-empty nodename, keyed by nodename; returns also
/// the nodenames claimed by more than one node id (a conflict to warn about; the smaller node
/// id wins).
///
/// `mesh_address` is set when the record has KubeSpan info with a specified address,
/// `public_key` when it has a non-empty key. The duplicate names come sorted, each once.
pub fn members(
    affiliates: &BTreeMap<String, AffiliateRecord>,
) -> (BTreeMap<String, Member>, Vec<String>) {
    let mut out: BTreeMap<String, Member> = BTreeMap::new();
    let mut duplicates: Vec<String> = Vec::new();
    // BTreeMap iteration is in node-id order, so the first claimant is the smallest node id.
    for (node_id, record) in affiliates {
        if record.nodename.is_empty() {
            continue;
        }
        match out.entry(record.nodename.clone()) {
            Entry::Occupied(_) => {
                if !duplicates.contains(&record.nodename) {
                    duplicates.push(record.nodename.clone());
                }
            }
            Entry::Vacant(slot) => {
                let kubespan = record.kubespan.as_ref();
                slot.insert(Member {
                    nodename: record.nodename.clone(),
                    node_id: node_id.clone(),
                    hostname: record.hostname.clone(),
                    machine_type: record.machine_type.clone(),
                    operating_system: record.operating_system.clone(),
                    addresses: record.addresses.clone(),
                    control_plane_port: record.control_plane_port,
                    mesh_address: kubespan.map(|k| k.address).filter(|a| !a.is_unspecified()),
                    public_key: kubespan
                        .map(|k| k.public_key.clone())
                        .filter(|k| !k.is_empty()),
                });
            }
        }
    }
    duplicates.sort();
    (out, duplicates)
}

/// One WireGuard peer to program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    pub public_key: String,
    pub node_id: String,
    /// The peer's nodename.
    pub label: String,
    pub mesh_address: Ipv6Addr,
    pub allowed_ips: Vec<IpNet>,
    pub endpoints: Vec<SocketAddr>,
    /// Endpoints the peer says it learned behind NAT (for display).
    pub learned_endpoints: Vec<(SocketAddr, LearnedKind)>,
    /// The relays that reach the peer, best first.
    pub relays: Vec<String>,
    /// The pre-shared key of the secret the peer seals with, when known (see
    /// [`crate::crypto::pair_psk`]).
    pub sealed_psk: Option<[u8; 32]>,
}

/// Conflicts found while computing peer specs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerWarning {
    /// `prefixes` claimed by `node_id` are routed to `winner_node_id` instead.
    Overlap {
        node_id: String,
        winner_node_id: String,
        prefixes: Vec<IpNet>,
    },
    /// Several nodes (in node-id order, possibly including the local node) announce one mesh
    /// address; only the first keeps it (the local node if it is one of them).
    DuplicateMeshAddress {
        address: Ipv6Addr,
        node_ids: Vec<String>,
    },
    /// Several nodes (in node-id order, possibly including the local node) announce one
    /// WireGuard key; only the first is a peer (none if the local node is one of them).
    DuplicatePublicKey {
        public_key: String,
        node_ids: Vec<String>,
    },
    /// A peer claims addresses of the local node; they are not routed to it.
    ClaimsLocalAddress {
        node_id: String,
        prefixes: Vec<IpNet>,
    },
}

/// What happens to a peer's mesh /128.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MeshClaim {
    /// The record has no usable (`::`) mesh address.
    Absent,
    /// The peer keeps its mesh address.
    Owned,
    /// Another node (earlier peer or the local node) announces the same mesh address.
    Duplicate,
    /// The address is one of the local node's; reported as a local-address claim.
    Local,
}

struct Candidate<'a> {
    node_id: &'a str,
    record: &'a AffiliateRecord,
    kubespan: &'a KubeSpanInfo,
    mesh: MeshClaim,
}

fn host_set(address: Ipv6Addr) -> PrefixSet {
    PrefixSet::from_prefixes([IpNet::from(IpAddr::V6(address))])
}

/// §4.1 for every affiliate except `local_node_id` that has KubeSpan info, in node-id order:
/// allowed = (additional_addresses masked) ∪ (addresses as /32|/128) −
/// exclude_advertised_networks ∪ {mesh address /128}, minimal prefixes; then subtract every
/// earlier peer's reduced set (earlier = smaller node id wins; emit Overlap).
///
/// Beyond Talos:
/// - the local node's addresses (`local`) are subtracted from every peer
///   ([`PeerWarning::ClaimsLocalAddress`]);
/// - a peer whose public key is already used (by a smaller node id or by the local node's record
///   in `affiliates`) is skipped ([`PeerWarning::DuplicatePublicKey`]);
/// - a peer whose mesh address is already used (by a smaller node id's mesh address or the
///   local node's) is kept without that /128 ([`PeerWarning::DuplicateMeshAddress`]);
/// - every kept mesh /128 is reserved for its peer before overlaps are resolved, so a peer with
///   a smaller node id announcing a network around another peer's mesh address loses that /128
///   (an Overlap naming the mesh address's owner as winner). This is what "the mesh /128 is
///   always re-added" means without routing one address to two peers.
///
/// "Has KubeSpan info" means a non-empty public key. A `::` mesh address is never added.
/// Warnings: duplicate keys, then duplicate mesh addresses, then per-peer warnings in node-id
/// order.
pub fn peer_specs(
    local_node_id: &str,
    local: &PrefixSet,
    affiliates: &BTreeMap<String, AffiliateRecord>,
) -> (Vec<PeerSpec>, Vec<PeerWarning>) {
    let mut warnings = Vec::new();
    let local_kubespan = affiliates
        .get(local_node_id)
        .and_then(|r| r.kubespan.as_ref())
        .filter(|k| !k.public_key.is_empty());
    let local_key = local_kubespan.map(|k| k.public_key.as_str());
    let local_mesh = local_kubespan
        .map(|k| k.address)
        .filter(|a| !a.is_unspecified());

    // Pass 1: who is a peer at all (one peer per public key, none with the local key).
    let mut key_users: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut candidates: Vec<Candidate<'_>> = Vec::new();
    for (node_id, record) in affiliates {
        let Some(kubespan) = record.kubespan.as_ref() else {
            continue;
        };
        if kubespan.public_key.is_empty() {
            continue;
        }
        let users = key_users.entry(kubespan.public_key.as_str()).or_default();
        users.push(node_id.clone());
        if node_id == local_node_id || Some(kubespan.public_key.as_str()) == local_key {
            continue;
        }
        if users.len() > 1 {
            // An earlier peer already uses this key.
            continue;
        }
        candidates.push(Candidate {
            node_id,
            record,
            kubespan,
            mesh: MeshClaim::Absent,
        });
    }
    for (key, node_ids) in key_users {
        if node_ids.len() > 1 {
            warnings.push(PeerWarning::DuplicatePublicKey {
                public_key: key.to_owned(),
                node_ids,
            });
        }
    }

    // Pass 2: mesh address ownership.
    let mut mesh_users: BTreeMap<Ipv6Addr, Vec<String>> = BTreeMap::new();
    if let Some(address) = local_mesh {
        mesh_users
            .entry(address)
            .or_default()
            .push(local_node_id.to_owned());
    }
    let mut reserved = PrefixSet::new();
    for candidate in &mut candidates {
        let address = candidate.kubespan.address;
        if address.is_unspecified() {
            continue;
        }
        let users = mesh_users.entry(address).or_default();
        users.push(candidate.node_id.to_owned());
        candidate.mesh = if users.len() > 1 {
            MeshClaim::Duplicate
        } else if local.contains(IpAddr::V6(address)) {
            MeshClaim::Local
        } else {
            reserved.insert(IpNet::from(IpAddr::V6(address)));
            MeshClaim::Owned
        };
    }
    for (address, mut node_ids) in mesh_users {
        if node_ids.len() > 1 {
            node_ids.sort();
            warnings.push(PeerWarning::DuplicateMeshAddress { address, node_ids });
        }
    }

    // Pass 3: allowed IPs, smaller node ids first.
    let mut specs: Vec<PeerSpec> = Vec::with_capacity(candidates.len());
    let mut finals: Vec<PrefixSet> = Vec::with_capacity(candidates.len());
    let mut earlier = PrefixSet::new();
    for (i, candidate) in candidates.iter().enumerate() {
        let kubespan = candidate.kubespan;
        let mesh = host_set(kubespan.address);
        let mut wanted = announced(candidate.record, kubespan);
        match candidate.mesh {
            MeshClaim::Owned | MeshClaim::Local => wanted = wanted.union(&mesh),
            MeshClaim::Duplicate => wanted = wanted.subtract(&mesh),
            MeshClaim::Absent => {}
        }

        let claims_local = wanted.intersection(local);
        if !claims_local.is_empty() {
            wanted = wanted.subtract(&claims_local);
            warnings.push(PeerWarning::ClaimsLocalAddress {
                node_id: candidate.node_id.to_owned(),
                prefixes: claims_local.to_prefixes(),
            });
        }

        let own_mesh = if candidate.mesh == MeshClaim::Owned {
            mesh
        } else {
            PrefixSet::new()
        };
        let contested = !wanted.intersection(&earlier).is_empty()
            || !wanted
                .intersection(&reserved)
                .subtract(&own_mesh)
                .is_empty();
        if contested {
            for (j, other) in candidates.iter().enumerate() {
                let hit = if j < i {
                    finals.get(j).map(|f| wanted.intersection(f))
                } else if j > i && other.mesh == MeshClaim::Owned {
                    Some(wanted.intersection(&host_set(other.kubespan.address)))
                } else {
                    None
                };
                let Some(hit) = hit.filter(|h| !h.is_empty()) else {
                    continue;
                };
                wanted = wanted.subtract(&hit);
                warnings.push(PeerWarning::Overlap {
                    node_id: candidate.node_id.to_owned(),
                    winner_node_id: other.node_id.to_owned(),
                    prefixes: hit.to_prefixes(),
                });
            }
        }
        // Re-add the mesh address (it cannot have been claimed by anyone else).
        wanted = wanted.union(&own_mesh);

        earlier = earlier.union(&wanted);
        specs.push(PeerSpec {
            public_key: kubespan.public_key.clone(),
            node_id: candidate.node_id.to_owned(),
            label: candidate.record.nodename.clone(),
            mesh_address: kubespan.address,
            allowed_ips: wanted.to_prefixes(),
            endpoints: candidate.record.endpoints.clone(),
            learned_endpoints: kubespan.learned_endpoints.clone(),
            relays: kubespan.relays.clone(),
            sealed_psk: kubespan.sealed_psk,
        });
        finals.push(wanted);
    }
    (specs, warnings)
}

/// (additional addresses, masked) ∪ (addresses as host prefixes) − excluded networks.
fn announced(record: &AffiliateRecord, kubespan: &KubeSpanInfo) -> PrefixSet {
    let networks = kubespan
        .additional_addresses
        .iter()
        .copied()
        .chain(record.addresses.iter().map(|a| IpNet::from(*a)));
    PrefixSet::from_prefixes(networks).subtract(&PrefixSet::from_prefixes(
        kubespan.exclude_advertised_networks.iter().copied(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().expect("test v6 address")
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| net(s)).collect()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test socket address")
    }

    fn node(id: &str, name: &str) -> AffiliateRecord {
        AffiliateRecord {
            node_id: id.to_owned(),
            nodename: name.to_owned(),
            hostname: format!("{name}.example"),
            machine_type: "worker".to_owned(),
            operating_system: "Talos (v1.14.0)".to_owned(),
            ..AffiliateRecord::default()
        }
    }

    /// A KubeSpan node whose mesh address is `fd00::<n>` and key `key-<id>`.
    fn peer(id: &str, n: u16, addresses: &[&str]) -> AffiliateRecord {
        let mut r = node(id, &format!("node-{id}"));
        r.addresses = addresses.iter().map(|a| ip(a)).collect();
        r.kubespan = Some(KubeSpanInfo {
            public_key: format!("key-{id}"),
            address: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, n),
            additional_addresses: Vec::new(),
            exclude_advertised_networks: Vec::new(),
            learned_endpoints: Vec::new(),
            relays: Vec::new(),
            sealed_psk: None,
        });
        r
    }

    fn map(records: Vec<AffiliateRecord>) -> BTreeMap<String, AffiliateRecord> {
        records
            .into_iter()
            .map(|r| (r.node_id.clone(), r))
            .collect()
    }

    fn allowed(specs: &[PeerSpec], node_id: &str) -> Vec<String> {
        specs
            .iter()
            .find(|s| s.node_id == node_id)
            .map(|s| s.allowed_ips.iter().map(ToString::to_string).collect())
            .unwrap_or_default()
    }

    // ---- merge ----

    #[test]
    fn merge_single_record_is_unchanged() {
        let r = peer("a", 1, &["10.0.0.1"]);
        let merged = merge_affiliates([("service/a", &r)]);
        assert_eq!(merged.len(), 1);
        assert_eq!(merged["a"], r);
    }

    #[test]
    fn merge_processes_k8s_before_service_whatever_the_input_order() {
        let mut k8s = node("a", "from-k8s");
        k8s.hostname = "k8s-host".into();
        k8s.operating_system = "Talos (v1.9.0)".into();
        k8s.addresses = vec![ip("10.0.0.1")];
        let mut service = node("a", "from-service");
        service.hostname = "service-host".into();
        service.operating_system = "Talos (v1.14.0)".into();
        service.addresses = vec![ip("10.0.0.2"), ip("10.0.0.1")];
        for input in [
            vec![("service/a", &service), ("k8s/a", &k8s)],
            vec![("k8s/a", &k8s), ("service/a", &service)],
        ] {
            let merged = merge_affiliates(input);
            let m = &merged["a"];
            assert_eq!(m.nodename, "from-service");
            assert_eq!(m.hostname, "service-host");
            // OS is not merged: the base (k8s) wins.
            assert_eq!(m.operating_system, "Talos (v1.9.0)");
            assert_eq!(m.addresses, vec![ip("10.0.0.1"), ip("10.0.0.2")]);
        }
    }

    #[test]
    fn merge_empty_scalars_do_not_override() {
        let mut base = peer("a", 1, &[]);
        base.control_plane_port = Some(6443);
        let mut later = AffiliateRecord {
            node_id: "a".into(),
            operating_system: "other".into(),
            ..AffiliateRecord::default()
        };
        later.kubespan = Some(KubeSpanInfo {
            public_key: String::new(),
            address: Ipv6Addr::UNSPECIFIED,
            additional_addresses: Vec::new(),
            exclude_advertised_networks: Vec::new(),
            learned_endpoints: Vec::new(),
            relays: Vec::new(),
            sealed_psk: None,
        });
        let merged = merge_affiliates([("k8s/a", &base), ("service/a", &later)]);
        assert_eq!(merged["a"], base);
    }

    #[test]
    fn merge_non_empty_scalars_override() {
        let mut base = peer("a", 1, &[]);
        base.machine_type = "worker".into();
        let mut later = peer("a", 2, &[]);
        later.hostname = "new-host".into();
        later.nodename = "new-name".into();
        later.machine_type = "controlplane".into();
        later.control_plane_port = Some(6443);
        later.operating_system = "ignored".into();
        if let Some(k) = &mut later.kubespan {
            k.public_key = "new-key".into();
        }
        let merged = merge_affiliates([("k8s/a", &base), ("service/a", &later)]);
        let m = &merged["a"];
        assert_eq!(m.hostname, "new-host");
        assert_eq!(m.nodename, "new-name");
        assert_eq!(m.machine_type, "controlplane");
        assert_eq!(m.control_plane_port, Some(6443));
        assert_eq!(m.operating_system, base.operating_system);
        let k = m.kubespan.as_ref().expect("kubespan");
        assert_eq!(k.public_key, "new-key");
        assert_eq!(k.address, v6("fd00::2"));
    }

    #[test]
    fn merge_unknown_machine_type_does_not_override() {
        let mut base = node("a", "a");
        base.machine_type = "controlplane".into();
        let mut later = node("a", "a");
        later.machine_type = "unknown".into();
        let merged = merge_affiliates([("k8s/a", &base), ("service/a", &later)]);
        assert_eq!(merged["a"].machine_type, "controlplane");
        later.machine_type = String::new();
        let merged = merge_affiliates([("k8s/a", &base), ("service/a", &later)]);
        assert_eq!(merged["a"].machine_type, "controlplane");
        // A base "unknown" stays when nothing better comes.
        base.machine_type = "unknown".into();
        let merged = merge_affiliates([("k8s/a", &base), ("service/a", &later)]);
        assert_eq!(merged["a"].machine_type, "unknown");
        later.machine_type = "init".into();
        let merged = merge_affiliates([("k8s/a", &base), ("service/a", &later)]);
        assert_eq!(merged["a"].machine_type, "init");
    }

    #[test]
    fn merge_lists_union_in_first_seen_order() {
        let mut base = peer("a", 1, &["10.0.0.2", "10.0.0.1", "10.0.0.2"]);
        base.endpoints = vec![sa("10.0.0.2:51820"), sa("1.1.1.1:51820")];
        if let Some(k) = &mut base.kubespan {
            k.additional_addresses = nets(&["10.244.1.0/24"]);
            k.exclude_advertised_networks = nets(&["192.168.0.0/16"]);
        }
        let mut later = peer("a", 1, &["10.0.0.3", "10.0.0.1"]);
        later.endpoints = vec![sa("1.1.1.1:51820"), sa("[2001:db8::1]:51820")];
        if let Some(k) = &mut later.kubespan {
            k.additional_addresses = nets(&["10.244.2.0/24", "10.244.1.0/24"]);
            k.exclude_advertised_networks = nets(&["172.16.0.0/12"]);
        }
        let merged = merge_affiliates([("service/a", &later), ("k8s/a", &base)]);
        let m = &merged["a"];
        assert_eq!(
            m.addresses,
            vec![ip("10.0.0.2"), ip("10.0.0.1"), ip("10.0.0.3")]
        );
        assert_eq!(
            m.endpoints,
            vec![
                sa("10.0.0.2:51820"),
                sa("1.1.1.1:51820"),
                sa("[2001:db8::1]:51820")
            ]
        );
        let k = m.kubespan.as_ref().expect("kubespan");
        assert_eq!(
            k.additional_addresses,
            nets(&["10.244.1.0/24", "10.244.2.0/24"])
        );
        assert_eq!(
            k.exclude_advertised_networks,
            nets(&["192.168.0.0/16", "172.16.0.0/12"])
        );
    }

    #[test]
    fn merge_kubespan_from_a_later_record() {
        let base = node("a", "a");
        let later = peer("a", 7, &[]);
        let merged = merge_affiliates([("k8s/a", &base), ("service/a", &later)]);
        assert_eq!(merged["a"].kubespan, later.kubespan);
        // And a later record without KubeSpan keeps the base's.
        let merged = merge_affiliates([("k8s/a", &later), ("service/a", &base)]);
        assert_eq!(merged["a"].kubespan, later.kubespan);
    }

    #[test]
    fn merge_groups_by_node_id() {
        let a = peer("a", 1, &["10.0.0.1"]);
        let b = peer("b", 2, &["10.0.0.2"]);
        let b2 = peer("b", 2, &["10.0.0.3"]);
        let merged = merge_affiliates([("service/b", &b), ("service/a", &a), ("k8s/b", &b2)]);
        assert_eq!(merged.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(merged["a"], a);
        assert_eq!(merged["b"].addresses, vec![ip("10.0.0.3"), ip("10.0.0.2")]);
    }

    #[test]
    fn merge_node_id_fallback_from_raw_id() {
        let mut r = node("", "x");
        r.addresses = vec![ip("10.0.0.9")];
        let merged = merge_affiliates([("service/xyz", &r)]);
        assert_eq!(merged.keys().collect::<Vec<_>>(), ["xyz"]);
        assert_eq!(merged["xyz"].node_id, "xyz");
        let merged = merge_affiliates([("plain", &r)]);
        assert_eq!(merged.keys().collect::<Vec<_>>(), ["plain"]);
        assert!(merge_affiliates([("service/", &r), ("", &r)]).is_empty());
        assert!(merge_affiliates(Vec::<(&str, &AffiliateRecord)>::new()).is_empty());
    }

    // ---- members ----

    #[test]
    fn members_keyed_by_nodename() {
        let mut a = peer("id-a", 1, &["10.0.0.1"]);
        a.nodename = "zeta".into();
        a.control_plane_port = Some(6443);
        a.machine_type = "controlplane".into();
        let b = node("id-b", "alpha");
        let no_name = node("id-c", "");
        let (members, duplicates) = members(&map(vec![a.clone(), b, no_name]));
        assert!(duplicates.is_empty());
        assert_eq!(members.keys().collect::<Vec<_>>(), ["alpha", "zeta"]);
        assert_eq!(
            members["zeta"],
            Member {
                nodename: "zeta".into(),
                node_id: "id-a".into(),
                hostname: a.hostname.clone(),
                machine_type: "controlplane".into(),
                operating_system: "Talos (v1.14.0)".into(),
                addresses: vec![ip("10.0.0.1")],
                control_plane_port: Some(6443),
                mesh_address: Some(v6("fd00::1")),
                public_key: Some("key-id-a".into()),
            }
        );
        assert_eq!(members["alpha"].node_id, "id-b");
        assert_eq!(members["alpha"].mesh_address, None);
        assert_eq!(members["alpha"].public_key, None);
    }

    #[test]
    fn members_duplicate_nodename_smaller_node_id_wins() {
        let mut x = node("2-node", "same");
        x.hostname = "second".into();
        let mut y = node("1-node", "same");
        y.hostname = "first".into();
        let mut z = node("3-node", "same");
        z.hostname = "third".into();
        let w = node("0-node", "other");
        let (members, duplicates) = members(&map(vec![x, y, z, w]));
        assert_eq!(duplicates, ["same"]);
        assert_eq!(members.len(), 2);
        assert_eq!(members["same"].node_id, "1-node");
        assert_eq!(members["same"].hostname, "first");
    }

    #[test]
    fn members_serialize() {
        let (members, _) = members(&map(vec![peer("a", 1, &["10.0.0.1"])]));
        let json = serde_json::to_value(&members["node-a"]).expect("json");
        assert_eq!(json["mesh_address"], "fd00::1");
        assert_eq!(json["addresses"][0], "10.0.0.1");
    }

    // ---- peer specs ----

    #[test]
    fn allowed_ips_spec_example() {
        let mut r = peer("b", 0x42, &["192.168.3.4"]);
        r.endpoints = vec![sa("192.168.3.4:51820"), sa("203.0.113.4:51820")];
        if let Some(k) = &mut r.kubespan {
            k.additional_addresses = nets(&["10.244.3.1/24"]);
            k.exclude_advertised_networks = nets(&["10.244.3.128/25"]);
        }
        let (specs, warnings) = peer_specs("a", &PrefixSet::new(), &map(vec![r.clone()]));
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            specs,
            [PeerSpec {
                sealed_psk: None,
                public_key: "key-b".into(),
                node_id: "b".into(),
                label: "node-b".into(),
                mesh_address: v6("fd00::42"),
                allowed_ips: nets(&["10.244.3.0/25", "192.168.3.4/32", "fd00::42/128"]),
                endpoints: r.endpoints.clone(),
                learned_endpoints: Vec::new(),
                relays: Vec::new(),
            }]
        );
    }

    #[test]
    fn self_and_non_kubespan_affiliates_skipped() {
        let local = peer("a", 1, &["10.0.0.1"]);
        let plain = node("b", "plain");
        let mut empty_key = peer("c", 3, &["10.0.0.3"]);
        if let Some(k) = &mut empty_key.kubespan {
            k.public_key.clear();
        }
        let d = peer("d", 4, &["10.0.0.4"]);
        let (specs, warnings) = peer_specs(
            "a",
            &PrefixSet::new(),
            &map(vec![local, plain, empty_key, d]),
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            specs.iter().map(|s| s.node_id.as_str()).collect::<Vec<_>>(),
            ["d"]
        );
    }

    #[test]
    fn specs_in_node_id_order() {
        let recs = vec![peer("c", 3, &[]), peer("a", 1, &[]), peer("b", 2, &[])];
        let (specs, _) = peer_specs("zz", &PrefixSet::new(), &map(recs));
        assert_eq!(
            specs.iter().map(|s| s.node_id.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
    }

    #[test]
    fn shared_vip_goes_to_smaller_node_id() {
        let a = peer("node-1", 1, &["10.0.0.1", "10.0.0.100"]);
        let b = peer("node-2", 2, &["10.0.0.2", "10.0.0.100"]);
        let (specs, warnings) = peer_specs("local", &PrefixSet::new(), &map(vec![b, a]));
        assert_eq!(
            allowed(&specs, "node-1"),
            ["10.0.0.1/32", "10.0.0.100/32", "fd00::1/128"]
        );
        assert_eq!(allowed(&specs, "node-2"), ["10.0.0.2/32", "fd00::2/128"]);
        assert_eq!(
            warnings,
            [PeerWarning::Overlap {
                node_id: "node-2".into(),
                winner_node_id: "node-1".into(),
                prefixes: nets(&["10.0.0.100/32"]),
            }]
        );
    }

    #[test]
    fn overlap_can_leave_only_the_mesh_address() {
        let mut a = peer("a", 1, &[]);
        let mut b = peer("b", 2, &["10.244.1.7"]);
        let c = peer("c", 3, &["10.244.1.7", "10.244.2.1"]);
        if let Some(k) = &mut a.kubespan {
            k.additional_addresses = nets(&["10.244.0.0/16"]);
        }
        if let Some(k) = &mut b.kubespan {
            k.additional_addresses = nets(&["10.244.1.0/24"]);
        }
        let (specs, warnings) = peer_specs("local", &PrefixSet::new(), &map(vec![a, b, c]));
        assert_eq!(allowed(&specs, "a"), ["10.244.0.0/16", "fd00::1/128"]);
        assert_eq!(allowed(&specs, "b"), ["fd00::2/128"]);
        assert_eq!(allowed(&specs, "c"), ["fd00::3/128"]);
        assert_eq!(
            warnings,
            [
                PeerWarning::Overlap {
                    node_id: "b".into(),
                    winner_node_id: "a".into(),
                    prefixes: nets(&["10.244.1.0/24"]),
                },
                PeerWarning::Overlap {
                    node_id: "c".into(),
                    winner_node_id: "a".into(),
                    prefixes: nets(&["10.244.1.7/32", "10.244.2.1/32"]),
                },
            ]
        );
    }

    #[test]
    fn partial_overlap_subtracts_only_the_shared_part() {
        let mut a = peer("a", 1, &[]);
        let mut b = peer("b", 2, &[]);
        if let Some(k) = &mut a.kubespan {
            k.additional_addresses = nets(&["10.0.0.0/25"]);
        }
        if let Some(k) = &mut b.kubespan {
            k.additional_addresses = nets(&["10.0.0.0/24"]);
        }
        let (specs, warnings) = peer_specs("local", &PrefixSet::new(), &map(vec![a, b]));
        assert_eq!(allowed(&specs, "b"), ["10.0.0.128/25", "fd00::2/128"]);
        assert_eq!(warnings.len(), 1);
    }

    #[test]
    fn exclusions_apply_but_mesh_address_is_re_added() {
        let mut r = peer("b", 2, &["10.0.0.2", "fd00::2", "2001:db8::2"]);
        if let Some(k) = &mut r.kubespan {
            k.exclude_advertised_networks = nets(&["0.0.0.0/0", "::/0"]);
        }
        let (specs, warnings) = peer_specs("a", &PrefixSet::new(), &map(vec![r]));
        assert!(warnings.is_empty());
        assert_eq!(allowed(&specs, "b"), ["fd00::2/128"]);
    }

    #[test]
    fn mesh_addresses_are_reserved_for_their_owner() {
        // "a" sorts first and announces the whole ULA range, including b's mesh address.
        let mut a = peer("a", 1, &[]);
        if let Some(k) = &mut a.kubespan {
            k.additional_addresses = nets(&["fd00::/126"]);
        }
        let b = peer("b", 2, &[]);
        let (specs, warnings) = peer_specs("local", &PrefixSet::new(), &map(vec![a, b]));
        assert_eq!(allowed(&specs, "a"), ["fd00::/127", "fd00::3/128"]);
        assert_eq!(allowed(&specs, "b"), ["fd00::2/128"]);
        assert_eq!(
            warnings,
            [PeerWarning::Overlap {
                node_id: "a".into(),
                winner_node_id: "b".into(),
                prefixes: nets(&["fd00::2/128"]),
            }]
        );
    }

    #[test]
    fn duplicate_public_key_skips_later_peer() {
        let a = peer("a", 1, &["10.0.0.1"]);
        let mut b = peer("b", 2, &["10.0.0.2"]);
        let mut c = peer("c", 3, &["10.0.0.3"]);
        for r in [&mut b, &mut c] {
            if let Some(k) = &mut r.kubespan {
                k.public_key = "key-a".into();
            }
        }
        let d = peer("d", 4, &["10.0.0.4"]);
        let (specs, warnings) = peer_specs("local", &PrefixSet::new(), &map(vec![a, b, c, d]));
        assert_eq!(
            specs.iter().map(|s| s.node_id.as_str()).collect::<Vec<_>>(),
            ["a", "d"]
        );
        assert_eq!(
            warnings,
            [PeerWarning::DuplicatePublicKey {
                public_key: "key-a".into(),
                node_ids: vec!["a".into(), "b".into(), "c".into()],
            }]
        );
        // The skipped peers claim nothing: their mesh addresses are not reserved either.
        assert_eq!(allowed(&specs, "a"), ["10.0.0.1/32", "fd00::1/128"]);
    }

    #[test]
    fn peer_with_the_local_public_key_is_skipped() {
        let local = peer("m", 1, &["10.0.0.1"]);
        let mut a = peer("a", 2, &["10.0.0.2"]);
        if let Some(k) = &mut a.kubespan {
            k.public_key = "key-m".into();
        }
        let local_set = PrefixSet::from_prefixes(nets(&["10.0.0.1/32", "fd00::1/128"]));
        let (specs, warnings) = peer_specs("m", &local_set, &map(vec![local, a]));
        assert!(specs.is_empty());
        assert_eq!(
            warnings,
            [PeerWarning::DuplicatePublicKey {
                public_key: "key-m".into(),
                node_ids: vec!["a".into(), "m".into()],
            }]
        );
    }

    #[test]
    fn duplicate_mesh_address_keeps_later_peer_without_it() {
        let a = peer("a", 1, &["10.0.0.1", "fd00::1"]);
        // Talos publishes the mesh address among the addresses too.
        let b = peer("b", 1, &["10.0.0.2", "fd00::1"]);
        let (specs, warnings) = peer_specs("local", &PrefixSet::new(), &map(vec![a, b]));
        assert_eq!(specs.len(), 2);
        assert_eq!(allowed(&specs, "a"), ["10.0.0.1/32", "fd00::1/128"]);
        assert_eq!(allowed(&specs, "b"), ["10.0.0.2/32"]);
        assert_eq!(specs[1].mesh_address, v6("fd00::1"));
        assert_eq!(
            warnings,
            [PeerWarning::DuplicateMeshAddress {
                address: v6("fd00::1"),
                node_ids: vec!["a".into(), "b".into()],
            }]
        );
    }

    #[test]
    fn duplicate_of_local_mesh_address() {
        let local = peer("z-local", 9, &["10.0.0.9"]);
        let a = peer("a", 9, &["10.0.0.1"]);
        let local_set = PrefixSet::from_prefixes(nets(&["10.0.0.9/32", "fd00::9/128"]));
        let (specs, warnings) = peer_specs("z-local", &local_set, &map(vec![local, a]));
        assert_eq!(allowed(&specs, "a"), ["10.0.0.1/32"]);
        assert_eq!(
            warnings,
            [PeerWarning::DuplicateMeshAddress {
                address: v6("fd00::9"),
                node_ids: vec!["a".into(), "z-local".into()],
            }]
        );
    }

    #[test]
    fn local_mesh_address_without_local_record_is_a_local_claim() {
        let a = peer("a", 9, &["10.0.0.1"]);
        let local_set = PrefixSet::from_prefixes(nets(&["fd00::9/128"]));
        let (specs, warnings) = peer_specs("local", &local_set, &map(vec![a]));
        assert_eq!(allowed(&specs, "a"), ["10.0.0.1/32"]);
        assert_eq!(
            warnings,
            [PeerWarning::ClaimsLocalAddress {
                node_id: "a".into(),
                prefixes: nets(&["fd00::9/128"]),
            }]
        );
    }

    #[test]
    fn local_addresses_are_not_routed_to_peers() {
        let local = peer("l", 1, &["192.168.1.10"]);
        let mut a = peer("a", 2, &["192.168.1.20"]);
        if let Some(k) = &mut a.kubespan {
            k.additional_addresses = nets(&["192.168.1.0/30", "192.168.1.10/32"]);
        }
        let b = peer("b", 3, &["192.168.1.10"]);
        let local_set = PrefixSet::from_prefixes(nets(&["192.168.1.10/32", "fd00::1/128"]));
        let (specs, warnings) = peer_specs("l", &local_set, &map(vec![local, a, b]));
        assert_eq!(
            allowed(&specs, "a"),
            ["192.168.1.0/30", "192.168.1.20/32", "fd00::2/128"]
        );
        assert_eq!(allowed(&specs, "b"), ["fd00::3/128"]);
        assert_eq!(
            warnings,
            [
                PeerWarning::ClaimsLocalAddress {
                    node_id: "a".into(),
                    prefixes: nets(&["192.168.1.10/32"]),
                },
                PeerWarning::ClaimsLocalAddress {
                    node_id: "b".into(),
                    prefixes: nets(&["192.168.1.10/32"]),
                },
            ]
        );
    }

    #[test]
    fn unspecified_mesh_address_is_not_added() {
        let mut a = peer("a", 1, &["10.0.0.1"]);
        let mut b = peer("b", 2, &["10.0.0.2"]);
        for r in [&mut a, &mut b] {
            if let Some(k) = &mut r.kubespan {
                k.address = Ipv6Addr::UNSPECIFIED;
            }
        }
        let (specs, warnings) = peer_specs("local", &PrefixSet::new(), &map(vec![a, b]));
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(allowed(&specs, "a"), ["10.0.0.1/32"]);
        assert_eq!(allowed(&specs, "b"), ["10.0.0.2/32"]);
    }

    #[test]
    fn endpoints_and_label_taken_as_is() {
        let mut a = peer("a", 1, &[]);
        a.nodename = "label-a".into();
        a.endpoints = vec![
            sa("[2001:db8::1]:51820"),
            sa("10.0.0.1:51820"),
            sa("1.2.3.4:5678"),
        ];
        let (specs, _) = peer_specs("local", &PrefixSet::new(), &map(vec![a.clone()]));
        assert_eq!(specs[0].label, "label-a");
        assert_eq!(specs[0].endpoints, a.endpoints);
    }

    #[test]
    fn empty_input() {
        let (specs, warnings) = peer_specs("", &PrefixSet::new(), &BTreeMap::new());
        assert!(specs.is_empty() && warnings.is_empty());
        let (members, duplicates) = members(&BTreeMap::new());
        assert!(members.is_empty() && duplicates.is_empty());
    }

    #[test]
    fn allowed_ips_never_shared_between_peers() {
        // Many peers with overlapping claims, VIPs, duplicate meshes and a wide network.
        let mut recs = Vec::new();
        for i in 0..20u16 {
            let mut r = peer(
                &format!("n{i:02}"),
                (i % 7) + 1,
                &[&format!("10.0.{}.1", i % 5), "10.9.9.9"],
            );
            if let Some(k) = &mut r.kubespan {
                if i % 6 == 0 {
                    k.additional_addresses = nets(&["10.0.0.0/16", "fd00::/120"]);
                }
                if i % 4 == 1 {
                    k.exclude_advertised_networks = nets(&["10.0.1.0/24"]);
                }
            }
            recs.push(r);
        }
        let local_set = PrefixSet::from_prefixes(nets(&["10.0.3.1/32", "fd00::99/128"]));
        let (specs, _) = peer_specs("n05", &local_set, &map(recs));
        let mut seen = PrefixSet::new();
        for s in &specs {
            let set = PrefixSet::from_prefixes(s.allowed_ips.iter().copied());
            assert!(seen.intersection(&set).is_empty(), "{} overlaps", s.node_id);
            assert!(set.intersection(&local_set).is_empty());
            seen = seen.union(&set);
        }
    }

    #[test]
    fn discovery_service_limit_of_peers() {
        // 1024 affiliates (the discovery service's per-cluster limit), all sharing one VIP.
        let recs: Vec<AffiliateRecord> = (0..1024u16)
            .map(|i| {
                let own = format!("10.{}.{}.1", i / 256, i % 256);
                peer(&format!("n{i:04}"), i + 1, &[&own, "192.0.2.1"])
            })
            .collect();
        let (specs, warnings) = peer_specs("local", &PrefixSet::new(), &map(recs));
        assert_eq!(specs.len(), 1024);
        assert_eq!(warnings.len(), 1023);
        assert_eq!(
            allowed(&specs, "n0000"),
            ["10.0.0.1/32", "192.0.2.1/32", "fd00::1/128"]
        );
        assert_eq!(allowed(&specs, "n1023"), ["10.3.255.1/32", "fd00::400/128"]);
    }
}
