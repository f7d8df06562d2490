//! Who this node is: its node id, its WireGuard key pair and its mesh (ULA) address.
//!
//! # Persistent identity files
//!
//! Both live in the agent's state directory (created with mode 0700 if missing):
//!
//! - [`NODE_IDENTITY_FILE`] (`node-identity.yaml`): `nodeId: <base62>`, 32 random bytes in
//!   big-endian base 62 (alphabet `0-9A-Za-z`, about 43 characters). The node id is the affiliate
//!   id at the discovery service.
//! - [`KUBESPAN_IDENTITY_FILE`] (`kubespan-identity.yaml`): `privateKey` and `publicKey`, the
//!   X25519 WireGuard key pair in standard base64. Talos's file of the same name (which also has
//!   `address` and `subnet`) is read as well; those extra fields are ignored.
//!
//! Each is created once, exclusively (`O_EXCL`) with mode 0600, written and fsynced (the
//! directory too), then read back like any existing file. A file that exists but cannot be read
//! or is malformed, or whose id or key is all zero bytes, is an error that names the file and what
//! to do; it is never regenerated behind the operator's back, since that would change the node's
//! identity. The one exception is an *empty* file: that is what a crash between creating and
//! fsyncing the file leaves, and such a file never held an identity anyone used, so it is
//! replaced (with a warning).
//!
//! # Mesh address
//!
//! The /64 prefix comes from the cluster id (as configured, not base64-decoded): SHA-256 of the
//! string, the last 16 bytes of the digest, byte 0 set to `0xfd` (ULA) and byte 7 set to `0x02`
//! (Talos's "KubeSpan" ULA purpose); the first 8 bytes are the prefix. The interface id is the
//! modified EUI-64 of a MAC address: flip bit `0x02` of the first octet and insert `ff:fe` in
//! the middle. This matches Talos, so an openspan node and a Talos node with the same cluster id
//! and MAC derive the same address.
//!
//! # Which MAC address
//!
//! Unless `macAddress` is set in the configuration, [`select_mac`] picks it from the host's
//! links (as [`read_links`] lists them from `/sys/class/net`):
//!
//! 1. Consider the links sorted by name.
//! 2. Skip the loopback link, the mesh interface itself, links without a MAC address, the
//!    all-zero MAC and multicast MACs (first octet has bit `0x01` set).
//! 3. Take the first *physical* link among the rest, i.e. one backed by a device (it has
//!    `/sys/class/net/<link>/device`; bridges, bonds, VLANs, veths and tunnels do not). This is
//!    Talos's "first hardware address", so the address is the same as Talos would derive.
//! 4. If there is none (a VM with only virtual links, a container, a network namespace with only
//!    veth links), take the first remaining link.
//! 5. If nothing qualifies, there is no MAC: set `macAddress` in the configuration.
//!
//! Cloned machines with identical MACs get identical mesh addresses; set `macAddress` on one of
//! them.

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write as _};
use std::net::Ipv6Addr;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ipnet::Ipv6Net;
use rand::TryRng as _;
use rand::rngs::SysRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

/// The node id file in the state directory: `nodeId: <base62>`.
pub const NODE_IDENTITY_FILE: &str = "node-identity.yaml";
/// The WireGuard key pair file in the state directory: `privateKey`, `publicKey` (std base64).
pub const KUBESPAN_IDENTITY_FILE: &str = "kubespan-identity.yaml";
/// Random bytes in a new node id.
pub const NODE_ID_BYTES: usize = 32;
/// The longest node id the discovery service accepts as an affiliate id.
pub const MAX_NODE_ID_LEN: usize = 256;
/// Byte 7 of a KubeSpan ULA prefix (Talos's `ULAKubeSpan` purpose).
pub const ULA_PURPOSE_KUBESPAN: u8 = 0x02;

/// `ARPHRD_LOOPBACK`, the `type` of a loopback link in `/sys/class/net`.
const ARPHRD_LOOPBACK: u32 = 772;

/// What went wrong with this node's identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "{path} is malformed: {reason}. It holds this node's {what}, so it is not regenerated \
         automatically: fix or restore it, or delete it to {consequence}"
    )]
    Malformed {
        path: PathBuf,
        reason: String,
        what: &'static str,
        consequence: &'static str,
    },
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
    #[error("cannot encode a new identity file: {0}")]
    Encode(String),
    #[error("invalid MAC address {text:?}: {reason}; write six hex pairs, e.g. 2e:1a:b6:53:81:69")]
    BadMac { text: String, reason: String },
}

// ---------------------------------------------------------------------------------------------
// base62

const BASE62_ALPHABET: &[u8; 62] =
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Big-endian base 62 of `bytes` read as one unsigned number, alphabet `0-9A-Za-z`, without
/// leading zero digits; zero (including no bytes, or only zero bytes) is `"0"`. Leading zero
/// bytes are therefore not preserved: this is an encoding for random ids, not a byte codec.
/// 32 bytes give at most 43 characters.
pub fn base62_encode(bytes: &[u8]) -> String {
    // Schoolbook division of the big-endian number by 62, collecting remainders.
    let mut number: Vec<u8> = bytes.iter().copied().skip_while(|b| *b == 0).collect();
    let mut digits = Vec::with_capacity(number.len() * 4 / 3 + 1);
    while !number.is_empty() {
        let mut remainder = 0u32;
        let mut quotient = Vec::with_capacity(number.len());
        for byte in &number {
            let acc = (remainder << 8) | u32::from(*byte);
            let q = acc / 62;
            remainder = acc % 62;
            if !(quotient.is_empty() && q == 0) {
                // acc < 62 * 256, so q < 256.
                quotient.push(q as u8);
            }
        }
        digits.push(BASE62_ALPHABET[remainder as usize]);
        number = quotient;
    }
    if digits.is_empty() {
        return "0".to_owned();
    }
    digits.iter().rev().map(|d| char::from(*d)).collect()
}

// ---------------------------------------------------------------------------------------------
// Files

#[derive(Serialize, Deserialize)]
struct NodeIdentityFile {
    #[serde(rename = "nodeId")]
    node_id: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct KubeSpanIdentityFile {
    private_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    public_key: Option<String>,
}

/// One identity file: what it holds and what deleting it means.
struct IdentityFile {
    name: &'static str,
    what: &'static str,
    consequence: &'static str,
}

const NODE_ID_FILE: IdentityFile = IdentityFile {
    name: NODE_IDENTITY_FILE,
    what: "node id",
    consequence: "join as a new node (the old id stays listed at the discovery service until its \
                  record expires, at most 30 minutes)",
};

const KEYS_FILE: IdentityFile = IdentityFile {
    name: KUBESPAN_IDENTITY_FILE,
    what: "WireGuard private key",
    consequence: "generate a new key pair (peers learn the new public key through discovery)",
};

fn random_bytes<const N: usize>() -> Result<[u8; N], IdentityError> {
    let mut bytes = [0u8; N];
    SysRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| IdentityError::Random(e.to_string()))?;
    Ok(bytes)
}

/// Creates `dir` (and its parents) with mode 0700 if it does not exist.
fn ensure_state_dir(dir: &Path) -> Result<(), IdentityError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| IdentityError::Io {
            action: "create the state directory",
            path: dir.to_owned(),
            source,
        })
}

/// Writes a new file exclusively with mode 0600 and makes it durable. On failure no partial file
/// is left behind (unless the file already existed, which is reported as `AlreadyExists`).
fn create_exclusive(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    if let Err(e) = written {
        drop(file);
        let _ = fs::remove_file(path);
        return Err(e);
    }
    if let Some(dir) = path.parent() {
        // Make the new directory entry durable too; not every file system supports this.
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

/// Reads an existing identity file. `None` when it does not exist, or when it was empty (an
/// interrupted creation) and has been removed.
fn read_existing(path: &Path, file: &IdentityFile) -> Result<Option<String>, IdentityError> {
    match fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => {
            tracing::warn!(
                path = %path.display(),
                "identity file is empty (its creation was interrupted); creating it again"
            );
            match fs::remove_file(path) {
                Ok(()) => Ok(None),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(IdentityError::Io {
                    action: "remove the empty identity file",
                    path: path.to_owned(),
                    source,
                }),
            }
        }
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            Err(malformed(path, file, "it is not UTF-8 text"))
        }
        Err(source) => Err(IdentityError::Io {
            action: "read",
            path: path.to_owned(),
            source,
        }),
    }
}

fn malformed(path: &Path, file: &IdentityFile, reason: impl Into<String>) -> IdentityError {
    IdentityError::Malformed {
        path: path.to_owned(),
        reason: reason.into(),
        what: file.what,
        consequence: file.consequence,
    }
}

/// Loads `file` from `state_dir`, creating it with `generate` first if it does not exist. What is
/// returned always comes from reading the file.
fn load_or_create<T>(
    state_dir: &Path,
    file: &IdentityFile,
    parse: impl Fn(&str) -> Result<T, String>,
    generate: impl Fn() -> Result<String, IdentityError>,
) -> Result<T, IdentityError> {
    ensure_state_dir(state_dir)?;
    let path = state_dir.join(file.name);
    // Normally one pass creates the file and the next reads it; more passes happen only when
    // another process races us, and a few are plenty.
    for _ in 0..4 {
        if let Some(text) = read_existing(&path, file)? {
            return parse(&text).map_err(|reason| malformed(&path, file, reason));
        }
        let contents = generate()?;
        match create_exclusive(&path, contents.as_bytes()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(IdentityError::Io {
                    action: "create",
                    path,
                    source,
                });
            }
        }
    }
    Err(IdentityError::Io {
        action: "create",
        path,
        source: io::Error::other("the file keeps disappearing right after it is created"),
    })
}

fn parse_node_id(text: &str) -> Result<String, String> {
    let file: NodeIdentityFile = serde_norway::from_str(text)
        .map_err(|e| format!("expected YAML `nodeId: <base62 id>` ({e})"))?;
    let id = file.node_id.trim();
    if id.is_empty() {
        return Err("nodeId is empty".into());
    }
    if let Some(c) = id.chars().find(|c| !c.is_ascii_alphanumeric()) {
        return Err(format!(
            "nodeId contains {c:?}; a base62 id has only 0-9, A-Z and a-z"
        ));
    }
    if id.len() > MAX_NODE_ID_LEN {
        return Err(format!(
            "nodeId is {} characters, more than the discovery service accepts ({MAX_NODE_ID_LEN})",
            id.len()
        ));
    }
    if id.bytes().all(|b| b == b'0') {
        return Err("nodeId is all zero".into());
    }
    Ok(id.to_owned())
}

/// The node id from `state_dir`/[`NODE_IDENTITY_FILE`], created from 32 random bytes on first
/// use.
pub fn load_or_create_node_id(state_dir: &Path) -> Result<String, IdentityError> {
    load_or_create(state_dir, &NODE_ID_FILE, parse_node_id, || {
        let id = base62_encode(&random_bytes::<NODE_ID_BYTES>()?);
        serde_norway::to_string(&NodeIdentityFile { node_id: id })
            .map_err(|e| IdentityError::Encode(e.to_string()))
    })
}

// ---------------------------------------------------------------------------------------------
// WireGuard keys

/// An X25519 WireGuard key pair. `Debug` shows only the public key.
#[derive(Clone, PartialEq, Eq)]
pub struct WireguardKeys {
    pub private_key: [u8; 32],
    pub public_key: [u8; 32],
}

impl fmt::Debug for WireguardKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WireguardKeys")
            .field("public_key", &self.public_base64())
            .field("private_key", &"<redacted>")
            .finish()
    }
}

/// WireGuard's key clamping (as `wg genkey` does).
fn clamp(mut key: [u8; 32]) -> [u8; 32] {
    key[0] &= 248;
    key[31] &= 127;
    key[31] |= 64;
    key
}

impl WireguardKeys {
    /// A new key pair from the operating system's random number generator, private key clamped.
    ///
    /// # Panics
    /// If the operating system cannot provide random bytes; see [`Self::try_generate`].
    pub fn generate() -> Self {
        match Self::try_generate() {
            Ok(keys) => keys,
            Err(e) => panic!("cannot generate a WireGuard key: {e}"),
        }
    }

    /// Like [`Self::generate`], but reports a failing random number generator.
    pub fn try_generate() -> Result<Self, IdentityError> {
        let private = StaticSecret::from(clamp(random_bytes::<32>()?));
        Ok(Self::from_private(private.to_bytes()))
    }

    /// The key pair of a private key (stored as given; X25519 clamps it when used).
    pub fn from_private(private: [u8; 32]) -> Self {
        let public = PublicKey::from(&StaticSecret::from(private));
        WireguardKeys {
            private_key: private,
            public_key: public.to_bytes(),
        }
    }

    /// The public key in standard base64 (44 characters), as WireGuard tools show it.
    pub fn public_base64(&self) -> String {
        BASE64.encode(self.public_key)
    }

    /// The private key in standard base64. Keep it secret.
    pub fn private_base64(&self) -> String {
        BASE64.encode(self.private_key)
    }
}

fn decode_key(field: &str, text: &str) -> Result<[u8; 32], String> {
    let bytes = BASE64
        .decode(text.trim())
        .map_err(|e| format!("{field} is not standard base64 ({e})"))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| format!("{field} is {} bytes, a WireGuard key is 32", bytes.len()))
}

fn parse_wireguard_keys(text: &str) -> Result<WireguardKeys, String> {
    let file: KubeSpanIdentityFile = serde_norway::from_str(text)
        .map_err(|e| format!("expected YAML with privateKey and publicKey ({e})"))?;
    let private = decode_key("privateKey", &file.private_key)?;
    if private == [0; 32] {
        return Err("privateKey is all zero".into());
    }
    let keys = WireguardKeys::from_private(private);
    if let Some(public) = &file.public_key {
        let public = decode_key("publicKey", public)?;
        if public != keys.public_key {
            return Err(format!(
                "publicKey does not belong to privateKey (which gives {})",
                keys.public_base64()
            ));
        }
    }
    Ok(keys)
}

/// The WireGuard key pair from `state_dir`/[`KUBESPAN_IDENTITY_FILE`], generated on first use.
pub fn load_or_create_wireguard_keys(state_dir: &Path) -> Result<WireguardKeys, IdentityError> {
    let keys = load_or_create(state_dir, &KEYS_FILE, parse_wireguard_keys, || {
        let keys = WireguardKeys::try_generate()?;
        serde_norway::to_string(&KubeSpanIdentityFile {
            private_key: keys.private_base64(),
            public_key: Some(keys.public_base64()),
        })
        .map_err(|e| IdentityError::Encode(e.to_string()))
    })?;
    let path = state_dir.join(KUBESPAN_IDENTITY_FILE);
    if let Ok(meta) = fs::metadata(&path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the WireGuard private key file is readable by other users; chmod 600 it"
        );
    }
    Ok(keys)
}

/// Replaces the key pair in `state_dir`/[`KUBESPAN_IDENTITY_FILE`] atomically: a temporary file
/// (0600) is written and made durable, then renamed over the old one, so a crash leaves either
/// the old key or the new one, never a partial file.
pub fn store_wireguard_keys(state_dir: &Path, keys: &WireguardKeys) -> Result<(), IdentityError> {
    ensure_state_dir(state_dir)?;
    let contents = serde_norway::to_string(&KubeSpanIdentityFile {
        private_key: keys.private_base64(),
        public_key: Some(keys.public_base64()),
    })
    .map_err(|e| IdentityError::Encode(e.to_string()))?;
    let path = state_dir.join(KUBESPAN_IDENTITY_FILE);
    let temporary = state_dir.join(format!(".{KUBESPAN_IDENTITY_FILE}.new"));
    fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> IdentityError {
        let path = path.to_owned();
        move |source| IdentityError::Io {
            action,
            path,
            source,
        }
    }
    // Left over from an interrupted rotation: it never replaced the file, so it is no key.
    match fs::remove_file(&temporary) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("remove", &temporary)(e)),
    }
    create_exclusive(&temporary, contents.as_bytes()).map_err(io_error("create", &temporary))?;
    if let Err(e) = fs::rename(&temporary, &path) {
        let _ = fs::remove_file(&temporary);
        return Err(io_error("replace", &path)(e));
    }
    if let Ok(dir) = File::open(state_dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Mesh address

fn ula_prefix_bytes(cluster_id: &str, purpose: u8) -> [u8; 8] {
    let digest = Sha256::digest(cluster_id.as_bytes());
    let mut prefix = [0u8; 8];
    // The last 16 bytes of the digest, of which the first 8 form the prefix.
    prefix.copy_from_slice(&digest[16..24]);
    prefix[0] = 0xfd;
    prefix[7] = purpose;
    prefix
}

/// The mesh's /64: a ULA prefix derived from the cluster id string.
pub fn mesh_prefix(cluster_id: &str) -> Ipv6Net {
    let mut octets = [0u8; 16];
    octets[..8].copy_from_slice(&ula_prefix_bytes(cluster_id, ULA_PURPOSE_KUBESPAN));
    Ipv6Net::new_assert(Ipv6Addr::from(octets), 64)
}

/// This node's mesh address: the cluster's prefix and the modified EUI-64 of `mac`.
pub fn mesh_address(cluster_id: &str, mac: [u8; 6]) -> Ipv6Addr {
    let mut octets = [0u8; 16];
    octets[..8].copy_from_slice(&ula_prefix_bytes(cluster_id, ULA_PURPOSE_KUBESPAN));
    octets[8..].copy_from_slice(&[
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ]);
    Ipv6Addr::from(octets)
}

fn parse_mac_syntax(text: &str) -> Result<[u8; 6], String> {
    let separator = if text.contains('-') { '-' } else { ':' };
    let parts: Vec<&str> = text.split(separator).collect();
    if parts.len() != 6 {
        return Err(format!("it has {} parts, a MAC address has 6", parts.len()));
    }
    let mut mac = [0u8; 6];
    for (octet, part) in mac.iter_mut().zip(&parts) {
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{part:?} is not two hex digits"));
        }
        *octet = u8::from_str_radix(part, 16).map_err(|e| format!("{part:?}: {e}"))?;
    }
    Ok(mac)
}

/// Parses a MAC address: six pairs of hex digits separated by `:` (or `-`), any case.
/// The all-zero address is refused.
pub fn parse_mac(text: &str) -> Result<[u8; 6], IdentityError> {
    let bad = |reason: String| IdentityError::BadMac {
        text: text.to_owned(),
        reason,
    };
    let mac = parse_mac_syntax(text.trim()).map_err(bad)?;
    if mac == [0; 6] {
        return Err(bad("the all-zero address is not a hardware address".into()));
    }
    Ok(mac)
}

/// `2e:1a:b6:53:81:69`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A network link as far as MAC selection cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub name: String,
    /// The link's 6-byte hardware address, if it has one.
    pub mac: Option<[u8; 6]>,
    /// Backed by a device (`/sys/class/net/<link>/device` exists).
    pub physical: bool,
    pub loopback: bool,
}

/// The MAC the mesh address is derived from, and the link it belongs to; see the module
/// documentation for the rule. `None` when no link qualifies (then `macAddress` must be
/// configured).
pub fn select_mac(links: &[LinkInfo], mesh_interface: &str) -> Option<(String, [u8; 6])> {
    let mut candidates: Vec<(&LinkInfo, [u8; 6])> = links
        .iter()
        .filter(|l| !l.loopback && l.name != mesh_interface)
        .filter_map(|l| l.mac.map(|mac| (l, mac)))
        .filter(|(_, mac)| *mac != [0; 6] && mac[0] & 0x01 == 0)
        .collect();
    candidates.sort_by(|(a, _), (b, _)| a.name.cmp(&b.name));
    candidates
        .iter()
        .find(|(l, _)| l.physical)
        .or_else(|| candidates.first())
        .map(|(l, mac)| (l.name.clone(), *mac))
}

/// The host's links from `/sys/class/net`, sorted by name.
pub fn read_links() -> io::Result<Vec<LinkInfo>> {
    read_links_from(Path::new("/sys/class/net"))
}

/// [`read_links`] from another sysfs-like directory: one subdirectory per link with `address`
/// (the MAC), `type` (`772` for loopback) and, for physical links, `device`.
pub fn read_links_from(root: &Path) -> io::Result<Vec<LinkInfo>> {
    let mut links = Vec::new();
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let dir = entry.path();
        // Skip plain files such as `bonding_masters`; links are (symlinks to) directories.
        if !fs::metadata(&dir).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        let mac = fs::read_to_string(dir.join("address"))
            .ok()
            .and_then(|text| parse_mac_syntax(text.trim()).ok());
        let link_type = fs::read_to_string(dir.join("type"))
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok());
        links.push(LinkInfo {
            name: entry.file_name().to_string_lossy().into_owned(),
            mac,
            physical: fs::symlink_metadata(dir.join("device")).is_ok(),
            loopback: link_type == Some(ARPHRD_LOOPBACK),
        });
    }
    links.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(links)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER_A: &str = "8XuV9TZHW08DOk3bVxQjH9ih_TBKjnh-j44tsCLSBzo=";
    const CLUSTER_B: &str = "v16UCWpO2iOm82n6F8dGCJ41ZXXBvDrjRDs2su7C_zs=";

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    // ---- base62 ----

    /// Reference for numbers that fit a u128.
    fn base62_u128(mut n: u128) -> String {
        if n == 0 {
            return "0".into();
        }
        let mut out = Vec::new();
        while n > 0 {
            out.push(BASE62_ALPHABET[(n % 62) as usize]);
            n /= 62;
        }
        out.reverse();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn base62_small_values() {
        assert_eq!(base62_encode(&[]), "0");
        assert_eq!(base62_encode(&[0]), "0");
        assert_eq!(base62_encode(&[0; 32]), "0");
        assert_eq!(base62_encode(&[1]), "1");
        assert_eq!(base62_encode(&[9]), "9");
        assert_eq!(base62_encode(&[10]), "A");
        assert_eq!(base62_encode(&[36]), "a");
        assert_eq!(base62_encode(&[61]), "z");
        assert_eq!(base62_encode(&[62]), "10");
        assert_eq!(base62_encode(&[1, 0]), "48"); // 256 = 4 * 62 + 8
        assert_eq!(base62_encode(&[0, 0, 1, 0]), "48");
        assert_eq!(base62_encode(&[0xff]), "47"); // 255 = 4 * 62 + 7
    }

    #[test]
    fn base62_matches_integer_arithmetic() {
        let mut x: u128 = 0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834;
        for _ in 0..200 {
            x = x
                .wrapping_mul(0x2545_f491_4f6c_dd1d)
                .wrapping_add(0x1405_7b7e_f767_814f);
            for shift in [0, 7, 64, 100, 127] {
                let n = x >> shift;
                assert_eq!(base62_encode(&n.to_be_bytes()), base62_u128(n), "{n}");
            }
        }
        assert_eq!(
            base62_encode(&u128::MAX.to_be_bytes()),
            base62_u128(u128::MAX)
        );
    }

    #[test]
    fn base62_of_32_bytes() {
        let max = base62_encode(&[0xff; 32]);
        assert_eq!(max.len(), 43, "{max}");
        assert!(max.bytes().all(|b| b.is_ascii_alphanumeric()), "{max}");
        // 2^256 - 1 and the bytes 0..=31, cross-checked with Python's big integers.
        assert_eq!(max, "yhjskwdA6OZ1AL1YmHWZWm8LLG7HjnuCA2j5rOw8Xp1");
        let counting: Vec<u8> = (0..32).collect();
        assert_eq!(
            base62_encode(&counting),
            "3aUlTJC7tjlCTQj2uNU3MFagCXG9LRKRcwGkBIDlf"
        );
        for _ in 0..50 {
            let id = base62_encode(&random_bytes::<32>().unwrap());
            assert!((1..=43).contains(&id.len()), "{id}");
            assert!(id.bytes().all(|b| b.is_ascii_alphanumeric()), "{id}");
        }
    }

    // ---- node id file ----

    #[test]
    fn node_id_is_created_private_and_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("var/lib/kubespan");
        let id = load_or_create_node_id(&state).unwrap();
        assert!((40..=43).contains(&id.len()), "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric()), "{id}");
        let path = state.join(NODE_IDENTITY_FILE);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&state), 0o700);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("nodeId: "), "{text}");
        assert_eq!(load_or_create_node_id(&state).unwrap(), id);
        assert_eq!(fs::read_to_string(&path).unwrap(), text);
        // Another state directory, another node.
        assert_ne!(
            load_or_create_node_id(&tmp.path().join("other")).unwrap(),
            id
        );
    }

    #[test]
    fn existing_state_directory_mode_is_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o750)).unwrap();
        load_or_create_node_id(tmp.path()).unwrap();
        assert_eq!(mode(tmp.path()), 0o750);
    }

    #[test]
    fn node_id_files_written_by_others_are_read() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(NODE_IDENTITY_FILE);
        for (text, id) in [
            (
                "nodeId: 7x1SuC8Ege5BGXdAfTEff5iQnlWZLfv9h1LGMxA2pYkC\n",
                "7x1SuC8Ege5BGXdAfTEff5iQnlWZLfv9h1LGMxA2pYkC",
            ),
            ("nodeId: \"12345\"\n", "12345"),
            ("nodeId: 12345\n", "12345"),
            ("# comment\nnodeId: abc\nextra: ignored\n", "abc"),
        ] {
            fs::write(&path, text).unwrap();
            assert_eq!(load_or_create_node_id(tmp.path()).unwrap(), id, "{text:?}");
        }
    }

    #[test]
    fn node_ids_that_look_like_other_yaml_types_round_trip() {
        for id in [
            "12345", "1e5", "0x1F", "0o17", "true", "null", "NaN", "inf", "y", "No",
        ] {
            let text = serde_norway::to_string(&NodeIdentityFile { node_id: id.into() }).unwrap();
            assert_eq!(parse_node_id(&text).unwrap(), id, "{text:?}");
        }
    }

    #[test]
    fn malformed_node_id_files_are_errors_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(NODE_IDENTITY_FILE);
        for (text, expect) in [
            ("nodeId: [1, 2]\n", "expected YAML"),
            ("somethingElse: abc\n", "expected YAML"),
            ("nodeId: \"\"\n", "empty"),
            ("nodeId: abc-def\n", "'-'"),
            ("nodeId: \"0\"\n", "all zero"),
            ("nodeId: \"0000\"\n", "all zero"),
            (": : :\n", "expected YAML"),
        ] {
            fs::write(&path, text).unwrap();
            let err = load_or_create_node_id(tmp.path()).unwrap_err();
            let message = err.to_string();
            assert!(
                matches!(err, IdentityError::Malformed { .. }),
                "{text:?}: {message}"
            );
            assert!(message.contains(expect), "{text:?}: {message}");
            assert!(message.contains(NODE_IDENTITY_FILE), "{message}");
            assert!(message.contains("delete it"), "{message}");
            assert_eq!(
                fs::read_to_string(&path).unwrap(),
                text,
                "the file must not be replaced"
            );
        }
        fs::write(
            &path,
            format!("nodeId: {}\n", "a".repeat(MAX_NODE_ID_LEN + 1)),
        )
        .unwrap();
        assert!(load_or_create_node_id(tmp.path()).is_err());
        fs::write(&path, [0xff, 0xfe, b'\n']).unwrap();
        let err = load_or_create_node_id(tmp.path()).unwrap_err();
        assert!(err.to_string().contains("UTF-8"), "{err}");
    }

    #[test]
    fn an_empty_file_from_an_interrupted_creation_is_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(NODE_IDENTITY_FILE);
        fs::write(&path, "").unwrap();
        let id = load_or_create_node_id(tmp.path()).unwrap();
        assert!(!id.is_empty());
        assert_eq!(mode(&path), 0o600);
        let keys_path = tmp.path().join(KUBESPAN_IDENTITY_FILE);
        fs::write(&keys_path, "\n  \n").unwrap();
        load_or_create_wireguard_keys(tmp.path()).unwrap();
        assert_eq!(mode(&keys_path), 0o600);
    }

    #[test]
    fn unreadable_state_is_an_io_error() {
        let tmp = tempfile::tempdir().unwrap();
        // The state directory path is a regular file.
        let file = tmp.path().join("not-a-dir");
        fs::write(&file, "x").unwrap();
        let err = load_or_create_node_id(&file).unwrap_err();
        assert!(matches!(err, IdentityError::Io { .. }), "{err}");
        assert!(err.to_string().contains("not-a-dir"), "{err}");
        // The identity file path is a directory.
        fs::create_dir(tmp.path().join(NODE_IDENTITY_FILE)).unwrap();
        let err = load_or_create_node_id(tmp.path()).unwrap_err();
        assert!(matches!(err, IdentityError::Io { .. }), "{err}");
    }

    // ---- WireGuard keys ----

    #[test]
    fn wireguard_key_vector() {
        let private = BASE64
            .decode("sF45u5ePau58WeeCUY3T8D9foEKaQ8Opx4cGC8g4XE4=")
            .unwrap();
        let keys = WireguardKeys::from_private(private.try_into().unwrap());
        assert_eq!(
            keys.public_base64(),
            "Oak2fBEWngBhwslBxDVgnRNHXs88OAp4kjroSX0uqUE="
        );
        assert_eq!(
            keys.private_base64(),
            "sF45u5ePau58WeeCUY3T8D9foEKaQ8Opx4cGC8g4XE4="
        );
    }

    #[test]
    fn generated_keys_are_clamped_and_consistent() {
        let a = WireguardKeys::generate();
        let b = WireguardKeys::generate();
        assert_ne!(a, b);
        for k in [&a, &b] {
            assert_eq!(k.private_key[0] & 7, 0);
            assert_eq!(k.private_key[31] & 0xc0, 0x40);
            assert_eq!(WireguardKeys::from_private(k.private_key), *k);
            assert_eq!(k.public_base64().len(), 44);
        }
    }

    #[test]
    fn debug_does_not_print_the_private_key() {
        let keys = WireguardKeys::from_private([0x11; 32]);
        let text = format!("{keys:?}");
        assert!(!text.contains(&keys.private_base64()), "{text}");
        assert!(!text.contains("17"), "{text}");
        assert!(text.contains(&keys.public_base64()), "{text}");
    }

    #[test]
    fn wireguard_keys_are_created_private_and_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let keys = load_or_create_wireguard_keys(tmp.path()).unwrap();
        let path = tmp.path().join(KUBESPAN_IDENTITY_FILE);
        assert_eq!(mode(&path), 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.contains(&format!("privateKey: {}", keys.private_base64())),
            "{text}"
        );
        assert!(
            text.contains(&format!("publicKey: {}", keys.public_base64())),
            "{text}"
        );
        assert_eq!(load_or_create_wireguard_keys(tmp.path()).unwrap(), keys);
        assert_eq!(keys.private_key[0] & 7, 0);
    }

    #[test]
    fn a_stored_key_replaces_the_old_one_privately_and_is_loaded_next() {
        let tmp = tempfile::tempdir().unwrap();
        let old = load_or_create_wireguard_keys(tmp.path()).unwrap();
        let path = tmp.path().join(KUBESPAN_IDENTITY_FILE);
        // A temporary file from an interrupted rotation is no obstacle.
        let leftover = tmp.path().join(format!(".{KUBESPAN_IDENTITY_FILE}.new"));
        fs::write(&leftover, "privateKey: half").unwrap();
        let new = WireguardKeys::generate();
        store_wireguard_keys(tmp.path(), &new).unwrap();
        assert_ne!(new, old);
        assert_eq!(load_or_create_wireguard_keys(tmp.path()).unwrap(), new);
        assert_eq!(mode(&path), 0o600);
        assert!(!leftover.exists(), "the temporary file stayed");
        let names: Vec<_> = fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "only the identity file: {names:?}");
    }

    #[test]
    fn talos_kubespan_identity_files_are_read() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(
            tmp.path().join(KUBESPAN_IDENTITY_FILE),
            "address: fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169/128\n\
             subnet: fd7f:175a:b97c:5602::/64\n\
             privateKey: sF45u5ePau58WeeCUY3T8D9foEKaQ8Opx4cGC8g4XE4=\n\
             publicKey: Oak2fBEWngBhwslBxDVgnRNHXs88OAp4kjroSX0uqUE=\n",
        )
        .unwrap();
        let keys = load_or_create_wireguard_keys(tmp.path()).unwrap();
        assert_eq!(
            keys.public_base64(),
            "Oak2fBEWngBhwslBxDVgnRNHXs88OAp4kjroSX0uqUE="
        );
        // Without publicKey the key is derived.
        fs::write(
            tmp.path().join(KUBESPAN_IDENTITY_FILE),
            "privateKey: sF45u5ePau58WeeCUY3T8D9foEKaQ8Opx4cGC8g4XE4=\n",
        )
        .unwrap();
        assert_eq!(load_or_create_wireguard_keys(tmp.path()).unwrap(), keys);
    }

    #[test]
    fn malformed_kubespan_identity_files_are_errors_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(KUBESPAN_IDENTITY_FILE);
        let zero = BASE64.encode([0u8; 32]);
        let short = BASE64.encode([1u8; 31]);
        let cases = [
            (
                "publicKey: Oak2fBEWngBhwslBxDVgnRNHXs88OAp4kjroSX0uqUE=\n".to_owned(),
                "expected YAML",
            ),
            ("privateKey: not*base64\n".to_owned(), "not standard base64"),
            (format!("privateKey: {short}\n"), "31 bytes"),
            (format!("privateKey: {zero}\n"), "all zero"),
            (
                "privateKey: sF45u5ePau58WeeCUY3T8D9foEKaQ8Opx4cGC8g4XE4=\n\
                 publicKey: AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n"
                    .to_owned(),
                "does not belong",
            ),
        ];
        for (text, expect) in cases {
            fs::write(&path, &text).unwrap();
            let err = load_or_create_wireguard_keys(tmp.path()).unwrap_err();
            let message = err.to_string();
            assert!(
                matches!(err, IdentityError::Malformed { .. }),
                "{text:?}: {message}"
            );
            assert!(message.contains(expect), "{text:?}: {message}");
            assert!(message.contains(KUBESPAN_IDENTITY_FILE), "{message}");
            assert!(message.contains("new key pair"), "{message}");
            assert_eq!(
                fs::read_to_string(&path).unwrap(),
                text,
                "the file must not be replaced"
            );
        }
    }

    // ---- mesh address ----

    #[test]
    fn mesh_prefix_vectors() {
        assert_eq!(
            mesh_prefix(CLUSTER_A).to_string(),
            "fd7f:175a:b97c:5602::/64"
        );
        assert_eq!(
            mesh_prefix(CLUSTER_B).to_string(),
            "fd8a:4396:731e:e702::/64"
        );
    }

    #[test]
    fn mesh_address_vectors() {
        let a = mesh_address(CLUSTER_A, parse_mac("2e:1a:b6:53:81:69").unwrap());
        assert_eq!(
            a,
            "fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169"
                .parse::<Ipv6Addr>()
                .unwrap()
        );
        let b = mesh_address(CLUSTER_A, parse_mac("ea:71:1b:b2:cc:ee").unwrap());
        assert_eq!(
            b,
            "fd7f:175a:b97c:5602:e871:1bff:feb2:ccee"
                .parse::<Ipv6Addr>()
                .unwrap()
        );
        assert!(mesh_prefix(CLUSTER_A).contains(&a));
        assert!(mesh_prefix(CLUSTER_A).contains(&b));
        // The U/L bit is flipped both ways.
        let c = mesh_address(CLUSTER_B, [0x00, 0x11, 0x22, 0x33, 0x44, 0x55]);
        assert_eq!(
            c,
            "fd8a:4396:731e:e702:211:22ff:fe33:4455"
                .parse::<Ipv6Addr>()
                .unwrap()
        );
    }

    #[test]
    fn parses_macs() {
        let expected = [0x2e, 0x1a, 0xb6, 0x53, 0x81, 0x69];
        for text in [
            "2e:1a:b6:53:81:69",
            "2E:1A:B6:53:81:69",
            "2e-1a-b6-53-81-69",
            " 2e:1a:b6:53:81:69\n",
        ] {
            assert_eq!(parse_mac(text).unwrap(), expected, "{text:?}");
        }
        for text in [
            "",
            "2e:1a:b6:53:81",
            "2e:1a:b6:53:81:69:00",
            "2e:1a:b6:53:81:6",
            "2e:1a:b6:53:81:699",
            "2e:1a:b6:53:81:zz",
            "2e:1a:b6:53:81:+9",
            "2e1ab6538169",
            "2e:1a-b6:53:81:69",
            "00:00:00:00:00:00",
            "00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00",
        ] {
            let err = parse_mac(text).unwrap_err();
            assert!(matches!(err, IdentityError::BadMac { .. }), "{text:?}");
            assert!(err.to_string().contains("2e:1a:b6:53:81:69"), "{err}");
        }
        assert_eq!(format_mac(expected), "2e:1a:b6:53:81:69");
    }

    // ---- MAC selection ----

    fn link(name: &str, mac: Option<&str>, physical: bool) -> LinkInfo {
        LinkInfo {
            name: name.into(),
            mac: mac.map(|m| parse_mac_syntax(m).unwrap()),
            physical,
            loopback: false,
        }
    }

    fn lo() -> LinkInfo {
        LinkInfo {
            name: "lo".into(),
            mac: Some([0; 6]),
            physical: false,
            loopback: true,
        }
    }

    #[test]
    fn physical_links_are_preferred_whatever_their_name() {
        let links = [
            lo(),
            link("br0", Some("02:00:00:00:00:01"), false),
            link("cni0", Some("02:00:00:00:00:02"), false),
            link("zz-nic", Some("2e:1a:b6:53:81:69"), true),
            link("yy-nic", Some("ea:71:1b:b2:cc:ee"), true),
        ];
        assert_eq!(
            select_mac(&links, "kubespan"),
            Some(("yy-nic".into(), [0xea, 0x71, 0x1b, 0xb2, 0xcc, 0xee]))
        );
        let mut reversed = links.clone();
        reversed.reverse();
        assert_eq!(
            select_mac(&reversed, "kubespan"),
            select_mac(&links, "kubespan")
        );
    }

    #[test]
    fn loopback_mesh_interface_and_unusable_macs_are_skipped() {
        let links = [
            lo(),
            LinkInfo {
                loopback: true,
                ..link("a-loop", Some("02:00:00:00:00:09"), true)
            },
            link("aa-kubespan", Some("02:00:00:00:00:01"), true),
            link("b-nomac", None, true),
            link("c-zero", Some("00:00:00:00:00:00"), true),
            link("d-multicast", Some("01:00:5e:00:00:01"), true),
            link("e-veth", Some("02:00:00:00:00:05"), false),
            link("f-eth", Some("02:00:00:00:00:06"), true),
        ];
        assert_eq!(
            select_mac(&links, "aa-kubespan"),
            Some(("f-eth".into(), [0x02, 0, 0, 0, 0, 6]))
        );
    }

    #[test]
    fn without_physical_links_the_first_virtual_one_is_used() {
        let links = [
            lo(),
            link("veth9", Some("aa:00:00:00:00:09"), false),
            link("kubespan", None, false),
            link("veth1", Some("aa:00:00:00:00:01"), false),
            link("veth5", Some("aa:00:00:00:00:05"), false),
        ];
        assert_eq!(
            select_mac(&links, "kubespan"),
            Some(("veth1".into(), [0xaa, 0, 0, 0, 0, 1]))
        );
    }

    #[test]
    fn nothing_usable_gives_none() {
        assert_eq!(select_mac(&[], "kubespan"), None);
        let links = [
            lo(),
            link("kubespan", Some("02:00:00:00:00:01"), true),
            link("wg0", None, false),
            link("dummy", Some("00:00:00:00:00:00"), false),
            link("mc", Some("33:33:00:00:00:01"), true),
        ];
        assert_eq!(select_mac(&links, "kubespan"), None);
    }

    #[test]
    fn reads_links_from_a_sysfs_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("class/net");
        let devices = tmp.path().join("devices");
        let make = |name: &str, address: Option<&str>, link_type: &str, device: bool| {
            let dir = devices.join(name);
            fs::create_dir_all(&dir).unwrap();
            if let Some(address) = address {
                fs::write(dir.join("address"), format!("{address}\n")).unwrap();
            }
            fs::write(dir.join("type"), format!("{link_type}\n")).unwrap();
            if device {
                fs::create_dir_all(tmp.path().join("pci").join(name)).unwrap();
                std::os::unix::fs::symlink(tmp.path().join("pci").join(name), dir.join("device"))
                    .unwrap();
            }
            fs::create_dir_all(&root).unwrap();
            std::os::unix::fs::symlink(&dir, root.join(name)).unwrap();
        };
        make("lo", Some("00:00:00:00:00:00"), "772", false);
        make("eth0", Some("2e:1a:b6:53:81:69"), "1", true);
        make("br0", Some("02:42:ac:11:00:01"), "1", false);
        make("kubespan", None, "65534", false);
        make(
            "ip6tnl0",
            Some("00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00"),
            "769",
            false,
        );
        fs::write(root.join("bonding_masters"), "bond0\n").unwrap();

        let links = read_links_from(&root).unwrap();
        let names: Vec<&str> = links.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["br0", "eth0", "ip6tnl0", "kubespan", "lo"]);
        assert_eq!(links[0], link("br0", Some("02:42:ac:11:00:01"), false));
        assert_eq!(links[1], link("eth0", Some("2e:1a:b6:53:81:69"), true));
        assert_eq!(links[2].mac, None);
        assert_eq!(links[3].mac, None);
        assert!(links[4].loopback && !links[4].physical);
        assert_eq!(
            select_mac(&links, "kubespan"),
            Some(("eth0".into(), [0x2e, 0x1a, 0xb6, 0x53, 0x81, 0x69]))
        );
        assert!(read_links_from(&tmp.path().join("missing")).is_err());
    }

    #[test]
    fn reads_the_real_sysfs_without_failing() {
        if Path::new("/sys/class/net").is_dir() {
            let links = read_links().unwrap();
            assert!(links.windows(2).all(|w| w[0].name <= w[1].name));
        }
    }
}
