//! Time over real gRPC: expiry follows the monotonic clock only, and a restart from a snapshot
//! after a pause or a wall-clock step neither mass-expires nor resurrects records.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use discovery_server::clock::{Clock, ManualClock};
use discovery_server::persist;
use discovery_server::server::{self, Config, Running, SnapshotConfig};
use openspan_proto::discovery::server::AffiliateUpdateRequest;
use openspan_proto::openspan::discovery::snapshot::v1 as pb;
use prost::Message;

const WALL: i64 = 1_700_000_000_000;
const MIN: i64 = 60_000;

fn fast_gc() -> Config {
    let mut config = test_config();
    config.gc_interval = Duration::from_millis(20);
    config
}

fn with_snapshot(path: &Path) -> Config {
    let mut config = fast_gc();
    config.snapshot = Some(SnapshotConfig {
        path: path.to_owned(),
        interval: Duration::from_secs(3600),
        max_size: persist::DEFAULT_MAX_SIZE,
    });
    config
}

async fn start_at(config: Config, wall: i64) -> (Running, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(wall));
    let running = server::start_with_clock(config, clock.clone() as Arc<dyn Clock>)
        .await
        .expect("server starts");
    (running, clock)
}

fn with_ttl(seconds: i64, request: AffiliateUpdateRequest) -> AffiliateUpdateRequest {
    AffiliateUpdateRequest {
        ttl: Some(prost_types::Duration { seconds, nanos: 0 }),
        ..request
    }
}

async fn ids(c: &mut Client, cluster: &str) -> Vec<String> {
    list(c, cluster).await.into_iter().map(|a| a.id).collect()
}

/// Waits (real time) until the collector, ticking every 20 ms, has had several chances to run.
async fn let_gc_run() {
    tokio::time::sleep(Duration::from_millis(150)).await;
}

#[tokio::test]
async fn wall_clock_steps_change_no_expiry_and_monotonic_time_expires_as_before() {
    let (server, clock) = start_at(fast_gc(), WALL).await;
    let mut c = client(&server).await;
    c.affiliate_update(with_ttl(60, update("c", "a", Some(b"d"), &[b"e"])))
        .await
        .unwrap();
    let mut w = watch(&mut c, "c").await;
    assert_eq!(next(&mut w).await.affiliates.len(), 1);

    // A forward step of a day used to expire everything at the next collection.
    clock.step_wall(24 * 60 * MIN);
    assert_quiet(&mut w, Duration::from_millis(200)).await;
    assert_eq!(ids(&mut c, "c").await, ["a"]);
    // A backward step of two days must not make it immortal either.
    clock.step_wall(-48 * 60 * MIN);
    assert_quiet(&mut w, Duration::from_millis(200)).await;

    clock.advance_monotonic(Duration::from_secs(59));
    assert_quiet(&mut w, Duration::from_millis(200)).await;
    assert_eq!(ids(&mut c, "c").await, ["a"], "1 s of TTL left");
    clock.advance_monotonic(Duration::from_secs(1));
    let tombstone = next(&mut w).await;
    assert!(
        tombstone.deleted,
        "expired after exactly 60 s of monotonic time"
    );
    assert!(ids(&mut c, "c").await.is_empty());
    server.shutdown().await.unwrap();
}

/// Writes a snapshot holding `c/a` with 10 min of TTL and `c/b` with 1 min, both set 10 s of
/// monotonic time before the shutdown; returns the wall-clock time the snapshot was taken.
async fn snapshot_with_two_records(path: &Path) -> i64 {
    let (server, clock) = start_at(with_snapshot(path), WALL).await;
    let mut c = client(&server).await;
    c.affiliate_update(with_ttl(600, update("c", "a", Some(b"d"), &[b"e"])))
        .await
        .unwrap();
    c.affiliate_update(with_ttl(60, update("c", "b", Some(b"d"), &[])))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(10));
    server.shutdown().await.unwrap();
    clock.wall()
}

/// Starts from the snapshot with the wall clock at `wall`; asserts which records are there and
/// that `c/a` expires after exactly `a_left` more seconds of monotonic time.
async fn restart_and_check(path: &Path, wall: i64, present: &[&str], a_left: u64) {
    let (server, clock) = start_at(with_snapshot(path), wall).await;
    let mut c = client(&server).await;
    assert_eq!(ids(&mut c, "c").await, present);
    clock.advance_monotonic(Duration::from_secs(a_left - 1));
    let_gc_run().await;
    assert!(ids(&mut c, "c").await.contains(&"a".to_owned()));
    clock.advance_monotonic(Duration::from_secs(1));
    // Polled rather than slept on: on a loaded machine the 20 ms collector may not get a turn
    // within a fixed 150 ms, and no amount of real time makes a live record expire here (the
    // injected monotonic clock does not move while this waits).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ids(&mut c, "c").await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "c/a outlived its TTL (still listed after 10 s of collections)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_restart_after_a_pause_subtracts_the_downtime() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.snapshot");
    let taken = snapshot_with_two_records(&path).await;
    // Down for 2 minutes: c/b (50 s left) ran out, c/a has 590 - 120 s left.
    restart_and_check(&path, taken + 2 * MIN, &["a"], 470).await;
}

#[tokio::test]
async fn a_restart_after_a_forward_wall_step_expires_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.snapshot");
    let taken = snapshot_with_two_records(&path).await;
    // The wall clock jumped a week ahead while the server was down.
    restart_and_check(&path, taken + 7 * 24 * 60 * MIN, &["a", "b"], 590).await;
}

#[tokio::test]
async fn a_restart_after_a_backward_wall_step_resurrects_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.snapshot");
    let taken = snapshot_with_two_records(&path).await;
    // The wall clock went back a day: records keep what they had left, not a day more.
    restart_and_check(&path, taken - 24 * 60 * MIN, &["a", "b"], 590).await;
}

#[tokio::test]
async fn a_format_1_snapshot_still_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.snapshot");
    let old = pb::Snapshot {
        format_version: persist::FORMAT_V1_ABSOLUTE,
        taken_at_unix_ms: WALL,
        boot_id: String::new(),
        since_boot_ms: 0,
        clusters: vec![pb::ClusterState {
            id: "c".into(),
            affiliates: vec![
                pb::AffiliateState {
                    id: "a".into(),
                    data: Bytes::from_static(b"old-format"),
                    expires_at_unix_ms: WALL + 10 * MIN,
                    ..Default::default()
                },
                pb::AffiliateState {
                    id: "expired".into(),
                    data: Bytes::from_static(b"gone"),
                    expires_at_unix_ms: WALL - 1,
                    ..Default::default()
                },
            ],
        }],
    };
    std::fs::write(
        &path,
        persist::seal_payload(persist::FORMAT_V1_ABSOLUTE, &old.encode_to_vec()),
    )
    .unwrap();
    // Loaded one minute after it was written: 9 minutes left.
    restart_and_check(&path, WALL + MIN, &["a"], 540).await;
    // The shutdown rewrote it in the current format.
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes[8..12], persist::FORMAT_VERSION.to_be_bytes());
}
