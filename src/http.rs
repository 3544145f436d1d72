//! The HTTP side of a connection: reading one request head under a size cap
//! and a deadline, routing it, and writing plain responses.
//!
//! Every connection starts here, websocket or not, so the limits are the
//! same for all paths: a head larger than `--max-head-size` gets 431 (the
//! cap is exact: no read goes past it), a head not complete within the
//! handshake deadline is dropped (slowloris), and a malformed one gets 400.
//! Plain responses always close the connection.
//!
//! The websocket upgrade itself is answered here too (101 with the accept
//! key from tungstenite), because the head has already been read: handing
//! the socket to `tungstenite::accept_hdr` would mean parsing it twice.

use crate::transport::{is_timeout, Transport};
use std::io::{self, Write};
use std::time::Instant;

/// Most headers in one request.
const MAX_HEADERS: usize = 32;

/// A parsed request head.
#[derive(Debug)]
pub struct Head {
    pub method: String,
    pub path: String,
    /// The raw query string, without `?`; empty when there is none.
    pub query: String,
    /// Header names lower-cased, values as sent (lossy UTF-8).
    pub headers: Vec<(String, String)>,
    /// Bytes after the head (a client may send its first frame at once).
    pub rest: Vec<u8>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// True when some comma-separated token of header `name` equals `token`,
    /// ignoring case (`Connection: keep-alive, Upgrade`).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

/// Why no request head could be read.
#[derive(Debug)]
pub enum HeadError {
    /// The peer closed or sent nothing before the deadline: nothing to answer.
    Gone,
    TimedOut,
    TooLarge,
    Malformed(String),
}

/// Reads one request head of at most `max_head` bytes (request line,
/// headers and the blank line) from `stream`, failing at `deadline`. With
/// TLS the TLS handshake happens here too, under the same deadline.
pub fn read_head<T: Transport>(
    stream: &mut T,
    deadline: Instant,
    max_head: usize,
) -> Result<Head, HeadError> {
    stream.socket().set_deadline(Some(deadline));
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        // Never more than the cap: a head of exactly `max_head` bytes fits,
        // one byte more is refused. Bytes after the head (a first frame) are
        // left to the websocket, which reads the socket next.
        let room = (max_head - buf.len()).min(chunk.len());
        let n = match stream.read(&mut chunk[..room]) {
            Ok(0) => return Err(HeadError::Gone),
            Ok(n) => n,
            Err(e) if is_timeout(&e) => return Err(HeadError::TimedOut),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(HeadError::Gone),
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let target = req.path.unwrap_or("/");
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                return Ok(Head {
                    method: req.method.unwrap_or("").to_string(),
                    path: path.to_string(),
                    query: query.to_string(),
                    headers: req
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect(),
                    rest: buf[len..].to_vec(),
                });
            }
            Ok(httparse::Status::Partial) if buf.len() >= max_head => {
                return Err(HeadError::TooLarge)
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(e) => return Err(HeadError::Malformed(e.to_string())),
        }
    }
}

/// Writes a complete plain response and leaves the connection to be closed.
pub fn respond(
    stream: &mut dyn Write,
    status: u16,
    content_type: &str,
    extra_headers: &[(&str, &str)],
    body: &str,
) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        reason(status),
        body.len()
    );
    for (name, value) in extra_headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    stream.write_all(out.as_bytes())?;
    stream.flush()
}

/// A one-line text response.
pub fn respond_text(stream: &mut dyn Write, status: u16, line: &str) -> io::Result<()> {
    respond(
        stream,
        status,
        "text/plain; charset=utf-8",
        &[],
        &format!("{line}\n"),
    )
}

/// Checks a websocket upgrade request; returns the accept key for the 101,
/// or the HTTP status and reason to send instead when it is not one.
pub fn websocket_accept_key(head: &Head) -> Result<String, (u16, String)> {
    if head.method != "GET" {
        return Err((405, "/provide takes GET with a websocket upgrade".into()));
    }
    if !head.has_token("upgrade", "websocket") || !head.has_token("connection", "upgrade") {
        return Err((
            400,
            "/provide is a websocket: send Connection: Upgrade and Upgrade: websocket".into(),
        ));
    }
    if head.header("sec-websocket-version") != Some("13") {
        return Err((426, "websocket version 13 required".into()));
    }
    let key = match head.header("sec-websocket-key") {
        Some(k) if !k.trim().is_empty() => k.trim(),
        _ => return Err((400, "missing Sec-WebSocket-Key".into())),
    };
    Ok(tungstenite::handshake::derive_accept_key(key.as_bytes()))
}

/// Answers a checked upgrade with 101 Switching Protocols.
pub fn switch_protocols(stream: &mut dyn Write, accept_key: &str) -> io::Result<()> {
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {accept_key}\r\n\r\n"
    );
    stream.write_all(response.as_bytes())?;
    stream.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}
