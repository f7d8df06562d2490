//! Key rotation without lost packets: `kubespanctl rotate-key` on one node of a 3-node mesh
//! while every pair through it pings at 10/s in both directions. Judged by ping, `wg show` on
//! the peers, the state file and a restart of the rotated agent.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use netns_tests::{AgentOptions, Lab, PingSummary, in_netns, require_root};

const UP: Duration = Duration::from_secs(20);
/// Pings per direction: 10 s at 10/s, the rotation 3 s in.
const PINGS: u32 = 100;
/// Pings per direction while discovery is down around the rotation: 25 s at 10/s.
const OUTAGE_PINGS: u32 = 250;

fn all_up(lab: &Lab, n: usize, expected: usize) -> bool {
    lab.node(n).peers().is_ok_and(|peers| {
        peers.len() == expected && peers.iter().all(|(_, state, _)| state == "up")
    })
}

/// Ping processes, killed when dropped (a failing test leaves none running).
struct Pings(Vec<(String, Option<Child>)>);

impl Drop for Pings {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            if let Some(mut child) = child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// `ping -i 0.1 -c count` from node `from` to `address` (a mesh address); a reply counts when
/// it arrives before ping gives up on it (2 s), so a delay is no loss but a drop is.
fn start_pinging(lab: &Lab, from: usize, address: &str, count: u32) -> anyhow::Result<Child> {
    let limit = u64::from(count) / 10 + 20;
    let count = count.to_string();
    Ok(in_netns(
        &lab.node(from).netns,
        limit,
        "ping",
        &["-n", "-i", "0.1", "-c", &count, "-W", "2", address],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()?)
}

/// (sent, received, max rtt in ms) of a finished `ping`.
fn ping_result(ping: Child) -> anyhow::Result<(u64, u64, f64)> {
    let out = ping.wait_with_output()?;
    let summary = PingSummary::parse(&String::from_utf8_lossy(&out.stdout))?;
    Ok((
        summary.transmitted,
        summary.received,
        summary.max_rtt_ms.unwrap_or(f64::NAN),
    ))
}

/// The public keys node `n`'s device lists as peers (`wg show <interface> peers`).
fn wg_peers(lab: &Lab, n: usize) -> anyhow::Result<Vec<String>> {
    let node = lab.node(n);
    let out = node.exec("wg", &["show", &node.interface, "peers"])?;
    anyhow::ensure!(
        out.status.success(),
        "`wg show {} peers` failed (is wireguard-tools installed?): {}",
        node.interface,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect())
}

/// Pings at 10/s in both directions through node-1: its own to the others, and theirs to it.
fn ping_through_node_1(lab: &Lab, mesh: &[String], count: u32) -> anyhow::Result<Pings> {
    let mut pings = Pings(Vec::new());
    for (from, to) in [(1, 2), (1, 3), (2, 1), (3, 1)] {
        let child = start_pinging(lab, from, &mesh[to - 1], count)?;
        pings
            .0
            .push((format!("node-{from} → node-{to}"), Some(child)));
    }
    Ok(pings)
}

/// Waits for the pings and fails with what each lost.
fn assert_none_lost(lab: &Lab, mut pings: Pings, count: u32) -> anyhow::Result<()> {
    let mut lost = Vec::new();
    for (label, child) in &mut pings.0 {
        let Some(child) = child.take() else { continue };
        let (sent, received, max_rtt) = ping_result(child)?;
        eprintln!("{label}: {sent} sent, {received} answered, max rtt {max_rtt} ms");
        assert_eq!(sent, u64::from(count), "{label}: ping stopped early");
        if received != sent {
            lost.push(format!("{label}: {} of {sent} lost", sent - received));
        }
    }
    assert!(
        lost.is_empty(),
        "pings lost across the key rotation: {lost:?}\n--- node-1\n{}\n--- node-2\n{}",
        lab.node(1).log(),
        lab.node(2).log()
    );
    Ok(())
}

fn three_node_mesh() -> anyhow::Result<(Lab, Vec<String>)> {
    let mut lab = Lab::new(3)?;
    lab.start_server()?;
    for n in 1..=3 {
        lab.start_agent(n, &AgentOptions::default())?;
    }
    lab.wait_for("every node to see two peers up", UP, || {
        (1..=3).all(|n| all_up(&lab, n, 2))
    })?;
    let mesh: Vec<String> = (1..=3)
        .map(|n| lab.node(n).mesh_address())
        .collect::<Result<_, _>>()?;
    Ok((lab, mesh))
}

/// Rotates node-1's key; returns the new one after checking the answer.
fn rotate(lab: &Lab, old_key: &str) -> anyhow::Result<String> {
    let rotation = lab.node(1).kubespanctl(&["rotate-key"])?;
    let new_key = rotation["new_public_key"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(rotation["old_public_key"].as_str(), Some(old_key));
    assert!(new_key.len() == 44 && new_key != old_key, "{rotation}");
    assert!(
        rotation["grace_seconds"].as_u64().unwrap_or_default() > 0,
        "the userspace device keeps the old key for a grace period: {rotation}"
    );
    Ok(new_key)
}

fn peers_know(lab: &Lab, new_key: &str, old_key: &str) -> bool {
    [2, 3].iter().all(|&n| {
        wg_peers(lab, n).is_ok_and(|peers| {
            peers.iter().any(|p| p == new_key) && !peers.iter().any(|p| p == old_key)
        })
    })
}

fn public_key(lab: &Lab, n: usize) -> anyhow::Result<String> {
    Ok(lab.node(n).kubespanctl(&["identity"])?["public_key"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

#[test]
fn a_rotated_key_loses_no_ping_and_survives_a_restart() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (mut lab, mesh) = three_node_mesh()?;
    let old_key = public_key(&lab, 1)?;
    for n in [2, 3] {
        assert!(wg_peers(&lab, n)?.contains(&old_key));
    }

    let pings = ping_through_node_1(&lab, &mesh, PINGS)?;
    std::thread::sleep(Duration::from_secs(3));
    let rotated_at = Instant::now();
    let new_key = rotate(&lab, &old_key)?;
    lab.wait_for("both peers to know node-1's new key", UP, || {
        peers_know(&lab, &new_key, &old_key)
    })?;
    eprintln!(
        "both peers replaced node-1's key within {:?} of the rotation",
        rotated_at.elapsed()
    );
    assert_none_lost(&lab, pings, PINGS)?;
    // Every peer has a session under the new key: the old key goes a few seconds later, long
    // before the grace period ends.
    lab.wait_for(
        "node-1 to stop answering its old key",
        Duration::from_secs(20),
        || {
            lab.node(1)
                .log()
                .contains("the previous WireGuard key is no longer answered")
        },
    )?;
    let dropped_after = rotated_at.elapsed();
    eprintln!("node-1 dropped its old key {dropped_after:?} after the rotation");
    // Not before the new sessions have settled (5 s after the last of them): a key dropped
    // early would leave a peer's rekey under the old key unanswered.
    assert!(
        dropped_after >= Duration::from_secs(5),
        "the old key went {dropped_after:?} after the rotation, before the sessions settled"
    );

    assert_eq!(public_key(&lab, 1)?, new_key, "the API shows the new key");
    let log = lab.node(1).log();
    assert_eq!(
        log.matches("WireGuard key rotated and published").count(),
        1,
        "one log line for the rotation:\n{log}"
    );
    let state =
        std::fs::read_to_string(lab.node(1).dir.join("state").join("kubespan-identity.yaml"))?;
    assert!(
        state.contains(&format!("publicKey: {new_key}")),
        "the state file holds the new key:\n{state}"
    );
    // A second rotation within the grace is refused (the device keeps one previous key).
    let again = lab.node(1).kubespanctl(&["rotate-key"]);
    assert!(again.is_err(), "a second rotation was accepted: {again:?}");

    // The rotated agent restarts with the new key, and the mesh comes back under it.
    lab.node_mut(1).stop_agent()?;
    lab.start_agent(1, &AgentOptions::default())?;
    lab.wait_for("node-1 up again with its peers", UP, || {
        (1..=3).all(|n| all_up(&lab, n, 2))
    })?;
    assert_eq!(
        public_key(&lab, 1)?,
        new_key,
        "the restart kept the new key"
    );
    assert!(peers_know(&lab, &new_key, &old_key));
    for n in [2, 3] {
        assert!(lab.node(n).ping(&mesh[0]), "node-{n} cannot reach node-1");
    }
    Ok(())
}

/// The peers learn the new key only seconds later (discovery is down when the key changes):
/// the old key carries every packet meanwhile. Replacing the key outright would cut node-1 off
/// until then: its sessions end, and the peers drop its handshakes under a key they do not know.
#[test]
fn peers_that_learn_the_key_late_lose_no_ping() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (mut lab, mesh) = three_node_mesh()?;
    let old_key = public_key(&lab, 1)?;
    let pings = ping_through_node_1(&lab, &mesh, OUTAGE_PINGS)?;
    std::thread::sleep(Duration::from_secs(2));
    lab.stop_server();
    std::thread::sleep(Duration::from_secs(1));
    let new_key = rotate(&lab, &old_key)?;
    // Six seconds under the new key with peers that know only the old one.
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        [2, 3]
            .iter()
            .all(|&n| wg_peers(&lab, n).is_ok_and(|peers| peers.contains(&old_key))),
        "a peer learned the new key while discovery was down"
    );
    let restarted_at = Instant::now();
    lab.start_server()?;
    lab.wait_for(
        "both peers to learn node-1's new key once discovery is back",
        Duration::from_secs(30),
        || peers_know(&lab, &new_key, &old_key),
    )?;
    eprintln!(
        "both peers replaced node-1's key {:?} after discovery came back",
        restarted_at.elapsed()
    );
    assert_none_lost(&lab, pings, OUTAGE_PINGS)?;
    Ok(())
}
