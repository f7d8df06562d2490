//! A real etcd member on loopback for the tests (Debian's `etcd-server`).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use discovery_server::etcd::EtcdConfig;
use discovery_server::server::{Config, StoreKind};

use super::free_port;

/// The command of one member `name` of the cluster `initial` (name=peer-url,...), its data in
/// `dir/<name>` and its log in `dir/<name>.log`.
fn member(name: &str, dir: &std::path::Path, client: &str, peer: &str, initial: &str) -> Command {
    let mut command = Command::new("etcd");
    command
        .arg(format!("--name={name}"))
        .arg(format!("--data-dir={}", dir.join(name).display()))
        .arg(format!("--listen-client-urls={client}"))
        .arg(format!("--advertise-client-urls={client}"))
        .arg(format!("--listen-peer-urls={peer}"))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg(format!("--initial-cluster={initial}"))
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join(format!("{name}.log"))).unwrap(),
        ));
    command
}

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
        let child = member(
            "t1",
            self.dir.path(),
            &self.client_url,
            &peer,
            &format!("t1={peer}"),
        )
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
                std::fs::read_to_string(self.dir.path().join("t1.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends a signal to the member (STOP freezes it with its connections open).
    pub fn signal(&self, signal: &str) {
        super::child::signal(self.child.as_ref().expect("etcd runs").id(), signal);
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

/// A three-member etcd cluster on loopback, killed when dropped.
pub struct EtcdCluster {
    members: Vec<(String, Option<Child>)>,
    pub client_urls: Vec<String>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    pub async fn start(size: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..size).map(|i| format!("m{i}")).collect();
        let clients: Vec<String> = (0..size)
            .map(|_| format!("http://127.0.0.1:{}", free_port()))
            .collect();
        let peers: Vec<String> = (0..size)
            .map(|_| format!("http://127.0.0.1:{}", free_port()))
            .collect();
        let initial: Vec<String> = names
            .iter()
            .zip(&peers)
            .map(|(n, p)| format!("{n}={p}"))
            .collect();
        let mut members = Vec::new();
        for i in 0..size {
            let child = member(
                &names[i],
                dir.path(),
                &clients[i],
                &peers[i],
                &initial.join(","),
            )
            // Short timeouts: a new leader within about a second of a kill.
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .spawn()
            .expect("start etcd");
            members.push((names[i].clone(), Some(child)));
        }
        let cluster = Self {
            members,
            client_urls: clients,
            _dir: dir,
        };
        let started = Instant::now();
        loop {
            if let Ok(mut client) = etcd_client::Client::connect(&cluster.client_urls, None).await
                && client.put("probe", "1", None).await.is_ok()
            {
                return cluster;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the etcd cluster did not form within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The index of the current leader.
    pub async fn leader(&self) -> usize {
        for (i, url) in self.client_urls.iter().enumerate() {
            if self.members[i].1.is_none() {
                continue;
            }
            let Ok(mut client) = etcd_client::Client::connect([url], None).await else {
                continue;
            };
            if let Ok(status) = client.status().await
                && status.header().map(|h| h.member_id()) == Some(status.leader())
            {
                return i;
            }
        }
        panic!("no etcd member says it leads");
    }

    pub fn kill(&mut self, member: usize) {
        if let Some(mut child) = self.members[member].1.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn config(&self, prefix: &str) -> EtcdConfig {
        EtcdConfig {
            endpoints: self.client_urls.clone(),
            prefix: prefix.into(),
            lease_bucket: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
            ..EtcdConfig::default()
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in 0..self.members.len() {
            self.kill(member);
        }
    }
}
