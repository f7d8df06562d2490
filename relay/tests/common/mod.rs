//! Helpers shared by the relay's integration tests: self-signed certificates, a relay on
//! 127.0.0.1 (in this process or as a child process), and client configurations.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openspan_relay::client::{RelayClient, RelayClientConfig};
use openspan_relay::clusters::Clusters;
use openspan_relay::metrics::RelayMetrics;
use openspan_relay::tls::TlsFiles;
use openspan_relay::{RelayConfig, RelayLimits, access_token, verifier};
use tokio_util::sync::CancellationToken;

pub const SECRET_A: [u8; 32] = [0xa1; 32];
pub const SECRET_B: [u8; 32] = [0xb2; 32];

pub fn key(n: u8) -> [u8; 32] {
    [n; 32]
}

/// Writes a fresh self-signed certificate for `localhost` to `dir/<name>.{crt,key}`.
pub fn write_cert(dir: &Path, name: &str) -> TlsFiles {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("rcgen");
    let files = TlsFiles {
        certificate: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&files.certificate, cert.pem()).unwrap();
    std::fs::write(&files.key, signing_key.serialize_pem()).unwrap();
    files
}

pub struct TestRelay {
    pub addr: SocketAddr,
    pub metrics: Arc<RelayMetrics>,
    pub metrics_addr: Option<SocketAddr>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), openspan_relay::RelayServeError>>,
    pub dir: tempfile::TempDir,
    pub tls: TlsFiles,
}

pub fn clusters() -> Clusters {
    let mut clusters = Clusters::default();
    for (id, secret) in [("cluster-a", SECRET_A), ("cluster-b", SECRET_B)] {
        clusters
            .insert("test", id.into(), verifier(&access_token(&secret, id)))
            .unwrap();
    }
    clusters
}

pub async fn start(limits: RelayLimits) -> TestRelay {
    start_with(limits, |_| {}).await
}

pub async fn start_with(limits: RelayLimits, adjust: impl FnOnce(&mut RelayConfig)) -> TestRelay {
    let dir = tempfile::tempdir().unwrap();
    let tls = write_cert(dir.path(), "relay");
    let mut config = RelayConfig::new("127.0.0.1:0", tls.clone());
    config.clusters = clusters();
    config.limits = limits;
    config.metrics_addr = Some("127.0.0.1:0".into());
    config.reload_interval = Duration::from_millis(100);
    adjust(&mut config);
    let relay = openspan_relay::Relay::bind(config)
        .await
        .expect("relay binds");
    let addr = relay.local_addr().unwrap();
    let metrics = relay.metrics();
    let metrics_addr = relay.metrics_addr();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(relay.run(shutdown.clone()));
    TestRelay {
        addr,
        metrics,
        metrics_addr,
        shutdown,
        task,
        dir,
        tls,
    }
}

pub fn config_for(
    addr: SocketAddr,
    ca: &Path,
    cluster: &str,
    secret: &[u8; 32],
    public_key: [u8; 32],
) -> RelayClientConfig {
    RelayClientConfig {
        address: addr.to_string(),
        server_name: Some("localhost".into()),
        ca_file: Some(ca.to_owned()),
        cluster_id: cluster.into(),
        token: access_token(secret, cluster),
        public_key,
    }
}

impl TestRelay {
    pub fn config(
        &self,
        cluster: &str,
        secret: &[u8; 32],
        public_key: [u8; 32],
    ) -> RelayClientConfig {
        config_for(
            self.addr,
            &self.tls.certificate,
            cluster,
            secret,
            public_key,
        )
    }

    pub async fn client(&self, cluster: &str, secret: &[u8; 32], n: u8) -> RelayClient {
        RelayClient::connect(&self.config(cluster, secret, key(n)))
            .await
            .unwrap_or_else(|e| panic!("client {n} of {cluster} connects: {e}"))
    }
}

/// Receives one packet or fails the test after `within`.
pub async fn recv_within(client: &RelayClient, within: Duration) -> ([u8; 32], bytes::Bytes) {
    tokio::time::timeout(within, client.recv())
        .await
        .expect("a packet arrives in time")
        .expect("the connection is up")
}

/// Waits (bounded) until `check` holds.
pub async fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GET over plain HTTP/1.0 on loopback; returns the whole response.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut out))
        .await
        .expect("HTTP answer in time")
        .unwrap();
    out
}

/// The relay binary as a child process; killed when dropped.
pub struct RelayProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub tls: TlsFiles,
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn spawn_relay_process(extra: &[&str]) -> RelayProcess {
    let dir = tempfile::tempdir().unwrap();
    let tls = write_cert(dir.path(), "relay");
    let port = free_udp_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let clusters_file: PathBuf = dir.path().join("clusters");
    let mut text = String::new();
    for (id, secret) in [("cluster-a", SECRET_A), ("cluster-b", SECRET_B)] {
        text.push_str(&format!(
            "{id} {}\n",
            hex::encode(verifier(&access_token(&secret, id)))
        ));
    }
    std::fs::write(&clusters_file, text).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_openspan-relay"))
        .arg(format!("--addr={addr}"))
        .arg(format!("--cert-file={}", tls.certificate.display()))
        .arg(format!("--key-file={}", tls.key.display()))
        .arg(format!("--clusters-file={}", clusters_file.display()))
        .arg(format!("--metrics-addr={metrics_addr}"))
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("the relay binary starts");
    RelayProcess {
        child,
        addr,
        metrics_addr,
        dir,
        tls,
    }
}

/// Connects to a relay process, retrying while it starts (bounded).
pub async fn connect_retrying(config: &RelayClientConfig) -> RelayClient {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match RelayClient::connect(config).await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the relay process never accepted a client: {e}"),
        }
    }
}
