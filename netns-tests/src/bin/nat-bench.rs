//! nat-bench: how fast openspan finds a direct path across NATs, in the NAT lab
//! (`netns_tests::nat`), with the agents' default timers unless `--fast-timers`.
//!
//! Each scenario runs `--runs` times, each run in a fresh lab (its own namespaces, discovery
//! server and agents, both agents started back to back), and prints min / median / max of:
//!
//! - `first handshake`: from the agents' start until both devices completed a handshake with
//!   each other (read from their `wg(8)` control sockets every 20 ms);
//! - `both up`: until both report the other `up` (`kubespanctl peers`, polled every 100 ms);
//! - `cut → down` (`cut-path`): an established public↔easy pair loses every packet at the easy
//!   router (nftables drop, no link change); the time until both report the peer `down`;
//! - `heal → up` (`cut-path`): the drop removed; the time until both report `up` again;
//! - `mapping published` (UPnP scenarios): until the UPnP node publishes an endpoint its router
//!   forwards to it (a miniupnpd mapping). Easy↔UPnP comes up without one too (that router also
//!   masquerades like an easy one), so this says whether port mapping played a part.
//!
//! Scenarios: `public-easy` (no NAT traversal needed: the NATed side starts, the public one
//! roams), `easy-easy`, `easy-upnp`, `hard-upnp` (with `natTraversal`: STUN at the discovery
//! server and at a second STUN server of the lab, port mapping), `easy-easy-bare` (the same as
//! `easy-easy` behind bare Linux routers that do not drop unsolicited WAN input: see
//! [`netns_tests::nat::NatLabOptions::bare_routers`]), `dead-endpoint` (a public node that
//! announces nothing reaches a UPnP node whose first endpoint, its LAN address, is dead and whose
//! second one is forwarded by NAT-PMP), `cut-path`.
//!
//! A scenario that cannot be set up (e.g. the discovery server has no `--stun-addr` yet, or the
//! agent does not know `natTraversal`) is reported as not run with the reason; a measure that
//! times out counts as a failed run (`—`) and the runs that did finish are summarized.
//!
//! Needs root, nft, miniupnpd (miniupnpd-nftables) and the binaries next to this one:
//! `cargo build -p netns-tests -p kubespan-agent -p discovery-server --bins &&
//! target/debug/nat-bench --runs 3` (or `--release` builds for numbers closer to production).

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use netns_tests::nat::{Kind, NatLab, NatLabOptions, ServerOptions, WIREGUARD_PORT};
use netns_tests::{AgentOptions, binary, require_root};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    PublicEasy,
    EasyEasy,
    EasyUpnp,
    HardUpnp,
    EasyEasyBare,
    DeadEndpoint,
    CutPath,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::PublicEasy => "public-easy",
            Scenario::EasyEasy => "easy-easy",
            Scenario::EasyUpnp => "easy-upnp",
            Scenario::HardUpnp => "hard-upnp",
            Scenario::EasyEasyBare => "easy-easy-bare",
            Scenario::DeadEndpoint => "dead-endpoint",
            Scenario::CutPath => "cut-path",
        }
    }

    fn kinds(self) -> [Kind; 2] {
        match self {
            Scenario::PublicEasy | Scenario::CutPath => [Kind::Public, Kind::Easy],
            Scenario::EasyEasy | Scenario::EasyEasyBare => [Kind::Easy, Kind::Easy],
            Scenario::EasyUpnp => [Kind::Easy, Kind::Upnp],
            Scenario::HardUpnp => [Kind::Hard, Kind::Upnp],
            Scenario::DeadEndpoint => [Kind::Public, Kind::Upnp],
        }
    }

    fn traversal(self) -> bool {
        matches!(
            self,
            Scenario::EasyEasy | Scenario::EasyUpnp | Scenario::HardUpnp | Scenario::EasyEasyBare
        )
    }

    fn measures(self) -> &'static [&'static str] {
        match self {
            Scenario::CutPath => &["first handshake", "both up", "cut → down", "heal → up"],
            Scenario::EasyUpnp | Scenario::HardUpnp => {
                &["first handshake", "both up", "mapping published"]
            }
            _ => &["first handshake", "both up"],
        }
    }
}

/// Time to a direct path across NATs (namespace lab), default agent timers.
#[derive(Parser)]
#[command(name = "nat-bench", verbatim_doc_comment)]
struct Args {
    /// Runs per scenario (a fresh lab each).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// Scenarios to run, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "public-easy,easy-easy,easy-upnp,hard-upnp,easy-easy-bare,dead-endpoint,cut-path"
    )]
    scenarios: Vec<Scenario>,
    /// Give up on a measure after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// The lab's fast timers (keepalive 2 s, down after 6 s, endpoint timeout 3 s) instead of
    /// the agents' defaults.
    #[arg(long)]
    fast_timers: bool,
}

/// A condition of the lab polled by [`measure`], and every how many 20 ms ticks.
type Check = (u32, Box<dyn FnMut(&NatLab) -> bool>);

/// Polls the checks side by side (each every its number of 20 ms ticks) until all held or
/// `timeout` passed; each result is the time from `from` at which it first held, None when it
/// never did. Fails when an agent exits (e.g. refusing its configuration): the run is not
/// counted.
fn measure(
    lab: &mut NatLab,
    from: Instant,
    timeout: Duration,
    mut checks: Vec<Check>,
) -> anyhow::Result<Vec<Option<Duration>>> {
    let deadline = from + timeout;
    let mut results = vec![None; checks.len()];
    for tick in 0u32.. {
        for n in 1..=2 {
            lab.check_agent(n)?;
        }
        for ((every, check), result) in checks.iter_mut().zip(&mut results) {
            if result.is_none() && tick % *every == 0 && check(lab) {
                *result = Some(from.elapsed());
            }
        }
        if results.iter().all(Option::is_some) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(results)
}

fn handshaken(lab: &NatLab) -> bool {
    (1..=2).all(|n| lab.node(n).handshakes().is_ok_and(|(_, done)| done >= 1))
}

fn both_in_state(lab: &NatLab, state: &str) -> bool {
    let (a, b) = (&lab.node(1).name, &lab.node(2).name);
    lab.node(1).peer(b).is_some_and(|(s, _)| s == state)
        && lab.node(2).peer(a).is_some_and(|(s, _)| s == state)
}

/// One run of `scenario`: the measures in [`Scenario::measures`]'s order. Err: the scenario
/// could not be set up (not a slow path: nothing was measured).
fn run_once(args: &Args, scenario: Scenario) -> anyhow::Result<Vec<Option<Duration>>> {
    let timeout = Duration::from_secs(args.timeout);
    let mut lab = NatLab::new_with(
        &scenario.kinds(),
        NatLabOptions {
            bare_routers: scenario == Scenario::EasyEasyBare,
        },
    )?;
    lab.fast_timers = args.fast_timers;
    lab.start_server(ServerOptions {
        stun: scenario.traversal(),
    })?;
    let mut yaml = [String::new(), String::new()];
    if scenario.traversal() {
        lab.start_stun_responder()?;
        yaml = [lab.nat_traversal_yaml(), lab.nat_traversal_yaml()];
    }
    if scenario == Scenario::DeadEndpoint {
        // The UPnP slot's WireGuard port forwarded, as a user (or any NAT-PMP client) would;
        // the public node announces nothing, so only its tries at the peer's endpoints count.
        lab.nat_pmp_map(2, WIREGUARD_PORT, WIREGUARD_PORT, 3600)?;
        yaml[0] = "filters:\n  endpoints: [\"192.0.2.0/24\"]\n".into();
    }
    let [first, second] = yaml;
    let started = Instant::now();
    lab.start_agents(&[
        (1, AgentOptions { extra_yaml: first }),
        (2, AgentOptions { extra_yaml: second }),
    ])?;
    let mut checks: Vec<Check> = vec![
        (1, Box::new(handshaken)),
        (5, Box::new(|lab: &NatLab| both_in_state(lab, "up"))),
    ];
    if matches!(scenario, Scenario::EasyUpnp | Scenario::HardUpnp) {
        // Easy↔UPnP also comes up without the mapping (the UPnP router masquerades like an easy
        // one): whether the node published its mapping is measured on its own.
        checks.push((
            5,
            Box::new(|lab: &NatLab| lab.node(2).mapped_endpoint().is_some()),
        ));
    }
    let mut out = measure(&mut lab, started, timeout, checks)?;
    if scenario == Scenario::CutPath {
        if out[1].is_none() {
            out.extend([None, None]);
            return Ok(out);
        }
        // Keepalives flowing in both directions before the cut.
        std::thread::sleep(Duration::from_secs(2));
        lab.cut(2, lab.node(1).public_ip)?;
        let down = measure(
            &mut lab,
            Instant::now(),
            timeout,
            vec![(5, Box::new(|lab: &NatLab| both_in_state(lab, "down")))],
        )?;
        lab.heal(2)?;
        let back = measure(
            &mut lab,
            Instant::now(),
            timeout,
            vec![(5, Box::new(|lab: &NatLab| both_in_state(lab, "up")))],
        )?;
        out.extend(down.into_iter().chain(back));
    }
    if out.iter().any(Option::is_none) {
        eprintln!(
            "{}: a measure timed out; the agents' logs:\n{}",
            scenario.name(),
            lab.logs()
        );
    }
    Ok(out)
}

fn seconds(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// min / median / max of the runs that finished, and how many did.
fn summary(values: &[Option<Duration>]) -> (String, String, String, String) {
    let mut done: Vec<Duration> = values.iter().flatten().copied().collect();
    done.sort();
    let count = format!("{}/{}", done.len(), values.len());
    if done.is_empty() {
        return ("—".into(), "—".into(), "—".into(), count);
    }
    let median = if done.len() % 2 == 1 {
        done[done.len() / 2]
    } else {
        (done[done.len() / 2 - 1] + done[done.len() / 2]) / 2
    };
    (
        seconds(done[0]),
        seconds(median),
        seconds(done[done.len() - 1]),
        count,
    )
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !require_root() {
        return Ok(());
    }
    println!(
        "command: {}",
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    let agent = binary("kubespan-agent");
    let version = std::process::Command::new(&agent)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    println!(
        "agent: {} ({version}); timers: {}; backend: {}",
        agent.display(),
        if args.fast_timers {
            "the lab's fast ones (keepalive 2 s, down 6 s, endpoint timeout 3 s)"
        } else {
            "the agents' defaults"
        },
        netns_tests::test_backend()?,
    );
    println!();
    println!("| scenario | measure | finished runs | min | median | max |");
    println!("|---|---|---|---|---|---|");
    for &scenario in &args.scenarios {
        let measures = scenario.measures();
        let mut values: Vec<Vec<Option<Duration>>> = vec![Vec::new(); measures.len()];
        let mut not_run = None;
        for run in 1..=args.runs {
            match run_once(&args, scenario) {
                Ok(result) => {
                    for (all, value) in values.iter_mut().zip(result) {
                        all.push(value);
                    }
                }
                Err(e) => {
                    // Setting up failed: the next runs would fail the same way.
                    not_run = Some(format!("run {run}: {e:#}"));
                    break;
                }
            }
        }
        if let Some(reason) = not_run {
            // The line that says what went wrong, else the first.
            let first_line = reason
                .lines()
                .find(|l| l.to_lowercase().contains("error"))
                .or_else(|| reason.lines().next())
                .unwrap_or("")
                .trim()
                .to_owned();
            eprintln!("{}: not run: {reason}", scenario.name());
            println!(
                "| {} | not run: {} | | | | |",
                scenario.name(),
                first_line.replace('|', "/")
            );
            continue;
        }
        for (measure, all) in measures.iter().zip(&values) {
            let (min, median, max, count) = summary(all);
            println!(
                "| {} | {measure} | {count} | {min} | {median} | {max} |",
                scenario.name()
            );
        }
    }
    Ok(())
}
