//! The small part of STUN (RFC 8489) that openspan needs to learn a node's reflexive endpoint:
//! the `ip:port` a NAT maps its WireGuard socket to, as seen by a server outside it.
//!
//! A node sends a 20-byte Binding request ([`binding_request`]) from its WireGuard socket; the
//! discovery server answers it ([`answer_binding_request`]) with the request's source address in
//! an XOR-MAPPED-ADDRESS attribute; the node reads it back ([`parse_binding_response`]). Because
//! the answer arrives on the socket WireGuard receives on, every received packet first goes
//! through [`is_stun`], which must never mistake a WireGuard message for STUN.
//!
//! Hand-written on purpose, and kept minimal: only Binding with XOR-MAPPED-ADDRESS (and
//! MAPPED-ADDRESS, which old servers send) is needed, and it sits on the WireGuard receive path,
//! where it has to be cheap and must not allocate. The STUN crates on offer are parts of full
//! ICE/TURN stacks (message objects with allocated attribute lists, credentials, integrity,
//! transactions), far more code on an untrusted input path than one 20-byte request and one
//! attribute need. This crate does no I/O, never allocates, never panics on any input (fuzzed in
//! `tests/fuzz.rs`) and has no `unsafe`.
//!
//! Not implemented, because a Binding request for a reflexive address does not need them:
//! MESSAGE-INTEGRITY and FINGERPRINT are neither checked nor written (they are skipped like any
//! unknown attribute), nor are long-term credentials, ALTERNATE-SERVER, retransmission timers
//! (the caller's business) or RFC 3489 messages without the magic cookie. Unknown attributes are
//! skipped whatever their type: RFC 8489 would have a client treat an unknown
//! comprehension-required one as a failed transaction, but MESSAGE-INTEGRITY is one of those and
//! standard servers send it.

#![forbid(unsafe_code)]

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Bytes 4..8 of every RFC 5389/8489 message; it tells STUN apart from other protocols.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;

/// The transaction id a response echoes from its request.
pub type TransactionId = [u8; 12];

/// The longest message [`answer_binding_request`] writes (an IPv6 XOR-MAPPED-ADDRESS).
pub const MAX_BINDING_RESPONSE_LEN: usize = HEADER_LEN + 4 + 20;

const HEADER_LEN: usize = 20;

const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const BINDING_ERROR: u16 = 0x0111;

const MAPPED_ADDRESS: u16 = 0x0001;
const ERROR_CODE: u16 = 0x0009;
const MESSAGE_INTEGRITY: u16 = 0x0008;
const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;
const FINGERPRINT: u16 = 0x8028;

const FAMILY_IPV4: u8 = 0x01;
const FAMILY_IPV6: u8 = 0x02;

/// Why a packet is not the STUN message the caller wanted.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum StunError {
    #[error("{len} bytes are too few for a STUN message (its header alone is 20 bytes)")]
    TooShort { len: usize },
    #[error("not a STUN message: the first two bits of the message type are not zero")]
    LeadingBitsSet,
    #[error(
        "not a STUN message: bytes 4..8 are {found:#010x}, not the magic cookie 0x2112a442 (RFC 3489 messages without it are not supported)"
    )]
    BadMagicCookie { found: u32 },
    #[error(
        "the STUN header declares {declared} bytes of attributes, which is not a multiple of 4"
    )]
    UnalignedLength { declared: usize },
    #[error("the STUN header declares {declared} bytes of attributes but {actual} follow it")]
    LengthMismatch { declared: usize, actual: usize },
    #[error("STUN message type {message_type:#06x} is not a Binding request (0x0001)")]
    NotBindingRequest { message_type: u16 },
    #[error(
        "STUN message type {message_type:#06x} is not a Binding response (0x0101 success, 0x0111 error)"
    )]
    NotBindingResponse { message_type: u16 },
    #[error("the STUN server answered with a Binding error response{}", ErrorCodeSuffix(.code))]
    ErrorResponse {
        /// ERROR-CODE as class × 100 + number (300..=699), when present and well-formed.
        code: Option<u16>,
    },
    #[error(
        "the STUN attribute at byte {offset} of the message runs past its end (header or padded value cut off)"
    )]
    TruncatedAttribute { offset: usize },
    #[error("the {attribute} attribute is malformed: {reason}")]
    BadAddress {
        attribute: &'static str,
        reason: &'static str,
    },
    #[error(
        "the {attribute} attribute carries address family {family:#04x}, neither IPv4 (0x01) nor IPv6 (0x02)"
    )]
    UnknownFamily { attribute: &'static str, family: u8 },
    #[error("the Binding response carries neither XOR-MAPPED-ADDRESS nor MAPPED-ADDRESS")]
    NoMappedAddress,
    #[error("the output buffer has {available} bytes; the Binding response needs {needed}")]
    BufferTooSmall { needed: usize, available: usize },
}

/// Formats `code` into [`StunError::ErrorResponse`]'s message without allocating.
struct ErrorCodeSuffix<'a>(&'a Option<u16>);

impl fmt::Display for ErrorCodeSuffix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self.0 {
            Some(code) => write!(f, " (error code {code})"),
            None => f.write_str(" (without a readable ERROR-CODE)"),
        }
    }
}

/// Whether `packet` is framed as a STUN message: at least 20 bytes, the first two bits zero, the
/// magic cookie at bytes 4..8, and a declared length (bytes 2..4) that is a multiple of 4 and
/// exactly the bytes after the header. Cheap enough to run on every packet of a socket shared
/// with WireGuard, and the same checks every parser here starts with.
///
/// It is false for every WireGuard message, whatever its content: all four WireGuard message
/// types (1 initiation, 2 response, 3 cookie reply, 4 transport data) start with the type byte
/// and three zero bytes. Read as STUN, bytes 2..4 then declare 0 bytes of attributes, which only
/// a message of exactly 20 bytes can have; WireGuard messages are 148, 92 and 64 bytes long, and
/// transport data at least 32 (a 16-byte header and a 16-byte tag, even for a keepalive). So the
/// length check alone tells them apart, even when a WireGuard sender index happens to equal the
/// magic cookie; the unit tests and `tests/fuzz.rs` check it on WireGuard-shaped buffers.
pub fn is_stun(packet: &[u8]) -> bool {
    header(packet).is_ok()
}

/// A Binding request with no attributes: all a server needs to answer with our mapped address.
/// The caller picks `transaction` at random and matches the response's against it.
pub fn binding_request(transaction: &TransactionId) -> [u8; 20] {
    let mut message = [0u8; HEADER_LEN];
    message[0..2].copy_from_slice(&BINDING_REQUEST.to_be_bytes());
    // Bytes 2..4: no attributes.
    message[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    message[8..20].copy_from_slice(transaction);
    message
}

/// Reads a Binding response: the transaction id it answers and the mapped address it reports.
///
/// XOR-MAPPED-ADDRESS is preferred; MAPPED-ADDRESS (sent by RFC 3489-era servers, and open to
/// NATs that rewrite addresses they find in payloads) is the fallback. Only the first of each
/// counts, and none after MESSAGE-INTEGRITY or FINGERPRINT (RFC 8489 §14: what follows them is
/// not covered by them and must be ignored). A malformed XOR-MAPPED-ADDRESS is an error (not a
/// reason to fall back); MAPPED-ADDRESS is only read, and only then an error, when there is no
/// XOR-MAPPED-ADDRESS. A Binding error response gives [`StunError::ErrorResponse`] with its
/// ERROR-CODE.
pub fn parse_binding_response(packet: &[u8]) -> Result<(TransactionId, SocketAddr), StunError> {
    let (message_type, transaction, attributes) = header(packet)?;
    match message_type {
        BINDING_SUCCESS => {}
        BINDING_ERROR => {
            let mut code = None;
            for attribute in Attributes::new(attributes) {
                let (kind, value) = attribute?;
                if kind == ERROR_CODE && code.is_none() {
                    code = Some(error_code(value));
                }
            }
            return Err(StunError::ErrorResponse {
                code: code.flatten(),
            });
        }
        other => {
            return Err(StunError::NotBindingResponse {
                message_type: other,
            });
        }
    }
    let (mut xor_mapped, mut mapped, mut protected) = (None, None, false);
    for attribute in Attributes::new(attributes) {
        let (kind, value) = attribute?;
        match kind {
            MESSAGE_INTEGRITY | MESSAGE_INTEGRITY_SHA256 | FINGERPRINT => protected = true,
            XOR_MAPPED_ADDRESS if !protected && xor_mapped.is_none() => {
                xor_mapped = Some(read_address(
                    "XOR-MAPPED-ADDRESS",
                    value,
                    Some(&transaction),
                )?);
            }
            MAPPED_ADDRESS if !protected && mapped.is_none() => mapped = Some(value),
            _ => {}
        }
    }
    let address = match (xor_mapped, mapped) {
        (Some(address), _) => address,
        (None, Some(value)) => read_address("MAPPED-ADDRESS", value, None)?,
        (None, None) => return Err(StunError::NoMappedAddress),
    };
    Ok((transaction, address))
}

/// The server side: checks that `packet` is a Binding request (type 0x0001, magic cookie, length,
/// well-framed attributes, which are otherwise ignored), writes a Binding success response with
/// `source` in an XOR-MAPPED-ADDRESS into `out` and returns its length: 32 bytes for an IPv4
/// source, 44 for IPv6. An IPv4-mapped IPv6 source (a dual-stack socket's view of an IPv4 client)
/// is answered as the IPv4 address it is. Anything else (responses, indications, other methods,
/// garbage) is an error, so a server never answers what it should not.
pub fn answer_binding_request(
    packet: &[u8],
    source: SocketAddr,
    out: &mut [u8],
) -> Result<usize, StunError> {
    let (message_type, transaction, attributes) = header(packet)?;
    if message_type != BINDING_REQUEST {
        return Err(StunError::NotBindingRequest { message_type });
    }
    for attribute in Attributes::new(attributes) {
        attribute?;
    }
    let ip = source.ip().to_canonical();
    let (family, value_len) = match ip {
        IpAddr::V4(_) => (FAMILY_IPV4, 8),
        IpAddr::V6(_) => (FAMILY_IPV6, 20),
    };
    let needed = HEADER_LEN + 4 + value_len;
    let available = out.len();
    let Some(out) = out.get_mut(..needed) else {
        return Err(StunError::BufferTooSmall { needed, available });
    };
    out[0..2].copy_from_slice(&BINDING_SUCCESS.to_be_bytes());
    out[2..4].copy_from_slice(&((4 + value_len) as u16).to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out[8..20].copy_from_slice(&transaction);
    out[20..22].copy_from_slice(&XOR_MAPPED_ADDRESS.to_be_bytes());
    out[22..24].copy_from_slice(&(value_len as u16).to_be_bytes());
    out[24] = 0;
    out[25] = family;
    out[26..28].copy_from_slice(&(source.port() ^ (MAGIC_COOKIE >> 16) as u16).to_be_bytes());
    let mask = xor_mask(&transaction);
    match ip {
        IpAddr::V4(v4) => {
            for (i, byte) in v4.octets().into_iter().enumerate() {
                out[28 + i] = byte ^ mask[i];
            }
        }
        IpAddr::V6(v6) => {
            for (i, byte) in v6.octets().into_iter().enumerate() {
                out[28 + i] = byte ^ mask[i];
            }
        }
    }
    Ok(needed)
}

/// Checks the header; returns the message type, the transaction id and the attribute bytes.
fn header(packet: &[u8]) -> Result<(u16, TransactionId, &[u8]), StunError> {
    let Some((head, attributes)) = packet.split_first_chunk::<HEADER_LEN>() else {
        return Err(StunError::TooShort { len: packet.len() });
    };
    if head[0] & 0xC0 != 0 {
        return Err(StunError::LeadingBitsSet);
    }
    let cookie = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    if cookie != MAGIC_COOKIE {
        return Err(StunError::BadMagicCookie { found: cookie });
    }
    let declared = usize::from(u16::from_be_bytes([head[2], head[3]]));
    if declared % 4 != 0 {
        return Err(StunError::UnalignedLength { declared });
    }
    if declared != attributes.len() {
        return Err(StunError::LengthMismatch {
            declared,
            actual: attributes.len(),
        });
    }
    let mut transaction = [0u8; 12];
    transaction.copy_from_slice(&head[8..20]);
    let message_type = u16::from_be_bytes([head[0], head[1]]);
    Ok((message_type, transaction, attributes))
}

/// The attributes of a message as (type, value) pairs, padding skipped; stops with an error at
/// the first attribute whose header or padded value does not fit.
struct Attributes<'a> {
    rest: &'a [u8],
    /// Offset of `rest` in the message, for error messages.
    offset: usize,
}

impl<'a> Attributes<'a> {
    fn new(attributes: &'a [u8]) -> Self {
        Self {
            rest: attributes,
            offset: HEADER_LEN,
        }
    }
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Result<(u16, &'a [u8]), StunError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let offset = self.offset;
        let framed = self.rest.split_first_chunk::<4>().and_then(|(head, rest)| {
            let kind = u16::from_be_bytes([head[0], head[1]]);
            let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
            // Values are padded to a multiple of 4 bytes (the padding's content is ignored).
            let padded = len.next_multiple_of(4);
            (padded <= rest.len()).then(|| (kind, &rest[..len], &rest[padded..], 4 + padded))
        });
        match framed {
            Some((kind, value, rest, consumed)) => {
                self.rest = rest;
                self.offset += consumed;
                Some(Ok((kind, value)))
            }
            None => {
                self.rest = &[];
                Some(Err(StunError::TruncatedAttribute { offset }))
            }
        }
    }
}

/// What an address is XORed with: the magic cookie, then (IPv6) the transaction id.
fn xor_mask(transaction: &TransactionId) -> [u8; 16] {
    let mut mask = [0u8; 16];
    mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    mask[4..].copy_from_slice(transaction);
    mask
}

/// Decodes a (XOR-)MAPPED-ADDRESS value; `xor` carries the transaction id for XOR-MAPPED-ADDRESS.
fn read_address(
    attribute: &'static str,
    value: &[u8],
    xor: Option<&TransactionId>,
) -> Result<SocketAddr, StunError> {
    let bad = |reason| StunError::BadAddress { attribute, reason };
    let Some((head, address)) = value.split_first_chunk::<4>() else {
        return Err(bad("shorter than its 4-byte family and port"));
    };
    // head[0] is reserved: senders write 0, receivers ignore it.
    let family = head[1];
    let mask = xor.map_or([0u8; 16], xor_mask);
    let port = u16::from_be_bytes([head[2] ^ mask[0], head[3] ^ mask[1]]);
    let ip = match family {
        FAMILY_IPV4 => {
            let octets: [u8; 4] = address
                .try_into()
                .map_err(|_| bad("an IPv4 address must be 4 bytes (a value of 8)"))?;
            IpAddr::V4(Ipv4Addr::from(std::array::from_fn::<u8, 4, _>(|i| {
                octets[i] ^ mask[i]
            })))
        }
        FAMILY_IPV6 => {
            let octets: [u8; 16] = address
                .try_into()
                .map_err(|_| bad("an IPv6 address must be 16 bytes (a value of 20)"))?;
            IpAddr::V6(Ipv6Addr::from(std::array::from_fn::<u8, 16, _>(|i| {
                octets[i] ^ mask[i]
            })))
        }
        family => return Err(StunError::UnknownFamily { attribute, family }),
    };
    Ok(SocketAddr::new(ip, port))
}

/// ERROR-CODE's class × 100 + number, when the value is well-formed (RFC 8489 §14.8).
fn error_code(value: &[u8]) -> Option<u16> {
    let head = value.first_chunk::<4>()?;
    let (class, number) = (u16::from(head[2] & 0x07), u16::from(head[3]));
    ((3..=6).contains(&class) && number < 100).then_some(class * 100 + number)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text
            .bytes()
            .filter(u8::is_ascii_hexdigit)
            .map(|b| (b as char).to_digit(16).unwrap() as u8)
            .collect();
        digits.chunks(2).map(|p| (p[0] << 4) | p[1]).collect()
    }

    const RFC5769_TRANSACTION: TransactionId = [
        0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
    ];

    /// RFC 5769 §2.1: a request with SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME,
    /// MESSAGE-INTEGRITY and FINGERPRINT (checked against its HMAC and CRC when written down).
    fn rfc5769_request() -> Vec<u8> {
        hex("00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
             80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
             00 24 00 04 6e 00 01 ff
             80 29 00 08 93 2f f9 b1 51 26 3b 36
             00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
             00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
             80 28 00 04 e5 7a 3b cf")
    }

    /// RFC 5769 §2.2: IPv4 response, XOR-MAPPED-ADDRESS 192.0.2.1:32853.
    fn rfc5769_ipv4_response() -> Vec<u8> {
        hex("01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
             80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
             00 20 00 08 00 01 a1 47 e1 12 a6 43
             00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
             80 28 00 04 c0 7d 4c 96")
    }

    /// RFC 5769 §2.3: IPv6 response, XOR-MAPPED-ADDRESS
    /// [2001:db8:1234:5678:11:2233:4455:6677]:32853.
    fn rfc5769_ipv6_response() -> Vec<u8> {
        hex("01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
             80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
             00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
             00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
             80 28 00 04 c8 fb 0b 4c")
    }

    /// A response header for `attributes` (their length filled in).
    fn response(message_type: u16, attributes: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&message_type.to_be_bytes());
        m.extend_from_slice(&(attributes.len() as u16).to_be_bytes());
        m.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        m.extend_from_slice(&RFC5769_TRANSACTION);
        m.extend_from_slice(attributes);
        m
    }

    fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&kind.to_be_bytes());
        a.extend_from_slice(&(value.len() as u16).to_be_bytes());
        a.extend_from_slice(value);
        a.resize(a.len().next_multiple_of(4), 0);
        a
    }

    fn answer(request: &[u8], source: SocketAddr) -> Result<Vec<u8>, StunError> {
        let mut out = [0u8; 64];
        let len = answer_binding_request(request, source, &mut out)?;
        Ok(out[..len].to_vec())
    }

    /// Deterministic filler for the WireGuard-shaped buffers (xorshift64).
    fn noise(seed: u64, buf: &mut [u8]) {
        let mut x = seed | 1;
        for b in buf {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }

    #[test]
    fn rfc5769_ipv4_response_gives_its_address() {
        let (transaction, address) = parse_binding_response(&rfc5769_ipv4_response()).unwrap();
        assert_eq!(transaction, RFC5769_TRANSACTION);
        assert_eq!(address, "192.0.2.1:32853".parse().unwrap());
    }

    #[test]
    fn rfc5769_ipv6_response_gives_its_address() {
        let (transaction, address) = parse_binding_response(&rfc5769_ipv6_response()).unwrap();
        assert_eq!(transaction, RFC5769_TRANSACTION);
        assert_eq!(
            address,
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
                .parse()
                .unwrap()
        );
    }

    #[test]
    fn answers_are_the_rfc5769_attributes_byte_for_byte() {
        let request = rfc5769_request();
        assert!(is_stun(&request));
        let v4 = answer(&request, "192.0.2.1:32853".parse().unwrap()).unwrap();
        assert_eq!(v4.len(), 32);
        assert_eq!(&v4[8..20], &RFC5769_TRANSACTION);
        assert_eq!(&v4[20..], &rfc5769_ipv4_response()[36..48]);
        let v6 = answer(
            &request,
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
                .parse()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(v6.len(), 44);
        assert_eq!(&v6[20..], &rfc5769_ipv6_response()[36..60]);
    }

    #[test]
    fn binding_request_is_a_bare_header() {
        let transaction = [7u8; 12];
        let request = binding_request(&transaction);
        assert_eq!(
            &request[..8],
            &[0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42]
        );
        assert_eq!(&request[8..], &transaction);
        assert!(is_stun(&request));
    }

    #[test]
    fn round_trips_ipv4_and_ipv6() {
        for (i, source) in [
            "127.0.0.1:51820",
            "203.0.113.7:1",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "[::1]:51820",
            "[2001:db8::1]:65535",
            "[fe80::1%3]:4000",
        ]
        .into_iter()
        .enumerate()
        {
            let source: SocketAddr = source.parse().unwrap();
            let transaction = [i as u8 ^ 0x5a; 12];
            let response = answer(&binding_request(&transaction), source).unwrap();
            assert_eq!(response.len(), if source.is_ipv4() { 32 } else { 44 });
            assert!(response.len() <= MAX_BINDING_RESPONSE_LEN);
            assert!(is_stun(&response));
            let (echoed, mapped) = parse_binding_response(&response).unwrap();
            assert_eq!(echoed, transaction);
            // The scope id is not carried (nor meaningful beyond the link).
            assert_eq!(mapped, SocketAddr::new(source.ip(), source.port()));
        }
    }

    #[test]
    fn ipv4_mapped_sources_are_answered_as_ipv4() {
        let source: SocketAddr = "[::ffff:198.51.100.9]:3478".parse().unwrap();
        let response = answer(&binding_request(&[1; 12]), source).unwrap();
        assert_eq!(response.len(), 32);
        let (_, mapped) = parse_binding_response(&response).unwrap();
        assert_eq!(mapped, "198.51.100.9:3478".parse().unwrap());
    }

    #[test]
    fn mapped_address_is_the_fallback_and_xor_mapped_wins() {
        let plain = attribute(MAPPED_ADDRESS, &[0, 1, 0x0d, 0x96, 192, 0, 2, 99]);
        let (_, mapped) = parse_binding_response(&response(BINDING_SUCCESS, &plain)).unwrap();
        assert_eq!(mapped, "192.0.2.99:3478".parse().unwrap());

        let xor = &rfc5769_ipv4_response()[36..48];
        let broken = attribute(MAPPED_ADDRESS, &[0, 1, 0]);
        for attributes in [
            [&plain[..], xor].concat(),
            [xor, &plain[..]].concat(),
            [&broken[..], xor].concat(),
        ] {
            let (_, mapped) =
                parse_binding_response(&response(BINDING_SUCCESS, &attributes)).unwrap();
            assert_eq!(mapped, "192.0.2.1:32853".parse().unwrap());
        }
        // Without XOR-MAPPED-ADDRESS the broken fallback is an error.
        assert_eq!(
            parse_binding_response(&response(BINDING_SUCCESS, &broken)),
            Err(StunError::BadAddress {
                attribute: "MAPPED-ADDRESS",
                reason: "shorter than its 4-byte family and port"
            })
        );
    }

    #[test]
    fn unknown_attributes_are_skipped_with_their_padding() {
        let attributes = [
            attribute(0x8022, b"abcde"),        // SOFTWARE, 5 bytes + 3 padding
            attribute(0x7fff, b""),             // unknown, empty
            attribute(0x0024, b"\x01\x02\x03"), // 3 + 1 padding
            rfc5769_ipv4_response()[36..48].to_vec(),
        ]
        .concat();
        let (_, mapped) = parse_binding_response(&response(BINDING_SUCCESS, &attributes)).unwrap();
        assert_eq!(mapped, "192.0.2.1:32853".parse().unwrap());
    }

    #[test]
    fn addresses_after_message_integrity_or_fingerprint_are_ignored() {
        let xor = &rfc5769_ipv4_response()[36..48];
        for guard in [MESSAGE_INTEGRITY, MESSAGE_INTEGRITY_SHA256, FINGERPRINT] {
            let attributes = [attribute(guard, &[0; 20]), xor.to_vec()].concat();
            assert_eq!(
                parse_binding_response(&response(BINDING_SUCCESS, &attributes)),
                Err(StunError::NoMappedAddress)
            );
        }
    }

    #[test]
    fn error_responses_carry_their_code() {
        let with_code = attribute(ERROR_CODE, b"\0\0\x04\x01Unauthorized");
        let error = parse_binding_response(&response(BINDING_ERROR, &with_code)).unwrap_err();
        assert_eq!(error, StunError::ErrorResponse { code: Some(401) });
        assert!(error.to_string().contains("error code 401"), "{error}");

        assert_eq!(
            parse_binding_response(&response(BINDING_ERROR, &[])),
            Err(StunError::ErrorResponse { code: None })
        );
        // Class 7 does not exist.
        let nonsense = attribute(ERROR_CODE, b"\0\0\x07\x00");
        assert_eq!(
            parse_binding_response(&response(BINDING_ERROR, &nonsense)),
            Err(StunError::ErrorResponse { code: None })
        );
    }

    #[test]
    fn malformed_responses_say_what_is_wrong() {
        let ok = rfc5769_ipv4_response();
        assert_eq!(
            parse_binding_response(&ok[..19]),
            Err(StunError::TooShort { len: 19 })
        );
        let mut bits = ok.clone();
        bits[0] |= 0x80;
        assert_eq!(
            parse_binding_response(&bits),
            Err(StunError::LeadingBitsSet)
        );
        let mut cookie = ok.clone();
        cookie[7] ^= 1;
        assert_eq!(
            parse_binding_response(&cookie),
            Err(StunError::BadMagicCookie { found: 0x2112_a443 })
        );
        assert_eq!(
            parse_binding_response(&ok[..ok.len() - 4]),
            Err(StunError::LengthMismatch {
                declared: 60,
                actual: 56
            })
        );
        let mut unaligned = ok.clone();
        unaligned[3] = 0x3d;
        unaligned.push(0);
        assert_eq!(
            parse_binding_response(&unaligned),
            Err(StunError::UnalignedLength { declared: 61 })
        );
        // The last attribute's declared length runs past the end.
        let mut truncated = ok.clone();
        truncated[74..76].copy_from_slice(&[0x00, 0x08]);
        assert_eq!(
            parse_binding_response(&truncated),
            Err(StunError::TruncatedAttribute { offset: 72 })
        );
        // A request, an indication, another method are not Binding responses.
        for message_type in [0x0001u16, 0x0011, 0x0102] {
            let mut other = ok.clone();
            other[0..2].copy_from_slice(&message_type.to_be_bytes());
            assert_eq!(
                parse_binding_response(&other),
                Err(StunError::NotBindingResponse { message_type })
            );
        }
        assert_eq!(
            parse_binding_response(&response(BINDING_SUCCESS, &[])),
            Err(StunError::NoMappedAddress)
        );
        let family = attribute(XOR_MAPPED_ADDRESS, &[0, 3, 0, 0, 1, 2, 3, 4]);
        let error = parse_binding_response(&response(BINDING_SUCCESS, &family)).unwrap_err();
        assert_eq!(
            error,
            StunError::UnknownFamily {
                attribute: "XOR-MAPPED-ADDRESS",
                family: 3
            }
        );
        assert!(error.to_string().contains("family 0x03"), "{error}");
        for value in [
            &[0u8, 1, 0][..],
            &[0, 1, 0, 0, 1, 2, 3][..],
            &[0, 2, 0, 0, 1, 2, 3, 4],
        ] {
            let short = attribute(XOR_MAPPED_ADDRESS, value);
            assert!(
                matches!(
                    parse_binding_response(&response(BINDING_SUCCESS, &short)),
                    Err(StunError::BadAddress {
                        attribute: "XOR-MAPPED-ADDRESS",
                        ..
                    })
                ),
                "{value:?}"
            );
        }
    }

    #[test]
    fn only_binding_requests_are_answered() {
        let source: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let request = binding_request(&[3; 12]);
        // A response, an indication, an error response, other methods.
        for message_type in [0x0101u16, 0x0011, 0x0111, 0x0003, 0x0002] {
            let mut other = request;
            other[0..2].copy_from_slice(&message_type.to_be_bytes());
            assert_eq!(
                answer(&other, source),
                Err(StunError::NotBindingRequest { message_type })
            );
        }
        assert_eq!(answer(&[], source), Err(StunError::TooShort { len: 0 }));
        assert_eq!(
            answer(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", source),
            Err(StunError::LeadingBitsSet)
        );
        // Broken attribute framing is refused even though attributes are otherwise ignored.
        let mut broken = rfc5769_request();
        broken[22..24].copy_from_slice(&[0x00, 0x60]);
        assert_eq!(
            answer(&broken, source),
            Err(StunError::TruncatedAttribute { offset: 20 })
        );
    }

    #[test]
    fn a_short_output_buffer_is_an_error() {
        let request = binding_request(&[0; 12]);
        let mut out = [0u8; 43];
        assert_eq!(
            answer_binding_request(&request, "[::1]:1".parse().unwrap(), &mut out),
            Err(StunError::BufferTooSmall {
                needed: 44,
                available: 43
            })
        );
        assert_eq!(
            answer_binding_request(&request, "127.0.0.1:1".parse().unwrap(), &mut out),
            Ok(32)
        );
    }

    #[test]
    fn wireguard_messages_are_never_stun() {
        let mut packet = vec![0u8; 2048];
        for message_type in 1u8..=4 {
            // The real sizes first, then every transport-data size up to 2 KiB.
            let sizes = [148usize, 92, 64, 32].into_iter().chain(32..=2048);
            for (n, size) in sizes.enumerate() {
                for seed in 0..4u64 {
                    let packet = &mut packet[..size];
                    noise(
                        (seed << 32) | ((n as u64) << 8) | u64::from(message_type),
                        packet,
                    );
                    packet[..4].copy_from_slice(&[message_type, 0, 0, 0]);
                    if seed == 0 {
                        // The worst case: a sender index that equals the magic cookie.
                        packet[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                    }
                    assert!(!is_stun(packet), "type {message_type}, {size} bytes");
                    assert!(parse_binding_response(packet).is_err());
                    assert!(answer(packet, "127.0.0.1:1".parse().unwrap()).is_err());
                }
            }
        }
    }

    #[test]
    fn is_stun_checks_each_header_rule() {
        let request = binding_request(&[9; 12]);
        assert!(is_stun(&request));
        assert!(!is_stun(&request[..19]));
        let mut bits = request;
        bits[0] = 0x40;
        assert!(!is_stun(&bits));
        let mut cookie = request;
        cookie[4] = 0;
        assert!(!is_stun(&cookie));
        let mut longer = request.to_vec();
        longer.extend_from_slice(&[0; 4]);
        assert!(!is_stun(&longer), "4 bytes more than declared");
        longer[3] = 4;
        assert!(is_stun(&longer));
        longer.extend_from_slice(&[0; 2]);
        longer[3] = 6;
        assert!(!is_stun(&longer), "a length that is not a multiple of 4");
    }
}
