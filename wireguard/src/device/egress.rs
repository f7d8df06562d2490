//! TUN → network: reads (super-)packets from the TUN device, encrypts each for the peer that
//! owns its destination and sends runs of equal-sized datagrams with one UDP GSO call.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use boringtun::noise::{Tunn, TunnResult};
use tun_rs::VIRTIO_NET_HDR_LEN;

use super::{
    DATA_MESSAGE, DATA_OVERHEAD, HELPER_IDLE, MIN_MESSAGE_ROOM, Shared, TUN_BATCH, lock, read,
};
use crate::udp::MAX_GSO_BYTES;
use crate::wake::wait_readable;

/// Consecutive encrypted datagrams in the send buffer that go to one destination in one call:
/// all `segment` bytes long except the last, which may be shorter (and closes the batch).
#[derive(Debug, PartialEq, Eq)]
struct Batch {
    destination: SocketAddr,
    start: usize,
    end: usize,
    segment: usize,
    closed: bool,
}

/// Appends the datagram at `start..start + len` of the send buffer to the last batch when one
/// GSO send can carry it, else starts a new batch. Handshake messages travel alone.
fn add_to_batches(
    batches: &mut Vec<Batch>,
    destination: SocketAddr,
    start: usize,
    len: usize,
    is_data: bool,
    max_segments: usize,
) {
    if is_data
        && let Some(last) = batches.last_mut()
        && !last.closed
        && last.destination == destination
        && last.end == start
        && len <= last.segment
        && (last.end - last.start) / last.segment < max_segments
        && last.end - last.start + len <= MAX_GSO_BYTES
    {
        last.end += len;
        last.closed = len < last.segment;
        return;
    }
    batches.push(Batch {
        destination,
        start,
        end: start + len,
        segment: len,
        closed: !is_data,
    });
}

/// The TUN → peers direction: reads (super-)packets, encrypts each for the peer owning its
/// destination and sends runs of equal-sized datagrams with one GSO call. One thread at a time
/// owns it (through [`Shared::egress`]), which keeps a flow's packets in order.
pub(super) struct Egress {
    original: Vec<u8>,
    packets: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    out: Vec<u8>,
    batches: Vec<Batch>,
}

/// TUN read buffer per segment: one MTU fits (jumbo frames included); grown to [`MAX_SEGMENT`]
/// for larger MTUs.
const SEGMENT: usize = 16_384;
const MAX_SEGMENT: usize = 65_536;
/// Slack over the MTU a segment buffer keeps (the segmenting may add nothing, but be safe).
const SEGMENT_HEADROOM: usize = 64;

/// What [`Egress::pump`] left behind.
pub(super) enum Pumped {
    /// The TUN device has nothing more to read.
    Drained,
    /// The read budget ran out first.
    Busy,
}

impl Egress {
    pub(super) fn new() -> Self {
        // With offloads a segment is at most one MTU; without them the first buffer takes a
        // whole packet.
        let mut packets = vec![vec![0u8; MAX_SEGMENT]];
        packets.extend((1..TUN_BATCH).map(|_| vec![0u8; SEGMENT]));
        Self {
            original: vec![0u8; VIRTIO_NET_HDR_LEN + 65_536],
            packets,
            sizes: vec![0; TUN_BATCH],
            // One read's packets encrypted back to back: at most 64 KiB of payload plus the
            // headers repeated per segment and WireGuard's overhead.
            out: vec![0u8; 2 * 65_536 + TUN_BATCH * MIN_MESSAGE_ROOM],
            batches: Vec::new(),
        }
    }

    /// Reads and forwards up to `reads` TUN reads' worth of packets.
    pub(super) fn pump(&mut self, shared: &Shared, reads: usize) -> Pumped {
        for _ in 0..reads {
            let read =
                shared
                    .tun
                    .recv_multiple(&mut self.original, &mut self.packets, &mut self.sizes, 0);
            match read {
                Ok(count) => self.forward(shared, count),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Pumped::Drained,
                Err(e) => {
                    let mtu = shared.tun.mtu().map_or(0, usize::from);
                    if mtu + SEGMENT_HEADROOM > self.packets[1].len() {
                        // Segments larger than our buffers: an MTU above 16 KiB. Grow them
                        // (the super-packet that did not fit is lost; TCP resends it).
                        tracing::info!(interface = %shared.interface, mtu, error = %e, "large MTU: growing the TUN read buffers");
                        self.packets
                            .iter_mut()
                            .for_each(|p| p.resize(MAX_SEGMENT, 0));
                    } else if !shared.stop.load(Ordering::Relaxed) {
                        tracing::debug!(interface = %shared.interface, error = %e, "TUN read failed");
                    }
                    return Pumped::Drained;
                }
            }
        }
        Pumped::Busy
    }

    fn forward(&mut self, shared: &Shared, count: usize) {
        let Some(socket) = shared.socket() else {
            return;
        };
        let max_segments = socket.max_segments();
        self.batches.clear();
        let peers = read(&shared.peers);
        let mut used = 0;
        let mut index = 0;
        while index < count {
            let run_dst = Tunn::dst_address(&self.packets[index][..self.sizes[index]]);
            let Some(peer) = run_dst.and_then(|dst| peers.routes.lookup(dst)).cloned() else {
                index += 1;
                continue;
            };
            let destination = peer.endpoint();
            let mut current = lock(&peer.tunn);
            let mut previous = lock(&peer.previous);
            // Across a key change: the session from before it until the new key has one.
            let tunn: &mut Tunn = match previous.as_mut() {
                Some(previous)
                    if current.time_since_last_handshake().is_none()
                        && previous.tunn.time_since_last_handshake().is_some() =>
                {
                    &mut previous.tunn
                }
                _ => &mut current,
            };
            // This peer's consecutive packets (one super-packet's segments share a
            // destination, so the lookup is only repeated when the address changes).
            while index < count {
                let packet = &self.packets[index][..self.sizes[index]];
                let dst = Tunn::dst_address(packet);
                if dst != run_dst
                    && dst
                        .and_then(|dst| peers.routes.lookup(dst))
                        .is_none_or(|p| !Arc::ptr_eq(p, &peer))
                {
                    break;
                }
                index += 1;
                let room = (packet.len() + DATA_OVERHEAD).max(MIN_MESSAGE_ROOM);
                if used + room > self.out.len() {
                    // Cannot happen with TUN_BATCH packets of at most 64 KiB in total; drop
                    // rather than overrun.
                    continue;
                }
                let len = match tunn.encapsulate(packet, &mut self.out[used..used + room]) {
                    TunnResult::WriteToNetwork(message) => message.len(),
                    TunnResult::Err(e) => {
                        tracing::trace!(error = ?e, "encapsulate failed");
                        continue;
                    }
                    // Queued until a handshake completes.
                    _ => continue,
                };
                let Some(destination) = destination else {
                    continue;
                };
                let is_data = self.out[used] == DATA_MESSAGE;
                add_to_batches(
                    &mut self.batches,
                    destination,
                    used,
                    len,
                    is_data,
                    max_segments,
                );
                used += len;
            }
        }
        drop(peers);
        for batch in &self.batches {
            let contents = &self.out[batch.start..batch.end];
            if let Some(link) = shared.relay_for(batch.destination) {
                // A relayed peer: its datagrams one by one to the relay link.
                for datagram in contents.chunks(batch.segment.max(1)) {
                    link.send(batch.destination, datagram);
                }
                continue;
            }
            if let Err(e) = socket.send(batch.destination, contents, Some(batch.segment)) {
                tracing::debug!(interface = %shared.interface, destination = %batch.destination, error = %e, "WireGuard send failed");
            }
        }
    }
}

/// The transmit thread: a helper for load. At low load the receive thread also watches the TUN
/// device, so a packet costs one thread wake-up per hop (a request and its answer are handled by
/// the same thread). When the receive thread finds more than it should forward itself, it hands
/// the TUN device to this thread, which keeps it until the device has been idle for a while, so
/// the two directions of a busy tunnel run on two cores.
pub(super) fn tun_to_network(shared: &Shared) {
    let tun = shared.tun.as_fd();
    while !shared.stop.load(Ordering::Relaxed) {
        if !shared.tx_active.load(Ordering::Acquire) {
            let _ = wait_readable([shared.tx_wake.fd(), shared.stopping.fd()], None);
            shared.tx_wake.clear();
            continue;
        }
        // The lock is never held while sleeping.
        let pumped = lock(&shared.egress).pump(shared, 64);
        if let Pumped::Drained = pumped
            && let Ok([false, false]) =
                wait_readable([tun, shared.stopping.fd()], Some(HELPER_IDLE))
        {
            shared.tx_active.store(false, Ordering::Release);
            shared.rx_wake.notify();
        }
    }
}

pub(super) fn hand_over_tun(shared: &Shared) {
    if !shared.tx_active.swap(true, Ordering::AcqRel) {
        shared.tx_wake.notify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    #[test]
    fn equal_datagrams_share_a_batch_and_a_shorter_one_closes_it() {
        let mut batches = Vec::new();
        for i in 0..3 {
            add_to_batches(&mut batches, addr(1), i * 100, 100, true, 64);
        }
        add_to_batches(&mut batches, addr(1), 300, 60, true, 64);
        add_to_batches(&mut batches, addr(1), 360, 60, true, 64);
        assert_eq!(
            batches,
            vec![
                Batch {
                    destination: addr(1),
                    start: 0,
                    end: 360,
                    segment: 100,
                    closed: true
                },
                Batch {
                    destination: addr(1),
                    start: 360,
                    end: 420,
                    segment: 60,
                    closed: false
                },
            ]
        );
    }

    #[test]
    fn batches_split_on_destination_size_limits_and_handshakes() {
        let mut batches = Vec::new();
        add_to_batches(&mut batches, addr(1), 0, 100, true, 2);
        add_to_batches(&mut batches, addr(1), 100, 100, true, 2);
        // Segment limit reached.
        add_to_batches(&mut batches, addr(1), 200, 100, true, 2);
        // Another destination.
        add_to_batches(&mut batches, addr(2), 300, 100, true, 2);
        // A larger datagram cannot join.
        add_to_batches(&mut batches, addr(2), 400, 200, true, 2);
        // A handshake travels alone, and nothing joins it.
        add_to_batches(&mut batches, addr(2), 600, 148, false, 2);
        add_to_batches(&mut batches, addr(2), 748, 148, true, 2);
        let starts: Vec<usize> = batches.iter().map(|b| b.start).collect();
        assert_eq!(starts, vec![0, 200, 300, 400, 600, 748]);
        let mut big = Vec::new();
        for i in 0..50 {
            add_to_batches(&mut big, addr(1), i * 1_452, 1_452, true, 64);
        }
        assert!(big.iter().all(|b| b.end - b.start <= MAX_GSO_BYTES));
        assert_eq!(big.len(), 2);
    }
}
