//! `skyapi provide`: the sidecar client. Holds one registration on a skyapi
//! server for a local process, so a supervisor can run it beside the
//! service without anyone writing websocket code.
//!
//! States: waiting for the local check to pass -> connecting -> registered
//! -> (check fails: close, back to waiting) or (connection lost: back off,
//! reconnect). Each change is logged once.
//!
//! Invariants:
//! - a registration that was held and is lost (the server restarting with
//!   1012, leaving with 1001, or the connection dropped) is taken up again
//!   at once: the first attempt goes after a jittered 0-`QUICK_RECONNECT`
//!   (so a fleet does not arrive in one instant) to the next server in the
//!   list, then each other server once, well before the old server's lease
//!   can expire and take the entry out of DNS;
//! - after that, reconnects never spin: every failed attempt waits an
//!   exponentially growing, jittered delay capped at `MAX_BACKOFF`; the
//!   delay resets once registered;
//! - a connection that answers no ping for two intervals is dead;
//! - SIGTERM/SIGINT close the connection with a normal close (the server
//!   removes the entry at once) and `run` returns `Ok`.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, info, warn};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

use crate::config::{Check, SidecarConfig};

/// First reconnect delay, doubled after each failure up to `MAX_BACKOFF`.
pub const MIN_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest wait before the first reconnect after losing a registration.
pub const QUICK_RECONNECT: Duration = Duration::from_millis(250);
/// A connection dropped sooner than this without a registration was not a
/// held one: reconnecting to it at once could spin.
const QUICK_MIN_HELD: Duration = Duration::from_secs(1);
/// Bound on connecting, the handshake, and one check.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How often sleeps look at the stop flag.
const TICK: Duration = Duration::from_millis(100);

/// Runs until SIGTERM or SIGINT.
pub fn run(config: SidecarConfig) -> Result<(), String> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    }
    Sidecar {
        config,
        stop,
        backoff: Backoff::new(),
        next_server: 0,
        quick_attempts: 0,
        check_ok: None,
        tls: None,
    }
    .run();
    info!("stopped");
    Ok(())
}

struct Sidecar {
    config: SidecarConfig,
    stop: Arc<AtomicBool>,
    backoff: Backoff,
    next_server: usize,
    /// Attempts left before the backoff applies: one per server after a
    /// held registration is lost.
    quick_attempts: usize,
    /// Last check result, to log changes only.
    check_ok: Option<bool>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// Debian's bundle of trusted roots (package ca-certificates).
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The sidecar's connection: plain TCP or TLS over it.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => &t.sock,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(t) => t.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(t) => t.flush(),
        }
    }
}

/// How a connection ended.
enum End {
    Stopped,
    CheckFailed,
    /// The connection ended; `quick` if it was a held registration (stored,
    /// or open long enough to be more than a server that drops at once)
    /// that was not refused: it is taken up again at once.
    Lost {
        why: String,
        quick: bool,
    },
}

impl Sidecar {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn run(&mut self) {
        while !self.stopped() {
            if !self.check_passes() {
                self.sleep(self.config.interval);
                continue;
            }
            let server = self.config.servers[self.next_server % self.config.servers.len()].clone();
            match self.connect(&server) {
                Ok(mut ws) => match self.hold(&mut ws, &server) {
                    End::Stopped => return,
                    End::CheckFailed => {}
                    End::Lost { why, quick } => {
                        warn!("{server}: connection lost: {why}");
                        if quick {
                            self.quick_attempts = self.config.servers.len();
                        }
                        self.retry();
                    }
                },
                Err(why) => {
                    warn!("{server}: {why}");
                    self.retry();
                }
            }
        }
    }

    /// Moves to the next server and waits before the next attempt: briefly
    /// while quick attempts are left, else the backoff.
    fn retry(&mut self) {
        self.next_server += 1;
        let wait = if self.quick_attempts > 0 {
            self.quick_attempts -= 1;
            self.backoff.quick_delay()
        } else {
            self.backoff.next_delay()
        };
        info!("reconnecting in {} ms", wait.as_millis());
        self.sleep(wait);
    }

    /// Runs the check (if any) and logs when its result changes.
    fn check_passes(&mut self) -> bool {
        let Some(check) = &self.config.check else {
            return true;
        };
        let result = run_check(check);
        let ok = result.is_ok();
        if self.check_ok != Some(ok) {
            match &result {
                Ok(()) => info!("check passes: registering"),
                Err(why) => warn!("check fails ({why}): not registered"),
            }
            self.check_ok = Some(ok);
        }
        ok
    }

    fn connect(&mut self, server: &str) -> Result<WebSocket<Conn>, String> {
        let url = format!("{server}/provide?{}", self.config.query);
        let (tls, hostport) = match server.strip_prefix("wss://") {
            Some(rest) => (true, rest),
            None => (false, server.strip_prefix("ws://").unwrap_or(server)),
        };
        let addr = hostport
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {hostport}: {e}"))?
            .next()
            .ok_or_else(|| format!("{hostport} resolves to no address"))?;
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .map_err(|e| format!("cannot connect: {e}"))?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|_| stream.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| e.to_string())?;
        let stream = if tls {
            let host = match hostport.rsplit_once(':') {
                Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
                None => hostport,
            };
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| format!("{host}: {e}"))?;
            let tls = rustls::ClientConnection::new(self.tls_config()?, name)
                .map_err(|e| format!("TLS: {e}"))?;
            Conn::Tls(Box::new(rustls::StreamOwned::new(tls, stream)))
        } else {
            Conn::Plain(stream)
        };
        let mut request = tungstenite::client::IntoClientRequest::into_client_request(url.as_str())
            .map_err(|e| format!("bad URL {url}: {e}"))?;
        if let Some(token) = &self.config.token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| "the token is not a valid header value".to_string())?;
            request.headers_mut().insert("Authorization", value);
        }
        let (ws, _) = tungstenite::client::client(request, stream).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r)) => {
                format!("refused with HTTP {}", r.status())
            }
            other => format!("handshake failed: {other}"),
        })?;
        Ok(ws)
    }

    /// The TLS client configuration, built on first use: roots from
    /// `--cacert`, else the system bundle.
    fn tls_config(&mut self) -> Result<Arc<rustls::ClientConfig>, String> {
        if let Some(c) = &self.tls {
            return Ok(c.clone());
        }
        let path = self.config.cacert.as_deref().unwrap_or(SYSTEM_ROOTS);
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("{path}: {e}"))?
        {
            let cert = cert.map_err(|e| format!("{path}: {e}"))?;
            roots.add(cert).map_err(|e| format!("{path}: {e}"))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let config = Arc::new(config);
        self.tls = Some(config.clone());
        Ok(config)
    }

    /// Waits for the server's first message (the registration, or ERROR
    /// and a close), then holds the connection: pings every interval, runs
    /// the check, and watches for the end. Waiting for the registration is
    /// part of holding, because the server queues it while etcd is down:
    /// as long as the server answers pings, the connection is worth keeping.
    fn hold(&mut self, ws: &mut WebSocket<Conn>, server: &str) -> End {
        let interval = self.config.interval;
        let mut last_heard = Instant::now();
        let mut next_tick = Instant::now() + interval;
        let mut registered = false;
        let opened = Instant::now();
        // Refusals (ERROR:, 1008, 1011) keep the backoff: asking again at
        // once would be refused again.
        let lost = |why: String, refused: bool, registered: bool| End::Lost {
            why,
            quick: !refused && (registered || opened.elapsed() >= QUICK_MIN_HELD),
        };
        loop {
            if self.stopped() {
                close(ws, CloseCode::Normal, "sidecar stopping");
                info!("closed: stopping");
                return End::Stopped;
            }
            let now = Instant::now();
            if now >= next_tick {
                if now.duration_since(last_heard) > interval * 2 {
                    let why = format!("no pong for {}s", interval.as_secs() * 2);
                    return lost(why, false, registered);
                }
                if !self.check_passes() {
                    close(ws, CloseCode::Normal, "check failed");
                    return End::CheckFailed;
                }
                if let Err(e) = ws.send(Message::Ping(Default::default())) {
                    return lost(format!("ping failed: {e}"), false, registered);
                }
                next_tick = now + interval;
            }
            // Short reads so SIGTERM is seen promptly.
            let _ = ws.get_ref().tcp().set_read_timeout(Some(TICK));
            match ws.read() {
                Ok(Message::Close(f)) => {
                    let _ = ws.flush();
                    return match f {
                        Some(f) => lost(
                            format!("server closed ({}: {})", u16::from(f.code), f.reason),
                            matches!(f.code, CloseCode::Policy | CloseCode::Error),
                            registered,
                        ),
                        None => lost("server closed".into(), false, registered),
                    };
                }
                Ok(Message::Text(t)) if !registered => {
                    last_heard = Instant::now();
                    if let Some(why) = t.strip_prefix("ERROR:") {
                        return lost(format!("refused: {}", why.trim()), true, registered);
                    }
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
                    info!(
                        "registered {} at {server} (key {})",
                        v["name"].as_str().unwrap_or("?"),
                        v["key"].as_str().unwrap_or("?")
                    );
                    registered = true;
                    self.backoff.reset();
                }
                Ok(m) => {
                    debug!("heard {:?}", m_kind(&m));
                    last_heard = Instant::now();
                }
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return lost(e.to_string(), false, registered),
            }
        }
    }

    fn sleep(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stopped() && Instant::now() < until {
            std::thread::sleep(TICK.min(until.saturating_duration_since(Instant::now())));
        }
    }
}

fn m_kind(m: &Message) -> &'static str {
    match m {
        Message::Ping(_) => "ping",
        Message::Pong(_) => "pong",
        Message::Text(_) => "text",
        Message::Binary(_) => "binary",
        _ => "frame",
    }
}

fn close(ws: &mut WebSocket<Conn>, code: CloseCode, reason: &str) {
    let _ = ws.close(Some(CloseFrame {
        code,
        reason: reason.to_string().into(),
    }));
    // Wait briefly for the server's close so the close is clean; errors
    // mean the connection is over, which is the point.
    let _ = ws
        .get_ref()
        .tcp()
        .set_read_timeout(Some(Duration::from_secs(1)));
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline && ws.read().is_ok() {}
}

/// Runs one check: a TCP connect, or an HTTP GET answered with 2xx.
pub fn run_check(check: &Check) -> Result<(), String> {
    let connect = |addr: &str| -> Result<TcpStream, String> {
        let sa = addr
            .to_socket_addrs()
            .map_err(|e| format!("{addr}: {e}"))?
            .next()
            .ok_or_else(|| format!("{addr}: no address"))?;
        TcpStream::connect_timeout(&sa, IO_TIMEOUT).map_err(|e| format!("{addr}: {e}"))
    };
    match check {
        Check::Tcp(addr) => connect(addr).map(|_| ()),
        Check::Http { addr, path } => {
            let mut s = connect(addr)?;
            s.set_read_timeout(Some(IO_TIMEOUT))
                .and_then(|_| s.set_write_timeout(Some(IO_TIMEOUT)))
                .map_err(|e| e.to_string())?;
            // One write: `write!` sends each formatted piece on its own, and
            // a server that answers (and closes) after the first piece would
            // make the next one fail with EPIPE.
            let request = format!(
                "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: skyapi-provide\r\n\r\n"
            );
            s.write_all(request.as_bytes())
                .map_err(|e| format!("{addr}: {e}"))?;
            // The status line may arrive in pieces: read until its end (or
            // 64 bytes, plenty for "HTTP/1.1 200 OK").
            let mut head = Vec::with_capacity(64);
            let mut buf = [0u8; 64];
            while !head.contains(&b'\n') && head.len() < 64 {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("{addr}: {e}")),
                }
            }
            let line = String::from_utf8_lossy(&head);
            let status: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("{addr}: not an HTTP answer"))?;
            if (200..300).contains(&status) {
                Ok(())
            } else {
                Err(format!("http://{addr}{path} answered {status}"))
            }
        }
    }
}

/// Exponential backoff with jitter: each delay is drawn from [d/2, d] where
/// d doubles from `MIN_BACKOFF` up to `MAX_BACKOFF`.
pub struct Backoff {
    current: Duration,
    rng: u64,
}

impl Backoff {
    pub fn new() -> Self {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ (u64::from(std::process::id()) << 32);
        Backoff {
            current: MIN_BACKOFF,
            rng: seed | 1,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let r = self.next_random();
        let d = self.current;
        let half = d / 2;
        let jitter = Duration::from_nanos(r % (half.as_nanos() as u64 + 1));
        self.current = (self.current * 2).min(MAX_BACKOFF);
        half + jitter
    }

    pub fn reset(&mut self) {
        self.current = MIN_BACKOFF;
    }

    /// A delay drawn from [0, `QUICK_RECONNECT`], for taking a lost
    /// registration up again; the backoff is left as it is.
    pub fn quick_delay(&mut self) -> Duration {
        let r = self.next_random();
        Duration::from_nanos(r % (QUICK_RECONNECT.as_nanos() as u64 + 1))
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64: jitter only needs to decorrelate a fleet.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let mut b = Backoff::new();
        let mut prev_cap = Duration::ZERO;
        for i in 0..20 {
            let cap = (MIN_BACKOFF * 2u32.saturating_pow(i)).min(MAX_BACKOFF);
            let d = b.next_delay();
            assert!(
                d >= cap / 2 && d <= cap,
                "{i}: {d:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
            assert!(cap >= prev_cap);
            prev_cap = cap;
        }
        b.reset();
        assert!(b.next_delay() <= MIN_BACKOFF);
        // Quick delays cover [0, QUICK_RECONNECT] and leave the backoff be.
        let quick: Vec<Duration> = (0..200).map(|_| b.quick_delay()).collect();
        assert!(quick.iter().all(|d| *d <= QUICK_RECONNECT));
        assert!(quick.iter().any(|d| *d < QUICK_RECONNECT / 4));
        assert!(quick.iter().any(|d| *d > QUICK_RECONNECT * 3 / 4));
        let d = b.next_delay();
        assert!(d > MIN_BACKOFF / 2 && d <= MIN_BACKOFF * 2, "{d:?}");
    }

    #[test]
    fn checks() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        assert!(run_check(&Check::Tcp(addr.clone())).is_ok());
        drop(l);
        assert!(run_check(&Check::Tcp(addr)).is_err());

        for (status, ok) in [(200, true), (204, true), (503, false)] {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap().to_string();
            let server = std::thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf);
                let _ = write!(s, "HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
            });
            let r = run_check(&Check::Http {
                addr,
                path: "/health".into(),
            });
            assert_eq!(r.is_ok(), ok, "{status}: {r:?}");
            server.join().unwrap();
        }
    }
}
