//! The wire format of `openspan-relay/1` (see the crate documentation for the whole protocol).
//!
//! Everything here is pure and parses untrusted bytes: every decoder answers with a value or a
//! [`ProtocolError`], never panics, and never allocates more than the frame it was handed
//! (`relay/tests/fuzz.rs` holds it to that).

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

/// The ALPN protocol id. A new, incompatible protocol gets a new id, so old and new clients and
/// relays fail the TLS handshake with a clear "no application protocol" instead of misparsing.
pub const ALPN: &[u8] = b"openspan-relay/1";

/// Length of a WireGuard (X25519) public key, which addresses clients on the relay.
pub const KEY_LEN: usize = 32;
/// Length of an access token.
pub const TOKEN_LEN: usize = 32;
/// Longest cluster id (bytes of UTF-8), the same default bound as the discovery server's.
pub const MAX_CLUSTER_ID_LEN: usize = 255;
/// Longest message in a Hello answer; longer messages are cut by the encoder.
pub const MAX_MESSAGE_LEN: usize = 512;
/// Largest control-stream frame body: a Hello with the longest cluster id. Nothing larger is
/// ever buffered from the control stream.
pub const MAX_CONTROL_FRAME: usize = 1 + MAX_CLUSTER_ID_LEN + KEY_LEN + TOKEN_LEN + MAX_MESSAGE_LEN;
/// Largest packet carried in a stream frame (the u16 length covers the key and the packet).
pub const MAX_STREAM_PACKET: usize = u16::MAX as usize - KEY_LEN;

/// QUIC application close codes (the reason text says more, for people).
pub mod close {
    /// The client or relay is done (normal end).
    pub const NORMAL: u32 = 0;
    /// A newer connection registered the same key in the same cluster.
    pub const REPLACED: u32 = 1;
    /// The Hello was refused (the answer frame, and the reason, say why).
    pub const REFUSED: u32 = 2;
    /// The relay is shutting down: connect to another relay.
    pub const SHUTDOWN: u32 = 3;
    /// The cluster was removed from the relay or its verifier changed.
    pub const REVOKED: u32 = 4;
    /// The peer broke the protocol (a malformed stream frame, for instance).
    pub const PROTOCOL: u32 = 5;
}

/// A WireGuard public key.
pub type PublicKey = [u8; KEY_LEN];

#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum ProtocolError {
    #[error("frame truncated: {0}")]
    Truncated(&'static str),
    #[error("frame too large: {len} bytes (at most {max})")]
    TooLarge { len: usize, max: usize },
    #[error("empty cluster id")]
    EmptyClusterId,
    #[error("cluster id is not UTF-8")]
    ClusterIdNotUtf8,
    #[error("{0} trailing bytes after the frame")]
    Trailing(usize),
    #[error("unknown answer code {0}")]
    UnknownCode(u8),
}

/// The first message of a client, on its control stream.
#[derive(Clone, PartialEq, Eq)]
pub struct Hello {
    pub cluster_id: String,
    pub public_key: PublicKey,
    pub token: [u8; TOKEN_LEN],
}

impl std::fmt::Debug for Hello {
    // The token is a credential: never in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hello")
            .field("cluster_id", &self.cluster_id)
            .field("public_key", &hex::encode(self.public_key))
            .finish_non_exhaustive()
    }
}

impl Hello {
    /// The frame body (without the u16 length): `u8 id_len | id | key[32] | token[32]`.
    pub fn encode(&self) -> Result<Bytes, ProtocolError> {
        let id = self.cluster_id.as_bytes();
        if id.is_empty() {
            return Err(ProtocolError::EmptyClusterId);
        }
        if id.len() > MAX_CLUSTER_ID_LEN {
            return Err(ProtocolError::TooLarge {
                len: id.len(),
                max: MAX_CLUSTER_ID_LEN,
            });
        }
        let mut out = BytesMut::with_capacity(1 + id.len() + KEY_LEN + TOKEN_LEN);
        out.put_u8(id.len() as u8);
        out.put_slice(id);
        out.put_slice(&self.public_key);
        out.put_slice(&self.token);
        Ok(out.freeze())
    }

    pub fn decode(body: &[u8]) -> Result<Self, ProtocolError> {
        let (&id_len, rest) = body
            .split_first()
            .ok_or(ProtocolError::Truncated("cluster id length"))?;
        let id_len = usize::from(id_len);
        if id_len == 0 {
            return Err(ProtocolError::EmptyClusterId);
        }
        let (id, rest) = rest
            .split_at_checked(id_len)
            .ok_or(ProtocolError::Truncated("cluster id"))?;
        let (key, rest) = rest
            .split_first_chunk::<KEY_LEN>()
            .ok_or(ProtocolError::Truncated("public key"))?;
        let (token, rest) = rest
            .split_first_chunk::<TOKEN_LEN>()
            .ok_or(ProtocolError::Truncated("token"))?;
        if !rest.is_empty() {
            return Err(ProtocolError::Trailing(rest.len()));
        }
        let cluster_id = std::str::from_utf8(id)
            .map_err(|_| ProtocolError::ClusterIdNotUtf8)?
            .to_owned();
        Ok(Self {
            cluster_id,
            public_key: *key,
            token: *token,
        })
    }
}

/// The relay's answer to a Hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    /// Registered: packets flow from now on.
    Ok = 0,
    /// Unknown cluster or wrong token (deliberately not told apart).
    Unauthorized = 1,
    /// The Hello could not be parsed.
    Malformed = 2,
    /// A relay limit (for instance registrations per cluster) refused it.
    LimitReached = 3,
    /// The relay is shutting down or failed internally; try another relay.
    Unavailable = 4,
}

impl Code {
    pub fn from_u8(code: u8) -> Result<Self, ProtocolError> {
        Ok(match code {
            0 => Self::Ok,
            1 => Self::Unauthorized,
            2 => Self::Malformed,
            3 => Self::LimitReached,
            4 => Self::Unavailable,
            other => return Err(ProtocolError::UnknownCode(other)),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Unauthorized => "unauthorized",
            Self::Malformed => "malformed",
            Self::LimitReached => "limit reached",
            Self::Unavailable => "unavailable",
        }
    }
}

/// The answer frame body: `u8 code | UTF-8 message` (message ≤ [`MAX_MESSAGE_LEN`] bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub code: Code,
    pub message: String,
}

impl Answer {
    pub fn encode(&self) -> Bytes {
        let mut message = self.message.as_str();
        if message.len() > MAX_MESSAGE_LEN {
            let mut end = MAX_MESSAGE_LEN;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message = &message[..end];
        }
        let mut out = BytesMut::with_capacity(1 + message.len());
        out.put_u8(self.code as u8);
        out.put_slice(message.as_bytes());
        out.freeze()
    }

    pub fn decode(body: &[u8]) -> Result<Self, ProtocolError> {
        let (&code, message) = body
            .split_first()
            .ok_or(ProtocolError::Truncated("answer code"))?;
        if message.len() > MAX_MESSAGE_LEN {
            return Err(ProtocolError::TooLarge {
                len: message.len(),
                max: MAX_MESSAGE_LEN,
            });
        }
        Ok(Self {
            code: Code::from_u8(code)?,
            // A relay's message is shown to people only; a broken byte must not lose the code.
            message: String::from_utf8_lossy(message).into_owned(),
        })
    }
}

/// Control-stream framing: `u16 big-endian length | body`.
pub fn frame(body: &[u8]) -> Result<Bytes, ProtocolError> {
    if body.len() > MAX_CONTROL_FRAME {
        return Err(ProtocolError::TooLarge {
            len: body.len(),
            max: MAX_CONTROL_FRAME,
        });
    }
    let mut out = BytesMut::with_capacity(2 + body.len());
    out.put_u16(body.len() as u16);
    out.put_slice(body);
    Ok(out.freeze())
}

/// Checks a control frame's announced length before anything is buffered.
pub fn control_frame_len(header: [u8; 2]) -> Result<usize, ProtocolError> {
    let len = usize::from(u16::from_be_bytes(header));
    if len > MAX_CONTROL_FRAME {
        return Err(ProtocolError::TooLarge {
            len,
            max: MAX_CONTROL_FRAME,
        });
    }
    Ok(len)
}

/// A packet with its address (destination from a client, source from the relay): the body of a
/// datagram, and of a stream frame.
pub fn encode_packet(key: &PublicKey, packet: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(KEY_LEN + packet.len());
    out.put_slice(key);
    out.put_slice(packet);
    out.freeze()
}

/// Splits a datagram or stream-frame body into its key and packet, without copying.
pub fn decode_packet(mut body: Bytes) -> Result<(PublicKey, Bytes), ProtocolError> {
    if body.len() < KEY_LEN {
        return Err(ProtocolError::Truncated("packet address"));
    }
    let packet = body.split_off(KEY_LEN);
    let mut key = [0u8; KEY_LEN];
    key.copy_from_slice(&body);
    Ok((key, packet))
}

/// A stream frame: `u16 big-endian length of (key | packet) | key | packet`.
pub fn encode_stream_frame(key: &PublicKey, packet: &[u8]) -> Result<Bytes, ProtocolError> {
    if packet.len() > MAX_STREAM_PACKET {
        return Err(ProtocolError::TooLarge {
            len: packet.len(),
            max: MAX_STREAM_PACKET,
        });
    }
    let mut out = BytesMut::with_capacity(2 + KEY_LEN + packet.len());
    out.put_u16((KEY_LEN + packet.len()) as u16);
    out.put_slice(key);
    out.put_slice(packet);
    Ok(out.freeze())
}

/// Checks a stream frame's length field: it must at least hold the key.
pub fn stream_frame_len(header: [u8; 2]) -> Result<usize, ProtocolError> {
    let len = usize::from(u16::from_be_bytes(header));
    if len < KEY_LEN {
        return Err(ProtocolError::Truncated(
            "stream frame shorter than its key",
        ));
    }
    Ok(len)
}

/// Incremental decoder of a byte stream of stream frames (for callers that read in chunks).
#[derive(Default)]
pub struct StreamDecoder {
    buffer: BytesMut,
}

impl StreamDecoder {
    /// Appends bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed. After an error the stream
    /// is unusable (the framing is lost) and must be closed.
    pub fn next_frame(&mut self) -> Result<Option<(PublicKey, Bytes)>, ProtocolError> {
        let Some(header) = self.buffer.first_chunk::<2>() else {
            return Ok(None);
        };
        let len = stream_frame_len(*header)?;
        if self.buffer.len() < 2 + len {
            return Ok(None);
        }
        let _ = self.buffer.split_to(2);
        let body = self.buffer.split_to(len).freeze();
        decode_packet(body).map(Some)
    }

    /// Bytes held, at most one partial frame plus what one read added.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            cluster_id: "cluster-a".into(),
            public_key: [7; 32],
            token: [9; 32],
        }
    }

    #[test]
    fn hello_round_trips_and_hides_the_token() {
        let h = hello();
        let body = h.encode().unwrap();
        assert_eq!(body.len(), 1 + 9 + 64);
        assert_eq!(Hello::decode(&body).unwrap(), h);
        assert!(!format!("{h:?}").contains("0909"));
    }

    #[test]
    fn hello_refuses_bad_input() {
        let body = hello().encode().unwrap();
        for cut in 0..body.len() {
            assert!(Hello::decode(&body[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = body.to_vec();
        long.push(0);
        assert_eq!(Hello::decode(&long), Err(ProtocolError::Trailing(1)));
        let mut bad = body.to_vec();
        bad[1] = 0xff;
        assert_eq!(Hello::decode(&bad), Err(ProtocolError::ClusterIdNotUtf8));
        let empty = Hello {
            cluster_id: String::new(),
            ..hello()
        };
        assert_eq!(empty.encode(), Err(ProtocolError::EmptyClusterId));
        let huge = Hello {
            cluster_id: "x".repeat(256),
            ..hello()
        };
        assert!(huge.encode().is_err());
    }

    #[test]
    fn answer_round_trips_and_cuts_long_messages() {
        let a = Answer {
            code: Code::Unauthorized,
            message: "wrong token".into(),
        };
        assert_eq!(Answer::decode(&a.encode()).unwrap(), a);
        let long = Answer {
            code: Code::Ok,
            message: "é".repeat(400),
        };
        let decoded = Answer::decode(&long.encode()).unwrap();
        assert!(decoded.message.len() <= MAX_MESSAGE_LEN);
        assert_eq!(Answer::decode(&[9]), Err(ProtocolError::UnknownCode(9)));
    }

    #[test]
    fn stream_frames_decode_in_pieces() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&encode_stream_frame(&[1; 32], b"hello").unwrap());
        wire.extend_from_slice(&encode_stream_frame(&[2; 32], &[0xaa; 3000]).unwrap());
        let mut decoder = StreamDecoder::default();
        let mut frames = Vec::new();
        for chunk in wire.chunks(7) {
            decoder.extend(chunk);
            while let Some(frame) = decoder.next_frame().unwrap() {
                frames.push(frame);
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0], ([1; 32], Bytes::from_static(b"hello")));
        assert_eq!(frames[1].1.len(), 3000);
        assert_eq!(decoder.buffered(), 0);
        assert!(encode_stream_frame(&[0; 32], &vec![0; MAX_STREAM_PACKET + 1]).is_err());
        let mut short = StreamDecoder::default();
        short.extend(&[0, 5, 1, 2, 3, 4, 5]);
        assert!(short.next_frame().is_err());
    }

    #[test]
    fn packets_split_without_copy() {
        let body = encode_packet(&[3; 32], b"wg");
        let (key, packet) = decode_packet(body).unwrap();
        assert_eq!((key, &packet[..]), ([3; 32], &b"wg"[..]));
        assert!(decode_packet(Bytes::from_static(&[0; 31])).is_err());
    }
}
