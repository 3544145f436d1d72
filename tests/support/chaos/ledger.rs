//! The checker: clients and their states, the faults in progress (each an
//! [`Excuse`] with the allowance the README gives it), and every violation
//! of the promise seen in etcd's snapshots. Every instant is an argument,
//! so the rules are unit tested without processes (`tests/chaos.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{key_of, value_of, Bounds};

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
