//! The STUN responder (`--stun-addr`) of the real discovery-server binary, over real UDP
//! sockets on loopback: it answers Binding requests with the client's own address, drops
//! everything else without answering, limits each source IP, counts all of it in /metrics, and
//! does not exist unless asked for.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::child::ChildServer;
use openspan_stun::{
    TransactionId, answer_binding_request, binding_request, parse_binding_response,
};
use tokio::net::UdpSocket;

const ANSWERED: &str = "discovery_stun_answered_total ";
const RATE_LIMITED: &str = "discovery_stun_rate_limited_total ";
const MALFORMED: &str = "discovery_stun_malformed_total ";

/// A loopback UDP port free at the time of asking.
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child server with the STUN responder on a free loopback port.
async fn start_with_stun() -> (ChildServer, SocketAddr) {
    let stun = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let server = ChildServer::start(&[&format!("--stun-addr={stun}")]).await;
    (server, stun)
}

async fn client(ip: [u8; 4]) -> UdpSocket {
    UdpSocket::bind(SocketAddr::from((ip, 0)))
        .await
        .expect("bind a loopback client socket")
}

fn transaction(n: u32) -> TransactionId {
    let mut t = [0xa5u8; 12];
    t[8..].copy_from_slice(&n.to_be_bytes());
    t
}

/// The next datagram within `wait`, if any.
async fn receive(socket: &UdpSocket, wait: Duration) -> Option<Vec<u8>> {
    let mut buf = [0u8; 1500];
    match tokio::time::timeout(wait, socket.recv_from(&mut buf)).await {
        Ok(Ok((len, _))) => Some(buf[..len].to_vec()),
        Ok(Err(e)) => panic!("receiving on the client socket failed: {e}"),
        Err(_) => None,
    }
}

/// Sends one Binding request and returns what the answer reports (failing if none comes).
async fn ask(socket: &UdpSocket, server: SocketAddr, n: u32) -> SocketAddr {
    socket
        .send_to(&binding_request(&transaction(n)), server)
        .await
        .unwrap();
    let answer = receive(socket, Duration::from_secs(5))
        .await
        .expect("an answer to a Binding request within 5 s");
    let (echoed, mapped) = parse_binding_response(&answer).expect("a Binding success response");
    assert_eq!(
        echoed,
        transaction(n),
        "the answer echoes the transaction id"
    );
    assert!(answer.len() <= 44, "{} bytes", answer.len());
    mapped
}

/// Waits until a metric reaches `want` (metrics are read over HTTP; give the server 5 s).
async fn wait_for_metric(server: &ChildServer, name: &str, want: u64) {
    let started = Instant::now();
    loop {
        let value = server.metric(name).await;
        if value == want {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{}is {value}, expected {want}",
            name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Inodes of the UDP sockets (IPv4 and IPv6) the process `pid` holds open.
fn udp_sockets_of(pid: u32) -> Vec<u64> {
    let mut udp: HashSet<u64> = HashSet::new();
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_else(|e| panic!("read {table}: {e}"));
        for line in text.lines().skip(1) {
            let inode = line
                .split_whitespace()
                .nth(9)
                .and_then(|i| i.parse::<u64>().ok());
            udp.extend(inode);
        }
    }
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("read the child's fds");
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .filter(|inode| udp.contains(inode))
        .collect()
}

#[tokio::test]
async fn answers_a_binding_request_with_the_clients_own_address() {
    let (server, stun) = start_with_stun().await;
    let socket = client([127, 0, 0, 1]).await;
    let mapped = ask(&socket, stun, 1).await;
    assert_eq!(mapped, socket.local_addr().unwrap());
    // Another loopback source address is seen as itself too.
    let other = client([127, 0, 0, 2]).await;
    assert_eq!(ask(&other, stun, 2).await, other.local_addr().unwrap());
    wait_for_metric(&server, ANSWERED, 2).await;

    let log = std::fs::read_to_string(&server.log).unwrap();
    let started: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("answering STUN binding requests"))
        .collect();
    assert_eq!(started.len(), 1, "logged once at start: {log}");
    assert!(started[0].contains(&stun.to_string()), "{}", started[0]);
}

#[tokio::test]
async fn ipv4_clients_of_an_ipv6_socket_are_answered_with_their_ipv4_address() {
    // An IPv6 socket sees IPv4 clients as ::ffff:a.b.c.d, as a dual-stack `:3478` does; bound to
    // the IPv4-mapped loopback address, it stays on loopback.
    let port = free_udp_port();
    let server = ChildServer::start(&[&format!("--stun-addr=[::ffff:127.0.0.1]:{port}")]).await;
    let socket = client([127, 0, 0, 1]).await;
    let answer_to = SocketAddr::from(([127, 0, 0, 1], port));
    socket
        .send_to(&binding_request(&transaction(3)), answer_to)
        .await
        .unwrap();
    let answer = receive(&socket, Duration::from_secs(5))
        .await
        .expect("an answer within 5 s");
    assert_eq!(
        answer.len(),
        32,
        "an IPv4 XOR-MAPPED-ADDRESS, not an IPv6 one"
    );
    let (_, mapped) = parse_binding_response(&answer).unwrap();
    assert_eq!(mapped, socket.local_addr().unwrap());
    wait_for_metric(&server, ANSWERED, 1).await;
}

#[tokio::test]
async fn garbage_wireguard_packets_and_responses_are_dropped_unanswered() {
    let (server, stun) = start_with_stun().await;
    let socket = client([127, 0, 0, 1]).await;
    let mut initiation = vec![0x5au8; 148];
    initiation[..4].copy_from_slice(&[1, 0, 0, 0]);
    let mut keepalive = vec![0x33u8; 32];
    keepalive[..4].copy_from_slice(&[4, 0, 0, 0]);
    // A well-formed Binding response: answering it would let two responders ping-pong.
    let mut response = [0u8; 44];
    let len = answer_binding_request(
        &binding_request(&transaction(7)),
        socket.local_addr().unwrap(),
        &mut response,
    )
    .unwrap();
    let mut truncated = binding_request(&transaction(8)).to_vec();
    truncated.truncate(19);
    let dropped: [&[u8]; 6] = [
        b"hello, are you a STUN server?",
        &initiation,
        &keepalive,
        &response[..len],
        &truncated,
        &[],
    ];
    for packet in dropped {
        socket.send_to(packet, stun).await.unwrap();
    }
    assert_eq!(
        receive(&socket, Duration::from_millis(500)).await,
        None,
        "the server answered something that is not a Binding request"
    );
    // The server keeps serving, and counted what it dropped.
    assert_eq!(ask(&socket, stun, 9).await, socket.local_addr().unwrap());
    wait_for_metric(&server, MALFORMED, dropped.len() as u64).await;
    wait_for_metric(&server, ANSWERED, 1).await;
    assert_eq!(server.metric(RATE_LIMITED).await, 0);
}

#[tokio::test]
async fn each_source_ip_is_rate_limited_and_answered_again_after_a_pause() {
    let (server, stun) = start_with_stun().await;
    let socket = client([127, 0, 0, 1]).await;
    const SENT: u32 = 200;
    let started = Instant::now();
    // Paced a little, so the server's receive buffer never drops any: all 200 must be counted.
    for n in 0..SENT {
        socket
            .send_to(&binding_request(&transaction(n)), stun)
            .await
            .unwrap();
        if n % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    // Answers are counted until 2 s of silence (a loaded server can pause for longer than the
    // 500 ms this used to allow, and the answers after the pause were then counted as refused).
    let mut answered = 0u64;
    let mut last_answer = started;
    while let Some(answer) = receive(&socket, Duration::from_secs(2)).await {
        parse_binding_response(&answer).expect("a Binding success response");
        answered += 1;
        last_answer = Instant::now();
    }
    // 40 at once, then 20 a second for as long as the server was taking them: bounded by the
    // time it took rather than by assuming it took under 3 s.
    let took = last_answer.duration_since(started).as_secs_f64();
    let allowed = 40.0 + 20.0 * took + 1.0;
    assert!(
        answered >= 40 && (answered as f64) <= allowed && answered < SENT as u64,
        "{answered} of {SENT} requests answered in {took:.2} s (allowed {allowed:.0})"
    );
    wait_for_metric(&server, ANSWERED, answered).await;
    wait_for_metric(&server, RATE_LIMITED, SENT as u64 - answered).await;

    // Another source IP has a bucket of its own.
    let other = client([127, 0, 0, 2]).await;
    assert_eq!(ask(&other, stun, 1000).await, other.local_addr().unwrap());

    // After a pause the limited source is answered again (20 tokens a second).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for n in 0..5 {
        assert_eq!(
            ask(&socket, stun, 2000 + n).await,
            socket.local_addr().unwrap()
        );
    }
    wait_for_metric(&server, ANSWERED, answered + 6).await;
    assert_eq!(server.metric(MALFORMED).await, 0);
}

#[tokio::test]
async fn without_the_flag_nothing_listens_on_udp() {
    let off = ChildServer::start(&[]).await;
    assert_eq!(
        udp_sockets_of(off.child.id()),
        Vec::<u64>::new(),
        "a server without --stun-addr holds a UDP socket"
    );
    let log = std::fs::read_to_string(&off.log).unwrap();
    assert!(!log.contains("STUN"), "{log}");

    // The same check finds the responder's socket when it is on, so the one above can fail.
    let (on, _) = start_with_stun().await;
    assert_eq!(udp_sockets_of(on.child.id()).len(), 1);
}

#[tokio::test]
async fn an_address_in_use_is_a_clear_startup_error() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_discovery-server"))
        .arg(format!("--addr=127.0.0.1:{}", common::free_port()))
        .arg("--landing-addr=")
        .arg("--metrics-addr=")
        .arg("--snapshots-enabled=false")
        .arg(format!("--stun-addr={addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the discovery-server binary");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the server did not exit within 20 s although --stun-addr {addr} is taken");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "exit status {status}; {stderr}");
    assert!(
        stderr.contains("--stun-addr") && stderr.contains(&addr.to_string()),
        "the error names the flag and the address: {stderr}"
    );
    drop(taken);
}
