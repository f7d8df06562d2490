//! relayed-bench: a relayed path against the direct one, side by side in one lab.
//!
//! Two nodes behind easy NATs (`netns_tests::nat`) with STUN and two `openspan-relay`s on the
//! lab's internet (limits raised: the bench measures the path, not the relay's per-client
//! budget). First the pair finds its direct path; TCP throughput (iperf3, `--seconds`) and ping
//! round trips (`--pings` at 20 ms intervals) are measured over the mesh addresses. Then each
//! router drops the other's packets (nftables, no link change), the agents notice the dead
//! path, race, and fall back to a relay; the time to that and the same measures over the relay
//! are printed. `--runs` fresh labs.
//!
//! Needs root, nft, iperf3 and the binaries next to this one; for numbers that mean something,
//! release builds: `cargo build --release -p netns-tests -p kubespan-agent -p discovery-server
//! -p openspan-relay --bins && target/release/relayed-bench`.

#![forbid(unsafe_code)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use netns_tests::nat::{Kind, NatLab, ServerOptions};
use netns_tests::{AgentOptions, ns_sh, require_root};

#[derive(Parser, Debug)]
#[command(about = "TCP throughput and round trips over a relayed path against the direct one")]
struct Args {
    /// Fresh labs to measure in.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Seconds of iperf3 per measure.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Pings per round-trip measure.
    #[arg(long, default_value_t = 50)]
    pings: u32,
}

struct Measure {
    mbit: f64,
    rtt_avg_ms: f64,
    rtt_max_ms: f64,
}

fn measure(lab: &NatLab, args: &Args) -> anyhow::Result<Measure> {
    let (client, server) = (lab.node(1), lab.node(2));
    let target = server.mesh_address()?;
    let mut iperf_server = Command::new("ip")
        .args(["netns", "exec", &server.node.netns, "iperf3", "-s", "-1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start iperf3")?;
    std::thread::sleep(Duration::from_millis(300));
    let seconds = args.seconds.to_string();
    let report = ns_sh(
        &client.node.netns,
        "iperf3",
        &["-c", &target, "-t", &seconds, "-J"],
    );
    let _ = iperf_server.kill();
    let _ = iperf_server.wait();
    let report: serde_json::Value = serde_json::from_str(&report?)?;
    let mbit = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 reported no throughput")?
        / 1e6;
    let count = args.pings.to_string();
    let pings = ns_sh(
        &client.node.netns,
        "ping",
        &["-n", "-q", "-i", "0.02", "-c", &count, &target],
    )?;
    // "rtt min/avg/max/mdev = 0.061/0.081/0.152/0.018 ms"
    let numbers: Vec<f64> = pings
        .lines()
        .find_map(|l| l.split(" = ").nth(1))
        .map(|v| {
            v.trim_end_matches(" ms")
                .split('/')
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    anyhow::ensure!(numbers.len() >= 3, "ping gave no round trips: {pings}");
    Ok(Measure {
        mbit,
        rtt_avg_ms: numbers[1],
        rtt_max_ms: numbers[2],
    })
}

fn run_once(args: &Args) -> anyhow::Result<(Measure, Duration, Measure)> {
    let mut lab = NatLab::new(&[Kind::Easy, Kind::Easy])?;
    lab.use_release_binaries();
    lab.fast_timers = false;
    lab.start_server(ServerOptions { stun: true })?;
    let (_relays, relay_yaml) = lab.start_relays(&[
        "--byte-rate=100000000000",
        "--byte-burst=10000000000",
        "--packet-rate=100000000",
        "--packet-burst=10000000",
    ])?;
    let yaml = format!("{}{relay_yaml}", lab.nat_traversal_yaml());
    let options = AgentOptions { extra_yaml: yaml };
    lab.start_agents(&[(1, options.clone()), (2, options)])?;
    let (a, b) = (lab.node(1).name.clone(), lab.node(2).name.clone());
    lab.wait_for("a direct path both ways", Duration::from_secs(60), || {
        lab.node(1).peer_up(&b)
            && lab.node(2).peer_up(&a)
            && !lab.node(1).peer_path(&b).starts_with("relayed")
            && !lab.node(2).peer_path(&a).starts_with("relayed")
    })?;
    let direct = measure(&lab, args)?;
    let (ip1, ip2) = (lab.node(1).public_ip, lab.node(2).public_ip);
    let cut = Instant::now();
    lab.cut(1, ip2)?;
    lab.cut(2, ip1)?;
    lab.wait_for("both relayed", Duration::from_secs(90), || {
        lab.node(1).peer_up(&b)
            && lab.node(2).peer_up(&a)
            && lab.node(1).peer_path(&b).starts_with("relayed")
            && lab.node(2).peer_path(&a).starts_with("relayed")
    })?;
    let to_relay = cut.elapsed();
    let relayed = measure(&lab, args)?;
    Ok((direct, to_relay, relayed))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !require_root() {
        anyhow::bail!("relayed-bench needs root (network namespaces)");
    }
    println!("# {}", std::env::args().collect::<Vec<_>>().join(" "));
    println!("run  path     TCP Mbit/s  RTT avg ms  RTT max ms");
    for run in 1..=args.runs {
        match run_once(&args) {
            Ok((direct, to_relay, relayed)) => {
                for (name, m) in [("direct", &direct), ("relayed", &relayed)] {
                    println!(
                        "{run:<4} {name:<8} {:>10.0}  {:>10.3}  {:>10.3}",
                        m.mbit, m.rtt_avg_ms, m.rtt_max_ms
                    );
                }
                println!(
                    "{run:<4} path cut → both relayed in {:.1} s (default timers)",
                    to_relay.as_secs_f64()
                );
            }
            Err(e) => println!("{run:<4} failed: {e:#}"),
        }
    }
    Ok(())
}
