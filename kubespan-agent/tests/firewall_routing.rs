//! Root tests: the nftables table and the policy routing really applied, each test in its own
//! throwaway network namespace with a TUN device standing in for the WireGuard interface.
//!
//! Netlink and `nft` act on the calling thread's network namespace, so the library calls run on
//! a dedicated thread that first enters the test namespace with `setns(2)`. Checks use
//! `ip -n NS ...` and `ip netns exec NS nft ...`.
//!
//! Needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN), `ip` and `nft`. Without root the tests fail,
//! unless `OPENSPAN_SKIP_ROOT_TESTS=1` is set, in which case they say they skip.

use std::process::Command;

use ipnet::IpNet;
use kubespan_agent::firewall::{self, FirewallConfig};
use kubespan_agent::routing::{self, RoutingConfig, RoutingError};

const TUN: &str = "ks-test";

mod support;

use support::{Netns, require_root as require_root_for};

const NEEDS: &str = "network namespaces, TUN devices, nftables tables and ip rules";

fn require_root(test: &str) -> bool {
    require_root_for(test, NEEDS)
}

/// Namespace helpers only these tests need.
trait MeshNetns {
    fn with_tun(tag: &str) -> Netns;
    fn routing<F, Fut>(&self, f: F) -> Result<(), RoutingError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), RoutingError>>;
}

impl MeshNetns for Netns {
    fn with_tun(tag: &str) -> Netns {
        let ns = Netns::new(tag);
        ns.exec(&["ip", "tuntap", "add", "dev", TUN, "mode", "tun"]);
        ns
    }

    /// Runs an async routing call inside the namespace on a current-thread runtime.
    fn routing<F, Fut>(&self, f: F) -> Result<(), RoutingError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), RoutingError>>,
    {
        self.enter(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(f())
        })
    }
}

fn firewall_config(table: &str) -> FirewallConfig {
    FirewallConfig {
        table: table.into(),
        firewall_mark: 0x20,
        force_mark: 0x40,
        mark_mask: 0x60,
        mtu: 1420,
    }
}

fn routing_config(mtu: u32) -> RoutingConfig {
    RoutingConfig {
        interface: TUN.into(),
        mesh_address: "fdc0:ffee:1234:5678:aaaa:bbbb:cccc:dddd".parse().unwrap(),
        mtu,
        table: 180,
        rule_priority: 32500,
        force_mark: 0x40,
        mark_mask: 0x60,
    }
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

/// The listing with every run of whitespace collapsed (nft wraps long element lists).
fn squash(listing: &str) -> String {
    listing.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn firewall_render_is_accepted_by_nft() {
    if !require_root("firewall_render_is_accepted_by_nft") {
        return;
    }
    let ns = Netns::new("fwr");
    let config = firewall_config("ksrender");
    let batch = firewall::render(
        &config,
        &nets(&["10.244.0.0/16", "10.244.3.0/24", "fd00:10::/64"]),
    );
    let file = std::env::temp_dir().join(format!("{}.json", ns.name));
    std::fs::write(&file, batch.to_string()).unwrap();
    let file_arg = file.to_string_lossy().into_owned();
    ns.exec(&["nft", "-j", "-f", &file_arg]);
    // The batch starts with add+delete of the table, so it can be applied over itself.
    ns.exec(&["nft", "-j", "-f", &file_arg]);
    let _ = std::fs::remove_file(&file);
    let listing = ns.exec(&["nft", "list", "table", "inet", "ksrender"]);
    assert!(
        listing.contains("elements = { 10.244.0.0/16 }"),
        "{listing}"
    );
    assert!(listing.contains("elements = { fd00:10::/64 }"), "{listing}");
    assert_eq!(count(&listing, "chain prerouting"), 1, "{listing}");
}

#[test]
fn firewall_apply_replace_remove() {
    if !require_root("firewall_apply_replace_remove") {
        return;
    }
    let ns = Netns::new("fw");
    let config = firewall_config("kubespan");

    // Leftovers of a crashed run: remove() of a missing table is fine.
    let c = config.clone();
    ns.enter(move || firewall::remove(&c))
        .expect("remove of a missing table");

    let c = config.clone();
    let routed = nets(&[
        "10.244.0.0/16",
        "10.244.1.0/24", // inside the /16
        "10.244.0.0/16", // duplicate
        "192.168.50.7/32",
        "fd00:abcd::/64",
        "2001:db8::/32",
    ]);
    ns.enter(move || firewall::apply(&c, &routed))
        .expect("apply");
    let listing = ns.exec(&["nft", "list", "table", "inet", "kubespan"]);
    println!("{listing}");
    let flat = squash(&listing);
    for expected in [
        "set routed_v4 {",
        "type ipv4_addr",
        "flags interval",
        "elements = { 10.244.0.0/16, 192.168.50.7 }",
        "set routed_v6 {",
        "elements = { 2001:db8::/32, fd00:abcd::/64 }",
        "type filter hook prerouting priority filter; policy accept;",
        "type route hook output priority filter; policy accept;",
        "oifname \"lo\" accept",
        "ip daddr @routed_v4 tcp flags syn / syn,rst tcp option maxseg size > 1368 tcp option maxseg size set 1368",
        "ip6 daddr @routed_v6 tcp flags syn / syn,rst tcp option maxseg size > 1348 tcp option maxseg size set 1348",
    ] {
        assert!(
            flat.contains(expected),
            "missing {expected:?} in\n{listing}"
        );
    }
    // Own-traffic check in both chains; force mark for both families in both chains. nft
    // prints `(mark & 0xffffff9f) | 0x40` in its equivalent reduced form `& 0xffffffdf | 0x40`.
    assert_eq!(
        count(&listing, "meta mark & 0x00000060 == 0x00000020 accept"),
        2
    );
    assert_eq!(
        count(
            &listing,
            "ip daddr @routed_v4 meta mark set meta mark & 0xffffffdf | 0x00000040 accept"
        ),
        2,
        "{listing}"
    );
    assert_eq!(
        count(
            &listing,
            "ip6 daddr @routed_v6 meta mark set meta mark & 0xffffffdf | 0x00000040 accept"
        ),
        2,
        "{listing}"
    );
    assert!(!listing.contains("10.244.1.0"), "{listing}");

    // Rule order of the output chain.
    let output = &listing[listing.find("chain output").unwrap()..];
    let positions: Vec<usize> = [
        "meta mark & 0x00000060 == 0x00000020 accept",
        "oifname \"lo\" accept",
        "maxseg size set 1368",
        "maxseg size set 1348",
        "ip daddr @routed_v4 meta mark set",
        "ip6 daddr @routed_v6 meta mark set",
    ]
    .iter()
    .map(|s| {
        output
            .find(s)
            .unwrap_or_else(|| panic!("{s} not in output"))
    })
    .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{output}");

    // Re-apply with other prefixes and MTU: the table is replaced, not extended.
    let c = FirewallConfig {
        mtu: 1280,
        ..config.clone()
    };
    ns.enter(move || firewall::apply(&c, &nets(&["10.9.0.0/16"])))
        .expect("re-apply");
    let listing = ns.exec(&["nft", "list", "table", "inet", "kubespan"]);
    assert!(listing.contains("elements = { 10.9.0.0/16 }"), "{listing}");
    assert!(!listing.contains("10.244.0.0"), "{listing}");
    assert!(listing.contains("maxseg size set 1228"), "{listing}");
    assert!(listing.contains("maxseg size set 1208"), "{listing}");
    assert!(!listing.contains("1368"), "{listing}");
    assert_eq!(count(&listing, "chain output"), 1);
    assert_eq!(count(&listing, "meta mark set"), 4);

    // Empty sets are fine.
    let c = config.clone();
    ns.enter(move || firewall::apply(&c, &[]))
        .expect("apply with empty sets");
    let listing = ns.exec(&["nft", "list", "table", "inet", "kubespan"]);
    assert!(!listing.contains("elements"), "{listing}");

    // A batch nft rejects reports nft's stderr and leaves the current table untouched.
    let bad = FirewallConfig {
        table: "x".repeat(300),
        ..config.clone()
    };
    let error = ns
        .enter(move || firewall::apply(&bad, &[]))
        .expect_err("an over-long table name must be rejected");
    let message = error.to_string();
    println!("{message}");
    assert!(
        message.contains("nft failed to replace table inet xxx"),
        "{message}"
    );
    assert!(message.contains("Error"), "nft's stderr missing: {message}");
    assert!(
        ns.exec(&["nft", "list", "tables"])
            .contains("table inet kubespan"),
        "existing table lost"
    );

    let c = config.clone();
    ns.enter(move || firewall::remove(&c)).expect("remove");
    let tables = ns.exec(&["nft", "list", "tables"]);
    assert!(!tables.contains("kubespan"), "{tables}");
    let c = config.clone();
    ns.enter(move || firewall::remove(&c))
        .expect("second remove");
}

#[test]
fn routing_apply_is_idempotent_and_remove_cleans_up() {
    if !require_root("routing_apply_is_idempotent_and_remove_cleans_up") {
        return;
    }
    let ns = Netns::with_tun("rt");
    let config = routing_config(1420);
    // A leftover of the mesh address with another prefix length is replaced by the /64.
    ns.ip(&[
        "addr",
        "add",
        "fdc0:ffee:1234:5678:aaaa:bbbb:cccc:dddd/128",
        "dev",
        TUN,
    ]);

    for _ in 0..2 {
        let c = config.clone();
        ns.routing(move || async move { routing::apply(&c).await })
            .expect("routing apply");
    }

    let link = ns.ip(&["link", "show", TUN]);
    assert!(link.contains("mtu 1420"), "{link}");
    assert!(link.contains(",UP"), "{link}");
    let addr = ns.ip(&["-6", "addr", "show", "dev", TUN]);
    println!("{addr}");
    assert!(
        addr.contains("inet6 fdc0:ffee:1234:5678:aaaa:bbbb:cccc:dddd/64 scope global"),
        "{addr}"
    );
    assert!(!addr.contains("dddd/128"), "{addr}");

    let rules4 = ns.ip(&["rule"]);
    let rules6 = ns.ip(&["-6", "rule"]);
    println!("{rules4}{rules6}");
    for rules in [&rules4, &rules6] {
        assert_eq!(
            count(rules, "32500:\tfrom all fwmark 0x40/0x60 lookup 180"),
            1,
            "{rules}"
        );
        assert_eq!(count(rules, "lookup 180"), 1, "{rules}");
    }
    let routes4 = ns.ip(&["route", "show", "table", "180"]);
    let routes6 = ns.ip(&["-6", "route", "show", "table", "180"]);
    println!("{routes4}{routes6}");
    for routes in [&routes4, &routes6] {
        assert_eq!(routes.lines().count(), 1, "{routes}");
        assert!(
            routes.starts_with("default dev ks-test proto static"),
            "{routes}"
        );
        assert!(routes.contains("metric 1 "), "{routes}");
        assert!(routes.contains("mtu 1420"), "{routes}");
    }

    // The marked lookup goes to the mesh, the unmarked one does not.
    let marked = ns.ip(&["route", "get", "10.244.1.1", "mark", "0x40"]);
    assert!(marked.contains("dev ks-test table 180"), "{marked}");
    let marked6 = ns.ip(&["-6", "route", "get", "fd00:10::1", "mark", "0x40"]);
    assert!(marked6.contains("dev ks-test table 180"), "{marked6}");

    // A new MTU replaces the routes instead of adding second ones.
    let c = routing_config(1380);
    ns.routing(move || async move { routing::apply(&c).await })
        .expect("apply with new MTU");
    let routes4 = ns.ip(&["route", "show", "table", "180"]);
    let routes6 = ns.ip(&["-6", "route", "show", "table", "180"]);
    for routes in [&routes4, &routes6] {
        assert_eq!(routes.lines().count(), 1, "{routes}");
        assert!(routes.contains("mtu 1380"), "{routes}");
    }
    assert!(ns.ip(&["link", "show", TUN]).contains("mtu 1380"));

    for _ in 0..2 {
        let c = config.clone();
        ns.routing(move || async move { routing::remove(&c).await })
            .expect("routing remove");
    }
    let rules = ns.ip(&["rule"]) + &ns.ip(&["-6", "rule"]);
    assert!(!rules.contains("lookup 180"), "{rules}");
    assert!(!rules.contains("32500"), "{rules}");
    assert_eq!(ns.ip(&["route", "show", "table", "180"]), "");
    assert_eq!(ns.ip(&["-6", "route", "show", "table", "180"]), "");

    // Apply again, then remove after the interface is gone: the rules still go, no error.
    let c = config.clone();
    ns.routing(move || async move { routing::apply(&c).await })
        .expect("re-apply");
    ns.ip(&["link", "del", TUN]);
    let c = config.clone();
    ns.routing(move || async move { routing::remove(&c).await })
        .expect("remove without the interface");
    let rules = ns.ip(&["rule"]) + &ns.ip(&["-6", "rule"]);
    assert!(!rules.contains("lookup 180"), "{rules}");

    // A missing interface is a clear error.
    let c = config.clone();
    let error = ns
        .routing(move || async move { routing::apply(&c).await })
        .expect_err("apply without the interface must fail");
    assert!(matches!(error, RoutingError::NoInterface(ref name) if name == TUN));
    assert!(error.to_string().contains("does not exist"), "{error}");
}

/// The whole walk of spec §5 for a locally originated TCP SYN: main-table lookup picks the
/// underlay, the output chain marks it and clamps its MSS, the kernel re-routes it through rule
/// 32500 into table 180 and out of the mesh interface. A probe table counts what leaves there.
#[test]
fn marked_traffic_leaves_through_the_mesh_interface() {
    if !require_root("marked_traffic_leaves_through_the_mesh_interface") {
        return;
    }
    let ns = Netns::with_tun("walk");
    // Underlay: a veth pair with a default route in the main table.
    ns.ip(&["link", "add", "ul0", "type", "veth", "peer", "name", "ul1"]);
    ns.ip(&["link", "set", "ul0", "up"]);
    ns.ip(&["link", "set", "ul1", "up"]);
    ns.ip(&["addr", "add", "192.0.2.1/24", "dev", "ul0"]);
    ns.ip(&["route", "add", "default", "via", "192.0.2.2", "dev", "ul0"]);

    let c = routing_config(1420);
    ns.routing(move || async move { routing::apply(&c).await })
        .expect("routing apply");
    ns.enter(|| firewall::apply(&firewall_config("kubespan"), &nets(&["10.244.0.0/16"])))
        .expect("firewall apply");

    let probe = r#"table inet probe {
        chain post {
            type filter hook postrouting priority 100; policy accept;
            oifname "ks-test" meta mark & 0x60 == 0x40 tcp option maxseg size 1368 counter
            oifname "ul0" ip daddr 10.244.0.0/16 counter
        }
    }"#;
    let file = std::env::temp_dir().join(format!("{}.nft", ns.name));
    std::fs::write(&file, probe).unwrap();
    ns.exec(&["nft", "-f", &file.to_string_lossy()]);
    let _ = std::fs::remove_file(&file);

    // A TCP connect that can't complete: the SYN is what we observe.
    let _ = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "timeout",
            "2",
            "bash",
            "-c",
            "exec 3<>/dev/tcp/10.244.7.7/80",
        ])
        .output();
    let listing = ns.exec(&["nft", "list", "table", "inet", "probe"]);
    println!("{listing}");
    let counters: Vec<&str> = listing.lines().filter(|l| l.contains("counter")).collect();
    assert_eq!(counters.len(), 2, "{listing}");
    assert!(
        !counters[0].contains("packets 0 "),
        "no MSS-clamped, force-marked SYN left through ks-test:\n{listing}"
    );
    assert!(
        counters[1].contains("packets 0 "),
        "mesh traffic leaked to the underlay:\n{listing}"
    );
}
