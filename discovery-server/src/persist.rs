//! Snapshot files of the embedded store.
//!
//! Layout: magic `OSPNSNAP`, format version (u32 BE), payload length (u64 BE), CRC-32 of the
//! payload (u32 BE), then the payload: a protobuf `openspan.discovery.snapshot.v1.Snapshot`.
//! The checksum makes a torn or corrupted file fail loudly instead of loading half a state.
//!
//! Writes are atomic: a temporary file in the same directory is written, fsynced and renamed over
//! the old snapshot, then the directory is fsynced. A crash at any point leaves either the old or
//! the new snapshot, never a mix.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use openspan_proto::openspan::discovery::snapshot::v1 as pb;
use prost::Message;
use thiserror::Error;

use crate::clock::UnixMillis;
use crate::store::{Store, StoredAffiliate, StoredEndpoint};

const MAGIC: &[u8; 8] = b"OSPNSNAP";
const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8 + 4;

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("cannot read snapshot {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write snapshot {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("snapshot {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// Builds a snapshot file one cluster at a time, so callers can hold their lock per cluster
/// instead of for the whole store, into a single buffer (no second copy of the payload).
pub struct SnapshotBuilder {
    file: Vec<u8>,
}

impl SnapshotBuilder {
    pub fn new(now: UnixMillis) -> Self {
        let mut file = Vec::with_capacity(1 << 20);
        // Header placeholder, filled in by `finish`.
        file.resize(HEADER_LEN, 0);
        let head = pb::Snapshot {
            format_version: FORMAT_VERSION,
            taken_at_unix_ms: now,
            clusters: Vec::new(),
        };
        head.encode_raw(&mut file);
        Self { file }
    }

    /// The wire form of one cluster (cheap: the payload bytes are shared, not copied).
    pub fn cluster_state(
        id: &str,
        affiliates: &BTreeMap<String, StoredAffiliate>,
    ) -> pb::ClusterState {
        pb::ClusterState {
            id: id.to_owned(),
            affiliates: affiliates
                .iter()
                .map(|(id, a)| pb::AffiliateState {
                    id: id.clone(),
                    data: a.data.clone(),
                    expires_at_unix_ms: a.expires_at,
                    endpoints: a
                        .endpoints
                        .iter()
                        .map(|e| pb::EndpointState {
                            data: e.data.clone(),
                            expires_at_unix_ms: e.expires_at,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// Appends one cluster (field 3 of `Snapshot`, a repeated message, can be written piecewise).
    pub fn add(&mut self, cluster: &pb::ClusterState) {
        prost::encoding::message::encode(3, cluster, &mut self.file);
    }

    /// The complete file: header (magic, version, length, CRC-32) and payload.
    pub fn finish(mut self) -> Vec<u8> {
        let payload_len = (self.file.len() - HEADER_LEN) as u64;
        let crc = crc32fast::hash(&self.file[HEADER_LEN..]);
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        header.extend_from_slice(&payload_len.to_be_bytes());
        header.extend_from_slice(&crc.to_be_bytes());
        self.file[..HEADER_LEN].copy_from_slice(&header);
        self.file
    }
}

/// Encodes every affiliate of `store` (in one go; see [`SnapshotBuilder`] to go per cluster).
pub fn encode(store: &Store, now: UnixMillis) -> Vec<u8> {
    let mut builder = SnapshotBuilder::new(now);
    for (id, affiliates) in store.clusters() {
        builder.add(&SnapshotBuilder::cluster_state(id, affiliates));
    }
    builder.finish()
}

/// Decodes a snapshot file's bytes into `store`, skipping what expired before `now`.
/// Returns the number of affiliates restored.
pub fn decode_into(bytes: &[u8], store: &mut Store, now: UnixMillis) -> Result<usize, String> {
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err("not an openspan snapshot (bad magic)".into());
    }
    let version = u32::from_be_bytes(bytes[8..12].try_into().unwrap_or_default());
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version} is not supported (this build reads {FORMAT_VERSION})"
        ));
    }
    let len = u64::from_be_bytes(bytes[12..20].try_into().unwrap_or_default());
    let crc = u32::from_be_bytes(bytes[20..24].try_into().unwrap_or_default());
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != len {
        return Err(format!(
            "payload is {} bytes, header says {len} (truncated?)",
            payload.len()
        ));
    }
    if crc32fast::hash(payload) != crc {
        return Err("checksum mismatch".into());
    }
    let snapshot =
        pb::Snapshot::decode(payload).map_err(|e| format!("cannot decode payload: {e}"))?;
    let mut restored = 0;
    for cluster in snapshot.clusters {
        for affiliate in cluster.affiliates {
            if affiliate.expires_at_unix_ms <= now {
                continue;
            }
            let stored = StoredAffiliate {
                data: affiliate.data,
                expires_at: affiliate.expires_at_unix_ms,
                endpoints: affiliate
                    .endpoints
                    .into_iter()
                    .filter(|e| e.expires_at_unix_ms > now)
                    .map(|e| StoredEndpoint {
                        data: e.data,
                        expires_at: e.expires_at_unix_ms,
                    })
                    .collect(),
            };
            store.restore(cluster.id.clone(), affiliate.id, stored);
            restored += 1;
        }
    }
    Ok(restored)
}

/// Writes `contents` to `path` atomically and durably.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), SnapshotError> {
    let err = |source| SnapshotError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(err)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// Reads the snapshot at `path` into `store`. `Ok(None)` when there is no snapshot yet.
pub fn load(
    path: &Path,
    store: &mut Store,
    now: UnixMillis,
) -> Result<Option<usize>, SnapshotError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SnapshotError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let mut loaded = Store::new(store.limits().clone());
    let count = decode_into(&bytes, &mut loaded, now).map_err(|reason| SnapshotError::Corrupt {
        path: path.to_owned(),
        reason,
    })?;
    *store = loaded;
    Ok(Some(count))
}

/// Moves an unusable snapshot out of the way so it is kept for inspection, never overwritten.
pub fn move_aside(path: &Path, now: UnixMillis) -> io::Result<PathBuf> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".corrupt-{now}"));
    let aside = PathBuf::from(aside);
    fs::rename(path, &aside)?;
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::limits::Update;

    fn sample_store() -> Store {
        let mut store = Store::default();
        for (cluster, affiliate, ttl) in [("c1", "a", 60), ("c1", "b", 1), ("c2", "a", 60)] {
            store
                .update(
                    Update {
                        cluster_id: cluster.into(),
                        affiliate_id: affiliate.into(),
                        data: Some(Bytes::from(format!("{cluster}/{affiliate}"))),
                        endpoints: vec![Bytes::from_static(b"endpoint")],
                        ttl: Duration::from_secs(ttl),
                    },
                    0,
                )
                .unwrap();
        }
        store
    }

    #[test]
    fn round_trip_keeps_everything_not_expired() {
        let store = sample_store();
        let bytes = encode(&store, 0);
        let mut restored = Store::default();
        assert_eq!(decode_into(&bytes, &mut restored, 0).unwrap(), 3);
        assert_eq!(restored.list("c1").unwrap(), store.list("c1").unwrap());
        assert_eq!(restored.list("c2").unwrap(), store.list("c2").unwrap());
        let mut later = Store::default();
        assert_eq!(
            decode_into(&bytes, &mut later, 2_000).unwrap(),
            2,
            "c1/b expired at 1 s"
        );
    }

    #[test]
    fn damage_is_detected() {
        let bytes = encode(&sample_store(), 0);
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        for (what, damaged) in [
            ("truncated", &bytes[..bytes.len() - 3]),
            ("flipped bit", &flipped[..]),
            ("empty", &[][..]),
            ("foreign", &b"hello world, this is not a snapshot"[..]),
        ] {
            let mut store = Store::default();
            assert!(
                decode_into(damaged, &mut store, 0).is_err(),
                "{what} was accepted"
            );
            assert_eq!(store.totals().affiliates, 0, "{what} left partial state");
        }
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.snapshot");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
