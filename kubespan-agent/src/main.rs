//! `kubespan-agent`: the per-node daemon.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use base64::Engine;
use clap::{CommandFactory, Parser};
use kubespan_agent::agent::{self, NodeIdentity};
use kubespan_agent::api::{self, AgentApi, NoDataPlane};
use kubespan_agent::config::Backend;
use kubespan_agent::config::{self, DEFAULT_CONFIG_PATH};
use kubespan_agent::crypto::ClusterKeys;
use kubespan_agent::dataplane::{self, StatusBoard};
use kubespan_agent::{host, identity, metrics};
use tokio_util::sync::CancellationToken;

/// Per-node agent of an openspan (KubeSpan-compatible) WireGuard mesh.
///
/// Publishes this node's encrypted record to the configured discovery services, watches the
/// other nodes, and serves the membership API that `kubespanctl` reads. Configuration is one
/// YAML file (`kubespanctl gen config` writes a commented one).
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    /// Configuration file.
    #[arg(long, short, env = "KUBESPAN_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,

    /// Debug logging (RUST_LOG, when set, takes precedence).
    #[arg(long, env = "KUBESPAN_DEBUG")]
    debug: bool,

    /// Log format.
    #[arg(long, env = "KUBESPAN_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn node_identity(
    config: &config::Config,
) -> anyhow::Result<(NodeIdentity, identity::WireguardKeys)> {
    let node_id = identity::load_or_create_node_id(&config.state_dir)?;
    let keys = identity::load_or_create_wireguard_keys(&config.state_dir)?;
    let (mac, mac_source) = match config.mac_address {
        Some(mac) => (mac, "macAddress in the configuration".to_string()),
        None => {
            let links =
                identity::read_links().context("cannot list network links in /sys/class/net")?;
            let (link, mac) = identity::select_mac(&links, &config.interface).context(
                "no link with a usable MAC address to derive the mesh address from: set macAddress in the configuration",
            )?;
            (mac, format!("{link} (first hardware address)"))
        }
    };
    let hostname = host::hostname();
    let node = NodeIdentity {
        node_id,
        nodename: config.node_name.clone().unwrap_or_else(|| hostname.clone()),
        hostname,
        public_key: keys.public_base64(),
        mesh_address: identity::mesh_address(&config.cluster_id, mac),
        mesh_prefix: identity::mesh_prefix(&config.cluster_id),
        mac_source,
        operating_system: host::operating_system(),
    };
    Ok((node, keys))
}

fn main() -> std::process::ExitCode {
    if let Some(code) = openspan_runtime::manpages::generate_if_asked(
        Args::command,
        openspan_runtime::manpages::Section::Admin,
    ) {
        return code;
    }
    openspan_runtime::exit_with(run())
}

#[tokio::main]
async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    // First of all: a SIGHUP's default action would kill the agent (a `systemctl reload` right
    // after start); one that arrives before the reloader runs is handled when it does.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot install the SIGHUP handler")?;
    openspan_runtime::init_logging(args.debug, args.log_format == "json");
    let config = config::load(&args.config)?;
    let (identity, wireguard_keys) = node_identity(&config)?;
    tracing::info!(
        node_id = %identity.node_id, nodename = %identity.nodename, public_key = %identity.public_key,
        mesh_address = %identity.mesh_address, mac_source = %identity.mac_source,
        cipher = ?config.cipher, "starting kubespan-agent"
    );
    let keys = Arc::new(ClusterKeys::for_config(&config));
    let stop = CancellationToken::new();
    let api_stop = CancellationToken::new();

    // Claim the listeners first: if another agent runs, or a port is taken, nothing has started.
    let api_listener = api::bind(&config.api_socket).await?;
    let metrics_listener = match &config.metrics_addr {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };

    // Relays: connected from the start, so the node announces them with its first record.
    let relays = if config.relay.servers.is_empty() || config.data_plane.backend == Backend::None {
        None
    } else {
        let public_key = base64::engine::general_purpose::STANDARD
            .decode(&identity.public_key)
            .ok()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .context("this node's public key is not 32 bytes of base64")?;
        Some(kubespan_agent::relay::Relays::start(
            &config.relay,
            &config.cluster_id,
            openspan_relay::access_token(&config.cluster_secret, &config.cluster_id),
            public_key,
            config.listen_port,
            stop.clone(),
        ))
    };
    let (shared_tx, shared_rx) = tokio::sync::oneshot::channel();
    let control = tokio::spawn(agent::run(
        config.clone(),
        args.config.clone(),
        identity.clone(),
        keys.clone(),
        relays.clone(),
        stop.clone(),
        move |shared| {
            let _ = shared_tx.send(shared);
        },
    ));
    let shared = shared_rx
        .await
        .context("the control loop stopped before it started")?;
    let (rotations_tx, rotations) = tokio::sync::mpsc::channel(1);
    let (data_plane, data_plane_task): (Arc<dyn api::PeerStatusProvider>, _) =
        if config.data_plane.backend == Backend::None {
            tracing::info!("backend: none; membership only, no WireGuard interface");
            (Arc::new(NoDataPlane), None)
        } else {
            let board = Arc::new(StatusBoard::default());
            let inputs = dataplane::Inputs {
                config: config.clone(),
                identity: identity.clone(),
                private_key: wireguard_keys.private_key,
                keys: keys.clone(),
                view: shared.view.clone(),
                publication: shared.publication.clone(),
                status: board.clone(),
                alive: shared.alive.clone(),
                nat: shared.nat.clone(),
                relays: relays.clone(),
                rotations,
                config_updates: shared.config.subscribe(),
            };
            let task = tokio::spawn(dataplane::run(inputs, stop.clone()));
            (board, Some(task))
        };
    let mut agent_api = AgentApi::new(shared.clone(), data_plane.clone());
    if data_plane_task.is_some() {
        agent_api = agent_api.with_rotations(rotations_tx);
    }
    let api_task = api::serve(
        api_listener,
        &config.api_socket,
        agent_api,
        api_stop.clone(),
    );
    let metrics_task = metrics_listener.map(|listener| {
        metrics::serve(
            listener,
            shared.clone(),
            data_plane.clone(),
            api_stop.clone(),
        )
    });

    // SIGHUP: re-read the configuration file and apply what can change live.
    let reloader = shared.clone();
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            let _ = reloader.reload(None, true, "SIGHUP").await;
        }
    });

    let mut data_plane_task = data_plane_task;
    let failed_data_plane = async {
        match data_plane_task.as_mut() {
            Some(task) => task.await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        signal = openspan_runtime::shutdown_signal() => {
            tracing::info!(signal = signal.context("cannot install the SIGTERM and SIGINT handlers")?, "shutting down: leaving the discovery services, removing the data plane");
            stop.cancel();
        }
        result = failed_data_plane => {
            // The data plane only returns early on a setup error: stop everything and say why.
            stop.cancel();
            let _ = control.await;
            api_stop.cancel();
            let _ = api_task.await;
            return match result {
                Ok(Ok(())) => Err(anyhow::anyhow!("the data plane stopped unexpectedly")),
                Ok(Err(e)) => Err(e.context("the data plane failed")),
                Err(e) => Err(anyhow::anyhow!("the data plane panicked: {e}")),
            };
        }
    }
    if let Some(task) = data_plane_task {
        match task.await {
            Ok(Err(e)) => {
                tracing::error!(error = %format!("{e:#}"), "data plane stopped with an error")
            }
            Err(e) => tracing::error!(error = %e, "data plane panicked"),
            Ok(Ok(())) => {}
        }
    }
    control.await.context("control loop panicked")??;
    api_stop.cancel();
    api_task.await.context("API task panicked")??;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    tracing::info!("stopped");
    Ok(())
}
