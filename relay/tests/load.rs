//! The relay's memory stays bounded while 20 clients blast at a peer that does not read (and
//! at one that does not exist): the send queue and QUIC's windows cap what waits, the rest is
//! dropped and counted. The relay runs as a child process so its RSS can be measured.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use openspan_relay::client::RelayClient;
use openspan_relay::protocol::{self, Answer, Code, Hello};
use quinn::crypto::rustls::QuicClientConfig;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the relay runs");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// Registers `public_key` with datagrams refused and then never reads: everything for it must
/// queue in the relay's stream queue, which fills and drops.
async fn stalled_peer(
    process: &RelayProcess,
    public_key: [u8; 32],
) -> (quinn::Endpoint, quinn::Connection) {
    let tls = openspan_relay::tls::client_config(Some(&process.tls.certificate)).unwrap();
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    let mut transport = quinn::TransportConfig::default();
    transport.datagram_receive_buffer_size(None);
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    config.transport_config(Arc::new(transport));
    let endpoint = quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let conn = loop {
        let attempt = endpoint
            .connect_with(config.clone(), process.addr, "localhost")
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(conn)) => break conn,
            _ => assert!(
                Instant::now() < deadline,
                "the relay process never answered"
            ),
        }
    };
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = Hello {
        cluster_id: "cluster-a".into(),
        public_key,
        token: openspan_relay::access_token(&SECRET_A, "cluster-a"),
    };
    send.write_all(&protocol::frame(&hello.encode().unwrap()).unwrap())
        .await
        .unwrap();
    let mut header = [0u8; 2];
    recv.read_exact(&mut header).await.unwrap();
    let mut body = vec![0; protocol::control_frame_len(header).unwrap()];
    recv.read_exact(&mut body).await.unwrap();
    assert_eq!(Answer::decode(&body).unwrap().code, Code::Ok);
    (endpoint, conn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_while_clients_blast_at_a_stalled_peer() {
    let process = spawn_relay_process(&["--packet-rate=0", "--byte-rate=0"]);
    let (_endpoint, stalled) = stalled_peer(&process, key(200)).await;
    let pid = process.child.id();
    let mut clients = Vec::new();
    for n in 1..=20u8 {
        let config = config_for(
            process.addr,
            &process.tls.certificate,
            "cluster-a",
            &SECRET_A,
            key(n),
        );
        clients.push(
            RelayClient::connect(&config)
                .await
                .expect("blaster connects"),
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = rss_kib(pid);

    let packet = vec![0xab; 1200];
    let started = Instant::now();
    let duration = Duration::from_secs(4);
    let mut tasks = Vec::new();
    for (i, client) in clients.iter().cloned().enumerate() {
        let packet = packet.clone();
        tasks.push(tokio::spawn(async move {
            let (mut sent, mut refused) = (0u64, 0u64);
            // Bounded by time and by count.
            while started.elapsed() < duration && sent + refused < 2_000_000 {
                // Every fourth client aims at a key nobody has.
                let to = if i % 4 == 3 { key(201) } else { key(200) };
                for _ in 0..64 {
                    match client.send(&to, &packet) {
                        Ok(()) => sent += 1,
                        Err(_) => refused += 1,
                    }
                }
                tokio::task::yield_now().await;
            }
            (sent, refused)
        }));
    }
    let mut peak = baseline;
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_kib(pid));
    }
    let mut sent = 0;
    for task in tasks {
        sent += task.await.unwrap().0;
    }
    peak = peak.max(rss_kib(pid));
    let growth_mib = peak.saturating_sub(baseline) as f64 / 1024.0;
    println!(
        "relay RSS: baseline {:.1} MiB, peak {:.1} MiB (+{growth_mib:.1} MiB) while 20 clients sent {sent} packets of 1,200 bytes in {:?}",
        baseline as f64 / 1024.0,
        peak as f64 / 1024.0,
        duration
    );
    assert!(sent > 1000, "the blasters sent only {sent} packets");
    // 21 connections × (256 KiB queues and windows per direction) ≈ 22 MiB at most, plus
    // allocator slack; 64 MiB means "bounded", a leak per packet would blow far past it.
    assert!(growth_mib < 64.0, "relay RSS grew by {growth_mib:.1} MiB");
    let metrics = http_get(process.metrics_addr, "/metrics").await;
    let counter = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let queue_full = counter("relay_packets_dropped_total{reason=\"queue_full\"}");
    let unknown = counter("relay_packets_dropped_total{reason=\"unknown_destination\"}");
    let streamed = counter("relay_packets_relayed_total{transport=\"stream\"}");
    println!(
        "relay: {streamed} packets queued to the stalled peer's stream, {queue_full} dropped (queue full), {unknown} to an absent key"
    );
    assert!(queue_full > 0 && unknown > 0 && streamed > 0, "{metrics}");
    assert!(
        stalled.close_reason().is_none(),
        "the stalled peer is still connected"
    );
    for client in &clients {
        assert!(!client.is_closed());
    }
}
