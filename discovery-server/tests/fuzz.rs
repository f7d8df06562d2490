//! Fuzz targets on the stable toolchain, driven by proptest: every decoder that reads bytes
//! from outside (the snapshot loader, gRPC request messages, the Watch route's framing, Go
//! durations, byte sizes, client-IP headers and `grpc-timeout`) gets arbitrary and mutated
//! input and must answer with a value or an error, never a panic or an unbounded allocation.
//!
//! CI runs a small budget (`FUZZ_CASES`, default 64 cases per target, a few seconds in all).
//! A longer campaign: `FUZZ_CASES=2000000 cargo test --release -p discovery-server --test fuzz`
//! (see README, "Fuzzing"). A failing case is shrunk and printed with its seed.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes};
use discovery_server::bytesize::parse_byte_size;
use discovery_server::duration::parse_go_duration;
use discovery_server::grpc::{AdmissionConfig, Gate, decode_unary_frame, grpc_timeout};
use discovery_server::limits::Update;
use discovery_server::metrics::Metrics;
use discovery_server::persist::{self, FORMAT_V1_ABSOLUTE, FORMAT_VERSION};
use discovery_server::store::Store;
use openspan_fuzz_support::{CountingAllocator, allocated_by, cases};
use openspan_proto::discovery::server::{
    AffiliateDeleteRequest, AffiliateUpdateRequest, HelloRequest, ListRequest, WatchRequest,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use prost::Message;
use tonic::Code;

/// Counts what each thread allocates, so a target can bound what decoding one input costs (a
/// length field that makes the decoder reserve gigabytes fails the test instead of the CI
/// machine).
#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// What decoding `input_len` bytes may cost: linear in the input. The factor covers the
/// per-record overhead of the maps and decoded messages that a few input bytes can ask for.
fn allocation_budget(input_len: usize) -> usize {
    (1 << 20) + 1024 * input_len
}

const WALL: i64 = 1_700_000_000_000;

/// One update: cluster id, affiliate id, data, endpoints, TTL in milliseconds.
type Record = (String, String, Vec<u8>, Vec<Vec<u8>>, u64);

/// Some affiliates as a store would hold them.
fn records() -> impl Strategy<Value = Vec<Record>> {
    proptest::collection::vec(
        (
            "[a-c]{1,3}",
            "[a-z0-9-]{1,12}",
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..32), 0..4),
            1u64..=30 * 60_000,
        ),
        0..24,
    )
}

fn store_of(records: &[Record], now: i64) -> Result<Store, TestCaseError> {
    let mut store = Store::default();
    for (cluster, affiliate, data, endpoints, ttl_ms) in records {
        store
            .update(
                Update {
                    cluster_id: cluster.clone(),
                    affiliate_id: affiliate.clone(),
                    data: Some(Bytes::from(data.clone())),
                    endpoints: endpoints.iter().cloned().map(Bytes::from).collect(),
                    ttl: Duration::from_millis(*ttl_ms),
                },
                now,
            )
            .map_err(|e| TestCaseError::fail(format!("valid update refused: {e}")))?;
    }
    Ok(store)
}

/// Decodes `bytes` into an empty store and checks the cost bound; returns whether it loaded.
fn decode_bounded(bytes: &[u8], now: i64, wall: i64) -> Result<bool, TestCaseError> {
    let mut store = Store::default();
    let (result, allocated) = allocated_by(|| persist::decode_into(bytes, &mut store, now, wall));
    prop_assert!(
        allocated <= allocation_budget(bytes.len()),
        "decoding {} bytes allocated {allocated}",
        bytes.len()
    );
    if result.is_err() {
        prop_assert_eq!(store.totals().affiliates, 0, "an error left partial state");
    }
    // Nothing loaded may outlive the longest TTL.
    for (_, affiliates) in store.clusters() {
        for affiliate in affiliates.values() {
            prop_assert!(affiliate.expires_at <= now.saturating_add(30 * 60_000));
            prop_assert!(affiliate.expires_at > now);
        }
    }
    Ok(result.is_ok())
}

proptest! {
    #![proptest_config(cases(64))]

    /// Snapshot loader, raw bytes: most fail the header checks.
    #[test]
    fn snapshot_loader_survives_arbitrary_files(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        decode_bounded(&bytes, 0, WALL)?;
    }

    /// Snapshot loader, arbitrary payloads behind a valid header and checksum, so they reach
    /// the protobuf decoder and the TTL arithmetic, in both formats, at any clock readings.
    #[test]
    fn snapshot_loader_survives_arbitrary_payloads(
        payload in proptest::collection::vec(any::<u8>(), 0..2048),
        v1 in any::<bool>(),
        now in 0i64..1 << 60,
        wall in any::<i64>(),
    ) {
        let version = if v1 { FORMAT_V1_ABSOLUTE } else { FORMAT_VERSION };
        decode_bounded(&persist::seal_payload(version, &payload), now, wall)?;
    }

    /// Snapshot loader, mutated valid files: flipped bytes, truncation, extension. With the
    /// checksum in the way every mutation must be refused; re-sealed, it must decode or fail.
    #[test]
    fn snapshot_loader_survives_mutated_files(
        records in records(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8),
        cut in any::<prop::sample::Index>(),
        tail in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let store = store_of(&records, 1_000)?;
        let file = persist::encode(&store, 1_000, WALL);
        let mut mutated = file.clone();
        for (at, xor) in &flips {
            let i = at.index(mutated.len());
            mutated[i] ^= xor;
        }
        if mutated != file {
            prop_assert!(!decode_bounded(&mutated, 0, WALL)?, "a damaged file loaded");
        }
        let truncated = &file[..cut.index(file.len())];
        prop_assert!(!decode_bounded(truncated, 0, WALL)?, "a truncated file loaded");
        let mut extended = file.clone();
        extended.extend_from_slice(&tail);
        prop_assert_eq!(decode_bounded(&extended, 0, WALL)?, tail.is_empty());
        // The same damage to the payload alone, behind a recomputed checksum.
        let mut payload = file[24..].to_vec();
        if !payload.is_empty() {
            for (at, xor) in &flips {
                let i = at.index(payload.len());
                payload[i] ^= xor;
            }
        }
        decode_bounded(&persist::seal_payload(FORMAT_VERSION, &payload), 0, WALL)?;
    }

    /// Round trip: whatever a store holds comes back with the TTLs it had left, however far
    /// apart the two processes' monotonic clocks are.
    #[test]
    fn snapshots_round_trip_remaining_ttls(
        records in records(),
        written_at in 0i64..1 << 50,
        loaded_at in 0i64..1 << 50,
        elapsed in 0i64..60_000,
        downtime in 0i64..=30 * 60_000,
    ) {
        let store = store_of(&records, written_at)?;
        let file = persist::encode(&store, written_at + elapsed, WALL);
        let mut loaded = Store::default();
        persist::decode_into(&file, &mut loaded, loaded_at, WALL + downtime)
            .map_err(TestCaseError::fail)?;
        let shift = loaded_at - written_at - elapsed - downtime;
        let mut expected = BTreeMap::new();
        for (cluster, affiliates) in store.clusters() {
            for (id, a) in affiliates {
                if a.expires_at - written_at - elapsed - downtime > 0 {
                    let endpoints: Vec<_> = a
                        .endpoints
                        .iter()
                        .filter(|e| e.expires_at - written_at - elapsed - downtime > 0)
                        .map(|e| (e.data.clone(), e.expires_at + shift))
                        .collect();
                    expected.insert((cluster.clone(), id.clone()), (a.data.clone(), a.expires_at + shift, endpoints));
                }
            }
        }
        let mut actual = BTreeMap::new();
        for (cluster, affiliates) in loaded.clusters() {
            for (id, a) in affiliates {
                let endpoints: Vec<_> = a.endpoints.iter().map(|e| (e.data.clone(), e.expires_at)).collect();
                actual.insert((cluster.clone(), id.clone()), (a.data.clone(), a.expires_at, endpoints));
            }
        }
        prop_assert_eq!(actual, expected);
    }

    /// gRPC request messages: the decoder tonic runs on every unary call (prost), then the
    /// store's validation that an update goes through. Never a panic; an update either is
    /// applied or refused with an InvalidArgument/ResourceExhausted error.
    #[test]
    fn request_messages_survive_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let (_, allocated) = allocated_by(|| {
            let _ = HelloRequest::decode(&bytes[..]);
            let _ = ListRequest::decode(&bytes[..]);
            let _ = WatchRequest::decode(&bytes[..]);
            let _ = AffiliateDeleteRequest::decode(&bytes[..]);
        });
        prop_assert!(allocated <= allocation_budget(bytes.len()));
        if let Ok(request) = AffiliateUpdateRequest::decode(&bytes[..]) {
            let Some(ttl) = request.ttl.map(Duration::try_from).transpose().ok() else {
                return Ok(()); // A negative ttl is refused before the store sees it.
            };
            let update = Update {
                cluster_id: request.cluster_id,
                affiliate_id: request.affiliate_id,
                data: request.affiliate_data,
                endpoints: request.affiliate_endpoints,
                ttl: ttl.unwrap_or_default(),
            };
            let mut store = Store::default();
            let _ = store.update(update, i64::MAX - 1);
        }
    }

    /// The Watch route's hand-written framing, on arbitrary bodies.
    #[test]
    fn watch_framing_survives_arbitrary_bodies(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        match decode_unary_frame::<WatchRequest>(Bytes::from(body.clone())) {
            Ok(request) => {
                // Accepted only as one exact uncompressed frame holding that message.
                prop_assert!(body.len() >= 5 && body[0] == 0);
                let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
                prop_assert_eq!(len, body.len() - 5);
                prop_assert_eq!(WatchRequest::decode(&body[5..]).ok(), Some(request));
            }
            Err(status) => prop_assert_eq!(status.code(), Code::InvalidArgument, "{:?}", status),
        }
    }

    /// The Watch framing with structure: a real message inside frames whose header lies.
    #[test]
    fn watch_framing_refuses_lying_headers(
        cluster_id in "\\PC{0,64}",
        flag in any::<u8>(),
        declared in any::<u32>(),
        extra in proptest::collection::vec(any::<u8>(), 0..8),
    ) {
        let message = WatchRequest { cluster_id: cluster_id.clone() }.encode_to_vec();
        let mut body = Vec::new();
        body.put_u8(flag);
        body.put_u32(declared);
        body.extend_from_slice(&message);
        body.extend_from_slice(&extra);
        let result = decode_unary_frame::<WatchRequest>(Bytes::from(body.clone()));
        let honest = flag == 0 && declared as usize == message.len() + extra.len();
        if !honest {
            prop_assert_eq!(result.unwrap_err().code(), Code::InvalidArgument);
        } else if extra.is_empty() {
            prop_assert_eq!(result.unwrap().cluster_id, cluster_id);
        }
    }

    /// Go durations (flags): arbitrary text never panics.
    #[test]
    fn go_durations_survive_arbitrary_text(text in "\\PC{0,32}") {
        let _ = parse_go_duration(&text);
    }

    /// Go durations built from valid parts parse to their sum.
    #[test]
    fn go_durations_parse_to_their_sum(parts in proptest::collection::vec((0u32..10_000, 0usize..6), 1..5)) {
        const UNITS: [(&str, f64); 6] = [("ns", 1e-9), ("us", 1e-6), ("ms", 1e-3), ("s", 1.0), ("m", 60.0), ("h", 3600.0)];
        let text: String = parts.iter().map(|(n, u)| format!("{n}{}", UNITS[*u].0)).collect();
        let expected: f64 = parts.iter().map(|(n, u)| f64::from(*n) * UNITS[*u].1).sum();
        let parsed = parse_go_duration(&text).map_err(TestCaseError::fail)?;
        prop_assert!((parsed.as_secs_f64() - expected).abs() <= 1e-6 * expected.max(1.0), "{text}: {parsed:?}");
    }

    /// Byte sizes (flags): arbitrary text never panics; numbers with a unit multiply exactly.
    #[test]
    fn byte_sizes_parse_or_refuse(text in "\\PC{0,24}", n in any::<u32>(), unit in 0usize..5) {
        let _ = parse_byte_size(&text);
        const UNITS: [(&str, u64); 5] = [("", 1), ("B", 1), ("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30)];
        let (suffix, multiplier) = UNITS[unit];
        prop_assert_eq!(parse_byte_size(&format!("{n}{suffix}")), Ok(u64::from(n) * multiplier));
    }

    /// Client addresses from proxy headers and the `grpc-timeout` header: arbitrary values
    /// never panic, and the IP is either one the header spelled or the TCP peer's.
    #[test]
    fn client_address_headers_survive_arbitrary_values(
        real_ip in "\\PC{0,64}",
        forwarded in "\\PC{0,128}",
        timeout in "\\PC{0,24}",
    ) {
        let gate = Gate::new(
            AdmissionConfig { trust_x_real_ip: true, trust_first_x_forwarded_for: true, ..AdmissionConfig::default() },
            Arc::new(Metrics::default()),
        );
        let mut headers = http::HeaderMap::new();
        for (name, value) in [("x-real-ip", &real_ip), ("x-forwarded-for", &forwarded), ("grpc-timeout", &timeout)] {
            if let Ok(value) = http::HeaderValue::from_str(value) {
                headers.insert(name, value);
            }
        }
        let _ = grpc_timeout(&headers);
        let peer: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let ip = gate.client_ip(&headers, Some(peer));
        prop_assert!(ip.is_some());
        let from_header = |text: &str| {
            let text = text.trim();
            text.parse::<IpAddr>().ok().or_else(|| text.parse::<SocketAddr>().ok().map(|a| a.ip()))
        };
        let spelled = [from_header(&real_ip), forwarded.split(',').next().and_then(from_header), Some(peer.ip())];
        let canonical = |ip: IpAddr| match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        prop_assert!(spelled.iter().flatten().any(|s| canonical(*s) == ip.unwrap()), "{ip:?}");
    }
}

/// Found by fuzzing the loader: a file with a long cluster id and many tiny affiliates made the
/// loader copy the id once per affiliate, quadratic in the file size. Now linear.
#[test]
fn a_long_cluster_id_with_many_affiliates_loads_in_linear_space() {
    use openspan_proto::openspan::discovery::snapshot::v1 as pb;
    let snapshot = pb::Snapshot {
        format_version: FORMAT_VERSION,
        taken_at_unix_ms: WALL,
        boot_id: String::new(),
        since_boot_ms: 0,
        clusters: vec![pb::ClusterState {
            id: "c".repeat(64 << 10),
            affiliates: (0..20_000)
                .map(|i| pb::AffiliateState {
                    id: format!("{i}"),
                    ttl_remaining_ms: 60_000,
                    ..Default::default()
                })
                .collect(),
        }],
    };
    let file = persist::seal_payload(FORMAT_VERSION, &snapshot.encode_to_vec());
    let mut store = Store::default();
    let (loaded, allocated) =
        allocated_by(|| persist::decode_into(&file, &mut store, 0, WALL).unwrap());
    assert_eq!(loaded.affiliates, 20_000);
    assert!(
        allocated < 64 * file.len(),
        "{} bytes of file allocated {allocated}",
        file.len()
    );
}

mod common;

/// Sends `body` as-is to `method` over real HTTP/2 and returns the gRPC status code, or `None`
/// when a Watch stream opened (the body was a valid request).
async fn raw_call(
    channel: &mut tonic::transport::Channel,
    method: &str,
    body: Bytes,
) -> Option<Code> {
    use http_body_util::BodyExt;
    use tonic::codegen::Service;
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://discovery.test/sidero.discovery.server.Cluster/{method}"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(http_body_util::Full::new(body)))
        .unwrap();
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .expect("channel ready");
    let response = channel.call(request).await.expect("an HTTP answer");
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return Some(status.code());
    }
    if method == "Watch" {
        return None;
    }
    let collected = tokio::time::timeout(Duration::from_secs(5), response.into_body().collect())
        .await
        .expect("a unary answer within 5 s")
        .expect("a complete body");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    Some(tonic::Status::from_header_map(&trailers).map_or(Code::Ok, |s| s.code()))
}

fn frame(flag: u8, declared: u32, payload: &[u8]) -> Bytes {
    let mut body = vec![flag];
    body.extend_from_slice(&declared.to_be_bytes());
    body.extend_from_slice(payload);
    Bytes::from(body)
}

/// Malformed bodies over real sockets, hand-picked and random: the Watch and List route answers
/// InvalidArgument; the unary methods answer InvalidArgument too (or Ok when the body happens to decode and validate); the server keeps
/// serving throughout.
#[tokio::test]
async fn malformed_request_bodies_over_real_sockets_never_crash_the_server() {
    let server = common::start(common::test_config()).await;
    let addr = server.grpc_addr.unwrap();
    let mut channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let garbage = [0xff; 8]; // wire type 7 does not exist
    let mut malformed = vec![
        Bytes::new(),
        Bytes::from_static(&[0, 0, 0]),
        frame(0, 100, b"abc"),  // header promises more than is sent
        frame(0, 2, b"abcdef"), // and less
        frame(0, garbage.len() as u32, &garbage), // undecodable protobuf
        frame(0, 3, &[0x0a, 0x05, b'x']), // a string longer than the message
    ];
    // Random bodies: each a frame with a random payload, so it reaches the decoder.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let payloads = proptest::collection::vec(any::<u8>(), 1..256);
    let random = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16usize);
    for _ in 0..random {
        use proptest::strategy::ValueTree;
        let payload = payloads.new_tree(&mut runner).unwrap().current();
        malformed.push(frame(0, payload.len() as u32, &payload));
    }
    for body in &malformed {
        let code = raw_call(&mut channel, "Watch", body.clone()).await;
        let valid = decode_unary_frame::<WatchRequest>(body.clone())
            .ok()
            .filter(|w| !w.cluster_id.is_empty() && w.cluster_id.len() <= 256);
        match valid {
            Some(_) => assert!(matches!(code, None | Some(Code::Ok)), "{body:?}: {code:?}"),
            None => assert_eq!(code, Some(Code::InvalidArgument), "Watch {body:?}"),
        }
        for method in ["Hello", "AffiliateUpdate", "AffiliateDelete", "List"] {
            let code = raw_call(&mut channel, method, body.clone()).await;
            assert!(
                matches!(code, Some(Code::Ok | Code::InvalidArgument)),
                "{method} {body:?}: {code:?}"
            );
        }
    }
    // A compressed frame without grpc-encoding, an invalid flag, an over-long message: every
    // method says InvalidArgument.
    for body in [frame(1, 0, b""), frame(7, 0, b""), frame(0, 1 << 30, b"")] {
        for method in [
            "Hello",
            "AffiliateUpdate",
            "AffiliateDelete",
            "List",
            "Watch",
        ] {
            let code = raw_call(&mut channel, method, body.clone()).await;
            assert_eq!(code, Some(Code::InvalidArgument), "{method} {body:?}");
        }
    }
    // Still serving.
    let mut client = common::client(&server).await;
    client
        .affiliate_update(common::update("c", "a", Some(b"d"), &[]))
        .await
        .unwrap();
    assert_eq!(common::list(&mut client, "c").await.len(), 1);
    server.shutdown().await.unwrap();
}
