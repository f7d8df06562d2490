//! A NAT lab: an "internet" namespace routing between sites, where the discovery server runs (and
//! answers STUN when asked to), and nodes of four kinds, each on its own link to it:
//!
//! - [`Kind::Public`]: the node itself is on the internet;
//! - [`Kind::Easy`]: behind its own router namespace doing `masquerade` on its WAN side. Linux
//!   keeps a flow's source port when it is free, so every destination sees the node at the same
//!   `wan:port` (endpoint-independent mapping), but conntrack only lets in what answers a flow the
//!   node started: from the exact `ip:port` it sent to (address- and port-dependent filtering);
//! - [`Kind::Hard`]: a router doing `masquerade fully-random` (iptables' `--random-fully`): a new
//!   random source port per flow, so each destination sees another port (endpoint-dependent,
//!   "symmetric" NAT);
//! - [`Kind::Upnp`]: an easy router that also runs `miniupnpd` (NAT-PMP, PCP and UPnP IGD for its
//!   LAN): a mapped port takes packets from any source.
//!
//! Every router drops unsolicited packets to itself on its WAN side, as home routers do. That
//! matters: without it, a peer's packet that arrives before the node has sent anything leaves a
//! conntrack entry (to the router itself) whose tuple the node's own flow then collides with,
//! and masquerade moves that flow to another port: the published mapping stops being the one in
//! use. With the drop the entry is never confirmed.
//!
//! Addresses (`S` is per lab, as in [`crate::Lab`]):
//!
//! - the internet is `11.S.0.0/16`, namespace `<id>-inet`, which forwards between its links
//!   and black-holes private and shared address space (RFC 1918, RFC 6598): a packet to another
//!   site's LAN address vanishes there without an answer, as on the real internet. The discovery
//!   server (gRPC `:3000`, STUN `:3478`) is `11.S.0.1`, the lab's second STUN server
//!   ([`NatLab::start_stun_responder`]) `11.S.0.2`. Public-looking on purpose: miniupnpd refuses to
//!   map ports on a WAN address in any reserved range (private, shared, documentation and
//!   benchmarking nets alike), and a real internet has public addresses. They never leave the
//!   lab's namespaces (the internet namespace has no uplink);
//! - slot `n` has its own link `11.S.n.0/24`: the internet's side is `11.S.n.254`, the slot's
//!   `11.S.n.1` (its public address): the node's own when it is public, else its router's WAN
//!   (`wan0`, namespace `<id>-r<n>`). Sites share no subnet, so no public endpoint looks like
//!   "the same LAN" to another site;
//! - behind every router the same LAN, `192.168.1.0/24`: the router's `lan0` is `192.168.1.1` and
//!   the node (namespace `<id>-n<n>`) is `192.168.1.2` with a default route via the router. Every
//!   NATed node therefore announces `192.168.1.2:51820` first: an endpoint that, seen from another
//!   LAN, is the peer's own address (real homes share subnets too). Node underlay addresses are
//!   not unique here: tests talk to the mesh addresses.
//!
//! Everything is removed when the [`NatLab`] is dropped, and by [`crate::sweep_labs`] after a
//! signal (the names share the prefix of [`crate::Lab`]'s).

use std::net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket};
use std::ops::Deref;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::{
    AgentOptions, Daemon, LABS, Node, binary, clean_up_on_signals, in_namespace, in_netns,
    lab_prefix, release_binary, run, sh, spawn_agent, tail, test_backend, wait_until,
};

/// The LAN behind every router.
pub const LAN_ROUTER: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
pub const LAN_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);
/// The discovery server's STUN port when started with [`ServerOptions::stun`].
pub const STUN_PORT: u16 = 3478;
/// NAT-PMP and PCP (RFC 6886, RFC 6887) on the router's LAN address.
pub const NAT_PMP_PORT: u16 = 5351;
/// The agents' WireGuard port (the default).
pub const WIREGUARD_PORT: u16 = 51820;

/// How a node reaches the internet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Public,
    Easy,
    Hard,
    Upnp,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Public => "public",
            Kind::Easy => "easy",
            Kind::Hard => "hard",
            Kind::Upnp => "upnp",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A NATed node's router.
pub struct Router {
    pub netns: String,
    /// Its WAN address on the internet.
    pub wan: Ipv4Addr,
    /// miniupnpd, on a [`Kind::Upnp`] router.
    miniupnpd: Option<Daemon>,
    miniupnpd_log: Option<PathBuf>,
}

impl Router {
    /// miniupnpd's log ([`Kind::Upnp`] routers).
    pub fn miniupnpd_log(&self) -> String {
        self.miniupnpd_log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// The router's UDP connection tracking entries (`/proc/net/nf_conntrack`): its mappings.
    pub fn udp_conntrack(&self) -> String {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.netns,
                "cat",
                "/proc/net/nf_conntrack",
            ],
        )
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains(" udp "))
                .map(|l| l.split_whitespace().skip(3).collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
    }

    /// The router's nftables ruleset (miniupnpd's mappings appear in its chains).
    pub fn ruleset(&self) -> anyhow::Result<String> {
        sh(
            "ip",
            &["netns", "exec", &self.netns, "nft", "list", "ruleset"],
        )
    }
}

/// A node of the NAT lab: a [`Node`] (its namespace, agent and helpers) with its kind and router.
pub struct NatNode {
    pub node: Node,
    pub kind: Kind,
    /// The address the internet sees: the node's own, or its router's WAN address.
    pub public_ip: Ipv4Addr,
    pub router: Option<Router>,
}

impl Deref for NatNode {
    type Target = Node;

    fn deref(&self) -> &Node {
        &self.node
    }
}

impl NatNode {
    /// The namespace that faces the internet: the router's, or the node's own when public.
    pub fn edge_netns(&self) -> &str {
        self.router.as_ref().map_or(&self.node.netns, |r| &r.netns)
    }

    /// The endpoints this node publishes (`kubespanctl identity`).
    pub fn published_endpoints(&self) -> anyhow::Result<Vec<String>> {
        let identity = self.kubespanctl(&["identity"])?;
        Ok(identity["endpoints"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// (state, endpoint) of the peer labelled `label`.
    pub fn peer(&self, label: &str) -> Option<(String, String)> {
        self.peers()
            .ok()?
            .into_iter()
            .find(|(l, _, _)| l == label)
            .map(|(_, state, endpoint)| (state, endpoint))
    }

    /// The endpoint this node publishes on its router's WAN address whose port the router
    /// forwards to the node's WireGuard port (a miniupnpd DNAT rule): its port mapping, if it
    /// has one and publishes it.
    pub fn mapped_endpoint(&self) -> Option<String> {
        let router = self.router.as_ref()?;
        let wan = format!("{}:", self.public_ip);
        let rules = router.ruleset().ok()?;
        let forwards = |port: &str| {
            rules.lines().any(|l| {
                l.contains(&format!("th dport {port} "))
                    && l.contains(&format!("dnat ip to {LAN_NODE}:{WIREGUARD_PORT}"))
            })
        };
        self.published_endpoints()
            .ok()?
            .into_iter()
            .find(|e| e.strip_prefix(&wan).is_some_and(forwards))
    }

    /// Whether the peer labelled `label` is `up`.
    /// The kind of path this node reports for its peer `label` (`kubespanctl peers`, e.g.
    /// `reflexive` or `relayed via 11.1.0.1:7443`); empty when unknown.
    pub fn peer_path(&self, label: &str) -> String {
        self.node
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

    pub fn peer_up(&self, label: &str) -> bool {
        self.peer(label).is_some_and(|(state, _)| state == "up")
    }
}

/// How a [`NatLab`] is built.
#[derive(Clone, Copy, Debug, Default)]
pub struct NatLabOptions {
    /// Routers without the WAN input drop: bare Linux boxes doing masquerade and nothing else
    /// (a cloud NAT instance, a host masquerading for its containers). A packet to the router
    /// itself that arrives before the node's own flow then leaves a conntrack entry, and the
    /// node's flow to that peer is moved to another port when it starts.
    pub bare_routers: bool,
}

/// How the discovery server is started.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerOptions {
    /// Also answer STUN binding requests on UDP 3478 (`--stun-addr`).
    pub stun: bool,
}

/// A second STUN server on the internet, in the test process: a thread answering Binding
/// requests with `openspan_stun`. Two STUN servers that see a node at different ports reveal
/// an endpoint-dependent (hard) NAT; the discovery server is one, this is the other.
struct StunResponder {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StunResponder {
    fn start(socket: UdpSocket) -> anyhow::Result<Self> {
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("lab-stun".into())
            .spawn(move || {
                let mut packet = [0u8; 1500];
                let mut answer = [0u8; 64];
                while !stopped.load(Ordering::Relaxed) {
                    let Ok((len, from)) = socket.recv_from(&mut packet) else {
                        continue;
                    };
                    if let Ok(n) =
                        openspan_stun::answer_binding_request(&packet[..len], from, &mut answer)
                    {
                        let _ = socket.send_to(&answer[..n], from);
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for StunResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub struct NatLab {
    pub id: String,
    /// The internet's namespace (a router between the slots); the discovery server runs there.
    pub internet: String,
    pub root: PathBuf,
    /// `11.S`: the internet's /16 (each slot has its own /24 in it).
    pub net: String,
    pub server_ip: Ipv4Addr,
    /// The discovery server's gRPC address.
    pub server_address: String,
    /// The discovery server's STUN address (answered when started with [`ServerOptions::stun`]).
    pub stun_address: String,
    /// Where [`NatLab::start_stun_responder`] answers STUN: another host on the internet.
    pub second_stun_address: String,
    pub nodes: Vec<NatNode>,
    /// The lab's fast agent timers (keepalive 2 s, down after 6 s, endpoint timeout 3 s), as in
    /// [`crate::Lab`]; off: the agents' defaults (benchmarks measure those).
    pub fast_timers: bool,
    /// The agents' WireGuard backend ([`test_backend`]).
    pub backend: &'static str,
    /// The STUN servers [`NatLab::nat_traversal_yaml`] names: the discovery server's, once
    /// started with [`ServerOptions::stun`], and the lab's own ([`NatLab::start_stun_responder`]).
    pub stun_servers: Vec<String>,
    /// Where the discovery server serves `/metrics` (in the internet's namespace); none: off.
    pub server_metrics_addr: Option<String>,
    server: Option<Child>,
    stun_responders: Vec<StunResponder>,
    namespaces: Vec<String>,
    release: bool,
}

/// Fails saying which package to install unless `program` is on the PATH.
pub fn require_tool(program: &str, package: &str) -> anyhow::Result<()> {
    let found =
        run("sh", &["-c", &format!("command -v {program}")]).is_ok_and(|o| o.status.success());
    if !found {
        bail!(
            "the NAT lab needs `{program}`, which is not installed (apt-get install --no-install-recommends {package})"
        );
    }
    Ok(())
}

/// The routers' nftables ruleset. Chain names are miniupnpd's (its `upnp_*` settings name them):
/// it adds a DNAT rule to `prerouting_miniupnpd` and an accept rule to `miniupnpd` per mapping;
/// on easy and hard routers those chains stay empty. The forward policy is a home router's:
/// answers and the LAN's own traffic pass, nothing unsolicited gets in unless mapped.
fn router_ruleset(kind: Kind, bare: bool) -> String {
    let masquerade = match kind {
        // A fresh random source port for every flow: each destination sees another port.
        Kind::Hard => "masquerade fully-random",
        // The source port is kept when no other flow uses it: one mapping for all destinations.
        _ => "masquerade",
    };
    let input = if bare {
        ""
    } else {
        "  chain input {\n\
         \x20   type filter hook input priority filter; policy accept;\n\
         \x20   iifname \"wan0\" ct state established,related accept\n\
         \x20   iifname \"wan0\" drop\n\
         \x20 }\n"
    };
    format!(
        "table inet natlab {{\n\
         \x20 chain miniupnpd {{\n  }}\n\
         \x20 chain prerouting_miniupnpd {{\n  }}\n\
         \x20 chain postrouting_miniupnpd {{\n  }}\n\
         \x20 chain forward {{\n\
         \x20   type filter hook forward priority filter; policy drop;\n\
         \x20   ct state established,related accept\n\
         \x20   iifname \"lan0\" accept\n\
         \x20   jump miniupnpd\n\
         \x20 }}\n\
         {input}\
         \x20 chain prerouting {{\n\
         \x20   type nat hook prerouting priority dstnat; policy accept;\n\
         \x20   jump prerouting_miniupnpd\n\
         \x20 }}\n\
         \x20 chain postrouting {{\n\
         \x20   type nat hook postrouting priority srcnat; policy accept;\n\
         \x20   jump postrouting_miniupnpd\n\
         \x20   oifname \"wan0\" {masquerade}\n\
         \x20 }}\n\
         }}\n"
    )
}

/// miniupnpd's configuration for a router of the lab: NAT-PMP/PCP and UPnP IGD on the LAN side,
/// mappings only for the asking host's own address (`secure_mode`), ports 1024–65535.
fn miniupnpd_config(dir: &std::path::Path, uuid_tail: u32) -> String {
    format!(
        "ext_ifname=wan0\n\
         listening_ip=lan0\n\
         http_port=0\n\
         enable_natpmp=yes\n\
         enable_upnp=yes\n\
         secure_mode=yes\n\
         system_uptime=yes\n\
         lease_file={dir}/miniupnpd.leases\n\
         upnp_table_name=natlab\n\
         upnp_nat_table_name=natlab\n\
         upnp_forward_chain=miniupnpd\n\
         upnp_nat_chain=prerouting_miniupnpd\n\
         upnp_nat_postrouting_chain=postrouting_miniupnpd\n\
         uuid=4e41544c-6162-4000-8000-{uuid_tail:012x}\n\
         allow 1024-65535 192.168.1.0/24 1024-65535\n\
         deny 0-65535 0.0.0.0/0 0-65535\n",
        dir = dir.display()
    )
}

impl NatLab {
    /// One slot per entry of `kinds`, numbered from 1 (see the module's address plan).
    pub fn new(kinds: &[Kind]) -> anyhow::Result<Self> {
        Self::new_with(kinds, NatLabOptions::default())
    }

    /// [`NatLab::new`] with `options`.
    pub fn new_with(kinds: &[Kind], options: NatLabOptions) -> anyhow::Result<Self> {
        require_tool("nft", "nftables")?;
        if kinds.contains(&Kind::Upnp) {
            require_tool("miniupnpd", "miniupnpd-nftables")?;
        }
        let backend = test_backend()?;
        clean_up_on_signals();
        let lab = LABS.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id() % 10_000;
        let id = format!("{}{lab}", lab_prefix());
        let root = std::env::temp_dir().join(format!("openspan-{id}"));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        let net = format!("11.{}", 100 + (pid + lab) % 100);
        let server_ip: Ipv4Addr = format!("{net}.0.1").parse()?;
        let second_stun_ip: Ipv4Addr = format!("{net}.0.2").parse()?;
        let internet = format!("{id}-inet");
        let mut this = Self {
            id: id.clone(),
            internet: internet.clone(),
            root,
            net: net.clone(),
            server_ip,
            server_address: format!("{server_ip}:3000"),
            stun_address: format!("{server_ip}:{STUN_PORT}"),
            second_stun_address: format!("{second_stun_ip}:{STUN_PORT}"),
            nodes: Vec::new(),
            fast_timers: true,
            backend,
            stun_servers: Vec::new(),
            server_metrics_addr: None,
            server: None,
            stun_responders: Vec::new(),
            namespaces: Vec::new(),
            release: false,
        };
        sh("ip", &["netns", "add", &internet])?;
        this.namespaces.push(internet.clone());
        let inet = |args: &[&str]| {
            let mut all = vec!["-n", internet.as_str()];
            all.extend_from_slice(args);
            sh("ip", &all)
        };
        inet(&["link", "set", "lo", "up"])?;
        // The servers' hosts: the discovery server (and its STUN) on .0.1, the lab's second STUN
        // server on .0.2; on loopback (no dummy interfaces needed: some kernels lack the module).
        inet(&["addr", "add", &format!("{server_ip}/32"), "dev", "lo"])?;
        inet(&["addr", "add", &format!("{second_stun_ip}/32"), "dev", "lo"])?;
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &internet,
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.ip_forward=1",
            ],
        )?;
        // The internet routes no private or shared address space: what is sent there (another
        // site's LAN endpoint) vanishes without an answer.
        for private in [
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "100.64.0.0/10",
        ] {
            inet(&["route", "add", "blackhole", private])?;
        }
        for (i, kind) in kinds.iter().copied().enumerate() {
            let n = i + 1;
            let public_ip: Ipv4Addr = format!("{net}.{n}.1").parse()?;
            let gateway_ip = format!("{net}.{n}.254");
            let dir = this.root.join(format!("{kind}-{n}"));
            std::fs::create_dir_all(&dir)?;
            let node_ns = format!("{id}-n{n}");
            sh("ip", &["netns", "add", &node_ns])?;
            this.namespaces.push(node_ns.clone());
            // The namespace cabled to the internet: the node itself, or its router.
            let edge_ns = if kind == Kind::Public {
                node_ns.clone()
            } else {
                let router_ns = format!("{id}-r{n}");
                sh("ip", &["netns", "add", &router_ns])?;
                this.namespaces.push(router_ns.clone());
                router_ns
            };
            let edge_if = if kind == Kind::Public { "eth0" } else { "wan0" };
            let uplink = format!("{id}v{n}");
            sh(
                "ip",
                &[
                    "link", "add", &uplink, "type", "veth", "peer", "name", edge_if, "netns",
                    &edge_ns,
                ],
            )?;
            sh("ip", &["link", "set", &uplink, "netns", &internet])?;
            inet(&["addr", "add", &format!("{gateway_ip}/24"), "dev", &uplink])?;
            inet(&["link", "set", &uplink, "up"])?;
            let edge = |args: &[&str]| {
                let mut all = vec!["-n", edge_ns.as_str()];
                all.extend_from_slice(args);
                sh("ip", &all)
            };
            // The mesh address derives from the MAC: distinct per node (a veth's is random, but
            // fixed ones make runs comparable), set while the link is still down.
            let mac = format!("02:00:4e:{:02x}:{:02x}:{n:02x}", pid % 256, lab % 256);
            if kind == Kind::Public {
                edge(&["link", "set", "eth0", "address", &mac])?;
            }
            edge(&["link", "set", "lo", "up"])?;
            edge(&["addr", "add", &format!("{public_ip}/24"), "dev", edge_if])?;
            edge(&["link", "set", edge_if, "up"])?;
            edge(&["route", "add", "default", "via", &gateway_ip])?;
            let node_ip = if kind == Kind::Public {
                public_ip
            } else {
                LAN_NODE
            };
            let mut router = None;
            if kind != Kind::Public {
                sh(
                    "ip",
                    &[
                        "-n", &edge_ns, "link", "add", "lan0", "type", "veth", "peer", "name",
                        "eth0", "netns", &node_ns,
                    ],
                )?;
                edge(&["addr", "add", &format!("{LAN_ROUTER}/24"), "dev", "lan0"])?;
                edge(&["link", "set", "lan0", "up"])?;
                sh(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &edge_ns,
                        "sysctl",
                        "-q",
                        "-w",
                        "net.ipv4.ip_forward=1",
                    ],
                )?;
                let rules = dir.join("router.nft");
                std::fs::write(&rules, router_ruleset(kind, options.bare_routers))?;
                sh(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &edge_ns,
                        "nft",
                        "-f",
                        rules.to_str().unwrap_or_default(),
                    ],
                )?;
                router = Some(Router {
                    netns: edge_ns.clone(),
                    wan: public_ip,
                    miniupnpd: None,
                    miniupnpd_log: None,
                });
            }
            let node = |args: &[&str]| {
                let mut all = vec!["-n", node_ns.as_str()];
                all.extend_from_slice(args);
                sh("ip", &all)
            };
            node(&["link", "set", "lo", "up"])?;
            if kind != Kind::Public {
                node(&["link", "set", "eth0", "address", &mac])?;
                node(&["addr", "add", &format!("{node_ip}/24"), "dev", "eth0"])?;
                node(&["link", "set", "eth0", "up"])?;
            }
            if kind != Kind::Public {
                node(&["route", "add", "default", "via", &LAN_ROUTER.to_string()])?;
            }
            this.nodes.push(NatNode {
                node: Node {
                    name: format!("{kind}-{n}"),
                    netns: node_ns,
                    address: node_ip.to_string(),
                    // Userspace interfaces share /var/run/wireguard across namespaces.
                    interface: format!("{id}k{n}"),
                    dir,
                    agent: None,
                },
                kind,
                public_ip,
                router,
            });
            if kind == Kind::Upnp {
                this.start_miniupnpd(n, (pid << 16) | (lab << 8) | n as u32)?;
            }
        }
        Ok(this)
    }

    fn start_miniupnpd(&mut self, n: usize, uuid_tail: u32) -> anyhow::Result<()> {
        let slot = &mut self.nodes[n - 1];
        let dir = slot.node.dir.clone();
        let router = slot.router.as_mut().context("a UPnP node has a router")?;
        let config = dir.join("miniupnpd.conf");
        std::fs::write(&config, miniupnpd_config(&dir, uuid_tail))?;
        let log = dir.join("miniupnpd.log");
        let pid_file = dir.join("miniupnpd.pid");
        // -d: in the foreground, logging to stderr; its own pid file, as several labs' daemons
        // may run at once (the default /var/run/miniupnpd.pid would stop the second).
        let mut daemon = Daemon::spawn(
            &format!("miniupnpd of slot {n}"),
            in_netns(
                &router.netns,
                24 * 3600,
                "miniupnpd",
                &[
                    "-f",
                    config.to_str().unwrap_or_default(),
                    "-d",
                    "-P",
                    pid_file.to_str().unwrap_or_default(),
                ],
            ),
            log.clone(),
            Duration::from_secs(5),
        )?;
        wait_until(
            "miniupnpd to listen for NAT-PMP/PCP",
            Duration::from_secs(10),
            || {
                daemon.check()?;
                Ok(std::fs::read_to_string(&log)
                    .is_ok_and(|l| l.contains("Listening for NAT-PMP/PCP traffic")))
            },
        )
        .with_context(|| tail(&std::fs::read_to_string(&log).unwrap_or_default(), 20))?;
        router.miniupnpd = Some(daemon);
        router.miniupnpd_log = Some(log);
        Ok(())
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

    /// Runs `f` on a thread that has entered the internet's namespace (sockets made
    /// there stay in it): a host on the internet, next to the discovery server.
    pub fn in_internet<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        in_namespace(&self.internet, f)
    }

    pub fn node(&self, n: usize) -> &NatNode {
        &self.nodes[n - 1]
    }

    pub fn node_mut(&mut self, n: usize) -> &mut NatNode {
        &mut self.nodes[n - 1]
    }

    /// Starts the discovery server on the internet and waits until it accepts
    /// connections (fails with its log if it exits, e.g. on a flag it does not know).
    pub fn start_server(&mut self, options: ServerOptions) -> anyhow::Result<()> {
        let log_path = self.root.join("server.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut args = vec![
            format!("--addr={}", self.server_address),
            "--landing-addr=".into(),
            format!(
                "--metrics-addr={}",
                self.server_metrics_addr.as_deref().unwrap_or_default()
            ),
            "--snapshots-enabled=false".into(),
        ];
        if options.stun {
            args.push(format!("--stun-addr={}", self.stun_address));
            if !self.stun_servers.contains(&self.stun_address) {
                self.stun_servers.insert(0, self.stun_address.clone());
            }
        }
        let child = Command::new("ip")
            .args(["netns", "exec", &self.internet])
            .arg(self.daemon_binary("discovery-server"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start discovery-server")?;
        self.server = Some(child);
        let address: std::net::SocketAddr = self.server_address.parse()?;
        let internet = self.internet.clone();
        let server = self.server.as_mut().context("server just started")?;
        wait_until(
            "the discovery server to accept connections",
            Duration::from_secs(15),
            || {
                if let Some(status) = server.try_wait()? {
                    bail!(
                        "discovery-server exited ({status}):\n{}",
                        tail(&std::fs::read_to_string(&log_path).unwrap_or_default(), 20)
                    );
                }
                in_namespace(&internet, move || {
                    TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok()
                })
            },
        )?;
        Ok(())
    }

    /// SIGKILL to the discovery server.
    pub fn stop_server(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }

    /// Starts the lab's own STUN server at [`NatLab::second_stun_address`] (a second host on the
    /// internet) and adds it to [`NatLab::stun_servers`].
    pub fn start_stun_responder(&mut self) -> anyhow::Result<String> {
        let address: SocketAddrV4 = self.second_stun_address.parse()?;
        self.start_stun_responder_at(address)
    }

    /// Starts a STUN responder of the lab at `address` on the internet (one of the internet
    /// namespace's addresses) and adds it to [`NatLab::stun_servers`].
    pub fn start_stun_responder_at(&mut self, address: SocketAddrV4) -> anyhow::Result<String> {
        let socket = in_namespace(&self.internet, move || UdpSocket::bind(address))?
            .with_context(|| format!("bind the lab's STUN responder to {address}"))?;
        self.stun_responders.push(StunResponder::start(socket)?);
        self.stun_servers.push(address.to_string());
        Ok(address.to_string())
    }

    /// The `natTraversal` configuration that points the agents at the lab's STUN servers and
    /// lets them ask their router for a port mapping.
    pub fn nat_traversal_yaml(&self) -> String {
        let servers: Vec<String> = self
            .stun_servers
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect();
        format!(
            "natTraversal:\n  stunServers: [{}]\n  portMapping: true\n",
            servers.join(", ")
        )
    }

    /// Node `n`'s agent configuration: the lab's WireGuard backend, the lab's fast timers unless
    /// [`NatLab::fast_timers`] is off, `options` appended.
    pub fn agent_config(&self, n: usize, options: &AgentOptions) -> String {
        let node = &self.nodes[n - 1].node;
        let timers = if self.fast_timers {
            "peerKeepaliveSeconds: 2\npeerDownSeconds: 6\nendpointTimeoutSeconds: 3\n"
        } else {
            ""
        };
        format!(
            "clusterID: netns-{id}\nclusterSecret: {secret}\nnodeName: {name}\n\
             discovery:\n  endpoints: [\"http://{server}\"]\nstateDir: {dir}/state\napiSocket: {dir}/agent.sock\n\
             interface: {interface}\nbackend: {backend}\n{timers}nftablesTable: openspan_test\n{extra}",
            id = self.id,
            secret = crate::CLUSTER_SECRET,
            name = node.name,
            server = self.server_address,
            dir = node.dir.display(),
            interface = node.interface,
            backend = self.backend,
            extra = options.extra_yaml,
        )
    }

    /// The cluster id the agents are configured with.
    pub fn cluster_id(&self) -> String {
        format!("netns-{}", self.id)
    }

    /// Writes node `n`'s configuration and starts its agent.
    pub fn start_agent(&mut self, n: usize, options: &AgentOptions) -> anyhow::Result<()> {
        self.start_agents(&[(n, options.clone())])
    }

    /// Writes the configurations first, then starts the agents one right after the other (a
    /// pair starts within milliseconds: benchmarks time from here).
    pub fn start_agents(&mut self, agents: &[(usize, AgentOptions)]) -> anyhow::Result<()> {
        for (n, options) in agents {
            let config = self.agent_config(*n, options);
            std::fs::write(self.nodes[n - 1].node.dir.join("config.yaml"), config)?;
        }
        let agent = self.daemon_binary("kubespan-agent");
        for (n, _) in agents {
            let node = &mut self.nodes[n - 1].node;
            node.agent = Some(spawn_agent(node, &agent)?);
        }
        Ok(())
    }

    /// Fails with the tail of `n`'s agent log if its agent is not running.
    pub fn check_agent(&mut self, n: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[n - 1].node;
        if node.agent.is_some() && !node.is_running() {
            bail!("{}'s agent exited:\n{}", node.name, tail(&node.log(), 25));
        }
        Ok(())
    }

    /// Every log of the lab, tails only: agents, miniupnpd, the discovery server.
    pub fn logs(&self) -> String {
        let mut out = Vec::new();
        for node in &self.nodes {
            out.push(format!(
                "--- {} agent log (tail)\n{}",
                node.name,
                tail(&node.log(), 25)
            ));
            if let Some(router) = node.router.as_ref() {
                out.push(format!(
                    "--- {}'s router: UDP conntrack\n{}",
                    node.name,
                    router.udp_conntrack()
                ));
                if router.miniupnpd.is_some() {
                    out.push(format!(
                        "--- {} miniupnpd log (tail)\n{}",
                        node.name,
                        tail(&router.miniupnpd_log(), 15)
                    ));
                }
            }
        }
        out.push(format!(
            "--- discovery-server log (tail)\n{}",
            tail(
                &std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default(),
                10
            )
        ));
        out.join("\n")
    }

    /// Polls `check` every 100 ms until it returns true or `timeout` passes; returns the wait.
    /// On timeout the error carries the tails of every log.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> bool,
    ) -> anyhow::Result<Duration> {
        wait_until(what, timeout, || Ok(check()))
            .map_err(|timed_out| anyhow::anyhow!("{timed_out}\n{}", self.logs()))
    }

    /// Drops every packet between slot `n` and `peer` where slot `n` meets the internet (its
    /// router, or the node itself when public): loss on a path that stays up as a link, as when
    /// a provider's route breaks. [`NatLab::heal`] removes it.
    pub fn cut(&self, n: usize, peer: Ipv4Addr) -> anyhow::Result<()> {
        let slot = &self.nodes[n - 1];
        let rules = slot.node.dir.join("cut.nft");
        std::fs::write(
            &rules,
            format!(
                "table inet natlab_cut {{\n\
                 \x20 chain forward {{\n\
                 \x20   type filter hook forward priority filter - 10; policy accept;\n\
                 \x20   ip saddr {peer} drop\n\
                 \x20   ip daddr {peer} drop\n\
                 \x20 }}\n\
                 \x20 chain input {{\n\
                 \x20   type filter hook input priority filter - 10; policy accept;\n\
                 \x20   ip saddr {peer} drop\n\
                 \x20 }}\n\
                 \x20 chain output {{\n\
                 \x20   type filter hook output priority filter - 10; policy accept;\n\
                 \x20   ip daddr {peer} drop\n\
                 \x20 }}\n\
                 }}\n"
            ),
        )?;
        sh(
            "ip",
            &[
                "netns",
                "exec",
                slot.edge_netns(),
                "nft",
                "-f",
                rules.to_str().unwrap_or_default(),
            ],
        )?;
        Ok(())
    }

    /// Removes [`NatLab::cut`]'s rules from slot `n`.
    pub fn heal(&self, n: usize) -> anyhow::Result<()> {
        sh(
            "ip",
            &[
                "netns",
                "exec",
                self.nodes[n - 1].edge_netns(),
                "nft",
                "delete",
                "table",
                "inet",
                "natlab_cut",
            ],
        )?;
        Ok(())
    }

    /// Asks slot `n`'s router for a UDP port mapping with NAT-PMP (RFC 6886) from inside the
    /// node, as any LAN host may: `internal` on the node to `external` (a suggestion) on the
    /// router's WAN address, for `lifetime` seconds. Returns the mapped public endpoint.
    pub fn nat_pmp_map(
        &self,
        n: usize,
        internal: u16,
        external: u16,
        lifetime: u32,
    ) -> anyhow::Result<SocketAddrV4> {
        let slot = &self.nodes[n - 1];
        let socket = in_namespace(&slot.node.netns, || UdpSocket::bind("0.0.0.0:0"))??;
        socket.set_read_timeout(Some(Duration::from_millis(250)))?;
        let gateway = SocketAddrV4::new(LAN_ROUTER, NAT_PMP_PORT);
        let ask = |request: &[u8], opcode: u8| -> anyhow::Result<Vec<u8>> {
            // RFC 6886 §3.1: resend at 250 ms, doubling; five tries here.
            let mut wait = Duration::from_millis(250);
            for _ in 0..5 {
                socket.set_read_timeout(Some(wait))?;
                socket.send_to(request, gateway)?;
                let mut answer = [0u8; 64];
                if let Ok((len, from)) = socket.recv_from(&mut answer)
                    && from == std::net::SocketAddr::V4(gateway)
                    && len >= 8
                    && answer[1] == 128 + opcode
                {
                    let result = u16::from_be_bytes([answer[2], answer[3]]);
                    if result != 0 {
                        bail!("NAT-PMP opcode {opcode}: result code {result}");
                    }
                    return Ok(answer[..len].to_vec());
                }
                wait *= 2;
            }
            bail!(
                "no NAT-PMP answer from {gateway} to opcode {opcode} (is slot {n} a UPnP router?)"
            )
        };
        let address = ask(&[0, 0], 0)?;
        let wan = Ipv4Addr::new(address[8], address[9], address[10], address[11]);
        let mut request = vec![0, 1, 0, 0];
        request.extend_from_slice(&internal.to_be_bytes());
        request.extend_from_slice(&external.to_be_bytes());
        request.extend_from_slice(&lifetime.to_be_bytes());
        let mapped = ask(&request, 1)?;
        let port = u16::from_be_bytes([mapped[10], mapped[11]]);
        Ok(SocketAddrV4::new(wan, port))
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        for slot in &mut self.nodes {
            slot.node.kill_agent();
            let _ =
                std::fs::remove_file(format!("/var/run/wireguard/{}.sock", slot.node.interface));
            if let Some(router) = slot.router.as_mut() {
                // Stopped before its namespace goes.
                router.miniupnpd.take();
            }
        }
        self.stop_server();
        self.stun_responders.clear();
        for netns in &self.namespaces {
            let _ = run("ip", &["netns", "del", netns]);
        }
        if std::env::var("OPENSPAN_KEEP_LAB").is_err() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// The port the lab's relays listen on.
pub const RELAY_PORT: u16 = 7443;
/// The name in the lab relays' certificate.
pub const RELAY_SERVER_NAME: &str = "relay.lab.test";

/// The lab's relays (killed when dropped).
pub struct Relays {
    children: Vec<(String, Child)>,
}

impl Relays {
    /// SIGKILL to the relay at `address`; false when it is not one of these.
    pub fn kill(&mut self, address: &str) -> bool {
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

impl NatLab {
    /// Starts two `openspan-relay`s on the internet (next to the discovery server and at the lab's
    /// second public address) letting the lab's cluster in (unless `extra_args` name the clusters
    /// with `--cluster=`), with `extra_args` (e.g. limits);
    /// returns them and the agents' `relay` YAML.
    pub fn start_relays(&self, extra_args: &[&str]) -> anyhow::Result<(Relays, String)> {
        let lab = self;
        let cert = rcgen::generate_simple_self_signed(vec![RELAY_SERVER_NAME.to_owned()])?;
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
                // A `--cluster=` among `extra_args` replaces the lab's own (e.g. to shut it out).
                .args(
                    (!extra_args.iter().any(|a| a.starts_with("--cluster=")))
                        .then(|| format!("--cluster={cluster}")),
                )
                .arg(format!("--metrics-addr={ip}:2123"))
                .args(extra_args)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("start openspan-relay")?;
            relays.children.push((address.clone(), child));
        }
        let yaml = format!(
            "relay:\n  servers: [\"{}\", \"{}\"]\n  caFile: {}\n  serverName: {RELAY_SERVER_NAME}\n",
            addresses[0],
            addresses[1],
            cert_file.display()
        );
        Ok((relays, yaml))
    }
}
