//! converge-bench: how fast a mesh started all at once converges. For each size, a fresh lab
//! (one bridge, one discovery server, N namespaces), all N agents started back to back, then it
//! measures the time until every node has a handshake with every other node (read from each
//! device's `wg(8)` control socket), the time until every node reports every peer `up`
//! (`kubespanctl peers`), the agents' peak RSS, their CPU while idle after convergence, and the
//! WireGuard handshake messages on the wire (captured on the bridge).
//!
//! Needs root, `tcpdump` and the release binaries next to this one:
//! `cargo build --release --bins && target/release/converge-bench --nodes 10,40,100`.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Parser;
use netns_tests::procfs::{clock_ticks_per_second, cpu_ticks, peak_rss_kib};
use netns_tests::{AgentOptions, Lab, require_root};

#[derive(Parser)]
#[command(about = "Time for a mesh started all at once to converge")]
struct Args {
    /// Mesh sizes to run, one lab each.
    #[arg(long, value_delimiter = ',', default_value = "10,40,100")]
    nodes: Vec<usize>,
    /// Runs per size.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Give up on a run after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Seconds of idle CPU measured after convergence.
    #[arg(long, default_value_t = 10)]
    idle: u64,
    /// Skip the packet capture (it costs CPU on a busy machine).
    #[arg(long)]
    no_capture: bool,
}

struct Run {
    nodes: usize,
    handshakes: Option<Duration>,
    up: Option<Duration>,
    /// At the deadline (or convergence): pairs handshaken / node-peer pairs `up`, of N·(N−1).
    pairs_handshaken: usize,
    pairs_up: usize,
    peak_rss_mib_max: f64,
    peak_rss_mib_avg: f64,
    /// Idle CPU, % of one core: per agent (average) and all agents together.
    idle_cpu_per_agent: f64,
    idle_cpu_total: f64,
    /// WireGuard messages seen on the bridge until convergence, by type.
    messages: BTreeMap<&'static str, usize>,
    trying_endpoint: usize,
}

/// The message type of a WireGuard datagram from its UDP length, as tcpdump prints it:
/// initiation 148, response 92, cookie reply 64, keepalive 32, anything longer is data.
fn message_type(line: &str) -> Option<&'static str> {
    let length: usize = line.rsplit("length ").next()?.trim().parse().ok()?;
    Some(match length {
        148 => "initiation",
        92 => "response",
        64 => "cookie",
        32 => "keepalive",
        _ => "data",
    })
}

fn run_once(args: &Args, count: usize) -> anyhow::Result<Run> {
    let mut lab = Lab::new(count)?;
    lab.start_server()?;
    // Let the server bind before the agents' first call, as a running cluster's server would be.
    std::thread::sleep(Duration::from_millis(300));
    // Each packet is seen entering the bridge on the sender's port ("P", for another host) and
    // leaving on the receiver's ("Out"): count the latter.
    let capture = (!args.no_capture)
        .then(|| lab.capture("udp port 51820"))
        .transpose()?;
    let started = Instant::now();
    lab.start_all_agents(&AgentOptions::default())?;
    let expected = count * (count - 1);
    let deadline = started + Duration::from_secs(args.timeout);
    let mut handshakes = None;
    let mut up = None;
    let mut pairs_handshaken = 0;
    // Nodes already seen with every peer up: polled again only at the end (kubespanctl is a
    // process per node and poll).
    let mut node_up = vec![false; count];
    while Instant::now() < deadline && (handshakes.is_none() || up.is_none()) {
        if let Some(i) = lab.nodes.iter_mut().position(|n| !n.is_running()) {
            let node = &lab.nodes[i];
            anyhow::bail!("{}'s agent exited:\n{}", node.name, node.log());
        }
        if handshakes.is_none() {
            pairs_handshaken = lab
                .nodes
                .iter()
                .map(|node| node.handshakes().map_or(0, |(_, done)| done))
                .sum();
            if pairs_handshaken == expected {
                handshakes = Some(started.elapsed());
            }
        }
        if up.is_none() {
            for (n, done) in node_up.iter_mut().enumerate() {
                if !*done {
                    *done = lab.nodes[n].peers().is_ok_and(|peers| {
                        peers.len() == count - 1 && peers.iter().all(|(_, s, _)| s == "up")
                    });
                }
            }
            if node_up.iter().all(|d| *d) {
                up = Some(started.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let messages = match capture {
        Some(capture) => {
            let mut counts = BTreeMap::new();
            for line in capture.finish()?.iter().filter(|l| l.contains(" Out ")) {
                if let Some(kind) = message_type(line) {
                    *counts.entry(kind).or_insert(0) += 1;
                }
            }
            counts
        }
        None => BTreeMap::new(),
    };
    let pairs_up = if up.is_some() {
        expected
    } else {
        lab.nodes
            .iter()
            .map(|node| {
                node.peers().map_or(0, |peers| {
                    peers.iter().filter(|(_, s, _)| s == "up").count()
                })
            })
            .sum::<usize>()
    };

    let pids: Vec<u32> = lab.nodes.iter().filter_map(|n| n.agent_pid()).collect();
    let idle_window = Duration::from_secs(args.idle);
    let before: u64 = pids.iter().filter_map(|p| cpu_ticks(*p)).sum();
    let idle_start = Instant::now();
    std::thread::sleep(idle_window);
    let after: u64 = pids.iter().filter_map(|p| cpu_ticks(*p)).sum();
    let cpu_seconds = after.saturating_sub(before) as f64 / clock_ticks_per_second();
    let idle_cpu_total = cpu_seconds / idle_start.elapsed().as_secs_f64() * 100.0;
    let rss: Vec<u64> = pids.iter().filter_map(|p| peak_rss_kib(*p)).collect();
    let trying_endpoint = lab
        .nodes
        .iter()
        .map(|n| n.log().matches("trying endpoint").count())
        .sum();
    Ok(Run {
        nodes: count,
        handshakes,
        up,
        pairs_handshaken,
        pairs_up,
        peak_rss_mib_max: rss.iter().copied().max().unwrap_or(0) as f64 / 1024.0,
        peak_rss_mib_avg: rss.iter().sum::<u64>() as f64 / rss.len().max(1) as f64 / 1024.0,
        idle_cpu_per_agent: idle_cpu_total / pids.len().max(1) as f64,
        idle_cpu_total,
        messages,
        trying_endpoint,
    })
}

fn seconds(d: Option<Duration>) -> String {
    d.map_or("—".into(), |d| format!("{:.2} s", d.as_secs_f64()))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !require_root() {
        return Ok(());
    }
    println!(
        "| nodes | all handshakes | all `up` | pairs handshaken / up at the end | peak RSS per agent (max / avg) | idle CPU per agent / all agents | initiations / responses / cookie replies | `trying endpoint` log lines |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &count in &args.nodes {
        for _ in 0..args.repeat {
            let run = run_once(&args, count)?;
            let m = |k: &str| run.messages.get(k).copied().unwrap_or(0);
            let expected = run.nodes * (run.nodes - 1);
            println!(
                "| {} | {} | {} | {}/{} · {}/{} | {:.1} / {:.1} MiB | {:.2} % / {:.1} % | {} / {} / {} | {} |",
                run.nodes,
                seconds(run.handshakes),
                seconds(run.up),
                run.pairs_handshaken,
                expected,
                run.pairs_up,
                expected,
                run.peak_rss_mib_max,
                run.peak_rss_mib_avg,
                run.idle_cpu_per_agent,
                run.idle_cpu_total,
                m("initiation"),
                m("response"),
                m("cookie"),
                run.trying_endpoint,
            );
        }
    }
    Ok(())
}
