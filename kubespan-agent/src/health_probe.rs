//! The I/O behind `kubespanctl health` that the data plane does not already know: whether the
//! listen port is bound, and whether packets of the mesh MTU cross the tunnel to each peer.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::health::{PathProbe, udp_port_listed};

/// How long the path probe waits for echoes; unanswered ones are sent again halfway.
pub const PATH_PROBE_WAIT: Duration = Duration::from_millis(1500);
const ECHO_REQUEST: u8 = 128;
const ECHO_REPLY: u8 = 129;
/// IPv6 header and ICMPv6 echo header.
const ECHO_OVERHEAD: usize = 40 + 8;
const SMALL_PAYLOAD: usize = 16;

/// Whether a UDP socket of this network namespace is bound to `port` (the userspace device's,
/// or the kernel WireGuard link's, which the kernel lists too).
pub fn listen_port_bound(port: u16) -> Result<bool, String> {
    let mut readable = false;
    for path in ["/proc/net/udp", "/proc/net/udp6"] {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                readable = true;
                if udp_port_listed(&text, port) {
                    return Ok(true);
                }
            }
            // A host without IPv6 has no udp6 table.
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot read {path}: {e}")),
        }
    }
    if readable {
        Ok(false)
    } else {
        Err("neither /proc/net/udp nor /proc/net/udp6 exists (is /proc mounted?)".into())
    }
}

/// Sends each peer a small ICMPv6 echo and one filling `mtu` over the tunnel (to its mesh
/// address) and reports which came back. Blocking, at most about [`PATH_PROBE_WAIT`]; needs
/// CAP_NET_RAW (the agent has it). The kernel does not fragment the full-size echo: it fits
/// the interface exactly, so only the underlay can lose it.
pub fn probe_paths(peers: &[(String, Ipv6Addr)], mtu: u32) -> Result<Vec<PathProbe>, String> {
    let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
        .map_err(|e| format!("cannot open an ICMPv6 socket for the path probe: {e}"))?;
    // std's UdpSocket is only a safe wrapper of sendto/recvfrom here: the raw socket keeps its
    // type, and the kernel fills in the ICMPv6 checksum of raw ICMPv6 sockets (RFC 3542).
    let socket = UdpSocket::from(socket);
    let identifier = (std::process::id() & 0xffff) as u16;
    let full_payload = (mtu as usize)
        .saturating_sub(ECHO_OVERHEAD)
        .max(SMALL_PAYLOAD);
    let mut answers = vec![(false, false); peers.len()];
    let started = Instant::now();
    let mut resent = false;
    send_all(&socket, peers, &answers, identifier, full_payload);
    let mut buffer = vec![0u8; 65_536];
    loop {
        let elapsed = started.elapsed();
        if elapsed >= PATH_PROBE_WAIT || answers.iter().all(|&(small, full)| small && full) {
            break;
        }
        if !resent && elapsed >= PATH_PROBE_WAIT / 2 {
            resent = true;
            send_all(&socket, peers, &answers, identifier, full_payload);
        }
        let wait = if resent {
            PATH_PROBE_WAIT - elapsed
        } else {
            PATH_PROBE_WAIT / 2 - elapsed
        };
        socket
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .map_err(|e| format!("cannot set the probe's timeout: {e}"))?;
        let (length, from) = match socket.recv_from(&mut buffer) {
            Ok(received) => received,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("cannot receive the probe's echoes: {e}")),
        };
        let Some((id, sequence)) = echo_reply(&buffer[..length]) else {
            continue;
        };
        let IpAddr::V6(source) = from.ip() else {
            continue;
        };
        let index = usize::from(sequence / 2);
        if id != identifier
            || peers
                .get(index)
                .is_none_or(|(_, address)| *address != source)
        {
            continue;
        }
        if sequence % 2 == 0 {
            answers[index].0 = true;
        } else {
            answers[index].1 = true;
        }
    }
    Ok(peers
        .iter()
        .zip(answers)
        .map(|((label, _), (small, full))| PathProbe {
            label: label.clone(),
            small,
            full,
        })
        .collect())
}

/// Sends the echoes still unanswered: sequence 2i is peer i's small one, 2i+1 its full one.
fn send_all(
    socket: &UdpSocket,
    peers: &[(String, Ipv6Addr)],
    answers: &[(bool, bool)],
    identifier: u16,
    full_payload: usize,
) {
    for (index, ((_, address), (small, full))) in peers.iter().zip(answers).enumerate() {
        let destination = SocketAddr::new(IpAddr::V6(*address), 0);
        let sequence = (index as u16).wrapping_mul(2);
        if !small {
            let _ = socket.send_to(
                &echo_request(identifier, sequence, SMALL_PAYLOAD),
                destination,
            );
        }
        if !full {
            let _ = socket.send_to(
                &echo_request(identifier, sequence.wrapping_add(1), full_payload),
                destination,
            );
        }
    }
}

fn echo_request(identifier: u16, sequence: u16, payload: usize) -> Vec<u8> {
    let mut packet = Vec::with_capacity(8 + payload);
    packet.extend_from_slice(&[ECHO_REQUEST, 0, 0, 0]);
    packet.extend_from_slice(&identifier.to_be_bytes());
    packet.extend_from_slice(&sequence.to_be_bytes());
    packet.resize(8 + payload, 0xa5);
    packet
}

/// The identifier and sequence of an ICMPv6 echo reply (raw ICMPv6 sockets deliver the ICMPv6
/// message without the IPv6 header).
fn echo_reply(message: &[u8]) -> Option<(u16, u16)> {
    if message.len() < 8 || message[0] != ECHO_REPLY || message[1] != 0 {
        return None;
    }
    Some((
        u16::from_be_bytes([message[4], message[5]]),
        u16::from_be_bytes([message[6], message[7]]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_requests_fill_the_mtu_and_replies_parse() {
        let request = echo_request(7, 3, 1420 - ECHO_OVERHEAD);
        assert_eq!(request.len() + 40, 1420);
        assert_eq!(&request[..8], &[128, 0, 0, 0, 0, 7, 0, 3]);
        let mut reply = request.clone();
        reply[0] = ECHO_REPLY;
        assert_eq!(echo_reply(&reply), Some((7, 3)));
        assert_eq!(echo_reply(&request), None, "a request is not a reply");
        assert_eq!(echo_reply(&reply[..7]), None);
    }

    /// The probe against this host's own loopback: both echoes come back (needs root for the
    /// raw socket, as the agent has).
    #[test]
    fn loopback_answers_both_echoes() {
        let probes = probe_paths(&[("self".into(), Ipv6Addr::LOCALHOST)], 1420)
            .expect("the path probe needs root (a raw ICMPv6 socket): run the tests as root");
        assert_eq!(
            probes,
            [PathProbe {
                label: "self".into(),
                small: true,
                full: true
            }]
        );
    }

    #[test]
    fn an_unused_port_is_not_bound_and_a_bound_one_is() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        assert_eq!(listen_port_bound(port), Ok(true));
        drop(socket);
        assert_eq!(listen_port_bound(port), Ok(false));
    }
}
