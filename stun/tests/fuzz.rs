//! Fuzz targets on the stable toolchain, driven by proptest (as `discovery-server/tests/fuzz.rs`):
//! the three entry points get arbitrary bytes, WireGuard-shaped packets and mutated valid
//! messages, and must answer with a value or an error, never a panic or an allocation. Whatever
//! `answer_binding_request` writes must read back with `parse_binding_response` as the source it
//! was given.
//!
//! CI runs a small budget (`FUZZ_CASES`, default 256 cases per target, well under a second). A
//! longer campaign: `FUZZ_CASES=1000000 cargo test --release -p openspan-stun --test fuzz`. A
//! failing case is shrunk and printed with its seed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use openspan_fuzz_support::{CountingAllocator, allocated_by, cases};
use openspan_stun::{
    MAGIC_COOKIE, MAX_BINDING_RESPONSE_LEN, TransactionId, answer_binding_request, binding_request,
    is_stun, parse_binding_response,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// The crate promises never to allocate (it runs on the WireGuard receive path): counted.
#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Runs `f` and fails the case if it allocated anything on this thread.
fn without_allocating<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    let (result, allocated) = allocated_by(f);
    prop_assert_eq!(allocated, 0, "{} allocated {} bytes", what, allocated);
    Ok(result)
}

/// What a server sees as a source: any IPv4 or IPv6 address and port, IPv4-mapped ones
/// included (a dual-stack socket's view of IPv4 clients).
fn source() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<u32>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
        (any::<u128>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)),
        (any::<u32>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(
            IpAddr::V6(Ipv4Addr::from(ip).to_ipv6_mapped()),
            port
        )),
    ]
}

/// The address a response must report for `source`: IPv4-mapped IPv6 as the IPv4 it is.
fn canonical(source: SocketAddr) -> SocketAddr {
    SocketAddr::new(source.ip().to_canonical(), source.port())
}

/// Some attributes with arbitrary types, lengths and contents, framed correctly.
fn attributes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        (any::<u16>(), proptest::collection::vec(any::<u8>(), 0..40)),
        0..6,
    )
    .prop_map(|attributes| {
        let mut bytes = Vec::new();
        for (kind, value) in attributes {
            bytes.extend_from_slice(&kind.to_be_bytes());
            bytes.extend_from_slice(&(value.len() as u16).to_be_bytes());
            bytes.extend_from_slice(&value);
            bytes.resize(bytes.len().next_multiple_of(4), 0);
        }
        bytes
    })
}

/// Whether well-framed `attributes` hold one of the attribute types `kinds`.
fn has_kind(attributes: &[u8], kinds: &[u16]) -> bool {
    let mut rest = attributes;
    while rest.len() >= 4 {
        if kinds.contains(&u16::from_be_bytes([rest[0], rest[1]])) {
            return true;
        }
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]])).next_multiple_of(4);
        rest = &rest[4 + len..];
    }
    false
}

/// A Binding request carrying `attributes`.
fn request_with(transaction: &TransactionId, attributes: &[u8]) -> Vec<u8> {
    let mut message = binding_request(transaction).to_vec();
    message[2..4].copy_from_slice(&(attributes.len() as u16).to_be_bytes());
    message.extend_from_slice(attributes);
    message
}

/// Runs all three entry points on `packet` and checks what must hold for any input.
fn check_any(packet: &[u8], source: SocketAddr) -> Result<(), TestCaseError> {
    let stun = without_allocating("is_stun", || is_stun(packet))?;
    let parsed = without_allocating("parse_binding_response", || parse_binding_response(packet))?;
    let mut out = [0u8; 64];
    let answered = without_allocating("answer_binding_request", || {
        answer_binding_request(packet, source, &mut out)
    })?;
    if !stun {
        prop_assert!(
            parsed.is_err() && answered.is_err(),
            "accepted a non-STUN packet"
        );
    }
    if let Ok(len) = answered {
        check_answer(packet, source, &out[..len])?;
    }
    Ok(())
}

/// An answer must be a Binding success response for the request's transaction that reads
/// back as `source`, and small (the server's amplification bound).
fn check_answer(request: &[u8], source: SocketAddr, answer: &[u8]) -> Result<(), TestCaseError> {
    prop_assert!(
        answer.len() == 32 || answer.len() == 44,
        "{} bytes",
        answer.len()
    );
    prop_assert!(answer.len() <= MAX_BINDING_RESPONSE_LEN);
    prop_assert!(is_stun(answer));
    let (transaction, mapped) = parse_binding_response(answer)
        .map_err(|e| TestCaseError::fail(format!("our own answer does not parse: {e}")))?;
    prop_assert_eq!(&transaction[..], &request[8..20]);
    prop_assert_eq!(mapped, canonical(source));
    // An answer is never itself answered: two responders cannot ping-pong.
    let mut out = [0u8; 64];
    prop_assert!(answer_binding_request(answer, source, &mut out).is_err());
    Ok(())
}

/// Flips, truncates and extends `message`; each variant goes through [`check_any`].
fn mutate_and_check(
    message: &[u8],
    flips: &[(prop::sample::Index, u8)],
    cut: prop::sample::Index,
    tail: &[u8],
    source: SocketAddr,
) -> Result<(), TestCaseError> {
    let mut flipped = message.to_vec();
    for (at, xor) in flips {
        let i = at.index(flipped.len());
        flipped[i] ^= xor;
    }
    check_any(&flipped, source)?;
    check_any(&message[..cut.index(message.len() + 1)], source)?;
    check_any(&[message, tail].concat(), source)?;
    // Extended with the header's length fixed up, so the change reaches the attribute parser.
    let mut extended = [message, tail].concat();
    if extended.len() >= 20 {
        let declared = (extended.len() - 20).min(usize::from(u16::MAX)) as u16;
        extended[2..4].copy_from_slice(&declared.to_be_bytes());
    }
    check_any(&extended, source)
}

proptest! {
    #![proptest_config(cases(256))]

    /// Raw bytes: almost all fail the header checks.
    #[test]
    fn arbitrary_bytes_never_panic(
        packet in proptest::collection::vec(any::<u8>(), 0..600),
        source in source(),
    ) {
        check_any(&packet, source)?;
    }

    /// Arbitrary attribute bytes behind a valid header of each message type of interest, so
    /// they reach the attribute and address parsers.
    #[test]
    fn arbitrary_attributes_behind_a_valid_header_never_panic(
        message_type in prop_oneof![Just(0x0001u16), Just(0x0101), Just(0x0111), Just(0x0011), any::<u16>()],
        transaction in any::<TransactionId>(),
        body in proptest::collection::vec(any::<u8>(), 0..150).prop_map(|mut b| {
            b.truncate(b.len() / 4 * 4);
            b
        }),
        source in source(),
    ) {
        let mut message = binding_request(&transaction).to_vec();
        message[0..2].copy_from_slice(&(message_type & 0x3fff).to_be_bytes());
        message[2..4].copy_from_slice(&(body.len() as u16).to_be_bytes());
        message.extend_from_slice(&body);
        prop_assert!(is_stun(&message));
        check_any(&message, source)?;
    }

    /// Every well-framed Binding request is answered, whatever attributes it carries, and the
    /// answer reads back as the source.
    #[test]
    fn answers_round_trip(
        transaction in any::<TransactionId>(),
        attributes in attributes(),
        source in source(),
    ) {
        let request = request_with(&transaction, &attributes);
        let mut out = [0u8; 64];
        let len = answer_binding_request(&request, source, &mut out)
            .map_err(|e| TestCaseError::fail(format!("a valid request was refused: {e}")))?;
        check_answer(&request, source, &out[..len])?;
    }

    /// Responses with arbitrary attributes around the address: the XOR-MAPPED-ADDRESS is found
    /// wherever it sits, as long as no other one, MESSAGE-INTEGRITY or FINGERPRINT precedes it.
    #[test]
    fn responses_with_extra_attributes_parse(
        transaction in any::<TransactionId>(),
        before in attributes(),
        after in attributes(),
        source in source(),
    ) {
        // XOR-MAPPED-ADDRESS, MESSAGE-INTEGRITY(-SHA256), FINGERPRINT.
        prop_assume!(!has_kind(&before, &[0x0020, 0x0008, 0x001c, 0x8028]));
        let mut out = [0u8; 64];
        let len = answer_binding_request(&binding_request(&transaction), source, &mut out).unwrap();
        let attributes = [&before[..], &out[20..len], &after[..]].concat();
        let mut response = out[..20].to_vec();
        response[2..4].copy_from_slice(&(attributes.len() as u16).to_be_bytes());
        response.extend_from_slice(&attributes);
        let (echoed, mapped) = parse_binding_response(&response)
            .map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert_eq!(echoed, transaction);
        prop_assert_eq!(mapped, canonical(source));
    }

    /// Mutated requests (with attributes) and mutated answers: never a panic, and whatever is
    /// still answered round-trips.
    #[test]
    fn mutated_messages_never_panic(
        transaction in any::<TransactionId>(),
        attributes in attributes(),
        source in source(),
        answer_instead in any::<bool>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..6),
        cut in any::<prop::sample::Index>(),
        tail in proptest::collection::vec(any::<u8>(), 0..24),
    ) {
        let request = request_with(&transaction, &attributes);
        let message = if answer_instead {
            let mut out = [0u8; 64];
            let len = answer_binding_request(&request, source, &mut out).unwrap();
            out[..len].to_vec()
        } else {
            request
        };
        mutate_and_check(&message, &flips, cut, &tail, source)?;
    }

    /// WireGuard messages (type 1..=4, three zero bytes, then anything) are never STUN, at the
    /// real sizes (148, 92, 64) and at any transport-data size, even with the magic cookie
    /// where the sender index goes.
    #[test]
    fn wireguard_shaped_packets_are_never_stun(
        message_type in 1u8..=4,
        size in prop_oneof![Just(148usize), Just(92), Just(64), Just(32), 32usize..=65_535],
        head in proptest::collection::vec(any::<u8>(), 0..=148),
        seed in any::<u64>(),
        cookie_as_index in any::<bool>(),
        source in source(),
    ) {
        // The first bytes from proptest (shrinkable), the rest of a large packet from a seed.
        let mut packet = vec![0u8; size];
        noise(seed, &mut packet);
        let n = head.len().min(size);
        packet[..n].copy_from_slice(&head[..n]);
        packet[..4].copy_from_slice(&[message_type, 0, 0, 0]);
        if cookie_as_index {
            packet[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        }
        prop_assert!(!is_stun(&packet));
        check_any(&packet, source)?;
    }
}

/// Fills `buf` from a xorshift64 generator.
fn noise(seed: u64, buf: &mut [u8]) {
    let mut x = seed | 1;
    for b in buf {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}
