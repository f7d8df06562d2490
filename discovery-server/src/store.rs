//! The affiliate store: pure state and rules, no I/O, no gRPC, no clock of its own.
//!
//! Every operation takes `now` (monotonic milliseconds, see [`crate::clock`]) and returns what
//! changed, so the caller decides how to notify watchers and when to persist. Clusters are
//! isolated maps of affiliates; a cluster exists here while it has affiliates.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

use crate::clock::MonoMillis;
use crate::limits::{Limits, StoreError, Update};

/// One stored endpoint: opaque (client-encrypted) bytes with their own expiry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEndpoint {
    pub data: Bytes,
    pub expires_at: MonoMillis,
}

/// One stored affiliate. `data` is empty until an update carries data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredAffiliate {
    pub data: Bytes,
    pub endpoints: Vec<StoredEndpoint>,
    pub expires_at: MonoMillis,
}

impl StoredAffiliate {
    fn payload_len(&self) -> usize {
        self.data.len() + self.endpoints.iter().map(|e| e.data.len()).sum::<usize>()
    }
}

/// What a watcher must be told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The affiliate changed; its new state is in the store (read it only if someone watches).
    Upserted {
        cluster_id: String,
        affiliate_id: String,
    },
    /// The affiliate is gone (deleted or expired).
    Removed {
        cluster_id: String,
        affiliate_id: String,
    },
}

impl Change {
    pub fn cluster_id(&self) -> &str {
        match self {
            Change::Upserted { cluster_id, .. } | Change::Removed { cluster_id, .. } => cluster_id,
        }
    }
}

/// Totals for metrics and the landing page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub clusters: usize,
    pub affiliates: usize,
    pub endpoints: usize,
    pub payload_bytes: usize,
}

#[derive(Debug, Default)]
pub struct Store {
    limits: Limits,
    clusters: HashMap<String, BTreeMap<String, StoredAffiliate>>,
    /// Affiliates, endpoints and payload bytes, kept as they change: the landing page and the
    /// metrics read them under the store's lock, and a scan of every affiliate there would let
    /// anyone who can load the page stall all updates.
    counted: Totals,
}

/// What one affiliate adds to the totals.
fn counts(affiliate: &StoredAffiliate) -> (usize, usize) {
    (affiliate.endpoints.len(), affiliate.payload_len())
}

impl Store {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            clusters: HashMap::new(),
            counted: Totals::default(),
        }
    }

    fn uncount(&mut self, (endpoints, payload): (usize, usize)) {
        self.counted.affiliates -= 1;
        self.counted.endpoints -= endpoints;
        self.counted.payload_bytes -= payload;
    }

    fn count(&mut self, (endpoints, payload): (usize, usize)) {
        self.counted.affiliates += 1;
        self.counted.endpoints += endpoints;
        self.counted.payload_bytes += payload;
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Applies one update. Returns the affiliate's new state when anything a watcher can see
    /// changed (data, or an endpoint added); a refresh that only extends expiries returns `None`.
    pub fn update(
        &mut self,
        update: Update,
        now: MonoMillis,
    ) -> Result<Option<Change>, StoreError> {
        self.limits.check_update(&update)?;
        let expires_at = now.saturating_add(update.ttl.as_millis() as i64);
        let cluster_len = self.clusters.get(&update.cluster_id).map_or(0, |c| c.len());
        let existing = self
            .clusters
            .get(&update.cluster_id)
            .and_then(|c| c.get(&update.affiliate_id));

        if existing.is_none() && cluster_len >= self.limits.max_affiliates_per_cluster {
            return Err(StoreError::ResourceExhausted(format!(
                "cluster has {cluster_len} affiliates, the limit is {}",
                self.limits.max_affiliates_per_cluster
            )));
        }
        let mut new_endpoints: Vec<&Bytes> = Vec::new();
        for endpoint in &update.endpoints {
            let known = existing.is_some_and(|a| a.endpoints.iter().any(|e| e.data == *endpoint));
            if !known && !new_endpoints.contains(&endpoint) {
                new_endpoints.push(endpoint);
            }
        }
        let stored_endpoints = existing.map_or(0, |a| a.endpoints.len());
        if stored_endpoints + new_endpoints.len() > self.limits.max_endpoints_per_affiliate {
            return Err(StoreError::ResourceExhausted(format!(
                "affiliate would have {} endpoints, the limit is {}",
                stored_endpoints + new_endpoints.len(),
                self.limits.max_endpoints_per_affiliate
            )));
        }

        let new_endpoints_count = new_endpoints.len();
        let before = existing.map(counts);
        // Validated: from here on the update is applied in full.
        let cluster = self.clusters.entry(update.cluster_id.clone()).or_default();
        let created = !cluster.contains_key(&update.affiliate_id);
        let affiliate = cluster.entry(update.affiliate_id.clone()).or_default();
        let mut changed = created;
        if let Some(data) = update.data {
            if affiliate.data != data {
                affiliate.data = data;
                changed = true;
            }
            affiliate.expires_at = expires_at;
        }
        // Exactly the room needed: a doubling Vec would waste memory on every affiliate.
        affiliate.endpoints.reserve_exact(new_endpoints_count);
        for endpoint in update.endpoints {
            match affiliate.endpoints.iter_mut().find(|e| e.data == endpoint) {
                Some(stored) => stored.expires_at = stored.expires_at.max(expires_at),
                None => {
                    affiliate.endpoints.push(StoredEndpoint {
                        data: endpoint,
                        expires_at,
                    });
                    changed = true;
                }
            }
        }
        if let Some(latest) = affiliate.endpoints.iter().map(|e| e.expires_at).max() {
            affiliate.expires_at = affiliate.expires_at.max(latest);
        }
        let after = counts(affiliate);
        if let Some(before) = before {
            self.uncount(before);
        }
        self.count(after);
        Ok(changed.then_some(Change::Upserted {
            cluster_id: update.cluster_id,
            affiliate_id: update.affiliate_id,
        }))
    }

    /// Removes one affiliate; deleting an absent one is not an error.
    pub fn delete(
        &mut self,
        cluster_id: &str,
        affiliate_id: &str,
    ) -> Result<Option<Change>, StoreError> {
        self.limits.check_cluster_id(cluster_id)?;
        self.limits.check_affiliate_id(affiliate_id)?;
        let Some(cluster) = self.clusters.get_mut(cluster_id) else {
            return Ok(None);
        };
        let removed = cluster.remove(affiliate_id);
        if cluster.is_empty() {
            self.clusters.remove(cluster_id);
        }
        if let Some(affiliate) = &removed {
            self.uncount(counts(affiliate));
        }
        let removed = removed.is_some();
        Ok(removed.then(|| Change::Removed {
            cluster_id: cluster_id.to_owned(),
            affiliate_id: affiliate_id.to_owned(),
        }))
    }

    /// Every affiliate of a cluster, ordered by id; empty for an unknown cluster.
    pub fn list(&self, cluster_id: &str) -> Result<Vec<(String, StoredAffiliate)>, StoreError> {
        self.limits.check_cluster_id(cluster_id)?;
        Ok(self
            .cluster(cluster_id)
            .map(|c| c.iter().map(|(id, a)| (id.clone(), a.clone())).collect())
            .unwrap_or_default())
    }

    pub fn cluster(&self, cluster_id: &str) -> Option<&BTreeMap<String, StoredAffiliate>> {
        self.clusters.get(cluster_id)
    }

    /// Sum of payload bytes of a cluster: a cheap size estimate for its snapshot.
    pub fn cluster_payload_bytes(&self, cluster_id: &str) -> usize {
        self.cluster(cluster_id)
            .map_or(0, |c| c.values().map(StoredAffiliate::payload_len).sum())
    }

    /// Drops expired affiliates and expired endpoints. Returns the changes, one per affiliate.
    pub fn collect_garbage(&mut self, now: MonoMillis) -> Vec<Change> {
        let mut changes = Vec::new();
        let counted = &mut self.counted;
        self.clusters.retain(|cluster_id, affiliates| {
            affiliates.retain(|affiliate_id, affiliate| {
                let (endpoints, payload) = counts(affiliate);
                counted.affiliates -= 1;
                counted.endpoints -= endpoints;
                counted.payload_bytes -= payload;
                if affiliate.expires_at <= now {
                    changes.push(Change::Removed {
                        cluster_id: cluster_id.clone(),
                        affiliate_id: affiliate_id.clone(),
                    });
                    return false;
                }
                let before = affiliate.endpoints.len();
                affiliate.endpoints.retain(|e| e.expires_at > now);
                if affiliate.endpoints.len() != before {
                    changes.push(Change::Upserted {
                        cluster_id: cluster_id.clone(),
                        affiliate_id: affiliate_id.clone(),
                    });
                }
                let (endpoints, payload) = counts(affiliate);
                counted.affiliates += 1;
                counted.endpoints += endpoints;
                counted.payload_bytes += payload;
                true
            });
            !affiliates.is_empty()
        });
        changes
    }

    /// Constant time: the counts are kept as the store changes.
    pub fn totals(&self) -> Totals {
        Totals {
            clusters: self.clusters.len(),
            ..self.counted
        }
    }

    /// Every cluster with its affiliates, for snapshots.
    pub fn clusters(&self) -> impl Iterator<Item = (&String, &BTreeMap<String, StoredAffiliate>)> {
        self.clusters.iter()
    }

    // ---- a mirror of another store (the etcd backend): states set as they are, no rules ----

    /// Sets an affiliate's data and expiry as another store has them, creating it if needed.
    /// Returns whether a watcher would see a difference (new affiliate, other data).
    pub fn put_data(
        &mut self,
        cluster_id: &str,
        affiliate_id: &str,
        data: Bytes,
        expires_at: MonoMillis,
    ) -> bool {
        let cluster = self.clusters.entry(cluster_id.to_owned()).or_default();
        let (visible, before) = match cluster.get_mut(affiliate_id) {
            Some(affiliate) => {
                let before = counts(affiliate);
                let visible = affiliate.data != data;
                affiliate.data = data;
                affiliate.expires_at = expires_at;
                (visible, Some(before))
            }
            None => {
                cluster.insert(
                    affiliate_id.to_owned(),
                    StoredAffiliate {
                        data,
                        endpoints: Vec::new(),
                        expires_at,
                    },
                );
                (true, None)
            }
        };
        let after = counts(&self.clusters[cluster_id][affiliate_id]);
        if let Some(before) = before {
            self.uncount(before);
        }
        self.count(after);
        visible
    }

    /// Sets one endpoint of an existing affiliate. Returns whether it is new (a watcher sees
    /// it); an endpoint of an unknown affiliate is ignored.
    pub fn put_endpoint(
        &mut self,
        cluster_id: &str,
        affiliate_id: &str,
        endpoint: Bytes,
        expires_at: MonoMillis,
    ) -> bool {
        let Some(affiliate) = self
            .clusters
            .get_mut(cluster_id)
            .and_then(|c| c.get_mut(affiliate_id))
        else {
            return false;
        };
        match affiliate.endpoints.iter_mut().find(|e| e.data == endpoint) {
            Some(stored) => {
                stored.expires_at = expires_at;
                false
            }
            None => {
                self.counted.endpoints += 1;
                self.counted.payload_bytes += endpoint.len();
                affiliate.endpoints.push(StoredEndpoint {
                    data: endpoint,
                    expires_at,
                });
                true
            }
        }
    }

    /// Removes one endpoint; returns whether it was there.
    pub fn remove_endpoint(
        &mut self,
        cluster_id: &str,
        affiliate_id: &str,
        endpoint: &[u8],
    ) -> bool {
        let Some(affiliate) = self
            .clusters
            .get_mut(cluster_id)
            .and_then(|c| c.get_mut(affiliate_id))
        else {
            return false;
        };
        let before = affiliate.endpoints.len();
        affiliate.endpoints.retain(|e| e.data != endpoint);
        let removed = before - affiliate.endpoints.len();
        self.counted.endpoints -= removed;
        self.counted.payload_bytes -= removed * endpoint.len();
        removed > 0
    }

    /// Replaces an affiliate with `stored`. Returns whether a watcher would see a difference.
    pub fn put_affiliate(
        &mut self,
        cluster_id: &str,
        affiliate_id: &str,
        stored: StoredAffiliate,
    ) -> bool {
        let cluster = self.clusters.entry(cluster_id.to_owned()).or_default();
        let after = counts(&stored);
        let (visible, before) = match cluster.insert(affiliate_id.to_owned(), stored) {
            Some(old) => {
                let new = &cluster[affiliate_id];
                let mut old_endpoints: Vec<&Bytes> =
                    old.endpoints.iter().map(|e| &e.data).collect();
                let mut new_endpoints: Vec<&Bytes> =
                    new.endpoints.iter().map(|e| &e.data).collect();
                old_endpoints.sort();
                new_endpoints.sort();
                (
                    old.data != new.data || old_endpoints != new_endpoints,
                    Some(counts(&old)),
                )
            }
            None => (true, None),
        };
        if let Some(before) = before {
            self.uncount(before);
        }
        self.count(after);
        visible
    }

    /// Inserts one cluster's restored affiliates verbatim (snapshot load), merged into what is
    /// there. Limits are not re-checked: a snapshot taken under larger limits must not lose data
    /// when loaded under smaller ones. Whole clusters, so the id is not copied per affiliate
    /// (with a long id and many affiliates that copying would be quadratic in the file size).
    pub fn restore_cluster(
        &mut self,
        cluster_id: String,
        affiliates: BTreeMap<String, StoredAffiliate>,
    ) {
        if affiliates.is_empty() {
            return; // A cluster exists here only while it has affiliates.
        }
        for affiliate in affiliates.values() {
            self.count(counts(affiliate));
        }
        match self.clusters.entry(cluster_id) {
            std::collections::hash_map::Entry::Occupied(mut cluster) => {
                let cluster = cluster.get_mut();
                for (id, affiliate) in affiliates {
                    if let Some(replaced) = cluster.insert(id, affiliate) {
                        let (endpoints, payload) = counts(&replaced);
                        self.counted.affiliates -= 1;
                        self.counted.endpoints -= endpoints;
                        self.counted.payload_bytes -= payload;
                    }
                }
            }
            std::collections::hash_map::Entry::Vacant(cluster) => {
                cluster.insert(affiliates);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn update(
        affiliate: &str,
        data: Option<&'static [u8]>,
        endpoints: &[&'static [u8]],
        ttl: Duration,
    ) -> Update {
        Update {
            cluster_id: "c1".into(),
            affiliate_id: affiliate.into(),
            data: data.map(Bytes::from_static),
            endpoints: endpoints.iter().map(|e| Bytes::from_static(e)).collect(),
            ttl,
        }
    }

    fn stored<'a>(store: &'a Store, affiliate: &str) -> &'a StoredAffiliate {
        store.cluster("c1").unwrap().get(affiliate).unwrap()
    }

    #[test]
    fn data_is_replaced_when_present_and_kept_when_absent() {
        let mut store = Store::default();
        store.update(update("a", Some(b"v1"), &[], MIN), 0).unwrap();
        store.update(update("a", None, &[b"e1"], MIN), 10).unwrap();
        assert_eq!(stored(&store, "a").data, Bytes::from_static(b"v1"));
        store
            .update(update("a", Some(b"v2"), &[], MIN), 20)
            .unwrap();
        assert_eq!(stored(&store, "a").data, Bytes::from_static(b"v2"));
    }

    #[test]
    fn endpoints_merge_in_arrival_order_without_duplicates() {
        let mut store = Store::default();
        store
            .update(update("a", Some(b"d"), &[b"e1", b"e2", b"e1"], MIN), 0)
            .unwrap();
        store
            .update(update("a", None, &[b"e3", b"e2"], MIN), 0)
            .unwrap();
        let endpoints: Vec<_> = stored(&store, "a")
            .endpoints
            .iter()
            .map(|e| e.data.clone())
            .collect();
        assert_eq!(endpoints, [&b"e1"[..], b"e2", b"e3"]);
    }

    #[test]
    fn each_endpoint_expires_on_its_own() {
        let mut store = Store::default();
        store
            .update(update("a", Some(b"d"), &[b"old"], MIN), 0)
            .unwrap();
        store
            .update(update("a", Some(b"d"), &[b"new"], MIN), 30_000)
            .unwrap();
        let changes = store.collect_garbage(60_000);
        assert_eq!(
            changes.len(),
            1,
            "the affiliate loses one endpoint: {changes:?}"
        );
        let endpoints: Vec<_> = stored(&store, "a")
            .endpoints
            .iter()
            .map(|e| e.data.clone())
            .collect();
        assert_eq!(endpoints, [&b"new"[..]]);
        assert_eq!(
            store.collect_garbage(90_000),
            vec![Change::Removed {
                cluster_id: "c1".into(),
                affiliate_id: "a".into()
            }]
        );
        assert!(store.cluster("c1").is_none(), "an empty cluster is dropped");
    }

    #[test]
    fn endpoint_refresh_extends_affiliate_expiry() {
        let mut store = Store::default();
        store.update(update("a", Some(b"d"), &[], MIN), 0).unwrap();
        store
            .update(update("a", None, &[b"e"], 2 * MIN), 0)
            .unwrap();
        assert_eq!(stored(&store, "a").expires_at, 120_000);
    }

    #[test]
    fn refresh_without_visible_change_does_not_notify() {
        let mut store = Store::default();
        assert!(
            store
                .update(update("a", Some(b"d"), &[b"e"], MIN), 0)
                .unwrap()
                .is_some()
        );
        assert!(
            store
                .update(update("a", Some(b"d"), &[b"e"], MIN), 10)
                .unwrap()
                .is_none()
        );
        assert!(
            store
                .update(update("a", None, &[b"e2"], MIN), 10)
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn endpoint_only_update_creates_affiliate_without_data() {
        let mut store = Store::default();
        let change = store
            .update(update("harvested", None, &[b"e"], MIN), 0)
            .unwrap();
        assert!(matches!(change, Some(Change::Upserted { .. })));
        assert!(stored(&store, "harvested").data.is_empty());
    }

    #[test]
    fn limits_refuse_and_change_nothing() {
        let limits = Limits {
            max_affiliates_per_cluster: 1,
            max_endpoints_per_affiliate: 2,
            ..Limits::default()
        };
        let mut store = Store::new(limits);
        store
            .update(update("a", Some(b"d"), &[b"e1"], MIN), 0)
            .unwrap();
        let err = store
            .update(update("b", Some(b"d"), &[], MIN), 0)
            .unwrap_err();
        assert!(matches!(err, StoreError::ResourceExhausted(_)), "{err}");
        let err = store
            .update(update("a", Some(b"new"), &[b"e2", b"e3"], MIN), 0)
            .unwrap_err();
        assert!(matches!(err, StoreError::ResourceExhausted(_)), "{err}");
        assert_eq!(
            stored(&store, "a").data,
            Bytes::from_static(b"d"),
            "refused update left data alone"
        );
        assert_eq!(stored(&store, "a").endpoints.len(), 1);
        // Re-sending a known endpoint never counts against the limit.
        store
            .update(update("a", None, &[b"e1", b"e2"], MIN), 0)
            .unwrap();
    }

    #[test]
    fn invalid_arguments_are_refused() {
        let mut store = Store::default();
        let cases = [
            Update {
                cluster_id: String::new(),
                ..update("a", None, &[], MIN)
            },
            Update {
                cluster_id: "x".repeat(257),
                ..update("a", None, &[], MIN)
            },
            update("", None, &[], MIN),
            update(&"y".repeat(257), None, &[], MIN),
            Update {
                data: Some(Bytes::from(vec![0; 2049])),
                ..update("a", None, &[], MIN)
            },
            Update {
                endpoints: vec![Bytes::from(vec![0; 33])],
                ..update("a", None, &[], MIN)
            },
            update("a", None, &[], 31 * MIN),
        ];
        for case in cases {
            let err = store.update(case.clone(), 0).unwrap_err();
            assert!(
                matches!(err, StoreError::InvalidArgument(_)),
                "{case:?} gave {err}"
            );
        }
        assert_eq!(store.totals(), Totals::default());
        // Exactly at the limits is fine.
        let at_limit = Update {
            cluster_id: "x".repeat(256),
            affiliate_id: "y".repeat(256),
            data: Some(Bytes::from(vec![0; 2048])),
            endpoints: vec![Bytes::from(vec![0; 32])],
            ttl: 30 * MIN,
        };
        store.update(at_limit, 0).unwrap();
    }

    #[test]
    fn delete_is_idempotent_and_clusters_are_isolated() {
        let mut store = Store::default();
        store.update(update("a", Some(b"d"), &[], MIN), 0).unwrap();
        store
            .update(
                Update {
                    cluster_id: "c2".into(),
                    ..update("a", Some(b"other"), &[], MIN)
                },
                0,
            )
            .unwrap();
        assert!(store.delete("c1", "a").unwrap().is_some());
        assert!(store.delete("c1", "a").unwrap().is_none());
        assert!(store.list("c1").unwrap().is_empty());
        assert_eq!(
            store.list("c2").unwrap()[0].1.data,
            Bytes::from_static(b"other")
        );
    }

    /// The totals kept as the store changes equal a full recount after every operation.
    #[test]
    fn kept_totals_match_a_recount_through_every_operation() {
        fn recount(store: &Store) -> Totals {
            let mut totals = Totals {
                clusters: store.clusters.len(),
                ..Totals::default()
            };
            for affiliate in store.clusters.values().flat_map(|c| c.values()) {
                totals.affiliates += 1;
                totals.endpoints += affiliate.endpoints.len();
                totals.payload_bytes += affiliate.payload_len();
            }
            totals
        }
        let mut store = Store::default();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut now = 0;
        for step in 0..5_000 {
            let cluster = format!("c{}", next(3));
            let affiliate = format!("a{}", next(6));
            match next(10) {
                0..=5 => {
                    let u = Update {
                        cluster_id: cluster,
                        affiliate_id: affiliate,
                        data: (next(3) > 0).then(|| Bytes::from(vec![b'd'; next(40) as usize])),
                        endpoints: (0..next(4))
                            .map(|i| Bytes::from(vec![i as u8; 1 + next(8) as usize]))
                            .collect(),
                        ttl: Duration::from_secs(1 + next(120)),
                    };
                    let _ = store.update(u, now);
                }
                6 => {
                    let _ = store.delete(&cluster, &affiliate);
                }
                7 | 8 => {
                    now += next(30_000) as i64;
                    store.collect_garbage(now);
                }
                _ => {
                    let restored: BTreeMap<String, StoredAffiliate> = (0..next(3))
                        .map(|i| {
                            (
                                format!("a{i}"),
                                StoredAffiliate {
                                    data: Bytes::from(vec![1; next(10) as usize]),
                                    endpoints: vec![StoredEndpoint {
                                        data: Bytes::from_static(b"ep"),
                                        expires_at: now + 60_000,
                                    }],
                                    expires_at: now + 60_000,
                                },
                            )
                        })
                        .collect();
                    store.restore_cluster(cluster, restored);
                }
            }
            assert_eq!(store.totals(), recount(&store), "after step {step}");
        }
    }
}
