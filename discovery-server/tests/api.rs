//! The Cluster API's semantics over real gRPC on loopback.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::etcd::{Etcd, etcd_present};
use common::*;
use discovery_server::limits::Limits;
use discovery_server::server::Config;
use openspan_proto::discovery::server::{AffiliateDeleteRequest, AffiliateUpdateRequest};
use tonic::Code;

/// Runs a test body on the embedded store (`$memory`) and with the state in a real etcd
/// (`$etcd`): the same semantics on both.
macro_rules! on_both_stores {
    ($memory:ident, $etcd:ident, $body:ident) => {
        #[tokio::test]
        async fn $memory() {
            $body(test_config()).await;
        }

        #[tokio::test]
        async fn $etcd() {
            if !etcd_present() {
                return;
            }
            let etcd = Etcd::start().await;
            $body(etcd.replica_config("/conformance/")).await;
            drop(etcd);
        }
    };
}

on_both_stores!(
    data_is_replaced_when_present_and_endpoints_merge,
    data_is_replaced_when_present_and_endpoints_merge_on_etcd,
    data_is_replaced_when_present_and_endpoints_merge_on
);
async fn data_is_replaced_when_present_and_endpoints_merge_on(base: Config) {
    let server = start(base).await;
    let mut c = client(&server).await;
    c.affiliate_update(update("c", "a", Some(b"v1"), &[b"e1", b"e2"]))
        .await
        .unwrap();
    c.affiliate_update(update("c", "a", None, &[b"e2", b"e3"]))
        .await
        .unwrap();
    let listed = list(&mut c, "c").await;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].data,
        Bytes::from_static(b"v1"),
        "absent data keeps what is stored"
    );
    assert_eq!(
        listed[0].endpoints,
        [&b"e1"[..], b"e2", b"e3"],
        "merged, de-duplicated, arrival order"
    );
    c.affiliate_update(update("c", "a", Some(b"v2"), &[]))
        .await
        .unwrap();
    assert_eq!(list(&mut c, "c").await[0].data, Bytes::from_static(b"v2"));
    server.shutdown().await.unwrap();
}

on_both_stores!(
    limits_answer_with_the_reference_codes_and_change_nothing,
    limits_answer_with_the_reference_codes_and_change_nothing_on_etcd,
    limits_answer_with_the_reference_codes_and_change_nothing_on
);
async fn limits_answer_with_the_reference_codes_and_change_nothing_on(base: Config) {
    let mut config = base;
    config.limits = Limits {
        max_affiliates_per_cluster: 2,
        max_endpoints_per_affiliate: 3,
        ..Limits::default()
    };
    let server = start(config).await;
    let mut c = client(&server).await;
    c.affiliate_update(update("c", "a", Some(b"ok"), &[b"e1"]))
        .await
        .unwrap();

    let long = "x".repeat(257);
    let invalid: Vec<(&str, AffiliateUpdateRequest)> = vec![
        ("empty cluster id", update("", "a", Some(b"d"), &[])),
        ("long cluster id", update(&long, "a", Some(b"d"), &[])),
        ("empty affiliate id", update("c", "", Some(b"d"), &[])),
        ("long affiliate id", update("c", &long, Some(b"d"), &[])),
        ("data over 2048", update("c", "a", Some(&[7; 2049]), &[])),
        (
            "endpoint over 32",
            update("c", "a", Some(b"d"), &[&[1; 33]]),
        ),
        (
            "ttl over 30 min",
            AffiliateUpdateRequest {
                ttl: Some(prost_types::Duration {
                    seconds: 1801,
                    nanos: 0,
                }),
                ..update("c", "a", Some(b"d"), &[])
            },
        ),
        (
            "negative ttl",
            AffiliateUpdateRequest {
                ttl: Some(prost_types::Duration {
                    seconds: -1,
                    nanos: 0,
                }),
                ..update("c", "a", Some(b"d"), &[])
            },
        ),
    ];
    for (what, request) in invalid {
        let status = c.affiliate_update(request).await.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(!status.message().is_empty(), "{what}: the status says why");
    }
    c.affiliate_update(update("c", "b", Some(b"d"), &[]))
        .await
        .unwrap();
    let status = c
        .affiliate_update(update("c", "third", Some(b"d"), &[]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let status = c
        .affiliate_update(update("c", "a", Some(b"changed"), &[b"e2", b"e3", b"e4"]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    let listed = list(&mut c, "c").await;
    assert_eq!(listed.len(), 2);
    assert_eq!(
        listed[0].data,
        Bytes::from_static(b"ok"),
        "refused requests changed nothing"
    );
    assert_eq!(listed[0].endpoints.len(), 1);
    for (what, status) in [
        (
            "list",
            c.list(openspan_proto::discovery::server::ListRequest {
                cluster_id: String::new(),
            })
            .await
            .unwrap_err(),
        ),
        (
            "delete",
            c.affiliate_delete(AffiliateDeleteRequest {
                cluster_id: "c".into(),
                affiliate_id: String::new(),
            })
            .await
            .unwrap_err(),
        ),
    ] {
        assert_eq!(status.code(), Code::InvalidArgument, "{what}");
    }
    server.shutdown().await.unwrap();
}

on_both_stores!(
    watch_sends_snapshot_then_deltas_then_tombstones,
    watch_sends_snapshot_then_deltas_then_tombstones_on_etcd,
    watch_sends_snapshot_then_deltas_then_tombstones_on
);
async fn watch_sends_snapshot_then_deltas_then_tombstones_on(base: Config) {
    let server = start(base).await;
    let mut c = client(&server).await;
    let mut empty = watch(&mut c, "c").await;
    let first = next(&mut empty).await;
    assert!(
        first.affiliates.is_empty() && !first.deleted,
        "an empty snapshot is still sent: {first:?}"
    );

    c.affiliate_update(update("c", "a", Some(b"d1"), &[b"e1"]))
        .await
        .unwrap();
    let delta = next(&mut empty).await;
    assert!(!delta.deleted);
    assert_eq!(delta.affiliates.len(), 1);
    assert_eq!(
        (
            delta.affiliates[0].id.as_str(),
            &delta.affiliates[0].data[..]
        ),
        ("a", &b"d1"[..])
    );

    // A refresh that changes nothing visible is not broadcast; a new endpoint is, with full state.
    c.affiliate_update(update("c", "a", Some(b"d1"), &[b"e1"]))
        .await
        .unwrap();
    c.affiliate_update(update("c", "a", None, &[b"e2"]))
        .await
        .unwrap();
    let delta = next(&mut empty).await;
    assert_eq!(delta.affiliates[0].data, Bytes::from_static(b"d1"));
    assert_eq!(delta.affiliates[0].endpoints, [&b"e1"[..], b"e2"]);

    // A second watcher gets the current state as its snapshot.
    let mut late = watch(&mut c, "c").await;
    let snapshot = next(&mut late).await;
    assert_eq!(snapshot.affiliates.len(), 1);
    assert_eq!(snapshot.affiliates[0].endpoints.len(), 2);

    c.affiliate_delete(AffiliateDeleteRequest {
        cluster_id: "c".into(),
        affiliate_id: "a".into(),
    })
    .await
    .unwrap();
    for stream in [&mut empty, &mut late] {
        let tombstone = next(stream).await;
        assert!(tombstone.deleted);
        assert_eq!(tombstone.affiliates[0].id, "a");
    }
    // Deleting again is not an error and sends nothing.
    c.affiliate_delete(AffiliateDeleteRequest {
        cluster_id: "c".into(),
        affiliate_id: "a".into(),
    })
    .await
    .unwrap();
    assert_quiet(&mut empty, Duration::from_millis(200)).await;
    server.shutdown().await.unwrap();
}

on_both_stores!(
    clusters_are_isolated,
    clusters_are_isolated_on_etcd,
    clusters_are_isolated_on
);
async fn clusters_are_isolated_on(base: Config) {
    let server = start(base).await;
    let mut c = client(&server).await;
    let mut other = watch(&mut c, "other").await;
    assert!(next(&mut other).await.affiliates.is_empty());
    c.affiliate_update(update("mine", "a", Some(b"secret"), &[]))
        .await
        .unwrap();
    assert!(list(&mut c, "other").await.is_empty());
    assert_eq!(list(&mut c, "mine").await.len(), 1);
    assert_quiet(&mut other, Duration::from_millis(300)).await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn expiry_removes_affiliates_and_endpoints_and_notifies_watchers() {
    let mut config = test_config();
    config.gc_interval = Duration::from_millis(20);
    let (server, clock) = start_with_manual_clock(config).await;
    let mut c = client(&server).await;
    let ttl = |seconds| Some(prost_types::Duration { seconds, nanos: 0 });
    c.affiliate_update(AffiliateUpdateRequest {
        ttl: ttl(60),
        ..update("c", "short", Some(b"d"), &[b"old"])
    })
    .await
    .unwrap();
    clock.advance(Duration::from_secs(30));
    c.affiliate_update(AffiliateUpdateRequest {
        ttl: ttl(60),
        ..update("c", "short", Some(b"d"), &[b"new"])
    })
    .await
    .unwrap();
    c.affiliate_update(AffiliateUpdateRequest {
        ttl: ttl(600),
        ..update("c", "long", Some(b"d"), &[])
    })
    .await
    .unwrap();
    let mut w = watch(&mut c, "c").await;
    assert_eq!(next(&mut w).await.affiliates.len(), 2);

    clock.advance(Duration::from_secs(31)); // "old" endpoint expired, affiliate kept by "new"
    let trimmed = next(&mut w).await;
    assert!(!trimmed.deleted);
    assert_eq!(trimmed.affiliates[0].id, "short");
    assert_eq!(trimmed.affiliates[0].endpoints, [&b"new"[..]]);

    clock.advance(Duration::from_secs(30)); // the whole affiliate expired
    let tombstone = next(&mut w).await;
    assert!(tombstone.deleted);
    assert_eq!(tombstone.affiliates[0].id, "short");
    let remaining: Vec<_> = list(&mut c, "c").await.into_iter().map(|a| a.id).collect();
    assert_eq!(remaining, ["long"]);
    server.shutdown().await.unwrap();
}

on_both_stores!(
    endpoint_only_update_creates_an_affiliate_without_data,
    endpoint_only_update_creates_an_affiliate_without_data_on_etcd,
    endpoint_only_update_creates_an_affiliate_without_data_on
);
async fn endpoint_only_update_creates_an_affiliate_without_data_on(base: Config) {
    let server = start(base).await;
    let mut c = client(&server).await;
    c.affiliate_update(update("c", "harvested", None, &[b"seen"]))
        .await
        .unwrap();
    let listed = list(&mut c, "c").await;
    assert!(listed[0].data.is_empty());
    assert_eq!(listed[0].endpoints, [&b"seen"[..]]);
    server.shutdown().await.unwrap();
}

on_both_stores!(
    a_slow_watcher_is_aborted_without_slowing_the_others,
    a_slow_watcher_is_aborted_without_slowing_the_others_on_etcd,
    a_slow_watcher_is_aborted_without_slowing_the_others_on
);
async fn a_slow_watcher_is_aborted_without_slowing_the_others_on(base: Config) {
    let mut config = base;
    config.watch_buffer = 4;
    let server = start(config).await;
    let addr = server.grpc_addr.unwrap();
    // The slow watcher's connection has small HTTP/2 windows, so unread messages back up fast.
    let slow_channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut slow_client =
        openspan_proto::discovery::server::cluster_client::ClusterClient::new(slow_channel);
    let mut slow = watch(&mut slow_client, "c").await;
    next(&mut slow).await;
    let mut c = client(&server).await;
    let mut fast = watch(&mut c, "c").await;
    next(&mut fast).await;

    let updates = 400;
    let writer = {
        let mut c = c.clone();
        tokio::spawn(async move {
            for i in 0..updates {
                let data = vec![(i % 251) as u8; 2000];
                c.affiliate_update(update("c", &format!("a{}", i % 50), Some(&data), &[]))
                    .await
                    .unwrap();
            }
        })
    };
    for _ in 0..updates {
        next(&mut fast).await;
    }
    writer.await.unwrap();

    // The slow one now reads: a few buffered messages, then the stream ends with Aborted.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match slow.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the slow watcher's stream ends");
    assert_eq!(ended.code(), Code::Aborted, "{ended:?}");
    assert!(
        ended.message().contains("subscription canceled"),
        "{ended:?}"
    );

    // It re-syncs by watching again.
    let mut again = watch(&mut slow_client, "c").await;
    assert_eq!(next(&mut again).await.affiliates.len(), 50);
    server.shutdown().await.unwrap();
}

on_both_stores!(
    shutdown_ends_watch_streams_with_unavailable,
    shutdown_ends_watch_streams_with_unavailable_on_etcd,
    shutdown_ends_watch_streams_with_unavailable_on
);
async fn shutdown_ends_watch_streams_with_unavailable_on(base: Config) {
    let server = start(base).await;
    let mut c = client(&server).await;
    let mut w = watch(&mut c, "c").await;
    next(&mut w).await;
    let stopping = tokio::spawn(server.shutdown());
    let status = tokio::time::timeout(Duration::from_secs(5), w.message())
        .await
        .expect("the stream ends")
        .expect_err("with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    stopping.await.unwrap().unwrap();
}
