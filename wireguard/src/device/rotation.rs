//! Key changes without a traffic gap. Changing a static key ends a WireGuard session (boringtun
//! clears a Tunn's sessions with its key), and until the other side knows the new key its
//! handshakes fail. So a peer's Tunn from before the change is kept as its [`Previous`]:
//!
//! - when this device rotates its own key, every peer gets a new Tunn under the new key, and
//!   the old one keeps its sessions and answers initiations sealed to the old key (mac1 is
//!   keyed by the responder's public key, so the receive thread knows which key a message is
//!   for before any DH);
//! - when a peer's key changes (the agent learned it through discovery), the new peer entry
//!   keeps the old entry's Tunn, whose session the other side still serves.
//!
//! Packets go out on the new Tunn once it has a session, on the previous one until then; both
//! decrypt what arrives for their receiver indexes. The previous Tunn is retired
//! [`SETTLE`] after the new one has a session, or at its deadline ([`Retirement`]).
//!
//! The decision is pure (time comes in as an argument) so it can be tested without a clock.

use std::time::{Duration, Instant};

use boringtun::noise::Tunn;

/// How long the previous session stays after the new one works: packets the other side sent
/// on the old session just before it switched are still decrypted.
pub(crate) const SETTLE: Duration = Duration::from_secs(5);

/// A peer's Tunn from before a key change.
pub(crate) struct Previous {
    pub(crate) tunn: Tunn,
    /// Its receiver index (the top 24 bits), still registered for the peer.
    pub(crate) index: u32,
    pub(crate) retirement: Retirement,
}

/// When a previous session goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Retirement {
    /// Retired at this time whatever happens (the other side never learned the key, or never
    /// answered).
    deadline: Instant,
    /// Since when the new Tunn has had a session.
    settled_since: Option<Instant>,
}

impl Retirement {
    pub(crate) fn new(now: Instant, grace: Duration) -> Self {
        Self {
            deadline: now + grace,
            settled_since: None,
        }
    }

    /// Whether to retire the previous session at `now`, given whether the new Tunn has a
    /// session. A new session that goes away again (it expired, the peer restarted) restarts
    /// the settling time.
    pub(crate) fn due(&mut self, now: Instant, new_has_session: bool) -> bool {
        if now >= self.deadline {
            return true;
        }
        if !new_has_session {
            self.settled_since = None;
            return false;
        }
        let since = *self.settled_since.get_or_insert(now);
        now.saturating_duration_since(since) >= SETTLE
    }

    #[cfg(test)]
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_previous_session_goes_after_the_new_one_settled() {
        let t0 = Instant::now();
        let mut retirement = Retirement::new(t0, 150 * S);
        // No new session yet: kept, however many checks.
        assert!(!retirement.due(t0, false));
        assert!(!retirement.due(t0 + 30 * S, false));
        // A new session: kept for SETTLE more, then retired.
        assert!(!retirement.due(t0 + 31 * S, true));
        assert!(!retirement.due(t0 + 31 * S + SETTLE - Duration::from_millis(1), true));
        assert!(retirement.due(t0 + 31 * S + SETTLE, true));
    }

    #[test]
    fn a_new_session_that_goes_away_restarts_the_settling() {
        let t0 = Instant::now();
        let mut retirement = Retirement::new(t0, 150 * S);
        assert!(!retirement.due(t0 + S, true));
        assert!(!retirement.due(t0 + 2 * S, false));
        // Settling counts again from here, not from t0 + 1 s.
        assert!(!retirement.due(t0 + 3 * S, true));
        assert!(!retirement.due(t0 + 3 * S + SETTLE - Duration::from_millis(1), true));
        assert!(retirement.due(t0 + 3 * S + SETTLE, true));
    }

    #[test]
    fn the_deadline_ends_the_grace_even_without_a_new_session_and_after_a_jump() {
        let t0 = Instant::now();
        let mut retirement = Retirement::new(t0, 150 * S);
        assert!(!retirement.due(t0 + 149 * S, false));
        assert!(retirement.due(t0 + 150 * S, false));
        // A late check (the timer thread was stalled, a suspended VM resumed): one step past
        // the deadline retires at once, settled or not.
        let mut late = Retirement::new(t0, 150 * S);
        assert!(late.due(t0 + 3_600 * S, true));
        assert_eq!(late.deadline(), t0 + 150 * S);
        // A check dated before the last one (times from two threads) changes nothing.
        let mut odd = Retirement::new(t0, 150 * S);
        assert!(!odd.due(t0 + 10 * S, true));
        assert!(!odd.due(t0 + 9 * S, true));
        assert!(odd.due(t0 + 10 * S + SETTLE, true));
    }
}
