//! One connection, on its own OS thread: read the request head, serve a plain
//! HTTP endpoint or upgrade `/provide` to a websocket, then hold the
//! registration while the client stays alive.
//!
//! Invariants:
//! - the registration is released by a drop guard, so every way out of the
//!   thread (close, ping timeout, error, panic) removes the entry; except
//!   skyapi's own stop, which leaves it for the next instance (close 1012)
//!   or has revoked it already (`--revoke-on-exit`, close 1001);
//! - every blocking read has a deadline: the read timeout is always the time
//!   to the next ping or to the liveness deadline, whichever is sooner;
//! - a client is dropped only when a ping actually sent has gone unanswered
//!   (no pong, no frame) for the grace `liveness` defines: `--timeout` after
//!   it was last heard, with pings every `--timeout`/3, so a live client
//!   gets at least two chances to answer; time skyapi itself did not run (a
//!   stall) is never held against a client;
//! - what a peer sends is bounded (`config::Limits`): the head's size and
//!   time, frames and messages, and the message rate (a token bucket over
//!   every message, pings and pongs included, plus a byte budget for frames
//!   that never make a message);
//! - a registration's token is checked before the upgrade and again
//!   whenever the token file is reloaded: a name no longer granted is closed
//!   with 1008 "token revoked".

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::TryRecvError;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use log::{debug, info, warn};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

use crate::ack::{AckReceiver, Woken};
use crate::auth::{self, TokenId};
use crate::endpoints::Listener;
use crate::http::{self, Head, HeadError};
use crate::liveness::{Liveness, Next};
use crate::metrics::{self, Removal};
use crate::provide::{self, Entry, Registration};
use crate::server::Shared;
use crate::transport::{is_over_budget, is_timeout, Bucket, Socket, Transport};
use crate::worker::ConnId;

/// A blocked write (a client that reads nothing) fails after this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing connection waits for the client's close frame.
const CLOSE_WAIT: Duration = Duration::from_millis(500);
/// How long a new connection waits for its entry to be stored before it
/// serves the socket: with etcd up the answer comes in about a millisecond,
/// and the welcome stays the first message the client gets (a ping sent
/// with the request head is answered after it).
const ACK_FIRST_WAIT: Duration = Duration::from_secs(1);
/// While its entry is not stored yet, a connection reads a frame that has
/// begun to arrive for at most this long before it looks for its answer
/// again (the rest of the frame is kept for the next read).
const ACK_DRAIN: Duration = Duration::from_millis(10);
/// How many seconds' worth of `--max-message-rate` a client may send at once.
const MSG_BURST_SECS: f64 = 5.0;
/// Bytes allowed per message beyond its payload: a websocket frame header
/// (at most 14) and a TLS record's overhead (under 100), with room.
const FRAME_OVERHEAD: usize = 256;

/// Small buffers and caps: tungstenite's defaults (128 KiB buffers, 64 MiB
/// messages) are for data streams, not for ten thousand idle registrations.
/// A registrar needs no client messages at all: `max_message` caps them.
pub fn ws_config(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(16 * 1024)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

/// A live registration, as `/services` lists it.
#[derive(Debug, Clone)]
pub struct Live {
    pub service: String,
    pub name: String,
    pub key: String,
    pub host: String,
    pub port: u16,
    pub priority: u16,
    pub weight: u16,
    pub peer: SocketAddr,
    pub since: SystemTime,
    /// True once etcd has stored the entry.
    pub stored: bool,
    /// The name relative to the root, labels left to right.
    pub labels: Vec<String>,
    /// The token that authorised it (`None` without `--token-file`).
    pub token: Option<TokenId>,
    /// Set when a reloaded token file no longer grants the name; the
    /// connection then closes with 1008 "token revoked".
    pub revoked: Arc<AtomicBool>,
}

/// Serves one accepted connection to its end: wraps it in TLS when the
/// server has a certificate, then reads the head and routes it.
pub fn serve(shared: &Arc<Shared>, id: ConnId, stream: TcpStream, peer: SocketAddr) {
    // Logs and /services show an IPv4 peer as IPv4, like the stored host.
    let peer = SocketAddr::new(peer_ip(&peer), peer.port());
    // Best effort: a socket that cannot take a timeout is already broken and
    // its first write will say so.
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    // Small messages (101, welcome, pings) go out at once instead of waiting
    // for the ACK of the previous one (Nagle).
    let _ = stream.set_nodelay(true);
    let socket = Socket::new(stream);
    match &shared.tls {
        Some(config) => match rustls::ServerConnection::new(config.clone()) {
            Ok(conn) => serve_on(
                shared,
                id,
                rustls::StreamOwned::new(conn, socket),
                peer,
                Listener::Main,
            ),
            Err(e) => warn!("{peer}: cannot start TLS: {e}"),
        },
        None => serve_on(shared, id, socket, peer, Listener::Main),
    }
}

/// Serves one connection of the admin listener (plain HTTP, endpoints
/// only), under the same head limits as the main listener.
pub fn serve_admin(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    // Best effort, as in `serve`.
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    serve_on(shared, 0, Socket::new(stream), peer, Listener::Admin);
}

fn serve_on<T: Transport>(
    shared: &Arc<Shared>,
    id: ConnId,
    mut stream: T,
    peer: SocketAddr,
    on: Listener,
) {
    let limits = shared.limits;
    let deadline = Instant::now() + limits.handshake_timeout;
    let head = match http::read_head(&mut stream, deadline, limits.max_head) {
        Ok(h) => h,
        Err(HeadError::Gone) => return,
        Err(HeadError::TimedOut) => {
            shared.limit_hit(
                "--handshake-timeout",
                &format!(
                    "{peer}: request head not complete within {}s: dropped",
                    limits.handshake_timeout.as_secs()
                ),
            );
            return;
        }
        Err(HeadError::TooLarge) => {
            shared.limit_hit(
                "--max-head-size",
                &format!("{peer}: request head over {} bytes: 431", limits.max_head),
            );
            return plain(&mut stream, 431, "request head too large");
        }
        Err(HeadError::Malformed(why)) => {
            return plain(&mut stream, 400, &format!("malformed request: {why}"))
        }
    };
    match head.path.as_str() {
        "/provide" if on == Listener::Main => provide(shared, id, stream, peer, head),
        _ => crate::endpoints::serve(shared, &mut stream, &head, on),
    }
}

/// A one-line plain response; the connection ends after it.
pub fn plain(stream: &mut dyn io::Write, status: u16, line: &str) {
    // The peer may already be gone; there is nobody left to tell.
    let _ = http::respond_text(stream, status, line);
}

/// Unmaps `::ffff:a.b.c.d` so IPv4 clients on a dual-stack socket are
/// registered as plain IPv4.
pub fn peer_ip(peer: &SocketAddr) -> IpAddr {
    match peer.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Holds a registration: listed in `/services` and counted while it lives,
/// removed from etcd (through the worker) and from the list when dropped.
struct Registered<'a> {
    shared: &'a Shared,
    conn: ConnId,
    key: String,
    revoked: Arc<AtomicBool>,
}

impl<'a> Registered<'a> {
    fn new(
        shared: &'a Shared,
        conn: ConnId,
        r: &Registration,
        e: &Entry,
        peer: SocketAddr,
        token: Option<TokenId>,
    ) -> Self {
        let revoked = Arc::new(AtomicBool::new(false));
        shared.live_registrations().insert(
            conn,
            Live {
                service: r.service.clone(),
                name: e.name.clone(),
                key: e.key.clone(),
                host: r.host.clone(),
                port: r.port,
                priority: r.priority,
                weight: r.weight,
                peer,
                since: SystemTime::now(),
                stored: false,
                labels: r.relative_labels().iter().map(|l| l.to_string()).collect(),
                token,
                revoked: revoked.clone(),
            },
        );
        shared.metrics.connection_opened();
        Registered {
            shared,
            conn,
            key: e.key.clone(),
            revoked,
        }
    }

    fn stored(&self) {
        if let Some(l) = self.shared.live_registrations().get_mut(&self.conn) {
            l.stored = true;
        }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        // A connection that ends because skyapi stops leaves its entry:
        // after a restart its client puts it again under the new lease (or
        // it expires with the old one within `--timeout`); with
        // `--revoke-on-exit` the revoked lease takes it. Deleting it here
        // would take a live provider out of DNS for every deploy.
        if !self.shared.is_shutting_down() {
            self.shared.worker.unregister(self.conn, &self.key);
        }
        self.shared.live_registrations().remove(&self.conn);
        self.shared.metrics.connection_closed();
    }
}

fn provide<T: Transport>(
    shared: &Arc<Shared>,
    id: ConnId,
    mut stream: T,
    peer: SocketAddr,
    head: Head,
) {
    let parsed = provide::parse(&head.query, peer_ip(&peer), &shared.layout);
    // Access control answers in HTTP, before the upgrade: a client that may
    // not register gets no websocket at all.
    let tokens = shared.tokens();
    let query_token = provide::token_param(&head.query);
    let presented = auth::presented_token(head.header("authorization"), query_token.as_deref());
    let token = match auth::authorise(tokens.as_deref(), presented, parsed.as_ref().ok()) {
        Ok(token) => token,
        Err(denied) => {
            shared.metrics.registration(metrics::Registration::Refused);
            let (status, why) = match denied {
                auth::Denied::Unauthenticated => {
                    (401, "a valid bearer token is required".to_string())
                }
                auth::Denied::Reserved(label) => (
                    403,
                    format!(
                        "names under {label}.{} are reserved for the DNS server's own records",
                        shared.layout.root_name()
                    ),
                ),
                auth::Denied::Forbidden => {
                    let name = parsed
                        .as_ref()
                        .map(|r| r.relative_name())
                        .unwrap_or_default();
                    (403, format!("this token may not register {name}"))
                }
            };
            info!("{peer}: /provide refused: {why}: {status}");
            return plain(&mut stream, status, &why);
        }
    };
    if let Ok(r) = &parsed {
        if shared.host_must_match_peer && !host_is_peer(&r.host, &peer) {
            info!("{peer}: host {} is not the peer's address: 403", r.host);
            shared.metrics.registration(metrics::Registration::Refused);
            return plain(
                &mut stream,
                403,
                "host must be the connection's own address",
            );
        }
    }

    let accept_key = match http::websocket_accept_key(&head) {
        Ok(k) => k,
        Err((status, why)) => {
            let extra: &[(&str, &str)] = if status == 426 {
                // RFC 6455 4.4: tell the client which version we speak.
                &[("Sec-WebSocket-Version", "13")]
            } else {
                &[]
            };
            let _ = http::respond(
                &mut stream,
                status,
                "text/plain; charset=utf-8",
                extra,
                &format!("{why}\n"),
            );
            return;
        }
    };
    let registration = match parsed {
        Ok(r) => r,
        Err(refusal) => {
            info!("{peer}: refused /provide: {refusal}");
            shared.metrics.registration(metrics::Registration::Refused);
            if http::switch_protocols(&mut stream, &accept_key).is_err() {
                return;
            }
            let config = ws_config(shared.limits.max_message);
            let mut ws =
                WebSocket::from_partially_read(stream, head.rest, Role::Server, Some(config));
            let reason = refusal.to_string();
            close(
                &mut ws,
                CloseCode::Policy,
                &reason,
                Some(&format!("ERROR: {reason}")),
                true,
            );
            return;
        }
    };
    let entry = registration.entry(&shared.layout);
    // Every log line of this registration names it the same way.
    let who = format!(
        "service={} id={} peer={peer}",
        registration.service, entry.id
    );
    info!("connect {who} key={}", entry.key);
    // Queued before the 101 is written, so etcd works while it travels; the
    // guard takes it back if the upgrade then fails.
    let ack = shared.worker.register(id, &entry.key, &entry.value);
    let registered = Registered::new(shared, id, &registration, &entry, peer, token);
    // A reload between the check above and the listing just made would
    // have missed this connection: check against the file in force now.
    if let (Some(token), Some(now)) = (token, shared.tokens()) {
        if !auth::still_granted(&now, &token, &registration.relative_labels()) {
            registered.revoked.store(true, Ordering::SeqCst);
        }
    }
    if http::switch_protocols(&mut stream, &accept_key).is_err() {
        shared
            .metrics
            .registration(metrics::Registration::Abandoned);
        return;
    }
    let config = ws_config(shared.limits.max_message);
    let mut ws = WebSocket::from_partially_read(stream, head.rest, Role::Server, Some(config));
    let mut acked = false;
    let ending = hold(shared, &mut ws, &entry, &who, ack, &registered, &mut acked);
    if acked {
        shared.metrics.removal(ending);
    } else {
        shared
            .metrics
            .registration(metrics::Registration::Abandoned);
    }
    // A stop closes every connection at once: one line each would be
    // thousands of lines per deploy; the server logs the count instead.
    if ending == Removal::Shutdown {
        debug!("close {who} reason={}", ending.as_str());
    } else {
        info!("close {who} reason={}", ending.as_str());
    }
}

/// Whether an advertised host is the connection's own address (compared as
/// addresses, so `::ffff:10.0.0.1` and `10.0.0.1` agree).
fn host_is_peer(host: &str, peer: &SocketAddr) -> bool {
    host.parse::<IpAddr>()
        .map(|h| peer_ip(&SocketAddr::new(h, 0)) == peer_ip(peer))
        .unwrap_or(false)
}

/// Sends a close frame (after `message`, if any) and waits up to
/// `CLOSE_WAIT` for the client's answering close, so the frames reach the
/// client instead of being lost to a reset when the socket is dropped.
/// `drain` is false after a frame error: tungstenite keeps the offending
/// frame and must not be read again.
fn close<T: Transport>(
    ws: &mut WebSocket<T>,
    code: CloseCode,
    reason: &str,
    message: Option<&str>,
    drain: bool,
) {
    if let Some(m) = message {
        let _ = ws.send(Message::Text(m.to_string().into()));
    }
    // A close reason must fit a control frame (125 bytes with the code).
    let mut end = reason.len().min(120);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let frame = CloseFrame {
        code,
        reason: reason[..end].to_string().into(),
    };
    // Errors below mean the peer is gone already, which is where we are
    // heading anyway.
    let _ = ws.close(Some(frame));
    let _ = ws.flush();
    if !drain {
        return;
    }
    ws.get_mut()
        .socket()
        .set_deadline(Some(Instant::now() + CLOSE_WAIT));
    loop {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Tells the client that skyapi stops: 1012 (Service Restart: reconnect,
/// your entry is kept meanwhile) by default, 1001 (Going Away) with
/// `--revoke-on-exit`, whose entries are gone already.
fn closed_by_shutdown<T: Transport>(shared: &Shared, ws: &mut WebSocket<T>) -> Removal {
    let (code, reason) = if shared.revoke_on_exit {
        (CloseCode::Away, "skyapi shutting down")
    } else {
        (CloseCode::Restart, "skyapi restarting: reconnect")
    };
    close(ws, code, reason, None, true);
    Removal::Shutdown
}

/// The liveness loop: pings, reads (and discards) client frames, tells the
/// client once its entry is stored (setting `acked`), and returns why it
/// ended.
fn hold<T: Transport>(
    shared: &Shared,
    ws: &mut WebSocket<T>,
    entry: &Entry,
    who: &str,
    ack: AckReceiver,
    registered: &Registered,
    acked: &mut bool,
) -> Removal {
    let timeout = shared.timeout;
    // Until the entry is stored; dropped (with its eventfd) once it is.
    let mut ack = Some(ack);
    let mut liveness = Liveness::new(timeout, Instant::now());
    let mut first_wait = true;
    let rate = shared.limits.message_rate;
    let mut bucket = Bucket::new(rate, rate * MSG_BURST_SECS);
    // Bytes too, for frames that never make a message: as many as the
    // message rate at the largest message size, plus room for each one's
    // frame header and TLS record overhead.
    let bytes = rate * (shared.limits.max_message + FRAME_OVERHEAD) as f64;
    ws.get_mut()
        .socket()
        .limit_rate(bytes, bytes * MSG_BURST_SECS);

    loop {
        if shared.is_shutting_down() {
            return closed_by_shutdown(shared, ws);
        }
        if registered.revoked.load(Ordering::SeqCst) {
            info!("{who}: its token no longer grants {}: closing", entry.name);
            close(ws, CloseCode::Policy, "token revoked", None, true);
            return Removal::Revoked;
        }
        if let Some(rx) = &ack {
            match rx.try_recv() {
                Ok(Ok(())) => {
                    // Its eventfd goes with it: a held connection costs one
                    // descriptor, not two (10,000 would hit the usual hard
                    // limit of 20,000 and make accept() fail).
                    ack = None;
                    *acked = true;
                    registered.stored();
                    shared.metrics.registration(metrics::Registration::Stored);
                    let welcome = serde_json::json!({
                        "name": entry.name,
                        "key": entry.key,
                        "id": entry.id,
                        "value": serde_json::from_str::<serde_json::Value>(&entry.value).unwrap_or_default(),
                    });
                    if ws.send(Message::Text(welcome.to_string().into())).is_err() {
                        return Removal::Error;
                    }
                    info!("register {who} name={}", entry.name);
                }
                Ok(Err(why)) => {
                    if shared.is_shutting_down() {
                        return closed_by_shutdown(shared, ws);
                    }
                    // etcd refused this entry: the client must not think it
                    // is registered.
                    warn!("{who}: {why}: closing");
                    close(
                        ws,
                        CloseCode::Error,
                        &why,
                        Some(&format!("ERROR: {why}")),
                        true,
                    );
                    return Removal::Error;
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => return closed_by_shutdown(shared, ws),
            }
        }

        let now = Instant::now();
        let wake = match liveness.next(now) {
            Next::Drop => {
                // A last look before giving up: the answer may be waiting in
                // the socket, unread (an overloaded host).
                ws.get_mut()
                    .socket()
                    .set_deadline(Some(now + Duration::from_millis(1)));
                match ws.read() {
                    Ok(Message::Close(_)) => {
                        let _ = ws.flush();
                        return Removal::Close;
                    }
                    Ok(_) => {
                        liveness.heard();
                        continue;
                    }
                    Err(_) => {}
                }
                warn!(
                    "{who}: no answer to a ping for {}s: dropping it",
                    liveness.grace().as_secs()
                );
                return Removal::PingTimeout;
            }
            Next::Ping => {
                if let Err(e) = ws.send(Message::Ping(Default::default())) {
                    debug!("{who}: ping failed: {e}");
                    return Removal::Error;
                }
                liveness.pinged(now);
                continue;
            }
            Next::WaitUntil(at) => at,
        };
        let wake = if *acked {
            wake
        } else {
            // Until the entry is stored, wait for the socket and the
            // worker's answer together (`ack.rs`), up to the liveness
            // deadline: no polling, so thousands of connections waiting out
            // an etcd outage cost nothing, and a client's ping is answered
            // at once meanwhile.
            // A pong tungstenite queued for the client's ping goes out
            // with the next read or flush: flush it before waiting.
            match ws.flush() {
                Ok(()) => {}
                Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {}
                Err(e) => {
                    debug!("{who}: {e}");
                    return Removal::Error;
                }
            }
            let (fd, wake) = if first_wait {
                first_wait = false;
                // A negative fd: poll(2) ignores it.
                (-1, wake.min(now + ACK_FIRST_WAIT))
            } else {
                (ws.get_mut().socket().tcp().as_raw_fd(), wake)
            };
            let woken = match &ack {
                Some(rx) => rx.wait(fd, wake),
                None => Woken::Answer,
            };
            let woke = Instant::now();
            if liveness.woke(wake, woke).is_some() {
                shared.metrics.stalls.record(wake, woke, who);
            }
            match woken {
                Woken::Socket => wake.min(woke + ACK_DRAIN),
                Woken::Answer | Woken::Deadline => continue,
            }
        };
        ws.get_mut().socket().set_deadline(Some(wake));

        let read = ws.read();
        let woke = Instant::now();
        if liveness.woke(wake, woke).is_some() {
            shared.metrics.stalls.record(wake, woke, who);
        }
        match read {
            Ok(msg) => {
                liveness.heard();
                if let Message::Close(_) = msg {
                    // tungstenite queued the close reply; send it.
                    let _ = ws.flush();
                    return Removal::Close;
                }
                // Every message counts, pings and pongs too: tungstenite
                // answers each ping, so a ping flood costs as much as any.
                if !bucket.take(woke, 1.0) {
                    shared.limit_hit(
                        "--max-message-rate",
                        &format!("{who}: client floods messages: closing"),
                    );
                    close(ws, CloseCode::Policy, "too many messages", None, true);
                    return Removal::Error;
                }
            }
            // A timeout is the moment to ping or give up (loop top); an
            // interruption is shutdown waking us (loop top, too).
            Err(tungstenite::Error::Io(e))
                if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                if shared.is_shutting_down() {
                    return closed_by_shutdown(shared, ws);
                }
                return match e {
                    tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
                        Removal::Close
                    }
                    tungstenite::Error::Io(e) if is_over_budget(&e) => {
                        shared.limit_hit(
                            "--max-message-rate",
                            &format!("{who}: client floods frames: closing"),
                        );
                        close(ws, CloseCode::Policy, "too many messages", None, true);
                        Removal::Error
                    }
                    tungstenite::Error::Capacity(c) => {
                        shared.limit_hit("--max-message-size", &format!("{who}: {c}: closing"));
                        close(ws, CloseCode::Size, "message too big", None, false);
                        Removal::Error
                    }
                    tungstenite::Error::Protocol(
                        tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                    ) => Removal::Close,
                    // A text message or close reason that is not UTF-8
                    // (RFC 6455 7.1.7: fail the connection with 1007).
                    tungstenite::Error::Utf8(e) => {
                        info!("{who}: invalid UTF-8 ({e}): closing");
                        close(ws, CloseCode::Invalid, "invalid UTF-8", None, false);
                        Removal::Error
                    }
                    tungstenite::Error::Protocol(p) => {
                        info!("{who}: protocol error: {p}: closing");
                        close(ws, CloseCode::Protocol, "protocol error", None, false);
                        Removal::Error
                    }
                    other => {
                        debug!("{who}: {other}");
                        Removal::Error
                    }
                };
            }
        }
    }
}
