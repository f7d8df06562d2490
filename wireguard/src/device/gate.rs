//! WireGuard's under-load behaviour for handshake messages, decided before any Diffie-Hellman:
//! while the device sees more handshakes than [`HANDSHAKE_RATE_LIMIT`] a second (and for a
//! second after), a handshake must carry a valid mac2 — proof that its sender receives at its
//! address, earned with a cookie reply — and each source address gets at most
//! [`PER_SOURCE_RATE`] answers (cookie replies or handshakes) a second with a burst of
//! [`PER_SOURCE_BURST`], as the kernel's ratelimiter allows. A flood from a few addresses then
//! costs one table lookup per datagram, and nothing it sends is answered more than 25 times.
//!
//! The parts are pure (time comes in as an argument) so they can be tested without a clock.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::TunnResult;

use super::Keys;

/// Handshake messages per second the device answers without demanding cookies (boringtun's
/// device default).
pub(super) const HANDSHAKE_RATE_LIMIT: u32 = 100;
/// How long the device stays under load after the rate was last exceeded (as the kernel).
const LOAD_LINGER: Duration = Duration::from_secs(1);
const LOAD_WINDOW: Duration = Duration::from_secs(1);
/// The kernel's ratelimiter: 20 handshake answers a second per source, bursts of 5.
pub(super) const PER_SOURCE_RATE: u64 = 20;
pub(super) const PER_SOURCE_BURST: u64 = 5;
const TOKEN_COST: u64 = 1_000_000_000 / PER_SOURCE_RATE;
const TOKEN_MAX: u64 = TOKEN_COST * PER_SOURCE_BURST;
/// Sources remembered at most; a source unseen for a second has a full bucket again and is
/// forgotten when room is needed.
const MAX_SOURCES: usize = 4_096;
const SOURCE_IDLE: Duration = Duration::from_secs(1);

/// Counts handshake messages in one-second windows and says whether the device is under load.
#[derive(Debug)]
pub(super) struct LoadMeter {
    limit: u32,
    window_start: Option<Instant>,
    count: u32,
    under_load_until: Option<Instant>,
}

impl LoadMeter {
    pub(super) fn new(limit: u32) -> Self {
        Self {
            limit,
            window_start: None,
            count: 0,
            under_load_until: None,
        }
    }

    pub(super) fn under_load(&self, now: Instant) -> bool {
        self.under_load_until.is_some_and(|until| now < until)
    }

    /// Counts one handshake message seen at `now`; returns whether the device is under load.
    pub(super) fn record(&mut self, now: Instant) -> bool {
        if self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= LOAD_WINDOW)
        {
            self.window_start = Some(now);
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        if self.count > self.limit {
            self.under_load_until = Some(now + LOAD_LINGER);
        }
        self.under_load(now)
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Nanoseconds of credit; an answer costs [`TOKEN_COST`].
    tokens: u64,
    last: Instant,
}

/// Token buckets per source address (IPv6 per /64, as the kernel: one host has a whole /64).
#[derive(Debug, Default)]
pub(super) struct SourceLimiter {
    buckets: HashMap<IpAddr, Bucket>,
}

fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

impl SourceLimiter {
    /// Whether `ip` may have one more answer at `now`.
    pub(super) fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        let key = source_key(ip);
        if let Some(bucket) = self.buckets.get_mut(&key) {
            let earned = now.saturating_duration_since(bucket.last).as_nanos();
            bucket.tokens = u64::try_from(earned)
                .unwrap_or(u64::MAX)
                .saturating_add(bucket.tokens)
                .min(TOKEN_MAX);
            bucket.last = now;
            if bucket.tokens < TOKEN_COST {
                return false;
            }
            bucket.tokens -= TOKEN_COST;
            return true;
        }
        if self.buckets.len() >= MAX_SOURCES {
            self.buckets
                .retain(|_, bucket| now.saturating_duration_since(bucket.last) < SOURCE_IDLE);
            if self.buckets.len() >= MAX_SOURCES {
                // Spread over more addresses than the table holds: new ones wait their turn.
                return false;
            }
        }
        self.buckets.insert(
            key,
            Bucket {
                tokens: TOKEN_MAX - TOKEN_COST,
                last: now,
            },
        );
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.len()
    }
}

/// What to do with a handshake datagram.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Admission {
    /// Do the handshake (DH and all).
    Process,
    /// Answer with the cookie reply of this length, written to the reply buffer.
    CookieReply(usize),
    /// Drop it: bad mac1, or over its source's limit while under load.
    Drop,
}

/// The receive thread's handshake gate: load meter and per-source limits.
#[derive(Debug)]
pub(super) struct HandshakeGate {
    load: LoadMeter,
    sources: SourceLimiter,
}

impl HandshakeGate {
    /// A gate that demands cookies above `limit` handshake messages a second.
    pub(super) fn new(limit: u32) -> Self {
        Self {
            load: LoadMeter::new(limit),
            sources: SourceLimiter::default(),
        }
    }

    /// Demands cookies above `limit` handshake messages a second from now on (the device sizes
    /// it by its peer count: a whole cluster starting at once is not an attack).
    pub(super) fn set_limit(&mut self, limit: u64) {
        self.load.limit = u32::try_from(limit).unwrap_or(u32::MAX);
    }

    /// Decides about a handshake message (initiation or response) from `from` at `now`.
    pub(super) fn admit(
        &mut self,
        keys: &Keys,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        reply: &mut [u8],
    ) -> Admission {
        // Under load the source's limit comes first: the flood's datagrams cost a lookup, not
        // a BLAKE2s. Otherwise only messages with a valid mac1 count toward the load.
        if !self.load.under_load(now) && !sealed_to_us(keys, from, datagram, reply) {
            return Admission::Drop;
        }
        if !self.load.record(now) {
            return Admission::Process;
        }
        if !self.sources.allow(from.ip(), now) {
            return Admission::Drop;
        }
        // `cookies` is always under load: it checks mac1 and mac2 and answers a missing or
        // stale mac2 with a cookie reply, never with a DH.
        // During a rotation's grace, a message sealed to the previous key gets its cookie from
        // that key's limiter (the cookie reply is sealed with the key the sender used).
        let previous = keys.previous.as_ref().filter(|previous| {
            keys.unlimited
                .verify_packet(Some(from.ip()), datagram, reply)
                .is_err()
                && previous
                    .unlimited
                    .verify_packet(Some(from.ip()), datagram, reply)
                    .is_ok()
        });
        let cookies = previous.map_or(&keys.cookies, |previous| &previous.cookies);
        match cookies.verify_packet(Some(from.ip()), datagram, reply) {
            Ok(_) => Admission::Process,
            Err(TunnResult::WriteToNetwork(cookie)) => Admission::CookieReply(cookie.len()),
            Err(_) => Admission::Drop,
        }
    }
}

/// Whether a handshake message carries a valid mac1 for our key, or during a rotation's grace
/// for the previous one.
fn sealed_to_us(keys: &Keys, from: SocketAddr, datagram: &[u8], reply: &mut [u8]) -> bool {
    keys.unlimited
        .verify_packet(Some(from.ip()), datagram, reply)
        .is_ok()
        || keys.previous.as_ref().is_some_and(|previous| {
            previous
                .unlimited
                .verify_packet(Some(from.ip()), datagram, reply)
                .is_ok()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_device_is_under_load_above_the_rate_and_for_a_second_after() {
        let start = Instant::now();
        let mut meter = LoadMeter::new(3);
        for n in 0..3 {
            assert!(!meter.record(start + n * MS), "under load at message {n}");
        }
        assert!(
            meter.record(start + 3 * MS),
            "the fourth in a second is over"
        );
        // A new window: the count starts over, but the load lingers for a second.
        assert!(meter.record(start + 1_001 * MS));
        assert!(meter.under_load(start + 1_002 * MS));
        assert!(!meter.under_load(start + 1_004 * MS));
        assert!(!meter.record(start + 1_004 * MS));
    }

    #[test]
    fn a_source_gets_a_burst_then_its_rate() {
        let start = Instant::now();
        let mut sources = SourceLimiter::default();
        let flooder: IpAddr = "198.51.100.7".parse().unwrap();
        let other: IpAddr = "192.0.2.1".parse().unwrap();
        let allowed = (0..100).filter(|_| sources.allow(flooder, start)).count();
        assert_eq!(allowed as u64, PER_SOURCE_BURST);
        // Another source is not affected.
        assert!(sources.allow(other, start));
        // One more answer every 50 ms.
        assert!(!sources.allow(flooder, start + 49 * MS));
        assert!(sources.allow(flooder, start + 50 * MS));
        assert!(!sources.allow(flooder, start + 51 * MS));
        // Over a second: 20 more, not more.
        let later = start + 2 * Duration::from_secs(1);
        let in_a_second = (0..1_000)
            .filter(|&n| sources.allow(flooder, later + n * MS))
            .count();
        assert!(
            (20..=25).contains(&in_a_second),
            "{in_a_second} in a second"
        );
    }

    #[test]
    fn ipv6_sources_share_their_64_and_mapped_ipv4_is_ipv4() {
        let now = Instant::now();
        let mut sources = SourceLimiter::default();
        for host in 1..=PER_SOURCE_BURST {
            let ip: IpAddr = format!("2001:db8::{host}").parse().unwrap();
            assert!(sources.allow(ip, now));
        }
        assert!(!sources.allow("2001:db8::ffff".parse().unwrap(), now));
        assert!(sources.allow("2001:db8:0:1::1".parse().unwrap(), now));
        assert_eq!(
            source_key("::ffff:192.0.2.1".parse().unwrap()),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn the_source_table_is_bounded_and_forgets_idle_sources() {
        let start = Instant::now();
        let mut sources = SourceLimiter::default();
        let address = |n: usize| IpAddr::from([10, (n >> 16) as u8, (n >> 8) as u8, n as u8]);
        for n in 0..MAX_SOURCES {
            assert!(sources.allow(address(n), start));
        }
        assert!(
            !sources.allow(address(MAX_SOURCES), start),
            "over the table"
        );
        assert_eq!(sources.len(), MAX_SOURCES);
        // A second later the idle ones make room.
        assert!(sources.allow(address(MAX_SOURCES), start + SOURCE_IDLE));
        assert_eq!(sources.len(), 1);
    }
}
