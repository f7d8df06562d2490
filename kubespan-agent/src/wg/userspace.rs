//! The userspace backend: openspan's own WireGuard device ([`super::device`]) in the agent, on a
//! TUN interface.
//!
//! The agent configures the device directly; WireGuard's standard control socket
//! `/var/run/wireguard/<interface>.sock` is served read-only so `wg show` works, while changes
//! go only through the agent (a foreign `wg set` would fight the agent's reconciler).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::device::Device;
use super::uapi;
use super::{DeviceSettings, Key, PeerConfig, PeerState, WgError, WireGuard};

pub struct UserspaceWireGuard {
    interface: String,
    device: Arc<Device>,
    socket: PathBuf,
    stop_control: Arc<AtomicBool>,
}

impl UserspaceWireGuard {
    /// Creates the TUN interface and starts the device.
    pub fn create(interface: &str) -> Result<Self, WgError> {
        let device = Arc::new(Device::create(interface)?);
        let socket = uapi::socket_path(interface);
        let stop_control = Arc::new(AtomicBool::new(false));
        if let Err(e) = serve_read_only(&socket, device.clone(), stop_control.clone(), interface) {
            tracing::warn!(socket = %socket.display(), error = %e, "`wg show` will not see this interface");
        }
        Ok(Self {
            interface: interface.to_owned(),
            device,
            socket,
            stop_control,
        })
    }
}

impl Drop for UserspaceWireGuard {
    fn drop(&mut self) {
        self.stop_control.store(true, Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Serves `get` requests of `wg(8)` on the standard socket; refuses `set` with EPERM.
fn serve_read_only(
    socket: &PathBuf,
    device: Arc<Device>,
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
        .name(format!("wg-{interface}-uapi"))
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        let _ = client.set_read_timeout(Some(Duration::from_secs(2)));
                        let _ = client.set_write_timeout(Some(Duration::from_secs(2)));
                        answer(client, &device, &name);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        })?;
    Ok(())
}

fn answer(client: UnixStream, device: &Device, name: &str) {
    let mut reader = BufReader::new(&client);
    let mut first = String::new();
    if reader.read_line(&mut first).is_err() {
        return;
    }
    let mut writer = &client;
    let _ = match first.trim() {
        "get=1" => write!(writer, "{}errno=0\n\n", device.uapi_get()),
        "set=1" => {
            tracing::warn!(interface = %name, "refused a change through the WireGuard control socket: the agent owns this device");
            write!(writer, "errno=1\n\n")
        }
        _ => write!(writer, "errno=22\n\n"),
    };
}

impl WireGuard for UserspaceWireGuard {
    fn interface(&self) -> &str {
        &self.interface
    }

    fn describe(&self) -> String {
        format!(
            "userspace (openspan device, boringtun noise) on {}",
            self.interface
        )
    }

    fn configure(&mut self, settings: &DeviceSettings) -> Result<(), WgError> {
        self.device.configure(settings)
    }

    fn set_peer(&mut self, peer: &PeerConfig, reset_session: bool) -> Result<(), WgError> {
        self.device.set_peer(peer, reset_session)
    }

    fn remove_peer(&mut self, public_key: &Key) -> Result<(), WgError> {
        self.device.remove_peer(public_key);
        Ok(())
    }

    fn updates_in_place(&self) -> bool {
        true
    }

    fn peers(&mut self) -> Result<Vec<PeerState>, WgError> {
        Ok(self.device.peers())
    }
}
