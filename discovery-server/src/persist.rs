//! Snapshot files of the embedded store.
//!
//! Layout: magic `OSPNSNAP`, format version (u32 BE), payload length (u64 BE), CRC-32 of the
//! payload (u32 BE), then the payload: a protobuf `openspan.discovery.snapshot.v1.Snapshot`.
//! The checksum makes a torn or corrupted file fail loudly instead of loading half a state.
//!
//! Writes are atomic: a temporary file `.<name>.tmp-<pid>` in the same directory is written,
//! fsynced and renamed over the old snapshot, then the directory is fsynced. A crash at any point
//! leaves either the old or the new snapshot, never a mix; a temporary file a SIGKILL left behind
//! is removed at the next start ([`remove_stale_temp_files`]).
//!
//! Time: the store's expiry instants are on the monotonic clock, which means nothing to another
//! process, so format 2 stores the TTL each record had left when the snapshot was taken, plus the
//! wall-clock time of writing and the host's boot clock. At load on the same boot the downtime is
//! measured exactly by the boot clock, which wall-clock steps do not move; otherwise the wall
//! clock's reading is used only when it is plausible (see [`Downtime`]). A stepped wall clock therefore neither expires every record at
//! once nor brings back records that had long expired. Format 1 (absolute
//! wall-clock expiry times) still loads: its times are turned into remaining TTLs against the
//! file's own write time, then treated the same way.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use openspan_proto::openspan::discovery::snapshot::v1 as pb;
use prost::Message;
use thiserror::Error;

use crate::clock::{BootClock, MonoMillis, UnixMillis};
use crate::store::{Store, StoredAffiliate, StoredEndpoint};

const MAGIC: &[u8; 8] = b"OSPNSNAP";
/// Remaining TTLs relative to the write time.
pub const FORMAT_VERSION: u32 = 2;
/// Absolute wall-clock expiry times; read, never written.
pub const FORMAT_V1_ABSOLUTE: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8 + 4;

/// Default cap on the size of a snapshot file that will be loaded (`--snapshot-max-size`): far
/// above any real store (a full cluster of 1024 affiliates is a few MB), low enough that a
/// runaway or foreign file cannot take the process's memory.
pub const DEFAULT_MAX_SIZE: u64 = 1 << 30;

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("cannot read snapshot {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write snapshot {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("snapshot {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "snapshot {path} is {size} bytes, over the {max}-byte cap: raise --snapshot-max-size \
         to load it, or move the file away to start empty"
    )]
    TooLarge { path: PathBuf, size: u64, max: u64 },
}

/// Builds a snapshot file one cluster at a time, so callers can hold their lock per cluster
/// instead of for the whole store, into a single buffer (no second copy of the payload).
pub struct SnapshotBuilder {
    file: Vec<u8>,
}

/// The clocks that span processes, read at one moment: what a snapshot is stamped with, and
/// what its loader compares the stamp to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Moment {
    pub wall: UnixMillis,
    pub boot: Option<BootClock>,
}

impl From<UnixMillis> for Moment {
    /// A moment known by the wall clock alone.
    fn from(wall: UnixMillis) -> Self {
        Self { wall, boot: None }
    }
}

impl SnapshotBuilder {
    /// `at` stamps the file so the loader can measure the downtime.
    pub fn new(at: impl Into<Moment>) -> Self {
        let at = at.into();
        let mut file = Vec::with_capacity(1 << 20);
        // Header placeholder, filled in by `finish`.
        file.resize(HEADER_LEN, 0);
        let (boot_id, since_boot_ms) = at
            .boot
            .map_or((String::new(), 0), |b| (b.boot_id, b.since_boot_ms));
        let head = pb::Snapshot {
            format_version: FORMAT_VERSION,
            taken_at_unix_ms: at.wall,
            clusters: Vec::new(),
            boot_id,
            since_boot_ms,
        };
        head.encode_raw(&mut file);
        Self { file }
    }

    /// The wire form of one cluster, with TTLs remaining at `now` (monotonic). The payload
    /// bytes are shared, not copied.
    pub fn cluster_state(
        id: &str,
        affiliates: &BTreeMap<String, StoredAffiliate>,
        now: MonoMillis,
    ) -> pb::ClusterState {
        let remaining = |expires_at: MonoMillis| expires_at.saturating_sub(now).max(0);
        pb::ClusterState {
            id: id.to_owned(),
            affiliates: affiliates
                .iter()
                .map(|(id, a)| pb::AffiliateState {
                    id: id.clone(),
                    data: a.data.clone(),
                    expires_at_unix_ms: 0,
                    ttl_remaining_ms: remaining(a.expires_at),
                    endpoints: a
                        .endpoints
                        .iter()
                        .map(|e| pb::EndpointState {
                            data: e.data.clone(),
                            expires_at_unix_ms: 0,
                            ttl_remaining_ms: remaining(e.expires_at),
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
    pub fn finish(self) -> Vec<u8> {
        seal(FORMAT_VERSION, self.file)
    }
}

/// Fills in the header of `file` (whose first [`HEADER_LEN`] bytes are a placeholder).
fn seal(version: u32, mut file: Vec<u8>) -> Vec<u8> {
    let payload_len = (file.len() - HEADER_LEN) as u64;
    let crc = crc32fast::hash(&file[HEADER_LEN..]);
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&version.to_be_bytes());
    header.extend_from_slice(&payload_len.to_be_bytes());
    header.extend_from_slice(&crc.to_be_bytes());
    file[..HEADER_LEN].copy_from_slice(&header);
    file
}

/// A complete file around an arbitrary payload, as if written by format `version` (tests build
/// old-format and hostile files with it).
pub fn seal_payload(version: u32, payload: &[u8]) -> Vec<u8> {
    let mut file = vec![0; HEADER_LEN];
    file.extend_from_slice(payload);
    seal(version, file)
}

/// Encodes every affiliate of `store` (in one go; see [`SnapshotBuilder`] to go per cluster).
pub fn encode(store: &Store, now: MonoMillis, at: impl Into<Moment>) -> Vec<u8> {
    let mut builder = SnapshotBuilder::new(at);
    for (id, affiliates) in store.clusters() {
        builder.add(&SnapshotBuilder::cluster_state(id, affiliates, now));
    }
    builder.finish()
}

/// How the time between writing a snapshot and loading it was accounted for. The boot clock
/// measures it exactly when both ran on the same boot of the host. Otherwise (a reboot, or a
/// file from another host) only the wall clock spans the two, and it can be stepped while the
/// server is down, so its reading is used only when it is plausible; failing that, records keep
/// the TTL they had left at writing time (at worst a
/// record outlives its client by one TTL, which is bounded by the longest TTL a client may ask
/// for; losing every record at once would instead empty the mesh).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Downtime {
    /// Same boot of the host: the boot clock advanced by this many milliseconds, all of which
    /// is subtracted from every remaining TTL, however long.
    SameBoot(i64),
    /// The wall clock advanced by this many milliseconds, no more than the longest TTL: it is
    /// subtracted from every remaining TTL.
    Subtracted(i64),
    /// The wall clock reads this many milliseconds earlier than the snapshot's stamp, so it was
    /// stepped back: nothing is subtracted.
    ClockBehind(i64),
    /// The wall clock advanced by this many milliseconds, more than the longest TTL: a forward
    /// step and a long stop look the same, so nothing is subtracted.
    Implausible(i64),
}

impl Downtime {
    /// Classifies the time between the stamp `then` and `now`.
    pub fn measure(then: &Moment, now: &Moment, max_ttl_ms: i64) -> Self {
        // A stamp from a file is untrusted: negative times are no stamp at all.
        let valid = |b: &&BootClock| b.since_boot_ms >= 0;
        if let (Some(then), Some(now)) = (
            then.boot.as_ref().filter(valid),
            now.boot.as_ref().filter(valid),
        ) && then.boot_id == now.boot_id
            && now.since_boot_ms >= then.since_boot_ms
        {
            return Downtime::SameBoot(now.since_boot_ms - then.since_boot_ms);
        }
        // Another boot: this host rebooted, or the file comes from another host (a volume moved
        // with its pod), which look the same, so only the wall clock can tell.
        let elapsed = now.wall.saturating_sub(then.wall);
        if elapsed < 0 {
            Downtime::ClockBehind(elapsed.saturating_neg())
        } else if elapsed > max_ttl_ms {
            Downtime::Implausible(elapsed)
        } else {
            Downtime::Subtracted(elapsed)
        }
    }

    /// Milliseconds taken off every remaining TTL.
    pub fn subtracted_ms(self) -> i64 {
        match self {
            Downtime::SameBoot(ms) | Downtime::Subtracted(ms) => ms.max(0),
            Downtime::ClockBehind(_) | Downtime::Implausible(_) => 0,
        }
    }
}

/// What a load restored, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// Affiliates restored (those whose TTL ran out are left out).
    pub affiliates: usize,
    /// The file's format version; [`FORMAT_V1_ABSOLUTE`] means its times were converted.
    pub format_version: u32,
    pub taken_at_unix_ms: UnixMillis,
    pub downtime: Downtime,
}

/// Decodes a snapshot file's bytes into `store`, skipping what has run out of TTL. `now` is the
/// store's (monotonic) time and `at` the clocks that span processes, used only to measure the
/// downtime.
/// Remaining TTLs are capped at the store's longest TTL, so no file can make a record immortal.
pub fn decode_into(
    bytes: &[u8],
    store: &mut Store,
    now: MonoMillis,
    at: impl Into<Moment>,
) -> Result<Loaded, String> {
    let payload = check_header(bytes)?;
    let version = u32::from_be_bytes(bytes[8..12].try_into().unwrap_or_default());
    let snapshot =
        pb::Snapshot::decode(payload).map_err(|e| format!("cannot decode payload: {e}"))?;
    // The header is outside the checksum; the payload's own copy of the version catches a
    // damaged header version (read as the other format, every TTL would be wrong).
    if snapshot.format_version != version {
        return Err(format!(
            "the header says format version {version}, the payload says {}",
            snapshot.format_version
        ));
    }
    let max_ttl_ms = i64::try_from(store.limits().max_ttl.as_millis()).unwrap_or(i64::MAX);
    let taken_at = snapshot.taken_at_unix_ms;
    let written = Moment {
        wall: taken_at,
        boot: (!snapshot.boot_id.is_empty()).then(|| BootClock {
            boot_id: snapshot.boot_id.clone(),
            since_boot_ms: snapshot.since_boot_ms,
        }),
    };
    let downtime = Downtime::measure(&written, &at.into(), max_ttl_ms);
    // The TTL a record has left now, from what the file says it had left when written.
    let left = |ttl_remaining_ms: i64, expires_at_unix_ms: i64| {
        let at_write = if version == FORMAT_V1_ABSOLUTE {
            expires_at_unix_ms.saturating_sub(taken_at)
        } else {
            ttl_remaining_ms
        };
        at_write
            .min(max_ttl_ms)
            .saturating_sub(downtime.subtracted_ms())
    };
    let mut restored = 0;
    for cluster in snapshot.clusters {
        let mut affiliates = BTreeMap::new();
        for affiliate in cluster.affiliates {
            let remaining = left(affiliate.ttl_remaining_ms, affiliate.expires_at_unix_ms);
            if remaining <= 0 {
                continue;
            }
            let stored = StoredAffiliate {
                data: affiliate.data,
                expires_at: now.saturating_add(remaining),
                endpoints: affiliate
                    .endpoints
                    .into_iter()
                    .filter_map(|e| {
                        let remaining = left(e.ttl_remaining_ms, e.expires_at_unix_ms);
                        (remaining > 0).then(|| StoredEndpoint {
                            data: e.data,
                            expires_at: now.saturating_add(remaining),
                        })
                    })
                    .collect(),
            };
            // A file can repeat an id; the last record wins, as a second update would.
            if affiliates.insert(affiliate.id, stored).is_none() {
                restored += 1;
            }
        }
        store.restore_cluster(cluster.id, affiliates);
    }
    Ok(Loaded {
        affiliates: restored,
        format_version: version,
        taken_at_unix_ms: taken_at,
        downtime,
    })
}

/// The payload of a well-formed file of a version this build reads.
fn check_header(bytes: &[u8]) -> Result<&[u8], String> {
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err("not an openspan snapshot (bad magic)".into());
    }
    let version = u32::from_be_bytes(bytes[8..12].try_into().unwrap_or_default());
    if version != FORMAT_VERSION && version != FORMAT_V1_ABSOLUTE {
        return Err(format!(
            "format version {version} is not supported (this build reads \
             {FORMAT_V1_ABSOLUTE} and {FORMAT_VERSION}); was it written by a newer server?"
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
    Ok(payload)
}

/// The directory holding `path` and the prefix of its temporary files (`.<name>.tmp-`).
fn temp_naming(path: &Path) -> (PathBuf, String) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    (dir, format!(".{file_name}.tmp-"))
}

/// Writes `contents` to `path` atomically and durably.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), SnapshotError> {
    let err = |source| SnapshotError::Write {
        path: path.to_owned(),
        source,
    };
    let (dir, prefix) = temp_naming(path);
    fs::create_dir_all(&dir).map_err(err)?;
    let tmp = dir.join(format!("{prefix}{}", std::process::id()));
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

/// Removes the temporary files that writers of `path` killed mid-write left behind: exactly
/// `.<name>.tmp-<pid>` regular files, except this process's own (which may be in use). A server
/// is the only writer of its snapshot path, so any other one is dead. Returns what was removed.
pub fn remove_stale_temp_files(path: &Path) -> io::Result<Vec<PathBuf>> {
    let (dir, prefix) = temp_naming(path);
    let own = format!("{prefix}{}", std::process::id());
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = name.strip_prefix(prefix.as_str()).is_some_and(|pid| {
            !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) && name != own
        });
        if ours && entry.file_type()?.is_file() {
            fs::remove_file(entry.path())?;
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

/// Reads the snapshot at `path` into `store` (see [`decode_into`] for `now` and `wall_now`).
/// `Ok(None)` when there is no snapshot yet. A file over `max_size` bytes is refused before it
/// is read, so a huge or foreign file cannot exhaust memory.
pub fn load(
    path: &Path,
    store: &mut Store,
    now: MonoMillis,
    at: impl Into<Moment>,
    max_size: u64,
) -> Result<Option<Loaded>, SnapshotError> {
    let read_err = |source| SnapshotError::Read {
        path: path.to_owned(),
        source,
    };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(read_err(source)),
    };
    let too_large = |size| SnapshotError::TooLarge {
        path: path.to_owned(),
        size,
        max: max_size,
    };
    let size = file.metadata().map_err(read_err)?.len();
    if size > max_size {
        return Err(too_large(size));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    // Bounded again while reading: the file may grow after the size check.
    file.take(max_size.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > max_size {
        return Err(too_large(bytes.len() as u64));
    }
    let mut loaded = Store::new(store.limits().clone());
    let report =
        decode_into(&bytes, &mut loaded, now, at).map_err(|reason| SnapshotError::Corrupt {
            path: path.to_owned(),
            reason,
        })?;
    *store = loaded;
    Ok(Some(report))
}

/// Moves an unusable snapshot out of the way to `<path>.<why>-<stamp>`, so it is kept for
/// inspection and never overwritten. `stamp` (wall-clock milliseconds) makes the name unique.
pub fn move_aside(path: &Path, why: &str, stamp: UnixMillis) -> io::Result<PathBuf> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".{why}-{stamp}"));
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

    const MIN: i64 = 60_000;
    const WALL: UnixMillis = 1_700_000_000_000;

    /// c1/a and c2/a with 10 min of TTL, c1/b with 1 s, all written at monotonic `now`.
    fn sample_store(now: MonoMillis) -> Store {
        let mut store = Store::default();
        for (cluster, affiliate, ttl) in [("c1", "a", 600), ("c1", "b", 1), ("c2", "a", 600)] {
            store
                .update(
                    Update {
                        cluster_id: cluster.into(),
                        affiliate_id: affiliate.into(),
                        data: Some(Bytes::from(format!("{cluster}/{affiliate}"))),
                        endpoints: vec![Bytes::from_static(b"endpoint")],
                        ttl: Duration::from_secs(ttl),
                    },
                    now,
                )
                .unwrap();
        }
        store
    }

    fn expiry(store: &Store, cluster: &str, affiliate: &str) -> MonoMillis {
        store.cluster(cluster).unwrap()[affiliate].expires_at
    }

    #[test]
    fn round_trip_keeps_remaining_ttls_across_monotonic_origins() {
        // Written at monotonic 5 000 000 by one process, loaded at monotonic 7 by the next,
        // with no wall-clock time in between.
        let store = sample_store(5_000_000);
        let bytes = encode(&store, 5_000_000, WALL);
        let mut restored = Store::default();
        let loaded = decode_into(&bytes, &mut restored, 7, WALL).unwrap();
        assert_eq!(loaded.affiliates, 3);
        assert_eq!(loaded.format_version, FORMAT_VERSION);
        assert_eq!(loaded.downtime, Downtime::Subtracted(0));
        assert_eq!(restored.list("c1").unwrap().len(), 2);
        assert_eq!(expiry(&restored, "c1", "a"), 7 + 10 * MIN);
        assert_eq!(expiry(&restored, "c1", "b"), 7 + 1_000);
        let endpoint = &restored.cluster("c2").unwrap()["a"].endpoints[0];
        assert_eq!(endpoint.expires_at, 7 + 10 * MIN);
    }

    #[test]
    fn plausible_downtime_is_subtracted() {
        let bytes = encode(&sample_store(0), 0, WALL);
        let mut restored = Store::default();
        let loaded = decode_into(&bytes, &mut restored, 0, WALL + 4 * MIN).unwrap();
        assert_eq!(loaded.downtime, Downtime::Subtracted(4 * MIN));
        assert_eq!(
            loaded.affiliates, 2,
            "c1/b (1 s) ran out while the server was down"
        );
        assert_eq!(expiry(&restored, "c1", "a"), 6 * MIN);
    }

    #[test]
    fn a_stepped_wall_clock_neither_expires_nor_extends() {
        let bytes = encode(&sample_store(0), 0, WALL);
        // Stepped back by a day: nothing subtracted, nothing added.
        let mut restored = Store::default();
        let loaded = decode_into(&bytes, &mut restored, 0, WALL - 24 * 60 * MIN).unwrap();
        assert_eq!(loaded.downtime, Downtime::ClockBehind(24 * 60 * MIN));
        assert_eq!(loaded.affiliates, 3);
        assert_eq!(expiry(&restored, "c1", "a"), 10 * MIN);
        // Stepped forward by a year: longer than any TTL, so not believed.
        let mut restored = Store::default();
        let year = 365 * 24 * 60 * MIN;
        let loaded = decode_into(&bytes, &mut restored, 0, WALL + year).unwrap();
        assert_eq!(loaded.downtime, Downtime::Implausible(year));
        assert_eq!(loaded.affiliates, 3);
        assert_eq!(expiry(&restored, "c1", "a"), 10 * MIN);
        // Exactly the longest TTL (30 min) is still plausible: everything ran out.
        let mut restored = Store::default();
        let loaded = decode_into(&bytes, &mut restored, 0, WALL + 30 * MIN).unwrap();
        assert_eq!(loaded.downtime, Downtime::Subtracted(30 * MIN));
        assert_eq!(loaded.affiliates, 0);
        // One millisecond more is not.
        let mut restored = Store::default();
        let loaded = decode_into(&bytes, &mut restored, 0, WALL + 30 * MIN + 1).unwrap();
        assert_eq!(loaded.downtime, Downtime::Implausible(30 * MIN + 1));
        assert_eq!(loaded.affiliates, 3);
    }

    fn at(wall: UnixMillis, boot_id: &str, since_boot_ms: i64) -> Moment {
        Moment {
            wall,
            boot: Some(BootClock {
                boot_id: boot_id.into(),
                since_boot_ms,
            }),
        }
    }

    #[test]
    fn on_the_same_boot_the_boot_clock_measures_the_downtime_whatever_the_wall_clock_says() {
        let bytes = encode(&sample_store(0), 0, at(WALL, "boot-1", 1_000_000));
        // A 4-minute stop while the wall clock was stepped a year forward: 4 minutes count.
        let year = 365 * 24 * 60 * MIN;
        let mut restored = Store::default();
        let loaded = decode_into(
            &bytes,
            &mut restored,
            0,
            at(WALL + year, "boot-1", 1_000_000 + 4 * MIN),
        )
        .unwrap();
        assert_eq!(loaded.downtime, Downtime::SameBoot(4 * MIN));
        assert_eq!(loaded.affiliates, 2);
        assert_eq!(expiry(&restored, "c1", "a"), 6 * MIN);
        // A 2-hour stop (longer than any TTL) while the wall clock was stepped back: every
        // record ran out and none comes back.
        let mut restored = Store::default();
        let loaded = decode_into(
            &bytes,
            &mut restored,
            0,
            at(WALL - MIN, "boot-1", 1_000_000 + 120 * MIN),
        )
        .unwrap();
        assert_eq!(loaded.downtime, Downtime::SameBoot(120 * MIN));
        assert_eq!(loaded.affiliates, 0, "a long stop resurrects nothing");
    }

    #[test]
    fn another_boot_or_host_goes_by_the_wall_clock() {
        let bytes = encode(&sample_store(0), 0, at(WALL, "boot-1", 50 * MIN));
        // A volume moved to a host up for ten days, 5 s later: 5 s count, not the uptime.
        let mut restored = Store::default();
        let loaded = decode_into(
            &bytes,
            &mut restored,
            0,
            at(WALL + 5_000, "host-2", 14_400 * MIN),
        )
        .unwrap();
        assert_eq!(loaded.downtime, Downtime::Subtracted(5_000));
        assert_eq!(loaded.affiliates, 2, "only c1/b (1 s) ran out");
        // Rebooted, the wall clock says 5 minutes: they count.
        let mut restored = Store::default();
        let loaded =
            decode_into(&bytes, &mut restored, 0, at(WALL + 5 * MIN, "boot-2", MIN)).unwrap();
        assert_eq!(loaded.downtime, Downtime::Subtracted(5 * MIN));
        assert_eq!(expiry(&restored, "c1", "a"), 5 * MIN);
        // A file without a boot stamp (older build) likewise.
        let old = encode(&sample_store(0), 0, WALL);
        let year = 365 * 24 * 60 * MIN;
        let mut restored = Store::default();
        let loaded =
            decode_into(&old, &mut restored, 0, at(WALL + year, "boot-2", 40 * MIN)).unwrap();
        assert_eq!(loaded.downtime, Downtime::Implausible(year));
    }

    #[test]
    fn a_hostile_boot_stamp_is_no_stamp() {
        let mut restored = Store::default();
        let boot = BootClock::read().map_or_else(|| "this-boot".to_owned(), |b| b.boot_id);
        let bytes = encode(&sample_store(0), 0, at(WALL, &boot, i64::MIN));
        let loaded =
            decode_into(&bytes, &mut restored, 0, at(WALL + MIN, &boot, 1_000_000)).unwrap();
        assert_eq!(loaded.downtime, Downtime::Subtracted(MIN));
        let bytes = encode(&sample_store(0), 0, at(WALL, &boot, i64::MAX));
        let loaded =
            decode_into(&bytes, &mut restored, 0, at(WALL + MIN, &boot, 1_000_000)).unwrap();
        assert_eq!(loaded.downtime, Downtime::Subtracted(MIN));
    }

    #[test]
    fn the_boot_clock_of_this_host_reads() {
        let boot = BootClock::read().expect("/proc/sys/kernel/random/boot_id and /proc/uptime");
        assert_eq!(boot.boot_id.len(), 36, "{boot:?}");
        assert!(boot.since_boot_ms > 0);
    }

    /// A format-1 file as the previous release wrote it: absolute wall-clock expiry times.
    fn v1_file(taken_at: UnixMillis, affiliate_expires: i64, endpoint_expires: i64) -> Vec<u8> {
        let snapshot = pb::Snapshot {
            format_version: FORMAT_V1_ABSOLUTE,
            taken_at_unix_ms: taken_at,
            boot_id: String::new(),
            since_boot_ms: 0,
            clusters: vec![pb::ClusterState {
                id: "c".into(),
                affiliates: vec![pb::AffiliateState {
                    id: "a".into(),
                    data: Bytes::from_static(b"data"),
                    expires_at_unix_ms: affiliate_expires,
                    endpoints: vec![pb::EndpointState {
                        data: Bytes::from_static(b"e"),
                        expires_at_unix_ms: endpoint_expires,
                        ttl_remaining_ms: 0,
                    }],
                    ttl_remaining_ms: 0,
                }],
            }],
        };
        seal_payload(FORMAT_V1_ABSOLUTE, &snapshot.encode_to_vec())
    }

    #[test]
    fn format_1_files_are_converted_against_their_write_time() {
        let bytes = v1_file(WALL, WALL + 10 * MIN, WALL + 3 * MIN);
        let mut restored = Store::default();
        let loaded = decode_into(&bytes, &mut restored, 100, WALL + 2 * MIN).unwrap();
        assert_eq!(loaded.format_version, FORMAT_V1_ABSOLUTE);
        assert_eq!(loaded.downtime, Downtime::Subtracted(2 * MIN));
        let a = &restored.cluster("c").unwrap()["a"];
        assert_eq!(a.expires_at, 100 + 8 * MIN);
        assert_eq!(a.endpoints[0].expires_at, 100 + MIN);
        // The same file read after a forward step of a day keeps its remaining TTLs.
        let mut restored = Store::default();
        decode_into(&bytes, &mut restored, 0, WALL + 24 * 60 * MIN).unwrap();
        assert_eq!(expiry(&restored, "c", "a"), 10 * MIN);
    }

    #[test]
    fn no_file_can_make_a_record_outlive_the_longest_ttl() {
        // A format-1 file stamped at the epoch (a wall clock that read 0) would otherwise give
        // its records decades of TTL.
        let bytes = v1_file(0, WALL + 10 * MIN, WALL);
        let mut restored = Store::default();
        decode_into(&bytes, &mut restored, 0, 0).unwrap();
        assert_eq!(expiry(&restored, "c", "a"), 30 * MIN, "capped at --max-ttl");
        // Extreme values saturate instead of overflowing.
        for (taken, expires) in [(i64::MIN, i64::MAX), (i64::MAX, i64::MIN), (0, i64::MAX)] {
            let bytes = v1_file(taken, expires, expires);
            let mut restored = Store::default();
            decode_into(&bytes, &mut restored, i64::MAX - 1, i64::MIN).unwrap();
        }
    }

    #[test]
    fn damage_is_detected() {
        let bytes = encode(&sample_store(0), 0, WALL);
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        let mut future = bytes.clone();
        future[8..12].copy_from_slice(&3u32.to_be_bytes());
        // The header's version is outside the checksum: a format-2 payload under a format-1
        // header would load with every TTL wrong.
        let mut relabeled = bytes.clone();
        relabeled[8..12].copy_from_slice(&FORMAT_V1_ABSOLUTE.to_be_bytes());
        for (what, damaged) in [
            ("truncated", &bytes[..bytes.len() - 3]),
            ("flipped bit", &flipped[..]),
            ("empty", &[][..]),
            ("foreign", &b"hello world, this is not a snapshot"[..]),
            ("newer format", &future[..]),
            ("header version damaged", &relabeled[..]),
        ] {
            let mut store = Store::default();
            assert!(
                decode_into(damaged, &mut store, 0, WALL).is_err(),
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

    #[test]
    fn only_our_own_stale_temp_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.snapshot");
        let own = format!(".state.snapshot.tmp-{}", std::process::id());
        let stale = [".state.snapshot.tmp-1", ".state.snapshot.tmp-4194304"];
        let kept = [
            "state.snapshot",
            ".state.snapshot.tmp-",
            ".state.snapshot.tmp-12x",
            ".other.snapshot.tmp-12",
            "state.snapshot.tmp-12",
            ".state.snapshot.corrupt-12",
            own.as_str(),
        ];
        for name in stale.iter().chain(&kept) {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        // A directory with a matching name is not a file we wrote.
        fs::create_dir(dir.path().join(".state.snapshot.tmp-77")).unwrap();
        let mut removed = remove_stale_temp_files(&path).unwrap();
        removed.sort();
        let expected: Vec<_> = stale.iter().map(|n| dir.path().join(n)).collect();
        assert_eq!(removed, expected);
        for name in kept {
            assert!(dir.path().join(name).exists(), "{name} was removed");
        }
        assert!(dir.path().join(".state.snapshot.tmp-77").is_dir());
        // A missing directory has nothing stale in it.
        assert!(
            remove_stale_temp_files(&dir.path().join("absent/state.snapshot"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn load_refuses_a_file_over_the_cap_without_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.snapshot");
        let bytes = encode(&sample_store(0), 0, WALL);
        fs::write(&path, &bytes).unwrap();
        let size = bytes.len() as u64;
        let mut store = Store::default();
        let loaded = load(&path, &mut store, 0, WALL, size).unwrap().unwrap();
        assert_eq!(loaded.affiliates, 3, "exactly at the cap loads");
        let mut store = Store::default();
        let err = load(&path, &mut store, 0, WALL, size - 1).unwrap_err();
        assert!(
            matches!(err, SnapshotError::TooLarge { size: s, max, .. } if s == size && max == size - 1),
            "{err}"
        );
        assert!(err.to_string().contains("--snapshot-max-size"), "{err}");
        assert_eq!(store.totals().affiliates, 0);
        // A sparse file far over the cap costs nothing to refuse.
        let huge = dir.path().join("huge.snapshot");
        File::create(&huge)
            .unwrap()
            .set_len(DEFAULT_MAX_SIZE + 1)
            .unwrap();
        let err = load(&huge, &mut store, 0, WALL, DEFAULT_MAX_SIZE).unwrap_err();
        assert!(matches!(err, SnapshotError::TooLarge { .. }), "{err}");
    }
}
