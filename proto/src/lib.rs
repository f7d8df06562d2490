//! Protocol types shared by openspan's discovery server, agent and tools.
//!
//! - [`discovery::server`]: the `sidero.discovery.server.Cluster` wire API (messages and client).
//! - [`discovery::client`]: the plaintext affiliate record nodes encrypt into `Affiliate.data`.
//! - [`cluster_server`]: the server stubs, whose Watch stream carries [`shared::EncodedWatchResponse`].
//! - [`openspan`]: openspan's own formats (the discovery server's snapshot file).

pub mod discovery {
    pub mod server {
        include!(concat!(env!("OUT_DIR"), "/sidero.discovery.server.rs"));
    }
    pub mod client {
        include!(concat!(env!("OUT_DIR"), "/sidero.discovery.client.rs"));
    }
}

pub mod openspan {
    pub mod discovery {
        pub mod snapshot {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/openspan.discovery.snapshot.v1.rs"));
            }
        }
    }
}

/// Server stubs for `sidero.discovery.server.Cluster`.
pub mod cluster_server {
    include!(concat!(env!("OUT_DIR"), "/server-stubs/sidero.discovery.server.rs"));
}

pub mod shared;

/// The encoded `FileDescriptorSet` of every protocol file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));
