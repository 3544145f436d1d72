//! Error types, one per boundary, each with variants the caller branches on.
//!
//! - `ConfigError`: a bad flag or value; printed as one line, exit code 2.
//! - `Refusal`: a `/provide` request we will not register; sent to the
//!   client as `ERROR: <reason>` and a close frame 1008, nothing stored.
//! - `StoreError`: what the etcd worker needs to know about a failed etcd
//!   call: which condition etcd is in (each with its own retry policy),
//!   re-grant the lease, or give up on this one request.

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

/// A failed etcd call, sorted by what the worker does next. Only
/// `BadRequest` may fail a registration; every other error is waited out
/// with the work queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// etcd did not answer (down, partitioned, no leader, timed out):
    /// retry shortly.
    Unreachable(String),
    /// etcd answers but refuses every write (an alarm: NOSPACE, CORRUPT)
    /// until an operator acts: retry with a short backoff.
    RefusingWrites(String),
    /// Our credentials are refused: a stale or expired token (the store
    /// has already logged in again and retried once) or a wrong password:
    /// retry with a backoff, since each login costs etcd a bcrypt.
    Auth(String),
    /// Our user may not do this: retry with a backoff until an operator
    /// fixes the role.
    PermissionDenied(String),
    /// etcd answered that our lease does not exist (expired or revoked):
    /// grant a new one and put every live entry again.
    LeaseNotFound,
    /// This one request is bad (too large, too many operations): sending it
    /// again will not help; split the batch or give up on the entry.
    BadRequest(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Unreachable(why) => write!(f, "etcd unreachable: {why}"),
            StoreError::RefusingWrites(why) => write!(f, "etcd refuses writes: {why}"),
            StoreError::Auth(why) => write!(f, "etcd authentication failed: {why}"),
            StoreError::PermissionDenied(why) => write!(f, "etcd denies permission: {why}"),
            StoreError::LeaseNotFound => f.write_str("etcd lease not found"),
            StoreError::BadRequest(why) => write!(f, "etcd rejected the request: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}
