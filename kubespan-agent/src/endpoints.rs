//! What this node announces as its WireGuard endpoints (spec §2): the candidate addresses, the
//! ordered include/exclude `filters.endpoints` rules, and the final `ip:port` list.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One `filters.endpoints` rule: a plain prefix includes, a `!`-prefixed one excludes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointRule {
    Include(IpNet),
    Exclude(IpNet),
}

impl EndpointRule {
    /// The rule's prefix, as written (host bits are kept; matching ignores them).
    pub fn prefix(&self) -> IpNet {
        match self {
            Self::Include(p) | Self::Exclude(p) => *p,
        }
    }
}

impl FromStr for EndpointRule {
    type Err = String;

    /// Accepts `10.0.0.0/8`, `!192.168.0.0/16`, `2001:db8::/32`, or a bare address (a /32 or
    /// /128). Surrounding whitespace, and whitespace after `!`, is ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        let (exclude, body) = match trimmed.strip_prefix('!') {
            Some(rest) => (true, rest.trim_start()),
            None => (false, trimmed),
        };
        let prefix = body
            .parse::<IpNet>()
            .ok()
            .or_else(|| body.parse::<IpAddr>().ok().map(IpNet::from))
            .ok_or_else(|| {
                format!(
                    "invalid endpoint filter {s:?}: expected an IP prefix or address, optionally \
                     prefixed with '!' to exclude (e.g. \"10.0.0.0/8\", \"!192.168.0.0/16\", \
                     \"2001:db8::/32\", \"203.0.113.7\")"
                )
            })?;
        Ok(if exclude {
            Self::Exclude(prefix)
        } else {
            Self::Include(prefix)
        })
    }
}

impl fmt::Display for EndpointRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Include(p) => write!(f, "{p}"),
            Self::Exclude(p) => write!(f, "!{p}"),
        }
    }
}

impl<'de> Deserialize<'de> for EndpointRule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for EndpointRule {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Talos's ordered include/exclude semantics (spec §2): rules in order; an include adds every
/// input IP it contains (input order, no duplicates); an exclude removes matching IPs accumulated
/// so far; an IP matched by no include is dropped.
///
/// A prefix of one family never matches an address of the other (IPv4-mapped IPv6 addresses
/// are IPv6).
pub fn filter_ips(ips: &[IpAddr], rules: &[EndpointRule]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for rule in rules {
        match rule {
            EndpointRule::Include(p) => {
                for ip in ips {
                    if p.contains(ip) && !out.contains(ip) {
                        out.push(*ip);
                    }
                }
            }
            EndpointRule::Exclude(p) => out.retain(|ip| !p.contains(ip)),
        }
    }
    out
}

/// The spec §2 endpoint list: node addresses, then the public IP from Hello if not present,
/// then the filter (when `filters` is Some, also applied to the public IP), each paired with
/// `port`, then `extra` appended (unfiltered, de-duplicated).
///
/// The result holds no duplicate endpoint (a repeated address is announced once).
/// `Some(&[])` is an empty rule list and therefore keeps no address; only `extra` remains.
pub fn local_endpoints(
    addresses: &[IpAddr],
    public_ip: Option<IpAddr>,
    filters: Option<&[EndpointRule]>,
    port: u16,
    extra: &[SocketAddr],
) -> Vec<SocketAddr> {
    let mut candidates: Vec<IpAddr> = Vec::with_capacity(addresses.len() + 1);
    for ip in addresses.iter().copied().chain(public_ip) {
        if !candidates.contains(&ip) {
            candidates.push(ip);
        }
    }
    if let Some(rules) = filters {
        candidates = filter_ips(&candidates, rules);
    }
    let mut out: Vec<SocketAddr> = Vec::with_capacity(candidates.len() + extra.len());
    for endpoint in candidates
        .into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .chain(extra.iter().copied())
    {
        if !out.contains(&endpoint) {
            out.push(endpoint);
        }
    }
    out
}

/// Addresses worth announcing: drops loopback, unspecified, multicast, link-local (v4
/// 169.254/16, v6 fe80::/10), and any address inside `skip` (e.g. the mesh /64).
///
/// Also drops the IPv4 limited broadcast address 255.255.255.255 and repeated addresses;
/// the order of the input is kept.
pub fn routable_addresses(ips: impl IntoIterator<Item = IpAddr>, skip: &[IpNet]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for ip in ips {
        let unwanted = match ip {
            IpAddr::V4(a) => v4_unwanted(a),
            IpAddr::V6(a) => v6_unwanted(a),
        };
        if unwanted || skip.iter().any(|n| n.contains(&ip)) || out.contains(&ip) {
            continue;
        }
        out.push(ip);
    }
    out
}

fn v4_unwanted(a: Ipv4Addr) -> bool {
    a.is_loopback()
        || a.is_unspecified()
        || a.is_multicast()
        || a.is_link_local()
        || a.is_broadcast()
}

fn v6_unwanted(a: Ipv6Addr) -> bool {
    let link_local = (a.segments()[0] & 0xffc0) == 0xfe80;
    a.is_loopback() || a.is_unspecified() || a.is_multicast() || link_local
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| ip(s)).collect()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test socket address")
    }

    fn rules(list: &[&str]) -> Vec<EndpointRule> {
        list.iter().map(|s| s.parse().expect("test rule")).collect()
    }

    #[test]
    fn upstream_example() {
        let addresses = ips(&[
            "172.20.0.2",
            "10.5.0.1",
            "192.168.192.168",
            "2001:123:4567::1",
        ]);
        let filters = rules(&["0.0.0.0/0", "!192.168.0.0/16", "2001::/16"]);
        let extra = [sa("10.5.0.1:51820"), sa("1.2.3.4:5678")];
        let got = local_endpoints(
            &addresses,
            Some(ip("1.1.1.1")),
            Some(&filters),
            51820,
            &extra,
        );
        assert_eq!(
            got,
            [
                sa("172.20.0.2:51820"),
                sa("10.5.0.1:51820"),
                sa("1.1.1.1:51820"),
                sa("[2001:123:4567::1]:51820"),
                sa("1.2.3.4:5678"),
            ]
        );
    }

    #[test]
    fn no_filter_keeps_everything_in_order() {
        let addresses = ips(&["10.0.0.1", "fd00::1", "10.0.0.1"]);
        let got = local_endpoints(&addresses, Some(ip("203.0.113.9")), None, 51820, &[]);
        assert_eq!(
            got,
            [
                sa("10.0.0.1:51820"),
                sa("[fd00::1]:51820"),
                sa("203.0.113.9:51820")
            ]
        );
    }

    #[test]
    fn public_ip_not_repeated() {
        let addresses = ips(&["203.0.113.9", "10.0.0.1"]);
        let got = local_endpoints(&addresses, Some(ip("203.0.113.9")), None, 51820, &[]);
        assert_eq!(got, [sa("203.0.113.9:51820"), sa("10.0.0.1:51820")]);
    }

    #[test]
    fn public_ip_is_filtered_too() {
        let addresses = ips(&["10.0.0.1"]);
        let filters = rules(&["10.0.0.0/8"]);
        let got = local_endpoints(
            &addresses,
            Some(ip("203.0.113.9")),
            Some(&filters),
            51820,
            &[],
        );
        assert_eq!(got, [sa("10.0.0.1:51820")]);
        let filters = rules(&["0.0.0.0/0", "!203.0.113.0/24"]);
        let got = local_endpoints(
            &addresses,
            Some(ip("203.0.113.9")),
            Some(&filters),
            51820,
            &[],
        );
        assert_eq!(got, [sa("10.0.0.1:51820")]);
    }

    #[test]
    fn extras_are_not_filtered_and_deduplicated() {
        let addresses = ips(&["10.0.0.1"]);
        let filters = rules(&["!0.0.0.0/0"]);
        let extra = [
            sa("192.168.1.1:1000"),
            sa("192.168.1.1:1000"),
            sa("[fd00::1]:51820"),
        ];
        let got = local_endpoints(&addresses, None, Some(&filters), 51820, &extra);
        assert_eq!(got, [sa("192.168.1.1:1000"), sa("[fd00::1]:51820")]);
    }

    #[test]
    fn custom_port() {
        let got = local_endpoints(&ips(&["10.0.0.1"]), None, None, 4000, &[]);
        assert_eq!(got, [sa("10.0.0.1:4000")]);
    }

    #[test]
    fn empty_rule_list_keeps_nothing() {
        let got = local_endpoints(
            &ips(&["10.0.0.1"]),
            None,
            Some(&[]),
            51820,
            &[sa("1.2.3.4:5")],
        );
        assert_eq!(got, [sa("1.2.3.4:5")]);
        assert!(filter_ips(&ips(&["10.0.0.1"]), &[]).is_empty());
    }

    #[test]
    fn scenario_15_exclude_after_include() {
        let input = ips(&[
            "10.10.0.5",
            "192.168.1.2",
            "10.10.0.6",
            "10.10.1.1",
            "fd00::5",
            "2001:db8::1",
        ]);
        let got = filter_ips(&input, &rules(&["0.0.0.0/0", "!10.10.0.0/24"]));
        assert_eq!(got, ips(&["192.168.1.2", "10.10.1.1"]));
    }

    #[test]
    fn scenario_15_exclude_first_excludes_nothing() {
        let input = ips(&["10.10.0.5", "192.168.1.2", "10.10.0.6", "fd00::5"]);
        let got = filter_ips(&input, &rules(&["!10.10.0.0/24", "0.0.0.0/0"]));
        assert_eq!(got, ips(&["10.10.0.5", "192.168.1.2", "10.10.0.6"]));
    }

    #[test]
    fn output_order_follows_rule_order() {
        let input = ips(&["10.0.0.1", "192.168.0.1", "fd00::1", "10.0.0.2"]);
        let got = filter_ips(
            &input,
            &rules(&["fd00::/8", "192.168.0.0/16", "10.0.0.0/8"]),
        );
        assert_eq!(
            got,
            ips(&["fd00::1", "192.168.0.1", "10.0.0.1", "10.0.0.2"])
        );
        // An IP matched by several includes appears once, at its first match.
        let got = filter_ips(&input, &rules(&["10.0.0.2", "0.0.0.0/0", "::/0"]));
        assert_eq!(
            got,
            ips(&["10.0.0.2", "10.0.0.1", "192.168.0.1", "fd00::1"])
        );
    }

    #[test]
    fn include_after_exclude_re_adds() {
        let input = ips(&["10.0.0.1", "10.0.0.2"]);
        let got = filter_ips(&input, &rules(&["10.0.0.0/8", "!10.0.0.1", "10.0.0.1/32"]));
        assert_eq!(got, ips(&["10.0.0.2", "10.0.0.1"]));
    }

    #[test]
    fn duplicate_inputs_once() {
        let input = ips(&["10.0.0.1", "10.0.0.1"]);
        assert_eq!(
            filter_ips(&input, &rules(&["10.0.0.0/8"])),
            ips(&["10.0.0.1"])
        );
    }

    #[test]
    fn families_do_not_mix() {
        let input = ips(&["::ffff:10.0.0.1", "10.0.0.1"]);
        assert_eq!(
            filter_ips(&input, &rules(&["10.0.0.0/8"])),
            ips(&["10.0.0.1"])
        );
        assert_eq!(
            filter_ips(&input, &rules(&["::/0"])),
            ips(&["::ffff:10.0.0.1"])
        );
    }

    #[test]
    fn host_bits_in_rule_prefix_are_ignored_for_matching() {
        let rule: EndpointRule = "10.1.2.3/8".parse().expect("rule");
        assert_eq!(rule.to_string(), "10.1.2.3/8");
        assert_eq!(
            filter_ips(&ips(&["10.200.0.1"]), &[rule]),
            ips(&["10.200.0.1"])
        );
    }

    #[test]
    fn parse_forms() {
        let net = |s: &str| s.parse::<IpNet>().expect("net");
        assert_eq!(
            "10.0.0.0/8".parse(),
            Ok(EndpointRule::Include(net("10.0.0.0/8")))
        );
        assert_eq!(
            "!192.168.0.0/16".parse(),
            Ok(EndpointRule::Exclude(net("192.168.0.0/16")))
        );
        assert_eq!(
            "2001:db8::/32".parse(),
            Ok(EndpointRule::Include(net("2001:db8::/32")))
        );
        assert_eq!(
            "203.0.113.7".parse(),
            Ok(EndpointRule::Include(net("203.0.113.7/32")))
        );
        assert_eq!(
            "!fd00::1".parse(),
            Ok(EndpointRule::Exclude(net("fd00::1/128")))
        );
        assert_eq!(
            "  ! 10.0.0.0/8 ".parse(),
            Ok(EndpointRule::Exclude(net("10.0.0.0/8")))
        );
        assert_eq!(
            "0.0.0.0/0".parse(),
            Ok(EndpointRule::Include(net("0.0.0.0/0")))
        );
        for s in [
            "10.0.0.0/8",
            "!192.168.0.0/16",
            "2001:db8::/32",
            "!fd00::1/128",
        ] {
            let rule: EndpointRule = s.parse().expect("rule");
            assert_eq!(rule.to_string(), s);
        }
        assert_eq!(
            "!fd00::1".parse::<EndpointRule>().map(|r| r.prefix()),
            Ok(net("fd00::1/128"))
        );
    }

    #[test]
    fn parse_errors() {
        for bad in [
            "",
            "!",
            "!!10.0.0.0/8",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0",
            "10.0.0.0/",
            "/8",
            "example.com",
            "10.0.0.0/8,",
            "10.0.0.0 /8",
            "-10.0.0.0/8",
            "10.0.0.1:51820",
            "\u{0}",
            "１０.0.0.0/8",
        ] {
            let err = bad.parse::<EndpointRule>().expect_err(bad);
            assert!(err.contains("expected an IP prefix or address"), "{err}");
            assert!(err.contains('!'), "{err}");
        }
    }

    #[test]
    fn deserializes_from_string_list() {
        let got: Vec<EndpointRule> =
            serde_json::from_str(r#"["0.0.0.0/0", "!10.10.0.0/24", "fd00::1"]"#).expect("json");
        assert_eq!(got, rules(&["0.0.0.0/0", "!10.10.0.0/24", "fd00::1/128"]));
        let err = serde_json::from_str::<Vec<EndpointRule>>(r#"["10.0.0.0/40"]"#).expect_err("bad");
        assert!(err.to_string().contains("invalid endpoint filter"), "{err}");
        assert!(serde_json::from_str::<Vec<EndpointRule>>("[8]").is_err());
        let back = serde_json::to_string(&got).expect("serialize");
        assert_eq!(back, r#"["0.0.0.0/0","!10.10.0.0/24","fd00::1/128"]"#);
    }

    #[test]
    fn deserializes_from_yaml() {
        let got: Vec<EndpointRule> =
            serde_norway::from_str("- 0.0.0.0/0\n- '!192.168.0.0/16'\n").expect("yaml");
        assert_eq!(got, rules(&["0.0.0.0/0", "!192.168.0.0/16"]));
    }

    #[test]
    fn routable_filters_special_addresses() {
        let input = ips(&[
            "127.0.0.1",
            "10.0.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "169.254.1.1",
            "255.255.255.255",
            "::1",
            "::",
            "ff02::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "2001:db8::1",
            "fdab:cd::1",
            "fdab:cd:0:1::1",
            "10.0.0.1",
            "192.168.1.1",
        ]);
        let skip = ["fdab:cd::/64".parse::<IpNet>().expect("net")];
        let got = routable_addresses(input, &skip);
        assert_eq!(
            got,
            ips(&[
                "10.0.0.1",
                "fec0::1",
                "2001:db8::1",
                "fdab:cd:0:1::1",
                "192.168.1.1"
            ])
        );
    }

    #[test]
    fn routable_skip_v4_and_empty() {
        let skip = ["10.0.0.0/8".parse::<IpNet>().expect("net")];
        assert_eq!(
            routable_addresses(ips(&["10.1.1.1", "11.1.1.1"]), &skip),
            ips(&["11.1.1.1"])
        );
        assert!(routable_addresses(Vec::new(), &[]).is_empty());
    }
}
