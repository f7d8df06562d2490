//! A harness for end-to-end tests in Linux network namespaces: a bridge namespace ("switch"),
//! node namespaces cabled to it with veth pairs, a discovery server, kubespan-agents, and
//! helpers that observe the result the way an operator would (`ping`, `wg show`, `tcpdump`,
//! `kubespanctl`, `ip`, `nft`). Everything created is removed when the [`Lab`] is dropped, also
//! when a test fails.
//!
//! The binaries are taken from the cargo target directory next to the test executable, so run
//! `cargo build --workspace --bins` first (`scripts/test.sh` does), or from the directory named by
//! `OPENSPAN_TEST_BIN_DIR` (the kernel lane's QEMU guest has no target directory).
//!
//! The agents' WireGuard backend is `userspace` unless `OPENSPAN_TEST_BACKEND` says otherwise
//! (`userspace`, `kernel` or `auto`): `scripts/kernel-lane.sh` runs the same scenarios against
//! kernel WireGuard inside a QEMU guest.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub mod nat;
mod process;
pub mod procfs;
pub use process::{Daemon, in_netns, ns_output, ns_sh, tail, wait_until};

pub const CLUSTER_SECRET: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// A userspace WireGuard daemon (`openspan-wireguard`, wireguard-go) serving `interface` in
/// `node`'s namespace, killed after `limit_secs` at the latest and stopped when dropped (also
/// when the test fails); returns once its wg(8) control socket exists.
pub fn wireguard_daemon(
    node: &Node,
    program: &std::path::Path,
    args: &[&str],
    interface: &str,
    limit_secs: u64,
) -> anyhow::Result<Daemon> {
    let mut daemon = Daemon::spawn(
        &format!("{} {interface}", program.display()),
        in_netns(&node.netns, limit_secs, program, args),
        node.dir.join(format!("{interface}.log")),
        Duration::from_secs(5),
    )?;
    let socket = PathBuf::from(format!("/var/run/wireguard/{interface}.sock"));
    daemon.leftovers.push(socket.clone());
    wait_until(
        &format!("{interface}'s control socket"),
        Duration::from_secs(15),
        || {
            daemon.check()?;
            Ok(socket.exists())
        },
    )?;
    Ok(daemon)
}

/// What `ping` printed, read from its output.
#[derive(Clone, Debug, PartialEq)]
pub struct PingSummary {
    pub transmitted: u64,
    pub received: u64,
    /// The slowest reply (`rtt min/avg/max/mdev`), when any came.
    pub max_rtt_ms: Option<f64>,
    /// The sequence numbers answered (`icmp_seq=`), in order.
    pub answered: std::collections::BTreeSet<u64>,
}

impl PingSummary {
    /// Reads iputils ping's output ("700 packets transmitted, 695 received, …").
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let summary = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .ok_or_else(|| anyhow::anyhow!("ping printed no statistics:\n{text}"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            summary
                .split(',')
                .find(|part| part.contains(name))
                .and_then(|part| part.split_whitespace().next()?.parse().ok())
                .with_context(|| format!("unreadable ping summary: {summary}"))
        };
        let max_rtt_ms = text
            .lines()
            .find_map(|l| l.strip_prefix("rtt min/avg/max/mdev = "))
            .and_then(|v| v.split('/').nth(2))
            .and_then(|v| v.parse().ok());
        let answered = text
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
        Ok(Self {
            transmitted: field("transmitted")?,
            received: field("received")?,
            max_rtt_ms,
            answered,
        })
    }

    /// Requests without a reply before the last answered one (the request in flight when the
    /// ping was stopped is no loss).
    pub fn lost_before_last(&self) -> u64 {
        let last = self.answered.last().copied().unwrap_or(0);
        (1..=last)
            .filter(|seq| !self.answered.contains(seq))
            .count() as u64
    }
}

/// Runs `f` on a new thread that has entered the network namespace `netns`, and waits for it.
pub fn in_namespace<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let path = format!("/var/run/netns/{netns}");
    let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
    std::thread::spawn(move || {
        // Moves only this new thread into the namespace.
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns({path})"))?;
        Ok(f())
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Fails unless running as root; `OPENSPAN_SKIP_ROOT_TESTS=1` turns that into an explicit skip.
/// Returns false when the test should skip.
pub fn require_root() -> bool {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if uid.as_deref().ok() == Some("0") {
        return true;
    }
    if std::env::var("OPENSPAN_SKIP_ROOT_TESTS").as_deref() == Ok("1") {
        eprintln!("SKIPPED: network namespace tests need root (OPENSPAN_SKIP_ROOT_TESTS=1 is set)");
        return false;
    }
    panic!(
        "network namespace tests need root (CAP_NET_ADMIN); run as root, or set OPENSPAN_SKIP_ROOT_TESTS=1 to skip them explicitly"
    );
}

/// The environment variable that picks the agents' WireGuard backend.
pub const BACKEND_VAR: &str = "OPENSPAN_TEST_BACKEND";

/// The environment variable naming a directory that holds discovery-server, kubespan-agent and
/// kubespanctl, used instead of the cargo target directory.
pub const BIN_DIR_VAR: &str = "OPENSPAN_TEST_BIN_DIR";

/// The backends a lab's agents can be configured with.
pub const BACKENDS: [&str; 3] = ["userspace", "kernel", "auto"];

/// The WireGuard backend the labs' agents use: `OPENSPAN_TEST_BACKEND` (`userspace`, `kernel` or
/// `auto`), `userspace` when it is unset or empty.
pub fn test_backend() -> anyhow::Result<&'static str> {
    match std::env::var(BACKEND_VAR) {
        Ok(v) => parse_backend(Some(&v)),
        Err(std::env::VarError::NotPresent) => parse_backend(None),
        Err(e) => bail!("{BACKEND_VAR}: {e}"),
    }
}

/// The backend a value of `OPENSPAN_TEST_BACKEND` names (unset or empty: `userspace`); any other
/// value is an error that lists the allowed ones.
pub fn parse_backend(value: Option<&str>) -> anyhow::Result<&'static str> {
    let value = value.map(str::trim).unwrap_or_default();
    if value.is_empty() {
        return Ok("userspace");
    }
    BACKENDS.into_iter().find(|b| *b == value).with_context(|| {
        format!(
            "{BACKEND_VAR}={value:?} is not a backend: use {}",
            BACKENDS.join(", ")
        )
    })
}

/// A binary of the workspace: from `OPENSPAN_TEST_BIN_DIR` when it is set, else from the cargo
/// target directory this executable runs from: next to it (a bin such as `mesh-bench` in
/// `target/<profile>/`) or one level up (a test in `target/<profile>/deps/`).
pub fn binary(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(BIN_DIR_VAR).filter(|d| !d.is_empty()) {
        let path = PathBuf::from(dir).join(name);
        assert!(
            path.exists(),
            "{} is missing ({BIN_DIR_VAR} is set)",
            path.display()
        );
        return path;
    }
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("executable directory");
    [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "{name} is missing next to {}: run `cargo build --workspace --bins` first",
                exe.display()
            )
        })
}

/// A binary of the workspace's release build (`target/release/`), for tests whose target is a
/// property of the optimized agent (a debug agent's handshakes and discovery calls are many
/// times slower): taken from where [`binary`] would find it when this executable is itself a
/// release build, else from `../release/` beside the profile directory. With
/// `OPENSPAN_TEST_BIN_DIR` set, the binary in that directory (whatever its build).
pub fn release_binary(name: &str) -> PathBuf {
    if std::env::var_os(BIN_DIR_VAR).is_some_and(|d| !d.is_empty()) {
        return binary(name);
    }
    let found = binary(name);
    let profile_dir = found.parent().expect("binary directory");
    if profile_dir.file_name().is_some_and(|d| d == "release") {
        return found;
    }
    let release = profile_dir
        .parent()
        .expect("target directory")
        .join("release")
        .join(name);
    assert!(
        release.exists(),
        "{} is missing: run `cargo build --release --bins` first (scripts/test.sh does)",
        release.display()
    );
    release
}

pub fn run(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))
}

/// Runs a command and fails with its output unless it succeeds.
pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = run(program, args)?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

static LABS: AtomicU32 = AtomicU32::new(0);
static CAPTURES: AtomicU32 = AtomicU32::new(0);

pub struct Node {
    pub name: String,
    pub netns: String,
    pub address: String,
    pub interface: String,
    pub dir: PathBuf,
    agent: Option<Child>,
}

impl Node {
    pub fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Runs a command inside this node's namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        let mut all = vec!["netns", "exec", &self.netns, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    pub fn ping(&self, address: &str) -> bool {
        self.exec("ping", &["-c", "1", "-W", "1", address])
            .is_ok_and(|o| o.status.success())
    }

    pub fn kubespanctl(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let socket = self.socket();
        let mut all = vec![
            "--socket",
            socket.to_str().unwrap_or_default(),
            "-o",
            "json",
        ];
        all.extend_from_slice(args);
        let out = sh(binary("kubespanctl").to_str().unwrap_or_default(), &all)?;
        serde_json::from_str(&out).context("kubespanctl printed no JSON")
    }

    pub fn mesh_address(&self) -> anyhow::Result<String> {
        Ok(self.kubespanctl(&["identity"])?["mesh_address"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// (label, state, endpoint) of each peer.
    pub fn peers(&self) -> anyhow::Result<Vec<(String, String, String)>> {
        let peers = self.kubespanctl(&["peers"])?;
        Ok(peers
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| {
                        (
                            p["label"].as_str().unwrap_or_default().to_owned(),
                            p["status"]["state"].as_str().unwrap_or_default().to_owned(),
                            p["status"]["endpoint"]
                                .as_str()
                                .unwrap_or_default()
                                .to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The agent's process id (`ip netns exec` execs, so it is the agent's own).
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// How many peers the device lists, and how many of them completed a handshake: read from
    /// the device's `wg(8)` control socket, the one `wg show` reads, without starting a process
    /// (a 100-node poll would otherwise spawn 100 of them per round). A kernel WireGuard link has
    /// no control socket: then from `wg show <interface> dump` in the node's namespace.
    pub fn handshakes(&self) -> anyhow::Result<(usize, usize)> {
        use std::io::{Read, Write};
        let path = format!("/var/run/wireguard/{}.sock", self.interface);
        if !std::path::Path::new(&path).exists() {
            let out = self.exec("wg", &["show", &self.interface, "dump"])?;
            if !out.status.success() {
                bail!(
                    "no control socket {path}, and `wg show {} dump` failed: {}",
                    self.interface,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            // Peer lines: public key, preshared key, endpoint, allowed IPs, latest handshake, ...
            let text = String::from_utf8_lossy(&out.stdout);
            let peers: Vec<Vec<&str>> = text
                .lines()
                .skip(1)
                .map(|l| l.split('\t').collect::<Vec<_>>())
                .filter(|f| f.len() >= 5)
                .collect();
            let done = peers.iter().filter(|f| f[4] != "0").count();
            return Ok((peers.len(), done));
        }
        let mut stream = std::os::unix::net::UnixStream::connect(&path)
            .with_context(|| format!("cannot connect to {path}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"get=1\n\n")?;
        let mut answer = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        // The answer ends with an empty line after `errno=`; the socket may stay open.
        while !(answer.ends_with(b"\n\n") && answer.windows(6).any(|w| w == b"errno=")) {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8_lossy(&answer);
        let peers = text
            .lines()
            .filter(|l| l.starts_with("public_key="))
            .count();
        let done = text
            .lines()
            .filter_map(|l| l.strip_prefix("last_handshake_time_sec="))
            .filter(|sec| *sec != "0")
            .count();
        Ok((peers, done))
    }

    pub fn is_running(&mut self) -> bool {
        self.agent
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM and wait: a graceful stop.
    pub fn stop_agent(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.agent.take() {
            sh("kill", &["-TERM", &child.id().to_string()])?;
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if child.try_wait()?.is_some() {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    bail!(
                        "{} did not stop within 15 s of SIGTERM\n{}",
                        self.name,
                        self.log()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// SIGKILL: a crash.
    pub fn kill_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub struct Lab {
    pub id: String,
    pub switch: String,
    pub nodes: Vec<Node>,
    pub root: PathBuf,
    server: Option<Child>,
    pub server_address: String,
    namespaces: Vec<String>,
    /// Run the release build of the agent and the discovery server ([`Lab::use_release_binaries`]).
    release: bool,
    /// The agents' WireGuard backend ([`test_backend`]).
    pub backend: &'static str,
}

/// Settings for one agent's configuration file.
#[derive(Clone, Debug, Default)]
pub struct AgentOptions {
    /// Extra YAML appended to the generated configuration.
    pub extra_yaml: String,
}

/// The prefix of every namespace, interface and directory this process's labs create.
fn lab_prefix() -> String {
    format!("os{}x", std::process::id() % 10_000)
}

/// Removes what this process's labs created: kills the processes inside their namespaces,
/// deletes the namespaces, control sockets and work directories. For interrupted runs, where
/// the [`Lab`]s' destructors do not get to run.
pub fn sweep_labs() {
    let prefix = lab_prefix();
    let listed =
        run("ip", &["netns", "list"]).map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let namespaces: Vec<String> = listed
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    for netns in &namespaces {
        if let Ok(out) = run("ip", &["netns", "pids", netns]) {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = run("kill", &["-KILL", pid]);
            }
        }
    }
    for netns in &namespaces {
        let _ = run("ip", &["netns", "del", netns]);
    }
    for (dir, name_prefix) in [
        (std::env::temp_dir(), format!("openspan-{prefix}")),
        (PathBuf::from("/var/run/wireguard"), prefix.clone()),
    ] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with(&name_prefix)
                {
                    let path = entry.path();
                    let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
                }
            }
        }
    }
}

/// On SIGINT, SIGTERM or SIGHUP: [`sweep_labs`], then exit with 128 + the signal. Called by
/// every [`Lab`]; harmless to call again. Returns once the handlers are in place.
pub fn clean_up_on_signals() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let (installed, wait) = std::sync::mpsc::sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name("lab-signals".into())
            .spawn(move || {
                use tokio::signal::unix::{SignalKind, signal};
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                let received = runtime.block_on(async {
                    let handlers = (
                        signal(SignalKind::interrupt()),
                        signal(SignalKind::terminate()),
                        signal(SignalKind::hangup()),
                    );
                    let _ = installed.send(());
                    let (Ok(mut interrupt), Ok(mut terminate), Ok(mut hangup)) = handlers else {
                        return None;
                    };
                    tokio::select! {
                        _ = interrupt.recv() => Some(2),
                        _ = terminate.recv() => Some(15),
                        _ = hangup.recv() => Some(1),
                    }
                });
                if let Some(signal) = received {
                    eprintln!(
                        "interrupted (signal {signal}): removing the labs' namespaces and processes"
                    );
                    sweep_labs();
                    std::process::exit(128 + signal);
                }
            });
        if spawned.is_ok() {
            let _ = wait.recv();
        }
    });
}

/// Starts the agent of `node` with the configuration already written to its directory.
fn spawn_agent(node: &Node, agent: &std::path::Path) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(node.dir.join("agent.log"))?;
    Command::new("ip")
        .args(["netns", "exec", &node.netns])
        .arg(agent)
        .arg("--config")
        .arg(node.dir.join("config.yaml"))
        .env(
            "RUST_LOG",
            std::env::var("LAB_RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("start kubespan-agent")
}

/// Makes room in the kernel's neighbour (ARP/NDP) tables for a lab of `count` nodes.
///
/// Every namespace on a host shares one table per family, and past `gc_thresh3` entries (1024 by
/// default) no new neighbour can be created: the kernel logs "neighbour: arp_cache: neighbor table
/// overflow!" and the datagram is dropped. A full mesh of N nodes on one LAN resolves N·(N−1)
/// neighbours plus the discovery server's, so 40 nodes need ~1600 entries, and the nodes past the
/// limit never get a handshake out to some of their peers. On real machines each node has its
/// own table; here the thresholds are raised to fit (never lowered: other labs may be running).
fn make_room_for_neighbours(count: usize) -> anyhow::Result<()> {
    let entries = (count + 1) * (count + 1);
    // Twice the lab's own need below the soft limit, four times below the hard one: headroom
    // for the host and other labs running at the same time. Small labs change nothing.
    let wanted = [(2, 2 * entries), (3, 4 * entries)];
    for family in ["ipv4", "ipv6"] {
        for (level, floor) in wanted {
            let path = format!("/proc/sys/net/{family}/neigh/default/gc_thresh{level}");
            let current: usize = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {path}"))?
                .trim()
                .parse()
                .with_context(|| format!("{path} holds no number"))?;
            if current < floor {
                std::fs::write(&path, floor.to_string())
                    .with_context(|| format!("cannot raise {path} to {floor}"))?;
            }
        }
    }
    Ok(())
}

impl Lab {
    /// `count` node namespaces on one bridge, 10.77.<lab>.<n>/24; the discovery server runs on
    /// the bridge's own address, 10.77.<lab>.254.
    pub fn new(count: usize) -> anyhow::Result<Self> {
        let backend = test_backend()?;
        clean_up_on_signals();
        make_room_for_neighbours(count)?;
        let lab = LABS.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id() % 10_000;
        let id = format!("{}{lab}", lab_prefix());
        let root = std::env::temp_dir().join(format!("openspan-{id}"));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        let switch = format!("{id}-sw");
        let subnet = 100 + (pid + lab) % 100;
        let mut this = Self {
            id: id.clone(),
            switch: switch.clone(),
            nodes: Vec::new(),
            root,
            server: None,
            server_address: format!("10.77.{subnet}.254:3000"),
            namespaces: Vec::new(),
            release: false,
            backend,
        };
        sh("ip", &["netns", "add", &switch])?;
        this.namespaces.push(switch.clone());
        sh(
            "ip",
            &["-n", &switch, "link", "add", "br0", "type", "bridge"],
        )?;
        sh("ip", &["-n", &switch, "link", "set", "br0", "up"])?;
        // Clients inside the switch namespace (tests acting as other hosts) reach the server's
        // address over loopback.
        sh("ip", &["-n", &switch, "link", "set", "lo", "up"])?;
        // The discovery server lives on the switch, outside the mesh, as in a real deployment:
        // hosted on a mesh node, force routing would send its answers to a restarting node into
        // a tunnel that node cannot open yet.
        sh(
            "ip",
            &[
                "-n",
                &switch,
                "addr",
                "add",
                &format!("10.77.{subnet}.254/24"),
                "dev",
                "br0",
            ],
        )?;
        for n in 1..=count {
            let netns = format!("{id}-n{n}");
            sh("ip", &["netns", "add", &netns])?;
            this.namespaces.push(netns.clone());
            let host_side = format!("{id}v{n}");
            sh(
                "ip",
                &[
                    "link", "add", &host_side, "type", "veth", "peer", "name", "eth0", "netns",
                    &netns,
                ],
            )?;
            sh("ip", &["link", "set", &host_side, "netns", &switch])?;
            sh(
                "ip",
                &[
                    "-n", &switch, "link", "set", &host_side, "master", "br0", "up",
                ],
            )?;
            let address = format!("10.77.{subnet}.{n}");
            sh("ip", &["-n", &netns, "link", "set", "lo", "up"])?;
            sh(
                "ip",
                &[
                    "-n",
                    &netns,
                    "link",
                    "set",
                    "eth0",
                    "address",
                    &format!("02:00:00:{:02x}:{lab:02x}:{n:02x}", pid % 256),
                ],
            )?;
            sh(
                "ip",
                &[
                    "-n",
                    &netns,
                    "addr",
                    "add",
                    &format!("{address}/24"),
                    "dev",
                    "eth0",
                ],
            )?;
            sh("ip", &["-n", &netns, "link", "set", "eth0", "up"])?;
            let dir = this.root.join(format!("node-{n}"));
            std::fs::create_dir_all(&dir)?;
            this.nodes.push(Node {
                name: format!("node-{n}"),
                netns,
                address,
                // Userspace interfaces share /var/run/wireguard across namespaces: unique names.
                interface: format!("{id}k{n}"),
                dir,
                agent: None,
            });
        }
        Ok(this)
    }

    /// From now on, start the release builds of `kubespan-agent` and `discovery-server`.
    pub fn use_release_binaries(&mut self) {
        self.release = true;
    }

    fn daemon_binary(&self, name: &str) -> PathBuf {
        if self.release {
            release_binary(name)
        } else {
            binary(name)
        }
    }

    /// Starts the discovery server (again, after [`Lab::stop_server`]: without state, as
    /// snapshots are off).
    pub fn start_server(&mut self) -> anyhow::Result<()> {
        self.start_server_under(&[])
    }

    /// Starts the discovery server with its wall clock `offset_secs` off this host's (through
    /// `faketime`; timers keep the real monotonic clock): what a node with a wrong clock sees.
    pub fn start_server_with_clock_offset(&mut self, offset_secs: i64) -> anyhow::Result<()> {
        if run("faketime", &["--help"]).is_err() {
            bail!(
                "this test needs faketime (apt-get install faketime; scripts/deps.sh installs it)"
            );
        }
        self.start_server_under(&[
            "env",
            "FAKETIME_DONT_FAKE_MONOTONIC=1",
            "faketime",
            "-f",
            &format!("{offset_secs:+}s"),
        ])
    }

    fn start_server_under(&mut self, wrapper: &[&str]) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("server.log"))?;
        let server = self.daemon_binary("discovery-server");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.switch])
            .args(wrapper)
            .arg(server)
            .args([
                &format!("--addr={}", self.server_address),
                "--landing-addr=",
                "--metrics-addr=",
                "--snapshots-enabled=false",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start discovery-server")?;
        self.server = Some(child);
        Ok(())
    }

    /// SIGKILL to the discovery server: an outage (its state is lost).
    pub fn stop_server(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }

    /// Runs `f` on a thread that has entered the switch's namespace, where the discovery server
    /// listens: a client there reaches it as any node would.
    pub fn in_switch<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        in_namespace(&self.switch, f)
    }

    pub fn node(&self, n: usize) -> &Node {
        &self.nodes[n - 1]
    }

    pub fn node_mut(&mut self, n: usize) -> &mut Node {
        &mut self.nodes[n - 1]
    }

    /// Node `n`'s agent configuration: the lab's WireGuard backend (userspace unless
    /// `OPENSPAN_TEST_BACKEND` says otherwise), fast timers, `options` appended.
    pub fn agent_config(&self, n: usize, options: &AgentOptions) -> String {
        let node = &self.nodes[n - 1];
        format!(
            "clusterID: netns-{id}\nclusterSecret: {CLUSTER_SECRET}\nnodeName: {name}\n\
             discovery:\n  endpoints: [\"http://{server}\"]\nstateDir: {dir}/state\napiSocket: {dir}/agent.sock\n\
             interface: {interface}\nbackend: {backend}\npeerKeepaliveSeconds: 2\npeerDownSeconds: 6\n\
             endpointTimeoutSeconds: 3\nnftablesTable: openspan_test\n{extra}",
            id = self.id,
            name = node.name,
            server = self.server_address,
            dir = node.dir.display(),
            interface = node.interface,
            backend = self.backend,
            extra = options.extra_yaml,
        )
    }

    /// Writes node `n`'s configuration and starts its agent.
    pub fn start_agent(&mut self, n: usize, options: &AgentOptions) -> anyhow::Result<()> {
        let config = self.agent_config(n, options);
        let agent = self.daemon_binary("kubespan-agent");
        let node = &mut self.nodes[n - 1];
        std::fs::write(node.dir.join("config.yaml"), config)?;
        node.agent = Some(spawn_agent(node, &agent)?);
        Ok(())
    }

    /// Starts node `n`'s agent with this configuration text instead of the generated one (e.g.
    /// [`Lab::agent_config`] with a line changed).
    pub fn start_agent_with_config(&mut self, n: usize, config: &str) -> anyhow::Result<()> {
        let agent = self.daemon_binary("kubespan-agent");
        let node = &mut self.nodes[n - 1];
        std::fs::write(node.dir.join("config.yaml"), config)?;
        node.agent = Some(spawn_agent(node, &agent)?);
        Ok(())
    }

    /// Starts every node's agent at once, as after a power cut: the configurations are written
    /// first, then the agents are spawned from several threads (one after the other, 40 spawns
    /// of `ip netns exec` take most of a second on a busy 2-core machine).
    pub fn start_all_agents(&mut self, options: &AgentOptions) -> anyhow::Result<()> {
        for n in 1..=self.nodes.len() {
            let config = self.agent_config(n, options);
            std::fs::write(self.nodes[n - 1].dir.join("config.yaml"), config)?;
        }
        let agent = self.daemon_binary("kubespan-agent");
        let agent = &agent;
        let threads = self.nodes.len().clamp(1, 8);
        let chunk = self.nodes.len().div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            let spawners: Vec<_> = self
                .nodes
                .chunks_mut(chunk)
                .map(|nodes| {
                    scope.spawn(move || {
                        nodes.iter_mut().try_for_each(|node| {
                            node.agent = Some(spawn_agent(node, agent)?);
                            anyhow::Ok(())
                        })
                    })
                })
                .collect();
            spawners.into_iter().try_for_each(|s| {
                s.join()
                    .unwrap_or_else(|_| bail!("a spawning thread panicked"))
            })
        })
    }

    /// Whether node `n` lists exactly `expected` peers, all up.
    pub fn all_up(&self, n: usize, expected: usize) -> bool {
        self.node(n).peers().is_ok_and(|peers| {
            peers.len() == expected && peers.iter().all(|(_, state, _)| state == "up")
        })
    }

    /// Polls `check` every 100 ms until it returns true or `timeout` passes; returns the wait.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> bool,
    ) -> anyhow::Result<Duration> {
        wait_until(what, timeout, || Ok(check())).map_err(|timed_out| {
            let logs: Vec<String> = self
                .nodes
                .iter()
                .map(|n| format!("--- {} log (tail)\n{}", n.name, tail(&n.log(), 25)))
                .collect();
            anyhow::anyhow!("{timed_out}\n{}", logs.join("\n"))
        })
    }

    /// Starts `tcpdump` on every port of the switch (a bridge device itself does not see frames
    /// forwarded between its ports); stop it with [`Capture::finish`].
    pub fn capture(&self, filter: &str) -> anyhow::Result<Capture> {
        let file = self.root.join(format!(
            "capture-{}.pcap",
            CAPTURES.fetch_add(1, Ordering::SeqCst)
        ));
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.switch,
                "tcpdump",
                "-Z",
                "root",
                "--immediate-mode",
                // 32 MiB of kernel buffer: a mesh of dozens of nodes starting at once bursts.
                "-B",
                "32768",
                "-i",
                "any",
                "-n",
                "-U",
                "-w",
            ])
            .arg(&file)
            .arg(filter)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(file.with_extension("log"))?)
            .spawn()
            .context("start tcpdump (apt-get install tcpdump)")?;
        let capture = Capture { child, file };
        // Packets sent before tcpdump says it is listening are not captured.
        self.wait_for(
            "tcpdump to start listening",
            Duration::from_secs(10),
            || {
                std::fs::read_to_string(capture.file.with_extension("log"))
                    .is_ok_and(|l| l.contains("listening on"))
            },
        )?;
        Ok(capture)
    }
}

pub struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    /// Stops the capture and returns the captured packets as `tcpdump -r` prints them.
    pub fn finish(mut self) -> anyhow::Result<Vec<String>> {
        std::thread::sleep(Duration::from_millis(300));
        let _ = sh("kill", &["-INT", &self.child.id().to_string()]);
        let _ = self.child.wait();
        let out = sh(
            "tcpdump",
            &["-n", "-r", self.file.to_str().unwrap_or_default()],
        )?;
        Ok(out.lines().map(str::to_owned).collect())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill_agent();
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", node.interface));
        }
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        for netns in &self.namespaces {
            let _ = run("ip", &["netns", "del", netns]);
        }
        if std::env::var("OPENSPAN_KEEP_LAB").is_err() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_output_is_read() {
        let text = "PING fd00::2 56 data bytes\n64 bytes from fd00::2: icmp_seq=1 ttl=64 time=0.1 ms\n\
                    64 bytes from fd00::2: icmp_seq=3 ttl=64 time=0.3 ms\n\n--- fd00::2 ping statistics ---\n\
                    4 packets transmitted, 2 received, 50% packet loss, time 301ms\n\
                    rtt min/avg/max/mdev = 0.100/0.200/0.300/0.100 ms\n";
        let summary = PingSummary::parse(text).unwrap();
        assert_eq!((summary.transmitted, summary.received), (4, 2));
        assert_eq!(summary.max_rtt_ms, Some(0.3));
        assert_eq!(summary.lost_before_last(), 1, "seq 2; seq 4 was in flight");
        assert!(PingSummary::parse("no statistics").is_err());
    }

    #[test]
    fn the_backend_is_userspace_unless_the_variable_names_another() {
        assert_eq!(parse_backend(None).unwrap(), "userspace");
        assert_eq!(parse_backend(Some("")).unwrap(), "userspace");
        assert_eq!(parse_backend(Some("kernel")).unwrap(), "kernel");
        assert_eq!(parse_backend(Some(" auto ")).unwrap(), "auto");
        let error = parse_backend(Some("kernal")).unwrap_err().to_string();
        assert!(
            error.contains("OPENSPAN_TEST_BACKEND=\"kernal\"")
                && error.contains("userspace, kernel, auto"),
            "{error}"
        );
    }
}
