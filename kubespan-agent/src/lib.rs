//! openspan's node agent: who this node is, what it publishes, what it learns from discovery,
//! and the membership API that `kubespanctl` reads.
//!
//! Pure logic: [`model`], [`crypto`], [`identity`] (derivations), [`netset`], [`endpoints`], [`paths`],
//! [`members`], [`record`]. Shells around I/O: [`host`], [`discovery`], [`api`], [`agent`].

#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod config;
pub mod crypto;
pub mod dataplane;
pub mod discovery;
pub mod discovery_tls;
pub mod endpoints;
pub mod firewall;
pub mod health;
pub mod health_probe;
pub mod host;
pub mod identity;
pub mod members;
pub mod metrics;
pub mod model;
pub mod netset;
pub mod paths;
pub mod portmap;
pub mod publish;
pub mod reconcile;
pub mod record;
pub mod reflexive;
pub mod registry;
pub mod relay;
pub mod routing;
pub mod warm;

/// The WireGuard layer (devices, UAPI, kernel backend) lives in its own crate.
pub use openspan_wireguard as wg;
pub use openspan_wireguard::netlink;
