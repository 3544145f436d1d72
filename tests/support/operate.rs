//! Harness pieces for `tests/operate.rs` (issue 5: health, metrics, the
//! sidecar, the environment, etcd auth and TLS), beside the shared ones:
//!
//! - [`Proc`]: the shared [`Skyapi`](super::Skyapi) under the name this
//!   suite uses for it: the real binary run with an explicit environment,
//!   as a server ([`Skyapi::server`]) or as the sidecar
//!   ([`Skyapi::provide`]);
//! - [`EtcdNode`]: a single etcd member started with extra flags and
//!   optionally TLS with client certificates ([`Pki`], made with `openssl`),
//!   read back with `etcdctl` given the matching credentials;
//! - [`HttpCheck`] and [`TcpCheck`]: local services the sidecar's `--check`
//!   probes, whose health the test switches.
//!
//! The invariants of `support` hold here too: loopback and OS-picked ports,
//! a deadline on every wait, every child killed on drop (and when the test
//! process dies), logs printed when a test fails.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::etcd::EtcdTls;
use super::pki::{issue, make_ca};
use super::{Etcd, TempDir};

/// The `skyapi` binary as a child process with a chosen environment.
pub use super::skyapi::Skyapi as Proc;

// ------------------------------------------------------------------- Pki

/// A throwaway CA with a server certificate for `127.0.0.1` and a client
/// certificate, PEM files made with `openssl` (EC P-256, PKCS#8 keys).
pub struct Pki {
    dir: TempDir,
}

impl Pki {
    pub fn generate() -> Pki {
        let pki = Pki {
            dir: TempDir::new("pki"),
        };
        make_ca(&pki.dir.0);
        // End-entity certificates (CA:FALSE: rustls refuses a CA certificate
        // used as a server's). etcd's server certificate is also its client
        // one for the gRPC gateway, hence both usages.
        for (name, subject, ext) in [
            (
                "server",
                "/CN=127.0.0.1",
                "basicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage=serverAuth,clientAuth\n\
                 subjectAltName=IP:127.0.0.1\n",
            ),
            (
                "client",
                "/CN=skyapi",
                "basicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage=clientAuth\n",
            ),
        ] {
            issue(&pki.dir.0, name, subject, ext);
        }
        pki
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.path(file).to_string_lossy().into_owned()
    }

    pub fn ca(&self) -> String {
        self.path("ca.pem")
    }
    pub fn server_cert(&self) -> String {
        self.path("server.pem")
    }
    pub fn server_key(&self) -> String {
        self.path("server.key")
    }
    pub fn client_cert(&self) -> String {
        self.path("client.pem")
    }
    pub fn client_key(&self) -> String {
        self.path("client.key")
    }

    /// The files an etcd member needs to serve TLS with these certificates
    /// (it may outlive the borrow of the `Pki`, not its directory).
    fn etcd_tls(&self) -> EtcdTls {
        EtcdTls {
            ca: self.ca(),
            server_cert: self.server_cert(),
            server_key: self.server_key(),
            client_cert: self.client_cert(),
            client_key: self.client_key(),
        }
    }
}

// -------------------------------------------------------------- EtcdNode

/// A single etcd member with extra flags (auth token settings, ...) and,
/// with a [`Pki`], https client URLs that require a client certificate;
/// every read names the etcd user it is made as (`None`: anonymous).
pub struct EtcdNode {
    etcd: Etcd,
}

impl EtcdNode {
    /// Starts a fresh member with `extra` flags (plain http).
    pub fn start(extra: &[&str]) -> EtcdNode {
        EtcdNode {
            etcd: Etcd::start_with(extra, None),
        }
    }

    /// Starts a fresh member serving https with `pki`'s server certificate
    /// and requiring client certificates signed by its CA.
    pub fn start_tls(pki: &Pki) -> EtcdNode {
        EtcdNode {
            etcd: Etcd::start_with(&[], Some(pki.etcd_tls())),
        }
    }

    /// The client URL, `http://` or `https://`.
    pub fn endpoint(&self) -> String {
        self.etcd.endpoint()
    }

    /// Runs `etcdctl` (API v3) against this member, as `user` (`NAME:PASS`)
    /// if given, with the client certificate if it serves TLS.
    pub fn etcdctl(&self, user: Option<&str>, args: &[&str]) -> Result<String, String> {
        self.etcd.etcdctl_as(user, args)
    }

    pub fn must(&self, user: Option<&str>, args: &[&str]) -> String {
        self.etcd.must_as(user, args)
    }

    /// Every key under `prefix` with its value and lease id.
    pub fn get_prefix(&self, user: Option<&str>, prefix: &str) -> BTreeMap<String, (String, i64)> {
        self.etcd.get_prefix_with_lease_as(user, prefix)
    }

    /// Remaining TTL of a lease, `None` once it is gone.
    pub fn lease_ttl(&self, user: Option<&str>, lease: i64) -> Option<i64> {
        self.etcd.lease_ttl_as(user, lease).map(|(ttl, _)| ttl)
    }

    /// Everything etcd logged.
    pub fn log(&self) -> String {
        self.etcd.log()
    }
}

// --------------------------------------------------------------- checks

/// A local TCP service for `--check tcp://`: up while listening.
pub struct TcpCheck {
    addr: SocketAddr,
    listener: Option<TcpListener>,
}

impl TcpCheck {
    pub fn start() -> TcpCheck {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind check listener");
        TcpCheck {
            addr: listener.local_addr().expect("local_addr"),
            listener: Some(listener),
        }
    }

    pub fn url(&self) -> String {
        format!("tcp://{}", self.addr)
    }

    /// Closes the listener: connects are refused.
    pub fn down(&mut self) {
        self.listener = None;
    }

    /// Listens again on the same port (std sets SO_REUSEADDR).
    pub fn up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match TcpListener::bind(self.addr) {
                Ok(l) => {
                    self.listener = Some(l);
                    return;
                }
                // Briefly in use while the old socket is torn down.
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
                Err(e) => panic!("re-binding the check listener {}: {e}", self.addr),
            }
        }
    }
}

/// A tiny HTTP service for `--check http://`: answers every request with
/// the status last set, and counts the requests.
pub struct HttpCheck {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpCheck {
    pub fn start(status: u16) -> HttpCheck {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind HTTP check");
        listener.set_nonblocking(true).expect("set_nonblocking");
        let addr = listener.local_addr().expect("local_addr");
        let status = Arc::new(AtomicU16::new(status));
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (status, hits, stop) = (status.clone(), hits.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            answer(s, status.load(Ordering::SeqCst));
                            hits.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(10));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        HttpCheck {
            addr,
            status,
            hits,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Reads the request head (bounded) and answers `status` with no body.
fn answer(mut s: TcpStream, status: u16) {
    // Why ignored throughout: a checker that hung up early is its problem;
    // the check simply fails for it.
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let _ = write!(
        s,
        "HTTP/1.1 {status} Test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let _ = s.flush();
}

impl Drop for HttpCheck {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            // Why ignored: the accept loop cannot panic in a way that matters here.
            let _ = t.join();
        }
    }
}
