//! Live reload and cluster-secret rotation on a running 3-node mesh: changes applied with
//! `kubespanctl reload` and SIGHUP while a ping runs through the tunnels, refused changes and
//! invalid files leaving the running configuration in place, and a `native` secret rotated in
//! three reload steps without losing a ping or a member.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use netns_tests::{
    AgentOptions, CLUSTER_SECRET, Daemon, Lab, PingSummary, binary, in_netns, require_root, sh,
};

const UP: Duration = Duration::from_secs(30);
/// The secret the rotation moves to.
const NEW_SECRET: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

fn all_up(lab: &Lab, n: usize, expected: usize) -> bool {
    lab.node(n).peers().is_ok_and(|peers| {
        peers.len() == expected && peers.iter().all(|(_, state, _)| state == "up")
    })
}

/// A ping every 100 ms from node `from` to `address`, until [`stop_ping`].
fn start_ping(lab: &Lab, from: usize, address: &str) -> anyhow::Result<Child> {
    Ok(Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.node(from).netns,
            "ping",
            "-i",
            "0.1",
            "-W",
            "1",
            "-w",
            "300",
            address,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?)
}

/// Stops a ping (SIGINT: it prints its statistics) and returns (transmitted, lost): lost
/// counts the requests with no reply before the last answered one (the request in flight when
/// the ping is stopped is not a loss).
fn stop_ping(ping: Child) -> anyhow::Result<(u64, u64)> {
    sh("kill", &["-INT", &ping.id().to_string()])?;
    let output = ping.wait_with_output()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let summary = PingSummary::parse(&text)?;
    let last = summary.answered.last().copied().unwrap_or(0);
    assert!(
        summary.transmitted <= last + 1,
        "more than the last request went unanswered:\n{text}"
    );
    Ok((summary.transmitted, summary.lost_before_last()))
}

/// Kills a ping left running by a failed assertion.
struct PingGuard(Option<Child>);

impl Drop for PingGuard {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs kubespanctl against node `n`; returns (exit code, stdout).
fn ctl(lab: &Lab, n: usize, args: &[&str]) -> anyhow::Result<(i32, String)> {
    let socket = lab.node(n).socket();
    let output = Command::new(binary("kubespanctl"))
        .arg("--socket")
        .arg(&socket)
        .args(args)
        .output()?;
    Ok((
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    ))
}

fn config_path(lab: &Lab, n: usize) -> std::path::PathBuf {
    lab.node(n).dir.join("config.yaml")
}

fn write_config(lab: &Lab, n: usize, text: &str) -> anyhow::Result<()> {
    Ok(std::fs::write(config_path(lab, n), text)?)
}

fn link_mtu(lab: &Lab, n: usize) -> anyhow::Result<u32> {
    let node = lab.node(n);
    let out = sh(
        "ip",
        &[
            "-n",
            &node.netns,
            "-o",
            "link",
            "show",
            "dev",
            &node.interface,
        ],
    )?;
    out.split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no mtu in {out}"))
}

fn members(lab: &Lab, n: usize) -> usize {
    lab.node(n)
        .kubespanctl(&["members"])
        .ok()
        .and_then(|m| m.as_array().map(Vec::len))
        .unwrap_or(0)
}

fn preshared_keys(lab: &Lab, n: usize) -> anyhow::Result<String> {
    let node = lab.node(n);
    sh(
        "ip",
        &[
            "netns",
            "exec",
            &node.netns,
            "wg",
            "show",
            &node.interface,
            "preshared-keys",
        ],
    )
}

/// The pre-shared key node `n`'s device holds for the peer with `public_key`.
fn psk_for(lab: &Lab, n: usize, public_key: &str) -> Option<String> {
    preshared_keys(lab, n).ok()?.lines().find_map(|line| {
        let (key, psk) = line.split_once('\t')?;
        (key == public_key).then(|| psk.trim().to_owned())
    })
}

fn public_key(lab: &Lab, n: usize) -> anyhow::Result<String> {
    Ok(lab.node(n).kubespanctl(&["identity"])?["public_key"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

fn mesh_up(lab: &mut Lab) -> anyhow::Result<Vec<String>> {
    lab.start_server()?;
    for n in 1..=3 {
        lab.start_agent(n, &AgentOptions::default())?;
    }
    let waited = lab.wait_for("every node to see two peers up", UP, || {
        (1..=3).all(|n| all_up(lab, n, 2))
    })?;
    eprintln!("mesh of 3 up {waited:?} after the agents started");
    (1..=3).map(|n| lab.node(n).mesh_address()).collect()
}

#[test]
fn reload_applies_live_changes_keeps_tunnels_and_refuses_the_rest() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = Lab::new(3)?;
    let mesh = mesh_up(&mut lab)?;
    let mut ping = PingGuard(Some(start_ping(&lab, 1, &mesh[1])?));
    let base = lab.agent_config(1, &AgentOptions::default());
    assert_eq!(link_mtu(&lab, 1)?, 1420);

    // A dry run first: it shows the plan and changes nothing.
    let changed = base
        .replace("peerKeepaliveSeconds: 2", "peerKeepaliveSeconds: 3")
        .replace("peerDownSeconds: 6", "peerDownSeconds: 8")
        .replace("endpointTimeoutSeconds: 3", "endpointTimeoutSeconds: 4")
        + "mtu: 1380\nextraAnnouncedEndpoints: [\"198.51.100.7:51820\"]\n";
    let candidate = lab.node(1).dir.join("candidate.yaml");
    std::fs::write(&candidate, &changed)?;
    let (code, out) = ctl(&lab, 1, &["diff", "--config", candidate.to_str().unwrap()])?;
    assert_eq!(code, 0, "diff of a live change succeeds:\n{out}");
    for expected in [
        "would apply:",
        "mtu: 1420 -> 1380",
        "extraAnnouncedEndpoints: [] -> [198.51.100.7:51820]",
        "peerKeepaliveSeconds: 2s -> 3s",
    ] {
        assert!(out.contains(expected), "{expected:?} in:\n{out}");
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(link_mtu(&lab, 1)?, 1420, "a dry run applies nothing");

    // The reload applies it live.
    write_config(&lab, 1, &changed)?;
    let (code, out) = ctl(&lab, 1, &["reload"])?;
    assert_eq!(code, 0, "reload succeeds:\n{out}");
    assert!(
        out.contains("applied:") && out.contains("mtu: 1420 -> 1380"),
        "{out}"
    );
    lab.wait_for("the new MTU on the link", Duration::from_secs(5), || {
        link_mtu(&lab, 1).is_ok_and(|m| m == 1380)
    })?;
    lab.wait_for(
        "node-2 to see node-1's extra endpoint",
        Duration::from_secs(10),
        || {
            lab.node(2).kubespanctl(&["peers"]).is_ok_and(|peers| {
                peers.as_array().into_iter().flatten().any(|p| {
                    p["label"] == "node-1"
                        && p["endpoints"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|e| e == "198.51.100.7:51820")
                })
            })
        },
    )?;
    let keepalives = || {
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &lab.node(1).netns,
                "wg",
                "show",
                &lab.node(1).interface,
                "persistent-keepalive",
            ],
        )
        .unwrap_or_default()
    };
    let applied = lab.wait_for("both peers' new keepalive", Duration::from_secs(5), || {
        let k = keepalives();
        k.lines().count() == 2 && k.lines().all(|l| l.ends_with("\t3"))
    });
    assert!(
        applied.is_ok(),
        "both peers got the new keepalive:\n{}",
        keepalives()
    );
    eprintln!(
        "keepalive applied to both peers {:?} after the reload",
        applied?
    );
    let log = lab.node(1).log();
    assert!(
        log.lines()
            .any(|l| l.contains("reload applied") && l.contains("mtu 1420 -> 1380")),
        "one log line says what the reload applied:\n{log}"
    );

    // A restart-only change is refused whole: the MTU in the same file is not applied either.
    write_config(
        &lab,
        1,
        &changed.replace("mtu: 1380", "mtu: 1400").replace(
            &format!("interface: {}", lab.node(1).interface),
            "interface: other0",
        ),
    )?;
    let (code, out) = ctl(&lab, 1, &["reload"])?;
    assert_eq!(code, 1, "a refused reload exits 1:\n{out}");
    assert!(out.contains("interface: needs a restart"), "{out}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        link_mtu(&lab, 1)?,
        1380,
        "nothing of a refused reload applies"
    );

    // An invalid file is refused with the parse error, by the CLI and by SIGHUP.
    write_config(&lab, 1, &format!("{changed}mtu: [\n"))?;
    let (code, out) = ctl(&lab, 1, &["reload"])?;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("refused: invalid configuration"), "{out}");
    let pid = lab.node(1).agent_pid().expect("agent running").to_string();
    sh("kill", &["-HUP", &pid])?;
    lab.wait_for(
        "SIGHUP's refusal in the log",
        Duration::from_secs(5),
        || {
            lab.node(1).log().lines().any(|l| {
                l.contains("SIGHUP") && l.contains("reload refused: invalid configuration")
            })
        },
    )?;

    // SIGHUP with a valid file applies it.
    write_config(&lab, 1, &changed.replace("mtu: 1380", "mtu: 1400"))?;
    sh("kill", &["-HUP", &pid])?;
    lab.wait_for("SIGHUP's MTU change", Duration::from_secs(5), || {
        link_mtu(&lab, 1).is_ok_and(|m| m == 1400)
    })?;
    assert!(
        lab.node(1)
            .log()
            .contains("reload applied mtu 1380 -> 1400")
    );

    // Discovery endpoints: a second service is added (a client connects to it), then removed
    // (the client stops, and this node's record there is deleted).
    let server_ip = lab
        .server_address
        .split(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    let second = format!("{server_ip}:3001");
    let mut second_server = Daemon::spawn(
        "second discovery-server",
        in_netns(
            &lab.switch,
            300,
            binary("discovery-server"),
            &[
                &format!("--addr={second}"),
                "--landing-addr=",
                "--metrics-addr=",
                "--snapshots-enabled=false",
            ],
        ),
        lab.node(1).dir.join("server2.log"),
        Duration::from_secs(3),
    )?;
    let two = changed.replace(
        &format!("endpoints: [\"http://{}\"]", lab.server_address),
        &format!(
            "endpoints: [\"http://{}\", \"http://{second}\"]",
            lab.server_address
        ),
    );
    assert_ne!(two, changed);
    write_config(&lab, 1, &two)?;
    let (code, out) = ctl(&lab, 1, &["reload"])?;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("discovery.endpoints"), "{out}");
    let services = |lab: &Lab| -> Vec<(String, String)> {
        lab.node(1)
            .kubespanctl(&["status"])
            .ok()
            .and_then(|s| {
                s["discovery"].as_array().map(|list| {
                    list.iter()
                        .map(|c| {
                            (
                                c["endpoint"].as_str().unwrap_or_default().to_owned(),
                                c["state"].as_str().unwrap_or_default().to_owned(),
                            )
                        })
                        .collect()
                })
            })
            .unwrap_or_default()
    };
    lab.wait_for(
        "the added discovery client connected",
        Duration::from_secs(10),
        || {
            second_server.check().is_ok()
                && services(&lab)
                    .iter()
                    .any(|(e, state)| e.ends_with(":3001") && state == "connected")
        },
    )?;
    assert_eq!(services(&lab).len(), 2);
    write_config(&lab, 1, &changed)?;
    let (code, _) = ctl(&lab, 1, &["reload"])?;
    assert_eq!(code, 0);
    lab.wait_for(
        "the removed discovery service to delete node-1's record",
        Duration::from_secs(10),
        || {
            lab.node(1)
                .log()
                .contains("deleted this node's record from the removed discovery service")
        },
    )?;
    assert_eq!(services(&lab).len(), 1, "{:?}", services(&lab));
    drop(second_server);

    std::thread::sleep(Duration::from_secs(1));
    assert!(all_up(&lab, 1, 2) && all_up(&lab, 2, 2), "tunnels kept");
    let (sent, lost) = stop_ping(ping.0.take().expect("ping running"))?;
    eprintln!("ping through the reloads: {sent} sent, {lost} lost");
    assert!(sent > 20, "the ping ran ({sent} sent)");
    assert_eq!(lost, 0, "no ping lost while reloading");
    Ok(())
}

#[test]
fn a_native_secret_rotates_in_three_reloads_without_an_outage() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = Lab::new(3)?;
    let mesh = mesh_up(&mut lab)?;
    let psk_before = preshared_keys(&lab, 1)?;
    let (key1, key2) = (public_key(&lab, 1)?, public_key(&lab, 2)?);
    let initial = psk_for(&lab, 2, &key1);
    assert!(initial.is_some(), "node-2 has a pre-shared key for node-1");
    let mut ping_a = PingGuard(Some(start_ping(&lab, 1, &mesh[1])?));
    let mut ping_b = PingGuard(Some(start_ping(&lab, 3, &mesh[0])?));
    let old = format!("clusterSecret: {CLUSTER_SECRET}\n");
    let steps = [
        (
            "add the next secret",
            format!("clusterSecret: {CLUSTER_SECRET}\nclusterSecretNext: {NEW_SECRET}\n"),
            "clusterSecretNext: (none) -> sha256:",
        ),
        (
            "promote it",
            format!("clusterSecret: {NEW_SECRET}\nclusterSecretNext: {CLUSTER_SECRET}\n"),
            "clusterSecret: sha256:",
        ),
        (
            "drop the old one",
            format!("clusterSecret: {NEW_SECRET}\n"),
            "-> (none)",
        ),
    ];
    for (step, secrets, expected) in &steps {
        for n in 1..=3 {
            let text = lab
                .agent_config(n, &AgentOptions::default())
                .replace(&old, secrets);
            let candidate = lab.node(n).dir.join("candidate.yaml");
            std::fs::write(&candidate, &text)?;
            let (code, out) = ctl(&lab, n, &["diff", "--config", candidate.to_str().unwrap()])?;
            assert_eq!(code, 0, "{step} on node-{n}: diff\n{out}");
            assert!(out.contains(expected), "{step}: {expected:?} in\n{out}");
            write_config(&lab, n, &text)?;
            let (code, out) = ctl(&lab, n, &["reload"])?;
            assert_eq!(code, 0, "{step} on node-{n}: reload\n{out}");
            if *step == "promote it" && n == 1 {
                // node-1 seals with the new secret, node-2 still with the old one: both ends
                // of their tunnel agree on a key that is neither secret's own.
                lab.wait_for(
                    "node-1 and node-2 on one new key",
                    Duration::from_secs(10),
                    || {
                        let (a, b) = (psk_for(&lab, 1, &key2), psk_for(&lab, 2, &key1));
                        a.is_some() && a == b && b != initial
                    },
                )?;
                let node3 = psk_for(&lab, 3, &key2);
                assert_eq!(
                    node3, initial,
                    "node-2 and node-3, both unpromoted, keep the old key"
                );
            }
            // The nodes are at different steps for a while: members must stay visible.
            std::thread::sleep(Duration::from_millis(700));
            for m in 1..=3 {
                assert_eq!(
                    members(&lab, m),
                    3,
                    "{step}: node-{m} sees every member after node-{n}'s reload"
                );
            }
        }
        eprintln!("rotation step done: {step}");
    }
    // Skipping step 1 is refused: the other nodes could not read this node.
    let jump = lab.agent_config(1, &AgentOptions::default()).replace(
        &format!("clusterSecret: {CLUSTER_SECRET}"),
        "clusterSecret: MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=",
    );
    let candidate = lab.node(1).dir.join("candidate.yaml");
    std::fs::write(&candidate, jump)?;
    let (code, out) = ctl(&lab, 1, &["diff", "--config", candidate.to_str().unwrap()])?;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("clusterSecretNext"), "{out}");

    std::thread::sleep(Duration::from_secs(2));
    for n in 1..=3 {
        assert!(
            all_up(&lab, n, 2),
            "node-{n}: every tunnel up after the rotation"
        );
        assert_eq!(members(&lab, n), 3);
    }
    let psk_after = preshared_keys(&lab, 1)?;
    assert_ne!(
        psk_before, psk_after,
        "the tunnels' pre-shared keys follow the new secret"
    );
    let (sent_a, lost_a) = stop_ping(ping_a.0.take().expect("ping running"))?;
    let (sent_b, lost_b) = stop_ping(ping_b.0.take().expect("ping running"))?;
    eprintln!(
        "pings through the rotation: {sent_a} sent, {lost_a} lost; {sent_b} sent, {lost_b} lost"
    );
    assert!(sent_a > 50 && sent_b > 50, "the pings ran");
    assert_eq!(lost_a, 0, "no ping lost node-1 -> node-2");
    assert_eq!(lost_b, 0, "no ping lost node-3 -> node-1");
    Ok(())
}
