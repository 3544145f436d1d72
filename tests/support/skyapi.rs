//! The real `skyapi` binary as a child process.
//!
//! [`Skyapi::start`] adds `--listen-addr 127.0.0.1:0` and `--etcd-api
//! <endpoint>` unless the caller gives them, collects stdout and stderr line
//! by line in the background, and waits for the readiness line
//! `listening on ADDR` to learn the bound port. On drop the process is
//! killed, and if the test is failing everything it logged is printed.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::{poll_until, spawn_tied, Etcd};

/// The binary under test, built by cargo for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_skyapi");

/// How long start-up may take before `listening on` must have been logged.
const READY_WITHIN: Duration = Duration::from_secs(10);

pub type Logs = Arc<Mutex<Vec<String>>>;

pub struct Skyapi {
    child: Child,
    addr: SocketAddr,
    logs: Logs,
    args: Vec<String>,
    status: Option<ExitStatus>,
    readers: Vec<JoinHandle<()>>,
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
                    logs.lock().unwrap().push(format!("{tag}{line}"));
                }
            }
        }
    })
}

fn spawn(args: &[String]) -> (Child, Logs, Vec<JoinHandle<()>>) {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    // Hermetic: skyapi also reads its flags from SKYAPI_<FLAG>; a value set
    // in the developer's shell must not change what a test runs.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SKYAPI_") {
            cmd.env_remove(key);
        }
    }
    cmd.env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_tied(cmd).unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
    let logs: Logs = Arc::default();
    let readers = vec![
        collect_lines(child.stdout.take().unwrap(), "[stdout] ", logs.clone()),
        collect_lines(child.stderr.take().unwrap(), "", logs.clone()),
    ];
    (child, logs, readers)
}

/// Waits for the reader threads, so every line the exited process wrote is
/// in the log.
fn join_readers(readers: &mut Vec<JoinHandle<()>>) {
    for r in readers.drain(..) {
        // Why ignored: a reader only ends by EOF or a read error; either way its lines are in.
        let _ = r.join();
    }
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
        let (child, logs, readers) = spawn(&args);
        let mut sky = Skyapi {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            logs,
            args,
            status: None,
            readers,
        };
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let found = sky.logs().iter().find_map(|l| parse_listening(l));
            if let Some(addr) = found {
                sky.addr = addr;
                return sky;
            }
            if let Some(status) = sky.try_status() {
                panic!(
                    "skyapi {:?} exited with {status} before logging `listening on`:\n{}",
                    sky.args,
                    sky.logs().join("\n")
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "skyapi {:?} did not log `listening on ADDR` within {READY_WITHIN:?}:\n{}",
                    sky.args,
                    sky.logs().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The address skyapi reported it bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where a client on this machine reaches it (loopback when it bound
    /// an unspecified address).
    pub fn connect_addr(&self) -> SocketAddr {
        let mut a = self.addr;
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
        assert!(self.status.is_none(), "skyapi already exited");
        // SAFETY: plain kill(2) on a pid we own and have not reaped.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(
            rc,
            0,
            "kill(skyapi, {sig}): {}",
            std::io::Error::last_os_error()
        );
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait skyapi");
        }
        self.status
    }

    /// Waits up to `within` for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        poll_until(within, || self.try_status().is_some());
        self.status
    }

    /// Everything logged so far (stdout lines are tagged `[stdout] `).
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }
}

impl Drop for Skyapi {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            // Why ignored: it may exit between the check and the kill; wait() reaps either way.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            join_readers(&mut self.readers);
            eprintln!(
                "--- skyapi {:?} (pid {}) log ---\n{}\n--- end of skyapi log ---",
                self.args,
                self.child.id(),
                self.logs().join("\n")
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
    let (mut child, logs, mut readers) = spawn(&args);
    let mut status = None;
    poll_until(within, || {
        status = child.try_wait().expect("try_wait skyapi");
        status.is_some()
    });
    let Some(status) = status else {
        // Why ignored: best effort before failing the test.
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "skyapi {args:?} still running after {within:?}:\n{}",
            logs.lock().unwrap().join("\n")
        );
    };
    join_readers(&mut readers);
    let lines = logs.lock().unwrap().clone();
    let (stdout, stderr): (Vec<_>, Vec<_>) =
        lines.into_iter().partition(|l| l.starts_with("[stdout] "));
    Finished {
        status,
        stdout: stdout
            .into_iter()
            .map(|l| l["[stdout] ".len()..].to_string())
            .collect(),
        stderr,
    }
}
