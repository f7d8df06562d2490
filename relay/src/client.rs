//! The client side, for the agent: connect and register, then send and receive WireGuard
//! packets addressed by public key.
//!
//! ```no_run
//! # async fn example() -> Result<(), openspan_relay::client::RelayError> {
//! use openspan_relay::client::{RelayClient, RelayClientConfig};
//! let secret = [0u8; 32]; // the cluster secret the agent already has
//! let client = RelayClient::connect(&RelayClientConfig {
//!     address: "relay.example.com:3479".into(),
//!     server_name: None,
//!     ca_file: None,
//!     cluster_id: "my-cluster".into(),
//!     token: openspan_relay::access_token(&secret, "my-cluster"),
//!     public_key: [1; 32],
//! })
//! .await?;
//! client.send(&[2; 32], b"a WireGuard packet")?;
//! let (from, packet) = client.recv().await?;
//! # let _ = (from, packet);
//! # Ok(())
//! # }
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{ConnectionError, Endpoint, VarInt};
use thiserror::Error;
use tokio::sync::{Mutex, mpsc};

use crate::protocol::{self, Answer, Code, Hello, ProtocolError, PublicKey, close};
use crate::server::RelayLimits;
use crate::transport::{PacketSender, SendFailure, read_frames};

#[derive(Debug, Clone)]
pub struct RelayClientConfig {
    /// `host:port` of the relay (UDP).
    pub address: String,
    /// Name the relay's certificate must carry; the host part of `address` when `None`.
    pub server_name: Option<String>,
    /// CA (or the relay's own self-signed certificate, to pin it), PEM. The system trust
    /// store when `None`.
    pub ca_file: Option<PathBuf>,
    pub cluster_id: String,
    /// [`crate::access_token`] of the cluster secret and id.
    pub token: [u8; 32],
    /// Our WireGuard public key: peers address packets to us with it.
    pub public_key: [u8; 32],
}

/// Transport settings; the defaults suit the agent.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// QUIC keepalive: keeps NAT mappings and the relay's idle timer fresh.
    pub keep_alive: Duration,
    /// The connection is declared dead after this long without anything from the relay (the
    /// relay's own idle timeout applies if shorter).
    pub idle_timeout: Duration,
    /// Time for the handshake and the Hello answer.
    pub connect_timeout: Duration,
    /// Accept QUIC datagrams (off: every packet goes over the stream; for tests).
    pub datagrams: bool,
    /// Bytes waiting to be sent (datagram buffer, stream queue); beyond it `send` drops.
    pub send_queue_bytes: usize,
    /// Received packets waiting for `recv`; beyond it new packets are dropped.
    pub receive_queue_packets: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            datagrams: true,
            send_queue_bytes: 256 * 1024,
            receive_queue_packets: 1024,
        }
    }
}

#[derive(Debug, Error)]
pub enum RelayError {
    #[error("relay address {address:?}: {message}")]
    Address { address: String, message: String },
    #[error("relay TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot open a UDP socket for the relay connection: {0}")]
    Socket(std::io::Error),
    #[error("cannot connect to relay {address}: {message}")]
    Connect { address: String, message: String },
    #[error("relay {address} refused the registration ({}): {message}", code.name())]
    Refused {
        address: String,
        code: Code,
        message: String,
    },
    #[error("relay {address} broke the protocol: {source}")]
    Protocol {
        address: String,
        source: ProtocolError,
    },
    #[error("relay connection closed: {0}")]
    Closed(String),
    #[error("packet dropped: the send queue to the relay is full")]
    QueueFull,
    #[error("packet of {len} bytes is too large for the relay (at most {max})")]
    TooLarge { len: usize, max: usize },
    #[error("invalid relay client configuration: {0}")]
    Config(String),
}

struct Inner {
    endpoint: Endpoint,
    sender: PacketSender,
    received: Mutex<mpsc::Receiver<(PublicKey, Bytes)>>,
    address: SocketAddr,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: say goodbye, so the relay frees the registration at once.
        self.sender
            .connection()
            .close(VarInt::from_u32(close::NORMAL), b"client closed");
        self.endpoint
            .close(VarInt::from_u32(close::NORMAL), b"client closed");
    }
}

/// A registered connection to one relay. Cheap to clone; the connection closes when the last
/// clone is dropped.
#[derive(Clone)]
pub struct RelayClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RelayClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayClient")
            .field("relay", &self.inner.address)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl RelayClient {
    /// Connects, registers, and returns once the relay said Ok.
    pub async fn connect(config: &RelayClientConfig) -> Result<Self, RelayError> {
        Self::connect_with(config, &ClientOptions::default()).await
    }

    pub async fn connect_with(
        config: &RelayClientConfig,
        options: &ClientOptions,
    ) -> Result<Self, RelayError> {
        let address_error = |message: String| RelayError::Address {
            address: config.address.clone(),
            message,
        };
        let hello = Hello {
            cluster_id: config.cluster_id.clone(),
            public_key: config.public_key,
            token: config.token,
        }
        .encode()
        .map_err(|e| RelayError::Config(format!("cluster id: {e}")))?;
        let hello = protocol::frame(&hello).map_err(|e| RelayError::Config(e.to_string()))?;
        let (host, _) = config
            .address
            .rsplit_once(':')
            .ok_or_else(|| address_error("expected host:port".into()))?;
        let server_name = config.server_name.clone().unwrap_or_else(|| {
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned()
        });
        let address = tokio::time::timeout(
            options.connect_timeout,
            tokio::net::lookup_host(config.address.as_str()),
        )
        .await
        .map_err(|_| address_error("name resolution timed out".into()))?
        .map_err(|e| address_error(e.to_string()))?
        .next()
        .ok_or_else(|| address_error("resolves to no address".into()))?;

        let tls = crate::tls::client_config(config.ca_file.as_deref())?;
        let crypto = QuicClientConfig::try_from(tls)
            .map_err(|e| RelayError::Config(format!("TLS for QUIC: {e}")))?;
        let limits = RelayLimits {
            idle_timeout: options.idle_timeout,
            send_queue_bytes: options.send_queue_bytes,
            ..RelayLimits::default()
        };
        let mut client_config = quinn::ClientConfig::new(Arc::new(crypto));
        client_config.transport_config(Arc::new(
            crate::server::transport_config(&limits, Some(options.keep_alive), options.datagrams)
                .map_err(RelayError::Config)?,
        ));
        let local: SocketAddr = if address.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let endpoint = Endpoint::client(local).map_err(RelayError::Socket)?;

        let connect_error = |message: String| RelayError::Connect {
            address: address.to_string(),
            message,
        };
        let registered = tokio::time::timeout(options.connect_timeout, async {
            let conn = endpoint
                .connect_with(client_config, address, &server_name)
                .map_err(|e| connect_error(e.to_string()))?
                .await
                .map_err(|e| connect_error(describe(&e)))?;
            let answer = register(&conn, &hello).await.map_err(|e| match e {
                RegisterFailure::Protocol(source) => RelayError::Protocol {
                    address: address.to_string(),
                    source,
                },
                RegisterFailure::Connection(e) => match conn.close_reason() {
                    // Refused and closed before we read the answer: the reason says why.
                    Some(ConnectionError::ApplicationClosed(c))
                        if c.error_code == VarInt::from_u32(close::REFUSED) =>
                    {
                        RelayError::Refused {
                            address: address.to_string(),
                            code: Code::Unauthorized,
                            message: String::from_utf8_lossy(&c.reason).into_owned(),
                        }
                    }
                    _ => connect_error(e),
                },
            })?;
            if answer.code != Code::Ok {
                conn.close(VarInt::from_u32(close::NORMAL), b"refused");
                return Err(RelayError::Refused {
                    address: address.to_string(),
                    code: answer.code,
                    message: answer.message,
                });
            }
            Ok(conn)
        })
        .await;
        let conn = match registered {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                endpoint.close(VarInt::from_u32(close::NORMAL), b"");
                return Err(e);
            }
            Err(_) => {
                endpoint.close(VarInt::from_u32(close::NORMAL), b"");
                return Err(connect_error(format!(
                    "no registration within {:?}",
                    options.connect_timeout
                )));
            }
        };

        let (tx, rx) = mpsc::channel(options.receive_queue_packets.max(1));
        tokio::spawn(receive(conn.clone(), tx));
        Ok(Self {
            inner: Arc::new(Inner {
                endpoint,
                sender: PacketSender::new(conn, options.send_queue_bytes),
                received: Mutex::new(rx),
                address,
            }),
        })
    }

    /// Sends a WireGuard packet to the client registered with public key `to` in our cluster.
    /// Never blocks: a full queue drops the packet (`QueueFull`), as a congested link would.
    pub fn send(&self, to: &[u8; 32], packet: &[u8]) -> Result<(), RelayError> {
        match self.inner.sender.send(to, packet) {
            Ok(_) => Ok(()),
            Err(SendFailure::QueueFull) => Err(RelayError::QueueFull),
            Err(SendFailure::TooLarge) => Err(RelayError::TooLarge {
                len: packet.len(),
                max: protocol::MAX_STREAM_PACKET,
            }),
            Err(SendFailure::Closed) => Err(self.closed_error()),
        }
    }

    /// The next packet for us and its sender's public key. `Err` once the connection is gone
    /// (relay shut down, restarted or unreachable for the idle timeout, or we were replaced).
    pub async fn recv(&self) -> Result<([u8; 32], Bytes), RelayError> {
        let next = self.inner.received.lock().await.recv().await;
        next.ok_or_else(|| self.closed_error())
    }

    /// The connection's current round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        self.inner.sender.connection().rtt()
    }

    pub fn is_closed(&self) -> bool {
        self.inner.sender.connection().close_reason().is_some()
    }

    /// The relay's address.
    pub fn relay_addr(&self) -> SocketAddr {
        self.inner.address
    }

    /// Whether packets of `len` bytes currently go as datagrams (else over the stream).
    pub fn max_datagram_packet(&self) -> Option<usize> {
        self.inner
            .sender
            .connection()
            .max_datagram_size()
            .and_then(|m| m.checked_sub(protocol::KEY_LEN))
    }

    fn closed_error(&self) -> RelayError {
        RelayError::Closed(match self.inner.sender.connection().close_reason() {
            Some(e) => describe(&e),
            None => "receiver gone".into(),
        })
    }
}

enum RegisterFailure {
    Protocol(ProtocolError),
    Connection(String),
}

async fn register(conn: &quinn::Connection, hello: &[u8]) -> Result<Answer, RegisterFailure> {
    let io = |e: &dyn std::fmt::Display| RegisterFailure::Connection(e.to_string());
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| io(&e))?;
    send.write_all(hello).await.map_err(|e| io(&e))?;
    let mut header = [0u8; 2];
    recv.read_exact(&mut header).await.map_err(|e| io(&e))?;
    let len = protocol::control_frame_len(header).map_err(RegisterFailure::Protocol)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(|e| io(&e))?;
    Answer::decode(&body).map_err(RegisterFailure::Protocol)
}

/// Explains a closed connection in words (relay close codes are named).
fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ApplicationClosed(c) => {
            let what = match c.error_code.into_inner() {
                x if x == u64::from(close::REPLACED) => {
                    "replaced by a newer connection of this key"
                }
                x if x == u64::from(close::REFUSED) => "registration refused",
                x if x == u64::from(close::SHUTDOWN) => "relay shutting down",
                x if x == u64::from(close::REVOKED) => "access revoked",
                x if x == u64::from(close::PROTOCOL) => "protocol error",
                _ => "closed by the relay",
            };
            let reason = String::from_utf8_lossy(&c.reason);
            if reason.is_empty() {
                what.to_owned()
            } else {
                format!("{what}: {reason}")
            }
        }
        ConnectionError::TimedOut => "timed out (no answer from the relay)".into(),
        other => other.to_string(),
    }
}

/// Moves received datagrams and stream frames into the channel `recv` reads. Ends when the
/// connection closes, which closes the channel.
async fn receive(conn: quinn::Connection, tx: mpsc::Sender<(PublicKey, Bytes)>) {
    let mut readers = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            datagram = conn.read_datagram() => match datagram {
                Ok(body) => {
                    if let Ok(packet) = protocol::decode_packet(body) {
                        // A full queue drops: the reader is behind, as with a full socket buffer.
                        let _ = tx.try_send(packet);
                    }
                }
                Err(_) => break,
            },
            stream = conn.accept_uni() => match stream {
                Ok(recv) => {
                    let (tx, conn) = (tx.clone(), conn.clone());
                    readers.spawn(async move {
                        let result = read_frames(recv, |key, packet| {
                            let _ = tx.try_send((key, packet));
                        })
                        .await;
                        if let Err(e) = result {
                            conn.close(VarInt::from_u32(close::PROTOCOL), format!("bad stream frame: {e}").as_bytes());
                        }
                    });
                }
                Err(_) => break,
            },
        }
    }
    readers.abort_all();
}
