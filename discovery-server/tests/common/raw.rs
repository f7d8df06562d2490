//! A deliberately rude HTTP/2 client: writes frames by hand so a test can do what a real
//! client library never would (ignore the stream limit, never send a body, never read).
//! Loopback only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the server did to this connection's streams, as seen in its frames.
#[derive(Default)]
pub struct Seen {
    /// Streams the server finished (HEADERS or DATA with END_STREAM).
    pub finished: AtomicU64,
    /// Streams the server reset (RST_STREAM), and of those refused (REFUSED_STREAM).
    pub reset: AtomicU64,
    pub refused: AtomicU64,
    pub goaway: AtomicBool,
    pub closed: AtomicBool,
    /// When the server closed the connection, in ms after it was opened.
    pub closed_after_ms: AtomicU64,
}

pub struct RawH2 {
    writer: OwnedWriteHalf,
    next_stream: u32,
    pub seen: Arc<Seen>,
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
    // Literal header field without indexing, new name, no Huffman (RFC 7541 §6.2.2).
    out.push(0);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    hpack_len(out, value.len());
    out.extend_from_slice(value.as_bytes());
}

fn hpack_len(out: &mut Vec<u8>, len: usize) {
    if len < 127 {
        out.push(len as u8);
    } else {
        out.push(127);
        let mut rest = len - 127;
        while rest >= 128 {
            out.push((rest % 128) as u8 | 0x80);
            rest /= 128;
        }
        out.push(rest as u8);
    }
}

/// A gRPC request header block for `path`, plus any extra headers.
pub fn grpc_headers(path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut h = vec![0x83, 0x86]; // :method POST, :scheme http (static table)
    h.push(0x04); // :path, literal value with indexed name
    hpack_len(&mut h, path.len());
    h.extend_from_slice(path.as_bytes());
    h.push(0x01); // :authority
    h.push(9);
    h.extend_from_slice(b"localhost");
    literal(&mut h, "content-type", "application/grpc");
    literal(&mut h, "te", "trailers");
    for (name, value) in extra {
        literal(&mut h, name, value);
    }
    h
}

/// One gRPC message frame.
pub fn grpc_message(protobuf: &[u8]) -> Vec<u8> {
    let mut m = vec![0];
    m.extend_from_slice(&(protobuf.len() as u32).to_be_bytes());
    m.extend_from_slice(protobuf);
    m
}

/// A `WatchRequest{cluster_id}` / `HelloRequest{cluster_id}` body (field 1 is the cluster id).
pub fn cluster_request(cluster: &str) -> Vec<u8> {
    let mut p = vec![0x0a, cluster.len() as u8];
    p.extend_from_slice(cluster.as_bytes());
    grpc_message(&p)
}

impl RawH2 {
    /// Connects and greets. `initial_window` 0 means the server may never send us data.
    pub async fn connect(addr: SocketAddr, initial_window: Option<u32>) -> std::io::Result<Self> {
        let connected = std::time::Instant::now();
        let stream = TcpStream::connect(addr).await?;
        let (mut reader, mut writer) = stream.into_split();
        let mut settings = Vec::new();
        if let Some(window) = initial_window {
            settings.extend_from_slice(&4u16.to_be_bytes()); // SETTINGS_INITIAL_WINDOW_SIZE
            settings.extend_from_slice(&window.to_be_bytes());
        }
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(4, 0, 0, &settings));
        writer.write_all(&hello).await?;
        let seen = Arc::new(Seen::default());
        let (ack_tx, ack_rx) = tokio::sync::oneshot::channel();
        {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut ack_tx = Some(ack_tx);
                let mut header = [0u8; 9];
                loop {
                    if reader.read_exact(&mut header).await.is_err() {
                        break;
                    }
                    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
                    let (kind, flags) = (header[3], header[4]);
                    let mut payload = vec![0; len];
                    if reader.read_exact(&mut payload).await.is_err() {
                        break;
                    }
                    match kind {
                        0 | 1 if flags & 1 != 0 => {
                            seen.finished.fetch_add(1, Ordering::SeqCst);
                        }
                        3 => {
                            seen.reset.fetch_add(1, Ordering::SeqCst);
                            if payload.get(3) == Some(&7) {
                                seen.refused.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        4 if flags & 1 == 0 => {
                            if let Some(tx) = ack_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                        7 => seen.goaway.store(true, Ordering::SeqCst),
                        _ => {}
                    }
                }
                seen.closed_after_ms
                    .store(connected.elapsed().as_millis() as u64, Ordering::SeqCst);
                seen.closed.store(true, Ordering::SeqCst);
            });
        }
        // Acknowledge the server's settings once they arrive, as the protocol requires.
        if ack_rx.await.is_ok() {
            writer.write_all(&frame(4, 1, 0, &[])).await?;
        }
        Ok(Self {
            writer,
            next_stream: 1,
            seen,
        })
    }

    /// Opens a stream with `headers`; sends `body` (ending the stream) if given, else leaves
    /// the request unfinished. Returns the stream id.
    pub async fn open(&mut self, headers: &[u8], body: Option<&[u8]>) -> std::io::Result<u32> {
        let id = self.next_stream;
        self.next_stream += 2;
        let mut out = frame(1, 0x4, id, headers); // END_HEADERS
        if let Some(body) = body {
            out.extend(frame(0, 0x1, id, body)); // END_STREAM
        }
        self.writer.write_all(&out).await?;
        Ok(id)
    }

    /// Opens many unfinished streams in one write.
    pub async fn open_many(&mut self, headers: &[u8], count: usize) -> std::io::Result<()> {
        let mut out = Vec::with_capacity(count * (9 + headers.len()));
        for _ in 0..count {
            out.extend(frame(1, 0x4, self.next_stream, headers));
            self.next_stream += 2;
        }
        self.writer.write_all(&out).await
    }

    pub fn streams_opened(&self) -> u32 {
        self.next_stream / 2
    }
}
