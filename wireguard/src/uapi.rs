//! WireGuard's cross-platform userspace API (the text protocol `wg(8)` speaks over
//! `/var/run/wireguard/<interface>.sock`): parsing `set` requests and writing `get`
//! answers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;

use super::{Key, PeerState};

/// Where wireguard-tools looks for a userspace interface's control socket.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

pub fn socket_path(interface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{interface}.sock"))
}

/// A device as `get` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceView {
    pub private_key: Option<Key>,
    pub listen_port: Option<u16>,
    pub fwmark: u32,
    pub peers: Vec<PeerView>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerView {
    pub state: PeerState,
    pub preshared_key: Key,
    pub keepalive: Duration,
}

/// The answer to `get=1` (without the final `errno=` line).
pub fn render_get(view: &DeviceView) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if let Some(key) = &view.private_key {
        let _ = writeln!(out, "private_key={}", hex::encode(key));
    }
    if let Some(port) = view.listen_port {
        let _ = writeln!(out, "listen_port={port}");
    }
    if view.fwmark != 0 {
        let _ = writeln!(out, "fwmark={}", view.fwmark);
    }
    for peer in &view.peers {
        let state = &peer.state;
        let _ = writeln!(out, "public_key={}", hex::encode(state.public_key));
        if peer.preshared_key != [0; 32] {
            let _ = writeln!(out, "preshared_key={}", hex::encode(peer.preshared_key));
        }
        out += "protocol_version=1\n";
        if let Some(endpoint) = state.endpoint {
            let _ = writeln!(out, "endpoint={endpoint}");
        }
        let _ = writeln!(
            out,
            "persistent_keepalive_interval={}",
            peer.keepalive.as_secs()
        );
        for ip in &state.allowed_ips {
            let _ = writeln!(out, "allowed_ip={ip}");
        }
        if let Some(time) = state.last_handshake {
            let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
            let _ = writeln!(out, "last_handshake_time_sec={}", since.as_secs());
            let _ = writeln!(out, "last_handshake_time_nsec={}", since.subsec_nanos());
        }
        let _ = writeln!(
            out,
            "rx_bytes={}\ntx_bytes={}",
            state.rx_bytes, state.tx_bytes
        );
    }
    out
}

fn parse_key(value: &str) -> Option<Key> {
    let bytes = hex::decode(value).ok()?;
    bytes.try_into().ok()
}

/// A `wg(8)` `set=1` request: interface settings and peer changes, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetRequest {
    pub private_key: Option<Key>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub replace_peers: bool,
    pub peers: Vec<PeerChange>,
}

/// One peer section of a [`SetRequest`]: only what the request mentions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerChange {
    pub public_key: Key,
    pub remove: bool,
    pub update_only: bool,
    pub preshared_key: Option<Key>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<IpNet>,
}

fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("{key}={value}: expected true or false")),
    }
}

/// Parses the lines of a `set=1` request after the `set=1` line (up to, not including, the
/// blank line that ends it).
pub fn parse_set(text: &str) -> Result<SetRequest, String> {
    let mut request = SetRequest::default();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("malformed line {line:?}"))?;
        let bad = |what: &str| format!("{key}={value}: not {what}");
        if key == "public_key" {
            request.peers.push(PeerChange {
                public_key: parse_key(value).ok_or_else(|| bad("a hex key"))?,
                ..PeerChange::default()
            });
            continue;
        }
        match request.peers.last_mut() {
            None => match key {
                "private_key" => {
                    request.private_key = Some(parse_key(value).ok_or_else(|| bad("a hex key"))?)
                }
                "listen_port" => {
                    request.listen_port = Some(value.parse().map_err(|_| bad("a port"))?)
                }
                "fwmark" => request.fwmark = Some(value.parse().map_err(|_| bad("a number"))?),
                "replace_peers" => request.replace_peers = parse_bool(key, value)?,
                _ => return Err(format!("unknown interface setting {key:?}")),
            },
            Some(peer) => match key {
                "remove" => peer.remove = parse_bool(key, value)?,
                "update_only" => peer.update_only = parse_bool(key, value)?,
                "preshared_key" => {
                    peer.preshared_key = Some(parse_key(value).ok_or_else(|| bad("a hex key"))?)
                }
                "endpoint" => {
                    peer.endpoint = Some(value.parse().map_err(|_| bad("an IP:port endpoint"))?)
                }
                "persistent_keepalive_interval" => {
                    peer.persistent_keepalive = Some(value.parse().map_err(|_| bad("seconds"))?)
                }
                "replace_allowed_ips" => peer.replace_allowed_ips = parse_bool(key, value)?,
                "allowed_ip" => peer
                    .allowed_ips
                    .push(value.parse().map_err(|_| bad("an IP network"))?),
                "protocol_version" if value == "1" => {}
                _ => return Err(format!("unsupported peer setting {key}={value}")),
            },
        }
    }
    Ok(request)
}

/// Milliseconds since the Unix epoch (0 before it), for status output and TTLs on disk.
pub fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a `get=1` answer (without the final `errno=` line) back into the peers it lists,
    /// as `wg(8)` does: checks [`render_get`].
    fn parse_get(text: &str) -> Result<Vec<PeerState>, String> {
        let mut peers: Vec<PeerState> = Vec::new();
        let mut handshake_sec = 0u64;
        let mut handshake_nsec = 0u32;
        let finish_handshake = |peer: Option<&mut PeerState>, sec: &mut u64, nsec: &mut u32| {
            if let Some(peer) = peer
                && (*sec != 0 || *nsec != 0)
            {
                peer.last_handshake = Some(UNIX_EPOCH + Duration::new(*sec, *nsec));
            }
            *sec = 0;
            *nsec = 0;
        };
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(format!("malformed line {line:?}"));
            };
            match key {
                "public_key" => {
                    finish_handshake(peers.last_mut(), &mut handshake_sec, &mut handshake_nsec);
                    let public_key =
                        parse_key(value).ok_or_else(|| format!("bad public key {value:?}"))?;
                    peers.push(PeerState {
                        public_key,
                        ..PeerState::default()
                    });
                }
                _ => {
                    // Lines before the first peer describe the interface.
                    let Some(peer) = peers.last_mut() else {
                        continue;
                    };
                    match key {
                        "endpoint" => peer.endpoint = value.parse().ok(),
                        "allowed_ip" => {
                            if let Ok(net) = value.parse::<IpNet>() {
                                peer.allowed_ips.push(net);
                            }
                        }
                        "last_handshake_time_sec" => handshake_sec = value.parse().unwrap_or(0),
                        "last_handshake_time_nsec" => handshake_nsec = value.parse().unwrap_or(0),
                        "rx_bytes" => peer.rx_bytes = value.parse().unwrap_or(0),
                        "tx_bytes" => peer.tx_bytes = value.parse().unwrap_or(0),
                        _ => {}
                    }
                }
            }
        }
        finish_handshake(peers.last_mut(), &mut handshake_sec, &mut handshake_nsec);
        Ok(peers)
    }

    #[test]
    fn get_answers_parse_back() {
        let view = DeviceView {
            private_key: Some([9; 32]),
            listen_port: Some(51820),
            fwmark: 32,
            peers: vec![
                PeerView {
                    state: PeerState {
                        public_key: [1; 32],
                        endpoint: Some("[fd00::1]:51820".parse().unwrap()),
                        last_handshake: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 5)),
                        handshake_age: None,
                        rx_bytes: 100,
                        tx_bytes: 200,
                        allowed_ips: vec![
                            "10.0.0.1/32".parse().unwrap(),
                            "fd00::1/128".parse().unwrap(),
                        ],
                    },
                    preshared_key: [2; 32],
                    keepalive: Duration::from_secs(10),
                },
                PeerView {
                    state: PeerState {
                        public_key: [3; 32],
                        ..PeerState::default()
                    },
                    ..PeerView::default()
                },
            ],
        };
        let text = render_get(&view);
        assert!(text.starts_with(&format!(
            "private_key={}\nlisten_port=51820\nfwmark=32\n",
            "09".repeat(32)
        )));
        let parsed = parse_get(&text).unwrap();
        let states: Vec<PeerState> = view.peers.iter().map(|p| p.state.clone()).collect();
        assert_eq!(parsed, states);
        // A zero preshared key is not shown, as wireguard-go does.
        assert_eq!(text.matches("preshared_key=").count(), 1);
    }

    #[test]
    fn parses_set_requests_as_wg_sends_them() {
        let text = format!(
            "private_key={}\nlisten_port=51820\nfwmark=32\nreplace_peers=true\npublic_key={}\n\
             preshared_key={}\nendpoint=[fd00::1]:51820\npersistent_keepalive_interval=25\n\
             replace_allowed_ips=true\nallowed_ip=10.0.0.2/32\nallowed_ip=fd00::2/128\n\
             protocol_version=1\npublic_key={}\nremove=true\n",
            "aa".repeat(32),
            "01".repeat(32),
            "02".repeat(32),
            "03".repeat(32)
        );
        let request = parse_set(&text).unwrap();
        assert_eq!(request.private_key, Some([0xaa; 32]));
        assert_eq!(
            (request.listen_port, request.fwmark),
            (Some(51820), Some(32))
        );
        assert!(request.replace_peers);
        assert_eq!(request.peers.len(), 2);
        let first = &request.peers[0];
        assert_eq!(first.endpoint, Some("[fd00::1]:51820".parse().unwrap()));
        assert_eq!(first.persistent_keepalive, Some(25));
        assert_eq!(first.preshared_key, Some([2; 32]));
        assert!(first.replace_allowed_ips && !first.remove);
        assert_eq!(first.allowed_ips.len(), 2);
        assert!(request.peers[1].remove && request.peers[1].public_key == [3; 32]);
        for bad in [
            "listen_port=99999",
            "bogus=1",
            "public_key=zz",
            &format!("public_key={}\nendpoint=nowhere", "01".repeat(32)),
            "replace_peers=yes",
        ] {
            assert!(parse_set(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_get_output() {
        let text = format!(
            "private_key={}\nlisten_port=51820\nfwmark=32\npublic_key={}\npreshared_key={}\n\
             persistent_keepalive_interval=10\nendpoint=10.10.0.2:51820\nallowed_ip=10.10.0.2/32\n\
             allowed_ip=fd00::2/128\nlast_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\n\
             rx_bytes=100\ntx_bytes=200\npublic_key={}\nrx_bytes=0\ntx_bytes=0\n",
            "aa".repeat(32),
            "01".repeat(32),
            "02".repeat(32),
            "03".repeat(32)
        );
        let peers = parse_get(&text).unwrap();
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].public_key, [1; 32]);
        assert_eq!(peers[0].endpoint, Some("10.10.0.2:51820".parse().unwrap()));
        assert_eq!(peers[0].allowed_ips.len(), 2);
        assert_eq!(
            peers[0].last_handshake,
            Some(UNIX_EPOCH + Duration::new(1_700_000_000, 5))
        );
        assert_eq!((peers[0].rx_bytes, peers[0].tx_bytes), (100, 200));
        assert_eq!(peers[1].last_handshake, None);
        assert_eq!(peers[1].endpoint, None);
        assert!(parse_get("garbage").is_err());
        assert!(parse_get("public_key=zz\n").is_err());
    }
}
