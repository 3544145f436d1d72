//! The PRNG and the fault schedule drawn from it: a pure function of the
//! seed and the run's length, so a failing run replays the same faults in
//! the same order.

use std::time::Duration;

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
