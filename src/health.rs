//! What skyapi knows about its own health, for `/healthz`, `/metrics` and
//! the log: whether etcd is storing registrations, and whether the etcd
//! worker is alive.
//!
//! Invariants:
//! - healthy means "registrations are being stored": only a successful
//!   write makes etcd healthy again after a refused write (even with etcd
//!   unreachable in between); an answered keepalive or read does so only
//!   after errors that would have hit it too (unreachable, credentials),
//!   and only when no write is waiting (the flush right after it decides),
//!   so a keepalive never makes `/healthz` flap while writes fail;
//! - each condition is logged once when it starts, then summarised once per
//!   `SUMMARY_EVERY` while it lasts, and once when it ends;
//! - the worker beats on every turn of its loop; a beat older than
//!   `--timeout` (the lease would have expired unrenewed), and at least
//!   `WORKER_SILENT_LIMIT`, is unhealthy.
//!
//! Only the etcd worker writes this state (through `Tracker`); readers take
//! a copy under the lock and never wait for etcd.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::StoreError;
use crate::metrics::Metrics;

/// How often a lasting etcd condition is summarised in the log.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(30);
/// The least silence of the worker taken for a hung worker: one turn of
/// its loop may spend several bounded etcd calls on hung members.
pub const WORKER_SILENT_LIMIT: Duration = Duration::from_secs(10);

/// etcd as the worker last found it, as the `state` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtcdState {
    /// Writes are stored.
    Ok,
    /// No answer (down, partitioned, no leader, timed out).
    Unreachable,
    /// etcd answers but refuses every write (NOSPACE or CORRUPT alarm).
    RefusingWrites,
    /// Our credentials are refused (wrong password, or a token etcd no
    /// longer accepts even after a fresh login).
    Auth,
    /// Logged in, but our user may not write where we write.
    PermissionDenied,
}

impl EtcdState {
    pub const ALL: [EtcdState; 5] = [
        EtcdState::Ok,
        EtcdState::Unreachable,
        EtcdState::RefusingWrites,
        EtcdState::Auth,
        EtcdState::PermissionDenied,
    ];

    pub fn label(self) -> &'static str {
        match self {
            EtcdState::Ok => "ok",
            EtcdState::Unreachable => "unreachable",
            EtcdState::RefusingWrites => "refusing_writes",
            EtcdState::Auth => "auth",
            EtcdState::PermissionDenied => "permission_denied",
        }
    }

    /// The state an error puts etcd in; `None` for errors about one request
    /// or our lease, which say nothing about etcd as a whole.
    pub fn of(e: &StoreError) -> Option<EtcdState> {
        match e {
            StoreError::Unreachable(_) => Some(EtcdState::Unreachable),
            StoreError::RefusingWrites(_) => Some(EtcdState::RefusingWrites),
            StoreError::Auth(_) => Some(EtcdState::Auth),
            StoreError::PermissionDenied(_) => Some(EtcdState::PermissionDenied),
            StoreError::LeaseNotFound | StoreError::BadRequest(_) => None,
        }
    }

    /// Whether an answered read or keepalive proves this condition over.
    fn cleared_by_any_answer(self) -> bool {
        matches!(self, EtcdState::Unreachable | EtcdState::Auth)
    }
}

/// The worker's view, shared with the endpoints.
#[derive(Debug, Clone)]
pub struct Health {
    pub state: EtcdState,
    pub lease: Option<i64>,
    /// When `state` last changed, or the worker started.
    pub since: Instant,
    /// The error that set the state (`None`: etcd not reached yet).
    pub last_error: Option<String>,
    /// Keys waiting to be written or deleted.
    pub pending: usize,
    /// When the oldest registration still waiting for etcd arrived.
    pub oldest_waiting: Option<Instant>,
    /// The etcd worker's last turn of its loop.
    pub beat: Instant,
}

pub type SharedHealth = Arc<Mutex<Health>>;

impl Health {
    pub fn new(now: Instant) -> Self {
        Health {
            state: EtcdState::Unreachable,
            lease: None,
            since: now,
            last_error: None,
            pending: 0,
            oldest_waiting: None,
            beat: now,
        }
    }

    pub fn shared(now: Instant) -> SharedHealth {
        Arc::new(Mutex::new(Health::new(now)))
    }

    /// `Ok` when registrations are being stored; else the one-line reason,
    /// with how long it has been so. `timeout` is `--timeout`: a worker
    /// silent that long has let the lease expire.
    pub fn verdict(&self, now: Instant, timeout: Duration) -> Result<(), String> {
        let silent = now.saturating_duration_since(self.beat);
        if silent > timeout.max(WORKER_SILENT_LIMIT) {
            return Err(format!(
                "the etcd worker has not run for {}s",
                silent.as_secs()
            ));
        }
        let age = now.saturating_duration_since(self.since).as_secs();
        let queued = match self.oldest_waiting {
            Some(t) => format!(
                "{} keys queued, oldest registration waiting {}s",
                self.pending,
                now.saturating_duration_since(t).as_secs()
            ),
            None => format!("{} keys queued", self.pending),
        };
        match self.state {
            EtcdState::Ok if self.lease.is_some() => Ok(()),
            EtcdState::Ok => Err(format!("no etcd lease for {age}s")),
            EtcdState::Unreachable => {
                let why = self.last_error.as_deref().unwrap_or("not reached yet");
                let why = why.strip_prefix("etcd unreachable: ").unwrap_or(why);
                Err(format!("etcd unavailable for {age}s: {why} ({queued})"))
            }
            _ => Err(format!(
                "{} (for {age}s; {queued})",
                self.last_error.as_deref().unwrap_or("etcd refuses us")
            )),
        }
    }
}

/// The writer of `Health`: moves the state on each etcd outcome, logs the
/// transitions and the periodic summaries, and mirrors the state into the
/// metrics.
pub struct Tracker {
    health: SharedHealth,
    metrics: Arc<Metrics>,
    last_summary: Instant,
    /// Failures since the condition started or was last summarised.
    failures: u64,
    /// etcd's last refusal of a write (an alarm, a permission), until a
    /// write succeeds: a spell of unreachability in between does not
    /// make it go away.
    refused: Option<StoreError>,
    /// What was logged, for the unit tests of the log's cadence.
    #[cfg(test)]
    said: Vec<String>,
}

impl Tracker {
    pub fn new(health: SharedHealth, metrics: Arc<Metrics>) -> Self {
        metrics.set_etcd_state(EtcdState::Unreachable);
        Tracker {
            health,
            metrics,
            last_summary: Instant::now(),
            failures: 0,
            refused: None,
            #[cfg(test)]
            said: Vec::new(),
        }
    }

    pub fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> EtcdState {
        self.health().state
    }

    /// An etcd call failed with an error that says something about etcd
    /// as a whole (see `EtcdState::of`).
    pub fn failed(&mut self, e: &StoreError, pending: usize, now: Instant) {
        let Some(state) = EtcdState::of(e) else {
            return;
        };
        if matches!(
            state,
            EtcdState::RefusingWrites | EtcdState::PermissionDenied
        ) {
            self.refused = Some(e.clone());
        }
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let mut line = None;
        if h.state != state || h.last_error.is_none() {
            let was = if h.state == EtcdState::Ok || h.last_error.is_none() {
                String::new()
            } else {
                format!(
                    " (after {}s {})",
                    (now - h.since).as_secs(),
                    h.state.label()
                )
            };
            line = Some(format!(
                "{e}{was}; registrations stay queued and are retried ({pending} keys waiting)"
            ));
            h.state = state;
            h.since = now;
            self.failures = 0;
            self.last_summary = now;
            self.metrics.set_etcd_state(state);
        } else {
            self.failures += 1;
            if now.saturating_duration_since(self.last_summary) >= SUMMARY_EVERY {
                line = Some(format!(
                    "still {e}, for {}s: {} failed attempts since the last report, \
                     {pending} keys waiting",
                    (now - h.since).as_secs(),
                    self.failures
                ));
                self.failures = 0;
                self.last_summary = now;
            }
        }
        h.last_error = Some(e.to_string());
        drop(h);
        if let Some(line) = line {
            self.say(log::Level::Warn, line);
        }
    }

    /// A write succeeded: registrations are being stored.
    pub fn stored(&mut self, now: Instant) {
        self.refused = None;
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if h.state == EtcdState::Ok {
            return;
        }
        let line = match &h.last_error {
            None => "etcd answers".to_string(),
            Some(e) => format!(
                "etcd stores registrations again, after {}s of: {e}",
                (now - h.since).as_secs()
            ),
        };
        h.state = EtcdState::Ok;
        h.since = now;
        drop(h);
        self.metrics.set_etcd_state(EtcdState::Ok);
        self.say(log::Level::Info, line);
    }

    fn say(&mut self, level: log::Level, line: String) {
        log::log!(level, "{line}");
        #[cfg(test)]
        self.said.push(line);
    }

    /// A keepalive, grant or read succeeded. `pending` is the work waiting
    /// to be written, `held` the entries this instance holds.
    pub fn answered(&mut self, pending: usize, held: usize, now: Instant) {
        let state = self.state();
        if state == EtcdState::Ok || pending > 0 {
            // Nothing to clear, or the flush that follows decides.
            return;
        }
        // Refused writes are over only when a write succeeds; with nothing
        // to write and nothing held there is nothing to prove.
        match self.refused.clone() {
            Some(_) if held == 0 => self.stored(now),
            // etcd answers again, and its last word on writes stands.
            Some(refusal) if state.cleared_by_any_answer() => self.failed(&refusal, pending, now),
            Some(_) => {}
            None if state.cleared_by_any_answer() => self.stored(now),
            None => {}
        }
    }

    /// Publishes the worker's beat and queue.
    pub fn publish(
        &mut self,
        lease: Option<i64>,
        pending: usize,
        oldest_waiting: Option<Instant>,
        now: Instant,
    ) {
        self.metrics.set_pending_keys(pending);
        self.metrics.set_oldest_waiting(oldest_waiting);
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.lease = lease;
        h.pending = pending;
        h.oldest_waiting = oldest_waiting;
        h.beat = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker() -> Tracker {
        Tracker::new(Health::shared(Instant::now()), Arc::default())
    }

    const NOSPACE: &str = "database space exceeded (NOSPACE alarm)";

    #[test]
    fn a_condition_is_said_once_then_every_interval_then_once_over() {
        let mut t = tracker();
        let t0 = Instant::now();
        t.stored(t0);
        let nospace = StoreError::RefusingWrites(NOSPACE.into());
        // Refused every half second for 95 s.
        for ms in (0..95_000).step_by(500) {
            t.failed(&nospace, 1, t0 + Duration::from_millis(ms));
        }
        t.stored(t0 + Duration::from_secs(95));
        let said = &t.said;
        assert_eq!(said.len(), 6, "{said:#?}");
        assert_eq!(said[0], "etcd answers");
        assert_eq!(
            said[1],
            "etcd refuses writes: database space exceeded (NOSPACE alarm); \
             registrations stay queued and are retried (1 keys waiting)"
        );
        for (line, secs) in said[2..5].iter().zip([30, 60, 90]) {
            assert_eq!(
                *line,
                format!(
                    "still etcd refuses writes: database space exceeded (NOSPACE alarm), \
                     for {secs}s: 60 failed attempts since the last report, 1 keys waiting"
                )
            );
        }
        assert_eq!(
            said[5],
            "etcd stores registrations again, after 95s of: \
             etcd refuses writes: database space exceeded (NOSPACE alarm)"
        );
    }

    #[test]
    fn a_keepalive_does_not_clear_refused_writes() {
        let mut t = tracker();
        let now = Instant::now();
        t.stored(now);
        t.health().lease = Some(1);
        t.failed(&StoreError::RefusingWrites(NOSPACE.into()), 1, now);
        for _ in 0..10 {
            t.answered(1, 3, now);
            assert_eq!(t.state(), EtcdState::RefusingWrites);
            let v = t.health().verdict(now, Duration::from_secs(30));
            let why = v.expect_err("503 while writes are refused");
            assert!(
                why.starts_with("etcd refuses writes: database space exceeded (NOSPACE alarm)"),
                "{why}"
            );
        }
        // Nothing waiting any more, but entries held: still not proven.
        t.answered(0, 3, now);
        assert_eq!(t.state(), EtcdState::RefusingWrites);
        t.stored(now);
        assert_eq!(t.health().verdict(now, Duration::from_secs(30)), Ok(()));
    }

    #[test]
    fn unreachable_in_between_does_not_clear_refused_writes() {
        let mut t = tracker();
        let now = Instant::now();
        t.stored(now);
        t.failed(&StoreError::RefusingWrites(NOSPACE.into()), 0, now);
        t.failed(&StoreError::Unreachable("http2 error".into()), 0, now);
        assert_eq!(t.state(), EtcdState::Unreachable);
        t.answered(0, 3, now);
        assert_eq!(t.state(), EtcdState::RefusingWrites, "its last word stands");
        t.stored(now);
        t.failed(&StoreError::Unreachable("http2 error".into()), 0, now);
        t.answered(0, 3, now);
        assert_eq!(t.state(), EtcdState::Ok, "no refusal since the last write");
    }

    #[test]
    fn an_answer_clears_unreachable_only_with_nothing_waiting() {
        let mut t = tracker();
        let now = Instant::now();
        t.failed(&StoreError::Unreachable("down".into()), 2, now);
        t.answered(2, 2, now);
        assert_eq!(t.state(), EtcdState::Unreachable);
        t.answered(0, 2, now);
        assert_eq!(t.state(), EtcdState::Ok);
    }

    #[test]
    fn request_errors_leave_the_state_alone() {
        let mut t = tracker();
        let now = Instant::now();
        t.stored(now);
        t.failed(&StoreError::BadRequest("too large".into()), 0, now);
        t.failed(&StoreError::LeaseNotFound, 0, now);
        assert_eq!(t.state(), EtcdState::Ok);
    }

    #[test]
    fn a_silent_worker_is_unhealthy() {
        let now = Instant::now();
        let mut h = Health::new(now);
        h.state = EtcdState::Ok;
        h.lease = Some(1);
        let t = Duration::from_secs(30);
        assert_eq!(h.verdict(now + t, t), Ok(()));
        let why = h.verdict(now + t + Duration::from_secs(1), t).unwrap_err();
        assert_eq!(why, "the etcd worker has not run for 31s");
    }

    #[test]
    fn unreachable_keeps_its_operator_facing_wording() {
        let now = Instant::now();
        let mut h = Health::new(now);
        assert_eq!(
            h.verdict(now, Duration::from_secs(30)).unwrap_err(),
            "etcd unavailable for 0s: not reached yet (0 keys queued)"
        );
        h.last_error = Some(StoreError::Unreachable("tcp connect error".into()).to_string());
        h.pending = 2;
        h.oldest_waiting = Some(now);
        assert_eq!(
            h.verdict(now + Duration::from_secs(3), Duration::from_secs(30))
                .unwrap_err(),
            "etcd unavailable for 3s: tcp connect error (2 keys queued, oldest registration waiting 3s)"
        );
    }
}
