//! Races an etcd update must survive, forced at the exact point between its read and its write
//! (a clock whose next wall-clock reading runs a hook: the update reads the clock there), and a
//! state larger than one etcd answer. Found in review; each failed before its fix.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::etcd::{Etcd, etcd_present};
use discovery_server::backend::{Backend, WatchLimits};
use discovery_server::clock::{Clock, SystemClock};
use discovery_server::etcd::EtcdBackend;
use discovery_server::limits::{Limits, Update};

type Hook = Box<dyn FnOnce() + Send>;

/// A clock that runs a hook on its next `wall()` call: try_update's first `wall()` is between
/// its read transaction and its write transaction.
struct HookClock {
    inner: SystemClock,
    hook: Mutex<Option<Hook>>,
}

impl Clock for HookClock {
    fn monotonic(&self) -> i64 {
        self.inner.monotonic()
    }
    fn wall(&self) -> i64 {
        let hook = self.hook.lock().unwrap().take();
        if let Some(hook) = hook {
            hook();
        }
        self.inner.wall()
    }
}

/// Runs async etcd work on its own thread and runtime, synchronously.
fn on_etcd<F, Fut>(url: String, work: F)
where
    F: FnOnce(etcd_client::Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let client = etcd_client::Client::connect([url], None).await.unwrap();
            work(client).await;
        });
    })
    .join()
    .unwrap();
}

fn hexs(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn upd(cluster: &str, affiliate: &str, data: Option<&[u8]>, endpoints: &[&[u8]]) -> Update {
    Update {
        cluster_id: cluster.into(),
        affiliate_id: affiliate.into(),
        data: data.map(Bytes::copy_from_slice),
        endpoints: endpoints
            .iter()
            .map(|e| Bytes::copy_from_slice(e))
            .collect(),
        ttl: Duration::from_secs(60),
    }
}

async fn backend(
    etcd: &Etcd,
    prefix: &str,
    limits: Limits,
    clock: Arc<HookClock>,
) -> Arc<EtcdBackend> {
    EtcdBackend::start(
        &etcd.config(prefix),
        limits,
        clock,
        WatchLimits::default(),
        prometheus_client::metrics::counter::Counter::default(),
    )
    .await
    .unwrap()
}

/// AffiliateDelete (through any replica) lands between an update's read and its write: the
/// deleted affiliate must not come back with its old data (as the embedded store, the update
/// then creates an affiliate with empty data and only the new endpoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_between_read_and_write_is_undone() {
    if !etcd_present() {
        return;
    }
    let etcd = Etcd::start().await;
    let prefix = "/t/race-del/";
    let url = etcd.config(prefix).endpoints[0].clone();
    let clock = Arc::new(HookClock {
        inner: SystemClock::new(),
        hook: Mutex::new(None),
    });
    let b = backend(&etcd, prefix, Limits::default(), clock.clone()).await;
    b.update(upd("c", "a", Some(b"OLD-SECRET"), &[b"e1"]))
        .await
        .unwrap();

    let cluster_prefix = format!("{prefix}c/{}/", hexs("c"));
    let del_url = url.clone();
    *clock.hook.lock().unwrap() = Some(Box::new(move || {
        on_etcd(del_url, move |mut client| async move {
            client
                .delete(
                    cluster_prefix,
                    Some(etcd_client::DeleteOptions::new().with_prefix()),
                )
                .await
                .unwrap();
        });
    }));
    b.update(upd("c", "a", None, &[b"e2"])).await.unwrap();

    let data_key = format!("{prefix}c/{}/d/{}", hexs("c"), hexs("a"));
    let mut client = etcd_client::Client::connect([url], None).await.unwrap();
    let got = client.get(data_key, None).await.unwrap();
    let value = got.kvs().first().map(|kv| kv.value()[8..].to_vec());
    assert_ne!(
        value.as_deref(),
        Some(&b"OLD-SECRET"[..]),
        "the deleted affiliate's data was resurrected by an update that raced the delete"
    );
}

/// The affiliate is deleted and another one created in the freed slot between the update's read
/// and write: the write must not re-create the affiliate over the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_limit_is_exceeded_by_a_racing_delete_and_create() {
    if !etcd_present() {
        return;
    }
    let etcd = Etcd::start().await;
    let prefix = "/t/race-limit/";
    let url = etcd.config(prefix).endpoints[0].clone();
    let clock = Arc::new(HookClock {
        inner: SystemClock::new(),
        hook: Mutex::new(None),
    });
    let limits = Limits {
        max_affiliates_per_cluster: 1,
        ..Limits::default()
    };
    let b = backend(&etcd, prefix, limits, clock.clone()).await;
    b.update(upd("c", "a", Some(b"a"), &[])).await.unwrap();

    let cluster_prefix = format!("{prefix}c/{}/", hexs("c"));
    let b_key = format!("{cluster_prefix}d/{}", hexs("b"));
    let hook_url = url.clone();
    *clock.hook.lock().unwrap() = Some(Box::new(move || {
        on_etcd(hook_url, move |mut client| async move {
            // Another replica: delete a, then create b (the slot is free).
            client
                .delete(format!("{cluster_prefix}d/{}", hexs("a")), None)
                .await
                .unwrap();
            let mut value = (i64::MAX / 2).to_be_bytes().to_vec();
            value.extend_from_slice(b"b");
            client.put(b_key, value, None).await.unwrap();
        });
    }));
    // The update finds its affiliate gone and the slot taken: it is now a creation, refused.
    let refused = b.update(upd("c", "a", Some(b"a2"), &[])).await;
    assert!(
        matches!(
            refused,
            Err(discovery_server::limits::StoreError::ResourceExhausted(_))
        ),
        "{refused:?}"
    );

    let mut client = etcd_client::Client::connect([url], None).await.unwrap();
    let count = client
        .get(
            format!("{prefix}c/{}/d/", hexs("c")),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .unwrap()
        .count();
    assert!(count <= 1, "cluster limit 1, etcd holds {count} affiliates");
}

/// A state over 4 MiB (2,500 affiliates with 2 KB of data: a few large clusters) loads: the state
/// is listed in pages, not in one answer over etcd-client's 4 MiB decoding limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_over_4_mib_cannot_be_loaded() {
    if !etcd_present() {
        return;
    }
    let etcd = Etcd::start().await;
    let prefix = "/t/big/";
    let url = etcd.config(prefix).endpoints[0].clone();
    let mut client = etcd_client::Client::connect([url], None).await.unwrap();
    let expiry = (i64::MAX / 2).to_be_bytes();
    for batch in 0..25 {
        let ops: Vec<etcd_client::TxnOp> = (0..100)
            .map(|i| {
                let key = format!(
                    "{prefix}c/{}/d/{}",
                    hexs(&format!("c{batch}")),
                    hexs(&format!("n{i}"))
                );
                let mut value = expiry.to_vec();
                value.extend_from_slice(&[7u8; 2000]);
                etcd_client::TxnOp::put(key, value, None)
            })
            .collect();
        client
            .txn(etcd_client::Txn::new().and_then(ops))
            .await
            .unwrap();
    }
    let clock = Arc::new(HookClock {
        inner: SystemClock::new(),
        hook: Mutex::new(None),
    });
    let started = EtcdBackend::start(
        &etcd.config(prefix),
        Limits::default(),
        clock,
        WatchLimits::default(),
        prometheus_client::metrics::counter::Counter::default(),
    )
    .await;
    assert!(
        started.is_ok(),
        "2,500 affiliates of 2 KB: {:?}",
        started.err()
    );
}
