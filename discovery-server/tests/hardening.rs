//! The attacks of issue 11, in bounded form, over real sockets on loopback, each asserting the
//! bound the server must keep. Memory is measured on a server running as a child process (its
//! peak RSS, VmHWM, from /proc), so the test's own clients do not count.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use common::child::ChildServer;
use common::raw::{RawH2, cluster_request, grpc_headers};
use common::*;
use discovery_server::grpc::AdmissionConfig;
use discovery_server::ratelimit::RateLimit;
use openspan_proto::discovery::server::{HelloRequest, cluster_client::ClusterClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Endpoint;

const MIB: u64 = 1 << 20;
const HELLO: &str = "/sidero.discovery.server.Cluster/Hello";
const WATCH: &str = "/sidero.discovery.server.Cluster/Watch";
const LIST: &str = "/sidero.discovery.server.Cluster/List";

/// The test needs this many open files; the server raises its own limit the same way.
fn need_files(n: u64) {
    let limit = discovery_server::net::raise_fd_limit().unwrap_or(0);
    assert!(
        limit >= n,
        "this test opens about {n} sockets but the open-file limit is {limit}: run it with a higher `ulimit -n`"
    );
}

/// Another client, from its own loopback address, sending `Hello` every 100 ms until stopped.
/// Returns (failures, every answer's time).
///
/// It runs on a thread and runtime of its own: on the attack's runtime its timer and replies
/// would wait behind the attacking tasks' turns (two workers, busy), and what it measured would
/// be the test's own scheduling on a loaded machine, not the server's answer time.
fn hello_prober(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u64, Vec<Duration>)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the prober");
    std::thread::spawn(move || {
        runtime.block_on(async move {
            let channel = Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .local_address(Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))))
                .connect_lazy();
            let mut client = ClusterClient::new(channel);
            let (mut failures, mut times) = (0, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                let mut request = tonic::Request::new(HelloRequest {
                    cluster_id: "probe".into(),
                    client_version: "probe".into(),
                });
                request.set_timeout(Duration::from_secs(5));
                if client.hello(request).await.is_err() {
                    failures += 1;
                }
                times.push(started.elapsed());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (failures, times)
        })
    })
}

/// Every call of the other client answered (5 s deadline), and all but one (or 2 %) of them
/// within 1 s. Not every one: on a shared 2-core machine (load average 8 to 13 while CI builds) a
/// single call in a few hundred took 1.25 s under the 300,000-stream attack; an attack that
/// starved the other client would slow most of its calls, not one.
async fn assert_prober_ok(
    stop: Arc<AtomicBool>,
    prober: std::thread::JoinHandle<(u64, Vec<Duration>)>,
) {
    stop.store(true, Ordering::SeqCst);
    let (failures, mut times) = tokio::task::spawn_blocking(move || prober.join())
        .await
        .unwrap()
        .unwrap();
    times.sort();
    let calls = times.len();
    let slow = times
        .iter()
        .filter(|t| **t > Duration::from_secs(1))
        .count();
    let median = times.get(calls / 2).copied().unwrap_or_default();
    let slowest = times.last().copied().unwrap_or_default();
    eprintln!(
        "other client's Hello: {calls} calls, {failures} failed, median {median:?}, {slow} over 1 s, slowest {slowest:?}"
    );
    assert!(calls > 0);
    assert_eq!(
        failures, 0,
        "another client's Hello failed during the attack"
    );
    assert!(
        slow <= (calls / 50).max(1),
        "{slow} of {calls} of another client's Hello calls took over 1 s (bound: one, or 2 %; slowest {slowest:?})"
    );
}

/// 300,000 `Hello` streams over single connections that never send their request body, with
/// the server's default flags. Bound: peak RSS ≤ 256 MiB, others served (all within 5 s, all
/// but one or 2 % within 1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_finished_streams_keep_memory_bounded() {
    let server = ChildServer::start(&[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let prober = hello_prober(server.grpc, stop.clone());
    let headers = grpc_headers(HELLO, &[]);
    let started = Instant::now();
    let (mut sent, mut connections, mut refused, mut resets, mut answered) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    // Streams count as sent once the server has reacted to them (refused or answered), so a
    // connection the server closed cannot inflate the count. Bounded: 300,000 or 180 s.
    while sent < 300_000 && started.elapsed() < Duration::from_secs(180) {
        let mut h2 = RawH2::connect(server.grpc, None).await.expect("connect");
        connections += 1;
        let mut written = 0u64;
        let seen = h2.seen.clone();
        let reacted = || seen.refused.load(Ordering::SeqCst) + seen.finished.load(Ordering::SeqCst);
        while sent + written < 300_000 && !seen.closed.load(Ordering::SeqCst) {
            let write = h2.open_many(&headers, 100);
            match tokio::time::timeout(Duration::from_secs(5), write).await {
                Ok(Ok(())) => written += 100,
                _ => break,
            }
            // Keep at most a few hundred streams unanswered, as the limit allows 100 open.
            let waiting = Instant::now();
            while reacted() + 300 < written
                && !seen.closed.load(Ordering::SeqCst)
                && waiting.elapsed() < Duration::from_secs(15)
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        sent += reacted().min(written).max(written.saturating_sub(300));
        refused += seen.refused.load(Ordering::SeqCst);
        resets += seen.reset.load(Ordering::SeqCst);
        answered += seen.finished.load(Ordering::SeqCst);
    }
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let peak = server.status_kib("VmHWM:") * 1024;
    let now = server.status_kib("VmRSS:") * 1024;
    let rate_refused = server
        .metric("discovery_rate_limited_requests_total{outcome=\"refused\"}")
        .await;
    eprintln!(
        "never-finished streams: {sent} sent over {connections} connections in {elapsed:?}; server reset {resets} (refused {refused}), answered {answered}; rate-limit refusals {rate_refused}; server RSS peak {} MiB, now {} MiB",
        peak / MIB,
        now / MIB
    );
    assert!(sent >= 300_000, "the attack did not finish within 180 s");
    assert!(
        peak <= 256 * MIB,
        "server peak RSS {} MiB > 256 MiB",
        peak / MIB
    );
    assert!(
        resets > 0,
        "streams over the per-connection limit must be refused"
    );
    assert!(
        rate_refused > 0,
        "calls over the rate are refused when they open, though no body ever arrives"
    );
    assert_prober_ok(stop, prober).await;
}

/// 2,000 Watch streams that never read (zero flow-control window) while the cluster changes
/// between their subscriptions. Bound: all aborted by the publisher, peak RSS ≤ 256 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_reading_watchers_are_aborted_and_memory_stays_bounded() {
    let server = ChildServer::start(&["--ip-rate-limit=0"]).await;
    let channel = Endpoint::from_shared(format!("http://{}", server.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = ClusterClient::new(channel);
    // A 2 MB cluster: 1,000 affiliates with 2,000 bytes of data each.
    let data = vec![7u8; 2000];
    for i in 0..1000 {
        c.affiliate_update(update("big", &format!("node-{i:04}"), Some(&data), &[]))
            .await
            .unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let prober = hello_prober(server.grpc, stop.clone());
    let headers = grpc_headers(WATCH, &[]);
    let body = cluster_request("big");
    let mut connections = Vec::new();
    let mut version = 0u32;
    for _ in 0..20 {
        let mut h2 = RawH2::connect(server.grpc, Some(0)).await.unwrap();
        for i in 0..100 {
            h2.open(&headers, Some(&body)).await.unwrap();
            if i % 10 == 9 {
                // Change the cluster so the next watchers pin a different snapshot.
                version += 1;
                let data = [&data[..1996], &version.to_be_bytes()[..]].concat();
                c.affiliate_update(update("big", "node-0000", Some(&data), &[]))
                    .await
                    .unwrap();
            }
        }
        connections.push(h2);
    }
    // Every stream is subscribed (open, or already aborted) before the last changes.
    let started = Instant::now();
    loop {
        let open = server.metric("discovery_watchers ").await;
        let aborted = server.metric("discovery_watch_aborted_total").await;
        if open + aborted >= 2000 || started.elapsed() > Duration::from_secs(20) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Enough further changes that every watcher is over its message buffer.
    for v in 0..40u32 {
        let data = [&data[..1996], &(100_000 + v).to_be_bytes()[..]].concat();
        c.affiliate_update(update("big", "node-0001", Some(&data), &[]))
            .await
            .unwrap();
    }
    let started = Instant::now();
    let mut aborted = 0;
    while aborted < 2000 && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        aborted = server.metric("discovery_watch_aborted_total").await;
    }
    let peak = server.status_kib("VmHWM:") * 1024;
    let now = server.status_kib("VmRSS:") * 1024;
    eprintln!(
        "non-reading watchers: 2000 opened over 20 connections, {version} snapshot versions; aborted {aborted}; server RSS peak {} MiB, now {} MiB",
        peak / MIB,
        now / MIB
    );
    assert_eq!(aborted, 2000, "every non-reading watcher is aborted");
    assert!(
        peak <= 256 * MIB,
        "server peak RSS {} MiB > 256 MiB",
        peak / MIB
    );
    assert_prober_ok(stop, prober).await;
    drop(connections);
}

/// 380 List calls that are never read (zero flow-control window), of a 2 MB cluster changed
/// between them, so each would pin its own encoding (760 MB), plus ten Watch streams that never
/// read. Bounds: superseded encodings held stay within `--max-superseded-bytes` (calls over it
/// are refused at once), peak RSS ≤ 256 MiB, every stalled connection closed within
/// `--response-stall-timeout` plus one check period, and then nothing is held any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_lists_and_watches_are_cut_off_and_release_their_memory() {
    let stall = Duration::from_secs(3);
    let server = ChildServer::start(&[
        "--ip-rate-limit=0",
        "--response-stall-timeout=3s",
        "--max-superseded-bytes=32MiB",
    ])
    .await;
    let channel = Endpoint::from_shared(format!("http://{}", server.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = ClusterClient::new(channel);
    let data = vec![7u8; 2000];
    for i in 0..1000 {
        c.affiliate_update(update("big", &format!("node-{i:04}"), Some(&data), &[]))
            .await
            .unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let prober = hello_prober(server.grpc, stop.clone());
    let body = cluster_request("big");
    let mut watchers = RawH2::connect(server.grpc, Some(0)).await.unwrap();
    let opened = Instant::now();
    for _ in 0..10 {
        watchers
            .open(&grpc_headers(WATCH, &[]), Some(&body))
            .await
            .unwrap();
    }
    let list_headers = grpc_headers(LIST, &[]);
    let mut connections = Vec::new();
    let mut most_superseded = 0;
    for version in 0..380u32 {
        if version % 19 == 0 {
            connections.push((
                Instant::now(),
                RawH2::connect(server.grpc, Some(0)).await.unwrap(),
            ));
        }
        let (_, h2) = connections.last_mut().unwrap();
        h2.open(&list_headers, Some(&body)).await.unwrap();
        // Change the cluster so the next List needs a new encoding.
        let data = [&data[..1996], &version.to_be_bytes()[..]].concat();
        c.affiliate_update(update("big", "node-0000", Some(&data), &[]))
            .await
            .unwrap();
        if version % 10 == 0 {
            most_superseded =
                most_superseded.max(server.metric("discovery_superseded_bytes ").await);
        }
    }
    let refused: u64 = connections
        .iter()
        .map(|(_, h2)| h2.seen.finished.load(Ordering::SeqCst))
        .sum();
    // Every stalled connection is closed within the stall timeout and one check period.
    let limit = stall + Duration::from_secs(3);
    let mut slowest = Duration::ZERO;
    // Every connection ends up either cut (a response of it stalled) or with all its calls
    // answered (refused at once, or watchers aborted with their status sent: not stalled).
    let all: Vec<(Instant, &RawH2)> = connections
        .iter()
        .map(|(opened, h2)| (*opened, h2))
        .chain([(opened, &watchers)])
        .collect();
    let mut cut = 0;
    for (opened, h2) in &all {
        let answered = || h2.seen.finished.load(Ordering::SeqCst) >= u64::from(h2.streams_opened());
        let closed = || h2.seen.closed.load(Ordering::SeqCst);
        while !closed() && !answered() && opened.elapsed() < limit + Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            closed() || answered(),
            "a connection whose responses were never read is still open after {:?}",
            opened.elapsed()
        );
        if closed() {
            cut += 1;
            slowest = slowest.max(Duration::from_millis(
                h2.seen.closed_after_ms.load(Ordering::SeqCst),
            ));
        }
    }
    // The first Lists (before the budget ran out) can only stall: their connections are cut.
    // (The watchers may instead have been aborted, their status sent: answered, not stalled.)
    assert!(cut >= 1, "no stalled connection was cut");
    let superseded_after = server.metric("discovery_superseded_bytes ").await;
    let peak = server.status_kib("VmHWM:") * 1024;
    eprintln!(
        "unread Lists: 380 over 20 connections, {refused} refused; superseded bytes held at most {most_superseded}, after the cut {superseded_after}; {cut} stalled connections each closed within {slowest:?}; server RSS peak {} MiB",
        peak / MIB
    );
    assert!(
        slowest <= limit,
        "a stalled connection was closed only after {slowest:?} (stall timeout {stall:?})"
    );
    assert!(
        most_superseded <= 32 * MIB + 3 * MIB,
        "superseded encodings held: {most_superseded} bytes, over the 32 MiB budget and one encoding"
    );
    assert!(
        refused > 0,
        "Lists over the superseded budget are refused at once"
    );
    assert_eq!(
        superseded_after, 0,
        "cut-off streams release what they held"
    );
    assert!(
        peak <= 256 * MIB,
        "server peak RSS {} MiB > 256 MiB",
        peak / MIB
    );
    // The cluster is still listed in full to a client that reads.
    let listed = common::list(&mut c, "big").await;
    assert_eq!(listed.len(), 1000);
    assert_prober_ok(stop, prober).await;
}

/// Waits for the server to close `stream`; returns how long that took (None: not within `limit`).
async fn closed_within(mut stream: TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

/// 5,000 connections that never send the HTTP/2 preface (default handshake timeout) and 2,000
/// idle HTTP/1 connections to the landing page (idle timeout set to 2 s to keep the test short).
/// Bound: ≥ 95 % of each closed within 30 s, others' Hello answered throughout (all but one or
/// 2 % within 1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_connections_are_closed() {
    need_files(16_000);
    let mut config = test_config();
    config.landing_addr = Some("127.0.0.1:0".into());
    config.connections.http_idle_timeout = Duration::from_secs(2);
    let server = start(config).await;
    let (grpc, landing) = (server.grpc_addr.unwrap(), server.landing_addr.unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let prober = hello_prober(grpc, stop.clone());

    let mut silent = Vec::new();
    for _ in 0..5000 {
        let stream = TcpStream::connect(grpc).await.expect("connect");
        silent.push(tokio::spawn(closed_within(stream, Duration::from_secs(30))));
    }
    let mut idle = Vec::new();
    for _ in 0..2000 {
        let mut stream = TcpStream::connect(landing).await.expect("connect");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        idle.push(tokio::spawn(closed_within(stream, Duration::from_secs(30))));
    }
    let mut report = Vec::new();
    for (what, tasks) in [("silent gRPC", silent), ("idle HTTP/1", idle)] {
        let total = tasks.len();
        let mut closed = Vec::new();
        for task in tasks {
            if let Some(after) = task.await.unwrap() {
                closed.push(after);
            }
        }
        closed.sort();
        let slowest = closed.last().copied().unwrap_or_default();
        eprintln!(
            "{what}: {} of {total} closed within 30 s, slowest after {slowest:?}",
            closed.len()
        );
        report.push((what, closed.len(), total));
    }
    for (what, closed, total) in report {
        assert!(
            closed * 100 >= total * 95,
            "{what}: only {closed} of {total} connections closed within 30 s"
        );
    }
    assert_prober_ok(stop, prober).await;
    server.shutdown().await.unwrap();
}

/// Connection caps: per client IP (a trusted proxy would be exempt) and overall.
#[tokio::test]
async fn connection_caps_close_connections_over_the_limits() {
    let mut config = test_config();
    config.admission.trusted_proxies = Vec::new();
    config.connections.max_connections_per_ip = 20;
    config.connections.max_connections = 30;
    config.metrics_addr = Some("127.0.0.1:0".into());
    let server = start(config).await;
    let grpc = server.grpc_addr.unwrap();
    let connect_from = |last: u8| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::from(([127, 0, 0, last], 0)))
            .unwrap();
        socket.connect(grpc).await.unwrap()
    };
    let mut kept = Vec::new();
    for _ in 0..20 {
        kept.push(connect_from(1).await);
    }
    // The 21st from the same IP is closed at once (the default handshake timeout is 10 s).
    let over = connect_from(1).await;
    assert!(
        closed_within(over, Duration::from_secs(3)).await.is_some(),
        "a connection over --max-connections-per-ip is closed at once"
    );
    for _ in 0..10 {
        kept.push(connect_from(3).await);
    }
    let over = connect_from(4).await;
    assert!(
        closed_within(over, Duration::from_secs(3)).await.is_some(),
        "a connection over --max-connections is closed at once"
    );
    // Those under the caps stay open.
    let first = kept.remove(0);
    assert!(
        closed_within(first, Duration::from_millis(500))
            .await
            .is_none()
    );
    // With the public listeners full, monitoring still gets in: the metrics listener has
    // slots of its own.
    let (status, body) = http_get(server.metrics_addr.unwrap(), "/metrics").await;
    assert_eq!(
        status, 200,
        "/metrics with the public listeners full: {body}"
    );
    drop(kept);
    server.shutdown().await.unwrap();
}

/// Per-connection stream limit, request-body deadline, header-size limit and the rate limit
/// applied when a call opens, each crossed with a hand-written HTTP/2 client.
#[tokio::test]
async fn stream_header_body_and_rate_limits_apply_before_the_body() {
    let mut config = test_config();
    config.connections.max_concurrent_streams = 10;
    config.connections.max_header_list_size = 2048;
    config.admission.request_body_timeout = Duration::from_millis(500);
    let server = start(config).await;
    let grpc = server.grpc_addr.unwrap();

    // 20 streams without bodies: 10 over the limit are refused, the other 10 end at the
    // body deadline.
    let mut h2 = RawH2::connect(grpc, None).await.unwrap();
    h2.open_many(&grpc_headers(HELLO, &[]), 20).await.unwrap();
    let started = Instant::now();
    while h2.seen.finished.load(Ordering::SeqCst) + h2.seen.refused.load(Ordering::SeqCst) < 20
        && started.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = h2.seen.refused.load(Ordering::SeqCst);
    let answered = h2.seen.finished.load(Ordering::SeqCst);
    eprintln!(
        "stream limit: {refused} refused, {answered} answered after {:?}",
        started.elapsed()
    );
    assert_eq!(
        refused, 10,
        "streams over --max-concurrent-streams are refused"
    );
    assert_eq!(
        answered, 10,
        "unfinished bodies end at --request-body-timeout"
    );

    // A header block over --max-header-list-size is not served.
    let big = "x".repeat(4000);
    let mut h2 = RawH2::connect(grpc, None).await.unwrap();
    h2.open(&grpc_headers(HELLO, &[("x-big", &big)]), None)
        .await
        .unwrap();
    // Waited for (bounded) rather than slept on: a fixed 300 ms is not always enough for a
    // loaded server to read the block and answer.
    let seen = &h2.seen;
    let refused = || {
        seen.reset.load(Ordering::SeqCst) + seen.finished.load(Ordering::SeqCst) > 0
            || seen.goaway.load(Ordering::SeqCst)
            || seen.closed.load(Ordering::SeqCst)
    };
    let started = Instant::now();
    while !refused() && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused(), "an oversized header block is refused");
    server.shutdown().await.unwrap();

    // Rate limit at open: 10 calls with a 100 ms deadline and no body, from one client. One
    // token per 10 s, so no token comes back while the verdicts are awaited, however slow the
    // machine (at 1/s a server that took a second over the ten would admit a third call).
    let mut config = test_config();
    config.admission = AdmissionConfig {
        rate_limit: RateLimit {
            per_second: 0.1,
            burst: 2,
        },
        request_body_timeout: Duration::from_secs(30),
        ..AdmissionConfig::default()
    };
    let server = start(config).await;
    let mut h2 = RawH2::connect(server.grpc_addr.unwrap(), None)
        .await
        .unwrap();
    h2.open_many(&grpc_headers(HELLO, &[("grpc-timeout", "100m")]), 10)
        .await
        .unwrap();
    // The eight refusals are waited for (bounded) rather than expected within a fixed second;
    // then a further second shows the two admitted calls are still waiting for their bodies.
    let started = Instant::now();
    while h2.seen.finished.load(Ordering::SeqCst) < 8 && started.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let answered = h2.seen.finished.load(Ordering::SeqCst);
    assert_eq!(
        answered, 8,
        "calls over the rate are refused when they open, before any body arrives"
    );
    server.shutdown().await.unwrap();
}

/// Keepalive: a peer that never answers PINGs is disconnected; a connection with no calls is
/// closed after the gRPC idle timeout.
#[tokio::test]
async fn keepalive_and_idle_timeouts_close_connections() {
    let mut config = test_config();
    config.connections.keepalive_interval = Duration::from_millis(300);
    config.connections.keepalive_timeout = Duration::from_millis(300);
    let server = start(config).await;
    let h2 = RawH2::connect(server.grpc_addr.unwrap(), None)
        .await
        .unwrap();
    let started = Instant::now();
    while !h2.seen.closed.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        h2.seen.closed.load(Ordering::SeqCst),
        "an unresponsive peer is disconnected"
    );
    server.shutdown().await.unwrap();

    let mut config = test_config();
    config.connections.grpc_idle_timeout = Duration::from_secs(1);
    let server = start(config).await;
    let h2 = RawH2::connect(server.grpc_addr.unwrap(), None)
        .await
        .unwrap();
    let started = Instant::now();
    while !h2.seen.closed.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        h2.seen.goaway.load(Ordering::SeqCst),
        "an idle connection gets GOAWAY"
    );
    assert!(h2.seen.closed.load(Ordering::SeqCst), "and is closed");
    server.shutdown().await.unwrap();

    // While connections are scarce (here 2 of 3 slots taken), a connection that greets and
    // never calls is closed within --handshake-timeout of its preface, not held for the idle
    // timeout; one that calls stays.
    let mut config = test_config();
    config.connections.handshake_timeout = Duration::from_secs(1);
    config.connections.grpc_idle_timeout = Duration::from_secs(60);
    config.connections.max_connections = 3;
    let server = start(config).await;
    let silent = RawH2::connect(server.grpc_addr.unwrap(), None)
        .await
        .unwrap();
    let mut calling = RawH2::connect(server.grpc_addr.unwrap(), None)
        .await
        .unwrap();
    calling
        .open(&grpc_headers(HELLO, &[]), Some(&cluster_request("c")))
        .await
        .unwrap();
    let started = Instant::now();
    while !silent.seen.closed.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(20)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let closed_after = Duration::from_millis(silent.seen.closed_after_ms.load(Ordering::SeqCst));
    assert!(
        silent.seen.closed.load(Ordering::SeqCst),
        "a connection without a call is closed"
    );
    // The bound tells the 1 s handshake timeout from the 60 s idle timeout, with room for a
    // loaded machine (3 s left only 2 s for the server's timer and the close to be seen).
    assert!(
        closed_after <= Duration::from_secs(15),
        "closed after {closed_after:?}"
    );
    assert!(
        !calling.seen.closed.load(Ordering::SeqCst),
        "a connection that made a call stays open until it idles"
    );
    server.shutdown().await.unwrap();

    // With slots to spare, a warm connection without a call is left to the idle timeout.
    let mut config = test_config();
    config.connections.handshake_timeout = Duration::from_secs(1);
    config.connections.grpc_idle_timeout = Duration::from_secs(60);
    let server = start(config).await;
    let warm = RawH2::connect(server.grpc_addr.unwrap(), None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        !warm.seen.closed.load(Ordering::SeqCst),
        "a spare warm connection is not churned while slots are free"
    );
    server.shutdown().await.unwrap();
}

/// A full cluster of maximum-size affiliates (over 4 MiB) reaches a client that keeps the
/// default 4 MiB receive limit, as several messages.
#[tokio::test]
async fn a_full_cluster_reaches_a_client_with_the_default_receive_limit() {
    let server = start(test_config()).await;
    let mut c = client(&server).await;
    let data = vec![1u8; 2048];
    let endpoints: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i; 32]).collect();
    let endpoints: Vec<&[u8]> = endpoints.iter().map(|e| e.as_slice()).collect();
    for i in 0..1024 {
        let id = format!("{i:04}{}", "a".repeat(252));
        c.affiliate_update(update("full", &id, Some(&data), &endpoints))
            .await
            .unwrap();
    }
    let channel = Endpoint::from_shared(format!("http://{}", server.grpc_addr.unwrap()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // Default limits: 4 MiB per received message.
    let mut small = ClusterClient::new(channel);
    let mut stream = watch(&mut small, "full").await;
    let first = next(&mut stream).await;
    let mut ids: std::collections::HashSet<String> =
        first.affiliates.iter().map(|a| a.id.clone()).collect();
    let mut messages = 1;
    while ids.len() < 1024 {
        let message = next(&mut stream).await;
        assert!(!message.deleted);
        assert_eq!(
            message.affiliates.len(),
            1,
            "continuations are ordinary updates"
        );
        ids.insert(message.affiliates[0].id.clone());
        messages += 1;
    }
    eprintln!(
        "full cluster: {} affiliates in the first message, {messages} messages",
        first.affiliates.len()
    );
    assert!(
        messages > 1,
        "a cluster over 4 MiB is sent as several messages"
    );
    assert_eq!(ids.len(), 1024);
    // The stream goes on as usual.
    let last = format!("1023{}", "a".repeat(252));
    c.affiliate_update(update("full", &last, Some(b"x"), &[]))
        .await
        .unwrap();
    assert_eq!(next(&mut stream).await.affiliates[0].id, last);
    server.shutdown().await.unwrap();
}

/// Sends raw bytes as a request message and returns them as the response.
#[derive(Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Invalid protobuf gets `InvalidArgument` from every method, unary and Watch alike.
#[tokio::test]
async fn malformed_requests_get_invalid_argument_everywhere() {
    let server = start(test_config()).await;
    let channel = Endpoint::from_shared(format!("http://{}", server.grpc_addr.unwrap()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let garbage = Bytes::from_static(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0xff]);
    for method in [
        "Hello",
        "AffiliateUpdate",
        "AffiliateDelete",
        "List",
        "Watch",
    ] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let path = format!("/sidero.discovery.server.Cluster/{method}")
            .parse()
            .unwrap();
        let status = if method == "Watch" {
            match grpc
                .server_streaming(tonic::Request::new(garbage.clone()), path, RawCodec)
                .await
            {
                Ok(mut stream) => stream.get_mut().message().await.unwrap_err(),
                Err(status) => status,
            }
        } else {
            grpc.unary(tonic::Request::new(garbage.clone()), path, RawCodec)
                .await
                .unwrap_err()
        };
        assert_eq!(status.code(), Code::InvalidArgument, "{method}: {status:?}");
    }
    server.shutdown().await.unwrap();
}

/// A client that is not a trusted proxy cannot pick a fresh rate-limit bucket per request
/// with made-up X-Real-IP headers.
#[tokio::test]
async fn spoofed_x_real_ip_from_an_untrusted_peer_does_not_dodge_the_rate_limit() {
    let mut config = test_config();
    config.admission = AdmissionConfig {
        trusted_proxies: Vec::new(),
        rate_limit: RateLimit {
            per_second: 0.5,
            burst: 2,
        },
        ..AdmissionConfig::default()
    };
    let server = start(config).await;
    let mut c = client(&server).await;
    let counter = AtomicU64::new(1);
    let mut refused = 0;
    for _ in 0..6 {
        let mut request = tonic::Request::new(HelloRequest {
            cluster_id: "c".into(),
            client_version: "t".into(),
        });
        let ip = format!("203.0.113.{}", counter.fetch_add(1, Ordering::SeqCst));
        request
            .metadata_mut()
            .insert("x-real-ip", ip.parse().unwrap());
        request.set_timeout(Duration::from_millis(100));
        match c.hello(request).await {
            Ok(r) => assert_eq!(r.into_inner().client_ip.to_vec(), [127, 0, 0, 1]),
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted);
                refused += 1;
            }
        }
    }
    assert!(
        refused >= 3,
        "one bucket for the peer, whatever the header says"
    );
    server.shutdown().await.unwrap();
}
