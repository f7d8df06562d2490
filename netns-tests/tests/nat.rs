//! Meshes across NATs (`netns_tests::nat`): which pairs of NAT kinds get a direct WireGuard path
//! and which cannot, a Talos-like wireguard-go node reaching a NATed openspan node, a cut path
//! reported `down` and back `up`, and a dead first endpoint left for the next one. Judged by
//! ping over the mesh addresses, `kubespanctl peers` and the devices' handshakes.
//!
//! The scenarios marked "needs natTraversal" use the agent's `natTraversal` settings (STUN from
//! the WireGuard socket, port mapping) and the discovery server's `--stun-addr`; an agent or server
//! without them fails the scenario saying the key or the flag is unknown.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::Context;
use netns_tests::nat::{Kind, LAN_NODE, NatLab, ServerOptions, WIREGUARD_PORT};
use netns_tests::{AgentOptions, in_namespace, ns_sh, require_root, wireguard_daemon};

/// Generous: the lab's timers bring a pair up in seconds, but a 2-core machine running other
/// tests at the same time is slow.
const UP: Duration = Duration::from_secs(40);

fn options(extra_yaml: &str) -> AgentOptions {
    AgentOptions {
        extra_yaml: extra_yaml.into(),
    }
}

/// A lab of two slots with the server started and both agents running with `extra_yaml`.
fn pair(kinds: [Kind; 2], server: ServerOptions, extra_yaml: &str) -> anyhow::Result<NatLab> {
    let mut lab = NatLab::new(&kinds)?;
    lab.start_server(server)?;
    lab.start_agents(&[(1, options(extra_yaml)), (2, options(extra_yaml))])?;
    Ok(lab)
}

/// A pair whose agents use `natTraversal`: STUN at the discovery server and at the lab's second
/// STUN server, port mapping on.
fn traversing_pair(kinds: [Kind; 2]) -> anyhow::Result<NatLab> {
    let mut lab = NatLab::new(&kinds)?;
    lab.start_server(ServerOptions { stun: true })?;
    // A second server: two that see a node at different ports reveal a hard NAT.
    lab.start_stun_responder()?;
    let yaml = lab.nat_traversal_yaml();
    lab.start_agents(&[(1, options(&yaml)), (2, options(&yaml))])?;
    Ok(lab)
}

/// Waits until both nodes report each other `up`; returns the wait.
fn both_up(lab: &mut NatLab) -> anyhow::Result<Duration> {
    let (a, b) = (lab.node(1).name.clone(), lab.node(2).name.clone());
    let waited = lab.wait_for(&format!("{a} and {b} to see each other up"), UP, || {
        lab.node(1).peer_up(&b) && lab.node(2).peer_up(&a)
    })?;
    for n in 1..=2 {
        lab.check_agent(n)?;
    }
    Ok(waited)
}

/// Pings over the mesh both ways (a few tries: the first packet may wait for a handshake).
fn pings_both_ways(lab: &NatLab) -> anyhow::Result<()> {
    let mesh = [lab.node(1).mesh_address()?, lab.node(2).mesh_address()?];
    for (from, to) in [(1, 2), (2, 1)] {
        lab.wait_for(
            &format!(
                "{} to ping {}'s mesh address {}",
                lab.node(from).name,
                lab.node(to).name,
                mesh[to - 1]
            ),
            Duration::from_secs(10),
            || lab.node(from).ping(&mesh[to - 1]),
        )?;
    }
    Ok(())
}

/// Waits until both agents list each other as peers (discovery did its part), then asserts
/// for `period` that neither ever reports the other `up`, that neither device completed a
/// handshake, and that pings over the mesh fail: no direct path.
fn assert_no_direct_path(lab: &mut NatLab, period: Duration) -> anyhow::Result<()> {
    let (a, b) = (lab.node(1).name.clone(), lab.node(2).name.clone());
    lab.wait_for("both agents to list their peer", UP, || {
        lab.node(1).peer(&b).is_some() && lab.node(2).peer(&a).is_some()
    })?;
    let started = Instant::now();
    while started.elapsed() < period {
        for n in 1..=2 {
            lab.check_agent(n)?;
            let node = lab.node(n);
            let peers = node.peers()?;
            anyhow::ensure!(
                peers.iter().all(|(_, state, _)| state != "up"),
                "{} reports a peer up {:?} into the run: {peers:?}\n{}",
                node.name,
                started.elapsed(),
                lab.logs()
            );
            let (_, handshaken) = node.handshakes()?;
            anyhow::ensure!(
                handshaken == 0,
                "{}'s device completed a handshake {:?} into the run\n{}",
                node.name,
                started.elapsed(),
                lab.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let mesh = [lab.node(1).mesh_address()?, lab.node(2).mesh_address()?];
    assert!(
        !lab.node(1).ping(&mesh[1]) && !lab.node(2).ping(&mesh[0]),
        "a ping crossed between {a} and {b}"
    );
    // The agents did try: each raced (or rotated through) the other's public address.
    for (n, other) in [(1, 2), (2, 1)] {
        let wan = format!("{}:", lab.node(other).public_ip);
        let status = peer_status(lab, n, &lab.node(other).name)?;
        assert!(
            status["candidates"].as_array().is_some_and(|c| c
                .iter()
                .any(|e| e.as_str().is_some_and(|e| e.starts_with(&wan)))),
            "{} never tried {}'s public address {wan}: {status}",
            lab.node(n).name,
            lab.node(other).name,
        );
    }
    Ok(())
}

/// A UDP socket bound to `address` inside `netns` (it stays in that namespace), with a short
/// read timeout.
fn udp(netns: &str, address: SocketAddr) -> anyhow::Result<UdpSocket> {
    let socket = in_namespace(netns, move || UdpSocket::bind(address))?
        .with_context(|| format!("bind {address} in {netns}"))?;
    socket.set_read_timeout(Some(Duration::from_millis(400)))?;
    Ok(socket)
}

/// The sender of the next datagram on `socket`, if one arrives within its timeout.
fn received(socket: &UdpSocket) -> Option<SocketAddr> {
    let mut buffer = [0u8; 64];
    socket.recv_from(&mut buffer).ok().map(|(_, from)| from)
}

/// The lab itself, without agents: each router kind maps and filters as documented, observed
/// with plain UDP from the WireGuard port.
#[test]
fn the_lab_routers_map_and_filter_as_their_kind_says() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let lab = NatLab::new(&[Kind::Easy, Kind::Hard, Kind::Upnp])?;
    let server = lab.server_ip;
    let on_internet = |port: u16| udp(&lab.internet, SocketAddr::from((server, port)));
    let (first, second, stranger) = (on_internet(4000)?, on_internet(4001)?, on_internet(4002)?);
    let nodes: Vec<UdpSocket> = (1..=3)
        .map(|n| {
            udp(
                &lab.node(n).netns,
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, WIREGUARD_PORT)),
            )
        })
        .collect::<Result<_, _>>()?;
    for (i, socket) in nodes.iter().enumerate() {
        let slot = lab.node(i + 1);
        socket.send_to(b"first", first.local_addr()?)?;
        socket.send_to(b"second", second.local_addr()?)?;
        let seen_first = received(&first).context("the first destination got nothing")?;
        let seen_second = received(&second).context("the second destination got nothing")?;
        assert_eq!(
            seen_first.ip(),
            slot.public_ip,
            "{} is seen at its WAN",
            slot.name
        );
        match slot.kind {
            Kind::Hard => assert_ne!(
                seen_first.port(),
                seen_second.port(),
                "a hard NAT maps each destination to another port"
            ),
            _ => {
                let kept = SocketAddr::from((slot.public_ip, WIREGUARD_PORT));
                assert_eq!(
                    (seen_first, seen_second),
                    (kept, kept),
                    "{} keeps the port for every destination",
                    slot.name
                );
            }
        }
        // Filtering: a stranger gets nothing through the mapping; the contacted endpoint does.
        stranger.send_to(b"stranger", seen_first)?;
        assert_eq!(
            received(socket),
            None,
            "{}'s router let in a stranger",
            slot.name
        );
        first.send_to(b"answer", seen_first)?;
        assert_eq!(
            received(socket),
            Some(first.local_addr()?),
            "{}'s router passed the answer",
            slot.name
        );
    }
    // The UPnP router maps on request, and a mapping takes packets from anyone new. Not from
    // `stranger`: its refused packet left a conntrack entry (to the router itself), and packets
    // of a known flow skip the NAT rules, so that flow stays refused while it keeps sending.
    let mapped = lab.nat_pmp_map(3, WIREGUARD_PORT, WIREGUARD_PORT, 120)?;
    assert_eq!(*mapped.ip(), lab.node(3).public_ip);
    let newcomer = on_internet(4003)?;
    newcomer.send_to(b"mapped", mapped)?;
    assert_eq!(
        received(&nodes[2]),
        Some(newcomer.local_addr()?),
        "the mapped port let the stranger in\n{}",
        lab.node(3)
            .router
            .as_ref()
            .map(|r| r.ruleset())
            .transpose()?
            .unwrap_or_default()
    );
    Ok(())
}

/// The NATed node starts the handshake to the public one, which learns the NAT's mapping by
/// WireGuard roaming: works without any NAT traversal.
#[test]
fn a_public_and_an_easy_nat_node_connect_by_roaming() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = pair([Kind::Public, Kind::Easy], ServerOptions::default(), "")?;
    let waited = both_up(&mut lab)?;
    eprintln!("public↔easy up {waited:?} after the agents started");
    // The easy router kept the WireGuard port, so the mapping is its WAN address and 51820.
    let roamed = format!("{}:{WIREGUARD_PORT}", lab.node(2).public_ip);
    let (_, endpoint) = lab
        .node(1)
        .peer("easy-2")
        .context("public-1 lists easy-2")?;
    assert_eq!(endpoint, roamed, "public-1 reaches easy-2 through its NAT");
    pings_both_ways(&lab)
}

/// Two symmetric NATs: each router picks a new random port per destination, so neither side
/// can learn where to send, and each router drops what the other sends (it answers no flow of
/// its own). The documented expectation until relaying exists: no direct path, ever.
#[test]
fn two_hard_nat_nodes_have_no_direct_path() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = pair([Kind::Hard, Kind::Hard], ServerOptions::default(), "")?;
    assert_no_direct_path(&mut lab, Duration::from_secs(15))
}

/// Needs natTraversal. Both learn their mapping by STUN (the easy router keeps it for every
/// destination) and send to each other at once: each router then holds a flow the other's
/// packets answer.
#[test]
fn two_easy_nat_nodes_connect_by_simultaneous_open() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = traversing_pair([Kind::Easy, Kind::Easy])?;
    let waited = both_up(&mut lab)?;
    eprintln!("easy↔easy up {waited:?} after the agents started");
    for n in 1..=2 {
        let kept = format!("{}:{WIREGUARD_PORT}", lab.node(n).public_ip);
        assert_eq!(
            reflexive_endpoint(&lab, n)?,
            kept,
            "{}'s STUN servers see its router keep the port",
            lab.node(n).name
        );
    }
    for (n, other) in [(1, 2), (2, 1)] {
        let expected = format!("{}:{WIREGUARD_PORT}", lab.node(other).public_ip);
        let (_, endpoint) = lab
            .node(n)
            .peer(&lab.node(other).name)
            .context("peer listed")?;
        assert_eq!(
            endpoint,
            expected,
            "{} reaches its peer's mapping",
            lab.node(n).name
        );
    }
    pings_both_ways(&lab)
}

/// Node `n`'s published port mapping (`NatNode::mapped_endpoint`), once it has one.
fn mapped_endpoint(lab: &NatLab, n: usize) -> anyhow::Result<String> {
    let mut found = None;
    lab.wait_for(
        &format!("{} to publish a mapped endpoint", lab.node(n).name),
        UP,
        || {
            found = lab.node(n).mapped_endpoint();
            found.is_some()
        },
    )?;
    found.context("found")
}

/// Needs natTraversal. The UPnP node asks its router for a mapping and publishes it; the easy
/// node sends there and the mapping lets it in.
#[test]
fn an_easy_nat_node_reaches_a_upnp_node_at_its_mapping() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = traversing_pair([Kind::Easy, Kind::Upnp])?;
    let mapped = mapped_endpoint(&lab, 2)?;
    let waited = both_up(&mut lab)?;
    eprintln!("easy↔upnp up {waited:?} after the mapping {mapped} was published");
    let (_, endpoint) = lab.node(1).peer("upnp-2").context("peer listed")?;
    assert_eq!(endpoint, mapped, "easy-1 reaches upnp-2 at its mapping");
    pings_both_ways(&lab)
}

/// Needs natTraversal. The hard node's random port does not matter: the UPnP mapping takes
/// packets from any source, and the UPnP node answers the hard node's flow by roaming.
#[test]
fn a_hard_nat_node_reaches_a_upnp_node_at_its_mapping() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = traversing_pair([Kind::Hard, Kind::Upnp])?;
    let mapped = mapped_endpoint(&lab, 2)?;
    let waited = both_up(&mut lab)?;
    eprintln!("hard↔upnp up {waited:?} after the mapping {mapped} was published");
    let (_, endpoint) = lab.node(1).peer("upnp-2").context("peer listed")?;
    assert_eq!(endpoint, mapped, "hard-1 reaches upnp-2 at its mapping");
    let (_, back) = lab.node(2).peer("hard-1").context("peer listed")?;
    assert!(
        back.starts_with(&format!("{}:", lab.node(1).public_ip)),
        "upnp-2 answers hard-1 at its router: {back}"
    );
    pings_both_ways(&lab)
}

/// Needs natTraversal. Expected: no direct path. The easy node E publishes its mapping
/// `E_wan:51820`, valid for every destination. The hard node H has none to publish: each STUN
/// server saw another port, each opened for that server only (H says so and publishes no
/// reflexive endpoint; its `H_wan:51820`, from the address discovery saw, is closed). H's
/// packets to E leave from yet another random port `p_E` (a new flow, a new port), and E's router
/// lets in only answers to flows E started: E sent to `H_wan:51820`, never to `H_wan:p_E`, which
/// E cannot know, so H's packets are dropped. E's packets to `H_wan:51820` match no flow of H's
/// toward E and are dropped at H's router. Only a relay or port guessing (not implemented) could
/// join them.
#[test]
fn an_easy_and_a_hard_nat_node_have_no_direct_path() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = traversing_pair([Kind::Easy, Kind::Hard])?;
    assert_no_direct_path(&mut lab, Duration::from_secs(20))?;
    // The hard node found out: its two STUN servers saw two ports, so it announces no
    // reflexive endpoint and says why; the easy node has one.
    let status = lab.node(2).kubespanctl(&["status"])?;
    assert_eq!(status["reflexive_endpoint"], "", "{status}");
    assert!(
        status["nat_note"]
            .as_str()
            .is_some_and(|note| note.contains("per destination")),
        "hard-2 explains its NAT: {status}"
    );
    assert_eq!(
        reflexive_endpoint(&lab, 1)?,
        format!("{}:{WIREGUARD_PORT}", lab.node(1).public_ip)
    );
    Ok(())
}

/// Node `n`'s reflexive endpoint (`kubespanctl status`), once STUN found one.
fn reflexive_endpoint(lab: &NatLab, n: usize) -> anyhow::Result<String> {
    let mut found = String::new();
    lab.wait_for(
        &format!("{} to learn its reflexive endpoint", lab.node(n).name),
        UP,
        || {
            found = lab
                .node(n)
                .kubespanctl(&["status"])
                .ok()
                .and_then(|s| s["reflexive_endpoint"].as_str().map(str::to_owned))
                .unwrap_or_default();
            !found.is_empty()
        },
    )?;
    Ok(found)
}

/// A node's cut path (every packet to and from its peer dropped at its router, no link change)
/// is reported `down` on both sides, and `up` again once the path heals.
#[test]
fn a_cut_path_is_reported_down_and_comes_back_up() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = pair([Kind::Public, Kind::Easy], ServerOptions::default(), "")?;
    both_up(&mut lab)?;
    pings_both_ways(&lab)?;
    lab.cut(2, lab.node(1).public_ip)?;
    let down = lab.wait_for(
        "both sides to report the cut peer down",
        Duration::from_secs(20),
        || {
            lab.node(1)
                .peer("easy-2")
                .is_some_and(|(state, _)| state == "down")
                && lab
                    .node(2)
                    .peer("public-1")
                    .is_some_and(|(state, _)| state == "down")
        },
    )?;
    eprintln!("cut path reported down on both sides after {down:?} (peerDownSeconds 6)");
    lab.heal(2)?;
    let up = both_up(&mut lab)?;
    eprintln!("healed path up again after {up:?}");
    pings_both_ways(&lab)
}

/// The UPnP node announces its LAN address first (`192.168.1.2:51820`: node addresses come
/// before the address discovery saw), which the internet drops silently, then its WAN address,
/// where a NAT-PMP mapping forwards 51820. The public node announces nothing, so only its own
/// attempts at the peer's endpoints (raced, or rotated through on kernel WireGuard) can join them.
#[test]
fn a_dead_first_endpoint_gives_way_to_the_mapped_one() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = NatLab::new(&[Kind::Public, Kind::Upnp])?;
    lab.start_server(ServerOptions::default())?;
    let mapped = lab.nat_pmp_map(2, WIREGUARD_PORT, WIREGUARD_PORT, 3600)?;
    let silent = options("filters:\n  endpoints: [\"192.0.2.0/24\"]\n");
    lab.start_agents(&[(1, silent), (2, AgentOptions::default())])?;
    let dead = format!("{LAN_NODE}:{WIREGUARD_PORT}");
    let good = mapped.to_string();
    lab.wait_for("upnp-2 to publish its LAN endpoint first", UP, || {
        lab.node(2)
            .published_endpoints()
            .is_ok_and(|e| e.first() == Some(&dead) && e.contains(&good))
    })?;
    let waited = lab.wait_for("public-1 to reach upnp-2 at its mapping", UP, || {
        lab.node(1)
            .peer("upnp-2")
            .is_some_and(|(state, endpoint)| state == "up" && endpoint == good)
    })?;
    eprintln!("upnp-2 up at its second endpoint {waited:?} after start");
    let status = peer_status(&lab, 1, "upnp-2")?;
    assert_eq!(
        status["candidates"][0], dead,
        "public-1 tried the dead endpoint first: {status}"
    );
    both_up(&mut lab)?;
    pings_both_ways(&lab)
}

/// `kubespanctl peers`' status of node `n`'s peer `label`.
fn peer_status(lab: &NatLab, n: usize, label: &str) -> anyhow::Result<serde_json::Value> {
    let peers = lab.node(n).kubespanctl(&["peers"])?;
    peers
        .as_array()
        .and_then(|a| a.iter().find(|p| p["label"] == label))
        .map(|p| p["status"].clone())
        .with_context(|| format!("{} lists no peer {label}: {peers}", lab.node(n).name))
}

/// A Talos-like peer: plain wireguard-go configured with wg(8), its record published to
/// discovery with Talos's cipher. The openspan node is behind an easy NAT and publishes its
/// reflexive endpoint (STUN); wireguard-go is pointed at that endpoint, as Talos would use it.
/// Needs natTraversal.
#[test]
fn wireguard_go_reaches_an_easy_nat_node_at_its_reflexive_endpoint() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    talos_like::run()
}

mod talos_like {
    use super::*;
    use kubespan_agent::crypto::{Cipher, ClusterKeys, parse_cluster_secret};
    use openspan_proto::discovery::client;
    use openspan_proto::discovery::server::{
        AffiliateUpdateRequest, cluster_client::ClusterClient,
    };

    fn wireguard_go() -> anyhow::Result<String> {
        netns_tests::run("sh", &["-c", "command -v wireguard-go"])
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .context(
                "wireguard-go is not installed (apt-get install --no-install-recommends wireguard-go)",
            )
    }

    /// Publishes `affiliate` (the protobuf a Talos node sends, with only Talos's fields) and its
    /// `endpoints` to the lab's discovery server from the internet, sealed with `keys`.
    fn publish(
        lab: &NatLab,
        keys: ClusterKeys,
        affiliate: client::Affiliate,
        endpoints: Vec<SocketAddr>,
    ) -> anyhow::Result<()> {
        let server = lab.server_address.clone();
        let cluster_id = lab.cluster_id();
        lab.in_internet(move || -> anyhow::Result<()> {
            let id = affiliate.node_id.clone();
            let data = keys.seal_record(&id, &prost::Message::encode_to_vec(&affiliate));
            let sealed_endpoints: Vec<Vec<u8>> = endpoints
                .iter()
                .map(|e| keys.seal_endpoint(&id, *e))
                .collect();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{server}"))?
                    .connect()
                    .await?;
                ClusterClient::new(channel)
                    .affiliate_update(AffiliateUpdateRequest {
                        cluster_id,
                        affiliate_id: id,
                        affiliate_data: Some(data.into()),
                        affiliate_endpoints: sealed_endpoints.into_iter().map(Into::into).collect(),
                        ttl: Some(prost_types::Duration {
                            seconds: 1800,
                            nanos: 0,
                        }),
                    })
                    .await?;
                anyhow::Ok(())
            })
        })?
    }

    pub fn run() -> anyhow::Result<()> {
        let wireguard_go = wireguard_go()?;
        let mut lab = NatLab::new(&[Kind::Public, Kind::Easy])?;
        lab.start_server(ServerOptions { stun: true })?;
        lab.start_stun_responder()?;
        let yaml = format!("cipher: talos\n{}", lab.nat_traversal_yaml());
        lab.start_agent(2, &options(&yaml))?;

        // The openspan node's reflexive endpoint, as STUN told it and as it publishes it.
        let reflexive = reflexive_endpoint(&lab, 2)?;
        lab.wait_for("easy-2 to publish its reflexive endpoint", UP, || {
            lab.node(2)
                .published_endpoints()
                .is_ok_and(|e| e.contains(&reflexive))
        })?;
        let identity = lab.node(2).kubespanctl(&["identity"])?;
        let (openspan_key, openspan_mesh) = (
            identity["public_key"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            identity["mesh_address"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );

        // wireguard-go on the public slot, configured like a KubeSpan link.
        let talos = lab.node(1);
        let interface = format!("{}g", lab.id);
        let _daemon = wireguard_daemon(
            talos,
            std::path::Path::new(&wireguard_go),
            &["-f", &interface],
            &interface,
            600,
        )?;
        let key_file = talos.dir.join("wg.key");
        std::fs::write(&key_file, netns_tests::sh("wg", &["genkey"])?)?;
        let public_key = netns_tests::sh(
            "sh",
            &["-c", &format!("wg pubkey < {}", key_file.display())],
        )?
        .trim()
        .to_owned();
        let cluster_id = lab.cluster_id();
        let mac = [0x02, 0x00, 0x54, 0x41, 0x4c, 0x01];
        let mesh = kubespan_agent::identity::mesh_address(&cluster_id, mac);
        let secret = parse_cluster_secret(netns_tests::CLUSTER_SECRET)?;
        let keys = ClusterKeys::new(Cipher::Talos, &cluster_id, &secret);
        // The cluster secret is KubeSpan's preshared key.
        let psk_file = talos.dir.join("wg.psk");
        std::fs::write(
            &psk_file,
            base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                keys.wireguard_psk(),
            ),
        )?;
        ns_sh(
            &talos.netns,
            "wg",
            &[
                "set",
                &interface,
                "private-key",
                key_file.to_str().unwrap_or_default(),
                "listen-port",
                &WIREGUARD_PORT.to_string(),
                "peer",
                &openspan_key,
                "preshared-key",
                psk_file.to_str().unwrap_or_default(),
                "allowed-ips",
                &format!("{openspan_mesh}/128"),
                "endpoint",
                &reflexive,
                "persistent-keepalive",
                "5",
            ],
        )?;
        ns_sh(
            &talos.netns,
            "ip",
            &[
                "addr",
                "add",
                &format!("{mesh}/64"),
                "dev",
                &interface,
                "nodad",
            ],
        )?;
        ns_sh(
            &talos.netns,
            "ip",
            &["link", "set", &interface, "mtu", "1420", "up"],
        )?;
        let ip_bytes = |ip: std::net::IpAddr| match ip {
            std::net::IpAddr::V4(v4) => v4.octets().to_vec().into(),
            std::net::IpAddr::V6(v6) => v6.octets().to_vec().into(),
        };
        publish(
            &lab,
            keys,
            client::Affiliate {
                node_id: kubespan_agent::identity::base62_encode(&[0x54; 32]),
                addresses: vec![ip_bytes(talos.public_ip.into())],
                hostname: "talos-1".into(),
                nodename: "talos-1".into(),
                machine_type: "worker".into(),
                operating_system: "Talos (wireguard-go)".into(),
                kubespan: Some(client::KubeSpan {
                    public_key: public_key.clone(),
                    address: ip_bytes(mesh.into()),
                    // openspan's extension fields stay empty, as a Talos node leaves them.
                    ..Default::default()
                }),
                ..Default::default()
            },
            vec![SocketAddr::from((talos.public_ip, WIREGUARD_PORT))],
        )?;
        let waited = lab.wait_for("easy-2 to see talos-1 up", UP, || {
            lab.node(2).peer_up("talos-1")
        })?;
        eprintln!("talos-1 (wireguard-go) up on easy-2 {waited:?} after its record was published");
        lab.wait_for("wireguard-go to ping easy-2's mesh address", UP, || {
            talos.ping(&openspan_mesh)
        })?;
        let mesh = mesh.to_string();
        lab.wait_for("easy-2 to ping wireguard-go's mesh address", UP, || {
            lab.node(2).ping(&mesh)
        })?;
        let endpoints = ns_sh(&talos.netns, "wg", &["show", &interface, "endpoints"])?;
        assert!(
            endpoints.contains(&reflexive),
            "wireguard-go talks to the reflexive endpoint {reflexive}: {endpoints}"
        );
        Ok(())
    }
}
