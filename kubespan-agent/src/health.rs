//! `kubespanctl health`: whether this node's mesh works and, when it does not, why and what to
//! do. [`evaluate`] is pure: it turns facts the shells gathered (discovery connections, peers,
//! probes of the data plane) into checks with stable names that scripts and probes match on.

use std::net::IpAddr;

use crate::agent::NatEndpoints;
use crate::discovery::ConnectionStatus;

/// A clock further than this from the discovery service's is reported. The `date` header has
/// whole seconds and the answer takes a round trip: a few seconds are noise.
pub const CLOCK_TOLERANCE_MS: i64 = 10_000;

/// Check names, stable across releases.
pub mod names {
    pub const DISCOVERY: &str = "discovery";
    pub const PUBLIC_ADDRESS: &str = "public-address";
    pub const DECRYPT: &str = "decrypt";
    pub const CLOCK: &str = "clock";
    pub const PEERS: &str = "peers";
    pub const PATH_MTU: &str = "path-mtu";
    pub const FIREWALL: &str = "firewall";
    pub const ROUTING: &str = "routing";
    pub const LISTEN_PORT: &str = "listen-port";
}

/// Ordered by severity: the overall status is the greatest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Skipped,
    Ok,
    Warn,
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Skipped => "skipped",
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub summary: String,
    pub details: Vec<String>,
    pub hint: String,
}

impl Check {
    fn new(name: &'static str, status: Status, summary: impl Into<String>) -> Self {
        Self {
            name,
            status,
            summary: summary.into(),
            details: Vec::new(),
            hint: String::new(),
        }
    }

    fn details(mut self, details: Vec<String>) -> Self {
        self.details = details;
        self
    }

    fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = hint.into();
        self
    }
}

/// One peer as the data plane sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerFacts {
    pub label: String,
    pub state: String,
    pub last_handshake_unix_ms: i64,
    pub endpoint: Option<String>,
    /// The endpoints tried (the data plane's candidates, else the announced ones).
    pub tried: Vec<String>,
}

/// The answer of one peer to the path probe over the tunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathProbe {
    pub label: String,
    /// A small echo came back.
    pub small: bool,
    /// An echo filling the mesh MTU came back.
    pub full: bool,
}

/// What the data plane's shells found. `None` fields were not looked at.
#[derive(Clone, Debug, Default)]
pub struct DataPlaneFacts {
    pub interface: String,
    pub mtu: u32,
    pub listen_port: u16,
    /// The firewall table's chains, or why it cannot be listed.
    pub firewall: Option<Result<Vec<String>, String>>,
    /// Routing pieces that are missing, or why they cannot be read.
    pub routing_missing: Option<Result<Vec<String>, String>>,
    /// Whether a UDP socket is bound to the listen port, or why that cannot be read.
    pub listen_port_bound: Option<Result<bool, String>>,
    /// Probes of the peers that are up, or why the probe could not run; `None` when not
    /// requested.
    pub path_probes: Option<Result<Vec<PathProbe>, String>>,
}

/// Everything [`evaluate`] looks at.
#[derive(Clone, Debug, Default)]
pub struct HealthFacts {
    pub now_unix_ms: i64,
    pub cipher: String,
    pub discovery: Vec<ConnectionStatus>,
    /// This node's own addresses (what it publishes).
    pub node_addresses: Vec<IpAddr>,
    pub nat: NatEndpoints,
    /// Relays this node announces (connected ones).
    pub relays: Vec<String>,
    pub listen_port: u16,
    pub peers: Vec<PeerFacts>,
    /// `None` without a data plane (`backend: none`).
    pub data_plane: Option<DataPlaneFacts>,
}

/// The checks, in a fixed order, and the overall status (the worst one; `ok` if all skipped).
pub fn evaluate(facts: &HealthFacts) -> (Status, Vec<Check>) {
    let checks = vec![
        discovery(facts),
        public_address(facts),
        decrypt(facts),
        clock(facts),
        peers(facts),
        path_mtu(facts),
        firewall(facts),
        routing(facts),
        listen_port(facts),
    ];
    let overall = checks
        .iter()
        .map(|c| c.status)
        .max()
        .unwrap_or(Status::Ok)
        .max(Status::Ok);
    (overall, checks)
}

fn ago(now_unix_ms: i64, then_unix_ms: i64) -> String {
    if then_unix_ms <= 0 {
        return "never".into();
    }
    let seconds = (now_unix_ms - then_unix_ms).max(0) / 1000;
    match seconds {
        0..120 => format!("{seconds}s ago"),
        120..7200 => format!("{}m ago", seconds / 60),
        _ => format!("{}h ago", seconds / 3600),
    }
}

fn discovery(facts: &HealthFacts) -> Check {
    let name = names::DISCOVERY;
    if facts.discovery.is_empty() {
        return Check::new(name, Status::Fail, "no discovery service is configured")
            .hint("set discovery.endpoints in the configuration");
    }
    let connected = facts
        .discovery
        .iter()
        .filter(|c| c.state == "connected")
        .count();
    let details = facts
        .discovery
        .iter()
        .map(|c| {
            let since = ago(facts.now_unix_ms, c.since_unix_ms);
            if c.state == "connected" {
                format!(
                    "{}: watching since {since}, {} affiliates",
                    c.endpoint, c.affiliates
                )
            } else if c.last_error.is_empty() {
                format!("{}: {} since {since}", c.endpoint, c.state)
            } else {
                format!(
                    "{}: {} since {since}; last error: {}",
                    c.endpoint, c.state, c.last_error
                )
            }
        })
        .collect();
    let total = facts.discovery.len();
    let hint = "check that the endpoint is reachable from this node (address, port, firewall, \
                DNS, TLS settings) and discovery.endpoints in the configuration; the last error \
                says which step fails";
    if connected == total {
        Check::new(
            name,
            Status::Ok,
            format!("{connected} of {total} discovery services connected and watching"),
        )
        .details(details)
    } else if connected > 0 {
        Check::new(
            name,
            Status::Warn,
            format!("{connected} of {total} discovery services connected"),
        )
        .details(details)
        .hint(hint)
    } else {
        Check::new(
            name,
            Status::Fail,
            format!(
                "no discovery service connected (0 of {total}): new members and changes are not \
                 learned"
            ),
        )
        .details(details)
        .hint(hint)
    }
}

fn public_address(facts: &HealthFacts) -> Check {
    let name = names::PUBLIC_ADDRESS;
    let mut public_ips: Vec<IpAddr> = facts
        .discovery
        .iter()
        .filter_map(|c| c.public_ip)
        .filter(|ip| !ip.is_loopback())
        .collect();
    public_ips.sort();
    public_ips.dedup();
    if public_ips.is_empty() {
        return Check::new(
            name,
            Status::Skipped,
            "no discovery service has reported this node's public address",
        );
    }
    let behind: Vec<IpAddr> = public_ips
        .iter()
        .copied()
        .filter(|ip| !facts.node_addresses.contains(ip))
        .collect();
    let shown = |ips: &[IpAddr]| {
        ips.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if behind.is_empty() {
        return Check::new(
            name,
            Status::Ok,
            format!(
                "discovery sees this node at {}, one of its own addresses (no NAT)",
                shown(&public_ips)
            ),
        );
    }
    let mut details = vec![format!(
        "this node's addresses: {}",
        shown(&facts.node_addresses)
    )];
    let mut ways = Vec::new();
    if let Some(mapped) = facts.nat.mapped {
        ways.push(format!("port mapping {mapped}"));
    }
    if let Some(reflexive) = facts.nat.reflexive {
        ways.push(format!("STUN reflexive endpoint {reflexive}"));
    }
    if !facts.relays.is_empty() {
        ways.push(format!("relays {}", facts.relays.join(", ")));
    }
    if let Some(note) = &facts.nat.note {
        details.push(note.clone());
    }
    let summary = format!(
        "behind NAT: discovery sees this node at {}, not one of its own addresses",
        shown(&behind)
    );
    if ways.is_empty() {
        Check::new(name, Status::Warn, summary)
            .details(details)
            .hint(format!(
                "peers outside this NAT reach this node only after it reached them; forward UDP \
                 port {} to it, enable natTraversal.portMapping or natTraversal.stunServers, or \
                 configure relay.servers",
                facts.listen_port
            ))
    } else {
        details.push(format!(
            "reachable from outside through {}",
            ways.join(", ")
        ));
        Check::new(name, Status::Ok, summary).details(details)
    }
}

fn decrypt(facts: &HealthFacts) -> Check {
    let name = names::DECRYPT;
    // Every service lists the same cluster: the largest count is the number of such nodes.
    let unreadable = facts
        .discovery
        .iter()
        .map(|c| c.unreadable_affiliates)
        .max()
        .unwrap_or(0);
    if unreadable == 0 {
        return Check::new(
            name,
            Status::Ok,
            "every record in the cluster opens with this node's secret",
        );
    }
    let details = facts
        .discovery
        .iter()
        .filter(|c| c.unreadable_affiliates > 0)
        .map(|c| format!("{}: {} unreadable", c.endpoint, c.unreadable_affiliates))
        .collect();
    Check::new(
        name,
        Status::Warn,
        format!(
            "{unreadable} member record(s) do not open with this node's cluster secret (cipher \
             {}); those nodes are not peers",
            facts.cipher
        ),
    )
    .details(details)
    .hint(
        "every node needs the same clusterID, clusterSecret and cipher (Talos nodes use cipher: \
         talos); compare the configuration of the nodes missing from `kubespanctl members`",
    )
}

fn clock(facts: &HealthFacts) -> Check {
    let name = names::CLOCK;
    let offsets: Vec<(&str, i64)> = facts
        .discovery
        .iter()
        .filter_map(|c| c.clock_offset_ms.map(|o| (c.endpoint.as_str(), o)))
        .collect();
    let Some(&(endpoint, worst)) = offsets.iter().max_by_key(|(_, o)| o.unsigned_abs()) else {
        return Check::new(
            name,
            Status::Skipped,
            "no discovery service has reported its time",
        );
    };
    let seconds = worst.unsigned_abs() / 1000;
    if worst.abs() <= CLOCK_TOLERANCE_MS {
        return Check::new(
            name,
            Status::Ok,
            format!("within {seconds}s of the discovery service's clock"),
        );
    }
    let direction = if worst > 0 { "behind" } else { "ahead of" };
    Check::new(
        name,
        Status::Warn,
        format!("this node's clock is {seconds}s {direction} the clock of {endpoint}"),
    )
    .hint(
        "synchronise the clock (chrony, systemd-timesyncd); a clock set back makes peers ignore \
         this node's WireGuard handshakes until it passes the last one they saw, and TLS \
         certificates look expired or not yet valid",
    )
}

fn peers(facts: &HealthFacts) -> Check {
    let name = names::PEERS;
    if facts.data_plane.is_none() {
        return Check::new(name, Status::Skipped, "no data plane (backend: none)");
    }
    let total = facts.peers.len();
    if total == 0 {
        return Check::new(name, Status::Ok, "no peers (this is the only member)");
    }
    let down: Vec<&PeerFacts> = facts.peers.iter().filter(|p| p.state != "up").collect();
    if down.is_empty() {
        return Check::new(name, Status::Ok, format!("all {total} peers up"));
    }
    let details = down
        .iter()
        .map(|p| {
            let tried = if p.tried.is_empty() {
                "no endpoint known".to_owned()
            } else {
                format!("tried {}", p.tried.join(", "))
            };
            format!(
                "{}: {}, last handshake {}; {tried}",
                p.label,
                p.state,
                ago(facts.now_unix_ms, p.last_handshake_unix_ms)
            )
        })
        .collect();
    Check::new(
        name,
        Status::Fail,
        format!("{} of {total} peers not up", down.len()),
    )
    .details(details)
    .hint(format!(
        "check that UDP port {} passes between the nodes in both directions and that the peer's \
         agent runs; `kubespanctl peers` shows each path; a peer behind NAT needs port mapping, \
         STUN or a relay",
        facts.listen_port
    ))
}

fn path_mtu(facts: &HealthFacts) -> Check {
    let name = names::PATH_MTU;
    let Some(data_plane) = &facts.data_plane else {
        return Check::new(name, Status::Skipped, "no data plane (backend: none)");
    };
    let probes = match &data_plane.path_probes {
        None => return Check::new(name, Status::Skipped, "not probed (--skip-path-probe)"),
        Some(Err(error)) => {
            return Check::new(
                name,
                Status::Warn,
                format!("the path probe could not run: {error}"),
            )
            .hint(
                "the agent needs CAP_NET_RAW for the probe's ICMPv6 socket (the systemd unit \
                 and the Kubernetes manifest grant it)",
            );
        }
        Some(Ok(probes)) => probes,
    };
    if probes.is_empty() {
        return Check::new(name, Status::Skipped, "no peer is up to probe");
    }
    let mtu = data_plane.mtu;
    let too_big: Vec<&PathProbe> = probes.iter().filter(|p| p.small && !p.full).collect();
    let silent: Vec<&PathProbe> = probes.iter().filter(|p| !p.small && !p.full).collect();
    if !too_big.is_empty() {
        let details = too_big
            .iter()
            .map(|p| {
                format!(
                    "{}: small packets pass, {mtu}-byte packets are lost",
                    p.label
                )
            })
            .collect();
        return Check::new(
            name,
            Status::Fail,
            format!(
                "packets of the mesh MTU ({mtu} bytes) do not reach {} of {} peers",
                too_big.len(),
                probes.len()
            ),
        )
        .details(details)
        .hint(format!(
            "the path between the nodes carries less than {mtu} bytes plus WireGuard's 60 (IPv4) \
             or 80 (IPv6) bytes: lower `mtu` in the configuration, or fix the underlay's MTU \
             (tunnels, VPNs, PPPoE)"
        ));
    }
    let answered = probes.len() - silent.len();
    let check = Check::new(
        name,
        if silent.is_empty() {
            Status::Ok
        } else {
            Status::Warn
        },
        format!(
            "{mtu}-byte packets reach {answered} of {} peers",
            probes.len()
        ),
    );
    if silent.is_empty() {
        check
    } else {
        check
            .details(
                silent
                    .iter()
                    .map(|p| format!("{}: no answer to ICMPv6 echo over the tunnel", p.label))
                    .collect(),
            )
            .hint("a peer's firewall may drop ICMPv6 echo on the mesh interface; nothing else is known")
    }
}

fn firewall(facts: &HealthFacts) -> Check {
    let name = names::FIREWALL;
    let Some(found) = facts.data_plane.as_ref().and_then(|d| d.firewall.clone()) else {
        return Check::new(name, Status::Skipped, "no data plane (backend: none)");
    };
    match found {
        Ok(chains) if !chains.is_empty() => Check::new(
            name,
            Status::Ok,
            format!("nftables table in place (chains {})", chains.join(", ")),
        ),
        Ok(_) => {
            Check::new(name, Status::Fail, "the nftables table has no chains").hint(RESTORE_HINT)
        }
        Err(error) => Check::new(name, Status::Fail, error).hint(RESTORE_HINT),
    }
}

const RESTORE_HINT: &str = "something removed what the agent installed (a firewall reload, `nft flush \
     ruleset`, a network manager); restart the agent to restore it and find what removed it";

fn routing(facts: &HealthFacts) -> Check {
    let name = names::ROUTING;
    let Some(found) = facts
        .data_plane
        .as_ref()
        .and_then(|d| d.routing_missing.clone())
    else {
        return Check::new(name, Status::Skipped, "no data plane (backend: none)");
    };
    match found {
        Ok(missing) if missing.is_empty() => Check::new(
            name,
            Status::Ok,
            "policy routing rules, mesh table routes and interface in place",
        ),
        Ok(missing) => Check::new(
            name,
            Status::Fail,
            format!("{} routing piece(s) missing", missing.len()),
        )
        .details(missing)
        .hint(RESTORE_HINT),
        Err(error) => Check::new(name, Status::Fail, format!("cannot read routing: {error}")),
    }
}

fn listen_port(facts: &HealthFacts) -> Check {
    let name = names::LISTEN_PORT;
    let Some(data_plane) = &facts.data_plane else {
        return Check::new(name, Status::Skipped, "no data plane (backend: none)");
    };
    let port = data_plane.listen_port;
    match &data_plane.listen_port_bound {
        None => Check::new(name, Status::Skipped, "not looked at"),
        Some(Ok(true)) => Check::new(name, Status::Ok, format!("UDP port {port} is bound")),
        Some(Ok(false)) => Check::new(
            name,
            Status::Fail,
            format!("nothing listens on UDP port {port}: peers cannot reach this node"),
        )
        .hint(format!(
            "the WireGuard device {} lost its socket; restart the agent",
            data_plane.interface
        )),
        Some(Err(error)) => Check::new(name, Status::Fail, error.clone()),
    }
}

/// Whether `/proc/net/udp` or `/proc/net/udp6` text lists a socket bound to `port` (the local
/// address column is `ADDRESS:PORT` in hex).
pub fn udp_port_listed(proc_net_udp: &str, port: u16) -> bool {
    let wanted = format!("{port:04X}");
    proc_net_udp.lines().skip(1).any(|line| {
        line.split_whitespace()
            .nth(1)
            .and_then(|local| local.rsplit_once(':'))
            .is_some_and(|(_, p)| p.eq_ignore_ascii_case(&wanted))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn connected(endpoint: &str) -> ConnectionStatus {
        ConnectionStatus {
            endpoint: endpoint.into(),
            state: "connected",
            since_unix_ms: NOW - 60_000,
            affiliates: 2,
            public_ip: Some("10.0.0.1".parse().unwrap()),
            clock_offset_ms: Some(400),
            ..ConnectionStatus::default()
        }
    }

    fn data_plane() -> DataPlaneFacts {
        DataPlaneFacts {
            interface: "kubespan".into(),
            mtu: 1420,
            listen_port: 51820,
            firewall: Some(Ok(vec!["prerouting".into(), "output".into()])),
            routing_missing: Some(Ok(Vec::new())),
            listen_port_bound: Some(Ok(true)),
            path_probes: Some(Ok(vec![PathProbe {
                label: "node-2".into(),
                small: true,
                full: true,
            }])),
        }
    }

    fn healthy() -> HealthFacts {
        HealthFacts {
            now_unix_ms: NOW,
            cipher: "native".into(),
            discovery: vec![connected("http://a:3000"), connected("http://b:3000")],
            node_addresses: vec!["10.0.0.1".parse().unwrap()],
            listen_port: 51820,
            peers: vec![PeerFacts {
                label: "node-2".into(),
                state: "up".into(),
                last_handshake_unix_ms: NOW - 3_000,
                ..PeerFacts::default()
            }],
            data_plane: Some(data_plane()),
            ..HealthFacts::default()
        }
    }

    fn check(facts: &HealthFacts, name: &str) -> Check {
        evaluate(facts)
            .1
            .into_iter()
            .find(|c| c.name == name)
            .expect("every check is always reported")
    }

    #[test]
    fn a_healthy_node_passes_every_check_in_a_fixed_order() {
        let (overall, checks) = evaluate(&healthy());
        let names: Vec<_> = checks.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "discovery",
                "public-address",
                "decrypt",
                "clock",
                "peers",
                "path-mtu",
                "firewall",
                "routing",
                "listen-port"
            ]
        );
        assert!(checks.iter().all(|c| c.status == Status::Ok), "{checks:#?}");
        assert_eq!(overall, Status::Ok);
    }

    #[test]
    fn discovery_fails_when_no_service_is_connected_and_warns_when_some_are() {
        let mut facts = healthy();
        facts.discovery[1].state = "backoff";
        facts.discovery[1].last_error = "cannot connect to b:3000: connection refused".into();
        let c = check(&facts, names::DISCOVERY);
        assert_eq!(c.status, Status::Warn);
        assert!(c.details[1].contains("connection refused"), "{c:?}");
        facts.discovery[0].state = "connecting";
        let c = check(&facts, names::DISCOVERY);
        assert_eq!(c.status, Status::Fail);
        assert!(!c.hint.is_empty());
        assert_eq!(evaluate(&facts).0, Status::Fail);
        facts.discovery.clear();
        assert_eq!(check(&facts, names::DISCOVERY).status, Status::Fail);
    }

    #[test]
    fn a_public_address_not_on_the_node_is_nat_and_warns_without_a_way_in() {
        let mut facts = healthy();
        facts.discovery[0].public_ip = Some("198.51.100.7".parse().unwrap());
        let c = check(&facts, names::PUBLIC_ADDRESS);
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(c.summary.contains("198.51.100.7"));
        assert!(c.hint.contains("51820"));
        facts.nat.mapped = Some("198.51.100.7:51820".parse().unwrap());
        let c = check(&facts, names::PUBLIC_ADDRESS);
        assert_eq!(c.status, Status::Ok);
        assert!(c.details.iter().any(|d| d.contains("port mapping")));
        // Loopback (a server on this host) says nothing about NAT.
        let mut facts = healthy();
        for c in &mut facts.discovery {
            c.public_ip = Some("127.0.0.1".parse().unwrap());
        }
        assert_eq!(check(&facts, names::PUBLIC_ADDRESS).status, Status::Skipped);
    }

    #[test]
    fn unreadable_records_are_counted_once_per_node_with_the_cipher_named() {
        let mut facts = healthy();
        facts.discovery[0].unreadable_affiliates = 2;
        facts.discovery[1].unreadable_affiliates = 2;
        let c = check(&facts, names::DECRYPT);
        assert_eq!(c.status, Status::Warn);
        assert!(c.summary.starts_with("2 member record(s)"), "{c:?}");
        assert!(c.summary.contains("cipher native"));
    }

    #[test]
    fn a_clock_beyond_the_tolerance_warns_and_says_which_way() {
        let mut facts = healthy();
        facts.discovery[1].clock_offset_ms = Some(-95_000);
        let c = check(&facts, names::CLOCK);
        assert_eq!(c.status, Status::Warn);
        assert!(c.summary.contains("95s ahead of"), "{c:?}");
        facts.discovery[1].clock_offset_ms = Some(CLOCK_TOLERANCE_MS);
        assert_eq!(check(&facts, names::CLOCK).status, Status::Ok);
        for c in &mut facts.discovery {
            c.clock_offset_ms = None;
        }
        assert_eq!(check(&facts, names::CLOCK).status, Status::Skipped);
    }

    #[test]
    fn a_down_peer_fails_with_its_last_handshake_and_what_was_tried() {
        let mut facts = healthy();
        facts.peers.push(PeerFacts {
            label: "node-3".into(),
            state: "down".into(),
            last_handshake_unix_ms: NOW - 300_000,
            tried: vec!["10.0.0.3:51820".into(), "203.0.113.3:51820".into()],
            ..PeerFacts::default()
        });
        let c = check(&facts, names::PEERS);
        assert_eq!(c.status, Status::Fail);
        assert_eq!(c.summary, "1 of 2 peers not up");
        assert_eq!(
            c.details,
            ["node-3: down, last handshake 5m ago; tried 10.0.0.3:51820, 203.0.113.3:51820"]
        );
    }

    #[test]
    fn path_mtu_fails_only_when_small_packets_pass_and_full_ones_do_not() {
        let mut facts = healthy();
        let probes = |small, full| {
            Some(Ok(vec![PathProbe {
                label: "node-2".into(),
                small,
                full,
            }]))
        };
        facts.data_plane.as_mut().unwrap().path_probes = probes(true, false);
        let c = check(&facts, names::PATH_MTU);
        assert_eq!(c.status, Status::Fail);
        assert!(c.hint.contains("lower `mtu`"));
        facts.data_plane.as_mut().unwrap().path_probes = probes(false, false);
        assert_eq!(check(&facts, names::PATH_MTU).status, Status::Warn);
        facts.data_plane.as_mut().unwrap().path_probes = None;
        assert_eq!(check(&facts, names::PATH_MTU).status, Status::Skipped);
        // A probe that cannot run is said, not passed off as "nothing to probe".
        facts.data_plane.as_mut().unwrap().path_probes = Some(Err(
            "cannot open an ICMPv6 socket: Operation not permitted".into(),
        ));
        let c = check(&facts, names::PATH_MTU);
        assert_eq!(c.status, Status::Warn);
        assert!(c.hint.contains("CAP_NET_RAW"), "{c:?}");
    }

    #[test]
    fn missing_firewall_routing_or_socket_fail() {
        let mut facts = healthy();
        let dp = facts.data_plane.as_mut().unwrap();
        dp.firewall = Some(Err(
            "table inet kubespan is not there (Error: No such file)".into(),
        ));
        dp.routing_missing = Some(Ok(vec!["IPv4 rule".into()]));
        dp.listen_port_bound = Some(Ok(false));
        for name in [names::FIREWALL, names::ROUTING, names::LISTEN_PORT] {
            let c = check(&facts, name);
            assert_eq!(c.status, Status::Fail, "{c:?}");
            assert!(!c.hint.is_empty(), "{c:?}");
        }
    }

    #[test]
    fn without_a_data_plane_its_checks_are_skipped_not_failed() {
        let mut facts = healthy();
        facts.data_plane = None;
        let (overall, checks) = evaluate(&facts);
        assert_eq!(overall, Status::Ok);
        for name in [
            names::PEERS,
            names::PATH_MTU,
            names::FIREWALL,
            names::ROUTING,
            names::LISTEN_PORT,
        ] {
            assert_eq!(
                checks.iter().find(|c| c.name == name).unwrap().status,
                Status::Skipped
            );
        }
    }

    #[test]
    fn udp_ports_are_read_from_proc_net_udp() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                    \x20 12: 00000000:CA6C 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 31337 2 0000000000000000 0\n";
        assert!(udp_port_listed(text, 51820));
        assert!(!udp_port_listed(text, 51821));
        assert!(!udp_port_listed("", 51820));
        let v6 = "  sl  local_address                         remote_address                        st\n\
                  \x20  3: 00000000000000000000000000000000:CA6C 00000000000000000000000000000000:0000 07\n";
        assert!(udp_port_listed(v6, 51820));
    }
}
