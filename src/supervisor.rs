//! Talking to the service manager: systemd's notify protocol (`READY=1`,
//! `STATUS=`, `STOPPING=1`, `WATCHDOG=1`) and the heartbeats that decide
//! whether the watchdog is fed.
//!
//! The protocol is one datagram per message to the `AF_UNIX` socket named
//! by `$NOTIFY_SOCKET` (a path, or an abstract name written with a leading
//! `@`): a few lines on `UnixDatagram`, so no crate.
//!
//! Invariants:
//! - without `$NOTIFY_SOCKET` nothing is sent and no thread is started;
//! - `WATCHDOG=1` goes out every `$WATCHDOG_USEC`/2 only while both the
//!   accept loop ([`ACCEPT`]) and the etcd worker (its beat in `Health`)
//!   have beaten within the last `$WATCHDOG_USEC`/2 (at least
//!   [`MIN_STALE`]): a wedged loop stops the pings and systemd restarts
//!   skyapi. Each loop beats on every turn, and an idle one turns at least
//!   every [`BEAT_EVERY`];
//! - `STATUS=` is sent when it changes, at most once a second;
//! - after `STOPPING=1` no other message is sent;
//! - a failed send is logged once (at warn) and never stops the server.

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use log::{info, warn};

/// The longest a healthy loop goes without a heartbeat: the accept loop's
/// poll timeout and the etcd worker's longest sleep.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);
/// A heartbeat is stale after `$WATCHDOG_USEC`/2, but never sooner than
/// this: with a very short `WatchdogSec=` a loop that beats every
/// `BEAT_EVERY` would otherwise look wedged between two beats.
pub const MIN_STALE: Duration = Duration::from_secs(3);
/// `STATUS=` is sent at most this often.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// The accept loop's heartbeat: it beats before every wait for connections
/// (at most `BEAT_EVERY` long), so it means "able to accept", idle or not.
/// (The etcd worker's is `Health::beat`, which `/healthz` reads too.)
pub static ACCEPT: Heartbeat = Heartbeat::new();

/// When a loop last made progress. A static, because there is one accept
/// loop per process: the hook stays one line, and a heartbeat nobody reads
/// costs one relaxed store per turn.
pub struct Heartbeat(AtomicU64);

/// The process's reference point for heartbeats (set on first use).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Heartbeat {
    const fn new() -> Heartbeat {
        Heartbeat(AtomicU64::new(0))
    }

    /// Records progress now.
    pub fn beat(&self) {
        let ms = epoch().elapsed().as_millis() as u64;
        // 0 means "never"; a beat in the first millisecond counts as 1.
        self.0.store(ms.max(1), Ordering::Relaxed);
    }

    /// Time since the last beat; `None` if it never beat.
    pub fn age(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(epoch().elapsed().saturating_sub(Duration::from_millis(ms))),
        }
    }
}

/// The notify socket named by `$NOTIFY_SOCKET`.
pub struct Notifier {
    socket: UnixDatagram,
    addr: std::os::unix::net::SocketAddr,
    name: String,
    warned: AtomicBool,
}

impl Notifier {
    /// The socket `value` (of `$NOTIFY_SOCKET`) names: an absolute path, or
    /// an abstract socket as `@name`.
    pub fn new(value: &str) -> Result<Notifier, String> {
        let addr = if let Some(abstract_name) = value.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
        } else if value.starts_with('/') {
            std::os::unix::net::SocketAddr::from_pathname(value)
        } else {
            // vsock:CID:PORT (a VM's manager) and relative paths.
            return Err(format!(
                "NOTIFY_SOCKET={value:?}: only paths and @abstract names are supported"
            ));
        }
        .map_err(|e| format!("NOTIFY_SOCKET={value:?}: {e}"))?;
        let socket = UnixDatagram::unbound()
            .map_err(|e| format!("cannot open a socket for NOTIFY_SOCKET: {e}"))?;
        Ok(Notifier {
            socket,
            addr,
            name: value.to_string(),
            warned: AtomicBool::new(false),
        })
    }

    /// Sends one message (`KEY=VALUE` lines); logs the first failure.
    pub fn send(&self, message: &str) -> bool {
        match self.socket.send_to_addr(message.as_bytes(), &self.addr) {
            Ok(_) => true,
            Err(e) => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    warn!("cannot notify the service manager at {}: {e}", self.name);
                }
                false
            }
        }
    }
}

/// What the manager asked for, read from the environment once at start-up.
pub struct Supervisor {
    notifier: Option<Arc<Notifier>>,
    /// `$WATCHDOG_USEC`, when it applies to this process.
    watchdog: Option<Duration>,
    stopping: Arc<AtomicBool>,
}

impl Supervisor {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`, and
    /// removes them from the environment. Call before any thread starts:
    /// changing the environment races with threads reading it.
    pub fn from_env() -> Supervisor {
        let notify = std::env::var("NOTIFY_SOCKET").ok();
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        for name in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            std::env::remove_var(name);
        }
        let notifier = match notify
            .as_deref()
            .filter(|v| !v.is_empty())
            .map(Notifier::new)
        {
            None => None,
            Some(Ok(n)) => Some(Arc::new(n)),
            Some(Err(e)) => {
                warn!("{e}; not notifying the service manager");
                None
            }
        };
        let watchdog = match watchdog_interval(usec.as_deref(), pid.as_deref(), std::process::id())
        {
            Ok(w) => w,
            Err(e) => {
                warn!("{e}; no watchdog");
                None
            }
        };
        let watchdog = watchdog.filter(|_| notifier.is_some());
        Supervisor {
            notifier,
            watchdog,
            stopping: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Tells the manager skyapi accepts connections, then keeps `STATUS=`
    /// current and feeds the watchdog on a thread of its own. `status` says
    /// what skyapi is doing in one line, `worker_beat` when the etcd worker
    /// last turned; both are called about once a second.
    pub fn ready(
        &self,
        status: impl Fn() -> String + Send + 'static,
        worker_beat: impl Fn() -> Instant + Send + 'static,
    ) {
        let Some(notifier) = self.notifier.clone() else {
            return;
        };
        let first = status();
        notifier.send(&format!("READY=1\nSTATUS={first}"));
        match self.watchdog {
            Some(w) => info!(
                "systemd watchdog: every {} ms while the accept loop and the etcd worker make progress",
                (w / 2).as_millis()
            ),
            None => info!("notified systemd: ready"),
        }
        let watchdog = self.watchdog;
        let stopping = self.stopping.clone();
        let spawned = std::thread::Builder::new()
            .name("supervisor".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                keep_informed(&notifier, watchdog, &stopping, first, status, worker_beat)
            });
        if let Err(e) = spawned {
            warn!("cannot start the supervisor thread: {e}; no STATUS= updates or watchdog pings");
        }
    }

    /// Tells the manager shutdown has begun; nothing is sent after it.
    pub fn stopping(&self) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(n) = &self.notifier {
            n.send("STOPPING=1\nSTATUS=shutting down");
        }
    }
}

/// `$WATCHDOG_USEC` when it is meant for `own_pid` (`$WATCHDOG_PID`, if
/// set, names the process the manager watches).
fn watchdog_interval(
    usec: Option<&str>,
    pid: Option<&str>,
    own_pid: u32,
) -> Result<Option<Duration>, String> {
    let Some(usec) = usec.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    if let Some(pid) = pid.filter(|v| !v.is_empty()) {
        match pid.parse::<u32>() {
            Ok(p) if p == own_pid => {}
            Ok(_) => return Ok(None),
            Err(_) => return Err(format!("WATCHDOG_PID={pid:?} is not a process id")),
        }
    }
    match usec.parse::<u64>() {
        Ok(0) | Err(_) => Err(format!("WATCHDOG_USEC={usec:?} is not a positive number")),
        Ok(us) => Ok(Some(Duration::from_micros(us))),
    }
}

/// Which loop, if any, has not beaten within `stale`. A loop that has not
/// beaten yet counts from `running` (how long the supervisor has run): the
/// worker's first beat comes after its first turn, which may wait for etcd.
fn stalled(
    accept: Option<Duration>,
    worker: Option<Duration>,
    running: Duration,
    stale: Duration,
) -> Option<&'static str> {
    let fresh = |age: Option<Duration>| age.unwrap_or(running) <= stale;
    if !fresh(accept) {
        Some("accept loop")
    } else if !fresh(worker) {
        Some("etcd worker")
    } else {
        None
    }
}

/// The supervisor thread: STATUS= on change (at most once a second) and
/// WATCHDOG=1 every half interval while both loops beat. It ends when
/// shutdown begins; it holds nothing that needs releasing.
fn keep_informed(
    notifier: &Notifier,
    watchdog: Option<Duration>,
    stopping: &AtomicBool,
    mut last_status: String,
    status: impl Fn() -> String,
    worker_beat: impl Fn() -> Instant,
) {
    let ping_every = watchdog.map(|w| w / 2);
    let stale = ping_every.map(|p| p.max(MIN_STALE));
    let tick = ping_every.map_or(STATUS_EVERY, |p| p.min(STATUS_EVERY));
    let started = Instant::now();
    let mut status_sent = Instant::now();
    let mut pinged = Instant::now();
    let mut withheld: Option<&'static str> = None;
    if watchdog.is_some() {
        notifier.send("WATCHDOG=1");
    }
    loop {
        std::thread::sleep(tick);
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        if now.duration_since(status_sent) >= STATUS_EVERY {
            let current = status();
            if current != last_status {
                // Checked again: `status()` may have raced with `stopping()`.
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                notifier.send(&format!("STATUS={current}"));
                last_status = current;
                status_sent = now;
            }
        }
        let (Some(every), Some(stale)) = (ping_every, stale) else {
            continue;
        };
        if now.duration_since(pinged) + tick / 2 < every {
            continue;
        }
        let worker = now.saturating_duration_since(worker_beat());
        match stalled(ACCEPT.age(), Some(worker), started.elapsed(), stale) {
            None => {
                if let Some(was) = withheld.take() {
                    warn!("the {was} makes progress again: feeding the systemd watchdog");
                }
                notifier.send("WATCHDOG=1");
                pinged = now;
            }
            Some(which) => {
                if withheld.is_none() {
                    warn!(
                        "the {which} has made no progress for {} s: withholding the systemd watchdog ping, so systemd restarts skyapi",
                        stale.as_secs()
                    );
                }
                withheld = Some(which);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Option<Duration> {
        Some(Duration::from_secs(s))
    }

    #[test]
    fn watchdog_applies_only_to_the_named_process() {
        assert_eq!(watchdog_interval(None, None, 7), Ok(None));
        assert_eq!(watchdog_interval(Some("30000000"), None, 7), Ok(secs(30)));
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("7"), 7),
            Ok(secs(30))
        );
        assert_eq!(watchdog_interval(Some("30000000"), Some("8"), 7), Ok(None));
        assert!(watchdog_interval(Some("0"), None, 7).is_err());
        assert!(watchdog_interval(Some("soon"), None, 7).is_err());
        assert!(watchdog_interval(Some("30000000"), Some("me"), 7).is_err());
    }

    #[test]
    fn a_stale_or_missing_heartbeat_withholds_the_ping() {
        let stale = Duration::from_secs(15);
        let up = Duration::from_secs(100);
        assert_eq!(stalled(secs(1), secs(14), up, stale), None);
        assert_eq!(stalled(secs(16), secs(1), up, stale), Some("accept loop"));
        assert_eq!(stalled(secs(1), secs(16), up, stale), Some("etcd worker"));
        assert_eq!(stalled(secs(1), None, up, stale), Some("etcd worker"));
        assert_eq!(stalled(None, secs(1), up, stale), Some("accept loop"));
        // Just started: a loop that has not beaten yet gets `stale` to do so.
        let young = Duration::from_secs(2);
        assert_eq!(stalled(secs(1), None, young, stale), None);
        assert_eq!(stalled(None, None, young, stale), None);
    }

    #[test]
    fn heartbeat_age_counts_from_the_last_beat() {
        let h = Heartbeat::new();
        assert_eq!(h.age(), None);
        h.beat();
        assert!(h.age().unwrap() < Duration::from_secs(1));
    }

    #[test]
    fn notifies_path_and_abstract_sockets() {
        let dir = std::env::temp_dir().join(format!("skyapi-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.to_str().unwrap()).unwrap();
        assert!(n.send("READY=1"));
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
        let _ = std::fs::remove_dir_all(&dir);

        use std::os::linux::net::SocketAddrExt;
        let name = format!("skyapi-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::new(&format!("@{name}")).unwrap();
        assert!(n.send("WATCHDOG=1"));
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");

        assert!(Notifier::new("vsock:2:9999").is_err());
        assert!(Notifier::new("relative/path").is_err());
    }
}
