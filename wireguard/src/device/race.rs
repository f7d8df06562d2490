//! Endpoint racing: one handshake initiation sent to every candidate endpoint of a peer, most
//! promising first and the others a few milliseconds apart, so the best path that answers wins
//! the race. The first handshake response moves the peer to the address it came from (roaming),
//! which is the "lock onto the first that answers"; a second answer to the same initiation is a
//! replay and is ignored by the noise protocol, and a candidate that is a different WireGuard
//! node drops the initiation (its mac1 is sealed to this peer's key), so racing is safe.
//!
//! Pure state: the device's timer thread asks what is due and sends it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Between one rank and the next: the better path gets this head start. A LAN answers within
/// it; two paths across the internet may both be tried before either answers, and the faster
/// one wins, which is what racing is for.
pub(crate) const STAGGER: Duration = Duration::from_millis(20);
/// A race longer than this is over: by then boringtun retries the handshake on its own (every
/// 5 s, REKEY_TIMEOUT), and each retry goes to every candidate again while the race stands.
const RACE_LIFETIME: Duration = Duration::from_secs(20);
/// Endpoints announced per affiliate are at most 64 on the reference server; more is not raced.
pub(crate) const MAX_CANDIDATES: usize = 64;

#[derive(Clone, Debug, Default)]
pub(crate) struct Race {
    /// Candidates in the order of preference.
    candidates: Vec<SocketAddr>,
    /// The initiation every candidate gets.
    message: Vec<u8>,
    /// The next candidate (index into `candidates`) still to be sent the message.
    next: usize,
    started: Option<Instant>,
}

impl Race {
    /// Starts a race with `message` (a handshake initiation) over `candidates` (duplicates
    /// dropped, order kept); returns the first destination, to be sent at once.
    pub(crate) fn start(
        &mut self,
        candidates: &[SocketAddr],
        message: &[u8],
        now: Instant,
    ) -> Option<SocketAddr> {
        let mut unique: Vec<SocketAddr> = Vec::with_capacity(candidates.len());
        for candidate in candidates {
            if !unique.contains(candidate) && unique.len() < MAX_CANDIDATES {
                unique.push(*candidate);
            }
        }
        *self = Self {
            candidates: unique,
            message: message.to_vec(),
            next: 0,
            started: Some(now),
        };
        let first = self.candidates.first().copied();
        if first.is_some() {
            self.next = 1;
        }
        first
    }

    /// Whether the race still stands at `now`.
    pub(crate) fn is_running(&self, now: Instant) -> bool {
        self.started
            .is_some_and(|started| now.saturating_duration_since(started) < RACE_LIFETIME)
    }

    /// Ends the race (a handshake completed).
    pub(crate) fn finish(&mut self) {
        *self = Self::default();
    }

    /// When the race began, while it stands.
    pub(crate) fn started(&self) -> Option<Instant> {
        self.started
    }

    /// The candidates, while the race stands (where boringtun's retries go too).
    pub(crate) fn candidates(&self, now: Instant) -> &[SocketAddr] {
        if self.is_running(now) {
            &self.candidates
        } else {
            &[]
        }
    }

    /// When the next staggered send is due.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        let started = self.started?;
        (self.next < self.candidates.len()).then(|| started + STAGGER * self.next as u32)
    }

    /// The destinations due at `now` and the message to send them.
    pub(crate) fn due(&mut self, now: Instant) -> (Vec<SocketAddr>, &[u8]) {
        let mut out = Vec::new();
        while let Some(at) = self.next_due() {
            if at > now {
                break;
            }
            out.push(self.candidates[self.next]);
            self.next += 1;
        }
        (out, &self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_first_candidate_goes_at_once_and_the_rest_staggered_in_order() {
        let t0 = Instant::now();
        let mut race = Race::default();
        let candidates = [
            sa("10.0.0.1:1"),
            sa("10.0.0.2:2"),
            sa("10.0.0.1:1"),
            sa("[2001:db8::1]:3"),
        ];
        assert_eq!(race.start(&candidates, b"init", t0), Some(sa("10.0.0.1:1")));
        assert_eq!(race.next_due(), Some(t0 + STAGGER));
        assert!(race.due(t0).0.is_empty());
        let (due, message) = race.due(t0 + STAGGER);
        assert_eq!(
            (due, message.to_vec()),
            (vec![sa("10.0.0.2:2")], b"init".to_vec())
        );
        // A late tick sends everything that fell due, duplicates dropped.
        assert_eq!(race.due(t0 + STAGGER * 10).0, vec![sa("[2001:db8::1]:3")]);
        assert_eq!(race.next_due(), None);
        assert_eq!(race.candidates(t0).len(), 3);
    }

    #[test]
    fn a_race_ends_when_finished_or_after_its_lifetime() {
        let t0 = Instant::now();
        let mut race = Race::default();
        assert_eq!(race.start(&[], b"x", t0), None);
        assert_eq!(race.next_due(), None);
        race.start(&[sa("10.0.0.1:1"), sa("10.0.0.2:1")], b"x", t0);
        assert!(race.is_running(t0 + Duration::from_secs(19)));
        assert!(!race.is_running(t0 + RACE_LIFETIME));
        assert!(race.candidates(t0 + RACE_LIFETIME).is_empty());
        race.finish();
        assert!(!race.is_running(t0));
        assert_eq!(race.next_due(), None);
    }

    #[test]
    fn candidates_are_capped() {
        let t0 = Instant::now();
        let many: Vec<SocketAddr> = (0..200u16)
            .map(|p| SocketAddr::from(([10, 0, 0, 1], p + 1)))
            .collect();
        let mut race = Race::default();
        race.start(&many, b"x", t0);
        assert_eq!(race.candidates(t0).len(), MAX_CANDIDATES);
    }
}
