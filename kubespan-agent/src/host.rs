//! Facts about this host: its addresses (through netlink), hostname and OS name.

use std::collections::HashMap;
use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkFlags};

/// Global-scope addresses of links that are up, except those of `skip_interface` (the mesh
/// interface itself). Sorted by interface name, then in kernel order.
pub async fn node_addresses(skip_interface: &str) -> Result<Vec<IpAddr>, String> {
    Ok(node_networks(skip_interface)
        .await?
        .into_iter()
        .map(|net| net.addr())
        .collect())
}

/// [`node_addresses`] with their prefix lengths: the networks this node is on.
pub async fn node_networks(skip_interface: &str) -> Result<Vec<IpNet>, String> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| format!("cannot open a netlink socket: {e}"))?;
    let connection = tokio::spawn(connection);
    let result = async {
        let mut links: HashMap<u32, (String, bool)> = HashMap::new();
        let mut dump = handle.link().get().execute();
        while let Some(link) = dump.try_next().await? {
            let name = link
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            let up = link.header.flags.contains(LinkFlags::Up);
            links.insert(link.header.index, (name, up));
        }
        let mut found: Vec<(String, IpNet)> = Vec::new();
        let mut dump = handle.address().get().execute();
        while let Some(message) = dump.try_next().await? {
            if message.header.scope != AddressScope::Universe {
                continue;
            }
            let Some((name, up)) = links.get(&message.header.index) else {
                continue;
            };
            if !up || name == skip_interface {
                continue;
            }
            let local = message.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(ip.to_owned()),
                _ => None,
            });
            let address = message.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(ip.to_owned()),
                _ => None,
            });
            if let Some(net) = local
                .or(address)
                .and_then(|ip| IpNet::new(ip, message.header.prefix_len).ok())
            {
                found.push((name.clone(), net));
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found.into_iter().map(|(_, net)| net).collect())
    }
    .await
    .map_err(|e: rtnetlink::Error| format!("netlink dump failed: {e}"));
    connection.abort();
    result
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// `"<PRETTY_NAME> (openspan v<version>)"`, as Talos publishes `"Talos (v1.x)"`.
pub fn operating_system() -> String {
    let pretty = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| "Linux".into());
    format!("{pretty} (openspan v{})", env!("CARGO_PKG_VERSION"))
}
