//! boringtun inside the agent, on a TUN device.
//!
//! The agent controls the device through a private socket pair (boringtun's `uapi_fd` mode, which
//! also keeps boringtun from taking over SIGINT/SIGTERM), and serves WireGuard's standard control
//! socket `/var/run/wireguard/<interface>.sock` itself, read-only: `wg show` works, while changes
//! go only through the agent (boringtun cannot modify a peer in place, and a foreign `wg set`
//! would fight the agent's reconciler anyway).

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boringtun::device::{DeviceConfig, DeviceHandle};

use super::uapi;
use super::{DeviceSettings, Key, PeerConfig, PeerState, WgError, WireGuard};

/// The agent's end of boringtun's control socket pair.
struct ControlChannel {
    stream: UnixStream,
    /// Answers still owed by the device for requests that timed out: they are read and
    /// discarded before the next request, so answers never pair with the wrong request.
    owed: usize,
}

impl ControlChannel {
    fn request(&mut self, body: &str, name: &str) -> Result<String, WgError> {
        while self.owed > 0 {
            uapi::exchange(&mut self.stream, "", name)
                .map(|_| ())
                .or_else(|e| match e {
                    // A refused request still ended its answer.
                    WgError::Device { .. } => Ok(()),
                    other => Err(other),
                })?;
            self.owed -= 1;
        }
        let result = uapi::exchange(&mut self.stream, body, name);
        if matches!(result, Err(WgError::Io(_))) {
            self.owed += 1;
        }
        result
    }
}

pub struct UserspaceWireGuard {
    interface: String,
    control: Arc<Mutex<ControlChannel>>,
    configured: HashSet<Key>,
    socket: PathBuf,
    stop_proxy: Arc<AtomicBool>,
    // Dropping the handle stops the device.
    _handle: DeviceHandle,
}

impl UserspaceWireGuard {
    /// Creates the TUN interface and starts boringtun on `threads` worker threads.
    pub fn create(interface: &str, threads: usize) -> Result<Self, WgError> {
        let (ours, theirs) = UnixStream::pair()?;
        let config = DeviceConfig {
            n_threads: threads.max(1),
            use_connected_socket: true,
            use_multi_queue: true,
            uapi_fd: theirs.into_raw_fd(),
        };
        // Created on a thread named after the interface: boringtun's workers inherit the name,
        // so `top -H` shows which threads carry the mesh.
        let name = interface.to_owned();
        let created = std::thread::Builder::new()
            .name(format!("wg-{interface}"))
            .spawn(move || DeviceHandle::new(&name, config).map_err(|e| format!("{e:?}")))?
            .join()
            .map_err(|_| WgError::Unsupported("the device thread panicked".into()))?;
        let handle = created.map_err(|e| WgError::Device {
            interface: interface.to_owned(),
            message: format!(
                "cannot create the TUN device ({e}); is /dev/net/tun available and are we root (CAP_NET_ADMIN)?"
            ),
        })?;
        let control = Arc::new(Mutex::new(ControlChannel {
            stream: ours,
            owed: 0,
        }));
        let socket = uapi::socket_path(interface);
        let stop_proxy = Arc::new(AtomicBool::new(false));
        if let Err(e) = serve_read_only(&socket, control.clone(), stop_proxy.clone(), interface) {
            tracing::warn!(socket = %socket.display(), error = %e, "`wg show` will not see this interface");
        }
        Ok(Self {
            interface: interface.to_owned(),
            control,
            configured: HashSet::new(),
            socket,
            stop_proxy,
            _handle: handle,
        })
    }

    fn request(&self, body: &str) -> Result<String, WgError> {
        let mut control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        control.request(body, &self.interface)
    }
}

impl Drop for UserspaceWireGuard {
    fn drop(&mut self) {
        self.stop_proxy.store(true, Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Serves `get` requests of `wg(8)` on the standard socket; refuses `set` with EPERM.
fn serve_read_only(
    socket: &PathBuf,
    control: Arc<Mutex<ControlChannel>>,
    stop: Arc<AtomicBool>,
    interface: &str,
) -> std::io::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket file left by a crashed agent: nobody serves it.
    if socket.exists() && UnixStream::connect(socket).is_err() {
        let _ = std::fs::remove_file(socket);
    }
    let listener = UnixListener::bind(socket)?;
    listener.set_nonblocking(true)?;
    let name = interface.to_owned();
    std::thread::Builder::new()
        .name(format!("wg-uapi-{interface}"))
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        let _ = client.set_read_timeout(Some(Duration::from_secs(2)));
                        let _ = client.set_write_timeout(Some(Duration::from_secs(2)));
                        answer(client, &control, &name);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        })?;
    Ok(())
}

fn answer(client: UnixStream, control: &Mutex<ControlChannel>, name: &str) {
    let mut reader = BufReader::new(&client);
    let mut first = String::new();
    if reader.read_line(&mut first).is_err() {
        return;
    }
    let mut writer = &client;
    match first.trim() {
        "get=1" => {
            // The lock is released before writing: a client that stops reading must not hold
            // up the agent's own requests.
            let answer = control
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .request("get=1\n\n", name);
            let _ = match answer {
                Ok(body) => write!(writer, "{body}errno=0\n\n"),
                Err(_) => write!(writer, "errno=5\n\n"),
            };
        }
        "set=1" => {
            tracing::warn!(interface = %name, "refused a change through the WireGuard control socket: the agent owns this device");
            let _ = write!(writer, "errno=1\n\n");
        }
        _ => {
            let _ = write!(writer, "errno=22\n\n");
        }
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
        self.request(&uapi::set_device(settings)).map(|_| ())
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
        self.request(&uapi::set_peer(peer, exists, endpoint))?;
        self.configured.insert(peer.public_key);
        Ok(())
    }

    fn remove_peer(&mut self, public_key: &Key) -> Result<(), WgError> {
        self.request(&uapi::remove_peer(public_key))?;
        self.configured.remove(public_key);
        Ok(())
    }

    fn updates_in_place(&self) -> bool {
        false
    }

    fn peers(&mut self) -> Result<Vec<PeerState>, WgError> {
        let text = self.request("get=1\n\n")?;
        let peers = uapi::parse_get(&text).map_err(|message| WgError::Device {
            interface: self.interface.clone(),
            message: format!("unreadable status: {message}"),
        })?;
        self.configured = peers.iter().map(|p| p.public_key).collect();
        Ok(peers)
    }
}
