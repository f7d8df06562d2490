//! WireGuard devices behind one small trait: kernel WireGuard (netlink) or openspan's own
//! userspace device (boringtun's protocol core) in the agent on a TUN device. Both are configured with the same [`PeerConfig`] and report the same
//! [`PeerState`].

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use thiserror::Error;

pub mod device;
pub mod kernel;
pub mod netlink;
pub mod uapi;
mod udp;
pub mod userspace;
mod wake;
pub mod worker;

pub type Key = [u8; 32];

#[derive(Debug, Error)]
pub enum WgError {
    #[error("{0}")]
    Unsupported(String),
    #[error("WireGuard device {interface}: {message}")]
    Device { interface: String, message: String },
    #[error("WireGuard control socket: {0}")]
    Io(#[from] std::io::Error),
}

/// Interface-wide settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSettings {
    pub private_key: Key,
    pub listen_port: u16,
    pub fwmark: u32,
}

/// One peer as the agent wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: Key,
    pub preshared_key: Key,
    /// `None` leaves the device's current (possibly roamed) endpoint alone.
    pub endpoint: Option<SocketAddr>,
    /// Replaces the peer's allowed IPs.
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Duration,
}

/// One peer as the device reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerState {
    pub public_key: Key,
    pub endpoint: Option<SocketAddr>,
    pub last_handshake: Option<SystemTime>,
    /// How long ago that handshake was, when the device measures it on a monotonic clock
    /// (openspan's userspace device). Its `last_handshake` is then derived from the wall clock at
    /// each read and moves with it; kernel WireGuard stores the wall time once (`None` here).
    pub handshake_age: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub allowed_ips: Vec<IpNet>,
}

/// Carries packets for endpoints that are not UDP addresses: a relayed peer's endpoint is a
/// placeholder address the link owns (the agent's relays).
pub trait RelayLink: Send + Sync {
    /// Whether `endpoint` is one of the link's.
    fn owns(&self, endpoint: SocketAddr) -> bool;
    /// Sends `packet` to the peer behind `endpoint`; false when it was dropped.
    fn send(&self, endpoint: SocketAddr, packet: &[u8]) -> bool;
}

/// Hands the device a packet that arrived through a relay, as if from `endpoint`.
pub type RelayInjector = std::sync::Arc<dyn Fn(SocketAddr, &[u8]) + Send + Sync>;

/// A WireGuard interface the agent owns.
pub trait WireGuard: Send {
    /// The network interface name.
    fn interface(&self) -> &str;
    /// e.g. "kernel WireGuard on kubespan".
    fn describe(&self) -> String;
    fn configure(&mut self, settings: &DeviceSettings) -> Result<(), WgError>;
    /// Adds or updates a peer. With `reset_session`, the peer is re-created so a handshake
    /// toward the new endpoint starts at once instead of after WireGuard's 5 s rekey timeout.
    fn set_peer(&mut self, peer: &PeerConfig, reset_session: bool) -> Result<(), WgError>;
    fn remove_peer(&mut self, public_key: &Key) -> Result<(), WgError>;
    fn peers(&mut self) -> Result<Vec<PeerState>, WgError>;
    /// Replaces this device's private key (`settings.private_key`; port and mark as
    /// configured). Returns whether the previous key keeps working for up to `grace` (sessions
    /// and handshakes under it are kept until each peer has a session under the new key:
    /// openspan's userspace device); otherwise every session ends now and each peer is cut off
    /// until it has learned the new key (kernel WireGuard holds one key).
    fn rotate_key(&mut self, settings: &DeviceSettings, _grace: Duration) -> Result<bool, WgError> {
        self.configure(settings).map(|()| false)
    }
    /// Replaces peer `old_key` by `peer`: the same node under a new key. A device that can
    /// keeps the old session carrying packets until the new key has one (for `grace` at most);
    /// otherwise the old peer is removed and the new one added with a fresh session.
    fn replace_peer(
        &mut self,
        old_key: &Key,
        peer: &PeerConfig,
        _grace: Duration,
    ) -> Result<(), WgError> {
        self.remove_peer(old_key)?;
        self.set_peer(peer, true)
    }
    /// Whether changing a peer's allowed IPs keeps its session (no new handshake needed).
    fn updates_in_place(&self) -> bool;
    /// Whether `set_peer` with `reset_session` sends the handshake initiation itself; otherwise
    /// the caller makes the device start one by sending it a packet for the peer.
    fn initiates_on_reset(&self) -> bool {
        false
    }
    /// Whether [`WireGuard::race`] tries all candidates at once (openspan's userspace device);
    /// otherwise the caller rotates through them one by one (kernel WireGuard).
    fn races_endpoints(&self) -> bool {
        false
    }
    /// Sends one handshake initiation to every candidate endpoint, most promising first; the
    /// first to answer becomes the peer's endpoint. Returns whether a race started.
    fn race(&mut self, _public_key: &Key, _candidates: &[SocketAddr]) -> Result<bool, WgError> {
        Ok(false)
    }
    /// Makes a quiet peer answer if it is alive (a handshake initiation to its endpoint).
    /// Returns false when the device cannot, and the caller probes another way.
    fn probe(&mut self, _public_key: &Key) -> Result<bool, WgError> {
        Ok(false)
    }
    /// Sends a STUN message from the WireGuard socket; false when the device cannot (kernel
    /// WireGuard owns its socket).
    fn send_stun(&mut self, _destination: SocketAddr, _message: &[u8]) -> bool {
        false
    }
    /// STUN messages that arrived on the WireGuard socket since the last call.
    fn take_stun(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        Vec::new()
    }
    /// Sends packets for the link's endpoints through it, and returns how to hand the device
    /// what comes back; `None` when the device cannot (kernel WireGuard: the caller carries
    /// relayed packets over loopback UDP instead).
    fn attach_relay(&mut self, _link: std::sync::Arc<dyn RelayLink>) -> Option<RelayInjector> {
        None
    }
    /// Data messages received that did not decrypt since the device started; `None` when the
    /// device does not count them (kernel WireGuard drops them without a counter).
    fn decrypt_failures(&self) -> Option<u64> {
        None
    }
}
