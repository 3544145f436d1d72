//! The chaos run's parts (`tests/chaos.rs`, issue 11 part 3): a seeded
//! PRNG ([`Rng`]), the fault schedule it draws ([`schedule`]), the promise's
//! bounds as the README and issues 9 and 11 state them ([`Bounds`]), the
//! checker that compares etcd with the set of live clients ([`Ledger`]),
//! a reader of etcd's JSON gateway cheap enough to poll every 100 ms
//! ([`EtcdReader`]), and a websocket provider that behaves as a
//! well-made client does ([`WsClient`]). The TCP proxy that partitions an
//! instance from etcd is [`super::faults::TcpProxy`].
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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::handshake::client::ClientHandshake;
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Error as WsError, Message};

use super::client::{is_timeout, Ws};
use super::etcd::base64_decode;
use super::sha1_hex;

// ---------------------------------------------------------------------------
// The PRNG

/// splitmix64: tiny, fast, and the same sequence on every machine.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `[lo, hi]`, to the millisecond.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let (lo, hi) = (lo.as_millis() as u64, hi.as_millis() as u64);
        Duration::from_millis(lo + self.next_u64() % (hi - lo + 1))
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    /// An independent stream for a sub-task (a client's reconnect jitter).
    pub fn fork(&mut self) -> Rng {
        Rng(self.next_u64())
    }
}

/// A seed when none is given: the clock and the pid.
pub fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    Rng::new(nanos ^ (u64::from(std::process::id()) << 40)).next_u64() % 1_000_000_000
}

// ---------------------------------------------------------------------------
// The promised bounds

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

// ---------------------------------------------------------------------------
// The schedule

/// How a websocket client leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseHow {
    /// A close frame (1000) and the close handshake.
    Clean,
    /// TCP FIN without a close frame.
    Fin,
    /// TCP RST (SO_LINGER 0).
    Reset,
    /// Stops reading and writing; the socket stays open (the kernel still
    /// ACKs): a frozen or black-holed peer.
    HalfOpen,
}

/// One thing the run does. Etcd and instance actions are whole episodes
/// (the fault and its end); their lanes block for the episode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// SIGKILL one etcd member, restart it after `down`.
    KillMember { member: usize, down: Duration },
    /// SIGKILL two of the three members (quorum lost), restart both after `down`.
    LoseQuorum { members: [usize; 2], down: Duration },
    /// Stop forwarding between instance `inst` and every etcd member for `length`.
    Partition { inst: usize, length: Duration },
    /// SIGSTOP instance `inst` for `length` (beyond `--timeout`), then SIGCONT.
    Stall { inst: usize, length: Duration },
    /// SIGTERM (or SIGKILL) instance `inst`; start it again on the same
    /// port `pause` after it exited.
    Restart {
        inst: usize,
        kill: bool,
        pause: Duration,
    },
    /// A new websocket provider, first at instance `inst`.
    NewWs { client: usize, inst: usize },
    /// Websocket provider `client` leaves.
    CloseWs { client: usize, how: CloseHow },
    /// Websocket provider `client` registers at instance `to`, then closes
    /// its old connection (`how`: Clean or Fin).
    MoveWs {
        client: usize,
        to: usize,
        how: CloseHow,
    },
    /// A `skyapi provide` sidecar listing both instances, `first` first.
    NewSidecar { sidecar: usize, first: usize },
    /// SIGSTOP sidecar (its process freezes).
    StopSidecar { sidecar: usize },
    /// SIGCONT sidecar.
    ContSidecar { sidecar: usize },
    /// SIGTERM sidecar (it closes with 1000 and exits).
    TermSidecar { sidecar: usize },
}

impl Action {
    /// The counter this action adds to in the report.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::KillMember { .. } => "etcd member killed",
            Action::LoseQuorum { .. } => "etcd quorum lost",
            Action::Partition { .. } => "skyapi partitioned",
            Action::Stall { .. } => "skyapi stalled",
            Action::Restart { kill: false, .. } => "skyapi SIGTERM restart",
            Action::Restart { kill: true, .. } => "skyapi SIGKILL restart",
            Action::NewWs { .. } => "client connect",
            Action::CloseWs {
                how: CloseHow::Clean,
                ..
            } => "client clean close",
            Action::CloseWs {
                how: CloseHow::Fin, ..
            } => "client abrupt close (FIN)",
            Action::CloseWs {
                how: CloseHow::Reset,
                ..
            } => "client abrupt close (RST)",
            Action::CloseWs {
                how: CloseHow::HalfOpen,
                ..
            } => "client half-open",
            Action::MoveWs { .. } => "client moved",
            Action::NewSidecar { .. } => "sidecar started",
            Action::StopSidecar { .. } => "sidecar SIGSTOP",
            Action::ContSidecar { .. } => "sidecar SIGCONT",
            Action::TermSidecar { .. } => "sidecar SIGTERM",
        }
    }

    /// Which thread runs it.
    pub fn lane(&self) -> Lane {
        match self {
            Action::KillMember { .. } | Action::LoseQuorum { .. } => Lane::Etcd,
            Action::Partition { .. } | Action::Stall { .. } | Action::Restart { .. } => {
                Lane::Skyapi
            }
            _ => Lane::Clients,
        }
    }

    /// Whether it counts as a fault in the summary (the SIGCONT ending a
    /// sidecar's SIGSTOP does not; nor do the initial clients).
    pub fn is_fault(&self) -> bool {
        !matches!(self, Action::ContSidecar { .. })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Lane {
    Etcd,
    Skyapi,
    Clients,
}

/// An action and when (from the start of the run) it is due.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub at: Duration,
    pub action: Action,
}

/// Clients present from the start (websocket providers, sidecars).
pub const INITIAL_WS: usize = 8;
pub const INITIAL_SIDECARS: usize = 3;
/// Population limits for the churn, so the load stays modest.
const MAX_WS: usize = 14;
const MIN_WS: usize = 4;
const MAX_SIDECARS: usize = 4;

/// Draws the whole run from `seed`: three lanes (etcd, skyapi, clients),
/// each a sequence of episodes with gaps, sorted by time. Within a lane
/// episodes never overlap, so at most one instance and at most one etcd
/// fault are in progress at a time (quorum is lost for at most 3 s).
pub fn schedule(seed: u64, run: Duration, timeout: Duration) -> Vec<Step> {
    let mut rng = Rng::new(seed);
    let mut steps = Vec::new();
    let s = Duration::from_secs;
    let ms = Duration::from_millis;

    // etcd lane: a member killed (2-6 s), sometimes two (quorum, 1-3 s).
    let mut etcd_rng = rng.fork();
    let mut at = etcd_rng.between(s(2), s(6));
    while at < run {
        let action = if etcd_rng.chance(25) {
            let a = etcd_rng.below(3);
            let b = (a + 1 + etcd_rng.below(2)) % 3;
            Action::LoseQuorum {
                members: [a, b],
                down: etcd_rng.between(s(1), s(3)),
            }
        } else {
            Action::KillMember {
                member: etcd_rng.below(3),
                down: etcd_rng.between(s(1), s(6)),
            }
        };
        let down = match &action {
            Action::KillMember { down, .. } | Action::LoseQuorum { down, .. } => *down,
            _ => unreachable!(),
        };
        steps.push(Step { at, action });
        // The restart itself takes a second or two; then a gap.
        at += down + s(2) + etcd_rng.between(s(2), s(8));
    }

    // skyapi lane: one instance at a time is partitioned, stalled or restarted.
    let mut sky_rng = rng.fork();
    let mut at = sky_rng.between(s(3), s(8));
    while at < run {
        let inst = sky_rng.below(2);
        let (action, length) = match sky_rng.below(4) {
            0 => {
                let length = sky_rng.between(s(1), timeout * 2 + s(2));
                (Action::Partition { inst, length }, length)
            }
            1 => {
                let length = timeout + sky_rng.between(s(1), s(3));
                (Action::Stall { inst, length }, length)
            }
            k => {
                let pause = sky_rng.between(ms(0), ms(1500));
                // Exit (up to 1 s) and start-up (up to a few s) come on top.
                (
                    Action::Restart {
                        inst,
                        kill: k == 3,
                        pause,
                    },
                    pause + s(3),
                )
            }
        };
        steps.push(Step { at, action });
        at += length + sky_rng.between(s(3), s(8));
    }

    // clients lane: the initial population, then churn every 0.3-1.5 s.
    let mut cl_rng = rng.fork();
    let mut live_ws: Vec<usize> = Vec::new();
    let mut next_ws = 0;
    for _ in 0..INITIAL_WS {
        steps.push(Step {
            at: Duration::ZERO,
            action: Action::NewWs {
                client: next_ws,
                inst: next_ws % 2,
            },
        });
        live_ws.push(next_ws);
        next_ws += 1;
    }
    // Sidecars: running (true) or stopped, by number; `None` once gone.
    let mut sidecars: Vec<Option<bool>> = Vec::new();
    for i in 0..INITIAL_SIDECARS {
        steps.push(Step {
            at: Duration::ZERO,
            action: Action::NewSidecar {
                sidecar: i,
                first: i % 2,
            },
        });
        sidecars.push(Some(true));
    }
    // SIGCONTs due later: (at, sidecar).
    let mut conts: Vec<(Duration, usize)> = Vec::new();
    let mut at = s(1);
    while at < run {
        // Due SIGCONTs first, in order.
        conts.sort();
        while let Some(&(due, sc)) = conts.first() {
            if due > at {
                break;
            }
            conts.remove(0);
            steps.push(Step {
                at: due,
                action: Action::ContSidecar { sidecar: sc },
            });
            sidecars[sc] = Some(true);
        }
        let running: Vec<usize> = (0..sidecars.len())
            .filter(|&i| sidecars[i] == Some(true))
            .collect();
        let present = sidecars.iter().filter(|s| s.is_some()).count();
        let action = match cl_rng.below(10) {
            0 | 1 if live_ws.len() < MAX_WS => {
                let client = next_ws;
                next_ws += 1;
                live_ws.push(client);
                Some(Action::NewWs {
                    client,
                    inst: cl_rng.below(2),
                })
            }
            2..=4 if live_ws.len() > MIN_WS => {
                let client = live_ws.remove(cl_rng.below(live_ws.len()));
                let how = [
                    CloseHow::Clean,
                    CloseHow::Fin,
                    CloseHow::Reset,
                    CloseHow::HalfOpen,
                ][cl_rng.below(4)];
                Some(Action::CloseWs { client, how })
            }
            5 | 6 if !live_ws.is_empty() => Some(Action::MoveWs {
                client: live_ws[cl_rng.below(live_ws.len())],
                to: cl_rng.below(2),
                how: [CloseHow::Clean, CloseHow::Fin][cl_rng.below(2)],
            }),
            7 if !running.is_empty() => {
                let sc = running[cl_rng.below(running.len())];
                sidecars[sc] = Some(false);
                conts.push((at + cl_rng.between(ms(500), timeout * 2), sc));
                Some(Action::StopSidecar { sidecar: sc })
            }
            8 if present < MAX_SIDECARS => {
                sidecars.push(Some(true));
                Some(Action::NewSidecar {
                    sidecar: sidecars.len() - 1,
                    first: cl_rng.below(2),
                })
            }
            9 if running.len() > 1 => {
                let sc = running[cl_rng.below(running.len())];
                sidecars[sc] = None;
                Some(Action::TermSidecar { sidecar: sc })
            }
            _ => None,
        };
        if let Some(action) = action {
            steps.push(Step { at, action });
        }
        at += cl_rng.between(ms(300), ms(1500));
    }
    // A stopped sidecar is always continued, even past the end of the run.
    conts.sort();
    for (due, sc) in conts {
        steps.push(Step {
            at: due,
            action: Action::ContSidecar { sidecar: sc },
        });
    }
    steps.sort_by_key(|st| (st.at, st.action.lane()));
    steps
}

/// `+  12.345 s  ` and a description of the step.
pub fn describe(step: &Step) -> String {
    format!("+{:8.3} s  {:?}", step.at.as_secs_f64(), step.action)
}

// ---------------------------------------------------------------------------
// What a client's entry must be

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

// ---------------------------------------------------------------------------
// The checker

/// Who an excuse covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every client (etcd itself is at fault).
    Etcd,
    /// The clients instance `n` was responsible for during the fault.
    Instance(usize),
}

/// A fault that lets the promise bend, and by how much: the README's
/// allowance counted from the fault's end.
#[derive(Clone, Debug)]
pub struct Excuse {
    pub what: String,
    pub scope: Scope,
    pub start: Instant,
    /// `None` while it lasts.
    pub end: Option<Instant>,
    /// How long after the end a live client's entry may still be missing;
    /// `None`: this fault never excuses an absence.
    pub absence_after: Option<Duration>,
    /// The absence allowance only covers clients not yet registered on their
    /// current connection (etcd trouble delays writes; it deletes nothing).
    pub registering_only: bool,
    /// How long after the end a dead client's entry may still be there;
    /// `None`: no allowance beyond [`Bounds::stale`].
    pub stale_after: Option<Duration>,
    /// Whether the instance may end its clients' connections (a restart).
    pub drops: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ViolationKind {
    /// A live client without its entry beyond the bound.
    Absent,
    /// An entry without a live client beyond the bound.
    Stale,
    /// A key of no client, or two keys for one client.
    Duplicate,
    /// A value other than the one the client asked for.
    WrongValue,
    /// A live, answering client's connection ended by skyapi outside a
    /// restart of that instance.
    Dropped,
    /// A registration refused (`ERROR:`).
    Refused,
    /// An instance that did not stop as the README says (SIGTERM: exit 0
    /// within 1 s).
    Exit,
}

#[derive(Clone, Debug)]
pub struct Violation {
    pub kind: ViolationKind,
    pub client: String,
    pub first: Instant,
    /// The last observation that still showed it.
    pub last: Instant,
    /// The first observation that no longer showed it.
    pub ended: Option<Instant>,
    pub samples: usize,
    pub note: String,
}

impl Violation {
    /// How long it lasted, to the first observation without it.
    pub fn duration(&self) -> Duration {
        self.ended.unwrap_or(self.last) - self.first
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientKind {
    /// A websocket provider in the test process: its connections are known.
    Ws,
    /// A `skyapi provide` process listing both instances: seen from
    /// outside, so every instance is taken as responsible for it and it is
    /// never taken as registered (the lenient side of each rule).
    Sidecar,
}

#[derive(Clone, Debug)]
struct Attachment {
    inst: usize,
    from: Instant,
    to: Option<Instant>,
}

#[derive(Clone, Debug)]
struct ClientRec {
    kind: ClientKind,
    key: String,
    value: Value,
    live: bool,
    died_at: Option<Instant>,
    /// A live client's entry may be missing until then (its own start,
    /// return, or reconnect after an unexcused drop).
    grace_until: Instant,
    /// Welcomed on its current connection.
    registered: bool,
    attached: Vec<Attachment>,
    /// The first observation of the current absence (live clients).
    absent_since: Option<Instant>,
    /// The Absent or Stale violation being extended.
    open: Option<usize>,
    wrong_open: Option<usize>,
}

/// The promise's book-keeping: clients and their states, the faults in
/// progress, and what the checker saw. Shared by the lanes, the clients and
/// the checker behind one mutex ([`SharedLedger`]).
pub struct Ledger {
    pub bounds: Bounds,
    pub start: Instant,
    clients: BTreeMap<String, ClientRec>,
    by_key: BTreeMap<String, String>,
    excuses: Vec<Excuse>,
    violations: Vec<Violation>,
    /// The open "etcd did not answer the checker" excuse.
    unanswered: Option<usize>,
    /// etcd's raft term at the last answered read, and when that was.
    term: Option<(u64, Instant)>,
    foreign_reported: BTreeSet<String>,
    pub max_absence: Duration,
    pub max_staleness: Duration,
    pub samples: usize,
    pub failed_samples: usize,
}

pub type SharedLedger = Arc<Mutex<Ledger>>;

pub fn lock(ledger: &SharedLedger) -> MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(|p| p.into_inner())
}

impl Ledger {
    pub fn new(bounds: Bounds, start: Instant) -> Ledger {
        Ledger {
            bounds,
            start,
            clients: BTreeMap::new(),
            by_key: BTreeMap::new(),
            excuses: Vec::new(),
            violations: Vec::new(),
            unanswered: None,
            term: None,
            foreign_reported: BTreeSet::new(),
            max_absence: Duration::ZERO,
            max_staleness: Duration::ZERO,
            samples: 0,
            failed_samples: 0,
        }
    }

    fn offset(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.start).as_secs_f64()
    }

    /// A new client, live from `now`, whose entry may be missing for `grace`.
    pub fn add_client(
        &mut self,
        label: &str,
        kind: ClientKind,
        port: u16,
        weight: u16,
        now: Instant,
        grace: Duration,
    ) {
        let key = key_of(port);
        let attached = match kind {
            ClientKind::Ws => Vec::new(),
            ClientKind::Sidecar => (0..2)
                .map(|inst| Attachment {
                    inst,
                    from: now,
                    to: None,
                })
                .collect(),
        };
        self.by_key.insert(key.clone(), label.to_string());
        self.clients.insert(
            label.to_string(),
            ClientRec {
                kind,
                key,
                value: value_of(port, weight, self.bounds.timeout),
                live: true,
                died_at: None,
                grace_until: now + grace,
                registered: false,
                attached: Vec::new(),
                absent_since: None,
                open: None,
                wrong_open: None,
            },
        );
        self.client(label).attached = attached;
    }

    fn client(&mut self, label: &str) -> &mut ClientRec {
        self.clients
            .get_mut(label)
            .unwrap_or_else(|| panic!("no chaos client {label}"))
    }

    /// The client is gone (closed, half-open, frozen) from `now`: recorded
    /// *before* the act.
    pub fn die(&mut self, label: &str, now: Instant) {
        let c = self.client(label);
        c.live = false;
        c.died_at = Some(now);
        c.registered = false;
        c.absent_since = None;
        c.open = None;
    }

    /// A frozen client is thawed: live again, its entry due within `grace`.
    pub fn revive(&mut self, label: &str, now: Instant, grace: Duration) {
        let c = self.client(label);
        c.live = true;
        c.died_at = None;
        c.grace_until = now + grace;
        c.open = None;
    }

    /// A websocket client starts connecting to instance `inst`.
    pub fn attach(&mut self, label: &str, inst: usize, now: Instant) {
        self.client(label).attached.push(Attachment {
            inst,
            from: now,
            to: None,
        });
    }

    /// Its connection to `inst` ended (or was abandoned).
    pub fn detach(&mut self, label: &str, inst: usize, now: Instant) {
        if let Some(a) = self
            .client(label)
            .attached
            .iter_mut()
            .rev()
            .find(|a| a.inst == inst && a.to.is_none())
        {
            a.to = Some(now);
        }
    }

    /// Welcomed (or not any more) on its current connection.
    pub fn set_registered(&mut self, label: &str, registered: bool) {
        self.client(label).registered = registered;
    }

    /// Its connection to `inst` was ended by the server at `now` (`how`:
    /// the close frame or the error). A violation unless that instance was
    /// being restarted. The client reconnects; its entry is due at once
    /// after an excused drop (issue 9: zero gap), and within
    /// [`Bounds::pending`] after an unexcused one (already counted).
    pub fn dropped(&mut self, label: &str, inst: usize, now: Instant, how: &str) {
        let excused = self.excuses.iter().any(|e| {
            e.drops
                && e.scope == Scope::Instance(inst)
                && e.start <= now
                && e.end.is_none_or(|end| now <= end + Duration::from_secs(1))
        });
        let pending = self.bounds.pending();
        let c = self.client(label);
        c.registered = false;
        if !excused {
            c.grace_until = c.grace_until.max(now + pending);
            self.record(
                ViolationKind::Dropped,
                label,
                now,
                format!("instance {} ended the connection: {how}", name(inst)),
            );
        }
        self.detach(label, inst, now);
    }

    /// A refusal (`ERROR:`) from instance `inst`.
    pub fn refused(&mut self, label: &str, inst: usize, now: Instant, text: &str) {
        self.record(
            ViolationKind::Refused,
            label,
            now,
            format!("instance {}: {text}", name(inst)),
        );
    }

    /// Instance `inst` did not stop as promised.
    pub fn bad_exit(&mut self, inst: usize, now: Instant, note: String) {
        self.record(
            ViolationKind::Exit,
            &format!("skyapi {}", name(inst)),
            now,
            note,
        );
    }

    /// Opens an excuse; returns its handle for [`end_excuse`](Self::end_excuse).
    pub fn begin_excuse(&mut self, e: Excuse) -> usize {
        self.excuses.push(e);
        self.excuses.len() - 1
    }

    pub fn end_excuse(&mut self, handle: usize, now: Instant) {
        self.excuses[handle].end = Some(now);
    }

    /// The excuses so far (for the report).
    pub fn excuses(&self) -> &[Excuse] {
        &self.excuses
    }

    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    fn record(&mut self, kind: ViolationKind, client: &str, at: Instant, note: String) -> usize {
        self.violations.push(Violation {
            kind,
            client: client.to_string(),
            first: at,
            last: at,
            ended: None,
            samples: 1,
            note,
        });
        self.violations.len() - 1
    }

    fn extend(&mut self, v: usize, at: Instant) {
        let v = &mut self.violations[v];
        v.last = at;
        v.samples += 1;
    }

    fn close(&mut self, v: Option<usize>, at: Instant) {
        if let Some(v) = v {
            self.violations[v].ended.get_or_insert(at);
        }
    }

    /// Whether excuse `e` covers client `c` at all: etcd faults cover
    /// everyone; an instance fault covers the clients that instance was
    /// responsible for while it lasted, i.e. attached to it, or detached
    /// less than T before (an entry stays on an instance's lease up to T
    /// after the connection ended).
    fn covers(bounds: &Bounds, c: &ClientRec, e: &Excuse, now: Instant) -> bool {
        match e.scope {
            Scope::Etcd => true,
            Scope::Instance(inst) => {
                let e_end = e.end.unwrap_or(now);
                c.attached.iter().any(|a| {
                    a.inst == inst
                        && a.from <= e_end
                        && a.to.is_none_or(|to| to + bounds.timeout >= e.start)
                })
            }
        }
    }

    /// Whether a live client's missing entry at `t` is within the promise.
    fn absence_excused(&self, c: &ClientRec, t: Instant) -> bool {
        if t <= c.grace_until {
            return true;
        }
        self.excuses.iter().any(|e| {
            let Some(after) = e.absence_after else {
                return false;
            };
            if e.registering_only && c.registered {
                return false;
            }
            Self::covers(&self.bounds, c, e, t) && e.start <= t && t <= e.end.unwrap_or(t) + after
        })
    }

    /// Until when a dead client's entry may stay: T + 1 s after its death,
    /// pushed out by every fault covering it that overlaps that window (its
    /// end plus the fault's own allowance), to a fixed point.
    fn stale_deadline(&self, c: &ClientRec, now: Instant) -> Instant {
        let died = c.died_at.unwrap_or(now);
        let mut deadline = died + self.bounds.stale();
        loop {
            let mut grew = false;
            for e in &self.excuses {
                let Some(after) = e.stale_after else { continue };
                let end = e.end.unwrap_or(now);
                if Self::covers(&self.bounds, c, e, now) && e.start <= deadline && end >= died {
                    let candidate = end + after;
                    if candidate > deadline {
                        deadline = candidate;
                        grew = true;
                    }
                }
            }
            if !grew {
                return deadline;
            }
        }
    }

    /// etcd did not answer the checker (no member, within the read timeout)
    /// at `t`: etcd is unavailable from here until it answers again, which
    /// excuses pending writes for [`Bounds::pending`] after.
    pub fn unanswered(&mut self, t: Instant, why: &str) {
        self.failed_samples += 1;
        if self.unanswered.is_none() {
            let bounds = self.bounds;
            self.unanswered = Some(self.begin_excuse(Excuse {
                what: format!("etcd did not answer the checker ({why})"),
                scope: Scope::Etcd,
                start: t,
                end: None,
                absence_after: Some(bounds.pending()),
                registering_only: true,
                stale_after: Some(bounds.pending()),
                drops: false,
            }));
        }
    }

    /// The raft term an answered read at `t` reported. A higher term than
    /// the last read's means etcd elected a leader in between, which gave
    /// every lease a fresh TTL ([`Bounds::after_election`]) and held writes
    /// up ([`Bounds::pending`]).
    pub fn saw_term(&mut self, t: Instant, term: u64) {
        if let Some((last, at)) = self.term {
            if term > last {
                let bounds = self.bounds;
                self.begin_excuse(Excuse {
                    what: format!("etcd elected a leader (term {last} to {term})"),
                    scope: Scope::Etcd,
                    start: at,
                    end: Some(t),
                    absence_after: Some(bounds.pending()),
                    registering_only: true,
                    stale_after: Some(bounds.after_election()),
                    drops: false,
                });
            }
        }
        if self.term.is_none_or(|(last, _)| term >= last) {
            self.term = Some((term, t));
        }
    }

    /// One snapshot of every key under the root, read at or after `t`:
    /// `(key, value)`.
    pub fn observe(&mut self, t: Instant, kvs: &[(String, String)]) {
        self.samples += 1;
        if let Some(h) = self.unanswered.take() {
            self.end_excuse(h, t);
        }
        let mut present: BTreeSet<&str> = BTreeSet::new();
        let mut ports: BTreeMap<i64, &str> = BTreeMap::new();
        let mut findings: Vec<(ViolationKind, String, String)> = Vec::new();
        for (k, v) in kvs {
            present.insert(k.as_str());
            let parsed: Option<Value> = serde_json::from_str(v).ok();
            if let Some(port) = parsed.as_ref().and_then(|p| p["port"].as_i64()) {
                if let Some(other) = ports.insert(port, k) {
                    findings.push((
                        ViolationKind::Duplicate,
                        format!("port {port}"),
                        format!("two keys for one provider: {other} and {k}"),
                    ));
                }
            }
            match self.by_key.get(k) {
                None => findings.push((
                    ViolationKind::Duplicate,
                    k.clone(),
                    format!("a key of no client: {k} = {v}"),
                )),
                Some(label) => {
                    let c = &self.clients[label];
                    if parsed.as_ref() != Some(&c.value) {
                        findings.push((
                            ViolationKind::WrongValue,
                            label.clone(),
                            format!("{v} instead of {}", c.value),
                        ));
                    }
                }
            }
        }
        let mut wrong_now: BTreeSet<String> = BTreeSet::new();
        for (kind, who, note) in findings {
            match kind {
                ViolationKind::WrongValue => {
                    wrong_now.insert(who.clone());
                    match self.clients[&who].wrong_open {
                        Some(v) => self.extend(v, t),
                        None => {
                            let v = self.record(kind, &who, t, note);
                            self.client(&who).wrong_open = Some(v);
                        }
                    }
                }
                _ => {
                    if self.foreign_reported.insert(note.clone()) {
                        self.record(kind, &who, t, note);
                    }
                }
            }
        }
        let labels: Vec<String> = self.clients.keys().cloned().collect();
        for label in labels {
            let c = &self.clients[&label];
            if !wrong_now.contains(&label) {
                let open = c.wrong_open;
                self.close(open, t);
                self.client(&label).wrong_open = None;
            }
            let c = &self.clients[&label];
            let here = present.contains(c.key.as_str());
            if c.live {
                if here {
                    let open = c.open;
                    self.close(open, t);
                    let c = self.client(&label);
                    c.open = None;
                    if let Some(since) = c.absent_since.take() {
                        self.max_absence = self.max_absence.max(t - since);
                    }
                    continue;
                }
                let since = *self.client(&label).absent_since.get_or_insert(t);
                self.max_absence = self.max_absence.max(t - since);
                let c = &self.clients[&label];
                if self.absence_excused(c, t) {
                    let open = c.open;
                    self.close(open, t);
                    self.client(&label).open = None;
                } else if let Some(v) = c.open {
                    self.extend(v, t);
                } else {
                    let note = format!(
                        "live client without its entry since +{:.1} s{}",
                        self.offset(since),
                        if c.registered { " (registered)" } else { "" }
                    );
                    let v = self.record(ViolationKind::Absent, &label, t, note);
                    self.client(&label).open = Some(v);
                }
            } else if here {
                let died = c.died_at.unwrap_or(t);
                self.max_staleness = self.max_staleness.max(t.saturating_duration_since(died));
                if t > self.stale_deadline(c, t) {
                    match c.open {
                        Some(v) => self.extend(v, t),
                        None => {
                            let note =
                                format!("entry of a client gone since +{:.1} s", self.offset(died));
                            let v = self.record(ViolationKind::Stale, &label, t, note);
                            self.client(&label).open = Some(v);
                        }
                    }
                }
            } else {
                let open = c.open;
                self.close(open, t);
                self.client(&label).open = None;
            }
        }
    }

    /// The faults in progress at `t`, named, for a violation's context.
    pub fn faults_at(&self, t: Instant) -> Vec<String> {
        self.excuses
            .iter()
            .filter(|e| e.start <= t + Duration::from_secs(1))
            .filter(|e| {
                e.end.is_none_or(|end| {
                    end + e
                        .absence_after
                        .unwrap_or_default()
                        .max(Duration::from_secs(1))
                        >= t
                })
            })
            .map(|e| format!("{} [+{:.1} s]", e.what, self.offset(e.start)))
            .collect()
    }

    /// One line per violation, with the faults around it.
    pub fn describe_violations(&self) -> String {
        let mut out = String::new();
        for v in &self.violations {
            // Why ignored: writing to a String cannot fail.
            let id = self.clients.get(&v.client).map_or(String::new(), |c| {
                let id = c.key.rsplit('/').next().unwrap_or("");
                format!(" (id {})", &id[..id.len().min(12)])
            });
            let _ = writeln!(
                out,
                "  {:?} {}{id} at +{:.1} s for {:.1} s ({} samples): {}; faults around: {}",
                v.kind,
                v.client,
                self.offset(v.first),
                v.duration().as_secs_f64(),
                v.samples,
                v.note,
                {
                    let f = self.faults_at(v.first);
                    if f.is_empty() {
                        "none".to_string()
                    } else {
                        f.join(", ")
                    }
                }
            );
        }
        out
    }
}

/// `A` or `B`.
pub fn name(inst: usize) -> char {
    (b'A' + inst as u8) as char
}

// ---------------------------------------------------------------------------
// Reading etcd

/// Reads every key under a prefix through etcd's JSON gateway
/// (`POST /v3/kv/range`, a linearizable read) with plain sockets: cheap
/// enough to poll every 100 ms, where an `etcdctl` process per read would
/// cost a core. Tries the members in turn, starting with the last that
/// answered.
pub struct EtcdReader {
    ports: Vec<u16>,
    next: usize,
    pub timeout: Duration,
}

impl EtcdReader {
    pub fn new(ports: Vec<u16>) -> EtcdReader {
        EtcdReader {
            ports,
            next: 0,
            timeout: Duration::from_secs(1),
        }
    }

    /// The raft term and `(key, value)` of every key under `prefix`, or why
    /// no member answered.
    pub fn read(&mut self, prefix: &str) -> Result<(u64, Vec<(String, String)>), String> {
        let mut why = Vec::new();
        for i in 0..self.ports.len() {
            let n = (self.next + i) % self.ports.len();
            match range(self.ports[n], prefix, self.timeout) {
                Ok(kvs) => {
                    self.next = n;
                    return Ok(kvs);
                }
                Err(e) => why.push(format!("{}: {e}", self.ports[n])),
            }
        }
        Err(why.join("; "))
    }
}

/// Standard base64 with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The end of etcd's range for `prefix`: the prefix with its last byte + 1.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    let last = end.pop().expect("non-empty prefix");
    end.push(last + 1);
    end
}

fn range(
    port: u16,
    prefix: &str,
    timeout: Duration,
) -> Result<(u64, Vec<(String, String)>), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_millis(300)).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + timeout;
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    let body = json!({"key": base64_encode(prefix.as_bytes()),
                      "range_end": base64_encode(&prefix_end(prefix))})
    .to_string();
    // HTTP/1.0: Go's server then neither chunks nor keeps the connection.
    write!(
        s,
        "POST /v3/kv/range HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e.to_string()),
        }
        if Instant::now() >= deadline {
            return Err(format!("no answer within {timeout:?}"));
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not HTTP: {text:?}"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "{}: {}",
            head.lines().next().unwrap_or(""),
            body.trim()
        ));
    }
    let doc: Value = serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))?;
    let field = |kv: &Value, name: &str| -> Result<String, String> {
        let b64 = kv[name].as_str().unwrap_or("");
        base64_decode(b64)
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| format!("bad {name} in {kv}"))
    };
    // The gateway writes 64-bit numbers as strings.
    let term = doc["header"]["raft_term"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| format!("no raft_term in {}", doc["header"]))?;
    let kvs = doc["kvs"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|kv| Ok((field(kv, "key")?, field(kv, "value")?)))
        .collect::<Result<_, String>>()?;
    Ok((term, kvs))
}

// ---------------------------------------------------------------------------
// A websocket provider

/// What the run tells a websocket provider to do.
#[derive(Clone, Copy, Debug)]
pub enum Cmd {
    Close(CloseHow),
    Move { to: usize, how: CloseHow },
}

/// One connection of a provider.
enum Slot {
    Idle,
    Handshaking {
        mid: MidHandshake<ClientHandshake<TcpStream>>,
        inst: usize,
        since: Instant,
    },
    Open {
        ws: Ws,
        inst: usize,
        welcomed: bool,
    },
}

/// How long a handshake (a stalled instance accepts TCP but answers
/// nothing) may take before the next instance is tried.
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(5);
/// The read timeout of every client socket: one turn of the client loop.
const CLIENT_TICK: Duration = Duration::from_millis(20);

/// A websocket provider as a careful client is written: it answers pings,
/// and when the server ends its connection it reconnects through the
/// instances in turn, the first attempt after 0-250 ms and then the
/// sidecar's backoff (d from 0.5 s doubling to 30 s, each delay in
/// [d/2, d]), as issue 9 asks of the sidecar. A move registers at the new
/// instance before closing the old connection. Runs on its own thread
/// until told to close or its command channel closes; a half-open client
/// parks its socket in `graveyard`, open and unread.
pub struct WsClient {
    pub label: String,
    pub port: u16,
    pub weight: u16,
    /// `127.0.0.1:port` of instances A and B.
    pub servers: [SocketAddr; 2],
    pub first: usize,
    pub ledger: SharedLedger,
    pub cmds: Receiver<Cmd>,
    pub rng: Rng,
    pub graveyard: Arc<Mutex<Vec<Ws>>>,
}

impl WsClient {
    pub fn spawn(self) -> thread::JoinHandle<()> {
        thread::Builder::new()
            .name(format!("chaos-{}", self.label))
            .spawn(move || self.run())
            .expect("spawn a chaos client thread")
    }

    fn url(&self, inst: usize) -> String {
        format!(
            "ws://{}{}",
            self.servers[inst],
            provide_query(self.port, self.weight)
        )
    }

    fn begin(&self, inst: usize) -> Result<Slot, String> {
        lock(&self.ledger).attach(&self.label, inst, Instant::now());
        let s = TcpStream::connect_timeout(&self.servers[inst], Duration::from_secs(1))
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(CLIENT_TICK))
            .and_then(|_| s.set_write_timeout(Some(Duration::from_secs(2))))
            .and_then(|_| s.set_nodelay(true))
            .map_err(|e| e.to_string())?;
        match tungstenite::client(self.url(inst).as_str(), s) {
            Ok((ws, _)) => Ok(Slot::Open {
                ws,
                inst,
                welcomed: false,
            }),
            Err(HandshakeError::Interrupted(mid)) => Ok(Slot::Handshaking {
                mid,
                inst,
                since: Instant::now(),
            }),
            Err(HandshakeError::Failure(e)) => Err(e.to_string()),
        }
    }

    /// One turn of a slot: `Err` when the connection attempt failed or the
    /// connection ended (the reason; `true` if it was open and the server
    /// ended it).
    fn turn(&self, slot: Slot) -> Result<Slot, (usize, bool, String)> {
        match slot {
            Slot::Idle => Ok(Slot::Idle),
            Slot::Handshaking { mid, inst, since } => match mid.handshake() {
                Ok((ws, _)) => Ok(Slot::Open {
                    ws,
                    inst,
                    welcomed: false,
                }),
                Err(HandshakeError::Interrupted(mid)) => {
                    if since.elapsed() > HANDSHAKE_WITHIN {
                        Err((inst, false, "no handshake answer".into()))
                    } else {
                        Ok(Slot::Handshaking { mid, inst, since })
                    }
                }
                Err(HandshakeError::Failure(e)) => Err((inst, false, format!("handshake: {e}"))),
            },
            Slot::Open {
                mut ws,
                inst,
                mut welcomed,
            } => loop {
                match ws.read() {
                    Ok(Message::Text(t)) => {
                        let now = Instant::now();
                        if t.starts_with("ERROR") {
                            lock(&self.ledger).refused(&self.label, inst, now, t.as_str());
                            // Counted as a refusal, not again as a drop.
                            return Err((inst, false, t.as_str().to_string()));
                        }
                        if !welcomed {
                            welcomed = true;
                            lock(&self.ledger).set_registered(&self.label, true);
                        }
                    }
                    Ok(Message::Close(f)) => {
                        // Why ignored: answering the close may fail if the server is gone.
                        let _ = ws.flush();
                        let why = f.map_or("close frame without code".to_string(), |f| {
                            format!("close {} {}", u16::from(f.code), f.reason)
                        });
                        return Err((inst, true, why));
                    }
                    Ok(_) => {}
                    Err(WsError::Io(e)) if is_timeout(&e) => {
                        // Sends the pongs tungstenite queued.
                        if let Err(e) = ws.flush() {
                            if !matches!(&e, WsError::Io(io) if is_timeout(io)) {
                                return Err((inst, true, e.to_string()));
                            }
                        }
                        return Ok(Slot::Open { ws, inst, welcomed });
                    }
                    Err(e) => return Err((inst, true, e.to_string())),
                }
            },
        }
    }

    fn run(mut self) {
        let mut primary = Slot::Idle;
        let mut moving = Slot::Idle;
        let mut move_how = CloseHow::Clean;
        let mut cur = self.first;
        let mut attempt_at = Instant::now();
        let mut backoff = Duration::ZERO;
        loop {
            match self.cmds.try_recv() {
                Ok(Cmd::Close(how)) => {
                    lock(&self.ledger).die(&self.label, Instant::now());
                    for slot in [primary, moving] {
                        self.leave(slot, how);
                    }
                    return;
                }
                Ok(Cmd::Move { to, how }) => {
                    if matches!(moving, Slot::Idle) && matches!(primary, Slot::Open { .. }) {
                        match self.begin(to) {
                            Ok(slot) => {
                                moving = slot;
                                move_how = how;
                            }
                            Err(_) => lock(&self.ledger).detach(&self.label, to, Instant::now()),
                        }
                    }
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => return,
            }
            if matches!(primary, Slot::Idle) {
                if Instant::now() >= attempt_at {
                    match self.begin(cur) {
                        Ok(slot) => primary = slot,
                        Err(_) => {
                            lock(&self.ledger).detach(&self.label, cur, Instant::now());
                            cur = 1 - cur;
                            backoff = self.next_backoff(backoff);
                            attempt_at = Instant::now() + backoff;
                        }
                    }
                } else {
                    thread::sleep(CLIENT_TICK);
                }
            }
            primary = match self.turn(primary) {
                Ok(slot) => {
                    if matches!(slot, Slot::Open { welcomed: true, .. }) {
                        backoff = Duration::ZERO;
                    }
                    slot
                }
                Err((inst, was_open, why)) => {
                    let now = Instant::now();
                    if was_open {
                        lock(&self.ledger).dropped(&self.label, inst, now, &why);
                    } else {
                        lock(&self.ledger).detach(&self.label, inst, now);
                    }
                    cur = 1 - inst;
                    backoff = self.next_backoff(backoff);
                    attempt_at = now + backoff;
                    // A move in progress becomes the connection.
                    std::mem::replace(&mut moving, Slot::Idle)
                }
            };
            moving = match self.turn(moving) {
                Ok(Slot::Open {
                    ws,
                    inst,
                    welcomed: true,
                }) => {
                    // Registered at the new instance: now leave the old one.
                    let old = std::mem::replace(
                        &mut primary,
                        Slot::Open {
                            ws,
                            inst,
                            welcomed: true,
                        },
                    );
                    cur = inst;
                    self.leave(old, move_how);
                    Slot::Idle
                }
                Ok(slot) => slot,
                Err((inst, was_open, why)) => {
                    let now = Instant::now();
                    if was_open {
                        lock(&self.ledger).dropped(&self.label, inst, now, &why);
                        // The primary is still registered.
                        lock(&self.ledger).set_registered(&self.label, true);
                    } else {
                        lock(&self.ledger).detach(&self.label, inst, now);
                    }
                    Slot::Idle
                }
            };
        }
    }

    /// The first retry after 0-250 ms, then [d/2, d] with d from 0.5 s
    /// doubling to 30 s (`prev` is the last delay; zero after a success).
    fn next_backoff(&mut self, prev: Duration) -> Duration {
        if prev.is_zero() {
            return self
                .rng
                .between(Duration::ZERO, Duration::from_millis(250))
                .max(Duration::from_millis(1));
        }
        let d = (prev * 2)
            .max(Duration::from_millis(500))
            .min(Duration::from_secs(30));
        self.rng.between(d / 2, d)
    }

    /// Ends a connection as `how` says (the client is leaving it).
    fn leave(&self, slot: Slot, how: CloseHow) {
        let (stream_ws, inst) = match slot {
            Slot::Idle => return,
            Slot::Handshaking { inst, .. } => (None, inst),
            Slot::Open { ws, inst, .. } => (Some(ws), inst),
        };
        let now = Instant::now();
        lock(&self.ledger).detach(&self.label, inst, now);
        let Some(mut ws) = stream_ws else { return };
        match how {
            CloseHow::Clean => {
                // Why ignored: the server may be gone; the socket closes on drop anyway.
                let _ = ws.close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "chaos client leaving".into(),
                }));
                let deadline = Instant::now() + Duration::from_secs(1);
                while Instant::now() < deadline {
                    match ws.read() {
                        Ok(_) => {}
                        Err(WsError::Io(e)) if is_timeout(&e) => {}
                        Err(_) => break,
                    }
                }
            }
            CloseHow::Fin => {
                // Why ignored: the peer may have closed already.
                let _ = ws.get_ref().shutdown(std::net::Shutdown::Both);
            }
            CloseHow::Reset => reset(ws.get_ref()),
            CloseHow::HalfOpen => {
                self.graveyard
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(ws);
            }
        }
    }
}

/// Makes the close of `s` a TCP RST (SO_LINGER on, 0 s); the socket is
/// closed when its owner drops it.
pub fn reset(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a descriptor we own, with a correctly sized value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
