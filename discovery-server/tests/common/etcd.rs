//! A real etcd member on loopback for the tests (Debian's `etcd-server`).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use discovery_server::etcd::EtcdConfig;
use discovery_server::server::{Config, StoreKind};

use super::free_port;

/// One etcd member on loopback, killed (and its data removed) when dropped.
pub struct Etcd {
    child: Option<Child>,
    client_url: String,
    peer_port: u16,
    dir: tempfile::TempDir,
}

pub fn etcd_present() -> bool {
    if Command::new("etcd").arg("--version").output().is_ok() {
        return true;
    }
    if std::env::var("OPENSPAN_SKIP_ETCD_TESTS").as_deref() == Ok("1") {
        eprintln!("SKIPPED: etcd is not installed and OPENSPAN_SKIP_ETCD_TESTS=1");
        return false;
    }
    panic!(
        "these tests need etcd (apt-get install --no-install-recommends etcd-server; scripts/test.sh does), or OPENSPAN_SKIP_ETCD_TESTS=1 to skip them"
    );
}

impl Etcd {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut etcd = Self {
            child: None,
            client_url: format!("http://127.0.0.1:{}", free_port()),
            peer_port: free_port(),
            dir,
        };
        etcd.run().await;
        etcd
    }

    /// Starts (or restarts) the member on its data directory and waits until it answers.
    pub async fn run(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .arg("--name=t1")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={}", self.client_url))
            .arg(format!("--advertise-client-urls={}", self.client_url))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=t1={peer}"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(self.dir.path().join("etcd.log")).unwrap(),
            ))
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if let Ok(mut client) = etcd_client::Client::connect([&self.client_url], None).await
                && client.get("probe", None).await.is_ok()
            {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "etcd did not answer within 20 s; its log: {}",
                std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn config(&self, prefix: &str) -> EtcdConfig {
        EtcdConfig {
            endpoints: vec![self.client_url.clone()],
            prefix: prefix.into(),
            lease_bucket: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
            ..EtcdConfig::default()
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Etcd {
    /// A server configuration on loopback (as [`super::test_config`]) with its state here.
    pub fn replica_config(&self, prefix: &str) -> Config {
        Config {
            store: StoreKind::Etcd(Box::new(self.config(prefix))),
            ..super::test_config()
        }
    }
}
