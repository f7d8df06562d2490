//! The membership API (`openspan.agent.v1.Agent`) on a unix socket.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::Stream;
use openspan_proto::openspan::agent::v1::{
    self as pb,
    agent_server::{Agent, AgentServer},
};
use tokio::net::UnixListener;
use tokio_stream::wrappers::{UnixListenerStream, WatchStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::agent::{MembershipView, Shared};
use crate::dataplane::{ROTATION_GRACE, Rotation};

/// What the data plane reports about one peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerStatusView {
    pub state: &'static str,
    pub endpoint: Option<std::net::SocketAddr>,
    pub last_handshake_unix_ms: i64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub last_endpoint_change_unix_ms: i64,
    pub path: String,
    pub candidates: Vec<std::net::SocketAddr>,
}

/// The data plane as the API sees it.
pub trait PeerStatusProvider: Send + Sync + 'static {
    /// A short description, e.g. "kernel WireGuard on kubespan".
    fn describe(&self) -> String;
    fn peer_status(&self, public_key: &str) -> Option<PeerStatusView>;
    /// Data messages that did not decrypt, when the data plane counts them (the userspace
    /// device does; kernel WireGuard and `backend: none` do not).
    fn decrypt_failures(&self) -> Option<u64> {
        None
    }
}

/// No data plane: every peer is `unknown`.
pub struct NoDataPlane;

impl PeerStatusProvider for NoDataPlane {
    fn describe(&self) -> String {
        "none (membership only)".into()
    }

    fn peer_status(&self, _public_key: &str) -> Option<PeerStatusView> {
        None
    }
}

pub struct AgentApi {
    shared: Arc<Shared>,
    data_plane: Arc<dyn PeerStatusProvider>,
    /// Where key rotations go to the data plane (`None`: no data plane).
    rotations: Option<tokio::sync::mpsc::Sender<Rotation>>,
    /// When the last rotation's grace ends: another rotation before then is refused (the
    /// device keeps one previous key).
    rotating_until: tokio::sync::Mutex<Option<Instant>>,
    /// One health evaluation at a time (each runs `nft`, dumps routes and probes every peer):
    /// callers that arrived while one ran get its answer, so a loop of callers costs one
    /// evaluation at a time, not one each.
    last_health: tokio::sync::Mutex<Option<(Instant, bool, pb::Health)>>,
}

impl AgentApi {
    pub fn new(shared: Arc<Shared>, data_plane: Arc<dyn PeerStatusProvider>) -> Self {
        Self {
            shared,
            data_plane,
            rotations: None,
            rotating_until: tokio::sync::Mutex::new(None),
            last_health: tokio::sync::Mutex::new(None),
        }
    }

    /// Sends key rotations to the data plane.
    pub fn with_rotations(mut self, rotations: tokio::sync::mpsc::Sender<Rotation>) -> Self {
        self.rotations = Some(rotations);
        self
    }

    /// `RotateKey`: a new key pair, stored (atomically) before anything else so a crash never
    /// loses a key peers may know; then put on the device, and only then published, so a peer
    /// that learns it finds the device answering to it.
    async fn rotate_key(&self) -> Result<pb::RotateKeyResponse, Status> {
        let mut rotating_until = self.rotating_until.lock().await;
        let now = Instant::now();
        if let Some(until) = rotating_until.filter(|until| *until > now) {
            return Err(Status::failed_precondition(format!(
                "the last key rotation is still in its grace period for {} s (the old key may still be in use); try again then",
                until.saturating_duration_since(now).as_secs() + 1
            )));
        }
        let old_public_key = self.shared.public_key.borrow().clone();
        let keys = crate::identity::WireguardKeys::try_generate()
            .map_err(|e| Status::internal(e.to_string()))?;
        let state_dir = self.shared.config.borrow().state_dir.clone();
        let stored = keys.clone();
        tokio::task::spawn_blocking(move || {
            crate::identity::store_wireguard_keys(&state_dir, &stored)
        })
        .await
        .map_err(|e| Status::internal(format!("storing the key failed: {e}")))?
        .map_err(|e| Status::internal(format!("the key was not changed: {e}")))?;
        let seamless = match &self.rotations {
            Some(rotations) => {
                let (done, result) = tokio::sync::oneshot::channel();
                let sent = rotations
                    .send(Rotation {
                        private_key: keys.private_key,
                        done,
                    })
                    .await;
                let applied = match sent {
                    Ok(()) => result
                        .await
                        .unwrap_or_else(|_| Err("the data plane stopped".into())),
                    Err(_) => Err("the data plane stopped".into()),
                };
                match applied {
                    Ok(seamless) => seamless,
                    Err(e) => {
                        // Stored already: the next start uses it. Publishing it now would cut
                        // this node off from peers that learn it, so it is not published.
                        return Err(Status::internal(format!(
                            "the new key is stored but the WireGuard device refused it ({e}); restart the agent to use it"
                        )));
                    }
                }
            }
            None => false,
        };
        let new_public_key = keys.public_base64();
        self.shared.public_key.send_replace(new_public_key.clone());
        let grace = if seamless {
            ROTATION_GRACE
        } else {
            Duration::ZERO
        };
        *rotating_until = Some(now + grace);
        tracing::info!(old = %old_public_key, new = %new_public_key, grace_s = grace.as_secs(), "WireGuard key rotated and published; peers learn it through discovery");
        let note = if seamless {
            format!(
                "the old key keeps working until every peer has a session under the new one, {} s at most",
                grace.as_secs()
            )
        } else if self.rotations.is_some() {
            "this device holds one key (kernel WireGuard): each peer is cut off until it has learned the new key through discovery and handshaken to it".to_owned()
        } else {
            "no data plane: the new key is published".to_owned()
        };
        Ok(pb::RotateKeyResponse {
            old_public_key,
            new_public_key,
            grace_seconds: grace.as_secs() as u32,
            note,
        })
    }

    fn identity(&self) -> pb::Identity {
        let id = &self.shared.identity;
        let config = self.shared.running_config();
        let view = self.shared.view.borrow().clone();
        pb::Identity {
            node_id: id.node_id.clone(),
            nodename: id.nodename.clone(),
            hostname: id.hostname.clone(),
            cluster_id: config.cluster_id.clone(),
            public_key: self.shared.public_key.borrow().clone(),
            mesh_address: id.mesh_address.to_string(),
            mesh_prefix: id.mesh_prefix.to_string(),
            mac_source: id.mac_source.clone(),
            cipher: format!("{:?}", config.cipher).to_lowercase(),
            listen_port: u32::from(config.listen_port),
            interface: config.interface.clone(),
            addresses: view
                .local
                .addresses
                .iter()
                .map(ToString::to_string)
                .collect(),
            endpoints: view
                .local
                .endpoints
                .iter()
                .map(ToString::to_string)
                .collect(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    /// Peers sorted by label, for people.
    fn peers(&self, view: &MembershipView) -> Vec<pb::Peer> {
        let mut specs: Vec<_> = view.peers.iter().collect();
        specs.sort_by(|a, b| (&a.label, &a.node_id).cmp(&(&b.label, &b.node_id)));
        specs
            .into_iter()
            .map(|spec| {
                let status =
                    self.data_plane
                        .peer_status(&spec.public_key)
                        .unwrap_or(PeerStatusView {
                            state: "unknown",
                            ..PeerStatusView::default()
                        });
                pb::Peer {
                    public_key: spec.public_key.clone(),
                    node_id: spec.node_id.clone(),
                    label: spec.label.clone(),
                    mesh_address: spec.mesh_address.to_string(),
                    allowed_ips: spec.allowed_ips.iter().map(ToString::to_string).collect(),
                    endpoints: spec.endpoints.iter().map(ToString::to_string).collect(),
                    status: Some(pb::PeerStatus {
                        state: status.state.into(),
                        endpoint: status.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                        last_handshake_unix_ms: status.last_handshake_unix_ms,
                        rx_bytes: status.rx_bytes,
                        tx_bytes: status.tx_bytes,
                        last_endpoint_change_unix_ms: status.last_endpoint_change_unix_ms,
                        path: status.path.clone(),
                        candidates: status.candidates.iter().map(ToString::to_string).collect(),
                    }),
                }
            })
            .collect()
    }
}

impl AgentApi {
    /// Gathers what `kubespanctl health` judges: the control loop's state, and reads of the
    /// kernel's state (firewall table, rules and routes, sockets) and, when asked, the path probe.
    async fn health_facts(&self, probe_paths: bool) -> crate::health::HealthFacts {
        use crate::health::{DataPlaneFacts, HealthFacts, PeerFacts};
        let config = self.shared.config.borrow().clone();
        let view = self.shared.view.borrow().clone();
        let peers = self.peers(&view);
        let peer_facts = peers
            .iter()
            .map(|p| {
                let status = p.status.clone().unwrap_or_default();
                PeerFacts {
                    label: p.label.clone(),
                    state: status.state,
                    last_handshake_unix_ms: status.last_handshake_unix_ms,
                    endpoint: (!status.endpoint.is_empty()).then_some(status.endpoint),
                    tried: if status.candidates.is_empty() {
                        p.endpoints.clone()
                    } else {
                        status.candidates
                    },
                }
            })
            .collect::<Vec<_>>();
        let data_plane = if config.data_plane.backend == crate::config::Backend::None {
            None
        } else {
            let routing = crate::routing::RoutingConfig::from_data_plane(
                &config.data_plane,
                config.interface.clone(),
                self.shared.identity.mesh_address,
                config.mtu,
            );
            let table = config.data_plane.nftables_table.clone();
            let port = config.listen_port;
            let up: Vec<(String, std::net::Ipv6Addr)> = peers
                .iter()
                .filter(|p| p.status.as_ref().is_some_and(|s| s.state == "up"))
                .filter_map(|p| Some((p.label.clone(), p.mesh_address.parse().ok()?)))
                .collect();
            let mtu = config.mtu;
            let blocking = tokio::task::spawn_blocking(move || {
                let bound = crate::health_probe::listen_port_bound(port);
                let probes = probe_paths.then(|| crate::health_probe::probe_paths(&up, mtu));
                (bound, probes)
            });
            let routing_missing = crate::routing::missing(&routing)
                .await
                .map_err(|e| e.to_string());
            let firewall = crate::firewall::chains(&table).await;
            let (bound, probes) = blocking.await.unwrap_or_else(|e| {
                let error = format!("health probe task failed: {e}");
                (Err(error.clone()), Some(Err(error)))
            });
            Some(DataPlaneFacts {
                interface: config.interface.clone(),
                mtu,
                listen_port: port,
                firewall: Some(firewall),
                routing_missing: Some(routing_missing),
                listen_port_bound: Some(bound),
                path_probes: probes,
            })
        };
        HealthFacts {
            now_unix_ms: crate::wg::uapi::unix_ms(std::time::SystemTime::now()),
            cipher: config.cipher.as_str().into(),
            discovery: self.shared.connection_statuses(),
            node_addresses: view.local.addresses.clone(),
            nat: self.shared.nat.borrow().clone(),
            relays: view
                .local
                .kubespan
                .as_ref()
                .map(|k| k.relays.clone())
                .unwrap_or_default(),
            listen_port: config.listen_port,
            peers: peer_facts,
            data_plane,
        }
    }
}

fn members_response(view: &MembershipView) -> pb::ListMembersResponse {
    pb::ListMembersResponse {
        members: view
            .members
            .values()
            .map(|m| pb::Member {
                nodename: m.nodename.clone(),
                node_id: m.node_id.clone(),
                hostname: m.hostname.clone(),
                machine_type: m.machine_type.clone(),
                operating_system: m.operating_system.clone(),
                addresses: m.addresses.iter().map(ToString::to_string).collect(),
                mesh_address: m.mesh_address.map(|a| a.to_string()).unwrap_or_default(),
                public_key: m.public_key.clone().unwrap_or_default(),
                local: m.node_id == view.local.node_id,
                control_plane_port: m.control_plane_port.map(u32::from).unwrap_or_default(),
            })
            .collect(),
    }
}

type MemberStream = Pin<Box<dyn Stream<Item = Result<pb::ListMembersResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentApi {
    async fn get_identity(
        &self,
        _: Request<pb::GetIdentityRequest>,
    ) -> Result<Response<pb::Identity>, Status> {
        Ok(Response::new(self.identity()))
    }

    async fn list_members(
        &self,
        _: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        Ok(Response::new(members_response(&self.shared.view.borrow())))
    }

    type WatchMembersStream = MemberStream;

    async fn watch_members(
        &self,
        _: Request<pb::WatchMembersRequest>,
    ) -> Result<Response<Self::WatchMembersStream>, Status> {
        let stream = WatchStream::new(self.shared.view.clone());
        let mut last: Option<pb::ListMembersResponse> = None;
        let stream = futures::StreamExt::filter_map(stream, move |view| {
            let response = members_response(&view);
            let changed = last.as_ref() != Some(&response);
            last = Some(response.clone());
            futures::future::ready(changed.then_some(Ok(response)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_peers(
        &self,
        _: Request<pb::ListPeersRequest>,
    ) -> Result<Response<pb::ListPeersResponse>, Status> {
        let view = self.shared.view.borrow().clone();
        Ok(Response::new(pb::ListPeersResponse {
            peers: self.peers(&view),
        }))
    }

    async fn get_status(
        &self,
        _: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::AgentStatus>, Status> {
        let view = self.shared.view.borrow().clone();
        let nat = self.shared.nat.borrow().clone();
        let peers = self.peers(&view);
        let count = |state: &str| {
            peers
                .iter()
                .filter(|p| p.status.as_ref().is_some_and(|s| s.state == state))
                .count() as u32
        };
        Ok(Response::new(pb::AgentStatus {
            identity: Some(self.identity()),
            discovery: self
                .shared
                .connection_statuses()
                .into_iter()
                .map(|c| pb::DiscoveryConnection {
                    endpoint: c.endpoint,
                    state: c.state.into(),
                    last_error: c.last_error,
                    since_unix_ms: c.since_unix_ms,
                    affiliates: c.affiliates as u32,
                    public_ip: c.public_ip.map(|ip| ip.to_string()).unwrap_or_default(),
                })
                .collect(),
            members: view.members.len() as u32,
            peers: peers.len() as u32,
            peers_up: count("up"),
            peers_down: count("down"),
            peers_unknown: count("unknown"),
            warnings: view.warnings.clone(),
            members_retained: view.retained as u32,
            own_record_tampered: self
                .shared
                .counters
                .own_record_tampered
                .load(std::sync::atomic::Ordering::Relaxed),
            data_plane: self.data_plane.describe(),
            reflexive_endpoint: nat.reflexive.map(|e| e.to_string()).unwrap_or_default(),
            mapped_endpoint: nat.mapped.map(|e| e.to_string()).unwrap_or_default(),
            nat_note: nat.note.clone().unwrap_or_default(),
        }))
    }

    async fn get_health(
        &self,
        request: Request<pb::GetHealthRequest>,
    ) -> Result<Response<pb::Health>, Status> {
        let probe_paths = !request.into_inner().skip_path_probe;
        let arrived = Instant::now();
        let mut last = self.last_health.lock().await;
        if let Some((finished, probed, health)) = last.as_ref()
            && *finished >= arrived
            && (*probed || !probe_paths)
        {
            return Ok(Response::new(health.clone()));
        }
        let facts = self.health_facts(probe_paths).await;
        let (overall, checks) = crate::health::evaluate(&facts);
        let health = pb::Health {
            status: overall.as_str().into(),
            checks: checks
                .into_iter()
                .map(|c| pb::HealthCheck {
                    name: c.name.into(),
                    status: c.status.as_str().into(),
                    summary: c.summary,
                    details: c.details,
                    hint: c.hint,
                })
                .collect(),
            checked_unix_ms: facts.now_unix_ms,
        };
        *last = Some((Instant::now(), probe_paths, health.clone()));
        Ok(Response::new(health))
    }

    async fn rotate_key(
        &self,
        _: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        tracing::info!("key rotation requested through the API");
        AgentApi::rotate_key(self).await.map(Response::new)
    }

    async fn leave(
        &self,
        _: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        tracing::info!("leave requested through the API");
        let deleted_from = self.shared.leave(Duration::from_secs(10)).await as u32;
        Ok(Response::new(pb::LeaveResponse { deleted_from }))
    }

    async fn reload(
        &self,
        _: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        let result = self.shared.reload(None, true, "API").await;
        Ok(Response::new(reload_response(result, true)))
    }

    async fn diff_config(
        &self,
        request: Request<pb::DiffConfigRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        let request = request.into_inner();
        let text = (!request.config.is_empty()).then(|| {
            let name = if request.name.is_empty() {
                "<config>".to_string()
            } else {
                request.name
            };
            (request.config, name)
        });
        let result = self.shared.reload(text, false, "API").await;
        Ok(Response::new(reload_response(result, false)))
    }
}

/// A reload plan (or an invalid file) for the API.
pub fn reload_response(
    result: Result<crate::config::ReloadPlan, crate::config::ConfigError>,
    applying: bool,
) -> pb::ReloadResponse {
    match result {
        Err(e) => pb::ReloadResponse {
            invalid: e.to_string(),
            summary: format!("refused: invalid configuration: {e}"),
            ..Default::default()
        },
        Ok(plan) => pb::ReloadResponse {
            applied: applying && !plan.refused() && !plan.changes.is_empty(),
            summary: plan.summary(),
            changes: plan
                .changes
                .into_iter()
                .map(|c| pb::ConfigChange {
                    key: c.key.into(),
                    from: c.from,
                    to: c.to,
                })
                .collect(),
            refusals: plan
                .refusals
                .into_iter()
                .map(|r| pb::ConfigRefusal {
                    key: r.key.into(),
                    reason: r.reason,
                })
                .collect(),
            invalid: String::new(),
        },
    }
}

/// Claims the API socket (mode 0660). Fails when another agent is serving it, before anything
/// else starts, so a second instance never touches the running one's interface or rules.
pub async fn bind(socket: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the API socket directory {}", dir.display()))?;
    }
    if socket.exists() {
        // A live agent would answer; a stale file from a crash is removed.
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            anyhow::bail!(
                "another agent is already serving {} (stop it first, or set apiSocket to another path)",
                socket.display()
            );
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("cannot remove the stale socket {}", socket.display()))?;
    }
    let listener = UnixListener::bind(socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set the mode of {}", socket.display()))?;
    Ok(listener)
}

/// Serves the API on a listener from [`bind`] until `stop`; removes the socket file afterwards.
pub fn serve(
    listener: UnixListener,
    socket: &Path,
    api: AgentApi,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    tracing::info!(socket = %socket.display(), "membership API listening");
    let path = socket.to_owned();
    tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(AgentServer::new(api))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop.cancelled())
            .await;
        let _ = std::fs::remove_file(&path);
        result.context("membership API server failed")
    })
}
