//! `relay-bench`: throughput and latency of packets between two clients through a relay on
//! 127.0.0.1, all in this process (self-signed certificate, rate limits off).
//!
//! `cargo run --release -p openspan-relay --bin relay-bench -- --size 1400`
//!
//! Phase 1 sends as fast as the relay takes them (bounded by --packets and --seconds) and
//! reports received Mbit/s and the one-way latency under that load; phase 2 sends at a paced
//! --paced-rate and reports the latency of an unloaded relay. Latency is measured with one
//! clock (both clients are in this process).

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use openspan_relay::client::{RelayClient, RelayClientConfig, RelayError};
use openspan_relay::clusters::Clusters;
use openspan_relay::ratelimit::Rate;
use openspan_relay::tls::TlsFiles;
use openspan_relay::{Relay, RelayConfig, access_token, verifier};
use tokio_util::sync::CancellationToken;

/// Benchmark the relay between two local clients.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// WireGuard packet size in bytes (the relay adds a 32-byte key).
    #[arg(long, default_value_t = 1400)]
    size: usize,
    /// Most packets sent in the throughput phase.
    #[arg(long, default_value_t = 300_000)]
    packets: u64,
    /// Longest throughput phase, in seconds.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Packets per second in the latency phase.
    #[arg(long, default_value_t = 2000)]
    paced_rate: u32,
    /// Length of the latency phase, in seconds.
    #[arg(long, default_value_t = 2.0)]
    paced_seconds: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Received {
    packets: u64,
    bytes: u64,
    latencies: Vec<Duration>,
    last: Instant,
}

/// Reads packets carrying (sequence, send time) until `expected` arrived or `quiet` passed
/// without any.
async fn receive(client: RelayClient, epoch: Instant, expected: u64, quiet: Duration) -> Received {
    let mut r = Received {
        packets: 0,
        bytes: 0,
        latencies: Vec::new(),
        last: Instant::now(),
    };
    while r.packets < expected {
        match tokio::time::timeout(quiet, client.recv()).await {
            Ok(Ok((_, packet))) => {
                let now = Instant::now();
                r.packets += 1;
                r.bytes += packet.len() as u64;
                r.last = now;
                if let Some(sent) = packet.get(8..16) {
                    let nanos = u64::from_be_bytes(sent.try_into().unwrap_or([0; 8]));
                    let sent_at = epoch + Duration::from_nanos(nanos);
                    // One sample in 16 keeps memory small at high rates.
                    if r.packets.is_multiple_of(16) || expected < 100_000 {
                        r.latencies.push(now.saturating_duration_since(sent_at));
                    }
                }
            }
            _ => break,
        }
    }
    r.latencies.sort();
    r
}

fn stamp(packet: &mut [u8], seq: u64, epoch: Instant) {
    packet[..8].copy_from_slice(&seq.to_be_bytes());
    let nanos = epoch.elapsed().as_nanos() as u64;
    packet[8..16].copy_from_slice(&nanos.to_be_bytes());
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.size >= 16, "--size must be at least 16 bytes");
    let dir = tempfile_dir()?;
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let tls = TlsFiles {
        certificate: dir.join("relay.crt"),
        key: dir.join("relay.key"),
    };
    std::fs::write(&tls.certificate, cert.pem())?;
    std::fs::write(&tls.key, signing_key.serialize_pem())?;
    let secret = [9u8; 32];
    let token = access_token(&secret, "bench");
    let mut clusters = Clusters::default();
    clusters.insert("bench", "bench".into(), verifier(&token))?;
    let mut config = RelayConfig::new("127.0.0.1:0", tls.clone());
    config.clusters = clusters;
    config.limits.packet_rate = Rate::UNLIMITED;
    config.limits.byte_rate = Rate::UNLIMITED;
    let relay = Relay::bind(config).await?;
    let addr = relay.local_addr()?;
    let metrics = relay.metrics();
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(relay.run(shutdown.clone()));
    let client_config = |n: u8| RelayClientConfig {
        address: addr.to_string(),
        server_name: Some("localhost".into()),
        ca_file: Some(tls.certificate.clone()),
        cluster_id: "bench".into(),
        token,
        public_key: [n; 32],
    };
    let a = RelayClient::connect(&client_config(1))
        .await
        .context("client a")?;
    let b = RelayClient::connect(&client_config(2))
        .await
        .context("client b")?;
    // Let path MTU discovery settle, so datagram sizes are what a long-lived link sees.
    for _ in 0..20 {
        a.send(&[2; 32], &[0; 64])?;
        b.send(&[1; 32], &[0; 64])?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drain(&b).await;
    drain(&a).await;
    println!(
        "packet size {} B; largest packet in one datagram: {:?} B; rtt {:?}",
        args.size,
        a.max_datagram_packet(),
        a.rtt()
    );

    // Phase 1: throughput.
    let epoch = Instant::now();
    let receiver = tokio::spawn(receive(
        b.clone(),
        epoch,
        args.packets,
        Duration::from_secs(1),
    ));
    let started = Instant::now();
    let limit = Duration::from_secs_f64(args.seconds);
    let (mut sent, mut full) = (0u64, 0u64);
    let mut packet = vec![0u8; args.size];
    while sent < args.packets && started.elapsed() < limit {
        stamp(&mut packet, sent, epoch);
        match a.send(&[2; 32], &packet) {
            Ok(()) => sent += 1,
            Err(RelayError::QueueFull) => {
                full += 1;
                // The queue drains at the link's pace; wait a little instead of spinning.
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
        if sent.is_multiple_of(64) {
            tokio::task::yield_now().await;
        }
    }
    let got = receiver.await?;
    let elapsed = got
        .last
        .saturating_duration_since(started)
        .max(Duration::from_millis(1));
    let mbits = got.bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e6;
    println!(
        "throughput: sent {sent}, received {} ({:.1}% loss) in {:.2}s: {mbits:.0} Mbit/s, {:.0} packets/s; sender queue full {full} times",
        got.packets,
        100.0 * (sent - got.packets.min(sent)) as f64 / sent.max(1) as f64,
        elapsed.as_secs_f64(),
        got.packets as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  latency under load: p50 {:?}, p99 {:?}",
        percentile(&got.latencies, 0.50),
        percentile(&got.latencies, 0.99)
    );
    drain(&b).await;

    // Phase 2: paced latency.
    let total = (f64::from(args.paced_rate) * args.paced_seconds) as u64;
    let receiver = tokio::spawn(receive(b.clone(), epoch, total, Duration::from_secs(1)));
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.paced_rate.max(1)));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for seq in 0..total {
        tick.tick().await;
        stamp(&mut packet, seq, epoch);
        let _ = a.send(&[2; 32], &packet);
    }
    let got = receiver.await?;
    println!(
        "paced {} packets/s: received {}/{total}; latency p50 {:?}, p99 {:?}",
        args.paced_rate,
        got.packets,
        percentile(&got.latencies, 0.50),
        percentile(&got.latencies, 0.99)
    );
    println!(
        "relay: datagram {} packets, stream {} packets, dropped queue_full {}",
        metrics.relayed_packets("datagram"),
        metrics.relayed_packets("stream"),
        metrics.dropped("queue_full")
    );
    shutdown.cancel();
    serving.await??;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Reads what is still arriving (bounded: stops at a quiet 100 ms or a million packets).
async fn drain(client: &RelayClient) {
    for _ in 0..1_000_000 {
        if tokio::time::timeout(Duration::from_millis(100), client.recv())
            .await
            .is_err()
        {
            return;
        }
    }
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("relay-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
