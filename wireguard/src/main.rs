//! `openspan-wireguard`: openspan's userspace WireGuard device on its own, outside the mesh.

use anyhow::Context;
use clap::{CommandFactory, Parser};
use openspan_wireguard::WireGuard;
use openspan_wireguard::userspace::UserspaceWireGuard;

/// openspan's userspace WireGuard (boringtun's protocol core with TUN offloads and UDP GSO/GRO),
/// as a standalone device configured with wg(8), like wireguard-go or boringtun-cli.
///
/// Creates the TUN interface and serves /var/run/wireguard/<INTERFACE>.sock; configure it with
/// `wg set` / `wg setconf`, give it addresses and bring it up with `ip`. Runs in the foreground
/// until SIGINT or SIGTERM, then removes the interface. Needs root (CAP_NET_ADMIN) and
/// /dev/net/tun. The kubespan-agent runs the same device itself (backend: userspace).
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    /// Interface name (at most 15 characters, unique on the host: the control socket
    /// directory is shared by all network namespaces).
    interface: String,

    /// Debug logging (RUST_LOG, when set, takes precedence).
    #[arg(long)]
    debug: bool,
}

fn main() -> std::process::ExitCode {
    if let Some(code) = openspan_runtime::manpages::generate_if_asked(
        Args::command,
        openspan_runtime::manpages::Section::Admin,
    ) {
        return code;
    }
    openspan_runtime::exit_with(run())
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    openspan_runtime::init_logging(args.debug, false);
    let device = UserspaceWireGuard::create_standalone(&args.interface)
        .with_context(|| format!("cannot start the WireGuard device {}", args.interface))?;
    tracing::info!(interface = %device.interface(), "userspace WireGuard running; configure it with wg(8)");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal handler")?
        .block_on(openspan_runtime::shutdown_signal())
        .context("cannot wait for SIGINT/SIGTERM")?;
    tracing::info!(interface = %device.interface(), "stopping");
    drop(device);
    Ok(())
}
