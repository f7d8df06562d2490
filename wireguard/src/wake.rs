//! Blocking waits the device can interrupt: an eventfd to wake a thread, and `poll(2)` over a
//! few descriptors.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// An eventfd that wakes a thread blocked in [`wait_readable`].
pub(crate) struct Wake(OwnedFd);

impl Wake {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: eventfd returns a new descriptor we own, or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh, valid descriptor nobody else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    pub(crate) fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        let _ = unsafe { libc::write(self.fd(), (&one as *const u64).cast(), 8) };
    }

    pub(crate) fn clear(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our (non-blocking) eventfd.
        let _ = unsafe { libc::read(self.fd(), (&mut value as *mut u64).cast(), 8) };
    }
}

/// Blocks until one of `fds` is readable or `timeout` passes; returns which are readable.
pub(crate) fn wait_readable<const N: usize>(
    fds: &[RawFd; N],
    timeout: Option<Duration>,
) -> io::Result<[bool; N]> {
    wait_for(fds, libc::POLLIN, timeout)
}

/// Blocks until `fd` has room to write or `timeout` passes; returns whether it has.
pub(crate) fn wait_writable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    wait_for(&[fd], libc::POLLOUT, Some(timeout)).map(|[ready]| ready)
}

/// `poll(2)` for `events` on each of `fds`; a signal interrupting it counts as nothing ready.
fn wait_for<const N: usize>(
    fds: &[RawFd; N],
    events: libc::c_short,
    timeout: Option<Duration>,
) -> io::Result<[bool; N]> {
    let mut polled = fds.map(|fd| libc::pollfd {
        fd,
        events,
        revents: 0,
    });
    let millis = timeout.map_or(-1, |t| {
        libc::c_int::try_from(t.as_millis()).unwrap_or(libc::c_int::MAX)
    });
    // SAFETY: N valid pollfd entries for the duration of the call.
    let rc = unsafe { libc::poll(polled.as_mut_ptr(), N as libc::nfds_t, millis) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok([false; N])
        } else {
            Err(e)
        };
    }
    Ok(polled.map(|p| p.revents & events != 0))
}
