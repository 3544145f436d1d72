//! Helpers for the fault suite (`tests/faults.rs`): a [`Fleet`] of websocket
//! clients kept alive by one background thread, a concurrent handshake
//! storm ([`Fleet::storm`]), a black-holed raw connection
//! ([`blackhole_connect`]), a TCP forwarder that can partition skyapi from
//! etcd ([`TcpProxy`]), and Prometheus counters read from etcd and skyapi
//! ([`metric_sum`]).
//!
//! Invariants:
//! - a fleet client answers the server's pings for as long as it lives
//!   (unless [`Fleet::silence`]d), so a test can hold clients through
//!   faults lasting longer than `--timeout` without reading them itself;
//! - everything a fleet client receives is recorded, so "stayed connected"
//!   is checked from evidence (no close frame, no end of stream, a fresh
//!   pong for a fresh ping), not assumed;
//! - every wait has a deadline; every process started here is killed on drop.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::handshake::client::ClientHandshake;
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::Message;

use super::client::{is_timeout, next_event, socket_addr_of, tcp_connect, Event, Ws};
use super::pki::openssl;
use super::{poll_until, Etcd, TempDir};

/// How often the fleet thread reads every client.
const PUMP_TICK: Duration = Duration::from_millis(25);
/// Connections opened before their upgrade requests go out, in a storm.
const STORM_WAVE: usize = 256;

/// Index of a client in a [`Fleet`].
pub type ClientId = usize;

/// What one fleet client has seen so far.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub label: String,
    /// Text messages (the welcome first), binary ones as `<binary N bytes>`.
    pub texts: Vec<String>,
    /// When the first text arrived.
    pub first_text_at: Option<Instant>,
    /// Pings from the server.
    pub server_pings: usize,
    /// Payloads of pongs answering our probes.
    pub pongs: Vec<Vec<u8>>,
    /// How the connection ended (a close frame or the end of the stream),
    /// and when; `None` while it is open.
    pub end: Option<Event>,
    pub ended_at: Option<Instant>,
    /// Not read any more: answers no ping (a frozen or black-holed client).
    pub silent: bool,
    /// Handed back to the test by [`Fleet::take`].
    pub taken: bool,
}

struct Peer {
    ws: Option<Ws>,
    seen: Seen,
}

/// Websocket clients kept alive by one thread that reads each of them every
/// `PUMP_TICK` (tungstenite answers pings while reading).
pub struct Fleet {
    peers: Arc<Mutex<Vec<Peer>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new()
    }
}

impl Fleet {
    pub fn new() -> Fleet {
        let peers: Arc<Mutex<Vec<Peer>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let peers = peers.clone();
            let stop = stop.clone();
            thread::Builder::new()
                .name("fleet-pump".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        {
                            let mut peers = peers.lock().unwrap_or_else(|p| p.into_inner());
                            for p in peers.iter_mut() {
                                pump(p);
                            }
                        }
                        thread::sleep(PUMP_TICK);
                    }
                })
                .expect("start the fleet thread")
        };
        Fleet {
            peers,
            stop,
            thread: Some(thread),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Peer>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands an open websocket to the fleet; from now on it is read (and
    /// answers pings) in the background.
    pub fn add(&self, label: &str, ws: Ws) -> ClientId {
        ws.get_ref()
            .set_nonblocking(true)
            .expect("set_nonblocking on a client socket");
        let mut peers = self.lock();
        peers.push(Peer {
            ws: Some(ws),
            seen: Seen {
                label: label.to_string(),
                ..Seen::default()
            },
        });
        peers.len() - 1
    }

    /// Registers at `url` (waiting for the welcome, which is recorded as
    /// the client's first text) and adds the client.
    pub fn register(&self, label: &str, url: &str) -> ClientId {
        let (ws, welcome) = super::client::connect(url);
        let id = self.add(label, ws);
        let mut peers = self.lock();
        peers[id].seen.texts.push(welcome);
        peers[id].seen.first_text_at = Some(Instant::now());
        id
    }

    /// Completes the websocket handshake only; whatever the server sends
    /// (the welcome, an `ERROR`) is recorded as it arrives.
    pub fn connect(&self, label: &str, url: &str) -> ClientId {
        let ws = super::client::connect_raw(url);
        self.add(label, ws)
    }

    /// Everything client `id` has seen.
    pub fn seen(&self, id: ClientId) -> Seen {
        self.lock()[id].seen.clone()
    }

    /// The client's first text parsed as JSON (the welcome), once it came;
    /// panics if it is not JSON (e.g. an `ERROR: ...` refusal).
    pub fn welcome(&self, id: ClientId) -> Option<Value> {
        let seen = self.seen(id);
        let first = seen.texts.first()?;
        Some(serde_json::from_str(first).unwrap_or_else(|e| {
            panic!(
                "client {}: first message is not the welcome JSON ({e}): {first:?}",
                seen.label
            )
        }))
    }

    /// Stops reading client `id`: it answers no more pings, but its TCP
    /// connection stays open (the kernel still ACKs).
    pub fn silence(&self, id: ClientId) {
        self.lock()[id].seen.silent = true;
    }

    /// Takes client `id` out of the fleet (blocking again, with the test
    /// read timeout), e.g. to close it with [`super::client::close`].
    pub fn take(&self, id: ClientId) -> Ws {
        let mut peers = self.lock();
        let p = &mut peers[id];
        let ws =
            p.ws.take()
                .unwrap_or_else(|| panic!("client {} already taken", p.seen.label));
        p.seen.taken = true;
        ws.get_ref()
            .set_nonblocking(false)
            .expect("set_nonblocking(false)");
        ws
    }

    /// Whether none of `ids` has received anything but pings since the
    /// welcome count `texts` (0 for clients still waiting for theirs), and
    /// none has ended.
    pub fn quiet(&self, ids: &[(ClientId, usize)]) -> bool {
        let peers = self.lock();
        ids.iter().all(|&(id, texts)| {
            let s = &peers[id].seen;
            s.end.is_none() && s.texts.len() == texts
        })
    }

    /// A one-line account of every client, for failure messages.
    pub fn describe(&self) -> String {
        self.lock()
            .iter()
            .map(|p| {
                let s = &p.seen;
                format!(
                    "{}: texts {:?}, {} server pings, end {:?}{}{}",
                    s.label,
                    s.texts,
                    s.server_pings,
                    s.end,
                    if s.silent { ", silent" } else { "" },
                    if s.taken { ", taken" } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join("\n  ")
    }

    /// Asserts that every client in `ids` is still connected and answering:
    /// no close frame, no end of stream, no `ERROR`, and a ping we send now
    /// is answered by the server within 3 s. `context` names the moment.
    pub fn assert_connected(&self, ids: &[ClientId], context: &str) {
        static PROBE: AtomicU64 = AtomicU64::new(0);
        let mut waiting = Vec::new();
        {
            let mut peers = self.lock();
            for &id in ids {
                let p = &mut peers[id];
                let s = &p.seen;
                assert!(
                    s.end.is_none(),
                    "{context}: client {} was disconnected: {:?}",
                    s.label,
                    s.end
                );
                assert!(
                    !s.texts.iter().any(|t| t.starts_with("ERROR")),
                    "{context}: client {} was refused: {:?}",
                    s.label,
                    s.texts
                );
                let ws = p
                    .ws
                    .as_mut()
                    .unwrap_or_else(|| panic!("{context}: client {} is not in the fleet", s.label));
                let payload = format!("probe-{}", PROBE.fetch_add(1, Ordering::Relaxed));
                if let Err(e) = ws.send(Message::Ping(payload.clone().into_bytes().into())) {
                    panic!(
                        "{context}: client {}: sending a ping failed: {e}",
                        p.seen.label
                    );
                }
                waiting.push((id, payload.into_bytes()));
            }
        }
        let answered = poll_until(Duration::from_secs(3), || {
            let peers = self.lock();
            waiting
                .iter()
                .all(|(id, payload)| peers[*id].seen.pongs.contains(payload))
        });
        if !answered {
            let peers = self.lock();
            let missing: Vec<&str> = waiting
                .iter()
                .filter(|(id, payload)| !peers[*id].seen.pongs.contains(payload))
                .map(|(id, _)| peers[*id].seen.label.as_str())
                .collect();
            panic!("{context}: no pong within 3 s for the pings of {missing:?}");
        }
    }
}

impl Fleet {
    /// A reconnect storm: in waves of `STORM_WAVE`, opens the wave's
    /// connections, then writes all their upgrade requests in one tight
    /// loop (non-blocking handshakes on this one thread), so the server sees
    /// each wave arrive within milliseconds, as after a restart. Each
    /// upgraded client joins the fleet at once (and so answers pings while
    /// later waves connect); waves keep every connection's wait for its
    /// request within the server's 5 s request-head deadline. Returns the
    /// ids in the order of `urls`; panics if a handshake fails or they are
    /// not all done within `within`.
    pub fn storm(&self, label: &str, urls: &[String], within: Duration) -> Vec<ClientId> {
        type Mid = MidHandshake<ClientHandshake<TcpStream>>;
        let deadline = Instant::now() + within;
        let mut ids: Vec<Option<ClientId>> = vec![None; urls.len()];
        let mut pending: Vec<(usize, Mid)> = Vec::new();
        let drive = |pending: Vec<(usize, Mid)>, ids: &mut Vec<Option<ClientId>>| {
            let mut still = Vec::new();
            for (i, mid) in pending {
                match mid.handshake() {
                    Ok((ws, _)) => ids[i] = Some(self.add(&format!("{label} {i}"), ws)),
                    Err(HandshakeError::Interrupted(mid)) => still.push((i, mid)),
                    Err(HandshakeError::Failure(e)) => panic!("{label} {i}: handshake: {e}"),
                }
            }
            still
        };
        for (w, wave) in urls.chunks(STORM_WAVE).enumerate() {
            let streams: Vec<TcpStream> = wave
                .iter()
                .map(|url| {
                    let s = tcp_connect(socket_addr_of(url));
                    s.set_nonblocking(true).expect("set_nonblocking");
                    s
                })
                .collect();
            for (j, (url, stream)) in wave.iter().zip(streams).enumerate() {
                let i = w * STORM_WAVE + j;
                match tungstenite::client(url.as_str(), stream) {
                    Ok((ws, _)) => ids[i] = Some(self.add(&format!("{label} {i}"), ws)),
                    Err(HandshakeError::Interrupted(mid)) => pending.push((i, mid)),
                    Err(HandshakeError::Failure(e)) => {
                        panic!("{label} {i} ({url}): handshake: {e}")
                    }
                }
            }
            pending = drive(pending, &mut ids);
        }
        while !pending.is_empty() {
            assert!(
                Instant::now() < deadline,
                "{} of {} {label} handshakes not complete within {within:?}",
                pending.len(),
                urls.len()
            );
            pending = drive(pending, &mut ids);
            if !pending.is_empty() {
                thread::sleep(Duration::from_millis(5));
            }
        }
        ids.into_iter()
            .map(|id| id.expect("every handshake completed"))
            .collect()
    }
}

/// Reads everything client `p` has waiting, without blocking.
fn pump(p: &mut Peer) {
    if p.seen.silent || p.seen.end.is_some() {
        return;
    }
    let Some(ws) = p.ws.as_mut() else { return };
    // The socket is non-blocking: `next_event` returns `None` at once when
    // there is nothing (more) to read.
    while let Some(event) = next_event(ws, Duration::ZERO) {
        match event {
            Event::Text(t) => {
                p.seen.first_text_at.get_or_insert_with(Instant::now);
                p.seen.texts.push(t);
            }
            Event::Binary(b) => p.seen.texts.push(format!("<binary {} bytes>", b.len())),
            Event::Ping(_) => p.seen.server_pings += 1,
            Event::Pong(payload) => p.seen.pongs.push(payload),
            end @ (Event::Close(_) | Event::Ended(_)) => {
                // Sends the close reply tungstenite queued; the server may
                // be gone already.
                let _ = ws.flush();
                p.seen.end = Some(end);
                p.seen.ended_at = Some(Instant::now());
                return;
            }
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // Why ignored: the pump only panics on a poisoned lock it already
            // recovers from; the sockets close when `peers` drops either way.
            let _ = t.join();
        }
        if thread::panicking() {
            eprintln!("--- fleet ---\n  {}\n--- end of fleet ---", self.describe());
        }
    }
}

/// A raw TCP connection that completes the websocket upgrade for `url` and
/// is never read or written again: a peer behind a network black hole
/// whose TCP connection stays open. Returns once the `101` head is read.
pub fn blackhole_connect(url: &str) -> TcpStream {
    let addr = socket_addr_of(url);
    let path = &url["ws://".len() + url["ws://".len()..].find('/').expect("URL has a path")..];
    let mut s = tcp_connect(addr);
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .expect("write upgrade request");
    // Byte by byte, so nothing after the head (the welcome) is consumed:
    // this peer reads nothing but the upgrade answer.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert!(
            Instant::now() < deadline,
            "no upgrade answer from {addr} within 10 s: {:?}",
            String::from_utf8_lossy(&head)
        );
        match s.read(&mut byte) {
            Ok(0) => panic!(
                "{addr} closed during the upgrade: {:?}",
                String::from_utf8_lossy(&head)
            ),
            Ok(_) => head.push(byte[0]),
            Err(e) if is_timeout(&e) => {}
            Err(e) => panic!("reading the upgrade answer from {addr}: {e}"),
        }
    }
    let head = String::from_utf8_lossy(&head);
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "upgrade refused by {addr}: {head:?}"
    );
    s
}

/// A plain HTTP/1.0 GET (so the answer is never chunked) returning the
/// status and the body. For etcd's `/metrics`, which is large.
pub fn http10_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tcp_connect(addr);
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("write HTTP request");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if is_timeout(&e) => {}
            Err(e) => panic!("GET {addr}{path}: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "GET {addr}{path}: not complete within 5 s"
        );
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("GET {addr}{path}: no HTTP head in {text:?}"));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("GET {addr}{path}: not an HTTP response: {head:?}"));
    (code, body.to_string())
}

/// The sum of every sample of `name` in Prometheus text `text` whose labels
/// include all of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.find('{') {
                Some(i) => (&series[..i], &series[i..]),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let has = |k: &str, v: &str| {
                rest.contains(&format!("{{{k}=\"{v}\"")) || rest.contains(&format!(",{k}=\"{v}\""))
            };
            if !labels.iter().all(|(k, v)| has(k, v)) {
                return None;
            }
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

/// A counter from etcd's own `/metrics` (client port), summed over `labels`.
pub fn etcd_metric(etcd: &Etcd, name: &str, labels: &[(&str, &str)]) -> f64 {
    let addr = SocketAddr::from(([127, 0, 0, 1], etcd.client_port()));
    let (code, body) = http10_get(addr, "/metrics");
    assert_eq!(code, 200, "etcd /metrics: HTTP {code}");
    assert!(
        body.contains(&format!("{name} ")) || body.contains(&format!("{name}{{")),
        "etcd /metrics has no {name}"
    );
    metric_sum(&body, name, labels)
}

/// The body of a plain HTTP answer (after the head).
pub fn body_of(response: &str) -> &str {
    response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("")
}

/// Every key under `prefix` with its value parsed as JSON and its lease.
/// Panics on a value that is not JSON: SkyDNS would fail the whole lookup.
pub fn entries(etcd: &Etcd, prefix: &str) -> BTreeMap<String, (Value, i64)> {
    etcd.get_prefix_with_lease(prefix)
        .into_iter()
        .map(|(k, (v, lease))| {
            let json = serde_json::from_str(&v)
                .unwrap_or_else(|e| panic!("value of {k} is not JSON ({e}): {v:?}"));
            (k, (json, lease))
        })
        .collect()
}

/// A TCP forwarder between skyapi and etcd that can cut the path without
/// closing anything ([`TcpProxy::partition`]): bytes stop flowing both
/// ways while both TCP connections stay open, as behind a network
/// partition; [`TcpProxy::heal`] lets them flow again.
pub struct TcpProxy {
    addr: SocketAddr,
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl TcpProxy {
    /// Listens on a loopback port and forwards every connection to `target`.
    pub fn start(target: SocketAddr) -> TcpProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener
            .set_nonblocking(true)
            .expect("set_nonblocking on the proxy listener");
        let addr = listener.local_addr().expect("proxy address");
        let paused = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        {
            let (paused, stop, conns) = (paused.clone(), stop.clone(), conns.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (client, _) = match listener.accept() {
                        Ok(c) => c,
                        Err(_) => {
                            thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                    };
                    let Ok(server) = TcpStream::connect(target) else {
                        // Why ignored: the target is down; so is this connection.
                        let _ = client.shutdown(std::net::Shutdown::Both);
                        continue;
                    };
                    // Why ignored: both sockets are fresh; clones and timeouts
                    // only fail on a broken socket, which the copies then see.
                    let _ = client.set_nonblocking(false);
                    if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                        let mut list = conns.lock().unwrap_or_else(|p| p.into_inner());
                        list.push(c2);
                        list.push(s2);
                    }
                    for (from, to) in [(&client, &server), (&server, &client)] {
                        let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                            continue;
                        };
                        let (paused, stop) = (paused.clone(), stop.clone());
                        thread::spawn(move || copy(from, to, &paused, &stop));
                    }
                }
            });
        }
        TcpProxy {
            addr,
            paused,
            stop,
            conns,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops forwarding, in both directions, on every connection (new ones
    /// included); nothing is closed.
    pub fn partition(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    pub fn heal(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either ends, holding still while `paused`.
fn copy(mut from: TcpStream, mut to: TcpStream, paused: &AtomicBool, stop: &AtomicBool) {
    // Why ignored: a failure leaves the default (blocking) read, and the
    // stop flag is then only seen after the next byte; harmless in tests.
    let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf = [0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        if paused.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(10));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => break,
        }
    }
    // Why ignored: the other side may be closed already.
    let _ = to.shutdown(std::net::Shutdown::Write);
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in self.conns.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            // Why ignored: it may be closed already.
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// `--quota-backend-bytes` for [`fill_to_quota`]: 1 MiB, which a dozen
/// 100 kB values exceed.
pub const TINY_QUOTA: &str = "1048576";

/// Puts 100 kB values under `/fill/` until etcd (started with
/// `--quota-backend-bytes` [`TINY_QUOTA`]) raises its NOSPACE alarm and
/// refuses every write with "database space exceeded".
pub fn fill_to_quota(etcd: &Etcd) {
    let value = "x".repeat(100_000);
    for i in 0..200 {
        match etcd.etcdctl(&["put", &format!("/fill/{i}"), &value]) {
            Ok(_) => {}
            Err(e) if e.contains("database space exceeded") => {
                let alarms = etcd.etcdctl(&["alarm", "list"]).unwrap_or_default();
                assert!(alarms.contains("NOSPACE"), "no NOSPACE alarm: {alarms:?}");
                return;
            }
            Err(e) => panic!("filling etcd: {e}"),
        }
    }
    panic!("etcd took 20 MB without reaching its quota: was it started with a tiny one?");
}

/// What an operator does about a NOSPACE alarm: delete the filler, compact
/// to the current revision, defragment, disarm the alarm.
pub fn clear_quota(etcd: &Etcd) {
    let must = |args: &[&str]| etcd.etcdctl(args).unwrap_or_else(|e| panic!("{e}"));
    must(&["del", "--prefix", "/fill/"]);
    let status: Value = serde_json::from_str(&must(&["endpoint", "status", "-w", "json"]))
        .expect("endpoint status is JSON");
    let revision = status[0]["Status"]["header"]["revision"]
        .as_i64()
        .unwrap_or_else(|| panic!("no revision in {status}"));
    must(&["compact", &revision.to_string()]);
    must(&["defrag"]);
    must(&["alarm", "disarm"]);
}

/// The root user's credentials on [`jwt_etcd`].
pub const JWT_ROOT: &str = super::etcd::ROOT_USER;

/// A member issuing RS256 JWT auth tokens (keys made with openssl in
/// `dir`), auth enabled, with user `skyapi` (password `pw`) allowed to
/// read and write under `/skydns/`. Every later change to users or roles
/// makes etcd refuse the tokens issued before it with "revision of auth
/// store is old".
pub fn jwt_etcd(dir: &TempDir) -> Etcd {
    openssl(&dir.0, &["genrsa", "-out", "jwt.key", "2048"]);
    openssl(
        &dir.0,
        &["rsa", "-in", "jwt.key", "-pubout", "-out", "jwt.pub"],
    );
    let token = format!(
        "jwt,pub-key={},priv-key={},sign-method=RS256,ttl=10m",
        dir.path("jwt.pub").display(),
        dir.path("jwt.key").display()
    );
    let etcd = Etcd::start_with(&["--auth-token", &token], None);
    for args in super::etcd::AUTH_SETUP {
        etcd.must_as(None, args);
    }
    etcd
}

/// A client of "another instance": a runtime to drive it, the client, and
/// a lease of its own (an hour long, so it outlives any test).
fn foreign_client(etcd: &Etcd) -> (tokio::runtime::Runtime, etcd_client::Client, i64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the etcd client");
    let (c, lease) = rt.block_on(async {
        let mut c = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .expect("connect to etcd");
        let lease = c.lease_grant(3600, None).await.expect("lease").id();
        (c, lease)
    });
    (rt, c, lease)
}

/// Puts `n` entries of "other instances" under `dir` (on one long lease of
/// their own, as another skyapi would), in full transactions; returns the
/// lease.
pub fn fill_foreign(etcd: &Etcd, dir: &str, n: usize) -> i64 {
    let (rt, mut c, lease) = foreign_client(etcd);
    rt.block_on(async {
        let value = r#"{"host":"198.51.100.7","port":8080,"priority":1,"weight":100,"ttl":30}"#;
        for chunk in (0..n).collect::<Vec<_>>().chunks(128) {
            let ops: Vec<etcd_client::TxnOp> = chunk
                .iter()
                .map(|i| {
                    etcd_client::TxnOp::put(
                        format!("{dir}other/{:040x}", i),
                        value,
                        Some(etcd_client::PutOptions::new().with_lease(lease)),
                    )
                })
                .collect();
            c.txn(etcd_client::Txn::new().and_then(ops))
                .await
                .expect("put foreign entries");
        }
        lease
    })
}

/// Another instance's churn: `per_sec` registrations and removals a second
/// (each a put then a delete of its own key) under `dir`, for `secs`.
pub fn foreign_churn(etcd: &Etcd, dir: &str, per_sec: u32, secs: u32) {
    let (rt, mut c, lease) = foreign_client(etcd);
    rt.block_on(async {
        let value = r#"{"host":"198.51.100.9","port":8080,"priority":1,"weight":100,"ttl":30}"#;
        let step = Duration::from_secs(1) / per_sec;
        let start = Instant::now();
        for i in 0..per_sec * secs {
            let key = format!("{dir}churn/{:040x}", i);
            c.put(
                key.as_str(),
                value,
                Some(etcd_client::PutOptions::new().with_lease(lease)),
            )
            .await
            .expect("churn put");
            c.delete(key.as_str(), None).await.expect("churn delete");
            let next = start + step * (i + 1);
            tokio::time::sleep(next.saturating_duration_since(Instant::now())).await;
        }
    })
}

/// etcd's own counters of what it serves: bytes sent to clients, unary
/// requests handled, and messages received on streams (each keepalive, each
/// watch request).
#[derive(Debug, Clone, Copy)]
pub struct EtcdLoad {
    pub sent_bytes: f64,
    pub requests: f64,
    pub stream_msgs: f64,
}

impl EtcdLoad {
    pub fn read(etcd: &Etcd) -> EtcdLoad {
        EtcdLoad {
            sent_bytes: etcd_metric(etcd, "etcd_network_client_grpc_sent_bytes_total", &[]),
            requests: etcd_metric(etcd, "grpc_server_handled_total", &[("grpc_type", "unary")]),
            stream_msgs: etcd_metric(
                etcd,
                "grpc_server_msg_received_total",
                &[("grpc_type", "bidi_stream")],
            ),
        }
    }

    /// Per second from `earlier` to `self`, `secs` apart: (bytes sent,
    /// requests including stream messages).
    pub fn rate_since(&self, earlier: &EtcdLoad, secs: f64) -> (f64, f64) {
        (
            (self.sent_bytes - earlier.sent_bytes) / secs,
            (self.requests - earlier.requests + self.stream_msgs - earlier.stream_msgs) / secs,
        )
    }
}

/// CPU seconds (user + system) process `pid` has used.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}
