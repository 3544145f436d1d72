//! Error types, one per boundary, each with variants the caller branches on.
//!
//! - `ConfigError`: a bad flag or value; printed as one line, exit code 2.
//! - `Refusal`: a `/provide` request we will not register; sent to the
//!   client as `ERROR: <reason>` and a close frame 1008, nothing stored.
//! - `StoreError`: what the etcd worker needs to know about a failed etcd
//!   call: retry later, re-grant the lease, or give up on this request.

use std::fmt;

/// A flag or value the server cannot start with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Why a `/provide` request is refused. The text goes to the peer, so it
/// never echoes more than a short, truncated piece of what the peer sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(String);

impl Refusal {
    pub fn new(reason: impl Into<String>) -> Self {
        Refusal(reason.into())
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

/// A failed etcd call, sorted by what the worker does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// etcd did not answer (down, partitioned, no leader, timed out): keep
    /// the work queued and retry shortly.
    Unavailable(String),
    /// etcd answered that our lease does not exist (expired or revoked):
    /// grant a new one and put every live entry again.
    LeaseNotFound,
    /// etcd refused the request itself (permission, size): retrying the same
    /// request will not help.
    Rejected(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Unavailable(why) => write!(f, "etcd unavailable: {why}"),
            StoreError::LeaseNotFound => f.write_str("etcd lease not found"),
            StoreError::Rejected(why) => write!(f, "etcd rejected the request: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}
