//! The agent's control loop: builds this node's record from host facts, hands it to the
//! discovery clients, merges what they learn, and derives members and peer specs for the API
//! (and the data plane).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ipnet::{IpNet, Ipv6Net};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, DiscoveryEndpoint, ReloadPlan, plan_reload};
use crate::crypto::ClusterKeys;
use crate::discovery::{
    self, ClientSettings, ConnectionStatus, DiscoveryCounters, Publication, SharedStatus,
};
use crate::endpoints::{local_endpoints, routable_addresses};
use crate::members::{Member, PeerSpec, PeerWarning, members, merge_affiliates, peer_specs};
use crate::model::{AffiliateRecord, KubeSpanInfo, LearnedKind};
use crate::netset::PrefixSet;
use crate::record;
use crate::registry::RegistryCache;
use crate::warm;
use crate::wg::uapi::unix_ms;

/// How often the warm-start cache is written at most (when the members changed), and how often
/// expiry runs.
const HOUSEKEEPING: Duration = Duration::from_secs(5);

/// Who this node is; fixed for the agent's lifetime, except the WireGuard public key
/// (`kubespanctl rotate-key`), whose current value is [`Shared::public_key`].
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub node_id: String,
    pub nodename: String,
    pub hostname: String,
    pub public_key: String,
    pub mesh_address: Ipv6Addr,
    pub mesh_prefix: Ipv6Net,
    pub mac_source: String,
    pub operating_system: String,
}

/// Everything the membership API shows, replaced as a whole on every change.
#[derive(Clone, Debug, Default)]
pub struct MembershipView {
    pub local: AffiliateRecord,
    pub members: BTreeMap<String, Member>,
    pub peers: Vec<PeerSpec>,
    pub warnings: Vec<String>,
    /// Members no discovery service lists, kept because their tunnels are alive.
    pub retained: usize,
}

/// State shared between the control loop and the API.
pub struct Shared {
    /// The running configuration: replaced by a reload, followed by the control loop, the
    /// discovery clients and the data plane.
    pub config: watch::Sender<Arc<Config>>,
    /// Where the configuration is read again on a reload.
    pub config_path: std::path::PathBuf,
    /// One reload at a time: a plan is made against the configuration it replaces.
    reload_lock: tokio::sync::Mutex<()>,
    pub identity: NodeIdentity,
    pub view: watch::Receiver<Arc<MembershipView>>,
    /// One per configured discovery service (in the configured order).
    pub connections: Mutex<Vec<SharedStatus>>,
    pub publication: watch::Sender<Publication>,
    pub counters: Arc<DiscoveryCounters>,
    /// Set by the data plane: node ids of peers whose tunnels are alive.
    pub alive: watch::Sender<BTreeSet<String>>,
    /// This node's endpoints learned behind NAT (set by the data plane and the port mapper).
    pub nat: watch::Sender<NatEndpoints>,
    /// Bytes carried through relays, when relays are configured.
    pub relay_counters: Option<Arc<crate::relay::RelayCounters>>,
    /// This node's WireGuard public key (base64) as published; a new value (a rotation) is
    /// published at once.
    pub public_key: watch::Sender<String>,
}

/// This node's endpoints as seen from outside its NAT, announced after its own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatEndpoints {
    /// What STUN servers see (the NAT's mapping of the WireGuard socket).
    pub reflexive: Option<SocketAddr>,
    /// What the gateway forwards to the listen port (PCP, NAT-PMP, UPnP-IGD).
    pub mapped: Option<SocketAddr>,
    /// Why NAT traversal is limited, for the status (e.g. an endpoint-dependent NAT).
    pub note: Option<String>,
    /// STUN servers saw different mappings: the NAT maps per destination, so Hello's public IP
    /// with the listen port is no endpoint either (nothing forwards it).
    pub endpoint_dependent: bool,
}

impl Shared {
    /// Deletes this node's record everywhere and stops publishing it. Returns how many
    /// discovery services confirmed the delete within `wait`.
    pub async fn leave(&self, wait: Duration) -> usize {
        self.publication.send_modify(|p| p.leaving = true);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let statuses = self.connection_statuses();
            let left = statuses.iter().filter(|c| c.left).count();
            if left == statuses.len() || tokio::time::Instant::now() >= deadline {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn connection_statuses(&self) -> Vec<ConnectionStatus> {
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|c| c.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
    }

    /// The running configuration.
    pub fn running_config(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    /// Reads a new configuration (`text` named `name`, else the agent's own file again) and
    /// plans the reload against the running one; with `apply`, applies it unless refused (all
    /// or nothing) and logs one line saying what was applied or why it was refused (`via`:
    /// SIGHUP or the API). An invalid file is an error, and the running configuration stays.
    pub async fn reload(
        &self,
        text: Option<(String, String)>,
        apply: bool,
        via: &str,
    ) -> Result<ReloadPlan, ConfigError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let path = self.config_path.clone();
        let parsed = tokio::task::spawn_blocking(move || match text {
            None => crate::config::load(&path),
            Some((text, name)) => crate::config::parse(&text).map_err(|e| match e {
                ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                    path: name.into(),
                    message,
                },
                other => other,
            }),
        })
        .await
        .unwrap_or_else(|e| {
            Err(ConfigError::Syntax {
                path: "<config>".into(),
                message: format!("reading it failed: {e}"),
            })
        });
        let new = match parsed {
            Ok(new) => new,
            Err(e) => {
                if apply {
                    tracing::warn!(via, error = %e, "reload refused: invalid configuration; the running one is kept");
                }
                return Err(e);
            }
        };
        let plan = plan_reload(&self.running_config(), &new);
        if apply {
            if plan.refused() {
                tracing::warn!(
                    via,
                    "reload {}; the running configuration is kept",
                    plan.summary()
                );
            } else if plan.changes.is_empty() {
                tracing::info!(via, "reload: nothing changed");
            } else {
                self.config.send_replace(Arc::new(new));
                tracing::info!(via, "reload {}", plan.summary());
            }
        }
        Ok(plan)
    }
}

/// A running discovery client.
struct Client {
    endpoint: DiscoveryEndpoint,
    index: usize,
    status: SharedStatus,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

#[allow(clippy::too_many_arguments)]
fn start_client(
    index: usize,
    endpoint: DiscoveryEndpoint,
    settings: &ClientSettings,
    publication: &watch::Sender<Publication>,
    events: &mpsc::Sender<discovery::DiscoveryEvent>,
    status: Option<SharedStatus>,
    parent: &CancellationToken,
) -> Client {
    let status = status.unwrap_or_else(|| {
        Arc::new(Mutex::new(ConnectionStatus {
            endpoint: endpoint.url.clone(),
            state: "connecting",
            ..ConnectionStatus::default()
        }))
    });
    let stop = parent.child_token();
    let task = tokio::spawn(discovery::run_client(
        index,
        endpoint.clone(),
        settings.clone(),
        publication.subscribe(),
        events.clone(),
        status.clone(),
        stop.clone(),
    ));
    Client {
        endpoint,
        index,
        status,
        stop,
        task,
    }
}

/// Host facts the local record is built from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostFacts {
    pub addresses: Vec<IpAddr>,
    pub public_ips: Vec<IpAddr>,
    pub nat: NatEndpoints,
    /// The relays this node is connected to, best first.
    pub relays: Vec<String>,
}

/// This node's record from configuration, identity and host facts (pure).
pub fn local_record(
    config: &Config,
    identity: &NodeIdentity,
    facts: &HostFacts,
) -> AffiliateRecord {
    let skip = [IpNet::V6(identity.mesh_prefix)];
    let addresses = routable_addresses(facts.addresses.iter().copied(), &skip);
    // The address Hello saw goes through the same filter: over loopback (a server on this
    // host) it is 127.0.0.1, which would send every peer to itself.
    // Behind a NAT that maps per destination, a public IP that is not the node's own is only
    // worth announcing with a port the gateway maps (below).
    let public_ips = facts
        .public_ips
        .iter()
        .copied()
        .filter(|ip| !facts.nat.endpoint_dependent || addresses.contains(ip));
    let candidates = routable_addresses(addresses.iter().copied().chain(public_ips), &skip);
    let mut endpoints = local_endpoints(
        &candidates,
        None,
        config.endpoint_filters.as_deref(),
        config.listen_port,
        &config.extra_announced_endpoints,
    );
    // Learned behind NAT: after the node's own (peers on the same LAN try those first; Talos
    // peers try endpoints in order), the mapped one first (it takes packets from anyone, the
    // reflexive one only from peers this node sent to). Never an unroutable one.
    let mut learned_endpoints = Vec::new();
    let learned = [
        (facts.nat.mapped, LearnedKind::Mapped),
        (facts.nat.reflexive, LearnedKind::Reflexive),
    ];
    for (endpoint, kind) in learned {
        let Some(endpoint) = endpoint else { continue };
        if routable_addresses([endpoint.ip()], &skip).is_empty() {
            continue;
        }
        if !endpoints.contains(&endpoint) {
            endpoints.push(endpoint);
        }
        learned_endpoints.push((endpoint, kind));
    }
    AffiliateRecord {
        node_id: identity.node_id.clone(),
        addresses,
        hostname: identity.hostname.clone(),
        nodename: identity.nodename.clone(),
        machine_type: config.machine_type.clone(),
        operating_system: identity.operating_system.clone(),
        kubespan: Some(KubeSpanInfo {
            public_key: identity.public_key.clone(),
            address: identity.mesh_address,
            additional_addresses: config.advertise_networks.clone(),
            exclude_advertised_networks: config.exclude_advertised_networks.clone(),
            learned_endpoints,
            relays: facts.relays.clone(),
            sealed_psk: None,
        }),
        control_plane_port: None,
        endpoints,
    }
}

/// Members, peers and warnings from the merged records (pure).
pub fn membership(local: &AffiliateRecord, cache: &RegistryCache) -> MembershipView {
    let raw = cache.raw();
    let mut merged = merge_affiliates(raw.iter().map(|(id, r)| (id.as_str(), *r)));
    merged.insert(local.node_id.clone(), local.clone());
    let (members, duplicate_names) = members(&merged);
    let mut local_set = PrefixSet::from_prefixes(local.addresses.iter().map(|ip| IpNet::from(*ip)));
    if let Some(kubespan) = &local.kubespan {
        local_set.insert(IpNet::from(IpAddr::V6(kubespan.address)));
    }
    let (peers, peer_warnings) = peer_specs(&local.node_id, &local_set, &merged);
    let mut warnings: Vec<String> = duplicate_names
        .into_iter()
        .map(|name| {
            format!(
                "node name {name:?} is claimed by more than one node; the smaller node id is shown"
            )
        })
        .collect();
    warnings.extend(peer_warnings.iter().map(describe_warning));
    MembershipView {
        local: local.clone(),
        members,
        peers,
        warnings,
        retained: cache.retained(),
    }
}

fn describe_warning(warning: &PeerWarning) -> String {
    match warning {
        PeerWarning::Overlap {
            node_id,
            winner_node_id,
            prefixes,
        } => format!(
            "peer address overlap: {prefixes:?} claimed by node {node_id} is kept by node {winner_node_id}"
        ),
        PeerWarning::DuplicateMeshAddress { address, node_ids } => format!(
            "mesh address {address} is derived by several nodes {node_ids:?} (cloned MACs?); set macAddress on one of them"
        ),
        PeerWarning::DuplicatePublicKey {
            public_key,
            node_ids,
        } => {
            format!(
                "WireGuard key {public_key} is used by several nodes {node_ids:?}; only the first is a peer"
            )
        }
        PeerWarning::ClaimsLocalAddress { node_id, prefixes } => {
            format!(
                "node {node_id} claims this node's own addresses {prefixes:?}; they are not routed to it"
            )
        }
    }
}

/// Runs the control loop until `stop` is cancelled. Returns when every client has finished
/// (after deleting this node's record when leaving).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    config: Config,
    config_path: std::path::PathBuf,
    mut identity: NodeIdentity,
    keys: Arc<ClusterKeys>,
    relays: Option<Arc<crate::relay::Relays>>,
    stop: CancellationToken,
    ready: impl FnOnce(Arc<Shared>),
) -> anyhow::Result<()> {
    let (_no_relays, idle_relays) = watch::channel(Vec::new());
    let mut relays_rx = relays.as_ref().map_or(idle_relays, |r| r.connected());
    let mut config = config;
    let mut keys = keys;
    let (config_tx, mut config_rx) = watch::channel(Arc::new(config.clone()));
    let endpoints = config.discovery_endpoints.clone();
    let (publication_tx, _) = watch::channel(Publication::default());
    let (events_tx, mut events_rx) = mpsc::channel(1024);
    let mut settings = ClientSettings {
        cluster_id: config.cluster_id.clone(),
        node_id: identity.node_id.clone(),
        keys: keys.clone(),
        ttl: discovery::DEFAULT_TTL,
        client_version: format!("openspan-agent v{}", env!("CARGO_PKG_VERSION")),
        backoff: discovery::Backoff::default(),
        counters: Arc::new(DiscoveryCounters::default()),
    };
    let (alive_tx, mut alive_rx) = watch::channel(BTreeSet::new());

    let mut facts = HostFacts {
        addresses: read_addresses(&config.interface).await.unwrap_or_default(),
        public_ips: Vec::new(),
        nat: NatEndpoints::default(),
        relays: Vec::new(),
    };
    let (nat_tx, mut nat_rx) = watch::channel(NatEndpoints::default());
    let port_mapper = config
        .nat_traversal
        .port_mapping
        .then(|| spawn_port_mapper(config.listen_port, nat_tx.clone(), stop.clone()));
    let mut local = local_record(&config, &identity, &facts);
    let mut plaintext = record::encode(&local);
    publication_tx.send_modify(|p| p.own = Some(record::seal(&keys, &local)));
    let mut cache = RegistryCache::new(endpoints.len(), discovery::DEFAULT_TTL);
    let loaded = tokio::task::spawn_blocking({
        let (keys, cluster_id, dir) = (
            keys.clone(),
            config.cluster_id.clone(),
            config.state_dir.clone(),
        );
        move || warm::load(&keys, &cluster_id, &dir, unix_ms(SystemTime::now()))
    })
    .await;
    match loaded {
        Ok(Ok(members)) if members.is_empty() => {}
        Ok(Ok(members)) => {
            tracing::info!(
                members = members.len(),
                "configuring the last known members from the warm-start cache until a discovery service answers"
            );
            cache.load_warm(members, Instant::now(), unix_ms(SystemTime::now()));
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "warm-start cache not used"),
        Err(e) => tracing::warn!(error = %e, "warm-start cache not read"),
    }
    let (view_tx, view_rx) = watch::channel(Arc::new(membership(&local, &cache)));

    // Clients stop on their own token, after the loop below has flagged `leaving`.
    let clients_stop = CancellationToken::new();
    let mut clients: Vec<Client> = endpoints
        .into_iter()
        .enumerate()
        .map(|(index, endpoint)| {
            start_client(
                index,
                endpoint,
                &settings,
                &publication_tx,
                &events_tx,
                None,
                &clients_stop,
            )
        })
        .collect();
    // Clients started by a reload get a clone; the loop still ends when every client is gone.
    let events_for_reload = events_tx.downgrade();
    drop(events_tx);
    let shared = Arc::new(Shared {
        config: config_tx,
        config_path,
        reload_lock: tokio::sync::Mutex::new(()),
        identity: identity.clone(),
        view: view_rx,
        connections: Mutex::new(clients.iter().map(|c| c.status.clone()).collect()),
        publication: publication_tx.clone(),
        counters: settings.counters.clone(),
        alive: alive_tx,
        nat: nat_tx,
        relay_counters: relays.as_ref().map(|r| r.counters()),
        public_key: watch::Sender::new(identity.public_key.clone()),
    });
    let mut public_key_rx = shared.public_key.subscribe();
    ready(shared.clone());

    let mut address_poll = tokio::time::interval(Duration::from_secs(5));
    address_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut members_dirty = false;
    let mut saving: Option<tokio::task::JoinHandle<()>> = None;
    let mut last_warnings: Vec<String> = Vec::new();
    // `kubespanctl leave`: the record is deleted (by the clients) and the tunnels stop, so peers
    // drop this node within their peer-down interval instead of keeping it for its live tunnel.
    let mut leave_rx = publication_tx.subscribe();
    let mut left = false;
    loop {
        let mut facts_changed = false;
        let mut view_changed = false;
        tokio::select! {
            _ = stop.cancelled() => break,
            event = events_rx.recv() => {
                let Some(event) = event else { break };
                let now = Instant::now();
                view_changed |= cache.apply(event, now);
                // Take everything already queued before recomputing.
                while let Ok(event) = events_rx.try_recv() {
                    view_changed |= cache.apply(event, now);
                }
                let public_ips = cache.public_ips();
                if public_ips != facts.public_ips {
                    facts.public_ips = public_ips;
                    facts_changed = true;
                }
            }
            changed = leave_rx.changed(), if !left => {
                if changed.is_ok() && leave_rx.borrow_and_update().leaving {
                    tracing::info!("leaving the cluster: removing every peer");
                    left = true;
                    view_changed = true;
                }
            }
            changed = relays_rx.changed() => {
                if changed.is_ok() {
                    let connected = relays_rx.borrow_and_update().clone();
                    if connected != facts.relays {
                        tracing::info!(relays = ?connected, "announcing the relays that reach this node");
                        facts.relays = connected;
                        facts_changed = true;
                    }
                }
            }
            changed = nat_rx.changed() => {
                if changed.is_ok() {
                    let nat = nat_rx.borrow_and_update().clone();
                    if nat.reflexive != facts.nat.reflexive
                        || nat.mapped != facts.nat.mapped
                        || nat.endpoint_dependent != facts.nat.endpoint_dependent
                    {
                        facts_changed = true;
                    }
                    facts.nat = nat;
                }
            }
            changed = public_key_rx.changed() => {
                if changed.is_ok() {
                    let key = public_key_rx.borrow_and_update().clone();
                    if key != identity.public_key {
                        identity.public_key = key;
                        facts_changed = true;
                    }
                }
            }
            changed = alive_rx.changed() => {
                if changed.is_ok() {
                    let alive = alive_rx.borrow_and_update().clone();
                    view_changed |= cache.set_alive(alive, Instant::now());
                }
            }
            changed = config_rx.changed() => {
                if changed.is_ok() {
                    let next = config_rx.borrow_and_update().clone();
                    let rekeyed = next.cluster_secret != config.cluster_secret
                        || next.cluster_secret_next != config.cluster_secret_next;
                    config = (*next).clone();
                    if rekeyed {
                        keys = Arc::new(ClusterKeys::for_config(&config));
                        settings.keys = keys.clone();
                        // Sealed again with the (maybe promoted) secret even if nothing else
                        // changed: peers learn which secret this node seals with from it.
                        publication_tx.send_if_modified(|p| {
                            if p.leaving {
                                return false;
                            }
                            p.own = Some(record::seal(&keys, &local));
                            true
                        });
                    }
                    if let Some(events) = events_for_reload.upgrade() {
                        view_changed |= follow_discovery_endpoints(
                            &mut clients,
                            &config.discovery_endpoints,
                            rekeyed,
                            &mut cache,
                            &settings,
                            &publication_tx,
                            &events,
                            &clients_stop,
                        );
                        *shared.connections.lock().unwrap_or_else(|p| p.into_inner()) =
                            clients.iter().map(|c| c.status.clone()).collect();
                    }
                    facts_changed = true;
                }
            }
            _ = housekeeping.tick() => {
                view_changed |= cache.expire(Instant::now());
                // Written in the background; a write still running skips this round.
                if members_dirty && saving.as_ref().is_none_or(|s| s.is_finished()) {
                    members_dirty = false;
                    saving = Some(save_members(&keys, &config, &cache));
                }
            }
            _ = address_poll.tick() => {
                if let Some(addresses) = read_addresses(&config.interface).await
                    && addresses != facts.addresses
                {
                    tracing::info!(?addresses, "node addresses changed");
                    facts.addresses = addresses;
                    facts_changed = true;
                }
            }
        }
        if facts_changed {
            let next = local_record(&config, &identity, &facts);
            let next_plaintext = record::encode(&next);
            // Re-seal only when the record really changed: sealing uses a fresh nonce, and a new
            // blob makes the server notify every watcher.
            if next_plaintext != plaintext || next.endpoints != local.endpoints {
                tracing::info!(endpoints = ?next.endpoints, "publishing this node's updated record");
                publication_tx.send_if_modified(|p| {
                    if p.leaving {
                        return false;
                    }
                    p.own = Some(record::seal(&keys, &next));
                    true
                });
                plaintext = next_plaintext;
                local = next;
                view_changed = true;
            }
        }
        if view_changed {
            members_dirty = true;
            let mut view = membership(&local, &cache);
            if left {
                view.peers.clear();
            }
            for warning in &view.warnings {
                if !last_warnings.contains(warning) {
                    tracing::warn!("{warning}");
                }
            }
            last_warnings = view.warnings.clone();
            tracing::debug!(
                members = view.members.len(),
                peers = view.peers.len(),
                "membership changed"
            );
            view_tx.send_replace(Arc::new(view));
        }
    }

    if let Some(saving) = saving.take() {
        let _ = saving.await;
    }
    if let Some(port_mapper) = port_mapper {
        // It removes the mapping at the gateway on the stop signal (bounded to about a second).
        let _ = tokio::time::timeout(Duration::from_secs(3), port_mapper).await;
    }
    if members_dirty {
        let _ = save_members(&keys, &config, &cache).await;
    }
    // Graceful shutdown: delete this node's record, then stop the clients. Their events are
    // drained meanwhile, so a client blocked on a full channel still gets to the delete.
    let drain = tokio::spawn(async move { while events_rx.recv().await.is_some() {} });
    let left =
        tokio::time::timeout(Duration::from_secs(5), shared.leave(Duration::from_secs(3))).await;
    tracing::info!(
        deleted_from = left.unwrap_or(0),
        "left the discovery services"
    );
    clients_stop.cancel();
    for client in clients {
        let _ = client.task.await;
    }
    let _ = drain.await;
    Ok(())
}

/// Starts clients for discovery services a reload added, stops (and deletes this node's record
/// from) those it removed; with `restart`, restarts every client (new keys). Returns true when
/// the merged records changed.
#[allow(clippy::too_many_arguments)]
fn follow_discovery_endpoints(
    clients: &mut Vec<Client>,
    wanted: &[DiscoveryEndpoint],
    restart: bool,
    cache: &mut RegistryCache,
    settings: &ClientSettings,
    publication: &watch::Sender<Publication>,
    events: &mpsc::Sender<discovery::DiscoveryEvent>,
    parent: &CancellationToken,
) -> bool {
    let mut changed = false;
    let mut kept = Vec::new();
    for client in clients.drain(..) {
        let position = wanted.iter().position(|e| *e == client.endpoint);
        if position.is_some() && !restart {
            kept.push(client);
            continue;
        }
        client.stop.cancel();
        if position.is_some() {
            // Same service, new keys: a new session at the same index keeps its members
            // until its snapshot replaces them.
            kept.push(start_client(
                client.index,
                client.endpoint,
                settings,
                publication,
                events,
                Some(client.status),
                parent,
            ));
            continue;
        }
        tracing::info!(endpoint = %client.endpoint.url, "discovery service removed by a reload: deleting this node's record there");
        changed |= cache.remove_source(client.index);
        let settings = settings.clone();
        tokio::spawn(async move {
            let _ = client.task.await;
            match discovery::delete_record(&client.endpoint, &settings).await {
                Ok(()) => {
                    tracing::info!(endpoint = %client.endpoint.url, "deleted this node's record from the removed discovery service")
                }
                Err(e) => {
                    tracing::warn!(endpoint = %client.endpoint.url, error = %e, "could not delete this node's record from the removed discovery service; it expires with its TTL")
                }
            }
        });
    }
    for endpoint in wanted {
        if kept.iter().any(|c| c.endpoint == *endpoint) {
            continue;
        }
        tracing::info!(endpoint = %endpoint.url, "discovery service added by a reload");
        let index = cache.add_source();
        kept.push(start_client(
            index,
            endpoint.clone(),
            settings,
            publication,
            events,
            None,
            parent,
        ));
    }
    // In the configured order, for the status.
    kept.sort_by_key(|c| wanted.iter().position(|e| *e == c.endpoint));
    *clients = kept;
    changed
}

/// Keeps a port mapping for the listen port at the gateway while the agent runs, and feeds
/// the mapped endpoint into `nat`.
fn spawn_port_mapper(
    listen_port: u16,
    nat: watch::Sender<NatEndpoints>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let (updates_tx, mut updates_rx) = watch::channel(None);
    let config = crate::portmap::PortMapperConfig::new(listen_port);
    tokio::spawn(async move {
        let mapper = tokio::spawn(crate::portmap::run(config, updates_tx, stop));
        while updates_rx.changed().await.is_ok() {
            let mapped = updates_rx
                .borrow_and_update()
                .as_ref()
                .map(|mapping| mapping.external);
            nat.send_if_modified(|current| {
                let changed = current.mapped != mapped;
                current.mapped = mapped;
                changed
            });
        }
        let _ = mapper.await;
    })
}

/// Writes the warm-start cache (sealed) on a blocking thread; a failure is logged, not fatal.
fn save_members(
    keys: &Arc<ClusterKeys>,
    config: &Config,
    cache: &RegistryCache,
) -> tokio::task::JoinHandle<()> {
    let members = cache.to_persist(Instant::now(), unix_ms(SystemTime::now()));
    let (keys, cluster_id, dir) = (
        keys.clone(),
        config.cluster_id.clone(),
        config.state_dir.clone(),
    );
    tokio::task::spawn_blocking(move || {
        let sealed = warm::seal(&keys, &cluster_id, &members);
        if let Err(e) = warm::save(&dir, &sealed) {
            tracing::warn!(error = %e, "cannot write the warm-start cache");
        }
    })
}

/// `None` when netlink fails: the caller keeps what it had rather than publishing no addresses.
async fn read_addresses(mesh_interface: &str) -> Option<Vec<IpAddr>> {
    match crate::host::node_addresses(mesh_interface).await {
        Ok(addresses) => Some(addresses),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read node addresses through netlink; keeping the last known ones");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn config() -> Config {
        crate::config::parse(
            "clusterID: test-cluster\nclusterSecret: AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n\
             discovery:\n  endpoints: [\"http://127.0.0.1:3000\"]\n",
        )
        .expect("a valid configuration")
    }

    fn identity() -> NodeIdentity {
        NodeIdentity {
            node_id: "n".into(),
            nodename: "n".into(),
            hostname: "n".into(),
            public_key: "k".into(),
            mesh_address: "fd00::1".parse().unwrap(),
            mesh_prefix: "fd00::/64".parse().unwrap(),
            mac_source: "test".into(),
            operating_system: "test".into(),
        }
    }

    /// A discovery server reached over loopback answers Hello with 127.0.0.1; publishing that
    /// would send every peer to itself.
    #[test]
    fn loopback_and_unroutable_public_ips_are_never_published() {
        let facts = HostFacts {
            nat: NatEndpoints::default(),
            relays: Vec::new(),
            addresses: vec!["10.0.0.1".parse().unwrap()],
            public_ips: vec![
                "127.0.0.1".parse().unwrap(),
                "::1".parse().unwrap(),
                "0.0.0.0".parse().unwrap(),
                "203.0.113.9".parse().unwrap(),
            ],
        };
        let record = local_record(&config(), &identity(), &facts);
        let port = config().listen_port;
        assert_eq!(
            record.endpoints,
            [
                SocketAddr::new("10.0.0.1".parse().unwrap(), port),
                SocketAddr::new("203.0.113.9".parse().unwrap(), port),
            ]
        );
    }

    /// Endpoints learned behind NAT come after the node's own, the mapped one first, and are
    /// declared as such; an unroutable or repeated one is not announced.
    #[test]
    fn mapped_and_reflexive_endpoints_follow_the_nodes_own() {
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let port = config().listen_port;
        let facts = HostFacts {
            addresses: vec!["192.168.1.2".parse().unwrap()],
            public_ips: vec!["198.51.100.7".parse().unwrap()],
            nat: NatEndpoints {
                reflexive: Some(sa("198.51.100.7:61000")),
                mapped: Some(sa("198.51.100.7:51820")),
                note: None,
                endpoint_dependent: false,
            },
            relays: Vec::new(),
        };
        let record = local_record(&config(), &identity(), &facts);
        assert_eq!(port, 51820);
        assert_eq!(
            record.endpoints,
            [
                sa("192.168.1.2:51820"),
                sa("198.51.100.7:51820"),
                sa("198.51.100.7:61000"),
            ],
            "the mapped endpoint equals Hello's IP with the port: announced once"
        );
        let learned = &record.kubespan.as_ref().unwrap().learned_endpoints;
        assert_eq!(
            learned,
            &[
                (sa("198.51.100.7:51820"), LearnedKind::Mapped),
                (sa("198.51.100.7:61000"), LearnedKind::Reflexive)
            ]
        );
        let facts = HostFacts {
            nat: NatEndpoints {
                reflexive: Some(sa("127.0.0.1:61000")),
                mapped: Some(sa("203.0.113.5:40000")),
                note: None,
                endpoint_dependent: false,
            },
            ..facts
        };
        let record = local_record(&config(), &identity(), &facts);
        assert_eq!(record.endpoints.last(), Some(&sa("203.0.113.5:40000")));
        assert!(!record.endpoints.contains(&sa("127.0.0.1:61000")));
        // Behind a NAT that maps per destination, Hello's IP with the listen port is dropped.
        let hard = HostFacts {
            nat: NatEndpoints {
                endpoint_dependent: true,
                ..NatEndpoints::default()
            },
            ..facts.clone()
        };
        assert_eq!(
            local_record(&config(), &identity(), &hard).endpoints,
            [sa("192.168.1.2:51820")]
        );
        // The declaration survives the wire format.
        let decoded = crate::record::decode(&crate::record::encode(&record)).unwrap();
        assert_eq!(
            decoded.kubespan.unwrap().learned_endpoints,
            [(sa("203.0.113.5:40000"), LearnedKind::Mapped)]
        );
    }
}
