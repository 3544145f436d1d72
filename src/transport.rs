//! A connection's byte stream: the TCP socket with a deadline, plain or
//! under TLS.
//!
//! Every read of a connection goes through `Socket`, which turns the
//! connection's current deadline into the socket's read timeout just before
//! each read and fails with `TimedOut` once it has passed. Setting the
//! timeout once is not enough: rustls (and any reader that loops until a
//! record is complete) restarts the wait with every byte that arrives, so a
//! peer trickling one byte at a time would never meet it.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use rustls::{ServerConnection, StreamOwned};

/// The TCP socket of a connection and the deadline of its current read.
pub struct Socket {
    tcp: TcpStream,
    deadline: Option<Instant>,
}

impl Socket {
    pub fn new(tcp: TcpStream) -> Self {
        Socket {
            tcp,
            deadline: None,
        }
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
        self.tcp.read(buf)
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
