//! Real meshes in network namespaces: userspace WireGuard, policy routing, nftables, endpoint
//! rotation, failure detection and clean teardown, observed with ping, wg, tcpdump and kubespanctl.

use std::time::Duration;

use netns_tests::{AgentOptions, Lab, require_root, sh};

const UP: Duration = Duration::from_secs(20);

fn peer_state(lab: &Lab, n: usize, label: &str) -> Option<(String, String)> {
    lab.node(n)
        .peers()
        .ok()?
        .into_iter()
        .find(|(l, _, _)| l == label)
        .map(|(_, state, endpoint)| (state, endpoint))
}

fn no_leftovers(lab: &Lab, n: usize) -> anyhow::Result<()> {
    let node = lab.node(n);
    let links = sh("ip", &["-n", &node.netns, "link"])?;
    assert!(
        !links.contains(&node.interface),
        "interface left behind:\n{links}"
    );
    for family in ["-4", "-6"] {
        let rules = sh("ip", &[family, "-n", &node.netns, "rule"])?;
        assert!(!rules.contains("32500"), "rule left behind:\n{rules}");
        let routes = sh(
            "ip",
            &[family, "-n", &node.netns, "route", "show", "table", "180"],
        )?;
        assert!(routes.trim().is_empty(), "routes left behind:\n{routes}");
    }
    let tables = sh(
        "ip",
        &["netns", "exec", &node.netns, "nft", "list", "tables"],
    )?;
    assert!(
        !tables.contains("openspan_test"),
        "nftables table left behind:\n{tables}"
    );
    assert!(!std::path::Path::new(&format!("/var/run/wireguard/{}.sock", node.interface)).exists());
    Ok(())
}

/// The interface index of node `n`'s WireGuard link, if it has one.
fn link_index(lab: &Lab, n: usize) -> anyhow::Result<Option<u32>> {
    let node = lab.node(n);
    let out = node.exec("ip", &["-o", "link", "show", "dev", &node.interface])?;
    if !out.status.success() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.split(':').next().and_then(|i| i.trim().parse().ok()))
}

#[test]
fn three_nodes_form_an_encrypted_mesh_and_leave_nothing_behind() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = Lab::new(3)?;
    lab.start_server()?;
    for n in 1..=3 {
        lab.start_agent(n, &AgentOptions::default())?;
    }
    let waited = lab.wait_for("every node to see two peers up", UP, || {
        (1..=3).all(|n| lab.all_up(n, 2))
    })?;
    eprintln!("mesh of 3 up {waited:?} after the agents started");

    let mesh: Vec<String> = (1..=3)
        .map(|n| lab.node(n).mesh_address())
        .collect::<Result<_, _>>()?;
    // Everything between the nodes; the discovery server (outside the mesh) is not a peer.
    let server_ip = lab
        .server_address
        .split(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    let capture = lab.capture(&format!("ip and not host {server_ip} and not igmp"))?;
    for from in 1..=3 {
        for to in (1..=3).filter(|to| *to != from) {
            let node = lab.node(from);
            assert!(
                node.ping(&mesh[to - 1]),
                "node-{from} cannot ping node-{to}'s mesh address"
            );
            assert!(
                node.ping(&lab.node(to).address),
                "node-{from} cannot ping node-{to}'s underlay address"
            );
        }
    }
    let packets = capture.finish()?;
    let in_clear: Vec<_> = packets.iter().filter(|p| !p.contains(".51820")).collect();
    assert!(
        in_clear.is_empty(),
        "packets between the nodes left the tunnel:\n{in_clear:#?}"
    );
    assert!(
        packets.iter().any(|p| p.contains(".51820")),
        "the capture saw the tunnel traffic:\n{packets:#?}"
    );

    for n in 1..=3 {
        let node = lab.node(n);
        // In the node's namespace: a kernel link lives there (a userspace device's control
        // socket is in the shared /var/run/wireguard either way).
        let handshakes = sh(
            "ip",
            &[
                "netns",
                "exec",
                &node.netns,
                "wg",
                "show",
                &node.interface,
                "latest-handshakes",
            ],
        )?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let recent = handshakes
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .filter(|t| *t > 0 && now.saturating_sub(*t) < 120)
            .count();
        assert_eq!(
            recent, 2,
            "wg show {} lists two peers with recent handshakes:\n{handshakes}",
            node.interface
        );
    }

    // A graceful stop removes everything and the others drop the peer.
    lab.node_mut(3).stop_agent()?;
    no_leftovers(&lab, 3)?;
    // It goes silent after its delete, so node-1 drops it after peerDownSeconds (6 s) and a
    // reconcile tick; 20 s (was 10 s) leaves a loaded machine room, and a peer that is never
    // dropped still fails.
    lab.wait_for("node-1 to drop node-3", Duration::from_secs(20), || {
        lab.node(1).peers().is_ok_and(|p| p.len() == 1)
    })?;
    for n in 1..=2 {
        lab.node_mut(n).stop_agent()?;
        no_leftovers(&lab, n)?;
    }
    Ok(())
}

#[test]
fn a_dead_first_endpoint_is_left_for_the_next_one() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = Lab::new(2)?;
    lab.start_server()?;
    // node-2 announces an unreachable address first; node-1 announces nothing, so only
    // node-1's rotation can bring the pair up (node-2 learns node-1's endpoint by roaming).
    let node2 = lab.node(2);
    sh(
        "ip",
        &[
            "-n",
            &node2.netns,
            "addr",
            "add",
            "10.99.0.2/24",
            "dev",
            "eth0",
        ],
    )?;
    let dead_first = AgentOptions {
        extra_yaml: "filters:\n  endpoints: [\"10.99.0.0/16\", \"10.77.0.0/16\"]\n".into(),
    };
    let silent = AgentOptions {
        extra_yaml: "filters:\n  endpoints: [\"192.0.2.0/24\"]\n".into(),
    };
    lab.start_agent(2, &dead_first)?;
    lab.start_agent(1, &silent)?;
    let good = format!("{}:51820", lab.node(2).address);
    let waited = lab.wait_for("node-1 to reach node-2 on its second endpoint", UP, || {
        peer_state(&lab, 1, "node-2")
            .is_some_and(|(state, endpoint)| state == "up" && endpoint == good)
    })?;
    eprintln!("node-2 up on its second endpoint {waited:?} after start");
    // The dead endpoint was a candidate: raced with the good one (userspace device), or ranked
    // after it, the same LAN first (kernel WireGuard tries them one by one).
    let peers = lab.node(1).kubespanctl(&["peers"])?;
    let candidates = peers
        .as_array()
        .and_then(|peers| peers.iter().find(|p| p["label"] == "node-2"))
        .map(|p| p["status"]["candidates"].clone())
        .unwrap_or_default();
    assert!(
        candidates
            .as_array()
            .is_some_and(|c| c.iter().any(|e| e == "10.99.0.2:51820")),
        "node-1 considered the dead endpoint: {candidates}"
    );
    let roamed = format!("{}:51820", lab.node(1).address);
    lab.wait_for("node-2 to see node-1 up at its roamed endpoint", UP, || {
        peer_state(&lab, 2, "node-1")
            .is_some_and(|(state, endpoint)| state == "up" && endpoint == roamed)
    })?;
    assert!(lab.node(1).ping(&lab.node(2).mesh_address()?));
    Ok(())
}

#[test]
fn a_dead_peer_is_down_quickly_and_its_traffic_never_leaks_unless_bypass_is_on()
-> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = Lab::new(3)?;
    lab.start_server()?;
    lab.start_agent(1, &AgentOptions::default())?;
    lab.start_agent(
        2,
        &AgentOptions {
            extra_yaml: "allowDownPeerBypass: true\n".into(),
        },
    )?;
    lab.start_agent(3, &AgentOptions::default())?;
    lab.wait_for("the mesh", UP, || (1..=3).all(|n| lab.all_up(n, 2)))?;

    lab.node_mut(3).kill_agent(); // a crash: no goodbye, leftovers stay
    // A kernel WireGuard link outlives its agent and would keep answering handshakes: a dead
    // node takes it down with it.
    if link_index(&lab, 3)?.is_some() {
        let node = lab.node(3);
        sh("ip", &["-n", &node.netns, "link", "del", &node.interface])?;
    }
    let waited = lab.wait_for(
        "node-1 and node-2 to mark node-3 down",
        Duration::from_secs(20),
        || {
            [1, 2]
                .iter()
                .all(|n| peer_state(&lab, *n, "node-3").is_some_and(|(s, _)| s == "down"))
        },
    )?;
    eprintln!("node-3 marked down {waited:?} after its agent was killed (peerDownSeconds 6)");

    let target = lab.node(3).address.clone();
    let capture = lab.capture("icmp")?;
    assert!(
        !lab.node(1).ping(&target),
        "force routing: node-3 is unreachable while it is down"
    );
    // Bypass: node-3 left node-2's routed set, so plain underlay traffic works.
    let bypass = lab.wait_for(
        "node-2 to reach node-3 around the tunnel",
        Duration::from_secs(10),
        || lab.node(2).ping(&target),
    );
    let packets = capture.finish()?;
    bypass?;
    let from_1: Vec<_> = packets
        .iter()
        .filter(|p| p.contains(&format!("{} > {target}", lab.node(1).address)))
        .collect();
    assert!(
        from_1.is_empty(),
        "node-1's traffic to the down peer left in clear:\n{from_1:#?}"
    );
    assert!(
        packets
            .iter()
            .any(|p| p.contains(&format!("{} > {target}", lab.node(2).address))),
        "node-2's bypass traffic was seen in clear"
    );

    // Restarting the crashed agent cleans its leftovers and the mesh heals.
    lab.start_agent(3, &AgentOptions::default())?;
    let waited = lab.wait_for("the mesh to heal", UP, || (1..=3).all(|n| lab.all_up(n, 2)))?;
    eprintln!("mesh healed {waited:?} after node-3's agent restarted");
    assert!(lab.node(1).ping(&target));
    Ok(())
}

#[test]
fn harvested_endpoints_let_a_node_reach_a_peer_that_announces_none() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = Lab::new(3)?;
    lab.start_server()?;
    // node-2 announces no endpoint and cannot start handshakes toward node-3 (its initiations,
    // WireGuard message type 1, are dropped); only node-1 can learn node-2's endpoint (node-2
    // reaches it), and only harvesting carries it to node-3.
    let rules = lab.root.join("no-initiation.nft");
    std::fs::write(
        &rules,
        format!(
            "table inet harvest_test {{\n  chain out {{\n    type filter hook output priority 0;\n    \
             ip daddr {} udp dport 51820 @th,64,8 1 drop\n  }}\n}}\n",
            lab.node(3).address
        ),
    )?;
    sh(
        "ip",
        &[
            "netns",
            "exec",
            &lab.node(2).netns,
            "nft",
            "-f",
            rules.to_str().unwrap_or_default(),
        ],
    )?;
    lab.start_agent(
        1,
        &AgentOptions {
            extra_yaml: "harvestExtraEndpoints: true\n".into(),
        },
    )?;
    lab.start_agent(
        2,
        &AgentOptions {
            extra_yaml: "filters:\n  endpoints: [\"192.0.2.0/24\"]\n".into(),
        },
    )?;
    lab.start_agent(3, &AgentOptions::default())?;
    let expected = format!("{}:51820", lab.node(2).address);
    let waited = lab.wait_for(
        "node-3 to reach node-2 at the harvested endpoint",
        UP,
        || {
            peer_state(&lab, 3, "node-2")
                .is_some_and(|(state, endpoint)| state == "up" && endpoint == expected)
        },
    )?;
    eprintln!("node-3 reached node-2 through a harvested endpoint {waited:?} after start");
    let spec = lab.node(3).kubespanctl(&["peers"])?;
    let endpoints = spec
        .as_array()
        .and_then(|peers| peers.iter().find(|p| p["label"] == "node-2"))
        .map(|p| p["endpoints"].clone());
    assert_eq!(
        endpoints,
        Some(serde_json::json!([expected])),
        "node-3's peer spec for node-2 gained the harvested endpoint"
    );
    Ok(())
}

#[test]
fn a_new_node_address_is_published_and_routed_to_the_node() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = Lab::new(2)?;
    lab.start_server()?;
    lab.start_agent(1, &AgentOptions::default())?;
    lab.start_agent(2, &AgentOptions::default())?;
    lab.wait_for("the pair", UP, || lab.all_up(1, 1) && lab.all_up(2, 1))?;
    sh(
        "ip",
        &[
            "-n",
            &lab.node(2).netns,
            "addr",
            "add",
            "10.88.0.2/24",
            "dev",
            "eth0",
        ],
    )?;
    let waited = lab.wait_for(
        "node-1 to learn node-2's new address",
        Duration::from_secs(15),
        || {
            lab.node(1).kubespanctl(&["peers"]).is_ok_and(|peers| {
                peers.as_array().and_then(|p| p.first()).is_some_and(|p| {
                    p["allowed_ips"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|ip| ip == "10.88.0.2/32"))
                        && p["endpoints"]
                            .as_array()
                            .is_some_and(|e| e.iter().any(|ep| ep == "10.88.0.2:51820"))
                })
            })
        },
    )?;
    eprintln!("node-2's new address reached node-1's peer spec {waited:?} after it was added");
    // A host normally has a default route; the kernel needs one to pick a source address before
    // the agent's mark moves the packet into the mesh.
    let gateway = lab
        .server_address
        .split(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    sh(
        "ip",
        &[
            "-n",
            &lab.node(1).netns,
            "route",
            "add",
            "default",
            "via",
            &gateway,
        ],
    )?;
    let capture = lab.capture("icmp")?;
    assert!(
        lab.node(1).ping("10.88.0.2"),
        "node-1 reaches node-2's new address through the mesh"
    );
    let packets = capture.finish()?;
    assert!(
        packets.is_empty(),
        "the ping went around the tunnel:\n{packets:#?}"
    );
    Ok(())
}

#[test]
fn an_agent_killed_with_sigkill_restarts_and_takes_its_link_back() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = Lab::new(2)?;
    lab.start_server()?;
    for n in 1..=2 {
        lab.start_agent(n, &AgentOptions::default())?;
    }
    lab.wait_for("the pair", UP, || lab.all_up(1, 1) && lab.all_up(2, 1))?;
    let before = link_index(&lab, 2)?;
    assert!(before.is_some(), "node-2 has its WireGuard link");

    lab.node_mut(2).kill_agent(); // SIGKILL: no teardown
    // A userspace device dies with its process; a kernel link stays, with its keys and peers.
    let survived = link_index(&lab, 2)?;
    if lab.backend == "kernel" {
        assert_eq!(
            survived, before,
            "the kernel link outlives a SIGKILLed agent"
        );
    }
    eprintln!(
        "after SIGKILL node-2's link {}",
        if survived.is_some() {
            "stayed"
        } else {
            "went away"
        }
    );

    lab.start_agent(2, &AgentOptions::default())?;
    let waited = lab.wait_for("the pair again", UP, || {
        lab.all_up(1, 1) && lab.all_up(2, 1)
    })?;
    eprintln!("pair up {waited:?} after node-2's agent restarted");
    if let Some(index) = survived {
        assert_eq!(
            link_index(&lab, 2)?,
            Some(index),
            "the restarted agent adopted the link it found instead of replacing it"
        );
    }
    let mesh1 = lab.node(1).mesh_address()?;
    let mesh2 = lab.node(2).mesh_address()?;
    assert!(
        lab.node(1).ping(&mesh2),
        "node-1 reaches node-2 over the mesh"
    );
    assert!(
        lab.node(2).ping(&mesh1),
        "node-2 reaches node-1 over the mesh"
    );
    let (peers, done) = lab.node(2).handshakes()?;
    assert_eq!(
        (peers, done),
        (1, 1),
        "node-2's device has its peer, handshaken"
    );

    for n in 1..=2 {
        lab.node_mut(n).stop_agent()?;
        no_leftovers(&lab, n)?;
    }
    Ok(())
}
