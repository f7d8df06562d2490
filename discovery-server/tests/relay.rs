//! The relay embedded in the discovery server (`--relay-addr`): clients register and exchange
//! packets, and the relay's metrics appear on the server's `/metrics`.

use std::time::Duration;

use discovery_server::server::{self, Config};
use openspan_relay::client::{RelayClient, RelayClientConfig};
use openspan_relay::tls::TlsFiles;
use openspan_relay::{RelayConfig, access_token, verifier};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_relay_forwards_and_reports_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let tls = TlsFiles {
        certificate: dir.path().join("relay.crt"),
        key: dir.path().join("relay.key"),
    };
    std::fs::write(&tls.certificate, cert.pem()).unwrap();
    std::fs::write(&tls.key, signing_key.serialize_pem()).unwrap();
    let secret = [5u8; 32];
    let token = access_token(&secret, "c1");
    // The clusters file, as an operator would write it.
    let clusters = dir.path().join("clusters");
    std::fs::write(
        &clusters,
        format!("# id verifier\nc1 {}\n", hex::encode(verifier(&token))),
    )
    .unwrap();
    let mut relay = RelayConfig::new("127.0.0.1:0", tls.clone());
    relay.clusters_file = Some(clusters);
    let config = Config {
        metrics_addr: Some("127.0.0.1:0".into()),
        relay: Some(relay),
        ..Config::embedded("127.0.0.1:0")
    };
    let running = server::start(config).await.unwrap();
    let relay_addr = running.relay_addr.expect("the relay runs");

    let client = |n: u8| RelayClientConfig {
        address: relay_addr.to_string(),
        server_name: Some("localhost".into()),
        ca_file: Some(tls.certificate.clone()),
        cluster_id: "c1".into(),
        token,
        public_key: [n; 32],
    };
    let a = RelayClient::connect(&client(1)).await.unwrap();
    let b = RelayClient::connect(&client(2)).await.unwrap();
    a.send(&[2; 32], b"through the discovery server").unwrap();
    let (from, packet) = tokio::time::timeout(Duration::from_secs(5), b.recv())
        .await
        .expect("in time")
        .unwrap();
    assert_eq!(
        (from, &packet[..]),
        ([1; 32], &b"through the discovery server"[..])
    );

    let mut http = tokio::net::TcpStream::connect(running.metrics_addr.unwrap())
        .await
        .unwrap();
    http.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    http.read_to_string(&mut text).await.unwrap();
    assert!(text.contains("relay_registrations 2"), "{text}");
    assert!(text.contains("discovery_clusters"), "{text}");
    assert_eq!(text.matches("# EOF").count(), 1, "{text}");

    running.shutdown().await.unwrap();
    // Seen within 10 s (was 3 s): well inside the 30 s idle timeout that would end it otherwise.
    let closed = tokio::time::timeout(Duration::from_secs(10), a.recv()).await;
    assert!(
        matches!(closed, Ok(Err(_))),
        "clients see the shutdown: {closed:?}"
    );
}
