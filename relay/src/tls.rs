//! TLS for QUIC: a server certificate that is reloaded when its files change (a rustls
//! [`ResolvesServerCert`] backed by an [`ArcSwap`], so new connections see the new certificate
//! while open ones keep theirs), and the client's trust roots.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what} {path} holds no usable PEM {expected}: {detail}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
        detail: String,
    },
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

/// Certificate chain and private key files (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

type Stamp = [Option<(SystemTime, u64)>; 2];

/// The relay's certificate, replaced in place when the files change.
#[derive(Debug)]
pub struct ReloadingCert {
    files: TlsFiles,
    current: ArcSwap<CertifiedKey>,
    stamp: Mutex<Stamp>,
}

impl ReloadingCert {
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let stamp = stamp(&files);
        let key = load_certified_key(&files)?;
        Ok(Self {
            files,
            current: ArcSwap::from_pointee(key),
            stamp: Mutex::new(stamp),
        })
    }

    /// Reloads when a file's modification time or size changed. A broken new pair keeps the
    /// old one in service; it is retried on the next check (the stamp is not updated).
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let current = stamp(&self.files);
        let mut last = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if *last == current {
            return Ok(false);
        }
        let key = load_certified_key(&self.files)?;
        self.current.store(Arc::new(key));
        *last = current;
        Ok(true)
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn stamp(files: &TlsFiles) -> Stamp {
    [&files.certificate, &files.key].map(|p| file_stamp(p))
}

/// A file's modification time and size, to notice a replaced file (`None`: unreadable).
/// Shared with the discovery server's reloading TLS.
pub fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    fs::metadata(path)
        .ok()
        .and_then(|m| Some((m.modified().ok()?, m.len())))
}

/// A file's bytes, or an error naming it as `what`.
pub fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in a PEM file; at least one.
pub fn certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |detail: String| TlsError::Pem {
        what,
        path: path.to_owned(),
        expected: "certificate",
        detail,
    };
    let bytes = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The private key in a PEM file.
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let key_bytes = read("key", path)?;
    PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| TlsError::Pem {
        what: "key",
        path: path.to_owned(),
        expected: "private key",
        detail: e.to_string(),
    })
}

fn load_certified_key(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    let chain = certificates("certificate", &files.certificate)?;
    let key = private_key(&files.key)?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        TlsError::Config(format!(
            "certificate {} and key {} do not form a usable pair: {e}",
            files.certificate.display(),
            files.key.display()
        ))
    })
}

/// The relay's rustls configuration: TLS 1.3 (QUIC needs it), the reloading certificate, ALPN
/// `openspan-relay/1`.
pub fn server_config(cert: Arc<ReloadingCert>) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![crate::protocol::ALPN.to_vec()];
    Ok(config)
}

/// A client's rustls configuration. With `ca_file`, only certificates it signed (or the
/// certificate itself, for a self-signed relay: pinning) are trusted; without it, the system's
/// trust store.
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in certificates("relay CA", path)? {
                roots
                    .add(cert)
                    .map_err(|e| TlsError::Config(format!("relay CA {}: {e}", path.display())))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsError::Config(
                    "no relay CA file given and no usable system trust roots found".into(),
                ));
            }
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![crate::protocol::ALPN.to_vec()];
    Ok(config)
}
