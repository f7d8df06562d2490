//! boringtun inside the agent, on a TUN device, controlled through WireGuard's standard
//! userspace socket (`/var/run/wireguard/<interface>.sock`), so `wg show` works on it too.

use std::collections::HashSet;
use std::path::PathBuf;

use boringtun::device::{DeviceConfig, DeviceHandle};

use super::uapi;
use super::{DeviceSettings, Key, PeerConfig, PeerState, WgError, WireGuard};

pub struct UserspaceWireGuard {
    interface: String,
    socket: PathBuf,
    configured: HashSet<Key>,
    // Dropping the handle stops the device and removes the control socket.
    _handle: DeviceHandle,
}

impl UserspaceWireGuard {
    /// Creates the TUN interface and starts boringtun on `threads` worker threads.
    pub fn create(interface: &str, threads: usize) -> Result<Self, WgError> {
        let socket = uapi::socket_path(interface);
        // A socket left by a crashed agent would make boringtun's bind fail; nobody serves it.
        if socket.exists() && std::os::unix::net::UnixStream::connect(&socket).is_err() {
            let _ = std::fs::remove_file(&socket);
        }
        let name = interface.to_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        // boringtun's socket mode blocks SIGINT/SIGTERM on the thread that creates the device
        // (and on its worker threads, which inherit the mask) to read them through a signalfd.
        // Creating it on a thread of its own keeps those signals for the agent's handlers.
        std::thread::Builder::new()
            .name(format!("wg-{interface}"))
            .spawn(move || {
                let config = DeviceConfig {
                    n_threads: threads.max(1),
                    use_connected_socket: true,
                    use_multi_queue: true,
                    uapi_fd: -1,
                };
                let _ = tx.send(DeviceHandle::new(&name, config).map_err(|e| format!("{e:?}")));
            })?;
        let handle = rx
            .recv()
            .map_err(|_| WgError::Unsupported("the device thread ended before creating the device".into()))?
            .map_err(|message| WgError::Device {
                interface: interface.to_owned(),
                message: format!("cannot create the TUN device ({message}); is /dev/net/tun available and are we root (CAP_NET_ADMIN)?"),
            })?;
        Ok(Self {
            interface: interface.to_owned(),
            socket,
            configured: HashSet::new(),
            _handle: handle,
        })
    }
}

impl WireGuard for UserspaceWireGuard {
    fn interface(&self) -> &str {
        &self.interface
    }

    fn describe(&self) -> String {
        format!("userspace (boringtun) on {}", self.interface)
    }

    fn configure(&mut self, settings: &DeviceSettings) -> Result<(), WgError> {
        uapi::request(&self.socket, &uapi::set_device(settings)).map(|_| ())
    }

    fn set_peer(&mut self, peer: &PeerConfig, _reset_session: bool) -> Result<(), WgError> {
        // boringtun re-creates a peer on every change, which also starts a fresh handshake.
        let exists = self.configured.contains(&peer.public_key);
        let endpoint = match peer.endpoint {
            Some(endpoint) => Some(endpoint),
            // Keep the current (possibly roamed) endpoint across the re-creation.
            None if exists => self
                .peers()?
                .into_iter()
                .find(|p| p.public_key == peer.public_key)
                .and_then(|p| p.endpoint),
            None => None,
        };
        uapi::request(&self.socket, &uapi::set_peer(peer, exists, endpoint))?;
        self.configured.insert(peer.public_key);
        Ok(())
    }

    fn remove_peer(&mut self, public_key: &Key) -> Result<(), WgError> {
        uapi::request(&self.socket, &uapi::remove_peer(public_key))?;
        self.configured.remove(public_key);
        Ok(())
    }

    fn peers(&mut self) -> Result<Vec<PeerState>, WgError> {
        let text = uapi::request(&self.socket, "get=1\n\n")?;
        let peers = uapi::parse_get(&text).map_err(|message| WgError::Device {
            interface: self.interface.clone(),
            message: format!("unreadable status: {message}"),
        })?;
        self.configured = peers.iter().map(|p| p.public_key).collect();
        Ok(peers)
    }
}
