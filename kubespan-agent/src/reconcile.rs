//! The data plane's decisions as a pure function: from the peers discovery wants, what the
//! WireGuard device reports, what this agent remembers, and the time, to the device changes to
//! make and each peer's state.
//!
//! Peer state, faster than KubeSpan's (15–30 s per dead endpoint, 275 s to notice a dead peer):
//! - after the agent points a peer at an endpoint, it is `unknown` until a handshake answers;
//!   with no answer within `endpoint_timeout` it is `down` and the next endpoint is tried at once
//!   (list order, wrapping; the endpoint that last worked is tried first);
//! - an established peer is `up` while anything (handshake or data, keepalives included) arrived
//!   within `peer_down_after`, and `down` after that, which starts rotation again;
//! - an endpoint the peer roamed to (it reached us from elsewhere, e.g. through NAT) is kept.
//!
//! Time is monotonic ([`Instant`]): a wall clock step (VM resume, NTP fixing a bad clock) changes
//! nothing. The device reports handshakes in wall-clock time; only a *change* of that value is
//! used, stamped with the monotonic time at which it was noticed.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;

use crate::members::PeerSpec;
use crate::wg::{Key, PeerConfig, PeerState};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub endpoint_timeout: Duration,
    pub peer_down_after: Duration,
    pub keepalive: Duration,
    /// The device changes a peer's allowed IPs in place, keeping its session (kernel
    /// WireGuard, openspan's userspace device); otherwise the peer is re-created and a new
    /// handshake is needed.
    pub updates_in_place: bool,
    /// The device races a peer's endpoints (one initiation to all at once, first answer wins:
    /// openspan's userspace device); otherwise they are tried one by one, `endpoint_timeout`
    /// each (kernel WireGuard).
    pub races: bool,
}

impl Policy {
    /// How long an `up` peer may be silent before it is asked for an answer. Peers that run
    /// openspan send a keepalive every `keepalive`, so they are never asked; peers with a longer
    /// keepalive (Talos: 25 s) are, so that a live one is not taken for dead.
    pub fn probe_after(&self) -> Duration {
        (self.peer_down_after / 2).max(self.keepalive + Duration::from_secs(1))
    }
}

/// How often an `up` peer reached on a path other than its most promising candidate is raced
/// again, to move to a better path when one appeared (Tailscale's path upgrade: 1 min).
pub const PATH_UPGRADE: Duration = Duration::from_secs(60);
/// The same for a peer carried by a relay (its endpoint is the agent's loopback proxy): a
/// direct path is worth a handshake every 15 s.
pub const RELAYED_PATH_UPGRADE: Duration = Duration::from_secs(15);
/// When an unanswered first race is tried again.
pub const FIRST_RACE_RETRY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum State {
    #[default]
    Unknown,
    Up,
    Down,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Unknown => "unknown",
            State::Up => "up",
            State::Down => "down",
        }
    }
}

/// What the agent remembers about one peer between reconciles.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerMemory {
    /// The node this key belongs to: a node whose key changes is replaced, not removed.
    pub node_id: String,
    /// The endpoint the agent last configured.
    pub last_used_endpoint: Option<SocketAddr>,
    pub last_endpoint_change: Option<Instant>,
    /// When the received byte count last grew: the peer's last answer of any kind.
    pub last_rx_bytes: u64,
    pub last_rx_change: Option<Instant>,
    /// The device's last-handshake time as last read (wall clock, only compared for change).
    pub seen_handshake: Option<SystemTime>,
    /// When a new handshake was noticed.
    pub handshake_at: Option<Instant>,
    /// What was last written to the device (endpoint excluded), to detect changes.
    pub applied_allowed_ips: Vec<IpNet>,
    /// The pre-shared key and keepalive last written (a reload or a secret rotation changes
    /// them; the peer is updated in place).
    pub applied_psk: Option<Key>,
    pub applied_keepalive: Option<Duration>,
    pub state: State,
    /// The peer was re-configured while up (its session may have been reset): it stays `up`
    /// while the new handshake is awaited.
    pub refreshing: bool,
    /// The endpoints the last race covered: one the peer announces later starts a new race
    /// (when both nodes are behind NAT, that announcement is the signal to punch at once).
    pub raced_with: Vec<SocketAddr>,
    /// When a better path was last raced for while `up`.
    pub upgraded_at: Option<Instant>,
    /// Races since the last answer: the first is retried after [`FIRST_RACE_RETRY`] (an
    /// initiation that reached a peer whose device was not up yet is lost), later ones after
    /// the endpoint timeout.
    pub unanswered_races: u32,
    /// When the peer was last asked for an answer ([`Action::Probe`]).
    pub probed_at: Option<Instant>,
}

/// A device change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Create or update a peer; `config.endpoint` None keeps the device's endpoint.
    SetPeer {
        config: PeerConfig,
        reset_session: bool,
    },
    RemovePeer {
        public_key: Key,
    },
    /// The same node under a new key (it rotated its key): the device replaces the old peer by
    /// the new one, keeping the old session until the new key has one where it can.
    ReplacePeer {
        old_public_key: Key,
        config: PeerConfig,
    },
    /// Send a handshake initiation to all of `candidates` at once, best first.
    Race {
        public_key: Key,
        candidates: Vec<SocketAddr>,
    },
    /// Ask a quiet peer for an answer.
    Probe {
        public_key: Key,
    },
}

/// One peer's status after a reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerReport {
    pub public_key: Key,
    pub state: State,
    pub endpoint: Option<SocketAddr>,
    /// As the device reports it (wall clock), for display.
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub last_endpoint_change: Option<Instant>,
    /// Something (handshake or data) arrived from the peer within `peer_down_after`: its tunnel
    /// is alive, whatever discovery says.
    pub alive: bool,
}

/// A peer wanted by discovery, with its key decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantedPeer {
    pub public_key: Key,
    pub spec: PeerSpec,
}

pub struct Outcome {
    pub actions: Vec<Action>,
    pub reports: Vec<PeerReport>,
}

fn normalized(ips: &[IpNet]) -> Vec<IpNet> {
    IpNet::aggregate(&ips.to_vec())
}

fn next_endpoint(endpoints: &[SocketAddr], last_used: Option<SocketAddr>) -> Option<SocketAddr> {
    if endpoints.is_empty() {
        return None;
    }
    let index = last_used
        .and_then(|used| endpoints.iter().position(|e| *e == used))
        .map_or(0, |i| (i + 1) % endpoints.len());
    Some(endpoints[index])
}

/// A change of the device's wall-clock handshake time smaller than this is read jitter or clock
/// slewing, not a handshake (handshakes are at least seconds apart).
const HANDSHAKE_CHANGE: Duration = Duration::from_secs(1);

/// How early the userspace device may date a handshake (boringtun stamps it with the time of
/// its last timer tick, every 250 ms).
const HANDSHAKE_STAMP_GRAIN: Duration = Duration::from_millis(300);

/// When a new handshake happened, if the device shows one since the last read: its monotonic
/// age when the device has one (a wall-clock step moves `last_handshake` but not the age), else
/// now (kernel WireGuard stores the wall time once, so only a real handshake changes it).
fn new_handshake(
    last: Option<SystemTime>,
    seen: Option<SystemTime>,
    age: Option<Duration>,
    now: Instant,
) -> Option<Instant> {
    let last = last?;
    let moved = seen.is_none_or(|seen| {
        let difference = last
            .duration_since(seen)
            .unwrap_or_else(|earlier| earlier.duration());
        difference >= HANDSHAKE_CHANGE
    });
    if !moved {
        return None;
    }
    Some(age.map_or(now, |age| now.checked_sub(age).unwrap_or(now)))
}

/// The order a race tries a peer's endpoints in: `first` (the path that worked last), then the
/// endpoints in the order given (the caller ranks them), then `last`; no duplicates.
fn candidates(
    endpoints: &[SocketAddr],
    first: Option<SocketAddr>,
    last: Option<SocketAddr>,
) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::with_capacity(endpoints.len() + 2);
    for endpoint in first
        .into_iter()
        .chain(endpoints.iter().copied())
        .chain(last)
    {
        if !out.contains(&endpoint) {
            out.push(endpoint);
        }
    }
    out
}

fn since(now: Instant, then: Option<Instant>) -> Option<Duration> {
    then.map(|t| now.saturating_duration_since(t))
}

/// Decides what to change. `memory` is updated in place; `good_endpoints` holds, per peer, the
/// endpoint that last worked (persisted by the caller across restarts) and is updated too.
#[allow(clippy::too_many_arguments)]
pub fn reconcile(
    wanted: &[WantedPeer],
    device: &[PeerState],
    memory: &mut HashMap<Key, PeerMemory>,
    good_endpoints: &mut BTreeMap<String, SocketAddr>,
    preshared_key: &Key,
    timers: Policy,
    now: Instant,
) -> Outcome {
    let mut actions = Vec::new();
    let mut reports = Vec::new();
    let on_device: HashMap<Key, &PeerState> = device.iter().map(|p| (p.public_key, p)).collect();

    // Peers on the device nobody wants any more go, unless their node is wanted under a new
    // key: then the new key replaces them (new key → old key).
    let mut predecessors: HashMap<Key, Key> = HashMap::new();
    for peer in device {
        if wanted.iter().any(|w| w.public_key == peer.public_key) {
            continue;
        }
        let successor = memory
            .get(&peer.public_key)
            .filter(|mem| !mem.node_id.is_empty())
            .and_then(|mem| wanted.iter().find(|w| w.spec.node_id == mem.node_id))
            .filter(|w| !on_device.contains_key(&w.public_key));
        match successor {
            Some(want) => {
                predecessors.insert(want.public_key, peer.public_key);
            }
            None => actions.push(Action::RemovePeer {
                public_key: peer.public_key,
            }),
        }
    }
    memory.retain(|key, _| wanted.iter().any(|w| w.public_key == *key));

    for want in wanted {
        let key = want.public_key;
        let state_on_device = on_device.get(&key).copied();
        let mem = memory.entry(key).or_default();
        mem.node_id.clone_from(&want.spec.node_id);
        let allowed_ips = normalized(&want.spec.allowed_ips);
        let endpoints = &want.spec.endpoints;
        let remembered = good_endpoints.get(&want.spec.node_id).copied();

        // Track the last answer through the received byte counter and the handshake time.
        if let Some(device_peer) = state_on_device
            && device_peer.rx_bytes != mem.last_rx_bytes
        {
            if device_peer.rx_bytes > mem.last_rx_bytes {
                mem.last_rx_change = Some(now);
            }
            mem.last_rx_bytes = device_peer.rx_bytes;
        }
        let last_handshake = state_on_device.and_then(|p| p.last_handshake);
        if let Some(at) = new_handshake(
            last_handshake,
            mem.seen_handshake,
            state_on_device.and_then(|p| p.handshake_age),
            now,
        ) && mem.handshake_at.is_none_or(|known| at > known)
        {
            mem.handshake_at = Some(at);
        }
        mem.seen_handshake = last_handshake;
        let changed_at = mem.last_endpoint_change;
        let answered_since_change = match changed_at {
            None => false,
            // Strictly later: a handshake noticed in the very reconcile that changed the endpoint
            // answered the previous one.
            Some(t) if !timers.races => mem.handshake_at.is_some_and(|h| h > t),
            // A race keeps the peer's session (no new one to date the handshake from): the
            // device stamps a handshake with the time of its last timer tick, up to 250 ms
            // early; and anything the peer sent after the race proves it answers on some path
            // (the device follows it there).
            Some(t) => {
                mem.handshake_at
                    .is_some_and(|h| h + HANDSHAKE_STAMP_GRAIN > t)
                    || mem.last_rx_change.is_some_and(|rx| rx > t)
            }
        };
        let last_answer = [mem.handshake_at, mem.last_rx_change]
            .into_iter()
            .flatten()
            .max();

        let state = if changed_at.is_none() {
            State::Unknown
        } else if answered_since_change {
            match since(now, last_answer) {
                Some(age) if age <= timers.peer_down_after => State::Up,
                _ => State::Down,
            }
        } else if since(now, changed_at).unwrap_or_default() < timers.endpoint_timeout {
            // Still waiting for an answer; a peer keeps its known state meanwhile.
            match mem.state {
                State::Down => State::Down,
                State::Up if mem.refreshing => State::Up,
                _ => State::Unknown,
            }
        } else {
            State::Down
        };

        let device_endpoint = state_on_device.and_then(|p| p.endpoint);
        let mut endpoint_to_set = None;
        let mut reset_session = false;
        let mut race: Option<Vec<SocketAddr>> = None;
        let new_candidate = endpoints.iter().any(|e| !mem.raced_with.contains(e));
        if changed_at.is_none() || state_on_device.is_none() {
            // First time (or the device lost the peer): the endpoint that worked last, else the first.
            let first = match (mem.last_used_endpoint, remembered) {
                (Some(used), _) if endpoints.contains(&used) => Some(used),
                (_, Some(good)) if endpoints.contains(&good) => Some(good),
                _ => endpoints.first().copied(),
            };
            endpoint_to_set = first;
            reset_session = true;
            if timers.races {
                race = Some(candidates(endpoints, first, None));
            }
        } else if timers.races {
            let retry_after = if mem.unanswered_races <= 1 {
                FIRST_RACE_RETRY.min(timers.endpoint_timeout)
            } else {
                timers.endpoint_timeout
            };
            let waited = since(now, changed_at).unwrap_or_default() >= retry_after;
            if state != State::Up && (waited || new_candidate) {
                // Down (or a new candidate while not up): race every candidate again, the path
                // that worked last first, the one the peer roamed to last.
                let last_good = remembered.filter(|good| endpoints.contains(good));
                let mut all = candidates(endpoints, last_good, None);
                if let Some(roamed) = device_endpoint.filter(|e| !all.contains(e)) {
                    all.push(roamed);
                }
                race = Some(all);
                mem.last_endpoint_change = Some(now);
            } else if state == State::Up
                && let Some(current) = device_endpoint
                && (std::mem::replace(&mut mem.raced_with, endpoints.clone()) != *endpoints
                    || since(now, mem.upgraded_at.or(changed_at)).unwrap_or_default()
                        >= if current.ip().is_loopback() {
                            RELAYED_PATH_UPGRADE
                        } else {
                            PATH_UPGRADE
                        })
            {
                // Up: race the candidates more promising than the current path (it last, so it
                // answers when none of them does); the session carries on meanwhile.
                let better: Vec<SocketAddr> = endpoints
                    .iter()
                    .copied()
                    .take_while(|e| *e != current)
                    .collect();
                mem.upgraded_at = Some(now);
                if !better.is_empty() {
                    race = Some(candidates(&better, None, Some(current)));
                }
            }
        } else if state == State::Down
            && since(now, changed_at).unwrap_or_default() >= timers.endpoint_timeout
        {
            let single_and_current = endpoints.len() == 1
                && Some(endpoints[0]) == mem.last_used_endpoint
                && device_endpoint == mem.last_used_endpoint;
            // A single endpoint is retried (a fresh handshake) rather than left alone.
            let next = if single_and_current {
                Some(endpoints[0])
            } else {
                next_endpoint(endpoints, mem.last_used_endpoint)
            };
            endpoint_to_set = next;
            reset_session = next.is_some();
        }

        let mut report_state = state;
        if race.is_some() {
            mem.raced_with = endpoints.clone();
            if report_state != State::Up {
                mem.unanswered_races = mem.unanswered_races.saturating_add(1);
            }
        }
        if answered_since_change {
            mem.unanswered_races = 0;
        }
        if reset_session {
            mem.last_used_endpoint = endpoint_to_set.or(mem.last_used_endpoint);
            mem.last_endpoint_change = Some(now);
            report_state = if state == State::Down {
                State::Down
            } else {
                State::Unknown
            };
        } else if state == State::Up
            && let Some(endpoint) = device_endpoint
            // A relayed path's loopback address means nothing after a restart.
            && !endpoint.ip().is_loopback()
        {
            good_endpoints.insert(want.spec.node_id.clone(), endpoint);
        }

        if answered_since_change {
            mem.refreshing = false;
        }
        let allowed_changed = mem.applied_allowed_ips != allowed_ips;
        if allowed_changed && !reset_session && !timers.updates_in_place {
            // New allowed IPs, same endpoint. A userspace device re-creates the peer for this,
            // losing its session: expect (and start) a fresh handshake on the same endpoint.
            reset_session = true;
            mem.last_endpoint_change = Some(now);
            mem.refreshing = report_state == State::Up;
        }
        let psk = crate::crypto::pair_psk(
            preshared_key,
            want.spec.sealed_psk.as_ref().unwrap_or(preshared_key),
        );
        let keys_changed = mem.applied_psk.is_some_and(|applied| applied != psk)
            || mem
                .applied_keepalive
                .is_some_and(|applied| applied != timers.keepalive);
        if reset_session || allowed_changed || keys_changed {
            mem.applied_psk = Some(psk);
            mem.applied_keepalive = Some(timers.keepalive);
            let config = PeerConfig {
                public_key: key,
                preshared_key: psk,
                endpoint: if reset_session { endpoint_to_set } else { None },
                allowed_ips: allowed_ips.clone(),
                persistent_keepalive: timers.keepalive,
            };
            actions.push(match predecessors.get(&key) {
                Some(old) if reset_session => Action::ReplacePeer {
                    old_public_key: *old,
                    config,
                },
                _ => Action::SetPeer {
                    config,
                    reset_session,
                },
            });
            mem.applied_allowed_ips = allowed_ips;
        }
        if let Some(candidates) = race {
            actions.push(Action::Race {
                public_key: key,
                candidates,
            });
        } else if report_state == State::Up
            && since(now, last_answer).is_some_and(|quiet| quiet >= timers.probe_after())
            && mem
                .probed_at
                .is_none_or(|probed| last_answer.is_some_and(|answer| answer > probed))
        {
            // Quiet for longer than a keepalive: one probe, answered by a live peer before
            // `peer_down_after`; no second one until it answered.
            mem.probed_at = Some(now);
            actions.push(Action::Probe { public_key: key });
        }
        mem.state = report_state;
        reports.push(PeerReport {
            public_key: key,
            state: report_state,
            endpoint: device_endpoint.or(mem.last_used_endpoint),
            last_handshake,
            rx_bytes: state_on_device.map_or(0, |p| p.rx_bytes),
            tx_bytes: state_on_device.map_or(0, |p| p.tx_bytes),
            last_endpoint_change: mem.last_endpoint_change,
            alive: since(now, last_answer).is_some_and(|age| age <= timers.peer_down_after),
        });
    }
    Outcome { actions, reports }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Policy = Policy {
        endpoint_timeout: Duration::from_secs(5),
        peer_down_after: Duration::from_secs(30),
        keepalive: Duration::from_secs(10),
        updates_in_place: false,
        races: false,
    };
    const PSK: Key = [9; 32];

    fn want(endpoints: &[&str]) -> WantedPeer {
        WantedPeer {
            public_key: [1; 32],
            spec: PeerSpec {
                public_key: "AQEB".into(),
                node_id: "node-b".into(),
                label: "b".into(),
                mesh_address: "fd00::b".parse().unwrap(),
                allowed_ips: vec![
                    "10.0.0.2/32".parse().unwrap(),
                    "fd00::b/128".parse().unwrap(),
                ],
                endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
                learned_endpoints: Vec::new(),
                relays: Vec::new(),
                sealed_psk: None,
            },
        }
    }

    fn on_device(endpoint: Option<&str>, handshake: Option<SystemTime>, rx: u64) -> PeerState {
        PeerState {
            public_key: [1; 32],
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            last_handshake: handshake,
            handshake_age: None,
            rx_bytes: rx,
            tx_bytes: 0,
            allowed_ips: vec![],
        }
    }

    struct Harness {
        memory: HashMap<Key, PeerMemory>,
        good: BTreeMap<String, SocketAddr>,
        /// Monotonic base.
        t0: Instant,
        /// Wall-clock base for what the device reports.
        wall0: SystemTime,
        policy: Policy,
    }

    impl Harness {
        fn new() -> Self {
            Self {
                memory: HashMap::new(),
                good: BTreeMap::new(),
                t0: Instant::now(),
                wall0: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
                policy: T,
            }
        }
        /// With a device that races endpoints, and the default timers (3 s keepalive, 9 s down).
        fn racing() -> Self {
            Self {
                policy: Policy {
                    endpoint_timeout: Duration::from_secs(3),
                    peer_down_after: Duration::from_secs(9),
                    keepalive: Duration::from_secs(3),
                    updates_in_place: true,
                    races: true,
                },
                ..Self::new()
            }
        }
        fn at(&mut self, secs: u64, wanted: &[WantedPeer], device: &[PeerState]) -> Outcome {
            reconcile(
                wanted,
                device,
                &mut self.memory,
                &mut self.good,
                &PSK,
                self.policy,
                self.t0 + Duration::from_secs(secs),
            )
        }
        /// The wall-clock time the device would report at `secs`.
        fn time(&self, secs: u64) -> SystemTime {
            self.wall0 + Duration::from_secs(secs)
        }
    }

    fn endpoint_set(outcome: &Outcome) -> Option<Option<SocketAddr>> {
        outcome.actions.iter().find_map(|a| match a {
            Action::SetPeer { config, .. } => Some(config.endpoint),
            _ => None,
        })
    }

    fn raced(outcome: &Outcome) -> Option<Vec<SocketAddr>> {
        outcome.actions.iter().find_map(|a| match a {
            Action::Race { candidates, .. } => Some(candidates.clone()),
            _ => None,
        })
    }

    fn probed(outcome: &Outcome) -> bool {
        outcome
            .actions
            .iter()
            .any(|a| matches!(a, Action::Probe { .. }))
    }

    fn sas(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn a_racing_device_tries_every_endpoint_at_once_the_last_good_first() {
        let mut h = Harness::racing();
        h.good
            .insert("node-b".into(), "10.1.0.2:51820".parse().unwrap());
        let w = [want(&[
            "10.0.0.2:51820",
            "10.1.0.2:51820",
            "10.2.0.2:51820",
        ])];
        let out = h.at(0, &w, &[]);
        assert_eq!(
            endpoint_set(&out),
            Some(Some("10.1.0.2:51820".parse().unwrap()))
        );
        assert_eq!(
            raced(&out),
            Some(sas(&["10.1.0.2:51820", "10.0.0.2:51820", "10.2.0.2:51820"]))
        );
        // Unanswered: once more after 1 s (the peer's device may not have been up yet)...
        let dev = [on_device(Some("10.1.0.2:51820"), None, 0)];
        let out = h.at(1, &w, &dev);
        assert_eq!(raced(&out).map(|c| c.len()), Some(3));
        assert_eq!(out.reports[0].state, State::Unknown);
        // ...then every endpoint timeout, all of them again (not one after the other).
        assert!(h.at(2, &w, &dev).actions.is_empty());
        assert!(h.at(3, &w, &dev).actions.is_empty());
        let out = h.at(4, &w, &dev);
        assert_eq!(out.reports[0].state, State::Down);
        assert_eq!(endpoint_set(&out), None);
        assert_eq!(raced(&out).map(|c| c.len()), Some(3));
    }

    #[test]
    fn a_newly_announced_endpoint_is_raced_at_once_while_the_peer_is_not_up() {
        // Both behind NAT: the peer's reflexive endpoint arrives after the first race.
        let mut h = Harness::racing();
        h.at(0, &[want(&["192.168.1.2:51820"])], &[]);
        let w = [want(&["192.168.1.2:51820", "198.51.100.7:61000"])];
        let dev = [on_device(Some("192.168.1.2:51820"), None, 0)];
        let out = h.at(1, &w, &dev);
        assert_eq!(
            raced(&out),
            Some(sas(&["192.168.1.2:51820", "198.51.100.7:61000"]))
        );
        assert!(h.at(2, &w, &dev).actions.is_empty(), "raced once");
    }

    #[test]
    fn a_quiet_peer_is_probed_once_and_a_silent_one_is_down_within_ten_seconds() {
        let mut h = Harness::racing();
        let w = [want(&["10.0.0.2:51820", "10.1.0.2:51820"])];
        h.at(0, &w, &[]);
        // Answered at 1 s (handshake), then silence.
        let dev = [on_device(Some("10.0.0.2:51820"), Some(h.time(1)), 100)];
        let out = h.at(1, &w, &dev);
        assert_eq!(out.reports[0].state, State::Up);
        assert!(!probed(&h.at(4, &w, &dev)), "a keepalive is due every 3 s");
        let out = h.at(6, &w, &dev);
        assert!(probed(&out), "quiet for 5 s: probed");
        assert_eq!(out.reports[0].state, State::Up);
        assert!(!probed(&h.at(7, &w, &dev)), "once until it answers");
        // The probe is answered: up, and probed again only after a new silence.
        let dev = [on_device(Some("10.0.0.2:51820"), Some(h.time(8)), 300)];
        assert_eq!(h.at(8, &w, &dev).reports[0].state, State::Up);
        assert!(!probed(&h.at(12, &w, &dev)));
        assert!(probed(&h.at(13, &w, &dev)));
        // No answer after that: down once silent for more than 9 s (the next 1 s tick, within
        // 10 s of the last answer at 8 s), and raced again at once.
        assert_eq!(h.at(17, &w, &dev).reports[0].state, State::Up);
        let out = h.at(18, &w, &dev);
        assert_eq!(out.reports[0].state, State::Down);
        assert_eq!(
            raced(&out),
            Some(sas(&["10.0.0.2:51820", "10.1.0.2:51820"])),
            "the path that worked first"
        );
    }

    #[test]
    fn an_up_peer_on_a_worse_path_is_raced_for_a_better_one_each_minute() {
        let mut h = Harness::racing();
        let w = [want(&[
            "10.0.0.2:51820",
            "10.1.0.2:51820",
            "10.2.0.2:51820",
        ])];
        h.at(0, &w, &[]);
        // The race was won by the second candidate.
        let mut rx = 100;
        let dev = |h: &Harness, at: u64, rx: u64| {
            [on_device(Some("10.1.0.2:51820"), Some(h.time(at)), rx)]
        };
        assert_eq!(h.at(1, &w, &dev(&h, 1, rx)).reports[0].state, State::Up);
        for second in 2..60 {
            rx += 10;
            assert_eq!(
                raced(&h.at(second, &w, &dev(&h, 1, rx))),
                None,
                "at {second} s"
            );
        }
        rx += 10;
        let out = h.at(60, &w, &dev(&h, 1, rx));
        assert_eq!(
            raced(&out),
            Some(sas(&["10.0.0.2:51820", "10.1.0.2:51820"])),
            "the better candidate, then the current path"
        );
        assert_eq!(out.reports[0].state, State::Up, "the session carries on");
        rx += 10;
        assert_eq!(raced(&h.at(61, &w, &dev(&h, 1, rx))), None);
    }

    #[test]
    fn a_new_peer_gets_its_first_endpoint_and_is_unknown() {
        let mut h = Harness::new();
        let out = h.at(0, &[want(&["10.0.0.2:51820", "10.1.0.2:51820"])], &[]);
        assert_eq!(
            endpoint_set(&out),
            Some(Some("10.0.0.2:51820".parse().unwrap()))
        );
        assert_eq!(out.reports[0].state, State::Unknown);
        let Action::SetPeer {
            config,
            reset_session,
        } = &out.actions[0]
        else {
            panic!()
        };
        assert!(reset_session);
        assert_eq!(config.preshared_key, PSK);
        assert_eq!(config.persistent_keepalive, Duration::from_secs(10));
    }

    /// A reload's keepalive and a rotation's pre-shared key reach an established peer in place:
    /// one SetPeer, no new endpoint, no session reset.
    #[test]
    fn a_new_keepalive_or_peer_secret_updates_the_peer_in_place() {
        let mut h = Harness::new();
        let mut w = [want(&["10.0.0.2:51820"])];
        h.at(0, &w, &[]);
        let dev = [on_device(Some("10.0.0.2:51820"), Some(h.time(1)), 100)];
        h.at(1, &w, &dev);
        assert!(h.at(2, &w, &dev).actions.is_empty(), "settled");
        h.policy.keepalive = Duration::from_secs(4);
        let out = h.at(3, &w, &dev);
        let [
            Action::SetPeer {
                config,
                reset_session,
            },
        ] = &out.actions[..]
        else {
            panic!("one SetPeer expected: {:?}", out.actions)
        };
        assert!(!reset_session);
        assert_eq!(config.endpoint, None, "the device keeps its endpoint");
        assert_eq!(config.persistent_keepalive, Duration::from_secs(4));
        assert_eq!(config.preshared_key, PSK);
        assert_eq!(out.reports[0].state, State::Up);
        assert!(h.at(4, &w, &dev).actions.is_empty(), "applied once");
        // The peer promoted its secret: the pair key of both.
        w[0].spec.sealed_psk = Some([5; 32]);
        let out = h.at(5, &w, &dev);
        let [
            Action::SetPeer {
                config,
                reset_session,
            },
        ] = &out.actions[..]
        else {
            panic!("one SetPeer expected: {:?}", out.actions)
        };
        assert!(!reset_session);
        assert_eq!(
            config.preshared_key,
            crate::crypto::pair_psk(&PSK, &[5; 32])
        );
        assert!(h.at(6, &w, &dev).actions.is_empty());
    }

    #[test]
    fn a_dead_endpoint_is_left_after_the_timeout_and_the_list_wraps() {
        let mut h = Harness::new();
        let w = [want(&["10.9.0.2:51820", "10.0.0.2:51820"])];
        h.at(0, &w, &[]);
        let dev = [on_device(Some("10.9.0.2:51820"), None, 0)];
        let out = h.at(3, &w, &dev);
        assert!(out.actions.is_empty(), "within the timeout nothing changes");
        assert_eq!(out.reports[0].state, State::Unknown);
        let out = h.at(5, &w, &dev);
        assert_eq!(out.reports[0].state, State::Down);
        assert_eq!(
            endpoint_set(&out),
            Some(Some("10.0.0.2:51820".parse().unwrap()))
        );
        // Still nothing on the second one: wrap to the first.
        let dev = [on_device(Some("10.0.0.2:51820"), None, 0)];
        let out = h.at(10, &w, &dev);
        assert_eq!(
            endpoint_set(&out),
            Some(Some("10.9.0.2:51820".parse().unwrap()))
        );
    }

    #[test]
    fn a_handshake_makes_the_peer_up_and_remembers_the_endpoint() {
        let mut h = Harness::new();
        let w = [want(&["10.9.0.2:51820", "10.0.0.2:51820"])];
        h.at(0, &w, &[]);
        h.at(5, &w, &[on_device(Some("10.9.0.2:51820"), None, 0)]);
        let dev = [on_device(Some("10.0.0.2:51820"), Some(h.time(6)), 92)];
        let out = h.at(6, &w, &dev);
        assert_eq!(out.reports[0].state, State::Up);
        assert!(out.actions.is_empty());
        assert_eq!(
            h.good.get("node-b"),
            Some(&"10.0.0.2:51820".parse().unwrap())
        );
        // After a restart (fresh memory) the endpoint that worked is tried first.
        h.memory.clear();
        let out = h.at(100, &w, &[]);
        assert_eq!(
            endpoint_set(&out),
            Some(Some("10.0.0.2:51820".parse().unwrap()))
        );
    }

    #[test]
    fn an_established_peer_is_down_after_silence_and_stays_up_while_keepalives_arrive() {
        let mut h = Harness::new();
        let w = [want(&["10.0.0.2:51820"])];
        h.at(0, &w, &[]);
        h.at(
            1,
            &w,
            &[on_device(Some("10.0.0.2:51820"), Some(h.time(1)), 100)],
        );
        // Keepalives keep arriving (rx grows) long after the handshake: still up.
        for (t, rx) in [(20, 132), (40, 164), (60, 196)] {
            let out = h.at(
                t,
                &w,
                &[on_device(Some("10.0.0.2:51820"), Some(h.time(1)), rx)],
            );
            assert_eq!(out.reports[0].state, State::Up, "at {t}s");
        }
        // Silence for more than 30 s: down, and a fresh handshake is attempted.
        let out = h.at(
            91,
            &w,
            &[on_device(Some("10.0.0.2:51820"), Some(h.time(1)), 196)],
        );
        assert_eq!(out.reports[0].state, State::Down);
        assert_eq!(
            endpoint_set(&out),
            Some(Some("10.0.0.2:51820".parse().unwrap()))
        );
    }

    #[test]
    fn a_roamed_endpoint_is_kept() {
        let mut h = Harness::new();
        let w = [want(&["10.0.0.2:51820"])];
        h.at(0, &w, &[]);
        let dev = [on_device(Some("203.0.113.9:40000"), Some(h.time(1)), 100)];
        let out = h.at(2, &w, &dev);
        assert_eq!(out.reports[0].state, State::Up);
        assert!(
            out.actions.is_empty(),
            "no endpoint is pushed over a roamed one"
        );
        assert_eq!(
            out.reports[0].endpoint,
            Some("203.0.113.9:40000".parse().unwrap())
        );
    }

    #[test]
    fn a_node_under_a_new_key_replaces_its_peer_and_races_at_once() {
        let mut h = Harness::racing();
        let old = want(&["10.0.0.2:51820"]);
        h.at(0, std::slice::from_ref(&old), &[]);
        let dev = [on_device(Some("10.0.0.2:51820"), Some(h.time(1)), 10)];
        let out = h.at(1, std::slice::from_ref(&old), &dev);
        assert_eq!(out.reports[0].state, State::Up);
        // Discovery now shows node-b with a new key: one replacement (no removal), with the
        // allowed IPs and the endpoint that worked, and a race under the new key.
        let mut new = want(&["10.0.0.2:51820"]);
        new.public_key = [2; 32];
        let out = h.at(2, std::slice::from_ref(&new), &dev);
        let [
            Action::ReplacePeer {
                old_public_key,
                config,
            },
            Action::Race {
                public_key,
                candidates,
            },
        ] = &out.actions[..]
        else {
            panic!("{:?}", out.actions)
        };
        assert_eq!((*old_public_key, config.public_key), ([1; 32], [2; 32]));
        assert_eq!(config.allowed_ips, normalized(&new.spec.allowed_ips));
        assert_eq!(config.endpoint, Some("10.0.0.2:51820".parse().unwrap()));
        assert_eq!(*public_key, [2; 32]);
        assert_eq!(candidates, &sas(&["10.0.0.2:51820"]));
        assert!(!h.memory.contains_key(&[1; 32]), "the old key is forgotten");
        // A key nobody's node claims any more is still removed.
        let mut other = new.clone();
        other.spec.node_id = "node-c".into();
        other.public_key = [3; 32];
        let replaced = [PeerState {
            public_key: [2; 32],
            ..on_device(Some("10.0.0.2:51820"), None, 0)
        }];
        let out = h.at(3, std::slice::from_ref(&other), &replaced);
        assert!(
            out.actions.contains(&Action::RemovePeer {
                public_key: [2; 32]
            }),
            "{:?}",
            out.actions
        );
        assert!(
            !out.actions
                .iter()
                .any(|a| matches!(a, Action::ReplacePeer { .. })),
            "{:?}",
            out.actions
        );
    }

    #[test]
    fn allowed_ip_changes_keep_the_endpoint_and_removed_peers_go() {
        let mut h = Harness::new();
        let mut w = want(&["10.0.0.2:51820"]);
        h.at(0, std::slice::from_ref(&w), &[]);
        let dev = [on_device(Some("10.0.0.2:51820"), Some(h.time(1)), 10)];
        h.at(1, std::slice::from_ref(&w), &dev);
        w.spec.allowed_ips.push("10.244.2.0/24".parse().unwrap());
        let out = h.at(2, std::slice::from_ref(&w), &dev);
        let Action::SetPeer {
            config,
            reset_session,
        } = &out.actions[0]
        else {
            panic!("{:?}", out.actions)
        };
        assert!(
            reset_session,
            "a fresh handshake is started (the device re-creates the peer)"
        );
        assert_eq!(config.endpoint, None, "the device keeps its endpoint");
        assert_eq!(config.allowed_ips.len(), 3);
        assert_eq!(out.reports[0].state, State::Up);
        // The re-created peer has no handshake yet: it stays up while one is awaited...
        let fresh = [on_device(Some("10.0.0.2:51820"), None, 0)];
        let out = h.at(3, std::slice::from_ref(&w), &fresh);
        assert_eq!(out.reports[0].state, State::Up);
        assert!(out.actions.is_empty());
        // ...and is down if none comes within the endpoint timeout.
        let out = h.at(7, std::slice::from_ref(&w), &fresh);
        assert_eq!(out.reports[0].state, State::Down);
        let out = h.at(8, &[], &dev);
        assert_eq!(
            out.actions,
            vec![Action::RemovePeer {
                public_key: [1; 32]
            }]
        );
        assert!(h.memory.is_empty());
    }

    #[test]
    fn an_in_place_device_keeps_the_session_on_allowed_ip_changes() {
        let mut h = Harness::new();
        let mut w = want(&["10.0.0.2:51820", "10.1.0.2:51820"]);
        let policy = Policy {
            updates_in_place: true,
            ..T
        };
        let at = |h: &mut Harness, secs, w: &[WantedPeer], dev: &[PeerState]| {
            reconcile(
                w,
                dev,
                &mut h.memory,
                &mut h.good,
                &PSK,
                policy,
                h.t0 + Duration::from_secs(secs),
            )
        };
        at(&mut h, 0, std::slice::from_ref(&w), &[]);
        let dev = [on_device(Some("10.0.0.2:51820"), Some(h.time(1)), 10)];
        at(&mut h, 1, std::slice::from_ref(&w), &dev);
        w.spec.allowed_ips.push("10.244.2.0/24".parse().unwrap());
        let out = at(&mut h, 2, std::slice::from_ref(&w), &dev);
        assert!(
            matches!(&out.actions[0], Action::SetPeer { reset_session: false, config } if config.endpoint.is_none())
        );
        // Long after the endpoint timeout, with keepalives still arriving: up, no rotation.
        let dev = [on_device(Some("10.0.0.2:51820"), Some(h.time(1)), 200)];
        let out = at(&mut h, 20, std::slice::from_ref(&w), &dev);
        assert_eq!(out.reports[0].state, State::Up);
        assert!(out.actions.is_empty(), "{:?}", out.actions);
    }

    #[test]
    fn wall_clock_steps_change_nothing() {
        for step in [-7_200i64, 7_200] {
            let mut h = Harness::new();
            let w = [want(&["10.9.0.2:51820", "10.0.0.2:51820"])];
            h.at(0, &w, &[]);
            let dev = [on_device(Some("10.9.0.2:51820"), Some(h.time(1)), 100)];
            assert_eq!(h.at(1, &w, &dev).reports[0].state, State::Up);
            // The wall clock jumps two hours (either way): the device's handshake time is now far
            // in the past or the future. Keepalives keep arriving: still up, nothing rotates.
            h.wall0 = if step < 0 {
                h.wall0 - Duration::from_secs(7_200)
            } else {
                h.wall0 + Duration::from_secs(7_200)
            };
            for (t, rx) in [(2, 132), (10, 164), (20, 196)] {
                let out = h.at(
                    t,
                    &w,
                    &[on_device(Some("10.9.0.2:51820"), Some(h.wall0), rx)],
                );
                assert_eq!(out.reports[0].state, State::Up, "step {step} at {t}s");
                assert!(
                    out.actions.is_empty(),
                    "step {step} at {t}s: {:?}",
                    out.actions
                );
                assert!(out.reports[0].alive);
            }
            // Rotation still runs on monotonic time: silence for peer_down_after → down.
            let dev = [on_device(Some("10.9.0.2:51820"), Some(h.wall0), 196)];
            assert_eq!(h.at(51, &w, &dev).reports[0].state, State::Down);
            assert!(!h.at(52, &w, &dev).reports[0].alive);
        }
    }

    #[test]
    fn a_handshake_time_that_jitters_between_reads_is_not_a_new_handshake() {
        // openspan's device derives the wall-clock handshake time from the wall clock at each
        // read: it moves by nanoseconds every time. A dead peer must still go down.
        let mut h = Harness::new();
        let w = [want(&["10.0.0.2:51820"])];
        h.at(0, &w, &[]);
        let read = |h: &Harness, secs: u64, jitter_ns: u64| {
            let mut p = on_device(
                Some("10.0.0.2:51820"),
                Some(h.time(1) + Duration::from_nanos(jitter_ns)),
                100,
            );
            p.handshake_age = Some(Duration::from_secs(secs.saturating_sub(1)));
            [p]
        };
        assert_eq!(h.at(1, &w, &read(&h, 1, 0)).reports[0].state, State::Up);
        for t in 2..=31 {
            let out = h.at(t, &w, &read(&h, t, t * 7));
            assert_eq!(out.reports[0].state, State::Up, "at {t}s");
        }
        let out = h.at(32, &w, &read(&h, 32, 999));
        assert_eq!(out.reports[0].state, State::Down, "silent for 31 s");
        assert!(!out.reports[0].alive);
    }

    #[test]
    fn a_wall_clock_step_moves_the_devices_handshake_time_but_not_its_age() {
        let mut h = Harness::new();
        let w = [want(&["10.0.0.2:51820"])];
        h.at(0, &w, &[]);
        let read = |wall: SystemTime, age_secs: u64| {
            let mut p = on_device(Some("10.0.0.2:51820"), Some(wall), 100);
            p.handshake_age = Some(Duration::from_secs(age_secs));
            [p]
        };
        assert_eq!(h.at(1, &w, &read(h.time(1), 0)).reports[0].state, State::Up);
        // Two hours forward: the device now reports a handshake two hours "later", same age.
        let stepped = h.time(1) + Duration::from_secs(7_200);
        assert!(h.at(10, &w, &read(stepped, 9)).reports[0].alive);
        let out = h.at(32, &w, &read(stepped, 31));
        assert_eq!(out.reports[0].state, State::Down, "no packet for 31 s");
        // A real rekey later: a new age.
        let out = h.at(40, &w, &read(stepped + Duration::from_secs(39), 0));
        assert!(out.reports[0].alive);
    }

    #[test]
    fn a_peer_without_endpoints_waits_for_the_other_side() {
        let mut h = Harness::new();
        let w = [want(&[])];
        let out = h.at(0, &w, &[]);
        assert_eq!(endpoint_set(&out), Some(None));
        let out = h.at(
            2,
            &w,
            &[on_device(Some("198.51.100.4:51820"), Some(h.time(1)), 10)],
        );
        assert_eq!(out.reports[0].state, State::Up, "it reached us");
    }
}
