//! A websocket provider in the test process, on its own thread, written as
//! a careful client is; it reports its connections to the ledger.

use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::handshake::client::ClientHandshake;
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Error as WsError, Message};

use super::super::client::{is_timeout, Ws};
use super::{lock, provide_query, CloseHow, Rng, SharedLedger};

/// What the run tells a websocket provider to do.
#[derive(Clone, Copy, Debug)]
pub enum Cmd {
    Close(CloseHow),
    Move { to: usize, how: CloseHow },
}

/// One connection of a provider.
enum Slot {
    Idle,
    Handshaking {
        mid: MidHandshake<ClientHandshake<TcpStream>>,
        inst: usize,
        since: Instant,
    },
    Open {
        ws: Ws,
        inst: usize,
        welcomed: bool,
    },
}

/// How long a handshake (a stalled instance accepts TCP but answers
/// nothing) may take before the next instance is tried.
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(5);
/// The read timeout of every client socket: one turn of the client loop.
const CLIENT_TICK: Duration = Duration::from_millis(20);

/// A websocket provider as a careful client is written: it answers pings,
/// and when the server ends its connection it reconnects through the
/// instances in turn, the first attempt after 0-250 ms and then the
/// sidecar's backoff (d from 0.5 s doubling to 30 s, each delay in
/// [d/2, d]), as issue 9 asks of the sidecar. A move registers at the new
/// instance before closing the old connection. Runs on its own thread
/// until told to close or its command channel closes; a half-open client
/// parks its socket in `graveyard`, open and unread.
pub struct WsClient {
    pub label: String,
    pub port: u16,
    pub weight: u16,
    /// `127.0.0.1:port` of instances A and B.
    pub servers: [SocketAddr; 2],
    pub first: usize,
    pub ledger: SharedLedger,
    pub cmds: Receiver<Cmd>,
    pub rng: Rng,
    pub graveyard: Arc<Mutex<Vec<Ws>>>,
}

impl WsClient {
    pub fn spawn(self) -> thread::JoinHandle<()> {
        thread::Builder::new()
            .name(format!("chaos-{}", self.label))
            .spawn(move || self.run())
            .expect("spawn a chaos client thread")
    }

    fn url(&self, inst: usize) -> String {
        format!(
            "ws://{}{}",
            self.servers[inst],
            provide_query(self.port, self.weight)
        )
    }

    fn begin(&self, inst: usize) -> Result<Slot, String> {
        lock(&self.ledger).attach(&self.label, inst, Instant::now());
        let s = TcpStream::connect_timeout(&self.servers[inst], Duration::from_secs(1))
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(CLIENT_TICK))
            .and_then(|_| s.set_write_timeout(Some(Duration::from_secs(2))))
            .and_then(|_| s.set_nodelay(true))
            .map_err(|e| e.to_string())?;
        match tungstenite::client(self.url(inst).as_str(), s) {
            Ok((ws, _)) => Ok(Slot::Open {
                ws,
                inst,
                welcomed: false,
            }),
            Err(HandshakeError::Interrupted(mid)) => Ok(Slot::Handshaking {
                mid,
                inst,
                since: Instant::now(),
            }),
            Err(HandshakeError::Failure(e)) => Err(e.to_string()),
        }
    }

    /// One turn of a slot: `Err` when the connection attempt failed or the
    /// connection ended (the reason; `true` if it was open and the server
    /// ended it).
    fn turn(&self, slot: Slot) -> Result<Slot, (usize, bool, String)> {
        match slot {
            Slot::Idle => Ok(Slot::Idle),
            Slot::Handshaking { mid, inst, since } => match mid.handshake() {
                Ok((ws, _)) => Ok(Slot::Open {
                    ws,
                    inst,
                    welcomed: false,
                }),
                Err(HandshakeError::Interrupted(mid)) => {
                    if since.elapsed() > HANDSHAKE_WITHIN {
                        Err((inst, false, "no handshake answer".into()))
                    } else {
                        Ok(Slot::Handshaking { mid, inst, since })
                    }
                }
                Err(HandshakeError::Failure(e)) => Err((inst, false, format!("handshake: {e}"))),
            },
            Slot::Open {
                mut ws,
                inst,
                mut welcomed,
            } => loop {
                match ws.read() {
                    Ok(Message::Text(t)) => {
                        let now = Instant::now();
                        if t.starts_with("ERROR") {
                            lock(&self.ledger).refused(&self.label, inst, now, t.as_str());
                            // Counted as a refusal, not again as a drop.
                            return Err((inst, false, t.as_str().to_string()));
                        }
                        if !welcomed {
                            welcomed = true;
                            lock(&self.ledger).set_registered(&self.label, true);
                        }
                    }
                    Ok(Message::Close(f)) => {
                        // Why ignored: answering the close may fail if the server is gone.
                        let _ = ws.flush();
                        let why = f.map_or("close frame without code".to_string(), |f| {
                            format!("close {} {}", u16::from(f.code), f.reason)
                        });
                        return Err((inst, true, why));
                    }
                    Ok(_) => {}
                    Err(WsError::Io(e)) if is_timeout(&e) => {
                        // Sends the pongs tungstenite queued.
                        if let Err(e) = ws.flush() {
                            if !matches!(&e, WsError::Io(io) if is_timeout(io)) {
                                return Err((inst, true, e.to_string()));
                            }
                        }
                        return Ok(Slot::Open { ws, inst, welcomed });
                    }
                    Err(e) => return Err((inst, true, e.to_string())),
                }
            },
        }
    }

    fn run(mut self) {
        let mut primary = Slot::Idle;
        let mut moving = Slot::Idle;
        let mut move_how = CloseHow::Clean;
        let mut cur = self.first;
        let mut attempt_at = Instant::now();
        let mut backoff = Duration::ZERO;
        loop {
            match self.cmds.try_recv() {
                Ok(Cmd::Close(how)) => {
                    lock(&self.ledger).die(&self.label, Instant::now());
                    for slot in [primary, moving] {
                        self.leave(slot, how);
                    }
                    return;
                }
                Ok(Cmd::Move { to, how }) => {
                    if matches!(moving, Slot::Idle) && matches!(primary, Slot::Open { .. }) {
                        match self.begin(to) {
                            Ok(slot) => {
                                moving = slot;
                                move_how = how;
                            }
                            Err(_) => lock(&self.ledger).detach(&self.label, to, Instant::now()),
                        }
                    }
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => return,
            }
            if matches!(primary, Slot::Idle) {
                if Instant::now() >= attempt_at {
                    match self.begin(cur) {
                        Ok(slot) => primary = slot,
                        Err(_) => {
                            lock(&self.ledger).detach(&self.label, cur, Instant::now());
                            cur = 1 - cur;
                            backoff = self.next_backoff(backoff);
                            attempt_at = Instant::now() + backoff;
                        }
                    }
                } else {
                    thread::sleep(CLIENT_TICK);
                }
            }
            primary = match self.turn(primary) {
                Ok(slot) => {
                    if matches!(slot, Slot::Open { welcomed: true, .. }) {
                        backoff = Duration::ZERO;
                    }
                    slot
                }
                Err((inst, was_open, why)) => {
                    let now = Instant::now();
                    if was_open {
                        lock(&self.ledger).dropped(&self.label, inst, now, &why);
                    } else {
                        lock(&self.ledger).detach(&self.label, inst, now);
                    }
                    cur = 1 - inst;
                    backoff = self.next_backoff(backoff);
                    attempt_at = now + backoff;
                    // A move in progress becomes the connection.
                    std::mem::replace(&mut moving, Slot::Idle)
                }
            };
            moving = match self.turn(moving) {
                Ok(Slot::Open {
                    ws,
                    inst,
                    welcomed: true,
                }) => {
                    // Registered at the new instance: now leave the old one.
                    let old = std::mem::replace(
                        &mut primary,
                        Slot::Open {
                            ws,
                            inst,
                            welcomed: true,
                        },
                    );
                    cur = inst;
                    self.leave(old, move_how);
                    Slot::Idle
                }
                Ok(slot) => slot,
                Err((inst, was_open, why)) => {
                    let now = Instant::now();
                    if was_open {
                        lock(&self.ledger).dropped(&self.label, inst, now, &why);
                        // The primary is still registered.
                        lock(&self.ledger).set_registered(&self.label, true);
                    } else {
                        lock(&self.ledger).detach(&self.label, inst, now);
                    }
                    Slot::Idle
                }
            };
        }
    }

    /// The first retry after 0-250 ms, then [d/2, d] with d from 0.5 s
    /// doubling to 30 s (`prev` is the last delay; zero after a success).
    fn next_backoff(&mut self, prev: Duration) -> Duration {
        if prev.is_zero() {
            return self
                .rng
                .between(Duration::ZERO, Duration::from_millis(250))
                .max(Duration::from_millis(1));
        }
        let d = (prev * 2)
            .max(Duration::from_millis(500))
            .min(Duration::from_secs(30));
        self.rng.between(d / 2, d)
    }

    /// Ends a connection as `how` says (the client is leaving it).
    fn leave(&self, slot: Slot, how: CloseHow) {
        let (stream_ws, inst) = match slot {
            Slot::Idle => return,
            Slot::Handshaking { inst, .. } => (None, inst),
            Slot::Open { ws, inst, .. } => (Some(ws), inst),
        };
        let now = Instant::now();
        lock(&self.ledger).detach(&self.label, inst, now);
        let Some(mut ws) = stream_ws else { return };
        match how {
            CloseHow::Clean => {
                // Why ignored: the server may be gone; the socket closes on drop anyway.
                let _ = ws.close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "chaos client leaving".into(),
                }));
                let deadline = Instant::now() + Duration::from_secs(1);
                while Instant::now() < deadline {
                    match ws.read() {
                        Ok(_) => {}
                        Err(WsError::Io(e)) if is_timeout(&e) => {}
                        Err(_) => break,
                    }
                }
            }
            CloseHow::Fin => {
                // Why ignored: the peer may have closed already.
                let _ = ws.get_ref().shutdown(std::net::Shutdown::Both);
            }
            CloseHow::Reset => reset(ws.get_ref()),
            CloseHow::HalfOpen => {
                self.graveyard
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(ws);
            }
        }
    }
}

/// Makes the close of `s` a TCP RST (SO_LINGER on, 0 s); the socket is
/// closed when its owner drops it.
pub fn reset(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a descriptor we own, with a correctly sized value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
