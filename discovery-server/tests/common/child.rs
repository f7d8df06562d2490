//! The discovery-server binary as a child process on loopback: its memory can be read from
//! /proc, and it can be frozen (SIGSTOP) or killed like a real server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::{Client, free_port, http_get};

/// Sends `signal` (e.g. "STOP", "CONT") to a process.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// A discovery-server child process, killed when dropped. Its log is `log`.
pub struct ChildServer {
    pub child: Child,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ChildServer {
    /// Starts it with gRPC and metrics on free loopback ports, no landing page, no snapshots,
    /// and `extra` flags; waits until it listens.
    pub async fn start(extra: &[&str]) -> Self {
        let (grpc, metrics) = (
            SocketAddr::from(([127, 0, 0, 1], free_port())),
            SocketAddr::from(([127, 0, 0, 1], free_port())),
        );
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("server.log");
        let child = Command::new(env!("CARGO_BIN_EXE_discovery-server"))
            .arg(format!("--addr={grpc}"))
            .arg("--landing-addr=")
            .arg(format!("--metrics-addr={metrics}"))
            .arg("--snapshots-enabled=false")
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the discovery-server binary");
        let server = Self {
            child,
            grpc,
            metrics,
            log,
            _dir: dir,
        };
        let started = Instant::now();
        while TcpStream::connect(grpc).await.is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "child server did not listen within 20 s; its log: {}",
                std::fs::read_to_string(&server.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    pub fn signal(&self, name: &str) {
        signal(self.child.id(), name);
    }

    /// A field of /proc/<pid>/status in KiB (e.g. "VmHWM:").
    pub fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read the child's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} missing from /proc status"))
    }

    /// The value of the first metrics line starting with `line_prefix` (0 when absent).
    pub async fn metric(&self, line_prefix: &str) -> u64 {
        let (_, body) = http_get(self.metrics, "/metrics").await;
        body.lines()
            .find_map(|l| l.strip_prefix(line_prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }

    pub async fn client(&self) -> Client {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        openspan_proto::discovery::server::cluster_client::ClusterClient::new(channel)
            .max_decoding_message_size(64 << 20)
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
