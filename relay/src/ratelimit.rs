//! Token buckets with time as an argument (no clock inside, so tests are exact).

use std::time::{Duration, Instant};

/// `rate` units per second with bursts of up to `burst` units. A rate of 0 means unlimited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

impl Rate {
    pub const UNLIMITED: Rate = Rate {
        per_second: 0.0,
        burst: 0.0,
    };

    pub fn is_unlimited(&self) -> bool {
        self.per_second <= 0.0
    }
}

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: Rate,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// Starts full: a fresh client may burst at once.
    pub fn new(rate: Rate, now: Instant) -> Self {
        Self {
            rate,
            tokens: rate.burst,
            last: now,
        }
    }

    /// Takes `cost` units if they are there; `false` means drop.
    pub fn allow(&mut self, cost: f64, now: Instant) -> bool {
        if self.rate.is_unlimited() {
            return true;
        }
        // A clock that went backwards (it should not with Instant) refills nothing.
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now.max(self.last);
        self.tokens =
            (self.tokens + elapsed.as_secs_f64() * self.rate.per_second).min(self.rate.burst);
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }

    /// When `cost` units will be there (for tests and diagnostics).
    pub fn wait_for(&self, cost: f64) -> Duration {
        if self.rate.is_unlimited() || self.tokens >= cost {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((cost - self.tokens) / self.rate.per_second)
    }
}

/// A client's two buckets: packets per second and bytes per second. A packet must pass both;
/// a packet refused by the byte bucket does not spend a packet token.
#[derive(Debug, Clone)]
pub struct ClientLimiter {
    packets: TokenBucket,
    bytes: TokenBucket,
}

/// Why a packet was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    PacketRate,
    ByteRate,
}

impl ClientLimiter {
    pub fn new(packets: Rate, bytes: Rate, now: Instant) -> Self {
        Self {
            packets: TokenBucket::new(packets, now),
            bytes: TokenBucket::new(bytes, now),
        }
    }

    pub fn check(&mut self, len: usize, now: Instant) -> Result<(), Refusal> {
        if !self.bytes.allow(len as f64, now) {
            return Err(Refusal::ByteRate);
        }
        if !self.packets.allow(1.0, now) {
            // Give the bytes back so only one bucket pays for a refusal.
            self.bytes.tokens = (self.bytes.tokens + len as f64).min(self.bytes.rate.burst);
            return Err(Refusal::PacketRate);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_bursts_then_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(
            Rate {
                per_second: 10.0,
                burst: 5.0,
            },
            t0,
        );
        assert_eq!((0..8).filter(|_| bucket.allow(1.0, t0)).count(), 5);
        assert_eq!(bucket.wait_for(1.0), Duration::from_millis(100));
        assert!(!bucket.allow(1.0, t0 + Duration::from_millis(50)));
        assert!(bucket.allow(1.0, t0 + Duration::from_millis(100)));
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| bucket.allow(1.0, later)).count(), 5);
    }

    #[test]
    fn unlimited_always_allows() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(Rate::UNLIMITED, t0);
        assert!((0..10_000).all(|_| bucket.allow(1500.0, t0)));
    }

    #[test]
    fn client_limiter_checks_bytes_and_packets() {
        let t0 = Instant::now();
        let mut limiter = ClientLimiter::new(
            Rate {
                per_second: 100.0,
                burst: 3.0,
            },
            Rate {
                per_second: 1000.0,
                burst: 2000.0,
            },
            t0,
        );
        assert_eq!(limiter.check(1500, t0), Ok(()));
        assert_eq!(limiter.check(1500, t0), Err(Refusal::ByteRate));
        assert_eq!(limiter.check(100, t0), Ok(()));
        assert_eq!(limiter.check(100, t0), Ok(()));
        assert_eq!(limiter.check(100, t0), Err(Refusal::PacketRate));
        // The refused packet did not spend bytes: 300 of 2000 left after 1500 + 2 × 100.
        assert_eq!(limiter.check(300, t0 + Duration::from_millis(10)), Ok(()));
    }
}
