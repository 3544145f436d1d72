//! The listening sockets: passed by systemd (socket activation) or bound
//! from `--listen-addr`, and the wait for connections on all of them.
//!
//! Invariants:
//! - sockets passed by the manager win over `--listen-addr`, which is then
//!   not bound; the log says which it is;
//! - a wait for connections lasts at most the given timeout, so the accept
//!   loop can show it is alive while idle (`supervisor::ACCEPT`);
//! - shutdown wakes the wait through a socket pair of our own, never with
//!   shutdown(2) on a listener: a passed socket is shared with the manager,
//!   and shutting it down would stop it listening for the next start too.
//!   Dropping `Listeners` closes only this process's descriptors.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use log::{debug, info, warn};

use crate::activation;

/// Pending connections the kernel queues before accept() (bound sockets;
/// a passed socket has the `Backlog=` of its `.socket` unit).
const LISTEN_BACKLOG: libc::c_int = 4096;

pub struct Listeners {
    sockets: Vec<TcpListener>,
    /// Each socket's address, for the log.
    addrs: Vec<SocketAddr>,
    activated: bool,
    /// Written once by `wake`; its peer is part of every wait.
    waker: UnixStream,
    woken: UnixStream,
    /// Where the next turn starts looking, so one busy socket cannot starve
    /// the others.
    next: AtomicUsize,
}

impl Listeners {
    /// The sockets passed by the manager, or else the first of `candidates`
    /// that binds. Call before any thread starts (see `activation::take`).
    pub fn open(candidates: &[SocketAddr]) -> Result<Listeners, String> {
        let passed = activation::take()?;
        if passed.is_empty() {
            return Listeners::bind(candidates);
        }
        let list: Vec<String> = passed
            .iter()
            .map(|p| {
                let addr = p
                    .listener
                    .local_addr()
                    .map_or_else(|e| format!("? ({e})"), |a| a.to_string());
                match &p.name {
                    Some(n) => format!("fd {} {n:?} on {addr}", p.fd),
                    None => format!("fd {} on {addr}", p.fd),
                }
            })
            .collect();
        info!(
            "socket activation: serving on what the service manager passed ({}); \
             --listen-addr is not bound",
            list.join(", ")
        );
        Listeners::new(passed.into_iter().map(|p| p.listener).collect(), true)
    }

    /// The first of `candidates` that binds, whatever systemd passed.
    pub fn bind(candidates: &[SocketAddr]) -> Result<Listeners, String> {
        let l = bind(candidates)?;
        // std binds with a backlog of 128: a fleet reconnecting at once after
        // a restart would see SYN retries (a second each). Listening again on
        // the bound socket raises it (the kernel caps it at
        // net.core.somaxconn).
        // SAFETY: listen(2) on the listener's own descriptor.
        if unsafe { libc::listen(l.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
            warn!(
                "cannot raise the listen backlog: {}",
                std::io::Error::last_os_error()
            );
        }
        Listeners::new(vec![l], false)
    }

    fn new(sockets: Vec<TcpListener>, activated: bool) -> Result<Listeners, String> {
        let mut addrs = Vec::with_capacity(sockets.len());
        for s in &sockets {
            // A poll that finds a socket ready must not then block in
            // accept() if the peer went away in between.
            s.set_nonblocking(true)
                .map_err(|e| format!("cannot make the listener non-blocking: {e}"))?;
            addrs.push(
                s.local_addr()
                    .map_err(|e| format!("listener has no address: {e}"))?,
            );
        }
        let (waker, woken) =
            UnixStream::pair().map_err(|e| format!("cannot create the shutdown waker: {e}"))?;
        // A second wake finds the buffer holding the first byte; it must
        // not block.
        waker
            .set_nonblocking(true)
            .map_err(|e| format!("cannot create the shutdown waker: {e}"))?;
        Ok(Listeners {
            sockets,
            addrs,
            activated,
            waker,
            woken,
            next: AtomicUsize::new(0),
        })
    }

    /// Every address served, in order.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Whether the sockets came from the service manager.
    pub fn activated(&self) -> bool {
        self.activated
    }

    /// Waits at most `wait` for a connection on any socket. `Ok(None)`: the
    /// time passed, the wait was interrupted, or `wake` was called (the
    /// caller checks why). Errors are accept()'s (out of descriptors, ...).
    pub fn accept(&self, wait: Duration) -> std::io::Result<Option<(TcpStream, SocketAddr)>> {
        let mut fds: Vec<libc::pollfd> = self
            .sockets
            .iter()
            .map(|s| s.as_raw_fd())
            .chain([self.woken.as_raw_fd()])
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = wait.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        if n == 0 || fds[self.sockets.len()].revents != 0 {
            return Ok(None);
        }
        let count = self.sockets.len();
        let start = self.next.load(Ordering::Relaxed);
        for i in (0..count).map(|k| (start + k) % count) {
            if fds[i].revents == 0 {
                continue;
            }
            self.next.store((i + 1) % count, Ordering::Relaxed);
            return match self.sockets[i].accept() {
                Ok(pair) => Ok(Some(pair)),
                // Gone between the poll and the accept (the peer reset).
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(None),
                Err(e) => Err(e),
            };
        }
        Ok(None)
    }

    /// Ends the current and every later wait at once (for shutdown).
    pub fn wake(&self) {
        // WouldBlock means an earlier wake's byte is still there, which
        // wakes the wait just as well; there is no other way for a write to
        // a connected socket pair we hold both ends of to fail.
        let _ = (&self.waker).write(&[1]);
    }
}

fn bind(candidates: &[SocketAddr]) -> Result<TcpListener, String> {
    let mut last = None;
    for addr in candidates {
        match TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) => {
                debug!("cannot bind {addr}: {e}");
                last = Some((addr, e));
            }
        }
    }
    match last {
        Some((addr, e)) => Err(format!("cannot listen on {addr}: {e}")),
        None => Err("no address to listen on".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn listeners() -> Listeners {
        Listeners::open(&["127.0.0.1:0".parse().unwrap()]).unwrap()
    }

    #[test]
    fn an_idle_wait_ends_after_its_timeout() {
        let l = listeners();
        let started = Instant::now();
        assert!(l.accept(Duration::from_millis(50)).unwrap().is_none());
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn accepts_a_connection_as_a_blocking_stream() {
        let l = listeners();
        let client = TcpStream::connect(l.addrs()[0]).unwrap();
        let (stream, peer) = l
            .accept(Duration::from_secs(5))
            .unwrap()
            .expect("a connection");
        assert_eq!(peer, client.local_addr().unwrap());
        // Connection threads read with timeouts: the stream must block.
        stream
            .set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        let mut buf = [0u8; 1];
        let e = std::io::Read::read(&mut &stream, &mut buf).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
    }

    #[test]
    fn wake_ends_waits_at_once_and_for_good() {
        let l = std::sync::Arc::new(listeners());
        let waiter = {
            let l = l.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                let got = l.accept(Duration::from_secs(30)).unwrap();
                (got.is_none(), started.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        l.wake();
        l.wake();
        let (none, took) = waiter.join().unwrap();
        assert!(none && took < Duration::from_secs(5), "{took:?}");
        let started = Instant::now();
        assert!(l.accept(Duration::from_secs(30)).unwrap().is_none());
        assert!(started.elapsed() < Duration::from_secs(5));
        // The listener still listens: wake never shut it down.
        TcpStream::connect(l.addrs()[0]).expect("still listening after wake");
    }
}
