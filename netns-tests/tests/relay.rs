//! Relayed paths across NATs that no direct path crosses (`netns_tests::nat`, two hard NATs):
//! two `openspan-relay` servers on the lab's internet carry the pair's WireGuard packets; a
//! relay killed mid-flow hands the traffic to the other; a direct path that appears later
//! (two easy NATs healed after a cut) is taken. Judged by ping and iperf3 over the mesh
//! addresses and `kubespanctl peers`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use netns_tests::nat::{Kind, NatLab, ServerOptions};
use netns_tests::{AgentOptions, require_root};

const UP: Duration = Duration::from_secs(40);

fn options(yaml: &str) -> AgentOptions {
    AgentOptions {
        extra_yaml: yaml.into(),
    }
}

fn relayed_both_ways(lab: &mut NatLab) -> anyhow::Result<Duration> {
    let (a, b) = (lab.node(1).name.clone(), lab.node(2).name.clone());
    lab.wait_for(&format!("{a} and {b} up through a relay"), UP, || {
        lab.node(1).peer_up(&b)
            && lab.node(2).peer_up(&a)
            && lab.node(1).peer_path(&b).starts_with("relayed via")
            && lab.node(2).peer_path(&a).starts_with("relayed via")
    })
}

#[test]
fn two_hard_nat_nodes_talk_through_a_relay() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = NatLab::new(&[Kind::Hard, Kind::Hard])?;
    lab.start_server(ServerOptions { stun: false })?;
    let (_relays, yaml) = lab.start_relays(&[])?;
    lab.start_agents(&[(1, options(&yaml)), (2, options(&yaml))])?;
    let waited = relayed_both_ways(&mut lab)?;
    eprintln!("hard↔hard up through a relay {waited:?} after start");
    let mesh = [lab.node(1).mesh_address()?, lab.node(2).mesh_address()?];
    assert!(
        lab.node(1).ping(&mesh[1]),
        "node-1 pings node-2 through the relay"
    );
    assert!(
        lab.node(2).ping(&mesh[0]),
        "node-2 pings node-1 through the relay"
    );
    // TCP through the relay: a short iperf3 run.
    let server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.node(2).node.netns,
            "iperf3",
            "-s",
            "-1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start iperf3 (Debian package iperf3)")?;
    let _server = Guard(server);
    std::thread::sleep(Duration::from_millis(300));
    let client = lab
        .node(1)
        .node
        .exec("iperf3", &["-c", &mesh[1], "-t", "2", "-J"])?;
    let report: serde_json::Value = serde_json::from_slice(&client.stdout)
        .with_context(|| String::from_utf8_lossy(&client.stderr).into_owned())?;
    let bits = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_default();
    eprintln!("TCP through the relay: {:.0} Mbit/s", bits / 1e6);
    assert!(bits > 1e6, "TCP crossed the relay: {report}");
    Ok(())
}

/// Kills the child when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A relayed node rotates its key: it registers the new key with the relays, and the peer
/// reaches it there again once it learned the key through discovery. The gap is measured (a
/// relayed peer knows the node only by its key, so this path has one, unlike a direct one).
#[test]
fn a_relayed_node_that_rotates_its_key_is_reached_through_the_relay_again() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = NatLab::new(&[Kind::Hard, Kind::Hard])?;
    lab.start_server(ServerOptions { stun: false })?;
    let (_relays, yaml) = lab.start_relays(&[])?;
    lab.start_agents(&[(1, options(&yaml)), (2, options(&yaml))])?;
    relayed_both_ways(&mut lab)?;
    let mesh1 = lab.node(1).mesh_address()?;
    // 10 pings a second for 15 s from node-2 to node-1; the rotation 2 s in.
    let pinger = Command::new("ip")
        .args(["netns", "exec", &lab.node(2).node.netns])
        .args(["ping", "-n", "-i", "0.1", "-c", "150", "-W", "2", &mesh1])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(2));
    let rotated_at = Instant::now();
    let rotation = lab.node(1).node.kubespanctl(&["rotate-key"])?;
    let new_key = rotation["new_public_key"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(new_key.len(), 44, "{rotation}");
    let node2 = &lab.node(2).node;
    lab.wait_for(
        "node-2 to reach node-1's new key through a relay",
        UP,
        || {
            node2
                .exec("wg", &["show", &node2.interface, "peers"])
                .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(&new_key))
                && lab.node(2).peer_up(&lab.node(1).name)
                && lab
                    .node(2)
                    .peer_path(&lab.node(1).name)
                    .starts_with("relayed via")
        },
    )?;
    eprintln!(
        "node-2 up through a relay to node-1's new key {:?} after the rotation",
        rotated_at.elapsed()
    );
    let output = pinger.wait_with_output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let answered = text.lines().filter(|l| l.contains("icmp_seq=")).count();
    eprintln!("relayed pings across the rotation: {answered} of 150 answered");
    assert!(
        text.lines()
            .rev()
            .find(|l| l.contains("icmp_seq="))
            .is_some_and(|l| l.contains("icmp_seq=150")),
        "the last pings are answered again: {text}"
    );
    assert!(lab.node(1).node.ping(&lab.node(2).mesh_address()?));
    Ok(())
}

#[test]
fn a_killed_relay_hands_the_traffic_to_the_other() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = NatLab::new(&[Kind::Hard, Kind::Hard])?;
    lab.start_server(ServerOptions { stun: false })?;
    let (mut relays, yaml) = lab.start_relays(&[])?;
    lab.start_agents(&[(1, options(&yaml)), (2, options(&yaml))])?;
    relayed_both_ways(&mut lab)?;
    let node2 = lab.node(2).name.clone();
    let used = lab
        .node(1)
        .peer_path(&node2)
        .trim_start_matches("relayed via ")
        .to_owned();
    let mesh2 = lab.node(2).mesh_address()?;
    // 10 pings a second for 8 s; the relay in use dies 2 s in.
    let pinger = Command::new("ip")
        .args(["netns", "exec", &lab.node(1).node.netns])
        .args(["ping", "-n", "-i", "0.1", "-c", "80", "-W", "1", &mesh2])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(2));
    let killed_at = Instant::now();
    assert!(
        relays.kill(&used),
        "the relay in use ({used}) is one of the lab's"
    );
    let output = pinger.wait_with_output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let answered: Vec<u32> = text
        .lines()
        .filter_map(|l| {
            l.split("icmp_seq=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let longest_gap = answered
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .max()
        .unwrap_or(0);
    let gap = Duration::from_millis(100) * longest_gap;
    eprintln!(
        "relay {used} killed: longest gap in the pings {gap:?} ({} of 80 answered)",
        answered.len()
    );
    assert!(
        answered.last().is_some_and(|last| *last >= 75),
        "pings go on after the relay died: {text}"
    );
    assert!(
        gap < Duration::from_secs(6),
        "traffic moved to the other relay: {text}"
    );
    let now = lab.node(1).peer_path(&node2);
    assert!(
        now.starts_with("relayed via") && !now.ends_with(&used),
        "node-1 reaches node-2 through the other relay now ({now}, {:?} after the kill)",
        killed_at.elapsed()
    );
    Ok(())
}

#[test]
fn a_direct_path_that_appears_later_is_taken() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    // Two easy NATs, cut from each other at first: only the relay carries them. Healed, they
    // punch through and leave the relay.
    let mut lab = NatLab::new(&[Kind::Easy, Kind::Easy])?;
    lab.start_server(ServerOptions { stun: true })?;
    let (_relays, relay_yaml) = lab.start_relays(&[])?;
    let (ip1, ip2) = (lab.node(1).public_ip, lab.node(2).public_ip);
    lab.cut(1, ip2)?;
    lab.cut(2, ip1)?;
    let yaml = format!("{}{relay_yaml}", lab.nat_traversal_yaml());
    lab.start_agents(&[(1, options(&yaml)), (2, options(&yaml))])?;
    relayed_both_ways(&mut lab)?;
    lab.heal(1)?;
    lab.heal(2)?;
    let healed = Instant::now();
    let (a, b) = (lab.node(1).name.clone(), lab.node(2).name.clone());
    // Each side races for a better path every 15 s while relayed; the two NATs only let the
    // punch through once both have sent (within conntrack's 30 s for unanswered UDP), so up to
    // two rounds.
    let waited = lab.wait_for(
        "both nodes to leave the relay for a direct path",
        Duration::from_secs(75),
        || {
            let (p1, p2) = (lab.node(1).peer_path(&b), lab.node(2).peer_path(&a));
            lab.node(1).peer_up(&b)
                && lab.node(2).peer_up(&a)
                && !p1.is_empty()
                && !p2.is_empty()
                && !p1.starts_with("relayed")
                && !p2.starts_with("relayed")
        },
    )?;
    eprintln!(
        "direct path taken {waited:?} after the heal ({:?}): node-1 sees {}",
        healed.elapsed(),
        lab.node(1).peer_path(&b)
    );
    let mesh2 = lab.node(2).mesh_address()?;
    assert!(lab.node(1).ping(&mesh2));
    Ok(())
}

#[test]
fn nodes_of_a_cluster_the_relay_does_not_know_are_refused() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = NatLab::new(&[Kind::Hard, Kind::Hard])?;
    lab.start_server(ServerOptions { stun: false })?;
    // The relays let in another cluster only (a verifier of a token nobody here has).
    let other = format!("--cluster=another-cluster={}", "ab".repeat(32));
    let (_relays, yaml) = lab.start_relays(&[&other])?;
    lab.start_agents(&[(1, options(&yaml)), (2, options(&yaml))])?;
    lab.wait_for("both agents to report the relay's refusal", UP, || {
        (1..=2).all(|n| {
            let log = lab.node(n).node.log();
            log.contains("cannot connect to the relay") && log.contains("unauthorized")
        })
    })?;
    // No relay reaches either node, so neither announces one and no path exists.
    std::thread::sleep(Duration::from_secs(5));
    let (a, b) = (lab.node(1).name.clone(), lab.node(2).name.clone());
    assert!(!lab.node(1).peer_up(&b) && !lab.node(2).peer_up(&a));
    let mesh2 = lab.node(2).mesh_address()?;
    assert!(!lab.node(1).ping(&mesh2), "no packet crossed");
    Ok(())
}
