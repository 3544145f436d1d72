//! A connection's byte stream: the TCP socket with a deadline, plain or
//! under TLS.
//!
//! Every read of a connection goes through `Socket`, which turns the
//! connection's current deadline into the socket's read timeout just before
//! each read and fails with `TimedOut` once it has passed. Setting the
//! timeout once is not enough: rustls (and any reader that loops until a
//! record is complete) restarts the wait with every byte that arrives, so a
//! peer trickling one byte at a time would never meet it.
//!
//! A websocket's socket also has a byte budget (`limit_rate`): frames that
//! never make a message (empty continuation fragments, say) are invisible
//! to the message count, but not to the bytes they take. Over budget, a
//! read fails with an error `is_over_budget` recognises.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use rustls::{ServerConnection, StreamOwned};

/// The TCP socket of a connection and the deadline of its current read.
pub struct Socket {
    tcp: TcpStream,
    deadline: Option<Instant>,
    budget: Option<Bucket>,
}

impl Socket {
    pub fn new(tcp: TcpStream) -> Self {
        Socket {
            tcp,
            deadline: None,
            budget: None,
        }
    }

    /// From now on a read fails (once) when more than `bytes_per_sec` a
    /// second have arrived, with bursts of `burst` bytes.
    pub fn limit_rate(&mut self, bytes_per_sec: f64, burst: f64) {
        self.budget = Some(Bucket::new(bytes_per_sec, burst));
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Reads fail with `TimedOut` from `deadline` on; `None` blocks.
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.tcp.set_read_timeout(Some(left))?;
        }
        let n = self.tcp.read(buf)?;
        if let Some(b) = &mut self.budget {
            if !b.take(Instant::now(), n as f64) {
                // Fails once: the caller closes, and may then drain the
                // socket (bounded by its deadline) so the close frame is
                // not lost to a reset.
                self.budget = None;
                return Err(io::Error::other(OverBudget));
            }
        }
        Ok(n)
    }
}

/// The error of a read past the socket's byte budget.
#[derive(Debug)]
struct OverBudget;

impl std::fmt::Display for OverBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("client over its byte budget")
    }
}

impl std::error::Error for OverBudget {}

/// Whether a read failed because the peer sent more than its budget.
pub fn is_over_budget(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<OverBudget>())
}

/// A token bucket: `rate` a second, at most `burst` at once.
pub struct Bucket {
    rate: f64,
    burst: f64,
    left: f64,
    last: Instant,
}

impl Bucket {
    pub fn new(rate: f64, burst: f64) -> Self {
        Bucket {
            rate,
            burst,
            left: burst,
            last: Instant::now(),
        }
    }

    /// Takes `amount`; false once the bucket is overdrawn.
    pub fn take(&mut self, now: Instant, amount: f64) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.left = (self.left + elapsed * self.rate).min(self.burst) - amount;
        self.left >= 0.0
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tcp.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// Plain or TLS: what the connection code reads and writes.
pub trait Transport: Read + Write {
    fn socket(&mut self) -> &mut Socket;
}

impl Transport for Socket {
    fn socket(&mut self) -> &mut Socket {
        self
    }
}

impl Transport for StreamOwned<ServerConnection, Socket> {
    fn socket(&mut self) -> &mut Socket {
        &mut self.sock
    }
}

/// WouldBlock and TimedOut both mean "the deadline passed".
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::Duration;

    #[test]
    fn a_trickle_does_not_outlast_the_deadline() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let writer = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            for _ in 0..40 {
                if c.write_all(b"x").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        });
        let (tcp, _) = l.accept().unwrap();
        let mut s = Socket::new(tcp);
        let start = Instant::now();
        s.set_deadline(Some(start + Duration::from_millis(300)));
        let mut buf = [0u8; 1];
        let err = loop {
            match s.read(&mut buf) {
                Ok(0) => panic!("the writer closed before the deadline"),
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(is_timeout(&err), "{err}");
        assert!(start.elapsed() < Duration::from_millis(600));
        drop(s);
        writer.join().unwrap();
    }
}
