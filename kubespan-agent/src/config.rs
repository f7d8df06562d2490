//! The agent's YAML configuration: parsing, defaults and validation.
//!
//! Keys follow Talos's KubeSpan and discovery knobs where they exist. Unknown keys are errors,
//! and every error names the key, the bad value and what is allowed.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;
use thiserror::Error;

use crate::crypto::{Cipher, parse_cluster_secret};
use crate::endpoints::EndpointRule;
use crate::identity::parse_mac;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/kubespan/config.yaml";
pub const DEFAULT_LISTEN_PORT: u16 = 51820;
pub const DEFAULT_MTU: u32 = 1420;
pub const MIN_MTU: u32 = 1280;

#[derive(Debug, Error)]
pub enum ConfigError {
    // The I/O error is in the message, not a `source`: a chain would print it twice.
    #[error("cannot read config file {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The file as written, before validation.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    #[serde(rename = "clusterID")]
    cluster_id: Option<String>,
    cluster_secret: Option<String>,
    cluster_secret_next: Option<String>,
    node_name: Option<String>,
    machine_type: Option<String>,
    #[serde(default)]
    discovery: RawDiscovery,
    #[serde(default)]
    advertise_networks: Vec<String>,
    #[serde(default)]
    allow_down_peer_bypass: bool,
    #[serde(default)]
    harvest_extra_endpoints: bool,
    mtu: Option<u32>,
    #[serde(default)]
    filters: RawFilters,
    #[serde(default)]
    extra_announced_endpoints: Vec<String>,
    listen_port: Option<u16>,
    interface: Option<String>,
    state_dir: Option<PathBuf>,
    api_socket: Option<PathBuf>,
    metrics_addr: Option<String>,
    cipher: Option<String>,
    mac_address: Option<String>,
    backend: Option<String>,
    routing_table: Option<u32>,
    rule_priority: Option<u32>,
    firewall_mark: Option<u32>,
    force_mark: Option<u32>,
    mark_mask: Option<u32>,
    nftables_table: Option<String>,
    peer_keepalive_seconds: Option<u16>,
    endpoint_timeout_seconds: Option<u64>,
    peer_down_seconds: Option<u64>,
    #[serde(default)]
    nat_traversal: RawNatTraversal,
    #[serde(default)]
    relay: RawRelay,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRelay {
    #[serde(default)]
    servers: Vec<String>,
    ca_file: Option<PathBuf>,
    server_name: Option<String>,
}

/// Relays (`openspan-relay`) that carry WireGuard packets for peers no direct path reaches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayConfig {
    /// `host:port` of the relays, as every node of the cluster writes them (nodes announce the
    /// relays they are connected to by these names).
    pub servers: Vec<String>,
    /// The CA that signed the relays' certificates (required: relays are private services).
    pub ca_file: Option<PathBuf>,
    /// The name in the relays' certificates, when it differs from the host in `servers`.
    pub server_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawNatTraversal {
    #[serde(default)]
    stun_servers: Vec<String>,
    #[serde(default)]
    port_mapping: bool,
}

/// How this node makes itself reachable from behind NAT.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatTraversal {
    /// `host:port` of STUN servers (`discovery-server --stun-addr`, or any public one); asked
    /// from the WireGuard socket every 20–30 s for this node's NAT mapping, which is then
    /// announced as an endpoint. Empty: no STUN.
    pub stun_servers: Vec<String>,
    /// Ask the gateway to forward the listen port (PCP, NAT-PMP, UPnP-IGD) and announce the
    /// mapped endpoint.
    pub port_mapping: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawDiscovery {
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
}

/// A `discovery.endpoints` entry: a plain URL (Talos's form), or a map with the URL and the TLS
/// settings for a private CA, mutual TLS or a server name override.
#[derive(Debug)]
enum RawEndpoint {
    Url(String),
    Extended(RawEndpointDetails),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawEndpointDetails {
    url: String,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    server_name: Option<String>,
}

// By hand rather than `#[serde(untagged)]`: untagged enums replace every error inside the map
// (an unknown or misspelt key) with "did not match any variant", which names nothing.
impl<'de> Deserialize<'de> for RawEndpoint {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawEndpoint;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a discovery URL, or a map with `url` and optionally `caFile`, `certFile`, \
                     `keyFile`, `serverName`",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawEndpoint, E> {
                Ok(RawEndpoint::Url(v.to_owned()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawEndpoint, A::Error> {
                RawEndpointDetails::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawEndpoint::Extended)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawFilters {
    endpoints: Option<Vec<String>>,
    #[serde(default)]
    exclude_advertised_networks: Vec<String>,
}

/// A discovery service to connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryEndpoint {
    /// As configured, for logs and status.
    pub url: String,
    /// `host:port` to dial.
    pub authority: String,
    pub host: String,
    /// Plaintext gRPC (only for `http://`).
    pub insecure: bool,
    /// TLS settings beyond the defaults (system roots, the URL's host as server name).
    pub tls: TlsOptions,
}

/// How a TLS discovery connection is verified and authenticated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM CA certificates to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for servers that require them (mutual TLS).
    pub client_identity: Option<ClientIdentity>,
    /// Name to send (SNI) and verify the server certificate against instead of the URL's host.
    pub server_name: Option<String>,
}

/// PEM files of a client certificate (chain) and its private key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientIdentity {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl DiscoveryEndpoint {
    /// Talos's rules: `http://` is plaintext (default port 80); `https://` and `grpc://` are TLS
    /// (default port 443).
    pub fn parse(url: &str) -> Result<Self, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("{url:?} has no scheme: write http://host:port (plaintext) or https://host[:port] (TLS)"))?;
        let (insecure, default_port) = match scheme {
            "http" => (true, 80),
            "https" | "grpc" => (false, 443),
            other => {
                return Err(format!(
                    "scheme {other:?} in {url:?} is not supported: use http, https or grpc"
                ));
            }
        };
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        let has_port = match authority.rsplit_once(':') {
            Some((host, port)) => {
                !host.ends_with(':') && !port.contains(']') && port.parse::<u16>().is_ok()
            }
            None => false,
        };
        let authority = if has_port {
            authority.to_owned()
        } else {
            format!("{authority}:{default_port}")
        };
        let host = authority
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_owned())
            .unwrap_or_default();
        Ok(Self {
            url: url.to_owned(),
            authority,
            host,
            insecure,
            tls: TlsOptions::default(),
        })
    }

    /// The endpoint a discovery service redirected us to (`host:port`), in the same scheme.
    ///
    /// The CA and client certificate are kept: the redirect came from a server that proved
    /// itself with that CA, and the target belongs to the same deployment. The server name
    /// override is dropped: it stands for the configured host's certificate, and the target is
    /// verified against its own name.
    pub fn redirected(&self, authority: &str) -> Result<Self, String> {
        let scheme = if self.insecure { "http" } else { "https" };
        let mut next = Self::parse(&format!("{scheme}://{authority}"))?;
        next.tls = TlsOptions {
            server_name: None,
            ..self.tls.clone()
        };
        Ok(next)
    }
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub cluster_id: String,
    pub cluster_secret: [u8; 32],
    /// A second secret records are also opened with (never sealed with): the rotation window
    /// of the `native` cipher (see the README's Secret rotation).
    pub cluster_secret_next: Option<[u8; 32]>,
    pub node_name: Option<String>,
    pub machine_type: String,
    pub discovery_endpoints: Vec<DiscoveryEndpoint>,
    pub advertise_networks: Vec<IpNet>,
    pub allow_down_peer_bypass: bool,
    pub harvest_extra_endpoints: bool,
    pub mtu: u32,
    pub endpoint_filters: Option<Vec<EndpointRule>>,
    pub exclude_advertised_networks: Vec<IpNet>,
    pub extra_announced_endpoints: Vec<SocketAddr>,
    pub listen_port: u16,
    pub interface: String,
    pub state_dir: PathBuf,
    pub api_socket: PathBuf,
    pub metrics_addr: Option<String>,
    pub cipher: Cipher,
    pub mac_address: Option<[u8; 6]>,
    pub data_plane: DataPlaneConfig,
    pub nat_traversal: NatTraversal,
    pub relay: RelayConfig,
}

/// Which WireGuard implementation carries the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Kernel WireGuard when the kernel can create a WireGuard link, else userspace.
    Auto,
    Kernel,
    /// openspan's own WireGuard device inside the agent, on a TUN device.
    Userspace,
    /// Membership only: no interface, routes or firewall rules.
    None,
}

/// Data plane settings; defaults are KubeSpan's values, except the faster timers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataPlaneConfig {
    pub backend: Backend,
    pub routing_table: u32,
    pub rule_priority: u32,
    /// Mark WireGuard puts on its own (encrypted) packets.
    pub firewall_mark: u32,
    /// Mark that sends a packet into the mesh (routing table).
    pub force_mark: u32,
    pub mark_mask: u32,
    pub nftables_table: String,
    pub peer_keepalive: std::time::Duration,
    /// Without a handshake this long after switching to an endpoint, try the next one.
    pub endpoint_timeout: std::time::Duration,
    /// Without any answer from an established peer this long, it is down.
    pub peer_down_after: std::time::Duration,
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Auto,
            routing_table: 180,
            rule_priority: 32500,
            firewall_mark: 0x20,
            force_mark: 0x40,
            mark_mask: 0x60,
            nftables_table: "kubespan".into(),
            // A path that dies is noticed within 10 s (9 s of silence and the 1 s tick); a
            // keepalive every 3 s costs 1/3 packet per second per peer each way.
            peer_keepalive: std::time::Duration::from_secs(3),
            endpoint_timeout: std::time::Duration::from_secs(3),
            peer_down_after: std::time::Duration::from_secs(9),
        }
    }
}

pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
        path: path.to_owned(),
        cause,
    })?;
    parse(&text).map_err(|e| match e {
        ConfigError::Syntax { message, .. } => ConfigError::Syntax {
            path: path.to_owned(),
            message,
        },
        other => other,
    })
}

pub fn parse(text: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = if text.trim().is_empty() {
        RawConfig::default()
    } else {
        serde_norway::from_str(text).map_err(|e| ConfigError::Syntax {
            path: PathBuf::from("<config>"),
            message: suggest_known_key(&e.to_string()),
        })?
    };
    validate(raw)
}

/// Adds "did you mean `listenPort`?" to serde's "unknown field `listenport`, expected one of
/// `clusterID`, …" when one expected key is close to the unknown one.
fn suggest_known_key(message: &str) -> String {
    const MARK: &str = "unknown field `";
    let Some(start) = message.find(MARK).map(|i| i + MARK.len()) else {
        return message.to_string();
    };
    let Some(len) = message[start..].find('`') else {
        return message.to_string();
    };
    let unknown = &message[start..start + len];
    let after = start + len + 1;
    let Some(expected) = message[after..].find("expected").map(|i| after + i) else {
        return message.to_string();
    };
    let candidates = message[expected..].split('`').skip(1).step_by(2);
    let best = candidates
        .map(|known| {
            let distance = levenshtein(&unknown.to_lowercase(), &known.to_lowercase());
            (distance, known)
        })
        .min_by_key(|(distance, _)| *distance);
    match best {
        Some((distance, known)) if distance <= 2.max(unknown.chars().count() / 3) => format!(
            "{} (did you mean `{known}`?){}",
            &message[..after],
            &message[after..]
        ),
        _ => message.to_string(),
    }
}

/// Edit distance (insertions, deletions, substitutions) between two strings.
fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

fn parse_prefix(key: &str, text: &str) -> Result<IpNet, ConfigError> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            invalid(
                key,
                format!("{text:?} is not a CIDR prefix or IP address (e.g. 10.244.0.0/16)"),
            )
        })
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let data_plane = validate_data_plane(&raw)?;
    let cluster_id = raw
        .cluster_id
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| {
            invalid(
                "clusterID",
                "is required: the cluster's id (`kubespanctl gen secrets` makes one)",
            )
        })?;
    if cluster_id.len() > 256 {
        return Err(invalid(
            "clusterID",
            format!("is {} bytes; at most 256 are allowed", cluster_id.len()),
        ));
    }
    let secret_text = raw.cluster_secret.ok_or_else(|| {
        invalid(
            "clusterSecret",
            "is required: 32 random bytes in base64 (`kubespanctl gen secrets`)",
        )
    })?;
    let cluster_secret = parse_cluster_secret(secret_text.trim())
        .map_err(|e| invalid("clusterSecret", e.to_string()))?;
    let cluster_secret_next = raw
        .cluster_secret_next
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| parse_cluster_secret(t).map_err(|e| invalid("clusterSecretNext", e.to_string())))
        .transpose()?;
    if cluster_secret_next == Some(cluster_secret) {
        return Err(invalid(
            "clusterSecretNext",
            "equals clusterSecret: drop it, or set the new secret there",
        ));
    }

    if raw.discovery.endpoints.is_empty() {
        return Err(invalid(
            "discovery.endpoints",
            "needs at least one discovery service URL, e.g. [\"http://discovery.example:3000\"]",
        ));
    }
    let mut discovery_endpoints = Vec::new();
    for (i, entry) in raw.discovery.endpoints.into_iter().enumerate() {
        let endpoint = validate_endpoint(&format!("discovery.endpoints[{i}]"), entry)?;
        if discovery_endpoints
            .iter()
            .any(|e: &DiscoveryEndpoint| e.authority == endpoint.authority)
        {
            return Err(invalid(
                format!("discovery.endpoints[{i}]"),
                format!("{:?} is listed twice", endpoint.url),
            ));
        }
        discovery_endpoints.push(endpoint);
    }

    let prefixes = |key: &str, list: &[String]| -> Result<Vec<IpNet>, ConfigError> {
        list.iter()
            .enumerate()
            .map(|(i, p)| parse_prefix(&format!("{key}[{i}]"), p.trim()).map(|n| n.trunc()))
            .collect()
    };
    let advertise_networks = prefixes("advertiseNetworks", &raw.advertise_networks)?;
    let exclude_advertised_networks = prefixes(
        "filters.excludeAdvertisedNetworks",
        &raw.filters.exclude_advertised_networks,
    )?;
    let endpoint_filters = match raw.filters.endpoints {
        None => None,
        Some(rules) => Some(
            rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    r.trim()
                        .parse::<EndpointRule>()
                        .map_err(|m| invalid(format!("filters.endpoints[{i}]"), m))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let stun_servers = host_ports(
        "natTraversal.stunServers",
        &raw.nat_traversal.stun_servers,
        "203.0.113.10:3478, stun.example.org:3478 or [2001:db8::10]:3478",
    )?;
    let relay_servers = host_ports(
        "relay.servers",
        &raw.relay.servers,
        "relay.example.org:7443 or 203.0.113.10:7443",
    )?;
    if let Some(ca) = &raw.relay.ca_file
        && !ca.is_file()
    {
        return Err(invalid(
            "relay.caFile",
            format!("{} is not a readable file", ca.display()),
        ));
    }
    let extra_announced_endpoints = raw
        .extra_announced_endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| {
            e.trim().parse::<SocketAddr>().map_err(|_| {
                invalid(
                    format!("extraAnnouncedEndpoints[{i}]"),
                    format!(
                        "{e:?} is not ip:port (e.g. 198.51.100.7:51820 or [2001:db8::7]:51820)"
                    ),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let mtu = raw.mtu.unwrap_or(DEFAULT_MTU);
    if !(MIN_MTU..=65535).contains(&mtu) {
        return Err(invalid(
            "mtu",
            format!("{mtu} is out of range: use {MIN_MTU}..=65535 (underlay MTU − 80)"),
        ));
    }
    let listen_port = raw.listen_port.unwrap_or(DEFAULT_LISTEN_PORT);
    if listen_port == 0 {
        return Err(invalid(
            "listenPort",
            "0 is not a usable UDP port: use 1..=65535 (default 51820)",
        ));
    }
    let interface = raw.interface.unwrap_or_else(|| "kubespan".into());
    if interface.is_empty()
        || interface.len() > 15
        || interface.contains(['/', ' ', ':'])
        || interface.parse::<u64>().is_ok()
    {
        return Err(invalid(
            "interface",
            format!(
                "{interface:?} is not a valid interface name: 1–15 characters, no '/', ':' or spaces, not a number"
            ),
        ));
    }
    let cipher = match raw.cipher.as_deref().map(str::trim) {
        None | Some("native") => Cipher::Native,
        Some("talos") => Cipher::Talos,
        Some(other) => {
            return Err(invalid(
                "cipher",
                format!(
                    "{other:?} is not a cipher suite: use `native` (default) or `talos` (to join clusters of Talos nodes)"
                ),
            ));
        }
    };
    let machine_type = raw.machine_type.unwrap_or_else(|| "worker".into());
    if !["worker", "controlplane", "init"].contains(&machine_type.as_str()) {
        return Err(invalid(
            "machineType",
            format!("{machine_type:?} is not allowed: use worker, controlplane or init"),
        ));
    }
    let mac_address = raw
        .mac_address
        .map(|m| parse_mac(m.trim()).map_err(|e| invalid("macAddress", e.to_string())))
        .transpose()?;
    let node_name = raw
        .node_name
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty());
    let metrics_addr = raw
        .metrics_addr
        .map(|m| m.trim().to_owned())
        .filter(|m| !m.is_empty());

    if cluster_secret_next.is_some() && cipher == Cipher::Talos {
        return Err(invalid(
            "clusterSecretNext",
            "the talos cipher cannot rotate its secret live: Talos uses the secret itself as \
             every peer's WireGuard pre-shared key, so nodes holding different secrets cannot \
             complete a handshake; change clusterSecret on every node and restart them together",
        ));
    }

    Ok(Config {
        cluster_id,
        cluster_secret,
        cluster_secret_next,
        node_name,
        machine_type,
        discovery_endpoints,
        advertise_networks,
        allow_down_peer_bypass: raw.allow_down_peer_bypass,
        harvest_extra_endpoints: raw.harvest_extra_endpoints,
        mtu,
        endpoint_filters,
        exclude_advertised_networks,
        extra_announced_endpoints,
        listen_port,
        interface,
        state_dir: raw
            .state_dir
            .unwrap_or_else(|| PathBuf::from("/var/lib/kubespan")),
        api_socket: raw
            .api_socket
            .unwrap_or_else(|| PathBuf::from("/run/kubespan/agent.sock")),
        metrics_addr,
        cipher,
        mac_address,
        data_plane,
        nat_traversal: NatTraversal {
            stun_servers,
            port_mapping: raw.nat_traversal.port_mapping,
        },
        relay: RelayConfig {
            servers: relay_servers,
            ca_file: raw.relay.ca_file,
            server_name: raw.relay.server_name,
        },
    })
}

/// One key a reload changes, applied live; `from` and `to` are shown to the operator (secrets
/// only as fingerprints).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub key: &'static str,
    pub from: String,
    pub to: String,
}

/// One key a reload cannot change, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub key: &'static str,
    pub reason: String,
}

/// What reloading a new configuration would do. Refused as a whole when any key is refused:
/// half a configuration is never applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadPlan {
    pub changes: Vec<Change>,
    pub refusals: Vec<Refusal>,
}

impl ReloadPlan {
    pub fn refused(&self) -> bool {
        !self.refusals.is_empty()
    }

    /// One line for the log and the CLI.
    pub fn summary(&self) -> String {
        if self.refused() {
            let reasons: Vec<String> = self
                .refusals
                .iter()
                .map(|r| format!("{}: {}", r.key, r.reason))
                .collect();
            format!("refused ({})", reasons.join("; "))
        } else if self.changes.is_empty() {
            "nothing changed".to_string()
        } else {
            let changes: Vec<String> = self
                .changes
                .iter()
                .map(|c| format!("{} {} -> {}", c.key, c.from, c.to))
                .collect();
            format!("applied {}", changes.join("; "))
        }
    }
}

/// A short, non-secret name of a cluster secret for logs and diffs: the first 8 hex digits of
/// its SHA-256 (enough to tell the secrets of one rotation apart, useless to an attacker).
pub fn secret_fingerprint(secret: &[u8; 32]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(secret);
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

fn show_list<T: std::fmt::Display>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(ToString::to_string).collect();
    format!("[{}]", items.join(", "))
}

fn show_secret(secret: Option<&[u8; 32]>) -> String {
    secret.map_or_else(
        || "(none)".to_string(),
        |s| format!("sha256:{}", secret_fingerprint(s)),
    )
}

/// Decides what reloading `new` over the `running` configuration changes (pure).
///
/// Applied live: everything the record, the discovery clients and the data plane can follow
/// without dropping a tunnel. Refused: what the interface, the sockets, the identity or the
/// keys of the running process are built from (a restart applies those). The cluster secret
/// may only move to the running `clusterSecretNext` (rotation step 2): a secret no node reads
/// yet would cut this node off the cluster.
pub fn plan_reload(running: &Config, new: &Config) -> ReloadPlan {
    let mut plan = ReloadPlan::default();
    let mut live = |key: &'static str, from: String, to: String| {
        if from != to {
            plan.changes.push(Change { key, from, to });
        }
    };
    let rules =
        |r: &Option<Vec<EndpointRule>>| r.as_deref().map_or_else(|| "(all)".to_string(), show_list);
    let urls = |c: &Config| {
        show_list(
            &c.discovery_endpoints
                .iter()
                .map(|e| format!("{e:?}"))
                .collect::<Vec<_>>(),
        )
    };
    let secs = |d: std::time::Duration| format!("{}s", d.as_secs());
    let (r, n) = (&running.data_plane, &new.data_plane);
    live(
        "clusterSecret",
        show_secret(Some(&running.cluster_secret)),
        show_secret(Some(&new.cluster_secret)),
    );
    live(
        "clusterSecretNext",
        show_secret(running.cluster_secret_next.as_ref()),
        show_secret(new.cluster_secret_next.as_ref()),
    );
    live(
        "machineType",
        running.machine_type.clone(),
        new.machine_type.clone(),
    );
    // The whole entry (URL and TLS settings): a changed CA restarts that client.
    if urls(running) != urls(new) {
        live(
            "discovery.endpoints",
            show_list(
                &running
                    .discovery_endpoints
                    .iter()
                    .map(|e| &e.url)
                    .collect::<Vec<_>>(),
            ),
            show_list(
                &new.discovery_endpoints
                    .iter()
                    .map(|e| &e.url)
                    .collect::<Vec<_>>(),
            ) + if running
                .discovery_endpoints
                .iter()
                .map(|e| &e.url)
                .eq(new.discovery_endpoints.iter().map(|e| &e.url))
            {
                " (TLS settings)"
            } else {
                ""
            },
        );
    }
    live(
        "advertiseNetworks",
        show_list(&running.advertise_networks),
        show_list(&new.advertise_networks),
    );
    live(
        "filters.endpoints",
        rules(&running.endpoint_filters),
        rules(&new.endpoint_filters),
    );
    live(
        "filters.excludeAdvertisedNetworks",
        show_list(&running.exclude_advertised_networks),
        show_list(&new.exclude_advertised_networks),
    );
    live(
        "extraAnnouncedEndpoints",
        show_list(&running.extra_announced_endpoints),
        show_list(&new.extra_announced_endpoints),
    );
    live(
        "allowDownPeerBypass",
        running.allow_down_peer_bypass.to_string(),
        new.allow_down_peer_bypass.to_string(),
    );
    live(
        "harvestExtraEndpoints",
        running.harvest_extra_endpoints.to_string(),
        new.harvest_extra_endpoints.to_string(),
    );
    live("mtu", running.mtu.to_string(), new.mtu.to_string());
    live(
        "peerKeepaliveSeconds",
        secs(r.peer_keepalive),
        secs(n.peer_keepalive),
    );
    live(
        "endpointTimeoutSeconds",
        secs(r.endpoint_timeout),
        secs(n.endpoint_timeout),
    );
    live(
        "peerDownSeconds",
        secs(r.peer_down_after),
        secs(n.peer_down_after),
    );

    let mut restart = |key: &'static str, changed: bool, why: &str| {
        if changed {
            plan.refusals.push(Refusal {
                key,
                reason: format!("needs a restart ({why})"),
            });
        }
    };
    restart(
        "clusterID",
        running.cluster_id != new.cluster_id,
        "another cluster: new mesh addresses and keys",
    );
    restart(
        "cipher",
        running.cipher != new.cipher,
        "every record and the WireGuard pre-shared keys change format",
    );
    restart(
        "nodeName",
        running.node_name != new.node_name,
        "the node's identity is fixed for the process",
    );
    restart(
        "interface",
        running.interface != new.interface,
        "the WireGuard interface is created at start",
    );
    restart(
        "listenPort",
        running.listen_port != new.listen_port,
        "the WireGuard socket is bound at start",
    );
    restart(
        "macAddress",
        running.mac_address != new.mac_address,
        "the mesh address is derived from it at start",
    );
    restart(
        "stateDir",
        running.state_dir != new.state_dir,
        "the node id and keys are read from it at start",
    );
    restart(
        "apiSocket",
        running.api_socket != new.api_socket,
        "the API socket is bound at start",
    );
    restart(
        "metricsAddr",
        running.metrics_addr != new.metrics_addr,
        "the metrics listener is bound at start",
    );
    restart(
        "backend",
        r.backend != n.backend,
        "the WireGuard device is created at start",
    );
    restart(
        "routingTable, rulePriority, firewallMark, forceMark, markMask or nftablesTable",
        (
            r.routing_table,
            r.rule_priority,
            r.firewall_mark,
            r.force_mark,
            r.mark_mask,
        ) != (
            n.routing_table,
            n.rule_priority,
            n.firewall_mark,
            n.force_mark,
            n.mark_mask,
        ) || r.nftables_table != n.nftables_table,
        "policy routing and the firewall table are named by them",
    );
    restart(
        "natTraversal",
        running.nat_traversal != new.nat_traversal,
        "STUN and port mapping start with the data plane",
    );
    restart(
        "relay",
        running.relay != new.relay,
        "relay connections start with the agent",
    );
    if running.cluster_secret != new.cluster_secret
        && running.cipher == Cipher::Talos
        && new.cipher == Cipher::Talos
    {
        plan.refusals.push(Refusal {
            key: "clusterSecret",
            reason: "needs a restart of every node together: the talos cipher uses the secret \
                     itself as every peer's WireGuard pre-shared key, so it cannot rotate live"
                .to_string(),
        });
    } else if running.cluster_secret != new.cluster_secret
        && running.cluster_secret_next != Some(new.cluster_secret)
    {
        plan.refusals.push(Refusal {
            key: "clusterSecret",
            reason: "may only become the running clusterSecretNext (rotation step 2): add the \
                     new secret as clusterSecretNext on every node and reload first, or the \
                     other nodes cannot read this node's record"
                .to_string(),
        });
    } else if running.cluster_secret != new.cluster_secret
        && new.cluster_secret_next != Some(running.cluster_secret)
    {
        plan.refusals.push(Refusal {
            key: "clusterSecretNext",
            reason: "must be the old clusterSecret when promoting (rotation step 2): nodes that                      have not promoted yet still seal with it, and their records would stop                      opening here"
                .to_string(),
        });
    }
    plan
}

/// `host:port` entries (a name or an address, port 1–65535), trimmed; errors name the entry.
fn host_ports(key: &str, entries: &[String], examples: &str) -> Result<Vec<String>, ConfigError> {
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let entry = entry.trim();
            match entry.rsplit_once(':') {
                Some((host, port))
                    if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) =>
                {
                    Ok(entry.to_owned())
                }
                _ => Err(invalid(
                    format!("{key}[{i}]"),
                    format!("{entry:?} is not host:port (e.g. {examples})"),
                )),
            }
        })
        .collect()
}

fn validate_endpoint(key: &str, entry: RawEndpoint) -> Result<DiscoveryEndpoint, ConfigError> {
    let details = match entry {
        RawEndpoint::Url(url) => {
            return DiscoveryEndpoint::parse(url.trim()).map_err(|m| invalid(key, m));
        }
        RawEndpoint::Extended(details) => details,
    };
    let url_key = format!("{key}.url");
    let mut endpoint =
        DiscoveryEndpoint::parse(details.url.trim()).map_err(|m| invalid(&url_key, m))?;
    let has_tls_settings = details.ca_file.is_some()
        || details.cert_file.is_some()
        || details.key_file.is_some()
        || details.server_name.is_some();
    if endpoint.insecure && has_tls_settings {
        return Err(invalid(
            &url_key,
            format!(
                "{:?} is plaintext (http://), so caFile, certFile, keyFile and serverName would \
                 be ignored: use https:// for TLS, or drop those keys",
                endpoint.url
            ),
        ));
    }
    let client_identity = match (details.cert_file, details.key_file) {
        (Some(cert_file), Some(key_file)) => Some(ClientIdentity {
            cert_file,
            key_file,
        }),
        (None, None) => None,
        (Some(_), None) => {
            return Err(invalid(
                format!("{key}.keyFile"),
                "is required with certFile: the client certificate's private key (PEM)",
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                format!("{key}.certFile"),
                "is required with keyFile: the client certificate (PEM) for that key",
            ));
        }
    };
    let server_name = match details.server_name.map(|n| n.trim().to_owned()) {
        Some(name) => {
            if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                return Err(invalid(
                    format!("{key}.serverName"),
                    format!(
                        "{name:?} is not a DNS name or IP address: use the name in the discovery \
                         server's certificate, e.g. discovery.example"
                    ),
                ));
            }
            Some(name)
        }
        None => None,
    };
    endpoint.tls = TlsOptions {
        ca_file: details.ca_file,
        client_identity,
        server_name,
    };
    // The files are read now so that a wrong path or a broken PEM stops the agent at start with
    // the key named, instead of failing every connection attempt in the background.
    crate::discovery_tls::client_tls(&endpoint).map_err(|e| invalid(key, e.to_string()))?;
    Ok(endpoint)
}

fn validate_data_plane(raw: &RawConfig) -> Result<DataPlaneConfig, ConfigError> {
    let defaults = DataPlaneConfig::default();
    let backend = match raw.backend.as_deref().map(str::trim) {
        None | Some("auto") => Backend::Auto,
        Some("kernel") => Backend::Kernel,
        Some("userspace") => Backend::Userspace,
        Some("none") => Backend::None,
        Some(other) => {
            return Err(invalid(
                "backend",
                format!(
                    "{other:?} is not a backend: use auto (default), kernel, userspace or none"
                ),
            ));
        }
    };
    let config = DataPlaneConfig {
        backend,
        routing_table: raw.routing_table.unwrap_or(defaults.routing_table),
        rule_priority: raw.rule_priority.unwrap_or(defaults.rule_priority),
        firewall_mark: raw.firewall_mark.unwrap_or(defaults.firewall_mark),
        force_mark: raw.force_mark.unwrap_or(defaults.force_mark),
        mark_mask: raw.mark_mask.unwrap_or(defaults.mark_mask),
        nftables_table: raw
            .nftables_table
            .clone()
            .unwrap_or(defaults.nftables_table),
        peer_keepalive: raw
            .peer_keepalive_seconds
            .map_or(defaults.peer_keepalive, |s| {
                std::time::Duration::from_secs(s.into())
            }),
        endpoint_timeout: raw
            .endpoint_timeout_seconds
            .map_or(defaults.endpoint_timeout, std::time::Duration::from_secs),
        peer_down_after: raw
            .peer_down_seconds
            .map_or(defaults.peer_down_after, std::time::Duration::from_secs),
    };
    if [0, 253, 254, 255].contains(&config.routing_table) {
        return Err(invalid(
            "routingTable",
            format!(
                "{} is reserved (0, default, main, local): use another table id such as 180",
                config.routing_table
            ),
        ));
    }
    if config.mark_mask == 0 {
        return Err(invalid(
            "markMask",
            "0 leaves no bits for the marks: the default is 0x60 (96)",
        ));
    }
    for (key, mark) in [
        ("firewallMark", config.firewall_mark),
        ("forceMark", config.force_mark),
    ] {
        if mark == 0 || mark & !config.mark_mask != 0 {
            return Err(invalid(
                key,
                format!(
                    "{mark:#x} must be non-zero and inside markMask {:#x}",
                    config.mark_mask
                ),
            ));
        }
    }
    if config.firewall_mark == config.force_mark {
        return Err(invalid("forceMark", "must differ from firewallMark"));
    }
    let table = &config.nftables_table;
    if table.is_empty()
        || !table
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(invalid(
            "nftablesTable",
            format!("{table:?} is not a valid table name: letters, digits, '_' and '-'"),
        ));
    }
    if config.peer_keepalive.is_zero() || config.peer_keepalive >= config.peer_down_after {
        return Err(invalid(
            "peerKeepaliveSeconds",
            format!(
                "{}s must be at least 1 and shorter than peerDownSeconds ({}s), or live peers would look down",
                config.peer_keepalive.as_secs(),
                config.peer_down_after.as_secs()
            ),
        ));
    }
    if config.endpoint_timeout.is_zero() {
        return Err(invalid("endpointTimeoutSeconds", "must be at least 1"));
    }
    Ok(config)
}

/// A commented configuration with fresh secrets, for `kubespanctl gen config`.
/// `endpoints` are the discovery URLs (at least one; `kubespanctl` defaults to
/// `http://127.0.0.1:3000`).
pub fn example(cluster_id: &str, cluster_secret: &str, endpoints: &[String]) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|url| format!("    - {url}\n"))
        .collect();
    format!(
        r#"# kubespan-agent configuration. Every node of a cluster uses the same clusterID and
# clusterSecret; keep the secret private (it encrypts member records and is the WireGuard
# preshared key).
clusterID: {cluster_id}
clusterSecret: {cluster_secret}

# This node's name in `kubespanctl members` (default: the hostname).
# nodeName: node-1
# machineType: worker            # worker | controlplane | init

discovery:
  # One or more discovery services; their views are merged. http:// is plaintext gRPC,
  # https:// (or grpc://) is TLS. Every node must reach them (127.0.0.1 only works for nodes
  # on the discovery service's own host).
  endpoints:
{endpoints}    # A TLS service with a private CA (trusted instead of the system roots), a client
    # certificate when it requires mutual TLS, and the name its certificate carries when the URL
    # names an address:
    # - url: https://10.0.0.5:3000
    #   caFile: /etc/kubespan/discovery-ca.pem
    #   certFile: /etc/kubespan/discovery-client.pem
    #   keyFile: /etc/kubespan/discovery-client-key.pem
    #   serverName: discovery.internal

# Record encryption: native (XChaCha20-Poly1305, default) or talos (to join Talos clusters).
cipher: native

# Extra networks routed to this node through the mesh (e.g. its pod CIDR).
advertiseNetworks: []

# false (default): traffic to a peer that is down stays in the tunnel (never leaks in clear).
allowDownPeerBypass: false

# Publish endpoints observed for other peers (helps behind NAT; avoid above ~50 nodes).
harvestExtraEndpoints: false

# Tunnel MTU: underlay MTU - 80, at least 1280.
mtu: 1420

filters:
  # Ordered include / !exclude CIDRs for the endpoints this node announces.
  # endpoints: ["0.0.0.0/0", "!10.0.0.0/8"]
  # Networks peers must not route to this node through the mesh.
  excludeAdvertisedNetworks: []

# Endpoints announced as-is after the filtered ones (e.g. a NAT port forward).
extraAnnouncedEndpoints: []

listenPort: 51820
interface: kubespan
stateDir: /var/lib/kubespan
apiSocket: /run/kubespan/agent.sock
metricsAddr: "127.0.0.1:9560"

# WireGuard implementation: auto (kernel if available, else userspace), kernel, userspace, none.
backend: auto
# Seconds between keepalives; a peer silent for half of peerDownSeconds is probed (a handshake),
# one silent for peerDownSeconds is down and its endpoints are raced again; an endpoint that
# gives no handshake within endpointTimeoutSeconds is abandoned for the next one (kernel
# WireGuard tries endpoints one by one, the userspace device all at once).
peerKeepaliveSeconds: 3
peerDownSeconds: 9
endpointTimeoutSeconds: 3
# Reaching nodes behind NAT. stunServers: host:port of STUN servers (discovery-server
# --stun-addr, or a public one), asked from the WireGuard socket every 20-30 s; the NAT mapping
# they report is announced as an endpoint (userspace device only: kernel WireGuard's socket is
# the kernel's). portMapping: ask the gateway to forward the listen port (PCP, NAT-PMP,
# UPnP-IGD) and announce the mapped endpoint.
natTraversal:
  stunServers: []
  portMapping: false
# Relays (openspan-relay, host:port, written the same on every node) for peers no direct path
# reaches (both behind endpoint-dependent NAT, or UDP blocked); used only while no direct path
# answers. caFile: the CA of the relays' certificates.
relay:
  servers: []
# Policy routing and firewall (KubeSpan's values).
routingTable: 180
rulePriority: 32500
firewallMark: 0x20
forceMark: 0x40
markMask: 0x60
nftablesTable: kubespan

# The mesh address is derived from a MAC (see the README); set one when hosts clone MACs.
# macAddress: "2e:1a:b6:53:81:69"
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn base() -> String {
        format!(
            "clusterID: test-cluster\nclusterSecret: {SECRET}\ndiscovery:\n  endpoints: [\"http://127.0.0.1:3000\"]\n"
        )
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn minimal_config_gets_the_defaults() {
        let config = parse(&base()).unwrap();
        assert_eq!(config.listen_port, 51820);
        assert_eq!(config.interface, "kubespan");
        assert_eq!(config.mtu, 1420);
        assert_eq!(config.cipher, Cipher::Native);
        assert_eq!(config.api_socket, PathBuf::from("/run/kubespan/agent.sock"));
        assert!(!config.allow_down_peer_bypass);
        assert!(config.endpoint_filters.is_none());
        assert_eq!(config.discovery_endpoints[0].authority, "127.0.0.1:3000");
        assert!(config.discovery_endpoints[0].insecure);
    }

    #[test]
    fn the_generated_example_is_valid() {
        let config = parse(&example(
            "abc",
            SECRET,
            &["http://127.0.0.1:3000".to_string()],
        ))
        .unwrap();
        assert_eq!(config.cluster_id, "abc");
        assert_eq!(config.metrics_addr.as_deref(), Some("127.0.0.1:9560"));
        // The commented TLS entry has the right shape: uncommented, only its files are missing.
        let uncommented = example("abc", SECRET, &["http://127.0.0.1:3000".to_string()])
            .replace("    # - url:", "    - url:")
            .replace("    #   ", "      ");
        assert!(uncommented.contains("    - url: https://10.0.0.5:3000\n      caFile:"));
        assert!(
            error(&uncommented).contains(
                "`discovery.endpoints[1]`: caFile /etc/kubespan/discovery-ca.pem: cannot read it"
            ),
            "{}",
            error(&uncommented)
        );
    }

    #[test]
    fn errors_name_the_key_the_value_and_what_is_allowed() {
        let cases = [
            (
                format!("{}mtu: 1200\n", base()),
                "`mtu`: 1200 is out of range: use 1280",
            ),
            (
                format!("{}cipher: aes\n", base()),
                "`cipher`: \"aes\" is not a cipher suite",
            ),
            (
                format!("{}advertiseNetworks: [10.0.0.0/33]\n", base()),
                "`advertiseNetworks[0]`: \"10.0.0.0/33\"",
            ),
            (
                format!("{}filters:\n  endpoints: [\"!nonsense\"]\n", base()),
                "`filters.endpoints[0]`",
            ),
            (
                format!("{}extraAnnouncedEndpoints: [1.2.3.4]\n", base()),
                "`extraAnnouncedEndpoints[0]`: \"1.2.3.4\" is not ip:port",
            ),
            (format!("{}interface: a/b\n", base()), "`interface`"),
            (format!("{}macAddress: zz\n", base()), "`macAddress`"),
            (format!("{}listenPort: 0\n", base()), "`listenPort`"),
            (
                format!("{}machineType: boss\n", base()),
                "`machineType`: \"boss\"",
            ),
            ("clusterSecret: x\n".to_string(), "`clusterID`: is required"),
            (
                "clusterID: a\nclusterSecret: c2hvcnQ=\ndiscovery: {endpoints: [\"http://x:1\"]}\n"
                    .to_string(),
                "`clusterSecret`",
            ),
            (
                "clusterID: a\nclusterSecret: AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n"
                    .to_string(),
                "`discovery.endpoints`",
            ),
            (
                format!(
                    "clusterID: a\nclusterSecret: {SECRET}\ndiscovery: {{endpoints: [\"discovery:3000\"]}}\n"
                ),
                "`discovery.endpoints[0]`: \"discovery:3000\" has no scheme",
            ),
        ];
        for (text, expected) in cases {
            let message = error(&text);
            assert!(
                message.contains(expected),
                "for\n{text}\nexpected {expected:?} in {message:?}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_errors() {
        let message = error(&format!("{}listenport: 5\n", base()));
        assert!(message.contains("unknown field `listenport`"), "{message}");
        let message = error(&format!("{}filters:\n  endpoint: []\n", base()));
        assert!(message.contains("unknown field `endpoint`"), "{message}");
    }

    #[test]
    fn an_unknown_key_suggests_the_closest_known_one() {
        let message = error(&format!("{}listenport: 5\n", base()));
        assert!(
            message.contains("unknown field `listenport` (did you mean `listenPort`?), expected"),
            "{message}"
        );
        let message = error(&format!("{}filters:\n  endpoint: []\n", base()));
        assert!(message.contains("did you mean `endpoints`?"), "{message}");
        let message = error(&format!("{}clusterSecrte: x\n", base()));
        assert!(
            message.contains("did you mean `clusterSecret`?"),
            "{message}"
        );
        // Nothing close: no guess.
        let message = error(&format!("{}wireguardKernelModule: true\n", base()));
        assert!(!message.contains("did you mean"), "{message}");
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("", "abc"), 3);
    }

    #[test]
    fn discovery_urls_follow_talos_rules() {
        let https = DiscoveryEndpoint::parse("https://discovery.talos.dev/").unwrap();
        assert_eq!(
            (https.authority.as_str(), https.insecure),
            ("discovery.talos.dev:443", false)
        );
        assert_eq!(https.host, "discovery.talos.dev");
        let http = DiscoveryEndpoint::parse("http://10.0.0.1").unwrap();
        assert_eq!(
            (http.authority.as_str(), http.insecure),
            ("10.0.0.1:80", true)
        );
        let grpc = DiscoveryEndpoint::parse("grpc://[2001:db8::1]:3000").unwrap();
        assert_eq!(
            (grpc.authority.as_str(), grpc.insecure),
            ("[2001:db8::1]:3000", false)
        );
        assert_eq!(grpc.host, "2001:db8::1");
        let v6_default = DiscoveryEndpoint::parse("https://[2001:db8::1]").unwrap();
        assert_eq!(v6_default.authority, "[2001:db8::1]:443");
        assert!(DiscoveryEndpoint::parse("ftp://x").is_err());
    }

    /// A throwaway directory with a CA (`ca.pem`) and a client certificate it signed
    /// (`client.pem`, `client-key.pem`), plus a key of another certificate (`other-key.pem`).
    fn tls_files() -> tempfile::TempDir {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let client_key = KeyPair::generate().unwrap();
        let client = CertificateParams::new(vec!["node-1".to_string()])
            .unwrap()
            .signed_by(&client_key, &issuer)
            .unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        write("ca.pem", ca.pem());
        write("client.pem", client.pem());
        write("client-key.pem", client_key.serialize_pem());
        write(
            "other-key.pem",
            KeyPair::generate().unwrap().serialize_pem(),
        );
        dir
    }

    fn with_endpoint(entry: &str) -> String {
        format!(
            "clusterID: test-cluster\nclusterSecret: {SECRET}\ndiscovery:\n  endpoints:\n{entry}"
        )
    }

    #[test]
    fn an_endpoint_may_name_a_ca_a_client_certificate_and_a_server_name() {
        let dir = tls_files();
        let d = dir.path().display();
        let config = parse(&with_endpoint(&format!(
            "    - http://127.0.0.1:3000\n    - url: https://10.0.0.5:3000\n      caFile: {d}/ca.pem\n      \
             certFile: {d}/client.pem\n      keyFile: {d}/client-key.pem\n      serverName: discovery.test\n"
        )))
        .unwrap();
        let plain = &config.discovery_endpoints[0];
        assert_eq!(plain.tls, TlsOptions::default());
        let extended = &config.discovery_endpoints[1];
        assert_eq!(
            (extended.authority.as_str(), extended.insecure),
            ("10.0.0.5:3000", false)
        );
        assert_eq!(
            extended.tls,
            TlsOptions {
                ca_file: Some(dir.path().join("ca.pem")),
                client_identity: Some(ClientIdentity {
                    cert_file: dir.path().join("client.pem"),
                    key_file: dir.path().join("client-key.pem"),
                }),
                server_name: Some("discovery.test".into()),
            }
        );
        // The map form with only a URL is the plain form.
        let config = parse(&with_endpoint("    - url: https://discovery.example\n")).unwrap();
        assert_eq!(
            config.discovery_endpoints[0],
            DiscoveryEndpoint::parse("https://discovery.example").unwrap()
        );
    }

    #[test]
    fn a_redirect_keeps_the_ca_and_client_certificate_but_not_the_server_name() {
        let mut configured = DiscoveryEndpoint::parse("https://10.0.0.5:3000").unwrap();
        configured.tls = TlsOptions {
            ca_file: Some("/ca.pem".into()),
            client_identity: Some(ClientIdentity {
                cert_file: "/c.pem".into(),
                key_file: "/k.pem".into(),
            }),
            server_name: Some("discovery.test".into()),
        };
        let next = configured.redirected("other.example:3001").unwrap();
        assert_eq!(next.authority, "other.example:3001");
        assert!(!next.insecure);
        assert_eq!(next.tls.ca_file, configured.tls.ca_file);
        assert_eq!(next.tls.client_identity, configured.tls.client_identity);
        assert_eq!(next.tls.server_name, None);
    }

    #[test]
    fn bad_tls_settings_are_errors_that_name_the_key_and_the_file() {
        let dir = tls_files();
        let d = dir.path().display();
        std::fs::write(dir.path().join("garbage.pem"), "not a certificate").unwrap();
        let cases = [
            (
                format!("    - url: https://x:1\n      certFile: {d}/client.pem\n"),
                "`discovery.endpoints[0].keyFile`: is required with certFile".to_string(),
            ),
            (
                format!("    - url: https://x:1\n      keyFile: {d}/client-key.pem\n"),
                "`discovery.endpoints[0].certFile`: is required with keyFile".to_string(),
            ),
            (
                format!("    - url: https://x:1\n      caFile: {d}/missing.pem\n"),
                format!("`discovery.endpoints[0]`: caFile {d}/missing.pem: cannot read it"),
            ),
            (
                format!("    - url: https://x:1\n      caFile: {d}/garbage.pem\n"),
                format!("caFile {d}/garbage.pem: no certificate found"),
            ),
            (
                format!(
                    "    - url: https://x:1\n      certFile: {d}/client.pem\n      keyFile: {d}/ca.pem\n"
                ),
                format!("keyFile {d}/ca.pem: no private key found"),
            ),
            (
                format!(
                    "    - url: https://x:1\n      certFile: {d}/client.pem\n      keyFile: {d}/other-key.pem\n"
                ),
                format!("certFile {d}/client.pem and keyFile {d}/other-key.pem do not go together"),
            ),
            (
                format!("    - url: http://x:1\n      caFile: {d}/ca.pem\n"),
                "`discovery.endpoints[0].url`: \"http://x:1\" is plaintext".to_string(),
            ),
            (
                "    - url: https://x:1\n      serverName: \"not a name\"\n".to_string(),
                "`discovery.endpoints[0].serverName`: \"not a name\"".to_string(),
            ),
            (
                "    - url: ftp://x\n".to_string(),
                "`discovery.endpoints[0].url`: scheme \"ftp\"".to_string(),
            ),
            (
                "    - url: https://x:1\n      cafile: /ca.pem\n".to_string(),
                "unknown field `cafile` (did you mean `caFile`?), expected one of".to_string(),
            ),
            (
                "    - caFile: /ca.pem\n".to_string(),
                "missing field `url`".to_string(),
            ),
        ];
        for (entry, expected) in cases {
            let text = with_endpoint(&entry);
            let message = error(&text);
            assert!(
                message.contains(&expected),
                "for\n{text}\nexpected {expected:?} in {message:?}"
            );
        }
    }

    const NEXT: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

    fn plan(extra_running: &str, extra_new: &str) -> ReloadPlan {
        let running = parse(&format!("{}{extra_running}", base())).unwrap();
        let new = parse(&format!("{}{extra_new}", base())).unwrap();
        plan_reload(&running, &new)
    }

    #[test]
    fn the_same_configuration_changes_nothing() {
        let plan = plan("mtu: 1400\n", "mtu: 1400\n");
        assert_eq!(plan, ReloadPlan::default());
        assert_eq!(plan.summary(), "nothing changed");
    }

    #[test]
    fn live_keys_are_applied_one_by_one() {
        let cases = [
            ("mtu: 1400\n", "mtu", "1420", "1400"),
            (
                "peerKeepaliveSeconds: 5\n",
                "peerKeepaliveSeconds",
                "3s",
                "5s",
            ),
            (
                "endpointTimeoutSeconds: 7\n",
                "endpointTimeoutSeconds",
                "3s",
                "7s",
            ),
            ("peerDownSeconds: 20\n", "peerDownSeconds", "9s", "20s"),
            (
                "advertiseNetworks: [10.9.0.0/16]\n",
                "advertiseNetworks",
                "[]",
                "[10.9.0.0/16]",
            ),
            (
                "filters:\n  endpoints: [\"10.0.0.0/8\", \"!10.1.0.0/16\"]\n",
                "filters.endpoints",
                "(all)",
                "[10.0.0.0/8, !10.1.0.0/16]",
            ),
            (
                "filters:\n  excludeAdvertisedNetworks: [10.9.1.0/24]\n",
                "filters.excludeAdvertisedNetworks",
                "[]",
                "[10.9.1.0/24]",
            ),
            (
                "extraAnnouncedEndpoints: [\"198.51.100.7:51820\"]\n",
                "extraAnnouncedEndpoints",
                "[]",
                "[198.51.100.7:51820]",
            ),
            (
                "allowDownPeerBypass: true\n",
                "allowDownPeerBypass",
                "false",
                "true",
            ),
            (
                "harvestExtraEndpoints: true\n",
                "harvestExtraEndpoints",
                "false",
                "true",
            ),
            (
                "machineType: controlplane\n",
                "machineType",
                "worker",
                "controlplane",
            ),
        ];
        for (extra, key, from, to) in cases {
            let plan = plan("", extra);
            assert!(!plan.refused(), "{extra}: {plan:?}");
            assert_eq!(
                plan.changes,
                [Change {
                    key,
                    from: from.into(),
                    to: to.into()
                }],
                "{extra}"
            );
            assert!(
                plan.summary().starts_with(&format!("applied {key} ")),
                "{}",
                plan.summary()
            );
        }
    }

    #[test]
    fn discovery_endpoints_are_applied_live() {
        let running = parse(&base()).unwrap();
        let new = parse(&format!(
            "clusterID: test-cluster\nclusterSecret: {SECRET}\ndiscovery:\n  endpoints: [\"http://127.0.0.1:3000\", \"http://127.0.0.1:3001\"]\n"
        ))
        .unwrap();
        let plan = plan_reload(&running, &new);
        assert!(!plan.refused());
        assert_eq!(plan.changes.len(), 1);
        assert_eq!(plan.changes[0].key, "discovery.endpoints");
        assert_eq!(
            plan.changes[0].to,
            "[http://127.0.0.1:3000, http://127.0.0.1:3001]"
        );
    }

    #[test]
    fn keys_the_process_is_built_from_are_refused_with_the_reason() {
        let cases = [
            (
                "interface: ks2\n",
                "interface",
                "interface is created at start",
            ),
            ("listenPort: 51821\n", "listenPort", "bound at start"),
            ("nodeName: other\n", "nodeName", "identity"),
            (
                "macAddress: \"2e:1a:b6:53:81:69\"\n",
                "macAddress",
                "mesh address",
            ),
            ("stateDir: /tmp/x\n", "stateDir", "node id"),
            ("apiSocket: /tmp/x.sock\n", "apiSocket", "API socket"),
            ("metricsAddr: \"127.0.0.1:1\"\n", "metricsAddr", "metrics"),
            ("backend: kernel\n", "backend", "device"),
            (
                "routingTable: 181\n",
                "routingTable, rulePriority, firewallMark, forceMark, markMask or nftablesTable",
                "policy routing",
            ),
            (
                "nftablesTable: other\n",
                "routingTable, rulePriority, firewallMark, forceMark, markMask or nftablesTable",
                "firewall",
            ),
            (
                "natTraversal:\n  portMapping: true\n",
                "natTraversal",
                "STUN",
            ),
            ("relay:\n  servers: [\"r:1\"]\n", "relay", "relay"),
            ("cipher: talos\n", "cipher", "format"),
        ];
        for (extra, key, why) in cases {
            let plan = plan("", extra);
            assert!(plan.refused(), "{extra}");
            assert_eq!(plan.refusals.len(), 1, "{extra}: {plan:?}");
            assert_eq!(plan.refusals[0].key, key, "{extra}");
            assert!(
                plan.refusals[0].reason.starts_with("needs a restart"),
                "{extra}"
            );
            assert!(
                plan.refusals[0].reason.contains(why),
                "{extra}: {}",
                plan.refusals[0].reason
            );
            assert!(
                plan.summary().starts_with("refused ("),
                "{}",
                plan.summary()
            );
        }
        // The cluster id changes the base config's first line.
        let running = parse(&base()).unwrap();
        let other = parse(&base().replace("test-cluster", "other")).unwrap();
        let refused = plan_reload(&running, &other);
        assert_eq!(refused.refusals[0].key, "clusterID");
        // A refusal refuses the whole reload, live changes included (all or nothing).
        let mixed = plan("", "mtu: 1400\ninterface: ks2\n");
        assert!(mixed.refused());
        assert_eq!(mixed.changes.len(), 1, "the live part is still shown");
        assert!(mixed.summary().contains("interface"), "{}", mixed.summary());
    }

    #[test]
    fn secrets_rotate_through_next_and_are_shown_as_fingerprints() {
        let fp = |b64: &str| {
            format!(
                "sha256:{}",
                secret_fingerprint(&parse_cluster_secret(b64).unwrap())
            )
        };
        // Step 1: add the next secret.
        let step1 = plan("", &format!("clusterSecretNext: {NEXT}\n"));
        assert!(!step1.refused(), "{step1:?}");
        assert_eq!(
            step1.changes,
            [Change {
                key: "clusterSecretNext",
                from: "(none)".into(),
                to: fp(NEXT)
            }]
        );
        assert!(!step1.summary().contains(NEXT) && !step1.summary().contains(SECRET));
        // Step 2: promote (secret = next, next = old).
        let running = parse(&format!("{}clusterSecretNext: {NEXT}\n", base())).unwrap();
        let promoted = parse(&format!(
            "{}clusterSecretNext: {SECRET}\n",
            base().replace(SECRET, NEXT)
        ))
        .unwrap();
        let step2 = plan_reload(&running, &promoted);
        assert!(!step2.refused(), "{step2:?}");
        assert_eq!(step2.changes.len(), 2);
        assert_eq!(step2.changes[0].to, fp(NEXT));
        assert_eq!(step2.changes[1].to, fp(SECRET));
        // Promoting and dropping the old secret in one step is refused: nodes that have not
        // promoted yet still seal with it.
        let rushed = parse(&base().replace(SECRET, NEXT)).unwrap();
        let skipped = plan_reload(&running, &rushed);
        assert!(skipped.refused(), "{skipped:?}");
        assert_eq!(skipped.refusals[0].key, "clusterSecretNext");
        // Step 3: drop the old one.
        let done = parse(&base().replace(SECRET, NEXT)).unwrap();
        let step3 = plan_reload(&promoted, &done);
        assert!(!step3.refused());
        assert_eq!(step3.changes[0].key, "clusterSecretNext");
        assert_eq!(step3.changes[0].to, "(none)");
        // A secret that is not the running next is refused: nobody could read this node.
        let jump = plan_reload(&parse(&base()).unwrap(), &done);
        assert!(jump.refused());
        assert_eq!(jump.refusals[0].key, "clusterSecret");
        assert!(jump.refusals[0].reason.contains("clusterSecretNext"));
        // The talos cipher has no rotation window: a new secret needs a synchronized restart.
        let talos = parse(&format!("{}cipher: talos\n", base())).unwrap();
        let talos_new = parse(&format!("{}cipher: talos\n", base().replace(SECRET, NEXT))).unwrap();
        let refused = plan_reload(&talos, &talos_new);
        assert_eq!(refused.refusals.len(), 1, "{refused:?}");
        assert!(refused.refusals[0].reason.contains("pre-shared key"));
    }

    #[test]
    fn next_secret_is_validated_and_refused_with_the_talos_cipher() {
        let message = error(&format!("{}clusterSecretNext: {SECRET}\n", base()));
        assert!(
            message.contains("`clusterSecretNext`: equals clusterSecret"),
            "{message}"
        );
        let message = error(&format!("{}clusterSecretNext: short\n", base()));
        assert!(message.contains("`clusterSecretNext`"), "{message}");
        let message = error(&format!(
            "{}cipher: talos\nclusterSecretNext: {NEXT}\n",
            base()
        ));
        assert!(message.contains("pre-shared key"), "{message}");
        assert!(message.contains("restart them together"), "{message}");
        let config = parse(&format!("{}clusterSecretNext: {NEXT}\n", base())).unwrap();
        assert_eq!(
            config.cluster_secret_next,
            Some(parse_cluster_secret(NEXT).unwrap())
        );
    }
}
