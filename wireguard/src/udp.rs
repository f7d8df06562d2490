//! The userspace device's UDP socket: one dual-stack socket (IPv4-only where the host has no
//! IPv6), marked with the WireGuard fwmark so its own packets bypass the mesh routes. It
//! receives batches through `quinn-udp` (UDP GRO: one call returns many datagrams) and sends
//! runs of equal-sized datagrams with one `sendmsg` (UDP GSO); where the kernel has no GSO, or a
//! destination refuses it (a path MTU below the datagram size), datagrams go one by one and
//! the kernel fragments them, as kernel WireGuard does.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg, setsockopt, sockopt};
use quinn_udp::{RecvMeta, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};

use super::wake::wait_writable;

/// Socket buffers large enough for a few 64 KiB batches in flight.
const SOCKET_BUFFER: usize = 4 << 20;
/// How long a send waits for room in a full socket buffer before the batch is dropped.
const SEND_WAIT: Duration = Duration::from_millis(200);
/// How long a destination that refused a GSO send gets datagrams one by one.
const GSO_RETRY: Duration = Duration::from_secs(60);
/// The largest UDP payload one GSO send may carry (the IP packet length field is 16 bits).
pub const MAX_GSO_BYTES: usize = 65_000;

pub struct UdpTransport {
    socket: Socket,
    state: UdpSocketState,
    dual_stack: bool,
    port: u16,
    /// What the kernel supports (probed by quinn-udp when the socket was made).
    max_segments: usize,
    /// Destinations a GSO send was refused for (e.g. a path MTU below the datagram size), and
    /// since when: they get datagrams one by one for a while, then GSO is tried again.
    unsegmented: Mutex<HashMap<SocketAddr, Instant>>,
}

impl UdpTransport {
    /// Binds the WireGuard port on all addresses.
    pub fn bind(port: u16, fwmark: u32) -> io::Result<Self> {
        let (socket, dual_stack) = match bind_dual_stack(port) {
            Ok(socket) => (socket, true),
            Err(v6_error) => match bind_v4(port) {
                Ok(socket) => {
                    tracing::info!(port, error = %v6_error, "IPv6 unavailable; WireGuard listens on IPv4 only");
                    (socket, false)
                }
                Err(e) => return Err(e),
            },
        };
        socket.set_mark(fwmark)?;
        // As root the limits of net.core.[rw]mem_max do not apply; otherwise take what we get.
        force_buffer(&socket, true, SOCKET_BUFFER)
            .or_else(|_| socket.set_recv_buffer_size(SOCKET_BUFFER))
            .ok();
        force_buffer(&socket, false, SOCKET_BUFFER)
            .or_else(|_| socket.set_send_buffer_size(SOCKET_BUFFER))
            .ok();
        let state = UdpSocketState::new((&socket).into())?;
        // WireGuard lets the outer packet be fragmented rather than dropped on a path with a
        // small MTU (quinn-udp sets "don't fragment" for QUIC's path MTU discovery).
        set_int(
            &socket,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DONT,
        )
        .ok();
        if dual_stack {
            set_int(
                &socket,
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IP_PMTUDISC_DONT,
            )
            .ok();
            setsockopt(&socket, sockopt::Ipv6DontFrag, &false).ok();
        }
        let port = socket
            .local_addr()?
            .as_socket()
            .map_or(port, |addr| addr.port());
        Ok(Self {
            max_segments: state.max_gso_segments().max(1),
            socket,
            state,
            dual_stack,
            port,
            unsegmented: Mutex::new(HashMap::new()),
        })
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Marks the socket's packets (so they bypass the mesh's own routes).
    pub fn set_mark(&self, fwmark: u32) -> io::Result<()> {
        self.socket.set_mark(fwmark)
    }

    fn unsegmented(&self, destination: &SocketAddr) -> bool {
        let mut refused = self.unsegmented.lock().unwrap_or_else(|p| p.into_inner());
        if refused.is_empty() {
            return false;
        }
        // A handful of entries at most; expired ones (and peers that moved away) go here.
        refused.retain(|_, since| since.elapsed() < GSO_RETRY);
        refused.contains_key(destination)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many equal-sized datagrams one send may carry.
    pub fn max_segments(&self) -> usize {
        self.max_segments
    }

    /// How many datagrams one receive buffer may hold.
    pub fn gro_segments(&self) -> usize {
        self.state.gro_segments().max(1)
    }

    /// Sends `contents` to `destination`: one datagram, or several of `segment` bytes each (the
    /// last may be shorter). Waits briefly when the socket buffer is full.
    pub fn send(
        &self,
        destination: SocketAddr,
        contents: &[u8],
        segment: Option<usize>,
    ) -> io::Result<()> {
        let destination = match destination {
            SocketAddr::V4(v4) if self.dual_stack => {
                SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
            }
            other => other,
        };
        let one_by_one = |contents: &[u8], size: usize| {
            contents
                .chunks(size)
                .try_for_each(|d| self.send_one(destination, d, None))
        };
        match segment {
            Some(size) if size < contents.len() => {
                if self.max_segments() == 1 || self.unsegmented(&destination) {
                    return one_by_one(contents, size);
                }
                match self.send_one(destination, contents, Some(size)) {
                    // Refused: datagrams larger than the route's MTU (EINVAL before Linux 6.14,
                    // EMSGSIZE since), or no checksum offload (EIO). The kernel fragments them
                    // only when they are sent one by one: resend this batch that way, and keep
                    // doing so for this destination for a while.
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EINVAL | libc::EMSGSIZE | libc::EIO)
                        ) =>
                    {
                        tracing::debug!(%destination, error = %e, "GSO send refused; sending datagram by datagram");
                        let mut refused =
                            self.unsegmented.lock().unwrap_or_else(|p| p.into_inner());
                        refused.retain(|_, since| since.elapsed() < GSO_RETRY);
                        refused.insert(destination, Instant::now());
                        drop(refused);
                        one_by_one(contents, size)
                    }
                    other => other,
                }
            }
            _ => self.send_one(destination, contents, None),
        }
    }

    fn send_one(
        &self,
        destination: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        let mut waited = false;
        loop {
            match send_segmented(&self.socket, destination, contents, segment_size) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && !waited => {
                    waited = true;
                    wait_writable(self.socket.as_fd(), SEND_WAIT)?;
                }
                other => return other,
            }
        }
    }

    /// Receives what is queued (non-blocking); `Ok(0)` when nothing is. Source addresses come
    /// back as IPv4 where they are IPv4-mapped.
    pub fn recv(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> io::Result<usize> {
        match self.state.recv((&self.socket).into(), bufs, meta) {
            Ok(n) => {
                for m in &mut meta[..n] {
                    // Only IPv4-mapped sources change: a native IPv6 source keeps its scope id
                    // (a link-local endpoint must stay bound to its interface).
                    if let IpAddr::V6(v6) = m.addr.ip()
                        && let Some(v4) = v6.to_ipv4_mapped()
                    {
                        m.addr = SocketAddr::new(v4.into(), m.addr.port());
                    }
                }
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }
}

/// One `sendmsg(2)`: `contents` as one datagram, or as datagrams of `segment` bytes (UDP GSO;
/// the last may be shorter). Our own rather than quinn-udp's, whose first refused GSO send
/// turns GSO off for the whole socket: here a refusal concerns one destination.
fn send_segmented(
    socket: &Socket,
    destination: SocketAddr,
    contents: &[u8],
    segment: Option<usize>,
) -> io::Result<()> {
    let address = SockaddrStorage::from(destination);
    let segment = match segment.filter(|&size| size < contents.len()) {
        Some(size) => {
            Some(u16::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?)
        }
        None => None,
    };
    let gso;
    let control: &[ControlMessage<'_>] = match &segment {
        Some(size) => {
            gso = [ControlMessage::UdpGsoSegments(size)];
            &gso
        }
        None => &[],
    };
    let contents = [IoSlice::new(contents)];
    loop {
        match sendmsg(
            socket.as_raw_fd(),
            &contents,
            control,
            MsgFlags::empty(),
            Some(&address),
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

fn bind_dual_stack(port: u16) -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_only_v6(false)?;
    socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    Ok(socket)
}

fn bind_v4(port: u16) -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
    Ok(socket)
}

/// An integer socket option nix has no type for (IP_MTU_DISCOVER, IPV6_MTU_DISCOVER).
fn set_int(
    socket: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a valid socket descriptor and a pointer to a live c_int of the stated length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets a socket buffer size past `net.core.[rw]mem_max` (needs CAP_NET_ADMIN).
fn force_buffer(socket: &Socket, receive: bool, bytes: usize) -> io::Result<()> {
    let result = if receive {
        setsockopt(socket, sockopt::RcvBufForce, &bytes)
    } else {
        setsockopt(socket, sockopt::SndBufForce, &bytes)
    };
    result.map_err(io::Error::from)
}
