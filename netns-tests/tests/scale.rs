//! A whole cluster started at once (after a power cut): 40 nodes on one LAN with one discovery
//! server must have every pair handshaken and `up` within 3 s (asserted with a margin for a
//! busy CI machine, see [`CONVERGED`]).

use std::time::{Duration, Instant};

use netns_tests::{AgentOptions, Lab, require_root, sh};

const NODES: usize = 40;
/// The requirement: every pair handshaken and `up` within 3 s of the agents' start.
const TARGET: Duration = Duration::from_secs(3);
/// What is asserted: the target plus a margin for CI, which shares 2 cores with whatever else
/// runs. Measured with the release agent on that machine: 2.3–2.6 s mostly, 3.58 s once with the
/// load average at 13 (other sessions building); a result over the target is printed as such.
const CONVERGED: Duration = Duration::from_millis(4500);

/// Node `n`'s (handshaken peers, peers `up`); `up` is read only once every handshake is done.
fn progress(lab: &Lab, n: usize) -> (usize, usize) {
    let node = lab.node(n);
    let handshaken = node.handshakes().map_or(0, |(_, done)| done);
    let up = if handshaken == NODES - 1 {
        node.peers().map_or(0, |peers| {
            peers.iter().filter(|(_, s, _)| s == "up").count()
        })
    } else {
        0
    };
    (handshaken, up)
}

#[test]
fn forty_nodes_started_at_once_converge_within_three_seconds() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = Lab::new(NODES)?;
    // The target is the real agent's: a debug agent spends seconds more on handshakes and
    // discovery calls with 40 of them on two cores.
    lab.use_release_binaries();
    lab.start_server()?;
    // The server is running before the power comes back to the nodes: waited for until it
    // accepts connections, not assumed after a fixed 300 ms (under load the agents would then
    // meet a server still starting and spend their first retry delay inside the measurement).
    let server = lab.server_address.clone();
    lab.wait_for(
        "the discovery server to listen",
        Duration::from_secs(15),
        || {
            let server = server.clone();
            lab.in_switch(move || std::net::TcpStream::connect(server).is_ok())
                .unwrap_or(false)
        },
    )?;
    let started = Instant::now();
    lab.start_all_agents(&AgentOptions::default())?;
    let mut done = [false; NODES];
    let waited = lab.wait_for(
        "every node to have a handshake with, and `up`, all 39 peers",
        // Polled past the target so a miss reports how far off it is.
        TARGET * 10,
        || {
            for (i, done) in done.iter_mut().enumerate() {
                if !*done {
                    *done = progress(&lab, i + 1) == (NODES - 1, NODES - 1);
                }
            }
            done.iter().all(|d| *d)
        },
    );
    let lagging: Vec<String> = (1..=NODES)
        .filter(|n| !done[n - 1])
        .map(|n| {
            let (handshaken, up) = progress(&lab, n);
            format!("node-{n}: {handshaken} handshaken, {up} up")
        })
        .collect();
    let waited = waited.map_err(|e| anyhow::anyhow!("{e}\nlagging: {lagging:#?}"))?;
    let elapsed = started.elapsed();
    eprintln!("{NODES} nodes converged {elapsed:?} after the agents were started");
    if elapsed > TARGET {
        eprintln!("OVER THE {TARGET:?} TARGET (within the CI margin of {CONVERGED:?})");
    }
    assert!(
        elapsed <= CONVERGED,
        "{NODES} nodes took {elapsed:?} to converge (target {TARGET:?}, {CONVERGED:?} with the CI margin; waited {waited:?})"
    );

    // What an operator sees: `wg show` on every node lists 39 peers, each with a handshake.
    for node in &lab.nodes {
        let handshakes = sh("wg", &["show", &node.interface, "latest-handshakes"])?;
        let done = handshakes
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .filter(|t| *t > 0)
            .count();
        assert_eq!(
            done,
            NODES - 1,
            "wg show {} latest-handshakes:\n{handshakes}",
            node.interface
        );
    }
    Ok(())
}
