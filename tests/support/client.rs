//! Blocking websocket and HTTP clients for the tests, on plain
//! `std::net::TcpStream`s with short read timeouts, so every wait is bounded
//! by a deadline the caller chooses.
//!
//! tungstenite answers pings on its own whenever the socket is read; a test
//! that wants a *silent* client simply stops calling any read function.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tungstenite::handshake::HandshakeError;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Error as WsError, Message, WebSocket};

pub type Ws = WebSocket<TcpStream>;

/// Granularity of blocking reads: a read returns at least this often so the
/// deadline can be checked.
const IO_TICK: Duration = Duration::from_millis(100);
/// Default bound for a handshake or for the server's first message.
pub const REPLY_WITHIN: Duration = Duration::from_secs(10);

/// Something the server did on a websocket, as seen by the client.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// A close frame: `(code, reason)`, or `None` for a frame without code.
    Close(Option<(u16, String)>),
    /// The connection ended without (further) frames: EOF, reset, or an error.
    Ended(String),
}

/// `IP:port` of a `ws://IP:port/...` URL.
pub fn socket_addr_of(url: &str) -> SocketAddr {
    let rest = url
        .strip_prefix("ws://")
        .unwrap_or_else(|| panic!("test URLs are ws://ADDR/...: {url}"));
    let authority = rest.split('/').next().unwrap_or(rest);
    authority
        .parse()
        .unwrap_or_else(|e| panic!("test URL authority {authority:?} is not IP:port: {e}"))
}

/// A TCP connection to `addr` with the test read/write timeouts set.
pub fn tcp_connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("TCP connect to {addr}: {e}"));
    s.set_read_timeout(Some(IO_TICK)).expect("set_read_timeout");
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .expect("set_write_timeout");
    s.set_nodelay(true).expect("set_nodelay");
    s
}

/// Runs the websocket handshake for `url`. `Err` describes what the server
/// did instead of upgrading (e.g. `HTTP 400 Bad Request: <body>`).
pub fn try_connect(url: &str) -> Result<Ws, String> {
    handshake(url, tcp_connect(socket_addr_of(url)))
}

/// Runs the websocket handshake for `url` over `stream` (a TCP or TLS
/// stream with short read timeouts), giving the server [`REPLY_WITHIN`].
/// `Err` as for [`try_connect`].
pub fn handshake<S: Read + Write>(url: &str, stream: S) -> Result<WebSocket<S>, String> {
    let deadline = Instant::now() + REPLY_WITHIN;
    let mut attempt = tungstenite::client(url, stream);
    loop {
        match attempt {
            Ok((ws, _response)) => return Ok(ws),
            Err(HandshakeError::Interrupted(mid)) => {
                if Instant::now() >= deadline {
                    return Err(format!("no handshake answer within {REPLY_WITHIN:?}"));
                }
                attempt = mid.handshake();
            }
            Err(HandshakeError::Failure(WsError::Http(resp))) => {
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                return Err(format!("HTTP {}: {}", resp.status(), body.trim()));
            }
            Err(HandshakeError::Failure(e)) => return Err(format!("handshake failed: {e}")),
        }
    }
}

/// Handshake or panic.
pub fn connect_raw(url: &str) -> Ws {
    try_connect(url).unwrap_or_else(|e| panic!("websocket {url}: {e}"))
}

/// Connects and returns the socket with the server's first text message
/// (the registration answer). Panics if anything else comes first.
pub fn connect(url: &str) -> (Ws, String) {
    let mut ws = connect_raw(url);
    let text = next_text(&mut ws, REPLY_WITHIN);
    (ws, text)
}

/// Connects, expects the welcome JSON, and returns it parsed.
pub fn register(url: &str) -> (Ws, serde_json::Value) {
    let (ws, text) = connect(url);
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("welcome from {url} is not JSON ({e}): {text:?}"));
    (ws, json)
}

/// Whether a read or write error only means the socket's timeout passed.
pub fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// The next thing the server does, or `None` if nothing within `within`.
/// Pings are answered by tungstenite (on this or the next read) and also
/// reported. Over any stream (TLS too).
pub fn next_event<S: Read + Write>(ws: &mut WebSocket<S>, within: Duration) -> Option<Event> {
    let deadline = Instant::now() + within;
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => return Some(Event::Text(t.as_str().to_string())),
            Ok(Message::Binary(b)) => return Some(Event::Binary(b.to_vec())),
            Ok(Message::Ping(p)) => return Some(Event::Ping(p.to_vec())),
            Ok(Message::Pong(p)) => return Some(Event::Pong(p.to_vec())),
            Ok(Message::Close(f)) => {
                return Some(Event::Close(
                    f.map(|f| (u16::from(f.code), f.reason.as_str().to_string())),
                ))
            }
            Ok(Message::Frame(_)) => continue,
            Err(WsError::Io(e)) if is_timeout(&e) => {
                if Instant::now() >= deadline {
                    return None;
                }
            }
            Err(e) => return Some(Event::Ended(e.to_string())),
        }
    }
}

/// The next text message, skipping pings and pongs; panics on anything else
/// or after `within`.
pub fn next_text(ws: &mut Ws, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_event(ws, left) {
            Some(Event::Text(t)) => return t,
            Some(Event::Ping(_) | Event::Pong(_)) => continue,
            Some(other) => panic!("expected a text message, got {other:?}"),
            None => panic!("no text message within {within:?}"),
        }
    }
}

/// How a connection ended, from the client's side.
#[derive(Debug, Clone, PartialEq)]
pub struct Closed {
    /// `(code, reason)` of the server's close frame; `None` if the
    /// connection ended without one (or the frame carried no code).
    pub frame: Option<(u16, String)>,
    /// Text messages that arrived before the end.
    pub texts: Vec<String>,
    /// What ended it, when there was no close frame.
    pub ended: Option<String>,
}

impl Closed {
    pub fn code(&self) -> Option<u16> {
        self.frame.as_ref().map(|f| f.0)
    }
}

/// Reads until the server sends a close frame or the connection ends;
/// `None` if neither happens within `within`.
pub fn try_read_until_close(ws: &mut Ws, within: Duration) -> Option<Closed> {
    let deadline = Instant::now() + within;
    let mut texts = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_event(ws, left)? {
            Event::Text(t) => texts.push(t),
            Event::Binary(_) | Event::Ping(_) | Event::Pong(_) => {}
            Event::Close(frame) => {
                // Answer the close (tungstenite queued the reply); errors
                // here only mean the server already hung up.
                let _ = ws.flush();
                return Some(Closed {
                    frame,
                    texts,
                    ended: None,
                });
            }
            Event::Ended(why) => {
                return Some(Closed {
                    frame: None,
                    texts,
                    ended: Some(why),
                })
            }
        }
    }
}

/// Like [`try_read_until_close`], panicking after `within`.
pub fn read_until_close(ws: &mut Ws, within: Duration) -> Closed {
    try_read_until_close(ws, within).unwrap_or_else(|| {
        panic!("the server neither closed nor dropped the connection within {within:?}")
    })
}

/// Closes from the client side with code 1000 and waits (up to `within`)
/// for the server's answer or the end of the connection.
pub fn close(ws: &mut Ws, within: Duration) {
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "test done".into(),
    }))
    .unwrap_or_else(|e| panic!("sending close frame: {e}"));
    let deadline = Instant::now() + within;
    loop {
        match ws.read() {
            Ok(_) => continue,
            Err(WsError::Io(e)) if is_timeout(&e) => {
                if Instant::now() >= deadline {
                    panic!("server did not answer our close frame within {within:?}");
                }
            }
            // ConnectionClosed after the close handshake, or any error: gone.
            Err(_) => return,
        }
    }
}

/// Drops the TCP connection without a websocket close (FIN both ways).
pub fn drop_tcp(ws: Ws) {
    // Why ignored: the socket may already be shut down by the peer.
    let _ = ws.get_ref().shutdown(std::net::Shutdown::Both);
}

/// What a refused `/provide` request produced.
#[derive(Debug)]
pub struct Refusal {
    pub text: String,
    pub code: u16,
    pub reason: String,
}

/// Connects to `url` and expects a refusal: a completed upgrade, then a text
/// `ERROR: <reason>`, then a close frame. `Err` says what happened instead.
/// The close code is returned, not checked.
pub fn try_refusal(url: &str) -> Result<Refusal, String> {
    let mut ws = try_connect(url).map_err(|e| format!("no websocket upgrade: {e}"))?;
    let text = match next_event(&mut ws, REPLY_WITHIN) {
        Some(Event::Text(t)) if t.starts_with("ERROR") => t,
        Some(Event::Text(t)) => return Err(format!("not refused: the server answered {t:?}")),
        Some(other) => return Err(format!("first event was {other:?}, not an ERROR text")),
        None => return Err(format!("nothing from the server within {REPLY_WITHIN:?}")),
    };
    let closed = try_read_until_close(&mut ws, REPLY_WITHIN)
        .ok_or_else(|| format!("after {text:?}, no close within {REPLY_WITHIN:?}"))?;
    if !closed.texts.is_empty() {
        return Err(format!("after {text:?}, more texts: {:?}", closed.texts));
    }
    match closed.frame {
        Some((code, reason)) => Ok(Refusal { text, code, reason }),
        None => Err(format!(
            "after {text:?}, connection ended without a close frame: {:?}",
            closed.ended
        )),
    }
}

/// A plain HTTP/1.1 GET; returns the status code and the whole response
/// as text (headers and whatever body arrived before close or 5 s).
pub fn http_get(addr: SocketAddr, path_and_query: &str) -> (u16, String) {
    let mut s = tcp_connect(addr);
    write!(
        s,
        "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write HTTP request");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if is_timeout(&e) => {}
            // A reset after the response was sent still leaves the response.
            Err(_) => break,
        }
        let text = String::from_utf8_lossy(&raw);
        if Instant::now() >= deadline {
            // A server that keeps the connection open despite
            // `Connection: close` still answered if the head is complete.
            if text.contains("\r\n\r\n") {
                break;
            }
            panic!("no complete HTTP response from {addr}{path_and_query} within 5 s: {text:?}");
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response from {addr}{path_and_query}: {text:?}"));
    (code, text)
}
