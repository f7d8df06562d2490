//! openspan's discovery server: a self-hostable, wire-compatible implementation of the
//! `sidero.discovery.server.Cluster` API.
//!
//! Layers, innermost first: [`store`] (pure rules, takes the time as an argument), [`fanout`]
//! (Watch and List to many streams from shared encodings), [`backend`] (the storage seam and the
//! embedded in-memory backend), [`persist`]
//! (snapshot files), [`ratelimit`] (pure per-IP limiter), [`grpc`] (the service), [`http`],
//! [`tls`], [`stun`] (the optional STUN responder) and [`server`] (wiring).

#![forbid(unsafe_code)]

pub mod backend;
pub mod bytesize;
pub mod clock;
pub mod duration;
pub mod etcd;
pub mod fanout;
pub mod grpc;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod persist;
pub mod ratelimit;
pub mod server;
pub mod store;
pub mod stun;
pub mod tls;
