//! The discovery client's decisions about this node's own record, as pure functions of what the
//! service shows, what was published and the (monotonic) time:
//! - [`check_own`]: is the record the service holds for this node still ours?
//! - [`PublishPlan`]: when to publish next (on change, on refresh, after a failure with backoff,
//!   after tampering with a bounded back-off), and whether the record must be cleared first;
//! - [`WarnLimiter`]: log unreadable records once each, at a bounded rate, in bounded memory.
//!
//! The discovery API has no credential but the cluster id, so anyone who knows it can replace,
//! delete or stuff this node's record. Such a record never opens with the cluster's keys (or is an
//! old one of ours), so peers ignore it, and this node restores its own.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::crypto::ClusterKeys;
use crate::discovery::Backoff;
use crate::record::SealedAffiliate;

/// Delay before re-publishing after tampering was seen: short, so that several watch messages of
/// one change lead to one publish, and well within the 1 s promise.
pub const REPUBLISH_DELAY: Duration = Duration::from_millis(200);
/// Tampering this many times in a row (each within [`TAMPER_QUIET`] of the previous) starts the
/// back-off: someone keeps doing it, and racing them at full speed only loads the service.
pub const TAMPER_STREAK_BEFORE_BACKOFF: u32 = 5;
/// The back-off doubles from 1 s up to this.
pub const TAMPER_MAX_DELAY: Duration = Duration::from_secs(60);
/// A streak ends after this long without tampering.
pub const TAMPER_QUIET: Duration = Duration::from_secs(120);
/// This many endpoints under this node's id that do not open with the cluster's keys mean
/// someone is filling the list (the reference limit is 64): the record is deleted and published
/// again, which clears them.
pub const FOREIGN_ENDPOINTS_CLEAR: usize = 16;
/// A record replaced by this node less than this long ago is still accepted as an echo (until
/// the echo of the new one arrives); the echo of its own delete is expected that long.
pub const ECHO_GRACE: Duration = Duration::from_secs(10);
/// Restoring a deleted or replaced record is one cheap update: however often it happens, it is
/// restored within this (the back-off applies in full only to clearing a stuffed list).
pub const RESTORE_MAX_DELAY: Duration = Duration::from_secs(1);

/// What the service holds for this node, compared with what it published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnRecord {
    /// As published (possibly with endpoints other nodes observed for it).
    Intact,
    /// Deleted (by someone else: this node deletes its record only when leaving).
    Deleted,
    /// The data is not this node's current record: garbage, another record, or an old one.
    DataReplaced,
    /// One of this node's endpoints is missing.
    EndpointsMissing,
    /// Many endpoints that do not open with the cluster's keys: the list is being filled.
    EndpointsStuffed,
}

impl OwnRecord {
    pub fn as_str(self) -> &'static str {
        match self {
            OwnRecord::Intact => "intact",
            OwnRecord::Deleted => "deleted",
            OwnRecord::DataReplaced => "data replaced",
            OwnRecord::EndpointsMissing => "endpoints missing",
            OwnRecord::EndpointsStuffed => "endpoint list stuffed",
        }
    }
}

/// What this node published: the current record, and the one before it with when it was replaced
/// (its echo may still arrive on the watch stream after the new one was sent).
#[derive(Clone, Debug, Default)]
pub struct Published {
    pub current: Option<SealedAffiliate>,
    previous: Option<(Bytes, Instant)>,
}

impl Published {
    pub fn set(&mut self, next: SealedAffiliate, now: Instant) {
        if let Some(current) = self.current.take()
            && current.data != next.data
        {
            self.previous = Some((current.data, now));
        }
        self.current = Some(next);
    }

    /// `data` is this node's current record, or its previous one shortly after a change and
    /// before the current one's echo (echoes arrive in order: after it, the previous one can
    /// only be a replay).
    fn is_ours(&mut self, data: &[u8], now: Instant) -> bool {
        if self.current.as_ref().is_some_and(|c| c.data == data) {
            self.previous = None;
            return true;
        }
        self.previous.as_ref().is_some_and(|(previous, replaced)| {
            previous == data && now.saturating_duration_since(*replaced) < ECHO_GRACE
        })
    }
}

/// The verdict on this node's record, with the number of endpoints under its id that do not
/// open (someone else's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnVerdict {
    pub record: OwnRecord,
    pub foreign: usize,
}

/// Judges the record the service shows for this node (`None`: deleted).
pub fn check_own(
    keys: &ClusterKeys,
    node_id: &str,
    published: &mut Published,
    seen: Option<(&[u8], &[Bytes])>,
    now: Instant,
) -> OwnVerdict {
    let verdict = |record, foreign| OwnVerdict { record, foreign };
    if published.current.is_none() {
        return verdict(OwnRecord::Intact, 0);
    }
    let Some((data, endpoints)) = seen else {
        return verdict(OwnRecord::Deleted, 0);
    };
    let foreign = endpoints
        .iter()
        .filter(|blob| keys.open_endpoint(node_id, blob).is_err())
        .count();
    if !published.is_ours(data, now) {
        return verdict(OwnRecord::DataReplaced, foreign);
    }
    if foreign >= FOREIGN_ENDPOINTS_CLEAR {
        return verdict(OwnRecord::EndpointsStuffed, foreign);
    }
    let missing = published
        .current
        .as_ref()
        .is_some_and(|current| current.endpoints.iter().any(|e| !endpoints.contains(e)));
    if missing {
        return verdict(OwnRecord::EndpointsMissing, foreign);
    }
    verdict(OwnRecord::Intact, foreign)
}

/// Counts tampering and says how long to wait before restoring the record.
#[derive(Clone, Debug, Default)]
pub struct TamperGuard {
    streak: u32,
    last: Option<Instant>,
}

/// The guard's answer to one tampering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TamperResponse {
    pub delay: Duration,
    /// The back-off starts with this event: say so (once per streak).
    pub backing_off: bool,
}

impl TamperGuard {
    pub fn tampered(&mut self, now: Instant) -> TamperResponse {
        let continues = self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < TAMPER_QUIET);
        self.streak = if continues {
            self.streak.saturating_add(1)
        } else {
            1
        };
        self.last = Some(now);
        if self.streak <= TAMPER_STREAK_BEFORE_BACKOFF {
            return TamperResponse {
                delay: REPUBLISH_DELAY,
                backing_off: false,
            };
        }
        let doublings = (self.streak - TAMPER_STREAK_BEFORE_BACKOFF - 1).min(16);
        TamperResponse {
            delay: Duration::from_secs(1u64 << doublings).min(TAMPER_MAX_DELAY),
            backing_off: self.streak == TAMPER_STREAK_BEFORE_BACKOFF + 1,
        }
    }

    /// Tampering in a row, for status.
    pub fn streak(&self) -> u32 {
        self.streak
    }
}

/// What the client should do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishStep {
    /// Nothing before this time (`None`: nothing scheduled).
    Wait(Option<Instant>),
    /// Publish the record; delete it first when `clear_first`.
    Publish { clear_first: bool },
}

/// When to publish this node's record. Publishing never ends the watch: a refused update is
/// retried on its own schedule.
#[derive(Clone, Debug)]
pub struct PublishPlan {
    due: Option<Instant>,
    clear_first: bool,
    failures: u32,
    backoff: Backoff,
    pub tamper: TamperGuard,
}

impl PublishPlan {
    pub fn new(backoff: Backoff) -> Self {
        Self {
            due: None,
            clear_first: false,
            failures: 0,
            backoff,
            tamper: TamperGuard::default(),
        }
    }

    fn at(&mut self, when: Instant) {
        self.due = Some(self.due.map_or(when, |due| due.min(when)));
    }

    /// The record changed or is due for its refresh: publish now.
    pub fn publish_now(&mut self, now: Instant) {
        self.at(now);
    }

    /// The service shows something else than this node's record. `None` when there is nothing
    /// to restore, or when a publish already due covers it (the echo of a change being made is
    /// not counted twice).
    pub fn own_record_seen(&mut self, verdict: OwnRecord, now: Instant) -> Option<TamperResponse> {
        if verdict == OwnRecord::Intact {
            return None;
        }
        if verdict == OwnRecord::EndpointsStuffed {
            self.clear_first = true;
        }
        if self.due.is_some_and(|due| due <= now + REPUBLISH_DELAY) {
            return None;
        }
        let mut response = self.tamper.tampered(now);
        if verdict != OwnRecord::EndpointsStuffed {
            response.delay = response.delay.min(RESTORE_MAX_DELAY);
        }
        self.at(now + response.delay);
        Some(response)
    }

    /// The service refused this node's endpoints (its list is full) but took the data.
    pub fn endpoints_refused(&mut self, now: Instant) -> TamperResponse {
        self.failures = 0;
        self.clear_first = true;
        let response = self.tamper.tampered(now);
        self.due = Some(now + response.delay);
        response
    }

    pub fn step(&mut self, now: Instant) -> PublishStep {
        match self.due {
            Some(due) if due <= now => PublishStep::Publish {
                clear_first: self.clear_first,
            },
            due => PublishStep::Wait(due),
        }
    }

    pub fn succeeded(&mut self) {
        self.due = None;
        self.clear_first = false;
        self.failures = 0;
    }

    /// A failed publish is retried after a jittered back-off (`unit` in [0, 1)).
    pub fn failed(&mut self, now: Instant, unit: f64) -> Duration {
        let delay = self.backoff.delay(self.failures, unit);
        self.failures = self.failures.saturating_add(1);
        self.due = Some(now + delay);
        delay
    }
}

/// Logs each unreadable record once, at most one line per `interval` (with the number left
/// out), remembering at most `capacity` records.
#[derive(Debug)]
pub struct WarnLimiter {
    seen: HashSet<(String, u64)>,
    capacity: usize,
    interval: Duration,
    last_line: Option<Instant>,
    suppressed: u64,
}

/// What the caller should log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Warn {
    /// Nothing: already reported, or over the rate (counted).
    Quiet,
    /// Log this one, mentioning `suppressed` others since the last line.
    Log { suppressed: u64 },
}

impl WarnLimiter {
    pub fn new(capacity: usize, interval: Duration) -> Self {
        Self {
            seen: HashSet::new(),
            capacity,
            interval,
            last_line: None,
            suppressed: 0,
        }
    }

    pub fn unreadable(&mut self, affiliate: &str, blob_hash: u64, now: Instant) -> Warn {
        let key = (affiliate.to_owned(), blob_hash);
        if self.seen.contains(&key) {
            return Warn::Quiet;
        }
        if self.seen.len() >= self.capacity {
            // Forgetting everything at once is cheap and bounded; the cost is one more line per
            // record still around.
            self.seen.clear();
        }
        self.seen.insert(key);
        if self
            .last_line
            .is_some_and(|last| now.saturating_duration_since(last) < self.interval)
        {
            self.suppressed += 1;
            return Warn::Quiet;
        }
        self.last_line = Some(now);
        Warn::Log {
            suppressed: std::mem::take(&mut self.suppressed),
        }
    }

    pub fn remembered(&self) -> usize {
        self.seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Cipher;
    use crate::model::AffiliateRecord;
    use crate::record;

    fn keys() -> ClusterKeys {
        ClusterKeys::new(Cipher::Native, "cluster", &[7; 32])
    }

    fn sealed(keys: &ClusterKeys, port: u16) -> SealedAffiliate {
        record::seal(
            keys,
            &AffiliateRecord {
                node_id: "me".into(),
                endpoints: vec![format!("10.0.0.1:{port}").parse().unwrap()],
                ..AffiliateRecord::default()
            },
        )
    }

    #[test]
    fn own_record_verdicts() {
        let keys = keys();
        let t = Instant::now();
        let mine = sealed(&keys, 51820);
        let mut published = Published::default();
        published.set(mine.clone(), t);
        let check = |published: &mut Published, data: &[u8], endpoints: &[Bytes], at| {
            check_own(&keys, "me", published, Some((data, endpoints)), at).record
        };
        assert_eq!(
            check(&mut published, &mine.data, &mine.endpoints, t),
            OwnRecord::Intact
        );
        assert_eq!(
            check_own(&keys, "me", &mut published, None, t).record,
            OwnRecord::Deleted
        );
        assert_eq!(
            check(&mut published, b"garbage", &mine.endpoints, t),
            OwnRecord::DataReplaced
        );
        assert_eq!(
            check(&mut published, &mine.data, &[], t),
            OwnRecord::EndpointsMissing
        );
        // Another node's observation of this node (sealed with the cluster keys) is fine; a few
        // garbage endpoints are ignored (but counted); many mean the list is being filled.
        let mut endpoints = mine.endpoints.clone();
        endpoints.push(Bytes::from(
            keys.seal_endpoint("me", "203.0.113.1:4000".parse().unwrap()),
        ));
        endpoints.extend((0..FOREIGN_ENDPOINTS_CLEAR - 1).map(|i| Bytes::from(vec![i as u8; 20])));
        let verdict = check_own(
            &keys,
            "me",
            &mut published,
            Some((&mine.data, &endpoints)),
            t,
        );
        assert_eq!(
            verdict,
            OwnVerdict {
                record: OwnRecord::Intact,
                foreign: FOREIGN_ENDPOINTS_CLEAR - 1
            }
        );
        endpoints.push(Bytes::from_static(b"one more garbage"));
        assert_eq!(
            check(&mut published, &mine.data, &endpoints, t),
            OwnRecord::EndpointsStuffed
        );
        // Nothing published yet: nothing to defend.
        assert_eq!(
            check_own(&keys, "me", &mut Published::default(), None, t).record,
            OwnRecord::Intact
        );
    }

    #[test]
    fn the_previous_record_is_an_echo_only_until_the_current_ones_echo() {
        let keys = keys();
        let t = Instant::now();
        let (old, new) = (sealed(&keys, 51820), sealed(&keys, 51821));
        let check = |published: &mut Published, record: &SealedAffiliate, at| {
            check_own(
                &keys,
                "me",
                published,
                Some((&record.data, &new.endpoints)),
                at,
            )
            .record
        };
        let mut published = Published::default();
        published.set(old.clone(), t);
        published.set(new.clone(), t);
        let soon = t + Duration::from_secs(1);
        assert_eq!(
            check(&mut published, &old, soon),
            OwnRecord::Intact,
            "late echo"
        );
        assert_eq!(check(&mut published, &new, soon), OwnRecord::Intact);
        assert_eq!(
            check(&mut published, &old, soon),
            OwnRecord::DataReplaced,
            "after the new record's echo, the old one is a replay"
        );
        // Without the new echo, the old one is accepted only for a while.
        let mut published = Published::default();
        published.set(old.clone(), t);
        published.set(new.clone(), t);
        assert_eq!(
            check(&mut published, &old, t + ECHO_GRACE),
            OwnRecord::DataReplaced
        );
    }

    #[test]
    fn tampering_is_answered_at_once_then_with_a_bounded_back_off() {
        let mut guard = TamperGuard::default();
        let t0 = Instant::now();
        let mut t = t0;
        for _ in 0..TAMPER_STREAK_BEFORE_BACKOFF {
            let r = guard.tampered(t);
            assert_eq!(r.delay, REPUBLISH_DELAY);
            assert!(!r.backing_off);
            t += Duration::from_secs(1);
        }
        let r = guard.tampered(t);
        assert_eq!(r.delay, Duration::from_secs(1));
        assert!(r.backing_off, "the first back-off is announced");
        let delays: Vec<_> = (0..10)
            .map(|_| {
                t += Duration::from_secs(1);
                guard.tampered(t)
            })
            .collect();
        assert!(delays.iter().all(|r| !r.backing_off), "announced once");
        assert_eq!(delays[0].delay, Duration::from_secs(2));
        assert_eq!(delays.last().unwrap().delay, TAMPER_MAX_DELAY);
        // Quiet for a while: the next one is answered at once again.
        t += TAMPER_QUIET;
        assert_eq!(guard.tampered(t).delay, REPUBLISH_DELAY);
        assert_eq!(guard.streak(), 1);
    }

    #[test]
    fn publish_plan_schedules_retries_without_ending_anything() {
        let t = Instant::now();
        let mut plan = PublishPlan::new(Backoff {
            jitter: 0.0,
            ..Backoff::default()
        });
        assert_eq!(plan.step(t), PublishStep::Wait(None));
        plan.publish_now(t);
        assert_eq!(plan.step(t), PublishStep::Publish { clear_first: false });
        assert_eq!(plan.failed(t, 0.5), Duration::from_millis(500));
        assert_eq!(
            plan.step(t),
            PublishStep::Wait(Some(t + Duration::from_millis(500)))
        );
        assert_eq!(plan.failed(t, 0.5), Duration::from_millis(750));
        // A change does not wait for the back-off.
        plan.publish_now(t);
        assert_eq!(plan.step(t), PublishStep::Publish { clear_first: false });
        plan.succeeded();
        assert_eq!(
            plan.step(t + Duration::from_secs(100)),
            PublishStep::Wait(None)
        );
        // Endpoints refused (list full): clear first, within the re-publish delay.
        plan.endpoints_refused(t);
        assert_eq!(plan.step(t), PublishStep::Wait(Some(t + REPUBLISH_DELAY)));
        assert_eq!(
            plan.step(t + REPUBLISH_DELAY),
            PublishStep::Publish { clear_first: true }
        );
        plan.succeeded();
        // A deleted record is restored within the delay, without clearing.
        assert!(plan.own_record_seen(OwnRecord::Intact, t).is_none());
        assert!(plan.own_record_seen(OwnRecord::Deleted, t).is_some());
        // Its echo while the restore is due is not counted again.
        assert!(plan.own_record_seen(OwnRecord::Deleted, t).is_none());
        assert_eq!(
            plan.step(t + REPUBLISH_DELAY),
            PublishStep::Publish { clear_first: false }
        );
    }

    #[test]
    fn restoring_a_deleted_record_is_never_delayed_beyond_a_second() {
        let mut plan = PublishPlan::new(Backoff::default());
        let mut t = Instant::now();
        let mut stuffed_delay = Duration::ZERO;
        for i in 0..20 {
            let verdict = if i % 2 == 0 {
                OwnRecord::Deleted
            } else {
                OwnRecord::EndpointsStuffed
            };
            let response = plan.own_record_seen(verdict, t).expect("counted");
            if verdict == OwnRecord::Deleted {
                assert!(response.delay <= RESTORE_MAX_DELAY, "{i}: {response:?}");
            } else {
                stuffed_delay = response.delay;
            }
            plan.succeeded();
            t += Duration::from_secs(2);
        }
        assert!(
            stuffed_delay > RESTORE_MAX_DELAY,
            "clearing backs off: {stuffed_delay:?}"
        );
    }

    #[test]
    fn a_late_wake_up_finds_the_publish_overdue() {
        // Monotonic time only moves forward; after a suspended VM resumes the publish is simply
        // overdue.
        let t = Instant::now();
        let mut plan = PublishPlan::new(Backoff::default());
        plan.own_record_seen(OwnRecord::DataReplaced, t);
        assert_eq!(
            plan.step(t + Duration::from_secs(3600)),
            PublishStep::Publish { clear_first: false }
        );
    }

    #[test]
    fn warnings_are_once_each_rate_limited_and_bounded() {
        let mut limiter = WarnLimiter::new(4, Duration::from_secs(10));
        let t = Instant::now();
        assert_eq!(limiter.unreadable("a", 1, t), Warn::Log { suppressed: 0 });
        assert_eq!(limiter.unreadable("a", 1, t), Warn::Quiet, "once each");
        assert_eq!(limiter.unreadable("b", 1, t), Warn::Quiet, "rate-limited");
        assert_eq!(limiter.unreadable("c", 1, t), Warn::Quiet);
        assert_eq!(
            limiter.unreadable("d", 1, t + Duration::from_secs(10)),
            Warn::Log { suppressed: 2 }
        );
        for i in 0..1000 {
            limiter.unreadable("flood", i, t + Duration::from_secs(11));
        }
        assert!(limiter.remembered() <= 4);
    }
}
