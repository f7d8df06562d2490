//! The relay's state without I/O: which (cluster, public key) is registered by which
//! connection, where a packet goes, and how many connections each source may hold. Generic over
//! the connection handle `H`, so tests use plain values and the server a QUIC connection.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::protocol::PublicKey;

/// Identifies one registration, so a connection that was replaced cannot remove its successor
/// when it finally goes away.
pub type RegistrationId = u64;

struct Registration<H> {
    id: RegistrationId,
    verifier: [u8; 32],
    handle: H,
}

/// Where a packet goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a, H> {
    Deliver(&'a H),
    /// No client of the sender's cluster has that key (drop and count).
    UnknownDestination,
    /// Addressed to the sender itself (drop: it is a bug or a probe, never useful).
    ToSelf,
}

#[derive(Debug, PartialEq, Eq)]
pub enum RegisterError {
    /// The cluster already has `max` registrations.
    ClusterFull { max: usize },
}

/// The outcome of a registration.
#[derive(Debug)]
pub struct Registered<H> {
    pub id: RegistrationId,
    /// The connection that held this key before (close it: the newest registration wins, so a
    /// node that reconnected after a network change is reachable at once).
    pub replaced: Option<H>,
}

pub struct Router<H> {
    clusters: HashMap<String, HashMap<PublicKey, Registration<H>>>,
    next_id: RegistrationId,
    max_per_cluster: usize,
    registrations: usize,
}

impl<H> Router<H> {
    pub fn new(max_per_cluster: usize) -> Self {
        Self {
            clusters: HashMap::new(),
            next_id: 1,
            max_per_cluster,
            registrations: 0,
        }
    }

    /// Registers `key` in `cluster`, replacing an older registration of the same key.
    /// `verifier` is the cluster verifier the client authenticated against (see [`Self::revoke`]).
    pub fn register(
        &mut self,
        cluster: &str,
        key: PublicKey,
        verifier: [u8; 32],
        handle: H,
    ) -> Result<Registered<H>, RegisterError> {
        let members = self.clusters.entry(cluster.to_owned()).or_default();
        // A reconnect of a known key is always let in, even into a full cluster.
        if members.len() >= self.max_per_cluster && !members.contains_key(&key) {
            if members.is_empty() {
                self.clusters.remove(cluster);
            }
            return Err(RegisterError::ClusterFull {
                max: self.max_per_cluster,
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        let replaced = members.insert(
            key,
            Registration {
                id,
                verifier,
                handle,
            },
        );
        if replaced.is_none() {
            self.registrations += 1;
        }
        Ok(Registered {
            id,
            replaced: replaced.map(|r| r.handle),
        })
    }

    /// Removes the registration `id` of `key` if it is still the current one.
    pub fn unregister(&mut self, cluster: &str, key: &PublicKey, id: RegistrationId) -> bool {
        let Some(members) = self.clusters.get_mut(cluster) else {
            return false;
        };
        if members.get(key).is_none_or(|r| r.id != id) {
            return false;
        }
        members.remove(key);
        self.registrations -= 1;
        if members.is_empty() {
            self.clusters.remove(cluster);
        }
        true
    }

    /// Where a packet from `from` in `cluster` to `to` goes. Only within the sender's cluster.
    pub fn route(&self, cluster: &str, from: &PublicKey, to: &PublicKey) -> Route<'_, H> {
        if from == to {
            return Route::ToSelf;
        }
        match self.clusters.get(cluster).and_then(|m| m.get(to)) {
            Some(registration) => Route::Deliver(&registration.handle),
            None => Route::UnknownDestination,
        }
    }

    /// Removes every registration whose cluster no longer accepts the verifier it authenticated
    /// with (`allowed(cluster, verifier)` is false) and returns their handles to close: a
    /// removed cluster or a rotated verifier revokes the connections already in.
    pub fn revoke(&mut self, mut allowed: impl FnMut(&str, &[u8; 32]) -> bool) -> Vec<H> {
        let mut revoked = Vec::new();
        self.clusters.retain(|cluster, members| {
            let keys: Vec<PublicKey> = members
                .iter()
                .filter(|(_, r)| !allowed(cluster, &r.verifier))
                .map(|(k, _)| *k)
                .collect();
            for key in keys {
                if let Some(r) = members.remove(&key) {
                    revoked.push(r.handle);
                }
            }
            !members.is_empty()
        });
        self.registrations -= revoked.len();
        revoked
    }

    pub fn registrations(&self) -> usize {
        self.registrations
    }

    pub fn clusters(&self) -> usize {
        self.clusters.len()
    }
}

/// The key connection limits are counted under: the address for IPv4, the /64 for IPv6 (one
/// host usually owns a whole /64, so counting addresses would not limit it at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKey {
    V4(u32),
    V6Prefix(u64),
}

impl SourceKey {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(u32::from(v4)),
                None => Self::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionRefusal {
    Total,
    PerSource,
}

impl ConnectionRefusal {
    pub fn label(self) -> &'static str {
        match self {
            Self::Total => "max_connections",
            Self::PerSource => "max_connections_per_ip",
        }
    }
}

/// Counts open connections, in total and per [`SourceKey`].
#[derive(Debug)]
pub struct ConnectionLimiter {
    max_total: usize,
    max_per_source: usize,
    total: usize,
    per_source: HashMap<SourceKey, usize>,
}

impl ConnectionLimiter {
    pub fn new(max_total: usize, max_per_source: usize) -> Self {
        Self {
            max_total,
            max_per_source,
            total: 0,
            per_source: HashMap::new(),
        }
    }

    pub fn acquire(&mut self, ip: IpAddr) -> Result<(), ConnectionRefusal> {
        if self.total >= self.max_total {
            return Err(ConnectionRefusal::Total);
        }
        let count = self.per_source.entry(SourceKey::of(ip)).or_default();
        if *count >= self.max_per_source {
            return Err(ConnectionRefusal::PerSource);
        }
        *count += 1;
        self.total += 1;
        Ok(())
    }

    pub fn release(&mut self, ip: IpAddr) {
        let key = SourceKey::of(ip);
        if let Some(count) = self.per_source.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                self.per_source.remove(&key);
            }
            self.total -= 1;
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V: [u8; 32] = [0xee; 32];

    #[test]
    fn routes_only_within_the_cluster() {
        let mut router = Router::new(10);
        router.register("a", [1; 32], V, "a1").unwrap();
        router.register("a", [2; 32], V, "a2").unwrap();
        router.register("b", [3; 32], V, "b3").unwrap();
        assert_eq!(router.route("a", &[1; 32], &[2; 32]), Route::Deliver(&"a2"));
        assert_eq!(router.route("a", &[2; 32], &[1; 32]), Route::Deliver(&"a1"));
        assert_eq!(
            router.route("a", &[1; 32], &[3; 32]),
            Route::UnknownDestination
        );
        assert_eq!(
            router.route("b", &[3; 32], &[1; 32]),
            Route::UnknownDestination
        );
        assert_eq!(router.route("a", &[1; 32], &[1; 32]), Route::ToSelf);
        assert_eq!((router.registrations(), router.clusters()), (3, 2));
    }

    #[test]
    fn the_newest_registration_wins_and_the_old_cannot_remove_it() {
        let mut router = Router::new(10);
        let old = router.register("a", [1; 32], V, "old").unwrap();
        assert!(old.replaced.is_none());
        let new = router.register("a", [1; 32], V, "new").unwrap();
        assert_eq!(new.replaced, Some("old"));
        assert_eq!(router.registrations(), 1);
        // The old connection closing later must not unregister the new one.
        assert!(!router.unregister("a", &[1; 32], old.id));
        assert_eq!(
            router.route("a", &[2; 32], &[1; 32]),
            Route::Deliver(&"new")
        );
        assert!(router.unregister("a", &[1; 32], new.id));
        assert_eq!((router.registrations(), router.clusters()), (0, 0));
    }

    #[test]
    fn a_full_cluster_refuses_newcomers_but_not_reconnects() {
        let mut router = Router::new(2);
        router.register("a", [1; 32], V, 1).unwrap();
        router.register("a", [2; 32], V, 2).unwrap();
        assert_eq!(
            router.register("a", [3; 32], V, 3).unwrap_err(),
            RegisterError::ClusterFull { max: 2 }
        );
        assert!(router.register("a", [2; 32], V, 22).is_ok());
        assert!(router.register("b", [3; 32], V, 3).is_ok());
    }

    #[test]
    fn revoke_drops_registrations_of_removed_or_rotated_clusters() {
        let mut router = Router::new(10);
        router.register("a", [1; 32], V, "a1").unwrap();
        router.register("b", [2; 32], V, "b2").unwrap();
        router.register("c", [3; 32], [0; 32], "c3").unwrap();
        let mut revoked = router.revoke(|cluster, verifier| cluster != "b" && *verifier == V);
        revoked.sort();
        assert_eq!(revoked, ["b2", "c3"]);
        assert_eq!((router.registrations(), router.clusters()), (1, 1));
    }

    #[test]
    fn connection_limits_count_ipv6_by_prefix() {
        let mut limiter = ConnectionLimiter::new(4, 2);
        let a1: IpAddr = "2001:db8::1".parse().unwrap();
        let a2: IpAddr = "2001:db8::2".parse().unwrap();
        let other: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        limiter.acquire(a1).unwrap();
        limiter.acquire(a2).unwrap();
        assert_eq!(limiter.acquire(a1), Err(ConnectionRefusal::PerSource));
        limiter.acquire(other).unwrap();
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        limiter.acquire(v4).unwrap();
        assert_eq!(limiter.acquire(mapped), Err(ConnectionRefusal::Total));
        limiter.release(a1);
        assert_eq!(limiter.total(), 3);
        // The IPv4-mapped form counts as the same IPv4 source.
        limiter.acquire(mapped).unwrap();
        limiter.release(a2);
        assert_eq!(limiter.acquire(v4), Err(ConnectionRefusal::PerSource));
        limiter.release(v4);
        limiter.acquire(mapped).unwrap();
        // Releasing an address never acquired changes nothing.
        limiter.release("198.51.100.1".parse().unwrap());
        assert_eq!(limiter.total(), 3);
    }
}
