//! `kubespanctl`: members, peers and mesh health from the local kubespan-agent.

#![forbid(unsafe_code)]

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use hyper_util::rt::TokioIo;
use kubespan_agent::config;
use openspan_proto::openspan::agent::v1::{self as pb, agent_client::AgentClient};
use tonic::transport::{Channel, Endpoint, Uri};

/// Show and manage the local kubespan-agent: members, WireGuard peers and mesh health.
#[derive(Debug, Parser)]
#[command(name = "kubespanctl", version)]
struct Cli {
    /// The agent's API socket.
    #[arg(
        long,
        short,
        global = true,
        env = "KUBESPAN_SOCKET",
        default_value = "/run/kubespan/agent.sock"
    )]
    socket: PathBuf,

    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One screen: identity, discovery connections, members and peers up/down/unknown.
    Status,
    /// Cluster members (this node included).
    Members,
    /// WireGuard peers with their state, endpoint, last handshake and traffic.
    Peers,
    /// This node's identity: node id, public key, mesh address, endpoints.
    Identity,
    /// Print the member list now and whenever it changes (Ctrl-C to stop).
    Watch,
    /// Delete this node's record from every discovery service; peers drop it at once.
    Leave,
    /// Is this node's mesh healthy? Each check (discovery, public-address, decrypt, clock,
    /// peers, path-mtu, firewall, routing, listen-port) says what it found and what to do.
    /// Exit code: 0 healthy (warnings allowed), 3 a check failed (or warned, with --strict).
    Health {
        /// Do not probe the path MTU over the tunnel (one ICMPv6 echo per peer, up to 1.5 s).
        #[arg(long)]
        skip_path_probe: bool,
        /// Exit 3 on warnings too.
        #[arg(long)]
        strict: bool,
    },
    /// Replace this node's WireGuard key: stored in the state directory, put on the device and
    /// published; peers learn it through discovery. With the userspace device the old key keeps
    /// working until every peer has a session under the new one (no traffic gap).
    RotateKey,
    /// Re-read the agent's configuration file and apply what can change without dropping
    /// tunnels (as SIGHUP does); prints what was applied. Exit 1 when refused (the running
    /// configuration is kept).
    Reload,
    /// Show what reloading a configuration would change, without applying it (dry run). Exit 1
    /// when the reload would be refused.
    Diff {
        /// The configuration to compare with the running one (default: the agent's own file).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Generate secrets or a configuration file.
    #[command(subcommand)]
    Gen(Gen),
    /// Print a shell completion script (bash, zsh or fish).
    ///
    /// Load it into the current shell with `source <(kubespanctl completion bash)` (zsh:
    /// `source <(kubespanctl completion zsh)`, fish: `kubespanctl completion fish | source`), or
    /// install it where the shell looks for completions:
    /// /usr/share/bash-completion/completions/kubespanctl,
    /// /usr/share/zsh/vendor-completions/_kubespanctl,
    /// /usr/share/fish/vendor_completions.d/kubespanctl.fish (the Debian package does).
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: Shell,
    },
}

/// The shells `kubespanctl completion` writes scripts for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Subcommand)]
enum Gen {
    /// Print a fresh cluster id and cluster secret.
    Secrets,
    /// Print (or write with --output-file) a commented YAML configuration with a fresh cluster
    /// id and secret (or the given ones). Every node of a cluster needs the same id and secret:
    /// generate once, then pass them to the other nodes with --cluster-id and --cluster-secret.
    Config {
        /// The cluster id shared by every node (default: a fresh random one).
        #[arg(long, value_name = "ID")]
        cluster_id: Option<String>,
        /// The cluster secret shared by every node: 32 bytes in standard base64, as printed by
        /// `kubespanctl gen secrets` (default: a fresh random one).
        #[arg(long, value_name = "BASE64")]
        cluster_secret: Option<String>,
        /// A discovery service URL every node can reach (http://host:port plaintext, https:// TLS);
        /// repeat for several services.
        #[arg(
            long = "discovery-endpoint",
            value_name = "URL",
            default_value = "http://127.0.0.1:3000"
        )]
        discovery_endpoints: Vec<String>,
        /// Write the configuration to this file (mode 0600: it holds the cluster secret),
        /// creating its directory, instead of printing it.
        #[arg(long, value_name = "FILE")]
        output_file: Option<PathBuf>,
        /// Replace --output-file if it exists.
        #[arg(long, requires = "output_file")]
        force: bool,
    },
    /// Print the line a relay needs to let this cluster's nodes in
    /// (`openspan-relay --cluster <id>=<verifier>`): the SHA-256 of the cluster's relay access
    /// token, from which neither the token nor the cluster secret can be recovered.
    RelayVerifier {
        /// The agent configuration to read clusterID and clusterSecret from.
        #[arg(long, default_value = "/etc/kubespan/config.yaml")]
        config: std::path::PathBuf,
    },
}

/// Exit codes: 0 ok, 1 the request failed, 2 the agent cannot be reached, 3 unhealthy.
#[derive(Debug)]
enum Failure {
    Unreachable(String),
    Failed(String),
    /// `health` found a failing check; its report is already printed.
    Unhealthy,
}

fn random_base64() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The configuration `gen config` prints, its flags checked as the agent would check the file.
fn generate_config(
    cluster_id: Option<String>,
    cluster_secret: Option<String>,
    endpoints: &[String],
) -> Result<String, Failure> {
    let cluster_id = cluster_id.unwrap_or_else(random_base64);
    if cluster_id.trim().is_empty() || cluster_id.trim() != cluster_id {
        return Err(Failure::Failed(
            "--cluster-id: it must be a non-empty string without surrounding spaces".into(),
        ));
    }
    let cluster_secret = cluster_secret.unwrap_or_else(random_base64);
    kubespan_agent::crypto::parse_cluster_secret(&cluster_secret)
        .map_err(|e| Failure::Failed(format!("--cluster-secret: {e}")))?;
    for url in endpoints {
        config::DiscoveryEndpoint::parse(url)
            .map_err(|e| Failure::Failed(format!("--discovery-endpoint: {e}")))?;
    }
    let text = config::example(&cluster_id, &cluster_secret, endpoints);
    config::parse(&text)
        .map_err(|e| Failure::Failed(format!("the generated configuration is invalid: {e}")))?;
    Ok(text)
}

/// Writes a file only its owner can read (0600), creating its directory; an existing file is
/// replaced only with `force`.
fn write_private_file(path: &Path, text: &str, force: bool) -> Result<(), Failure> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let fail = |what: &str, e: std::io::Error| {
        Failure::Failed(format!("cannot {what} {}: {e}", path.display()))
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            Failure::Failed(format!(
                "cannot create the directory {}: {e}",
                dir.display()
            ))
        })?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(0o600);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == ErrorKind::AlreadyExists {
            Failure::Failed(format!(
                "{} exists; pass --force to replace it",
                path.display()
            ))
        } else {
            fail("create", e)
        }
    })?;
    // A replaced file keeps its old mode: make it 0600 too.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| fail("restrict the mode of", e))?;
    file.write_all(text.as_bytes())
        .map_err(|e| fail("write", e))?;
    file.sync_all().map_err(|e| fail("write", e))
}

async fn connect(socket: &Path) -> Result<AgentClient<Channel>, Failure> {
    if let Err(e) = std::fs::metadata(socket) {
        return Err(Failure::Unreachable(match e.kind() {
            ErrorKind::NotFound => format!(
                "kubespan-agent is not running: no API socket at {} (start the agent, or pass --socket / KUBESPAN_SOCKET)",
                socket.display()
            ),
            _ => format!("cannot access {}: {e}", socket.display()),
        }));
    }
    let path = socket.to_owned();
    let connector = tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move {
            Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
        }
    });
    let channel = Endpoint::from_static("http://kubespan-agent")
        .connect_with_connector(connector)
        .await
        .map_err(|e| {
            let io = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .map(|io| io.kind());
            Failure::Unreachable(match io {
                Some(ErrorKind::PermissionDenied) => format!(
                    "cannot open {}: permission denied (run as root or as a member of the socket's group)",
                    socket.display()
                ),
                Some(ErrorKind::ConnectionRefused) => format!(
                    "kubespan-agent is not running: nothing listens on {} (a stale socket from a stopped agent?)",
                    socket.display()
                ),
                _ => format!("cannot connect to the agent at {}: {e}", socket.display()),
            })
        })?;
    Ok(AgentClient::new(channel))
}

fn failed(status: tonic::Status) -> Failure {
    match status.code() {
        tonic::Code::Unavailable => {
            Failure::Unreachable(format!("the agent did not answer: {}", status.message()))
        }
        _ => Failure::Failed(format!("{:?}: {}", status.code(), status.message())),
    }
}

fn print_structured<T: serde::Serialize>(format: Format, value: &T) -> Result<(), Failure> {
    let text = match format {
        Format::Json => {
            serde_json::to_string_pretty(value).map_err(|e| Failure::Failed(e.to_string()))? + "\n"
        }
        _ => serde_norway::to_string(value).map_err(|e| Failure::Failed(e.to_string()))?,
    };
    print!("{text}");
    Ok(())
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if i == last {
                    c
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect()) + "\n";
    for row in rows {
        out += &(line(row) + "\n");
    }
    out
}

fn ago(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "never".into();
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let secs = ((now - unix_ms).max(0)) / 1000;
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        _ => format!("{}h ago", secs / 3600),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}

fn members_table(members: &[pb::Member]) -> String {
    table(
        &[
            "NODE",
            "TYPE",
            "HOSTNAME",
            "MESH ADDRESS",
            "ADDRESSES",
            "OS",
        ],
        members
            .iter()
            .map(|m| {
                vec![
                    if m.local {
                        format!("{} (this node)", m.nodename)
                    } else {
                        m.nodename.clone()
                    },
                    dash(&m.machine_type),
                    dash(&m.hostname),
                    dash(&m.mesh_address),
                    dash(&m.addresses.join(",")),
                    dash(&m.operating_system),
                ]
            })
            .collect(),
    )
}

fn peers_table(peers: &[pb::Peer]) -> String {
    table(
        &[
            "PEER",
            "STATE",
            "ENDPOINT",
            "PATH",
            "CANDIDATES",
            "LAST HANDSHAKE",
            "RX",
            "TX",
            "ALLOWED IPS",
        ],
        peers
            .iter()
            .map(|p| {
                let s = p.status.clone().unwrap_or_default();
                vec![
                    dash(&p.label),
                    dash(&s.state),
                    dash(&s.endpoint),
                    dash(&s.path),
                    dash(&s.candidates.join(",")),
                    ago(s.last_handshake_unix_ms),
                    bytes(s.rx_bytes),
                    bytes(s.tx_bytes),
                    p.allowed_ips.join(","),
                ]
            })
            .collect(),
    )
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn identity_text(id: &pb::Identity) -> String {
    table(
        &["FIELD", "VALUE"],
        vec![
            vec!["node".into(), id.nodename.clone()],
            vec!["node id".into(), id.node_id.clone()],
            vec!["hostname".into(), id.hostname.clone()],
            vec!["cluster id".into(), id.cluster_id.clone()],
            vec!["public key".into(), id.public_key.clone()],
            vec![
                "mesh address".into(),
                format!("{} (prefix {})", id.mesh_address, id.mesh_prefix),
            ],
            vec!["mac source".into(), id.mac_source.clone()],
            vec!["cipher".into(), id.cipher.clone()],
            vec![
                "listen port".into(),
                format!("{} on {}", id.listen_port, id.interface),
            ],
            vec!["addresses".into(), dash(&id.addresses.join(", "))],
            vec!["endpoints".into(), dash(&id.endpoints.join(", "))],
            vec!["version".into(), id.version.clone()],
        ],
    )
}

fn status_text(status: &pb::AgentStatus) -> String {
    let id = status.identity.clone().unwrap_or_default();
    let mut out = format!(
        "Node:        {} ({})\nMesh:        {} · key {} · cipher {} · port {} on {}\nData plane:  {}\n\n",
        id.nodename,
        id.node_id,
        id.mesh_address,
        id.public_key,
        id.cipher,
        id.listen_port,
        id.interface,
        status.data_plane
    );
    out += &table(
        &[
            "DISCOVERY",
            "STATE",
            "SINCE",
            "AFFILIATES",
            "PUBLIC IP",
            "LAST ERROR",
        ],
        status
            .discovery
            .iter()
            .map(|d| {
                vec![
                    d.endpoint.clone(),
                    d.state.clone(),
                    ago(d.since_unix_ms),
                    d.affiliates.to_string(),
                    dash(&d.public_ip),
                    dash(&d.last_error),
                ]
            })
            .collect(),
    );
    let retained = match status.members_retained {
        0 => String::new(),
        n => format!(" ({n} kept for their live tunnels: not listed by discovery)"),
    };
    out += &format!(
        "\nMembers:     {}{retained}\nPeers:       {} (up {}, down {}, unknown {})\n",
        status.members, status.peers, status.peers_up, status.peers_down, status.peers_unknown
    );
    if !status.reflexive_endpoint.is_empty() || !status.mapped_endpoint.is_empty() {
        out += &format!(
            "NAT:         reflexive {} · mapped {}\n",
            dash(&status.reflexive_endpoint),
            dash(&status.mapped_endpoint)
        );
    }
    if !status.nat_note.is_empty() {
        out += &format!("NAT note:    {}\n", status.nat_note);
    }
    if status.own_record_tampered > 0 {
        out += &format!(
            "Tampering:   this node's record was changed by someone else {} times (restored)\n",
            status.own_record_tampered
        );
    }
    let mut warnings: Vec<String> = status
        .discovery
        .iter()
        .filter(|d| d.state != "connected")
        .map(|d| {
            let cause = match d.last_error.as_str() {
                "" => String::new(),
                error => format!(": {error}"),
            };
            format!(
                "discovery service {} is not connected ({}){cause}; no member is learned or \
                 announced through it (is it running, and reachable from this node?)",
                d.endpoint, d.state
            )
        })
        .collect();
    warnings.extend(status.warnings.iter().cloned());
    if warnings.is_empty() {
        out += "Warnings:    none\n";
    } else {
        out += "Warnings:\n";
        for w in &warnings {
            out += &format!("  - {w}\n");
        }
    }
    out
}

fn health_text(health: &pb::Health) -> String {
    let mut out = String::new();
    for check in &health.checks {
        let mark = match check.status.as_str() {
            "ok" => "ok  ",
            "warn" => "WARN",
            "fail" => "FAIL",
            _ => "--  ",
        };
        out += &format!("{mark}  {:<15} {}\n", check.name, check.summary);
        for detail in &check.details {
            out += &format!("{:22}{detail}\n", "");
        }
        if !check.hint.is_empty() {
            out += &format!("{:22}-> {}\n", "", check.hint);
        }
    }
    out += &format!("\nHealth:      {}\n", health.status);
    out
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let format = cli.output;
    let command = match cli.command {
        Command::Completion { shell } => {
            print_completion(shell);
            return Ok(());
        }
        Command::Gen(Gen::Secrets) => {
            let secrets = serde_json::json!({ "clusterID": random_base64(), "clusterSecret": random_base64() });
            return match format {
                Format::Table => {
                    println!(
                        "clusterID: {}\nclusterSecret: {}",
                        secrets["clusterID"].as_str().unwrap_or_default(),
                        secrets["clusterSecret"].as_str().unwrap_or_default()
                    );
                    Ok(())
                }
                _ => print_structured(format, &secrets),
            };
        }
        Command::Gen(Gen::Config {
            cluster_id,
            cluster_secret,
            discovery_endpoints,
            output_file,
            force,
        }) => {
            if format == Format::Json {
                return Err(Failure::Failed(
                    "gen config writes a commented YAML file; -o json is not supported here \
                     (`kubespanctl gen secrets -o json` prints the id and secret as JSON)"
                        .into(),
                ));
            }
            let text = generate_config(cluster_id, cluster_secret, &discovery_endpoints)?;
            match output_file {
                Some(path) => {
                    write_private_file(&path, &text, force)?;
                    eprintln!(
                        "wrote {} (mode 0600: it holds the cluster secret)",
                        path.display()
                    );
                }
                None => print!("{text}"),
            }
            return Ok(());
        }
        Command::Gen(Gen::RelayVerifier { config: path }) => {
            if format != Format::Table {
                return Err(Failure::Failed(
                    "gen relay-verifier prints one `id=verifier` line; -o json/yaml is not supported here"
                        .into(),
                ));
            }
            let config = config::load(&path).map_err(|e| Failure::Failed(e.to_string()))?;
            let token = openspan_relay::access_token(&config.cluster_secret, &config.cluster_id);
            println!(
                "{}={}",
                config.cluster_id,
                hex_encode(&openspan_relay::verifier(&token))
            );
            return Ok(());
        }
        other => other,
    };
    let mut client = connect(&cli.socket).await?;
    match command {
        Command::Status => {
            let status = client
                .get_status(pb::GetStatusRequest {})
                .await
                .map_err(failed)?
                .into_inner();
            match format {
                Format::Table => print!("{}", status_text(&status)),
                _ => print_structured(format, &status)?,
            }
        }
        Command::Members => {
            let members = client
                .list_members(pb::ListMembersRequest {})
                .await
                .map_err(failed)?
                .into_inner();
            match format {
                Format::Table => print!("{}", members_table(&members.members)),
                _ => print_structured(format, &members.members)?,
            }
        }
        Command::Peers => {
            let peers = client
                .list_peers(pb::ListPeersRequest {})
                .await
                .map_err(failed)?
                .into_inner();
            match format {
                Format::Table => print!("{}", peers_table(&peers.peers)),
                _ => print_structured(format, &peers.peers)?,
            }
        }
        Command::Identity => {
            let id = client
                .get_identity(pb::GetIdentityRequest {})
                .await
                .map_err(failed)?
                .into_inner();
            match format {
                Format::Table => print!("{}", identity_text(&id)),
                _ => print_structured(format, &id)?,
            }
        }
        Command::Watch => {
            let mut stream = client
                .watch_members(pb::WatchMembersRequest {})
                .await
                .map_err(failed)?
                .into_inner();
            while let Some(update) = stream.message().await.map_err(failed)? {
                match format {
                    Format::Table => {
                        println!("--- {} members", update.members.len());
                        print!("{}", members_table(&update.members));
                    }
                    Format::Json => println!(
                        "{}",
                        serde_json::to_string(&update.members).unwrap_or_default()
                    ),
                    Format::Yaml => print!(
                        "---\n{}",
                        serde_norway::to_string(&update.members).unwrap_or_default()
                    ),
                }
            }
        }
        Command::Leave => {
            let response = client
                .leave(pb::LeaveRequest {})
                .await
                .map_err(failed)?
                .into_inner();
            println!(
                "left: deleted this node's record from {} discovery service(s)",
                response.deleted_from
            );
        }
        Command::Health {
            skip_path_probe,
            strict,
        } => {
            // A probe must not hang on an agent that hangs: bounded well above the agent's own
            // (the path probe takes 1.5 s, `nft` at most 5 s).
            let health = tokio::time::timeout(
                Duration::from_secs(20),
                client.get_health(pb::GetHealthRequest { skip_path_probe }),
            )
            .await
            .map_err(|_| Failure::Failed("the agent did not answer within 20 s".into()))?
            .map_err(failed)?
            .into_inner();
            match format {
                Format::Table => print!("{}", health_text(&health)),
                _ => print_structured(format, &health)?,
            }
            if health.status == "fail" || (strict && health.status == "warn") {
                return Err(Failure::Unhealthy);
            }
        }
        Command::RotateKey => {
            let response = client
                .rotate_key(pb::RotateKeyRequest {})
                .await
                .map_err(failed)?
                .into_inner();
            match format {
                Format::Table => print!("{}", rotation_text(&response)),
                _ => print_structured(format, &response)?,
            }
        }
        Command::Reload => {
            let response = client
                .reload(pb::ReloadRequest {})
                .await
                .map_err(failed)?
                .into_inner();
            return print_reload(format, &response, "applied");
        }
        Command::Diff { config } => {
            let (text, name) = match &config {
                Some(path) => (
                    std::fs::read_to_string(path).map_err(|e| {
                        Failure::Failed(format!("cannot read {}: {e}", path.display()))
                    })?,
                    path.display().to_string(),
                ),
                None => (String::new(), String::new()),
            };
            let response = client
                .diff_config(pb::DiffConfigRequest { config: text, name })
                .await
                .map_err(failed)?
                .into_inner();
            return print_reload(format, &response, "would apply");
        }
        Command::Gen(_) | Command::Completion { .. } => {}
    }
    Ok(())
}

/// Writes the completion script for `shell` to stdout.
fn print_completion(shell: Shell) {
    let generator = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(
        generator,
        &mut Cli::command(),
        "kubespanctl",
        &mut std::io::stdout(),
    );
}

fn rotation_text(response: &pb::RotateKeyResponse) -> String {
    let grace = if response.grace_seconds > 0 {
        format!("{} s at most", response.grace_seconds)
    } else {
        "none".to_owned()
    };
    format!(
        "rotated this node's WireGuard key\n  old key: {}\n  new key: {}\n  grace:   {grace}\n  {}\n",
        response.old_public_key, response.new_public_key, response.note
    )
}

/// Prints a reload plan; a refused or invalid configuration is a failure (exit 1).
fn print_reload(format: Format, response: &pb::ReloadResponse, verb: &str) -> Result<(), Failure> {
    let refused = !response.invalid.is_empty() || !response.refusals.is_empty();
    match format {
        Format::Table => {
            if !response.invalid.is_empty() {
                println!("refused: invalid configuration: {}", response.invalid);
            } else if refused {
                println!("refused (the running configuration is kept):");
                for r in &response.refusals {
                    println!("  {}: {}", r.key, r.reason);
                }
                if !response.changes.is_empty() {
                    println!("(these would apply live if nothing else were refused:)");
                }
            } else if response.changes.is_empty() {
                println!("no change");
            } else {
                println!("{verb}:");
            }
            for c in &response.changes {
                println!("  {}: {} -> {}", c.key, c.from, c.to);
            }
        }
        _ => {
            let value = serde_json::json!({
                "applied": response.applied,
                "refused": refused,
                "invalid": response.invalid,
                "summary": response.summary,
                "changes": response.changes.iter().map(|c| serde_json::json!({"key": c.key, "from": c.from, "to": c.to})).collect::<Vec<_>>(),
                "refusals": response.refusals.iter().map(|r| serde_json::json!({"key": r.key, "reason": r.reason})).collect::<Vec<_>>(),
            });
            print_structured(format, &value)?;
        }
    }
    if refused {
        Err(Failure::Failed(response.summary.clone()))
    } else {
        Ok(())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    if let Some(code) = openspan_runtime::manpages::generate_if_asked(
        Cli::command,
        openspan_runtime::manpages::Section::User,
    ) {
        return code;
    }
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Unreachable(message)) => {
            eprintln!("kubespanctl: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Failed(message)) => {
            eprintln!("kubespanctl: {message}");
            ExitCode::from(1)
        }
        Err(Failure::Unhealthy) => ExitCode::from(3),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotation_shows_both_keys_and_the_grace() {
        let mut response = pb::RotateKeyResponse {
            old_public_key: "old=".into(),
            new_public_key: "new=".into(),
            grace_seconds: 180,
            note: "the old key keeps working".into(),
        };
        let text = rotation_text(&response);
        assert!(
            text.contains("  old key: old=\n  new key: new=\n"),
            "{text}"
        );
        assert!(text.contains("grace:   180 s at most"), "{text}");
        assert!(text.contains("the old key keeps working"), "{text}");
        response.grace_seconds = 0;
        assert!(rotation_text(&response).contains("grace:   none"));
    }

    #[test]
    fn status_warns_about_a_discovery_service_that_is_not_connected() {
        let connection = |endpoint: &str, state: &str, last_error: &str| pb::DiscoveryConnection {
            endpoint: endpoint.into(),
            state: state.into(),
            last_error: last_error.into(),
            ..Default::default()
        };
        let mut status = pb::AgentStatus {
            discovery: vec![connection("http://a:3000", "connected", "")],
            ..Default::default()
        };
        assert!(status_text(&status).contains("Warnings:    none"));
        status.discovery.push(connection(
            "http://b:3000",
            "backoff",
            "cannot connect to b:3000: Connection refused",
        ));
        status.warnings.push("another warning".into());
        let text = status_text(&status);
        assert!(
            text.contains(
                "  - discovery service http://b:3000 is not connected (backoff): cannot connect to b:3000: Connection refused;"
            ),
            "{text}"
        );
        assert!(!text.contains("http://a:3000 is not connected"), "{text}");
        assert!(text.contains("  - another warning\n"), "{text}");
    }
}
