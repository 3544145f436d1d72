//! When to ping a client and when to give up on it, and how to tell that
//! skyapi itself stopped running for a while (a stall: SIGSTOP, a paused VM,
//! a swap storm, a debugger).
//!
//! Invariants:
//! - a client is dropped only when a ping that was actually sent has gone
//!   unanswered (nothing at all heard since) for `grace` = `--timeout` minus
//!   the ping interval; pings go out every `--timeout`/3, so a client that
//!   falls silent is dropped `--timeout` after it was last heard, and a live
//!   client gets at least two pings to answer;
//! - time this process did not run is never held against a client: a wait
//!   that ends much later than planned (by more than a ping interval) is a
//!   stall, after which the pings sent before it no longer count and a
//!   fresh one goes out at once;
//! - a stall is logged and counted once per process, however many threads
//!   notice it ([`Stalls`]).
//!
//! Pure logic on clock readings passed in, so it is unit tested without
//! sockets or sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a connection should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Send a ping now (then ask again).
    Ping,
    /// A ping sent has gone unanswered for the grace: the client is gone.
    Drop,
    /// Read until this instant at the latest, then ask again.
    WaitUntil(Instant),
}

/// One connection's ping schedule and what it has heard.
#[derive(Debug, Clone)]
pub struct Liveness {
    ping_every: Duration,
    grace: Duration,
    next_ping: Instant,
    /// When the oldest ping not followed by anything from the client was
    /// sent; `None` when nothing is outstanding.
    unanswered_since: Option<Instant>,
}

impl Liveness {
    pub fn new(timeout: Duration, now: Instant) -> Self {
        let ping_every = timeout / 3;
        Liveness {
            ping_every,
            grace: timeout - ping_every,
            next_ping: now + ping_every,
            unanswered_since: None,
        }
    }

    /// How long a ping sent may go unanswered before the client is dropped.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Anything from the client (a pong, a frame) proves it alive.
    pub fn heard(&mut self) {
        self.unanswered_since = None;
    }

    /// A ping went out at `now`.
    pub fn pinged(&mut self, now: Instant) {
        self.next_ping = now + self.ping_every;
        self.unanswered_since.get_or_insert(now);
    }

    /// Checks a wait that was planned to end at `planned` and ended at
    /// `now`. Ending later by more than a ping interval means this process
    /// did not run meanwhile: the client may have answered long ago, or
    /// never got a ping to answer, so the outstanding ping no longer counts
    /// and a fresh one is due now. Returns how late the wait ended, for a
    /// stall.
    pub fn woke(&mut self, planned: Instant, now: Instant) -> Option<Duration> {
        let late = now.saturating_duration_since(planned);
        if late <= self.ping_every {
            return None;
        }
        self.unanswered_since = None;
        self.next_ping = now;
        Some(late)
    }

    pub fn next(&self, now: Instant) -> Next {
        let give_up = self.unanswered_since.map(|sent| sent + self.grace);
        if give_up.is_some_and(|at| now >= at) {
            return Next::Drop;
        }
        if now >= self.next_ping {
            return Next::Ping;
        }
        Next::WaitUntil(give_up.map_or(self.next_ping, |at| at.min(self.next_ping)))
    }
}

/// Merges what several threads see of the same stall: two reports overlap
/// when one starts before the other ended (plus this slack, for threads
/// that resumed a little apart).
const SAME_STALL_SLACK: Duration = Duration::from_secs(1);

/// Process-wide record of stalls, for the log and `/metrics`.
#[derive(Default)]
pub struct Stalls {
    count: AtomicU64,
    nanos: AtomicU64,
    /// The span of the last stall counted.
    last: Mutex<Option<(Instant, Instant)>>,
}

impl Stalls {
    /// Reports that the caller did not run from `start` to `end`; true when
    /// this is a new stall (counted and logged here), false when another
    /// thread reported it already.
    pub fn record(&self, start: Instant, end: Instant, seen_by: &str) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, e)) = *last {
            if start <= e + SAME_STALL_SLACK && end + SAME_STALL_SLACK >= s {
                // The same stall seen by another thread: count the part of
                // it the first report did not cover.
                let (s2, e2) = (s.min(start), e.max(end));
                let grown = (e2 - s2).saturating_sub(e - s);
                self.nanos
                    .fetch_add(grown.as_nanos() as u64, Ordering::Relaxed);
                *last = Some((s2, e2));
                return false;
            }
        }
        *last = Some((start, end));
        let length = end.saturating_duration_since(start);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.nanos
            .fetch_add(length.as_nanos() as u64, Ordering::Relaxed);
        log::warn!(
            "skyapi itself did not run for {:.1}s (process stopped, host overloaded or VM \
             paused; noticed by {seen_by}): no client is dropped for it, each gets a fresh ping",
            length.as_secs_f64()
        );
        true
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn seconds(&self) -> f64 {
        self.nanos.load(Ordering::Relaxed) as f64 / 1e9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(30);
    const S: Duration = Duration::from_secs(1);

    /// Runs the schedule like the connection loop does, with a client that
    /// answers every ping `rtt` later, until `until`; returns the pings sent.
    fn pings_answered(l: &mut Liveness, mut now: Instant, until: Instant) -> usize {
        let mut pings = 0;
        while now < until {
            match l.next(now) {
                Next::Ping => {
                    l.pinged(now);
                    pings += 1;
                    now += Duration::from_millis(5);
                    l.heard();
                }
                Next::Drop => panic!("an answering client dropped"),
                Next::WaitUntil(at) => now = at,
            }
        }
        pings
    }

    #[test]
    fn an_answering_client_is_pinged_every_third_and_kept() {
        let t0 = Instant::now();
        let mut l = Liveness::new(T, t0);
        assert_eq!(l.next(t0), Next::WaitUntil(t0 + T / 3));
        // At 10 s, 20 s, ... 290 s.
        let pings = pings_answered(&mut l, t0, t0 + T * 10);
        assert_eq!(pings, 29);
    }

    #[test]
    fn a_silent_client_is_dropped_timeout_after_it_was_last_heard() {
        let t0 = Instant::now();
        let mut l = Liveness::new(T, t0);
        let mut now = t0;
        let mut pings = 0;
        loop {
            match l.next(now) {
                Next::Ping => {
                    l.pinged(now);
                    pings += 1;
                }
                Next::Drop => break,
                Next::WaitUntil(at) => now = at,
            }
        }
        assert_eq!(now, t0 + T, "dropped exactly --timeout after connecting");
        assert_eq!(pings, 2, "two chances to answer");
    }

    #[test]
    fn nothing_is_dropped_without_a_ping_sent() {
        let t0 = Instant::now();
        let l = Liveness::new(T, t0);
        // Long past --timeout, but no ping ever went out: ping, not drop.
        assert_eq!(l.next(t0 + T * 5), Next::Ping);
    }

    #[test]
    fn a_stall_voids_the_outstanding_ping_and_asks_for_a_fresh_one() {
        let t0 = Instant::now();
        let mut l = Liveness::new(T, t0);
        let ping_at = t0 + T / 3;
        assert_eq!(l.next(ping_at), Next::Ping);
        l.pinged(ping_at);
        // The process stops right after the ping for T + 2 s; the answer
        // sits unread in the socket.
        let planned = match l.next(ping_at) {
            Next::WaitUntil(at) => at,
            other => panic!("{other:?}"),
        };
        let resumed = ping_at + T + 2 * S;
        assert!(resumed > planned + T / 3);
        let late = l.woke(planned, resumed).expect("a stall");
        assert_eq!(late, resumed - planned);
        assert_eq!(l.next(resumed), Next::Ping, "a fresh ping, not a drop");
        l.pinged(resumed);
        // Silent from here on: dropped only after the usual grace, with one
        // more ping on the way.
        let mut now = resumed;
        let mut pings = 0;
        loop {
            match l.next(now) {
                Next::Ping => {
                    l.pinged(now);
                    pings += 1;
                }
                Next::Drop => break,
                Next::WaitUntil(at) => now = at,
            }
        }
        assert_eq!(now, resumed + (T - T / 3));
        assert_eq!(pings, 1);
    }

    #[test]
    fn an_ordinary_late_wake_is_not_a_stall() {
        let t0 = Instant::now();
        let mut l = Liveness::new(T, t0);
        assert_eq!(l.woke(t0, t0 + T / 3), None);
        assert_eq!(l.woke(t0 + S, t0), None, "early wake");
    }

    #[test]
    fn one_stall_seen_by_many_threads_is_counted_once() {
        let s = Stalls::default();
        let t0 = Instant::now();
        assert!(s.record(t0, t0 + 10 * S, "a"));
        assert!(!s.record(t0 + 2 * S, t0 + 10 * S, "b"));
        assert!(!s.record(t0 - S, t0 + 10 * S + S / 2, "c"));
        assert_eq!(s.count(), 1);
        assert!((s.seconds() - 11.5).abs() < 1e-6, "{}", s.seconds());
        // A later one is a new stall.
        assert!(s.record(t0 + 60 * S, t0 + 65 * S, "a"));
        assert_eq!(s.count(), 2);
    }
}
