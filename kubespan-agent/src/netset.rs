//! Sets of IP addresses built from CIDR prefixes, with the set algebra the peer allowed-IPs
//! computation needs (spec §4.1).
//!
//! A [`PrefixSet`] keeps IPv4 and IPv6 addresses apart, each as a sorted list of inclusive ranges
//! that neither overlap nor touch, so two sets holding the same addresses compare equal.
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are ordinary IPv6 addresses here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// An address family's integer form: `u32` for IPv4, `u128` for IPv6.
trait Word: Copy + Ord {
    const ZERO: Self;
    const MAX: Self;
    const BITS: u32;
    /// `self + 1`, or `None` at the top of the address space.
    fn succ(self) -> Option<Self>;
    /// `self - 1`, or `None` at zero.
    fn pred(self) -> Option<Self>;
    /// `self + other`, or `None` on overflow.
    fn plus(self, other: Self) -> Option<Self>;
    /// `self - other` for `self >= other`.
    fn distance(self, other: Self) -> Self;
    /// `2^k - 1` for `k <= BITS`.
    fn low_mask(k: u32) -> Self;
    /// Number of trailing zero bits (`BITS` for zero).
    fn trailing_zero_bits(self) -> u32;
}

macro_rules! impl_word {
    ($t:ty) => {
        impl Word for $t {
            const ZERO: Self = 0;
            const MAX: Self = <$t>::MAX;
            const BITS: u32 = <$t>::BITS;
            fn succ(self) -> Option<Self> {
                self.checked_add(1)
            }
            fn pred(self) -> Option<Self> {
                self.checked_sub(1)
            }
            fn plus(self, other: Self) -> Option<Self> {
                self.checked_add(other)
            }
            fn distance(self, other: Self) -> Self {
                self.wrapping_sub(other)
            }
            fn low_mask(k: u32) -> Self {
                if k >= Self::BITS {
                    Self::MAX
                } else {
                    (1 << k) - 1
                }
            }
            fn trailing_zero_bits(self) -> u32 {
                self.trailing_zeros()
            }
        }
    };
}

impl_word!(u32);
impl_word!(u128);

/// Sorts, drops empty ranges, and merges overlapping or adjacent ones.
fn normalize<T: Word>(mut ranges: Vec<(T, T)>) -> Vec<(T, T)> {
    ranges.retain(|(a, b)| a <= b);
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for r in ranges {
        push_merging(&mut out, r);
    }
    out
}

/// Union of two normalized range lists, by a linear merge.
fn union_ranges<T: Word>(x: &[(T, T)], y: &[(T, T)]) -> Vec<(T, T)> {
    if y.is_empty() {
        return x.to_vec();
    }
    if x.is_empty() {
        return y.to_vec();
    }
    let mut out: Vec<(T, T)> = Vec::with_capacity(x.len() + y.len());
    let (mut i, mut j) = (0, 0);
    loop {
        let next = match (x.get(i), y.get(j)) {
            (Some(&a), Some(&b)) => {
                if a <= b {
                    i += 1;
                    a
                } else {
                    j += 1;
                    b
                }
            }
            (Some(&a), None) => {
                i += 1;
                a
            }
            (None, Some(&b)) => {
                j += 1;
                b
            }
            (None, None) => break,
        };
        push_merging(&mut out, next);
    }
    out
}

/// Appends a range to a normalized list whose ranges all start at or before it, merging it
/// into the last range when they overlap or touch.
fn push_merging<T: Word>(out: &mut Vec<(T, T)>, (a, b): (T, T)) {
    if let Some(last) = out.last_mut() {
        // `last.1 == MAX` means everything after it is already covered.
        if last.1.succ().is_none_or(|next| a <= next) {
            if b > last.1 {
                last.1 = b;
            }
            return;
        }
    }
    out.push((a, b));
}

/// Intersection of two normalized range lists; the result is normalized too (pieces from
/// disjoint, non-adjacent inputs cannot touch each other).
fn intersect_ranges<T: Word>(x: &[(T, T)], y: &[(T, T)]) -> Vec<(T, T)> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while let (Some(&(xa, xb)), Some(&(ya, yb))) = (x.get(i), y.get(j)) {
        let lo = xa.max(ya);
        let hi = xb.min(yb);
        if lo <= hi {
            out.push((lo, hi));
        }
        if xb < yb {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// Everything not in a normalized range list.
fn complement_ranges<T: Word>(x: &[(T, T)]) -> Vec<(T, T)> {
    let mut out = Vec::with_capacity(x.len() + 1);
    let mut next = Some(T::ZERO);
    for &(a, b) in x {
        if let (Some(start), Some(end)) = (next, a.pred())
            && start <= end
        {
            out.push((start, end));
        }
        next = b.succ();
    }
    if let Some(start) = next {
        out.push((start, T::MAX));
    }
    out
}

fn subtract_ranges<T: Word>(x: &[(T, T)], y: &[(T, T)]) -> Vec<(T, T)> {
    if x.is_empty() || y.is_empty() {
        return x.to_vec();
    }
    intersect_ranges(x, &complement_ranges(y))
}

fn contains_word<T: Word>(ranges: &[(T, T)], w: T) -> bool {
    let idx = ranges.partition_point(|&(_, b)| b < w);
    ranges.get(idx).is_some_and(|&(a, _)| a <= w)
}

/// Splits one inclusive range into the fewest aligned blocks, as `(start, prefix length)`.
fn range_to_blocks<T: Word>(start: T, end: T, out: &mut Vec<(T, u8)>) {
    let mut a = start;
    while a <= end {
        let span = end.distance(a);
        // Largest block aligned at `a` that does not run past `end`.
        let mut k = a.trailing_zero_bits().min(T::BITS);
        while k > 0 && T::low_mask(k) > span {
            k -= 1;
        }
        // `k <= BITS <= 128`, so the length always fits in a u8.
        let len = u8::try_from(T::BITS - k).unwrap_or(u8::MAX);
        out.push((a, len));
        // The block ends at or before `end`, so this cannot overflow.
        let Some(block_end) = a.plus(T::low_mask(k)) else {
            break;
        };
        if block_end >= end {
            break;
        }
        match block_end.succ() {
            Some(next) => a = next,
            None => break,
        }
    }
}

/// A set of IPv4 and IPv6 addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefixSet {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl PrefixSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The union of the given prefixes (each masked to its network).
    pub fn from_prefixes(prefixes: impl IntoIterator<Item = IpNet>) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for p in prefixes {
            match p {
                IpNet::V4(n) => v4.push(v4_range(n)),
                IpNet::V6(n) => v6.push(v6_range(n)),
            }
        }
        Self {
            v4: normalize(v4),
            v6: normalize(v6),
        }
    }

    /// Adds a prefix; it is masked to its network first (`10.244.3.1/24` adds `10.244.3.0/24`).
    pub fn insert(&mut self, p: IpNet) {
        match p {
            IpNet::V4(n) => self.v4 = union_ranges(&self.v4, &[v4_range(n)]),
            IpNet::V6(n) => self.v6 = union_ranges(&self.v6, &[v6_range(n)]),
        }
    }

    /// Addresses in either set.
    #[must_use]
    pub fn union(&self, other: &Self) -> Self {
        Self {
            v4: union_ranges(&self.v4, &other.v4),
            v6: union_ranges(&self.v6, &other.v6),
        }
    }

    /// Addresses in `self` but not in `other`.
    #[must_use]
    pub fn subtract(&self, other: &Self) -> Self {
        Self {
            v4: subtract_ranges(&self.v4, &other.v4),
            v6: subtract_ranges(&self.v6, &other.v6),
        }
    }

    /// Addresses in both sets.
    #[must_use]
    pub fn intersection(&self, other: &Self) -> Self {
        Self {
            v4: intersect_ranges(&self.v4, &other.v4),
            v6: intersect_ranges(&self.v6, &other.v6),
        }
    }

    /// Whether the set holds no address at all.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// Whether `ip` is in the set.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => contains_word(&self.v4, u32::from(a)),
            IpAddr::V6(a) => contains_word(&self.v6, u128::from(a)),
        }
    }

    /// Minimal list of CIDR prefixes covering exactly the set, IPv4 first then IPv6, ascending.
    pub fn to_prefixes(&self) -> Vec<IpNet> {
        let mut out = Vec::new();
        let mut blocks = Vec::new();
        for &(a, b) in &self.v4 {
            range_to_blocks(a, b, &mut blocks);
        }
        out.extend(
            blocks
                .drain(..)
                .filter_map(|(a, len)| Ipv4Net::new(Ipv4Addr::from(a), len).ok())
                .map(IpNet::V4),
        );
        let mut blocks = Vec::new();
        for &(a, b) in &self.v6 {
            range_to_blocks(a, b, &mut blocks);
        }
        out.extend(
            blocks
                .into_iter()
                .filter_map(|(a, len)| Ipv6Net::new(Ipv6Addr::from(a), len).ok())
                .map(IpNet::V6),
        );
        out
    }
}

impl FromIterator<IpNet> for PrefixSet {
    fn from_iter<I: IntoIterator<Item = IpNet>>(iter: I) -> Self {
        Self::from_prefixes(iter)
    }
}

impl Extend<IpNet> for PrefixSet {
    fn extend<I: IntoIterator<Item = IpNet>>(&mut self, iter: I) {
        *self = self.union(&Self::from_prefixes(iter));
    }
}

fn v4_range(n: Ipv4Net) -> (u32, u32) {
    (u32::from(n.network()), u32::from(n.broadcast()))
}

fn v6_range(n: Ipv6Net) -> (u128, u128) {
    (u128::from(n.network()), u128::from(n.broadcast()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn set(prefixes: &[&str]) -> PrefixSet {
        PrefixSet::from_prefixes(prefixes.iter().map(|p| net(p)))
    }

    fn strings(s: &PrefixSet) -> Vec<String> {
        s.to_prefixes().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn empty_set() {
        let s = PrefixSet::new();
        assert!(s.is_empty());
        assert!(s.to_prefixes().is_empty());
        assert!(!s.contains(ip("0.0.0.0")));
        assert!(!s.contains(ip("::")));
        assert_eq!(s, PrefixSet::default());
        assert_eq!(s.union(&s), s);
        assert_eq!(s.subtract(&set(&["0.0.0.0/0"])), s);
        assert_eq!(set(&["10.0.0.0/8"]).subtract(&s), set(&["10.0.0.0/8"]));
        assert!(set(&["10.0.0.0/8"]).intersection(&s).is_empty());
    }

    #[test]
    fn insert_masks_to_network() {
        let mut s = PrefixSet::new();
        s.insert(net("10.244.3.1/24"));
        assert_eq!(strings(&s), ["10.244.3.0/24"]);
        assert!(s.contains(ip("10.244.3.0")));
        assert!(s.contains(ip("10.244.3.255")));
        assert!(!s.contains(ip("10.244.4.0")));
        assert!(!s.contains(ip("10.244.2.255")));
        s.insert(net("fd00::1234/64"));
        assert_eq!(strings(&s), ["10.244.3.0/24", "fd00::/64"]);
    }

    #[test]
    fn adjacent_prefixes_merge() {
        let s = set(&["10.0.0.128/25", "10.0.0.0/25"]);
        assert_eq!(strings(&s), ["10.0.0.0/24"]);
        // Adjacent but not aligned: two prefixes remain, but one range.
        let s = set(&["10.0.1.0/24", "10.0.2.0/24"]);
        assert_eq!(strings(&s), ["10.0.1.0/24", "10.0.2.0/24"]);
        assert_eq!(s.v4.len(), 1);
        let s = set(&["10.0.1.0/24", "10.0.2.0/24", "10.0.0.0/24", "10.0.3.0/24"]);
        assert_eq!(strings(&s), ["10.0.0.0/22"]);
        let s = set(&["2001:db8::/33", "2001:db8:8000::/33"]);
        assert_eq!(strings(&s), ["2001:db8::/32"]);
    }

    #[test]
    fn overlapping_and_duplicate_prefixes() {
        let s = set(&[
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.0.0.0/8",
            "10.255.255.255/32",
        ]);
        assert_eq!(strings(&s), ["10.0.0.0/8"]);
        let s = set(&["192.168.1.7/32", "192.168.1.7/32"]);
        assert_eq!(strings(&s), ["192.168.1.7/32"]);
    }

    #[test]
    fn union_keeps_families_apart_and_orders_v4_first() {
        let a = set(&["fd00::/8", "192.168.0.0/16"]);
        let b = set(&["10.0.0.0/8", "::ffff:10.0.0.0/104"]);
        let u = a.union(&b);
        assert_eq!(
            strings(&u),
            [
                "10.0.0.0/8",
                "192.168.0.0/16",
                "::ffff:10.0.0.0/104",
                "fd00::/8"
            ]
        );
        // IPv4-mapped IPv6 addresses are not IPv4.
        assert!(u.contains(ip("::ffff:10.1.2.3")));
        assert!(!set(&["10.0.0.0/8"]).contains(ip("::ffff:10.1.2.3")));
        assert!(!set(&["::ffff:10.0.0.0/104"]).contains(ip("10.1.2.3")));
    }

    #[test]
    fn intersection() {
        let a = set(&["10.0.0.0/8", "172.16.0.0/12", "fd00::/8"]);
        let b = set(&[
            "10.1.0.0/16",
            "172.0.0.0/8",
            "192.168.0.0/16",
            "fd12::/16",
            "::/0",
        ]);
        assert_eq!(
            strings(&a.intersection(&b)),
            ["10.1.0.0/16", "172.16.0.0/12", "fd00::/8"]
        );
        assert_eq!(a.intersection(&b), b.intersection(&a));
        assert!(
            set(&["10.0.0.0/24"])
                .intersection(&set(&["10.0.1.0/24"]))
                .is_empty()
        );
    }

    #[test]
    fn subtract_from_middle_gives_minimal_prefixes() {
        let s = set(&["10.0.0.0/24"]).subtract(&set(&["10.0.0.128/32"]));
        assert_eq!(
            strings(&s),
            [
                "10.0.0.0/25",
                "10.0.0.129/32",
                "10.0.0.130/31",
                "10.0.0.132/30",
                "10.0.0.136/29",
                "10.0.0.144/28",
                "10.0.0.160/27",
                "10.0.0.192/26",
            ]
        );
        assert!(!s.contains(ip("10.0.0.128")));
        assert!(s.contains(ip("10.0.0.127")));
        assert!(s.contains(ip("10.0.0.129")));

        let s = set(&["10.244.3.0/24"]).subtract(&set(&["10.244.3.128/25"]));
        assert_eq!(strings(&s), ["10.244.3.0/25"]);

        let s = set(&["2001:db8::/32"]).subtract(&set(&["2001:db8:1::/48"]));
        assert_eq!(
            strings(&s),
            [
                "2001:db8::/48",
                "2001:db8:2::/47",
                "2001:db8:4::/46",
                "2001:db8:8::/45",
                "2001:db8:10::/44",
                "2001:db8:20::/43",
                "2001:db8:40::/42",
                "2001:db8:80::/41",
                "2001:db8:100::/40",
                "2001:db8:200::/39",
                "2001:db8:400::/38",
                "2001:db8:800::/37",
                "2001:db8:1000::/36",
                "2001:db8:2000::/35",
                "2001:db8:4000::/34",
                "2001:db8:8000::/33",
            ]
        );
    }

    #[test]
    fn subtract_everything_and_nothing() {
        let a = set(&["10.0.0.0/8", "fd00::/8"]);
        assert!(a.subtract(&set(&["0.0.0.0/0", "::/0"])).is_empty());
        assert_eq!(strings(&a.subtract(&set(&["0.0.0.0/0"]))), ["fd00::/8"]);
        assert_eq!(a.subtract(&set(&["11.0.0.0/8", "fe00::/8"])), a);
        assert!(a.subtract(&a).is_empty());
    }

    #[test]
    fn full_ranges() {
        let all = set(&["0.0.0.0/0", "::/0"]);
        assert_eq!(strings(&all), ["0.0.0.0/0", "::/0"]);
        for a in [
            "0.0.0.0",
            "255.255.255.255",
            "::",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            assert!(all.contains(ip(a)), "{a}");
        }
        // Halves merge up to the whole space without overflowing.
        let halves = set(&["0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1"]);
        assert_eq!(halves, all);
        // Inserting the top address into a set that already ends at the top.
        let mut top = set(&["255.255.255.0/24"]);
        top.insert(net("255.255.255.255/32"));
        top.insert(net("255.255.254.0/24"));
        assert_eq!(strings(&top), ["255.255.254.0/23"]);
        assert!(top.contains(ip("255.255.255.255")));

        let without_zero = set(&["0.0.0.0/0"]).subtract(&set(&["0.0.0.0/32"]));
        assert_eq!(without_zero.to_prefixes().len(), 32);
        assert!(!without_zero.contains(ip("0.0.0.0")));
        assert!(without_zero.contains(ip("0.0.0.1")));
        assert!(without_zero.contains(ip("255.255.255.255")));

        let without_top =
            set(&["::/0"]).subtract(&set(&["ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"]));
        assert_eq!(without_top.to_prefixes().len(), 128);
        assert_eq!(without_top.to_prefixes()[0], net("::/1"));
        assert!(!without_top.contains(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
        assert!(without_top.contains(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe")));
        assert_eq!(without_top.union(&set(&["ffff::/16"])), set(&["::/0"]));

        let middle = set(&["::/0"]).subtract(&set(&["8000::/1"]));
        assert_eq!(strings(&middle), ["::/1"]);
        assert!(set(&["0.0.0.0/0"]).intersection(&set(&["::/0"])).is_empty());
    }

    #[test]
    fn host_prefixes() {
        let s =
            PrefixSet::from_prefixes([IpNet::from(ip("192.168.3.4")), IpNet::from(ip("fd00::1"))]);
        assert_eq!(strings(&s), ["192.168.3.4/32", "fd00::1/128"]);
    }

    #[test]
    fn collect_and_extend() {
        let mut s: PrefixSet = [net("10.0.0.0/25")].into_iter().collect();
        s.extend([net("10.0.0.128/25"), net("fd00::/8")]);
        assert_eq!(strings(&s), ["10.0.0.0/24", "fd00::/8"]);
    }

    /// Small deterministic generator (64-bit LCG, Knuth's constants).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            (self.next() >> 33) % n
        }

        fn u128(&mut self) -> u128 {
            (u128::from(self.next()) << 64) | u128::from(self.next())
        }

        /// A prefix clustered in a small part of the space so that sets overlap often.
        fn prefix(&mut self) -> IpNet {
            if self.below(2) == 0 {
                let addr = 0x0a00_0000 | (self.next() as u32 & 0x0000_ffff);
                let len = 16 + self.below(17) as u8;
                let len = if self.below(50) == 0 {
                    self.below(3) as u8
                } else {
                    len
                };
                let addr = if len < 8 { self.next() as u32 } else { addr };
                IpNet::V4(Ipv4Net::new(Ipv4Addr::from(addr), len).expect("len <= 32"))
            } else {
                let addr = (0xfd00_u128 << 112) | (self.u128() & 0xffff);
                let len = 112 + self.below(17) as u8;
                let len = if self.below(50) == 0 {
                    self.below(3) as u8
                } else {
                    len
                };
                let addr = if len < 8 { self.u128() } else { addr };
                IpNet::V6(Ipv6Net::new(Ipv6Addr::from(addr), len).expect("len <= 128"))
            }
        }

        fn address(&mut self) -> IpAddr {
            if self.below(2) == 0 {
                let a = 0x0a00_0000 | (self.next() as u32 & 0x0000_ffff);
                let a = if self.below(10) == 0 {
                    self.next() as u32
                } else {
                    a
                };
                IpAddr::V4(Ipv4Addr::from(a))
            } else {
                let a = (0xfd00_u128 << 112) | (self.u128() & 0xffff);
                let a = if self.below(10) == 0 { self.u128() } else { a };
                IpAddr::V6(Ipv6Addr::from(a))
            }
        }
    }

    fn naive_contains(prefixes: &[IpNet], a: IpAddr) -> bool {
        prefixes.iter().any(|p| p.contains(&a))
    }

    /// Addresses worth probing: random ones plus every prefix's first and last address and
    /// their neighbours.
    fn probes(rng: &mut Lcg, prefixes: &[IpNet]) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = (0..200).map(|_| rng.address()).collect();
        for p in prefixes {
            match p {
                IpNet::V4(n) => {
                    let (a, b) = v4_range(*n);
                    for w in [a.checked_sub(1), Some(a), Some(b), b.checked_add(1)]
                        .into_iter()
                        .flatten()
                    {
                        out.push(IpAddr::V4(Ipv4Addr::from(w)));
                    }
                }
                IpNet::V6(n) => {
                    let (a, b) = v6_range(*n);
                    for w in [a.checked_sub(1), Some(a), Some(b), b.checked_add(1)]
                        .into_iter()
                        .flatten()
                    {
                        out.push(IpAddr::V6(Ipv6Addr::from(w)));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn property_round_trip_and_algebra() {
        let mut rng = Lcg(0x5eed_0f0e_45a9_a1b2);
        for round in 0..300 {
            let na = rng.below(12) as usize;
            let nb = rng.below(12) as usize;
            let pa: Vec<IpNet> = (0..na).map(|_| rng.prefix()).collect();
            let pb: Vec<IpNet> = (0..nb).map(|_| rng.prefix()).collect();
            let a = PrefixSet::from_prefixes(pa.iter().copied());
            let b = PrefixSet::from_prefixes(pb.iter().copied());

            // Re-importing the prefix list gives the same set, and the list is minimal
            // (ipnet's aggregate is an independent oracle for the minimal cover).
            let list = a.to_prefixes();
            let again = PrefixSet::from_prefixes(list.iter().copied());
            assert_eq!(again, a, "round {round}: {pa:?}");
            assert_eq!(list, again.to_prefixes());
            let mut expected = IpNet::aggregate(&pa);
            expected.sort();
            assert_eq!(list, expected, "round {round}: {pa:?}");
            for w in list.windows(2) {
                assert!(w[0] < w[1], "round {round}: not ascending {list:?}");
            }

            // Incremental inserts build the same set.
            let mut inc = PrefixSet::new();
            for p in &pa {
                inc.insert(*p);
            }
            assert_eq!(inc, a);

            let union = a.union(&b);
            let inter = a.intersection(&b);
            let diff = a.subtract(&b);
            let mut all = pa.clone();
            all.extend_from_slice(&pb);
            for x in probes(&mut rng, &all) {
                let (in_a, in_b) = (naive_contains(&pa, x), naive_contains(&pb, x));
                assert_eq!(a.contains(x), in_a, "round {round}: {x} in {pa:?}");
                assert_eq!(
                    naive_contains(&list, x),
                    in_a,
                    "round {round}: {x} in {list:?}"
                );
                assert_eq!(again.contains(x), in_a);
                assert_eq!(union.contains(x), in_a || in_b, "round {round}: {x} union");
                assert_eq!(
                    inter.contains(x),
                    in_a && in_b,
                    "round {round}: {x} intersection"
                );
                assert_eq!(
                    diff.contains(x),
                    in_a && !in_b,
                    "round {round}: {x} subtract"
                );
            }
            // Set identities.
            assert_eq!(diff.union(&inter), a);
            assert!(diff.intersection(&b).is_empty());
            assert_eq!(union.subtract(&b), diff);
            assert_eq!(b.union(&a), union);
        }
    }
}
