//! The userspace device hands STUN messages arriving on the WireGuard socket to the agent, but
//! only from servers it sent a request to within the last seconds: anyone on the internet can
//! send datagrams with STUN's magic cookie, and unsolicited ones would fill the inbox and push out
//! the real answers.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use kubespan_agent::wg::userspace::UserspaceWireGuard;
use kubespan_agent::wg::{DeviceSettings, WireGuard};
use netns_tests::{Lab, in_namespace, require_root};

const PORT: u16 = 51999;

fn answer_from(socket: &UdpSocket) -> Vec<u8> {
    let request = openspan_stun::binding_request(&[7; 12]);
    let mut out = [0u8; 64];
    let len = openspan_stun::answer_binding_request(
        &request,
        socket.local_addr().expect("bound"),
        &mut out,
    )
    .expect("a binding answer");
    out[..len].to_vec()
}

/// What the device hands over within `wait`, or until `until` is among it.
fn collect(
    device: &mut UserspaceWireGuard,
    wait: Duration,
    until: Option<SocketAddr>,
) -> Vec<SocketAddr> {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    while Instant::now() < deadline && until.is_none_or(|u| !got.contains(&u)) {
        got.extend(device.take_stun().into_iter().map(|(from, _)| from));
        std::thread::sleep(Duration::from_millis(20));
    }
    got
}

#[test]
fn only_answers_from_servers_asked_enter_the_stun_inbox() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let lab = Lab::new(1)?;
    let interface = lab.node(1).interface.clone();
    in_namespace(&lab.node(1).netns, move || -> anyhow::Result<()> {
        let mut device = UserspaceWireGuard::create(&interface)?;
        device.configure(&DeviceSettings {
            private_key: rand::random(),
            listen_port: PORT,
            fwmark: 0,
        })?;
        let device_addr: SocketAddr = ([127, 0, 0, 1], PORT).into();
        let server = UdpSocket::bind("127.0.0.1:0")?;
        let stranger = UdpSocket::bind("127.0.0.1:0")?;
        // Never asked: its answers must never enter, however late the device reads them.
        let unsolicited = UdpSocket::bind("127.0.0.1:0")?;
        server.set_read_timeout(Some(Duration::from_secs(2)))?;

        // Unsolicited: nobody was asked yet.
        for _ in 0..100 {
            unsolicited.send_to(&answer_from(&unsolicited), device_addr)?;
        }
        let got = collect(&mut device, Duration::from_millis(300), None);
        assert!(
            got.is_empty(),
            "unsolicited STUN entered the inbox: {got:?}"
        );

        // Asked: the server's answer is handed over; a stranger's is not.
        let request = openspan_stun::binding_request(&[9; 12]);
        assert!(device.send_stun(server.local_addr()?, &request));
        let mut buffer = [0u8; 64];
        let (len, from) = server.recv_from(&mut buffer)?;
        assert_eq!(&buffer[..len], &request);
        assert_eq!(from.port(), PORT, "sent from the WireGuard socket");
        for _ in 0..100 {
            stranger.send_to(&answer_from(&stranger), device_addr)?;
        }
        server.send_to(&answer_from(&server), device_addr)?;
        let got = collect(
            &mut device,
            Duration::from_secs(10),
            Some(server.local_addr()?),
        );
        assert_eq!(
            got,
            [server.local_addr()?],
            "only the asked server's answer"
        );
        Ok(())
    })?
}
