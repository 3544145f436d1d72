//! Harness shared by the integration tests: throwaway etcd members
//! ([`Etcd`]), the real `skyapi` binary as a server or the sidecar
//! ([`Skyapi`]), small websocket and HTTP clients ([`client`]), throwaway
//! certificates ([`pki`]) and temp dirs ([`TempDir`]), and the waiting
//! primitives they all use. The per-suite modules (`faults`, `hostile`,
//! `operate`) hold what only one suite needs.
//!
//! Invariants every helper keeps:
//! - everything listens on loopback, on ports the OS picked;
//! - every blocking wait has a deadline, so a broken server fails a test
//!   with a message instead of hanging it ([`watchdog`] is the last resort);
//! - every child process is killed when its owner is dropped, and also when
//!   the test process dies ([`spawn_tied`]), so an aborted run leaves no
//!   etcd or skyapi behind;
//! - a failing test prints what the processes logged.

// Why: each test crate (`tests/*.rs`) includes this module and uses a
// different subset of it; unused helpers and re-exports are expected.
#![allow(dead_code, unused_imports)]

pub mod chaos;
pub mod client;
pub mod etcd;
pub mod faults;
pub mod hostile;
pub mod operate;
pub mod pki;
pub mod promtool;
pub mod skyapi;

pub use client::*;
pub use etcd::Etcd;
pub use skyapi::{run_to_exit, Finished, Skyapi};

use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// How often conditions are re-checked while polling.
pub const POLL_TICK: Duration = Duration::from_millis(20);

/// Polls `cond` until it returns true or `within` has passed; returns whether
/// it became true. The condition is always checked once more at the deadline.
pub fn poll_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL_TICK);
    }
}

/// Polls `probe` until it yields `Some`, or panics after `within` naming
/// `what`.
pub fn eventually<T>(what: &str, within: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let deadline = start + within;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        thread::sleep(POLL_TICK);
    }
}

/// Checks that `cond` stays true for the whole of `window` (polled).
/// Returns `Err(elapsed)` at the first moment it is false. This is the only
/// honest way to assert that something does *not* happen: watch for a bounded
/// window that is longer than the bound within which it would have happened.
pub fn holds_for(window: Duration, mut cond: impl FnMut() -> bool) -> Result<(), Duration> {
    let start = Instant::now();
    loop {
        if !cond() {
            return Err(start.elapsed());
        }
        if start.elapsed() >= window {
            return Ok(());
        }
        thread::sleep(POLL_TICK);
    }
}

/// A loopback port that was free a moment ago. Another process may take it
/// before the caller binds it: callers that start servers on it retry.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// A name unique to this process and call, for temp dirs and etcd members.
pub fn unique_name(tag: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{tag}-{}-{n}-{nanos:x}", std::process::id())
}

/// A fresh etcd member and a skyapi started against it with `args`.
pub fn start(args: &[&str]) -> (Etcd, Skyapi) {
    let etcd = Etcd::start_new();
    let sky = Skyapi::start(&etcd, args);
    (etcd, sky)
}

/// Lower-case hex SHA-1 of `s`: the original skyapi's ids are this of
/// service, category, host and port.
pub fn sha1_hex(s: &str) -> String {
    use sha1::{Digest, Sha1};
    Sha1::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A temp dir removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("skyapi-test-{}", unique_name(tag)));
        fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `name` atomically (temp file, then rename), so a reader never
    /// sees half a file.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        let tmp = self.path(&format!(".{name}.tmp"));
        fs::write(&tmp, text).expect("write temp file");
        fs::rename(&tmp, &path).expect("rename temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Why ignored: a leftover temp dir is harmless and must not mask the result.
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Spawns `cmd` so that the child gets SIGKILL when this test process dies,
/// however it dies (a watchdog exit, a CI timeout killing cargo test): no
/// etcd or skyapi outlives the run.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child ends, and
/// test threads end all the time, so every child is forked from one spawner
/// thread that lives as long as the process.
pub fn spawn_tied(mut cmd: Command) -> std::io::Result<Child> {
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("child-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    // Why ignored: the requester waits on the reply; it cannot have gone.
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start the child-spawner thread");
        Mutex::new(tx)
    });
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((cmd, reply_tx))
        .expect("child-spawner thread is gone");
    reply_rx.recv().expect("child-spawner thread is gone")
}

/// Ends the whole test process if the guard is not dropped within `limit`.
/// Deadlines inside the helpers should always fire first; this only catches
/// a helper bug, where a hang would otherwise stall CI until its own limit.
pub struct Watchdog {
    cancel: Option<mpsc::Sender<()>>,
}

pub fn watchdog(limit: Duration) -> Watchdog {
    let name = thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_string();
    let (tx, rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            // Straight to fd 2: `eprintln!` would land in libtest's capture
            // buffer, which is lost when the process exits.
            let msg = format!(
                "\nwatchdog: test `{name}` still running after {limit:?}; ending the test binary\n"
            );
            // Why ignored: if stderr is gone there is nothing better to do; exit anyway.
            let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
            std::process::exit(101);
        }
    });
    Watchdog { cancel: Some(tx) }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Dropping the sender wakes the watchdog thread with `Disconnected`.
        self.cancel.take();
    }
}
