//! The etcd worker: one thread that owns all etcd traffic and the desired
//! state of this instance (which keys must exist, with which value).
//!
//! Connection threads talk to it through `WorkerHandle` over a channel. The
//! logic runs against the small `Store` trait, so it is unit tested with an
//! in-memory fake; `etcd::EtcdStore` is the real one.
//!
//! Invariants:
//! - every key this instance writes is attached to its one lease, so if the
//!   process dies etcd removes its entries within the lease TTL (`--timeout`);
//! - etcd load does not grow with connections: in steady state the worker
//!   sends one keepalive and one range read (the reconcile) every TTL/3;
//! - a delete only removes a key still attached to our lease, so a key
//!   another instance has re-put since is left alone;
//! - nothing is refused because etcd is down or refuses us as a whole
//!   (unreachable, an alarm, credentials, permissions): work stays queued
//!   and is retried (every `RETRY`, or backing off while etcd refuses) until
//!   it is stored; only a request etcd calls bad (too large) fails a
//!   registration;
//! - `health` says whether registrations are being stored (`health.rs`);
//! - a stall of the worker itself (the clock jumped between two turns of its
//!   loop) is counted once and makes it check its lease at once;
//! - a key shared by several live connections stays until the last one goes;
//! - if the worker thread dies (a panic), `spawn`'s `on_death` is called:
//!   the server logs it and exits non-zero, so a supervisor restarts it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};

use crate::error::StoreError;
use crate::health::{EtcdState, Health, SharedHealth, Tracker};
use crate::metrics::Metrics;

/// Most operations in one etcd transaction: etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;
/// Conditional deletes per transaction: each is a nested transaction, and
/// etcd counts the nested operations against the same limit as the outer
/// ones (measured with etcd 3.4: 128 nested deletes are refused with "too
/// many operations in txn request").
pub const MAX_DELETES_PER_TXN: usize = MAX_TXN_OPS / 2;
/// How soon failed etcd work is retried. Keeps "written within 2 s of etcd
/// answering again" with room for one timed-out attempt.
pub const RETRY: Duration = Duration::from_millis(500);
/// Longest wait between attempts while etcd refuses our credentials: each
/// attempt is a login, a bcrypt on etcd's side.
pub const MAX_REJECTED_BACKOFF: Duration = Duration::from_secs(30);
/// Longest wait between attempts while etcd refuses writes (an alarm) or
/// permission: a refusal is cheap for etcd, and the queue should be written
/// within seconds of an operator fixing the cause.
pub const MAX_REFUSED_BACKOFF: Duration = Duration::from_secs(2);
/// Commands drained from the channel before writing, so a reconnect storm
/// becomes a few full transactions instead of one per client.
const MAX_BATCH: usize = 4096;
/// Just after start, a restart's clients are coming back, each taking its
/// entry over from the previous instance's lease (where DNS still finds
/// it). For this long after start the worker gathers commands for up to
/// `GATHER_WINDOW` before writing, as long as the next one follows within
/// `GATHER_GAP`, so the takeover is a few full transactions rather than
/// one per client; the delay costs DNS nothing, and a lone registration
/// waits only `GATHER_GAP`.
const STARTUP_GATHER: Duration = Duration::from_secs(5);
const GATHER_WINDOW: Duration = Duration::from_millis(200);
const GATHER_GAP: Duration = Duration::from_millis(25);

/// Identifies one connection, so shared keys can be reference-counted.
pub type ConnId = u64;

/// The answer to a registration: `Ok` once the entry is in etcd.
pub type Ack = Result<(), String>;

/// A key as read back from etcd (without its value: the reconcile only
/// needs to know whether it is there, whose it is, and whether it changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKv {
    pub key: String,
    pub lease: i64,
    pub mod_revision: i64,
}

/// The etcd operations the worker needs; each call is bounded in time.
pub trait Store {
    /// Grants a lease with this TTL and returns its id.
    fn grant(&mut self, ttl_secs: i64) -> Result<i64, StoreError>;
    /// Renews the lease; `LeaseNotFound` when etcd no longer has it.
    fn keep_alive(&mut self, lease: i64) -> Result<(), StoreError>;
    fn revoke(&mut self, lease: i64) -> Result<(), StoreError>;
    /// Puts every pair, attached to `lease`, in one transaction; returns
    /// the transaction's revision (every written key's new `mod_revision`).
    /// With `only_if_absent`, a key that exists is left as it is.
    fn put(
        &mut self,
        kvs: &[(String, String)],
        lease: i64,
        only_if_absent: bool,
    ) -> Result<i64, StoreError>;
    /// Deletes each key that is still attached to `lease`, in one transaction.
    fn delete_owned(&mut self, keys: &[String], lease: i64) -> Result<(), StoreError>;
    /// Puts the pair again only if its key is still attached to `lease`;
    /// the new `mod_revision` if it did. A write etcd checks against its
    /// quota and permissions whether or not the key is still ours (which a
    /// conditional put nested in a transaction, as `put` makes, is not).
    fn rewrite_owned(
        &mut self,
        kv: &(String, String),
        lease: i64,
    ) -> Result<Option<i64>, StoreError>;
    /// Every key under `dir`, with its lease and `mod_revision`.
    fn list(&mut self, dir: &str) -> Result<Vec<StoredKv>, StoreError>;
}

/// Messages connection threads send to the worker.
pub enum Command {
    Register {
        conn: ConnId,
        key: String,
        value: String,
        ack: Sender<Ack>,
    },
    Unregister {
        conn: ConnId,
        key: String,
    },
    /// Stop. With `revoke`, the lease is revoked (every entry of this
    /// instance goes in one request); without, the entries stay on the
    /// lease, which is no longer kept alive, for a restarted or another
    /// instance to take over (see `Stop`).
    Shutdown {
        done: Sender<()>,
        stop: Stop,
    },
}

/// How the worker ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Decommissioning (`--revoke-on-exit`): revoke the lease.
    Revoke,
    /// A restart (the default): leave every live entry in etcd. Clients
    /// that come back re-put their key under the next lease (a put moves a
    /// key to the new lease without it ever being absent); the others
    /// expire with the old lease within `--timeout`. Deletes queued before
    /// the stop began (clients that left on their own) are still written.
    Restart,
}

/// The sending side, cloned into every connection thread.
#[derive(Clone)]
pub struct WorkerHandle {
    tx: Sender<Command>,
    metrics: Arc<Metrics>,
}

impl WorkerHandle {
    /// Queues a registration; the returned receiver yields once the entry is
    /// stored (or the worker stopped).
    pub fn register(&self, conn: ConnId, key: &str, value: &str) -> Receiver<Ack> {
        let (ack, rx) = mpsc::channel();
        // If the worker is gone the ack sender is dropped with the command
        // and the receiver reports that; nothing else to do here.
        self.send(Command::Register {
            conn,
            key: key.to_string(),
            value: value.to_string(),
            ack,
        });
        rx
    }

    pub fn unregister(&self, conn: ConnId, key: &str) {
        // After shutdown the worker is gone: a revoked lease took the entry
        // with it, and a restart leaves it for the next instance.
        self.send(Command::Unregister {
            conn,
            key: key.to_string(),
        });
    }

    /// Sends a command, counting it into the queue-depth gauge; false when
    /// the worker has stopped.
    fn send(&self, cmd: Command) -> bool {
        self.metrics.queued(1);
        let sent = self.tx.send(cmd).is_ok();
        if !sent {
            self.metrics.queued(-1);
        }
        sent
    }

    /// Asks the worker to stop as `stop` says; waits at most `wait`.
    pub fn shutdown(&self, stop: Stop, wait: Duration) -> bool {
        let (done, rx) = mpsc::channel();
        if !self.send(Command::Shutdown { done, stop }) {
            return false;
        }
        rx.recv_timeout(wait).is_ok()
    }
}

/// Called with the reason if the worker thread dies (it panicked).
pub type OnDeath = Box<dyn FnOnce(String) + Send>;

/// Starts the worker on its own thread. A worker that dies leaves the
/// lease unrenewed and every registration unanswered, so `on_death` must
/// not let the process carry on as if healthy.
pub fn spawn<S: Store + Send + 'static>(
    store: S,
    ttl: Duration,
    dir: String,
    metrics: Arc<Metrics>,
    on_death: OnDeath,
) -> std::io::Result<(WorkerHandle, SharedHealth, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let health = Health::shared(Instant::now());
    let shared = health.clone();
    let m = metrics.clone();
    let thread = std::thread::Builder::new()
        .name("etcd-worker".into())
        .spawn(move || {
            let run = std::panic::AssertUnwindSafe(move || {
                Worker::new(store, ttl, dir, shared, m).run(rx)
            });
            if let Err(panic) = std::panic::catch_unwind(run) {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                on_death(format!("the etcd worker died: {what}"));
            }
        })?;
    Ok((WorkerHandle { tx, metrics }, health, thread))
}

#[derive(Default)]
struct Desired {
    /// Live connections holding this key, oldest first; the newest one's
    /// value is the one stored.
    holders: Vec<(ConnId, String)>,
    /// Registrations waiting for the put to succeed.
    waiters: Vec<Sender<Ack>>,
    /// When the oldest of `waiters` arrived.
    waiting_since: Option<Instant>,
    /// etcd's revision of our last put of this key: the reconcile tells a
    /// key changed behind our back by a different `mod_revision`.
    stored_revision: Option<i64>,
}

pub struct Worker<S: Store> {
    store: S,
    ttl: Duration,
    dir: String,
    lease: Option<i64>,
    entries: HashMap<String, Desired>,
    to_put: BTreeSet<String>,
    /// Keys to put back only where nobody has put them since: after a lost
    /// lease, or when the reconcile finds them missing. Another instance
    /// may hold a newer registration of the same process by then.
    to_restore: BTreeSet<String>,
    to_delete: BTreeSet<String>,
    next_keepalive: Instant,
    next_reconcile: Instant,
    /// Earliest time to retry after an etcd failure.
    retry_at: Instant,
    /// Whether a lease was ever granted: a later grant is a re-grant.
    had_lease: bool,
    /// Consecutive refusals by etcd, for the backoff.
    rejected_streak: u32,
    health: Tracker,
    metrics: Arc<Metrics>,
}

impl<S: Store> Worker<S> {
    pub fn new(
        store: S,
        ttl: Duration,
        dir: String,
        health: SharedHealth,
        metrics: Arc<Metrics>,
    ) -> Self {
        let now = Instant::now();
        Worker {
            store,
            ttl,
            dir,
            lease: None,
            entries: HashMap::new(),
            to_put: BTreeSet::new(),
            to_restore: BTreeSet::new(),
            to_delete: BTreeSet::new(),
            next_keepalive: now,
            next_reconcile: now + ttl / 3,
            retry_at: now,
            had_lease: false,
            rejected_streak: 0,
            health: Tracker::new(health, metrics.clone()),
            metrics,
        }
    }

    fn run(mut self, rx: Receiver<Command>) {
        let gather_until = Instant::now() + STARTUP_GATHER;
        self.tick(Instant::now());
        loop {
            // Measured from when the wait could end at the earliest, so a
            // slow tick (etcd taking its time) is not taken for a stall.
            let planned = self.next_deadline().max(Instant::now());
            let planned = planned.min(Instant::now() + crate::supervisor::BEAT_EVERY); // systemd watchdog heartbeat
            let got = rx.recv_timeout(planned.saturating_duration_since(Instant::now()));
            let woke = Instant::now();
            if woke.saturating_duration_since(planned) > self.ttl / 3 {
                self.metrics.stalls.record(planned, woke, "the etcd worker");
                // The lease may have expired meanwhile: find out now.
                self.next_keepalive = woke;
            }
            match got {
                Ok(cmd) => {
                    if !self.handle(cmd) {
                        return;
                    }
                    let now = Instant::now();
                    let (until, gap) = if now < gather_until {
                        (now + GATHER_WINDOW, GATHER_GAP)
                    } else {
                        (now, Duration::ZERO)
                    };
                    for _ in 0..MAX_BATCH {
                        let next = until.saturating_duration_since(Instant::now()).min(gap);
                        match rx.recv_timeout(next) {
                            Ok(cmd) => {
                                if !self.handle(cmd) {
                                    return;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // Every handle is gone without a word: keep the entries
                    // (the safe choice; they expire with the lease).
                    self.shutdown(Stop::Restart);
                    return;
                }
            }
            self.tick(Instant::now());
        }
    }

    /// Applies one command to the desired state; false after shutdown.
    pub fn handle(&mut self, cmd: Command) -> bool {
        self.metrics.queued(-1);
        match cmd {
            Command::Register {
                conn,
                key,
                value,
                ack,
            } => {
                let d = self.entries.entry(key.clone()).or_default();
                d.holders.retain(|(c, _)| *c != conn);
                d.holders.push((conn, value));
                d.waiters.push(ack);
                d.waiting_since.get_or_insert_with(Instant::now);
                self.to_delete.remove(&key);
                self.to_restore.remove(&key);
                self.to_put.insert(key);
            }
            Command::Unregister { conn, key } => {
                if let Some(d) = self.entries.get_mut(&key) {
                    let newest = d.holders.last().map(|(c, _)| *c);
                    d.holders.retain(|(c, _)| *c != conn);
                    if d.holders.is_empty() {
                        self.entries.remove(&key);
                        self.to_put.remove(&key);
                        self.to_restore.remove(&key);
                        self.to_delete.insert(key);
                    } else if newest == Some(conn) {
                        // The stored value was the leaver's: store the
                        // remaining holder's.
                        self.to_put.insert(key);
                    }
                }
            }
            Command::Shutdown { done, stop } => {
                self.shutdown(stop);
                // The caller may have stopped waiting.
                let _ = done.send(());
                return false;
            }
        }
        true
    }

    fn next_deadline(&self) -> Instant {
        let mut next = self.next_keepalive.min(self.next_reconcile);
        if self.lease.is_none() || self.pending() > 0 {
            next = next.min(self.retry_at);
        }
        next
    }

    /// Does whatever is due: lease upkeep, reconcile, pending writes.
    pub fn tick(&mut self, now: Instant) {
        if now >= self.retry_at || now >= self.next_keepalive {
            self.ensure_lease(now);
        }
        if now >= self.next_keepalive {
            if let Some(lease) = self.lease {
                match self.store.keep_alive(lease) {
                    Ok(()) => {
                        self.answered(now);
                        self.next_keepalive = now + self.ttl / 3;
                    }
                    Err(e) => {
                        self.next_keepalive = now + RETRY;
                        self.failed(e, now);
                    }
                }
            } else {
                self.next_keepalive = now + RETRY;
            }
        }
        if now >= self.next_reconcile {
            if self.lease.is_some() && self.to_put.is_empty() && self.to_restore.is_empty() {
                self.reconcile(now);
            }
            self.next_reconcile = now + self.ttl / 3;
        }
        self.probe_writes(now);
        self.flush(now);
        self.publish(now);
    }

    /// While etcd refuses writes (or permission) and nothing is queued, the
    /// refusal can only end with a write: put one of our entries again
    /// (only if it is still ours), on the retry schedule.
    fn probe_writes(&mut self, now: Instant) {
        let refusing = matches!(
            self.health.state(),
            EtcdState::RefusingWrites | EtcdState::PermissionDenied
        );
        if !refusing || now < self.retry_at || self.pending() > 0 {
            return;
        }
        let Some(lease) = self.lease else { return };
        let Some(kv) = self
            .entries
            .iter()
            .find_map(|(k, d)| Some((k.clone(), d.holders.last()?.1.clone())))
        else {
            return;
        };
        match self.store.rewrite_owned(&kv, lease) {
            Ok(revision) => {
                if let (Some(rev), Some(d)) = (revision, self.entries.get_mut(&kv.0)) {
                    d.stored_revision = Some(rev);
                }
                self.stored(now);
            }
            Err(e) => self.failed(e, now),
        }
    }

    fn ensure_lease(&mut self, now: Instant) {
        if self.lease.is_some() || now < self.retry_at {
            return;
        }
        match self.store.grant(self.ttl.as_secs() as i64) {
            Ok(id) => {
                info!("etcd lease {id:x} granted, ttl {}s", self.ttl.as_secs());
                if self.had_lease {
                    self.metrics.lease_regranted();
                }
                self.had_lease = true;
                self.lease = Some(id);
                self.next_keepalive = now + self.ttl / 3;
                self.answered(now);
                // Whatever we held under an older lease went with it. Put it
                // back where nobody else has put it since.
                let lost: Vec<String> = self
                    .entries
                    .keys()
                    .filter(|k| !self.to_put.contains(*k))
                    .cloned()
                    .collect();
                self.to_restore.extend(lost);
                self.to_delete.clear();
            }
            Err(e) => self.failed(e, now),
        }
    }

    /// Writes pending deletes, then pending puts, in as few transactions as
    /// etcd allows. A batch etcd rejects is split until the one key at fault
    /// is found; that key is given up (and its connection told), so one bad
    /// request never holds back the others.
    fn flush(&mut self, now: Instant) {
        if now < self.retry_at || self.pending() == 0 {
            return;
        }
        self.ensure_lease(now);
        let Some(lease) = self.lease else {
            return;
        };
        if let Err(e) = self.flush_deletes(lease) {
            return self.failed(e, now);
        }
        let puts = !self.to_put.is_empty() || !self.to_restore.is_empty();
        if let Err(e) = self.flush_puts(lease, false) {
            return self.failed(e, now);
        }
        if let Err(e) = self.flush_puts(lease, true) {
            return self.failed(e, now);
        }
        // etcd takes deletes even at its space quota: only a put proves
        // that registrations are being stored.
        if puts {
            self.stored(now);
        } else {
            self.answered(now);
        }
    }

    /// Writes `to_delete` in batches; a batch etcd rejects is split until
    /// the key at fault is found, and that key is given up.
    fn flush_deletes(&mut self, lease: i64) -> Result<(), StoreError> {
        let mut batch = MAX_DELETES_PER_TXN;
        while !self.to_delete.is_empty() {
            let chunk: Vec<String> = self.to_delete.iter().take(batch).cloned().collect();
            match self.store.delete_owned(&chunk, lease) {
                Ok(()) => {
                    for k in &chunk {
                        debug!("deleted {k}");
                        self.to_delete.remove(k);
                    }
                }
                Err(StoreError::BadRequest(_)) if chunk.len() > 1 => batch = chunk.len() / 2,
                Err(StoreError::BadRequest(why)) => {
                    // The lease expiry removes it if the process goes.
                    error!("etcd refuses to delete {}: {why}", chunk[0]);
                    self.to_delete.remove(&chunk[0]);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes `to_put` (or, with `restore`, `to_restore` where the keys are
    /// absent) in batches, acknowledging each registration once written.
    fn flush_puts(&mut self, lease: i64, restore: bool) -> Result<(), StoreError> {
        // A conditional put is a nested transaction: two operations.
        let mut batch = if restore {
            MAX_TXN_OPS / 2
        } else {
            MAX_TXN_OPS
        };
        loop {
            let set = if restore {
                &self.to_restore
            } else {
                &self.to_put
            };
            let keys: Vec<String> = set.iter().take(batch).cloned().collect();
            if keys.is_empty() {
                return Ok(());
            }
            let chunk: Vec<(String, String)> = keys
                .iter()
                .filter_map(|k| Some((k.clone(), self.entries.get(k)?.holders.last()?.1.clone())))
                .collect();
            let revision = if chunk.is_empty() {
                None
            } else {
                match self.store.put(&chunk, lease, restore) {
                    Ok(rev) => Some(rev),
                    Err(StoreError::BadRequest(_)) if keys.len() > 1 => {
                        batch = keys.len() / 2;
                        continue;
                    }
                    Err(StoreError::BadRequest(why)) => {
                        error!("etcd refuses to store {}: {why}", keys[0]);
                        self.to_put.remove(&keys[0]);
                        self.to_restore.remove(&keys[0]);
                        if let Some(d) = self.entries.remove(&keys[0]) {
                            for w in d.waiters {
                                // The connection may have gone meanwhile.
                                let _ = w.send(Err(format!("etcd refused the entry: {why}")));
                            }
                        }
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            };
            for k in &keys {
                self.to_put.remove(k);
                self.to_restore.remove(k);
                if let Some(d) = self.entries.get_mut(k) {
                    debug!("stored {k}");
                    // After a conditional put the key may be another
                    // instance's; the reconcile then sees its lease, not ours.
                    d.stored_revision = revision;
                    d.waiting_since = None;
                    for w in d.waiters.drain(..) {
                        // The connection may have gone meanwhile.
                        let _ = w.send(Ok(()));
                    }
                }
            }
        }
    }

    /// Compares etcd with the desired state in one keys-only range read:
    /// restores keys removed or changed behind our back and deletes our own
    /// leftovers. A key attached to another lease is another instance's
    /// newer registration of the same process, and is left alone.
    fn reconcile(&mut self, now: Instant) {
        let Some(lease) = self.lease else { return };
        let stored = match self.store.list(&self.dir) {
            Ok(kvs) => kvs,
            Err(e) => return self.failed(e, now),
        };
        self.answered(now);
        let stored: BTreeMap<&str, &StoredKv> =
            stored.iter().map(|kv| (kv.key.as_str(), kv)).collect();
        for (key, d) in &self.entries {
            if self.to_put.contains(key) || self.to_restore.contains(key) {
                continue;
            }
            match stored.get(key.as_str()) {
                None => {
                    warn!("{key} is missing from etcd: restoring it");
                    self.to_restore.insert(key.clone());
                }
                Some(kv) if kv.lease == lease && d.stored_revision != Some(kv.mod_revision) => {
                    warn!("{key} was changed in etcd: restoring it");
                    self.to_put.insert(key.clone());
                }
                Some(_) => {}
            }
        }
        for kv in stored.values() {
            if kv.lease == lease && !self.entries.contains_key(&kv.key) {
                warn!("{} is ours but has no connection: deleting it", kv.key);
                self.to_delete.insert(kv.key.clone());
            }
        }
    }

    /// Sets the retry schedule for a failed etcd call, by what failed.
    fn failed(&mut self, e: StoreError, now: Instant) {
        let backoff = |streak: &mut u32, cap: Duration| {
            *streak = streak.saturating_add(1);
            (RETRY * 2u32.saturating_pow((*streak).min(6))).min(cap)
        };
        match e {
            StoreError::LeaseNotFound => {
                if let Some(old) = self.lease.take() {
                    warn!(
                        "etcd lease {old:x} is gone: granting a new one and re-putting {} entries",
                        self.entries.len()
                    );
                }
                // Retry at once: the grant will put everything again.
                self.retry_at = now;
                self.next_keepalive = now;
            }
            // A bad request outside a write (a grant, a read): nothing to
            // split or give up; wait, loudly.
            StoreError::BadRequest(ref why) => {
                error!("etcd refused a request skyapi needs: {why}");
                self.retry_at = now + backoff(&mut self.rejected_streak, MAX_REJECTED_BACKOFF);
            }
            StoreError::Unreachable(_) => {
                // Retry soon, so work is written promptly when etcd is back.
                self.retry_at = now + RETRY;
                self.health.failed(&e, self.pending(), now);
            }
            StoreError::RefusingWrites(_) | StoreError::PermissionDenied(_) => {
                self.retry_at = now + backoff(&mut self.rejected_streak, MAX_REFUSED_BACKOFF);
                self.health.failed(&e, self.pending(), now);
            }
            StoreError::Auth(_) => {
                // The store has logged in afresh and retried once already;
                // asking again at once changes nothing and costs a bcrypt.
                self.retry_at = now + backoff(&mut self.rejected_streak, MAX_REJECTED_BACKOFF);
                self.health.failed(&e, self.pending(), now);
            }
        }
    }

    /// A write succeeded.
    fn stored(&mut self, now: Instant) {
        self.rejected_streak = 0;
        self.health.stored(now);
    }

    /// A keepalive, grant or read succeeded.
    fn answered(&mut self, now: Instant) {
        self.health
            .answered(self.pending(), self.entries.len(), now);
        if self.health.state() == EtcdState::Ok {
            self.rejected_streak = 0;
        }
    }

    fn pending(&self) -> usize {
        self.to_put.len() + self.to_restore.len() + self.to_delete.len()
    }

    /// Publishes the queue and the worker's heartbeat.
    fn publish(&mut self, now: Instant) {
        let pending = self.pending();
        let oldest = self
            .to_put
            .iter()
            .filter_map(|k| self.entries.get(k)?.waiting_since)
            .min();
        self.health.publish(self.lease, pending, oldest, now);
    }

    fn shutdown(&mut self, stop: Stop) {
        match (stop, self.lease.take()) {
            (Stop::Revoke, Some(lease)) => match self.store.revoke(lease) {
                Ok(()) => info!("etcd lease {lease:x} revoked: this instance's entries are gone"),
                Err(e) => warn!(
                    "could not revoke lease {lease:x} ({e}): entries expire within the lease TTL"
                ),
            },
            (Stop::Restart, Some(lease)) => {
                // Only deletes: a put now would only be moved again by the
                // next instance, and each request here delays the exit.
                let unreachable = self.health.state() == EtcdState::Unreachable;
                let deleted = if self.to_delete.is_empty() || unreachable {
                    Ok(())
                } else {
                    self.flush_deletes(lease)
                };
                if let Err(e) = deleted {
                    warn!("could not write {} deletes before stopping ({e}): they expire with the lease", self.to_delete.len());
                }
                info!(
                    "leaving {} entries on etcd lease {lease:x} for the next instance: \
                     they expire within {}s unless their clients come back",
                    self.entries.len(),
                    self.ttl.as_secs()
                );
            }
            (_, None) => {}
        }
        for d in self.entries.values_mut() {
            for w in d.waiters.drain(..) {
                let _ = w.send(Err("skyapi is shutting down".into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// An in-memory etcd: keys with leases and revisions, etcd's limit on
    /// operations per transaction, a switch to make it unreachable, and keys
    /// it refuses to store.
    #[derive(Default)]
    struct FakeEtcd {
        /// key -> (value, lease, mod_revision)
        kv: BTreeMap<String, (String, i64, i64)>,
        revision: i64,
        leases: BTreeSet<i64>,
        next_lease: i64,
        down: bool,
        refused: BTreeSet<String>,
        /// Every put and grant fails with this (an alarm, a role change).
        refuse_writes: Option<StoreError>,
        calls: Vec<&'static str>,
    }

    #[derive(Clone, Default)]
    struct Fake(Rc<RefCell<FakeEtcd>>);

    impl Fake {
        fn check(&self, op: &'static str, ops: usize) -> Result<(), StoreError> {
            let mut e = self.0.borrow_mut();
            e.calls.push(op);
            if e.down {
                return Err(StoreError::Unreachable("down".into()));
            }
            if ops > MAX_TXN_OPS {
                return Err(StoreError::BadRequest(
                    "etcdserver: too many operations in txn request".into(),
                ));
            }
            Ok(())
        }
        fn get(&self, k: &str) -> Option<(String, i64)> {
            self.0.borrow().kv.get(k).map(|(v, l, _)| (v.clone(), *l))
        }
        /// Someone else writes a key (another instance, an operator).
        fn put_foreign(&self, k: &str, v: &str, lease: i64) {
            let mut e = self.0.borrow_mut();
            e.revision += 1;
            let rev = e.revision;
            e.kv.insert(k.into(), (v.into(), lease, rev));
        }
        fn revoke_all(&self) {
            let mut e = self.0.borrow_mut();
            e.leases.clear();
            e.kv.retain(|_, (_, l, _)| *l == 0);
        }
        fn count(&self, op: &str) -> usize {
            self.0.borrow().calls.iter().filter(|c| **c == op).count()
        }
    }

    impl Store for Fake {
        fn grant(&mut self, _ttl: i64) -> Result<i64, StoreError> {
            self.check("grant", 1)?;
            let mut e = self.0.borrow_mut();
            if let Some(err) = &e.refuse_writes {
                return Err(err.clone());
            }
            e.next_lease += 1;
            let id = e.next_lease;
            e.leases.insert(id);
            Ok(id)
        }
        fn keep_alive(&mut self, lease: i64) -> Result<(), StoreError> {
            self.check("keepalive", 1)?;
            if self.0.borrow().leases.contains(&lease) {
                Ok(())
            } else {
                Err(StoreError::LeaseNotFound)
            }
        }
        fn revoke(&mut self, lease: i64) -> Result<(), StoreError> {
            self.check("revoke", 1)?;
            let mut e = self.0.borrow_mut();
            e.leases.remove(&lease);
            e.kv.retain(|_, (_, l, _)| *l != lease);
            Ok(())
        }
        fn put(
            &mut self,
            kvs: &[(String, String)],
            lease: i64,
            only_if_absent: bool,
        ) -> Result<i64, StoreError> {
            let ops = if only_if_absent {
                kvs.len() * 2
            } else {
                kvs.len()
            };
            self.check("put", ops)?;
            let mut e = self.0.borrow_mut();
            if !e.leases.contains(&lease) {
                return Err(StoreError::LeaseNotFound);
            }
            if let Some((k, _)) = kvs.iter().find(|(k, _)| e.refused.contains(k)) {
                return Err(StoreError::BadRequest(format!("request is too large: {k}")));
            }
            if let Some(e) = &e.refuse_writes {
                return Err(e.clone());
            }
            e.revision += 1;
            let rev = e.revision;
            for (k, v) in kvs {
                if !(only_if_absent && e.kv.contains_key(k)) {
                    e.kv.insert(k.clone(), (v.clone(), lease, rev));
                }
            }
            Ok(rev)
        }
        fn rewrite_owned(
            &mut self,
            (k, v): &(String, String),
            lease: i64,
        ) -> Result<Option<i64>, StoreError> {
            self.check("put", 1)?;
            let mut e = self.0.borrow_mut();
            if let Some(err) = &e.refuse_writes {
                return Err(err.clone());
            }
            if e.kv.get(k).is_none_or(|(_, l, _)| *l != lease) {
                return Ok(None);
            }
            e.revision += 1;
            let rev = e.revision;
            e.kv.insert(k.clone(), (v.clone(), lease, rev));
            Ok(Some(rev))
        }
        fn delete_owned(&mut self, keys: &[String], lease: i64) -> Result<(), StoreError> {
            // An outer operation and a nested one per key, as etcd counts.
            self.check("delete", keys.len() * 2)?;
            let mut e = self.0.borrow_mut();
            e.revision += 1;
            for k in keys {
                if e.kv.get(k).is_some_and(|(_, l, _)| *l == lease) {
                    e.kv.remove(k);
                }
            }
            Ok(())
        }
        fn list(&mut self, dir: &str) -> Result<Vec<StoredKv>, StoreError> {
            self.check("list", 1)?;
            Ok(self
                .0
                .borrow()
                .kv
                .iter()
                .filter(|(k, _)| k.starts_with(dir))
                .map(|(k, (_, l, r))| StoredKv {
                    key: k.clone(),
                    lease: *l,
                    mod_revision: *r,
                })
                .collect())
        }
    }

    fn worker(fake: &Fake) -> Worker<Fake> {
        let health = Health::shared(Instant::now());
        Worker::new(
            fake.clone(),
            Duration::from_secs(30),
            "/d/".into(),
            health,
            Arc::default(),
        )
    }

    fn register(w: &mut Worker<Fake>, conn: ConnId, key: &str, value: &str) -> Receiver<Ack> {
        let (ack, rx) = mpsc::channel();
        w.handle(Command::Register {
            conn,
            key: key.into(),
            value: value.into(),
            ack,
        });
        rx
    }

    fn unregister(w: &mut Worker<Fake>, conn: ConnId, key: &str) {
        w.handle(Command::Unregister {
            conn,
            key: key.into(),
        });
    }

    #[test]
    fn register_puts_with_lease_and_acks() {
        let fake = Fake::default();
        let mut w = worker(&fake);
        let ack = register(&mut w, 1, "/d/a", "v");
        w.tick(Instant::now());
        assert_eq!(ack.try_recv(), Ok(Ok(())));
        let (v, lease) = fake.get("/d/a").unwrap();
        assert_eq!(v, "v");
        assert_eq!(Some(lease), w.lease);
        unregister(&mut w, 1, "/d/a");
        w.tick(Instant::now());
        assert_eq!(fake.get("/d/a"), None);
    }

    #[test]
    fn shared_key_goes_with_the_last_holder() {
        let fake = Fake::default();
        let mut w = worker(&fake);
        register(&mut w, 1, "/d/a", "one");
        register(&mut w, 2, "/d/a", "two");
        w.tick(Instant::now());
        assert_eq!(fake.get("/d/a").unwrap().0, "two");
        unregister(&mut w, 2, "/d/a");
        w.tick(Instant::now());
        assert_eq!(
            fake.get("/d/a").unwrap().0,
            "one",
            "remaining holder's value"
        );
        unregister(&mut w, 1, "/d/a");
        w.tick(Instant::now());
        assert_eq!(fake.get("/d/a"), None);
    }

    #[test]
    fn work_is_queued_while_etcd_is_down() {
        let fake = Fake::default();
        let mut w = worker(&fake);
        fake.0.borrow_mut().down = true;
        let ack = register(&mut w, 1, "/d/a", "v");
        let t0 = Instant::now();
        w.tick(t0);
        assert!(ack.try_recv().is_err(), "no answer while etcd is down");
        assert_eq!(w.health.state(), EtcdState::Unreachable);
        fake.0.borrow_mut().down = false;
        w.tick(t0 + RETRY);
        assert_eq!(ack.try_recv(), Ok(Ok(())));
        assert!(fake.get("/d/a").is_some());
        assert_eq!(w.health.state(), EtcdState::Ok);
    }

    #[test]
    fn lost_lease_is_regranted_and_entries_re_put() {
        let fake = Fake::default();
        let mut w = worker(&fake);
        register(&mut w, 1, "/d/a", "v");
        register(&mut w, 2, "/d/b", "w");
        let t0 = Instant::now();
        w.tick(t0);
        let old = w.lease.unwrap();
        fake.revoke_all();
        assert_eq!(fake.get("/d/a"), None);
        w.tick(t0 + Duration::from_secs(10)); // keepalive due
        w.tick(t0 + Duration::from_secs(10)); // regrant, re-put
        let (_, lease) = fake.get("/d/a").expect("re-put");
        assert_ne!(lease, old);
        assert!(fake.get("/d/b").is_some());
    }

    #[test]
    fn reconcile_restores_deleted_keys_and_leaves_others_alone() {
        let fake = Fake::default();
        let mut w = worker(&fake);
        register(&mut w, 1, "/d/a", "v");
        register(&mut w, 2, "/d/b", "w");
        let t0 = Instant::now();
        w.tick(t0);
        fake.0.borrow_mut().kv.remove("/d/a");
        // Another instance re-put /d/b under its own lease.
        fake.put_foreign("/d/b", "x", 99);
        fake.0.borrow_mut().calls.clear();
        w.tick(t0 + Duration::from_secs(10));
        w.tick(t0 + Duration::from_secs(10));
        assert_eq!(fake.get("/d/a").unwrap().0, "v");
        assert_eq!(fake.get("/d/b").unwrap(), ("x".into(), 99));
        assert_eq!(fake.count("list"), 1, "one range read per period");
        // Our delete must not remove the other instance's key.
        unregister(&mut w, 2, "/d/b");
        w.tick(t0 + Duration::from_secs(10));
        assert_eq!(fake.get("/d/b").unwrap(), ("x".into(), 99));
    }

    #[test]
    fn storms_are_batched_into_full_transactions() {
        let fake = Fake::default();
        let mut w = worker(&fake);
        for i in 0..1000 {
            register(&mut w, i, &format!("/d/{i}"), "v");
        }
        fake.0.borrow_mut().calls.clear();
        w.tick(Instant::now());
        assert_eq!(fake.count("put"), 1000usize.div_ceil(MAX_TXN_OPS));
        assert_eq!(fake.0.borrow().kv.len(), 1000);
        // And leaving at once: within etcd's limit, no batch refused.
        for i in 0..1000 {
            unregister(&mut w, i, &format!("/d/{i}"));
        }
        fake.0.borrow_mut().calls.clear();
        w.tick(Instant::now());
        assert!(fake.0.borrow().kv.is_empty());
        assert_eq!(
            fake.count("delete"),
            1000usize.div_ceil(MAX_DELETES_PER_TXN)
        );
    }

    #[test]
    fn steady_state_load_is_independent_of_connections() {
        let count_calls = |n: u64| {
            let fake = Fake::default();
            let mut w = worker(&fake);
            for i in 0..n {
                register(&mut w, i, &format!("/d/{i}"), "v");
            }
            let t0 = Instant::now();
            w.tick(t0);
            fake.0.borrow_mut().calls.clear();
            for s in 1..=60 {
                w.tick(t0 + Duration::from_secs(s));
            }
            let calls = fake.0.borrow().calls.len();
            calls
        };
        assert_eq!(count_calls(10), count_calls(2000));
    }

    #[test]
    fn shutdown_with_revoke_revokes_the_lease() {
        let fake = Fake::default();
        let mut w = worker(&fake);
        register(&mut w, 1, "/d/a", "v");
        w.tick(Instant::now());
        let (done, rx) = mpsc::channel();
        assert!(!w.handle(Command::Shutdown {
            done,
            stop: Stop::Revoke
        }));
        assert!(rx.try_recv().is_ok());
        assert!(fake.0.borrow().kv.is_empty());
        assert_eq!(fake.count("revoke"), 1);
    }

    #[test]
    fn restart_keeps_live_entries_and_writes_earlier_deletes_only() {
        let fake = Fake::default();
        let mut w = worker(&fake);
        register(&mut w, 1, "/d/a", "v");
        register(&mut w, 2, "/d/b", "v");
        w.tick(Instant::now());
        let lease = w.lease.unwrap();
        // b's client left on its own before the stop; a new registration
        // arrives but is not written before the stop.
        unregister(&mut w, 2, "/d/b");
        let (ack, pending) = mpsc::channel();
        w.handle(Command::Register {
            conn: 3,
            key: "/d/c".into(),
            value: "v".into(),
            ack,
        });
        fake.0.borrow_mut().calls.clear();
        let (done, rx) = mpsc::channel();
        assert!(!w.handle(Command::Shutdown {
            done,
            stop: Stop::Restart
        }));
        assert!(rx.try_recv().is_ok());
        assert_eq!(fake.get("/d/a").unwrap(), ("v".into(), lease));
        assert!(
            fake.get("/d/b").is_none(),
            "a delete queued before the stop is written"
        );
        assert!(fake.get("/d/c").is_none());
        assert_eq!(fake.count("revoke"), 0);
        assert_eq!(fake.count("put"), 0);
        assert!(fake.0.borrow().leases.contains(&lease));
        assert!(
            pending.try_recv().unwrap().is_err(),
            "the waiting registration is told"
        );
    }

    #[test]
    fn reconcile_restores_a_value_changed_under_our_lease() {
        let fake = Fake::default();
        let mut w = worker(&fake);
        register(&mut w, 1, "/d/a", "v");
        let t0 = Instant::now();
        w.tick(t0);
        let lease = w.lease.unwrap();
        fake.put_foreign("/d/a", "forged", lease);
        w.tick(t0 + Duration::from_secs(10));
        assert_eq!(fake.get("/d/a").unwrap(), ("v".into(), lease));
        // Once restored, the next period sees nothing to do.
        fake.0.borrow_mut().calls.clear();
        w.tick(t0 + Duration::from_secs(20));
        assert_eq!(fake.count("put"), 0);
    }

    #[test]
    fn a_refused_entry_is_given_up_without_holding_back_the_rest() {
        let fake = Fake::default();
        let mut w = worker(&fake);
        fake.0.borrow_mut().refused.insert("/d/bad".into());
        let bad = register(&mut w, 1, "/d/bad", "v");
        let goods: Vec<_> = (2..40)
            .map(|i| register(&mut w, i, &format!("/d/{i}"), "v"))
            .collect();
        w.tick(Instant::now());
        assert!(matches!(bad.try_recv(), Ok(Err(_))), "told it was refused");
        for g in goods {
            assert_eq!(g.try_recv(), Ok(Ok(())));
        }
        assert_eq!(fake.0.borrow().kv.len(), 38);
        // Nothing is retried for it afterwards.
        fake.0.borrow_mut().calls.clear();
        w.tick(Instant::now() + Duration::from_secs(1));
        assert_eq!(fake.count("put"), 0);
    }

    #[test]
    fn a_regranted_lease_does_not_take_a_key_another_instance_holds() {
        let fake = Fake::default();
        let mut w = worker(&fake);
        register(&mut w, 1, "/d/a", "old");
        register(&mut w, 2, "/d/b", "mine");
        let t0 = Instant::now();
        w.tick(t0);
        // Our lease expires (a long partition); meanwhile the client of
        // /d/a registered again through instance B.
        fake.revoke_all();
        fake.put_foreign("/d/a", "new", 99);
        w.tick(t0 + Duration::from_secs(10));
        w.tick(t0 + Duration::from_secs(10));
        let lease = w.lease.unwrap();
        assert_eq!(
            fake.get("/d/a").unwrap(),
            ("new".into(), 99),
            "B's put wins"
        );
        assert_eq!(fake.get("/d/b").unwrap(), ("mine".into(), lease));
        // And our old connection ending leaves B's key alone.
        unregister(&mut w, 1, "/d/a");
        w.tick(t0 + Duration::from_secs(11));
        assert_eq!(fake.get("/d/a").unwrap(), ("new".into(), 99));
    }

    /// etcd at its space quota: every put refused, keepalives answered.
    fn nospace() -> StoreError {
        StoreError::RefusingWrites("database space exceeded (NOSPACE alarm)".into())
    }

    #[test]
    fn refused_writes_keep_registrations_queued_and_health_steady() {
        for refusal in [
            nospace(),
            StoreError::PermissionDenied("etcdserver: permission denied".into()),
            StoreError::Auth("etcdserver: revision of auth store is old".into()),
        ] {
            let fake = Fake::default();
            let mut w = worker(&fake);
            let first = register(&mut w, 1, "/d/a", "v");
            let t0 = Instant::now();
            w.tick(t0);
            assert_eq!(first.try_recv(), Ok(Ok(())));
            fake.0.borrow_mut().refuse_writes = Some(refusal.clone());
            let ack = register(&mut w, 2, "/d/b", "w");
            let want = EtcdState::of(&refusal).unwrap();
            for ms in (0..60_000).step_by(100) {
                w.tick(t0 + Duration::from_millis(ms));
                assert_eq!(w.health.state(), want, "{refusal} at {ms} ms");
                assert!(ack.try_recv().is_err(), "{refusal}: the registration waits");
            }
            assert!(fake.count("keepalive") >= 5, "keepalives went on meanwhile");
            assert!(
                fake.count("put") as u64 <= 60 / MAX_REFUSED_BACKOFF.as_secs() + 8,
                "{refusal}: backed off, {} puts",
                fake.count("put")
            );
            assert!(w.health.health().oldest_waiting.is_some());
            fake.0.borrow_mut().refuse_writes = None;
            let back = t0 + Duration::from_secs(60);
            let bound = if want == EtcdState::Auth {
                MAX_REJECTED_BACKOFF
            } else {
                MAX_REFUSED_BACKOFF
            };
            w.tick(back + bound);
            assert_eq!(ack.try_recv(), Ok(Ok(())), "{refusal}: stored once it may");
            assert_eq!(w.health.state(), EtcdState::Ok);
            assert_eq!(w.health.health().oldest_waiting, None);
        }
    }

    #[test]
    fn only_a_write_ends_refused_writes_even_with_nothing_queued() {
        let fake = Fake::default();
        let mut w = worker(&fake);
        register(&mut w, 1, "/d/a", "v");
        let t0 = Instant::now();
        w.tick(t0);
        fake.0.borrow_mut().refuse_writes = Some(nospace());
        // A registration that leaves again before it is stored.
        let _gone = register(&mut w, 2, "/d/b", "w");
        w.tick(t0 + Duration::from_secs(1));
        unregister(&mut w, 2, "/d/b");
        for s in 2..30 {
            w.tick(t0 + Duration::from_secs(s));
            assert_eq!(w.health.state(), EtcdState::RefusingWrites, "at {s} s");
        }
        fake.0.borrow_mut().refuse_writes = None;
        w.tick(t0 + Duration::from_secs(30) + MAX_REFUSED_BACKOFF);
        assert_eq!(w.health.state(), EtcdState::Ok, "a probing write succeeded");
        assert_eq!(
            fake.get("/d/a").unwrap().0,
            "v",
            "the probe changed nothing"
        );
    }

    #[test]
    fn a_dead_worker_is_reported() {
        struct Panics;
        impl Store for Panics {
            fn grant(&mut self, _: i64) -> Result<i64, StoreError> {
                panic!("boom in grant")
            }
            fn keep_alive(&mut self, _: i64) -> Result<(), StoreError> {
                unreachable!()
            }
            fn revoke(&mut self, _: i64) -> Result<(), StoreError> {
                unreachable!()
            }
            fn put(&mut self, _: &[(String, String)], _: i64, _: bool) -> Result<i64, StoreError> {
                unreachable!()
            }
            fn delete_owned(&mut self, _: &[String], _: i64) -> Result<(), StoreError> {
                unreachable!()
            }
            fn rewrite_owned(
                &mut self,
                _: &(String, String),
                _: i64,
            ) -> Result<Option<i64>, StoreError> {
                unreachable!()
            }
            fn list(&mut self, _: &str) -> Result<Vec<StoredKv>, StoreError> {
                unreachable!()
            }
        }
        let (tx, rx) = mpsc::channel();
        let (_handle, _health, thread) = spawn(
            Panics,
            Duration::from_secs(30),
            "/d/".into(),
            Arc::default(),
            Box::new(move |why| tx.send(why).unwrap()),
        )
        .unwrap();
        let why = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("on_death called");
        assert_eq!(why, "the etcd worker died: boom in grant");
        thread.join().unwrap();
    }
}
