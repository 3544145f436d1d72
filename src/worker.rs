//! The etcd worker: one thread that owns all etcd traffic and the desired
//! state of this instance (which keys must exist, with which value).
//!
//! Connection threads talk to it through `WorkerHandle` over a channel; the
//! watcher (`watch.rs`) feeds it etcd's change events over the same
//! channel, so the worker reacts at once and owns all state. The logic runs
//! against the small `Store` trait, so it is unit tested with an in-memory
//! fake; `etcd::EtcdStore` is the real one.
//!
//! State: one `Key` per key, holding its holders (by connection id, each
//! with its acknowledgement if still owed) and one `Todo` (nothing, put,
//! restore, delete). `Table` is the only code that changes a `Todo`, and
//! keeps the index of pending keys with it. Timers are explicit deadlines
//! that move only when their work ran (`keepalive_due`, `check_due`,
//! `retry_at`).
//!
//! Invariants:
//! - every key this instance writes is attached to its one lease, so if the
//!   process dies etcd removes its entries within the lease TTL (`--timeout`);
//! - etcd load depends on what changes, not on how much exists: in steady
//!   state the worker sends one keepalive every TTL/3 and reads nothing;
//!   changes come from the watch, and the whole directory is read only when
//!   the watch lost its continuity (start, compaction);
//! - a key holds exactly one `Todo`; a key without holders is `Delete`, and
//!   leaves the table only once etcd answered the delete;
//! - a delete only removes a key still attached to our lease (or one we saw
//!   overwritten without a lease), so another instance's newer put is left
//!   alone; a restore only writes where the key is absent or lease-less;
//! - a refused put (etcd calls the request bad) fails only the registration
//!   whose value was refused; the key's other holders keep it;
//! - nothing is refused because etcd is down or refuses us as a whole
//!   (unreachable, an alarm, credentials, permissions): work stays queued
//!   and is retried (every `RETRY`, or backing off while etcd refuses) until
//!   it is stored; only a request etcd calls bad (too large) fails a
//!   registration;
//! - `health` says whether registrations are being stored (`health.rs`);
//! - a stall of the worker itself (the clock jumped between two turns of its
//!   loop) is counted once and makes it check its lease at once;
//! - if the worker thread dies (a panic), `spawn`'s `on_death` is called:
//!   the server logs it and exits non-zero, so a supervisor restarts it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};

use crate::ack::{self, AckReceiver, AckSender};
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

/// A key as read back from etcd (without its value: the check only needs
/// to know whether it is there, whose it is, and whether it changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKv {
    pub key: String,
    /// 0: attached to no lease (a plain `etcdctl put`).
    pub lease: i64,
    pub mod_revision: i64,
}

/// One change etcd reported under the directory, as the watch saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    /// The key's lease after a put; 0 for a delete or a lease-less put.
    pub lease: i64,
    /// The revision of the change (of the delete, for a delete).
    pub mod_revision: i64,
    pub deleted: bool,
}

/// The etcd operations the worker needs; each call is bounded in time.
pub trait Store {
    /// Grants a lease with this TTL and returns its id.
    fn grant(&mut self, ttl_secs: i64) -> Result<i64, StoreError>;
    /// Renews the lease; `LeaseNotFound` when etcd no longer has it.
    fn keep_alive(&mut self, lease: i64) -> Result<(), StoreError>;
    fn revoke(&mut self, lease: i64) -> Result<(), StoreError>;
    /// Puts every pair, attached to `lease`, in one transaction, each only
    /// if its `Guard` holds; returns the transaction's revision (every
    /// written key's new `mod_revision`) and, per pair, whether it was
    /// written.
    fn put(
        &mut self,
        kvs: &[(String, String, Guard)],
        lease: i64,
    ) -> Result<(i64, Vec<bool>), StoreError>;
    /// Deletes each key that is still attached to its lease (0: to no
    /// lease), in one transaction; per key, whether etcd deleted it.
    fn delete_if(&mut self, keys: &[(String, i64)]) -> Result<Vec<bool>, StoreError>;
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

/// When a put may write its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Whatever is there: a registration is newer than anything stored.
    Always,
    /// Only where the key is absent or attached to no lease: a key on
    /// another lease is another instance's and is left as it is.
    Free,
    /// Only where the key is still attached to our lease: another
    /// instance's put since wins.
    Ours,
}

/// Messages connection threads (and the watcher) send to the worker.
pub enum Command {
    Register {
        conn: ConnId,
        key: String,
        value: String,
        ack: AckSender,
    },
    Unregister {
        conn: ConnId,
        key: String,
    },
    /// Changes under the directory, in etcd's order (`watch.rs`).
    Changed(Vec<Change>),
    /// The watch has no continuity with what the worker knows: it started
    /// (events follow from revision `after` + 1), or the revision to resume
    /// from was compacted (`after` is `None`). Whatever the worker learned
    /// from etcd before is checked against one full read.
    Resync {
        after: Option<i64>,
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
    /// stored (or the worker stopped), and wakes its `wait`.
    pub fn register(&self, conn: ConnId, key: &str, value: &str) -> AckReceiver {
        let (ack, rx) = ack::channel();
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

    /// Hands the watch's events (or its loss of continuity) to the worker;
    /// false when the worker has stopped.
    pub fn watched(&self, cmd: Command) -> bool {
        self.send(cmd)
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

/// What the worker still has to write for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Todo {
    /// etcd holds what we want, as far as we know.
    Synced,
    /// Put the newest holder's value, whatever is there: a registration
    /// (newer than any other instance's), a holder left, or the value was
    /// changed under our lease or overwritten without a lease.
    Put,
    /// Put it back only where it is absent or lease-less (it went missing,
    /// our lease was lost): another instance may hold a newer registration
    /// of the same process by then.
    Restore,
    /// Write the newest holder's value (the one stored was a holder's that
    /// left, or was refused) only where the key is still on our lease.
    Update,
    /// No holder is left: delete it if it is still ours.
    Delete,
}

struct Holder {
    conn: ConnId,
    value: String,
    /// The acknowledgement, while owed, and since when.
    ack: Option<(AckSender, Instant)>,
}

struct Key {
    /// Live connections holding this key, oldest first; the newest one's
    /// value is the one stored. Empty exactly when `todo` is `Delete`.
    holders: Vec<Holder>,
    todo: Todo,
    /// etcd's revision of our last write of this key, while it is ours: a
    /// change with a newer revision was made behind our back. `None`: never
    /// written, or another instance's now.
    revision: Option<i64>,
    /// We saw it overwritten without a lease: a delete must expect lease 0.
    leaseless: bool,
    /// The holder whose value our last write stored.
    writer: Option<ConnId>,
}

impl Key {
    fn value(&self) -> Option<&str> {
        self.holders.last().map(|h| h.value.as_str())
    }
}

/// The desired state: every key with its one `Todo`, and the index of keys
/// with work to do. Every change of a `Todo` goes through `set`.
#[derive(Default)]
struct Table {
    keys: HashMap<String, Key>,
    pending: BTreeSet<String>,
}

impl Table {
    /// Gives `key` its next `Todo`; a key with no holders and nothing left
    /// to do leaves the table.
    fn set(&mut self, key: &str, todo: Todo) {
        let Some(k) = self.keys.get_mut(key) else {
            return;
        };
        k.todo = todo;
        if todo == Todo::Synced {
            self.pending.remove(key);
            if k.holders.is_empty() {
                self.keys.remove(key);
            }
        } else {
            self.pending.insert(key.to_string());
        }
    }

    fn register(&mut self, conn: ConnId, key: String, value: String, ack: AckSender, now: Instant) {
        let k = self.keys.entry(key.clone()).or_insert(Key {
            holders: Vec::new(),
            todo: Todo::Synced,
            revision: None,
            leaseless: false,
            writer: None,
        });
        let mut owed = Some((ack, now));
        if let Some(i) = k.holders.iter().position(|h| h.conn == conn) {
            let old = k.holders.remove(i);
            // A connection registers once; keep its earliest wait.
            if let (Some((_, since)), Some((tx, _))) = (old.ack, owed.take()) {
                owed = Some((tx, since));
            }
        }
        k.holders.push(Holder {
            conn,
            value,
            ack: owed,
        });
        self.set(&key, Todo::Put);
    }

    fn unregister(&mut self, conn: ConnId, key: &str) {
        let Some(k) = self.keys.get_mut(key) else {
            return;
        };
        let newest = k.holders.last().map(|h| h.conn);
        k.holders.retain(|h| h.conn != conn);
        if newest == Some(conn) || k.todo == Todo::Put {
            self.holder_gone(key);
        }
    }

    /// The newest holder left or was refused: what is left to write. Only a
    /// registration still waiting for its own write justifies overwriting
    /// whatever is there; otherwise the remaining holder's value goes only
    /// over ours (or where the key is free).
    fn holder_gone(&mut self, key: &str) {
        let Some(k) = self.keys.get(key) else {
            return;
        };
        let newest = k.holders.last().map(|h| h.conn);
        let next = if k.holders.is_empty() {
            Todo::Delete
        } else if k.holders.iter().any(|h| h.ack.is_some()) {
            Todo::Put
        } else if k.revision.is_some() && k.writer == newest {
            // etcd holds the remaining newest holder's value already (the
            // one that left or was refused had not been written).
            Todo::Synced
        } else if k.revision.is_some() {
            Todo::Update
        } else {
            Todo::Restore
        };
        self.set(key, next);
    }

    /// etcd refused the newest holder's value: that registration fails;
    /// the others keep the key (their value is put next).
    fn refuse_newest(&mut self, key: &str, why: &str) {
        let Some(k) = self.keys.get_mut(key) else {
            return;
        };
        if let Some(h) = k.holders.pop() {
            error!(
                "etcd refuses to store {key} for connection {}: {why}",
                h.conn
            );
            if let Some((tx, _)) = h.ack {
                tx.send(Err(format!("etcd refused the entry: {why}")));
            }
        }
        self.holder_gone(key);
    }

    /// Our put of `key` was answered: `written` at `revision`, or (a
    /// conditional put) left alone because another instance holds it.
    fn stored(&mut self, key: &str, revision: i64, written: bool) {
        let Some(k) = self.keys.get_mut(key) else {
            return;
        };
        if written {
            debug!("stored {key}");
            k.revision = Some(revision);
            k.leaseless = false;
            k.writer = k.holders.last().map(|h| h.conn);
        } else {
            info!("{key} was not written: another instance holds it, or it changed since our last write");
            k.revision = None;
        }
        for h in &mut k.holders {
            if let Some((tx, _)) = h.ack.take() {
                tx.send(Ok(()));
            }
        }
        self.set(key, Todo::Synced);
    }

    /// Applies what etcd says is there now (a watch event or a full read:
    /// `(lease, mod_revision)`, `None` for absent) to a key; `lease` is ours,
    /// if we have one now.
    fn observed(&mut self, key: &str, seen: Option<(i64, i64)>, lease: Option<i64>) {
        let Some(k) = self.keys.get_mut(key) else {
            if seen.is_some_and(|(l, _)| Some(l) == lease) {
                warn!("{key} is ours but has no connection: deleting it");
                self.keys.insert(
                    key.to_string(),
                    Key {
                        holders: Vec::new(),
                        todo: Todo::Delete,
                        revision: None,
                        leaseless: false,
                        writer: None,
                    },
                );
                self.set(key, Todo::Delete);
            }
            return;
        };
        let was_ours = k.revision.is_some();
        if seen.is_none_or(|(l, rev)| Some(l) != lease || k.revision != Some(rev)) {
            // Whatever we wrote is not there any more.
            k.writer = None;
        }
        if seen.is_none_or(|(l, _)| Some(l) != lease) {
            k.revision = None;
        }
        match k.todo {
            // Our unconditional put sets it straight, whatever is there; if
            // it is refused and no holder is left, the delete must know
            // whether to expect our lease or none.
            Todo::Put | Todo::Delete => {
                k.leaseless = seen.is_some_and(|(l, _)| l == 0);
            }
            Todo::Synced | Todo::Restore | Todo::Update => match seen {
                None => {
                    if k.todo == Todo::Synced {
                        warn!("{key} is missing from etcd: restoring it");
                    }
                    k.revision = None;
                    self.set(key, Todo::Restore);
                }
                Some((0, _)) => {
                    warn!("{key} was overwritten without a lease: restoring it as ours");
                    k.leaseless = true;
                    self.set(key, Todo::Put);
                }
                Some((l, rev)) if Some(l) == lease => {
                    if k.revision != Some(rev) {
                        warn!("{key} was changed in etcd: restoring it");
                        self.set(key, Todo::Put);
                    } else if k.todo == Todo::Restore {
                        self.set(key, Todo::Synced);
                    }
                    // An update goes ahead: the key is as we wrote it.
                }
                Some(_) => {
                    if was_ours {
                        info!("{key} was put by another instance: left to it");
                    }
                    self.set(key, Todo::Synced);
                }
            },
        }
    }

    fn pending_with(&self, todo: Todo, n: usize) -> Vec<String> {
        self.pending
            .iter()
            .filter(|k| self.keys.get(*k).is_some_and(|k| k.todo == todo))
            .take(n)
            .cloned()
            .collect()
    }

    fn count(&self, todo: Todo) -> usize {
        self.pending
            .iter()
            .filter(|k| self.keys.get(*k).is_some_and(|k| k.todo == todo))
            .count()
    }

    /// Live keys (with at least one holder).
    fn live(&self) -> usize {
        self.keys.len() - self.count(Todo::Delete)
    }

    fn oldest_waiting(&self) -> Option<Instant> {
        self.pending
            .iter()
            .filter_map(|k| self.keys.get(k))
            .flat_map(|k| k.holders.iter())
            .filter_map(|h| h.ack.as_ref().map(|(_, since)| *since))
            .min()
    }
}

pub struct Worker<S: Store> {
    store: S,
    ttl: Duration,
    dir: String,
    lease: Option<i64>,
    table: Table,
    /// When the lease is renewed next; moves only when a keepalive ran.
    keepalive_due: Instant,
    /// A full check owed (the watch lost continuity), from when; cleared
    /// only by a full read that succeeded.
    check_due: Option<Instant>,
    /// Earliest time to retry after an etcd failure.
    retry_at: Instant,
    /// Whether a lease was ever granted: a later grant is a re-grant.
    had_lease: bool,
    /// Consecutive refusals by etcd, for the backoff.
    rejected_streak: u32,
    /// The latest time `tick` was given. Commands are stamped with the
    /// later of this and the clock, so every deadline the worker keeps is on
    /// the timeline its ticks run on (the tests drive ticks ahead of the
    /// clock; in the server the two agree).
    clock: Instant,
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
            table: Table::default(),
            keepalive_due: now,
            check_due: None,
            retry_at: now,
            had_lease: false,
            rejected_streak: 0,
            clock: now,
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
                self.keepalive_due = woke;
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
            } => self.table.register(conn, key, value, ack, self.now()),
            Command::Unregister { conn, key } => self.table.unregister(conn, &key),
            Command::Changed(changes) => {
                for c in changes {
                    self.changed(c);
                }
            }
            Command::Resync { after } => {
                if self.knows_of_etcd_before(after) {
                    info!("etcd watch (re)started without continuity: checking every key");
                    let now = self.now();
                    self.check_due.get_or_insert(now);
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

    /// Whether anything the worker believes about etcd was learned before
    /// revision `after` (always, without one): then changes since may have
    /// been missed. At start, when every key was written after the watch
    /// began or not yet, there is nothing to check, and the directory (the
    /// whole fleet's) is not read.
    fn knows_of_etcd_before(&self, after: Option<i64>) -> bool {
        let Some(after) = after else { return true };
        self.table.keys.values().any(|k| match k.revision {
            Some(rev) => rev <= after,
            // Unwritten registrations know nothing of etcd yet; anything
            // else (another instance's, to delete, to restore) came from it.
            None => k.todo != Todo::Put,
        })
    }

    fn changed(&mut self, c: Change) {
        let lease = self.lease;
        if let Some(k) = self.table.keys.get(&c.key) {
            // Our own write, or something older than it.
            if k.revision.is_some_and(|r| c.mod_revision <= r) {
                return;
            }
        } else if c.deleted || Some(c.lease) != lease {
            // Another instance's key, or an operator's: none of ours.
            return;
        }
        let seen = (!c.deleted).then_some((c.lease, c.mod_revision));
        self.table.observed(&c.key, seen, lease);
    }

    /// Now, on the ticks' timeline (see `clock`).
    fn now(&self) -> Instant {
        self.clock.max(Instant::now())
    }

    fn next_deadline(&self) -> Instant {
        let mut next = self.keepalive_due;
        if self.lease.is_none() || !self.table.pending.is_empty() || self.check_due.is_some() {
            next = next.min(self.retry_at.max(self.check_due.unwrap_or(self.retry_at)));
        }
        next
    }

    /// Does whatever is due: lease upkeep, a full check, pending writes.
    pub fn tick(&mut self, now: Instant) {
        self.clock = self.clock.max(now);
        if now >= self.retry_at || now >= self.keepalive_due {
            self.ensure_lease(now);
        }
        if now >= self.keepalive_due {
            if let Some(lease) = self.lease {
                match self.store.keep_alive(lease) {
                    Ok(()) => {
                        self.answered(now);
                        self.keepalive_due = now + self.ttl / 3;
                    }
                    Err(e) => {
                        self.keepalive_due = now + RETRY;
                        self.failed(e, now);
                    }
                }
            } else {
                self.keepalive_due = now + RETRY;
            }
        }
        if self.check_due.is_some_and(|due| now >= due) && now >= self.retry_at {
            self.full_check(now);
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
        if !refusing || now < self.retry_at || !self.table.pending.is_empty() {
            return;
        }
        let Some(lease) = self.lease else { return };
        let Some(kv) = self
            .table
            .keys
            .iter()
            .find_map(|(k, key)| Some((k.clone(), key.value()?.to_string())))
        else {
            return;
        };
        match self.store.rewrite_owned(&kv, lease) {
            Ok(revision) => {
                if let (Some(rev), Some(k)) = (revision, self.table.keys.get_mut(&kv.0)) {
                    k.revision = Some(rev);
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
                self.keepalive_due = now + self.ttl / 3;
                self.answered(now);
                // Whatever we held under an older lease went with it: put it
                // back where nobody else has put it since. Deletes are done
                // (the lease took those keys), but for keys we saw put
                // without a lease, which no lease takes, or may have missed
                // seeing so (a full check is owed).
                let unsure = self.check_due.is_some();
                let keys: Vec<(String, Todo, bool)> = self
                    .table
                    .keys
                    .iter_mut()
                    .map(|(k, key)| {
                        key.revision = None;
                        (k.clone(), key.todo, key.leaseless)
                    })
                    .collect();
                for (k, todo, leaseless) in keys {
                    match todo {
                        Todo::Put | Todo::Restore => {}
                        Todo::Synced | Todo::Update => self.table.set(&k, Todo::Restore),
                        Todo::Delete if leaseless || unsure => {}
                        Todo::Delete => {
                            self.table.pending.remove(&k);
                            self.table.keys.remove(&k);
                        }
                    }
                }
            }
            Err(e) => self.failed(e, now),
        }
    }

    /// Writes pending deletes, then pending puts, in as few transactions as
    /// etcd allows. A batch etcd rejects is split until the one key at fault
    /// is found; that registration is given up (and its connection told), so
    /// one bad request never holds back the others.
    fn flush(&mut self, now: Instant) {
        if now < self.retry_at || self.table.pending.is_empty() {
            return;
        }
        self.ensure_lease(now);
        let Some(lease) = self.lease else {
            return;
        };
        // While a full check is owed, a delete waits for it (it tells which
        // lease, or none, the key must still have), but not for long: a
        // check etcd keeps refusing must not keep our keys alive.
        if self
            .check_due
            .is_none_or(|due| now >= due + MAX_REFUSED_BACKOFF)
        {
            if let Err(e) = self.flush_deletes(lease) {
                return self.failed(e, now);
            }
        }
        let puts = !self.table.pending.is_empty();
        if let Err(e) = self.flush_puts(lease, Todo::Put) {
            return self.failed(e, now);
        }
        if let Err(e) = self.flush_puts(lease, Todo::Restore) {
            return self.failed(e, now);
        }
        if let Err(e) = self.flush_puts(lease, Todo::Update) {
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

    /// Writes the pending deletes in batches, logging what etcd did with
    /// each; a batch etcd rejects is split until the key at fault is found,
    /// and that key is given up.
    fn flush_deletes(&mut self, lease: i64) -> Result<(), StoreError> {
        let mut batch = MAX_DELETES_PER_TXN;
        // Deletes go ahead of an owed full check only once it is overdue;
        // then a key may have been overwritten without a lease unseen (its
        // event lost), so one that is not on our lease is also deleted where
        // it has no lease: a lease-less key at our key is never another
        // instance's registration.
        let unsure = self.check_due.is_some();
        loop {
            let keys = self.table.pending_with(Todo::Delete, batch);
            if keys.is_empty() {
                return Ok(());
            }
            let chunk: Vec<(String, i64)> = keys
                .iter()
                .map(|k| {
                    let leaseless = self.table.keys.get(k).is_some_and(|k| k.leaseless);
                    (k.clone(), if leaseless { 0 } else { lease })
                })
                .collect();
            match self.store.delete_if(&chunk) {
                Ok(mut deleted) => {
                    let again: Vec<(usize, (String, i64))> = chunk
                        .iter()
                        .enumerate()
                        .filter(|(i, (_, l))| {
                            unsure && *l != 0 && !deleted.get(*i).copied().unwrap_or(false)
                        })
                        .map(|(i, (k, _))| (i, (k.clone(), 0)))
                        .collect();
                    if !again.is_empty() {
                        let (at, kvs): (Vec<usize>, Vec<(String, i64)>) = again.into_iter().unzip();
                        let second = self.store.delete_if(&kvs)?;
                        for (j, i) in at.into_iter().enumerate() {
                            if second.get(j).copied().unwrap_or(false) {
                                deleted[i] = true;
                            }
                        }
                    }
                    for (i, (k, l)) in chunk.iter().enumerate() {
                        if deleted.get(i).copied().unwrap_or(false) {
                            debug!("deleted {k}");
                        } else {
                            info!(
                                "{k} was not deleted: etcd no longer has it on {} \
                                 (gone, or another instance's)",
                                if *l == 0 {
                                    "no lease".to_string()
                                } else {
                                    format!("lease {l:x}")
                                }
                            );
                        }
                        self.table.set(k, Todo::Synced);
                    }
                }
                Err(StoreError::BadRequest(_)) if chunk.len() > 1 => batch = chunk.len() / 2,
                Err(StoreError::BadRequest(why)) => {
                    // The lease expiry removes it if the process goes.
                    error!("etcd refuses to delete {}: {why}", chunk[0].0);
                    self.table.set(&chunk[0].0, Todo::Synced);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes the keys waiting for `todo` (`Put`, or `Restore` only where
    /// they are free) in batches, acknowledging each registration once
    /// written.
    fn flush_puts(&mut self, lease: i64, todo: Todo) -> Result<(), StoreError> {
        // A conditional put is a nested transaction: two operations.
        let mut batch = if todo == Todo::Put {
            MAX_TXN_OPS
        } else {
            MAX_TXN_OPS / 2
        };
        loop {
            let keys = self.table.pending_with(todo, batch);
            if keys.is_empty() {
                return Ok(());
            }
            let chunk: Vec<(String, String, Guard)> = keys
                .iter()
                .filter_map(|k| {
                    let key = self.table.keys.get(k)?;
                    let guard = match todo {
                        Todo::Put => Guard::Always,
                        Todo::Update => Guard::Ours,
                        _ => Guard::Free,
                    };
                    Some((k.clone(), key.value()?.to_string(), guard))
                })
                .collect();
            match self.store.put(&chunk, lease) {
                Ok((revision, written)) => {
                    for (i, (k, _, _)) in chunk.iter().enumerate() {
                        let w = written.get(i).copied().unwrap_or(false);
                        self.table.stored(k, revision, w);
                    }
                }
                Err(StoreError::BadRequest(_)) if chunk.len() > 1 => batch = chunk.len() / 2,
                Err(StoreError::BadRequest(why)) => self.table.refuse_newest(&chunk[0].0, &why),
                Err(e) => return Err(e),
            }
        }
    }

    /// Compares etcd with the desired state in one keys-only read of the
    /// directory: restores keys removed or changed behind our back and
    /// deletes our own leftovers. Runs only when the watch lost continuity.
    fn full_check(&mut self, now: Instant) {
        let Some(lease) = self.lease else { return };
        let stored = match self.store.list(&self.dir) {
            Ok(kvs) => kvs,
            Err(e) => return self.failed(e, now),
        };
        self.check_due = None;
        self.answered(now);
        let stored: BTreeMap<String, (i64, i64)> = stored
            .into_iter()
            .map(|kv| (kv.key, (kv.lease, kv.mod_revision)))
            .collect();
        let ours: Vec<String> = self.table.keys.keys().cloned().collect();
        for key in ours {
            self.table
                .observed(&key, stored.get(&key).copied(), Some(lease));
        }
        for (key, (l, rev)) in &stored {
            if *l == lease && !self.table.keys.contains_key(key) {
                self.table.observed(key, Some((*l, *rev)), Some(lease));
            }
        }
    }

    /// Sets the retry schedule for a failed etcd call, by what failed.
    fn failed(&mut self, e: StoreError, now: Instant) {
        let backoff = |streak: &mut u32, cap: Duration| {
            *streak = streak.saturating_add(1);
            (RETRY * 2u32.saturating_pow((*streak).min(6))).min(cap)
        };
        let pending = self.table.pending.len();
        match e {
            StoreError::LeaseNotFound => {
                if let Some(old) = self.lease.take() {
                    warn!(
                        "etcd lease {old:x} is gone: granting a new one and re-putting {} entries",
                        self.table.live()
                    );
                }
                // Retry at once: the grant will put everything again.
                self.retry_at = now;
                self.keepalive_due = now;
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
                self.health.failed(&e, pending, now);
            }
            StoreError::RefusingWrites(_) | StoreError::PermissionDenied(_) => {
                self.retry_at = now + backoff(&mut self.rejected_streak, MAX_REFUSED_BACKOFF);
                self.health.failed(&e, pending, now);
            }
            StoreError::Auth(_) => {
                // The store has logged in afresh and retried once already;
                // asking again at once changes nothing and costs a bcrypt.
                self.retry_at = now + backoff(&mut self.rejected_streak, MAX_REJECTED_BACKOFF);
                self.health.failed(&e, pending, now);
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
            .answered(self.table.pending.len(), self.table.live(), now);
        if self.health.state() == EtcdState::Ok {
            self.rejected_streak = 0;
        }
    }

    /// Publishes the queue and the worker's heartbeat.
    fn publish(&mut self, now: Instant) {
        let oldest = self.table.oldest_waiting();
        self.health
            .publish(self.lease, self.table.pending.len(), oldest, now);
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
                let deletes = self.table.count(Todo::Delete);
                let deleted = if deletes == 0 || unreachable {
                    Ok(())
                } else {
                    self.flush_deletes(lease)
                };
                if let Err(e) = deleted {
                    warn!(
                        "could not write {} deletes before stopping ({e}): they expire with the lease",
                        self.table.count(Todo::Delete)
                    );
                }
                info!(
                    "leaving {} entries on etcd lease {lease:x} for the next instance: \
                     they expire within {}s unless their clients come back",
                    self.table.live(),
                    self.ttl.as_secs()
                );
            }
            (_, None) => {}
        }
        for k in self.table.keys.values_mut() {
            for h in &mut k.holders {
                if let Some((tx, _)) = h.ack.take() {
                    tx.send(Err("skyapi is shutting down".into()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// An in-memory etcd: keys with leases (0: none) and revisions, etcd's
    /// limit on operations per transaction, conditional transactions that
    /// say what they did, a switch to make it unreachable, keys and values
    /// it refuses to store, and the change feed a watch would see.
    #[derive(Default)]
    struct FakeEtcd {
        /// key -> (value, lease, mod_revision)
        kv: BTreeMap<String, (String, i64, i64)>,
        revision: i64,
        leases: BTreeSet<i64>,
        next_lease: i64,
        down: bool,
        refused: BTreeSet<String>,
        /// Values too large to store (a request etcd calls bad).
        refused_values: BTreeSet<String>,
        /// Changes not yet handed to the worker (the watch's feed).
        events: Vec<Change>,
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
        fn changed(e: &mut FakeEtcd, k: &str, lease: i64, deleted: bool) {
            let rev = e.revision;
            e.events.push(Change {
                key: k.into(),
                lease,
                mod_revision: rev,
                deleted,
            });
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
            Fake::changed(&mut e, k, lease, false);
        }
        /// Someone deletes a key by hand.
        fn del_foreign(&self, k: &str) {
            let mut e = self.0.borrow_mut();
            if e.kv.remove(k).is_some() {
                e.revision += 1;
                Fake::changed(&mut e, k, 0, true);
            }
        }
        /// Every lease granted here ends (expired in a partition, revoked
        /// by an operator), with the keys on it; other leases stay.
        fn revoke_all(&self) {
            let mut e = self.0.borrow_mut();
            let gone = std::mem::take(&mut e.leases);
            Self::expire(&mut e, |l| gone.contains(&l));
        }
        fn expire(e: &mut FakeEtcd, gone: impl Fn(i64) -> bool) {
            let keys: Vec<String> =
                e.kv.iter()
                    .filter(|(_, (_, l, _))| gone(*l))
                    .map(|(k, _)| k.clone())
                    .collect();
            for k in keys {
                e.kv.remove(&k);
                e.revision += 1;
                Fake::changed(e, &k, 0, true);
            }
        }
        /// Hands the watch's pending events to the worker, as `watch.rs`.
        fn deliver(&self, w: &mut Worker<Fake>) {
            let events = std::mem::take(&mut self.0.borrow_mut().events);
            if !events.is_empty() {
                w.handle(Command::Changed(events));
            }
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
            Self::expire(&mut e, |l| l == lease);
            Ok(())
        }
        fn put(
            &mut self,
            kvs: &[(String, String, Guard)],
            lease: i64,
        ) -> Result<(i64, Vec<bool>), StoreError> {
            let ops = kvs
                .iter()
                .map(|(_, _, g)| if *g == Guard::Always { 1 } else { 2 })
                .sum();
            self.check("put", ops)?;
            let mut e = self.0.borrow_mut();
            if !e.leases.contains(&lease) {
                return Err(StoreError::LeaseNotFound);
            }
            if let Some((k, _, _)) = kvs
                .iter()
                .find(|(k, v, _)| e.refused.contains(k) || e.refused_values.contains(v))
            {
                return Err(StoreError::BadRequest(format!("request is too large: {k}")));
            }
            if let Some(e) = &e.refuse_writes {
                return Err(e.clone());
            }
            e.revision += 1;
            let rev = e.revision;
            let mut written = Vec::new();
            for (k, v, guard) in kvs {
                let write = match guard {
                    Guard::Always => true,
                    // etcd compares a missing key's lease as 0.
                    Guard::Free => e.kv.get(k).is_none_or(|(_, l, _)| *l == 0),
                    Guard::Ours => e.kv.get(k).is_some_and(|(_, l, _)| *l == lease),
                };
                if write {
                    e.kv.insert(k.clone(), (v.clone(), lease, rev));
                    Fake::changed(&mut e, k, lease, false);
                }
                written.push(write);
            }
            Ok((rev, written))
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
            Fake::changed(&mut e, k, lease, false);
            Ok(Some(rev))
        }
        fn delete_if(&mut self, keys: &[(String, i64)]) -> Result<Vec<bool>, StoreError> {
            // An outer operation and a nested one per key, as etcd counts.
            self.check("delete", keys.len() * 2)?;
            let mut e = self.0.borrow_mut();
            e.revision += 1;
            let mut deleted = Vec::new();
            for (k, lease) in keys {
                let del = e.kv.get(k).is_some_and(|(_, l, _)| l == lease);
                if del {
                    e.kv.remove(k);
                    Fake::changed(&mut e, k, 0, true);
                }
                deleted.push(del);
            }
            Ok(deleted)
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
            ack: ack.into(),
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
        fake.deliver(&mut w);
        fake.del_foreign("/d/a");
        // Another instance re-put /d/b under its own lease.
        fake.put_foreign("/d/b", "x", 99);
        fake.0.borrow_mut().calls.clear();
        fake.deliver(&mut w);
        w.tick(t0 + Duration::from_millis(1));
        assert_eq!(fake.get("/d/a").unwrap().0, "v");
        assert_eq!(fake.get("/d/b").unwrap(), ("x".into(), 99));
        assert_eq!(fake.count("list"), 0, "the watch told us: no range read");
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
            ack: ack.into(),
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
        fake.deliver(&mut w);
        fake.put_foreign("/d/a", "forged", lease);
        fake.deliver(&mut w);
        w.tick(t0 + Duration::from_secs(10));
        assert_eq!(fake.get("/d/a").unwrap(), ("v".into(), lease));
        fake.deliver(&mut w);
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
            fn put(
                &mut self,
                _: &[(String, String, Guard)],
                _: i64,
            ) -> Result<(i64, Vec<bool>), StoreError> {
                unreachable!()
            }
            fn delete_if(&mut self, _: &[(String, i64)]) -> Result<Vec<bool>, StoreError> {
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

    #[test]
    fn a_refused_put_fails_only_that_registration() {
        let fake = Fake::default();
        let mut w = worker(&fake);
        let first = register(&mut w, 1, "/d/a", "ok");
        let t0 = Instant::now();
        w.tick(t0);
        assert_eq!(first.try_recv(), Ok(Ok(())));
        fake.0.borrow_mut().refused_values.insert("huge".into());
        let bad = register(&mut w, 2, "/d/a", "huge");
        w.tick(t0 + Duration::from_millis(1));
        assert!(
            matches!(bad.try_recv(), Ok(Err(_))),
            "the refused one is told"
        );
        let lease = w.lease.unwrap();
        assert_eq!(
            fake.get("/d/a").unwrap(),
            ("ok".into(), lease),
            "the other keeps it"
        );
        unregister(&mut w, 1, "/d/a");
        w.tick(t0 + Duration::from_millis(2));
        assert_eq!(fake.get("/d/a"), None, "deleted when the last holder goes");
        assert!(w.table.keys.is_empty());
    }

    #[test]
    fn a_key_overwritten_without_a_lease_is_restored_and_deleted_on_close() {
        let fake = Fake::default();
        let mut w = worker(&fake);
        register(&mut w, 1, "/d/a", "v");
        register(&mut w, 2, "/d/b", "v");
        let t0 = Instant::now();
        w.tick(t0);
        fake.deliver(&mut w);
        let lease = w.lease.unwrap();
        fake.put_foreign("/d/a", "plain", 0);
        fake.deliver(&mut w);
        w.tick(t0 + Duration::from_millis(1));
        assert_eq!(
            fake.get("/d/a").unwrap(),
            ("v".into(), lease),
            "restored as ours"
        );
        // Overwritten again, and the connection goes before the restore.
        fake.deliver(&mut w);
        fake.put_foreign("/d/b", "plain", 0);
        fake.deliver(&mut w);
        unregister(&mut w, 2, "/d/b");
        w.tick(t0 + Duration::from_millis(2));
        assert_eq!(
            fake.get("/d/b"),
            None,
            "a lease-less key of ours is deleted"
        );
    }

    #[test]
    fn a_key_deleted_by_hand_is_restored_at_once_under_churn() {
        let fake = Fake::default();
        let mut w = worker(&fake);
        register(&mut w, 0, "/d/live", "v");
        let t0 = Instant::now();
        w.tick(t0);
        fake.deliver(&mut w);
        fake.del_foreign("/d/live");
        // A registration in every turn of the loop: the restore still
        // happens in the turn the deletion is seen.
        for i in 1..5u64 {
            register(&mut w, i, &format!("/d/{i}"), "v");
            fake.deliver(&mut w);
            w.tick(t0 + Duration::from_millis(i));
            assert!(fake.get("/d/live").is_some(), "restored by turn {i}");
        }
    }

    #[test]
    fn a_resync_checks_every_key_against_one_read() {
        let fake = Fake::default();
        let mut w = worker(&fake);
        register(&mut w, 1, "/d/a", "v");
        register(&mut w, 2, "/d/b", "v");
        let t0 = Instant::now();
        w.tick(t0);
        let lease = w.lease.unwrap();
        // Changes the watch never delivered (compacted away meanwhile).
        fake.0.borrow_mut().kv.remove("/d/a");
        fake.put_foreign("/d/stray", "v", lease);
        fake.put_foreign("/d/b", "forged", lease);
        fake.0.borrow_mut().events.clear();
        fake.0.borrow_mut().calls.clear();
        w.handle(Command::Resync { after: None });
        w.tick(t0 + Duration::from_millis(1));
        assert_eq!(fake.count("list"), 1);
        assert_eq!(fake.get("/d/a").unwrap(), ("v".into(), lease));
        assert_eq!(fake.get("/d/b").unwrap(), ("v".into(), lease));
        assert_eq!(fake.get("/d/stray"), None, "ours without a connection");
        w.tick(t0 + Duration::from_secs(20));
        assert_eq!(fake.count("list"), 1, "no read without a reason");
    }

    #[test]
    fn a_fresh_watch_reads_the_directory_only_if_the_worker_wrote_before_it() {
        let fake = Fake::default();
        let mut w = worker(&fake);
        register(&mut w, 1, "/d/a", "v");
        // The watch began before anything was written: nothing to check.
        let before = fake.0.borrow().revision;
        w.handle(Command::Resync {
            after: Some(before),
        });
        let t0 = Instant::now();
        w.tick(t0);
        assert_eq!(fake.count("list"), 0);
        // Written before the watch began: checked once.
        let after = fake.0.borrow().revision;
        w.handle(Command::Resync { after: Some(after) });
        w.tick(t0 + Duration::from_millis(1));
        assert_eq!(fake.count("list"), 1);
    }

    /// One step of the model-based test.
    #[derive(Debug, Clone)]
    enum Op {
        Register { key: u8, value: u8, bad: bool },
        Unregister(u8),
        Down,
        Up,
        RefuseWrites,
        AcceptWrites,
        LeaseLost,
        DeleteByHand(u8),
        OverwriteLeaseless(u8),
        OverwriteOurs(u8),
        ForeignPut(u8),
        LoseEvents,
        Tick(u8),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0..3u8, 0..3u8, proptest::bool::weighted(0.15))
                .prop_map(|(key, value, bad)| Op::Register { key, value, bad }),
            3 => any::<u8>().prop_map(Op::Unregister),
            1 => Just(Op::Down),
            1 => Just(Op::Up),
            1 => Just(Op::RefuseWrites),
            1 => Just(Op::AcceptWrites),
            1 => Just(Op::LeaseLost),
            1 => (0..3u8).prop_map(Op::DeleteByHand),
            1 => (0..3u8).prop_map(Op::OverwriteLeaseless),
            1 => (0..3u8).prop_map(Op::OverwriteOurs),
            1 => (0..3u8).prop_map(Op::ForeignPut),
            1 => Just(Op::LoseEvents),
            4 => (0..4u8).prop_map(Op::Tick),
        ]
    }

    /// The reference model: which connections hold which key, and which
    /// keys another instance took over, with our registrations of them
    /// since (each newer than the other instance's put).
    struct Model {
        conns: Vec<(ConnId, String, String, bool, Receiver<Ack>)>,
        foreign: BTreeMap<String, Vec<ConnId>>,
        next: ConnId,
    }

    impl Model {
        fn good(&self, key: &str) -> Vec<&String> {
            self.conns
                .iter()
                .filter(|c| c.1 == key && !c.3)
                .map(|c| &c.2)
                .collect()
        }
    }

    /// etcd reachable and writable again, every change delivered, time
    /// moving on until the worker has nothing left to do.
    fn settle(fake: &Fake, w: &mut Worker<Fake>, t: &mut Instant) {
        {
            let mut e = fake.0.borrow_mut();
            e.down = false;
            e.refuse_writes = None;
        }
        for _ in 0..40 {
            fake.deliver(w);
            *t += Duration::from_secs(1);
            w.tick(*t);
        }
        fake.deliver(w);
        w.tick(*t);
    }

    fn run_model(ops: Vec<Op>) {
        let fake = Fake::default();
        let mut w = worker(&fake);
        let mut t = Instant::now();
        let mut m = Model {
            conns: Vec::new(),
            foreign: BTreeMap::new(),
            next: 1,
        };
        fake.0.borrow_mut().refused_values.insert("huge".into());
        let key = |k: u8| format!("/d/{k}");
        for op in ops {
            match op {
                Op::Register { key: k, value, bad } => {
                    let (k, v) = (
                        key(k),
                        if bad {
                            "huge".into()
                        } else {
                            format!("v{value}")
                        },
                    );
                    let conn = m.next;
                    m.next += 1;
                    let rx = register(&mut w, conn, &k, &v);
                    if let Some(claims) = m.foreign.get_mut(&k).filter(|_| !bad) {
                        claims.push(conn);
                    }
                    m.conns.push((conn, k, v, bad, rx));
                }
                Op::Unregister(i) => {
                    if !m.conns.is_empty() {
                        let c = m.conns.remove(i as usize % m.conns.len());
                        unregister(&mut w, c.0, &c.1);
                    }
                }
                Op::Down => fake.0.borrow_mut().down = true,
                Op::Up => fake.0.borrow_mut().down = false,
                Op::RefuseWrites => fake.0.borrow_mut().refuse_writes = Some(nospace()),
                Op::AcceptWrites => fake.0.borrow_mut().refuse_writes = None,
                Op::LeaseLost => fake.revoke_all(),
                Op::DeleteByHand(k) => {
                    fake.del_foreign(&key(k));
                    m.foreign.remove(&key(k));
                }
                Op::OverwriteLeaseless(k) => {
                    // A lease-less key nobody holds is not ours to judge.
                    if !m.good(&key(k)).is_empty() {
                        fake.put_foreign(&key(k), "plain", 0);
                        m.foreign.remove(&key(k));
                    }
                }
                Op::OverwriteOurs(k) => {
                    let lease = fake.get(&key(k)).map(|(_, l)| l);
                    if let Some(l) = lease.filter(|l| Some(*l) == w.lease) {
                        fake.put_foreign(&key(k), "forged", l);
                    }
                }
                Op::ForeignPut(k) => {
                    settle(&fake, &mut w, &mut t);
                    fake.put_foreign(&key(k), "theirs", 99);
                    m.foreign.insert(key(k), Vec::new());
                }
                Op::LoseEvents => {
                    fake.0.borrow_mut().events.clear();
                    w.handle(Command::Resync { after: None });
                }
                Op::Tick(s) => {
                    fake.deliver(&mut w);
                    t += Duration::from_millis(250 * s as u64);
                    w.tick(t);
                }
            }
        }
        settle(&fake, &mut w, &mut t);
        let lease = w.lease.expect("a lease once etcd answers");
        for k in 0..3 {
            let k = key(k);
            let got = fake.get(&k);
            let ours = m.good(&k).last().map(|v| (v.to_string(), lease));
            let theirs = Some(("theirs".to_string(), 99));
            let live = |c: &ConnId| m.conns.iter().any(|x| x.0 == *c);
            match m.foreign.get(&k) {
                None => assert_eq!(got, ours, "{k}: etcd holds what the model says"),
                // Nobody of ours registered it since: theirs stays.
                Some(claims) if claims.is_empty() => assert_eq!(got, theirs, "{k}: left alone"),
                // A registration of ours since, still live: ours is newer.
                Some(claims) if claims.iter().any(live) => {
                    assert_eq!(got, ours, "{k}: our newer registration")
                }
                // Ours came and went: whether it was written before it
                // left decides; either way nothing else may be there.
                Some(_) => assert!(
                    got == theirs || got == ours || got.is_none(),
                    "{k}: {got:?}"
                ),
            }
        }
        for (conn, k, _, bad, rx) in &m.conns {
            let answer = rx.try_recv();
            if *bad {
                assert!(answer.is_ok(), "conn {conn} ({k}) was answered");
            } else {
                assert_eq!(answer, Ok(Ok(())), "conn {conn} ({k}) was acknowledged");
            }
        }
        assert!(w.table.pending.is_empty(), "nothing left to do");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn the_worker_keeps_etcd_as_the_model_says(
            ops in proptest::collection::vec(op(), 1..60)
        ) {
            run_model(ops);
        }
    }
}
