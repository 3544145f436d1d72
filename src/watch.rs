//! The change feed: a thread that watches the root directory in etcd and
//! hands every change to the etcd worker, so the worker learns of a key of
//! ours deleted, overwritten or changed when it happens, without reading
//! the directory (whose size is the whole fleet's) over and over.
//!
//! The worker is synchronous and blocks on its command channel, while a
//! watch stream must be read as it comes: so the watcher has its own thread,
//! with its own store (own current-thread runtime, own client), and sends
//! `Command::Changed` and `Command::Resync` into the worker's channel. The
//! worker owns all state and decides what a change means.
//!
//! Invariants:
//! - no change is lost without the worker being told: after a break the
//!   watch resumes from the revision after the last one delivered (etcd
//!   replays what happened meanwhile); when that revision is compacted
//!   away, or at start, the watch begins at "now" and the worker is sent
//!   `Resync` once the new watch is in place (one full keys-only read after
//!   a compaction; at start only if the worker wrote before the watch
//!   began);
//! - in steady state the watch costs nothing but the changes themselves
//!   (and the HTTP/2 pings that find a dead connection);
//! - a broken watch is retried with a backoff (`RETRY` up to
//!   `MAX_BACKOFF`); the thread ends when the worker is gone.

use std::time::Duration;

use log::{debug, info, warn};

use crate::config::EtcdConfig;
use crate::etcd::{EtcdStore, Watched};
use crate::worker::{Command, WorkerHandle, RETRY};

/// Longest wait before opening the watch again after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Starts the watcher thread on `dir` for `worker`.
pub fn spawn(
    config: EtcdConfig,
    dir: String,
    worker: WorkerHandle,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let store = EtcdStore::new(config)?;
    std::thread::Builder::new()
        .name("etcd-watch".into())
        .spawn(move || run(store, &dir, &worker))
}

fn run(mut store: EtcdStore, dir: &str, worker: &WorkerHandle) {
    // The last revision whose changes the worker has been given; None: no
    // continuity (start, compaction).
    let mut last: Option<i64> = None;
    let mut started = false;
    let mut backoff = RETRY;
    let pause = |backoff: &mut Duration| {
        std::thread::sleep(*backoff);
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
    };
    loop {
        let from = last.map(|r| r + 1);
        let mut stream = match store.open_watch(dir, from) {
            Ok(s) => s,
            Err(e) => {
                debug!("etcd watch: cannot open: {e}");
                pause(&mut backoff);
                continue;
            }
        };
        loop {
            match store.next_watch(&mut stream) {
                Ok(Some(Watched::Created(revision))) => {
                    backoff = RETRY;
                    match from {
                        Some(from) => debug!("etcd watch resumed from revision {from}"),
                        None => {
                            // The first watch follows on from `revision`; a
                            // later fresh one follows a compaction, after
                            // which nothing is known.
                            let after = (!started).then_some(revision);
                            started = true;
                            last = Some(revision);
                            if !worker.watched(Command::Resync { after }) {
                                return;
                            }
                        }
                    }
                }
                Ok(Some(Watched::Changes(changes))) => {
                    if let Some(newest) = changes.iter().map(|c| c.mod_revision).max() {
                        last = Some(last.map_or(newest, |l| l.max(newest)));
                    }
                    if !changes.is_empty() && !worker.watched(Command::Changed(changes)) {
                        return;
                    }
                }
                Ok(Some(Watched::Compacted(oldest))) => {
                    warn!(
                        "etcd compacted the revisions since the watch broke (oldest kept: \
                         {oldest}): watching from now and checking every key once"
                    );
                    last = None;
                    break;
                }
                Ok(Some(Watched::Canceled(why))) => {
                    // E.g. "required revision is a future revision": etcd was
                    // restored from a backup or wiped. Whatever the reason,
                    // resuming could miss changes: start afresh and check.
                    warn!(
                        "etcd ended the watch on {dir}: {why}; watching from now and \
                         checking every key once"
                    );
                    last = None;
                    pause(&mut backoff);
                    break;
                }
                Ok(None) => {
                    info!("etcd closed the watch stream; resuming it");
                    break;
                }
                Err(e) => {
                    warn!("etcd watch broken ({e}); resuming after revision {last:?}");
                    store.reset();
                    pause(&mut backoff);
                    break;
                }
            }
        }
    }
}
