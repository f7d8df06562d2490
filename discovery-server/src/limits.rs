//! Request limits and their validation. Defaults are the reference server's.

use std::time::Duration;

use thiserror::Error;

/// Upper bounds on what one client may store. Every bound is adjustable by a flag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_cluster_id_len: usize,
    pub max_affiliate_id_len: usize,
    pub max_data_len: usize,
    pub max_endpoint_len: usize,
    pub max_ttl: Duration,
    pub max_affiliates_per_cluster: usize,
    pub max_endpoints_per_affiliate: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_cluster_id_len: 256,
            max_affiliate_id_len: 256,
            max_data_len: 2048,
            max_endpoint_len: 32,
            max_ttl: Duration::from_secs(30 * 60),
            max_affiliates_per_cluster: 1024,
            max_endpoints_per_affiliate: 64,
        }
    }
}

/// Why the store refused a request. A refused request changes nothing.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum StoreError {
    /// The request is malformed or over a size limit (gRPC `InvalidArgument`).
    #[error("{0}")]
    InvalidArgument(String),
    /// The request would exceed a capacity limit (gRPC `ResourceExhausted`).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The storage backend failed (gRPC `Unavailable`).
    #[error("storage backend unavailable: {0}")]
    Unavailable(String),
}

impl Limits {
    pub fn check_cluster_id(&self, cluster_id: &str) -> Result<(), StoreError> {
        check_id("cluster id", cluster_id, self.max_cluster_id_len)
    }

    pub fn check_affiliate_id(&self, affiliate_id: &str) -> Result<(), StoreError> {
        check_id("affiliate id", affiliate_id, self.max_affiliate_id_len)
    }

    /// Checks everything about an update that does not depend on stored state.
    pub fn check_update(&self, update: &Update) -> Result<(), StoreError> {
        self.check_cluster_id(&update.cluster_id)?;
        self.check_affiliate_id(&update.affiliate_id)?;
        if let Some(data) = &update.data
            && data.len() > self.max_data_len
        {
            return Err(StoreError::InvalidArgument(format!(
                "affiliate data is {} bytes, the limit is {} bytes",
                data.len(),
                self.max_data_len
            )));
        }
        for endpoint in &update.endpoints {
            if endpoint.len() > self.max_endpoint_len {
                return Err(StoreError::InvalidArgument(format!(
                    "an affiliate endpoint is {} bytes, the limit is {} bytes",
                    endpoint.len(),
                    self.max_endpoint_len
                )));
            }
        }
        if update.ttl > self.max_ttl {
            return Err(StoreError::InvalidArgument(format!(
                "ttl {:?} is longer than the limit of {:?}",
                update.ttl, self.max_ttl
            )));
        }
        Ok(())
    }
}

fn check_id(what: &str, id: &str, max: usize) -> Result<(), StoreError> {
    if id.is_empty() {
        return Err(StoreError::InvalidArgument(format!("{what} is empty")));
    }
    if id.len() > max {
        return Err(StoreError::InvalidArgument(format!(
            "{what} is {} bytes, the limit is {max} bytes",
            id.len()
        )));
    }
    Ok(())
}

/// One `AffiliateUpdate`, independent of the wire format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    pub cluster_id: String,
    pub affiliate_id: String,
    /// Replaces the stored data when present; absent keeps what is stored.
    pub data: Option<bytes::Bytes>,
    /// Merged into the stored endpoints.
    pub endpoints: Vec<bytes::Bytes>,
    pub ttl: Duration,
}
