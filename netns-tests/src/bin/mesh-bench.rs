//! `mesh-bench`: data-plane throughput and latency of an openspan mesh next to a plain veth link,
//! kernel WireGuard (where the kernel has it) and two userspace WireGuard references
//! (boringtun-cli, wireguard-go), all measured in one run between two network namespaces on one
//! bridge. `scripts/kernel-lane.sh --bench` runs it inside a QEMU guest whose kernel has
//! WireGuard.
//!
//! Every setup gets a fresh [`Lab`] (its own bridge and namespaces), every external process runs
//! under `timeout(1)` in its own process group, and everything started is stopped and removed
//! by drop guards, also when a step fails.

#![forbid(unsafe_code)]

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::Parser;
use netns_tests::procfs::{clock_ticks_per_second, cpu_ticks, peak_rss_kib};
use netns_tests::{
    AgentOptions, Daemon, Lab, Node, in_netns, ns_output, ns_sh, run, tail, wait_until,
};

/// Throughput and latency of the openspan data plane (kubespan-agent, userspace device) next
/// to a plain veth link, boringtun-cli and wireguard-go.
///
/// Two network namespaces on one bridge; for each setup a fresh pair of them:
///
///  1. plain veth: no tunnel, the ceiling of this machine;
///  2. openspan mesh: a discovery server and two kubespan-agents (backend userspace), measured to
///     the peer's mesh address (IPv6 ULA) and to its underlay IPv4 address, which the agent
///     force-routes through the tunnel;
///  3. openspan mesh, backend kernel: the same with `backend: kernel` (kernel WireGuard);
///  4. openspan device (bare): the agent's WireGuard device alone (`openspan-wireguard`),
///     configured with wg(8) exactly like the references;
///  5. kernel WireGuard (bare): `ip link add <if> type wireguard`, configured with wg(8) the same
///     way;
///  6. boringtun-cli: Cloudflare's userspace WireGuard, configured with wg(8);
///  7. wireguard-go: the Go userspace WireGuard, configured with wg(8); each `--wireguard-go`
///     binary in turn, labelled with the version it reports (`wireguard-go --version`).
///
/// A setup whose tool is missing is not measured and its row says why (boringtun-cli or
/// wireguard-go not installed; kernel rows when the kernel has no WireGuard, probed with `ip link
/// add … type wireguard` in a scratch namespace); `--skip-*` leave a setup out on purpose, said
/// in its row too. Only a setup that was tried and failed makes the run fail.
/// Kernel WireGuard has no tunnel process: its rows show no tunnel CPU or RSS (its work is done
/// in softirq and kworker context, not attributed to any process).
///
/// Throughput is one iperf3 TCP stream (`iperf3 -c <peer> -t <duration> -J`, the server runs
/// with `-1` in the receiving namespace); latency is the average of `ping -q -c <count> -i
/// <interval>` (min/avg/max are printed; the table shows the average). Both tunnel ends, iperf3 client and server share this machine's CPUs.
///
/// Needs root, iperf3, ping, wg (wireguard-tools), ss, timeout, and wireguard-go unless skipped:
/// `apt-get install -y --no-install-recommends iperf3 wireguard-tools wireguard-go iputils-ping`.
/// Debian bookworm's wireguard-go (0.0.20220316) predates wireguard-go's TUN and UDP offloads;
/// `scripts/fetch-wireguard-go.sh` unpacks a current one into target/wireguard-go-current, and
/// `--wireguard-go /usr/bin/wireguard-go --wireguard-go target/wireguard-go-current/bin/wireguard-go`
/// measures both in one run.
/// Build the binaries first: `cargo build --release -p netns-tests -p kubespan-agent -p
/// openspan-wireguard -p discovery-server --bins`; they are taken from this executable's directory. A missing
/// boringtun-cli is installed with `cargo install boringtun-cli --locked --root
/// <target>/tools`; if that fails, its row says why.
#[derive(Debug, Parser)]
#[command(name = "mesh-bench", verbatim_doc_comment)]
struct Args {
    /// Seconds per iperf3 run.
    #[arg(long, short = 't', default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    duration: u64,

    /// Echo requests per ping measurement.
    #[arg(long, short = 'c', default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    ping_count: u32,

    /// Milliseconds between echo requests.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(2..=10_000))]
    ping_interval_ms: u32,

    /// iperf3 runs per setup; the median is reported.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    repeat: u32,

    /// Do not measure kernel WireGuard (the rows "openspan mesh, backend kernel" and "kernel
    /// WireGuard (bare)").
    #[arg(long)]
    skip_kernel: bool,

    /// Do not measure boringtun-cli.
    #[arg(long)]
    skip_boringtun_cli: bool,

    /// Do not measure wireguard-go.
    #[arg(long, conflicts_with = "wireguard_go")]
    skip_wireguard_go: bool,

    /// A wireguard-go binary to measure; repeat it to measure several side by side, each row
    /// labelled with the version the binary reports [default: wireguard-go from PATH].
    #[arg(long, value_name = "PATH")]
    wireguard_go: Vec<PathBuf>,

    /// The boringtun-cli binary [default: <target>/tools/bin/boringtun-cli, installed when
    /// missing].
    #[arg(long, value_name = "PATH")]
    boringtun_cli: Option<PathBuf>,

    /// Worker threads for boringtun-cli (`--threads`; boringtun-cli's own default is 4).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    boringtun_cli_threads: u32,
}

const IPERF_PORT: &str = "5201";
/// Row labels.
const MESH: &str = "openspan mesh";
const MESH_KERNEL: &str = "openspan mesh, backend kernel";
const DEVICE: &str = "openspan device (bare)";
const KERNEL: &str = "kernel WireGuard (bare)";
const TUNNEL_MTU: &str = "1420";
const WG_PORT: &str = "51820";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if run("id", &["-u"])
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .ok()
        .as_deref()
        != Some("0")
    {
        bail!("mesh-bench creates network namespaces: run it as root");
    }
    for tool in ["ip", "iperf3", "ping", "wg", "ss", "timeout"] {
        if which(tool).is_none() {
            bail!(
                "{tool} is missing: apt-get install -y --no-install-recommends iperf3 wireguard-tools iputils-ping iproute2 coreutils"
            );
        }
    }
    let bins = Binaries::find()?;

    eprintln!(
        "mesh-bench: {} s per iperf3 run (x{}), {} pings at {} ms; binaries from {}",
        args.duration,
        args.repeat,
        args.ping_count,
        args.ping_interval_ms,
        bins.dir.display()
    );
    let mut rows = Vec::new();
    let mut failed = false;
    let mut record =
        |rows: &mut Vec<Row>, setup: &str, result: anyhow::Result<Vec<Row>>| match result {
            Ok(mut r) => rows.append(&mut r),
            Err(e) => {
                eprintln!("mesh-bench: {setup} failed: {e:#}");
                failed = true;
                rows.push(Row::missing(setup, &format!("failed: {}", first_line(&e))));
            }
        };

    eprintln!("== plain veth");
    record(&mut rows, "plain veth", bench_veth(&args));
    eprintln!("== {MESH}");
    record(&mut rows, MESH, bench_mesh(&args, &bins, "userspace"));
    // Why the kernel rows cannot be measured, if they cannot.
    let kernel_missing = if args.skip_kernel {
        Some("skipped (--skip-kernel)".to_owned())
    } else {
        kernel_wireguard()
            .err()
            .map(|reason| format!("skipped: this kernel has no WireGuard ({reason})"))
    };
    if let Some(reason) = &kernel_missing {
        eprintln!("== {MESH_KERNEL}: {reason}");
        rows.push(Row::missing(MESH_KERNEL, reason));
    } else {
        eprintln!("== {MESH_KERNEL}");
        record(&mut rows, MESH_KERNEL, bench_mesh(&args, &bins, "kernel"));
    }
    eprintln!("== {DEVICE}");
    record(
        &mut rows,
        DEVICE,
        bench_reference(
            &args,
            &Reference::OpenspanDevice {
                path: bins.wireguard.clone(),
            },
            DEVICE,
        ),
    );
    if let Some(reason) = &kernel_missing {
        eprintln!("== {KERNEL}: {reason}");
        rows.push(Row::missing(KERNEL, reason));
    } else {
        eprintln!("== {KERNEL}");
        record(
            &mut rows,
            KERNEL,
            bench_reference(&args, &Reference::Kernel, KERNEL),
        );
    }

    let bt_label = format!("boringtun-cli ({} threads)", args.boringtun_cli_threads);
    if args.skip_boringtun_cli {
        eprintln!("== {bt_label}: skipped (--skip-boringtun-cli)");
        rows.push(Row::missing(&bt_label, "skipped (--skip-boringtun-cli)"));
    } else {
        eprintln!("== boringtun-cli");
        match boringtun_cli(&args, &bins) {
            Ok(path) => record(
                &mut rows,
                &bt_label,
                bench_reference(
                    &args,
                    &Reference::BoringtunCli {
                        path,
                        threads: args.boringtun_cli_threads,
                    },
                    &bt_label,
                ),
            ),
            Err(e) => {
                eprintln!("   not available: {e:#}");
                rows.push(Row::missing(
                    &bt_label,
                    &format!("not available: {}", first_line(&e)),
                ));
            }
        }
    }

    let mut versions = Vec::new();
    // A --wireguard-go that cannot tell its version fails the run, as a failed setup does.
    let mut unusable = false;
    if args.skip_wireguard_go {
        eprintln!("== wireguard-go: skipped (--skip-wireguard-go)");
        rows.push(Row::missing(
            "wireguard-go",
            "skipped (--skip-wireguard-go)",
        ));
    } else {
        let paths = if args.wireguard_go.is_empty() {
            which("wireguard-go").into_iter().collect()
        } else {
            args.wireguard_go.clone()
        };
        if paths.is_empty() {
            eprintln!("== wireguard-go: not available: wireguard-go is not installed");
            rows.push(Row::missing(
                "wireguard-go",
                "not available: wireguard-go is not installed (apt-get install wireguard-go, or --wireguard-go PATH)",
            ));
        }
        let mut labels: Vec<String> = Vec::new();
        for path in paths {
            let version = match wireguard_go_version(&path) {
                Ok(version) => version,
                Err(e) => {
                    eprintln!("mesh-bench: {}: {e:#}", path.display());
                    unusable = true;
                    rows.push(Row::missing(
                        &format!("wireguard-go ({})", path.display()),
                        &format!("not available: {}", first_line(&e)),
                    ));
                    continue;
                }
            };
            let mut label = format!("wireguard-go {version}");
            if labels.contains(&label) {
                label = format!("{label} #{}", labels.len() + 1);
            }
            labels.push(label.clone());
            versions.push(format!("{label}: {}", path.display()));
            eprintln!("== {label} ({})", path.display());
            record(
                &mut rows,
                &label,
                bench_reference(&args, &Reference::WireguardGo { path }, &label),
            );
        }
    }

    print_report(&args, &rows, &versions);
    if failed || unusable {
        bail!("some setups failed; see above");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Binaries

struct Binaries {
    dir: PathBuf,
    agent: PathBuf,
    server: PathBuf,
    ctl: PathBuf,
    wireguard: PathBuf,
}

impl Binaries {
    /// The cargo profile directory holding the workspace's binaries. A bin such as this one
    /// lives in `target/<profile>/` itself (a test in `target/<profile>/deps/`, which is what
    /// [`netns_tests::binary`] expects), so look in this executable's directory first.
    fn find() -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find this executable's path")?;
        let here = exe.parent().context("executable without a directory")?;
        let dir = [Some(here), here.parent()]
            .into_iter()
            .flatten()
            .find(|d| d.join("kubespan-agent").exists())
            .with_context(|| {
                format!(
                    "kubespan-agent is not next to {}: run `cargo build --release -p netns-tests -p kubespan-agent -p openspan-wireguard -p discovery-server --bins` first",
                    exe.display()
                )
            })?
            .to_path_buf();
        let this = Self {
            agent: dir.join("kubespan-agent"),
            server: dir.join("discovery-server"),
            ctl: dir.join("kubespanctl"),
            wireguard: dir.join("openspan-wireguard"),
            dir,
        };
        for path in [&this.agent, &this.server, &this.ctl, &this.wireguard] {
            if !path.exists() {
                bail!(
                    "{} is missing: run `cargo build --release -p netns-tests -p kubespan-agent -p openspan-wireguard -p discovery-server --bins` first",
                    path.display()
                );
            }
        }
        Ok(this)
    }

    /// `<target>/tools`, where boringtun-cli is installed.
    fn tools(&self) -> PathBuf {
        self.dir.parent().unwrap_or(&self.dir).join("tools")
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// Whether this kernel can create a WireGuard link: `ip link add … type wireguard` in a scratch
/// namespace (deleted again). The error is the reason it cannot (no module, as on a host whose
/// kernel was built without it).
fn kernel_wireguard() -> Result<(), String> {
    let netns = format!("osprobe{}", std::process::id());
    let _ = run("ip", &["netns", "del", &netns]);
    let added = run("ip", &["netns", "add", &netns])
        .map_err(|e| format!("cannot create a scratch namespace: {e:#}"))?;
    if !added.status.success() {
        return Err(format!(
            "cannot create a scratch namespace: {}",
            String::from_utf8_lossy(&added.stderr).trim()
        ));
    }
    let probe = run(
        "ip",
        &["-n", &netns, "link", "add", "wgprobe", "type", "wireguard"],
    );
    let _ = run("ip", &["netns", "del", &netns]);
    let probe = probe.map_err(|e| format!("{e:#}"))?;
    if probe.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip link add … type wireguard`: {}",
            String::from_utf8_lossy(&probe.stderr).trim()
        ))
    }
}

/// The version a wireguard-go binary reports: `wireguard-go v0.0.20250522` on the first line of
/// `wireguard-go --version`, without the `v`.
fn wireguard_go_version(path: &Path) -> anyhow::Result<String> {
    if !path.is_file() {
        bail!(
            "{} does not exist (scripts/fetch-wireguard-go.sh fetches a current one)",
            path.display()
        );
    }
    let output = host_sh(path, &["--version"], None)?;
    parse_wireguard_go_version(&output).ok_or_else(|| {
        anyhow!(
            "`{} --version` did not name a version: {}",
            path.display(),
            output.lines().next().unwrap_or_default()
        )
    })
}

fn parse_wireguard_go_version(output: &str) -> Option<String> {
    let first = output.lines().next()?.trim();
    let version = first.strip_prefix("wireguard-go")?.trim();
    let version = version.strip_prefix('v').unwrap_or(version);
    (!version.is_empty() && !version.contains(char::is_whitespace)).then(|| version.to_owned())
}

/// The boringtun-cli binary: `--boringtun-cli`, or `<target>/tools/bin/boringtun-cli`, installed
/// from crates.io when missing.
fn boringtun_cli(args: &Args, bins: &Binaries) -> anyhow::Result<PathBuf> {
    if let Some(path) = &args.boringtun_cli {
        if !path.is_file() {
            bail!("{} does not exist", path.display());
        }
        return Ok(path.clone());
    }
    let root = bins.tools();
    let path = root.join("bin").join("boringtun-cli");
    if path.is_file() {
        return Ok(path);
    }
    let Some(cargo) = which("cargo") else {
        bail!("{} is missing and cargo is not on PATH", path.display());
    };
    std::fs::create_dir_all(&root)?;
    let log = root.join("boringtun-cli-install.log");
    eprintln!(
        "installing boringtun-cli: cargo install boringtun-cli --locked --root {} (log: {})",
        root.display(),
        log.display()
    );
    let file = File::create(&log)?;
    let status = Command::new("timeout")
        .args(["-k", "10", "1800s"])
        .arg(cargo)
        .args(["install", "boringtun-cli", "--locked", "--root"])
        .arg(&root)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .context("cannot run cargo install")?;
    if !status.success() || !path.is_file() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let reason = text
            .lines()
            .rev()
            .find(|l| l.starts_with("error"))
            .unwrap_or("see the log")
            .to_owned();
        bail!(
            "cargo install boringtun-cli failed ({status}): {reason} ({})",
            log.display()
        );
    }
    Ok(path)
}

// ---------------------------------------------------------------------------------------------
// Processes: everything runs under timeout(1), in its own process group.

/// A bounded command in the root namespace (key generation, `wg show`, kubespanctl).
fn host_sh(
    program: impl AsRef<OsStr>,
    args: &[&str],
    input: Option<&str>,
) -> anyhow::Result<String> {
    let name = program.as_ref().to_string_lossy().into_owned();
    let mut child = Command::new("timeout")
        .args(["-k", "5", "30s"])
        .arg(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {name}"))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        use std::io::Write;
        stdin.write_all(text.as_bytes())?;
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "`{name} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Daemons stopped in reverse start order when dropped. Declare it after the [`Lab`] whose
/// namespaces they run in, so they stop before the namespaces go.
#[derive(Default)]
struct Daemons(Vec<Daemon>);

impl Daemons {
    fn push(&mut self, daemon: Daemon) -> &mut Daemon {
        self.0.push(daemon);
        self.0.last_mut().expect("just pushed")
    }

    fn stop_all(&mut self) {
        while let Some(mut daemon) = self.0.pop() {
            daemon.stop();
        }
    }

    fn check(&mut self) -> anyhow::Result<()> {
        self.0.iter_mut().try_for_each(Daemon::check)
    }

    /// The largest peak resident set among the daemons proper, KiB.
    fn peak_rss_kib(&self) -> Option<u64> {
        self.0
            .iter()
            .filter_map(Daemon::worker_pid)
            .filter_map(peak_rss_kib)
            .max()
    }

    /// CPU ticks used so far by the daemon proper of each entry.
    fn cpu_ticks(&self) -> u64 {
        self.0
            .iter()
            .filter_map(Daemon::worker_pid)
            .filter_map(cpu_ticks)
            .sum()
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// The first line of an error; when it ends with a colon, the next line too.
fn first_line(error: &anyhow::Error) -> String {
    let text = format!("{error:#}");
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default();
    match lines.next() {
        Some(next) if first.ends_with(':') => format!("{first} {next}"),
        _ => first.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements

#[derive(Clone, Debug)]
struct Throughput {
    mbps: f64,
    retransmits: Option<u64>,
    /// CPU used by the tunnel processes of both ends during the iperf3 runs, in percent of one
    /// core.
    tunnel_cpu: Option<f64>,
    /// Peak resident memory of the larger tunnel process (VmHWM), MiB.
    tunnel_rss_mib: Option<f64>,
}

#[derive(Clone, Debug)]
struct Ping {
    min_ms: f64,
    avg_ms: f64,
    loss_percent: f64,
}

struct Row {
    setup: String,
    path: String,
    throughput: Option<Throughput>,
    ping: Option<Ping>,
    note: String,
}

impl Row {
    fn missing(setup: &str, note: &str) -> Self {
        Self {
            setup: setup.to_owned(),
            path: String::new(),
            throughput: None,
            ping: None,
            note: note.to_owned(),
        }
    }
}

/// One iperf3 TCP stream from `client` to `target`, served by `iperf3 -s -1` in `server`'s
/// namespace; `--repeat` runs, the median reported. `tunnel` are the tunnel processes whose CPU
/// time is measured meanwhile.
fn iperf(
    args: &Args,
    server: &Node,
    client: &Node,
    target: &str,
    tunnel: Option<&Daemons>,
) -> anyhow::Result<Throughput> {
    let ticks_before = tunnel.map(Daemons::cpu_ticks);
    let started = Instant::now();
    let mut runs = Vec::new();
    for run in 0..args.repeat {
        runs.push(iperf_once(args, server, client, target, run)?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let tunnel_cpu = tunnel.zip(ticks_before).map(|(t, before)| {
        (t.cpu_ticks().saturating_sub(before)) as f64 / clock_ticks_per_second() / elapsed * 100.0
    });
    let tunnel_rss_mib = tunnel
        .and_then(Daemons::peak_rss_kib)
        .map(|kib| kib as f64 / 1024.0);
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (bps, retransmits) = runs[runs.len() / 2];
    Ok(Throughput {
        mbps: bps / 1e6,
        retransmits,
        tunnel_cpu,
        tunnel_rss_mib,
    })
}

fn iperf_once(
    args: &Args,
    server: &Node,
    client: &Node,
    target: &str,
    run: u32,
) -> anyhow::Result<(f64, Option<u64>)> {
    let limit = args.duration + 30;
    let mut iperf_server = Daemon::spawn(
        "iperf3 server",
        in_netns(
            &server.netns,
            limit,
            "iperf3",
            &["-s", "-1", "-p", IPERF_PORT],
        ),
        server.dir.join(format!("iperf3-server-{run}.log")),
        Duration::from_secs(3),
    )?;
    wait_until(
        "the iperf3 server to listen",
        Duration::from_secs(10),
        || {
            iperf_server.check()?;
            let listening = ns_sh(
                &server.netns,
                "ss",
                &["-Hltn", &format!("sport = :{IPERF_PORT}")],
            )?;
            Ok(!listening.trim().is_empty())
        },
    )?;
    let duration = args.duration.to_string();
    let output = ns_output(
        &client.netns,
        args.duration + 20,
        "iperf3",
        &["-c", target, "-p", IPERF_PORT, "-t", &duration, "-J"],
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let json: serde_json::Value = serde_json::from_str(&stdout).map_err(|_| {
        anyhow!(
            "iperf3 -c {target} printed no JSON ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )
    })?;
    if let Some(error) = json["error"].as_str() {
        bail!("iperf3 -c {target}: {error}");
    }
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 -c {target}: no end.sum_received.bits_per_second"))?;
    let retransmits = json["end"]["sum_sent"]["retransmits"].as_u64();
    // `-1`: the server exits after the one test; give it a moment, then the guard stops it.
    let deadline = Instant::now() + Duration::from_secs(3);
    while iperf_server.running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("   iperf3 -> {target}: {:.1} Mbit/s", bps / 1e6);
    Ok((bps, retransmits))
}

fn ping(args: &Args, client: &Node, target: &str) -> anyhow::Result<Ping> {
    let interval = format!("{:.3}", f64::from(args.ping_interval_ms) / 1000.0);
    let count = args.ping_count.to_string();
    let limit = u64::from(args.ping_count) * u64::from(args.ping_interval_ms) / 1000 + 15;
    let output = ns_output(
        &client.netns,
        limit,
        "ping",
        &["-q", "-n", "-c", &count, "-i", &interval, "-W", "1", target],
    )?;
    let text = String::from_utf8_lossy(&output.stdout);
    let loss_percent = text
        .split(',')
        .find(|part| part.contains("packet loss"))
        .and_then(|part| part.trim().split('%').next()?.parse().ok())
        .with_context(|| format!("ping {target} printed no loss figure: {text}"))?;
    // rtt min/avg/max/mdev = 0.031/0.045/0.090/0.011 ms
    let rtt = |field: usize| -> Option<f64> {
        let line = text.lines().find(|l| l.contains("min/avg/max"))?;
        line.split('=')
            .nth(1)?
            .trim()
            .split('/')
            .nth(field)?
            .parse()
            .ok()
    };
    let (min_ms, avg_ms) = rtt(0)
        .zip(rtt(1))
        .with_context(|| format!("ping {target}: no reply ({loss_percent}% loss)"))?;
    let summary = text
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .unwrap_or_default();
    eprintln!("   ping {target}: {summary}, {loss_percent}% loss");
    Ok(Ping {
        min_ms,
        avg_ms,
        loss_percent,
    })
}

/// Pings once a second-ish until `target` answers (a tunnel's first handshake).
fn wait_reachable(client: &Node, target: &str, timeout: Duration) -> anyhow::Result<Duration> {
    wait_until(&format!("{target} to answer ping"), timeout, || {
        Ok(
            ns_output(&client.netns, 5, "ping", &["-c", "1", "-W", "1", target])?
                .status
                .success(),
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Setups

fn bench_veth(args: &Args) -> anyhow::Result<Vec<Row>> {
    let lab = Lab::new(2)?;
    let (sender, receiver) = (lab.node(1), lab.node(2));
    wait_reachable(sender, &receiver.address, Duration::from_secs(10))?;
    let throughput = iperf(args, receiver, sender, &receiver.address, None)?;
    let ping = ping(args, sender, &receiver.address)?;
    Ok(vec![Row {
        setup: "plain veth".into(),
        path: format!("{} (no tunnel)", receiver.address),
        throughput: Some(throughput),
        ping: Some(ping),
        note: String::new(),
    }])
}

/// Bytes sent by `node`'s WireGuard interface to all peers, per `wg show <if> transfer`.
fn wg_tx_bytes(node: &Node, kernel: bool) -> anyhow::Result<u64> {
    let interface = &node.interface;
    // A kernel link lives in the node's namespace; a userspace device's control socket is
    // reachable from the root namespace.
    let out = if kernel {
        ns_sh(&node.netns, "wg", &["show", interface, "transfer"])?
    } else {
        host_sh("wg", &["show", interface, "transfer"], None)?
    };
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
        .sum())
}

/// A generous bound for the daemons of one setup.
fn daemon_limit(args: &Args) -> u64 {
    let pings = u64::from(args.ping_count) * u64::from(args.ping_interval_ms) / 1000;
    300 + 3 * u64::from(args.repeat) * (args.duration + 40) + 3 * pings
}

/// The mesh of two agents with WireGuard backend `backend` (`userspace` or `kernel`).
fn bench_mesh(args: &Args, bins: &Binaries, backend: &'static str) -> anyhow::Result<Vec<Row>> {
    let mut lab = Lab::new(2)?;
    lab.backend = backend;
    let kernel = backend == "kernel";
    let label = if kernel { MESH_KERNEL } else { MESH };
    // Declared after the lab: the agents stop (and clean up) before the namespaces go, and
    // before the discovery server.
    let mut server = Daemons::default();
    let mut agents = Daemons::default();
    let limit = daemon_limit(args);
    server.push(Daemon::spawn(
        "discovery-server",
        in_netns(
            &lab.switch,
            limit,
            &bins.server,
            &[
                &format!("--addr={}", lab.server_address),
                "--landing-addr=",
                "--metrics-addr=",
                "--snapshots-enabled=false",
            ],
        ),
        lab.root.join("server.log"),
        Duration::from_secs(10),
    )?);
    for (index, node) in lab.nodes.iter().enumerate() {
        let config = node.dir.join("config.yaml");
        std::fs::write(
            &config,
            lab.agent_config(index + 1, &AgentOptions::default()),
        )?;
        let mut command = in_netns(
            &node.netns,
            limit,
            &bins.agent,
            &["--config", config.to_str().unwrap_or_default()],
        );
        command.env("RUST_LOG", "info");
        agents.push(Daemon::spawn(
            &format!("kubespan-agent {}", node.name),
            command,
            node.dir.join("agent.log"),
            Duration::from_secs(15),
        )?);
    }
    let waited = wait_until(
        "both agents to see their peer up",
        Duration::from_secs(30),
        || {
            server.check()?;
            agents.check()?;
            Ok(lab.nodes.iter().all(|node| {
                node.kubespanctl(&["peers"]).is_ok_and(|peers| {
                    peers.as_array().is_some_and(|p| {
                        p.len() == 1 && p[0]["status"]["state"].as_str() == Some("up")
                    })
                })
            }))
        },
    )
    .map_err(|e| {
        let logs: Vec<String> = lab
            .nodes
            .iter()
            .map(|n| format!("--- {} log (tail)\n{}", n.name, tail(&n.log(), 20)))
            .collect();
        anyhow!("{e:#}\n{}", logs.join("\n"))
    })?;
    eprintln!("   mesh up {waited:.1?} after the agents started");

    let (sender, receiver) = (lab.node(1), lab.node(2));
    let mesh_address = receiver.kubespanctl(&["identity"])?["mesh_address"]
        .as_str()
        .context("kubespanctl identity: no mesh_address")?
        .to_owned();
    wait_reachable(sender, &mesh_address, Duration::from_secs(10))?;
    // With kernel WireGuard the agents only configure: their CPU is not the tunnel's.
    let tunnel = (!kernel).then_some(&agents);
    let to_mesh = iperf(args, receiver, sender, &mesh_address, tunnel)?;
    let ping_mesh = ping(args, sender, &mesh_address)?;

    // The underlay address is force-routed into the tunnel: check that the bytes went there.
    let tx_before = wg_tx_bytes(sender, kernel)?;
    let to_underlay = iperf(args, receiver, sender, &receiver.address, tunnel)?;
    let tx = wg_tx_bytes(sender, kernel)?.saturating_sub(tx_before);
    let expected =
        to_underlay.mbps * 1e6 / 8.0 * args.duration as f64 * f64::from(args.repeat) * 0.5;
    let underlay_note = if (tx as f64) < expected {
        format!("WARNING: only {tx} bytes went through {}", sender.interface)
    } else {
        String::new()
    };
    let ping_underlay = ping(args, sender, &receiver.address)?;
    agents.stop_all();
    server.stop_all();

    Ok(vec![
        Row {
            setup: label.into(),
            path: format!("{mesh_address} (mesh, IPv6)"),
            throughput: Some(to_mesh),
            ping: Some(ping_mesh),
            note: String::new(),
        },
        Row {
            setup: label.into(),
            path: format!("{} (underlay, forced)", receiver.address),
            throughput: Some(to_underlay),
            ping: Some(ping_underlay),
            note: underlay_note,
        },
    ])
}

enum Reference {
    /// openspan's own device on its own (`openspan-wireguard`): the mesh minus the agent's
    /// policy routing and nftables.
    OpenspanDevice {
        path: PathBuf,
    },
    BoringtunCli {
        path: PathBuf,
        threads: u32,
    },
    WireguardGo {
        path: PathBuf,
    },
    /// Kernel WireGuard (`ip link add … type wireguard`): no process.
    Kernel,
}

impl Reference {
    /// A letter for host-unique interface names: `/var/run/wireguard/` is shared by all
    /// namespaces.
    fn letter(&self) -> char {
        match self {
            Self::OpenspanDevice { .. } => 'o',
            Self::BoringtunCli { .. } => 'b',
            Self::WireguardGo { .. } => 'g',
            Self::Kernel => 'k',
        }
    }

    /// The process that runs the device, `None` for kernel WireGuard.
    fn command(&self, node: &Node, interface: &str, limit: u64) -> Option<Command> {
        Some(match self {
            Self::Kernel => return None,
            Self::OpenspanDevice { path } => in_netns(&node.netns, limit, path, &[interface]),
            Self::BoringtunCli { path, threads } => {
                let log = node.dir.join("boringtun.log");
                in_netns(
                    &node.netns,
                    limit,
                    path,
                    &[
                        "-f",
                        "--disable-drop-privileges",
                        "--threads",
                        &threads.to_string(),
                        "--log",
                        log.to_str().unwrap_or_default(),
                        interface,
                    ],
                )
            }
            Self::WireguardGo { path } => {
                let mut command = in_netns(&node.netns, limit, path, &["-f", interface]);
                command
                    .env("WG_PROCESS_FOREGROUND", "1")
                    .env("LOG_LEVEL", "error");
                command
            }
        })
    }
}

/// A WireGuard device between the two nodes (a userspace one's process, or a kernel link),
/// configured with wg(8).
fn bench_reference(args: &Args, reference: &Reference, label: &str) -> anyhow::Result<Vec<Row>> {
    let lab = Lab::new(2)?;
    let mut tunnels = Daemons::default();
    let limit = daemon_limit(args);
    // 10.77.<s>.<n> underlay, 10.78.<s>.<n> tunnel.
    let tunnel_address = |node: &Node| node.address.replacen("10.77.", "10.78.", 1);
    let mut interfaces = Vec::new();
    for (n, node) in lab.nodes.iter().enumerate() {
        let interface = format!("{}{}{}", lab.id, reference.letter(), n + 1);
        match reference.command(node, &interface, limit) {
            Some(command) => {
                let daemon = tunnels.push(Daemon::spawn(
                    &format!("{label} {}", node.name),
                    command,
                    node.dir.join(format!("{interface}.out")),
                    Duration::from_secs(5),
                )?);
                daemon.leftovers.push(PathBuf::from(format!(
                    "/var/run/wireguard/{interface}.sock"
                )));
            }
            // Deleted with the namespace.
            None => {
                ns_sh(
                    &node.netns,
                    "ip",
                    &["link", "add", &interface, "type", "wireguard"],
                )?;
            }
        }
        interfaces.push(interface);
    }
    let userspace = !matches!(reference, Reference::Kernel);
    if userspace {
        wait_until(
            "the WireGuard control sockets",
            Duration::from_secs(10),
            || {
                tunnels.check()?;
                Ok(interfaces
                    .iter()
                    .all(|i| Path::new(&format!("/var/run/wireguard/{i}.sock")).exists()))
            },
        )?;
    }

    let psk = lab.root.join("psk");
    std::fs::write(&psk, host_sh("wg", &["genpsk"], None)? + "\n")?;
    let mut public = Vec::new();
    for node in &lab.nodes {
        let private = host_sh("wg", &["genkey"], None)?;
        public.push(host_sh("wg", &["pubkey"], Some(&private))?);
        std::fs::write(node.dir.join("private.key"), private + "\n")?;
    }
    for (n, node) in lab.nodes.iter().enumerate() {
        let other = 1 - n;
        let peer = &lab.nodes[other];
        let private = node.dir.join("private.key");
        let allowed = format!("{}/32", tunnel_address(peer));
        let endpoint = format!("{}:{WG_PORT}", peer.address);
        ns_sh(
            &node.netns,
            "wg",
            &[
                "set",
                &interfaces[n],
                "private-key",
                private.to_str().unwrap_or_default(),
                "listen-port",
                WG_PORT,
                "peer",
                &public[other],
                "preshared-key",
                psk.to_str().unwrap_or_default(),
                "allowed-ips",
                &allowed,
                "endpoint",
                &endpoint,
                "persistent-keepalive",
                "25",
            ],
        )?;
        let address = format!("{}/24", tunnel_address(node));
        ns_sh(
            &node.netns,
            "ip",
            &["addr", "add", &address, "dev", &interfaces[n]],
        )?;
        ns_sh(
            &node.netns,
            "ip",
            &["link", "set", &interfaces[n], "mtu", TUNNEL_MTU, "up"],
        )?;
    }

    let (sender, receiver) = (lab.node(1), lab.node(2));
    let target = tunnel_address(receiver);
    let waited = wait_reachable(sender, &target, Duration::from_secs(15))?;
    eprintln!("   tunnel up {waited:.1?} after configuration");
    let throughput = iperf(
        args,
        receiver,
        sender,
        &target,
        userspace.then_some(&tunnels),
    )?;
    let ping = ping(args, sender, &target)?;
    tunnels.check()?;
    tunnels.stop_all();
    Ok(vec![Row {
        setup: label.to_owned(),
        path: format!("{target} (tunnel, IPv4)"),
        throughput: Some(throughput),
        ping: Some(ping),
        note: String::new(),
    }])
}

// ---------------------------------------------------------------------------------------------
// Report

fn print_report(args: &Args, rows: &[Row], versions: &[String]) {
    let header = [
        "setup",
        "target",
        "Mbit/s",
        "retr",
        "tunnel CPU",
        "tunnel RSS",
        "ping min/avg ms",
        "loss",
    ];
    let mut table: Vec<[String; 8]> = vec![header.map(str::to_owned)];
    for row in rows {
        let t = row.throughput.as_ref();
        let p = row.ping.as_ref();
        table.push([
            row.setup.clone(),
            row.path.clone(),
            t.map_or("-".into(), |t| format!("{:.0}", t.mbps)),
            t.and_then(|t| t.retransmits)
                .map_or("-".into(), |r| r.to_string()),
            t.and_then(|t| t.tunnel_cpu)
                .map_or("-".into(), |c| format!("{c:.0}%")),
            t.and_then(|t| t.tunnel_rss_mib)
                .map_or("-".into(), |m| format!("{m:.1} MiB")),
            p.map_or("-".into(), |p| format!("{:.3}/{:.3}", p.min_ms, p.avg_ms)),
            p.map_or("-".into(), |p| format!("{}%", p.loss_percent)),
        ]);
    }
    let mut widths = [0usize; 8];
    for line in &table {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    println!();
    println!(
        "mesh-bench: one TCP stream for {} s{}, {} pings every {} ms; {} CPUs, kernel {}",
        args.duration,
        if args.repeat > 1 {
            format!(" (median of {})", args.repeat)
        } else {
            String::new()
        },
        args.ping_count,
        args.ping_interval_ms,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        host_sh("uname", &["-r"], None).unwrap_or_default(),
    );
    println!();
    for (i, line) in table.iter().enumerate() {
        let mut text = String::new();
        for (c, (cell, w)) in line.iter().zip(widths).enumerate() {
            if c < 2 {
                text.push_str(&format!("{cell:<w$}  "));
            } else {
                text.push_str(&format!("{cell:>w$}  "));
            }
        }
        if i > 0 && !rows[i - 1].note.is_empty() {
            text.push_str(&rows[i - 1].note);
        }
        println!("{}", text.trim_end());
        if i == 0 {
            println!(
                "{}",
                "-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1))
            );
        }
    }
    println!();
    println!("tunnel CPU: the tunnel processes of both ends during the iperf3 runs, % of one core");
    println!("tunnel RSS: peak resident memory (VmHWM) of the larger of the two tunnel processes");
    for version in versions {
        println!("{version}");
    }

    let find = |setup: &str, path: &str| {
        rows.iter()
            .find(|r| r.setup == setup && r.path.contains(path))
    };
    let veth = find("plain veth", "");
    // Kernel WireGuard, where measured: what the userspace device is compared with first.
    let kernel: Vec<&Row> = [
        find(KERNEL, ""),
        find(MESH_KERNEL, "(mesh"),
        find(MESH_KERNEL, "(underlay"),
    ]
    .into_iter()
    .flatten()
    .filter(|r| r.throughput.is_some())
    .collect();
    let references: Vec<&Row> = rows
        .iter()
        .filter(|r| r.setup.starts_with("boringtun-cli") || r.setup.starts_with("wireguard-go"))
        .filter(|r| !r.note.starts_with("skipped"))
        .collect();
    println!();
    println!("ratios (throughput ×, ping avg ×):");
    for mesh in [
        find(MESH, "(mesh"),
        find(MESH, "(underlay"),
        find(DEVICE, ""),
    ]
    .into_iter()
    .flatten()
    {
        let which = if mesh.path.contains("(mesh") {
            "mesh address"
        } else if mesh.setup == DEVICE {
            "bare device"
        } else {
            "underlay IPv4"
        };
        for other in veth
            .into_iter()
            .chain(kernel.iter().copied())
            .chain(references.iter().copied())
        {
            let tput = mesh
                .throughput
                .as_ref()
                .zip(other.throughput.as_ref())
                .map_or("-".into(), |(m, o)| format!("{:.2}", m.mbps / o.mbps));
            let rtt = mesh
                .ping
                .as_ref()
                .zip(other.ping.as_ref())
                .map_or("-".into(), |(m, o)| format!("{:.2}", m.avg_ms / o.avg_ms));
            let other_name = if other.setup == MESH_KERNEL {
                format!(
                    "{MESH_KERNEL} ({})",
                    if other.path.contains("(mesh") {
                        "mesh"
                    } else {
                        "underlay"
                    }
                )
            } else {
                other.setup.clone()
            };
            println!(
                "  openspan ({which:<13}) / {other_name:<40}  throughput {tput:>5}   ping {rtt:>5}"
            );
        }
    }
    println!();
    let mesh_mbps = find(MESH, "(mesh")
        .and_then(|r| r.throughput.as_ref())
        .map(|t| t.mbps);
    let measured: Vec<(&str, f64)> = references
        .iter()
        .filter_map(|r| Some((r.setup.as_str(), r.throughput.as_ref()?.mbps)))
        .collect();
    match mesh_mbps {
        None => println!("target (mesh ≥ every userspace reference): not measured"),
        Some(mesh) => {
            let behind: Vec<String> = measured
                .iter()
                .filter(|(_, mbps)| mesh < *mbps)
                .map(|(name, mbps)| format!("{name} {mbps:.0} Mbit/s"))
                .collect();
            let verdict = if measured.len() < 2 || measured.len() < references.len() {
                "not fully measured"
            } else if behind.is_empty() {
                "met"
            } else {
                "NOT met"
            };
            println!(
                "target (mesh throughput ≥ every userspace reference): {verdict} (mesh {mesh:.0} Mbit/s{}{})",
                if behind.is_empty() { "" } else { "; behind " },
                behind.join(", ")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_wireguard_go_version;

    #[test]
    fn wireguard_go_versions() {
        let bookworm =
            "wireguard-go v0.0.20220316\n\nUserspace WireGuard daemon for linux-amd64.\n";
        assert_eq!(
            parse_wireguard_go_version(bookworm).as_deref(),
            Some("0.0.20220316")
        );
        assert_eq!(
            parse_wireguard_go_version("wireguard-go v0.0.20250522\n").as_deref(),
            Some("0.0.20250522")
        );
        assert_eq!(parse_wireguard_go_version("Usage: wireguard-go [-f]"), None);
        assert_eq!(parse_wireguard_go_version("wireguard-go\n"), None);
        assert_eq!(parse_wireguard_go_version(""), None);
    }
}
