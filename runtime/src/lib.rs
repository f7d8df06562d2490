//! Process plumbing shared by openspan's binaries: logging, exit, signals, man pages.

#![forbid(unsafe_code)]

pub mod manpages;

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

/// The exit of a daemon's `main`: on error, the message with its causes on one line (`Error:
/// …: …`) and status 1. Returning the error from `main` would print its Debug form, which
/// `RUST_BACKTRACE=1` turns into a backtrace after every user error.
pub fn exit_with<E: std::fmt::Display>(result: Result<(), E>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
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
