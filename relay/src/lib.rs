//! openspan-relay: relays WireGuard packets over QUIC between mesh nodes that cannot reach each
//! other directly (both behind endpoint-dependent NAT, or UDP blocked except to known services).
//!
//! # Protocol `openspan-relay/1`
//!
//! * **Transport**: QUIC (RFC 9000) with TLS 1.3; ALPN `openspan-relay/1`. The relay
//!   authenticates with a certificate; clients with a cluster access token.
//! * **Hello**: the client opens one bidirectional stream (the control stream) and sends one
//!   frame, `u16 BE length | body`, body = `u8 id_len | cluster id (UTF-8, 1..=255 bytes) |
//!   WireGuard public key (32) | access token (32)`.
//! * **Answer**: one frame, body = `u8 code | message (UTF-8, ≤ 512 bytes)`; codes 0 Ok, 1
//!   Unauthorized (unknown cluster or wrong token, not told apart), 2 Malformed, 3 LimitReached,
//!   4 Unavailable. After an error the relay closes the connection with application code 2 and
//!   the message as reason. The Hello must be complete 5 s after the first packet.
//! * **Access**: `token = HKDF-SHA256(ikm = cluster secret, info = "openspan relay token v1" ||
//!   cluster id)`, 32 bytes ([`access_token`]); the relay is configured per cluster with
//!   `verifier = SHA-256(token)` ([`verifier`]) and compares in constant time. It never learns
//!   the cluster secret.
//! * **Packets**: QUIC datagrams. Client → relay: `destination public key (32) | WireGuard
//!   packet`; relay → client: `source public key (32) | packet`. Forwarded only within the
//!   sender's cluster; an unknown destination is dropped and counted.
//! * **Stream fallback**: when the peer does not accept datagrams or the packet exceeds the
//!   connection's `max_datagram_size`, the sender opens one unidirectional stream (per
//!   direction, kept for the connection) carrying frames `u16 BE length | key (32) | packet`
//!   (the length covers key and packet, so packets up to 65,503 bytes).
//! * **Replacement**: a newer registration of the same key in the same cluster wins; the older
//!   connection is closed with application code 1 ("replaced").
//! * **Close codes**: 0 normal, 1 replaced, 2 refused, 3 relay shutting down, 4 access revoked
//!   (cluster removed or verifier changed), 5 protocol error ([`protocol::close`]).
//! * **Liveness**: QUIC idle timeout 30 s; clients send keepalives every 10 s.
//!
//! # Structure
//!
//! Decisions live in pure, unit-tested types: [`router::Router`] (registrations and routes),
//! [`router::ConnectionLimiter`], [`ratelimit::ClientLimiter`], [`clusters::Clusters`] and the
//! [`protocol`] codec. [`server`] and [`client`] are the quinn shells around them.

#![forbid(unsafe_code)]

pub mod client;
pub mod clusters;
pub mod http;
pub mod metrics;
pub mod protocol;
pub mod ratelimit;
pub mod router;
pub mod server;
pub mod tls;
pub mod token;
mod transport;

pub use server::{Relay, RelayConfig, RelayLimits, RelayServeError, serve};
pub use token::{access_token, verifier};
