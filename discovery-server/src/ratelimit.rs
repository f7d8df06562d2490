//! Per-client-IP rate limiting: a token bucket per address, in the form of the generic cell
//! rate algorithm (one timestamp per address), with time passed in so it stays pure.
//!
//! A request over the rate is told how long to wait for its token; if that is past the time it
//! may wait (its deadline), it is refused at once and its token is not taken.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The key one client is limited under: the address itself for IPv4, its /64 for IPv6. A
/// single IPv6 host usually owns a whole /64 and could otherwise use a new address per request.
pub fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
        other => other,
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Sustained requests per second; 0 disables limiting.
    pub per_second: f64,
    /// Requests allowed at once on top of the sustained rate.
    pub burst: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            per_second: 15.0,
            burst: 60,
        }
    }
}

/// The verdict for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Serve it after waiting this long (zero: at once).
    After(Duration),
    /// It cannot be served within the time it may wait.
    Refused { retry_after: Duration },
}

#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    interval: Duration,
    tolerance: Duration,
    max_tracked: usize,
    /// Theoretical arrival time of the next request of each address.
    next_free: HashMap<IpAddr, Instant>,
    /// Shared by addresses that arrive while the table is full of active ones.
    overflow_next_free: Option<Instant>,
    /// When the table was last swept for idle addresses.
    last_sweep: Option<Instant>,
}

impl RateLimiter {
    /// `max_tracked` bounds the table; beyond it new addresses share one bucket.
    pub fn new(limit: RateLimit, max_tracked: usize) -> Self {
        let interval = if limit.per_second > 0.0 {
            Duration::from_secs_f64(1.0 / limit.per_second)
        } else {
            Duration::ZERO
        };
        Self {
            limit,
            interval,
            tolerance: interval * limit.burst.max(1),
            max_tracked: max_tracked.max(1),
            next_free: HashMap::new(),
            overflow_next_free: None,
            last_sweep: None,
        }
    }

    pub fn enabled(&self) -> bool {
        self.limit.per_second > 0.0
    }

    /// Decides on one request from `ip` at `now` that may wait at most `max_wait`.
    pub fn admit(&mut self, ip: IpAddr, now: Instant, max_wait: Option<Duration>) -> Admission {
        if !self.enabled() {
            return Admission::After(Duration::ZERO);
        }
        // A full table is swept for idle addresses at most once per interval: the sweep visits
        // every entry, and a flood of new addresses (spoofed UDP sources at the STUN responder)
        // must not cost that much per request. Newcomers meanwhile share the overflow bucket.
        if !self.next_free.contains_key(&ip)
            && self.next_free.len() >= self.max_tracked
            && self
                .last_sweep
                .is_none_or(|at| now.saturating_duration_since(at) >= self.interval)
        {
            self.forget_idle(now);
        }
        let (interval, tolerance) = (self.interval, self.tolerance);
        let slot = if self.next_free.len() < self.max_tracked || self.next_free.contains_key(&ip) {
            self.next_free.entry(ip).or_insert(now)
        } else {
            self.overflow_next_free.get_or_insert(now)
        };
        let next = (*slot).max(now) + interval;
        let wait = next.saturating_duration_since(now + tolerance);
        if max_wait.is_some_and(|max| wait > max) {
            return Admission::Refused { retry_after: wait };
        }
        *slot = next;
        Admission::After(wait)
    }

    /// Drops addresses whose bucket has refilled: they are indistinguishable from new ones.
    pub fn forget_idle(&mut self, now: Instant) {
        self.last_sweep = Some(now);
        self.next_free.retain(|_, next| *next > now);
        if self.overflow_next_free.is_some_and(|next| next <= now) {
            self.overflow_next_free = None;
        }
    }

    pub fn tracked(&self) -> usize {
        self.next_free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    fn limiter() -> RateLimiter {
        RateLimiter::new(
            RateLimit {
                per_second: 10.0,
                burst: 5,
            },
            100,
        )
    }

    #[test]
    fn burst_passes_then_requests_wait_one_interval_each() {
        let mut l = limiter();
        let t = Instant::now();
        for _ in 0..5 {
            assert_eq!(l.admit(A, t, None), Admission::After(Duration::ZERO));
        }
        assert_eq!(
            l.admit(A, t, None),
            Admission::After(Duration::from_millis(100))
        );
        assert_eq!(
            l.admit(A, t, None),
            Admission::After(Duration::from_millis(200))
        );
        // Another address has its own bucket.
        assert_eq!(l.admit(B, t, None), Admission::After(Duration::ZERO));
    }

    #[test]
    fn a_wait_past_the_deadline_is_refused_without_taking_a_token() {
        let mut l = limiter();
        let t = Instant::now();
        for _ in 0..5 {
            l.admit(A, t, None);
        }
        let refused = l.admit(A, t, Some(Duration::from_millis(50)));
        assert_eq!(
            refused,
            Admission::Refused {
                retry_after: Duration::from_millis(100)
            }
        );
        // The refused request took nothing: the next one still waits only one interval.
        assert_eq!(
            l.admit(A, t, Some(Duration::from_millis(150))),
            Admission::After(Duration::from_millis(100))
        );
    }

    #[test]
    fn tokens_refill_at_the_rate() {
        let mut l = limiter();
        let t = Instant::now();
        for _ in 0..5 {
            l.admit(A, t, None);
        }
        let later = t + Duration::from_millis(300);
        for _ in 0..3 {
            assert_eq!(
                l.admit(A, later, Some(Duration::ZERO)),
                Admission::After(Duration::ZERO)
            );
        }
        assert!(matches!(
            l.admit(A, later, Some(Duration::ZERO)),
            Admission::Refused { .. }
        ));
    }

    #[test]
    fn table_stays_bounded_under_many_addresses() {
        let mut l = RateLimiter::new(
            RateLimit {
                per_second: 1.0,
                burst: 1,
            },
            8,
        );
        let t = Instant::now();
        for i in 0..1000u32 {
            l.admit(IpAddr::V4(i.into()), t, None);
            assert!(l.tracked() <= 8);
        }
        // Newcomers beyond the bound share one bucket, so they are limited together.
        assert!(matches!(
            l.admit(IpAddr::V4(5000.into()), t, Some(Duration::ZERO)),
            Admission::Refused { .. }
        ));
        l.forget_idle(t + Duration::from_secs(5));
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn a_full_table_is_swept_at_most_once_per_interval() {
        let mut l = RateLimiter::new(
            RateLimit {
                per_second: 10.0,
                burst: 1,
            },
            2,
        );
        let t = Instant::now();
        let ms = Duration::from_millis;
        let ip = |i: u32| IpAddr::V4(i.into());
        l.admit(ip(1), t, None); // idle from t + 100 ms
        l.admit(ip(2), t + ms(50), None); // idle from t + 150 ms
        // Full: a newcomer sweeps (nothing is idle yet) and shares the overflow bucket.
        l.admit(ip(3), t + ms(50), None);
        assert_eq!(l.tracked(), 2);
        // 1 is idle now, but the last sweep was only 50 ms ago: no sweep, 1 stays.
        l.admit(ip(4), t + ms(100), None);
        assert_eq!(l.tracked(), 2);
        // A whole interval after the last sweep, both idle entries go and the newcomer is in.
        l.admit(ip(5), t + ms(150), None);
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn ipv6_clients_share_a_bucket_per_64() {
        let one: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let other: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let next_block: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(bucket(one), bucket(other));
        assert_ne!(bucket(one), bucket(next_block));
        assert_eq!(bucket(A), A);
        let mut l = limiter();
        let t = Instant::now();
        for _ in 0..5 {
            l.admit(bucket(one), t, None);
        }
        assert!(matches!(
            l.admit(bucket(other), t, Some(Duration::ZERO)),
            Admission::Refused { .. }
        ));
    }

    #[test]
    fn zero_rate_disables_limiting() {
        let mut l = RateLimiter::new(
            RateLimit {
                per_second: 0.0,
                burst: 0,
            },
            1,
        );
        let t = Instant::now();
        for _ in 0..1000 {
            assert_eq!(
                l.admit(A, t, Some(Duration::ZERO)),
                Admission::After(Duration::ZERO)
            );
        }
    }
}
