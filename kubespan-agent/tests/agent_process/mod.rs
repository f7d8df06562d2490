//! Agent processes for the tests that run real `kubespan-agent` binaries: start, stop, and the
//! membership API on their unix socket.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use openspan_proto::openspan::agent::v1::{self as pb, agent_client::AgentClient};
use tonic::transport::{Channel, Endpoint, Uri};

pub struct AgentProcess {
    pub name: String,
    pub child: Option<Child>,
    pub dir: PathBuf,
}

impl AgentProcess {
    pub fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// SIGTERM: the agent deletes its record and exits.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} did not stop within 10 s of SIGTERM\n{}",
                self.name,
                self.log()
            );
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts the agent of `dir` (its `config.yaml` written by the caller), logging to
/// `dir/agent.log`.
pub fn start(dir: &Path, name: &str) -> AgentProcess {
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_kubespan-agent"))
        .arg("--config")
        .arg(dir.join("config.yaml"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start kubespan-agent");
    AgentProcess {
        name: name.into(),
        child: Some(child),
        dir: dir.to_owned(),
    }
}

pub async fn api(agent: &AgentProcess) -> AgentClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let socket = agent.socket();
    loop {
        if socket.exists() {
            let path = socket.clone();
            let connector = tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            });
            if let Ok(channel) = Endpoint::from_static("http://agent")
                .connect_with_connector(connector)
                .await
            {
                return AgentClient::new(channel);
            }
        }
        assert!(
            Instant::now() < deadline,
            "{}'s API never came up\n{}",
            agent.name,
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn member_names(agent: &AgentProcess) -> Vec<String> {
    let mut client = api(agent).await;
    client
        .list_members(pb::ListMembersRequest {})
        .await
        .unwrap()
        .into_inner()
        .members
        .into_iter()
        .map(|m| m.nodename)
        .collect()
}

/// Waits until `agent` lists exactly `expected` (sorted names); returns how long it took.
pub async fn wait_members(agent: &AgentProcess, expected: &[&str]) -> Duration {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(15);
    loop {
        let names = member_names(agent).await;
        if names == expected {
            return started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{} lists {names:?}, expected {expected:?}\n{}",
            agent.name,
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
