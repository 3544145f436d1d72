//! Tools for the hostile-input suite (`tests/hostile.rs`): exchanges where
//! the test writes every byte of the request itself, etcd snapshots that
//! include the store revision (so even a write that was undone is seen),
//! `/proc` readings of the server process, a throwaway PKI made with
//! `openssl`, a rustls client, and the `skyapi provide` sidecar as a child.
//!
//! Same invariants as the rest of the harness: loopback only, every wait
//! bounded, every child killed on drop.

use std::collections::BTreeMap;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::Value;
use tungstenite::protocol::Role;
use tungstenite::WebSocket;

use super::client::{handshake, is_timeout, next_event};
use super::etcd::parse_get;
use super::pki::{issue, make_ca};
use super::{tcp_connect, Etcd, Event, Skyapi, TempDir, Ws, REPLY_WITHIN};

// ------------------------------------------------------------------ etcd

/// The whole keyspace and the store revision at one moment. The revision
/// moves with every put and delete, so two equal snapshots mean nothing was
/// written in between, not even something written and removed again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub revision: i64,
    pub kvs: BTreeMap<String, String>,
}

/// Reads the whole keyspace and the revision in one `etcdctl get`.
pub fn snapshot(etcd: &Etcd) -> Snapshot {
    let out = etcd
        .etcdctl(&["get", "--prefix", "-w", "json", "--", ""])
        .unwrap_or_else(|e| panic!("{e}"));
    let (doc, kvs) = parse_get(&out);
    let revision = doc
        .pointer("/header/revision")
        .and_then(Value::as_i64)
        .unwrap_or_else(|| panic!("no header.revision in {out}"));
    // Lossy: any bytes at all must show up in a diff, not stop the test.
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let kvs = kvs
        .iter()
        .map(|kv| (text(&kv.key), text(&kv.value)))
        .collect();
    Snapshot { revision, kvs }
}

/// Describes how `after` differs from `before`, or `None` if it does not.
pub fn snapshot_diff(before: &Snapshot, after: &Snapshot) -> Option<String> {
    if before == after {
        return None;
    }
    let added: Vec<_> = after
        .kvs
        .iter()
        .filter(|(k, v)| before.kvs.get(*k) != Some(v))
        .collect();
    let removed: Vec<_> = before
        .kvs
        .keys()
        .filter(|k| !after.kvs.contains_key(*k))
        .collect();
    Some(format!(
        "etcd changed: revision {} -> {}, added/changed {added:?}, removed {removed:?}",
        before.revision, after.revision
    ))
}

// ------------------------------------------------------- raw exchanges

/// What the server did with one request, as seen by a client that wrote the
/// request bytes itself.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A plain HTTP answer (no upgrade): status and body.
    Http { status: u16, body: String },
    /// Upgraded, then a text message starting `ERROR`, then a close frame
    /// (`code` is `None` if the connection ended without one).
    Refused {
        text: String,
        code: Option<u16>,
        reason: String,
        /// Texts after the first, which a refusal should not have.
        more: Vec<String>,
    },
    /// Upgraded and registered: the welcome JSON.
    Registered(Value),
    /// The connection ended (or the deadline passed) without an HTTP head.
    NoAnswer(String),
    /// Upgraded, then something other than a welcome or an `ERROR` text.
    Other(String),
}

impl Outcome {
    pub fn is_refusal_1008(&self) -> bool {
        matches!(self, Outcome::Refused { text, code: Some(1008), reason, more }
            if text.starts_with("ERROR: ") && text.len() > "ERROR: ".len()
                && !reason.is_empty() && more.is_empty())
    }

    pub fn http_status(&self) -> Option<u16> {
        match self {
            Outcome::Http { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A fixed, valid `Sec-WebSocket-Key` (any 16 bytes in base64 will do).
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A websocket upgrade request for `target` (raw bytes: the test may put
/// anything in the request line), with `extra` header lines appended as
/// given (each without CRLF).
pub fn upgrade_request(target: &[u8], extra: &[String]) -> Vec<u8> {
    let mut req = Vec::with_capacity(target.len() + 256);
    req.extend_from_slice(b"GET ");
    req.extend_from_slice(target);
    req.extend_from_slice(
        b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
    );
    req.extend_from_slice(format!("Sec-WebSocket-Key: {WS_KEY}\r\n").as_bytes());
    req.extend_from_slice(b"Sec-WebSocket-Version: 13\r\n");
    for line in extra {
        req.extend_from_slice(line.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    req
}

/// Reads from `s` until `done(buffer)` holds, the peer ends the connection,
/// or `within` passes. Returns the bytes and, if the connection ended, why.
pub fn read_until(
    s: &mut impl Read,
    within: Duration,
    mut done: impl FnMut(&[u8]) -> bool,
) -> (Vec<u8>, Option<String>) {
    let deadline = Instant::now() + within;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if done(&raw) {
            return (raw, None);
        }
        if Instant::now() >= deadline {
            return (raw, None);
        }
        match s.read(&mut buf) {
            Ok(0) => return (raw, Some("EOF".into())),
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if is_timeout(&e) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (raw, Some(e.to_string())),
        }
    }
}

fn head_end(raw: &[u8]) -> Option<usize> {
    raw.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn status_of(head: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(head);
    let mut words = text.split_whitespace();
    if !words.next()?.starts_with("HTTP/1.") {
        return None;
    }
    words.next()?.parse().ok()
}

/// Writes `request` to a fresh connection to `addr` and classifies what the
/// server does (see [`Outcome`]). A registered websocket is handed back open,
/// so the caller decides when it ends; every other connection is closed.
pub fn exchange(addr: SocketAddr, request: &[u8]) -> (Outcome, Option<Ws>) {
    let mut s = tcp_connect(addr);
    // A server that answers early (431) may reset the rest of a large
    // request: the answer, if any, is still read below.
    let write_error = s.write_all(request).err();
    let (raw, ended) = read_until(&mut s, REPLY_WITHIN, |r| head_end(r).is_some());
    let Some(end) = head_end(&raw) else {
        let why = ended
            .or(write_error.map(|e| format!("write: {e}")))
            .unwrap_or_else(|| format!("no answer within {REPLY_WITHIN:?}"));
        return (
            Outcome::NoAnswer(format!(
                "{why}; got {:?}",
                String::from_utf8_lossy(&raw[..raw.len().min(200)])
            )),
            None,
        );
    };
    let Some(status) = status_of(&raw[..end]) else {
        return (
            Outcome::NoAnswer(format!(
                "not an HTTP answer: {:?}",
                String::from_utf8_lossy(&raw[..end.min(200)])
            )),
            None,
        );
    };
    if status != 101 {
        // Plain answers carry Content-Length and close the connection.
        let mut body = raw[end..].to_vec();
        if ended.is_none() {
            let (more, _) = read_until(&mut s, Duration::from_secs(2), |_| false);
            body.extend_from_slice(&more);
        }
        return (
            Outcome::Http {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            },
            None,
        );
    }
    let mut ws = WebSocket::from_partially_read(s, raw[end..].to_vec(), Role::Client, None);
    match next_event(&mut ws, REPLY_WITHIN) {
        Some(Event::Text(t)) if t.starts_with("ERROR") => {
            let closed = super::try_read_until_close(&mut ws, REPLY_WITHIN);
            let (code, reason, more) = match closed {
                Some(c) => {
                    let (code, reason) = c.frame.map(|(c, r)| (Some(c), r)).unwrap_or_default();
                    (code, reason, c.texts)
                }
                None => (None, String::new(), Vec::new()),
            };
            (
                Outcome::Refused {
                    text: t,
                    code,
                    reason,
                    more,
                },
                None,
            )
        }
        Some(Event::Text(t)) => match serde_json::from_str::<Value>(&t) {
            Ok(v) => (Outcome::Registered(v), Some(ws)),
            Err(_) => (Outcome::Other(format!("text {t:?}")), None),
        },
        Some(other) => (Outcome::Other(format!("{other:?}")), None),
        None => (
            Outcome::Other(format!("upgraded, then nothing within {REPLY_WITHIN:?}")),
            None,
        ),
    }
}

/// Reads from `s` (ignoring anything it receives) until the peer ends the
/// connection; returns how long that took from `since`, or `None` if it
/// did not end within `within`.
pub fn time_to_eof(s: &mut TcpStream, since: Instant, within: Duration) -> Option<Duration> {
    let deadline = since + within;
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(since.elapsed()),
            Ok(_) => {}
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Some(since.elapsed()),
        }
        if Instant::now() >= deadline {
            return None;
        }
    }
}

// -------------------------------------------------------- frames

/// The header of a masked client frame announcing `len` payload bytes
/// (FIN set), followed by the 4-byte mask `[0, 0, 0, 0]` (so the payload
/// can be sent as is).
pub fn frame_header(opcode: u8, fin: bool, len: u64) -> Vec<u8> {
    let mut h = vec![(if fin { 0x80 } else { 0 }) | (opcode & 0x0f)];
    if len < 126 {
        h.push(0x80 | len as u8);
    } else if len <= u16::MAX as u64 {
        h.push(0x80 | 126);
        h.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        h.push(0x80 | 127);
        h.extend_from_slice(&len.to_be_bytes());
    }
    h.extend_from_slice(&[0, 0, 0, 0]);
    h
}

/// A whole masked client frame (zero mask: the payload goes as is).
pub fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut f = frame_header(opcode, fin, payload.len() as u64);
    f.extend_from_slice(payload);
    f
}

/// The first close frame (or end) within `within`, skipping everything else.
pub fn close_code_on<S: Read + Write>(
    ws: &mut WebSocket<S>,
    within: Duration,
) -> Result<(u16, String), String> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_event(ws, left) {
            Some(Event::Close(Some(frame))) => {
                // Answer the close; errors only mean the server hung up.
                let _ = ws.flush();
                return Ok(frame);
            }
            Some(Event::Close(None)) => return Err("close frame without a code".into()),
            Some(Event::Ended(why)) => return Err(format!("ended without a close frame: {why}")),
            Some(_) => continue,
            None => return Err(format!("no close within {within:?}")),
        }
    }
}

// ------------------------------------------------------------- /proc

/// Threads of process `pid` (entries of `/proc/PID/task`).
pub fn proc_threads(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or_else(|e| panic!("/proc/{pid}/task: {e}"))
}

/// Open file descriptors of process `pid` (entries of `/proc/PID/fd`).
pub fn proc_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`, ...), in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Sets the soft open-file limit of process `pid` (hard limit unchanged)
/// and returns the previous soft limit.
pub fn set_nofile_soft(pid: u32, soft: u64) -> u64 {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit with a null new limit only reads into our struct.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        )
    };
    assert_eq!(rc, 0, "prlimit({pid}): {}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft.min(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    // SAFETY: as above, with a limit we own.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &new,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit({pid}): {}", std::io::Error::last_os_error());
    old.rlim_cur
}

// --------------------------------------------------------------- TLS

/// A CA and a server certificate for 127.0.0.1 (SAN `IP:127.0.0.1`,
/// `CA:FALSE`), made with `openssl` in a temp dir.
pub struct Pki {
    pub dir: TempDir,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    pub fn generate() -> Pki {
        let dir = TempDir::new("pki");
        make_ca(&dir.0);
        issue(
            &dir.0,
            "server",
            "/CN=127.0.0.1",
            "basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\n\
             subjectAltName=IP:127.0.0.1\n",
        );
        Pki {
            ca: dir.path("ca.pem"),
            cert: dir.path("server.pem"),
            key: dir.path("server.key"),
            dir,
        }
    }
}

pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// A rustls client configuration trusting only the PEM roots in `ca`.
pub fn tls_client_config(ca: &Path) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read CA PEM") {
        roots
            .add(cert.expect("parse CA PEM"))
            .expect("add CA to roots");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// A TLS connection to `addr` (verified as `127.0.0.1`) with the handshake
/// complete; `Err` says why not.
pub fn tls_connect(addr: SocketAddr, config: &Arc<ClientConfig>) -> Result<TlsStream, String> {
    let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
    let mut conn = ClientConnection::new(config.clone(), name).map_err(|e| e.to_string())?;
    let mut sock = tcp_connect(addr);
    let deadline = Instant::now() + REPLY_WITHIN;
    while conn.is_handshaking() {
        match conn.complete_io(&mut sock) {
            Ok(_) => {}
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {
                if Instant::now() >= deadline {
                    return Err(format!("TLS handshake not done within {REPLY_WITHIN:?}"));
                }
            }
            Err(e) => return Err(format!("TLS handshake: {e}")),
        }
    }
    Ok(StreamOwned::new(conn, sock))
}

/// A websocket handshake over an established TLS stream.
pub fn wss_connect(url: &str, tls: TlsStream) -> Result<WebSocket<TlsStream>, String> {
    handshake(url, tls)
}

/// `GET path` over TLS; the status and the whole response text.
pub fn https_get(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    path: &str,
) -> Result<(u16, String), String> {
    let mut tls = tls_connect(addr, config)?;
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .and_then(|_| tls.flush())
    .map_err(|e| format!("writing the request: {e}"))?;
    // The server closes after a plain answer; a missing close_notify only
    // ends the read.
    let (raw, _) = read_until(&mut tls, Duration::from_secs(5), |r| {
        head_end(r).is_some_and(|end| {
            let head = String::from_utf8_lossy(&r[..end]).to_ascii_lowercase();
            head.lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .is_some_and(|len| r.len() >= end + len)
        })
    });
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = head_end(&raw)
        .and_then(|end| status_of(&raw[..end]))
        .ok_or_else(|| format!("no HTTP answer over TLS: {text:?}"))?;
    Ok((status, text))
}

// ----------------------------------------------------------- sidecar

/// `skyapi provide ...` as a child process ([`Skyapi::provide`]), its log
/// read as one text; killed on drop.
pub struct Sidecar(Skyapi);

impl Sidecar {
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Sidecar {
        Sidecar(Skyapi::provide(args, env))
    }

    pub fn logs(&self) -> String {
        self.0.logs().join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.0.pid()
    }
}

// ------------------------------------------------------------- admin

/// A plain `GET path` with `headers` (each without CRLF) as one exchange;
/// a failed write is not fatal (see [`exchange`]).
pub fn get_with(addr: SocketAddr, path: &str, headers: &[String]) -> Outcome {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    exchange(addr, req.as_bytes()).0
}

/// The address of the admin listener, from skyapi's log line
/// `admin endpoints (...) on ADDR`.
pub fn admin_addr(sky: &Skyapi) -> SocketAddr {
    let line = sky
        .logs()
        .into_iter()
        .find(|l| l.contains("admin endpoints"))
        .unwrap_or_else(|| panic!("no admin listener logged:\n{}", sky.logs().join("\n")));
    line.split_whitespace()
        .last()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address at the end of {line:?}"))
}

/// A request head of exactly `size` bytes: `GET path` padded with one
/// `X-Pad` header, optionally as a websocket upgrade.
pub fn head_of_size(path: &str, upgrade: bool, size: usize) -> Vec<u8> {
    let mut head = if upgrade {
        upgrade_request(path.as_bytes(), &[])
    } else {
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").into_bytes()
    };
    head.truncate(head.len() - 2); // reopen the header block
    let fixed = head.len() + "X-Pad: \r\n\r\n".len();
    assert!(size > fixed, "a {size}-byte head cannot hold {path}");
    head.extend_from_slice(format!("X-Pad: {}\r\n\r\n", "p".repeat(size - fixed)).as_bytes());
    assert_eq!(head.len(), size);
    head
}
