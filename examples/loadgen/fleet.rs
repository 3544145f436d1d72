//! A fleet of idle providers, each a tokio task (not a thread): connect,
//! wait for the welcome, report, hold the connection answering pings, and
//! close when the fleet is told to. Used by the idle, storm and restart
//! scenarios; in the restart scenario the providers reconnect as the
//! sidecar does (`reconnecting`), reporting each new welcome.
//!
//! Invariant: every task ends by itself once `stop` is set (its close is
//! bounded by `CLOSE_LIMIT`), or at once if the fleet is dropped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use crate::client::{self, Target};
use crate::stats;

/// Bound on one connect or upgrade attempt, and on the welcome.
const STEP_LIMIT: Duration = Duration::from_secs(10);
/// Connect attempts per provider (a storm's refused or dropped SYNs).
const ATTEMPTS: u32 = 3;
/// Bound on one close handshake.
const CLOSE_LIMIT: Duration = Duration::from_secs(10);

/// What a provider reports once registered (or not).
pub struct Ready {
    pub result: Result<ReadyOk, String>,
}

pub struct ReadyOk {
    pub welcomed: Instant,
    pub attempts: u32,
}

pub struct Fleet {
    target: Target,
    service: String,
    tasks: JoinSet<Result<(), String>>,
    ready_tx: mpsc::UnboundedSender<Ready>,
    pub ready: mpsc::UnboundedReceiver<Ready>,
    stop_tx: watch::Sender<bool>,
    go_tx: watch::Sender<bool>,
    /// Bounds concurrent connects during a ramp; None in a storm.
    gate: Option<Arc<Semaphore>>,
    next_port: u32,
    /// Reconnect when the server ends a held connection.
    reconnect: bool,
}

impl Fleet {
    /// `concurrency`: at most this many providers connecting at once
    /// (0 = unbounded, for a storm).
    pub fn new(target: &Target, service: &str, concurrency: usize) -> Fleet {
        let (ready_tx, ready) = mpsc::unbounded_channel();
        let (stop_tx, _) = watch::channel(false);
        let (go_tx, _) = watch::channel(false);
        Fleet {
            target: target.clone(),
            service: service.to_string(),
            tasks: JoinSet::new(),
            ready_tx,
            ready,
            stop_tx,
            go_tx,
            gate: (concurrency > 0).then(|| Arc::new(Semaphore::new(concurrency))),
            next_port: 1,
            reconnect: false,
        }
    }

    /// Providers spawned from now on take a lost connection up again the
    /// way `skyapi provide` does: the first attempt after a jittered 0-250
    /// ms, then the sidecar's exponential backoff (its own `Backoff`).
    pub fn reconnecting(mut self) -> Fleet {
        self.reconnect = true;
        self
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Adds `n` providers on the next ports. With `gated`, they wait for
    /// `go()` before connecting (a storm); otherwise they start at once.
    pub fn spawn(&mut self, n: usize, gated: bool) {
        for _ in 0..n {
            let port = self.next_port;
            self.next_port += 1;
            let target = self.target.clone();
            let service = self.service.clone();
            let ready = self.ready_tx.clone();
            let mut stop = self.stop_tx.subscribe();
            let mut go = self.go_tx.subscribe();
            let gate = self.gate.clone();
            let reconnect = self.reconnect;
            self.tasks.spawn(async move {
                if gated {
                    // Err: the fleet is gone; nothing to do.
                    if go.wait_for(|g| *g).await.is_err() {
                        return Ok(());
                    }
                }
                let permit = match &gate {
                    Some(g) => Some(g.clone().acquire_owned().await.map_err(|e| e.to_string())?),
                    None => None,
                };
                let opened = async {
                    let (mut conn, attempts) =
                        client::open_retrying(&target, &service, port, STEP_LIMIT, ATTEMPTS)
                            .await?;
                    let w = conn.welcome(STEP_LIMIT).await?;
                    Ok::<_, String>((conn, w.at, attempts))
                }
                .await;
                drop(permit);
                let mut conn = match opened {
                    Ok((conn, welcomed, attempts)) => {
                        let _ = ready.send(Ready {
                            result: Ok(ReadyOk { welcomed, attempts }),
                        });
                        conn
                    }
                    Err(e) => {
                        let _ = ready.send(Ready {
                            result: Err(e.clone()),
                        });
                        return Err(e);
                    }
                };
                loop {
                    match conn.hold(&mut stop).await {
                        Ok(()) => return conn.close(CLOSE_LIMIT).await.map(|_| ()),
                        Err(e) if !reconnect => return Err(e),
                        Err(_) => {}
                    }
                    match reopen(&target, &service, port, &mut stop).await {
                        Some((c, welcomed)) => {
                            let _ = ready.send(Ready {
                                result: Ok(ReadyOk {
                                    welcomed,
                                    attempts: 1,
                                }),
                            });
                            conn = c;
                        }
                        None => return Ok(()),
                    }
                }
            });
        }
    }

    /// Lets gated providers connect.
    pub fn go(&self) {
        self.go_tx.send_replace(true);
    }

    /// Tells every provider to close.
    pub fn stop(&self) {
        self.stop_tx.send_replace(true);
    }

    /// Waits (until `deadline`) for every task to end; returns how many
    /// ended with an error (a failed open, a connection the server ended
    /// while held, a close not answered) and up to five of the errors.
    pub async fn join(&mut self, deadline: tokio::time::Instant) -> (usize, usize, Vec<String>) {
        let mut ok = 0;
        let mut errors = Vec::new();
        let mut failed = 0;
        loop {
            match tokio::time::timeout_at(deadline, self.tasks.join_next()).await {
                Ok(Some(Ok(Ok(())))) => ok += 1,
                Ok(Some(Ok(Err(e)))) => {
                    failed += 1;
                    stats::keep_error(&mut errors, e);
                }
                Ok(Some(Err(e))) => {
                    failed += 1;
                    stats::keep_error(&mut errors, format!("task: {e}"));
                }
                Ok(None) => break,
                Err(_) => {
                    failed += self.tasks.len();
                    errors.push(format!(
                        "{} tasks still running at the deadline",
                        self.tasks.len()
                    ));
                    self.tasks.abort_all();
                    break;
                }
            }
        }
        (ok, failed, errors)
    }
}

/// Connects again after a held connection was lost, as the sidecar does,
/// until welcomed; `None` once the fleet is told to stop.
async fn reopen(
    target: &Target,
    service: &str,
    port: u32,
    stop: &mut watch::Receiver<bool>,
) -> Option<(client::Conn, Instant)> {
    let mut backoff = skyapi::sidecar::Backoff::new();
    let mut wait = backoff.quick_delay();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return None,
        }
        if let Ok(mut conn) = client::open(target, service, port, STEP_LIMIT).await {
            if let Ok(w) = conn.welcome(STEP_LIMIT).await {
                return Some((conn, w.at));
            }
        }
        wait = backoff.next_delay();
    }
}
