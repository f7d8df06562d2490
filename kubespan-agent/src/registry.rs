//! The agent's directory of the other members: what each discovery service last said, the
//! warm-start cache, and the members kept for their live tunnels, merged by the control loop.
//!
//! A member stays while *either* a source lists it *or* its tunnel is alive (the data plane
//! reports that through [`RegistryCache::set_alive`]): a discovery service restarted without its
//! state, an aborted watch or someone deleting records cannot remove a working peer, and so can
//! never open a window where its traffic leaves unencrypted. It is removed once both are gone.
//!
//! Pure: every decision takes the (monotonic) time as an argument; the wall clock appears only
//! to convert the warm-start cache's expiries, which must survive a reboot.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::discovery::DiscoveryEvent;
use crate::model::AffiliateRecord;

/// Members from the warm-start cache that the first discovery service to answer does not list
/// are kept this long for their tunnels to come up (then only while alive): at start the data
/// plane has not had the time to hear from anybody yet.
pub const WARM_GRACE: Duration = Duration::from_secs(60);
/// Members kept only for their live tunnels are written to the warm-start cache with this TTL: a
/// reboot soon after a discovery restart finds them, a later one does not resurrect them.
pub const RETAINED_CACHE_TTL: Duration = Duration::from_secs(300);

/// One record as a source last told it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    record: AffiliateRecord,
    /// Set when the source now holds a version that does not open: this last good one is kept
    /// until then (a record's TTL after it was last seen readable).
    shadowed_until: Option<Instant>,
}

/// A member no source lists.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Retained {
    record: AffiliateRecord,
    /// Kept until then even if its tunnel is not (yet) alive.
    grace_until: Option<Instant>,
}

#[derive(Debug)]
pub struct RegistryCache {
    per_endpoint: Vec<HashMap<String, Entry>>,
    public_ips: Vec<Option<IpAddr>>,
    /// Whether each source is connected now: what a disconnected one lists is kept (an outage
    /// removes nothing) but may be stale, so a connected source's record wins ([`Self::raw`]).
    connected: Vec<bool>,
    /// Sources removed by a reload: events their client sent before it stopped are ignored.
    removed: BTreeSet<usize>,
    /// From the warm-start cache, with their expiry; replaced by the first snapshot of any
    /// service.
    warm: HashMap<String, (AffiliateRecord, Instant)>,
    retained: HashMap<String, Retained>,
    alive: BTreeSet<String>,
    /// The records' TTL at the discovery service.
    ttl: Duration,
}

impl RegistryCache {
    pub fn new(endpoints: usize, ttl: Duration) -> Self {
        Self {
            per_endpoint: vec![HashMap::new(); endpoints],
            public_ips: vec![None; endpoints],
            connected: vec![false; endpoints],
            removed: BTreeSet::new(),
            warm: HashMap::new(),
            retained: HashMap::new(),
            alive: BTreeSet::new(),
            ttl,
        }
    }

    /// A new discovery service (added by a reload); returns its index for its events.
    pub fn add_source(&mut self) -> usize {
        self.per_endpoint.push(HashMap::new());
        self.public_ips.push(None);
        self.connected.push(false);
        self.per_endpoint.len() - 1
    }

    /// Forgets what a removed discovery service listed (its index is never reused). Members no
    /// other service lists are kept while their tunnels are alive, as after a delete there.
    /// Returns true when the merged set of records changed.
    pub fn remove_source(&mut self, index: usize) -> bool {
        let Some(cache) = self.per_endpoint.get_mut(index) else {
            return false;
        };
        let before = std::mem::take(cache);
        self.removed.insert(index);
        if let Some(ip) = self.public_ips.get_mut(index) {
            *ip = None;
        }
        if let Some(connected) = self.connected.get_mut(index) {
            *connected = false;
        }
        let changed = !before.is_empty();
        for entry in before.into_values() {
            self.unlisted(entry.record, None);
        }
        changed
    }

    /// Members from the warm-start cache with their expiry in unix ms, converted once to the
    /// monotonic clock (`now`, `now_unix_ms`: the same moment on both clocks).
    pub fn load_warm(
        &mut self,
        records: Vec<(AffiliateRecord, i64)>,
        now: Instant,
        now_unix_ms: i64,
    ) {
        self.warm = records
            .into_iter()
            .filter(|(_, expires)| *expires > now_unix_ms)
            .map(|(record, expires)| {
                let left = Duration::from_millis(expires.saturating_sub(now_unix_ms) as u64);
                (record.node_id.clone(), (record, now + left.min(self.ttl)))
            })
            .collect();
    }

    fn listed(&self, node_id: &str) -> bool {
        self.per_endpoint.iter().any(|c| c.contains_key(node_id)) || self.warm.contains_key(node_id)
    }

    /// `record` is no longer listed by any source: keep it if its tunnel is alive or within
    /// `grace_until`.
    fn unlisted(&mut self, record: AffiliateRecord, grace_until: Option<Instant>) {
        if self.listed(&record.node_id) {
            return;
        }
        if self.alive.contains(&record.node_id) || grace_until.is_some() {
            tracing::info!(node = %record.node_id, nodename = %record.nodename, "discovery no longer lists a member; keeping it as a peer while its tunnel is alive");
            self.retained.insert(
                record.node_id.clone(),
                Retained {
                    record,
                    grace_until,
                },
            );
        }
    }

    /// Applies one event at `now`; returns true when the merged set of records changed.
    pub fn apply(&mut self, event: DiscoveryEvent, now: Instant) -> bool {
        let source = match &event {
            DiscoveryEvent::Connected { index, .. }
            | DiscoveryEvent::Snapshot { index, .. }
            | DiscoveryEvent::Upsert { index, .. }
            | DiscoveryEvent::Unreadable { index, .. }
            | DiscoveryEvent::Remove { index, .. }
            | DiscoveryEvent::Disconnected { index, .. } => *index,
        };
        if self.removed.contains(&source) {
            return false;
        }
        if let Some(connected) = self.connected.get_mut(source) {
            match &event {
                DiscoveryEvent::Connected { .. } | DiscoveryEvent::Snapshot { .. } => {
                    *connected = true;
                }
                DiscoveryEvent::Disconnected { .. } => *connected = false,
                _ => {}
            }
        }
        match event {
            DiscoveryEvent::Connected { index, public_ip } => {
                if let Some(slot) = self.public_ips.get_mut(index) {
                    let changed = *slot != public_ip;
                    *slot = public_ip;
                    return changed;
                }
                false
            }
            DiscoveryEvent::Snapshot {
                index,
                affiliates,
                unreadable,
            } => self.snapshot(index, affiliates, unreadable, now),
            DiscoveryEvent::Upsert { index, record } => {
                let Some(cache) = self.per_endpoint.get_mut(index) else {
                    return false;
                };
                let node_id = record.node_id.clone();
                let entry = Entry {
                    record: *record,
                    shadowed_until: None,
                };
                let changed = cache
                    .insert(node_id.clone(), entry.clone())
                    .is_none_or(|old| old.record != entry.record || old.shadowed_until.is_some());
                self.retained.remove(&node_id);
                changed
            }
            DiscoveryEvent::Unreadable { index, node_id } => {
                let ttl = self.ttl;
                match self
                    .per_endpoint
                    .get_mut(index)
                    .and_then(|cache| cache.get_mut(&node_id))
                {
                    Some(entry) if entry.shadowed_until.is_none() => {
                        entry.shadowed_until = Some(now + ttl);
                        // Another source's readable record now takes precedence.
                        true
                    }
                    _ => false,
                }
            }
            DiscoveryEvent::Remove { index, node_id } => {
                let Some(entry) = self
                    .per_endpoint
                    .get_mut(index)
                    .and_then(|cache| cache.remove(&node_id))
                else {
                    return false;
                };
                self.unlisted(entry.record, None);
                true
            }
            // Keep what we knew: a discovery outage must not tear down the mesh.
            DiscoveryEvent::Disconnected { .. } => false,
        }
    }

    fn snapshot(
        &mut self,
        index: usize,
        affiliates: Vec<AffiliateRecord>,
        unreadable: Vec<String>,
        now: Instant,
    ) -> bool {
        let Some(cache) = self.per_endpoint.get_mut(index) else {
            return false;
        };
        let mut fresh: HashMap<String, Entry> = affiliates
            .into_iter()
            .map(|record| {
                let entry = Entry {
                    record,
                    shadowed_until: None,
                };
                (entry.record.node_id.clone(), entry)
            })
            .collect();
        for node_id in unreadable {
            // The last good record: from this source, else from the warm-start cache.
            let kept = cache
                .remove(&node_id)
                .map(|entry| {
                    let until = entry.shadowed_until.unwrap_or(now + self.ttl);
                    (entry.record, until)
                })
                .or_else(|| self.warm.get(&node_id).cloned());
            if let Some((record, until)) = kept {
                let entry = Entry {
                    record,
                    shadowed_until: Some(until),
                };
                fresh.insert(node_id, entry);
            }
        }
        let before = std::mem::replace(cache, fresh);
        let after = &self.per_endpoint[index];
        let mut changed =
            after.len() != before.len() || after.iter().any(|(id, e)| before.get(id) != Some(e));
        // The first word of any service replaces the warm-start cache; what it does not list
        // gets a grace period for its tunnel to come up.
        let warm: Vec<AffiliateRecord> = self.warm.drain().map(|(_, (record, _))| record).collect();
        changed |= !warm.is_empty();
        for entry in before.into_values() {
            self.unlisted(entry.record, None);
        }
        for record in warm {
            self.unlisted(record, Some(now + WARM_GRACE));
        }
        for node_id in self.per_endpoint[index].keys() {
            changed |= self.retained.remove(node_id).is_some();
        }
        changed
    }

    /// Which peers' tunnels are alive, at `now`. Retained members whose tunnel is not alive (and
    /// whose grace is over) are dropped; returns true when that changed the merged set.
    pub fn set_alive(&mut self, alive: BTreeSet<String>, now: Instant) -> bool {
        self.alive = alive;
        self.prune_retained(now)
    }

    fn prune_retained(&mut self, now: Instant) -> bool {
        let before = self.retained.len();
        let alive = &self.alive;
        self.retained.retain(|node_id, kept| {
            let keep = alive.contains(node_id) || kept.grace_until.is_some_and(|g| now < g);
            if !keep {
                tracing::info!(node = %node_id, nodename = %kept.record.nodename, "member gone: not listed by discovery and its tunnel is silent");
            }
            keep
        });
        before != self.retained.len()
    }

    /// Drops what has expired at `now`: records kept over an unreadable replacement, warm-start
    /// entries, retained members past their grace. Returns true when the merged set changed.
    pub fn expire(&mut self, now: Instant) -> bool {
        let mut gone = Vec::new();
        for cache in &mut self.per_endpoint {
            cache.retain(|_, entry| {
                let keep = entry.shadowed_until.is_none_or(|until| now < until);
                if !keep {
                    gone.push(entry.record.clone());
                }
                keep
            });
        }
        self.warm.retain(|_, (record, expires)| {
            let keep = now < *expires;
            if !keep {
                gone.push(record.clone());
            }
            keep
        });
        let mut changed = !gone.is_empty();
        for record in gone {
            self.unlisted(record, None);
        }
        changed |= self.prune_retained(now);
        changed
    }

    /// Raw records keyed `<source>/<node id>`, for merging: the services in endpoint order, then
    /// the warm-start cache, then the members kept for their live tunnels. A source's record kept
    /// over an unreadable version is left out while another source has a readable one.
    pub fn raw(&self) -> Vec<(String, &AffiliateRecord)> {
        let readable = |node_id: &str| {
            self.per_endpoint.iter().any(|c| {
                c.get(node_id)
                    .is_some_and(|entry| entry.shadowed_until.is_none())
            })
        };
        // The merge (§3.3) goes by raw id, and later ids win a node's identity fields (the key,
        // the sealing secret). A disconnected source keeps what it listed (an outage removes
        // nothing) but its copy may be stale: its ids (`service/-NNN/…`) sort before the
        // connected sources' (`service/NNN/…`), so a connected source's record wins.
        let mut raw: Vec<_> = self
            .per_endpoint
            .iter()
            .enumerate()
            .flat_map(|(i, cache)| {
                let stale = if self.connected.get(i).copied().unwrap_or(false) {
                    ""
                } else {
                    "-"
                };
                cache
                    .values()
                    .filter(move |e| e.shadowed_until.is_none() || !readable(&e.record.node_id))
                    .map(move |e| {
                        (
                            format!("service/{stale}{i:03}/{}", e.record.node_id),
                            &e.record,
                        )
                    })
            })
            .collect();
        raw.extend(
            self.warm
                .values()
                .map(|(r, _)| (format!("warm/{}", r.node_id), r)),
        );
        raw.extend(
            self.retained
                .values()
                .map(|kept| (format!("zretained/{}", kept.record.node_id), &kept.record)),
        );
        raw.sort_by(|a, b| a.0.cmp(&b.0));
        raw
    }

    /// The members to remember across a restart, with their expiry in unix ms (`now` and
    /// `now_unix_ms` are the same moment): listed records a TTL from now, records kept over an
    /// unreadable version and warm-start entries their own expiry, members kept for their live
    /// tunnels [`RETAINED_CACHE_TTL`].
    pub fn to_persist(&self, now: Instant, now_unix_ms: i64) -> Vec<(AffiliateRecord, i64)> {
        let at = |instant: Instant| {
            now_unix_ms.saturating_add(instant.saturating_duration_since(now).as_millis() as i64)
        };
        let mut out: HashMap<String, (AffiliateRecord, i64)> = HashMap::new();
        let mut put = |record: &AffiliateRecord, expires: i64| {
            let slot = out
                .entry(record.node_id.clone())
                .or_insert_with(|| (record.clone(), expires));
            if expires > slot.1 {
                *slot = (record.clone(), expires);
            }
        };
        for kept in self.retained.values() {
            put(&kept.record, at(now + RETAINED_CACHE_TTL));
        }
        for (record, expires) in self.warm.values() {
            put(record, at(*expires));
        }
        for entry in self.per_endpoint.iter().flat_map(|c| c.values()) {
            put(
                &entry.record,
                at(entry.shadowed_until.unwrap_or(now + self.ttl)),
            );
        }
        let mut out: Vec<_> = out.into_values().collect();
        out.sort_by(|a, b| a.0.node_id.cmp(&b.0.node_id));
        out
    }

    /// How many members are kept only for their live tunnels.
    pub fn retained(&self) -> usize {
        self.retained.len()
    }

    /// Distinct public IPs reported by the discovery services, in endpoint order.
    pub fn public_ips(&self) -> Vec<IpAddr> {
        let mut ips = Vec::new();
        for ip in self.public_ips.iter().flatten() {
            if !ips.contains(ip) {
                ips.push(*ip);
            }
        }
        ips
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(1800);

    fn rec(id: &str) -> AffiliateRecord {
        AffiliateRecord {
            node_id: id.into(),
            nodename: id.into(),
            ..AffiliateRecord::default()
        }
    }

    fn snapshot(index: usize, ids: &[&str]) -> DiscoveryEvent {
        DiscoveryEvent::Snapshot {
            index,
            affiliates: ids.iter().map(|id| rec(id)).collect(),
            unreadable: vec![],
        }
    }

    fn ids(cache: &RegistryCache) -> Vec<String> {
        cache.raw().into_iter().map(|(id, _)| id).collect()
    }

    fn alive(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|id| id.to_string()).collect()
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_snapshot_replaces_and_a_disconnect_keeps() {
        let t = Instant::now();
        let mut cache = RegistryCache::new(2, TTL);
        assert!(cache.apply(snapshot(0, &["a", "b"]), t));
        let upsert = || DiscoveryEvent::Upsert {
            index: 1,
            record: Box::new(rec("a")),
        };
        assert!(cache.apply(upsert(), t));
        assert!(!cache.apply(upsert(), t), "same record: no change");
        let disconnected = DiscoveryEvent::Disconnected {
            index: 0,
            error: "x".into(),
        };
        assert!(!cache.apply(disconnected, t));
        assert_eq!(cache.raw().len(), 3);
        assert!(cache.apply(snapshot(0, &["b"]), t));
        let remove = DiscoveryEvent::Remove {
            index: 1,
            node_id: "a".into(),
        };
        assert!(cache.apply(remove, t));
        assert_eq!(ids(&cache), ["service/000/b"]);
    }

    #[test]
    fn a_member_with_a_live_tunnel_survives_an_empty_snapshot_and_deletes() {
        let t = Instant::now();
        let mut cache = RegistryCache::new(1, TTL);
        cache.apply(snapshot(0, &["a", "b", "c"]), t);
        cache.set_alive(alive(&["a", "b"]), t);
        // The service restarted without its state: an empty snapshot.
        assert!(cache.apply(snapshot(0, &[]), t));
        assert_eq!(
            ids(&cache),
            ["zretained/a", "zretained/b"],
            "c (silent) is gone"
        );
        assert_eq!(cache.retained(), 2);
        // a publishes again: listed again, no longer retained.
        let upsert = DiscoveryEvent::Upsert {
            index: 0,
            record: Box::new(rec("a")),
        };
        cache.apply(upsert, t);
        assert_eq!(ids(&cache), ["service/000/a", "zretained/b"]);
        // b's tunnel goes silent (it left, or died): removed.
        assert!(cache.set_alive(alive(&["a"]), t));
        assert_eq!(ids(&cache), ["service/000/a"]);
        // A delete of a live member keeps it too (someone who knows only the cluster id).
        let remove = DiscoveryEvent::Remove {
            index: 0,
            node_id: "a".into(),
        };
        cache.apply(remove, t);
        assert_eq!(ids(&cache), ["zretained/a"]);
    }

    #[test]
    fn another_service_still_listing_a_member_keeps_it_listed() {
        let t = Instant::now();
        let mut cache = RegistryCache::new(2, TTL);
        cache.apply(snapshot(0, &["a"]), t);
        cache.apply(snapshot(1, &["a"]), t);
        cache.apply(snapshot(0, &[]), t);
        assert_eq!(ids(&cache), ["service/001/a"]);
        assert_eq!(cache.retained(), 0);
    }

    #[test]
    fn an_unreadable_record_never_replaces_the_last_good_one_until_its_expiry() {
        let t = Instant::now();
        let mut cache = RegistryCache::new(1, TTL);
        cache.apply(snapshot(0, &["a", "b"]), t);
        let unreadable = || DiscoveryEvent::Unreadable {
            index: 0,
            node_id: "a".into(),
        };
        cache.apply(unreadable(), t);
        assert!(!cache.apply(unreadable(), t + secs(5)), "expiry not pushed");
        // A new session's snapshot still holds the garbage for a: kept, with its expiry.
        cache.apply(
            DiscoveryEvent::Snapshot {
                index: 0,
                affiliates: vec![rec("b")],
                unreadable: vec!["a".into(), "never-seen".into()],
            },
            t + secs(60),
        );
        assert_eq!(ids(&cache), ["service/000/a", "service/000/b"]);
        assert!(!cache.expire(t + TTL - secs(1)));
        assert!(cache.expire(t + TTL));
        assert_eq!(ids(&cache), ["service/000/b"]);
    }

    /// A service that is down keeps what it listed (an outage removes nothing), but its copy
    /// of a node that changed its key since is stale: the connected service's record wins.
    #[test]
    fn a_connected_services_record_wins_over_a_disconnected_ones() {
        let t = Instant::now();
        let mut cache = RegistryCache::new(2, TTL);
        let keyed = |key: &str| AffiliateRecord {
            kubespan: Some(crate::model::KubeSpanInfo {
                public_key: key.into(),
                address: std::net::Ipv6Addr::UNSPECIFIED,
                additional_addresses: Vec::new(),
                exclude_advertised_networks: Vec::new(),
                learned_endpoints: Vec::new(),
                relays: Vec::new(),
                sealed_psk: None,
            }),
            ..rec("a")
        };
        let merged_key = |cache: &RegistryCache| {
            crate::members::merge_affiliates(cache.raw().iter().map(|(id, r)| (id.as_str(), *r)))
                ["a"]
                .kubespan
                .as_ref()
                .unwrap()
                .public_key
                .clone()
        };
        for index in [0, 1] {
            cache.apply(
                DiscoveryEvent::Snapshot {
                    index,
                    affiliates: vec![keyed("old")],
                    unreadable: vec![],
                },
                t,
            );
        }
        cache.apply(
            DiscoveryEvent::Disconnected {
                index: 1,
                error: "gone".into(),
            },
            t,
        );
        cache.apply(
            DiscoveryEvent::Upsert {
                index: 0,
                record: Box::new(keyed("new")),
            },
            t,
        );
        assert_eq!(merged_key(&cache), "new", "service 1's copy is stale");
        assert_eq!(ids(&cache), ["service/-001/a", "service/000/a"]);
    }

    /// A service removed by a reload: what its client sent before it stopped is ignored.
    #[test]
    fn events_of_a_removed_service_are_ignored() {
        let t = Instant::now();
        let mut cache = RegistryCache::new(2, TTL);
        cache.apply(snapshot(1, &["a"]), t);
        assert!(cache.remove_source(1));
        assert!(!cache.apply(snapshot(1, &["b"]), t));
        assert!(!cache.apply(
            DiscoveryEvent::Upsert {
                index: 1,
                record: Box::new(rec("c")),
            },
            t
        ));
        assert!(
            ids(&cache).iter().all(|id| !id.starts_with("service/")),
            "{:?}",
            ids(&cache)
        );
    }

    #[test]
    fn a_readable_record_of_another_service_wins_over_a_shadowed_one() {
        let t = Instant::now();
        let mut cache = RegistryCache::new(2, TTL);
        cache.apply(snapshot(0, &["a"]), t);
        cache.apply(snapshot(1, &["a"]), t);
        cache.apply(
            DiscoveryEvent::Unreadable {
                index: 1,
                node_id: "a".into(),
            },
            t,
        );
        assert_eq!(ids(&cache), ["service/000/a"]);
        cache.apply(snapshot(0, &[]), t);
        assert_eq!(
            ids(&cache),
            ["service/001/a"],
            "the last good one, as nothing else"
        );
    }

    #[test]
    fn warm_members_serve_until_a_service_answers_then_get_a_grace_for_their_tunnels() {
        let t = Instant::now();
        let mut cache = RegistryCache::new(1, TTL);
        // Expiries in unix ms, loaded at unix ms 1_000: a expires in 4 s, b in 8 s, c already.
        cache.load_warm(
            vec![(rec("a"), 5_000), (rec("b"), 9_000), (rec("c"), 500)],
            t,
            1_000,
        );
        assert_eq!(ids(&cache), ["warm/a", "warm/b"]);
        assert!(cache.expire(t + secs(4)), "a's record expired (monotonic)");
        assert_eq!(ids(&cache), ["warm/b"]);
        // Persisted with its own expiry, whatever the wall clock says now.
        assert_eq!(
            cache.to_persist(t + secs(4), 50_000),
            vec![(rec("b"), 54_000)]
        );
        // A service answers at once, empty (restarted without state), before any handshake:
        // b stays for the grace, then only while its tunnel is alive.
        cache.apply(snapshot(0, &[]), t + secs(5));
        assert_eq!(ids(&cache), ["zretained/b"]);
        assert!(!cache.expire(t + secs(5) + WARM_GRACE - secs(1)));
        cache.set_alive(alive(&["b"]), t + secs(6));
        assert!(!cache.expire(t + secs(5) + WARM_GRACE + secs(1)), "alive");
        assert!(cache.set_alive(alive(&[]), t + secs(5) + WARM_GRACE + secs(2)));
        assert!(ids(&cache).is_empty());
    }

    #[test]
    fn an_unreadable_record_in_the_first_snapshot_keeps_the_warm_one() {
        let t = Instant::now();
        let mut cache = RegistryCache::new(1, TTL);
        cache.load_warm(vec![(rec("a"), 1_000_000)], t, 0);
        cache.apply(
            DiscoveryEvent::Snapshot {
                index: 0,
                affiliates: vec![],
                unreadable: vec!["a".into()],
            },
            t,
        );
        assert_eq!(ids(&cache), ["service/000/a"]);
        assert!(
            cache.expire(t + secs(1_000)),
            "with the warm entry's expiry"
        );
    }

    #[test]
    fn persisted_expiries_follow_their_kind() {
        let t = Instant::now();
        let mut cache = RegistryCache::new(1, TTL);
        cache.apply(snapshot(0, &["listed", "shadowed", "gone"]), t);
        cache.apply(
            DiscoveryEvent::Unreadable {
                index: 0,
                node_id: "shadowed".into(),
            },
            t,
        );
        cache.set_alive(alive(&["gone"]), t);
        cache.apply(
            DiscoveryEvent::Remove {
                index: 0,
                node_id: "gone".into(),
            },
            t,
        );
        let later = t + secs(600);
        let ttl_ms = TTL.as_millis() as i64;
        assert_eq!(
            cache.to_persist(later, 0),
            vec![
                (rec("gone"), RETAINED_CACHE_TTL.as_millis() as i64),
                (rec("listed"), ttl_ms),
                (rec("shadowed"), ttl_ms - 600_000),
            ]
        );
    }

    #[test]
    fn public_ips_are_distinct_in_endpoint_order() {
        let mut cache = RegistryCache::new(3, TTL);
        for (index, ip) in [(0, "203.0.113.1"), (1, "203.0.113.1"), (2, "198.51.100.2")] {
            cache.apply(
                DiscoveryEvent::Connected {
                    index,
                    public_ip: Some(ip.parse().unwrap()),
                },
                Instant::now(),
            );
        }
        assert_eq!(
            cache.public_ips(),
            [
                "203.0.113.1".parse::<IpAddr>().unwrap(),
                "198.51.100.2".parse().unwrap()
            ]
        );
    }

    /// A reload adds a discovery service (a new index) and removes one: what only the removed
    /// one listed leaves (unless its tunnel is alive), its public IP is forgotten.
    #[test]
    fn sources_are_added_and_removed_by_reloads() {
        let now = Instant::now();
        let mut cache = RegistryCache::new(1, TTL);
        assert!(cache.apply(snapshot(0, &["a"]), now));
        let added = cache.add_source();
        assert_eq!(added, 1);
        assert!(cache.apply(snapshot(1, &["a", "b"]), now));
        cache.apply(
            DiscoveryEvent::Connected {
                index: 1,
                public_ip: Some("203.0.113.1".parse().unwrap()),
            },
            now,
        );
        assert_eq!(
            ids(&cache),
            ["service/000/a", "service/001/a", "service/001/b"]
        );
        assert!(cache.remove_source(1));
        assert_eq!(
            ids(&cache),
            ["service/000/a"],
            "b was only listed by the removed service"
        );
        assert!(cache.public_ips().is_empty());
        assert!(!cache.remove_source(1), "nothing left to remove");
        assert!(!cache.remove_source(7), "an unknown index is ignored");
        // Events of the removed client that arrive late change nothing it listed back.
        assert_eq!(cache.add_source(), 2, "indexes are never reused");
    }
}
