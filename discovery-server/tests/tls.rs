//! TLS, mutual TLS and certificate reload without restart, with real handshakes on loopback.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use discovery_server::tls::TlsFiles;
use openspan_proto::discovery::server::{HelloRequest, cluster_client::ClusterClient};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// (certificate PEM, key PEM) for `names`, signed by `ca`.
fn leaf(ca: &Ca, names: &[&str]) -> (String, String) {
    let params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write_pair(dir: &Path, (cert, key): &(String, String)) {
    // Write the key first and the certificate last: the reloader may look in between.
    std::fs::write(dir.join("key.pem"), key).unwrap();
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
}

fn tls_config(dir: &Path, client_ca: Option<&Path>) -> discovery_server::server::Config {
    let mut config = test_config();
    config.tls = Some(TlsFiles {
        certificate: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        client_ca: client_ca.map(Path::to_owned),
    });
    config.tls_reload_interval = Duration::from_millis(50);
    config
}

async fn tls_hello(
    addr: std::net::SocketAddr,
    trust: &Ca,
    identity: Option<&(String, String)>,
) -> Result<(), String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&trust.pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    ClusterClient::new(channel)
        .hello(HelloRequest {
            cluster_id: "c".into(),
            client_version: "t".into(),
        })
        .await
        .map(|_| ())
        .map_err(|e| format!("hello: {e:?}"))
}

#[tokio::test]
async fn serves_grpc_over_tls_and_refuses_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let authority = ca("test ca");
    write_pair(dir.path(), &leaf(&authority, &["localhost", "127.0.0.1"]));
    let server = start(tls_config(dir.path(), None)).await;
    let addr = server.grpc_addr.unwrap();
    tls_hello(addr, &authority, None)
        .await
        .expect("TLS client is served");
    let other = ca("someone else");
    assert!(
        tls_hello(addr, &other, None).await.is_err(),
        "a client that does not trust the CA fails"
    );
    let plaintext = async {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .ok()?;
        ClusterClient::new(channel)
            .hello(HelloRequest {
                cluster_id: "c".into(),
                client_version: "t".into(),
            })
            .await
            .ok()
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(5), plaintext)
            .await
            .ok()
            .flatten()
            .is_none(),
        "plaintext is not served on a TLS port"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = ca("server ca");
    let client_ca = ca("client ca");
    write_pair(dir.path(), &leaf(&server_ca, &["localhost"]));
    std::fs::write(dir.path().join("client-ca.pem"), &client_ca.pem).unwrap();
    let server = start(tls_config(
        dir.path(),
        Some(&dir.path().join("client-ca.pem")),
    ))
    .await;
    let addr = server.grpc_addr.unwrap();
    let good = leaf(&client_ca, &["node-1"]);
    tls_hello(addr, &server_ca, Some(&good))
        .await
        .expect("a client with a CA-signed certificate is served");
    assert!(
        tls_hello(addr, &server_ca, None).await.is_err(),
        "no client certificate: refused"
    );
    let rogue = leaf(&ca("rogue"), &["node-1"]);
    assert!(
        tls_hello(addr, &server_ca, Some(&rogue)).await.is_err(),
        "a certificate from another CA: refused"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn certificates_are_reloaded_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = ca("old ca");
    write_pair(dir.path(), &leaf(&old_ca, &["localhost"]));
    let server = start(tls_config(dir.path(), None)).await;
    let addr = server.grpc_addr.unwrap();
    tls_hello(addr, &old_ca, None)
        .await
        .expect("old certificate served");

    let new_ca = ca("new ca");
    write_pair(dir.path(), &leaf(&new_ca, &["localhost"]));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tls_hello(addr, &new_ca, None).await {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => {
                panic!("the new certificate was never served: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(
        tls_hello(addr, &old_ca, None).await.is_err(),
        "the old certificate is gone"
    );

    // A broken replacement keeps the working certificate in service.
    std::fs::write(dir.path().join("cert.pem"), "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    tls_hello(addr, &new_ca, None)
        .await
        .expect("still serving the last good certificate");
    server.shutdown().await.unwrap();
}
