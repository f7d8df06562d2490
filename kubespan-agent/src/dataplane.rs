//! The data plane shell: owns the WireGuard device, policy routing and the firewall table, and
//! runs the pure [`reconcile`](crate::reconcile) on every membership change and every second.
//! Everything it creates is removed when it stops; leftovers of a crashed run are removed first.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use base64::Engine;
use ipnet::IpNet;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::agent::{MembershipView, NatEndpoints, NodeIdentity};
use crate::api::{PeerStatusProvider, PeerStatusView};
use crate::config::{Backend, Config};
use crate::crypto::ClusterKeys;
use crate::discovery::Publication;
use crate::firewall::{self, FirewallConfig};
use crate::host;
use crate::netset::PrefixSet;
use crate::paths;
use crate::reconcile::{Action, PeerMemory, PeerReport, Policy, State, WantedPeer, reconcile};
use crate::record;
use crate::reflexive::{Mapping, StunProber};
use crate::relay::Relays;
use crate::routing::{self, RoutingConfig};
use crate::wg::kernel::{KernelWireGuard, kernel_available};
use crate::wg::userspace::UserspaceWireGuard;
use crate::wg::{DeviceSettings, Key, WgError, WireGuard, uapi};

const TICK: Duration = Duration::from_secs(1);
/// How soon to look again while a peer awaits the answer to a handshake: a peer is reported
/// `up` (and routed to) as soon as it answered, not up to a TICK later.
const AWAITING_TICK: Duration = Duration::from_millis(100);
const GOOD_ENDPOINTS_FILE: &str = "good-endpoints.json";
/// How often this node's own networks are read again (to rank peers' endpoints).
const NETWORKS_REFRESH: Duration = Duration::from_secs(30);
/// How long a key from before a rotation (this node's, or a peer's) keeps working at most:
/// WireGuard's REJECT_AFTER_TIME, the longest a session lives without a new handshake. Peers
/// normally learn the new key within seconds, and the old one goes once each has a session
/// under the new key.
pub const ROTATION_GRACE: Duration = Duration::from_secs(180);

/// A request to put a new private key on the device.
pub struct Rotation {
    pub private_key: Key,
    /// Whether the old key keeps working for [`ROTATION_GRACE`] (the userspace device), or the
    /// device error.
    pub done: tokio::sync::oneshot::Sender<Result<bool, String>>,
}

/// Peer statuses for the API and metrics, keyed by base64 public key.
#[derive(Default)]
pub struct StatusBoard {
    description: RwLock<String>,
    peers: RwLock<HashMap<String, PeerStatusView>>,
    /// The device's decrypt failure count at the last tick, when it counts them.
    decrypt_failures: RwLock<Option<u64>>,
}

impl PeerStatusProvider for StatusBoard {
    fn describe(&self) -> String {
        self.description
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn peer_status(&self, public_key: &str) -> Option<PeerStatusView> {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(public_key)
            .cloned()
    }

    fn decrypt_failures(&self) -> Option<u64> {
        *self
            .decrypt_failures
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }
}

fn decode_key(text: &str) -> Option<Key> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?
        .try_into()
        .ok()
}

/// Destinations forced into the mesh: peers' allowed IPs (only `up` ones with bypass), minus the
/// mesh /64, which is routed on-link by the interface address.
pub fn routed_set(
    view: &MembershipView,
    states: &HashMap<String, State>,
    bypass: bool,
    mesh: IpNet,
) -> Vec<IpNet> {
    let mut set = PrefixSet::new();
    for peer in &view.peers {
        if bypass && states.get(&peer.public_key) != Some(&State::Up) {
            continue;
        }
        for ip in &peer.allowed_ips {
            set.insert(*ip);
        }
    }
    set.subtract(&PrefixSet::from_prefixes([mesh]))
        .to_prefixes()
}

fn load_good_endpoints(path: &PathBuf) -> BTreeMap<String, SocketAddr> {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

fn save_good_endpoints(path: &PathBuf, good: &BTreeMap<String, SocketAddr>) {
    if let Ok(bytes) = serde_json::to_vec_pretty(good) {
        let tmp = path.with_extension("json.tmp");
        if std::fs::write(&tmp, bytes)
            .and_then(|_| std::fs::rename(&tmp, path))
            .is_err()
        {
            tracing::debug!(path = %path.display(), "could not save the last good endpoints");
        }
    }
}

/// A tiny datagram to the peer's mesh address makes WireGuard start a handshake now, instead
/// of at the next keepalive.
fn nudge(mesh_address: std::net::Ipv6Addr) {
    if let Ok(socket) = UdpSocket::bind("[::]:0") {
        let _ = socket.send_to(&[0], SocketAddr::new(IpAddr::V6(mesh_address), 9));
    }
}

/// The WireGuard implementation [`create_device`] builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chosen {
    Kernel,
    Userspace,
}

/// Picks the WireGuard implementation for the configured backend, with the reason (for the
/// log), or why `backend: kernel` cannot be honoured. `kernel_probe` runs only for `kernel` and
/// `auto`; [`WgError::Unsupported`] from it means the kernel has no WireGuard.
pub fn choose_backend(
    configured: Backend,
    kernel_probe: impl FnOnce() -> Result<(), WgError>,
) -> Result<(Chosen, String), String> {
    match configured {
        Backend::Userspace | Backend::None => Ok((
            Chosen::Userspace,
            "configured: backend userspace".to_owned(),
        )),
        Backend::Kernel => match kernel_probe() {
            Ok(()) => Ok((Chosen::Kernel, "configured: backend kernel".to_owned())),
            Err(WgError::Unsupported(reason)) => Err(format!(
                "the kernel has no WireGuard support ({reason}); use backend: userspace or auto"
            )),
            Err(e) => Err(format!(
                "cannot use kernel WireGuard ({e}); fix that, or use backend: userspace or auto"
            )),
        },
        Backend::Auto => match kernel_probe() {
            Ok(()) => Ok((
                Chosen::Kernel,
                "backend auto: the kernel supports WireGuard".to_owned(),
            )),
            Err(e) => Ok((
                Chosen::Userspace,
                format!(
                    "backend auto: kernel WireGuard is not usable ({e}); using the userspace device"
                ),
            )),
        },
    }
}

/// Picks and creates the WireGuard device.
fn create_device(config: &Config) -> anyhow::Result<Box<dyn WireGuard>> {
    let interface = &config.interface;
    let (chosen, why) =
        choose_backend(config.data_plane.backend, kernel_available).map_err(anyhow::Error::msg)?;
    tracing::info!(backend = ?chosen, reason = %why, "WireGuard backend");
    match chosen {
        Chosen::Kernel => Ok(Box::new(KernelWireGuard::create(interface)?)),
        Chosen::Userspace => Ok(Box::new(UserspaceWireGuard::create(interface)?)),
    }
}

/// What the data plane works from.
pub struct Inputs {
    pub config: Config,
    pub identity: NodeIdentity,
    pub private_key: Key,
    pub keys: Arc<ClusterKeys>,
    pub view: watch::Receiver<Arc<MembershipView>>,
    /// Where harvested endpoints are published (with `harvestExtraEndpoints`).
    pub publication: watch::Sender<Publication>,
    pub status: Arc<StatusBoard>,
    /// Node ids of the peers whose tunnels are alive (something arrived within the peer-down
    /// interval): the control loop keeps them as members when discovery stops listing them.
    pub alive: watch::Sender<BTreeSet<String>>,
    /// Where the reflexive endpoint STUN finds goes (announced by the control loop).
    pub nat: watch::Sender<NatEndpoints>,
    /// Relays for peers no direct path reaches.
    pub relays: Option<Arc<Relays>>,
    /// Key rotations (`kubespanctl rotate-key`).
    pub rotations: tokio::sync::mpsc::Receiver<Rotation>,
    /// The running configuration after reloads: timers, MTU, keys and the bypass and harvest
    /// switches are followed live (everything else a reload refuses).
    pub config_updates: watch::Receiver<Arc<Config>>,
}

/// Sets up the interface, routing and firewall, then reconciles until `stop`; tears all of it
/// down before returning.
pub async fn run(mut inputs: Inputs, stop: CancellationToken) -> anyhow::Result<()> {
    let config = inputs.config.clone();
    let identity = inputs.identity.clone();
    let status = inputs.status.clone();
    let dp = &config.data_plane;
    let routing = RoutingConfig {
        interface: config.interface.clone(),
        mesh_address: identity.mesh_address,
        mtu: config.mtu,
        table: dp.routing_table,
        rule_priority: dp.rule_priority,
        force_mark: dp.force_mark,
        mark_mask: dp.mark_mask,
    };
    let firewall = FirewallConfig {
        table: dp.nftables_table.clone(),
        firewall_mark: dp.firewall_mark,
        force_mark: dp.force_mark,
        mark_mask: dp.mark_mask,
        mtu: config.mtu,
    };
    // Leftovers of a crashed run.
    let _ = routing::remove(&routing).await;
    {
        let firewall = firewall.clone();
        let _ = tokio::task::spawn_blocking(move || firewall::remove(&firewall)).await;
    }

    let mut device = tokio::task::block_in_place(|| create_device(&config))?;
    let result = async {
        tokio::task::block_in_place(|| {
            device.configure(&DeviceSettings {
                private_key: inputs.private_key,
                listen_port: config.listen_port,
                fwmark: dp.firewall_mark,
            })
        })
        .context("cannot configure the WireGuard device")?;
        if let Some(relays) = &inputs.relays {
            let link: Arc<dyn crate::wg::RelayLink> = relays.clone();
            match device.attach_relay(link) {
                Some(injector) => {
                    relays.attach_device(injector);
                    tracing::info!("relayed peers go straight between the device and the relays");
                }
                None => tracing::info!(
                    "relayed peers go through a loopback socket per peer (kernel WireGuard)"
                ),
            }
        }
        // Described once configured: the userspace device then knows its socket's offloads.
        *status
            .description
            .write()
            .unwrap_or_else(|p| p.into_inner()) = device.describe();
        routing::apply(&routing).await.context("cannot set up routing")?;
        apply_firewall(&firewall, Vec::new()).await?;
        tracing::info!(device = %device.describe(), listen_port = config.listen_port, "data plane up");
        reconcile_loop(&mut inputs, device.as_mut(), &routing, &firewall, &stop).await
    }
    .await;

    // Tear down in reverse order; the interface goes with the device.
    let firewall_removed = tokio::task::spawn_blocking({
        let firewall = firewall.clone();
        move || firewall::remove(&firewall)
    })
    .await;
    if let Ok(Err(e)) = firewall_removed {
        tracing::warn!(error = %e, "could not remove the firewall table");
    }
    if let Err(e) = routing::remove(&routing).await {
        tracing::warn!(error = %e, "could not remove routes and rules");
    }
    drop(device);
    tracing::info!("data plane removed");
    result
}

/// STUN through the WireGuard socket: reads answers, sends a round or retries when due, and
/// hands a changed mapping to the control loop.
async fn stun_round(
    device: &mut dyn WireGuard,
    stun: &mut StunProber,
    servers: &[String],
    nat: &watch::Sender<NatEndpoints>,
) {
    let now = Instant::now();
    let mut changed = false;
    for (from, message) in device.take_stun() {
        changed |= stun.answer(from, &message, now);
    }
    changed |= stun.expire(now);
    let mut requests = stun.retries(now);
    if stun.round_due(now) {
        let resolved = resolve_stun_servers(servers).await;
        requests.extend(stun.start_round(&resolved, now, rand::random::<f64>(), rand::random));
    }
    for (server, request) in requests {
        if !device.send_stun(server, &request) {
            tracing::debug!(%server, "STUN request not sent (no socket yet)");
        }
    }
    if changed {
        let hard = matches!(stun.mapping(now), Mapping::EndpointDependent(_));
        let (reflexive, note) = match stun.mapping(now) {
            Mapping::Unknown => (None, None),
            Mapping::Reflexive(endpoint) => {
                tracing::info!(%endpoint, "reflexive endpoint (this node's NAT mapping, as STUN servers see it)");
                (Some(endpoint), None)
            }
            Mapping::EndpointDependent(seen) => {
                let note = format!(
                    "the NAT maps per destination (STUN servers saw {seen:?}): no reflexive endpoint is announced; peers behind NAT need port mapping on one side or a relay"
                );
                tracing::warn!("{note}");
                (None, Some(note))
            }
        };
        nat.send_if_modified(|current| {
            let changed = current.reflexive != reflexive
                || current.note != note
                || current.endpoint_dependent != hard;
            current.reflexive = reflexive;
            current.note = note;
            current.endpoint_dependent = hard;
            changed
        });
    }
}

/// `host:port` → addresses (the first of each family), 2 s at most per name; names that do not
/// resolve are left out of this round.
async fn resolve_stun_servers(servers: &[String]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for server in servers {
        if let Ok(address) = server.parse::<SocketAddr>() {
            out.push(address);
            continue;
        }
        let lookup = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::lookup_host(server.as_str()),
        )
        .await;
        match lookup {
            Ok(Ok(found)) => {
                let found: Vec<SocketAddr> = found.collect();
                out.extend(found.iter().find(|a| a.is_ipv4()));
                out.extend(found.iter().find(|a| a.is_ipv6()));
            }
            _ => tracing::debug!(server, "STUN server name does not resolve"),
        }
    }
    out
}

/// Endpoints observed for `up` peers that they do not announce themselves (e.g. a NAT mapping),
/// sealed under the peer's id for publishing on its behalf.
fn harvest(
    reports: &[PeerReport],
    wanted: &[WantedPeer],
    keys: &ClusterKeys,
) -> Vec<(String, Vec<bytes::Bytes>)> {
    let mut harvested: Vec<(String, Vec<bytes::Bytes>)> = reports
        .iter()
        .zip(wanted)
        .filter(|(report, _)| report.state == State::Up)
        .filter_map(|(report, want)| {
            let endpoint = report.endpoint?;
            // Never this node's relay proxies (loopback) or nonsense.
            let publishable = !endpoint.ip().is_loopback() && !endpoint.ip().is_unspecified();
            (publishable && !want.spec.endpoints.contains(&endpoint)).then(|| {
                let sealed = record::seal_endpoints(keys, &want.spec.node_id, &[endpoint]);
                (want.spec.node_id.clone(), sealed)
            })
        })
        .collect();
    harvested.sort();
    harvested
}

async fn apply_firewall(firewall: &FirewallConfig, routed: Vec<IpNet>) -> anyhow::Result<()> {
    let firewall = firewall.clone();
    tokio::task::spawn_blocking(move || firewall::apply(&firewall, &routed))
        .await
        .context("firewall task failed")?
        .context("cannot apply the nftables table")
}

/// The reconcile policy of a configuration's timers.
fn policy(config: &Config, device: &dyn WireGuard) -> Policy {
    let dp = &config.data_plane;
    Policy {
        endpoint_timeout: dp.endpoint_timeout,
        peer_down_after: dp.peer_down_after,
        keepalive: dp.peer_keepalive,
        updates_in_place: device.updates_in_place(),
        races: device.races_endpoints(),
    }
}

async fn reconcile_loop(
    inputs: &mut Inputs,
    device: &mut dyn WireGuard,
    routing: &RoutingConfig,
    firewall: &FirewallConfig,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let mut config = inputs.config.clone();
    let mut routing = routing.clone();
    let mut firewall = firewall.clone();
    let mut config_updates = inputs.config_updates.clone();
    let identity = &inputs.identity;
    let status = &inputs.status;
    let view = &mut inputs.view;
    let mut keys = inputs.keys.clone();
    let mut preshared_key = keys.wireguard_psk();
    let mut timers = policy(&config, device);
    let good_path = config.state_dir.join(GOOD_ENDPOINTS_FILE);
    let mut good = load_good_endpoints(&good_path);
    let mut memory: HashMap<Key, PeerMemory> = HashMap::new();
    let mut routed: Option<Vec<IpNet>> = None;
    let mut last_states: HashMap<String, State> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut awaiting = false;
    let mut networks: Vec<IpNet> = Vec::new();
    let mut networks_read_at: Option<Instant> = None;
    let mut stun = StunProber::new();
    let mut raced_logged: HashMap<Key, Vec<SocketAddr>> = HashMap::new();
    // Per peer: since when it is not `up`, and its last endpoint (for the relay candidate).
    let mut not_up_since: HashMap<Key, Instant> = HashMap::new();
    let mut last_endpoints: HashMap<Key, SocketAddr> = HashMap::new();
    let stun_enabled = !config.nat_traversal.stun_servers.is_empty()
        && {
            if device.races_endpoints() {
                true
            } else {
                tracing::warn!(
                    "natTraversal.stunServers needs the userspace device (backend: userspace): kernel WireGuard's socket belongs to the kernel, so no reflexive endpoint is learned; the public IP from Hello with the listen port is announced (as Talos does), and portMapping works with either backend"
                );
                false
            }
        };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            changed = view.changed() => if changed.is_err() { return Ok(()) },
            changed = config_updates.changed() => {
                if changed.is_ok() {
                    let next = config_updates.borrow_and_update().clone();
                    if next.cluster_secret != config.cluster_secret
                        || next.cluster_secret_next != config.cluster_secret_next
                    {
                        keys = Arc::new(ClusterKeys::for_config(&next));
                        preshared_key = keys.wireguard_psk();
                        tracing::info!("cluster secrets changed: the tunnels' pre-shared keys follow");
                    }
                    timers = policy(&next, device);
                    let mut kept_mtu = None;
                    if next.mtu != config.mtu {
                        // In place: the link's MTU, the routes' MTU and the MSS clamp; the
                        // device and its peers (and their sessions) stay.
                        routing.mtu = next.mtu;
                        match routing::apply(&routing).await {
                            Ok(()) => {
                                firewall.mtu = next.mtu;
                                routed = None;
                                tracing::info!(mtu = next.mtu, "MTU changed");
                            }
                            Err(e) => {
                                // All or nothing: the MSS clamp keeps matching the link.
                                routing.mtu = config.mtu;
                                let _ = routing::apply(&routing).await;
                                kept_mtu = Some(config.mtu);
                                tracing::error!(error = %e, mtu = next.mtu, kept = config.mtu, "cannot change the MTU; the old one stays (fix the cause and reload again)");
                            }
                        }
                    }
                    config = (*next).clone();
                    if let Some(mtu) = kept_mtu {
                        config.mtu = mtu;
                    }
                }
            },
            _ = tick.tick() => {}
            _ = tokio::time::sleep(AWAITING_TICK), if awaiting => {}
            Some(rotation) = inputs.rotations.recv() => {
                let settings = DeviceSettings {
                    private_key: rotation.private_key,
                    listen_port: config.listen_port,
                    fwmark: config.data_plane.firewall_mark,
                };
                let result = tokio::task::block_in_place(|| device.rotate_key(&settings, ROTATION_GRACE));
                if result.is_ok()
                    && let Some(relays) = &inputs.relays
                {
                    // Relays deliver by key: peers that learn the new one reach it there.
                    relays.set_public_key(
                        crate::identity::WireguardKeys::from_private(rotation.private_key).public_key,
                    );
                }
                let _ = rotation.done.send(result.map_err(|e| e.to_string()));
            }
        }
        let current = view.borrow_and_update().clone();
        if networks_read_at.is_none_or(|at| at.elapsed() >= NETWORKS_REFRESH) {
            networks_read_at = Some(Instant::now());
            match host::node_networks(&config.interface).await {
                Ok(read) => {
                    if read != networks {
                        // New addresses, maybe a new NAT: ask the STUN servers again now.
                        stun.trigger();
                    }
                    networks = read;
                }
                Err(e) => tracing::debug!(error = %e, "cannot read this node's networks"),
            }
        }
        if stun_enabled {
            stun_round(
                device,
                &mut stun,
                &config.nat_traversal.stun_servers,
                &inputs.nat,
            )
            .await;
        }
        let dp = &config.data_plane;
        let mut wanted: Vec<WantedPeer> = current
            .peers
            .iter()
            .filter_map(|spec| {
                let key = decode_key(&spec.public_key);
                if key.is_none() {
                    tracing::warn!(peer = %spec.label, key = %spec.public_key, "ignoring a peer with an unusable public key");
                }
                let mut spec = spec.clone();
                spec.endpoints = paths::rank(&spec.endpoints, &networks);
                Some(WantedPeer { public_key: key?, spec })
            })
            .collect();
        if let Some(relays) = &inputs.relays {
            // The relay is the last candidate, and only for a peer no direct path reached
            // within the endpoint timeout (or one already on it).
            let now = Instant::now();
            for want in &mut wanted {
                if want.spec.relays.is_empty() {
                    continue;
                }
                let stuck = not_up_since.get(&want.public_key).is_some_and(|since| {
                    now.saturating_duration_since(*since) >= dp.endpoint_timeout
                });
                let on_relay = relays
                    .relayed_via(
                        &want.public_key,
                        last_endpoints.get(&want.public_key).copied(),
                    )
                    .is_some();
                if (stuck || on_relay)
                    && let Some(endpoint) = relays
                        .endpoint_for(want.public_key, &want.spec.relays)
                        .await
                    && !want.spec.endpoints.contains(&endpoint)
                {
                    want.spec.endpoints.push(endpoint);
                }
            }
            relays.set_peers(wanted.iter().map(|w| w.public_key).collect());
        }
        let device_peers = match tokio::task::block_in_place(|| device.peers()) {
            Ok(peers) => peers,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the WireGuard device");
                continue;
            }
        };
        let good_before = good.clone();
        // One reading of each clock per pass: monotonic for the decisions, wall for display.
        let (now, wall_now) = (Instant::now(), SystemTime::now());
        let outcome = reconcile(
            &wanted,
            &device_peers,
            &mut memory,
            &mut good,
            &preshared_key,
            timers,
            now,
        );
        let to_unix_ms = |at: Option<Instant>| {
            at.map_or(0, |at| {
                uapi::unix_ms(wall_now - now.saturating_duration_since(at))
            })
        };
        for action in &outcome.actions {
            let result = tokio::task::block_in_place(|| match action {
                Action::SetPeer {
                    config,
                    reset_session,
                } => device.set_peer(config, *reset_session),
                Action::RemovePeer { public_key } => device.remove_peer(public_key),
                Action::ReplacePeer {
                    old_public_key,
                    config,
                } => device.replace_peer(old_public_key, config, ROTATION_GRACE),
                Action::Race {
                    public_key,
                    candidates,
                } => device.race(public_key, candidates).map(|_| ()),
                Action::Probe { public_key } => match device.probe(public_key) {
                    Ok(true) => Ok(()),
                    // Kernel WireGuard: a datagram to the peer's port 9 over the tunnel; its
                    // kernel answers with an ICMP error, which is an answer.
                    Ok(false) => {
                        if let Some(want) = wanted.iter().find(|w| w.public_key == *public_key) {
                            nudge(want.spec.mesh_address);
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
            });
            match (action, result) {
                (
                    Action::SetPeer {
                        config,
                        reset_session,
                    },
                    Ok(()),
                ) => {
                    if !*reset_session
                        && let Some(want) =
                            wanted.iter().find(|w| w.public_key == config.public_key)
                    {
                        tracing::debug!(peer = %want.spec.label, keepalive = ?config.persistent_keepalive, psk = %crate::config::secret_fingerprint(&config.preshared_key), "peer keepalive or pre-shared key updated");
                    }
                    if *reset_session
                        && let Some(want) =
                            wanted.iter().find(|w| w.public_key == config.public_key)
                    {
                        match config.endpoint {
                            // A racing device logs the race instead.
                            Some(_) if device.races_endpoints() => {}
                            Some(endpoint) => {
                                tracing::info!(peer = %want.spec.label, %endpoint, "trying endpoint")
                            }
                            None => {
                                tracing::info!(peer = %want.spec.label, allowed_ips = ?config.allowed_ips, "peer reconfigured")
                            }
                        }
                        // Not for a device that initiated already: the nudge would wait in the
                        // peer's queue, and when the peer's own initiation is answered first,
                        // releasing it starts a second, redundant handshake.
                        if !device.initiates_on_reset() {
                            nudge(want.spec.mesh_address);
                        }
                    }
                }
                (Action::RemovePeer { .. }, Ok(())) => {
                    tracing::info!("removed a peer that left the cluster")
                }
                (Action::ReplacePeer { config, .. }, Ok(())) => {
                    if let Some(want) = wanted.iter().find(|w| w.public_key == config.public_key) {
                        tracing::info!(peer = %want.spec.label, public_key = %want.spec.public_key, "peer's WireGuard key changed: peer replaced, handshaking to the new key");
                        // Kernel WireGuard: a packet starts the handshake to the new key now.
                        if !device.initiates_on_reset() {
                            nudge(want.spec.mesh_address);
                        }
                    }
                }
                (
                    Action::Race {
                        public_key,
                        candidates,
                    },
                    Ok(()),
                ) => {
                    if let Some(want) = wanted.iter().find(|w| w.public_key == *public_key) {
                        // Once per candidate list: a down peer is raced every few seconds.
                        if raced_logged.get(public_key) != Some(candidates) {
                            raced_logged.insert(*public_key, candidates.clone());
                            tracing::info!(peer = %want.spec.label, ?candidates, "racing endpoints (one handshake to each, the first answer wins)");
                        } else {
                            tracing::debug!(peer = %want.spec.label, ?candidates, "racing endpoints again");
                        }
                    }
                }
                (Action::Probe { .. }, Ok(())) => {}
                (action, Err(e)) => {
                    tracing::error!(error = %e, "WireGuard device change failed; retrying next tick");
                    // Forget what was applied so the next reconcile sends it again.
                    if let Action::SetPeer { config, .. } | Action::ReplacePeer { config, .. } =
                        action
                        && let Some(mem) = memory.get_mut(&config.public_key)
                    {
                        mem.applied_allowed_ips.clear();
                    }
                }
            }
        }
        if good != good_before {
            save_good_endpoints(&good_path, &good);
        }

        *status
            .decrypt_failures
            .write()
            .unwrap_or_else(|p| p.into_inner()) = device.decrypt_failures();
        let mut states = HashMap::new();
        {
            let mut board = status.peers.write().unwrap_or_else(|p| p.into_inner());
            board.clear();
            for (report, want) in outcome.reports.iter().zip(&wanted) {
                if last_states.get(&want.spec.public_key) != Some(&report.state) {
                    tracing::info!(peer = %want.spec.label, state = report.state.as_str(), endpoint = ?report.endpoint, "peer state");
                }
                states.insert(want.spec.public_key.clone(), report.state);
                board.insert(
                    want.spec.public_key.clone(),
                    PeerStatusView {
                        state: report.state.as_str(),
                        endpoint: report.endpoint,
                        last_handshake_unix_ms: report.last_handshake.map_or(0, uapi::unix_ms),
                        rx_bytes: report.rx_bytes,
                        tx_bytes: report.tx_bytes,
                        last_endpoint_change_unix_ms: to_unix_ms(report.last_endpoint_change),
                        path: match inputs
                            .relays
                            .as_ref()
                            .and_then(|r| r.relayed_via(&want.public_key, report.endpoint))
                        {
                            Some(relay) => format!("relayed via {relay}"),
                            None => paths::kind(
                                report.endpoint,
                                &want.spec.endpoints,
                                &want.spec.learned_endpoints,
                                &want.spec.allowed_ips,
                                &networks,
                            )
                            .as_str()
                            .to_owned(),
                        },
                        candidates: want.spec.endpoints.clone(),
                    },
                );
            }
        }
        last_states = states.clone();
        raced_logged.retain(|key, _| wanted.iter().any(|w| w.public_key == *key));
        for (report, want) in outcome.reports.iter().zip(&wanted) {
            if report.state == State::Up {
                not_up_since.remove(&want.public_key);
            } else {
                not_up_since.entry(want.public_key).or_insert(now);
            }
            match report.endpoint {
                Some(endpoint) => last_endpoints.insert(want.public_key, endpoint),
                None => last_endpoints.remove(&want.public_key),
            };
        }
        not_up_since.retain(|key, _| wanted.iter().any(|w| w.public_key == *key));
        last_endpoints.retain(|key, _| wanted.iter().any(|w| w.public_key == *key));
        let alive: BTreeSet<String> = outcome
            .reports
            .iter()
            .zip(&wanted)
            .filter(|(report, _)| report.alive)
            .map(|(_, want)| want.spec.node_id.clone())
            .collect();
        inputs.alive.send_if_modified(|current| {
            let changed = *current != alive;
            *current = alive;
            changed
        });
        // `unknown` lasts at most endpoint_timeout per try, so the fast ticks do too; STUN
        // answers are read on the fast ticks too.
        awaiting = outcome.reports.iter().any(|r| r.state == State::Unknown) || stun.waiting();
        // Switched off by a reload: what was harvested is no longer published.
        let harvested = if config.harvest_extra_endpoints {
            harvest(&outcome.reports, &wanted, &keys)
        } else {
            Default::default()
        };
        inputs.publication.send_if_modified(|p| {
            let changed = p.harvested != harvested;
            p.harvested = harvested;
            changed
        });
        let mesh = IpNet::V6(identity.mesh_prefix);
        let next = routed_set(&current, &states, config.allow_down_peer_bypass, mesh);
        if routed.as_ref() != Some(&next) {
            match apply_firewall(&firewall, next.clone()).await {
                Ok(()) => {
                    tracing::debug!(routed = ?next, "firewall updated");
                    routed = Some(next);
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "firewall update failed; retrying next tick")
                }
            }
        }
    }
}
