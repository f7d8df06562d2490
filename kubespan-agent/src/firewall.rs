//! The agent's own nftables table (family `inet`), written through `nft`'s JSON interface.
//!
//! [`render`] is pure: it builds one JSON batch that atomically replaces the whole table (sets
//! `routed_v4`/`routed_v6` and the chains `prerouting`/`output` of spec §5). [`apply`] feeds that
//! batch to `nft -j -f -` (one kernel transaction: all or nothing), [`remove`] deletes the table.
//!
//! Rule order (spec §5):
//! - `prerouting` (filter, hook prerouting, priority 0, policy accept):
//!   1. `meta mark & mask == firewall_mark accept` — WireGuard's own encrypted packets;
//!   2. `ip daddr @routed_v4 meta mark set (mark & ~mask) | force_mark accept`, same for IPv6.
//! - `output` (route, hook output, priority 0, policy accept; the route type makes the kernel
//!   re-route after the mark changes):
//!   1. the firewall-mark check as above;
//!   2. `oifname "lo" accept`;
//!   3. MSS clamp of locally originated TCP SYNs to MTU − 52 (IPv4) / MTU − 72 (IPv6);
//!   4. the force-mark rules as in prerouting.

use std::io::Write;
use std::process::{Command, Stdio};

use ipnet::IpNet;
use serde_json::{Value, json};

/// Name of the IPv4 destination set.
pub const SET_V4: &str = "routed_v4";
/// Name of the IPv6 destination set.
pub const SET_V6: &str = "routed_v6";
/// Name of the prerouting chain (forwarded traffic).
pub const CHAIN_PREROUTING: &str = "prerouting";
/// Name of the output chain (locally originated traffic).
pub const CHAIN_OUTPUT: &str = "output";

/// IPv4 header (20) + TCP header (20) + TCP options (12).
const MSS_OVERHEAD_V4: u32 = 52;
/// IPv6 header (40) + TCP header (20) + TCP options (12).
const MSS_OVERHEAD_V6: u32 = 72;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirewallConfig {
    /// Table name, family `inet` (e.g. `kubespan`). The agent owns the whole table.
    pub table: String,
    /// Mark WireGuard puts on its own encrypted packets (0x20).
    pub firewall_mark: u32,
    /// Mark that sends a packet into the mesh routing table (0x40).
    pub force_mark: u32,
    /// The only mark bits the rules look at or change (0x60).
    pub mark_mask: u32,
    /// Mesh MTU; basis of the MSS clamp.
    pub mtu: u32,
}

impl FirewallConfig {
    /// Builds the firewall settings from the agent's data plane configuration.
    pub fn from_data_plane(config: &crate::config::DataPlaneConfig, mtu: u32) -> Self {
        Self {
            table: config.nftables_table.clone(),
            firewall_mark: config.firewall_mark,
            force_mark: config.force_mark,
            mark_mask: config.mark_mask,
            mtu,
        }
    }

    /// MSS that locally originated IPv4 TCP SYNs are clamped to: MTU − 52.
    pub fn mss_v4(&self) -> u32 {
        clamp_mss(self.mtu, MSS_OVERHEAD_V4)
    }

    /// MSS that locally originated IPv6 TCP SYNs are clamped to: MTU − 72.
    pub fn mss_v6(&self) -> u32 {
        clamp_mss(self.mtu, MSS_OVERHEAD_V6)
    }

    /// Value the mark is AND-ed with before OR-ing in the force mark: `!mark_mask`.
    pub fn keep_mask(&self) -> u32 {
        !self.mark_mask
    }
}

fn clamp_mss(mtu: u32, overhead: u32) -> u32 {
    // The MSS option is 16 bits wide; nft rejects larger values.
    mtu.saturating_sub(overhead).min(u32::from(u16::MAX))
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error(
        "cannot run `nft`: the nftables command-line tool is not installed; install the \
         `nftables` package (e.g. `apt-get install nftables`)"
    )]
    NftMissing,
    #[error("cannot run `nft` to {action} table inet {table}: {source}")]
    Spawn {
        action: &'static str,
        table: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nft failed to {action} table inet {table} ({status}): {stderr}{hint}")]
    Rejected {
        action: &'static str,
        table: String,
        status: std::process::ExitStatus,
        stderr: String,
        hint: &'static str,
    },
}

/// The complete JSON batch (`{"nftables":[...]}`) that atomically replaces the table.
///
/// `routed` is normalized first (duplicates and overlapping prefixes merged, host bits cleared),
/// because nft rejects overlapping interval elements. IPv4 prefixes go to `routed_v4`, IPv6 ones
/// to `routed_v6`; empty sets are valid and simply match nothing.
pub fn render(config: &FirewallConfig, routed: &[IpNet]) -> Value {
    let table = config.table.as_str();
    let base = json!({"family": "inet", "name": table});
    let normalized = IpNet::aggregate(&routed.to_vec());
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for net in &normalized {
        let element = json!({"prefix": {"addr": net.addr().to_string(), "len": net.prefix_len()}});
        match net {
            IpNet::V4(_) => v4.push(element),
            IpNet::V6(_) => v6.push(element),
        }
    }

    let mut batch = vec![
        json!({"add": {"table": base.clone()}}),
        json!({"delete": {"table": base.clone()}}),
        json!({"add": {"table": base}}),
        json!({"add": {"set": set(table, SET_V4, "ipv4_addr", v4)}}),
        json!({"add": {"set": set(table, SET_V6, "ipv6_addr", v6)}}),
        json!({"add": {"chain": chain(table, CHAIN_PREROUTING, "filter", "prerouting")}}),
        json!({"add": {"chain": chain(table, CHAIN_OUTPUT, "route", "output")}}),
    ];

    let mut prerouting = vec![
        vec![own_traffic(config), accept()],
        vec![daddr_in("ip", SET_V4), force_mark(config), accept()],
        vec![daddr_in("ip6", SET_V6), force_mark(config), accept()],
    ];
    let mut output = vec![
        vec![own_traffic(config), accept()],
        vec![
            json!({"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "lo"}}),
            accept(),
        ],
    ];
    output.push(mss_clamp("ip", SET_V4, config.mss_v4()));
    output.push(mss_clamp("ip6", SET_V6, config.mss_v6()));
    output.push(vec![daddr_in("ip", SET_V4), force_mark(config), accept()]);
    output.push(vec![daddr_in("ip6", SET_V6), force_mark(config), accept()]);

    for (chain_name, rules) in [
        (CHAIN_PREROUTING, &mut prerouting),
        (CHAIN_OUTPUT, &mut output),
    ] {
        for expr in rules.drain(..) {
            batch.push(json!({"add": {"rule": {
                "family": "inet",
                "table": table,
                "chain": chain_name,
                "expr": expr,
            }}}));
        }
    }
    json!({"nftables": batch})
}

fn set(table: &str, name: &str, kind: &str, elements: Vec<Value>) -> Value {
    let mut set = json!({
        "family": "inet",
        "table": table,
        "name": name,
        "type": kind,
        "flags": ["interval"],
    });
    // nft 1.0.6 rejects an empty "elem" array; an absent one means an empty set.
    if !elements.is_empty() {
        set["elem"] = Value::Array(elements);
    }
    set
}

fn chain(table: &str, name: &str, kind: &str, hook: &str) -> Value {
    json!({
        "family": "inet",
        "table": table,
        "name": name,
        "type": kind,
        "hook": hook,
        "prio": 0,
        "policy": "accept",
    })
}

fn meta_mark() -> Value {
    json!({"meta": {"key": "mark"}})
}

fn accept() -> Value {
    json!({"accept": null})
}

/// `meta mark & mask == firewall_mark`
fn own_traffic(config: &FirewallConfig) -> Value {
    json!({"match": {
        "op": "==",
        "left": {"&": [meta_mark(), config.mark_mask]},
        "right": config.firewall_mark,
    }})
}

/// `<protocol> daddr @<set>`
fn daddr_in(protocol: &str, set: &str) -> Value {
    json!({"match": {
        "op": "==",
        "left": {"payload": {"protocol": protocol, "field": "daddr"}},
        "right": format!("@{set}"),
    }})
}

/// `meta mark set (meta mark & ~mask) | force_mark`
fn force_mark(config: &FirewallConfig) -> Value {
    json!({"mangle": {
        "key": meta_mark(),
        "value": {"|": [{"&": [meta_mark(), config.keep_mask()]}, config.force_mark]},
    }})
}

/// `<protocol> daddr @<set> tcp flags & (syn|rst) == syn tcp option maxseg size > mss
///  tcp option maxseg size set mss`
fn mss_clamp(protocol: &str, set: &str, mss: u32) -> Vec<Value> {
    let maxseg = json!({"tcp option": {"name": "maxseg", "field": "size"}});
    vec![
        daddr_in(protocol, set),
        json!({"match": {
            "op": "==",
            "left": {"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "rst"]]},
            "right": "syn",
        }}),
        json!({"match": {"op": ">", "left": maxseg.clone(), "right": mss}}),
        json!({"mangle": {"key": maxseg, "value": mss}}),
    ]
}

/// Applies [`render`] with `nft -j -f -`: one transaction, so either the whole new table is in
/// place or the old one is untouched. The error carries nft's stderr.
pub fn apply(config: &FirewallConfig, routed: &[IpNet]) -> Result<(), FirewallError> {
    let batch = render(config, routed);
    run_nft(&config.table, "replace", &batch)
}

/// Deletes the table if it exists (shutdown, and leftovers of a crashed run at start).
pub fn remove(config: &FirewallConfig) -> Result<(), FirewallError> {
    let base = json!({"family": "inet", "name": config.table});
    // Adding first makes the delete succeed whether or not the table exists.
    let batch = json!({"nftables": [
        {"add": {"table": base.clone()}},
        {"delete": {"table": base}},
    ]});
    run_nft(&config.table, "delete", &batch)
}

/// How long `nft list` may take before the health check gives up on it.
const LIST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The chains of the agent's table as the kernel has them (read only; for `kubespanctl
/// health`). `Err` says why the table cannot be listed: missing, or `nft` itself. Terse (`-t`):
/// the sets' elements, which grow with the peers' networks, are not listed.
pub async fn chains(table: &str) -> Result<Vec<String>, String> {
    let listing = tokio::process::Command::new("nft")
        .args(["-t", "-j", "list", "table", "inet", table])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(LIST_TIMEOUT, listing).await {
        Err(_) => {
            return Err(format!(
                "`nft list table inet {table}` did not finish within {LIST_TIMEOUT:?}"
            ));
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(FirewallError::NftMissing.to_string());
        }
        Ok(Err(e)) => return Err(format!("cannot run `nft list table inet {table}`: {e}")),
        Ok(Ok(output)) => output,
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let first = stderr.lines().next().unwrap_or("").trim();
        return Err(format!("table inet {table} is not there ({first})"));
    }
    let listing: Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("cannot read `nft -j list table inet {table}`: {e}"))?;
    Ok(listing["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item["chain"]["name"].as_str().map(str::to_owned))
        .collect())
}

/// Where nft reads the batch the agent pipes to it.
const NFT_INPUT: &str = "/proc/self/fd/0";

fn run_nft(table: &str, action: &'static str, batch: &Value) -> Result<(), FirewallError> {
    let input = batch.to_string();
    // `-f -` makes nft open /dev/stdin by name, a link minimal hosts (containers without it,
    // initramfs, busybox systems) do not have; /proc/self/fd/0 is the same pipe through procfs.
    let mut child = Command::new("nft")
        .args(["-j", "-f", NFT_INPUT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                FirewallError::NftMissing
            } else {
                FirewallError::Spawn {
                    action,
                    table: table.to_owned(),
                    source,
                }
            }
        })?;

    // Feed stdin from another thread while this one collects the output, so a large batch can
    // never deadlock on full pipes.
    let stdin = child.stdin.take();
    let (written, output) = std::thread::scope(|scope| {
        let writer = scope.spawn(move || match stdin {
            Some(mut stdin) => stdin.write_all(input.as_bytes()),
            None => Err(std::io::Error::other("nft's stdin is not a pipe")),
        });
        let output = child.wait_with_output();
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("writing to nft's stdin panicked")));
        (written, output)
    });
    let output = output.map_err(|source| FirewallError::Spawn {
        action,
        table: table.to_owned(),
        source,
    })?;
    if output.status.success() {
        if let Err(source) = written {
            return Err(FirewallError::Spawn {
                action,
                table: table.to_owned(),
                source,
            });
        }
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    let hint = if stderr.contains("Operation not permitted") {
        "; the agent needs root or CAP_NET_ADMIN to change nftables"
    } else if stderr.contains(NFT_INPUT) {
        "; the agent hands nft its batch through /proc/self/fd/0: is /proc mounted?"
    } else {
        ""
    };
    Err(FirewallError::Rejected {
        action,
        table: table.to_owned(),
        status: output.status,
        stderr,
        hint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(mtu: u32) -> FirewallConfig {
        FirewallConfig {
            table: "kubespan".into(),
            firewall_mark: 0x20,
            force_mark: 0x40,
            mark_mask: 0x60,
            mtu,
        }
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn commands(batch: &Value) -> &Vec<Value> {
        batch["nftables"].as_array().unwrap()
    }

    fn set_elements(batch: &Value, name: &str) -> Vec<String> {
        let set = commands(batch)
            .iter()
            .find_map(|c| c["add"]["set"].as_object().filter(|s| s["name"] == name))
            .unwrap_or_else(|| panic!("set {name} missing"));
        set.get("elem")
            .map(|e| {
                e.as_array()
                    .unwrap()
                    .iter()
                    .map(|p| {
                        format!(
                            "{}/{}",
                            p["prefix"]["addr"].as_str().unwrap(),
                            p["prefix"]["len"]
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn rules(batch: &Value, chain: &str) -> Vec<Value> {
        commands(batch)
            .iter()
            .filter(|c| c["add"]["rule"]["chain"] == chain)
            .map(|c| c["add"]["rule"]["expr"].clone())
            .collect()
    }

    #[test]
    fn batch_replaces_the_table_atomically() {
        let batch = render(&config(1420), &[]);
        let cmds = commands(&batch);
        let table = json!({"family": "inet", "name": "kubespan"});
        assert_eq!(cmds[0], json!({"add": {"table": table}}));
        assert_eq!(cmds[1], json!({"delete": {"table": table}}));
        assert_eq!(cmds[2], json!({"add": {"table": table}}));
        let pre = &cmds[5]["add"]["chain"];
        assert_eq!(
            (
                &pre["name"],
                &pre["type"],
                &pre["hook"],
                &pre["prio"],
                &pre["policy"]
            ),
            (
                &json!("prerouting"),
                &json!("filter"),
                &json!("prerouting"),
                &json!(0),
                &json!("accept")
            )
        );
        let out = &cmds[6]["add"]["chain"];
        assert_eq!(
            (
                &out["name"],
                &out["type"],
                &out["hook"],
                &out["prio"],
                &out["policy"]
            ),
            (
                &json!("output"),
                &json!("route"),
                &json!("output"),
                &json!(0),
                &json!("accept")
            )
        );
    }

    #[test]
    fn sets_split_by_family() {
        let batch = render(
            &config(1420),
            &nets(&[
                "10.244.1.0/24",
                "fd00:1::/64",
                "192.168.5.7/32",
                "2001:db8::1/128",
            ]),
        );
        assert_eq!(
            set_elements(&batch, SET_V4),
            ["10.244.1.0/24", "192.168.5.7/32"]
        );
        assert_eq!(
            set_elements(&batch, SET_V6),
            ["2001:db8::1/128", "fd00:1::/64"]
        );
        for (name, kind) in [(SET_V4, "ipv4_addr"), (SET_V6, "ipv6_addr")] {
            let set = commands(&batch)
                .iter()
                .find(|c| c["add"]["set"]["name"] == name)
                .unwrap();
            assert_eq!(set["add"]["set"]["type"], kind);
            assert_eq!(set["add"]["set"]["flags"], json!(["interval"]));
        }
    }

    #[test]
    fn empty_sets_have_no_elem_key_and_rules_stay() {
        let batch = render(&config(1420), &[]);
        for name in [SET_V4, SET_V6] {
            let set = commands(&batch)
                .iter()
                .find(|c| c["add"]["set"]["name"] == name)
                .unwrap();
            assert!(set["add"]["set"].get("elem").is_none());
        }
        assert_eq!(rules(&batch, CHAIN_PREROUTING).len(), 3);
        assert_eq!(rules(&batch, CHAIN_OUTPUT).len(), 6);
    }

    #[test]
    fn duplicates_and_overlaps_are_normalized() {
        let batch = render(
            &config(1420),
            &nets(&[
                "10.0.0.0/8",
                "10.1.2.0/24",
                "10.0.0.0/8",
                "192.168.1.5/24",
                "192.168.0.0/24",
                "fd00::/16",
                "fd00:1::/64",
                "fd00::/16",
            ]),
        );
        // Host bits cleared, contained prefixes dropped, adjacent ones merged.
        assert_eq!(
            set_elements(&batch, SET_V4),
            ["10.0.0.0/8", "192.168.0.0/23"]
        );
        assert_eq!(set_elements(&batch, SET_V6), ["fd00::/16"]);
    }

    #[test]
    fn mark_arithmetic() {
        let c = config(1420);
        assert_eq!(c.keep_mask(), 0xffff_ff9f);
        let batch = render(&c, &nets(&["10.0.0.0/8"]));
        let pre = rules(&batch, CHAIN_PREROUTING);
        assert_eq!(
            pre[0],
            json!([
                {"match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, 0x60]}, "right": 0x20}},
                {"accept": null}
            ])
        );
        let set_mark = json!({"mangle": {
            "key": {"meta": {"key": "mark"}},
            "value": {"|": [{"&": [{"meta": {"key": "mark"}}, 0xffff_ff9f_u32]}, 0x40]},
        }});
        assert_eq!(pre[1][1], set_mark);
        assert_eq!(pre[1][0]["match"]["right"], "@routed_v4");
        assert_eq!(pre[2][1], set_mark);
        assert_eq!(pre[2][0]["match"]["left"]["payload"]["protocol"], "ip6");
        assert_eq!(pre[2][0]["match"]["right"], "@routed_v6");
        let out = rules(&batch, CHAIN_OUTPUT);
        assert_eq!(out[0], pre[0]);
        assert_eq!(out[1][0]["match"]["right"], "lo");
        assert_eq!(out[4][1], set_mark);
        assert_eq!(out[5][1], set_mark);
        assert_eq!(out[4][2], json!({"accept": null}));
    }

    fn clamp_values(batch: &Value) -> Vec<(String, u64, u64)> {
        rules(batch, CHAIN_OUTPUT)
            .iter()
            .filter(|r| r.as_array().unwrap().len() == 4)
            .map(|r| {
                assert_eq!(r[1]["match"]["right"], "syn");
                assert_eq!(r[1]["match"]["left"]["&"][1], json!(["syn", "rst"]));
                assert_eq!(r[2]["match"]["op"], ">");
                (
                    r[0]["match"]["right"].as_str().unwrap().to_owned(),
                    r[2]["match"]["right"].as_u64().unwrap(),
                    r[3]["mangle"]["value"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn mss_clamp_values() {
        let batch = render(&config(1420), &[]);
        assert_eq!(
            clamp_values(&batch),
            [
                ("@routed_v4".to_owned(), 1368, 1368),
                ("@routed_v6".to_owned(), 1348, 1348)
            ]
        );
        let batch = render(&config(1280), &[]);
        assert_eq!(
            clamp_values(&batch),
            [
                ("@routed_v4".to_owned(), 1228, 1228),
                ("@routed_v6".to_owned(), 1208, 1208)
            ]
        );
        assert_eq!(config(40).mss_v4(), 0);
        assert_eq!(config(100_000).mss_v6(), 65535);
    }

    #[test]
    fn output_rule_order() {
        let out = rules(&render(&config(1420), &[]), CHAIN_OUTPUT);
        let shapes: Vec<String> = out
            .iter()
            .map(|r| {
                let first = &r[0]["match"];
                let last = r.as_array().unwrap().last().unwrap();
                let kind = if last.get("accept").is_some() {
                    "accept"
                } else {
                    "clamp"
                };
                format!("{}:{}", first["right"], kind)
            })
            .collect();
        assert_eq!(
            shapes,
            [
                "32:accept",
                "\"lo\":accept",
                "\"@routed_v4\":clamp",
                "\"@routed_v6\":clamp",
                "\"@routed_v4\":accept",
                "\"@routed_v6\":accept"
            ]
        );
    }
}
