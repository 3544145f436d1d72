//! Throwaway etcd members (Debian's etcd-server 3.4) on ephemeral loopback
//! ports, each with its data in a fresh temp dir, driven through `etcdctl`
//! (API v3): a single member ([`Etcd::start_new`]) or a cluster
//! ([`Etcd::start_cluster`]). A member can be stopped, restarted on the same
//! ports and data, frozen and killed, which is what fault tests need.
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
    child: Option<Child>,
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

    /// Starts a fresh cluster of `size` members and waits until every one is
    /// healthy. Panics (never skips) if etcd is not installed.
    pub fn start_cluster(size: usize) -> Vec<Etcd> {
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

    /// The client URL, as given to `--etcd-api`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
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
            ])
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

    /// Runs `etcdctl` (API v3) against this member; stdout on success.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(ETCDCTL);
        // Hermetic: ETCDCTL_* in the developer's shell (endpoints, TLS,
        // credentials) must not redirect or change these calls.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCDCTL_") {
                cmd.env_remove(key);
            }
        }
        let out = cmd
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .args(["--dial-timeout=2s", "--command-timeout=3s"])
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
        self.etcdctl(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Every key under `prefix` (`""` for the whole keyspace) with its value
    /// and lease id (0 when the key has no lease).
    pub fn get_prefix_with_lease(&self, prefix: &str) -> BTreeMap<String, (String, i64)> {
        let out = self.must(&["get", "--prefix", "-w", "json", "--", prefix]);
        let doc: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("etcdctl get -w json gave non-JSON ({e}): {out}"));
        let mut map = BTreeMap::new();
        let Some(kvs) = doc.get("kvs").and_then(Value::as_array) else {
            return map;
        };
        for kv in kvs {
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
        let hex = format!("{lease:x}");
        let out = self.must(&["lease", "timetolive", &hex, "-w", "json"]);
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

    /// The last lines etcd logged (warnings and errors only).
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
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
