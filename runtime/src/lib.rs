//! Process plumbing shared by `discovery-server` and `kubespan-agent`.

#![forbid(unsafe_code)]

use std::io::IsTerminal;

/// Logs to stderr, as text (colours only on a terminal) or JSON lines. `RUST_LOG`, when set,
/// overrides the level; `debug` raises ours to debug but keeps the HTTP/2 stack at info.
pub fn init_logging(debug: bool, json: bool) {
    let default = if debug {
        "debug,h2=info,hyper=info,tower=info"
    } else {
        "info"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Waits for SIGTERM or SIGINT and names it.
pub async fn shutdown_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
