//! Port mapping on the router in front of this node: asks the gateway to forward a UDP port to
//! the WireGuard listen port, keeps that mapping alive, removes it on stop, and reports the
//! external `ip:port` so the agent can publish it as an endpoint (issue 13, "reach nodes behind
//! NAT directly").
//!
//! # Behaviour
//!
//! [`run`] finds the gateway (the configured [`PortMapperConfig::gateway`], else the IPv4 default
//! route's next hop from `/proc/thread-self/net/route`) and tries, in order, until one answers:
//!
//! 1. **PCP** (RFC 6887) on UDP 5351 of the gateway: the response carries the external address;
//! 2. **NAT-PMP** (RFC 6886) on the same port: the external address comes from its public address
//!    request;
//! 3. **UPnP-IGD**: SSDP search (multicast `239.255.255.250:1900`), then `GetExternalIPAddress` and
//!    `AddPortMapping` over SOAP. Only a device whose description URL is on the gateway's address
//!    is used: a mapping on any other box of the LAN would not be on the path of incoming traffic.
//!
//! It asks for the same external port as the listen port; the gateway may grant another (then the
//! published endpoint carries the granted port). The requested lifetime is 2 hours
//! ([`DEFAULT_LIFETIME`], RFC 6886's recommendation); the mapping is renewed at half of whatever
//! lifetime the gateway granted. A failed renewal is retried at half of the remaining time until
//! the mapping expires; then it counts as lost, the update channel goes to `None` and discovery
//! starts again. UPnP gateways that only take permanent leases get one (lifetime 0), still
//! refreshed every hour so a rebooted router is noticed. When no protocol answers, discovery is
//! retried every 5 minutes ([`DEFAULT_RETRY_INTERVAL`]). On stop the mapping is deleted, best
//! effort, within about one second.
//!
//! Logs: one line when a mapping is obtained or changes (protocol, external endpoint, lifetime),
//! one when it is lost or when the gateway supports none of the protocols; retries and renewals
//! are at debug level. An external address that is not publicly routable (a router behind another
//! NAT) is still reported, with a warning: peers outside that outer network cannot use it.
//!
//! # What operators enable on their routers
//!
//! Nothing in a datacenter: without a NAT gateway nothing answers, and the agent says so once. On
//! a home or office router, enable **one** of: PCP or NAT-PMP (miniupnpd, e.g. OpenWrt's
//! `luci-app-upnp`: `enable_natpmp=yes`, which also turns on PCP; pfSense/OPNsense: the "UPnP &
//! NAT-PMP" service with NAT-PMP allowed; FRITZ!Box: PCP, "independent port sharing", allowed
//! for the node), or UPnP-IGD (usually just "UPnP" in the router's settings). Where the router
//! has permission rules, allow the nodes' addresses, UDP, external ports above 1024. A router
//! whose own WAN address is private (behind carrier-grade NAT) cannot help: its mappings end one
//! hop short of the internet, and the agent warns about such an external address.
//!
//! # Crates
//!
//! PCP and NAT-PMP through [`crab_nat`] (small, tokio, length-checks every answer before reading
//! it); UPnP-IGD through [`igd_next`] with its tokio client (hyper 1, already in the tree). Neither
//! adds a second major version of a crate the agent already uses (igd-next brings `url` and its
//! IDNA tables, crab_nat brings `num_enum`). A router's answers are untrusted: the unit tests
//! feed crab_nat's NAT-PMP and PCP decoders arbitrary bytes from a fake gateway on loopback.
//!
//! The decisions (protocol order, renewal and retry schedule, what to log) are plain functions;
//! the network calls sit behind a small `Backend` trait so the loop itself is tested on paused
//! time with a scripted gateway.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::num::NonZeroU16;
use std::str::FromStr;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The lifetime asked for: RFC 6886 §3.3 recommends two hours.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(2 * 60 * 60);
/// How long to wait before asking again when no gateway protocol answered.
pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// The order protocols are tried in: PCP supersedes NAT-PMP (RFC 6887 §1) and shares its port;
/// UPnP needs a search, an XML description and HTTP, so it comes last.
pub const DEFAULT_PROTOCOLS: [MappingProtocol; 3] = [
    MappingProtocol::Pcp,
    MappingProtocol::NatPmp,
    MappingProtocol::Upnp,
];
/// The port-mapping description routers show in their UPnP tables.
pub const DEFAULT_DESCRIPTION: &str = "openspan WireGuard";

/// How long stopping may spend deleting the mapping: stop must not hang on a dead router.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Never renew more often than this, whatever tiny lifetime a gateway grants.
const MIN_RENEW_DELAY: Duration = Duration::from_secs(1);
/// NAT-PMP/PCP: first answer awaited 250 ms (RFC 6886 §3.1), doubled on each of 3 retries,
/// capped at 2 s: about 4 s before falling through to the next protocol. RFC 6887 suggests 3 s
/// for PCP's first wait, which would hold up the fallback to NAT-PMP for long minutes.
const PMP_TIMEOUTS: crab_nat::TimeoutConfig = crab_nat::TimeoutConfig {
    initial_timeout: Duration::from_millis(250),
    max_retries: 3,
    max_retry_timeout: Some(Duration::from_secs(2)),
};
/// UPnP: gateways answer an M-SEARCH within its MX (3 s); one spare second.
const UPNP_SEARCH_TIMEOUT: Duration = Duration::from_secs(4);
/// UPnP: bound on one whole attempt (search, description, SOAP calls).
const UPNP_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

/// How the mapping was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MappingProtocol {
    Pcp,
    NatPmp,
    Upnp,
}

impl fmt::Display for MappingProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pcp => "PCP",
            Self::NatPmp => "NAT-PMP",
            Self::Upnp => "UPnP-IGD",
        })
    }
}

impl FromStr for MappingProtocol {
    type Err = String;

    /// Accepts the display names and the usual short forms, in any case: `pcp`, `nat-pmp`
    /// (`natpmp`), `upnp-igd` (`upnp`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "pcp" => Ok(Self::Pcp),
            "nat-pmp" | "natpmp" => Ok(Self::NatPmp),
            "upnp" | "upnp-igd" | "igd" => Ok(Self::Upnp),
            _ => Err(format!(
                "unknown port mapping protocol {s:?}: expected \"pcp\", \"nat-pmp\" or \"upnp\""
            )),
        }
    }
}

/// A mapping held on the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortMapping {
    /// Where peers on the far side of the gateway reach this node's listen port.
    pub external: SocketAddr,
    pub protocol: MappingProtocol,
    /// What the gateway granted. Zero: a permanent UPnP lease (the gateway accepts no other).
    pub lifetime: Duration,
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} via {}", self.external, self.protocol)?;
        if self.lifetime.is_zero() {
            f.write_str(" (permanent lease)")
        } else {
            write!(f, " (lifetime {}s)", self.lifetime.as_secs())
        }
    }
}

/// What to map and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortMapperConfig {
    /// The WireGuard UDP listen port (the internal port of the mapping).
    pub listen_port: u16,
    /// The router to ask. `None`: the IPv4 default route's gateway, looked up on every discovery
    /// round (so a DHCP renumbering is followed).
    pub gateway: Option<IpAddr>,
    /// Shown in the router's UPnP table.
    pub description: String,
    /// Protocols to try, in order; [`DEFAULT_PROTOCOLS`] unless an operator (or a test) narrows it.
    pub protocols: Vec<MappingProtocol>,
    /// The lifetime asked for; the gateway may grant less (or more).
    pub lifetime: Duration,
    /// The wait before the next discovery round when nothing answered.
    pub retry_interval: Duration,
}

impl PortMapperConfig {
    /// The defaults for `listen_port`: default gateway, every protocol, 2 h, retry every 5 min.
    pub fn new(listen_port: u16) -> Self {
        Self {
            listen_port,
            gateway: None,
            description: DEFAULT_DESCRIPTION.into(),
            protocols: DEFAULT_PROTOCOLS.to_vec(),
            lifetime: DEFAULT_LIFETIME,
            retry_interval: DEFAULT_RETRY_INTERVAL,
        }
    }
}

/// Why one protocol gave no mapping (logged, never returned from [`run`]).
#[derive(Debug, thiserror::Error)]
pub enum PortMapError {
    #[error("no IPv4 default route")]
    NoDefaultRoute,
    #[error("cannot read the routing table: {0}")]
    RouteTable(#[source] std::io::Error),
    #[error("no local address towards {gateway}: {source}")]
    LocalAddress {
        gateway: IpAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Pcp(#[from] crab_nat::pcp::Failure),
    #[error(transparent)]
    NatPmp(#[from] crab_nat::natpmp::Failure),
    #[error("{0}")]
    Upnp(String),
    #[error("the UPnP gateway found is {found}, not the default gateway {gateway}")]
    UpnpNotGateway { found: IpAddr, gateway: IpAddr },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the gateway reports no usable external address ({0})")]
    NoExternalAddress(IpAddr),
    #[error("the gateway granted a zero lifetime")]
    ZeroLifetime,
    #[error("{0} is not spoken over IPv6 here")]
    NotOverIpv6(MappingProtocol),
    #[error("internal error: {0}")]
    Internal(&'static str),
}

// ---------------------------------------------------------------------------------------------
// Pure decisions.
// ---------------------------------------------------------------------------------------------

/// The protocols to try against `gateway`, in the configured order, each once. NAT-PMP is
/// IPv4-only (RFC 6886), and UPnP is searched for on IPv4 here.
pub fn attempt_order(configured: &[MappingProtocol], gateway: IpAddr) -> Vec<MappingProtocol> {
    let mut order = Vec::with_capacity(configured.len());
    for &protocol in configured {
        let speaks = gateway.is_ipv4() || protocol == MappingProtocol::Pcp;
        if speaks && !order.contains(&protocol) {
            order.push(protocol);
        }
    }
    order
}

/// When to renew after the gateway granted `granted`: halfway (RFC 6886 §3.3, RFC 6887 §11.2.1).
/// A permanent lease (zero) is refreshed as if `requested` had been granted, so a router that
/// rebooted and forgot it is noticed.
pub fn renew_delay(granted: Duration, requested: Duration) -> Duration {
    let basis = if granted.is_zero() {
        requested
    } else {
        granted
    };
    (basis / 2).max(MIN_RENEW_DELAY)
}

/// After a failed renewal with `remaining` time left on the mapping: try again halfway to expiry,
/// or `None` when too little is left and the mapping must be treated as lost.
pub fn renew_retry_delay(remaining: Duration) -> Option<Duration> {
    let half = remaining / 2;
    (half >= MIN_RENEW_DELAY).then_some(half)
}

/// The lifetime field of a request: whole seconds, at least 1 (0 means "delete" to NAT-PMP and
/// PCP), at most what the 32-bit field holds.
fn lifetime_seconds(lifetime: Duration) -> u32 {
    u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX).max(1)
}

/// An external address the gateway reports: unspecified (a router whose WAN link is down
/// answers 0.0.0.0), multicast or broadcast cannot carry a mapping.
fn usable_external(ip: IpAddr) -> Result<IpAddr, PortMapError> {
    let unusable = match ip {
        IpAddr::V4(v4) => v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast(),
        IpAddr::V6(v6) => {
            v6.is_unspecified()
                || v6.is_multicast()
                || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_unspecified())
        }
    };
    if unusable {
        Err(PortMapError::NoExternalAddress(ip))
    } else {
        Ok(ip)
    }
}

/// Whether peers on the internet can reach `ip`. False for private, carrier-grade NAT, loopback,
/// link-local, documentation, benchmarking and reserved ranges: a gateway reporting one of those
/// sits behind another NAT.
pub fn is_publicly_routable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || (a == 100 && (64..128).contains(&b)) // 100.64.0.0/10, carrier-grade NAT
                || (a == 198 && (b == 18 || b == 19)) // 198.18.0.0/15, benchmarking
                || a == 0
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_publicly_routable(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || (first == 0x2001 && v6.segments()[1] == 0x0db8)) // documentation
        }
    }
}

/// The IPv4 default gateway in a `/proc/net/route` table: the `UP|GATEWAY` route to 0.0.0.0/0
/// with the lowest metric. Malformed lines are skipped.
pub fn parse_default_gateway(route_table: &str) -> Option<Ipv4Addr> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    let hex = |s: &str| u32::from_str_radix(s, 16).ok();
    route_table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (destination, gateway, flags) = (hex(f.get(1)?)?, hex(f.get(2)?)?, hex(f.get(3)?)?);
            let (metric, mask): (u32, u32) = (f.get(6)?.parse().ok()?, hex(f.get(7)?)?);
            let default = destination == 0 && mask == 0;
            let usable = flags & (RTF_UP | RTF_GATEWAY) == (RTF_UP | RTF_GATEWAY) && gateway != 0;
            // The kernel prints the network-order address as a host-order integer, so the
            // native-endian bytes are the address bytes.
            (default && usable).then(|| (metric, Ipv4Addr::from(gateway.to_ne_bytes())))
        })
        .min_by_key(|&(metric, _)| metric)
        .map(|(_, gateway)| gateway)
}

/// What a state change deserves in the logs: one line per change, debug for the rest.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Report {
    Obtained,
    Changed { from: PortMapping },
    Renewed,
    Lost { from: PortMapping },
    Unavailable,
    StillUnavailable,
}

/// Remembers the last reported state so retries and renewals stay quiet.
#[derive(Debug, Default)]
struct Reporter {
    /// `None` before the first report; then the mapping held, if any.
    last: Option<Option<PortMapping>>,
}

impl Reporter {
    fn mapped(&mut self, mapping: PortMapping) -> Report {
        let report = match self.last {
            Some(Some(from))
                if from.external == mapping.external && from.protocol == mapping.protocol =>
            {
                Report::Renewed
            }
            Some(Some(from)) => Report::Changed { from },
            _ => Report::Obtained,
        };
        self.last = Some(Some(mapping));
        report
    }

    fn unavailable(&mut self) -> Report {
        let report = match self.last {
            Some(Some(from)) => Report::Lost { from },
            Some(None) => Report::StillUnavailable,
            None => Report::Unavailable,
        };
        self.last = Some(None);
        report
    }
}

// ---------------------------------------------------------------------------------------------
// The loop.
// ---------------------------------------------------------------------------------------------

/// A mapping request, as the backends see it.
#[derive(Clone, Debug)]
struct Request {
    port: NonZeroU16,
    lifetime: Duration,
    description: String,
}

/// What a gateway granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Grant {
    external: SocketAddr,
    lifetime: Duration,
}

/// The network side, so the loop runs against a scripted gateway in tests.
trait Backend {
    /// What a backend needs to renew or delete its mapping.
    type Handle;
    fn gateway(&self, configured: Option<IpAddr>) -> Result<IpAddr, PortMapError>;
    async fn map(
        &self,
        protocol: MappingProtocol,
        gateway: IpAddr,
        request: &Request,
    ) -> Result<(Grant, Self::Handle), PortMapError>;
    async fn renew(
        &self,
        handle: &Self::Handle,
        request: &Request,
    ) -> Result<(Grant, Self::Handle), PortMapError>;
    async fn unmap(&self, handle: &Self::Handle) -> Result<(), PortMapError>;
}

/// The mapping held, and its schedule.
struct Active<H> {
    mapping: PortMapping,
    gateway: IpAddr,
    handle: H,
    expires_at: Instant,
    renew_at: Instant,
}

impl<H> Active<H> {
    fn new(
        protocol: MappingProtocol,
        gateway: IpAddr,
        grant: Grant,
        handle: H,
        request: &Request,
    ) -> Self {
        let now = Instant::now();
        let mut active = Self {
            mapping: PortMapping {
                external: grant.external,
                protocol,
                lifetime: grant.lifetime,
            },
            gateway,
            handle,
            expires_at: now,
            renew_at: now,
        };
        active.granted(grant, request, now);
        active
    }

    /// Takes a (re)newed grant at `now`. A permanent lease is only trusted for the requested
    /// lifetime since the gateway last confirmed it.
    fn granted(&mut self, grant: Grant, request: &Request, now: Instant) {
        self.mapping.external = grant.external;
        self.mapping.lifetime = grant.lifetime;
        let valid = if grant.lifetime.is_zero() {
            request.lifetime
        } else {
            grant.lifetime
        };
        self.expires_at = now + valid;
        self.renew_at = now + renew_delay(grant.lifetime, request.lifetime);
    }
}

/// Runs until `shutdown` is cancelled, publishing the current mapping (None when there is none)
/// on `updates`; on shutdown deletes the mapping (best effort, bounded to ~1 s).
pub async fn run(
    config: PortMapperConfig,
    updates: watch::Sender<Option<PortMapping>>,
    shutdown: CancellationToken,
) {
    run_with(&System, &config, &updates, &shutdown).await;
}

async fn run_with<B: Backend>(
    backend: &B,
    config: &PortMapperConfig,
    updates: &watch::Sender<Option<PortMapping>>,
    shutdown: &CancellationToken,
) {
    let publish = |mapping: Option<PortMapping>| {
        updates.send_if_modified(|current| {
            let changed = *current != mapping;
            *current = mapping;
            changed
        });
    };
    let Some(port) = NonZeroU16::new(config.listen_port) else {
        tracing::error!("port mapping disabled: the WireGuard listen port is 0");
        publish(None);
        return;
    };
    let request = Request {
        port,
        lifetime: config.lifetime,
        description: config.description.clone(),
    };
    let mut reporter = Reporter::default();
    let mut active: Option<Active<B::Handle>> = None;

    loop {
        let Some(mut held) = active.take() else {
            match discover(backend, config, &request, shutdown).await {
                Round::Shutdown => break,
                Round::Mapped(held) => {
                    log_mapped(reporter.mapped(held.mapping), &held.mapping);
                    publish(Some(held.mapping));
                    active = Some(held);
                }
                Round::Unavailable(why) => {
                    log_unavailable(reporter.unavailable(), &why, config.retry_interval);
                    publish(None);
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(config.retry_interval) => {}
                    }
                }
            }
            continue;
        };

        tokio::select! {
            () = shutdown.cancelled() => {
                release(backend, &held.handle, &held.mapping).await;
                break;
            }
            () = tokio::time::sleep_until(held.renew_at) => {}
        }

        // A new default gateway (another network, a renumbered LAN) means the mapping sits on a
        // router traffic no longer crosses: start over there.
        if config.gateway.is_none()
            && let Ok(now_gateway) = backend.gateway(None)
            && now_gateway != held.gateway
        {
            let why = format!(
                "the default gateway changed from {} to {now_gateway}",
                held.gateway
            );
            log_unavailable(reporter.unavailable(), &why, Duration::ZERO);
            publish(None);
            continue;
        }

        let result = {
            let renewal = backend.renew(&held.handle, &request);
            tokio::pin!(renewal);
            tokio::select! {
                result = &mut renewal => Some(result),
                () = shutdown.cancelled() => {
                    // The renewal may already be on the wire: let it finish, then delete
                    // whichever mapping stands, all within the grace period.
                    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
                        let deleted = match renewal.await {
                            Ok((_, handle)) => backend.unmap(&handle).await,
                            Err(_) => backend.unmap(&held.handle).await,
                        };
                        if let Err(e) = deleted {
                            tracing::debug!(error = %e, "port mapping not deleted");
                        }
                    })
                    .await;
                    None
                }
            }
        };
        let Some(result) = result else { break };
        let now = Instant::now();
        match result {
            Ok((grant, handle)) => {
                held.handle = handle;
                held.granted(grant, &request, now);
                log_mapped(reporter.mapped(held.mapping), &held.mapping);
                publish(Some(held.mapping));
                active = Some(held);
            }
            Err(e) => match renew_retry_delay(held.expires_at.saturating_duration_since(now)) {
                Some(delay) => {
                    tracing::debug!(error = %e, mapping = %held.mapping, retry_in = ?delay, "port mapping renewal failed");
                    held.renew_at = now + delay;
                    active = Some(held);
                }
                None => {
                    let why = format!("renewal failed until expiry: {e}");
                    log_unavailable(reporter.unavailable(), &why, Duration::ZERO);
                    publish(None);
                }
            },
        }
    }
    publish(None);
}

enum Round<H> {
    Mapped(Active<H>),
    Unavailable(String),
    Shutdown,
}

/// One discovery round: every protocol in order until one grants a mapping.
async fn discover<B: Backend>(
    backend: &B,
    config: &PortMapperConfig,
    request: &Request,
    shutdown: &CancellationToken,
) -> Round<B::Handle> {
    let gateway = match backend.gateway(config.gateway) {
        Ok(gateway) => gateway,
        Err(e) => return Round::Unavailable(e.to_string()),
    };
    let mut failures = Vec::new();
    for protocol in attempt_order(&config.protocols, gateway) {
        tracing::debug!(%protocol, %gateway, port = request.port, "asking for a port mapping");
        let attempt = backend.map(protocol, gateway, request);
        tokio::pin!(attempt);
        tokio::select! {
            result = &mut attempt => match result {
                Ok((grant, handle)) => {
                    return Round::Mapped(Active::new(protocol, gateway, grant, handle, request));
                }
                Err(e) => {
                    tracing::debug!(%protocol, %gateway, error = %e, "no port mapping");
                    failures.push(format!("{protocol}: {e}"));
                }
            },
            () = shutdown.cancelled() => {
                // The request may have reached the gateway: if it still grants the mapping within
                // the grace period, delete it rather than leave it behind.
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
                    if let Ok((_, handle)) = attempt.await {
                        let _ = backend.unmap(&handle).await;
                    }
                })
                .await;
                return Round::Shutdown;
            }
        }
    }
    if failures.is_empty() {
        failures.push("no protocol enabled for this gateway".into());
    }
    Round::Unavailable(format!("gateway {gateway}: {}", failures.join("; ")))
}

/// Deletes the mapping on stop, bounded by the grace period.
async fn release<B: Backend>(backend: &B, handle: &B::Handle, mapping: &PortMapping) {
    match tokio::time::timeout(SHUTDOWN_GRACE, backend.unmap(handle)).await {
        Ok(Ok(())) => tracing::info!(%mapping, "port mapping removed"),
        Ok(Err(e)) => {
            tracing::info!(%mapping, error = %e, "port mapping not removed; it expires on its own")
        }
        Err(_) => {
            tracing::info!(%mapping, "port mapping not removed in time; it expires on its own")
        }
    }
}

fn log_mapped(report: Report, mapping: &PortMapping) {
    let routable = is_publicly_routable(mapping.external.ip());
    match report {
        Report::Renewed => {
            tracing::debug!(%mapping, "port mapping renewed");
            return;
        }
        Report::Changed { from } => tracing::info!(
            protocol = %mapping.protocol,
            external = %mapping.external,
            previous = %from.external,
            lifetime_s = mapping.lifetime.as_secs(),
            "port mapping changed"
        ),
        _ => tracing::info!(
            protocol = %mapping.protocol,
            external = %mapping.external,
            lifetime_s = mapping.lifetime.as_secs(),
            "port mapping obtained"
        ),
    }
    if !routable {
        tracing::warn!(
            external = %mapping.external,
            "the gateway's external address is not publicly routable (another NAT in front of \
             it?): only peers inside that outer network can use the mapping"
        );
    }
}

fn log_unavailable(report: Report, why: &str, retry_in: Duration) {
    match report {
        Report::Lost { from } => {
            tracing::warn!(mapping = %from, reason = why, "port mapping lost; asking the gateway again")
        }
        Report::Unavailable => tracing::info!(
            reason = why,
            retry_every = ?retry_in,
            "no port mapping: the gateway answers none of the enabled protocols (PCP, NAT-PMP, UPnP-IGD)"
        ),
        _ => tracing::debug!(reason = why, retry_in = ?retry_in, "still no port mapping"),
    }
}

// ---------------------------------------------------------------------------------------------
// The real network.
// ---------------------------------------------------------------------------------------------

/// Speaks to the real gateway.
struct System;

type IgdGateway = igd_next::aio::Gateway<igd_next::aio::tokio::Tokio>;

enum SystemHandle {
    Pcp {
        gateway: IpAddr,
        client: IpAddr,
        port: NonZeroU16,
        nonce: crab_nat::pcp::Nonce,
        external: SocketAddr,
    },
    NatPmp {
        gateway: Ipv4Addr,
        port: NonZeroU16,
        external_port: u16,
    },
    Upnp {
        gateway: Box<IgdGateway>,
        local: SocketAddr,
        external_port: u16,
        /// Seconds; 0 when the gateway only takes permanent leases.
        lease: u32,
    },
}

impl Backend for System {
    type Handle = SystemHandle;

    fn gateway(&self, configured: Option<IpAddr>) -> Result<IpAddr, PortMapError> {
        if let Some(gateway) = configured {
            return Ok(gateway);
        }
        // `thread-self`, not `self`: `/proc/self/net` shows the main thread's network namespace,
        // and callers (tests, tools) may run this on a thread that entered another one.
        let table = std::fs::read_to_string("/proc/thread-self/net/route")
            .map_err(PortMapError::RouteTable)?;
        parse_default_gateway(&table)
            .map(IpAddr::V4)
            .ok_or(PortMapError::NoDefaultRoute)
    }

    async fn map(
        &self,
        protocol: MappingProtocol,
        gateway: IpAddr,
        request: &Request,
    ) -> Result<(Grant, SystemHandle), PortMapError> {
        match (protocol, gateway) {
            (MappingProtocol::Pcp, _) => {
                let client = local_address_towards(gateway)?;
                pcp_map(gateway, client, None, None, request).await
            }
            (MappingProtocol::NatPmp, IpAddr::V4(gateway)) => {
                natpmp_map(gateway, None, request).await
            }
            (MappingProtocol::Upnp, IpAddr::V4(gateway)) => {
                tokio::time::timeout(UPNP_ATTEMPT_TIMEOUT, upnp_map(gateway, request))
                    .await
                    .map_err(|_| PortMapError::Timeout(UPNP_ATTEMPT_TIMEOUT))?
            }
            (_, IpAddr::V6(_)) => Err(PortMapError::NotOverIpv6(protocol)),
        }
    }

    async fn renew(
        &self,
        handle: &SystemHandle,
        request: &Request,
    ) -> Result<(Grant, SystemHandle), PortMapError> {
        match handle {
            SystemHandle::Pcp {
                gateway,
                client,
                nonce,
                external,
                ..
            } => pcp_map(*gateway, *client, Some(*nonce), Some(*external), request).await,
            SystemHandle::NatPmp {
                gateway,
                external_port,
                ..
            } => natpmp_map(*gateway, Some(*external_port), request).await,
            SystemHandle::Upnp {
                gateway,
                local,
                external_port,
                lease,
            } => tokio::time::timeout(
                UPNP_ATTEMPT_TIMEOUT,
                upnp_renew(gateway, *local, *external_port, *lease, request),
            )
            .await
            .map_err(|_| PortMapError::Timeout(UPNP_ATTEMPT_TIMEOUT))?,
        }
    }

    async fn unmap(&self, handle: &SystemHandle) -> Result<(), PortMapError> {
        match handle {
            SystemHandle::Pcp {
                gateway,
                client,
                port,
                nonce,
                ..
            } => crab_nat::pcp::try_drop_mapping(
                (*gateway).into(),
                *client,
                *nonce,
                crab_nat::pcp::DropMappingRange::Single {
                    protocol: crab_nat::InternetProtocol::Udp,
                    internal_port: *port,
                },
                Some(PMP_TIMEOUTS),
            )
            .await
            .map_err(PortMapError::Pcp),
            SystemHandle::NatPmp { gateway, port, .. } => crab_nat::natpmp::try_drop_mapping(
                (*gateway).into(),
                crab_nat::InternetProtocol::Udp,
                Some(*port),
                Some(PMP_TIMEOUTS),
            )
            .await
            .map_err(PortMapError::NatPmp),
            SystemHandle::Upnp {
                gateway,
                external_port,
                ..
            } => gateway
                .remove_port(igd_next::PortMappingProtocol::UDP, *external_port)
                .await
                .map_err(upnp_error),
        }
    }
}

/// The address this host speaks to `gateway` from (PCP and UPnP name it in their requests).
/// Connecting a UDP socket sends nothing; it only asks the kernel for the route's source.
fn local_address_towards(gateway: IpAddr) -> Result<IpAddr, PortMapError> {
    let error = |source| PortMapError::LocalAddress { gateway, source };
    let unspecified: IpAddr = match gateway {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind((unspecified, 0)).map_err(error)?;
    socket
        .connect((gateway, crab_nat::GATEWAY_PORT))
        .map_err(error)?;
    Ok(socket.local_addr().map_err(error)?.ip())
}

/// NAT-PMP/PCP options: the lifetime asked for, and the external port hoped for (the one held,
/// else the listen port itself, which keeps logs and router tables readable).
fn pmp_options(request: &Request, external_port: Option<u16>) -> crab_nat::PortMappingOptions {
    crab_nat::PortMappingOptions {
        external_port: NonZeroU16::new(external_port.unwrap_or(request.port.get())),
        lifetime_seconds: Some(lifetime_seconds(request.lifetime)),
        timeout_config: Some(PMP_TIMEOUTS),
    }
}

/// A successful NAT-PMP/PCP answer with lifetime 0 would be a deletion: no mapping to keep.
fn checked_lifetime(seconds: u32) -> Result<Duration, PortMapError> {
    if seconds == 0 {
        return Err(PortMapError::ZeroLifetime);
    }
    Ok(Duration::from_secs(seconds.into()))
}

/// A PCP MAP request (RFC 6887 §11). A renewal repeats the nonce, which proves ownership, and
/// suggests the external address and port held so far.
async fn pcp_map(
    gateway: IpAddr,
    client: IpAddr,
    nonce: Option<crab_nat::pcp::Nonce>,
    previous: Option<SocketAddr>,
    request: &Request,
) -> Result<(Grant, SystemHandle), PortMapError> {
    let mapping = crab_nat::pcp::port_mapping(
        crab_nat::pcp::BaseMapRequest::new(
            gateway.into(),
            client,
            crab_nat::InternetProtocol::Udp,
            request.port,
        ),
        nonce,
        previous.map(|p| p.ip()),
        pmp_options(request, previous.map(|p| p.port())),
    )
    .await?;
    let crab_nat::PortMappingType::Pcp {
        nonce, external_ip, ..
    } = mapping.mapping_type()
    else {
        return Err(PortMapError::Internal(
            "crab_nat's PCP request returned a NAT-PMP mapping",
        ));
    };
    // PCP carries every address as IPv6; crab_nat unmaps IPv4 already, but be sure.
    let external_ip = match external_ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let external = SocketAddr::new(usable_external(external_ip)?, mapping.external_port().get());
    let lifetime = checked_lifetime(mapping.lifetime())?;
    Ok((
        Grant { external, lifetime },
        SystemHandle::Pcp {
            gateway,
            client,
            port: request.port,
            nonce,
            external,
        },
    ))
}

/// NAT-PMP: the public address request (RFC 6886 §3.2), then a UDP mapping request (§3.3). A
/// renewal is the same pair again, suggesting the external port held (§3.3 asks for that), so a
/// changed public address is noticed too.
async fn natpmp_map(
    gateway: Ipv4Addr,
    previous_port: Option<u16>,
    request: &Request,
) -> Result<(Grant, SystemHandle), PortMapError> {
    let external_ip =
        crab_nat::natpmp::external_address(gateway.into(), Some(PMP_TIMEOUTS)).await?;
    let external_ip = usable_external(external_ip.into())?;
    let mapping = crab_nat::natpmp::port_mapping(
        gateway.into(),
        crab_nat::InternetProtocol::Udp,
        request.port,
        pmp_options(request, previous_port),
    )
    .await?;
    let lifetime = checked_lifetime(mapping.lifetime())?;
    let external_port = mapping.external_port().get();
    Ok((
        Grant {
            external: SocketAddr::new(external_ip, external_port),
            lifetime,
        },
        SystemHandle::NatPmp {
            gateway,
            port: request.port,
            external_port,
        },
    ))
}

fn upnp_error(e: impl fmt::Display) -> PortMapError {
    PortMapError::Upnp(e.to_string())
}

/// UPnP-IGD: SSDP search, the gateway's external address, then AddPortMapping for the listen
/// port, or any free port when that one is taken.
async fn upnp_map(
    gateway: Ipv4Addr,
    request: &Request,
) -> Result<(Grant, SystemHandle), PortMapError> {
    let mut options = igd_next::SearchOptions::default();
    options.timeout = Some(UPNP_SEARCH_TIMEOUT);
    options.single_search_timeout = Some(UPNP_SEARCH_TIMEOUT);
    options.gateway_ip_version = igd_next::GatewayIpVersion::V4;
    let igd = igd_next::aio::tokio::search_gateway(options)
        .await
        .map_err(upnp_error)?;
    if igd.addr.ip() != IpAddr::V4(gateway) {
        return Err(PortMapError::UpnpNotGateway {
            found: igd.addr.ip(),
            gateway: gateway.into(),
        });
    }
    let local = SocketAddr::new(local_address_towards(gateway.into())?, request.port.get());
    let external_ip = usable_external(igd.get_external_ip().await.map_err(upnp_error)?)?;

    let mut lease = lifetime_seconds(request.lifetime);
    let wanted = request.port.get();
    let external_port = match upnp_add(&igd, wanted, local, &mut lease, request).await {
        Ok(()) => wanted,
        // Taken by another client, or outside the ports the router lets clients ask for
        // (miniupnpd's permission rules answer "not authorized"): let the gateway pick.
        Err(
            e @ (igd_next::AddPortError::PortInUse | igd_next::AddPortError::ActionNotAuthorized),
        ) => {
            tracing::debug!(port = wanted, error = %e, "UPnP: asking for any external port instead");
            upnp_add_any(&igd, local, &mut lease, request).await?
        }
        Err(e) => return Err(upnp_error(e)),
    };
    let grant = Grant {
        external: SocketAddr::new(external_ip, external_port),
        lifetime: Duration::from_secs(lease.into()),
    };
    let handle = SystemHandle::Upnp {
        gateway: Box::new(igd),
        local,
        external_port,
        lease,
    };
    Ok((grant, handle))
}

/// UPnP has no renewal: AddPortMapping again for the same client and port refreshes the lease
/// (UPnP IGD 2.0, §2.5.16). A gateway that gave the port to someone else meanwhile refuses.
async fn upnp_renew(
    igd: &IgdGateway,
    local: SocketAddr,
    external_port: u16,
    mut lease: u32,
    request: &Request,
) -> Result<(Grant, SystemHandle), PortMapError> {
    let external_ip = usable_external(igd.get_external_ip().await.map_err(upnp_error)?)?;
    upnp_add(igd, external_port, local, &mut lease, request)
        .await
        .map_err(upnp_error)?;
    let grant = Grant {
        external: SocketAddr::new(external_ip, external_port),
        lifetime: Duration::from_secs(lease.into()),
    };
    let handle = SystemHandle::Upnp {
        gateway: Box::new(igd.clone()),
        local,
        external_port,
        lease,
    };
    Ok((grant, handle))
}

/// AddPortMapping; IGDv1 gateways that only take permanent leases (error 725) get one.
async fn upnp_add(
    igd: &IgdGateway,
    external_port: u16,
    local: SocketAddr,
    lease: &mut u32,
    request: &Request,
) -> Result<(), igd_next::AddPortError> {
    let udp = igd_next::PortMappingProtocol::UDP;
    match igd
        .add_port(udp, external_port, local, *lease, &request.description)
        .await
    {
        Err(igd_next::AddPortError::OnlyPermanentLeasesSupported) if *lease != 0 => {
            *lease = 0;
            igd.add_port(udp, external_port, local, 0, &request.description)
                .await
        }
        other => other,
    }
}

/// AddAnyPortMapping (or random AddPortMapping tries on IGDv1), same permanent-lease fallback.
async fn upnp_add_any(
    igd: &IgdGateway,
    local: SocketAddr,
    lease: &mut u32,
    request: &Request,
) -> Result<u16, PortMapError> {
    let udp = igd_next::PortMappingProtocol::UDP;
    match igd
        .add_any_port(udp, local, *lease, &request.description)
        .await
    {
        Err(igd_next::AddAnyPortError::OnlyPermanentLeasesSupported) if *lease != 0 => {
            *lease = 0;
            igd.add_any_port(udp, local, 0, &request.description).await
        }
        other => other,
    }
    .map_err(upnp_error)
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, VecDeque};
    use std::sync::{Arc, Mutex};

    use super::*;

    const GATEWAY: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 1));
    const PORT: u16 = 51820;

    fn mapping(protocol: MappingProtocol, external: &str) -> PortMapping {
        PortMapping {
            external: external.parse().unwrap(),
            protocol,
            lifetime: Duration::from_secs(60),
        }
    }

    // ---- pure decisions ----------------------------------------------------------------------

    #[test]
    fn protocols_are_tried_in_the_configured_order_once_each() {
        use MappingProtocol::*;
        assert_eq!(
            attempt_order(&DEFAULT_PROTOCOLS, GATEWAY),
            vec![Pcp, NatPmp, Upnp]
        );
        assert_eq!(attempt_order(&[Upnp, Pcp, Upnp], GATEWAY), vec![Upnp, Pcp]);
        assert_eq!(attempt_order(&[], GATEWAY), vec![]);
        // NAT-PMP is IPv4-only, UPnP is searched for on IPv4: an IPv6 gateway gets PCP.
        assert_eq!(
            attempt_order(&DEFAULT_PROTOCOLS, "fe80::1".parse().unwrap()),
            vec![Pcp]
        );
    }

    #[test]
    fn renewal_comes_halfway_through_the_granted_lifetime() {
        let requested = DEFAULT_LIFETIME;
        assert_eq!(
            renew_delay(Duration::from_secs(7200), requested),
            Duration::from_secs(3600)
        );
        assert_eq!(
            renew_delay(Duration::from_secs(10), requested),
            Duration::from_secs(5)
        );
        // A permanent lease is refreshed as if the requested lifetime had been granted.
        assert_eq!(
            renew_delay(Duration::ZERO, requested),
            Duration::from_secs(3600)
        );
        // Tiny grants do not turn into a busy loop.
        assert_eq!(
            renew_delay(Duration::from_secs(1), requested),
            MIN_RENEW_DELAY
        );
    }

    #[test]
    fn failed_renewals_retry_halfway_to_expiry_then_give_up() {
        assert_eq!(
            renew_retry_delay(Duration::from_secs(100)),
            Some(Duration::from_secs(50))
        );
        assert_eq!(
            renew_retry_delay(Duration::from_secs(2)),
            Some(Duration::from_secs(1))
        );
        assert_eq!(renew_retry_delay(Duration::from_millis(1999)), None);
        assert_eq!(renew_retry_delay(Duration::ZERO), None);
    }

    #[test]
    fn requested_lifetimes_fit_the_wire_field() {
        assert_eq!(lifetime_seconds(DEFAULT_LIFETIME), 7200);
        // 0 would be a deletion request.
        assert_eq!(lifetime_seconds(Duration::ZERO), 1);
        assert_eq!(lifetime_seconds(Duration::from_millis(300)), 1);
        assert_eq!(lifetime_seconds(Duration::MAX), u32::MAX);
    }

    #[test]
    fn unusable_external_addresses_are_refused() {
        for bad in [
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::",
            "::ffff:0.0.0.0",
            "ff02::1",
        ] {
            assert!(usable_external(bad.parse().unwrap()).is_err(), "{bad}");
        }
        for good in ["203.0.113.7", "10.0.0.1", "2001:db8::1"] {
            assert!(usable_external(good.parse().unwrap()).is_ok(), "{good}");
        }
    }

    #[test]
    fn routability_of_external_addresses() {
        for public in [
            "1.1.1.1",
            "11.88.0.1",
            "100.128.0.1",
            "2a00:1450::1",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_publicly_routable(public.parse().unwrap()), "{public}");
        }
        for inner in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "169.254.1.1",
            "192.0.2.1",
            "198.18.0.1",
            "198.19.255.1",
            "240.0.0.1",
            "0.1.2.3",
            "fd00::1",
            "fe80::1",
            "::1",
            "2001:db8::1",
            "::ffff:192.168.0.1",
        ] {
            assert!(!is_publicly_routable(inner.parse().unwrap()), "{inner}");
        }
    }

    const ROUTE_TABLE: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth1\t00000000\t0101A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0
eth0\t0058A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth0\t00000000\t0158A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
";

    #[test]
    fn the_default_gateway_is_the_lowest_metric_default_route() {
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_default_gateway(ROUTE_TABLE),
                Some(Ipv4Addr::new(192, 168, 88, 1))
            );
        }
        // A link route (no gateway flag), a down route and garbage are ignored.
        let header = ROUTE_TABLE.lines().next().unwrap();
        for table in [
            format!("{header}\neth0\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0\n"),
            format!("{header}\neth0\t00000000\t0158A8C0\t0002\t0\t0\t0\t00000000\t0\t0\t0\n"),
            format!("{header}\neth0\tzz\t0158A8C0\t0003\n\n\t\n"),
            String::new(),
        ] {
            assert_eq!(parse_default_gateway(&table), None, "{table}");
        }
    }

    #[test]
    fn protocol_names() {
        assert_eq!(MappingProtocol::Pcp.to_string(), "PCP");
        assert_eq!(MappingProtocol::NatPmp.to_string(), "NAT-PMP");
        assert_eq!(MappingProtocol::Upnp.to_string(), "UPnP-IGD");
        for p in DEFAULT_PROTOCOLS {
            assert_eq!(p.to_string().parse::<MappingProtocol>(), Ok(p));
        }
        assert_eq!(" natpmp ".parse(), Ok(MappingProtocol::NatPmp));
        assert_eq!("UPNP".parse(), Ok(MappingProtocol::Upnp));
        assert!("stun".parse::<MappingProtocol>().is_err());
        let mut m = mapping(MappingProtocol::Upnp, "203.0.113.7:51820");
        assert_eq!(
            m.to_string(),
            "203.0.113.7:51820 via UPnP-IGD (lifetime 60s)"
        );
        m.lifetime = Duration::ZERO;
        assert_eq!(
            m.to_string(),
            "203.0.113.7:51820 via UPnP-IGD (permanent lease)"
        );
    }

    #[test]
    fn the_reporter_speaks_once_per_change() {
        let mut r = Reporter::default();
        let a = mapping(MappingProtocol::Pcp, "203.0.113.7:51820");
        let b = mapping(MappingProtocol::Pcp, "203.0.113.8:51820");
        assert_eq!(r.unavailable(), Report::Unavailable);
        assert_eq!(r.unavailable(), Report::StillUnavailable);
        assert_eq!(r.unavailable(), Report::StillUnavailable);
        assert_eq!(r.mapped(a), Report::Obtained);
        assert_eq!(
            r.mapped(PortMapping {
                lifetime: Duration::from_secs(30),
                ..a
            }),
            Report::Renewed
        );
        let renewed = PortMapping {
            lifetime: Duration::from_secs(30),
            ..a
        };
        assert_eq!(r.mapped(b), Report::Changed { from: renewed });
        assert_eq!(
            r.mapped(PortMapping {
                protocol: MappingProtocol::NatPmp,
                ..b
            }),
            Report::Changed { from: b }
        );
        assert!(matches!(r.unavailable(), Report::Lost { .. }));
        assert_eq!(r.unavailable(), Report::StillUnavailable);
        assert_eq!(r.mapped(a), Report::Obtained);
    }

    // ---- the loop, against a scripted gateway on paused time ------------------------------------

    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Call {
        Map(MappingProtocol, IpAddr),
        Renew(u32),
        Unmap(u32),
    }

    #[derive(Default)]
    struct Script {
        /// Successive answers per protocol; none left: the protocol fails.
        maps: HashMap<MappingProtocol, VecDeque<Option<Grant>>>,
        /// Successive renewal answers; none left: the previous grant again.
        renewals: VecDeque<Option<Grant>>,
        gateways: VecDeque<IpAddr>,
        map_delay: Duration,
        unmap_delay: Duration,
        calls: Vec<(Duration, Call)>,
        last: Option<Grant>,
        next_id: u32,
    }

    #[derive(Clone)]
    struct Fake {
        start: Instant,
        script: Arc<Mutex<Script>>,
    }

    impl Fake {
        fn new(script: Script) -> Self {
            Self {
                start: Instant::now(),
                script: Arc::new(Mutex::new(script)),
            }
        }
        fn record(&self, call: Call) {
            let at = self.start.elapsed();
            self.script.lock().unwrap().calls.push((at, call));
        }
        fn calls(&self) -> Vec<(Duration, Call)> {
            self.script.lock().unwrap().calls.clone()
        }
    }

    fn grant(external: &str, lifetime_s: u64) -> Option<Grant> {
        Some(Grant {
            external: external.parse().unwrap(),
            lifetime: Duration::from_secs(lifetime_s),
        })
    }

    impl Backend for Fake {
        type Handle = u32;

        fn gateway(&self, configured: Option<IpAddr>) -> Result<IpAddr, PortMapError> {
            if let Some(gateway) = configured {
                return Ok(gateway);
            }
            let mut s = self.script.lock().unwrap();
            if s.gateways.len() > 1 {
                return Ok(s.gateways.pop_front().unwrap());
            }
            s.gateways
                .front()
                .copied()
                .ok_or(PortMapError::NoDefaultRoute)
        }

        async fn map(
            &self,
            protocol: MappingProtocol,
            gateway: IpAddr,
            _: &Request,
        ) -> Result<(Grant, u32), PortMapError> {
            self.record(Call::Map(protocol, gateway));
            let delay = self.script.lock().unwrap().map_delay;
            tokio::time::sleep(delay).await;
            let mut s = self.script.lock().unwrap();
            let answer = s
                .maps
                .get_mut(&protocol)
                .and_then(VecDeque::pop_front)
                .flatten();
            let grant = answer.ok_or(PortMapError::Timeout(Duration::from_secs(4)))?;
            s.last = Some(grant);
            s.next_id += 1;
            Ok((grant, s.next_id))
        }

        async fn renew(&self, handle: &u32, _: &Request) -> Result<(Grant, u32), PortMapError> {
            self.record(Call::Renew(*handle));
            let mut s = self.script.lock().unwrap();
            let answer = match s.renewals.pop_front() {
                Some(answer) => answer,
                None => s.last,
            };
            let grant = answer.ok_or(PortMapError::Timeout(Duration::from_secs(4)))?;
            s.last = Some(grant);
            Ok((grant, *handle))
        }

        async fn unmap(&self, handle: &u32) -> Result<(), PortMapError> {
            let delay = self.script.lock().unwrap().unmap_delay;
            tokio::time::sleep(delay).await;
            self.record(Call::Unmap(*handle));
            Ok(())
        }
    }

    fn script() -> Script {
        Script {
            gateways: VecDeque::from([GATEWAY]),
            ..Script::default()
        }
    }

    struct Running {
        fake: Fake,
        updates: watch::Receiver<Option<PortMapping>>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(fake: &Fake, config: PortMapperConfig) -> Running {
        let (tx, updates) = watch::channel(None);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let (fake, shutdown) = (fake.clone(), shutdown.clone());
            async move { run_with(&fake, &config, &tx, &shutdown).await }
        });
        Running {
            fake: fake.clone(),
            updates,
            shutdown,
            task,
        }
    }

    impl Running {
        /// Stops the mapper; returns how long stopping took.
        async fn stop(self) -> (Duration, Vec<(Duration, Call)>, Option<PortMapping>) {
            let asked = Instant::now();
            self.shutdown.cancel();
            self.task.await.unwrap();
            let last = *self.updates.borrow();
            (asked.elapsed(), self.fake.calls(), last)
        }
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[tokio::test(start_paused = true)]
    async fn falls_back_in_order_and_publishes_the_first_grant() {
        let mut s = script();
        s.maps.insert(
            MappingProtocol::NatPmp,
            VecDeque::from([grant("203.0.113.7:40000", 7200)]),
        );
        s.maps.insert(
            MappingProtocol::Upnp,
            VecDeque::from([grant("203.0.113.7:51820", 7200)]),
        );
        let fake = Fake::new(s);
        let mut run = start(&fake, PortMapperConfig::new(PORT));
        run.updates.changed().await.unwrap();
        let got = run.updates.borrow().unwrap();
        assert_eq!(got.protocol, MappingProtocol::NatPmp);
        assert_eq!(got.external, "203.0.113.7:40000".parse().unwrap());
        assert_eq!(got.lifetime, Duration::from_secs(7200));
        let (_, calls, last) = run.stop().await;
        let calls: Vec<Call> = calls.into_iter().map(|(_, c)| c).collect();
        assert_eq!(
            calls,
            vec![
                Call::Map(MappingProtocol::Pcp, GATEWAY),
                Call::Map(MappingProtocol::NatPmp, GATEWAY),
                Call::Unmap(1),
            ]
        );
        assert_eq!(last, None, "stopping withdraws the mapping");
    }

    #[tokio::test(start_paused = true)]
    async fn renews_at_half_the_granted_lifetime() {
        let mut s = script();
        s.maps.insert(
            MappingProtocol::Pcp,
            VecDeque::from([grant("203.0.113.7:51820", 10)]),
        );
        let fake = Fake::new(s);
        let run = start(&fake, PortMapperConfig::new(PORT));
        tokio::time::sleep(secs(16.0)).await;
        assert!(run.updates.borrow().is_some());
        let (_, calls, _) = run.stop().await;
        let renewals: Vec<Duration> = calls
            .iter()
            .filter(|(_, c)| matches!(c, Call::Renew(_)))
            .map(|(at, _)| *at)
            .collect();
        assert_eq!(renewals, vec![secs(5.0), secs(10.0), secs(15.0)]);
    }

    #[tokio::test(start_paused = true)]
    async fn backs_off_when_nothing_answers() {
        let fake = Fake::new(script());
        let mut config = PortMapperConfig::new(PORT);
        config.retry_interval = Duration::from_secs(300);
        let run = start(&fake, config);
        tokio::time::sleep(secs(650.0)).await;
        assert_eq!(*run.updates.borrow(), None);
        let (stopped_in, calls, _) = run.stop().await;
        let rounds: Vec<Duration> = calls
            .iter()
            .filter(|(_, c)| *c == Call::Map(MappingProtocol::Pcp, GATEWAY))
            .map(|(at, _)| *at)
            .collect();
        assert_eq!(rounds, vec![secs(0.0), secs(300.0), secs(600.0)]);
        assert_eq!(calls.len(), 9, "three protocols per round: {calls:?}");
        assert!(
            stopped_in < secs(0.1),
            "nothing to delete, stop is immediate"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_default_route_is_a_quiet_back_off() {
        let fake = Fake::new(Script::default());
        let run = start(&fake, PortMapperConfig::new(PORT));
        tokio::time::sleep(secs(1000.0)).await;
        assert_eq!(*run.updates.borrow(), None);
        let (_, calls, _) = run.stop().await;
        assert!(
            calls.is_empty(),
            "nothing to ask without a gateway: {calls:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failed_renewals_retry_until_expiry_then_map_again() {
        let mut s = script();
        s.maps.insert(
            MappingProtocol::Pcp,
            VecDeque::from([
                grant("203.0.113.7:51820", 100),
                grant("203.0.113.9:51820", 100),
            ]),
        );
        s.renewals = VecDeque::from([None; 8]);
        // The new round takes a second, so the withdrawal is seen before the new grant.
        s.map_delay = secs(1.0);
        let fake = Fake::new(s);
        let mut run = start(&fake, PortMapperConfig::new(PORT));
        run.updates.changed().await.unwrap();
        run.updates.changed().await.unwrap();
        assert_eq!(
            *run.updates.borrow(),
            None,
            "an expired mapping is withdrawn"
        );
        run.updates.changed().await.unwrap();
        assert_eq!(
            run.updates.borrow().unwrap().external,
            "203.0.113.9:51820".parse().unwrap()
        );
        let (_, calls, _) = run.stop().await;
        // Tokio's timer wheel counts whole milliseconds (rounding up).
        let renewals: Vec<u128> = calls
            .iter()
            .filter(|(_, c)| matches!(c, Call::Renew(_)))
            .map(|(at, _)| at.as_millis())
            .collect();
        // Granted at 1 s (the scripted map takes a second), expiring at 101 s: renewed halfway,
        // then halfway to expiry each time, until less than 2 s are left.
        assert_eq!(
            renewals,
            vec![51_000, 76_000, 88_500, 94_750, 97_875, 99_438]
        );
        let remap = calls
            .iter()
            .filter(|(_, c)| matches!(c, Call::Map(MappingProtocol::Pcp, _)))
            .nth(1)
            .expect("mapped again after the loss")
            .0;
        assert_eq!(
            remap.as_millis(),
            99_438,
            "asked again right after giving up"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_external_endpoint_is_published() {
        let mut s = script();
        s.maps.insert(
            MappingProtocol::Pcp,
            VecDeque::from([grant("203.0.113.7:51820", 10)]),
        );
        s.renewals = VecDeque::from([
            grant("203.0.113.7:51820", 10),
            grant("198.51.100.1:40000", 10),
        ]);
        let fake = Fake::new(s);
        let mut run = start(&fake, PortMapperConfig::new(PORT));
        run.updates.changed().await.unwrap();
        let first = run.updates.borrow_and_update().unwrap();
        assert_eq!(first.external, "203.0.113.7:51820".parse().unwrap());
        // The same grant renewed is no news; the changed one is.
        run.updates.changed().await.unwrap();
        assert_eq!(
            run.fake.calls().len(),
            3,
            "map, same renewal, changed renewal"
        );
        assert_eq!(
            run.updates.borrow().unwrap().external,
            "198.51.100.1:40000".parse().unwrap()
        );
        run.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_default_gateway_means_mapping_again_there() {
        let other: IpAddr = "10.0.0.1".parse().unwrap();
        let mut s = script();
        s.gateways = VecDeque::from([GATEWAY, other]);
        s.maps.insert(
            MappingProtocol::Pcp,
            VecDeque::from([
                grant("203.0.113.7:51820", 10),
                grant("198.51.100.1:51820", 10),
            ]),
        );
        let fake = Fake::new(s);
        let run = start(&fake, PortMapperConfig::new(PORT));
        tokio::time::sleep(secs(6.0)).await;
        let (_, calls, _) = run.stop().await;
        let calls: Vec<Call> = calls.into_iter().map(|(_, c)| c).collect();
        assert_eq!(
            calls,
            vec![
                Call::Map(MappingProtocol::Pcp, GATEWAY),
                Call::Map(MappingProtocol::Pcp, other),
                Call::Unmap(2),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_is_bounded_when_the_gateway_hangs() {
        let mut s = script();
        s.maps.insert(
            MappingProtocol::Pcp,
            VecDeque::from([grant("203.0.113.7:51820", 7200)]),
        );
        s.unmap_delay = Duration::from_secs(3600);
        let fake = Fake::new(s);
        let mut run = start(&fake, PortMapperConfig::new(PORT));
        run.updates.changed().await.unwrap();
        let (stopped_in, calls, last) = run.stop().await;
        assert!(
            stopped_in <= SHUTDOWN_GRACE + secs(0.01),
            "stop took {stopped_in:?}"
        );
        assert!(!calls.iter().any(|(_, c)| matches!(c, Call::Unmap(_))));
        assert_eq!(last, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_mapping_granted_while_stopping_is_deleted() {
        let mut s = script();
        s.maps.insert(
            MappingProtocol::Pcp,
            VecDeque::from([grant("203.0.113.7:51820", 7200)]),
        );
        s.map_delay = secs(0.5);
        let fake = Fake::new(s);
        let run = start(&fake, PortMapperConfig::new(PORT));
        tokio::time::sleep(secs(0.1)).await;
        let (stopped_in, calls, last) = run.stop().await;
        let calls: Vec<Call> = calls.into_iter().map(|(_, c)| c).collect();
        assert_eq!(
            calls,
            vec![Call::Map(MappingProtocol::Pcp, GATEWAY), Call::Unmap(1)]
        );
        assert!(stopped_in < SHUTDOWN_GRACE);
        assert_eq!(last, None);
    }

    #[tokio::test(start_paused = true)]
    async fn listen_port_zero_maps_nothing() {
        let fake = Fake::new(script());
        let run = start(&fake, PortMapperConfig::new(0));
        tokio::time::sleep(secs(1.0)).await;
        assert!(run.task.is_finished());
        let (_, calls, last) = run.stop().await;
        assert!(calls.is_empty());
        assert_eq!(last, None);
    }

    #[test]
    fn the_mapper_can_be_spawned() {
        fn send<T: Send + 'static>(_: &T) {}
        let (tx, _rx) = watch::channel(None);
        let future = run(PortMapperConfig::new(PORT), tx, CancellationToken::new());
        send(&future);
    }

    // ---- untrusted answers ---------------------------------------------------------------------

    mod fuzz {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestCaseError, TestRunner};

        use super::*;

        /// A gateway answer: raw bytes, or a plausible NAT-PMP/PCP header with arbitrary fields
        /// (so the decoders get past the version and opcode checks), or a well-formed NAT-PMP
        /// mapping answer with arbitrary port, lifetime and epoch.
        fn answer() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..80),
                (
                    prop_oneof![Just(0u8), Just(2u8), any::<u8>()],
                    prop_oneof![Just(0x80u8), Just(0x81), Just(0x82), any::<u8>()],
                    proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 0..1200),
                )
                    .prop_map(|(version, opcode, rest)| {
                        let mut bytes = vec![version, opcode];
                        bytes.extend(rest);
                        bytes
                    }),
                (any::<u32>(), any::<u16>(), any::<u32>()).prop_map(|(epoch, external, life)| {
                    let mut bytes = vec![0, 0x81, 0, 0];
                    bytes.extend(epoch.to_be_bytes());
                    bytes.extend(PORT.to_be_bytes());
                    bytes.extend(external.to_be_bytes());
                    bytes.extend(life.to_be_bytes());
                    bytes
                }),
            ]
        }

        /// The public address answer NAT-PMP asks first: well-formed with any address, or junk.
        fn address_answer() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                any::<[u8; 4]>().prop_map(|ip| {
                    let mut bytes = vec![0, 0x80, 0, 0, 0, 0, 0, 1];
                    bytes.extend(ip);
                    bytes
                }),
                proptest::collection::vec(any::<u8>(), 0..20),
            ]
        }

        /// A fake gateway on a loopback address of its own (127/8 is all local on Linux),
        /// answering each request with the current case's bytes.
        #[test]
        fn gateway_answers_never_panic_the_decoders() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let pid = std::process::id();
            let gateway = Ipv4Addr::new(127, 88, (pid >> 8) as u8, pid as u8);
            let answers: Arc<Mutex<(Vec<u8>, Vec<u8>)>> = Arc::default();
            let socket = runtime
                .block_on(tokio::net::UdpSocket::bind((
                    gateway,
                    crab_nat::GATEWAY_PORT,
                )))
                .unwrap_or_else(|e| panic!("fake gateway on {gateway}:5351: {e}"));
            runtime.spawn({
                let answers = answers.clone();
                async move {
                    let mut buf = [0u8; 1500];
                    while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                        // NAT-PMP's public address request is the 2-byte [0, 0].
                        let reply = {
                            let answers = answers.lock().unwrap();
                            if buf[..n] == [0, 0] {
                                answers.0.clone()
                            } else {
                                answers.1.clone()
                            }
                        };
                        let _ = socket.send_to(&reply, from).await;
                    }
                }
            });

            let request = Request {
                port: NonZeroU16::new(PORT).unwrap(),
                lifetime: DEFAULT_LIFETIME,
                description: DEFAULT_DESCRIPTION.into(),
            };
            // Proof the fake gateway is really asked and the success path really decoded.
            let granted = std::sync::atomic::AtomicUsize::new(0);
            let mut runner = TestRunner::new(Config {
                cases: 256,
                failure_persistence: None,
                ..Config::default()
            });
            runner
                .run(&(address_answer(), answer()), |(address, mapping)| {
                    *answers.lock().unwrap() = (address, mapping);
                    for protocol in [MappingProtocol::Pcp, MappingProtocol::NatPmp] {
                        let outcome =
                            runtime.block_on(System.map(protocol, gateway.into(), &request));
                        if let Ok((grant, _)) = outcome {
                            granted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            // Whatever got through is a usable mapping.
                            prop_assert_ne!(grant.external.port(), 0);
                            prop_assert!(!grant.lifetime.is_zero());
                            prop_assert!(usable_external(grant.external.ip()).is_ok());
                        }
                    }
                    Ok::<(), TestCaseError>(())
                })
                .unwrap();
            assert!(granted.into_inner() > 0, "no case got a mapping through");
        }

        proptest! {
            #[test]
            fn any_route_table_parses_without_panic(table in ".{0,400}") {
                let _ = parse_default_gateway(&table);
            }
        }
    }
}
