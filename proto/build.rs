//! Compiles the protocol files with protox (pure Rust), so no system `protoc` is needed.
//!
//! Two passes: the first generates all messages plus the client stubs; the second generates only
//! the server stubs, with `WatchResponse` mapped to a pre-encoded type so that the discovery
//! server encodes each change once and shares those bytes with every watcher.

use std::{env, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "sidero/discovery/server/cluster.proto",
    "sidero/discovery/client/affiliate.proto",
    "openspan/discovery_snapshot.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let fds = protox::compile(PROTOS, ["proto"])?;
    std::fs::write(out_dir.join("descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .bytes(".")
        .out_dir(&out_dir)
        .compile_fds(fds.clone())?;

    let server_dir = out_dir.join("server-stubs");
    std::fs::create_dir_all(&server_dir)?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(false)
        .extern_path(".sidero.discovery.server", "crate::discovery::server")
        .extern_path(
            ".sidero.discovery.server.WatchResponse",
            "crate::shared::EncodedWatchResponse",
        )
        .extern_path(".sidero.discovery.client", "crate::discovery::client")
        .extern_path(".openspan", "crate::openspan")
        .out_dir(&server_dir)
        .compile_fds(fds)?;
    Ok(())
}
