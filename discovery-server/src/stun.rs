//! The optional STUN responder (`--stun-addr`): answers STUN Binding requests (RFC 8489) with
//! the source address they arrived from, so an agent that sends one from its WireGuard socket
//! learns the `ip:port` its NAT maps that socket to (its reflexive endpoint), which it can then
//! announce to its peers. The codec is `openspan-stun`; this is the socket loop around it.
//!
//! UDP sources can be forged, so the responder must not be a useful reflector:
//!
//! - it answers Binding requests only (never a response, an indication or anything else), each
//!   with one response of at most 44 bytes ([`openspan_stun::MAX_BINDING_RESPONSE_LEN`]: the
//!   header and one XOR-MAPPED-ADDRESS) to a request of at least 20, so what it sends is under
//!   2.2 times what it received, packet for packet;
//! - it answers each source IP (IPv6: each /64, as the gRPC limiter does) at most
//!   [`RATE_LIMIT`] (20 a second, bursts of 40); the rest are dropped unanswered. A forged
//!   victim therefore gets at most 40 answers and then 20 a second, 880 bytes/s, from one server.
//!   The limiter's table is bounded ([`MAX_TRACKED_SOURCES`]); beyond it, newcomers share one
//!   bucket, so a flood of forged sources can leave new clients unanswered while it lasts, but
//!   cannot grow memory.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::ratelimit::{self, Admission, RateLimit, RateLimiter};

/// Answers per source IP (IPv6: /64): an agent asks once per WireGuard socket every few
/// minutes, a whole cluster behind one NAT address fits comfortably.
pub const RATE_LIMIT: RateLimit = RateLimit {
    per_second: 20.0,
    burst: 40,
};

/// Source IPs the limiter tracks at once.
pub const MAX_TRACKED_SOURCES: usize = 100_000;

/// Datagrams longer than this are cut to it and so fail the length check: a Binding request
/// has no business being larger (ours is 20 bytes; ICE ones with credentials about 100).
const RECEIVE_BUFFER: usize = 2048;

/// How often sources whose buckets have refilled are dropped from the limiter.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq)]
pub struct StunConfig {
    /// UDP address; Go notation (`:3478`) means every interface, IPv6 and IPv4.
    pub addr: String,
    pub rate_limit: RateLimit,
    pub max_tracked_sources: usize,
}

impl StunConfig {
    /// A responder on `addr` with the default limits.
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            rate_limit: RATE_LIMIT,
            max_tracked_sources: MAX_TRACKED_SOURCES,
        }
    }
}

/// Binds the responder's socket; `addr` as the TCP listeners take it (`:3478` = every
/// interface). A failure says which address and what to do about it.
pub async fn bind(addr: &str) -> anyhow::Result<UdpSocket> {
    crate::server::check_listen_addr("--stun-addr", addr)?;
    let socket = if let Some(port) = addr.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .with_context(|| format!("--stun-addr {addr:?}: the port is not a number"))?;
        match UdpSocket::bind(SocketAddr::from(([0u16; 8], port))).await {
            Ok(socket) => Ok(socket),
            // Hosts without IPv6 still get every IPv4 interface.
            Err(_) => UdpSocket::bind(SocketAddr::from(([0u8; 4], port))).await,
        }
    } else {
        UdpSocket::bind(addr).await
    };
    socket.with_context(|| {
        format!(
            "cannot listen on --stun-addr {addr:?} (UDP): is the address valid, free and ours? Pick another one, or leave --stun-addr empty to turn the STUN responder off"
        )
    })
}

/// Answers Binding requests on `socket` until `stop` is cancelled.
pub async fn serve(
    socket: UdpSocket,
    config: StunConfig,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut limiter = RateLimiter::new(config.rate_limit, config.max_tracked_sources);
    let mut packet = vec![0u8; RECEIVE_BUFFER];
    let mut answer = [0u8; openspan_stun::MAX_BINDING_RESPONSE_LEN];
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Socket errors are logged once each kind, not per packet: a flood would flood the log.
    let (mut receive_error_logged, mut send_error_logged) = (false, false);
    loop {
        let received = tokio::select! {
            _ = stop.cancelled() => return,
            _ = sweep.tick() => {
                limiter.forget_idle(Instant::now());
                continue;
            }
            received = socket.recv_from(&mut packet) => received,
        };
        let (len, source) = match received {
            Ok(received) => received,
            Err(e) => {
                if !receive_error_logged {
                    receive_error_logged = true;
                    tracing::warn!(error = %e, "STUN responder: receiving failed (further receive errors are not logged)");
                }
                // Whatever it is, do not spin on it.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(answer_len) =
            openspan_stun::answer_binding_request(&packet[..len], source, &mut answer)
        else {
            metrics.stun_malformed.inc();
            continue;
        };
        let key = ratelimit::bucket(source.ip().to_canonical());
        if let Admission::Refused { .. } = limiter.admit(key, Instant::now(), Some(Duration::ZERO))
        {
            metrics.stun_rate_limited.inc();
            continue;
        }
        // Counted before sending, so an answer a client holds is always counted already.
        metrics.stun_answered.inc();
        if let Err(e) = socket.send_to(&answer[..answer_len], source).await
            && !send_error_logged
        {
            send_error_logged = true;
            tracing::warn!(error = %e, %source, "STUN responder: sending an answer failed (further send errors are not logged)");
        }
    }
}
