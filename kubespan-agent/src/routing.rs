//! Policy routing for the mesh interface through netlink (spec §5).
//!
//! [`apply`] brings the interface up with the mesh MTU, puts the mesh ULA (/64) on it, installs
//! the default routes (IPv4 and IPv6) of the mesh routing table and the `fwmark` rules that send
//! force-marked packets to that table. [`remove`] takes the routes and rules away again.
//! Both are idempotent.

use crate::netlink::{EADDRNOTAVAIL, EEXIST, ENODEV, ENOENT, EPERM, ESRCH, errno};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::{RouteAttribute, RouteMetric, RouteScope};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, LinkUnspec, RouteMessageBuilder};

/// Prefix length of the mesh address on the interface.
pub const MESH_PREFIX_LEN: u8 = 64;
/// Metric of the default routes in the mesh table.
pub const ROUTE_METRIC: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingConfig {
    /// The mesh (WireGuard) interface; it must exist.
    pub interface: String,
    /// This node's mesh ULA, assigned as a /64.
    pub mesh_address: Ipv6Addr,
    /// Link MTU and route MTU of the mesh table's default routes.
    pub mtu: u32,
    /// Mesh routing table (180).
    pub table: u32,
    /// Priority of the `fwmark` rules (32500, just before `main` at 32766).
    pub rule_priority: u32,
    /// Mark that sends a packet to `table` (0x40).
    pub force_mark: u32,
    /// Mask applied to the packet mark before comparing with `force_mark` (0x60).
    pub mark_mask: u32,
}

impl RoutingConfig {
    /// Builds the routing settings from the agent's data plane configuration.
    pub fn from_data_plane(
        config: &crate::config::DataPlaneConfig,
        interface: impl Into<String>,
        mesh_address: Ipv6Addr,
        mtu: u32,
    ) -> Self {
        Self {
            interface: interface.into(),
            mesh_address,
            mtu,
            table: config.routing_table,
            rule_priority: config.rule_priority,
            force_mark: config.force_mark,
            mark_mask: config.mark_mask,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error(
        "network interface {0} does not exist; create the mesh (WireGuard) device before \
         configuring its routing"
    )]
    NoInterface(String),
    #[error("netlink: cannot {action}: {source}{hint}")]
    Netlink {
        action: String,
        #[source]
        source: rtnetlink::Error,
        hint: &'static str,
    },
}

/// The errno of a netlink error reply, as a positive number.
fn netlink(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> RoutingError {
    let action = action.into();
    move |source| {
        let hint = if errno(&source) == Some(EPERM) {
            "; this needs root or CAP_NET_ADMIN"
        } else {
            ""
        };
        RoutingError::Netlink {
            action,
            source,
            hint,
        }
    }
}

/// Idempotently configures the interface, its mesh address, the mesh table's default routes and
/// the `fwmark` rules (see the module documentation).
pub async fn apply(config: &RoutingConfig) -> Result<(), RoutingError> {
    with_handle(|handle| async move { apply_with(&handle, config).await }).await
}

/// Removes both rules and both routes. Missing pieces are not errors; the address goes away with
/// the interface.
pub async fn remove(config: &RoutingConfig) -> Result<(), RoutingError> {
    with_handle(|handle| async move { remove_with(&handle, config).await }).await
}

/// What [`apply`] installs that is not there now (read only; for `kubespanctl health`): the
/// interface, its being up, each family's rule and each family's default route in the table.
pub async fn missing(config: &RoutingConfig) -> Result<Vec<String>, RoutingError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(RoutingError::Socket)?;
    let connection = tokio::spawn(connection);
    let result = missing_with(&handle, config).await;
    connection.abort();
    result
}

async fn missing_with(
    handle: &Handle,
    config: &RoutingConfig,
) -> Result<Vec<String>, RoutingError> {
    let mut missing = Vec::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        if matching_rules(handle, config, version.clone())
            .await?
            .is_empty()
        {
            missing.push(format!(
                "{} rule `priority {} fwmark {:#x}/{:#x} lookup {}`",
                family_name(&version),
                config.rule_priority,
                config.force_mark,
                config.mark_mask,
                config.table
            ));
        }
    }
    let Some(index) = interface_index(handle, &config.interface).await? else {
        missing.push(format!("interface {}", config.interface));
        return Ok(missing);
    };
    let mut links = handle.link().get().match_index(index).execute();
    if let Ok(Some(link)) = links.try_next().await
        && !link
            .header
            .flags
            .contains(netlink_packet_route::link::LinkFlags::Up)
    {
        missing.push(format!("interface {} is down", config.interface));
    }
    for version in [IpVersion::V4, IpVersion::V6] {
        let name = family_name(&version);
        // Without a destination attribute the request is a dump (with one, a route lookup).
        let filter = match version {
            IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
                .table_id(config.table)
                .build(),
            IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
                .table_id(config.table)
                .build(),
        };
        let mut dump = handle.route().get(filter).execute();
        let mut found = false;
        while let Some(route) = dump
            .try_next()
            .await
            .map_err(netlink(format!("list the {name} routes")))?
        {
            let table = route
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(route.header.table));
            let through_mesh = route
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index));
            if table == config.table && route.header.destination_prefix_length == 0 && through_mesh
            {
                found = true;
            }
        }
        if !found {
            missing.push(format!(
                "{name} default route via {} in table {}",
                config.interface, config.table
            ));
        }
    }
    Ok(missing)
}

async fn with_handle<F, Fut>(body: F) -> Result<(), RoutingError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: std::future::Future<Output = Result<(), RoutingError>>,
{
    let (connection, handle, _) = rtnetlink::new_connection().map_err(RoutingError::Socket)?;
    let connection = tokio::spawn(connection);
    let result = body(handle).await;
    connection.abort();
    result
}

async fn apply_with(handle: &Handle, config: &RoutingConfig) -> Result<(), RoutingError> {
    let index = interface_index(handle, &config.interface)
        .await?
        .ok_or_else(|| RoutingError::NoInterface(config.interface.clone()))?;

    handle
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .mtu(config.mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(netlink(format!(
            "set MTU {} and bring up interface {}",
            config.mtu, config.interface
        )))?;

    ensure_address(handle, config, index).await?;

    for version in [IpVersion::V4, IpVersion::V6] {
        let mut route = default_route(&version, config.table, index);
        route
            .attributes
            .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(config.mtu)]));
        handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(netlink(format!(
                "install the {} default route via {} in table {}",
                family_name(&version),
                config.interface,
                config.table
            )))?;
    }

    for version in [IpVersion::V4, IpVersion::V6] {
        if !matching_rules(handle, config, version.clone())
            .await?
            .is_empty()
        {
            continue;
        }
        let mut request = handle
            .rule()
            .add()
            .priority(config.rule_priority)
            .fw_mark(config.force_mark)
            .table_id(config.table)
            .action(RuleAction::ToTable);
        request
            .message_mut()
            .attributes
            .push(RuleAttribute::FwMask(config.mark_mask));
        let result = match version {
            IpVersion::V4 => request.v4().execute().await,
            IpVersion::V6 => request.v6().execute().await,
        };
        match result {
            // Someone added the identical rule since the dump: fine.
            Err(e) if errno(&e) == Some(EEXIST) => {}
            other => other.map_err(netlink(format!(
                "add the {} rule `fwmark {:#x}/{:#x} lookup {}`",
                family_name(&version),
                config.force_mark,
                config.mark_mask,
                config.table
            )))?,
        }
    }
    Ok(())
}

async fn remove_with(handle: &Handle, config: &RoutingConfig) -> Result<(), RoutingError> {
    for version in [IpVersion::V4, IpVersion::V6] {
        for rule in matching_rules(handle, config, version.clone()).await? {
            match handle.rule().del(rule).execute().await {
                Err(e) if matches!(errno(&e), Some(ENOENT | ESRCH)) => {}
                other => other.map_err(netlink(format!(
                    "delete the {} rule `fwmark {:#x}/{:#x} lookup {}`",
                    family_name(&version),
                    config.force_mark,
                    config.mark_mask,
                    config.table
                )))?,
            }
        }
    }

    // Routes through a missing interface are already gone with it.
    let Some(index) = interface_index(handle, &config.interface).await? else {
        return Ok(());
    };
    for version in [IpVersion::V4, IpVersion::V6] {
        let mut route = default_route(&version, config.table, index);
        // Like `ip route del`: match whatever scope the route has.
        route.header.scope = RouteScope::NoWhere;
        match handle.route().del(route).execute().await {
            Err(e) if matches!(errno(&e), Some(ENOENT | ESRCH)) => {}
            other => other.map_err(netlink(format!(
                "delete the {} default route via {} in table {}",
                family_name(&version),
                config.interface,
                config.table
            )))?,
        }
    }
    Ok(())
}

fn family_name(version: &IpVersion) -> &'static str {
    match version {
        IpVersion::V4 => "IPv4",
        IpVersion::V6 => "IPv6",
    }
}

/// `default dev <index> metric 1 table <table> proto static scope global`.
fn default_route(
    version: &IpVersion,
    table: u32,
    index: u32,
) -> netlink_packet_route::route::RouteMessage {
    match version {
        IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .output_interface(index)
            .priority(ROUTE_METRIC)
            .table_id(table)
            .build(),
        IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .output_interface(index)
            .priority(ROUTE_METRIC)
            .table_id(table)
            .build(),
    }
}

async fn interface_index(handle: &Handle, name: &str) -> Result<Option<u32>, RoutingError> {
    let mut links = handle.link().get().match_name(name).execute();
    match links.try_next().await {
        Ok(Some(link)) => {
            // Older kernels ignore the name filter; double-check.
            let same = link
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::IfName(n) if n == name));
            Ok(same.then_some(link.header.index))
        }
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(netlink(format!("look up interface {name}"))(e)),
    }
}

/// Puts `mesh_address/64` on the interface unless it is already there. The same address with
/// another prefix length is replaced.
async fn ensure_address(
    handle: &Handle,
    config: &RoutingConfig,
    index: u32,
) -> Result<(), RoutingError> {
    let wanted = IpAddr::V6(config.mesh_address);
    let mut existing = Vec::new();
    let mut dump = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .set_address_filter(wanted)
        .execute();
    while let Some(message) = dump.try_next().await.map_err(netlink(format!(
        "list the addresses of interface {}",
        config.interface
    )))? {
        let has_address = message.attributes.iter().any(|a| {
            matches!(a, AddressAttribute::Address(ip) | AddressAttribute::Local(ip) if *ip == wanted)
        });
        if has_address {
            existing.push(message);
        }
    }
    if existing
        .iter()
        .any(|m| m.header.prefix_len == MESH_PREFIX_LEN)
    {
        return Ok(());
    }
    for stale in existing {
        let prefix_len = stale.header.prefix_len;
        match handle.address().del(stale).execute().await {
            Err(e) if errno(&e) == Some(EADDRNOTAVAIL) => {}
            other => other.map_err(netlink(format!(
                "delete {}/{} from interface {}",
                config.mesh_address, prefix_len, config.interface
            )))?,
        }
    }
    match handle
        .address()
        .add(index, wanted, MESH_PREFIX_LEN)
        .execute()
        .await
    {
        Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
        other => other.map_err(netlink(format!(
            "add {}/{} to interface {}",
            config.mesh_address, MESH_PREFIX_LEN, config.interface
        ))),
    }
}

/// Rules of one family identical to ours: priority, `fwmark force_mark/mark_mask`,
/// `lookup table`, and no other selector.
async fn matching_rules(
    handle: &Handle,
    config: &RoutingConfig,
    version: IpVersion,
) -> Result<Vec<RuleMessage>, RoutingError> {
    let name = family_name(&version);
    let mut dump = handle.rule().get(version).execute();
    let mut found = Vec::new();
    while let Some(rule) = dump
        .try_next()
        .await
        .map_err(netlink(format!("list the {name} rules")))?
    {
        if is_our_rule(&rule, config) {
            found.push(rule);
        }
    }
    Ok(found)
}

fn is_our_rule(rule: &RuleMessage, config: &RoutingConfig) -> bool {
    if rule.header.action != RuleAction::ToTable
        || rule.header.src_len != 0
        || rule.header.dst_len != 0
        || rule.header.tos != 0
    {
        return false;
    }
    let mut priority = None;
    let mut mark = None;
    let mut mask = None;
    let mut table = u32::from(rule.header.table);
    for attribute in &rule.attributes {
        match attribute {
            RuleAttribute::Priority(p) => priority = Some(*p),
            RuleAttribute::FwMark(m) => mark = Some(*m),
            RuleAttribute::FwMask(m) => mask = Some(*m),
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::Iifname(_)
            | RuleAttribute::Oifname(_)
            | RuleAttribute::Source(_)
            | RuleAttribute::Destination(_)
            | RuleAttribute::Goto(_)
            | RuleAttribute::UidRange(_)
            | RuleAttribute::IpProtocol(_)
            | RuleAttribute::SourcePortRange(_)
            | RuleAttribute::DestinationPortRange(_)
            | RuleAttribute::TunId(_)
            | RuleAttribute::L3MDev(true) => return false,
            // -1 (u32::MAX) is the kernel's "not set" for both suppressors.
            RuleAttribute::SuppressPrefixLen(n) | RuleAttribute::SuppressIfGroup(n)
                if *n != u32::MAX =>
            {
                return false;
            }
            _ => {}
        }
    }
    priority == Some(config.rule_priority)
        && mark == Some(config.force_mark)
        // Without a mask attribute the kernel compares against all bits.
        && mask.unwrap_or(u32::MAX) == config.mark_mask
        && table == config.table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RoutingConfig {
        RoutingConfig {
            interface: "kubespan".into(),
            mesh_address: "fd00::1".parse().unwrap(),
            mtu: 1420,
            table: 180,
            rule_priority: 32500,
            force_mark: 0x40,
            mark_mask: 0x60,
        }
    }

    fn rule(extra: Vec<RuleAttribute>) -> RuleMessage {
        let mut rule = RuleMessage::default();
        rule.header.action = RuleAction::ToTable;
        rule.header.table = 180;
        rule.attributes = vec![
            RuleAttribute::Priority(32500),
            RuleAttribute::FwMark(0x40),
            RuleAttribute::FwMask(0x60),
            RuleAttribute::Table(180),
            RuleAttribute::SuppressPrefixLen(u32::MAX),
        ];
        rule.attributes.extend(extra);
        rule
    }

    #[test]
    fn recognizes_our_rule_as_the_kernel_dumps_it() {
        assert!(is_our_rule(&rule(vec![]), &config()));
    }

    #[test]
    fn other_rules_are_not_ours() {
        let c = config();
        assert!(!is_our_rule(
            &rule(vec![RuleAttribute::Iifname("eth0".into())]),
            &c
        ));
        assert!(!is_our_rule(
            &rule(vec![RuleAttribute::SuppressPrefixLen(0)]),
            &c
        ));
        let mut no_mask = rule(vec![]);
        no_mask
            .attributes
            .retain(|a| !matches!(a, RuleAttribute::FwMask(_)));
        assert!(!is_our_rule(&no_mask, &c));
        let mut other_table = rule(vec![]);
        other_table.attributes.push(RuleAttribute::Table(181));
        assert!(!is_our_rule(&other_table, &c));
        let mut blackhole = rule(vec![]);
        blackhole.header.action = RuleAction::Blackhole;
        assert!(!is_our_rule(&blackhole, &c));
        assert!(!is_our_rule(
            &rule(vec![]),
            &RoutingConfig {
                rule_priority: 100,
                ..c
            }
        ));
    }
}
