//! Shared helpers: an in-process server on loopback ports and real gRPC clients.
#![allow(dead_code)]

pub mod child;
pub mod etcd;
pub mod raw;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use discovery_server::clock::{Clock, ManualClock};
use discovery_server::server::{self, Config, Running};
use openspan_proto::discovery::server::{
    AffiliateUpdateRequest, ListRequest, WatchRequest, WatchResponse, cluster_client::ClusterClient,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};

pub type Client = ClusterClient<Channel>;

/// Loopback only, no HTTP pages, no snapshots, no rate limit unless a test asks for them.
pub fn test_config() -> Config {
    Config::embedded("127.0.0.1:0")
}

pub async fn start(config: Config) -> Running {
    server::start(config).await.expect("server starts")
}

/// A server whose clock only moves when the test says so.
pub async fn start_with_manual_clock(config: Config) -> (Running, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let running = server::start_with_clock(config, clock.clone() as Arc<dyn Clock>)
        .await
        .expect("server starts");
    (running, clock)
}

pub async fn client(running: &Running) -> Client {
    let addr = running.grpc_addr.expect("gRPC listener");
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    ClusterClient::new(channel).max_decoding_message_size(64 << 20)
}

pub fn update(
    cluster: &str,
    affiliate: &str,
    data: Option<&[u8]>,
    endpoints: &[&[u8]],
) -> AffiliateUpdateRequest {
    AffiliateUpdateRequest {
        cluster_id: cluster.into(),
        affiliate_id: affiliate.into(),
        affiliate_data: data.map(Bytes::copy_from_slice),
        affiliate_endpoints: endpoints
            .iter()
            .map(|e| Bytes::copy_from_slice(e))
            .collect(),
        ttl: Some(prost_types::Duration {
            seconds: 600,
            nanos: 0,
        }),
    }
}

pub async fn list(
    client: &mut Client,
    cluster: &str,
) -> Vec<openspan_proto::discovery::server::Affiliate> {
    client
        .list(ListRequest {
            cluster_id: cluster.into(),
        })
        .await
        .expect("list")
        .into_inner()
        .affiliates
}

pub async fn watch(client: &mut Client, cluster: &str) -> tonic::Streaming<WatchResponse> {
    client
        .watch(WatchRequest {
            cluster_id: cluster.into(),
        })
        .await
        .expect("watch")
        .into_inner()
}

/// The next watch message, failing the test if none arrives within 5 s.
pub async fn next(stream: &mut tonic::Streaming<WatchResponse>) -> WatchResponse {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a watch message within 5 s")
        .expect("stream healthy")
        .expect("stream still open")
}

/// Asserts that no watch message arrives within `wait`.
pub async fn assert_quiet(stream: &mut tonic::Streaming<WatchResponse>, wait: Duration) {
    if let Ok(message) = tokio::time::timeout(wait, stream.message()).await {
        panic!("expected no watch message, got {message:?}");
    }
}

/// A plain HTTP/1.1 GET over TCP: (status code, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect http");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A loopback port free at the time of asking, for servers started as child processes.
///
/// Never the same port twice in one test process: the kernel may hand a port that was just
/// released straight back, so two calls in a row (gRPC and metrics, an etcd's client and peer
/// ports) or two tests in parallel could be given one port and a child would fail to bind.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}
