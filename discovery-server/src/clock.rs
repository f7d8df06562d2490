//! Time as the server sees it, from an injectable clock with two faces, so expiry logic is
//! testable without sleeping and each face can be stepped on its own in tests:
//!
//! - **monotonic** milliseconds since an arbitrary origin, which only move forward. Every expiry
//!   instant in the store is on this clock, so an NTP correction, an operator's `date -s` or a VM
//!   resume that steps the wall clock neither expires nor extends any record.
//! - **wall** (Unix milliseconds), used only where a time must mean something outside this
//!   process: stamping a snapshot so the next process can estimate how long the server was down,
//!   and showing expiry times to people.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (wall clock; may jump either way).
pub type UnixMillis = i64;

/// Milliseconds on the server's monotonic clock; only differences between two readings of the
/// same clock in the same process mean anything.
pub type MonoMillis = i64;

pub trait Clock: Send + Sync + 'static {
    /// Never decreases.
    fn monotonic(&self) -> MonoMillis;
    /// The wall clock.
    fn wall(&self) -> UnixMillis;
    /// The host's boot clock, which spans restarts of this process but not of the host.
    fn boot(&self) -> Option<BootClock> {
        None
    }
}

/// Which boot of the host this is, and how long ago it started: unlike the wall clock, nobody
/// can step it, and unlike the process's monotonic clock, it means the same to the next process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootClock {
    pub boot_id: String,
    pub since_boot_ms: i64,
}

impl BootClock {
    /// Linux: the boot id and `/proc/uptime` (CLOCK_BOOTTIME, counting suspend). `None` where
    /// they cannot be read; callers fall back to the wall clock.
    pub fn read() -> Option<Self> {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
        let seconds: f64 = uptime.split_whitespace().next()?.parse().ok()?;
        let boot_id = boot_id.trim();
        (!boot_id.is_empty() && seconds.is_finite() && seconds >= 0.0).then(|| Self {
            boot_id: boot_id.to_owned(),
            since_boot_ms: (seconds * 1000.0) as i64,
        })
    }
}

/// The system clocks: [`Instant`] (CLOCK_MONOTONIC) and [`SystemTime`].
#[derive(Clone, Copy, Debug)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn monotonic(&self) -> MonoMillis {
        self.origin.elapsed().as_millis() as MonoMillis
    }

    fn wall(&self) -> UnixMillis {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as UnixMillis)
            .unwrap_or(0)
    }

    fn boot(&self) -> Option<BootClock> {
        BootClock::read()
    }
}

/// A clock that moves only when told to; for tests. The monotonic face starts at 0.
#[derive(Debug, Default)]
pub struct ManualClock {
    monotonic: AtomicI64,
    wall: AtomicI64,
}

impl ManualClock {
    /// A clock whose wall face reads `wall_start`.
    pub fn new(wall_start: UnixMillis) -> Self {
        Self {
            monotonic: AtomicI64::new(0),
            wall: AtomicI64::new(wall_start),
        }
    }

    /// Time passes: both faces move forward by `by`.
    pub fn advance(&self, by: std::time::Duration) {
        let ms = by.as_millis() as i64;
        self.monotonic.fetch_add(ms, Ordering::SeqCst);
        self.wall.fetch_add(ms, Ordering::SeqCst);
    }

    /// The wall clock is stepped (forward for positive `by_ms`, backward for negative) while no
    /// time passes: what NTP or an operator does.
    pub fn step_wall(&self, by_ms: i64) {
        self.wall.fetch_add(by_ms, Ordering::SeqCst);
    }

    /// Only the monotonic face moves (a wall clock held still, e.g. by a slewing NTP daemon).
    pub fn advance_monotonic(&self, by: std::time::Duration) {
        self.monotonic
            .fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn monotonic(&self) -> MonoMillis {
        self.monotonic.load(Ordering::SeqCst)
    }

    fn wall(&self) -> UnixMillis {
        self.wall.load(Ordering::SeqCst)
    }
}
