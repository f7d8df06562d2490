//! Several replicas on one etcd (Debian's `etcd-server`, started here on loopback): a change
//! written through one replica reaches the watchers of another, TTLs expire everywhere, the
//! per-cluster limit holds across replicas, and an etcd outage is survived.
//!
//! Needs the `etcd` binary (scripts/test.sh installs etcd-server). Without it the tests fail
//! saying so, unless `OPENSPAN_SKIP_ETCD_TESTS=1` is set, in which case they say they skip.

mod common;

use std::time::{Duration, Instant};

use common::child::ChildServer;
use common::etcd::{Etcd, etcd_present};
use common::*;
use discovery_server::server::{Config, Running, StoreKind};
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

    // Both replicas list the same (A's mirror follows within moments); a delete through B is a
    // tombstone on A's watchers.
    eventually(Duration::from_secs(5), "A lists what B lists", || {
        let (mut a, mut b) = (a.clone(), b.clone());
        async move { list(&mut a, "c").await == list(&mut b, "c").await }
    })
    .await;
    let mut watch_a = watch(&mut a, "c").await;
    assert_eq!(next(&mut watch_a).await.affiliates.len(), 1);
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

/// A replica as a child process (so it can be frozen with SIGSTOP or killed).
async fn child_replica(etcd: &Etcd, prefix: &str) -> ChildServer {
    let endpoints = format!("--etcd-endpoints={}", etcd.config(prefix).endpoints[0]);
    let prefix = format!("--etcd-prefix={prefix}");
    ChildServer::start(&[
        "--ip-rate-limit=0",
        "--store=etcd",
        &endpoints,
        &prefix,
        "--etcd-lease-bucket=1s",
    ])
    .await
}

/// A replica frozen while the cluster changes, etcd's history is compacted past it and etcd
/// restarts: when it runs again its watchers get every difference (the tombstone included) and
/// end up with what the other replica has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_a_compaction_relists_and_its_watchers_converge() {
    if !etcd_present() {
        return;
    }
    let mut etcd = Etcd::start().await;
    let prefix = "/t/compact/";
    let a_server = start(replica_config(&etcd, prefix)).await;
    let mut a = client(&a_server).await;
    let b = child_replica(&etcd, prefix).await;
    let mut b_client = b.client().await;
    a.affiliate_update(update("c", "keep", Some(b"k"), &[]))
        .await
        .unwrap();
    a.affiliate_update(update("c", "gone", Some(b"g"), &[]))
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "B mirrors both", || {
        let mut b = b_client.clone();
        async move { list(&mut b, "c").await.len() == 2 }
    })
    .await;
    let mut watch_b = watch(&mut b_client, "c").await;
    assert_eq!(next(&mut watch_b).await.affiliates.len(), 2);

    b.signal("STOP");
    a.affiliate_delete(openspan_proto::discovery::server::AffiliateDeleteRequest {
        cluster_id: "c".into(),
        affiliate_id: "gone".into(),
    })
    .await
    .unwrap();
    a.affiliate_update(update("c", "new", Some(b"n"), &[]))
        .await
        .unwrap();
    let mut admin = etcd_client::Client::connect([etcd.config(prefix).endpoints[0].clone()], None)
        .await
        .unwrap();
    let revision = admin
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    admin
        .compact(
            revision,
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await
        .unwrap();
    etcd.kill();
    etcd.run().await;
    b.signal("CONT");

    // B's watcher sees the tombstone and the new affiliate, and B lists what A lists.
    let (mut tombstone, mut added) = (false, false);
    let started = Instant::now();
    while !(tombstone && added) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "B's watcher did not converge; B's log: {}",
            std::fs::read_to_string(&b.log).unwrap_or_default()
        );
        let message = next(&mut watch_b).await;
        for affiliate in &message.affiliates {
            tombstone |= message.deleted && affiliate.id == "gone";
            added |= !message.deleted && affiliate.id == "new";
        }
    }
    eventually(Duration::from_secs(10), "B lists what A lists", || {
        let (mut a, mut b) = (a.clone(), b_client.clone());
        async move { list(&mut a, "c").await == list(&mut b, "c").await }
    })
    .await;
    a_server.shutdown().await.unwrap();
}

/// The next frame a subscription yields.
async fn next_frame(
    subscription: &mut discovery_server::backend::WatchSubscription,
) -> bytes::Bytes {
    use discovery_server::backend::WatchItem;
    std::future::poll_fn(|cx| match subscription.poll_next(cx) {
        std::task::Poll::Ready(WatchItem::Data(frame)) => std::task::Poll::Ready(frame),
        std::task::Poll::Ready(other) => panic!("{other:?}"),
        std::task::Poll::Pending => std::task::Poll::Pending,
    })
    .await
}

/// Re-listing after a lost watch: a replica that stopped following etcd while another changed
/// the cluster catches up by listing, and its watchers get exactly the difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catching_up_sends_watchers_the_difference() {
    use discovery_server::backend::Backend;
    use discovery_server::etcd::EtcdBackend;
    if !etcd_present() {
        return;
    }
    let etcd = Etcd::start().await;
    let prefix = "/t/catchup/";
    let other = start(replica_config(&etcd, prefix)).await;
    let mut a = client(&other).await;
    a.affiliate_update(update("c", "keep", Some(b"k"), &[]))
        .await
        .unwrap();
    a.affiliate_update(update("c", "gone", Some(b"g"), &[]))
        .await
        .unwrap();
    let lagging = EtcdBackend::start(
        &etcd.config(prefix),
        discovery_server::limits::Limits::default(),
        std::sync::Arc::new(discovery_server::clock::SystemClock::new()),
        discovery_server::backend::WatchLimits::default(),
        prometheus_client::metrics::counter::Counter::default(),
    )
    .await
    .unwrap();
    let mut subscription = lagging.watch("c").await.unwrap();
    let snapshot = tokio::time::timeout(Duration::from_secs(5), next_frame(&mut subscription))
        .await
        .unwrap();
    let snapshot = discovery_server::grpc::decode_unary_frame::<
        openspan_proto::discovery::server::WatchResponse,
    >(snapshot)
    .unwrap();
    assert_eq!(snapshot.affiliates.len(), 2);

    // It stops following; the cluster changes meanwhile.
    // `stop` only cancels; the follower notices at its next turn. A second (was 200 ms) for
    // that turn to come on a loaded machine before the changes below reach etcd's watch.
    lagging.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.affiliate_delete(openspan_proto::discovery::server::AffiliateDeleteRequest {
        cluster_id: "c".into(),
        affiliate_id: "gone".into(),
    })
    .await
    .unwrap();
    a.affiliate_update(update("c", "new", Some(b"n"), &[]))
        .await
        .unwrap();
    a.affiliate_update(update("c", "keep", Some(b"k"), &[]))
        .await
        .unwrap();
    assert_eq!(
        lagging.catch_up().await.unwrap(),
        2,
        "one tombstone, one upsert"
    );
    let mut seen = Vec::new();
    for _ in 0..2 {
        let frame = tokio::time::timeout(Duration::from_secs(5), next_frame(&mut subscription))
            .await
            .unwrap();
        let message = discovery_server::grpc::decode_unary_frame::<
            openspan_proto::discovery::server::WatchResponse,
        >(frame)
        .unwrap();
        seen.push((message.affiliates[0].id.clone(), message.deleted));
    }
    seen.sort();
    assert_eq!(seen, [("gone".to_owned(), true), ("new".to_owned(), false)]);
    other.shutdown().await.unwrap();
}

/// The etcd leader is killed while a client writes through one replica and another replica's
/// watcher follows: every acknowledged change reaches the watcher once, in order, and nothing
/// else does (a write that failed is retried with the same data, which is no news).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_etcd_leader_loses_and_duplicates_nothing() {
    use common::etcd::EtcdCluster;
    if !etcd_present() {
        return;
    }
    let mut cluster = EtcdCluster::start(3).await;
    let config = |prefix: &str| Config {
        store: StoreKind::Etcd(Box::new(cluster.config(prefix))),
        ..test_config()
    };
    let servers = [
        start(config("/t/leader/")).await,
        start(config("/t/leader/")).await,
    ];
    let (mut a, mut b) = (client(&servers[0]).await, client(&servers[1]).await);
    let mut watch_b = watch(&mut b, "c").await;
    next(&mut watch_b).await;

    let writes = 120u32;
    let writer = tokio::spawn(async move {
        let mut retries = 0;
        for i in 0..writes {
            let data = format!("v{i}");
            loop {
                match a
                    .affiliate_update(update("c", "n", Some(data.as_bytes()), &[]))
                    .await
                {
                    Ok(_) => break,
                    Err(status) => {
                        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                        retries += 1;
                        assert!(retries < 400, "etcd did not recover: {status:?}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        retries
    });
    // Kill the leader once the writes are under way.
    loop {
        let seen = next(&mut watch_b).await;
        if seen.affiliates[0].data == "v10".as_bytes() {
            break;
        }
    }
    let leader = cluster.leader().await;
    cluster.kill(leader);
    let killed = Instant::now();
    let mut expected = 11u32;
    while expected < writes {
        let message = tokio::time::timeout(Duration::from_secs(30), watch_b.message())
            .await
            .expect("the watcher goes on after the leader is killed")
            .unwrap()
            .unwrap();
        let data = String::from_utf8(message.affiliates[0].data.to_vec()).unwrap();
        assert_eq!(
            data,
            format!("v{expected}"),
            "in order, none lost, none twice"
        );
        expected += 1;
    }
    let retries = writer.await.unwrap();
    eprintln!(
        "leader (member {leader}) killed: all {writes} writes seen once and in order; {retries} retried writes; the rest arrived within {:?} of the kill",
        killed.elapsed()
    );
    assert_quiet(&mut watch_b, Duration::from_millis(500)).await;
    for server in servers {
        server.shutdown().await.unwrap();
    }
}

/// A replica killed (SIGKILL) loses nothing: what was written through it lives in etcd, its
/// clients reconnect to another replica, get the whole state in their new snapshot, and go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_clients_move_to_another_and_converge() {
    if !etcd_present() {
        return;
    }
    let etcd = Etcd::start().await;
    let prefix = "/t/killed/";
    let doomed = child_replica(&etcd, prefix).await;
    let survivor = start(replica_config(&etcd, prefix)).await;
    let mut via_doomed = doomed.client().await;
    for i in 0..20 {
        via_doomed
            .affiliate_update(update("c", &format!("node-{i:02}"), Some(b"d"), &[b"ep"]))
            .await
            .unwrap();
    }
    let mut watch_doomed = watch(&mut via_doomed, "c").await;
    assert_eq!(next(&mut watch_doomed).await.affiliates.len(), 20);

    let mut doomed = doomed;
    let _ = doomed.child.kill();
    let _ = doomed.child.wait();
    // The stream on the dead replica ends; the client moves to the survivor.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = watch_doomed.message().await {}
    })
    .await;
    assert!(ended.is_ok(), "the dead replica's stream ends");
    let mut moved = client(&survivor).await;
    let mut watch_survivor = watch(&mut moved, "c").await;
    let snapshot = next(&mut watch_survivor).await;
    assert_eq!(
        snapshot.affiliates.len(),
        20,
        "nothing written through the killed replica is lost"
    );
    moved
        .affiliate_update(update("c", "node-20", Some(b"d"), &[]))
        .await
        .unwrap();
    assert_eq!(next(&mut watch_survivor).await.affiliates[0].id, "node-20");
    survivor.shutdown().await.unwrap();
}

/// The mirror does not wait for etcd: a record past the expiry its writer stored is tombstoned by
/// the replica's own collection, even while etcd still holds it (its lease bucket has not ended;
/// after an etcd leader election leases even start their TTL over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_expire_records_on_time_even_when_etcd_is_late() {
    if !etcd_present() {
        return;
    }
    let etcd = Etcd::start().await;
    let mut config = replica_config(&etcd, "/t/late/");
    config.gc_interval = Duration::from_millis(200);
    if let discovery_server::server::StoreKind::Etcd(etcd_config) = &mut config.store {
        // Leases a minute long: etcd would delete the record only then.
        etcd_config.lease_bucket = Duration::from_secs(60);
    }
    let server = start(config).await;
    let mut c = client(&server).await;
    let mut w = watch(&mut c, "c").await;
    next(&mut w).await;
    c.affiliate_update(with_ttl(update("c", "short", Some(b"d"), &[]), 2))
        .await
        .unwrap();
    assert_eq!(next(&mut w).await.affiliates[0].id, "short");
    let written = Instant::now();
    let tombstone = tokio::time::timeout(Duration::from_secs(30), w.message())
        .await
        .expect("a tombstone within 30 s")
        .unwrap()
        .unwrap();
    assert!(tombstone.deleted, "{tombstone:?}");
    let after = written.elapsed();
    // The bound tells the replica's own collection (2 s TTL, 200 ms checks) from etcd's 60 s
    // lease, with room for a loaded machine (5 s left under 3 s of slack).
    assert!(
        after < Duration::from_secs(20),
        "tombstoned {after:?} after a 2 s TTL"
    );
    assert!(list(&mut c, "c").await.is_empty());
    server.shutdown().await.unwrap();
}

/// etcd frozen (SIGSTOP: connections open, nothing answered): the replica notices its silent
/// watch (it asks for progress and gets none), reports not ready, and is ready again once etcd
/// answers, with the changes made meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_etcd_is_noticed_and_survived() {
    if !etcd_present() {
        return;
    }
    let etcd = Etcd::start().await;
    let mut config = replica_config(&etcd, "/t/frozen/");
    config.metrics_addr = Some("127.0.0.1:0".into());
    let server = start(config).await;
    let metrics = server.metrics_addr.unwrap();
    let mut c = client(&server).await;
    c.affiliate_update(update("c", "a", Some(b"d"), &[]))
        .await
        .unwrap();
    etcd.signal("STOP");
    let frozen = Instant::now();
    eventually(
        Duration::from_secs(40),
        "the replica reports not ready",
        || async move { http_get(metrics, "/readyz").await.0 == 503 },
    )
    .await;
    eprintln!("a frozen etcd noticed after {:?}", frozen.elapsed());
    etcd.signal("CONT");
    eventually(Duration::from_secs(30), "ready again", || async move {
        http_get(metrics, "/readyz").await.0 == 200
    })
    .await;
    eventually(Duration::from_secs(10), "writes go through again", || {
        let mut c = c.clone();
        async move {
            c.affiliate_update(update("c", "b", Some(b"d"), &[]))
                .await
                .is_ok()
        }
    })
    .await;
    eventually(Duration::from_secs(5), "the mirror has both", || {
        let mut c = c.clone();
        async move { list(&mut c, "c").await.len() == 2 }
    })
    .await;
    server.shutdown().await.unwrap();
}
