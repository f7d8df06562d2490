//! Fuzz targets on the stable toolchain, driven by proptest: every decoder of bytes from the
//! network or from an operator's file (Hello, answer, datagram and stream framing, the clusters
//! file and `--cluster` values) gets arbitrary and mutated input and must answer with a value
//! or an error, never a panic; what it keeps is bounded by what it was given.
//!
//! CI runs a small budget (`FUZZ_CASES`, default 256 cases per target). A longer campaign:
//! `FUZZ_CASES=1000000 cargo test --release -p openspan-relay --test fuzz`.

use bytes::Bytes;
use openspan_fuzz_support::cases;
use openspan_relay::clusters::Clusters;
use openspan_relay::protocol::{
    self, Answer, Code, Hello, KEY_LEN, MAX_CONTROL_FRAME, StreamDecoder,
};
use proptest::prelude::*;

/// A valid Hello's body, to mutate.
fn hello_body() -> impl Strategy<Value = Vec<u8>> {
    ("[a-z0-9.-]{1,40}", any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(id, key, token)| {
        Hello {
            cluster_id: id,
            public_key: key,
            token,
        }
        .encode()
        .unwrap()
        .to_vec()
    })
}

/// Flips, truncates or extends `bytes` at `at`.
fn mutate(mut bytes: Vec<u8>, at: usize, value: u8, how: u8) -> Vec<u8> {
    if bytes.is_empty() {
        return vec![value];
    }
    let at = at % bytes.len();
    match how % 4 {
        0 => bytes[at] ^= value | 1,
        1 => bytes.truncate(at),
        2 => bytes.insert(at, value),
        _ => bytes[0] = value,
    }
    bytes
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn hello_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(hello) = Hello::decode(&bytes) {
            // Whatever it accepts re-encodes to the same bytes: no lenient parsing.
            prop_assert_eq!(hello.encode().unwrap().to_vec(), bytes);
        }
    }

    #[test]
    fn mutated_hellos_are_refused_or_exact(body in hello_body(), at in any::<usize>(), value in any::<u8>(), how in any::<u8>()) {
        prop_assert!(Hello::decode(&body).is_ok());
        let mutated = mutate(body, at, value, how);
        if let Ok(hello) = Hello::decode(&mutated) {
            prop_assert_eq!(hello.encode().unwrap().to_vec(), mutated);
        }
    }

    #[test]
    fn answer_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
        if let Ok(answer) = Answer::decode(&bytes) {
            prop_assert!(answer.message.len() <= 3 * protocol::MAX_MESSAGE_LEN);
            prop_assert_eq!(Code::from_u8(bytes[0]).unwrap(), answer.code);
        }
    }

    #[test]
    fn control_frame_lengths_are_bounded(header in any::<[u8; 2]>()) {
        if let Ok(len) = protocol::control_frame_len(header) {
            prop_assert!(len <= MAX_CONTROL_FRAME);
        }
    }

    #[test]
    fn datagram_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        match protocol::decode_packet(Bytes::from(bytes.clone())) {
            Ok((key, packet)) => {
                prop_assert_eq!(&key[..], &bytes[..KEY_LEN]);
                prop_assert_eq!(&packet[..], &bytes[KEY_LEN..]);
            }
            Err(_) => prop_assert!(bytes.len() < KEY_LEN),
        }
    }

    #[test]
    fn stream_decoder_never_panics_and_stays_bounded(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..3000), 0..8),
    ) {
        let mut decoder = StreamDecoder::default();
        let mut fed = 0;
        'outer: for chunk in &chunks {
            decoder.extend(chunk);
            fed += chunk.len();
            loop {
                match decoder.next_frame() {
                    Ok(Some((_, packet))) => prop_assert!(packet.len() <= protocol::MAX_STREAM_PACKET),
                    Ok(None) => break,
                    Err(_) => break 'outer,
                }
            }
            prop_assert!(decoder.buffered() <= fed);
        }
    }

    #[test]
    fn valid_stream_frames_survive_any_chunking(
        packets in proptest::collection::vec((any::<[u8; 32]>(), proptest::collection::vec(any::<u8>(), 0..2000)), 1..6),
        cut in 1usize..500,
    ) {
        let mut wire = Vec::new();
        for (key, packet) in &packets {
            wire.extend_from_slice(&protocol::encode_stream_frame(key, packet).unwrap());
        }
        let mut decoder = StreamDecoder::default();
        let mut out = Vec::new();
        for chunk in wire.chunks(cut) {
            decoder.extend(chunk);
            while let Some((key, packet)) = decoder.next_frame().unwrap() {
                out.push((key, packet.to_vec()));
            }
        }
        prop_assert_eq!(out, packets);
    }

    #[test]
    fn clusters_file_parser_never_panics(text in "([a-z0-9#= \\t-]{0,80}\\n){0,6}", raw in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = Clusters::parse_file(&text, "fuzz");
        let _ = Clusters::parse_file(&String::from_utf8_lossy(&raw), "fuzz");
        let _ = Clusters::parse_flag(&text);
    }
}
