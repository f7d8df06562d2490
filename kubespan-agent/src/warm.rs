//! The warm-start cache: the last known members, kept in `stateDir` so that a node rebooting
//! while no discovery service answers still configures its peers at once.
//!
//! File format (`members.cache`): one version byte, a 24-byte random nonce, then the
//! XChaCha20-Poly1305 sealing (key: [`ClusterKeys::state_file_key`], additional data: the
//! format name and the cluster id) of a JSON list of entries `{expires_unix_ms, record, endpoints}`
//! where `record` is the base64 plaintext `sidero.discovery.client.Affiliate` and `endpoints` are
//! `ip:port` strings. Written to a temporary file (mode 0600), fsynced, renamed, directory
//! fsynced. Entries expire with their records' TTLs (wall clock: the file outlives the process).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::crypto::ClusterKeys;
use crate::model::AffiliateRecord;
use crate::record;

pub const FILE_NAME: &str = "members.cache";
const VERSION: u8 = 1;
const NONCE_LEN: usize = 24;
const AAD_PREFIX: &[u8] = b"openspan warm-start cache v1 ";
/// A cache larger than this is not read (1,024 members of a few KiB fit many times over).
pub const MAX_FILE_SIZE: u64 = 32 << 20;

#[derive(Debug, Error)]
pub enum WarmError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is {size} bytes, over the {MAX_FILE_SIZE}-byte limit; it is ignored (delete it)"
    )]
    TooLarge { path: PathBuf, size: u64 },
    #[error(
        "{path} does not open with this cluster's keys (another clusterSecret or clusterID, or a damaged file); it is ignored and rewritten"
    )]
    Unreadable { path: PathBuf },
}

#[derive(Serialize, Deserialize)]
struct Entry {
    expires_unix_ms: i64,
    record: String,
    endpoints: Vec<String>,
}

fn aad(cluster_id: &str) -> Vec<u8> {
    [AAD_PREFIX, cluster_id.as_bytes()].concat()
}

/// Seals `members` (record, expiry in unix ms) for `cluster_id`.
pub fn seal(keys: &ClusterKeys, cluster_id: &str, members: &[(AffiliateRecord, i64)]) -> Vec<u8> {
    let entries: Vec<Entry> = members
        .iter()
        .map(|(record, expires)| Entry {
            expires_unix_ms: *expires,
            record: base64::engine::general_purpose::STANDARD.encode(record::encode(record)),
            endpoints: record.endpoints.iter().map(|e| e.to_string()).collect(),
        })
        .collect();
    let plaintext = serde_json::to_vec(&entries).unwrap_or_default();
    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    let aad = aad(cluster_id);
    let sealed = XChaCha20Poly1305::new(&keys.state_file_key().into())
        .encrypt(
            &nonce.into(),
            Payload {
                msg: &plaintext,
                aad: &aad,
            },
        )
        .expect("XChaCha20-Poly1305 plaintext within its 256 GiB limit");
    let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
    out.push(VERSION);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

/// Opens a sealed cache; `None` when it does not open or parse. Expired entries (at
/// `now_unix_ms`) and entries that do not decode are left out.
pub fn open(
    keys: &ClusterKeys,
    cluster_id: &str,
    bytes: &[u8],
    now_unix_ms: i64,
) -> Option<Vec<(AffiliateRecord, i64)>> {
    if bytes.len() < 1 + NONCE_LEN || bytes[0] != VERSION {
        return None;
    }
    let (nonce, sealed) = bytes[1..].split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
    let aad = aad(cluster_id);
    let plaintext = XChaCha20Poly1305::new(&keys.state_file_key().into())
        .decrypt(
            &nonce.into(),
            Payload {
                msg: sealed,
                aad: &aad,
            },
        )
        .ok()?;
    let entries: Vec<Entry> = serde_json::from_slice(&plaintext).ok()?;
    Some(
        entries
            .into_iter()
            .filter(|e| e.expires_unix_ms > now_unix_ms)
            .filter_map(|e| {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(&e.record)
                    .ok()?;
                let mut record = record::decode(&bytes).ok()?;
                if record.node_id.is_empty() {
                    return None;
                }
                record.endpoints = e.endpoints.iter().filter_map(|s| s.parse().ok()).collect();
                Some((record, e.expires_unix_ms))
            })
            .collect(),
    )
}

/// Reads the cache in `state_dir`; a missing file is an empty cache.
pub fn load(
    keys: &ClusterKeys,
    cluster_id: &str,
    state_dir: &Path,
    now_unix_ms: i64,
) -> Result<Vec<(AffiliateRecord, i64)>, WarmError> {
    let path = state_dir.join(FILE_NAME);
    let io = |action, source| WarmError::Io {
        action,
        path: path.clone(),
        source,
    };
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("open", e)),
    };
    let size = file.metadata().map_err(|e| io("read", e))?.len();
    if size > MAX_FILE_SIZE {
        return Err(WarmError::TooLarge { path, size });
    }
    let bytes = fs::read(&path).map_err(|e| io("read", e))?;
    open(keys, cluster_id, &bytes, now_unix_ms).ok_or(WarmError::Unreadable { path })
}

/// Writes the cache atomically (temporary file, fsync, rename, directory fsync), mode 0600.
pub fn save(state_dir: &Path, sealed: &[u8]) -> Result<(), WarmError> {
    let path = state_dir.join(FILE_NAME);
    let tmp = state_dir.join(format!("{FILE_NAME}.tmp"));
    let io = |action, source| WarmError::Io {
        action,
        path: tmp.clone(),
        source,
    };
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io("create", e))?;
    if let Err(e) = file.write_all(sealed).and_then(|()| file.sync_all()) {
        drop(file);
        let _ = fs::remove_file(&tmp);
        return Err(io("write", e));
    }
    drop(file);
    fs::rename(&tmp, &path).map_err(|e| io("rename", e))?;
    if let Ok(dir) = File::open(state_dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Cipher;
    use crate::model::KubeSpanInfo;
    use std::os::unix::fs::PermissionsExt;

    fn member(id: &str) -> AffiliateRecord {
        AffiliateRecord {
            node_id: id.into(),
            nodename: format!("name-{id}"),
            addresses: vec!["10.0.0.2".parse().unwrap()],
            kubespan: Some(KubeSpanInfo {
                public_key: "Oak2fBEWngBhwslBxDVgnRNHXs88OAp4kjroSX0uqUE=".into(),
                address: "fd00::2".parse().unwrap(),
                additional_addresses: vec!["10.244.1.0/24".parse().unwrap()],
                exclude_advertised_networks: vec![],
                learned_endpoints: Vec::new(),
                relays: Vec::new(),
                sealed_psk: None,
            }),
            endpoints: vec!["10.0.0.2:51820".parse().unwrap()],
            ..AffiliateRecord::default()
        }
    }

    #[test]
    fn round_trips_expires_and_refuses_other_keys() {
        for cipher in [Cipher::Talos, Cipher::Native] {
            let keys = ClusterKeys::new(cipher, "c1", &[7; 32]);
            let sealed = seal(&keys, "c1", &[(member("a"), 2_000), (member("b"), 1_000)]);
            assert_eq!(
                open(&keys, "c1", &sealed, 1_500).unwrap(),
                vec![(member("a"), 2_000)],
                "b expired"
            );
            let other_secret = ClusterKeys::new(cipher, "c1", &[8; 32]);
            assert!(open(&other_secret, "c1", &sealed, 0).is_none());
            let other_cluster = ClusterKeys::new(cipher, "c2", &[7; 32]);
            assert!(open(&other_cluster, "c2", &sealed, 0).is_none());
            assert!(
                open(&keys, "c2", &sealed, 0).is_none(),
                "bound to the cluster id"
            );
            let mut flipped = sealed.clone();
            *flipped.last_mut().unwrap() ^= 1;
            assert!(open(&keys, "c1", &flipped, 0).is_none());
            assert!(open(&keys, "c1", &sealed[..10], 0).is_none());
        }
    }

    #[test]
    fn saved_atomically_with_mode_0600_and_bounded_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let keys = ClusterKeys::new(Cipher::Native, "c1", &[7; 32]);
        assert!(
            load(&keys, "c1", dir.path(), 0).unwrap().is_empty(),
            "no file: empty"
        );
        save(dir.path(), &seal(&keys, "c1", &[(member("a"), i64::MAX)])).unwrap();
        let path = dir.path().join(FILE_NAME);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load(&keys, "c1", dir.path(), 0).unwrap().len(), 1);
        assert!(!dir.path().join(format!("{FILE_NAME}.tmp")).exists());
        // A leftover temporary file of a killed write does not stop the next save.
        fs::write(dir.path().join(format!("{FILE_NAME}.tmp")), b"partial").unwrap();
        save(dir.path(), &seal(&keys, "c1", &[])).unwrap();
        assert!(load(&keys, "c1", dir.path(), 0).unwrap().is_empty());
        fs::write(&path, b"garbage").unwrap();
        assert!(matches!(
            load(&keys, "c1", dir.path(), 0),
            Err(WarmError::Unreadable { .. })
        ));
        let big = File::create(&path).unwrap();
        big.set_len(MAX_FILE_SIZE + 1).unwrap();
        assert!(matches!(
            load(&keys, "c1", dir.path(), 0),
            Err(WarmError::TooLarge { .. })
        ));
    }
}
