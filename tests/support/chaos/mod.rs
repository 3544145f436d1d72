//! The chaos run's parts (`tests/chaos.rs`, issue 11 part 3): the promise's
//! bounds as the README and issues 9 and 11 state them ([`Bounds`]) and
//! the entry each client must have (here); a seeded PRNG and the fault
//! schedule it draws (`schedule`); the checker that compares etcd with the
//! set of live clients (`ledger`); a reader of etcd's JSON gateway cheap
//! enough to poll every 100 ms (`reader`); and a websocket provider that
//! behaves as a well-made client does (`provider`). The TCP proxy that
//! partitions an instance from etcd is [`super::faults::TcpProxy`].
//!
//! Invariants:
//! - the schedule is a pure function of the seed and the run's length, so
//!   a failing run replays the same faults in the same order (the timing of
//!   the processes themselves is not replayable);
//! - the checker's bounds come from [`Bounds`] and nowhere else, each named
//!   after the sentence that promises it; nothing here is fitted to what the
//!   server happens to do;
//! - a violation is recorded only when it is certain: an observation's time
//!   is taken *before* the etcd read, so the snapshot it returns is at least
//!   that late, and the clients' own transitions are recorded before the act
//!   (a death) or after it (a welcome);
//! - the [`Ledger`] takes every instant as an argument, so its rules are
//!   unit tested without processes.

mod ledger;
mod provider;
mod reader;
mod schedule;

pub use ledger::*;
pub use provider::*;
pub use reader::*;
pub use schedule::*;

use std::time::Duration;

use serde_json::{json, Value};

use super::sha1_hex;

/// The bounds the README ("Failure behaviour", "The /provide contract")
/// and issues 9 (restart continuity) and 11 (stalls) promise, in terms of
/// `--timeout` T. The checker uses these and nothing else.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub timeout: Duration,
}

impl Bounds {
    /// "Pending work written within 2 s of etcd answering again" (etcd
    /// briefly unavailable; a lost member: "written within 2 s of the
    /// cluster answering"). Also the bound for a fresh registration while
    /// everything answers.
    pub fn pending(&self) -> Duration {
        Duration::from_secs(2)
    }

    /// A hung member (which is what a partition looks like from skyapi):
    /// "written within ... 4 s".
    pub fn pending_hung(&self) -> Duration {
        Duration::from_secs(4)
    }

    /// "Lease lost ... T/3 + 2 s", and issue 11 after a stall of skyapi:
    /// "the entries come back on a new lease within T/3 + 2 s of resuming".
    pub fn lease_lost(&self) -> Duration {
        self.timeout / 3 + Duration::from_secs(2)
    }

    /// After a partition heals: the lease may be lost (T/3 + 2 s) and the
    /// connections to etcd hung (4 s); whichever is longer.
    pub fn after_partition(&self) -> Duration {
        self.lease_lost().max(self.pending_hung())
    }

    /// Issue 11: "an entry without a live client for longer than
    /// `--timeout` (+1 s)" (README: a silent client is dropped and SIGKILL's
    /// entries expire "within T").
    pub fn stale(&self) -> Duration {
        self.timeout + Duration::from_secs(1)
    }

    /// An entry left to expire with its lease (its instance killed or
    /// stopped) goes within T of the last keepalive, as the README says
    /// for SIGKILL and for a provider that does not come back after a
    /// restart; +1 s as in [`stale`](Self::stale).
    pub fn lease_expiry(&self) -> Duration {
        self.stale()
    }

    /// A new etcd leader gives every lease a fresh TTL plus an election
    /// timeout (etcd's own rule, FIELD-NOTES; 1 s by default), so an entry
    /// left to its lease may stay T + 1 s (+1 s) after an election.
    pub fn after_election(&self) -> Duration {
        self.stale() + Duration::from_secs(1)
    }

    /// Issue 9: the sidecar's "first attempt within 0-250 ms" on a dropped
    /// connection, then a registration ([`pending`](Self::pending)).
    pub fn sidecar_return(&self) -> Duration {
        Duration::from_millis(250) + self.pending()
    }

    /// Issue 9: a provider reconnecting after a restart of its instance
    /// (SIGTERM or SIGKILL) has "zero gap": no allowance at all.
    pub fn restart_gap(&self) -> Duration {
        Duration::ZERO
    }
}

/// The service every chaos client provides (distinct ports keep the keys apart).
pub const SERVICE: &str = "chaos";

/// The key skyapi must write for `SERVICE` on `port` from 127.0.0.1 with the
/// default category and root: the original skyapi's id, computed here.
pub fn key_of(port: u16) -> String {
    let id = sha1_hex(&format!("{SERVICE}services127.0.0.1{port}"));
    format!("/skydns/local/skydns/{}/{SERVICE}/{id}", "services")
}

/// The value skyapi must write.
pub fn value_of(port: u16, weight: u16, timeout: Duration) -> Value {
    json!({"host": "127.0.0.1", "port": port, "priority": 1, "weight": weight,
           "ttl": timeout.as_secs()})
}

/// The `/provide` path and query of a client.
pub fn provide_query(port: u16, weight: u16) -> String {
    format!("/provide?service={SERVICE}&port={port}&weight={weight}")
}
