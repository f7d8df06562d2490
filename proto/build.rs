//! Compiles the protocol files with protox (pure Rust), so no system `protoc` is needed.

use std::{env, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "sidero/discovery/server/cluster.proto",
    "sidero/discovery/client/affiliate.proto",
    "openspan/discovery_snapshot.proto",
    "openspan/agent.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let fds = protox::compile(PROTOS, ["proto"])?;
    std::fs::write(out_dir.join("descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .bytes(".")
        // kubespanctl prints the agent API's answers as JSON and YAML.
        .type_attribute(".openspan.agent.v1", "#[derive(serde::Serialize)]")
        .out_dir(&out_dir)
        .compile_fds(fds)?;
    Ok(())
}
