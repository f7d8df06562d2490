//! The userspace backend: openspan's own WireGuard device ([`super::device`]) in the agent, on a
//! TUN interface.
//!
//! The agent configures the device directly; WireGuard's standard control socket
//! `/var/run/wireguard/<interface>.sock` is served read-only so `wg show` works, while changes
//! go only through the agent (a foreign `wg set` would fight the agent's reconciler). The
//! standalone device (`openspan-wireguard`) serves the socket writable, like wireguard-go.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use netlink_packet_route::link::LinkAttribute;
use rtnetlink::LinkUnspec;

use super::device::Device;
use super::uapi;
use super::wake::{Wake, wait_readable};
use super::worker::NetlinkWorker;
use super::{
    DeviceSettings, Key, PeerConfig, PeerState, RelayInjector, RelayLink, WgError, WireGuard,
};

pub struct UserspaceWireGuard {
    interface: String,
    device: Arc<Device>,
    socket: PathBuf,
    stop_control: Arc<Wake>,
    control: Option<JoinHandle<()>>,
}

impl UserspaceWireGuard {
    /// Creates the TUN interface and starts the device, with a read-only control socket.
    pub fn create(interface: &str) -> Result<Self, WgError> {
        Self::start(interface, Access::ReadOnly)
    }

    /// Creates the TUN interface and starts the device, configured through its control socket
    /// with `wg(8)`; fails when the socket cannot be served.
    pub fn create_standalone(interface: &str) -> Result<Self, WgError> {
        Self::start(interface, Access::ReadWrite)
    }

    fn start(interface: &str, access: Access) -> Result<Self, WgError> {
        let device = Arc::new(Device::create(interface)?);
        let limited = device
            .if_index()
            .and_then(|index| limit_gso_segments(interface, index, device.max_tun_segments()));
        if let Err(e) = limited {
            tracing::warn!(interface, error = %e, "cannot cap TCP super-packets at what the device splits; flows with a very small MSS may stall");
        }
        let socket = uapi::socket_path(interface);
        let stop_control = Arc::new(Wake::new()?);
        let served = serve_control(
            &socket,
            Arc::downgrade(&device),
            stop_control.clone(),
            interface,
            access,
        );
        let control = match served {
            Ok(thread) => Some(thread),
            Err(e) if access == Access::ReadWrite => {
                return Err(WgError::Device {
                    interface: interface.to_owned(),
                    message: format!("cannot serve the control socket {} ({e})", socket.display()),
                });
            }
            Err(e) => {
                tracing::warn!(socket = %socket.display(), error = %e, "`wg show` will not see this interface");
                None
            }
        };
        Ok(Self {
            interface: interface.to_owned(),
            device,
            socket,
            stop_control,
            control,
        })
    }
}

impl Drop for UserspaceWireGuard {
    fn drop(&mut self) {
        // The control thread only holds a weak reference: once it is gone, the device (and the
        // interface and port) go with this value, not later.
        self.stop_control.notify();
        if let Some(thread) = self.control.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Tells the kernel how many segments one TCP super-packet to this interface may hold (its
/// default is 65,535): the device splits at most that many per read, and a flow with a tiny MSS
/// would otherwise build super-packets it has to drop.
fn limit_gso_segments(interface: &str, index: u32, segments: u32) -> Result<(), WgError> {
    let name = interface.to_owned();
    NetlinkWorker::once(interface, move |sockets| async move {
        let handle = sockets.route;
        let mut message = LinkUnspec::new_with_index(index).build();
        message.attributes.push(LinkAttribute::GsoMaxSegs(segments));
        handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(|e| WgError::Device {
                interface: name.clone(),
                message: format!("cannot set gso_max_segs {segments}: {e}"),
            })
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    /// `get` only; `set` is refused with EPERM.
    ReadOnly,
    ReadWrite,
}

/// Serves `wg(8)` requests on the standard control socket.
fn serve_control(
    socket: &PathBuf,
    device: Weak<Device>,
    stop: Arc<Wake>,
    interface: &str,
    access: Access,
) -> std::io::Result<JoinHandle<()>> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket file left by a crashed agent: nobody serves it.
    if socket.exists() && UnixStream::connect(socket).is_err() {
        let _ = std::fs::remove_file(socket);
    }
    let listener = UnixListener::bind(socket)?;
    // `get` shows the private key: root only.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    let name = interface.to_owned();
    let thread = std::thread::Builder::new()
        .name(format!("wg-{interface}-uapi"))
        .spawn(move || {
            // Sleeps until a client connects or the device stops (no timed polling).
            while let Ok([_, false]) = wait_readable([listener.as_fd(), stop.fd()], None) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        let _ = client.set_read_timeout(Some(Duration::from_secs(2)));
                        let _ = client.set_write_timeout(Some(Duration::from_secs(2)));
                        let Some(device) = device.upgrade() else {
                            return;
                        };
                        answer(client, &device, &name, access);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        })?;
    Ok(thread)
}

/// Answers one request; the connection is closed after it (as `wg(8)` expects).
fn answer(client: UnixStream, device: &Device, name: &str, access: Access) {
    let mut reader = BufReader::new(&client);
    let mut first = String::new();
    if reader.read_line(&mut first).is_err() {
        return;
    }
    let mut writer = &client;
    let _ = match first.trim() {
        "get=1" => write!(writer, "{}errno=0\n\n", device.uapi_get()),
        "set=1" => {
            let mut body = String::new();
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if line.trim().is_empty() => break,
                    Ok(_) => body += &line,
                }
            }
            let errno = set(device, name, access, &body);
            write!(writer, "errno={errno}\n\n")
        }
        _ => write!(writer, "errno=22\n\n"),
    };
}

/// Applies a `set` request; returns the errno to answer (0 on success).
fn set(device: &Device, name: &str, access: Access, body: &str) -> i32 {
    if access == Access::ReadOnly {
        tracing::warn!(interface = %name, "refused a change through the WireGuard control socket: the agent owns this device");
        return libc::EPERM;
    }
    match uapi::parse_set(body)
        .map_err(|e| (libc::EINVAL, e))
        .and_then(|request| {
            device
                .apply(&request)
                .map_err(|e| (libc::EIO, e.to_string()))
        }) {
        Ok(()) => 0,
        Err((errno, message)) => {
            tracing::warn!(interface = %name, error = %message, "refused a change through the WireGuard control socket");
            errno
        }
    }
}

impl WireGuard for UserspaceWireGuard {
    fn interface(&self) -> &str {
        &self.interface
    }

    fn describe(&self) -> String {
        format!(
            "userspace (openspan device; {}) on {}",
            self.device.offloads(),
            self.interface
        )
    }

    fn configure(&mut self, settings: &DeviceSettings) -> Result<(), WgError> {
        self.device.configure(settings)
    }

    fn set_peer(&mut self, peer: &PeerConfig, reset_session: bool) -> Result<(), WgError> {
        self.device.set_peer(peer, reset_session)
    }

    fn rotate_key(&mut self, settings: &DeviceSettings, grace: Duration) -> Result<bool, WgError> {
        self.device.rotate_private_key(&settings.private_key, grace);
        self.device.listen(settings.listen_port, settings.fwmark)?;
        Ok(true)
    }

    fn replace_peer(
        &mut self,
        old_key: &Key,
        peer: &PeerConfig,
        grace: Duration,
    ) -> Result<(), WgError> {
        self.device.replace_peer(old_key, peer, grace)
    }

    fn remove_peer(&mut self, public_key: &Key) -> Result<(), WgError> {
        self.device.remove_peer(public_key);
        Ok(())
    }

    fn updates_in_place(&self) -> bool {
        true
    }

    fn initiates_on_reset(&self) -> bool {
        true
    }

    fn peers(&mut self) -> Result<Vec<PeerState>, WgError> {
        Ok(self.device.peers())
    }

    fn races_endpoints(&self) -> bool {
        true
    }

    fn race(&mut self, public_key: &Key, candidates: &[SocketAddr]) -> Result<bool, WgError> {
        Ok(self.device.race(public_key, candidates))
    }

    fn probe(&mut self, public_key: &Key) -> Result<bool, WgError> {
        Ok(self.device.probe(public_key))
    }

    fn send_stun(&mut self, destination: SocketAddr, message: &[u8]) -> bool {
        self.device.send_stun(destination, message)
    }

    fn take_stun(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        self.device.take_stun()
    }

    fn attach_relay(&mut self, link: std::sync::Arc<dyn RelayLink>) -> Option<RelayInjector> {
        Some(self.device.attach_relay(link))
    }

    fn decrypt_failures(&self) -> Option<u64> {
        Some(self.device.decrypt_failures())
    }
}
