//! Blocking waits the device can interrupt: an eventfd to wake a thread, and `poll(2)` over a
//! few descriptors.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};

/// An eventfd that wakes a thread blocked in [`wait_readable`].
pub(crate) struct Wake(EventFd);

impl Wake {
    pub(crate) fn new() -> io::Result<Self> {
        let flags = EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC;
        Ok(Self(EventFd::from_value_and_flags(0, flags)?))
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    pub(crate) fn notify(&self) {
        // Fails only when the counter is at its maximum: a wake-up is pending anyway.
        let _ = self.0.write(1);
    }

    pub(crate) fn clear(&self) {
        // Non-blocking: EAGAIN when nothing was pending.
        let _ = self.0.read();
    }
}

/// Blocks until one of `fds` is readable or `timeout` passes; returns which are readable.
pub(crate) fn wait_readable<const N: usize>(
    fds: [BorrowedFd<'_>; N],
    timeout: Option<Duration>,
) -> io::Result<[bool; N]> {
    wait_for(fds, PollFlags::POLLIN, timeout)
}

/// Blocks until `fd` has room to write or `timeout` passes; returns whether it has.
pub(crate) fn wait_writable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    wait_for([fd], PollFlags::POLLOUT, Some(timeout)).map(|[ready]| ready)
}

/// `poll(2)` for `events` on each of `fds`; a signal interrupting it counts as nothing ready.
fn wait_for<const N: usize>(
    fds: [BorrowedFd<'_>; N],
    events: PollFlags,
    timeout: Option<Duration>,
) -> io::Result<[bool; N]> {
    let mut polled = fds.map(|fd| PollFd::new(fd, events));
    let timeout = timeout.map_or(PollTimeout::NONE, |t| {
        PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX)
    });
    match poll(&mut polled, timeout) {
        Ok(_) => Ok(polled.map(|p| p.revents().is_some_and(|r| r.intersects(events)))),
        Err(Errno::EINTR) => Ok([false; N]),
        Err(e) => Err(e.into()),
    }
}
