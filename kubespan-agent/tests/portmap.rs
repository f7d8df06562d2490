//! Root tests: the port mapper against a real miniupnpd (one daemon speaking UPnP-IGD, NAT-PMP and
//! PCP) in three throwaway network namespaces:
//!
//! ```text
//!   wan  w0 11.88.0.2 ── wan0 11.88.0.1  router  lan0 192.168.88.1 ── c0 192.168.88.2  client
//!                                 (masquerade, miniupnpd)                (mapper, "WireGuard" port)
//! ```
//!
//! The WAN side is 11.88.0.0/24, not a private range: miniupnpd 2.3 refuses every mapping when its
//! external interface has a private or reserved address ("Port forwarding is impossible"), and
//! Debian's 2.3.1 has no switch to allow it. The addresses only exist inside the test's
//! namespaces, which have no link to the host or anywhere else.
//!
//! miniupnpd's nftables backend fills chains it expects to exist; Debian's `nft_init.sh` would
//! create them but sources a helper the package does not ship, so the test writes the same table.
//!
//! The mapper runs on a thread that entered the client namespace (its default gateway comes from
//! that namespace's routing table); datagrams are sent from the wan namespace to the external
//! endpoint it reports and must reach a UDP socket on the listen port in the client namespace.
//!
//! Needs root (namespaces, veth, nftables) and `miniupnpd` (Debian: miniupnpd-nftables). Without
//! root the tests fail, unless `OPENSPAN_SKIP_ROOT_TESTS=1` is set, in which case they say they
//! skip; without miniupnpd they fail saying so.

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kubespan_agent::portmap::{self, MappingProtocol, PortMapperConfig, PortMapping};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

mod support;

use support::{Netns, require_root as require_root_for};

const NEEDS: &str = "network namespaces, veth links, nftables and miniupnpd";
const LISTEN_PORT: u16 = 51820;
const EXTERNAL_IP: &str = "11.88.0.1";
/// Short enough to see several renewals, and expiry, within seconds.
const SHORT_LIFETIME: Duration = Duration::from_secs(4);
/// miniupnpd's usual rule: LAN clients may map ports above 1024 to themselves.
const ALLOW_HIGH_PORTS: &str = "allow 1024-65535 192.168.88.0/24 1024-65535";

fn require_root(test: &str) -> bool {
    require_root_for(test, NEEDS)
}

// ---- the lab ------------------------------------------------------------------------------------

/// What the router offers.
struct Offer {
    natpmp_and_pcp: bool,
    upnp: bool,
}

const EVERYTHING: Offer = Offer {
    natpmp_and_pcp: true,
    upnp: true,
};

/// Three namespaces and, once started, miniupnpd in the router; all removed on drop.
struct Lab {
    miniupnpd: Option<Child>,
    dir: tempfile::TempDir,
    wan: Netns,
    router: Netns,
    client: Netns,
}

impl Lab {
    fn new() -> Self {
        let wan = Netns::new("pm-wan");
        let router = Netns::new("pm-rtr");
        let client = Netns::new("pm-cli");
        for (ours, ns, theirs) in [("w0", &wan, "wan0"), ("c0", &client, "lan0")] {
            support::run(
                "ip",
                &[
                    "link",
                    "add",
                    ours,
                    "netns",
                    &ns.name,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    theirs,
                    "netns",
                    &router.name,
                ],
            );
        }
        wan.ip(&["addr", "add", "11.88.0.2/24", "dev", "w0"]);
        wan.ip(&["link", "set", "w0", "up"]);
        router.ip(&["addr", "add", "11.88.0.1/24", "dev", "wan0"]);
        router.ip(&["link", "set", "wan0", "up"]);
        router.ip(&["addr", "add", "192.168.88.1/24", "dev", "lan0"]);
        router.ip(&["link", "set", "lan0", "up"]);
        client.ip(&["addr", "add", "192.168.88.2/24", "dev", "c0"]);
        client.ip(&["link", "set", "c0", "up"]);
        client.ip(&["route", "add", "default", "via", "192.168.88.1"]);
        router.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);

        let dir = tempfile::Builder::new()
            .prefix("openspan-portmap-")
            .tempdir()
            .expect("temporary directory");
        // The chains miniupnpd fills (its defaults renamed into one table), a forward policy that
        // only lets in what a mapping allows, and masquerade for the LAN.
        let ruleset = dir.path().join("router.nft");
        std::fs::write(
            &ruleset,
            r#"table inet miniupnpd {
  chain miniupnpd {
  }
  chain prerouting_miniupnpd {
  }
  chain postrouting_miniupnpd {
  }
  chain forward {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "lan0" accept
    jump miniupnpd
  }
  chain prerouting {
    type nat hook prerouting priority -100; policy accept;
    jump prerouting_miniupnpd
  }
  chain postrouting {
    type nat hook postrouting priority 100; policy accept;
    jump postrouting_miniupnpd
    oifname "wan0" masquerade
  }
}
"#,
        )
        .unwrap();
        router.exec(&["nft", "-f", ruleset.to_str().unwrap()]);
        Self {
            miniupnpd: None,
            dir,
            wan,
            router,
            client,
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("miniupnpd.log")
    }

    /// Starts miniupnpd in the foreground in the router namespace and waits until it listens.
    fn start_miniupnpd(&mut self, offer: &Offer) {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        let config = self.dir.path().join("miniupnpd.conf");
        std::fs::write(
            &config,
            format!(
                "ext_ifname=wan0\n\
                 listening_ip=lan0\n\
                 http_port=0\n\
                 enable_natpmp={}\n\
                 enable_upnp={}\n\
                 secure_mode=yes\n\
                 system_uptime=yes\n\
                 min_lifetime=2\n\
                 max_lifetime=86400\n\
                 notify_interval=60\n\
                 clean_ruleset_interval=600\n\
                 uuid=3e3f5f2c-1a2b-4c5d-8e9f-0a1b2c3d4e5f\n\
                 upnp_table_name=miniupnpd\n\
                 upnp_nat_table_name=miniupnpd\n\
                 upnp_forward_chain=miniupnpd\n\
                 upnp_nat_chain=prerouting_miniupnpd\n\
                 upnp_nat_postrouting_chain=postrouting_miniupnpd\n\
                 {}\n\
                 deny 0-65535 0.0.0.0/0 0-65535\n",
                yes_no(offer.natpmp_and_pcp),
                yes_no(offer.upnp),
                ALLOW_HIGH_PORTS,
            ),
        )
        .unwrap();
        let log = std::fs::File::create(self.log_path()).unwrap();
        let pid_file = self.dir.path().join("miniupnpd.pid");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.router.name, "miniupnpd", "-d", "-f"])
            .arg(&config)
            .arg("-P")
            .arg(&pid_file)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start miniupnpd (Debian: miniupnpd-nftables): {e}"));
        self.miniupnpd = Some(child);

        let ready = |log: &str| {
            (!offer.natpmp_and_pcp || log.contains("Listening for NAT-PMP/PCP"))
                && (!offer.upnp || log.contains("HTTP listening on port"))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.miniupnpd_log();
            if ready(&log) {
                return;
            }
            if let Some(status) = self.miniupnpd.as_mut().unwrap().try_wait().unwrap() {
                panic!("miniupnpd exited ({status}) before listening; is it installed?\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "miniupnpd not listening after 10 s:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn miniupnpd_log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The router's port forwards, as miniupnpd wrote them.
    fn forwards(&self) -> String {
        self.router.exec(&[
            "nft",
            "list",
            "chain",
            "inet",
            "miniupnpd",
            "prerouting_miniupnpd",
        ])
    }

    fn forwards_port(&self, external_port: u16) -> bool {
        let forwards = self.forwards();
        forwards.contains("dnat") && forwards.contains(&format!("dport {external_port} "))
    }

    /// Whether a datagram sent from the wan namespace to `external` reaches `listener`.
    fn delivers(&self, external: SocketAddr, listener: &Listener) -> bool {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let token = format!("probe {}", NEXT.fetch_add(1, Ordering::Relaxed)).into_bytes();
        let sent = token.clone();
        self.wan.enter(move || {
            let socket = UdpSocket::bind("0.0.0.0:0").expect("wan socket");
            // A few copies: the first may wait for ARP on fresh links.
            for _ in 0..3 {
                socket.send_to(&sent, external).expect("send from wan");
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let deadline = Instant::now() + Duration::from_secs(1);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match listener.received.recv_timeout(left) {
                Ok(payload) if payload == token => return true,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
        false
    }

    /// Everything worth reading when a test fails.
    fn context(&self, mapper: &Mapper) -> String {
        format!(
            "\n--- mapper log ---\n{}\n--- miniupnpd log ---\n{}\n--- forwards ---\n{}",
            mapper.logs(),
            self.miniupnpd_log(),
            self.forwards()
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Before the namespaces go (field drops follow this).
        if let Some(mut child) = self.miniupnpd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A UDP socket on the listen port in the client namespace, standing in for WireGuard.
struct Listener {
    received: mpsc::Receiver<Vec<u8>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    fn new(client: &Netns) -> Self {
        let (tx, received) = mpsc::channel();
        let (ready_tx, ready) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = client.spawn({
            let stop = stop.clone();
            move || {
                let socket = UdpSocket::bind(("0.0.0.0", LISTEN_PORT)).expect("listen port");
                socket
                    .set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                ready_tx.send(()).unwrap();
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = socket.recv(&mut buf) {
                        let _ = tx.send(buf[..n].to_vec());
                    }
                }
            }
        });
        ready.recv().expect("listener thread started");
        Self {
            received,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---- the mapper under test ----------------------------------------------------------------------

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `portmap::run` on a thread in the client namespace, with its logs captured.
struct Mapper {
    updates: watch::Receiver<Option<PortMapping>>,
    shutdown: CancellationToken,
    /// Drops the mapper without its clean-up, as a killed agent would.
    crash: CancellationToken,
    thread: Option<JoinHandle<()>>,
    logs: Logs,
}

impl Mapper {
    fn start(client: &Netns, config: PortMapperConfig) -> Self {
        let (tx, updates) = watch::channel(None);
        let shutdown = CancellationToken::new();
        let crash = CancellationToken::new();
        let logs = Logs::default();
        let thread = client.spawn({
            let (shutdown, crash, logs) = (shutdown.clone(), crash.clone(), logs.clone());
            move || {
                let subscriber = tracing_subscriber::fmt()
                    .with_writer(move || logs.clone())
                    .with_ansi(false)
                    .with_max_level(tracing::Level::DEBUG)
                    .finish();
                tracing::subscriber::with_default(subscriber, || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("tokio runtime")
                        .block_on(async {
                            tokio::select! {
                                () = portmap::run(config, tx, shutdown) => {}
                                () = crash.cancelled() => {}
                            }
                        })
                })
            }
        });
        Self {
            updates,
            shutdown,
            crash,
            thread: Some(thread),
            logs,
        }
    }

    fn current(&self) -> Option<PortMapping> {
        *self.updates.borrow()
    }

    /// The first mapping published within `timeout`.
    fn wait_for_mapping(&self, timeout: Duration) -> Option<PortMapping> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(mapping) = self.current() {
                return Some(mapping);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn logs(&self) -> String {
        String::from_utf8_lossy(&self.logs.0.lock().unwrap()).into_owned()
    }

    /// Log lines at INFO or above (the ones an operator sees by default).
    fn loud_lines(&self) -> Vec<String> {
        self.logs()
            .lines()
            .filter(|l| {
                [" INFO ", " WARN ", " ERROR "]
                    .iter()
                    .any(|lvl| l.contains(lvl))
            })
            .map(str::to_owned)
            .collect()
    }

    fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops it the clean way; returns how long stopping took.
    fn stop(&mut self) -> Duration {
        let asked = Instant::now();
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            thread.join().expect("mapper thread panicked");
        }
        asked.elapsed()
    }

    fn crash(&mut self) {
        self.crash.cancel();
        if let Some(thread) = self.thread.take() {
            thread.join().expect("mapper thread panicked");
        }
    }
}

impl Drop for Mapper {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn config(protocols: &[MappingProtocol]) -> PortMapperConfig {
    PortMapperConfig {
        protocols: protocols.to_vec(),
        lifetime: SHORT_LIFETIME,
        retry_interval: Duration::from_secs(2),
        ..PortMapperConfig::new(LISTEN_PORT)
    }
}

fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---- tests --------------------------------------------------------------------------------------

/// Maps with `protocol` alone, checks the forward works, outlives several lifetimes by renewing,
/// removes it on stop; then, as a control, shows an abandoned mapping really expires on its own.
fn lifecycle(test: &str, protocol: MappingProtocol) {
    if !require_root(test) {
        return;
    }
    let mut lab = Lab::new();
    lab.start_miniupnpd(&EVERYTHING);
    let listener = Listener::new(&lab.client);

    let mut mapper = Mapper::start(&lab.client, config(&[protocol]));
    let mapping = mapper
        .wait_for_mapping(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no mapping within 10 s{}", lab.context(&mapper)));
    let external: SocketAddr = format!("{EXTERNAL_IP}:{LISTEN_PORT}").parse().unwrap();
    assert_eq!(mapping.protocol, protocol, "{}", lab.context(&mapper));
    assert_eq!(mapping.external, external, "{}", lab.context(&mapper));
    assert_eq!(
        mapping.lifetime,
        SHORT_LIFETIME,
        "the gateway should grant the short lifetime asked for{}",
        lab.context(&mapper)
    );
    assert!(lab.forwards_port(LISTEN_PORT), "{}", lab.context(&mapper));
    assert!(
        lab.delivers(external, &listener),
        "a datagram to {external} from the wan did not arrive{}",
        lab.context(&mapper)
    );
    let obtained = mapper.loud_lines();
    assert!(
        obtained.len() == 1 && obtained[0].contains("port mapping obtained"),
        "one line when the mapping is obtained: {obtained:?}"
    );

    // For three lifetimes the forward never goes away: renewed in time, not re-created.
    let until = Instant::now() + 3 * SHORT_LIFETIME;
    while Instant::now() < until {
        assert!(
            lab.forwards_port(LISTEN_PORT),
            "the forward lapsed{}",
            lab.context(&mapper)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(mapper.current(), Some(mapping), "{}", lab.context(&mapper));
    assert!(
        lab.delivers(external, &listener),
        "the mapping lapsed after {:?}{}",
        3 * SHORT_LIFETIME,
        lab.context(&mapper)
    );
    let renewals = mapper.logs().matches("port mapping renewed").count();
    assert!(
        renewals >= 4,
        "{renewals} renewals in three lifetimes{}",
        lab.context(&mapper)
    );
    assert_eq!(
        mapper.loud_lines().len(),
        1,
        "renewals are quiet: {:?}",
        mapper.loud_lines()
    );

    let stopped_in = mapper.stop();
    assert!(
        stopped_in < Duration::from_secs(2),
        "stop took {stopped_in:?}"
    );
    assert_eq!(mapper.current(), None, "stopping withdraws the mapping");
    assert!(
        !lab.forwards_port(LISTEN_PORT),
        "the forward outlived the stop{}",
        lab.context(&mapper)
    );
    assert!(
        !lab.delivers(external, &listener),
        "a datagram still arrived after the stop"
    );

    // Control: a mapper that dies without cleaning up leaves a mapping the gateway expires within
    // its lifetime, so the renewals above are what kept the mapping alive.
    let mut crashed = Mapper::start(&lab.client, config(&[protocol]));
    crashed
        .wait_for_mapping(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no second mapping{}", lab.context(&crashed)));
    crashed.crash();
    assert!(lab.forwards_port(LISTEN_PORT), "{}", lab.context(&crashed));
    assert!(
        wait_until(SHORT_LIFETIME + Duration::from_secs(4), || !lab
            .forwards_port(LISTEN_PORT)),
        "an unrenewed mapping did not expire on the gateway{}",
        lab.context(&crashed)
    );
}

#[test]
fn pcp_maps_renews_and_removes() {
    lifecycle("pcp_maps_renews_and_removes", MappingProtocol::Pcp);
}

#[test]
fn nat_pmp_maps_renews_and_removes() {
    lifecycle("nat_pmp_maps_renews_and_removes", MappingProtocol::NatPmp);
}

#[test]
fn upnp_maps_renews_and_removes() {
    lifecycle("upnp_maps_renews_and_removes", MappingProtocol::Upnp);
}

#[test]
fn pcp_comes_first_by_default() {
    if !require_root("pcp_comes_first_by_default") {
        return;
    }
    let mut lab = Lab::new();
    lab.start_miniupnpd(&EVERYTHING);
    let mut mapper = Mapper::start(&lab.client, PortMapperConfig::new(LISTEN_PORT));
    let mapping = mapper
        .wait_for_mapping(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no mapping within 10 s{}", lab.context(&mapper)));
    assert_eq!(mapping.protocol, MappingProtocol::Pcp);
    assert_eq!(mapping.lifetime, portmap::DEFAULT_LIFETIME);
    assert_eq!(mapping.external.ip().to_string(), EXTERNAL_IP);
    mapper.stop();
    assert!(!lab.forwards_port(LISTEN_PORT), "{}", lab.context(&mapper));
}

#[test]
fn upnp_is_used_when_the_router_has_no_nat_pmp_or_pcp() {
    if !require_root("upnp_is_used_when_the_router_has_no_nat_pmp_or_pcp") {
        return;
    }
    let mut lab = Lab::new();
    lab.start_miniupnpd(&Offer {
        natpmp_and_pcp: false,
        ..EVERYTHING
    });
    let listener = Listener::new(&lab.client);
    let mut mapper = Mapper::start(&lab.client, config(&portmap::DEFAULT_PROTOCOLS));
    let mapping = mapper
        .wait_for_mapping(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("no mapping within 15 s{}", lab.context(&mapper)));
    assert_eq!(
        mapping.protocol,
        MappingProtocol::Upnp,
        "{}",
        lab.context(&mapper)
    );
    assert!(
        lab.delivers(mapping.external, &listener),
        "{}",
        lab.context(&mapper)
    );
    mapper.stop();
    assert!(
        !lab.forwards_port(mapping.external.port()),
        "{}",
        lab.context(&mapper)
    );
}

/// Takes external port `external` for another LAN host (a second address of the client, which
/// miniupnpd tells apart by address) with a hand-made NAT-PMP request (RFC 6886 §3.3), so the
/// mapper cannot have it. Same address would not do: miniupnpd lets a UPnP client overwrite its
/// own mappings.
fn occupy_external_port(client: &Netns, external: u16, internal: u16) {
    client.ip(&["addr", "add", "192.168.88.3/24", "dev", "c0"]);
    client.enter(move || {
        let socket = UdpSocket::bind("192.168.88.3:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut request = vec![0u8, 1, 0, 0];
        request.extend(internal.to_be_bytes());
        request.extend(external.to_be_bytes());
        request.extend(3600u32.to_be_bytes());
        socket.send_to(&request, "192.168.88.1:5351").unwrap();
        let mut answer = [0u8; 16];
        let n = socket.recv(&mut answer).expect("NAT-PMP answer");
        assert_eq!(n, 16, "NAT-PMP answer {:?}", &answer[..n]);
        assert_eq!(
            &answer[..4],
            &[0, 0x81, 0, 0],
            "NAT-PMP refused: {answer:?}"
        );
        assert_eq!(u16::from_be_bytes([answer[10], answer[11]]), external);
    });
}

#[test]
fn the_external_port_the_gateway_picks_is_reported() {
    if !require_root("the_external_port_the_gateway_picks_is_reported") {
        return;
    }
    let mut lab = Lab::new();
    lab.start_miniupnpd(&EVERYTHING);
    // The listen port, as an external port, already forwards somewhere else.
    occupy_external_port(&lab.client, LISTEN_PORT, 51999);
    let listener = Listener::new(&lab.client);
    for protocol in portmap::DEFAULT_PROTOCOLS {
        let mut mapper = Mapper::start(&lab.client, config(&[protocol]));
        let mapping = mapper
            .wait_for_mapping(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{protocol}: no mapping{}", lab.context(&mapper)));
        let port = mapping.external.port();
        assert_ne!(port, LISTEN_PORT, "{protocol}{}", lab.context(&mapper));
        assert_eq!(mapping.external.ip().to_string(), EXTERNAL_IP);
        assert!(
            lab.delivers(mapping.external, &listener),
            "{protocol}: nothing arrived through {}{}",
            mapping.external,
            lab.context(&mapper)
        );
        mapper.stop();
        assert!(
            !lab.forwards_port(port),
            "{protocol}: the forward outlived the stop{}",
            lab.context(&mapper)
        );
        assert!(
            lab.forwards_port(LISTEN_PORT),
            "the other forward is left alone"
        );
    }
}

#[test]
fn without_a_gateway_answering_the_mapper_waits_quietly() {
    if !require_root("without_a_gateway_answering_the_mapper_waits_quietly") {
        return;
    }
    let lab = Lab::new(); // no miniupnpd
    let mut mapper = Mapper::start(&lab.client, config(&portmap::DEFAULT_PROTOCOLS));
    let watched_for = Duration::from_secs(14);
    let until = Instant::now() + watched_for;
    while Instant::now() < until {
        assert_eq!(mapper.current(), None, "{}", lab.context(&mapper));
        assert!(
            mapper.is_running(),
            "the mapper gave up{}",
            lab.context(&mapper)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let logs = mapper.logs();
    let rounds = logs.matches("asking for a port mapping").count() / 3;
    assert!(
        rounds >= 2,
        "kept asking, with back-off: {rounds} rounds in {watched_for:?}\n{logs}"
    );
    let loud = mapper.loud_lines();
    assert!(
        loud.len() == 1 && loud[0].contains("no port mapping"),
        "one line, not one per retry: {loud:?}"
    );
    let stopped_in = mapper.stop();
    assert!(
        stopped_in < Duration::from_secs(2),
        "stop took {stopped_in:?}"
    );
}
