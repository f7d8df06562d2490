//! Several replicas on one etcd (Debian's `etcd-server`, started here on loopback): a change
//! written through one replica reaches the watchers of another, TTLs expire everywhere, the
//! per-cluster limit holds across replicas, and an etcd outage is survived.
//!
//! Needs the `etcd` binary (scripts/test.sh installs etcd-server). Without it the tests fail
//! saying so, unless `OPENSPAN_SKIP_ETCD_TESTS=1` is set, in which case they say they skip.

mod common;

use std::time::{Duration, Instant};

use common::etcd::{Etcd, etcd_present};
use common::*;
use discovery_server::server::{Config, Running};
use openspan_proto::discovery::server::AffiliateUpdateRequest;

fn replica_config(etcd: &Etcd, prefix: &str) -> Config {
    etcd.replica_config(prefix)
}

async fn replicas(etcd: &Etcd, prefix: &str, n: usize) -> Vec<Running> {
    let mut running = Vec::new();
    for _ in 0..n {
        running.push(start(replica_config(etcd, prefix)).await);
    }
    running
}

fn with_ttl(mut update: AffiliateUpdateRequest, seconds: i64) -> AffiliateUpdateRequest {
    update.ttl = Some(prost_types::Duration { seconds, nanos: 0 });
    update
}

/// Waits until `check` holds, failing with `what` after `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "{what} (waited {limit:?})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_one_replica_reaches_the_watchers_of_another() {
    if !etcd_present() {
        return;
    }
    let etcd = Etcd::start().await;
    let servers = replicas(&etcd, "/t/cross/", 2).await;
    let (mut a, mut b) = (client(&servers[0]).await, client(&servers[1]).await);
    let mut watch_b = watch(&mut b, "c").await;
    assert!(
        next(&mut watch_b).await.affiliates.is_empty(),
        "empty snapshot"
    );

    let sent = Instant::now();
    a.affiliate_update(update("c", "n1", Some(b"data-1"), &[b"ep-1"]))
        .await
        .unwrap();
    let seen = next(&mut watch_b).await;
    eprintln!(
        "update via replica A seen by a watcher on replica B after {:?}",
        sent.elapsed()
    );
    assert!(!seen.deleted);
    assert_eq!(seen.affiliates[0].id, "n1");
    assert_eq!(&seen.affiliates[0].data[..], b"data-1");
    assert_eq!(seen.affiliates[0].endpoints.len(), 1);

    // A refresh with the same data and endpoint is no news; a new endpoint is, merged.
    a.affiliate_update(update("c", "n1", Some(b"data-1"), &[b"ep-1"]))
        .await
        .unwrap();
    b.affiliate_update(update("c", "n1", None, &[b"ep-2"]))
        .await
        .unwrap();
    let merged = next(&mut watch_b).await;
    assert_eq!(
        &merged.affiliates[0].data[..],
        b"data-1",
        "data kept when absent"
    );
    assert_eq!(merged.affiliates[0].endpoints.len(), 2);

    // Both replicas list the same; a delete through B is a tombstone on A's watchers.
    let mut watch_a = watch(&mut a, "c").await;
    assert_eq!(next(&mut watch_a).await.affiliates.len(), 1);
    assert_eq!(list(&mut a, "c").await, list(&mut b, "c").await);
    b.affiliate_delete(openspan_proto::discovery::server::AffiliateDeleteRequest {
        cluster_id: "c".into(),
        affiliate_id: "n1".into(),
    })
    .await
    .unwrap();
    let tombstone = next(&mut watch_a).await;
    assert!(tombstone.deleted);
    assert_eq!(tombstone.affiliates[0].id, "n1");
    assert!(list(&mut a, "c").await.is_empty());
    for server in servers {
        server.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_a_tombstone_on_every_replica() {
    if !etcd_present() {
        return;
    }
    let etcd = Etcd::start().await;
    let servers = replicas(&etcd, "/t/ttl/", 2).await;
    let (mut a, mut b) = (client(&servers[0]).await, client(&servers[1]).await);
    let mut watchers = [watch(&mut a, "c").await, watch(&mut b, "c").await];
    for w in &mut watchers {
        next(w).await;
    }
    a.affiliate_update(with_ttl(update("c", "short", Some(b"d"), &[]), 2))
        .await
        .unwrap();
    a.affiliate_update(update("c", "long", Some(b"d"), &[]))
        .await
        .unwrap();
    for w in &mut watchers {
        assert_eq!(next(w).await.affiliates[0].id, "short");
        assert_eq!(next(w).await.affiliates[0].id, "long");
    }
    let written = Instant::now();
    for w in &mut watchers {
        let tombstone = tokio::time::timeout(Duration::from_secs(15), w.message())
            .await
            .expect("a tombstone within 15 s")
            .unwrap()
            .unwrap();
        assert!(tombstone.deleted, "{tombstone:?}");
        assert_eq!(tombstone.affiliates[0].id, "short");
    }
    eprintln!(
        "a 2 s TTL became a tombstone on both replicas {:?} after the write",
        written.elapsed()
    );
    let remaining = list(&mut b, "c").await;
    assert_eq!(remaining.len(), 1);
    assert_eq!(remaining[0].id, "long");
    for server in servers {
        server.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_update_is_one_transaction_and_the_cluster_limit_holds_across_replicas() {
    if !etcd_present() {
        return;
    }
    let etcd = Etcd::start().await;
    // 64 endpoints + the data key: 65 operations, under etcd's default limit of 128.
    let servers = replicas(&etcd, "/t/limits/", 2).await;
    let mut a = client(&servers[0]).await;
    let endpoints: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i; 32]).collect();
    let endpoints: Vec<&[u8]> = endpoints.iter().map(Vec::as_slice).collect();
    a.affiliate_update(update("big", "n", Some(&[7; 2048]), &endpoints))
        .await
        .expect("a 65-operation update is accepted");
    let b = client(&servers[1]).await;
    eventually(
        Duration::from_secs(5),
        "replica B mirrors the update",
        || {
            let mut b = b.clone();
            async move {
                list(&mut b, "big")
                    .await
                    .first()
                    .is_some_and(|a| a.endpoints.len() == 64)
            }
        },
    )
    .await;
    for server in servers {
        server.shutdown().await.unwrap();
    }

    // Five affiliates at most, 24 nodes joining at once through two replicas.
    let mut config = replica_config(&etcd, "/t/limit5/");
    config.limits.max_affiliates_per_cluster = 5;
    let servers = [start(config.clone()).await, start(config).await];
    let clients = [client(&servers[0]).await, client(&servers[1]).await];
    let mut joins = Vec::new();
    for i in 0..24 {
        let mut c = clients[i % 2].clone();
        joins.push(tokio::spawn(async move {
            c.affiliate_update(update("full", &format!("node-{i}"), Some(b"d"), &[]))
                .await
                .map_err(|s| s.code())
        }));
    }
    let mut accepted = 0;
    for join in joins {
        match join.await.unwrap() {
            Ok(_) => accepted += 1,
            Err(code) => assert_eq!(code, tonic::Code::ResourceExhausted),
        }
    }
    assert_eq!(accepted, 5, "exactly the limit is let in across replicas");
    let mut c = clients[0].clone();
    eventually(Duration::from_secs(5), "the mirror holds the five", || {
        let mut c = c.clone();
        async move { list(&mut c, "full").await.len() == 5 }
    })
    .await;
    assert_eq!(list(&mut c, "full").await.len(), 5);
    for server in servers {
        server.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_outage_makes_replicas_unready_and_they_catch_up_after() {
    if !etcd_present() {
        return;
    }
    let mut etcd = Etcd::start().await;
    let mut config = replica_config(&etcd, "/t/outage/");
    config.metrics_addr = Some("127.0.0.1:0".into());
    let servers = [start(config.clone()).await, start(config).await];
    let (mut a, mut b) = (client(&servers[0]).await, client(&servers[1]).await);
    let mut watch_b = watch(&mut b, "c").await;
    next(&mut watch_b).await;
    a.affiliate_update(update("c", "before", Some(b"d"), &[]))
        .await
        .unwrap();
    assert_eq!(next(&mut watch_b).await.affiliates[0].id, "before");

    etcd.kill();
    let metrics = servers[1].metrics_addr.unwrap();
    eventually(
        Duration::from_secs(15),
        "replica B reports not ready",
        || async move { http_get(metrics, "/readyz").await.0 == 503 },
    )
    .await;
    let refused = a
        .affiliate_update(update("c", "during", Some(b"d"), &[]))
        .await
        .expect_err("a write without etcd fails");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    // The watcher keeps what it has: its stream stays open and the mirror still lists.
    assert_eq!(list(&mut b, "c").await.len(), 1);

    etcd.run().await;
    eventually(
        Duration::from_secs(20),
        "replica B is ready again",
        || async move { http_get(metrics, "/readyz").await.0 == 200 },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "a write goes through again",
        || {
            let mut a = a.clone();
            async move {
                a.affiliate_update(update("c", "after", Some(b"d"), &[]))
                    .await
                    .is_ok()
            }
        },
    )
    .await;
    let after = loop {
        let message = next(&mut watch_b).await;
        if message.affiliates.iter().any(|a| a.id == "after") {
            break message;
        }
    };
    assert!(!after.deleted);
    let ids: Vec<String> = list(&mut b, "c").await.into_iter().map(|a| a.id).collect();
    assert_eq!(ids, ["after", "before"]);
    for server in servers {
        server.shutdown().await.unwrap();
    }
}
