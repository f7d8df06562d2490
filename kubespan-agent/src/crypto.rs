//! Encryption of what a node publishes at the discovery service, and the WireGuard preshared key.
//!
//! The discovery server only ever sees ciphertext: the affiliate record (`Affiliate.data`, a
//! serialized `sidero.discovery.client.Affiliate`) and each WireGuard endpoint
//! (`Affiliate.endpoints`) are encrypted with keys that come from the cluster secret, which the
//! server never has. Two suites exist; every node of a cluster must use the same one.
//!
//! # `talos`: byte-for-byte compatible with Talos's discovery client
//!
//! The key is the raw 32-byte cluster secret, used for everything:
//!
//! - **Record**: AES-256-GCM with a random 12-byte nonce, no associated data;
//!   blob = `nonce(12) || ciphertext || tag(16)`.
//! - **Endpoint**: the protobuf `Endpoint{ip (4 or 16 raw bytes), port}`, prefixed with one length
//!   byte, zero-padded to a multiple of 16 bytes and encrypted block by block with AES-256 in ECB
//!   mode. IPv4 endpoints become 16 bytes, IPv6 endpoints 32 bytes. ECB is deterministic, which
//!   Talos relies on so that the server de-duplicates the same endpoint pushed by several nodes;
//!   it is *not* authenticated, so opening checks the length byte, the zero padding and the
//!   protobuf structure and rejects anything malformed, but cannot detect every forgery.
//! - **WireGuard preshared key**: the raw secret.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are sent as 4-byte IPv4, as Talos does, and
//! opened endpoints are always returned in canonical form (a mapped address becomes IPv4).
//!
//! # `native`: openspan's own suite (the default)
//!
//! Independent keys are derived from the secret with HKDF-SHA256, salt = the cluster id string's
//! bytes, and one info string per purpose: [`INFO_RECORD`], [`INFO_ENDPOINT_ENC`],
//! [`INFO_ENDPOINT_MAC`] and [`INFO_WIREGUARD_PSK`]. So the WireGuard preshared key reveals nothing
//! about the discovery keys and vice versa, and two clusters that (wrongly) share a secret still
//! get different keys. Every blob starts with a version byte, [`NATIVE_VERSION`] (`0x01`), so the
//! format can evolve.
//!
//! - **Record**: XChaCha20-Poly1305 with a random 24-byte nonce (large enough that random nonces
//!   never collide in practice); associated data = the affiliate id, so the server cannot move a
//!   record from one affiliate to another; blob = `0x01 || nonce(24) || ciphertext || tag(16)`.
//! - **Endpoint**: a compact, deterministic, SIV-style authenticated encryption. The reference
//!   discovery server refuses encrypted endpoints larger than 32 bytes, so a random nonce plus a
//!   Poly1305 tag (1 + 24 + 18 + 16 = 59 bytes for IPv6) does not fit; and endpoints must be
//!   deterministic anyway so the server can de-duplicate them. The construction:
//!
//!   ```text
//!   p     = ip (4 or 16 bytes) || port (2 bytes, big-endian)
//!   tag   = HMAC-SHA256(k_mac, len(affiliate_id) as u64 BE || affiliate_id || p)[..13]
//!   c     = p XOR XChaCha20(k_enc, nonce = tag || 11 zero bytes)
//!   blob  = 0x01 || tag(13) || c            (20 bytes for IPv4, 32 bytes for IPv6)
//!   ```
//!
//!   Opening decrypts with the nonce taken from the tag, recomputes the HMAC over the recovered
//!   plaintext and compares it with the tag in constant time; the blob length (20 or 32) decides
//!   the address family. The tag is a PRF of the plaintext, so it doubles as a synthetic IV: equal
//!   endpoints of one affiliate give equal blobs (the server can de-duplicate them), different
//!   ones give unrelated keystreams, and nothing but equality leaks. Because the affiliate id is
//!   inside the MAC, the server can neither forge an endpoint nor move one node's endpoint to
//!   another node (which would redirect that node's WireGuard traffic). A 104-bit tag makes a
//!   blind forgery succeed with probability 2^-104 per attempt. The id is length-prefixed so the
//!   MAC input is unambiguous whatever bytes the id holds.
//! - **WireGuard preshared key**: HKDF output for [`INFO_WIREGUARD_PSK`].
//!
//! Endpoints with port 0 are refused when opening in both suites: they cannot be dialled.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use aes::Aes256;
use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt};
use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chacha20::XChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20poly1305::XChaCha20Poly1305;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use openspan_proto::discovery::client::Endpoint;
use prost::Message;
use rand::Rng as _;
use sha2::Sha256;

/// Version byte that starts every `native` blob.
pub const NATIVE_VERSION: u8 = 0x01;
/// HKDF info for the `native` record key.
pub const INFO_RECORD: &str = "openspan/v1 record";
/// HKDF info for the `native` endpoint encryption key.
pub const INFO_ENDPOINT_ENC: &str = "openspan/v1 endpoint-enc";
/// HKDF info for the `native` endpoint MAC key.
pub const INFO_ENDPOINT_MAC: &str = "openspan/v1 endpoint-mac";
/// HKDF info for the `native` WireGuard preshared key.
pub const INFO_WIREGUARD_PSK: &str = "openspan/v1 wireguard-psk";
/// HKDF info of the key that seals the agent's own state files (both suites).
pub const INFO_STATE_FILE: &str = "openspan/v1 state-file";
/// The largest encrypted endpoint the reference discovery server accepts.
pub const MAX_ENDPOINT_BLOB: usize = 32;

const TALOS_NONCE_LEN: usize = 12;
const AEAD_TAG_LEN: usize = 16;
const NATIVE_NONCE_LEN: usize = 24;
const AES_BLOCK: usize = 16;
const ENDPOINT_TAG_LEN: usize = 13;
const NATIVE_ENDPOINT_V4_LEN: usize = 1 + ENDPOINT_TAG_LEN + 4 + 2;
const NATIVE_ENDPOINT_V6_LEN: usize = 1 + ENDPOINT_TAG_LEN + 16 + 2;

type HmacSha256 = Hmac<Sha256>;

/// Which encryption suite a cluster uses for discovery data and the WireGuard preshared key.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Cipher {
    /// Talos's discovery client format (interoperates with Talos nodes).
    Talos,
    /// openspan's own suite: derived keys, authenticated and id-bound endpoints.
    #[default]
    Native,
}

impl Cipher {
    /// The configuration spelling: `talos` or `native`.
    pub fn as_str(self) -> &'static str {
        match self {
            Cipher::Talos => "talos",
            Cipher::Native => "native",
        }
    }
}

impl fmt::Display for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an encrypted blob or a secret was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error(
        "encrypted blob is {len} bytes, shorter than the minimum of {min}: it was truncated or is not \
         a blob of this cipher suite (check that every node uses the same `cipher`)"
    )]
    TooShort { len: usize, min: usize },
    #[error(
        "unknown blob format version {0:#04x}: the sender uses a newer or different cipher suite \
         (check that every node uses the same `cipher` and a compatible openspan version)"
    )]
    UnknownVersion(u8),
    #[error(
        "authentication failed: wrong cluster secret or tampered record (check that every node has \
         the same clusterId, clusterSecret and `cipher`)"
    )]
    Authentication,
    #[error("malformed encrypted endpoint: {0}")]
    BadEndpoint(String),
    #[error("invalid cluster secret: {0}")]
    BadSecret(String),
}

/// Parses the cluster secret: standard base64 of exactly 32 bytes (`kubespanctl gen secrets`),
/// the only encoding Talos accepts. Hex and base64url are refused with the way to convert them.
pub fn parse_cluster_secret(base64_text: &str) -> Result<[u8; 32], CryptoError> {
    const GENERATE: &str = "generate one with `kubespanctl gen secrets`";
    let text = base64_text.trim();
    if text.is_empty() {
        return Err(CryptoError::BadSecret(format!("it is empty; {GENERATE}")));
    }
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CryptoError::BadSecret(format!(
            "it looks like hex (64 hex digits), but it must be standard base64 of 32 bytes; \
             convert it with `echo <hex> | xxd -r -p | base64`, or {GENERATE}"
        )));
    }
    let bytes = BASE64.decode(text).map_err(|e| {
        let url_safe = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text.trim_end_matches('='))
            .is_ok_and(|b| b.len() == 32);
        let standard_unpadded = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(text)
            .is_ok_and(|b| b.len() == 32);
        if standard_unpadded {
            CryptoError::BadSecret(format!(
                "it is base64 without its padding; clusterSecret is standard base64 of 32 bytes \
                 ending in `=`: add the trailing `=` (or {GENERATE})"
            ))
        } else if url_safe {
            CryptoError::BadSecret(format!(
                "it looks like base64url (`-` and `_`), but it must be standard base64 of 32 bytes; \
                 convert it with `echo <value> | tr -- '-_' '+/'` and add `=` to make 44 characters, \
                 or {GENERATE}"
            ))
        } else {
            CryptoError::BadSecret(format!(
                "it is not standard base64 ({e}); it must be 32 random bytes in standard base64 \
                 (44 characters ending in `=`); {GENERATE}"
            ))
        }
    })?;
    let secret: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
        CryptoError::BadSecret(format!(
            "it decodes to {} bytes, but exactly 32 are needed; {GENERATE}",
            bytes.len()
        ))
    })?;
    if secret == [0; 32] {
        return Err(CryptoError::BadSecret(format!(
            "it is all zero bytes; use 32 random bytes: {GENERATE}"
        )));
    }
    Ok(secret)
}

#[derive(Clone)]
enum SuiteKeys {
    Talos {
        key: [u8; 32],
    },
    Native {
        record: [u8; 32],
        endpoint_enc: [u8; 32],
        endpoint_mac: [u8; 32],
        psk: [u8; 32],
    },
}

/// The keys of one cluster for one suite. Cheap to clone; its `Debug` output shows only the suite.
#[derive(Clone)]
pub struct ClusterKeys {
    cipher: Cipher,
    keys: SuiteKeys,
    /// Seals files the agent keeps in its state directory (never sent anywhere).
    state_file: [u8; 32],
    /// The keys of `clusterSecretNext`: records and endpoints that do not open with these keys
    /// are tried with those (nothing is sealed with them). The rotation window.
    next: Option<Box<ClusterKeys>>,
}

impl fmt::Debug for ClusterKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterKeys")
            .field("cipher", &self.cipher)
            .finish_non_exhaustive()
    }
}

fn hkdf_expand(hkdf: &Hkdf<Sha256>, info: &str) -> [u8; 32] {
    let mut okm = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's limit of 255 * 32 bytes, so this cannot fail.
    hkdf.expand(info.as_bytes(), &mut okm)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    okm
}

impl ClusterKeys {
    /// Derives the keys of `cipher` for the cluster `cluster_id` (as configured, not decoded)
    /// from its 32-byte secret.
    pub fn new(cipher: Cipher, cluster_id: &str, secret: &[u8; 32]) -> Self {
        let keys = match cipher {
            Cipher::Talos => SuiteKeys::Talos { key: *secret },
            Cipher::Native => {
                let hkdf = Hkdf::<Sha256>::new(Some(cluster_id.as_bytes()), secret);
                SuiteKeys::Native {
                    record: hkdf_expand(&hkdf, INFO_RECORD),
                    endpoint_enc: hkdf_expand(&hkdf, INFO_ENDPOINT_ENC),
                    endpoint_mac: hkdf_expand(&hkdf, INFO_ENDPOINT_MAC),
                    psk: hkdf_expand(&hkdf, INFO_WIREGUARD_PSK),
                }
            }
        };
        let state_file = hkdf_expand(
            &Hkdf::<Sha256>::new(Some(cluster_id.as_bytes()), secret),
            INFO_STATE_FILE,
        );
        ClusterKeys {
            cipher,
            keys,
            state_file,
            next: None,
        }
    }

    /// The keys of a configuration: its secret, and its `clusterSecretNext` for opening.
    pub fn for_config(config: &crate::config::Config) -> Self {
        let keys = Self::new(config.cipher, &config.cluster_id, &config.cluster_secret);
        match &config.cluster_secret_next {
            Some(next) => keys.with_next(Self::new(config.cipher, &config.cluster_id, next)),
            None => keys,
        }
    }

    /// These keys, also opening what `next` opens (a rotation's second secret).
    pub fn with_next(mut self, next: ClusterKeys) -> Self {
        self.next = Some(Box::new(ClusterKeys { next: None, ..next }));
        self
    }

    /// Opens a record like [`Self::open_record`], and says with which secret: the WireGuard
    /// pre-shared key of the keys that opened it (this node's own, or its `next` one's).
    pub fn open_record_with_psk(
        &self,
        affiliate_id: &str,
        blob: &[u8],
    ) -> Result<(Vec<u8>, [u8; 32]), CryptoError> {
        match self.open_record_one(affiliate_id, blob) {
            Err(CryptoError::Authentication) if self.next.is_some() => {
                let next = self.next.as_deref().expect("checked above");
                next.open_record_one(affiliate_id, blob)
                    .map(|plain| (plain, next.wireguard_psk()))
            }
            other => other.map(|plain| (plain, self.wireguard_psk())),
        }
    }

    /// The XChaCha20-Poly1305 key for the agent's sealed state files (the warm-start cache):
    /// HKDF-SHA256 of the cluster secret, salted with the cluster id, for both suites.
    pub fn state_file_key(&self) -> [u8; 32] {
        self.state_file
    }

    /// The suite these keys belong to.
    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// Seals a serialized `sidero.discovery.client.Affiliate` for the discovery server.
    ///
    /// `affiliate_id` is bound to the record in the `native` suite (unused by `talos`).
    ///
    /// # Panics
    /// Only if `plaintext` is larger than the AEAD limit (64 GiB); records are at most a few KiB.
    pub fn seal_record(&self, affiliate_id: &str, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NATIVE_NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        self.seal_record_with_nonce(affiliate_id, plaintext, &nonce)
    }

    /// [`Self::seal_record`] with a caller-chosen nonce (the `talos` suite uses its first 12
    /// bytes). Only for known-answer tests: a nonce must never be reused with the same key.
    fn seal_record_with_nonce(
        &self,
        affiliate_id: &str,
        plaintext: &[u8],
        nonce: &[u8; NATIVE_NONCE_LEN],
    ) -> Vec<u8> {
        match &self.keys {
            SuiteKeys::Talos { key } => {
                let cipher = Aes256Gcm::new(&(*key).into());
                let mut nonce12 = [0u8; TALOS_NONCE_LEN];
                nonce12.copy_from_slice(&nonce[..TALOS_NONCE_LEN]);
                let sealed = cipher
                    .encrypt(&nonce12.into(), plaintext)
                    .expect("AES-GCM plaintext within the 64 GiB limit");
                let mut blob = Vec::with_capacity(TALOS_NONCE_LEN + sealed.len());
                blob.extend_from_slice(&nonce12);
                blob.extend_from_slice(&sealed);
                blob
            }
            SuiteKeys::Native { record, .. } => {
                let cipher = XChaCha20Poly1305::new(&(*record).into());
                let payload = Payload {
                    msg: plaintext,
                    aad: affiliate_id.as_bytes(),
                };
                let sealed = cipher
                    .encrypt(&(*nonce).into(), payload)
                    .expect("XChaCha20-Poly1305 plaintext within the 256 GiB limit");
                let mut blob = Vec::with_capacity(1 + NATIVE_NONCE_LEN + sealed.len());
                blob.push(NATIVE_VERSION);
                blob.extend_from_slice(nonce);
                blob.extend_from_slice(&sealed);
                blob
            }
        }
    }

    /// Opens a record sealed by [`Self::seal_record`] for `affiliate_id` (with these keys or,
    /// during a rotation, the next secret's).
    pub fn open_record(&self, affiliate_id: &str, blob: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.open_record_with_psk(affiliate_id, blob)
            .map(|(plain, _)| plain)
    }

    fn open_record_one(&self, affiliate_id: &str, blob: &[u8]) -> Result<Vec<u8>, CryptoError> {
        match &self.keys {
            SuiteKeys::Talos { key } => {
                let min = TALOS_NONCE_LEN + AEAD_TAG_LEN;
                if blob.len() < min {
                    return Err(CryptoError::TooShort {
                        len: blob.len(),
                        min,
                    });
                }
                let (nonce, sealed) = blob.split_at(TALOS_NONCE_LEN);
                let nonce: [u8; TALOS_NONCE_LEN] =
                    nonce.try_into().map_err(|_| CryptoError::TooShort {
                        len: blob.len(),
                        min,
                    })?;
                Aes256Gcm::new(&(*key).into())
                    .decrypt(&nonce.into(), sealed)
                    .map_err(|_| CryptoError::Authentication)
            }
            SuiteKeys::Native { record, .. } => {
                let min = 1 + NATIVE_NONCE_LEN + AEAD_TAG_LEN;
                check_version(blob, min)?;
                let (nonce, sealed) = blob[1..].split_at(NATIVE_NONCE_LEN);
                let nonce: [u8; NATIVE_NONCE_LEN] =
                    nonce.try_into().map_err(|_| CryptoError::TooShort {
                        len: blob.len(),
                        min,
                    })?;
                let payload = Payload {
                    msg: sealed,
                    aad: affiliate_id.as_bytes(),
                };
                XChaCha20Poly1305::new(&(*record).into())
                    .decrypt(&nonce.into(), payload)
                    .map_err(|_| CryptoError::Authentication)
            }
        }
    }

    /// Encrypts one WireGuard endpoint of `affiliate_id`.
    ///
    /// Deterministic: the same endpoint for the same affiliate always gives the same bytes (server
    /// de-duplication). The result is at most [`MAX_ENDPOINT_BLOB`] bytes. An IPv6 scope id or
    /// flow label is not carried.
    pub fn seal_endpoint(&self, affiliate_id: &str, endpoint: SocketAddr) -> Vec<u8> {
        let ip = canonical_ip(endpoint.ip());
        let port = endpoint.port();
        match &self.keys {
            SuiteKeys::Talos { key } => talos_seal_endpoint(key, ip, port),
            SuiteKeys::Native {
                endpoint_enc,
                endpoint_mac,
                ..
            } => native_seal_endpoint(endpoint_enc, endpoint_mac, affiliate_id, ip, port),
        }
    }

    /// Opens an endpoint sealed by [`Self::seal_endpoint`] for `affiliate_id` (with these keys
    /// or, during a rotation, the next secret's).
    pub fn open_endpoint(
        &self,
        affiliate_id: &str,
        blob: &[u8],
    ) -> Result<SocketAddr, CryptoError> {
        match (self.open_endpoint_one(affiliate_id, blob), &self.next) {
            (Err(_), Some(next)) => next.open_endpoint_one(affiliate_id, blob),
            (result, _) => result,
        }
    }

    fn open_endpoint_one(
        &self,
        affiliate_id: &str,
        blob: &[u8],
    ) -> Result<SocketAddr, CryptoError> {
        match &self.keys {
            SuiteKeys::Talos { key } => talos_open_endpoint(key, blob),
            SuiteKeys::Native {
                endpoint_enc,
                endpoint_mac,
                ..
            } => native_open_endpoint(endpoint_enc, endpoint_mac, affiliate_id, blob),
        }
    }

    /// The WireGuard preshared key of this secret (the one this node seals with).
    pub fn wireguard_psk(&self) -> [u8; 32] {
        match &self.keys {
            SuiteKeys::Talos { key } => *key,
            SuiteKeys::Native { psk, .. } => *psk,
        }
    }
}

/// The WireGuard pre-shared key of a tunnel whose two ends seal their records with secrets
/// whose own pre-shared keys are `a` and `b` (learned from which secret opened the peer's record).
///
/// Why a pair rule: both ends of a tunnel must hold the same key, yet during a `native` secret
/// rotation the two nodes may seal with different secrets (one promoted, the other not yet).
/// The pair {a, b} is the same set seen from either end, so both compute the same key without
/// talking: the shared key itself when they seal alike (outside a rotation: unchanged from
/// before), else HKDF over the two keys in sorted order. It changes only when one end promotes;
/// WireGuard keeps the running session when a peer's pre-shared key changes (it is used only by
/// the next handshake), and the other end follows as soon as it reads the promoted record
/// (seconds), far inside the two minutes before WireGuard rekeys.
pub fn pair_psk(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    if a == b {
        return *a;
    }
    let (low, high) = if a < b { (a, b) } else { (b, a) };
    let mut ikm = [0u8; 64];
    ikm[..32].copy_from_slice(low);
    ikm[32..].copy_from_slice(high);
    hkdf_expand(&Hkdf::<Sha256>::new(None, &ikm), INFO_WIREGUARD_PSK_PAIR)
}

/// HKDF info for the pre-shared key of a tunnel between nodes sealing with different secrets.
pub const INFO_WIREGUARD_PSK_PAIR: &str = "openspan/v1 wireguard-psk-pair";

/// Checks the `native` version byte and the minimum length (version byte included).
fn check_version(blob: &[u8], min: usize) -> Result<(), CryptoError> {
    match blob.first() {
        None => Err(CryptoError::TooShort { len: 0, min }),
        Some(&NATIVE_VERSION) if blob.len() >= min => Ok(()),
        Some(&NATIVE_VERSION) => Err(CryptoError::TooShort {
            len: blob.len(),
            min,
        }),
        Some(&other) => Err(CryptoError::UnknownVersion(other)),
    }
}

/// IPv4-mapped IPv6 addresses become IPv4.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Builds the endpoint from raw IP bytes and a wire port, refusing what cannot be dialled.
fn endpoint_from_parts(ip: &[u8], port: u32) -> Result<SocketAddr, CryptoError> {
    let ip = if let Ok(v4) = <[u8; 4]>::try_from(ip) {
        IpAddr::V4(Ipv4Addr::from(v4))
    } else if let Ok(v6) = <[u8; 16]>::try_from(ip) {
        IpAddr::V6(Ipv6Addr::from(v6)).to_canonical()
    } else {
        return Err(CryptoError::BadEndpoint(format!(
            "the IP address is {} bytes, expected 4 (IPv4) or 16 (IPv6)",
            ip.len()
        )));
    };
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            CryptoError::BadEndpoint(format!("port {port} is not a usable UDP port (1-65535)"))
        })?;
    Ok(SocketAddr::new(ip, port))
}

fn talos_seal_endpoint(key: &[u8; 32], ip: IpAddr, port: u16) -> Vec<u8> {
    let message = Endpoint {
        ip: ip_bytes(ip).into(),
        port: u32::from(port),
    }
    .encode_to_vec();
    // At most 2 + 16 + 1 + 3 = 22 bytes, so the length fits one byte.
    let body = 1 + message.len();
    let mut buf = vec![0u8; body.div_ceil(AES_BLOCK) * AES_BLOCK];
    buf[0] = message.len() as u8;
    buf[1..body].copy_from_slice(&message);
    let aes = Aes256::new(&(*key).into());
    let (blocks, _rest) = aes::Block::slice_as_chunks_mut(&mut buf);
    aes.encrypt_blocks(blocks);
    buf
}

fn talos_open_endpoint(key: &[u8; 32], blob: &[u8]) -> Result<SocketAddr, CryptoError> {
    if blob.is_empty() {
        return Err(CryptoError::TooShort {
            len: 0,
            min: AES_BLOCK,
        });
    }
    if !blob.len().is_multiple_of(AES_BLOCK) {
        return Err(CryptoError::BadEndpoint(format!(
            "{} bytes is not a whole number of 16-byte AES blocks (truncated, or not a talos-suite \
             endpoint)",
            blob.len()
        )));
    }
    if blob.len() > MAX_ENDPOINT_BLOB {
        return Err(CryptoError::BadEndpoint(format!(
            "{} bytes is larger than the {MAX_ENDPOINT_BLOB}-byte limit for one endpoint",
            blob.len()
        )));
    }
    let mut buf = blob.to_vec();
    let aes = Aes256::new(&(*key).into());
    let (blocks, _rest) = aes::Block::slice_as_chunks_mut(&mut buf);
    aes.decrypt_blocks(blocks);

    let len = usize::from(buf[0]);
    let garbled = || {
        CryptoError::BadEndpoint(
            "the decrypted block is not a length-prefixed endpoint: wrong cluster secret or \
             tampered endpoint"
                .into(),
        )
    };
    if len == 0 || 1 + len > buf.len() {
        return Err(garbled());
    }
    if buf[1 + len..].iter().any(|b| *b != 0) {
        return Err(garbled());
    }
    let message = Endpoint::decode(&buf[1..1 + len]).map_err(|_| garbled())?;
    endpoint_from_parts(&message.ip, message.port)
}

/// `ip || port (big-endian)`, 6 or 18 bytes.
fn native_endpoint_plaintext(ip: IpAddr, port: u16) -> Vec<u8> {
    let mut p = ip_bytes(ip);
    p.extend_from_slice(&port.to_be_bytes());
    p
}

fn native_endpoint_mac(mac_key: &[u8; 32], affiliate_id: &str, plaintext: &[u8]) -> HmacSha256 {
    let mut mac =
        <HmacSha256 as KeyInit>::new_from_slice(mac_key).expect("HMAC accepts keys of any length");
    mac.update(&(affiliate_id.len() as u64).to_be_bytes());
    mac.update(affiliate_id.as_bytes());
    mac.update(plaintext);
    mac
}

fn native_endpoint_keystream(enc_key: &[u8; 32], tag: &[u8; ENDPOINT_TAG_LEN], data: &mut [u8]) {
    let mut nonce = [0u8; NATIVE_NONCE_LEN];
    nonce[..ENDPOINT_TAG_LEN].copy_from_slice(tag);
    XChaCha20::new(&(*enc_key).into(), &nonce.into()).apply_keystream(data);
}

fn native_seal_endpoint(
    enc_key: &[u8; 32],
    mac_key: &[u8; 32],
    affiliate_id: &str,
    ip: IpAddr,
    port: u16,
) -> Vec<u8> {
    let mut data = native_endpoint_plaintext(ip, port);
    let full = native_endpoint_mac(mac_key, affiliate_id, &data)
        .finalize()
        .into_bytes();
    let mut tag = [0u8; ENDPOINT_TAG_LEN];
    tag.copy_from_slice(&full[..ENDPOINT_TAG_LEN]);
    native_endpoint_keystream(enc_key, &tag, &mut data);
    let mut blob = Vec::with_capacity(1 + ENDPOINT_TAG_LEN + data.len());
    blob.push(NATIVE_VERSION);
    blob.extend_from_slice(&tag);
    blob.extend_from_slice(&data);
    blob
}

fn native_open_endpoint(
    enc_key: &[u8; 32],
    mac_key: &[u8; 32],
    affiliate_id: &str,
    blob: &[u8],
) -> Result<SocketAddr, CryptoError> {
    check_version(blob, NATIVE_ENDPOINT_V4_LEN)?;
    if blob.len() != NATIVE_ENDPOINT_V4_LEN && blob.len() != NATIVE_ENDPOINT_V6_LEN {
        return Err(CryptoError::BadEndpoint(format!(
            "{} bytes, expected {NATIVE_ENDPOINT_V4_LEN} (IPv4) or {NATIVE_ENDPOINT_V6_LEN} (IPv6)",
            blob.len()
        )));
    }
    let (tag, ciphertext) = blob[1..].split_at(ENDPOINT_TAG_LEN);
    let tag: [u8; ENDPOINT_TAG_LEN] = tag
        .try_into()
        .map_err(|_| CryptoError::BadEndpoint("truncated tag".into()))?;
    let mut data = ciphertext.to_vec();
    native_endpoint_keystream(enc_key, &tag, &mut data);
    native_endpoint_mac(mac_key, affiliate_id, &data)
        .verify_truncated_left(&tag)
        .map_err(|_| CryptoError::Authentication)?;
    let (ip, port) = data.split_at(data.len() - 2);
    endpoint_from_parts(ip, u32::from(u16::from_be_bytes([port[0], port[1]])))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = "8XuV9TZHW08DOk3bVxQjH9ih_TBKjnh-j44tsCLSBzo=";
    const NODE_A: &str = "7x1SuC8Ege5BGXdAfTEff5iQnlWZLfv9h1LGMxA2pYkC";
    const NODE_B: &str = "4WlfBMrdGXO3SpVqv2nvWbz4Dh8lP3S9rgGt2Ae5r2TR";

    fn counting_key() -> [u8; 32] {
        std::array::from_fn(|i| i as u8)
    }

    fn keys(cipher: Cipher) -> ClusterKeys {
        ClusterKeys::new(cipher, CLUSTER, &counting_key())
    }

    fn v4() -> SocketAddr {
        "192.0.2.1:51820".parse().unwrap()
    }

    fn v6() -> SocketAddr {
        "[2001:db8::1]:51820".parse().unwrap()
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn fixed_nonce() -> [u8; NATIVE_NONCE_LEN] {
        std::array::from_fn(|i| 0xa0 + i as u8)
    }

    const RECORD: &[u8] = b"openspan test record";

    #[test]
    fn cipher_defaults_to_native_and_spells_lowercase() {
        assert_eq!(Cipher::default(), Cipher::Native);
        assert_eq!(Cipher::Talos.to_string(), "talos");
        assert_eq!(Cipher::Native.as_str(), "native");
        let parsed: Cipher = serde_json::from_str("\"talos\"").unwrap();
        assert_eq!(parsed, Cipher::Talos);
        assert_eq!(
            serde_json::to_string(&Cipher::Native).unwrap(),
            "\"native\""
        );
        assert!(serde_json::from_str::<Cipher>("\"Talos\"").is_err());
    }

    #[test]
    fn debug_does_not_print_key_material() {
        for cipher in [Cipher::Talos, Cipher::Native] {
            let k = ClusterKeys::new(cipher, CLUSTER, &[0xab; 32]);
            let text = format!("{k:?}");
            assert!(!text.contains("171"), "{text}");
            assert!(!text.to_lowercase().contains("ab, "), "{text}");
            assert!(text.starts_with("ClusterKeys"), "{text}");
        }
    }

    #[test]
    fn parses_cluster_secrets() {
        let text = BASE64.encode(counting_key());
        assert_eq!(parse_cluster_secret(&text).unwrap(), counting_key());
        assert_eq!(
            parse_cluster_secret(&format!(" {text}\n")).unwrap(),
            counting_key()
        );
        for bad in [
            "",
            "   ",
            "not base64!",
            &BASE64.encode([1u8; 31]),
            &BASE64.encode([1u8; 33]),
        ] {
            let err = parse_cluster_secret(bad).unwrap_err();
            assert!(matches!(err, CryptoError::BadSecret(_)), "{bad:?}: {err}");
            assert!(err.to_string().contains("kubespanctl gen secrets"), "{err}");
        }
        let hex: String = (0..32).map(|i| format!("{i:02x}")).collect();
        let err = parse_cluster_secret(&hex).unwrap_err().to_string();
        assert!(err.contains("looks like hex"), "{err}");
        assert!(err.contains("xxd -r -p | base64"), "{err}");
        // 32 bytes whose base64url form has `-` and `_`.
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xfb; 32]);
        assert!(url.contains('-') || url.contains('_'), "{url}");
        let err = parse_cluster_secret(&url).unwrap_err().to_string();
        assert!(err.contains("looks like base64url"), "{err}");
        assert!(err.contains("standard base64 of 32 bytes"), "{err}");
        let unpadded = text.trim_end_matches('=');
        let err = parse_cluster_secret(unpadded).unwrap_err().to_string();
        assert!(err.contains("without its padding"), "{err}");
        let err = parse_cluster_secret(&BASE64.encode([0u8; 32])).unwrap_err();
        assert!(err.to_string().contains("all zero"), "{err}");
        let err = parse_cluster_secret(&BASE64.encode([1u8; 16])).unwrap_err();
        assert!(err.to_string().contains("16 bytes"), "{err}");
    }

    // ---- known answers ----
    //
    // Key = bytes 0..=31, cluster id = the spec's example, nonce = bytes 0xa0.. . Computed once,
    // cross-checked against an independent implementation (Python `cryptography` AES-GCM, AES-ECB
    // and IETF ChaCha20-Poly1305, with HKDF-SHA256 and HChaCha20 written out by hand, HChaCha20
    // checked against draft-irtf-cfrg-xchacha §2.2.1), then pinned. A change here breaks
    // compatibility with every node already deployed.

    // ---- talos suite ----

    #[test]
    fn talos_record_known_answer() {
        let blob = keys(Cipher::Talos).seal_record_with_nonce(NODE_A, RECORD, &fixed_nonce());
        assert_eq!(blob.len(), 12 + RECORD.len() + 16);
        assert_eq!(
            hex(&blob),
            "a0a1a2a3a4a5a6a7a8a9aaab\
             8968194336bb63d14211e2a0735ab2bb13c32b74c424a78a005d8269d078be108603defa"
        );
        assert_eq!(
            keys(Cipher::Talos).open_record(NODE_A, &blob).unwrap(),
            RECORD
        );
    }

    #[test]
    fn talos_endpoint_known_answers() {
        let k = keys(Cipher::Talos);
        let a = k.seal_endpoint(NODE_A, v4());
        let b = k.seal_endpoint(NODE_A, v6());
        assert_eq!(a.len(), 16);
        assert_eq!(b.len(), 32);
        assert_eq!(hex(&a), "1945e54a18084c4f1c2a3e349c1f8fc8");
        assert_eq!(
            hex(&b),
            "e2702633ca89239d5ee036a316dde237d604c19a74d2f45c1e624c2d38c4cca0"
        );
    }

    #[test]
    fn talos_endpoint_plaintext_layout() {
        // Decrypting with the raw AES block cipher shows the documented layout.
        let blob = keys(Cipher::Talos).seal_endpoint(NODE_A, v4());
        let aes = Aes256::new(&counting_key().into());
        let mut block = aes::Block::try_from(&blob[..]).unwrap();
        aes.decrypt_block(&mut block);
        // length 10, field 1 (4 bytes of IP), field 2 (varint 51820), zero padding
        assert_eq!(hex(&block), "0a0a04c000020110ec94030000000000");
    }

    #[test]
    fn talos_endpoints_are_deterministic_and_independent_of_the_affiliate() {
        let k = keys(Cipher::Talos);
        assert_eq!(k.seal_endpoint(NODE_A, v6()), k.seal_endpoint(NODE_A, v6()));
        assert_eq!(k.seal_endpoint(NODE_A, v6()), k.seal_endpoint(NODE_B, v6()));
        assert_ne!(
            k.seal_endpoint(NODE_A, v4()),
            k.seal_endpoint(NODE_A, "192.0.2.1:51821".parse().unwrap())
        );
    }

    #[test]
    fn talos_psk_is_the_raw_secret() {
        assert_eq!(keys(Cipher::Talos).wireguard_psk(), counting_key());
    }

    // ---- native suite ----

    #[test]
    fn native_record_known_answer() {
        let blob = keys(Cipher::Native).seal_record_with_nonce(NODE_A, RECORD, &fixed_nonce());
        assert_eq!(blob.len(), 1 + 24 + RECORD.len() + 16);
        assert_eq!(
            hex(&blob),
            "01a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7\
             11e6214b0cd7c73ae27f24c1eaf3ab700a53e7f6551d16ed962900ddb562d521b32f5aff"
        );
        assert_eq!(
            keys(Cipher::Native).open_record(NODE_A, &blob).unwrap(),
            RECORD
        );
    }

    #[test]
    fn native_endpoint_known_answers() {
        let k = keys(Cipher::Native);
        let a = k.seal_endpoint(NODE_A, v4());
        let b = k.seal_endpoint(NODE_A, v6());
        assert_eq!(a.len(), 20);
        assert_eq!(b.len(), 32);
        assert_eq!(hex(&a), "01c89bafa5d0da554bb333035219f8ba88362b01");
        assert_eq!(
            hex(&b),
            "01a7b45b28692977c7a5649044640ede0c58c84584552f9da6f21b14f7d89875"
        );
    }

    #[test]
    fn native_psk_known_answer() {
        assert_eq!(
            hex(&keys(Cipher::Native).wireguard_psk()),
            "dad71ad98a36dc07e2a70fce30473d4a9720bf79ecd00d41c9d7873f41b92c99"
        );
    }

    // ---- both suites ----

    fn both() -> [ClusterKeys; 2] {
        [keys(Cipher::Talos), keys(Cipher::Native)]
    }

    fn sample_endpoints() -> Vec<SocketAddr> {
        [
            "192.0.2.1:51820",
            "10.0.0.1:1",
            "255.255.255.255:65535",
            "0.0.0.0:51820",
            "[2001:db8::1]:51820",
            "[::]:51820",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
            "[fe80::1]:127",
            "[fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169]:128",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect()
    }

    #[test]
    fn records_round_trip() {
        for k in both() {
            for len in [0, 1, 15, 16, 17, 2048] {
                let plaintext: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
                let blob = k.seal_record(NODE_A, &plaintext);
                assert_eq!(
                    k.open_record(NODE_A, &blob).unwrap(),
                    plaintext,
                    "{k:?} {len}"
                );
                // Random nonces: sealing twice gives different blobs.
                assert_ne!(blob, k.seal_record(NODE_A, &plaintext));
            }
        }
    }

    #[test]
    fn endpoints_round_trip_deterministically_within_the_size_limit() {
        for k in both() {
            for endpoint in sample_endpoints() {
                let blob = k.seal_endpoint(NODE_A, endpoint);
                assert!(blob.len() <= MAX_ENDPOINT_BLOB, "{k:?} {endpoint}");
                assert_eq!(blob, k.seal_endpoint(NODE_A, endpoint), "{k:?} {endpoint}");
                assert_eq!(
                    k.open_endpoint(NODE_A, &blob).unwrap(),
                    endpoint,
                    "{k:?} {endpoint}"
                );
            }
        }
    }

    #[test]
    fn endpoint_sizes() {
        let n = keys(Cipher::Native);
        let t = keys(Cipher::Talos);
        for endpoint in sample_endpoints() {
            let (native, talos) = if endpoint.is_ipv4() {
                (20, 16)
            } else {
                (32, 32)
            };
            assert_eq!(
                n.seal_endpoint(NODE_A, endpoint).len(),
                native,
                "{endpoint}"
            );
            assert_eq!(t.seal_endpoint(NODE_A, endpoint).len(), talos, "{endpoint}");
        }
    }

    #[test]
    fn ipv4_mapped_endpoints_travel_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:51820".parse().unwrap();
        for k in both() {
            let blob = k.seal_endpoint(NODE_A, mapped);
            assert_eq!(blob, k.seal_endpoint(NODE_A, v4()), "{k:?}");
            assert_eq!(k.open_endpoint(NODE_A, &blob).unwrap(), v4());
        }
    }

    #[test]
    fn ipv6_scope_is_not_carried() {
        let scoped = SocketAddr::V6(std::net::SocketAddrV6::new(
            "fe80::1".parse().unwrap(),
            51820,
            7,
            3,
        ));
        for k in both() {
            let opened = k
                .open_endpoint(NODE_A, &k.seal_endpoint(NODE_A, scoped))
                .unwrap();
            assert_eq!(opened, "[fe80::1]:51820".parse::<SocketAddr>().unwrap());
        }
    }

    #[test]
    fn port_zero_is_refused_when_opening() {
        for k in both() {
            let blob = k.seal_endpoint(NODE_A, "192.0.2.1:0".parse().unwrap());
            let err = k.open_endpoint(NODE_A, &blob).unwrap_err();
            assert!(matches!(err, CryptoError::BadEndpoint(_)), "{k:?} {err}");
        }
    }

    #[test]
    fn native_endpoints_are_bound_to_the_affiliate() {
        let k = keys(Cipher::Native);
        for endpoint in sample_endpoints() {
            let blob = k.seal_endpoint(NODE_A, endpoint);
            assert_ne!(blob, k.seal_endpoint(NODE_B, endpoint));
            assert_eq!(
                k.open_endpoint(NODE_B, &blob),
                Err(CryptoError::Authentication)
            );
            assert_eq!(k.open_endpoint("", &blob), Err(CryptoError::Authentication));
        }
    }

    #[test]
    fn native_records_are_bound_to_the_affiliate() {
        let k = keys(Cipher::Native);
        let blob = k.seal_record(NODE_A, RECORD);
        assert_eq!(
            k.open_record(NODE_B, &blob),
            Err(CryptoError::Authentication)
        );
        // Talos records carry no binding: the caller checks the node id inside the record.
        let t = keys(Cipher::Talos);
        assert_eq!(
            t.open_record(NODE_B, &t.seal_record(NODE_A, RECORD))
                .unwrap(),
            RECORD
        );
    }

    #[test]
    fn another_clusters_blobs_are_rejected() {
        for cipher in [Cipher::Talos, Cipher::Native] {
            let ours = keys(cipher);
            let other_secret = ClusterKeys::new(cipher, CLUSTER, &[0x5a; 32]);
            let blob = other_secret.seal_record(NODE_A, RECORD);
            assert_eq!(
                ours.open_record(NODE_A, &blob),
                Err(CryptoError::Authentication),
                "{cipher:?}"
            );
            for endpoint in sample_endpoints() {
                let blob = other_secret.seal_endpoint(NODE_A, endpoint);
                assert!(
                    ours.open_endpoint(NODE_A, &blob).is_err(),
                    "{cipher:?} {endpoint}"
                );
            }
        }
        // Native keys also depend on the cluster id, even with the same secret.
        let ours = keys(Cipher::Native);
        let other_id = ClusterKeys::new(Cipher::Native, "another-cluster", &counting_key());
        let blob = other_id.seal_record(NODE_A, RECORD);
        assert_eq!(
            ours.open_record(NODE_A, &blob),
            Err(CryptoError::Authentication)
        );
        let blob = other_id.seal_endpoint(NODE_A, v6());
        assert_eq!(
            ours.open_endpoint(NODE_A, &blob),
            Err(CryptoError::Authentication)
        );
        assert_ne!(ours.wireguard_psk(), other_id.wireguard_psk());
    }

    #[test]
    fn suites_do_not_open_each_others_blobs() {
        let [t, n] = both();
        assert!(
            n.open_record(NODE_A, &t.seal_record(NODE_A, RECORD))
                .is_err()
        );
        assert!(
            t.open_record(NODE_A, &n.seal_record(NODE_A, RECORD))
                .is_err()
        );
        for endpoint in sample_endpoints() {
            assert!(
                n.open_endpoint(NODE_A, &t.seal_endpoint(NODE_A, endpoint))
                    .is_err()
            );
            assert!(
                t.open_endpoint(NODE_A, &n.seal_endpoint(NODE_A, endpoint))
                    .is_err()
            );
        }
    }

    #[test]
    fn empty_blobs_are_rejected() {
        for k in both() {
            assert!(matches!(
                k.open_record(NODE_A, &[]),
                Err(CryptoError::TooShort { len: 0, .. })
            ));
            assert!(matches!(
                k.open_endpoint(NODE_A, &[]),
                Err(CryptoError::TooShort { len: 0, .. })
            ));
        }
    }

    #[test]
    fn truncated_blobs_are_rejected() {
        for k in both() {
            let blob = k.seal_record(NODE_A, RECORD);
            for len in 0..blob.len() {
                assert!(k.open_record(NODE_A, &blob[..len]).is_err(), "{k:?} {len}");
            }
            for endpoint in sample_endpoints() {
                let blob = k.seal_endpoint(NODE_A, endpoint);
                for len in 0..blob.len() {
                    assert!(
                        k.open_endpoint(NODE_A, &blob[..len]).is_err(),
                        "{k:?} {endpoint} {len}"
                    );
                }
            }
        }
    }

    #[test]
    fn extended_blobs_are_rejected() {
        for k in both() {
            let mut blob = k.seal_record(NODE_A, RECORD);
            blob.push(0);
            assert!(k.open_record(NODE_A, &blob).is_err(), "{k:?}");
            for endpoint in sample_endpoints() {
                let mut blob = k.seal_endpoint(NODE_A, endpoint);
                blob.push(0);
                assert!(k.open_endpoint(NODE_A, &blob).is_err(), "{k:?} {endpoint}");
                blob.extend_from_slice(&[0; 15]);
                assert!(k.open_endpoint(NODE_A, &blob).is_err(), "{k:?} {endpoint}");
            }
        }
    }

    #[test]
    fn every_tampered_byte_is_rejected() {
        for k in both() {
            let blob = k.seal_record(NODE_A, RECORD);
            for i in 0..blob.len() {
                for flip in [0x01, 0x80, 0xff] {
                    let mut bad = blob.clone();
                    bad[i] ^= flip;
                    assert!(
                        k.open_record(NODE_A, &bad).is_err(),
                        "{k:?} byte {i} ^ {flip:#x}"
                    );
                }
            }
            // Talos endpoints are not authenticated; the structure checks still catch these
            // single-byte changes (a whole AES block turns to noise), which this pins.
            for endpoint in [v4(), v6()] {
                let blob = k.seal_endpoint(NODE_A, endpoint);
                for i in 0..blob.len() {
                    for flip in [0x01, 0x80, 0xff] {
                        let mut bad = blob.clone();
                        bad[i] ^= flip;
                        assert!(
                            k.open_endpoint(NODE_A, &bad).is_err(),
                            "{k:?} {endpoint} byte {i} ^ {flip:#x}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn native_tampering_is_an_authentication_or_version_error() {
        let k = keys(Cipher::Native);
        let blob = k.seal_endpoint(NODE_A, v6());
        for i in 1..blob.len() {
            let mut bad = blob.clone();
            bad[i] ^= 0x01;
            assert_eq!(
                k.open_endpoint(NODE_A, &bad),
                Err(CryptoError::Authentication),
                "byte {i}"
            );
        }
        let mut bad = blob.clone();
        bad[0] ^= 0x01;
        assert_eq!(
            k.open_endpoint(NODE_A, &bad),
            Err(CryptoError::UnknownVersion(0x00))
        );
    }

    #[test]
    fn unknown_versions_are_rejected() {
        let k = keys(Cipher::Native);
        let mut record = k.seal_record(NODE_A, RECORD);
        let mut endpoint = k.seal_endpoint(NODE_A, v4());
        for version in [0x00, 0x02, 0x7f, 0xff] {
            record[0] = version;
            endpoint[0] = version;
            assert_eq!(
                k.open_record(NODE_A, &record),
                Err(CryptoError::UnknownVersion(version))
            );
            assert_eq!(
                k.open_endpoint(NODE_A, &endpoint),
                Err(CryptoError::UnknownVersion(version))
            );
            assert_eq!(
                k.open_record(NODE_A, &[version]),
                Err(CryptoError::UnknownVersion(version))
            );
        }
        let err = CryptoError::UnknownVersion(2).to_string();
        assert!(err.contains("0x02"), "{err}");
    }

    #[test]
    fn garbage_never_panics() {
        // A deterministic sweep of short inputs: every length up to 80, several fill patterns.
        for k in both() {
            for len in 0..80usize {
                for seed in 0..8u8 {
                    let blob: Vec<u8> = (0..len)
                        .map(|i| {
                            (i as u8)
                                .wrapping_mul(31)
                                .wrapping_add(seed.wrapping_mul(97))
                        })
                        .collect();
                    let _ = k.open_record(NODE_A, &blob);
                    let _ = k.open_endpoint(NODE_A, &blob);
                    let mut versioned = blob.clone();
                    if let Some(first) = versioned.first_mut() {
                        *first = NATIVE_VERSION;
                    }
                    let _ = k.open_record(NODE_A, &versioned);
                    let _ = k.open_endpoint(NODE_A, &versioned);
                }
            }
        }
    }

    #[test]
    fn talos_endpoints_with_bad_structure_are_rejected() {
        // Valid AES encryptions of malformed plaintexts: the checks after decryption must refuse them.
        let key = counting_key();
        let aes = Aes256::new(&key.into());
        let encrypt = |plain: &[u8]| {
            let mut buf = plain.to_vec();
            let (blocks, _) = aes::Block::slice_as_chunks_mut(&mut buf);
            aes.encrypt_blocks(blocks);
            buf
        };
        let k = keys(Cipher::Talos);
        let good = Endpoint {
            ip: vec![192, 0, 2, 1].into(),
            port: 51820,
        }
        .encode_to_vec();
        let mut block = [0u8; 16];
        block[0] = good.len() as u8;
        block[1..1 + good.len()].copy_from_slice(&good);
        assert_eq!(k.open_endpoint(NODE_A, &encrypt(&block)).unwrap(), v4());

        let mut zero_len = block;
        zero_len[0] = 0;
        let mut too_long = block;
        too_long[0] = 16;
        let mut dirty_padding = block;
        dirty_padding[15] = 1;
        let three_byte_ip = Endpoint {
            ip: vec![1, 2, 3].into(),
            port: 51820,
        }
        .encode_to_vec();
        let mut short_ip = [0u8; 16];
        short_ip[0] = three_byte_ip.len() as u8;
        short_ip[1..1 + three_byte_ip.len()].copy_from_slice(&three_byte_ip);
        let big_port = Endpoint {
            ip: vec![1, 2, 3, 4].into(),
            port: 70000,
        }
        .encode_to_vec();
        let mut port_overflow = [0u8; 16];
        port_overflow[0] = big_port.len() as u8;
        port_overflow[1..1 + big_port.len()].copy_from_slice(&big_port);
        let mut not_protobuf = [0u8; 16];
        not_protobuf[0] = 3;
        not_protobuf[1..4].copy_from_slice(&[0xff, 0xff, 0xff]);

        for (name, plain) in [
            ("zero length", zero_len),
            ("length beyond block", too_long),
            ("non-zero padding", dirty_padding),
            ("3-byte ip", short_ip),
            ("port > 65535", port_overflow),
            ("not protobuf", not_protobuf),
        ] {
            let err = k.open_endpoint(NODE_A, &encrypt(&plain)).unwrap_err();
            assert!(matches!(err, CryptoError::BadEndpoint(_)), "{name}: {err}");
        }
        // Not a whole number of blocks, or over the server's limit.
        assert!(matches!(
            k.open_endpoint(NODE_A, &[0; 17]),
            Err(CryptoError::BadEndpoint(_))
        ));
        assert!(matches!(
            k.open_endpoint(NODE_A, &[0; 48]),
            Err(CryptoError::BadEndpoint(_))
        ));
    }

    #[test]
    fn psks_differ_between_suites_and_secrets() {
        let secret_a = counting_key();
        let secret_b = [0x42; 32];
        let talos_a = ClusterKeys::new(Cipher::Talos, CLUSTER, &secret_a).wireguard_psk();
        let talos_b = ClusterKeys::new(Cipher::Talos, CLUSTER, &secret_b).wireguard_psk();
        let native_a = ClusterKeys::new(Cipher::Native, CLUSTER, &secret_a).wireguard_psk();
        let native_b = ClusterKeys::new(Cipher::Native, CLUSTER, &secret_b).wireguard_psk();
        let all = [talos_a, talos_b, native_a, native_b];
        for i in 0..all.len() {
            for j in i + 1..all.len() {
                assert_ne!(all[i], all[j], "{i} vs {j}");
            }
        }
    }

    #[test]
    fn native_keys_are_independent() {
        let SuiteKeys::Native {
            record,
            endpoint_enc,
            endpoint_mac,
            psk,
        } = keys(Cipher::Native).keys
        else {
            panic!("native keys expected");
        };
        let all = [record, endpoint_enc, endpoint_mac, psk, counting_key()];
        for i in 0..all.len() {
            for j in i + 1..all.len() {
                assert_ne!(all[i], all[j], "{i} vs {j}");
            }
        }
        assert_eq!(keys(Cipher::Native).cipher(), Cipher::Native);
        assert_eq!(keys(Cipher::Talos).cipher(), Cipher::Talos);
    }

    /// The rotation: a node holding `old` with `new` as next reads records sealed with either,
    /// and says which one opened each (by its pre-shared key); nothing is sealed with `next`.
    #[test]
    fn next_secret_opens_records_and_endpoints_and_says_which() {
        let old = ClusterKeys::new(Cipher::Native, CLUSTER, &[1; 32]);
        let new = ClusterKeys::new(Cipher::Native, CLUSTER, &[2; 32]);
        let stranger = ClusterKeys::new(Cipher::Native, CLUSTER, &[3; 32]);
        let rotating = ClusterKeys::new(Cipher::Native, CLUSTER, &[1; 32])
            .with_next(ClusterKeys::new(Cipher::Native, CLUSTER, &[2; 32]));
        let endpoint: SocketAddr = "192.0.2.7:51820".parse().unwrap();
        for (sealer, psk) in [(&old, old.wireguard_psk()), (&new, new.wireguard_psk())] {
            let blob = sealer.seal_record("node-a", b"record");
            assert_eq!(
                rotating.open_record_with_psk("node-a", &blob).unwrap(),
                (b"record".to_vec(), psk)
            );
            let sealed = sealer.seal_endpoint("node-a", endpoint);
            assert_eq!(rotating.open_endpoint("node-a", &sealed).unwrap(), endpoint);
        }
        // Sealed with the running secret, not the next one.
        let own = rotating.seal_record("node-a", b"mine");
        assert!(old.open_record("node-a", &own).is_ok());
        assert_eq!(
            new.open_record("node-a", &own),
            Err(CryptoError::Authentication)
        );
        assert_eq!(
            rotating.open_record("node-a", &stranger.seal_record("node-a", b"x")),
            Err(CryptoError::Authentication)
        );
        // Without next, a record of the new secret does not open.
        assert!(
            old.open_record("node-a", &new.seal_record("node-a", b"x"))
                .is_err()
        );
    }

    /// Both ends of a tunnel compute the same key whichever secrets they seal with.
    #[test]
    fn pair_psk_is_symmetric_and_the_plain_key_outside_a_rotation() {
        let a = ClusterKeys::new(Cipher::Native, CLUSTER, &[1; 32]).wireguard_psk();
        let b = ClusterKeys::new(Cipher::Native, CLUSTER, &[2; 32]).wireguard_psk();
        assert_eq!(pair_psk(&a, &a), a, "unchanged outside a rotation");
        assert_eq!(pair_psk(&b, &b), b);
        assert_eq!(pair_psk(&a, &b), pair_psk(&b, &a));
        assert_ne!(pair_psk(&a, &b), a);
        assert_ne!(pair_psk(&a, &b), b);
        let c = ClusterKeys::new(Cipher::Native, CLUSTER, &[3; 32]).wireguard_psk();
        assert_ne!(pair_psk(&a, &b), pair_psk(&a, &c));
    }
}
