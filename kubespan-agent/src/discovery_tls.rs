//! The TLS settings of a discovery connection: which CA to trust, which client certificate to
//! present (mutual TLS), which server name to verify.
//!
//! [`client_tls`] reads and checks the PEM files. The configuration calls it once at start, so a
//! wrong path or a broken file is a startup error; the discovery client calls it again for every
//! connection, so certificates rotated on disk (e.g. short-lived client certificates renewed by
//! cert-manager) are picked up at the next reconnect without restarting the agent.

use std::path::{Path, PathBuf};

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use thiserror::Error;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::config::DiscoveryEndpoint;

#[derive(Debug, Error)]
pub enum TlsSetupError {
    #[error(
        "{key} {path}: cannot read it: {source}; check the path and that the agent may read the file"
    )]
    Read {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{key} {path}: {problem}; it must hold PEM certificates (-----BEGIN CERTIFICATE-----)")]
    Certificates {
        key: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error(
        "keyFile {path}: {problem}; it must hold one PEM private key (PKCS#8, RSA or EC), \
         unencrypted"
    )]
    Key { path: PathBuf, problem: String },
    #[error(
        "certFile {cert} and keyFile {key} do not go together: {problem}; point both at the same \
         client certificate's files"
    )]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        problem: String,
    },
}

/// The TLS client settings for `endpoint`, with its files read and checked.
///
/// With `caFile`, only that CA is trusted: a private deployment should not also accept any
/// certificate a public CA issues for the name. Without it, the system roots are trusted, as the
/// Talos discovery client does.
pub fn client_tls(endpoint: &DiscoveryEndpoint) -> Result<ClientTlsConfig, TlsSetupError> {
    let options = &endpoint.tls;
    let server_name = options
        .server_name
        .clone()
        .unwrap_or_else(|| endpoint.host.clone());
    let mut tls = ClientTlsConfig::new().domain_name(server_name);
    match &options.ca_file {
        Some(path) => {
            let pem = read("caFile", path)?;
            let mut roots = RootCertStore::empty();
            for (n, cert) in certificates("caFile", path, &pem)?.into_iter().enumerate() {
                // tonic skips certificates it cannot use as a root without a word, which would
                // leave an empty trust store and an "unknown issuer" at every handshake.
                roots.add(cert).map_err(|e| TlsSetupError::Certificates {
                    key: "caFile",
                    path: path.clone(),
                    problem: format!("certificate #{} is not a usable CA: {e}", n + 1),
                })?;
            }
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        None => tls = tls.with_native_roots(),
    }
    if let Some(identity) = &options.client_identity {
        let cert_pem = read("certFile", &identity.cert_file)?;
        let chain = certificates("certFile", &identity.cert_file, &cert_pem)?;
        let key_pem = read("keyFile", &identity.key_file)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsSetupError::Key {
            path: identity.key_file.clone(),
            problem: match e {
                rustls::pki_types::pem::Error::NoItemsFound => "no private key found".into(),
                other => other.to_string(),
            },
        })?;
        // The same check rustls makes when tonic builds the connector, done here so that a key
        // of another certificate is reported with both file names.
        let provider = rustls::crypto::ring::default_provider();
        CertifiedKey::from_der(chain, key, &provider).map_err(|e| TlsSetupError::Mismatch {
            cert: identity.cert_file.clone(),
            key: identity.key_file.clone(),
            problem: match e {
                rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                    "the key does not belong to the first certificate of certFile".into()
                }
                other => other.to_string(),
            },
        })?;
        tls = tls.identity(Identity::from_pem(cert_pem, key_pem));
    }
    Ok(tls)
}

/// PEM certificates and keys are a few kilobytes; a CA bundle is under a megabyte.
const MAX_PEM_FILE: u64 = 4 << 20;

/// Reads a PEM file: a regular file of at most [`MAX_PEM_FILE`] bytes. The paths may come from
/// `kubespanctl diff` (text the caller sends), so a device (`/dev/zero`) or a FIFO must neither
/// exhaust memory nor block the agent.
fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    let error = |source| TlsSetupError::Read {
        key,
        path: path.to_owned(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(error)?;
    if !metadata.is_file() {
        return Err(error(std::io::Error::other("not a regular file")));
    }
    if metadata.len() > MAX_PEM_FILE {
        return Err(error(std::io::Error::other(format!(
            "{} bytes, more than a PEM file of {} MiB",
            metadata.len(),
            MAX_PEM_FILE >> 20
        ))));
    }
    std::fs::read(path).map_err(error)
}

fn certificates(
    key: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let error = |problem: String| TlsSetupError::Certificates {
        key,
        path: path.to_owned(),
        problem,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(format!("broken PEM: {e}")))?;
    if certs.is_empty() {
        return Err(error("no certificate found".into()));
    }
    Ok(certs)
}

/// `error` and its sources, joined with ": ".
///
/// tonic's connection errors display as a bare "transport error"; the cause that tells an
/// operator what to fix (an unknown issuer, a name the certificate does not cover, a client
/// certificate the server wants) is in the source chain.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    with_sources(error.to_string(), error.source())
}

/// A failed call's message and the transport errors behind it, like [`error_chain`].
pub fn status_chain(status: &tonic::Status) -> String {
    with_sources(
        status.message().to_owned(),
        std::error::Error::source(status),
    )
}

fn with_sources(
    mut text: String,
    mut source: Option<&(dyn std::error::Error + 'static)>,
) -> String {
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some layers repeat their source's message in their own.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `kubespanctl diff` sends configuration text whose file paths the agent reads: a device or
    /// an oversized file is refused, not read.
    #[test]
    fn pem_files_must_be_small_regular_files() {
        let error = read("caFile", Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("not a regular file"), "{error}");
        let dir = std::env::temp_dir().join(format!("openspan-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("big.pem");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_PEM_FILE + 1)
            .unwrap();
        let error = read("caFile", &big).unwrap_err().to_string();
        assert!(error.contains("more than a PEM file"), "{error}");
        let small = dir.join("small.pem");
        std::fs::write(&small, "pem").unwrap();
        assert_eq!(read("caFile", &small).unwrap(), b"pem");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
