//! Relayed paths across NATs that no direct path crosses (`netns_tests::nat`, two hard NATs):
//! two `openspan-relay` servers on the lab's internet carry the pair's WireGuard packets; a
//! relay killed mid-flow hands the traffic to the other; a direct path that appears later
//! (two easy NATs healed after a cut) is taken. Judged by ping and iperf3 over the mesh
//! addresses and `kubespanctl peers`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use netns_tests::nat::{Kind, NatLab, ServerOptions};
use netns_tests::{AgentOptions, binary, require_root};

const UP: Duration = Duration::from_secs(40);
const RELAY_PORT: u16 = 7443;
const SERVER_NAME: &str = "relay.lab.test";

/// The lab's relays (killed when dropped).
struct Relays {
    children: Vec<(String, Child)>,
}

impl Relays {
    fn kill(&mut self, address: &str) -> bool {
        let Some(index) = self.children.iter().position(|(a, _)| a == address) else {
            return false;
        };
        let (_, mut child) = self.children.remove(index);
        let _ = child.kill();
        let _ = child.wait();
        true
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts two relays on the internet (next to the discovery server and at the lab's second
/// public address) letting the lab's cluster in; returns them and the agents' `relay` YAML.
fn start_relays(lab: &NatLab) -> anyhow::Result<(Relays, String)> {
    let cert = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])?;
    let (cert_file, key_file) = (lab.root.join("relay.crt"), lab.root.join("relay.key"));
    std::fs::write(&cert_file, cert.cert.pem())?;
    std::fs::write(&key_file, cert.signing_key.serialize_pem())?;
    // The verifier as an operator gets it: from a node's configuration.
    let config_file = lab.root.join("verifier-config.yaml");
    std::fs::write(&config_file, lab.agent_config(1, &AgentOptions::default()))?;
    let output = Command::new(binary("kubespanctl"))
        .args(["gen", "relay-verifier", "--config"])
        .arg(&config_file)
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "kubespanctl gen relay-verifier failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let cluster = String::from_utf8(output.stdout)?.trim().to_owned();
    anyhow::ensure!(
        cluster.starts_with(&format!("{}=", lab.cluster_id())) && cluster.len() > 64,
        "unexpected verifier line {cluster:?}"
    );
    let second_ip = lab
        .second_stun_address
        .rsplit_once(':')
        .map(|(ip, _)| ip.to_owned())
        .context("the lab's second address")?;
    let addresses = [
        format!("{}:{RELAY_PORT}", lab.server_ip),
        format!("{second_ip}:{RELAY_PORT}"),
    ];
    let mut relays = Relays {
        children: Vec::new(),
    };
    for (n, address) in addresses.iter().enumerate() {
        let ip = address
            .rsplit_once(':')
            .map(|(ip, _)| ip)
            .unwrap_or_default();
        let log = std::fs::File::create(lab.root.join(format!("relay-{n}.log")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.internet])
            .arg(binary("openspan-relay"))
            .arg(format!("--addr={address}"))
            .arg("--cert-file")
            .arg(&cert_file)
            .arg("--key-file")
            .arg(&key_file)
            .arg(format!("--cluster={cluster}"))
            .arg(format!("--metrics-addr={ip}:2123"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start openspan-relay")?;
        relays.children.push((address.clone(), child));
    }
    let yaml = format!(
        "relay:\n  servers: [\"{}\", \"{}\"]\n  caFile: {}\n  serverName: {SERVER_NAME}\n",
        addresses[0],
        addresses[1],
        cert_file.display()
    );
    Ok((relays, yaml))
}

fn options(yaml: &str) -> AgentOptions {
    AgentOptions {
        extra_yaml: yaml.into(),
    }
}

/// The path node `n` reports for its peer (e.g. "relayed via 11.1.0.1:7443").
fn path(lab: &NatLab, n: usize, label: &str) -> String {
    lab.node(n)
        .node
        .kubespanctl(&["peers"])
        .ok()
        .and_then(|peers| {
            peers
                .as_array()?
                .iter()
                .find(|p| p["label"] == label)
                .map(|p| p["status"]["path"].as_str().unwrap_or_default().to_owned())
        })
        .unwrap_or_default()
}

fn relayed_both_ways(lab: &mut NatLab) -> anyhow::Result<Duration> {
    let (a, b) = (lab.node(1).name.clone(), lab.node(2).name.clone());
    lab.wait_for(&format!("{a} and {b} up through a relay"), UP, || {
        lab.node(1).peer_up(&b)
            && lab.node(2).peer_up(&a)
            && path(lab, 1, &b).starts_with("relayed via")
            && path(lab, 2, &a).starts_with("relayed via")
    })
}

#[test]
fn two_hard_nat_nodes_talk_through_a_relay() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = NatLab::new(&[Kind::Hard, Kind::Hard])?;
    lab.start_server(ServerOptions { stun: false })?;
    let (_relays, yaml) = start_relays(&lab)?;
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

#[test]
fn a_killed_relay_hands_the_traffic_to_the_other() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = NatLab::new(&[Kind::Hard, Kind::Hard])?;
    lab.start_server(ServerOptions { stun: false })?;
    let (mut relays, yaml) = start_relays(&lab)?;
    lab.start_agents(&[(1, options(&yaml)), (2, options(&yaml))])?;
    relayed_both_ways(&mut lab)?;
    let node2 = lab.node(2).name.clone();
    let used = path(&lab, 1, &node2)
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
    let now = path(&lab, 1, &node2);
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
    let (_relays, relay_yaml) = start_relays(&lab)?;
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
            let (p1, p2) = (path(&lab, 1, &b), path(&lab, 2, &a));
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
        path(&lab, 1, &b)
    );
    let mesh2 = lab.node(2).mesh_address()?;
    assert!(lab.node(1).ping(&mesh2));
    Ok(())
}
