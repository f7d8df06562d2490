//! The kernel WireGuard backend and the backend choice.
//!
//! `choose_backend` is tested with fake probes (no privileges needed). The rest compares
//! `kernel_available()` with an independent oracle, `ip link add … type wireguard`, in a
//! throwaway network namespace: on a kernel without WireGuard (this project's test machine),
//! `backend: kernel` must fail with a clear message and `auto` must fall back to userspace; on a
//! kernel with WireGuard, a real device is created, configured, read back and removed.
//!
//! The namespace tests need root (CAP_NET_ADMIN + CAP_SYS_ADMIN) and `ip`. Without root they
//! fail, unless `OPENSPAN_SKIP_ROOT_TESTS=1` is set, in which case they say they skip.

use std::io::Write;
use std::time::Duration;

use kubespan_agent::config::Backend;
use kubespan_agent::dataplane::{Chosen, choose_backend};
use kubespan_agent::wg::kernel::{KernelWireGuard, kernel_available};
use kubespan_agent::wg::{DeviceSettings, PeerConfig, WgError, WireGuard};

mod support;

use support::Netns;

fn unsupported() -> Result<(), WgError> {
    Err(WgError::Unsupported(
        "cannot create a test WireGuard link: Operation not supported (os error 95)".to_owned(),
    ))
}

#[test]
fn kernel_backend_needs_kernel_support() {
    let error = choose_backend(Backend::Kernel, unsupported).unwrap_err();
    assert_eq!(
        error,
        "the kernel has no WireGuard support (cannot create a test WireGuard link: Operation not \
         supported (os error 95)); use backend: userspace or auto"
    );
    assert_eq!(
        choose_backend(Backend::Kernel, || Ok(())).unwrap().0,
        Chosen::Kernel
    );
    // Another failure (e.g. no privileges) is not blamed on the kernel.
    let error = choose_backend(Backend::Kernel, || {
        Err(WgError::Device {
            interface: "kswg1p0".to_owned(),
            message: "cannot create a test WireGuard link: Operation not permitted (os error 1)"
                .to_owned(),
        })
    })
    .unwrap_err();
    assert!(
        error.starts_with("cannot use kernel WireGuard ("),
        "{error}"
    );
    assert!(error.contains("Operation not permitted"), "{error}");
}

#[test]
fn auto_prefers_kernel_and_falls_back_to_userspace() {
    assert_eq!(
        choose_backend(Backend::Auto, || Ok(())).unwrap().0,
        Chosen::Kernel
    );
    let (chosen, why) = choose_backend(Backend::Auto, unsupported).unwrap();
    assert_eq!(chosen, Chosen::Userspace);
    assert!(why.contains("Operation not supported"), "{why}");
}

#[test]
fn userspace_never_probes_the_kernel() {
    for backend in [Backend::Userspace, Backend::None] {
        let (chosen, _) = choose_backend(backend, || panic!("probed")).unwrap();
        assert_eq!(chosen, Chosen::Userspace);
    }
}

// ---- in a network namespace ----

fn require_root(test: &str) -> bool {
    support::require_root(test, "network namespaces and links")
}

/// Namespace helpers only these tests need.
trait WireguardOracle {
    fn ip_can_create_wireguard(&self) -> bool;
    fn links(&self) -> String;
}

impl WireguardOracle for Netns {
    /// The oracle: can `ip` create a WireGuard link here?
    fn ip_can_create_wireguard(&self) -> bool {
        let created = self
            .ip_output(&["link", "add", "oracle0", "type", "wireguard"])
            .status
            .success();
        if created {
            self.ip_output(&["link", "del", "oracle0"]);
        }
        created
    }

    fn links(&self) -> String {
        self.ip(&["-o", "link", "show"])
    }
}

#[test]
fn kernel_probe_agrees_with_ip_and_backends_follow() {
    if !require_root("kernel_probe_agrees_with_ip_and_backends_follow") {
        return;
    }
    let ns = Netns::new("kwg");
    let kernel_has_wireguard = ns.ip_can_create_wireguard();
    let probe = ns.enter(kernel_available);
    assert_eq!(
        probe.is_ok(),
        kernel_has_wireguard,
        "kernel_available() = {probe:?}, but `ip link add … type wireguard` says {kernel_has_wireguard}"
    );
    // The probe leaves nothing behind.
    assert!(!ns.links().contains("kswg"), "{}", ns.links());

    if kernel_has_wireguard {
        let (chosen, _) = ns.enter(|| choose_backend(Backend::Auto, kernel_available).unwrap());
        assert_eq!(chosen, Chosen::Kernel);
        return;
    }
    // This project's test machine: no WireGuard in the kernel.
    let Err(WgError::Unsupported(reason)) = probe else {
        panic!("expected WgError::Unsupported, got {probe:?}");
    };
    assert!(reason.contains("Operation not supported"), "{reason}");

    let error = ns
        .enter(|| choose_backend(Backend::Kernel, kernel_available))
        .unwrap_err();
    assert!(
        error.starts_with("the kernel has no WireGuard support (")
            && error.ends_with("); use backend: userspace or auto"),
        "{error}"
    );
    let (chosen, why) = ns
        .enter(|| choose_backend(Backend::Auto, kernel_available))
        .unwrap();
    assert_eq!(chosen, Chosen::Userspace);
    assert!(why.contains("Operation not supported"), "{why}");

    // Creating the device directly says the same, and leaves nothing behind.
    let created = ns.enter(|| KernelWireGuard::create("kubespan").map(|_| ()));
    assert!(
        matches!(created, Err(WgError::Unsupported(_))),
        "{created:?}"
    );
    assert!(!ns.links().contains("kubespan"), "{}", ns.links());
}

/// Runs only where the kernel has WireGuard (skips, saying so, elsewhere).
#[test]
fn kernel_device_round_trip() {
    if !require_root("kernel_device_round_trip") {
        return;
    }
    let ns = Netns::new("kwg");
    if !ns.ip_can_create_wireguard() {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPING kernel_device_round_trip: this kernel has no WireGuard"
        );
        return;
    }
    let peers = ns.enter(|| {
        let mut device = KernelWireGuard::create("kstest0").expect("create");
        // Adopting the same link works too.
        std::mem::forget(KernelWireGuard::create("kstest0").expect("adopt"));
        device
            .configure(&DeviceSettings {
                private_key: [0x48; 32],
                listen_port: 51999,
                fwmark: 0x20,
            })
            .expect("configure");
        let mut peer = PeerConfig {
            public_key: [0x11; 32],
            preshared_key: [0x22; 32],
            endpoint: Some("192.0.2.1:51820".parse().unwrap()),
            allowed_ips: vec![
                "10.9.0.0/16".parse().unwrap(),
                "fd00::1/128".parse().unwrap(),
            ],
            persistent_keepalive: Duration::from_secs(10),
        };
        device.set_peer(&peer, true).expect("add peer");
        // In place, keeping the endpoint; allowed IPs replaced.
        peer.endpoint = None;
        peer.allowed_ips = vec!["10.8.0.0/16".parse().unwrap()];
        device.set_peer(&peer, false).expect("update peer");
        let mut other = peer.clone();
        other.public_key = [0x33; 32];
        other.allowed_ips = vec!["10.7.0.0/16".parse().unwrap()];
        device.set_peer(&other, false).expect("add another peer");
        device.remove_peer(&other.public_key).expect("remove peer");
        device.peers().expect("read peers")
    });
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0].public_key, [0x11; 32]);
    assert_eq!(peers[0].endpoint, Some("192.0.2.1:51820".parse().unwrap()));
    assert_eq!(peers[0].allowed_ips, vec!["10.8.0.0/16".parse().unwrap()]);
    assert_eq!(peers[0].last_handshake, None);
    // The device was dropped inside `enter`: the link is gone.
    assert!(!ns.links().contains("kstest0"), "{}", ns.links());
}
