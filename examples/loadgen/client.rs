//! One websocket provider as the load generator plays it: connect, upgrade,
//! wait for skyapi's welcome, hold the connection (answering pings), close.
//!
//! Every step is bounded by a timeout the caller passes, and every step
//! records the `Instant` it finished, so scenarios can measure any interval
//! between them. tokio-tungstenite answers pings by itself whenever the read
//! half is polled: an idle provider must therefore keep a read pending
//! (`hold`), or skyapi drops it after `--timeout`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Where skyapi listens; builds `/provide` URLs.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
}

impl Target {
    /// The URL of provider `port` of `service`; the host defaults to the
    /// peer address (127.0.0.1), so (service, port) picks a distinct key.
    pub fn url(&self, service: &str, port: u32) -> String {
        format!("ws://{}/provide?service={service}&port={port}", self.addr)
    }
}

/// Small client buffers: ten thousand clients share this process.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(64 * 1024))
        .max_frame_size(Some(64 * 1024))
}

/// An upgraded connection and when each step of opening it finished.
pub struct Conn {
    ws: WebSocketStream<TcpStream>,
    /// Before the TCP connect.
    pub started: Instant,
    /// TCP connected; the upgrade request is written right after.
    pub connected: Instant,
    /// The 101 answer was read.
    pub upgraded: Instant,
}

/// skyapi's one message after the entry is stored.
pub struct Welcome {
    pub at: Instant,
    pub key: String,
}

/// When closing finished, step by step.
pub struct Closed {
    /// Just before the close frame was written.
    pub sent: Instant,
    /// The server's close frame (or the end of the stream) was read.
    pub answered: Instant,
}

/// TCP connect and websocket upgrade, each bounded by `limit`.
pub async fn open(
    target: &Target,
    service: &str,
    port: u32,
    limit: Duration,
) -> Result<Conn, String> {
    let started = Instant::now();
    let tcp = timeout(limit, TcpStream::connect(target.addr))
        .await
        .map_err(|_| "tcp connect timed out".to_string())?
        .map_err(|e| format!("tcp connect: {e}"))?;
    let connected = Instant::now();
    // Small frames both ways; Nagle would only add delay to the close frame.
    tcp.set_nodelay(true)
        .map_err(|e| format!("set_nodelay: {e}"))?;
    let url = target.url(service, port);
    let (ws, _response) = timeout(
        limit,
        tokio_tungstenite::client_async_with_config(url.as_str(), tcp, Some(ws_config())),
    )
    .await
    .map_err(|_| "upgrade timed out".to_string())?
    .map_err(|e| format!("upgrade: {e}"))?;
    Ok(Conn {
        ws,
        started,
        connected,
        upgraded: Instant::now(),
    })
}

/// `open`, retried up to `attempts` times (a refused or timed-out connect in
/// a storm is what a real provider would retry). Returns the connection and
/// how many attempts it took.
pub async fn open_retrying(
    target: &Target,
    service: &str,
    port: u32,
    limit: Duration,
    attempts: u32,
) -> Result<(Conn, u32), String> {
    let mut last = String::new();
    for attempt in 1..=attempts.max(1) {
        match open(target, service, port, limit).await {
            Ok(c) => return Ok((c, attempt)),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last)
}

impl Conn {
    /// Reads until skyapi's welcome (a JSON text message with `key`).
    pub async fn welcome(&mut self, limit: Duration) -> Result<Welcome, String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| "no welcome in time".to_string())?;
            match msg {
                Some(Ok(Message::Text(t))) => {
                    let at = Instant::now();
                    if t.starts_with("ERROR") {
                        return Err(format!("refused: {}", t.as_str()));
                    }
                    let v: serde_json::Value = serde_json::from_str(t.as_str())
                        .map_err(|e| format!("welcome is not JSON: {e}"))?;
                    let key = v["key"]
                        .as_str()
                        .ok_or_else(|| "welcome has no key".to_string())?
                        .to_string();
                    return Ok(Welcome { at, key });
                }
                Some(Ok(Message::Close(c))) => return Err(format!("closed by server: {c:?}")),
                // Pings (answered by tokio-tungstenite) and anything else.
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("read: {e}")),
                None => return Err("server ended the stream".into()),
            }
        }
    }

    /// Keeps reading (so pongs go out) until `stop` turns true. `Err` if the
    /// server ends the connection first.
    pub async fn hold(&mut self, stop: &mut watch::Receiver<bool>) -> Result<(), String> {
        loop {
            if *stop.borrow_and_update() {
                return Ok(());
            }
            tokio::select! {
                msg = self.ws.next() => match msg {
                    Some(Ok(Message::Close(c))) => return Err(format!("closed by server: {c:?}")),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(format!("read: {e}")),
                    None => return Err("server ended the stream".into()),
                },
                changed = stop.changed() => {
                    if changed.is_err() {
                        // The controller is gone: stop as if told to.
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Sends a close frame, reads until the server's close answer, then waits
    /// (within `limit`) for the server to end the TCP connection, as RFC 6455
    /// asks of the client; that also leaves TIME_WAIT on skyapi's side, not
    /// on the load generator's ephemeral ports.
    pub async fn close(mut self, limit: Duration) -> Result<Closed, String> {
        let sent = Instant::now();
        let deadline = tokio::time::Instant::now() + limit;
        tokio::time::timeout_at(deadline, self.ws.close(None))
            .await
            .map_err(|_| "close frame not written in time".to_string())?
            .map_err(|e| format!("close: {e}"))?;
        let answered = loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Err("no close answer in time".into()),
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) => break Instant::now(),
                Ok(Some(Ok(_))) => {}
                // A reset after our close: the server is gone, which is the goal.
                Ok(Some(Err(_))) => break Instant::now(),
            }
        };
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout_at(deadline, self.ws.get_mut().read(&mut buf)).await {
                Err(_) => return Err("server kept TCP open after the close".into()),
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => {}
            }
        }
        Ok(Closed { sent, answered })
    }
}
