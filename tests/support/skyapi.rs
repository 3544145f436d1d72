//! The real `skyapi` binary as a child process, a server or the sidecar.
//!
//! [`Skyapi::start`] adds `--listen-addr 127.0.0.1:0` and `--etcd-api
//! <endpoint>` unless the caller gives them; [`Skyapi::server`] runs exactly
//! the arguments and environment given. Every run is hermetic (no
//! `SKYAPI_*` from the developer's shell), collects stdout and stderr line
//! by line in the background, and a server is waited for until its
//! readiness line `listening on ADDR` gives the bound port. On drop the
//! process is killed, and if the test is failing everything it logged is
//! printed.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::{free_port, poll_until, spawn_tied, Etcd};

/// The binary under test, built by cargo for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_skyapi");

/// The binary the suites start: [`BIN`], or the one `SKYAPI_TEST_BIN`
/// names, so the same suites run against the shipped static build (`make
/// test-static`).
pub fn bin() -> &'static str {
    static CHOSEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CHOSEN.get_or_init(|| std::env::var("SKYAPI_TEST_BIN").unwrap_or_else(|_| BIN.to_string()))
}

/// How long start-up may take before `listening on` must have been logged.
const READY_WITHIN: Duration = Duration::from_secs(10);

pub type Logs = Arc<Mutex<Vec<String>>>;

/// The binary as a child process: a server ([`Skyapi::start`],
/// [`Skyapi::server`]) or the sidecar ([`Skyapi::provide`]).
pub struct Skyapi {
    /// `skyapi` or `sidecar`, for messages.
    kind: String,
    /// `kind` with the arguments (and environment), for messages.
    name: String,
    child: Child,
    logs: Logs,
    status: Option<ExitStatus>,
    readers: Vec<JoinHandle<()>>,
    /// What a server logged as `listening on ADDR`; `None` for the sidecar.
    addr: Option<SocketAddr>,
}

/// Copies `from` line by line into `logs`, tagging each line with `tag`,
/// until end of file (the process exited and closed its end of the pipe).
fn collect_lines(
    from: impl Read + Send + 'static,
    tag: &'static str,
    logs: Logs,
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
                    logs.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("{tag}{line}"));
                }
            }
        }
    })
}

/// The address in a line containing `listening on ADDR`, if any.
pub fn parse_listening(line: &str) -> Option<SocketAddr> {
    let at = line.find("listening on ")?;
    let token = line[at + "listening on ".len()..]
        .split_whitespace()
        .next()?;
    let token = token
        .trim_start_matches("ws://")
        .trim_start_matches("http://")
        .trim_matches(|c: char| matches!(c, '"' | '\'' | ',' | ';' | '.' | ')' | '(' | '`' | '/'));
    token.parse().ok()
}

impl Skyapi {
    /// Runs the binary with `args` and, of the `SKYAPI_*` variables, exactly
    /// those in `env` (skyapi also reads its flags from SKYAPI_<FLAG>: a
    /// value set in the developer's shell must not change what a test runs).
    /// `kind` (`skyapi`, `sidecar`) names it in messages.
    pub fn spawn(kind: &str, args: &[String], env: &[(&str, &str)]) -> Skyapi {
        let mut cmd = Command::new(bin());
        cmd.args(args);
        let name = if env.is_empty() {
            format!("{kind} {args:?}")
        } else {
            format!("{kind} {args:?} env {env:?}")
        };
        Skyapi::spawn_command(kind, &name, cmd, env, None)
    }

    /// Runs `cmd` (the binary, or a program that execs it, such as
    /// `systemd-socket-activate`) hermetically as [`spawn`](Self::spawn)
    /// does. With `stderr`, the child writes its stderr to that pipe (the
    /// test made it, to know its inode) and the log is read from `reader`.
    pub fn spawn_command(
        kind: &str,
        name: &str,
        mut cmd: Command,
        env: &[(&str, &str)],
        stderr: Option<(Stdio, fs::File)>,
    ) -> Skyapi {
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("SKYAPI_") {
                cmd.env_remove(key);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let (child_stderr, reader) = match stderr {
            Some((writer, reader)) => (writer, Some(reader)),
            None => (Stdio::piped(), None),
        };
        cmd.env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(child_stderr);
        let mut child = spawn_tied(cmd).unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let logs: Logs = Arc::default();
        let mut readers = vec![collect_lines(
            child.stdout.take().unwrap(),
            "[stdout] ",
            logs.clone(),
        )];
        match (child.stderr.take(), reader) {
            (Some(pipe), _) => readers.push(collect_lines(pipe, "", logs.clone())),
            (None, Some(file)) => readers.push(collect_lines(file, "", logs.clone())),
            (None, None) => {}
        }
        let name = name.to_string();
        Skyapi {
            kind: kind.to_string(),
            name,
            child,
            logs,
            status: None,
            readers,
            addr: None,
        }
    }

    /// Starts skyapi against `etcd` with `args`, plus `--listen-addr
    /// 127.0.0.1:0` and `--etcd-api <etcd>` where `args` has none.
    pub fn start(etcd: &Etcd, args: &[&str]) -> Skyapi {
        let has = |flag: &str| {
            args.iter()
                .any(|a| *a == flag || a.starts_with(&format!("{flag}=")))
        };
        let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if !has("--listen-addr") {
            full.extend(["--listen-addr".into(), "127.0.0.1:0".into()]);
        }
        if !has("--etcd-api") {
            full.extend(["--etcd-api".into(), etcd.endpoint()]);
        }
        Skyapi::start_args(full)
    }

    /// Starts skyapi with exactly `args` and waits for `listening on`.
    pub fn start_args(args: Vec<String>) -> Skyapi {
        Skyapi::try_server(&args, &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts a server with exactly `args` (and `env`, see
    /// [`spawn`](Self::spawn)) and waits for `listening on ADDR`. `Err`
    /// (with the log) if it exits first, e.g. because its fixed port is
    /// taken.
    pub fn try_server(args: &[String], env: &[(&str, &str)]) -> Result<Skyapi, String> {
        Skyapi::spawn("skyapi", args, env).wait_listening()
    }

    /// Waits for a spawned server's `listening on ADDR`; `Err` (with the
    /// log) if it exits first.
    pub fn wait_listening(mut self) -> Result<Skyapi, String> {
        let p = &mut self;
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(addr) = p.logs().iter().find_map(|l| parse_listening(l)) {
                p.addr = Some(addr);
                return Ok(self);
            }
            if let Some(status) = p.try_status() {
                p.join_readers();
                return Err(format!(
                    "{} exited with {status} before logging `listening on`:\n{}",
                    p.name,
                    p.logs().join("\n")
                ));
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not log `listening on ADDR` within {READY_WITHIN:?}:\n{}",
                    p.name,
                    p.logs().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// [`try_server`](Self::try_server) or panic.
    pub fn server(args: &[&str], env: &[(&str, &str)]) -> Skyapi {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Skyapi::try_server(&args, env).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A server on `127.0.0.1:<port>` with its etcd at `etcd_api`, where
    /// `port` is fixed so the server can be restarted on it. Retries with
    /// another port if the first is taken meanwhile (only a first start
    /// can; pass `retry: false` for a restart).
    pub fn server_on(etcd_api: &str, port: u16, extra: &[&str], retry: bool) -> Skyapi {
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
            match Skyapi::try_server(&args, &[]) {
                Ok(p) => return p,
                Err(e) if retry => failures.push(e),
                Err(e) => panic!("restarting the server on port {port}: {e}"),
            }
            port = free_port();
        }
        panic!("could not start a server:\n{}", failures.join("\n"));
    }

    /// `skyapi provide ARGS` (the sidecar), with `env` as for
    /// [`spawn`](Self::spawn).
    pub fn provide(args: &[&str], env: &[(&str, &str)]) -> Skyapi {
        let mut full = vec!["provide".to_string()];
        full.extend(args.iter().map(|s| s.to_string()));
        Skyapi::spawn("sidecar", &full, env)
    }

    /// The address the server reported it bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("not a server, or not listening yet")
    }

    /// Where a client on this machine reaches it (loopback when it bound
    /// an unspecified address).
    pub fn connect_addr(&self) -> SocketAddr {
        let mut a = self.addr();
        if a.ip().is_unspecified() {
            a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        a
    }

    /// `ws://ADDR<path_and_query>`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("ws://{}{path_and_query}", self.connect_addr())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: libc::c_int) {
        assert!(self.status.is_none(), "{} already exited", self.name);
        // SAFETY: plain kill(2) on a pid we own and have not reaped.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(
            rc,
            0,
            "kill({}, {sig}): {}",
            self.kind,
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
            self.join_readers();
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
                self.name,
                self.logs().join("\n")
            ),
            None => panic!("{} still running 10 s after SIGTERM", self.name),
        }
    }

    /// Everything logged so far (stdout lines are tagged `[stdout] `).
    pub fn logs(&self) -> Vec<String> {
        // A poisoned lock still holds every line; this also runs in `drop`
        // while unwinding, where a second panic would abort.
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Lines logged so far that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.logs()
            .into_iter()
            .filter(|l| l.contains(needle))
            .collect()
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

    /// Waits for the reader threads, so every line the exited process wrote
    /// is in the log.
    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            // Why ignored: a reader only ends by EOF or a read error; either way its lines are in.
            let _ = r.join();
        }
    }
}

impl Drop for Skyapi {
    fn drop(&mut self) {
        // Not `try_status`: a panic here, while unwinding, would abort.
        if self.status.is_none() && !matches!(self.child.try_wait(), Ok(Some(_))) {
            // Why ignored: it may exit between the check and the kill; wait()
            // reaps either way. SIGKILL also ends a SIGSTOPped process.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            self.join_readers();
            eprintln!(
                "--- {} (pid {}) log ---\n{}\n--- end of {} log ---",
                self.name,
                self.child.id(),
                self.logs().join("\n"),
                self.kind
            );
        }
    }
}

/// A finished run of the binary.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

/// Runs skyapi with exactly `args` and waits up to `within` for it to exit
/// on its own; panics (after killing it) if it does not.
pub fn run_to_exit(args: &[&str], within: Duration) -> Finished {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let mut p = Skyapi::spawn("skyapi", &args, &[]);
    // On a panic, dropping `p` kills the process and prints its log.
    let status = p
        .wait_exit(within)
        .unwrap_or_else(|| panic!("skyapi {args:?} still running after {within:?}"));
    let (stdout, stderr): (Vec<_>, Vec<_>) = p
        .logs()
        .into_iter()
        .partition(|l| l.starts_with("[stdout] "));
    Finished {
        status,
        stdout: stdout
            .into_iter()
            .map(|l| l["[stdout] ".len()..].to_string())
            .collect(),
        stderr,
    }
}
