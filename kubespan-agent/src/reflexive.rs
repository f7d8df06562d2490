//! This node's reflexive endpoint: the `ip:port` its NAT maps the WireGuard socket to, as STUN
//! servers see it. Binding requests go out from the WireGuard socket itself (the userspace
//! device hands the answers back), every 20–30 s and when this node's addresses change; three
//! tries a second apart per round, for loss.
//!
//! Pure state: the data plane sends what [`StunProber::due`] returns and feeds answers to
//! [`StunProber::answer`].
//!
//! Two servers that see different mappings mean the NAT maps per destination ("hard", endpoint
//! dependent): a reflexive endpoint would then be useless to peers, so none is announced and
//! the status says why.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use openspan_stun::{TransactionId, binding_request, parse_binding_response};

/// Between rounds: at least this, plus up to [`ROUND_JITTER`] (NAT mappings last 30 s or more
/// on common routers; Tailscale re-discovers every 20–26 s).
pub const ROUND_INTERVAL: Duration = Duration::from_secs(20);
pub const ROUND_JITTER: Duration = Duration::from_secs(10);
/// A request unanswered this long is sent again, [`TRIES`] times per round.
const RETRY_AFTER: Duration = Duration::from_secs(1);
const TRIES: u32 = 3;
/// An answer older than this (three rounds missed) no longer counts.
const FRESH_FOR: Duration = Duration::from_secs(90);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// No server answered (yet).
    Unknown,
    /// Every server that answered saw this.
    Reflexive(SocketAddr),
    /// Servers saw different mappings: the NAT maps per destination.
    EndpointDependent(Vec<SocketAddr>),
}

#[derive(Debug)]
struct Pending {
    transaction: TransactionId,
    server: SocketAddr,
    sent: Instant,
    tries: u32,
}

#[derive(Debug)]
pub struct StunProber {
    pending: Vec<Pending>,
    /// Per server: the mapping it saw, and when.
    seen: BTreeMap<SocketAddr, (SocketAddr, Instant)>,
    next_round: Option<Instant>,
}

impl Default for StunProber {
    fn default() -> Self {
        Self::new()
    }
}

impl StunProber {
    pub fn new() -> Self {
        Self {
            pending: Vec::new(),
            seen: BTreeMap::new(),
            next_round: None,
        }
    }

    /// Whether a round is due (the caller then resolves the servers and calls [`Self::start_round`]).
    pub fn round_due(&self, now: Instant) -> bool {
        self.next_round.is_none_or(|at| now >= at)
    }

    /// A new round at once (this node's addresses changed).
    pub fn trigger(&mut self) {
        self.next_round = None;
    }

    /// Starts a round over `servers`; `jitter` in [0, 1) spreads rounds; `transaction` makes
    /// a fresh random id per request. Returns the requests to send.
    pub fn start_round(
        &mut self,
        servers: &[SocketAddr],
        now: Instant,
        jitter: f64,
        mut transaction: impl FnMut() -> TransactionId,
    ) -> Vec<(SocketAddr, [u8; 20])> {
        self.next_round = Some(now + ROUND_INTERVAL + ROUND_JITTER.mul_f64(jitter.clamp(0.0, 1.0)));
        self.pending.clear();
        servers
            .iter()
            .map(|server| {
                let id = transaction();
                self.pending.push(Pending {
                    transaction: id,
                    server: *server,
                    sent: now,
                    tries: 1,
                });
                (*server, binding_request(&id))
            })
            .collect()
    }

    /// Retries due at `now` (the same transaction, as RFC 8489 retransmits).
    pub fn retries(&mut self, now: Instant) -> Vec<(SocketAddr, [u8; 20])> {
        let mut out = Vec::new();
        self.pending.retain_mut(|p| {
            if now.saturating_duration_since(p.sent) < RETRY_AFTER {
                return true;
            }
            if p.tries >= TRIES {
                return false;
            }
            p.tries += 1;
            p.sent = now;
            out.push((p.server, binding_request(&p.transaction)));
            true
        });
        out
    }

    /// Whether requests await answers (the caller polls faster meanwhile).
    pub fn waiting(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Takes a message that arrived on the WireGuard socket from `from`; returns whether the
    /// mapping changed. Anything that is not an answer to a pending request is ignored.
    pub fn answer(&mut self, from: SocketAddr, message: &[u8], now: Instant) -> bool {
        let Ok((transaction, mapped)) = parse_binding_response(message) else {
            return false;
        };
        let Some(index) = self
            .pending
            .iter()
            .position(|p| p.transaction == transaction && p.server == from)
        else {
            return false;
        };
        self.pending.swap_remove(index);
        let before = self.mapping(now);
        self.seen.insert(from, (mapped, now));
        self.mapping(now) != before
    }

    /// The mapping as the fresh answers tell it.
    pub fn mapping(&self, now: Instant) -> Mapping {
        self.mapping_of(Some(now))
    }

    /// The mapping from the answers fresh at `now` (all of them when `None`).
    fn mapping_of(&self, now: Option<Instant>) -> Mapping {
        let fresh: Vec<SocketAddr> = self
            .seen
            .values()
            .filter(|(_, at)| now.is_none_or(|now| now.saturating_duration_since(*at) < FRESH_FOR))
            .map(|(mapped, _)| *mapped)
            .collect();
        // One family decides: a dual-stack socket seen over IPv6 shows the node's own address,
        // which says nothing about the IPv4 NAT. IPv4 answers win when there are any.
        let v4 = fresh.iter().any(SocketAddr::is_ipv4);
        let mut distinct: Vec<SocketAddr> = Vec::new();
        for mapped in fresh.iter().filter(|m| m.is_ipv4() == v4) {
            if !distinct.contains(mapped) {
                distinct.push(*mapped);
            }
        }
        match distinct.as_slice() {
            [] => Mapping::Unknown,
            [one] => Mapping::Reflexive(*one),
            _ => Mapping::EndpointDependent(distinct),
        }
    }

    /// Drops answers that are no longer fresh; returns whether the mapping changed.
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.mapping_of(None);
        self.seen
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < FRESH_FOR);
        self.mapping(now) != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// What a STUN server answers to `request` from `mapped`.
    fn answer_to(request: &[u8], mapped: SocketAddr) -> Vec<u8> {
        let mut out = [0u8; 64];
        let len = openspan_stun::answer_binding_request(request, mapped, &mut out).unwrap();
        out[..len].to_vec()
    }

    fn ids() -> impl FnMut() -> TransactionId {
        let mut n = 0u8;
        move || {
            n += 1;
            [n; 12]
        }
    }

    #[test]
    fn a_round_learns_the_mapping_and_the_next_one_comes_20_to_30_s_later() {
        let t0 = Instant::now();
        let mut prober = StunProber::new();
        assert!(prober.round_due(t0));
        let server = sa("203.0.113.10:3478");
        let requests = prober.start_round(&[server], t0, 0.5, ids());
        assert_eq!(requests.len(), 1);
        assert!(prober.waiting());
        assert!(!prober.round_due(t0 + Duration::from_secs(24)));
        assert!(prober.round_due(t0 + Duration::from_secs(25)));
        let mapped = sa("198.51.100.7:61000");
        let reply = answer_to(&requests[0].1, mapped);
        // From another address: not an answer.
        assert!(!prober.answer(sa("192.0.2.1:3478"), &reply, t0));
        assert!(prober.answer(server, &reply, t0));
        assert!(!prober.waiting());
        assert_eq!(prober.mapping(t0), Mapping::Reflexive(mapped));
        // A replay changes nothing.
        assert!(!prober.answer(server, &reply, t0));
        // Stale after 90 s without a new answer.
        assert!(prober.expire(t0 + FRESH_FOR));
        assert_eq!(prober.mapping(t0 + FRESH_FOR), Mapping::Unknown);
    }

    #[test]
    fn an_unanswered_request_is_sent_three_times_a_second_apart() {
        let t0 = Instant::now();
        let mut prober = StunProber::new();
        let first = prober.start_round(&[sa("203.0.113.10:3478")], t0, 0.0, ids());
        assert!(prober.retries(t0 + Duration::from_millis(900)).is_empty());
        let again = prober.retries(t0 + Duration::from_secs(1));
        assert_eq!(again, first, "the same transaction");
        assert_eq!(prober.retries(t0 + Duration::from_secs(2)).len(), 1);
        assert!(prober.retries(t0 + Duration::from_secs(3)).is_empty());
        assert!(!prober.waiting(), "given up until the next round");
        assert!(prober.round_due(t0 + ROUND_INTERVAL));
    }

    #[test]
    fn two_servers_that_disagree_reveal_an_endpoint_dependent_nat() {
        let t0 = Instant::now();
        let mut prober = StunProber::new();
        let (a, b) = (sa("203.0.113.10:3478"), sa("203.0.113.11:3478"));
        let requests = prober.start_round(&[a, b], t0, 0.0, ids());
        prober.answer(a, &answer_to(&requests[0].1, sa("198.51.100.7:61000")), t0);
        prober.answer(b, &answer_to(&requests[1].1, sa("198.51.100.7:52111")), t0);
        assert!(matches!(prober.mapping(t0), Mapping::EndpointDependent(m) if m.len() == 2));
        // Agreeing servers: one reflexive endpoint.
        let mut prober = StunProber::new();
        let requests = prober.start_round(&[a, b], t0, 0.0, ids());
        let mapped = sa("198.51.100.7:61000");
        prober.answer(a, &answer_to(&requests[0].1, mapped), t0);
        prober.answer(b, &answer_to(&requests[1].1, mapped), t0);
        assert_eq!(prober.mapping(t0), Mapping::Reflexive(mapped));
    }

    #[test]
    fn an_ipv6_answer_does_not_make_a_dual_stack_node_look_endpoint_dependent() {
        let t0 = Instant::now();
        let mut prober = StunProber::new();
        let (v4, v6) = (sa("203.0.113.10:3478"), sa("[2001:db8::10]:3478"));
        let requests = prober.start_round(&[v4, v6], t0, 0.0, ids());
        let mapped = sa("198.51.100.7:61000");
        prober.answer(v4, &answer_to(&requests[0].1, mapped), t0);
        prober.answer(
            v6,
            &answer_to(&requests[1].1, sa("[2001:db8::77]:51820")),
            t0,
        );
        assert_eq!(prober.mapping(t0), Mapping::Reflexive(mapped));
    }

    #[test]
    fn garbage_is_ignored() {
        let t0 = Instant::now();
        let mut prober = StunProber::new();
        prober.start_round(&[sa("203.0.113.10:3478")], t0, 0.0, ids());
        assert!(!prober.answer(sa("203.0.113.10:3478"), &[1, 1, 0, 0], t0));
        assert!(!prober.answer(sa("203.0.113.10:3478"), &[0u8; 100], t0));
        assert!(prober.waiting());
    }
}
