//! Kernel WireGuard, driven over netlink: the link (kind `wireguard`) through rtnetlink, keys,
//! port and peers through the generic-netlink family `wireguard` (`WG_CMD_SET_DEVICE` and
//! `WG_CMD_GET_DEVICE`, as `wg(8)` does), so `wg show` works on the interface as usual.
//!
//! The netlink conversations run on the device's [`NetlinkWorker`]: one thread with its runtime
//! and its sockets for the device's whole life (see [`crate::worker`] for why a thread).
//!
//! The message building and reply parsing are pure functions, unit-tested below, because this
//! project's test machine has no WireGuard module.

use crate::netlink::{EEXIST, ENODEV, ENOENT, EOPNOTSUPP, EPERM, errno};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use genetlink::GenetlinkError;
use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_generic::GenlMessage;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
    WireguardTimeSpec,
};
use rtnetlink::LinkWireguard;

use super::{DeviceSettings, Key, PeerConfig, PeerState, WgError, WireGuard};
use crate::worker::{NetlinkWorker, device};

/// Allowed IPs per `WG_CMD_SET_DEVICE` message. A netlink attribute's length is 16 bits; one
/// allowed IP takes at most 40 bytes, so 1000 of them plus the peer's other attributes (about
/// 130 bytes) stay well below 64 KiB. Longer lists continue in further messages, as `wg(8)` does.
const ALLOWED_IPS_PER_MESSAGE: usize = 1000;

/// A dump interrupted by a concurrent change (NLM_F_DUMP_INTR) is repeated this often.
const DUMP_ATTEMPTS: usize = 3;

/// A kernel WireGuard interface the agent created (or adopted), deleted again on drop.
pub struct KernelWireGuard {
    interface: String,
    index: u32,
    worker: NetlinkWorker,
}

impl KernelWireGuard {
    /// Creates the WireGuard link `interface`, or adopts an existing WireGuard link of that name
    /// (e.g. left by a crashed run; the reconciler removes peers it does not want). The link is
    /// left down: routing brings it up and sets the MTU.
    ///
    /// Fails with [`WgError::Unsupported`] when the kernel has no WireGuard.
    pub fn create(interface: &str) -> Result<Self, WgError> {
        let name = interface.to_owned();
        let worker = NetlinkWorker::start(interface)?;
        let (index, created) = worker.run(move |sockets| async move {
            let handle = sockets.route;
            let created = match add_wireguard_link(&handle, &name).await {
                Ok(()) => true,
                Err(e) if errno(&e) == Some(EEXIST) => false,
                Err(e) => return Err(link_error(&name, "create the WireGuard link", &e)),
            };
            match link_kind(&handle, &name).await {
                Ok(Some((index, Some(InfoKind::Wireguard)))) => Ok((index, created)),
                Ok(Some((_, kind))) => Err(device(
                    &name,
                    format!(
                        "the interface exists but is not a WireGuard link (kind {}); remove it \
                         (`ip link del {name}`) or configure another interface",
                        kind.map_or_else(|| "none".to_owned(), |k| k.to_string())
                    ),
                )),
                Ok(None) => Err(device(
                    &name,
                    "the WireGuard link vanished right after it was created; is another \
                     program managing this interface?",
                )),
                Err(e) => Err(link_error(&name, "look up the WireGuard link", &e)),
            }
        })?;
        if created {
            tracing::debug!(interface, index, "created the kernel WireGuard link");
        } else {
            tracing::info!(
                interface,
                index,
                "adopted an existing kernel WireGuard link"
            );
        }
        Ok(Self {
            interface: interface.to_owned(),
            index,
            worker,
        })
    }

    /// Sends `messages` in order, each acknowledged before the next.
    fn set(&self, messages: Vec<WireguardMessage>, what: &str) -> Result<(), WgError> {
        let name = self.interface.clone();
        let what = what.to_owned();
        self.worker.run(move |sockets| async move {
            let mut handle = sockets.generic;
            for message in messages {
                genl_exchange(&mut handle, &name, message, NLM_F_REQUEST | NLM_F_ACK)
                    .await
                    .map_err(|e| prefix(e, &what))?;
            }
            Ok(())
        })
    }
}

impl Drop for KernelWireGuard {
    fn drop(&mut self) {
        let name = self.interface.clone();
        let index = self.index;
        let result = self.worker.run(move |sockets| async move {
            match sockets.route.link().del(index).execute().await {
                Ok(()) => Ok(()),
                Err(e) if errno(&e) == Some(ENODEV) => Ok(()),
                Err(e) => Err(link_error(&name, "delete the WireGuard link", &e)),
            }
        });
        if let Err(e) = result {
            tracing::warn!(interface = %self.interface, error = %e, "the WireGuard interface stays behind");
        }
    }
}

impl WireGuard for KernelWireGuard {
    fn interface(&self) -> &str {
        &self.interface
    }

    fn describe(&self) -> String {
        format!("kernel WireGuard on {}", self.interface)
    }

    fn configure(&mut self, settings: &DeviceSettings) -> Result<(), WgError> {
        self.set(
            vec![device_message(&self.interface, settings)],
            "set the private key, listen port and fwmark",
        )
    }

    /// The kernel updates a peer in place, so without `reset_session` the peer keeps its session,
    /// counters and (when `endpoint` is `None`) its roamed endpoint, and its allowed IPs are
    /// replaced atomically. With `reset_session` and an endpoint, the peer is removed and added
    /// again in the same message: the kernel sends at most one handshake initiation per
    /// REKEY_TIMEOUT (5 s) per peer, so an existing peer that just tried a dead endpoint would
    /// wait up to 5 s before trying the new one, while a new peer starts at once (the first
    /// packet, or its first persistent keepalive, triggers it). Packets between the removal and
    /// the re-addition (microseconds, and only for a peer that is being switched anyway) find no
    /// peer and are dropped.
    fn set_peer(&mut self, peer: &PeerConfig, reset_session: bool) -> Result<(), WgError> {
        let recreate = reset_session && peer.endpoint.is_some();
        self.set(
            set_peer_messages(&self.interface, peer, recreate),
            "set a peer",
        )
    }

    fn remove_peer(&mut self, public_key: &Key) -> Result<(), WgError> {
        self.set(
            vec![remove_peer_message(&self.interface, public_key)],
            "remove a peer",
        )
    }

    fn updates_in_place(&self) -> bool {
        true
    }

    fn peers(&mut self) -> Result<Vec<PeerState>, WgError> {
        let name = self.interface.clone();
        let replies = self.worker.run(move |sockets| async move {
            let mut handle = sockets.generic;
            let mut attempt = 1;
            loop {
                let replies = genl_exchange(
                    &mut handle,
                    &name,
                    get_device_message(&name),
                    NLM_F_REQUEST | NLM_F_DUMP,
                )
                .await
                .map_err(|e| prefix(e, "read the device"))?;
                let interrupted = replies
                    .iter()
                    .any(|(flags, _)| flags & NLM_F_DUMP_INTR != 0);
                if !interrupted || attempt >= DUMP_ATTEMPTS {
                    return Ok(replies);
                }
                attempt += 1;
            }
        })?;
        peers_from_replies(replies.iter().map(|(_, message)| message)).map_err(|message| {
            WgError::Device {
                interface: self.interface.clone(),
                message: format!("unreadable status: {message}"),
            }
        })
    }
}

/// Whether the kernel can create WireGuard links here: creates a throwaway link with a unique
/// name in the current network namespace and deletes it again. [`WgError::Unsupported`] means the
/// kernel has no WireGuard; other errors (e.g. no CAP_NET_ADMIN) mean the probe itself failed.
pub fn kernel_available() -> Result<(), WgError> {
    static PROBES: AtomicU32 = AtomicU32::new(0);
    // At most 15 characters: "kswg" + a pid (at most 7 digits) + "p" + up to 3 digits.
    let name = format!(
        "kswg{}p{}",
        std::process::id(),
        PROBES.fetch_add(1, Ordering::Relaxed) % 1000
    );
    let label = name.clone();
    NetlinkWorker::once(&label, move |sockets| async move {
        let handle = sockets.route;
        let created = match add_wireguard_link(&handle, &name).await {
            Ok(()) => true,
            // Our own name, left by an earlier probe of a process with the same pid?
            Err(e) if errno(&e) == Some(EEXIST) => false,
            Err(e) => return Err(link_error(&name, "create a test WireGuard link", &e)),
        };
        match link_kind(&handle, &name).await {
            Ok(Some((index, kind))) => {
                let wireguard = kind == Some(InfoKind::Wireguard);
                // Never delete a foreign link that merely has our name.
                if (created || wireguard)
                    && let Err(e) = handle.link().del(index).execute().await
                {
                    tracing::warn!(interface = %name, error = %e, "could not delete the test WireGuard link");
                }
                if wireguard {
                    Ok(())
                } else {
                    Err(device(&name, "the test link is not a WireGuard link"))
                }
            }
            Ok(None) => Err(device(&name, "the test WireGuard link vanished")),
            Err(e) => Err(link_error(&name, "look up the test WireGuard link", &e)),
        }
    })
}

// ---- netlink plumbing ----

fn prefix(error: WgError, what: &str) -> WgError {
    match error {
        WgError::Device { interface, message } => WgError::Device {
            interface,
            message: format!("cannot {what}: {message}"),
        },
        other => other,
    }
}

/// The errno of a netlink error reply, as a positive number.
fn link_error(interface: &str, action: &str, error: &rtnetlink::Error) -> WgError {
    let text = match error {
        rtnetlink::Error::NetlinkError(message) => message.to_io().to_string(),
        other => other.to_string(),
    };
    match errno(error) {
        Some(EOPNOTSUPP) => WgError::Unsupported(format!(
            "the kernel refused to {action} {interface}: {text}; it does not know the link kind \
             wireguard, so it has no WireGuard module"
        )),
        Some(EPERM) => device(
            interface,
            format!("cannot {action}: {text}; this needs root or CAP_NET_ADMIN"),
        ),
        _ => device(interface, format!("cannot {action}: {text}")),
    }
}

async fn add_wireguard_link(
    handle: &rtnetlink::Handle,
    interface: &str,
) -> Result<(), rtnetlink::Error> {
    handle
        .link()
        .add(LinkWireguard::new(interface).build())
        .execute()
        .await
}

/// The index and kind of the link named `interface`, if there is one.
async fn link_kind(
    handle: &rtnetlink::Handle,
    interface: &str,
) -> Result<Option<(u32, Option<InfoKind>)>, rtnetlink::Error> {
    let mut links = handle.link().get().match_name(interface).execute();
    match links.next().await {
        Some(Ok(link)) => {
            let mut named = false;
            let mut kind = None;
            for attribute in &link.attributes {
                match attribute {
                    LinkAttribute::IfName(n) => named = n == interface,
                    LinkAttribute::LinkInfo(infos) => {
                        kind = infos.iter().find_map(|info| match info {
                            LinkInfo::Kind(kind) => Some(kind.clone()),
                            _ => None,
                        });
                    }
                    _ => {}
                }
            }
            Ok(named.then_some((link.header.index, kind)))
        }
        Some(Err(e)) if errno(&e) == Some(ENODEV) => Ok(None),
        Some(Err(e)) => Err(e),
        None => Ok(None),
    }
}

/// Sends one request and collects the replies (all parts of a dump) with their netlink flags.
async fn genl_exchange(
    handle: &mut genetlink::GenetlinkHandle,
    interface: &str,
    message: WireguardMessage,
    flags: u16,
) -> Result<Vec<(u16, WireguardMessage)>, WgError> {
    let mut request = NetlinkMessage::from(GenlMessage::from_payload(message));
    request.header.flags = flags;
    let mut replies = match handle.request(request).await {
        Ok(replies) => replies,
        // The request itself can only fail while resolving the family.
        Err(GenetlinkError::NetlinkError(e)) if e.raw_os_error() == Some(ENOENT) => {
            return Err(WgError::Unsupported(
                "the generic netlink family \"wireguard\" does not exist (no WireGuard module)"
                    .to_owned(),
            ));
        }
        Err(e) => return Err(device(interface, format!("netlink request failed: {e}"))),
    };
    let mut messages = Vec::new();
    while let Some(reply) = replies.next().await {
        let reply =
            reply.map_err(|e| device(interface, format!("unreadable netlink reply: {e}")))?;
        match reply.payload {
            NetlinkPayload::InnerMessage(genl) => messages.push((reply.header.flags, genl.payload)),
            NetlinkPayload::Error(error) if error.code.is_some() => {
                let io = error.to_io();
                let hint = match io.raw_os_error() {
                    Some(EPERM) => "; this needs root or CAP_NET_ADMIN",
                    Some(ENODEV) => "; the interface is gone or is not a WireGuard link",
                    _ => "",
                };
                return Err(device(interface, format!("{io}{hint}")));
            }
            NetlinkPayload::Done(_) => break,
            _ => {}
        }
    }
    Ok(messages)
}

// ---- messages (pure) ----

fn set_device(attributes: Vec<WireguardAttribute>) -> WireguardMessage {
    WireguardMessage {
        cmd: WireguardCmd::SetDevice,
        attributes,
    }
}

/// `WG_CMD_SET_DEVICE` with the interface-wide settings; peers are left alone.
pub(crate) fn device_message(interface: &str, settings: &DeviceSettings) -> WireguardMessage {
    set_device(vec![
        WireguardAttribute::IfName(interface.to_owned()),
        WireguardAttribute::PrivateKey(settings.private_key),
        WireguardAttribute::ListenPort(settings.listen_port),
        WireguardAttribute::Fwmark(settings.fwmark),
    ])
}

fn allowed_ip(net: &IpNet) -> WireguardAllowedIp {
    let family = match net {
        IpNet::V4(_) => WireguardAddressFamily::Ipv4,
        IpNet::V6(_) => WireguardAddressFamily::Ipv6,
    };
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(net.network()),
        WireguardAllowedIpAttr::Cidr(net.prefix_len()),
    ])
}

/// `WG_CMD_SET_DEVICE` messages that add or update one peer. The first carries the peer's
/// settings and replaces its allowed IPs (`WGPEER_F_REPLACE_ALLOWEDIPS`: one atomic swap in the
/// kernel); a long allowed-IP list continues in further messages that only add. With `recreate`
/// the first message removes the peer before adding it again (see [`KernelWireGuard::set_peer`]).
pub(crate) fn set_peer_messages(
    interface: &str,
    peer: &PeerConfig,
    recreate: bool,
) -> Vec<WireguardMessage> {
    let mut chunks = peer.allowed_ips.chunks(ALLOWED_IPS_PER_MESSAGE);
    let keepalive = u16::try_from(peer.persistent_keepalive.as_secs()).unwrap_or(u16::MAX);
    let mut attributes = vec![
        WireguardPeerAttribute::PublicKey(peer.public_key),
        WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
        WireguardPeerAttribute::PresharedKey(peer.preshared_key),
        WireguardPeerAttribute::PersistentKeepalive(keepalive),
    ];
    if let Some(endpoint) = peer.endpoint {
        attributes.push(WireguardPeerAttribute::Endpoint(endpoint));
    }
    if let Some(first) = chunks.next() {
        attributes.push(WireguardPeerAttribute::AllowedIps(
            first.iter().map(allowed_ip).collect(),
        ));
    }
    let mut peers = Vec::new();
    if recreate {
        peers.push(WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey(peer.public_key),
            WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
        ]));
    }
    peers.push(WireguardPeer(attributes));
    let mut messages = vec![set_device(vec![
        WireguardAttribute::IfName(interface.to_owned()),
        WireguardAttribute::Peers(peers),
    ])];
    for chunk in chunks {
        messages.push(set_device(vec![
            WireguardAttribute::IfName(interface.to_owned()),
            WireguardAttribute::Peers(vec![WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(peer.public_key),
                WireguardPeerAttribute::AllowedIps(chunk.iter().map(allowed_ip).collect()),
            ])]),
        ]));
    }
    messages
}

/// `WG_CMD_SET_DEVICE` removing one peer (`WGPEER_F_REMOVE_ME`).
pub(crate) fn remove_peer_message(interface: &str, public_key: &Key) -> WireguardMessage {
    set_device(vec![
        WireguardAttribute::IfName(interface.to_owned()),
        WireguardAttribute::Peers(vec![WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey(*public_key),
            WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
        ])]),
    ])
}

/// `WG_CMD_GET_DEVICE` for the interface (sent as a dump).
pub(crate) fn get_device_message(interface: &str) -> WireguardMessage {
    WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: vec![WireguardAttribute::IfName(interface.to_owned())],
    }
}

/// The kernel's handshake time; zero means never.
fn handshake_time(time: &WireguardTimeSpec) -> Option<SystemTime> {
    let seconds = u64::try_from(time.seconds).ok()?;
    let nanos = u32::try_from(time.nano_seconds).ok()?.min(999_999_999);
    (seconds != 0 || nanos != 0).then(|| UNIX_EPOCH + Duration::new(seconds, nanos))
}

fn peer_state(peer: &WireguardPeer) -> Result<PeerState, String> {
    let mut state = PeerState::default();
    let mut has_key = false;
    for attribute in peer.iter() {
        match attribute {
            WireguardPeerAttribute::PublicKey(key) => {
                state.public_key = *key;
                has_key = true;
            }
            WireguardPeerAttribute::Endpoint(endpoint) => state.endpoint = Some(*endpoint),
            WireguardPeerAttribute::LastHandshake(time) => {
                state.last_handshake = handshake_time(time)
            }
            WireguardPeerAttribute::RxBytes(bytes) => state.rx_bytes = *bytes,
            WireguardPeerAttribute::TxBytes(bytes) => state.tx_bytes = *bytes,
            WireguardPeerAttribute::AllowedIps(ips) => {
                for ip in ips {
                    let addr = ip.iter().find_map(|a| match a {
                        WireguardAllowedIpAttr::IpAddr(addr) => Some(*addr),
                        _ => None,
                    });
                    let cidr = ip.iter().find_map(|a| match a {
                        WireguardAllowedIpAttr::Cidr(cidr) => Some(*cidr),
                        _ => None,
                    });
                    let (Some(addr), Some(cidr)) = (addr, cidr) else {
                        return Err("an allowed IP without address or prefix length".to_owned());
                    };
                    let net = IpNet::new(addr, cidr)
                        .map_err(|_| format!("allowed IP {addr}/{cidr}: bad prefix length"))?;
                    state.allowed_ips.push(net);
                }
            }
            _ => {}
        }
    }
    if !has_key {
        return Err("a peer without a public key".to_owned());
    }
    Ok(state)
}

/// The peers in the replies to a `WG_CMD_GET_DEVICE` dump, in the kernel's order. The kernel
/// splits a large device over several messages, and a peer with many allowed IPs continues in
/// the next message under the same public key; such parts are merged.
pub(crate) fn peers_from_replies<'a>(
    replies: impl IntoIterator<Item = &'a WireguardMessage>,
) -> Result<Vec<PeerState>, String> {
    let mut peers: Vec<PeerState> = Vec::new();
    let mut position: HashMap<Key, usize> = HashMap::new();
    for reply in replies {
        for attribute in &reply.attributes {
            let WireguardAttribute::Peers(list) = attribute else {
                continue;
            };
            for peer in list {
                let state = peer_state(peer)?;
                match position.get(&state.public_key) {
                    Some(&i) => {
                        let known = &mut peers[i];
                        known.allowed_ips.extend(state.allowed_ips);
                        known.endpoint = known.endpoint.or(state.endpoint);
                        known.last_handshake = known.last_handshake.or(state.last_handshake);
                        known.rx_bytes = known.rx_bytes.max(state.rx_bytes);
                        known.tx_bytes = known.tx_bytes.max(state.tx_bytes);
                    }
                    None => {
                        position.insert(state.public_key, peers.len());
                        peers.push(state);
                    }
                }
            }
        }
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use netlink_packet_core::{Emitable, NLM_F_MULTIPART};

    use super::*;

    const IF: &str = "kubespan";

    fn key(byte: u8) -> Key {
        [byte; 32]
    }

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    fn peer(endpoint: Option<&str>, allowed: &[&str]) -> PeerConfig {
        PeerConfig {
            public_key: key(1),
            preshared_key: key(2),
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            allowed_ips: allowed.iter().map(|a| net(a)).collect(),
            persistent_keepalive: Duration::from_secs(25),
        }
    }

    /// Serializes like the real request: a netlink message with a resolved family id.
    fn wire(message: &WireguardMessage, flags: u16) -> Vec<u8> {
        let mut genl = GenlMessage::from_payload(message.clone());
        genl.set_resolved_family_id(30);
        let mut netlink = NetlinkMessage::from(genl);
        netlink.header.flags = flags;
        netlink.finalize();
        let mut buffer = vec![0; netlink.buffer_len()];
        netlink.serialize(&mut buffer);
        buffer
    }

    fn parse_wire(buffer: &[u8]) -> (u16, WireguardMessage) {
        let parsed = NetlinkMessage::<GenlMessage<WireguardMessage>>::deserialize(buffer).unwrap();
        let NetlinkPayload::InnerMessage(genl) = parsed.payload else {
            panic!("not a generic netlink message: {parsed:?}");
        };
        (parsed.header.flags, genl.payload)
    }

    fn only_peers(message: &WireguardMessage) -> &[WireguardPeer] {
        assert_eq!(message.cmd, WireguardCmd::SetDevice);
        assert_eq!(
            message.attributes[0],
            WireguardAttribute::IfName(IF.to_owned())
        );
        match &message.attributes[1..] {
            [WireguardAttribute::Peers(peers)] => peers,
            other => panic!("expected only peers, got {other:?}"),
        }
    }

    #[test]
    fn device_message_carries_key_port_and_fwmark() {
        let message = device_message(
            IF,
            &DeviceSettings {
                private_key: key(7),
                listen_port: 51820,
                fwmark: 0x20,
            },
        );
        assert_eq!(message.cmd, WireguardCmd::SetDevice);
        assert_eq!(
            message.attributes,
            vec![
                WireguardAttribute::IfName(IF.to_owned()),
                WireguardAttribute::PrivateKey(key(7)),
                WireguardAttribute::ListenPort(51820),
                WireguardAttribute::Fwmark(0x20),
            ]
        );
        // No ReplacePeers: configuring must not drop the peers.
        assert!(
            !message
                .attributes
                .iter()
                .any(|a| matches!(a, WireguardAttribute::Flags(_)))
        );
        let (_, back) = parse_wire(&wire(&message, NLM_F_REQUEST | NLM_F_ACK));
        assert_eq!(back, message);
    }

    #[test]
    fn set_peer_message_has_keys_keepalive_endpoint_and_replaced_allowed_ips() {
        let config = peer(Some("192.0.2.1:51820"), &["10.0.0.0/8", "fd00:1::/64"]);
        let messages = set_peer_messages(IF, &config, false);
        assert_eq!(messages.len(), 1);
        let peers = only_peers(&messages[0]);
        assert_eq!(peers.len(), 1);
        assert_eq!(
            peers[0].0,
            vec![
                WireguardPeerAttribute::PublicKey(key(1)),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
                WireguardPeerAttribute::PresharedKey(key(2)),
                WireguardPeerAttribute::PersistentKeepalive(25),
                WireguardPeerAttribute::Endpoint("192.0.2.1:51820".parse().unwrap()),
                WireguardPeerAttribute::AllowedIps(vec![
                    WireguardAllowedIp(vec![
                        WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv4),
                        WireguardAllowedIpAttr::IpAddr("10.0.0.0".parse().unwrap()),
                        WireguardAllowedIpAttr::Cidr(8),
                    ]),
                    WireguardAllowedIp(vec![
                        WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv6),
                        WireguardAllowedIpAttr::IpAddr("fd00:1::".parse().unwrap()),
                        WireguardAllowedIpAttr::Cidr(64),
                    ]),
                ]),
            ]
        );
        let (_, back) = parse_wire(&wire(&messages[0], NLM_F_REQUEST | NLM_F_ACK));
        assert_eq!(back, messages[0]);
    }

    #[test]
    fn endpoint_only_when_given_and_keepalive_saturates() {
        let mut config = peer(None, &["fd00::1/128"]);
        config.persistent_keepalive = Duration::from_secs(1 << 20);
        let messages = set_peer_messages(IF, &config, false);
        let attributes = &only_peers(&messages[0])[0].0;
        assert!(
            !attributes
                .iter()
                .any(|a| matches!(a, WireguardPeerAttribute::Endpoint(_)))
        );
        assert!(attributes.contains(&WireguardPeerAttribute::PersistentKeepalive(u16::MAX)));

        let v6 = peer(Some("[2001:db8::1]:51821"), &[]);
        let messages = set_peer_messages(IF, &v6, false);
        let attributes = &only_peers(&messages[0])[0].0;
        assert!(attributes.contains(&WireguardPeerAttribute::Endpoint(
            "[2001:db8::1]:51821".parse().unwrap()
        )));
        // No allowed IPs: the replace flag alone clears them.
        assert!(attributes.contains(&WireguardPeerAttribute::Flags(
            WireguardPeerFlags::ReplaceAllowedIps
        )));
        assert!(
            !attributes
                .iter()
                .any(|a| matches!(a, WireguardPeerAttribute::AllowedIps(_)))
        );
        let (_, back) = parse_wire(&wire(&messages[0], NLM_F_REQUEST | NLM_F_ACK));
        assert_eq!(back, messages[0]);
    }

    #[test]
    fn host_bits_are_cleared_in_allowed_ips() {
        let messages = set_peer_messages(IF, &peer(None, &["10.1.2.3/16"]), false);
        let attributes = &only_peers(&messages[0])[0].0;
        assert!(
            attributes.contains(&WireguardPeerAttribute::AllowedIps(vec![
                WireguardAllowedIp(vec![
                    WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv4),
                    WireguardAllowedIpAttr::IpAddr("10.1.0.0".parse().unwrap()),
                    WireguardAllowedIpAttr::Cidr(16),
                ])
            ]))
        );
    }

    #[test]
    fn recreate_removes_then_adds_in_one_message() {
        let config = peer(Some("192.0.2.1:51820"), &["10.0.0.0/8"]);
        let messages = set_peer_messages(IF, &config, true);
        assert_eq!(messages.len(), 1);
        let peers = only_peers(&messages[0]);
        assert_eq!(peers.len(), 2);
        assert_eq!(
            peers[0].0,
            vec![
                WireguardPeerAttribute::PublicKey(key(1)),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
            ]
        );
        assert_eq!(
            peers[1],
            only_peers(&set_peer_messages(IF, &config, false)[0])[0]
        );
    }

    #[test]
    fn long_allowed_ip_lists_are_split_below_the_attribute_size_limit() {
        let config = PeerConfig {
            allowed_ips: (0..2500u32)
                .map(|i| {
                    IpNet::new(
                        std::net::Ipv6Addr::from((0xfd00u128 << 112) | (u128::from(i) << 64))
                            .into(),
                        64,
                    )
                    .unwrap()
                })
                .collect(),
            ..peer(Some("[2001:db8::1]:51820"), &[])
        };
        let messages = set_peer_messages(IF, &config, true);
        assert_eq!(messages.len(), 3);
        let mut all = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            // Every nested attribute length must fit in 16 bits.
            assert!(message.buffer_len() < usize::from(u16::MAX), "message {i}");
            let peers = only_peers(message);
            let last = peers.last().unwrap();
            let flags: Vec<_> = last
                .iter()
                .filter_map(|a| match a {
                    WireguardPeerAttribute::Flags(f) => Some(*f),
                    _ => None,
                })
                .collect();
            if i == 0 {
                assert_eq!(peers.len(), 2, "remove, then add");
                assert_eq!(flags, vec![WireguardPeerFlags::ReplaceAllowedIps]);
            } else {
                assert_eq!(peers.len(), 1);
                assert!(flags.is_empty(), "continuations only add: {flags:?}");
                assert_eq!(last[0], WireguardPeerAttribute::PublicKey(key(1)));
            }
            let (_, back) = parse_wire(&wire(message, NLM_F_REQUEST | NLM_F_ACK));
            assert_eq!(&back, message);
            for attribute in last.iter() {
                if let WireguardPeerAttribute::AllowedIps(ips) = attribute {
                    all.extend(ips.iter().cloned());
                }
            }
        }
        let expected: Vec<_> = config.allowed_ips.iter().map(allowed_ip).collect();
        assert_eq!(all, expected);
    }

    #[test]
    fn remove_and_get_messages() {
        let message = remove_peer_message(IF, &key(9));
        assert_eq!(
            only_peers(&message),
            &[WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(key(9)),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
            ])]
        );
        let (_, back) = parse_wire(&wire(&message, NLM_F_REQUEST | NLM_F_ACK));
        assert_eq!(back, message);

        let get = get_device_message(IF);
        assert_eq!(get.cmd, WireguardCmd::GetDevice);
        assert_eq!(
            get.attributes,
            vec![WireguardAttribute::IfName(IF.to_owned())]
        );
        let (flags, back) = parse_wire(&wire(&get, NLM_F_REQUEST | NLM_F_DUMP));
        assert_eq!(flags, NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(back, get);
    }

    fn reply_peer(byte: u8, extra: Vec<WireguardPeerAttribute>) -> WireguardPeer {
        let mut attributes = vec![WireguardPeerAttribute::PublicKey(key(byte))];
        attributes.extend(extra);
        WireguardPeer(attributes)
    }

    fn get_reply(peers: Vec<WireguardPeer>, device: bool) -> WireguardMessage {
        let mut attributes = vec![];
        if device {
            attributes.extend([
                WireguardAttribute::IfIndex(4),
                WireguardAttribute::IfName(IF.to_owned()),
                WireguardAttribute::PrivateKey(key(7)),
                WireguardAttribute::PublicKey(key(8)),
                WireguardAttribute::ListenPort(51820),
                WireguardAttribute::Fwmark(0x20),
            ]);
        }
        attributes.push(WireguardAttribute::Peers(peers));
        WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes,
        }
    }

    #[test]
    fn get_replies_parse_into_peer_states_across_parts() {
        let endpoint: SocketAddr = "[2001:db8::5]:51820".parse().unwrap();
        let first = get_reply(
            vec![
                reply_peer(
                    1,
                    vec![
                        WireguardPeerAttribute::PresharedKey(key(2)),
                        WireguardPeerAttribute::Endpoint(endpoint),
                        WireguardPeerAttribute::PersistentKeepalive(25),
                        WireguardPeerAttribute::LastHandshake(WireguardTimeSpec {
                            seconds: 1_700_000_000,
                            nano_seconds: 250_000_000,
                        }),
                        WireguardPeerAttribute::RxBytes(1000),
                        WireguardPeerAttribute::TxBytes(2000),
                        WireguardPeerAttribute::ProtocolVersion(1),
                        WireguardPeerAttribute::AllowedIps(vec![allowed_ip(&net("10.0.0.0/8"))]),
                    ],
                ),
                // Never handshaken, no endpoint yet.
                reply_peer(
                    3,
                    vec![
                        WireguardPeerAttribute::LastHandshake(WireguardTimeSpec::default()),
                        WireguardPeerAttribute::RxBytes(0),
                        WireguardPeerAttribute::TxBytes(0),
                    ],
                ),
            ],
            true,
        );
        // The next part continues peer 3's allowed IPs, as the kernel does for long lists.
        let second = get_reply(
            vec![reply_peer(
                3,
                vec![WireguardPeerAttribute::AllowedIps(vec![
                    allowed_ip(&net("fd00::3/128")),
                    allowed_ip(&net("192.168.0.0/24")),
                ])],
            )],
            false,
        );
        // Through the wire format and back, as they come from the socket.
        let replies: Vec<WireguardMessage> = [first, second]
            .iter()
            .map(|m| {
                let (flags, back) = parse_wire(&wire(m, NLM_F_MULTIPART));
                assert_eq!(flags, NLM_F_MULTIPART);
                back
            })
            .collect();
        let peers = peers_from_replies(&replies).unwrap();
        assert_eq!(
            peers,
            vec![
                PeerState {
                    public_key: key(1),
                    endpoint: Some(endpoint),
                    last_handshake: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 250_000_000)),
                    handshake_age: None,
                    rx_bytes: 1000,
                    tx_bytes: 2000,
                    allowed_ips: vec![net("10.0.0.0/8")],
                },
                PeerState {
                    public_key: key(3),
                    endpoint: None,
                    last_handshake: None,
                    handshake_age: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    allowed_ips: vec![net("fd00::3/128"), net("192.168.0.0/24")],
                },
            ]
        );
    }

    #[test]
    fn unusable_replies_are_errors_not_panics() {
        let no_key = get_reply(
            vec![WireguardPeer(vec![WireguardPeerAttribute::RxBytes(1)])],
            true,
        );
        assert!(peers_from_replies([&no_key]).is_err());
        let bad_prefix = get_reply(
            vec![reply_peer(
                1,
                vec![WireguardPeerAttribute::AllowedIps(vec![
                    WireguardAllowedIp(vec![
                        WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv4),
                        WireguardAllowedIpAttr::IpAddr("10.0.0.0".parse().unwrap()),
                        WireguardAllowedIpAttr::Cidr(40),
                    ]),
                ])],
            )],
            true,
        );
        assert!(peers_from_replies([&bad_prefix]).is_err());
        // A device without peers.
        assert_eq!(
            peers_from_replies([&get_reply(vec![], true)]).unwrap(),
            vec![]
        );
    }

    /// The real generic-netlink path: without a WireGuard family (this machine) the request
    /// fails as unsupported; with one, the missing interface is a device error. Either way an
    /// error, not a panic, also when called from async code (as `Drop` is).
    #[test]
    fn get_for_a_missing_interface_fails_cleanly_in_any_context() {
        let get = || {
            NetlinkWorker::once("ks-none0", |sockets| async move {
                let mut handle = sockets.generic;
                genl_exchange(
                    &mut handle,
                    "ks-none0",
                    get_device_message("ks-none0"),
                    NLM_F_REQUEST | NLM_F_DUMP,
                )
                .await
            })
        };
        let check = |result: Result<Vec<(u16, WireguardMessage)>, WgError>| match result {
            Err(WgError::Unsupported(message)) => {
                assert!(
                    message.contains("\"wireguard\" does not exist"),
                    "{message}"
                )
            }
            Err(WgError::Device { message, .. }) => assert!(
                message.contains("No such device") || message.contains("not permitted"),
                "{message}"
            ),
            other => panic!("{other:?}"),
        };
        check(get());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        check(runtime.block_on(async { get() }));
    }

    #[test]
    fn handshake_times() {
        assert_eq!(handshake_time(&WireguardTimeSpec::default()), None);
        assert_eq!(
            handshake_time(&WireguardTimeSpec {
                seconds: -1,
                nano_seconds: 0
            }),
            None
        );
        assert_eq!(
            handshake_time(&WireguardTimeSpec {
                seconds: 5,
                nano_seconds: 7
            }),
            Some(UNIX_EPOCH + Duration::new(5, 7))
        );
    }

    // ---- golden bytes: what a real kernel (Linux 6.1) accepted and answered ----
    //
    // tests/fixtures/kernel-netlink was captured with nlmon in the kernel lane's guest (see its
    // README.txt): the agent's requests there were acknowledged by kernel WireGuard, and its
    // replies are the kernel's own. Our encoder must produce those requests byte for byte, and
    // our decoder must read those replies.

    const CAPTURE: &str = include_str!("../tests/fixtures/kernel-netlink/messages.txt");
    /// The wireguard family's id in that capture.
    const CAPTURED_FAMILY: u16 = 32;

    /// The bytes of one captured message (`record` as in messages.txt, e.g. "#50").
    fn captured(record: &str) -> Vec<u8> {
        let mut lines = CAPTURE.lines();
        while let Some(line) = lines.next() {
            if line.split_whitespace().next() == Some(record) {
                let hex = lines.next().expect("a hex line follows").trim();
                return (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                    .collect();
            }
        }
        panic!("record {record} is not in the capture");
    }

    fn bytes32(hex: &str) -> Key {
        let bytes: Vec<u8> = (0..64)
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        bytes.try_into().unwrap()
    }

    /// Serialized as the agent sent it in the capture: its family id, flags and sequence number.
    fn as_captured(message: &WireguardMessage, flags: u16, sequence: u32) -> Vec<u8> {
        let mut genl = GenlMessage::from_payload(message.clone());
        genl.set_resolved_family_id(CAPTURED_FAMILY);
        let mut netlink = NetlinkMessage::from(genl);
        netlink.header.flags = flags;
        netlink.header.sequence_number = sequence;
        netlink.finalize();
        let mut buffer = vec![0; netlink.buffer_len()];
        netlink.serialize(&mut buffer);
        buffer
    }

    /// node-a's private key in the capture (base64 iMNJN1ResAH8S0/I7cByR7nCLzgW1qBhD2JyoNyl+0A=).
    const NODE_A_PRIVATE: &str = "88c34937545eb001fc4b4fc8edc07247b9c22f3816d6a0610f6272a0dca5fb40";
    /// node-b's public key (yRf7UyPnnPJtx2tpvBNsDT23UwIP5jJR+DS+0MZ7Eho=).
    const NODE_B_PUBLIC: &str = "c917fb5323e79cf26dc76b69bc136c0d3db753020fe63251f834bed0c67b121a";
    /// The preshared key the agent derived for the pair.
    const PAIR_PSK: &str = "e157253f864afe2fe70df789eae8c88f368c5ada58df98eaa0175befa5647b80";

    #[test]
    fn set_device_is_byte_for_byte_what_the_kernel_accepted() {
        let settings = DeviceSettings {
            private_key: bytes32(NODE_A_PRIVATE),
            listen_port: 51820,
            fwmark: 0x20,
        };
        assert_eq!(
            as_captured(
                &device_message("kubespan", &settings),
                NLM_F_REQUEST | NLM_F_ACK,
                2
            ),
            captured("#50")
        );
    }

    #[test]
    fn a_recreated_peer_is_byte_for_byte_what_the_kernel_accepted() {
        let peer = PeerConfig {
            public_key: bytes32(NODE_B_PUBLIC),
            preshared_key: bytes32(PAIR_PSK),
            endpoint: Some("10.99.0.2:51820".parse().unwrap()),
            allowed_ips: vec![
                net("10.99.0.2/32"),
                net("fdbc:d652:4f3c:7c02:0:ff:fe00:9902/128"),
            ],
            persistent_keepalive: Duration::from_secs(2),
        };
        let messages = set_peer_messages("kubespan", &peer, true);
        assert_eq!(messages.len(), 1);
        assert_eq!(
            as_captured(&messages[0], NLM_F_REQUEST | NLM_F_ACK, 2),
            captured("#95")
        );
    }

    #[test]
    fn the_kernels_status_replies_parse() {
        let parse = |record: &str| {
            let (flags, message) = parse_wire(&captured(record));
            assert_eq!(flags & NLM_F_DUMP_INTR, 0);
            message
        };
        // Before the peer: the device alone.
        assert_eq!(peers_from_replies([&parse("#92")]).unwrap(), vec![]);
        // With the peer, after its handshake (wg show at the time: 364 B received, 420 sent).
        let peers = peers_from_replies([&parse("#118")]).unwrap();
        assert_eq!(peers.len(), 1);
        let peer = &peers[0];
        assert_eq!(peer.public_key, bytes32(NODE_B_PUBLIC));
        assert_eq!(peer.endpoint, Some("10.99.0.2:51820".parse().unwrap()));
        assert_eq!(
            peer.allowed_ips,
            [
                net("10.99.0.2/32"),
                net("fdbc:d652:4f3c:7c02:0:ff:fe00:9902/128")
            ]
        );
        assert!(peer.last_handshake.is_some(), "{peer:?}");
        assert!(peer.rx_bytes > 0 && peer.tx_bytes > 0, "{peer:?}");
        assert_eq!(
            peer.handshake_age, None,
            "the kernel keeps wall-clock times only"
        );
    }
}
