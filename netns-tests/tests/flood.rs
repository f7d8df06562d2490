//! openspan's userspace WireGuard device under a flood of handshake initiations with a valid
//! mac1 (the cheapest attack: only the public key is needed): an established tunnel must keep
//! its packets, and a legitimate new peer must still get its handshake through, quickly.
//!
//! Node 1 runs the device under attack, node 2 a peer with an established tunnel to it, node 3
//! the flood (`handshake-flood`, bounded), node 4 a new peer configured during the flood.

use std::time::{Duration, Instant};

use anyhow::Context;
use netns_tests::procfs::cpu_time;
use netns_tests::{
    Daemon, Lab, Node, binary, in_netns, ns_output, ns_sh, require_root, sh, wait_until,
    wireguard_daemon,
};

const DAEMON_LIMIT_SECS: u64 = 120;
const FLOOD_SECS: u64 = 12;
/// Pings 10 ms apart through the established tunnel: 7 s, or as many as fit into
/// [`PING_DEADLINE_SECS`] on a busy machine, all within the flood.
const PINGS: u64 = 700;
const PING_DEADLINE_SECS: u64 = FLOOD_SECS - 3;
const PORT: u16 = 51820;

/// `OPENSPAN_FLOOD_RATE` or the rate of the issue: 70,000 initiations per second.
fn flood_rate() -> u64 {
    std::env::var("OPENSPAN_FLOOD_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(70_000)
}

fn tunnel_address(node: &Node) -> String {
    node.address.replacen("10.77.", "10.79.", 1)
}

struct Device {
    // Dropped before the lab: the daemon stops before its namespace goes.
    daemon: Daemon,
    interface: String,
    public: String,
}

/// `openspan-wireguard` in `node`, with a fresh key, listening on 51820, addressed and up.
fn device(lab: &Lab, node: &Node, n: usize) -> anyhow::Result<Device> {
    let interface = format!("{}w{n}", lab.id);
    let program = binary("openspan-wireguard");
    let daemon = wireguard_daemon(node, &program, &[&interface], &interface, DAEMON_LIMIT_SECS)?;
    let key_file = node.dir.join("wg.key");
    std::fs::write(&key_file, sh("wg", &["genkey"])?)?;
    let public = sh(
        "sh",
        &["-c", &format!("wg pubkey < {}", key_file.display())],
    )?
    .trim()
    .to_owned();
    let key_path = key_file.to_str().unwrap_or_default();
    let port = PORT.to_string();
    let set = [
        "set",
        &interface,
        "private-key",
        key_path,
        "listen-port",
        &port,
    ];
    ns_sh(&node.netns, "wg", &set)?;
    let address = format!("{}/24", tunnel_address(node));
    ns_sh(
        &node.netns,
        "ip",
        &["addr", "add", &address, "dev", &interface],
    )?;
    ns_sh(
        &node.netns,
        "ip",
        &["link", "set", &interface, "mtu", "1420", "up"],
    )?;
    Ok(Device {
        daemon,
        interface,
        public,
    })
}

/// `wg set <ours> peer <theirs> allowed-ips <their tunnel address> [endpoint <their address>]`.
fn add_peer(
    ours: (&Node, &Device),
    theirs: (&Node, &Device),
    endpoint: bool,
) -> anyhow::Result<()> {
    let allowed = format!("{}/32", tunnel_address(theirs.0));
    let endpoint_address = format!("{}:{PORT}", theirs.0.address);
    let mut args = vec![
        "set",
        &ours.1.interface,
        "peer",
        &theirs.1.public,
        "allowed-ips",
        &allowed,
    ];
    if endpoint {
        args.extend(["endpoint", &endpoint_address]);
    }
    ns_sh(&ours.0.netns, "wg", &args)?;
    Ok(())
}

/// Whether `wg show <interface> latest-handshakes` has a handshake with any peer.
fn has_handshake(node: &Node, interface: &str) -> anyhow::Result<bool> {
    let text = ns_sh(&node.netns, "wg", &["show", interface, "latest-handshakes"])?;
    Ok(text
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
        .any(|stamp| stamp > 0))
}

struct PingSummary {
    sent: u64,
    received: u64,
    /// min/avg/max in milliseconds, when any answer came.
    rtt: Option<(f64, f64, f64)>,
}

/// `ping -q -i 0.01 -c <count> -w <deadline>` from namespace `netns` to `target`, summarised.
fn ping(netns: &str, target: &str, count: u64, deadline: u64) -> anyhow::Result<PingSummary> {
    let (count_arg, deadline_arg) = (count.to_string(), deadline.to_string());
    let out = ns_output(
        netns,
        deadline + 10,
        "ping",
        &[
            "-q",
            "-n",
            "-i",
            "0.01",
            "-W",
            "1",
            "-c",
            &count_arg,
            "-w",
            &deadline_arg,
            target,
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // "700 packets transmitted, 695 received, 0.714% packet loss, time 7034ms"
    let summary = text
        .lines()
        .find(|line| line.contains("packets transmitted"))
        .unwrap_or_default();
    let field = |name: &str| -> anyhow::Result<u64> {
        summary
            .split(',')
            .find(|part| part.contains(name))
            .and_then(|part| part.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("ping printed no summary: {text}"))
    };
    let (sent, received) = (field("transmitted")?, field("received")?);
    let rtt = text
        .lines()
        .find(|line| line.starts_with("rtt"))
        .and_then(|line| line.split('=').nth(1))
        .and_then(|values| {
            let numbers: Vec<f64> = values
                .trim()
                .trim_end_matches(" ms")
                .split('/')
                .filter_map(|v| v.parse().ok())
                .collect();
            Some((*numbers.first()?, *numbers.get(1)?, *numbers.get(2)?))
        });
    Ok(PingSummary {
        sent,
        received,
        rtt,
    })
}

fn describe(summary: &PingSummary) -> String {
    let rtt = summary
        .rtt
        .map_or("no answers".to_owned(), |(min, avg, max)| {
            format!("rtt min/avg/max {min:.3}/{avg:.3}/{max:.3} ms")
        });
    format!(
        "{}/{} pings kept ({:.1} %), {rtt}",
        summary.received,
        summary.sent,
        100.0 * summary.received as f64 / summary.sent as f64
    )
}

#[test]
fn an_established_tunnel_and_a_new_peer_survive_a_handshake_flood() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let lab = Lab::new(4)?;
    let (victim, established, flooder, newcomer) =
        (lab.node(1), lab.node(2), lab.node(3), lab.node(4));
    let mut victim_device = device(&lab, victim, 1)?;
    let established_device = device(&lab, established, 2)?;
    let newcomer_device = device(&lab, newcomer, 4)?;
    add_peer(
        (victim, &victim_device),
        (established, &established_device),
        true,
    )?;
    add_peer(
        (established, &established_device),
        (victim, &victim_device),
        true,
    )?;
    let target = tunnel_address(victim);
    wait_until("a ping through the tunnel", Duration::from_secs(15), || {
        Ok(established.ping(&target))
    })?;
    let quiet = ping(&established.netns, &target, 200, 10)?;
    eprintln!("before the flood: {}", describe(&quiet));

    let rate = flood_rate();
    let flood_target = format!("{}:{PORT}", victim.address);
    let mut flood = Daemon::spawn(
        "handshake-flood",
        in_netns(
            &flooder.netns,
            FLOOD_SECS + 10,
            binary("handshake-flood"),
            &[
                &flood_target,
                &victim_device.public,
                "--rate",
                &rate.to_string(),
                "--duration",
                &FLOOD_SECS.to_string(),
            ],
        ),
        flooder.dir.join("flood.log"),
        Duration::from_secs(2),
    )?;
    let flood_started = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let victim_pid = victim_device
        .daemon
        .worker_pid()
        .context("no openspan-wireguard process")?;
    let cpu_before = cpu_time(victim_pid).context("no CPU time of the device")?;
    let measured = Instant::now();

    let pinger = {
        let (netns, target) = (established.netns.clone(), target.clone());
        std::thread::spawn(move || ping(&netns, &target, PINGS, PING_DEADLINE_SECS))
    };

    // A new peer, configured two seconds into the measurement: the victim learns its key, then
    // the newcomer (which initiates at once) learns the victim's.
    std::thread::sleep(Duration::from_secs(2));
    add_peer(
        (victim, &victim_device),
        (newcomer, &newcomer_device),
        false,
    )?;
    let configured = Instant::now();
    add_peer((newcomer, &newcomer_device), (victim, &victim_device), true)?;
    let mut handshake_after = None;
    while configured.elapsed() < Duration::from_secs(6) {
        if has_handshake(newcomer, &newcomer_device.interface)? {
            handshake_after = Some(configured.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let during = pinger
        .join()
        .map_err(|_| anyhow::anyhow!("the ping thread panicked"))??;
    let pinged_for = measured.elapsed();
    let cpu = cpu_time(victim_pid)
        .context("no CPU time of the device")?
        .saturating_sub(cpu_before);
    let cpu_share = 100.0 * cpu.as_secs_f64() / measured.elapsed().as_secs_f64();
    let ended_within_flood = flood_started.elapsed() < Duration::from_secs(FLOOD_SECS);
    wait_until(
        "the flood to end",
        Duration::from_secs(FLOOD_SECS + 15),
        || Ok(!flood.running()),
    )?;
    let flood_report = std::fs::read_to_string(flooder.dir.join("flood.log"))?;
    victim_device.daemon.check()?;

    eprintln!("flood: {}", flood_report.trim());
    eprintln!("during the flood ({pinged_for:.1?}): {}", describe(&during));
    eprintln!(
        "new peer's handshake: {}",
        handshake_after.map_or("none within 6 s".to_owned(), |d| format!("after {d:?}"))
    );
    eprintln!("device CPU during the flood: {cpu_share:.0} % of one core");
    assert!(
        flood_report.starts_with("sent "),
        "the flood failed: {flood_report}"
    );
    assert!(
        during.received * 100 >= during.sent * 99,
        "the established tunnel lost more than 1 % of its pings: {}",
        describe(&during)
    );
    let handshake_after = handshake_after.context("the new peer got no handshake within 6 s")?;
    assert!(
        handshake_after <= Duration::from_secs(2),
        "the new peer's handshake took {handshake_after:?}"
    );
    assert!(
        ended_within_flood,
        "the pings outlasted the flood; the measurement is not of the flood"
    );
    Ok(())
}
