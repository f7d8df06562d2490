//! Moving packets over one QUIC connection, the same for the relay and its clients: datagrams
//! when they fit, else frames on one unidirectional stream per direction, behind a queue with a
//! byte budget so a slow receiver costs bounded memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use quinn::{Connection, SendDatagramError};
use tokio::sync::mpsc;

use crate::protocol::{self, PublicKey, StreamDecoder};

/// Why a packet was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendFailure {
    /// The connection's datagram buffer or stream queue is full (the receiver is slower than
    /// the senders): dropped, as a congested link would.
    QueueFull,
    /// Larger than a stream frame can carry.
    TooLarge,
    /// The connection is gone.
    Closed,
}

impl SendFailure {
    pub fn label(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::TooLarge => "too_large",
            Self::Closed => "closed",
        }
    }
}

pub const DATAGRAM: &str = "datagram";
pub const STREAM: &str = "stream";

/// Sends addressed packets on a connection. Never blocks.
#[derive(Debug)]
pub struct PacketSender {
    conn: Connection,
    frames: mpsc::UnboundedSender<Bytes>,
    /// Bytes in `frames` not yet written to the stream. With `budget` this bounds the queue
    /// (an unbounded channel whose bytes are counted, because a count of packets would not
    /// bound memory for packets of up to 64 KiB).
    queued: Arc<AtomicUsize>,
    budget: usize,
    /// Datagram payloads are sent only while this many bytes of the send buffer are free, so
    /// a packet is dropped (and counted) instead of quinn silently dropping older ones.
    datagram_budget: usize,
}

impl PacketSender {
    /// Starts the stream writer task; it ends with the connection.
    pub fn new(conn: Connection, budget: usize) -> Self {
        let (frames, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        tokio::spawn(write_frames(conn.clone(), rx, queued.clone()));
        Self {
            conn,
            frames,
            queued,
            budget,
            datagram_budget: budget,
        }
    }

    /// Sends `packet` addressed with `key` (the destination from a client, the source from the
    /// relay). Returns the transport used.
    pub fn send(&self, key: &PublicKey, packet: &[u8]) -> Result<&'static str, SendFailure> {
        let body_len = protocol::KEY_LEN + packet.len();
        if self
            .conn
            .max_datagram_size()
            .is_some_and(|max| body_len <= max)
        {
            if self.conn.datagram_send_buffer_space() < body_len.min(self.datagram_budget) {
                return Err(SendFailure::QueueFull);
            }
            match self
                .conn
                .send_datagram(protocol::encode_packet(key, packet))
            {
                Ok(()) => return Ok(DATAGRAM),
                Err(SendDatagramError::ConnectionLost(_)) => return Err(SendFailure::Closed),
                // The path MTU shrank or datagrams went away: the stream carries it.
                Err(_) => {}
            }
        }
        let frame =
            protocol::encode_stream_frame(key, packet).map_err(|_| SendFailure::TooLarge)?;
        let len = frame.len();
        if self.queued.fetch_add(len, Ordering::AcqRel) + len > self.budget {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return Err(SendFailure::QueueFull);
        }
        if self.frames.send(frame).is_err() {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return Err(SendFailure::Closed);
        }
        Ok(STREAM)
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

/// Opens the unidirectional stream on the first frame and writes frames in order.
async fn write_frames(
    conn: Connection,
    mut frames: mpsc::UnboundedReceiver<Bytes>,
    queued: Arc<AtomicUsize>,
) {
    let mut stream = None;
    loop {
        let frame = tokio::select! {
            frame = frames.recv() => frame,
            _ = conn.closed() => None,
        };
        let Some(frame) = frame else { return };
        let len = frame.len();
        if stream.is_none() {
            match conn.open_uni().await {
                Ok(s) => stream = Some(s),
                Err(_) => return,
            }
        }
        let Some(s) = stream.as_mut() else { return };
        if s.write_chunk(frame).await.is_err() {
            return;
        }
        queued.fetch_sub(len, Ordering::AcqRel);
    }
}

/// Largest chunk read from a stream at once; with one partial frame this bounds the decoder.
const READ_CHUNK: usize = 64 * 1024;

/// Reads frames from a peer's unidirectional stream until it ends. `Err` means the framing was
/// broken (the caller closes the connection).
pub async fn read_frames(
    mut recv: quinn::RecvStream,
    mut on_packet: impl FnMut(PublicKey, Bytes),
) -> Result<(), protocol::ProtocolError> {
    let mut decoder = StreamDecoder::default();
    loop {
        match recv.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => {
                decoder.extend(&chunk.bytes);
                while let Some((key, packet)) = decoder.next_frame()? {
                    on_packet(key, packet);
                }
            }
            Ok(None) | Err(_) => return Ok(()),
        }
    }
}
