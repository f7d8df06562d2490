//! TLS for the gRPC listener: rustls with certificates that are reloaded when their files change,
//! and optional verification of client certificates against a CA (mTLS).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use tokio_rustls::TlsAcceptor;

#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub certificate: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

/// The same errors as the embedded relay's TLS, whose PEM helpers this module uses.
pub use openspan_relay::tls::TlsError;
use openspan_relay::tls::{certificates, file_stamp, private_key};

type Stamp = Vec<Option<(SystemTime, u64)>>;

/// The current server TLS configuration, replaced in place when the files change.
pub struct ReloadingTls {
    files: TlsFiles,
    config: ArcSwap<ServerConfig>,
    stamp: Mutex<Stamp>,
}

impl ReloadingTls {
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let stamp = stamp(&files);
        let config = build_config(&files)?;
        Ok(Self {
            files,
            config: ArcSwap::from_pointee(config),
            stamp: Mutex::new(stamp),
        })
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.load_full())
    }

    /// Reloads when any file's modification time or size changed. A broken new file keeps the
    /// old configuration in service (and is retried on the next check).
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let current = stamp(&self.files);
        let mut last = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if *last == current {
            return Ok(false);
        }
        let config = build_config(&self.files)?;
        self.config.store(Arc::new(config));
        *last = current;
        Ok(true)
    }
}

fn stamp(files: &TlsFiles) -> Stamp {
    [
        Some(&files.certificate),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| file_stamp(p))
    .collect()
}

fn build_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let chain = certificates("certificate", &files.certificate)?;
    let key = private_key(&files.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("client CA", ca)? {
                roots
                    .add(cert)
                    .map_err(|e| TlsError::Config(format!("client CA {}: {e}", ca.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        TlsError::Config(format!(
            "certificate and key do not form a usable pair: {e}"
        ))
    })?;
    // gRPC clients (grpc-go in particular) insist on negotiating HTTP/2 through ALPN.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
