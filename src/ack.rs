//! The acknowledgement of a registration: the worker's answer, delivered
//! to a connection thread that is blocked on its socket.
//!
//! A connection waiting for etcd must keep serving its socket (answer the
//! client's pings, notice a close) and learn the moment its entry is
//! stored, without waking periodically to look: with etcd unreachable,
//! thousands of waiting connections polling every 50 ms cost a third of a
//! core. So the answer travels over a channel and the sender also bumps an
//! eventfd; the connection thread `poll(2)`s its socket and that eventfd
//! together, with its ping deadline as the timeout.
//!
//! Invariants: the value is in the channel before the eventfd is written,
//! and the eventfd stays readable until drained, so a wake-up can never be
//! lost between a look at the channel and the wait; the eventfd is closed
//! only when both ends are gone (it is shared by `Arc`): the connection
//! drops its end once answered, so a held connection costs one descriptor,
//! its socket. Without an eventfd
//! (the process is out of descriptors) the wait falls back to short
//! timeouts.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::worker::Ack;

/// How often a waiting connection looks for its answer if it has no
/// eventfd to be woken by.
const FALLBACK_POLL: Duration = Duration::from_millis(50);

/// The worker's end.
pub struct AckSender {
    tx: Sender<Ack>,
    wake: Option<Arc<OwnedFd>>,
}

/// The connection thread's end.
pub struct AckReceiver {
    rx: Receiver<Ack>,
    wake: Option<Arc<OwnedFd>>,
}

/// What ended a wait.
#[derive(Debug, PartialEq, Eq)]
pub enum Woken {
    /// The answer may be in (look with `try_recv`).
    Answer,
    /// The socket has something to read.
    Socket,
    /// The deadline passed, or a signal interrupted the wait.
    Deadline,
}

/// A new acknowledgement channel, with an eventfd when one can be had.
pub fn channel() -> (AckSender, AckReceiver) {
    let (tx, rx) = mpsc::channel();
    // SAFETY: eventfd has no memory-safety preconditions; a non-negative
    // result is a new descriptor we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    let wake = (fd >= 0).then(|| Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }));
    (
        AckSender {
            tx,
            wake: wake.clone(),
        },
        AckReceiver { rx, wake },
    )
}

impl AckSender {
    /// Delivers the answer and wakes the waiting thread; the connection may
    /// have gone meanwhile, which is fine.
    pub fn send(&self, ack: Ack) {
        // Why ignored: a closed receiver is a connection that left.
        let _ = self.tx.send(ack);
        if let Some(fd) = &self.wake {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to a descriptor we
            // hold open. Why ignored: the only failure (EAGAIN) means the
            // counter is already non-zero, i.e. the thread will wake.
            let _ = unsafe {
                libc::write(
                    fd.as_raw_fd(),
                    (&one as *const u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
        }
    }
}

impl AckReceiver {
    pub fn try_recv(&self) -> Result<Ack, TryRecvError> {
        self.rx.try_recv()
    }

    /// Blocks until the answer may have come, `socket` is readable, or
    /// `deadline`; a signal (shutdown, a revoked token) ends it early too. A
    /// negative `socket` waits for the answer alone.
    pub fn wait(&self, socket: RawFd, deadline: Instant) -> Woken {
        let mut timeout = deadline.saturating_duration_since(Instant::now());
        if self.wake.is_none() {
            timeout = timeout.min(FALLBACK_POLL);
        }
        let mut fds = [
            libc::pollfd {
                fd: socket,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake.as_ref().map_or(-1, |f| f.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Rounded up, so a wait never ends just before its deadline.
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        // SAFETY: `fds` is a live array of two pollfd; poll ignores a
        // negative fd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if n <= 0 {
            // 0: the deadline; -1: EINTR (a wake signal) or a failure the
            // caller's next socket read reports.
            return Woken::Deadline;
        }
        if fds[1].revents != 0 {
            self.drain();
            return Woken::Answer;
        }
        Woken::Socket
    }

    fn drain(&self) {
        if let Some(fd) = &self.wake {
            let mut count: u64 = 0;
            // SAFETY: reads 8 bytes into a live u64. Why ignored: EAGAIN
            // means already drained.
            let _ = unsafe {
                libc::read(
                    fd.as_raw_fd(),
                    (&mut count as *mut u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
        }
    }
}

impl From<Sender<Ack>> for AckSender {
    /// A sender without a wake, for callers that block on the channel.
    fn from(tx: Sender<Ack>) -> Self {
        AckSender { tx, wake: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn an_answer_wakes_a_thread_waiting_on_its_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let (tx, rx) = channel();
        let waiter = std::thread::spawn(move || {
            let t0 = Instant::now();
            let woken = rx.wait(server.as_raw_fd(), t0 + Duration::from_secs(10));
            (woken, t0.elapsed(), rx.try_recv())
        });
        std::thread::sleep(Duration::from_millis(50));
        tx.send(Ok(()));
        let (woken, took, answer) = waiter.join().unwrap();
        assert_eq!(woken, Woken::Answer);
        assert!(
            took < Duration::from_secs(5),
            "woken by the answer: {took:?}"
        );
        assert_eq!(answer, Ok(Ok(())));
    }

    #[test]
    fn an_answer_sent_before_the_wait_is_not_lost() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let (tx, rx) = channel();
        tx.send(Err("refused".into()));
        let woken = rx.wait(server.as_raw_fd(), Instant::now() + Duration::from_secs(10));
        assert_eq!(woken, Woken::Answer);
        assert_eq!(rx.try_recv(), Ok(Err("refused".into())));
    }

    #[test]
    fn socket_data_and_deadlines_end_the_wait() {
        use std::io::Write;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let (_tx, rx) = channel();
        let t0 = Instant::now();
        assert_eq!(
            rx.wait(server.as_raw_fd(), t0 + Duration::from_millis(30)),
            Woken::Deadline
        );
        assert!(t0.elapsed() >= Duration::from_millis(30));
        client.write_all(b"x").unwrap();
        assert_eq!(
            rx.wait(server.as_raw_fd(), Instant::now() + Duration::from_secs(10)),
            Woken::Socket
        );
    }
}
