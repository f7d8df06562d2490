//! Protocol types shared by openspan's discovery server, agent and tools.
//!
//! - [`discovery::server`]: the `sidero.discovery.server.Cluster` wire API (messages, client, server).
//! - [`discovery::client`]: the plaintext affiliate record nodes encrypt into `Affiliate.data`.
//! - [`openspan`]: openspan's own APIs and formats (the agent's membership API, the discovery
//!   server's snapshot file).

#![forbid(unsafe_code)]

pub mod discovery {
    pub mod server {
        include!(concat!(env!("OUT_DIR"), "/sidero.discovery.server.rs"));
    }
    pub mod client {
        include!(concat!(env!("OUT_DIR"), "/sidero.discovery.client.rs"));
    }
}

pub mod openspan {
    pub mod agent {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/openspan.agent.v1.rs"));
        }
    }
    pub mod discovery {
        pub mod snapshot {
            pub mod v1 {
                include!(concat!(
                    env!("OUT_DIR"),
                    "/openspan.discovery.snapshot.v1.rs"
                ));
            }
        }
    }
}

/// The encoded `FileDescriptorSet` of every protocol file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));
