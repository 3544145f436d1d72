//! Harness pieces for `tests/operate.rs` (issue 5: health, metrics, the
//! sidecar, the environment, etcd auth and TLS), beside the shared ones:
//!
//! - [`Proc`]: the real binary run with an explicit environment (the shared
//!   [`Skyapi`](super::Skyapi) strips every `SKYAPI_*`), as a server
//!   ([`Proc::server`]) or as the sidecar ([`Proc::provide`]); its output
//!   is collected line by line, and it can be signalled and timed
//!   (CPU seconds from `/proc`);
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
use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::etcd::{base64_decode, ETCD, ETCDCTL};
use super::skyapi::{parse_listening, BIN};
use super::{free_port, poll_until, spawn_tied, unique_name};

/// How long a server may take to log `listening on`.
const READY_WITHIN: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------ Proc

/// The `skyapi` binary as a child process with a chosen environment.
pub struct Proc {
    label: String,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    status: Option<ExitStatus>,
    readers: Vec<JoinHandle<()>>,
    addr: Option<SocketAddr>,
}

fn collect_lines(
    from: impl Read + Send + 'static,
    tag: &'static str,
    logs: Arc<Mutex<Vec<String>>>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                    logs.lock().unwrap().push(format!("{tag}{line}"));
                }
            }
        }
    })
}

impl Proc {
    /// Runs the binary with `args` and, of the `SKYAPI_*` variables, exactly
    /// those in `env` (the developer's shell cannot leak in).
    pub fn spawn(label: &str, args: &[String], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(BIN);
        cmd.args(args);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("SKYAPI_") {
                cmd.env_remove(key);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn_tied(cmd).unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
        let logs: Arc<Mutex<Vec<String>>> = Arc::default();
        let readers = vec![
            collect_lines(child.stdout.take().unwrap(), "[stdout] ", logs.clone()),
            collect_lines(child.stderr.take().unwrap(), "", logs.clone()),
        ];
        Proc {
            label: format!("{label} {args:?} env {env:?}"),
            child,
            logs,
            status: None,
            readers,
            addr: None,
        }
    }

    /// Starts a server and waits for `listening on ADDR`. `Err` (with the
    /// log) if it exits first, e.g. because its fixed port is taken.
    pub fn try_server(args: &[String], env: &[(&str, &str)]) -> Result<Proc, String> {
        let mut p = Proc::spawn("skyapi", args, env);
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(addr) = p.logs().iter().find_map(|l| parse_listening(l)) {
                p.addr = Some(addr);
                return Ok(p);
            }
            if let Some(status) = p.try_status() {
                join_all(&mut p.readers);
                return Err(format!(
                    "{} exited with {status} before `listening on`:\n{}",
                    p.label,
                    p.logs().join("\n")
                ));
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not log `listening on ADDR` within {READY_WITHIN:?}:\n{}",
                    p.label,
                    p.logs().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// [`try_server`](Self::try_server) or panic.
    pub fn server(args: &[&str], env: &[(&str, &str)]) -> Proc {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Proc::try_server(&args, env).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A server on `127.0.0.1:<port>` with its etcd at `etcd_api`, where
    /// `port` is fixed so the server can be restarted on it. Retries with
    /// another port if the first is taken meanwhile (only a first start
    /// can; pass `retry: false` for a restart).
    pub fn server_on(etcd_api: &str, port: u16, extra: &[&str], retry: bool) -> Proc {
        let mut port = port;
        let mut failures = Vec::new();
        for _ in 0..5 {
            let mut args: Vec<String> = vec![
                "--listen-addr".into(),
                format!("127.0.0.1:{port}"),
                "--etcd-api".into(),
                etcd_api.into(),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            match Proc::try_server(&args, &[]) {
                Ok(p) => return p,
                Err(e) if retry => failures.push(e),
                Err(e) => panic!("restarting the server on port {port}: {e}"),
            }
            port = free_port();
        }
        panic!("could not start a server:\n{}", failures.join("\n"));
    }

    /// `skyapi provide ARGS`.
    pub fn provide(args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut full = vec!["provide".to_string()];
        full.extend(args.iter().map(|s| s.to_string()));
        Proc::spawn("sidecar", &full, env)
    }

    /// The address a server logged (`listening on ADDR`).
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("not a server, or not listening yet")
    }

    /// `ws://ADDR<path_and_query>`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("ws://{}{path_and_query}", self.addr())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Lines logged so far that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.logs()
            .into_iter()
            .filter(|l| l.contains(needle))
            .collect()
    }

    pub fn signal(&self, sig: libc::c_int) {
        assert!(self.status.is_none(), "{} already exited", self.label);
        // SAFETY: plain kill(2) on a pid we own and have not reaped.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(
            rc,
            0,
            "kill({}, {sig}): {}",
            self.label,
            std::io::Error::last_os_error()
        );
    }

    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Waits up to `within` for the process to exit; once it has, every
    /// line it wrote is in [`logs`](Self::logs).
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        poll_until(within, || self.try_status().is_some());
        if self.status.is_some() {
            join_all(&mut self.readers);
        }
        self.status
    }

    /// SIGTERM, then waits up to 10 s and asserts a clean exit (status 0).
    pub fn terminate(&mut self) {
        self.signal(libc::SIGTERM);
        match self.wait_exit(Duration::from_secs(10)) {
            Some(s) if s.success() => {}
            Some(s) => panic!(
                "{} exited with {s} after SIGTERM:\n{}",
                self.label,
                self.logs().join("\n")
            ),
            None => panic!("{} still running 10 s after SIGTERM", self.label),
        }
    }

    /// CPU time (user + system) the process has used so far.
    pub fn cpu_time(&self) -> Duration {
        let path = format!("/proc/{}/stat", self.child.id());
        let stat = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // The command name (field 2) may hold spaces: count after its ')'.
        let rest = &stat[stat.rfind(')').expect("comm field") + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Fields 14 and 15 of the file (utime, stime) are 12 and 13 here.
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_millis(ticks * 1000 / per_sec)
    }
}

fn join_all(readers: &mut Vec<JoinHandle<()>>) {
    for r in readers.drain(..) {
        // Why ignored: a reader only ends by EOF or a read error; its lines are in.
        let _ = r.join();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            // Why ignored: it may exit between the check and the kill; wait() reaps either way.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            join_all(&mut self.readers);
            eprintln!(
                "--- {} (pid {}) log ---\n{}\n--- end of log ---",
                self.label,
                self.child.id(),
                self.logs().join("\n")
            );
        }
    }
}

// ------------------------------------------------------------------- Pki

/// A throwaway CA with a server certificate for `127.0.0.1` and a client
/// certificate, PEM files made with `openssl` (EC P-256, PKCS#8 keys).
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    pub fn generate() -> Pki {
        let dir = std::env::temp_dir().join(format!("skyapi-test-{}", unique_name("pki")));
        fs::create_dir_all(&dir).expect("create PKI dir");
        let pki = Pki { dir };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        pki.openssl(
            &[
                &["req", "-x509", "-nodes", "-days", "2"],
                &ec[..],
                &["-keyout", "ca.key", "-out", "ca.pem"],
                &["-subj", "/CN=skyapi test CA"],
                &["-addext", "basicConstraints=critical,CA:TRUE"],
                &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ]
            .concat(),
        );
        // End-entity certificates (CA:FALSE: rustls refuses a CA certificate
        // used as a server's). etcd's server certificate is also its client
        // one for the gRPC gateway, hence both usages.
        pki.issue(
            "server",
            "/CN=127.0.0.1",
            "basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth,clientAuth\n\
             subjectAltName=IP:127.0.0.1\n",
        );
        pki.issue(
            "client",
            "/CN=skyapi",
            "basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=clientAuth\n",
        );
        pki
    }

    fn issue(&self, name: &str, subject: &str, ext: &str) {
        let ext_file = format!("{name}.ext");
        fs::write(self.dir.join(&ext_file), ext).expect("write extensions file");
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        self.openssl(&[
            "req",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            subject,
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &pem,
            "-extfile",
            &ext_file,
        ]);
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running openssl (Debian package openssl): {e}"));
        assert!(
            out.status.success(),
            "openssl {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
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
}

impl Drop for Pki {
    fn drop(&mut self) {
        // Why ignored: a leftover temp dir is harmless and must not mask the test result.
        let _ = fs::remove_dir_all(&self.dir);
    }
}

// -------------------------------------------------------------- EtcdNode

/// The files of a [`Pki`] an [`EtcdNode`] needs (the node may outlive the
/// borrow of the `Pki`, not its directory).
struct TlsFiles {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

impl TlsFiles {
    fn of(p: &Pki) -> TlsFiles {
        TlsFiles {
            ca: p.ca(),
            server_cert: p.server_cert(),
            server_key: p.server_key(),
            client_cert: p.client_cert(),
            client_key: p.client_key(),
        }
    }
}

/// A single etcd member with extra flags (auth token settings, ...) and,
/// with a [`Pki`], https client URLs that require a client certificate.
pub struct EtcdNode {
    name: String,
    base: PathBuf,
    client_port: u16,
    peer_port: u16,
    extra: Vec<String>,
    /// Certificates etcd serves with and etcdctl presents.
    tls: Option<TlsFiles>,
    child: Option<Child>,
}

impl EtcdNode {
    /// Starts a fresh member with `extra` flags (plain http).
    pub fn start(extra: &[&str]) -> EtcdNode {
        EtcdNode::start_with(extra, None)
    }

    /// Starts a fresh member serving https with `pki`'s server certificate
    /// and requiring client certificates signed by its CA.
    pub fn start_tls(pki: &Pki) -> EtcdNode {
        EtcdNode::start_with(&[], Some(pki))
    }

    fn start_with(extra: &[&str], pki: Option<&Pki>) -> EtcdNode {
        for tool in [ETCD, ETCDCTL] {
            assert!(
                Path::new(tool).exists(),
                "etcd not found: {tool} is missing; install Debian's etcd-server and \
                 etcd-client (make test does this)"
            );
        }
        let mut failures = Vec::new();
        for _ in 0..5 {
            let name = unique_name("etcdx");
            let base = std::env::temp_dir().join(format!("skyapi-test-{name}"));
            fs::create_dir_all(&base).expect("create etcd temp dir");
            let mut node = EtcdNode {
                name,
                base,
                client_port: free_port(),
                peer_port: free_port(),
                extra: extra.iter().map(|s| s.to_string()).collect(),
                tls: pki.map(TlsFiles::of),
                child: None,
            };
            node.spawn();
            match node.wait_ready() {
                Ok(()) => return node,
                Err(why) => failures.push(format!("{why}\n{}", node.log())),
            }
        }
        panic!(
            "could not start etcd in 5 attempts:\n{}",
            failures.join("\n")
        );
    }

    /// The client URL, `http://` or `https://`.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.base.join("etcd.log"))
            .expect("open etcd log");
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(ETCD);
        // etcd refuses a flag also set as ETCD_<FLAG>: keep the shell out.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(key);
            }
        }
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.base.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("{}={peer}", self.name)])
            .args(["--initial-cluster-token", &self.name])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .args(["--log-level", "warn"]);
        if let Some(t) = &self.tls {
            cmd.args(["--cert-file", &t.server_cert, "--key-file", &t.server_key])
                .args(["--trusted-ca-file", &t.ca, "--client-cert-auth"]);
        }
        // Last, so a caller's `--log-level` wins (Go flags: the last one).
        cmd.args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(spawn_tied(cmd).expect("spawn etcd"));
    }

    fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Healthy, and the member we started (not another test's on a port
    /// we thought free).
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if !self.is_running() {
                return Err(format!("etcd {} exited during start-up", self.name));
            }
            if self.etcdctl(None, &["endpoint", "health"]).is_ok() {
                let members = self.etcdctl(None, &["member", "list", "-w", "json"])?;
                if !members.contains(&format!("\"name\":\"{}\"", self.name)) {
                    return Err(format!(
                        "port {} answers as another etcd: {members}",
                        self.client_port
                    ));
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("etcd {} not healthy within 20 s", self.name));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `etcdctl` (API v3) against this member, as `user` (`NAME:PASS`)
    /// if given, with the client certificate if it serves TLS.
    pub fn etcdctl(&self, user: Option<&str>, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(ETCDCTL);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCDCTL_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .args(["--dial-timeout=2s", "--command-timeout=3s"]);
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cacert={}", t.ca))
                .arg(format!("--cert={}", t.client_cert))
                .arg(format!("--key={}", t.client_key));
        }
        if let Some(u) = user {
            cmd.arg(format!("--user={u}"));
        }
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running {ETCDCTL}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "etcdctl {args:?}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    pub fn must(&self, user: Option<&str>, args: &[&str]) -> String {
        self.etcdctl(user, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Every key under `prefix` with its value and lease id.
    pub fn get_prefix(&self, user: Option<&str>, prefix: &str) -> BTreeMap<String, (String, i64)> {
        let out = self.must(user, &["get", "--prefix", "-w", "json", "--", prefix]);
        let doc: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("etcdctl get -w json gave non-JSON ({e}): {out}"));
        let mut map = BTreeMap::new();
        for kv in doc
            .get("kvs")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let field = |name: &str| {
                let b64 = kv.get(name).and_then(Value::as_str).unwrap_or("");
                let bytes = base64_decode(b64)
                    .unwrap_or_else(|| panic!("bad base64 in etcdctl output: {b64:?}"));
                String::from_utf8(bytes).expect("etcd key or value is not UTF-8")
            };
            let lease = kv.get("lease").and_then(Value::as_i64).unwrap_or(0);
            map.insert(field("key"), (field("value"), lease));
        }
        map
    }

    /// Remaining TTL of a lease, `None` once it is gone.
    pub fn lease_ttl(&self, user: Option<&str>, lease: i64) -> Option<i64> {
        let hex = format!("{lease:x}");
        let out = self.must(user, &["lease", "timetolive", &hex, "-w", "json"]);
        let doc: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("etcdctl lease timetolive gave non-JSON ({e}): {out}"));
        doc.get("ttl").and_then(Value::as_i64).filter(|t| *t >= 0)
    }

    /// Everything etcd logged.
    pub fn log(&self) -> String {
        fs::read_to_string(self.base.join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for EtcdNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Why ignored: it may have exited already; wait() reaps either way.
            let _ = c.kill();
            let _ = c.wait();
        }
        if thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- etcd {} ({}) log tail ---\n{}\n--- end of etcd log ---",
                self.name,
                self.endpoint(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
        // Why ignored: a leftover temp dir is harmless and must not mask the test result.
        let _ = fs::remove_dir_all(&self.base);
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
