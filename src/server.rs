//! The server: opens the listeners, starts the etcd worker, hands each
//! accepted connection to its own thread, and shuts everything down in order
//! on SIGTERM or SIGINT.
//!
//! Invariants:
//! - a connection beyond `--max-connections` gets 503 before a connection
//!   thread is spent on it; under TLS the 503 needs a handshake, done on one
//!   of at most `BUSY_TLS_THREADS` short-lived threads within `BUSY_TLS_WAIT`
//!   (beyond that the connection is dropped), so the accept loop never waits
//!   on a peer and a flood cannot take more threads than that;
//! - a token file reload closes every live registration its token no longer
//!   grants (1008 "token revoked"), and touches no other;
//! - the admin listener (`--admin-listen-addr`, see `admin`) is bound before
//!   `listening on` is logged and stopped with the main one;
//! - `accept()` errors (out of file descriptors, ...) are logged and retried
//!   after a pause, never fatal;
//! - shutdown is: stop accepting, stop the worker, send every client a
//!   close, return. By default a stop is a restart: no entry is deleted and
//!   the lease is left to expire, clients get 1012 and put their entries
//!   again under the next instance's lease, so DNS never misses them; it
//!   returns within `RESTART_BOUND`. With `--revoke-on-exit` the lease is
//!   revoked (every entry goes in one etcd request) and clients get 1001;
//! - a panic in a connection thread is caught and logged; its drop guards
//!   still release the registration and the connection slot.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use crate::auth::{self, Tokens};
use crate::config::{Config, Limits};
use crate::connection::{self, Live};
use crate::etcd::EtcdStore;
use crate::health::{EtcdState, SharedHealth};
use crate::http;
use crate::listen::Listeners;
use crate::metrics::{Metered, Metrics};
use crate::provide::Layout;
use crate::supervisor::{self, Supervisor};
use crate::transport::Socket;
use crate::worker::{self, ConnId, Stop, WorkerHandle};

/// Stack of a connection thread. The deepest path (handshake, JSON, logging)
/// needs well under this; only touched pages cost memory.
pub const CONN_STACK: usize = 128 * 1024;
/// Each limit is logged at most this often.
const LIMIT_LOG_EVERY: Duration = Duration::from_secs(10);
/// How long the worker gets to revoke the lease at shutdown.
const REVOKE_WAIT: Duration = Duration::from_secs(3);
/// How long connection threads get to send their close frames.
const DRAIN_WAIT: Duration = Duration::from_millis(1500);
/// A restart must be quick (a supervisor restarts us at once and clients
/// are reconnecting): the worker gets this to write the deletes queued
/// before the stop, and connections this to send their 1012 and hear the
/// answer, so the process exits within a second.
/// Past the drain, connections that have not sent their close yet (the
/// host is overloaded) are dropped with the process: their clients see the
/// connection end, which takes a registration up again just as 1012 does.
const RESTART_WORKER_WAIT: Duration = Duration::from_millis(300);
const RESTART_DRAIN_WAIT: Duration = Duration::from_millis(400);
/// Interrupts connection threads at shutdown (see `Shared::threads`).
const WAKE_SIGNAL: i32 = signal_hook::consts::SIGUSR2;
/// Threads at most answering 503 under TLS beyond `--max-connections`.
const BUSY_TLS_THREADS: usize = 16;
/// The whole life of such a thread: handshake, 503, close.
const BUSY_TLS_WAIT: Duration = Duration::from_secs(1);
/// How long revoked connections are woken for until they have closed.
const REVOKE_WAKE_FOR: Duration = Duration::from_secs(2);

/// State every connection thread sees.
pub struct Shared {
    pub layout: Layout,
    pub timeout: Duration,
    pub worker: WorkerHandle,
    pub health: SharedHealth,
    pub max_connections: usize,
    pub limits: Limits,
    /// When each limit was last logged, and how often it was hit since.
    limit_log: Mutex<HashMap<&'static str, (Instant, u64)>>,
    pub metrics: Arc<Metrics>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub host_must_match_peer: bool,
    /// Stop by revoking (close 1001) rather than as a restart (close 1012).
    pub revoke_on_exit: bool,
    /// `--admin-listen-addr` is set: `/metrics` and `/services` are served
    /// there only.
    pub admin_listener: bool,
    /// Threads answering 503 under TLS (see `BUSY_TLS_THREADS`).
    busy_tls: AtomicUsize,
    /// The token file in force (`None`: no access control). Replaced whole
    /// on SIGHUP, so a request sees one version of it.
    tokens: RwLock<Option<Arc<Tokens>>>,
    token_file: Option<PathBuf>,
    /// Registrations of open `/provide` connections, for `/services`.
    live: Mutex<HashMap<ConnId, Live>>,
    shutting_down: AtomicBool,
    open: AtomicUsize,
    next_id: AtomicU64,
    /// Threads of open connections, so shutdown can interrupt their
    /// blocked reads with `WAKE_SIGNAL`. A thread removes itself (under the
    /// lock) before it exits, so a listed thread is always alive.
    threads: Mutex<HashMap<ConnId, Thread>>,
}

impl Shared {
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    fn threads(&self) -> MutexGuard<'_, HashMap<ConnId, Thread>> {
        self.threads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Interrupts every connection thread's blocking read or write, so it
    /// looks at the shutdown flag now rather than at its next timeout.
    fn wake_connections(&self) {
        for thread in self.threads().values() {
            thread.wake();
        }
    }

    /// Wakes the threads of `ids` that are still open; returns how many.
    fn wake(&self, ids: &[ConnId]) -> usize {
        let threads = self.threads();
        ids.iter()
            .filter_map(|id| threads.get(id))
            .map(Thread::wake)
            .count()
    }

    /// Logs that a limit was hit, at most once per `LIMIT_LOG_EVERY` per
    /// limit (with the count since), so a flood of bad clients cannot flood
    /// the log too.
    pub fn limit_hit(&self, limit: &'static str, what: &str) {
        self.metrics.limit_hit(limit);
        let mut log = self.limit_log.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let entry = log.entry(limit).or_insert((now - LIMIT_LOG_EVERY, 0));
        entry.1 += 1;
        if now.duration_since(entry.0) >= LIMIT_LOG_EVERY {
            let also = entry.1 - 1;
            if also > 0 {
                warn!("{limit} hit: {what} (and {also} more times since the last report)");
            } else {
                warn!("{limit} hit: {what}");
            }
            *entry = (now, 0);
        }
    }

    pub fn tokens(&self) -> Option<Arc<Tokens>> {
        self.tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the token file; a file that does not parse leaves the old
    /// one in force. Live registrations the new file no longer grants are
    /// closed.
    fn reload_tokens(self: &Arc<Self>) {
        let Some(path) = &self.token_file else {
            info!("SIGHUP: no --token-file to reload");
            return;
        };
        match Tokens::load(path, &self.layout.default_category) {
            Ok(t) => {
                info!("SIGHUP: token file reloaded ({} grants)", t.len());
                let t = Arc::new(t);
                // Replaced before the live list is read: a connection listed
                // after this reads the new file itself (see connection.rs).
                *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = Some(t.clone());
                self.revoke_ungranted(&t);
            }
            Err(e) => error!("SIGHUP: {e}; keeping the token file loaded before"),
        }
    }

    /// Flags every live registration whose token no longer grants its name
    /// and wakes its thread, which closes it with 1008 "token revoked".
    fn revoke_ungranted(self: &Arc<Self>, tokens: &Tokens) {
        let revoked: Vec<ConnId> = self
            .live_registrations()
            .iter()
            .filter(|(_, l)| {
                l.token
                    .is_some_and(|id| !auth::still_granted(tokens, &id, &l.labels))
                    && !l.revoked.swap(true, Ordering::SeqCst)
            })
            .map(|(conn, l)| {
                warn!(
                    "SIGHUP: token no longer grants {} (peer {}): closing it",
                    l.name, l.peer
                );
                *conn
            })
            .collect();
        if revoked.is_empty() {
            return;
        }
        // Woken again every 100 ms, as at shutdown: a thread between its
        // flag check and its read would otherwise sleep to its next ping.
        let shared = self.clone();
        let waker = std::thread::Builder::new()
            .name("revoke".into())
            .spawn(move || {
                let until = Instant::now() + REVOKE_WAKE_FOR;
                while shared.wake(&revoked) > 0 && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        if let Err(e) = waker {
            // They still close, at their next ping at the latest.
            warn!("cannot start the revocation thread: {e}");
        }
    }

    pub fn live_registrations(&self) -> MutexGuard<'_, HashMap<ConnId, Live>> {
        // A panicking connection thread cannot leave the map half-updated:
        // every change is a single insert, remove or field store.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One line for systemd's `STATUS=`: connections, registrations and
    /// etcd's state, with nothing that changes every second (it is sent
    /// when it changes).
    fn status(&self) -> String {
        let (stored, waiting) = {
            let live = self.live_registrations();
            let stored = live.values().filter(|l| l.stored).count();
            (stored, live.len() - stored)
        };
        let etcd = {
            let h = self.health.lock().unwrap_or_else(|p| p.into_inner());
            match (h.state, &h.last_error) {
                (EtcdState::Ok, _) => "etcd ok".to_string(),
                (_, None) => "etcd not reached yet".to_string(),
                (state, Some(e)) => {
                    format!("etcd {} ({e}), {} keys queued", state.label(), h.pending)
                }
            }
        };
        format!(
            "{} connections, {stored} registrations, {waiting} waiting for etcd; {etcd}",
            self.open_connections()
        )
    }

    /// When the etcd worker last turned its loop.
    fn worker_beat(&self) -> Instant {
        self.health.lock().unwrap_or_else(|p| p.into_inner()).beat
    }
}

/// A connection thread's pthread handle (a pointer on musl, an integer on
/// glibc), only ever used to signal that thread.
struct Thread(libc::pthread_t);

impl Thread {
    fn wake(&self) {
        // SAFETY: listed threads are alive (see `Shared::threads`); the
        // signal has a no-op handler, installed in `run`.
        unsafe {
            libc::pthread_kill(self.0, WAKE_SIGNAL);
        }
    }
}

// SAFETY: the handle is an opaque id; sending it to another thread and
// passing it to pthread_kill there is what it is for.
unsafe impl Send for Thread {}

/// Releases a connection slot when the connection thread ends, however.
struct Slot {
    shared: Arc<Shared>,
    id: ConnId,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.threads().remove(&self.id);
        self.shared.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs the server until SIGTERM or SIGINT; `Ok` after a clean shutdown.
pub fn run(config: Config) -> Result<(), String> {
    let tokens = match &config.token_file {
        Some(path) => {
            let t = Tokens::load(path, &config.layout.default_category)
                .map_err(|e| format!("--token-file: {e}"))?;
            info!("token file {}: {} grants", path.display(), t.len());
            Some(Arc::new(t))
        }
        None => None,
    };
    let tls = match &config.tls {
        Some((cert, key)) => Some(crate::tls::server_config(cert, key)?),
        None => None,
    };
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    // A handler that does nothing but exist: delivering the signal makes a
    // blocked read or write fail with EINTR (sockets with timeouts are never
    // restarted), which is how shutdown reaches connection threads.
    signal_hook::flag::register(WAKE_SIGNAL, Arc::new(AtomicBool::new(false)))
        .map_err(|e| format!("cannot install the wake-up handler: {e}"))?;
    match raise_fd_limit() {
        Ok(limit) => info!("open-file limit {limit}"),
        Err(e) => warn!("cannot read the open-file limit: {e}"),
    }
    // Threads started from here on inherit a mask blocking the process-wide
    // signals, so the kernel delivers those to this thread only: a SIGTERM
    // never interrupts a connection's socket call halfway.
    mask_signals(libc::SIG_BLOCK);

    // Both read (and clear) systemd's variables: before any thread starts.
    let supervisor = Supervisor::from_env();
    let listeners = Listeners::open(&config.listen)?;
    let local = listeners
        .addrs()
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    // Always bound by skyapi: sockets passed by systemd serve /provide.
    let admin_listener = match &config.admin_listen {
        Some(addrs) => Some(Arc::new(
            Listeners::bind(addrs).map_err(|e| format!("--admin-listen-addr: {e}"))?,
        )),
        None => None,
    };

    let store = EtcdStore::new(config.etcd.clone())
        .map_err(|e| format!("cannot start the etcd worker's runtime: {e}"))?;
    let metrics = Arc::new(Metrics::default());
    metrics.configured(config.max_connections, config.timeout);
    let store = Metered {
        inner: store,
        metrics: metrics.clone(),
    };
    let ttl = config.timeout.as_secs();
    let (worker, health, worker_thread) = worker::spawn(
        store,
        config.timeout,
        config.layout.root_dir(),
        metrics.clone(),
        // Without its worker nothing is stored or renewed: exit, so a
        // supervisor restarts skyapi rather than leaving it half alive.
        Box::new(move |why| {
            error!(
                "{why}; exiting so a supervisor restarts skyapi (this instance's \
                 entries expire with its lease within {ttl}s)"
            );
            std::process::exit(1);
        }),
    )
    .map_err(|e| format!("cannot start the etcd worker: {e}"))?;
    // The watcher's thread runs as long as the process; it ends on its own
    // once the worker is gone.
    crate::watch::spawn(
        config.etcd.clone(),
        config.layout.root_dir(),
        worker.clone(),
    )
    .map_err(|e| format!("cannot start the etcd watch: {e}"))?;

    let shared = Arc::new(Shared {
        layout: config.layout.clone(),
        timeout: config.timeout,
        worker,
        health,
        max_connections: config.max_connections,
        limits: config.limits,
        limit_log: Mutex::new(HashMap::new()),
        metrics,
        tls,
        host_must_match_peer: config.host_must_match_peer,
        revoke_on_exit: config.revoke_on_exit,
        admin_listener: admin_listener.is_some(),
        busy_tls: AtomicUsize::new(0),
        tokens: RwLock::new(tokens),
        token_file: config.token_file.clone(),
        live: Mutex::new(HashMap::new()),
        shutting_down: AtomicBool::new(false),
        open: AtomicUsize::new(0),
        next_id: AtomicU64::new(1),
        threads: Mutex::new(HashMap::new()),
    });

    let listeners = Arc::new(listeners);
    let acceptor = {
        let shared = shared.clone();
        let listeners = listeners.clone();
        std::thread::Builder::new()
            .name("accept".into())
            .spawn(move || accept_loop(&listeners, &shared))
            .map_err(|e| format!("cannot start the accept thread: {e}"))?
    };
    let admin = match &admin_listener {
        Some(l) => {
            let shared = shared.clone();
            let listener = l.clone();
            let addr = l.addrs()[0];
            let thread = std::thread::Builder::new()
                .name("admin-accept".into())
                .spawn(move || crate::admin::accept_loop(&listener, &shared))
                .map_err(|e| format!("cannot start the admin accept thread: {e}"))?;
            info!("admin endpoints (/healthz, /metrics, /services) on {addr}");
            Some((l.clone(), thread))
        }
        None => None,
    };
    info!(
        "listening on {local}{} (etcd {}, root {}, timeout {}s)",
        if shared.tls.is_some() {
            " with TLS"
        } else {
            ""
        },
        config.etcd.endpoints.join(","),
        config.layout.root_name(),
        config.timeout.as_secs()
    );
    supervisor.ready(
        {
            let shared = shared.clone();
            move || shared.status()
        },
        {
            let shared = shared.clone();
            move || shared.worker_beat()
        },
    );

    mask_signals(libc::SIG_UNBLOCK);
    let mut signal = SIGTERM;
    for sig in signals.forever() {
        if sig == SIGHUP {
            shared.reload_tokens();
            continue;
        }
        signal = sig;
        break;
    }
    let started = Instant::now();
    let (stop, worker_wait, drain_wait) = if config.revoke_on_exit {
        (Stop::Revoke, REVOKE_WAIT, DRAIN_WAIT)
    } else {
        (Stop::Restart, RESTART_WORKER_WAIT, RESTART_DRAIN_WAIT)
    };
    info!(
        "{}: {} ({} connections)",
        if signal == SIGINT {
            "SIGINT"
        } else {
            "SIGTERM"
        },
        match stop {
            Stop::Revoke => "shutting down, revoking every entry (--revoke-on-exit)",
            Stop::Restart => "stopping for a restart, entries kept for the next instance",
        },
        shared.open_connections()
    );
    shared.shutting_down.store(true, Ordering::SeqCst);
    supervisor.stopping();
    // Not shutdown(2): a socket passed by systemd must keep listening.
    listeners.wake();
    // The acceptor only ever logs; a panic there has been reported already.
    let _ = acceptor.join();
    if let Some((l, thread)) = admin {
        l.wake();
        // Same as the acceptor.
        let _ = thread.join();
    }

    // The worker stops before any connection is woken, so none of their
    // closes can reach etcd (their drop guards also skip the delete once
    // the flag is set).
    if !shared.worker.shutdown(stop, worker_wait) {
        warn!("etcd worker did not stop in time: entries expire with the lease");
    }
    // Each woken thread sends its close and waits briefly for the answer.
    // Waking again every 100 ms covers a thread that was between its flag
    // check and its read when the first signal came.
    let deadline = Instant::now() + drain_wait;
    let mut turns = 0u32;
    while shared.open_connections() > 0 && Instant::now() < deadline {
        if turns % 5 == 0 {
            shared.wake_connections();
        }
        turns += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    if worker_thread.is_finished() {
        let _ = worker_thread.join();
    }
    info!(
        "stopped in {} ms ({} connections still closing)",
        started.elapsed().as_millis(),
        shared.open_connections()
    );
    Ok(())
}

/// The next accepted connection; `None` once shutting down. `accept()`
/// errors are logged and retried, never fatal. `beat` is called on every
/// turn, at least every `supervisor::BEAT_EVERY` while idle.
pub fn accept(
    listeners: &Listeners,
    shared: &Shared,
    beat: impl Fn(),
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        beat();
        match listeners.accept(supervisor::BEAT_EVERY) {
            Ok(Some(pair)) => return (!shared.is_shutting_down()).then_some(pair),
            Ok(None) if shared.is_shutting_down() => return None,
            Ok(None) => {}
            Err(e) => {
                if shared.is_shutting_down() {
                    return None;
                }
                // EMFILE and friends: the condition passes when connections
                // close; spinning on it would only burn a core.
                error!("accept failed: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Answers 503 on a connection that gets no thread of its own; plain HTTP
/// inline, bounded by a short write timeout.
pub fn busy(stream: TcpStream) {
    let mut stream = stream;
    // Best effort: a peer that does not read gets nothing.
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    connection::plain(&mut stream, 503, "too many connections");
}

/// Answers 503 under TLS on a short-lived thread (see `BUSY_TLS_THREADS`):
/// handshake, answer, close_notify, then a brief drain so closing does not
/// reset the answer away, all within `BUSY_TLS_WAIT`.
fn busy_tls(shared: &Arc<Shared>, stream: TcpStream, config: Arc<rustls::ServerConfig>) {
    if shared.busy_tls.fetch_add(1, Ordering::SeqCst) >= BUSY_TLS_THREADS {
        shared.busy_tls.fetch_sub(1, Ordering::SeqCst);
        // Already counted by the caller's limit_hit; nothing to say to a
        // peer that has not finished a handshake.
        return;
    }
    let shared = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("busy-tls".into())
        .stack_size(CONN_STACK)
        .spawn(move || {
            struct Release(Arc<Shared>);
            impl Drop for Release {
                fn drop(&mut self) {
                    self.0.busy_tls.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let _release = Release(shared);
            let deadline = Instant::now() + BUSY_TLS_WAIT;
            // Best effort: a socket that takes no timeout fails its writes.
            let _ = stream.set_write_timeout(Some(BUSY_TLS_WAIT));
            let mut socket = Socket::new(stream);
            socket.set_deadline(Some(deadline));
            let Ok(conn) = rustls::ServerConnection::new(config) else {
                return;
            };
            let mut tls = rustls::StreamOwned::new(conn, socket);
            // The handshake runs inside the first write.
            if http::respond_text(&mut tls, 503, "too many connections").is_err() {
                return;
            }
            tls.conn.send_close_notify();
            // The peer may be gone; the drain below then ends at once.
            let _ = tls.flush();
            let _ = tls.sock.tcp().shutdown(std::net::Shutdown::Write);
            let mut buf = [0u8; 1024];
            while matches!(tls.sock.read(&mut buf), Ok(n) if n > 0) {}
        });
    if let Err(e) = spawned {
        // The closure, and with it the stream and the count, were dropped.
        error!("cannot start a thread to answer 503: {e}");
    }
}

fn accept_loop(listeners: &Listeners, shared: &Arc<Shared>) {
    while let Some((stream, peer)) = accept(listeners, shared, || supervisor::ACCEPT.beat()) {
        if shared.open.fetch_add(1, Ordering::SeqCst) >= shared.max_connections {
            shared.open.fetch_sub(1, Ordering::SeqCst);
            shared.limit_hit(
                "--max-connections",
                &format!("{} connections open: answering 503", shared.max_connections),
            );
            match &shared.tls {
                None => busy(stream),
                Some(config) => busy_tls(shared, stream, config.clone()),
            }
            continue;
        }
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        let slot = Slot {
            shared: shared.clone(),
            id,
        };
        let spawned = std::thread::Builder::new()
            .name(format!("conn-{id}"))
            .stack_size(CONN_STACK)
            .spawn(move || {
                lower_priority();
                let shared = slot.shared.clone();
                // SAFETY: pthread_self has no preconditions.
                shared
                    .threads()
                    .insert(id, Thread(unsafe { libc::pthread_self() }));
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    connection::serve(&shared, id, stream, peer)
                }));
                if outcome.is_err() {
                    error!("connection {id} from {peer} panicked; its entry was released");
                }
                drop(slot);
            });
        if let Err(e) = spawned {
            // The closure (and with it the slot and stream) was dropped.
            error!("cannot start a thread for {peer}: {e}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// How much lower a connection thread's CPU priority is than the rest.
const CONN_NICE: libc::c_int = 5;

/// Lowers the calling connection thread's CPU priority by `CONN_NICE`
/// (Linux priorities are per thread), so the threads that keep the whole
/// registrar going (accept, the etcd worker, signals and shutdown) are not
/// starved when thousands of connection threads are runnable at once: a
/// reconnect storm, or a stop that wakes every connection to send its
/// close. Unprivileged: a thread may always lower its own priority.
fn lower_priority() {
    // SAFETY: gettid has no preconditions; setpriority on our own thread id.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        // Best effort: a failure leaves the thread at the process's priority.
        let _ = libc::setpriority(libc::PRIO_PROCESS, tid, (now + CONN_NICE).min(19));
    }
}

/// Blocks or unblocks SIGTERM, SIGINT and SIGHUP for the calling thread.
fn mask_signals(how: libc::c_int) {
    // SAFETY: sigset operations on a zeroed set we own; pthread_sigmask only
    // changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [SIGTERM, SIGINT, SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// Raises the soft open-file limit to the hard limit and returns the limit
/// now in force: each connection is one descriptor, and the usual soft
/// limit of 1024 is far below `--max-connections`. Public so the load
/// generator and the tests, which open as many sockets, use the same code.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a stack struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                lim = wanted;
            }
        }
    }
    Ok(lim.rlim_cur)
}
