//! Throwaway etcd members (Debian's etcd-server 3.4) on ephemeral loopback
//! ports, each with its data in a fresh temp dir, driven through `etcdctl`
//! (API v3): a single member ([`Etcd::start_new`]), one with extra flags
//! and optionally TLS with client certificates ([`Etcd::start_with`]), or a
//! cluster ([`Etcd::start_cluster`]). A member can be stopped, restarted on
//! the same ports and data, frozen and killed, which is what fault tests
//! need.
//!
//! The process is killed and its directory removed on drop; if the test is
//! failing, the tail of etcd's own log is printed first.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{free_port, poll_until, spawn_tied, unique_name};

pub const ETCD: &str = "/usr/bin/etcd";
pub const ETCDCTL: &str = "/usr/bin/etcdctl";

/// etcd's `root` user, as `etcdctl --user` takes it.
pub const ROOT_USER: &str = "root:rootpw";

/// The etcdctl commands that turn auth on the way an operator would for
/// skyapi: a `root` user ([`ROOT_USER`]) and a user `skyapi` (password
/// `pw`) that may read and write `/skydns/` and nothing else.
pub const AUTH_SETUP: &[&[&str]] = &[
    &["user", "add", ROOT_USER],
    &["user", "add", "skyapi:pw"],
    &["role", "add", "skydns-rw"],
    SKYDNS_GRANT,
    &["user", "grant-role", "skyapi", "skydns-rw"],
    &["auth", "enable"],
];

/// The role `skydns-rw`'s one permission: read and write `/skydns/`.
pub const SKYDNS_GRANT: &[&str] = &[
    "role",
    "grant-permission",
    "skydns-rw",
    "readwrite",
    "/skydns/",
    "--prefix=true",
];

/// How long a fresh or restarted member may take to answer `endpoint health`.
const READY_WITHIN: Duration = Duration::from_secs(20);
/// Attempts at a fresh member: a failure is almost always a port that another
/// test took between `free_port()` and etcd's bind.
const START_ATTEMPTS: usize = 5;

/// One etcd member.
pub struct Etcd {
    name: String,
    base: PathBuf,
    client_port: u16,
    peer_port: u16,
    /// `--initial-cluster`: every member's `name=peer-url`.
    initial_cluster: String,
    /// `--initial-cluster-token`, unique per cluster.
    token: String,
    /// Flags given after the standard ones (so a later one wins).
    extra: Vec<String>,
    /// Certificates etcd serves with and etcdctl presents.
    tls: Option<EtcdTls>,
    child: Option<Child>,
}

/// PEM files for a member serving https that requires client certificates
/// signed by `ca`; etcdctl presents the client pair.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
}

fn assert_installed() {
    for tool in [ETCD, ETCDCTL] {
        assert!(
            Path::new(tool).exists(),
            "etcd not found: {tool} is missing; install Debian's etcd-server and \
             etcd-client (make test does this)"
        );
    }
}

impl Etcd {
    /// Starts a fresh single member and waits until it is healthy. Panics
    /// (never skips) if etcd is not installed.
    pub fn start_new() -> Etcd {
        Etcd::start_cluster(1).pop().expect("one member")
    }

    /// Starts a fresh single member with `extra` flags (after the standard
    /// ones, so e.g. a `--log-level` wins) and, with `tls`, https client URLs
    /// that require a client certificate; waits until it is healthy.
    pub fn start_with(extra: &[&str], tls: Option<EtcdTls>) -> Etcd {
        Etcd::start_members(1, extra, tls)
            .pop()
            .expect("one member")
    }

    /// Starts a fresh cluster of `size` members and waits until every one is
    /// healthy. Panics (never skips) if etcd is not installed.
    pub fn start_cluster(size: usize) -> Vec<Etcd> {
        Etcd::start_members(size, &[], None)
    }

    fn start_members(size: usize, extra: &[&str], tls: Option<EtcdTls>) -> Vec<Etcd> {
        assert_installed();
        assert!(size > 0, "a cluster needs a member");
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let token = unique_name("etcd");
            let mut members: Vec<Etcd> = (0..size)
                .map(|i| {
                    let name = if size == 1 {
                        token.clone()
                    } else {
                        format!("{token}-m{i}")
                    };
                    let base = std::env::temp_dir().join(format!("skyapi-test-{name}"));
                    fs::create_dir_all(&base).expect("create etcd temp dir");
                    Etcd {
                        name,
                        base,
                        client_port: free_port(),
                        peer_port: free_port(),
                        initial_cluster: String::new(),
                        token: token.clone(),
                        extra: extra.iter().map(|s| s.to_string()).collect(),
                        tls: tls.clone(),
                        child: None,
                    }
                })
                .collect();
            let initial = members
                .iter()
                .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
                .collect::<Vec<_>>()
                .join(",");
            for m in &mut members {
                m.initial_cluster = initial.clone();
                m.spawn();
            }
            match members.iter_mut().try_for_each(Etcd::wait_ready) {
                Ok(()) => return members,
                // Dropping `members` kills the processes and removes their dirs.
                Err(why) => failures.push(format!(
                    "{why}\n{}",
                    members
                        .iter()
                        .map(|m| format!("--- {} log ---\n{}", m.name, m.log_tail()))
                        .collect::<Vec<_>>()
                        .join("\n")
                )),
            }
        }
        panic!(
            "could not start etcd ({size} members) in {START_ATTEMPTS} attempts:\n{}",
            failures.join("\n")
        );
    }

    /// Comma-separated client URLs of `members`, as `--etcd-api` takes them.
    pub fn endpoints(members: &[Etcd]) -> String {
        members
            .iter()
            .map(Etcd::endpoint)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The client URL, as given to `--etcd-api`: `https://` with TLS.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.base.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.base.join("etcd.log")
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open etcd log");
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(ETCD);
        // etcd reads ETCD_<FLAG> too and refuses a flag that is also set
        // in the environment: keep the developer's shell out of it.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(key);
            }
        }
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args([
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
                "--log-level",
                "warn",
            ]);
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

    /// Waits until the spawned member is healthy *and* is the member we
    /// started (another test's etcd could hold a port we thought free).
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if !self.is_running() {
                return Err(format!("etcd {} exited during start-up", self.name));
            }
            if self.etcdctl(&["endpoint", "health"]).is_ok() {
                let members = self.etcdctl(&["member", "list", "-w", "json"])?;
                if !members.contains(&format!("\"name\":\"{}\"", self.name)) {
                    return Err(format!(
                        "port {} answers as another etcd: {members}",
                        self.client_port
                    ));
                }
                if self.is_running() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "etcd {} not healthy within {READY_WITHIN:?}",
                    self.name
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts every member of `members` that is not running, then waits for
    /// all of them: the way to restart a whole cluster, where no member is
    /// healthy before a quorum is back.
    pub fn start_all(members: &mut [Etcd]) {
        for m in members.iter_mut() {
            if !m.is_running() {
                m.spawn();
            }
        }
        for m in members.iter_mut() {
            if let Err(why) = m.wait_ready() {
                panic!("restarting etcd: {why}\n--- etcd log ---\n{}", m.log_tail());
            }
        }
    }

    /// Starts the member again after [`stop`](Self::stop) or
    /// [`kill`](Self::kill): same name, ports and data. In a cluster the
    /// others must still form a quorum (else use [`Etcd::start_all`]).
    pub fn start(&mut self) {
        assert!(!self.is_running(), "etcd {} is already running", self.name);
        self.spawn();
        if let Err(why) = self.wait_ready() {
            panic!(
                "restarting etcd: {why}\n--- etcd log ---\n{}",
                self.log_tail()
            );
        }
    }

    /// SIGTERM, then waits up to 10 s for exit (SIGKILL after that).
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        if !self.wait_exit(Duration::from_secs(10)) {
            self.kill();
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Why ignored: the process may already have exited; wait() reaps it either way.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the member (SIGSTOP): its sockets stay open but nothing answers.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Thaws a member frozen by [`pause`](Self::pause).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        let child = self.child.as_ref().expect("etcd is not running");
        // SAFETY: plain kill(2) on a pid we own and have not reaped.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        assert_eq!(
            rc,
            0,
            "kill(etcd, {sig}): {}",
            std::io::Error::last_os_error()
        );
    }

    fn wait_exit(&mut self, within: Duration) -> bool {
        let exited = poll_until(within, || !self.is_running());
        if exited {
            self.child.take();
        }
        exited
    }

    /// `etcdctl` (API v3) aimed at this member, without the TLS options.
    /// Hermetic: ETCDCTL_* in the developer's shell (endpoints, TLS,
    /// credentials) must not redirect or change these calls.
    fn etcdctl_command(&self) -> Command {
        let mut cmd = Command::new(ETCDCTL);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCDCTL_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()));
        cmd
    }

    /// Runs `etcdctl` (API v3) against this member; stdout on success.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String, String> {
        self.etcdctl_as(None, args)
    }

    /// [`etcdctl`](Self::etcdctl) as `user` (`NAME:PASS`) if given; with
    /// the client certificate if the member serves TLS.
    pub fn etcdctl_as(&self, user: Option<&str>, args: &[&str]) -> Result<String, String> {
        let mut cmd = self.etcdctl_command();
        cmd.args(["--dial-timeout=2s", "--command-timeout=3s"]);
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

    fn must(&self, args: &[&str]) -> String {
        self.must_as(None, args)
    }

    /// [`etcdctl_as`](Self::etcdctl_as) or panic.
    pub fn must_as(&self, user: Option<&str>, args: &[&str]) -> String {
        self.etcdctl_as(user, args)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Every key under `prefix` (`""` for the whole keyspace) with its value
    /// and lease id (0 when the key has no lease).
    pub fn get_prefix_with_lease(&self, prefix: &str) -> BTreeMap<String, (String, i64)> {
        self.get_prefix_with_lease_as(None, prefix)
    }

    /// [`get_prefix_with_lease`](Self::get_prefix_with_lease) as `user`.
    pub fn get_prefix_with_lease_as(
        &self,
        user: Option<&str>,
        prefix: &str,
    ) -> BTreeMap<String, (String, i64)> {
        let out = self.must_as(user, &["get", "--prefix", "-w", "json", "--", prefix]);
        let utf8 =
            |bytes: Vec<u8>| String::from_utf8(bytes).expect("etcd key or value is not UTF-8");
        parse_get(&out)
            .1
            .into_iter()
            .map(|kv| (utf8(kv.key), (utf8(kv.value), kv.lease)))
            .collect()
    }

    /// Every key under `prefix` (`""` for the whole keyspace) with its value.
    pub fn get_prefix(&self, prefix: &str) -> BTreeMap<String, String> {
        self.get_prefix_with_lease(prefix)
            .into_iter()
            .map(|(k, (v, _))| (k, v))
            .collect()
    }

    /// The whole keyspace.
    pub fn get_all(&self) -> BTreeMap<String, String> {
        self.get_prefix("")
    }

    pub fn put(&self, key: &str, value: &str) {
        self.must(&["put", "--", key, value]);
    }

    pub fn del(&self, key: &str) {
        self.must(&["del", "--", key]);
    }

    /// `(remaining TTL, granted TTL)` of a lease, or `None` if it does not
    /// exist (expired or revoked).
    pub fn lease_ttl(&self, lease: i64) -> Option<(i64, i64)> {
        self.lease_ttl_as(None, lease)
    }

    /// [`lease_ttl`](Self::lease_ttl) as `user`.
    pub fn lease_ttl_as(&self, user: Option<&str>, lease: i64) -> Option<(i64, i64)> {
        let hex = format!("{lease:x}");
        let out = self.must_as(user, &["lease", "timetolive", &hex, "-w", "json"]);
        let doc: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("etcdctl lease timetolive gave non-JSON ({e}): {out}"));
        let ttl = doc.get("ttl").and_then(Value::as_i64).unwrap_or(-1);
        let granted = doc.get("granted-ttl").and_then(Value::as_i64).unwrap_or(0);
        (ttl >= 0).then_some((ttl, granted))
    }

    /// Grants a lease and returns its id.
    pub fn lease_grant(&self, ttl_secs: u64) -> i64 {
        let out = self.must(&["lease", "grant", &ttl_secs.to_string(), "-w", "json"]);
        let doc: Value = serde_json::from_str(&out).expect("lease grant JSON");
        doc.get("ID")
            .and_then(Value::as_i64)
            .unwrap_or_else(|| panic!("no lease ID in {out}"))
    }

    pub fn lease_revoke(&self, lease: i64) {
        self.must(&["lease", "revoke", &format!("{lease:x}")]);
    }

    /// Everything etcd logged (warnings and errors unless `extra` set
    /// another `--log-level`).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last lines etcd logged.
    pub fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!(
                "--- etcd {} ({}) log tail ---\n{}\n--- end of etcd log ---",
                self.name,
                self.endpoint(),
                self.log_tail()
            );
        }
        // Why ignored: a leftover temp dir is harmless and must not mask the test result.
        let _ = fs::remove_dir_all(&self.base);
    }
}

/// One key of an `etcdctl get -w json` answer, decoded.
pub struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// 0 when the key has no lease.
    pub lease: i64,
}

/// Parses what `etcdctl get -w json` printed: the whole document (for its
/// header) and every key in it.
pub fn parse_get(out: &str) -> (Value, Vec<Kv>) {
    let doc: Value = serde_json::from_str(out)
        .unwrap_or_else(|e| panic!("etcdctl get -w json gave non-JSON ({e}): {out}"));
    let kvs = doc
        .get("kvs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|kv| {
            let field = |name: &str| {
                let b64 = kv.get(name).and_then(Value::as_str).unwrap_or("");
                base64_decode(b64)
                    .unwrap_or_else(|| panic!("bad base64 in etcdctl output: {b64:?}"))
            };
            Kv {
                key: field("key"),
                value: field("value"),
                lease: kv.get("lease").and_then(Value::as_i64).unwrap_or(0),
            }
        })
        .collect();
    (doc, kvs)
}

/// Standard base64 (with padding, as etcdctl's JSON writes it). `None` on
/// malformed input.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes = s.trim_end_matches('=').as_bytes();
    if s.len() % 4 != 0 || s.len() - bytes.len() > 2 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        out.push((acc >> 16) as u8);
        if chunk.len() > 2 {
            out.push((acc >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(acc as u8);
        }
    }
    Some(out)
}

/// One event of an `etcdctl watch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(String),
    Delete(String),
}

/// `etcdctl watch --prefix` running beside a test: every put and delete
/// under the prefix, in order, with the moment the test saw it. A watch sees
/// what a poll can miss (a key absent for a millisecond), so it is how the
/// tests prove that a key was *never* missing.
pub struct Watch {
    child: Child,
    events: std::sync::Arc<std::sync::Mutex<Vec<(Instant, WatchEvent)>>>,
    reader: Option<thread::JoinHandle<()>>,
}

impl Etcd {
    /// Starts watching `prefix` and returns once the watch is in place
    /// (proved by a put under the prefix that the watch reports; the marker
    /// key is deleted again, and both events are left out).
    pub fn watch(&self, prefix: &str) -> Watch {
        use std::io::BufRead;
        let mut cmd = self.etcdctl_command();
        cmd.args(["watch", "--prefix", prefix])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = spawn_tied(cmd).unwrap_or_else(|e| panic!("{ETCDCTL} watch: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = events.clone();
        // Output: "PUT\nKEY\nVALUE\n" or "DELETE\nKEY\n\n" per event (a
        // delete prints its empty value too); anything else is skipped line
        // by line until the next event starts.
        let reader = thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            while let Some(Ok(kind)) = lines.next() {
                if kind != "PUT" && kind != "DELETE" {
                    continue;
                }
                let Some(Ok(key)) = lines.next() else { return };
                let event = if kind == "PUT" {
                    let _value = lines.next();
                    WatchEvent::Put(key)
                } else {
                    WatchEvent::Delete(key)
                };
                sink.lock().unwrap().push((Instant::now(), event));
            }
        });
        let watch = Watch {
            child,
            events,
            reader: Some(reader),
        };
        let marker = format!("{prefix}watch-marker-{}", unique_name("w"));
        let ready = poll_until(Duration::from_secs(10), || {
            self.put(&marker, "x");
            watch
                .events()
                .iter()
                .any(|(_, e)| *e == WatchEvent::Put(marker.clone()))
        });
        assert!(ready, "etcdctl watch --prefix {prefix} reports nothing");
        self.del(&marker);
        assert!(
            poll_until(Duration::from_secs(5), || watch
                .events()
                .iter()
                .any(|(_, e)| *e == WatchEvent::Delete(marker.clone()))),
            "etcdctl watch did not report the marker's delete"
        );
        watch.events.lock().unwrap().clear();
        watch
    }
}

impl Watch {
    /// Every event so far, oldest first.
    pub fn events(&self) -> Vec<(Instant, WatchEvent)> {
        self.events.lock().unwrap().clone()
    }

    /// The keys deleted so far (by anyone, or by a lease expiring).
    pub fn deleted(&self) -> Vec<String> {
        self.events()
            .into_iter()
            .filter_map(|(_, e)| match e {
                WatchEvent::Delete(k) => Some(k),
                WatchEvent::Put(_) => None,
            })
            .collect()
    }

    /// How many puts of `key` the watch has seen.
    pub fn puts_of(&self, key: &str) -> usize {
        self.events()
            .iter()
            .filter(|(_, e)| *e == WatchEvent::Put(key.to_string()))
            .count()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // Why ignored: the watcher may have exited already; either way it
        // is gone after this.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}
