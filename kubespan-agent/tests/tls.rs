//! Agents against our discovery server in its TLS and mutual-TLS modes, with certificates from
//! a private CA: the extended `discovery.endpoints` form (caFile, certFile, keyFile, serverName).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod agent_process;

use agent_process::{AgentProcess as Agent, api, wait_members};
use discovery_server::server::{self, Config as ServerConfig, Running};
use discovery_server::tls::TlsFiles;
use openspan_proto::openspan::agent::v1::{self as pb};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

const SECRET: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// A private CA whose certificate is written to `<dir>/<name>.pem`.
struct Ca {
    file: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let file = dir.join(format!("{name}.pem"));
        std::fs::write(&file, params.self_signed(&key).unwrap().pem()).unwrap();
        Self {
            file,
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `names` and its key, as `<dir>/<file>.pem` and `<dir>/<file>-key.pem`.
    fn issue(&self, dir: &Path, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_file, key_file) = (
            dir.join(format!("{file}.pem")),
            dir.join(format!("{file}-key.pem")),
        );
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file, key_file)
    }
}

/// Our discovery server on a loopback port, serving `certificate`; with `client_ca` it requires
/// client certificates signed by it.
async fn tls_server(certificate: (PathBuf, PathBuf), client_ca: Option<&Path>) -> Running {
    let mut config = ServerConfig::embedded("127.0.0.1:0");
    config.tls = Some(TlsFiles {
        certificate: certificate.0,
        key: certificate.1,
        client_ca: client_ca.map(Path::to_owned),
    });
    server::start(config)
        .await
        .expect("TLS discovery server starts")
}

/// One `discovery.endpoints` entry in the extended form.
#[derive(Default)]
struct EndpointSpec<'a> {
    url: String,
    ca_file: Option<&'a Path>,
    cert_file: Option<&'a Path>,
    key_file: Option<&'a Path>,
    server_name: Option<&'a str>,
}

impl EndpointSpec<'_> {
    fn yaml(&self) -> String {
        let mut yaml = format!("    - url: {}\n", self.url);
        if let Some(ca) = self.ca_file {
            yaml += &format!("      caFile: {}\n", ca.display());
        }
        if let Some(cert) = self.cert_file {
            yaml += &format!("      certFile: {}\n", cert.display());
        }
        if let Some(key) = self.key_file {
            yaml += &format!("      keyFile: {}\n", key.display());
        }
        if let Some(name) = self.server_name {
            yaml += &format!("      serverName: {name}\n");
        }
        yaml
    }
}

fn write_config(root: &Path, name: &str, mac: &str, endpoint: &EndpointSpec<'_>) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let config = format!(
        "clusterID: tls-cluster\nclusterSecret: {SECRET}\nnodeName: {name}\n\
         macAddress: \"{mac}\"\ndiscovery:\n  endpoints:\n{endpoint}\
         stateDir: {state}\napiSocket: {socket}\nbackend: none\n",
        endpoint = endpoint.yaml(),
        state = dir.join("state").display(),
        socket = dir.join("agent.sock").display(),
    );
    std::fs::write(dir.join("config.yaml"), config).unwrap();
    dir
}

fn spawn_agent(root: &Path, name: &str, mac: &str, endpoint: &EndpointSpec<'_>) -> Agent {
    let dir = write_config(root, name, mac, endpoint);
    agent_process::start(&dir, name)
}

/// Starts node-a and node-b with `endpoint` and waits until each lists both.
async fn a_pair_that_sees_each_other(root: &Path, endpoint: &EndpointSpec<'_>) -> (Agent, Agent) {
    let a = spawn_agent(root, "node-a", "02:00:00:00:00:0a", endpoint);
    let b = spawn_agent(root, "node-b", "02:00:00:00:00:0b", endpoint);
    wait_members(&a, &["node-a", "node-b"]).await;
    wait_members(&b, &["node-a", "node-b"]).await;
    (a, b)
}

/// Waits until the agent's (only) discovery connection reports an error containing one of
/// `expected`, and checks meanwhile that it never got connected nor learnt of anybody else.
async fn wait_discovery_error(agent: &Agent, expected: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut client = api(agent).await;
    loop {
        let status = client
            .get_status(pb::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        let connection = &status.discovery[0];
        assert_ne!(
            connection.state, "connected",
            "{} connected although it should not: {status:?}",
            agent.name
        );
        assert_eq!(status.members, 1, "{status:?}");
        if expected.iter().any(|e| connection.last_error.contains(e)) {
            return connection.last_error.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{}'s discovery error never mentioned any of {expected:?}: {status:?}\n{}",
            agent.name,
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_trust_a_private_ca_from_ca_file_and_only_that() {
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new(pki.path(), "private-ca");
    let server = tls_server(ca.issue(pki.path(), "server", &["127.0.0.1"]), None).await;
    let url = format!("https://{}", server.grpc_addr.unwrap());
    let root = tempfile::tempdir().unwrap();
    let trusting = EndpointSpec {
        url: url.clone(),
        ca_file: Some(&ca.file),
        ..Default::default()
    };
    let (a, b) = a_pair_that_sees_each_other(root.path(), &trusting).await;

    // Without caFile only the system roots are trusted, which never issued this certificate.
    let plain = spawn_agent(
        root.path(),
        "node-c",
        "02:00:00:00:00:0c",
        &EndpointSpec {
            url: url.clone(),
            ..Default::default()
        },
    );
    let error = wait_discovery_error(
        &plain,
        // A host without system roots fails before the handshake.
        &[
            "invalid peer certificate: UnknownIssuer",
            "no native certs found",
        ],
    )
    .await;
    eprintln!("without caFile: {error}");
    // With another CA's file, the system roots are not consulted either and the issuer is unknown.
    let other_ca = Ca::new(pki.path(), "other-ca");
    let wrong = spawn_agent(
        root.path(),
        "node-d",
        "02:00:00:00:00:0d",
        &EndpointSpec {
            url,
            ca_file: Some(&other_ca.file),
            ..Default::default()
        },
    );
    let error = wait_discovery_error(&wrong, &["invalid peer certificate: UnknownIssuer"]).await;
    eprintln!("with another CA: {error}");
    drop((a, b, plain, wrong));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_the_client_certificate() {
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new(pki.path(), "server-ca");
    let client_ca = Ca::new(pki.path(), "client-ca");
    let server = tls_server(
        ca.issue(pki.path(), "server", &["127.0.0.1"]),
        Some(&client_ca.file),
    )
    .await;
    let url = format!("https://{}", server.grpc_addr.unwrap());
    let root = tempfile::tempdir().unwrap();
    let identity_a = client_ca.issue(pki.path(), "client-a", &["node-a"]);
    let identity_b = client_ca.issue(pki.path(), "client-b", &["node-b"]);
    let a = spawn_agent(
        root.path(),
        "node-a",
        "02:00:00:00:00:0a",
        &EndpointSpec {
            url: url.clone(),
            ca_file: Some(&ca.file),
            cert_file: Some(&identity_a.0),
            key_file: Some(&identity_a.1),
            ..Default::default()
        },
    );
    let b = spawn_agent(
        root.path(),
        "node-b",
        "02:00:00:00:00:0b",
        &EndpointSpec {
            url: url.clone(),
            ca_file: Some(&ca.file),
            cert_file: Some(&identity_b.0),
            key_file: Some(&identity_b.1),
            ..Default::default()
        },
    );
    wait_members(&a, &["node-a", "node-b"]).await;
    wait_members(&b, &["node-a", "node-b"]).await;

    // The server refuses a client without a certificate, and one whose certificate another CA
    // signed.
    let anonymous = spawn_agent(
        root.path(),
        "node-c",
        "02:00:00:00:00:0c",
        &EndpointSpec {
            url: url.clone(),
            ca_file: Some(&ca.file),
            ..Default::default()
        },
    );
    let error = wait_discovery_error(&anonymous, &["Hello failed"]).await;
    eprintln!("without a client certificate: {error}");
    let rogue_identity = Ca::new(pki.path(), "rogue-ca").issue(pki.path(), "rogue", &["node-d"]);
    let rogue = spawn_agent(
        root.path(),
        "node-d",
        "02:00:00:00:00:0d",
        &EndpointSpec {
            url,
            ca_file: Some(&ca.file),
            cert_file: Some(&rogue_identity.0),
            key_file: Some(&rogue_identity.1),
            ..Default::default()
        },
    );
    let error = wait_discovery_error(&rogue, &["Hello failed"]).await;
    eprintln!("with a certificate of another CA: {error}");
    wait_members(&a, &["node-a", "node-b"]).await;
    drop((a, b, anonymous, rogue));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_name_verifies_a_certificate_for_another_name_than_the_url_host() {
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new(pki.path(), "private-ca");
    // The certificate names discovery.test only; the agents dial 127.0.0.1.
    let server = tls_server(ca.issue(pki.path(), "server", &["discovery.test"]), None).await;
    let url = format!("https://{}", server.grpc_addr.unwrap());
    let root = tempfile::tempdir().unwrap();
    let named = EndpointSpec {
        url: url.clone(),
        ca_file: Some(&ca.file),
        server_name: Some("discovery.test"),
        ..Default::default()
    };
    let (a, b) = a_pair_that_sees_each_other(root.path(), &named).await;

    let unnamed = spawn_agent(
        root.path(),
        "node-c",
        "02:00:00:00:00:0c",
        &EndpointSpec {
            url,
            ca_file: Some(&ca.file),
            ..Default::default()
        },
    );
    let error = wait_discovery_error(
        &unnamed,
        &["invalid peer certificate: certificate not valid for name \"127.0.0.1\""],
    )
    .await;
    eprintln!("without serverName: {error}");
    drop((a, b, unnamed));
    server.shutdown().await.unwrap();
}

/// Runs the agent on a configuration that must be refused; returns its stderr.
fn refused_config(root: &Path, name: &str, endpoint: &EndpointSpec<'_>) -> String {
    let dir = write_config(root, name, "02:00:00:00:00:0a", endpoint);
    let output = Command::new(env!("CARGO_BIN_EXE_kubespan-agent"))
        .arg("--config")
        .arg(dir.join("config.yaml"))
        .output()
        .expect("run kubespan-agent");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "the agent started on a bad TLS configuration: {stderr}"
    );
    assert!(
        !dir.join("agent.sock").exists(),
        "the agent got as far as its API: {stderr}"
    );
    stderr
}

#[test]
fn bad_tls_files_stop_the_agent_at_start_naming_the_key_and_the_file() {
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new(pki.path(), "private-ca");
    let identity = ca.issue(pki.path(), "client", &["node-a"]);
    let root = tempfile::tempdir().unwrap();

    let mut spec = EndpointSpec {
        url: "https://127.0.0.1:1".into(),
        ca_file: Some(&ca.file),
        cert_file: Some(&identity.0),
        ..Default::default()
    };
    let stderr = refused_config(root.path(), "cert-only", &spec);
    assert!(
        stderr.contains("discovery.endpoints[0].keyFile`: is required with certFile"),
        "{stderr}"
    );

    let missing = pki.path().join("missing-ca.pem");
    spec.cert_file = None;
    spec.ca_file = Some(&missing);
    let stderr = refused_config(root.path(), "missing-ca", &spec);
    assert!(
        stderr.contains(&format!(
            "discovery.endpoints[0]`: caFile {}: cannot read it",
            missing.display()
        )),
        "{stderr}"
    );

    // A key that belongs to another certificate.
    let other = ca.issue(pki.path(), "other", &["node-b"]);
    spec.ca_file = Some(&ca.file);
    spec.cert_file = Some(&identity.0);
    spec.key_file = Some(&other.1);
    let stderr = refused_config(root.path(), "mismatch", &spec);
    assert!(
        stderr.contains(&format!(
            "certFile {} and keyFile {} do not go together",
            identity.0.display(),
            other.1.display()
        )),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_keeps_the_private_ca_and_client_certificate() {
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new(pki.path(), "private-ca");
    let client_ca = Ca::new(pki.path(), "client-ca");
    let target = tls_server(
        ca.issue(pki.path(), "target", &["127.0.0.1"]),
        Some(&client_ca.file),
    )
    .await;
    let target_addr = target.grpc_addr.unwrap().to_string();
    let (cert, key) = ca.issue(pki.path(), "redirector", &["127.0.0.1"]);
    let mut config = ServerConfig::embedded("127.0.0.1:0");
    config.tls = Some(TlsFiles {
        certificate: cert,
        key,
        client_ca: Some(client_ca.file.clone()),
    });
    config.redirect_endpoint = Some(target_addr.clone());
    let redirector = server::start(config).await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let identity_a = client_ca.issue(pki.path(), "client-a", &["node-a"]);
    let identity_b = client_ca.issue(pki.path(), "client-b", &["node-b"]);
    // node-a is sent on to the target, which only a client that still trusts the private CA and
    // still presents its certificate can reach; node-b talks to the target directly.
    let a = spawn_agent(
        root.path(),
        "node-a",
        "02:00:00:00:00:0a",
        &EndpointSpec {
            url: format!("https://{}", redirector.grpc_addr.unwrap()),
            ca_file: Some(&ca.file),
            cert_file: Some(&identity_a.0),
            key_file: Some(&identity_a.1),
            ..Default::default()
        },
    );
    let b = spawn_agent(
        root.path(),
        "node-b",
        "02:00:00:00:00:0b",
        &EndpointSpec {
            url: format!("https://{target_addr}"),
            ca_file: Some(&ca.file),
            cert_file: Some(&identity_b.0),
            key_file: Some(&identity_b.1),
            ..Default::default()
        },
    );
    wait_members(&a, &["node-a", "node-b"]).await;
    wait_members(&b, &["node-a", "node-b"]).await;
    assert!(a.log().contains("redirected"), "{}", a.log());
    drop((a, b));
    redirector.shutdown().await.unwrap();
    target.shutdown().await.unwrap();
}
