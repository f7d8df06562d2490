//! Agents against a real discovery server on loopback: membership, ciphers, wrong secrets,
//! leave, expiry, and recovery after server and agent restarts.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod agent_process;

use agent_process::{AgentProcess, api, member_names, wait_members};
use discovery_server::clock::{Clock, ManualClock};
use discovery_server::server::{self, Config as ServerConfig, Running, SnapshotConfig};
use openspan_proto::openspan::agent::v1::{self as pb};
use tonic::transport::{Channel, Endpoint};

const SECRET: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const OTHER_SECRET: &str = "HxwdHhsZGhcYFRYTFBESDxAODQsMCQoHCAUGAwQBAgA=";

fn server_config(addr: &str) -> ServerConfig {
    ServerConfig {
        gc_interval: Duration::from_millis(50),
        ..ServerConfig::embedded(addr)
    }
}

struct AgentSpec<'a> {
    name: &'a str,
    secret: &'a str,
    cipher: &'a str,
    mac: &'a str,
}

fn write_config(dir: &Path, spec: &AgentSpec<'_>, server: &str, extra: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let config = format!(
        "clusterID: test-cluster-id\nclusterSecret: {secret}\nnodeName: {name}\ncipher: {cipher}\n\
         macAddress: \"{mac}\"\ndiscovery:\n  endpoints: [\"http://{server}\"]\n\
         stateDir: {state}\napiSocket: {socket}\nbackend: none\n",
        secret = spec.secret,
        name = spec.name,
        cipher = spec.cipher,
        mac = spec.mac,
        state = dir.join("state").display(),
        socket = dir.join("agent.sock").display(),
    ) + extra;
    std::fs::write(dir.join("config.yaml"), config).unwrap();
}

fn spawn_agent(root: &Path, spec: AgentSpec<'_>, server: &str) -> AgentProcess {
    spawn_agent_with(root, spec, server, "")
}

fn spawn_agent_with(
    root: &Path,
    spec: AgentSpec<'_>,
    server: &str,
    extra_yaml: &str,
) -> AgentProcess {
    let dir = root.join(spec.name);
    write_config(&dir, &spec, server, extra_yaml);
    agent_process::start(&dir, spec.name)
}

fn agent(root: &Path, name: &str, mac: &str, server: &str) -> AgentProcess {
    spawn_agent(
        root,
        AgentSpec {
            name,
            secret: SECRET,
            cipher: "native",
            mac,
        },
        server,
    )
}

async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics listener");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

async fn start_server(addr: &str) -> Running {
    server::start(server_config(addr))
        .await
        .expect("discovery server starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_see_each_other_in_both_cipher_suites() {
    for cipher in ["native", "talos"] {
        let server = start_server("127.0.0.1:0").await;
        let addr = server.grpc_addr.unwrap().to_string();
        let root = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let a = spawn_agent(
            root.path(),
            AgentSpec {
                name: "node-a",
                secret: SECRET,
                cipher,
                mac: "02:00:00:00:00:0a",
            },
            &addr,
        );
        let b = spawn_agent(
            root.path(),
            AgentSpec {
                name: "node-b",
                secret: SECRET,
                cipher,
                mac: "02:00:00:00:00:0b",
            },
            &addr,
        );
        wait_members(&a, &["node-a", "node-b"]).await;
        wait_members(&b, &["node-a", "node-b"]).await;
        eprintln!(
            "{cipher}: both agents saw each other {:?} after start",
            started.elapsed()
        );

        // The peer view carries the other node's key, mesh address and allowed IPs.
        let mut client = api(&a).await;
        let peers = client
            .list_peers(pb::ListPeersRequest {})
            .await
            .unwrap()
            .into_inner()
            .peers;
        assert_eq!(peers.len(), 1, "{peers:?}");
        let identity_b = api(&b)
            .await
            .get_identity(pb::GetIdentityRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(peers[0].public_key, identity_b.public_key);
        assert_eq!(peers[0].mesh_address, identity_b.mesh_address);
        assert!(
            peers[0]
                .allowed_ips
                .contains(&format!("{}/128", identity_b.mesh_address)),
            "{peers:?}"
        );
        assert_eq!(identity_b.cipher, cipher);
        drop((a, b));
        server.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_agent_is_ignored_and_says_why() {
    let server = start_server("127.0.0.1:0").await;
    let addr = server.grpc_addr.unwrap().to_string();
    let root = tempfile::tempdir().unwrap();
    let a = agent(root.path(), "node-a", "02:00:00:00:00:0a", &addr);
    let b = agent(root.path(), "node-b", "02:00:00:00:00:0b", &addr);
    let intruder = spawn_agent(
        root.path(),
        AgentSpec {
            name: "intruder",
            secret: OTHER_SECRET,
            cipher: "native",
            mac: "02:00:00:00:00:0c",
        },
        &addr,
    );
    wait_members(&a, &["node-a", "node-b"]).await;
    wait_members(&b, &["node-a", "node-b"]).await;
    wait_members(&intruder, &["intruder"]).await;
    // Give the intruder's record time to reach everyone, then check it is still ignored.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(member_names(&a).await, ["node-a", "node-b"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !a.log().contains("ignoring a discovery record") {
        assert!(
            Instant::now() < deadline,
            "node-a never said why it ignored a record:\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        a.log().contains("clusterSecret"),
        "the log points at the likely cause:\n{}",
        a.log()
    );
    assert!(
        intruder.log().contains("ignoring a discovery record"),
        "{}",
        intruder.log()
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_or_stopping_removes_a_member_at_once() {
    let server = start_server("127.0.0.1:0").await;
    let addr = server.grpc_addr.unwrap().to_string();
    let root = tempfile::tempdir().unwrap();
    let a = agent(root.path(), "node-a", "02:00:00:00:00:0a", &addr);
    let b = agent(root.path(), "node-b", "02:00:00:00:00:0b", &addr);
    let mut c = agent(root.path(), "node-c", "02:00:00:00:00:0c", &addr);
    wait_members(&a, &["node-a", "node-b", "node-c"]).await;

    // kubespanctl leave on node-b.
    let output = Command::new(env!("CARGO_BIN_EXE_kubespanctl"))
        .arg("--socket")
        .arg(b.socket())
        .arg("leave")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("from 1 discovery service"),
        "{output:?}\n{}",
        b.log()
    );
    wait_members(&a, &["node-a", "node-c"]).await;

    // A graceful stop deletes the record too.
    c.stop();
    wait_members(&a, &["node-a"]).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_record_disappears() {
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let server = server::start_with_clock(
        server_config("127.0.0.1:0"),
        clock.clone() as Arc<dyn Clock>,
    )
    .await
    .unwrap();
    let addr = server.grpc_addr.unwrap().to_string();
    let root = tempfile::tempdir().unwrap();
    let a = agent(root.path(), "node-a", "02:00:00:00:00:0a", &addr);
    let mut b = agent(root.path(), "node-b", "02:00:00:00:00:0b", &addr);
    wait_members(&a, &["node-a", "node-b"]).await;
    b.kill(); // no goodbye: only expiry removes it
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        member_names(&a).await,
        ["node-a", "node-b"],
        "a crashed node stays until its TTL"
    );
    clock.advance(Duration::from_secs(31 * 60));
    wait_members(&a, &["node-a"]).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_of_server_and_agents_converge_without_help() {
    let root = tempfile::tempdir().unwrap();
    let snapshot = root.path().join("server.snapshot");
    let with_snapshot = |addr: &str| ServerConfig {
        snapshot: Some(SnapshotConfig {
            path: snapshot.clone(),
            interval: Duration::from_secs(3600),
            max_size: discovery_server::persist::DEFAULT_MAX_SIZE,
        }),
        ..server_config(addr)
    };
    let server = server::start(with_snapshot("127.0.0.1:0")).await.unwrap();
    let addr = server.grpc_addr.unwrap().to_string();
    let a = agent(root.path(), "node-a", "02:00:00:00:00:0a", &addr);
    let mut b = agent(root.path(), "node-b", "02:00:00:00:00:0b", &addr);
    wait_members(&a, &["node-a", "node-b"]).await;
    let key_b = api(&b)
        .await
        .get_identity(pb::GetIdentityRequest {})
        .await
        .unwrap()
        .into_inner();

    // Server restart (with its snapshot): members are kept meanwhile, and new joins work after.
    server.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        member_names(&a).await,
        ["node-a", "node-b"],
        "a discovery outage keeps what is known"
    );
    let server = server::start(with_snapshot(&addr)).await.unwrap();
    let c = agent(root.path(), "node-c", "02:00:00:00:00:0c", &addr);
    for agent in [&a, &b, &c] {
        wait_members(agent, &["node-a", "node-b", "node-c"]).await;
    }

    // Agent restart: same identity, and everyone converges again.
    b.stop();
    wait_members(&a, &["node-a", "node-c"]).await;
    let b = agent(root.path(), "node-b", "02:00:00:00:00:0b", &addr);
    wait_members(&a, &["node-a", "node-b", "node-c"]).await;
    let again = api(&b)
        .await
        .get_identity(pb::GetIdentityRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.node_id, again.public_key),
        (key_b.node_id, key_b.public_key),
        "identity survives restarts"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubespanctl_shows_the_mesh_and_explains_a_missing_agent() {
    let server = start_server("127.0.0.1:0").await;
    let addr = server.grpc_addr.unwrap().to_string();
    let root = tempfile::tempdir().unwrap();
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let a = spawn_agent_with(
        root.path(),
        AgentSpec {
            name: "node-a",
            secret: SECRET,
            cipher: "native",
            mac: "02:00:00:00:00:0a",
        },
        &addr,
        &format!("metricsAddr: \"127.0.0.1:{metrics_port}\"\n"),
    );
    let b = agent(root.path(), "node-b", "02:00:00:00:00:0b", &addr);
    wait_members(&a, &["node-a", "node-b"]).await;
    wait_members(&b, &["node-a", "node-b"]).await;
    let metrics = http_get(&format!("127.0.0.1:{metrics_port}"), "/metrics").await;
    for expected in [
        "kubespan_members 2",
        "kubespan_discovery_connected{endpoint=",
        "kubespan_peers{state=\"unknown\"} 1",
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected:?} in\n{metrics}"
        );
    }
    let ctl = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_kubespanctl"))
            .arg("--socket")
            .arg(a.socket())
            .args(args)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, table, _) = ctl(&["members"]);
    assert_eq!(code, Some(0));
    assert!(table.starts_with("NODE"), "{table}");
    assert!(
        table.contains("node-a (this node)") && table.contains("node-b"),
        "{table}"
    );
    let (_, json, _) = ctl(&["members", "-o", "json"]);
    let members: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(members.as_array().unwrap().len(), 2, "{json}");
    let (_, yaml, _) = ctl(&["peers", "-o", "yaml"]);
    assert!(yaml.contains("label: node-b"), "{yaml}");
    let (_, status, _) = ctl(&["status"]);
    assert!(status.contains("Members:     2"), "{status}");
    assert!(status.contains("connected"), "{status}");
    let (_, identity, _) = ctl(&["identity"]);
    assert!(
        identity.contains(":0:ff:fe00:a "),
        "the mesh address comes from the configured MAC: {identity}"
    );

    let missing = Command::new(env!("CARGO_BIN_EXE_kubespanctl"))
        .args(["--socket", "/nonexistent/agent.sock", "members"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("not running"),
        "{missing:?}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discovery_service_never_reached_is_reported_with_its_cause() {
    // A port nothing listens on: the connection is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let root = tempfile::tempdir().unwrap();
    let a = agent(root.path(), "node-a", "02:00:00:00:00:0a", &closed);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        let output = Command::new(env!("CARGO_BIN_EXE_kubespanctl"))
            .arg("--socket")
            .arg(a.socket())
            .arg("status")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        if text.contains("is not connected") || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        status.contains(&format!(
            "discovery service http://{closed} is not connected"
        )) && status.contains("Connection refused"),
        "{status}"
    );
    let log = a.log();
    assert!(
        log.contains("cannot reach the discovery service")
            && log.contains(&format!("cannot connect to {closed}"))
            && log.contains("Connection refused"),
        "{log}"
    );
    assert!(!log.contains("connection lost"), "{log}");
}

#[test]
fn generated_config_is_accepted_by_the_agent() {
    let output = Command::new(env!("CARGO_BIN_EXE_kubespanctl"))
        .args(["gen", "config"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    kubespan_agent::config::parse(&text).expect("a generated config is valid");
    let secrets = Command::new(env!("CARGO_BIN_EXE_kubespanctl"))
        .args(["gen", "secrets", "-o", "json"])
        .output()
        .unwrap();
    let secrets: serde_json::Value = serde_json::from_slice(&secrets.stdout).unwrap();
    assert_eq!(secrets["clusterSecret"].as_str().unwrap().len(), 44);
}

#[test]
fn gen_config_takes_endpoints_checks_the_secret_and_writes_a_private_file() {
    use std::os::unix::fs::PermissionsExt;
    let kubespanctl = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_kubespanctl"))
            .args(args)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, text, _) = kubespanctl(&[
        "gen",
        "config",
        "--discovery-endpoint",
        "http://10.1.2.3:3000",
        "--discovery-endpoint",
        "https://discovery.example",
    ]);
    assert_eq!(code, Some(0));
    let config = kubespan_agent::config::parse(&text).expect("a generated config is valid");
    assert_eq!(config.discovery_endpoints.len(), 2);
    assert!(text.contains("    - http://10.1.2.3:3000\n    - https://discovery.example\n"));

    let hex: String = (0..32).map(|i| format!("{:02x}", i + 1)).collect();
    let (code, _, err) = kubespanctl(&["gen", "config", "--cluster-secret", &hex]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("--cluster-secret") && err.contains("looks like hex"),
        "{err}"
    );
    let (code, _, err) = kubespanctl(&["gen", "config", "-o", "json"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("-o json is not supported"), "{err}");
    let (code, _, err) = kubespanctl(&["gen", "config", "--discovery-endpoint", "10.0.0.1:3000"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no scheme"), "{err}");

    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("etc/kubespan/config.yaml");
    let file_arg = file.to_str().unwrap();
    let (code, out, err) = kubespanctl(&["gen", "config", "--output-file", file_arg]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.is_empty(), "{out}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let first = std::fs::read_to_string(&file).unwrap();
    kubespan_agent::config::parse(&first).expect("the written config is valid");
    let (code, _, err) = kubespanctl(&["gen", "config", "--output-file", file_arg]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), first);
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = kubespanctl(&["gen", "config", "--output-file", file_arg, "--force"]);
    assert_eq!(code, Some(0), "{err}");
    assert_ne!(std::fs::read_to_string(&file).unwrap(), first);
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_follow_the_discovery_redirect() {
    let target = start_server("127.0.0.1:0").await;
    let target_addr = target.grpc_addr.unwrap().to_string();
    let mut config = server_config("127.0.0.1:0");
    config.redirect_endpoint = Some(target_addr.clone());
    let redirector = server::start(config).await.unwrap();
    let redirector_addr = redirector.grpc_addr.unwrap().to_string();
    let root = tempfile::tempdir().unwrap();
    // node-a is told to use the redirector; node-b talks to the target directly.
    let a = agent(root.path(), "node-a", "02:00:00:00:00:0a", &redirector_addr);
    let b = agent(root.path(), "node-b", "02:00:00:00:00:0b", &target_addr);
    wait_members(&a, &["node-a", "node-b"]).await;
    wait_members(&b, &["node-a", "node-b"]).await;
    assert!(a.log().contains("redirected"), "{}", a.log());
    redirector.shutdown().await.unwrap();
    target.shutdown().await.unwrap();
}

/// The discovery client a writer who knows only the cluster id can use.
async fn discovery_client(
    addr: &str,
) -> openspan_proto::discovery::server::cluster_client::ClusterClient<Channel> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to the discovery server");
    openspan_proto::discovery::server::cluster_client::ClusterClient::new(channel)
}

/// B's record as the server holds it: (data, endpoints), `None` when absent.
async fn stored(
    client: &mut openspan_proto::discovery::server::cluster_client::ClusterClient<Channel>,
    affiliate: &str,
) -> Option<(Vec<u8>, Vec<Vec<u8>>)> {
    use openspan_proto::discovery::server::ListRequest;
    client
        .list(ListRequest {
            cluster_id: "test-cluster-id".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .affiliates
        .into_iter()
        .find(|a| a.id == affiliate)
        .map(|a| {
            (
                a.data.to_vec(),
                a.endpoints.iter().map(|e| e.to_vec()).collect(),
            )
        })
}

/// Asserts that the agent logged at least `at_least` restorations of its record, each scheduled
/// within 1 s (the `restore_in` field of its "restoring it" line).
fn assert_restores_within_a_second(log: &str, at_least: usize) {
    let delays: Vec<Duration> = log
        .lines()
        .filter(|line| line.contains("restoring it"))
        .map(|line| {
            let field = line
                .split_whitespace()
                .find_map(|word| word.strip_prefix("restore_in="))
                .unwrap_or_else(|| panic!("no restore_in in {line:?}"));
            parse_debug_duration(field).unwrap_or_else(|| panic!("restore_in={field}?"))
        })
        .collect();
    assert!(
        delays.len() >= at_least,
        "{} restorations logged, expected {at_least}:\n{log}",
        delays.len()
    );
    assert!(
        delays.iter().all(|d| *d <= Duration::from_secs(1)),
        "a restoration scheduled later than 1 s: {delays:?}"
    );
}

/// Parses a `Duration` as `{:?}` prints it (`200ms`, `1.5s`, `850µs`).
fn parse_debug_duration(text: &str) -> Option<Duration> {
    let (number, unit) = text.split_at(text.find(|c: char| c.is_alphabetic() || c == 'µ')?);
    let number: f64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => number,
        "ms" => number / 1e3,
        "µs" | "us" => number / 1e6,
        "ns" => number / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(seconds))
}

/// Polls until `check` holds for B's stored record; returns how long it took.
async fn wait_stored(
    client: &mut openspan_proto::discovery::server::cluster_client::ClusterClient<Channel>,
    affiliate: &str,
    what: &str,
    within: Duration,
    check: impl Fn(&Option<(Vec<u8>, Vec<Vec<u8>>)>) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let record = stored(client, affiliate).await;
        if check(&record) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{what} not within {within:?}: {record:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_with_only_the_cluster_id_cannot_evict_a_node() {
    use openspan_proto::discovery::server::{AffiliateDeleteRequest, AffiliateUpdateRequest};
    let server = start_server("127.0.0.1:0").await;
    let addr = server.grpc_addr.unwrap().to_string();
    let root = tempfile::tempdir().unwrap();
    let metrics_port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let a = agent(root.path(), "node-a", "02:00:00:00:00:0a", &addr);
    let b = spawn_agent_with(
        root.path(),
        AgentSpec {
            name: "node-b",
            secret: SECRET,
            cipher: "native",
            mac: "02:00:00:00:00:0b",
        },
        &addr,
        &format!("metricsAddr: \"127.0.0.1:{metrics_port}\"\n"),
    );
    wait_members(&a, &["node-a", "node-b"]).await;
    let b_id = api(&b)
        .await
        .get_identity(pb::GetIdentityRequest {})
        .await
        .unwrap()
        .into_inner()
        .node_id;
    let mut attacker = discovery_client(&addr).await;
    let (good_data, good_endpoints) = stored(&mut attacker, &b_id).await.expect("B published");
    let update = |data: Option<Vec<u8>>, endpoints: Vec<Vec<u8>>| AffiliateUpdateRequest {
        cluster_id: "test-cluster-id".into(),
        affiliate_id: b_id.clone(),
        affiliate_data: data.map(Into::into),
        affiliate_endpoints: endpoints.into_iter().map(Into::into).collect(),
        ttl: Some(prost_types::Duration {
            seconds: 600,
            nanos: 0,
        }),
    };

    // 1. Garbage data: A keeps B's last good record, B restores its own within 1 s. The 1 s
    //    promise is checked on what B decided (the delay it logs); the service's copy is given
    //    10 s, which still tells a reaction from the 15 min refresh, because end to end (watch,
    //    another process, a write, a poll) 1 s is not always enough on a loaded machine.
    attacker
        .affiliate_update(update(Some(b"not a sealed record".to_vec()), vec![]))
        .await
        .unwrap();
    let restored = wait_stored(
        &mut attacker,
        &b_id,
        "B's data restored",
        Duration::from_secs(10),
        |r| r.as_ref().is_some_and(|(data, _)| *data == good_data),
    )
    .await;
    assert_eq!(member_names(&a).await, ["node-a", "node-b"]);
    assert!(
        a.log().contains("the last good one is kept"),
        "A says why it ignored the record\n{}",
        a.log()
    );
    assert_restores_within_a_second(&b.log(), 1);

    // 2. Delete: B publishes again within 1 s (checked as above).
    attacker
        .affiliate_delete(AffiliateDeleteRequest {
            cluster_id: "test-cluster-id".into(),
            affiliate_id: b_id.clone(),
        })
        .await
        .unwrap();
    let recreated = wait_stored(
        &mut attacker,
        &b_id,
        "B's record re-created",
        Duration::from_secs(10),
        |r| r.as_ref().is_some_and(|(data, _)| *data == good_data),
    )
    .await;
    assert_restores_within_a_second(&b.log(), 2);
    wait_members(&a, &["node-a", "node-b"]).await;

    // 3. The endpoint list filled to the server's limit (64) with garbage: B clears its record
    //    and publishes it again, so its own endpoints are all that is left.
    let room = 64 - stored(&mut attacker, &b_id).await.unwrap().1.len();
    let garbage: Vec<Vec<u8>> = (0..room).map(|i| vec![0xEE, i as u8, 7, 7, 7]).collect();
    attacker
        .affiliate_update(update(None, garbage.clone()))
        .await
        .unwrap();
    let cleared = wait_stored(
        &mut attacker,
        &b_id,
        "B's endpoint list cleared of garbage",
        Duration::from_secs(10),
        |r| {
            r.as_ref().is_some_and(|(data, endpoints)| {
                *data == good_data
                    && !endpoints.iter().any(|e| garbage.contains(e))
                    && good_endpoints.iter().all(|e| endpoints.contains(e))
            })
        },
    )
    .await;
    wait_members(&a, &["node-a", "node-b"]).await;
    let metrics = http_get(&format!("127.0.0.1:{metrics_port}"), "/metrics").await;
    let tampered = metrics
        .lines()
        .find(|l| l.starts_with("kubespan_discovery_own_record_tampered_total"))
        .and_then(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no tamper counter in\n{metrics}"));
    assert!(tampered >= 3, "three tamperings counted, got {tampered}");
    eprintln!(
        "restored after garbage data in {restored:?}, after a delete in {recreated:?}, after stuffing in {cleared:?}"
    );
    server.shutdown().await.unwrap();
}

/// Each binary names itself (clap took the package name, so kubespanctl said kubespan-agent).
#[test]
fn the_binaries_name_themselves_in_their_version() {
    for (binary, name) in [
        (env!("CARGO_BIN_EXE_kubespanctl"), "kubespanctl"),
        (env!("CARGO_BIN_EXE_kubespan-agent"), "kubespan-agent"),
    ] {
        let output = std::process::Command::new(binary)
            .arg("--version")
            .output()
            .expect("run --version");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            text.starts_with(&format!("{name} ")),
            "{binary} --version says {text:?}"
        );
    }
}

/// `kubespanctl completion SHELL` prints a script that knows the subcommands, for each shell;
/// an unknown shell is a usage error.
#[test]
fn kubespanctl_prints_completion_scripts() {
    for (shell, marker) in [
        ("bash", "complete -F _kubespanctl"),
        ("zsh", "#compdef kubespanctl"),
        ("fish", "complete -c kubespanctl"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_kubespanctl"))
            .args(["completion", shell])
            .output()
            .expect("run kubespanctl completion");
        assert!(output.status.success(), "completion {shell}: {output:?}");
        let script = String::from_utf8_lossy(&output.stdout);
        assert!(script.contains(marker), "completion {shell}:\n{script}");
        for sub in ["status", "members", "peers", "relay-verifier", "completion"] {
            assert!(script.contains(sub), "completion {shell} lacks {sub}");
        }
    }
    let output = Command::new(env!("CARGO_BIN_EXE_kubespanctl"))
        .args(["completion", "powershell-9"])
        .output()
        .expect("run kubespanctl completion");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
}

/// The hidden `--generate-man DIR` writes a page per binary and per kubespanctl subcommand
/// (what scripts/package-deb.sh packages); without DIR it is a usage error.
#[test]
fn the_binaries_write_their_man_pages() {
    let dir = tempfile::tempdir().unwrap();
    for (binary, pages) in [
        (
            env!("CARGO_BIN_EXE_kubespanctl"),
            &[
                "kubespanctl.1",
                "kubespanctl-status.1",
                "kubespanctl-gen.1",
                "kubespanctl-gen-config.1",
                "kubespanctl-completion.1",
            ][..],
        ),
        (
            env!("CARGO_BIN_EXE_kubespan-agent"),
            &["kubespan-agent.8"][..],
        ),
    ] {
        let output = Command::new(binary)
            .arg("--generate-man")
            .arg(dir.path())
            .output()
            .expect("run --generate-man");
        assert!(output.status.success(), "{binary}: {output:?}");
        for page in pages {
            let path = dir.path().join(page);
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{binary} wrote no {page}: {e}"));
            let (name, section) = page.rsplit_once('.').unwrap();
            assert!(
                text.contains(&format!(".TH {name} {section} ")),
                "{page}:\n{text}"
            );
            assert!(!text.contains("generate\\-man"), "{page}:\n{text}");
        }
        // The option is hidden: not in the help, nor in the pages.
        let help = Command::new(binary).arg("--help").output().unwrap();
        assert!(!String::from_utf8_lossy(&help.stdout).contains("generate-man"));
        let usage = Command::new(binary).arg("--generate-man").output().unwrap();
        assert_eq!(usage.status.code(), Some(2), "{usage:?}");
    }
    // Every subcommand `kubespanctl --help` lists has its page.
    let help = Command::new(env!("CARGO_BIN_EXE_kubespanctl"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let subcommands: Vec<&str> = help
        .split("Commands:\n")
        .nth(1)
        .expect("a Commands section")
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .collect();
    assert!(subcommands.contains(&"health"), "{help}");
    for name in subcommands {
        let page = dir.path().join(format!("kubespanctl-{name}.1"));
        assert!(page.exists(), "no man page for kubespanctl {name}");
    }
}
