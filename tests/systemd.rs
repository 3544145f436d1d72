//! Running under systemd: socket activation (through the real
//! `systemd-socket-activate`), the notify protocol and its watchdog (a
//! socket of the test's own standing in for systemd), log lines for the
//! journal, the Debian package (`make deb`), the shipped units
//! (`systemd-analyze verify`) and the Prometheus alert rules (`promtool`).
//!
//! The tools come from Debian packages `make deps` installs (systemd,
//! prometheus, dpkg); a missing one fails its test with the package name.

mod support;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const TEST_LIMIT: Duration = Duration::from_secs(90);
const ROOT: &str = "/skydns";

/// A tool a test needs, or a failure naming the Debian package with it.
fn tool(path: &str, package: &str) -> &'static str {
    assert!(
        Path::new(path).exists(),
        "{path} not found: install the Debian package {package} (make deps does)"
    );
    Box::leak(path.to_string().into_boxed_str())
}

/// Runs `cmd`, returning stdout, or panics with everything it printed.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ------------------------------------------------------ socket activation

#[test]
fn socket_activation_serves_on_the_passed_socket_and_binds_nothing_else() {
    let _w = watchdog(TEST_LIMIT);
    let activate = tool("/usr/bin/systemd-socket-activate", "systemd");
    let etcd = Etcd::start_new();
    let passed = free_port();
    let not_bound = free_port();
    let mut cmd = Command::new(activate);
    cmd.args([
        "--listen",
        &format!("127.0.0.1:{passed}"),
        "--fdname=skyapi.socket",
        skyapi::BIN,
        "--etcd-api",
        &etcd.endpoint(),
        "--listen-addr",
        &format!("127.0.0.1:{not_bound}"),
    ]);
    let name = format!("systemd-socket-activate on {passed}");
    // systemd-socket-activate execs skyapi on the first connection, so the
    // process is skyapi from then on (and is killed on drop).
    let sky = Skyapi::spawn_command("skyapi", &name, cmd, &[], None);
    eventually(
        "systemd-socket-activate listening",
        Duration::from_secs(10),
        || (!sky.lines_with("Listening on").is_empty()).then_some(()),
    );

    let url = format!("ws://127.0.0.1:{passed}/provide?service=foo&port=9999&host=127.0.0.1");
    let (mut ws, welcome) = register(&url);
    let key = welcome["key"]
        .as_str()
        .expect("key in the welcome")
        .to_string();
    assert!(
        etcd.get_prefix(ROOT).contains_key(&key),
        "{key} not in etcd: {:?}",
        etcd.get_prefix(ROOT)
    );
    let said = sky.lines_with("socket activation");
    assert!(
        said.iter().any(|l| l.contains("fd 3")
            && l.contains("skyapi.socket")
            && l.contains(&passed.to_string())),
        "no log line naming the passed socket: {:?}",
        sky.logs()
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", not_bound)).is_err(),
        "--listen-addr 127.0.0.1:{not_bound} was bound although a socket was passed"
    );
    let listening = sky.lines_with("listening on");
    assert!(
        listening.len() == 1 && listening[0].contains(&format!("127.0.0.1:{passed}")),
        "{listening:?}"
    );
    // Nothing skyapi might start inherits the socket.
    let fdinfo =
        std::fs::read_to_string(format!("/proc/{}/fdinfo/3", sky.pid())).expect("fd 3 of skyapi");
    let flags = fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .map(|f| u32::from_str_radix(f.trim(), 8).expect("octal flags"))
        .expect("flags in fdinfo");
    assert!(
        flags & libc::O_CLOEXEC as u32 != 0,
        "fd 3 is not close-on-exec: {fdinfo}"
    );
    close(&mut ws, Duration::from_secs(5));
    assert!(
        poll_until(Duration::from_secs(5), || etcd.get_prefix(ROOT).is_empty()),
        "entry left after close"
    );
}

#[test]
fn a_passed_socket_that_is_not_tcp_stops_start_up_with_a_clear_message() {
    let _w = watchdog(TEST_LIMIT);
    let activate = tool("/usr/bin/systemd-socket-activate", "systemd");
    let port = free_port();
    let mut cmd = Command::new(activate);
    cmd.args([
        "--datagram",
        "--listen",
        &format!("127.0.0.1:{port}"),
        skyapi::BIN,
        "--etcd-api",
        "127.0.0.1:1",
    ]);
    let mut sky = Skyapi::spawn_command("skyapi", "activated with a UDP socket", cmd, &[], None);
    eventually(
        "systemd-socket-activate listening",
        Duration::from_secs(10),
        || (!sky.lines_with("Listening on").is_empty()).then_some(()),
    );
    // A datagram wakes systemd-socket-activate, which then execs skyapi.
    let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let status = eventually("skyapi exits", Duration::from_secs(10), || {
        let _ = u.send_to(b"x", ("127.0.0.1", port));
        sky.wait_exit(Duration::from_millis(200))
    });
    assert_eq!(status.code(), Some(1), "{:?}", sky.logs());
    assert!(
        sky.logs()
            .iter()
            .any(|l| l.contains("socket activation: fd 3") && l.contains("not a stream")),
        "{:?}",
        sky.logs()
    );
}

/// skyapi started the way systemd starts it for a `.socket` unit: `listener`
/// as fd 3, `LISTEN_FDS=1`, `LISTEN_PID` its own pid (a shell sets it, then
/// execs skyapi in the same process).
fn activated(listener: &std::net::TcpListener, etcd: &Etcd) -> Skyapi {
    use std::os::unix::process::CommandExt;
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new("/bin/sh");
    cmd.args([
        "-c",
        "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" --etcd-api \"$1\"",
        skyapi::BIN,
        &etcd.endpoint(),
    ]);
    // SAFETY: dup2 is async-signal-safe; it gives the child the listening
    // socket as fd 3 (without close-on-exec, as a manager passes it).
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would keep close-on-exec set.
            let ok = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0) == 0
            } else {
                libc::dup2(fd, 3) == 3
            };
            if !ok {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Skyapi::spawn_command("skyapi", "skyapi with a passed socket", cmd, &[], None)
        .wait_listening()
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_restart_on_a_passed_socket_queues_connections_instead_of_refusing_them() {
    let _w = watchdog(TEST_LIMIT);
    let etcd = Etcd::start_new();
    // The test holds the socket, as systemd holds a .socket unit's.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().unwrap();
    let mut first = activated(&listener, &etcd);
    assert_eq!(first.addr(), addr);
    let (mut ws, welcome) = register(&format!(
        "ws://{addr}/provide?service=foo&port=9999&host=127.0.0.1"
    ));
    assert!(welcome["key"].is_string());
    first.terminate();
    close(&mut ws, Duration::from_secs(1));

    // Between the two processes: the socket still listens (skyapi's stop
    // did not shut it down), so a client is queued, not refused.
    let mut queued = std::net::TcpStream::connect(addr)
        .expect("connect while no skyapi runs: the passed socket stopped listening");
    std::io::Write::write_all(
        &mut queued,
        format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();

    let _second = activated(&listener, &etcd);
    queued
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut queued, &mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.1 503"),
        "the queued request was not served by the next skyapi: {answer:?}"
    );
}

// ------------------------------------------------------ sd_notify

/// A datagram socket standing in for systemd's notify socket.
struct NotifySocket {
    socket: UnixDatagram,
    _dir: TempDir,
    path: String,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = TempDir::new("notify");
        let path = dir.path("notify");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        NotifySocket {
            socket,
            path: path.to_string_lossy().into_owned(),
            _dir: dir,
        }
    }

    /// The next message within `within`.
    fn recv(&self, within: Duration) -> Option<String> {
        self.socket
            .set_read_timeout(Some(within.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => None,
        }
    }

    /// Every message within `window`.
    fn collect(&self, window: Duration) -> Vec<String> {
        let end = Instant::now() + window;
        let mut out = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            if let Some(m) = self.recv(left) {
                out.push(m);
            }
        }
        out
    }

    /// Waits for a message for which `want` holds, returning it.
    fn wait_for(&self, what: &str, within: Duration, want: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + within;
        let mut seen = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.recv(left) {
                Some(m) if want(&m) => return m,
                Some(m) => seen.push(m),
                None => {}
            }
        }
        panic!("no {what} within {within:?}; got {seen:?}");
    }
}

fn pings(messages: &[String]) -> usize {
    messages
        .iter()
        .filter(|m| m.as_str() == "WATCHDOG=1")
        .count()
}

/// One thread of `pid` stopped with ptrace, so it is wedged while the rest
/// of the process runs; resumed on drop. ptrace is per thread, so the
/// tracer is the test thread that made it, which must also drop it.
struct Frozen {
    tid: libc::pid_t,
}

impl Frozen {
    fn thread(pid: u32, comm: &str) -> Frozen {
        let tid: libc::pid_t = std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("list threads")
            .filter_map(|e| e.ok())
            .find(|e| {
                std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == comm)
            })
            .unwrap_or_else(|| panic!("no thread {comm:?} in process {pid}"))
            .file_name()
            .to_string_lossy()
            .parse()
            .expect("thread id");
        // SAFETY: ptrace and waitpid on a thread of our own child process.
        unsafe {
            assert_eq!(
                libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0),
                0,
                "PTRACE_SEIZE {comm}: {}",
                std::io::Error::last_os_error()
            );
            assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0), 0);
            let mut status = 0;
            assert_eq!(libc::waitpid(tid, &mut status, libc::__WALL), tid);
        }
        Frozen { tid }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: the thread is in a ptrace-stop we caused; detaching
        // resumes it. If the process died meanwhile this fails harmlessly.
        unsafe {
            libc::ptrace(libc::PTRACE_DETACH, self.tid, 0, 0);
        }
    }
}

#[test]
fn notify_ready_status_watchdog_and_stopping() {
    let _w = watchdog(Duration::from_secs(120));
    let etcd = Etcd::start_new();
    let notify = NotifySocket::new();
    // WatchdogSec=2: a ping every second; a loop is stale after 3 s (the
    // minimum). --timeout 600: the worker's own timers would sleep 200 s,
    // so only its heartbeat wake-ups keep it beating while idle.
    let mut sky = Skyapi::spawn(
        "skyapi",
        &[
            "--listen-addr".into(),
            "127.0.0.1:0".into(),
            "--etcd-api".into(),
            etcd.endpoint(),
            "--timeout".into(),
            "600".into(),
        ],
        &[
            ("NOTIFY_SOCKET", notify.path.as_str()),
            ("WATCHDOG_USEC", "2000000"),
        ],
    )
    .wait_listening()
    .unwrap_or_else(|e| panic!("{e}"));

    let ready = notify.wait_for("READY=1", Duration::from_secs(10), |m| {
        m.lines().any(|l| l == "READY=1")
    });
    assert!(
        ready.contains("STATUS=0 connections"),
        "READY=1 should carry a status: {ready:?}"
    );
    // From the start, both loops count as making progress.
    let first = notify.collect(Duration::from_secs(4));
    assert!(pings(&first) >= 2, "first seconds: {first:?}");
    assert!(
        sky.lines_with("made no progress").is_empty(),
        "{:?}",
        sky.logs()
    );
    if !first.iter().any(|m| m.contains("etcd ok")) {
        notify.wait_for("STATUS with etcd ok", Duration::from_secs(10), |m| {
            m.starts_with("STATUS=") && m.contains("etcd ok")
        });
    }

    // Idle, with both loops healthy: a ping about every second.
    let idle = notify.collect(Duration::from_secs(5));
    assert!(pings(&idle) >= 3, "idle server: {idle:?}");
    let statuses = idle.iter().filter(|m| m.starts_with("STATUS=")).count();
    assert_eq!(statuses, 0, "STATUS= resent without a change: {idle:?}");

    let url = sky.url("/provide?service=foo&port=9999&host=127.0.0.1");
    let (_ws, _) = register(&url);
    let status = notify.wait_for(
        "STATUS with the registration",
        Duration::from_secs(5),
        |m| m.starts_with("STATUS=") && m.contains("1 connections, 1 registrations"),
    );
    assert!(status.contains("etcd ok"), "{status:?}");

    // A wedged etcd worker: the pings stop (after the 3 s staleness bound)
    // while the rest of skyapi still answers.
    {
        let _frozen = Frozen::thread(sky.pid(), "etcd-worker");
        notify.collect(Duration::from_secs(4));
        let wedged = notify.collect(Duration::from_secs(3));
        assert_eq!(pings(&wedged), 0, "pinged with a wedged worker: {wedged:?}");
        let (code, _) = http_get(sky.connect_addr(), "/healthz");
        assert_eq!(code, 200, "the accept loop still answers");
        assert!(
            !sky.lines_with("the etcd worker has made no progress")
                .is_empty(),
            "{:?}",
            sky.logs()
        );
    }
    notify.wait_for(
        "a ping once the worker runs again",
        Duration::from_secs(5),
        |m| m == "WATCHDOG=1",
    );

    // A wedged accept loop stops them too.
    {
        let _frozen = Frozen::thread(sky.pid(), "accept");
        notify.collect(Duration::from_secs(4));
        let wedged = notify.collect(Duration::from_secs(3));
        assert_eq!(
            pings(&wedged),
            0,
            "pinged with a wedged accept loop: {wedged:?}"
        );
    }
    notify.wait_for(
        "a ping once the accept loop runs again",
        Duration::from_secs(5),
        |m| m == "WATCHDOG=1",
    );
    assert!(!sky
        .lines_with("the accept loop has made no progress")
        .is_empty());

    sky.signal(libc::SIGTERM);
    notify.wait_for("STOPPING=1", Duration::from_secs(5), |m| {
        m.lines().any(|l| l == "STOPPING=1")
    });
    let status = sky
        .wait_exit(Duration::from_secs(10))
        .expect("exit after SIGTERM");
    assert!(status.success(), "{status}");
    let after = notify.collect(Duration::from_millis(300));
    assert!(after.is_empty(), "sent after STOPPING=1: {after:?}");
}

#[test]
fn notify_to_an_abstract_socket_and_watchdog_pid_of_another_process() {
    let _w = watchdog(TEST_LIMIT);
    let etcd = Etcd::start_new();
    let name = unique_name("skyapi-notify");
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).expect("bind abstract socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let at = format!("@{name}");
    // WATCHDOG_PID names another process: the watchdog is not ours to feed.
    let sky = Skyapi::spawn(
        "skyapi",
        &[
            "--listen-addr".into(),
            "127.0.0.1:0".into(),
            "--etcd-api".into(),
            etcd.endpoint(),
        ],
        &[
            ("NOTIFY_SOCKET", at.as_str()),
            ("WATCHDOG_USEC", "1000000"),
            ("WATCHDOG_PID", "1"),
        ],
    )
    .wait_listening()
    .unwrap_or_else(|e| panic!("{e}"));
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("READY=1 on the abstract socket");
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(first.starts_with("READY=1\n"), "{first:?}");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        if let Ok(n) = socket.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]);
            assert_ne!(m, "WATCHDOG=1", "pinged for WATCHDOG_PID=1");
        }
    }
    drop(sky);
}

#[test]
fn without_notify_socket_nothing_is_sent_and_logs_are_unchanged() {
    let _w = watchdog(TEST_LIMIT);
    let etcd = Etcd::start_new();
    let sky = Skyapi::start(&etcd, &[]);
    let line = sky.lines_with("listening on").remove(0);
    // RFC 3339 timestamp and level, as before.
    assert!(
        line.as_bytes().get(4) == Some(&b'-') && line.contains("[INFO] listening on"),
        "{line:?}"
    );
    assert!(sky.lines_with("systemd").is_empty(), "{:?}", sky.logs());
}

// ------------------------------------------------------ the journal

/// A pipe for the child's stderr; returns the child's end, our end, and
/// the `DEVICE:INODE` systemd would put in `$JOURNAL_STREAM` for it.
fn stderr_pipe() -> (Stdio, std::fs::File, String) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: just created, owned by nothing else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fstat fills a struct we own.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        assert_eq!(libc::fstat(write.as_raw_fd(), &mut st), 0);
        st
    };
    (
        Stdio::from(write),
        std::fs::File::from(read),
        format!("{}:{}", st.st_dev, st.st_ino),
    )
}

#[test]
fn journal_lines_carry_their_priority_and_no_timestamp() {
    let _w = watchdog(TEST_LIMIT);
    // etcd at a port nothing listens on: skyapi warns that it is unavailable.
    let (child_end, our_end, stream) = stderr_pipe();
    let mut cmd = Command::new(skyapi::BIN);
    cmd.args(["--listen-addr", "127.0.0.1:0", "--etcd-api", "127.0.0.1:1"]);
    let sky = Skyapi::spawn_command(
        "skyapi",
        "skyapi under the journal",
        cmd,
        &[("JOURNAL_STREAM", stream.as_str())],
        Some((child_end, our_end)),
    )
    .wait_listening()
    .unwrap_or_else(|e| panic!("{e}"));
    eventually("a warning about etcd", Duration::from_secs(10), || {
        sky.logs().iter().find(|l| l.starts_with("<4>")).cloned()
    });
    let logs: Vec<String> = sky
        .logs()
        .into_iter()
        .filter(|l| !l.starts_with("[stdout]"))
        .collect();
    for l in &logs {
        assert!(
            l.starts_with("<6>") || l.starts_with("<4>") || l.starts_with("<3>"),
            "line without a syslog priority: {l:?}"
        );
        assert!(
            !l.contains("[INFO]") && !l.contains("Z ["),
            "timestamp or level word: {l:?}"
        );
    }
    assert!(
        logs.iter()
            .any(|l| l.starts_with("<6>listening on 127.0.0.1:")),
        "{logs:?}"
    );
}

#[test]
fn journal_stream_of_another_file_leaves_the_logs_as_they_were() {
    let _w = watchdog(TEST_LIMIT);
    let etcd = Etcd::start_new();
    let (_, _, stream) = stderr_pipe();
    let sky = Skyapi::server(
        &[
            "--listen-addr",
            "127.0.0.1:0",
            "--etcd-api",
            &etcd.endpoint(),
        ],
        &[("JOURNAL_STREAM", stream.as_str())],
    );
    let line = sky.lines_with("listening on").remove(0);
    assert!(
        line.contains("[INFO] listening on") && !line.starts_with('<'),
        "{line:?}"
    );
}

// ------------------------------------------------------ the Debian package

/// The package `make deb` built (or `$SKYAPI_DEB`); `make test` builds it
/// first, since building the static release binary inside a test would
/// take minutes.
fn deb() -> PathBuf {
    let path = std::env::var_os("SKYAPI_DEB")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            repo().join(format!(
                "target/debian/skyapi_{}_amd64.deb",
                env!("CARGO_PKG_VERSION")
            ))
        });
    assert!(
        path.exists(),
        "{} not found: run `make deb` first (`make test` does), or point SKYAPI_DEB at the package",
        path.display()
    );
    path
}

#[test]
fn deb_holds_the_binary_units_defaults_and_metadata() {
    let _w = watchdog(TEST_LIMIT);
    let deb = deb();
    let listing = run_ok(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    let mode_of = |path: &str| -> String {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(" .{path}")))
            .unwrap_or_else(|| panic!("{path} not in the package:\n{listing}"))
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(mode_of("/usr/bin/skyapi"), "-rwxr-xr-x");
    for file in [
        "/lib/systemd/system/skyapi.service",
        "/lib/systemd/system/skyapi.socket",
        "/lib/systemd/system/skyapi-provide@.service",
        "/etc/default/skyapi",
        "/usr/share/doc/skyapi/copyright",
        "/usr/share/doc/skyapi/README.md",
        "/usr/share/doc/skyapi/prometheus/alerts.yml",
    ] {
        assert_eq!(mode_of(file), "-rw-r--r--", "{file}");
    }

    let field = |name: &str| -> String {
        run_ok(Command::new("dpkg-deb").arg("--field").arg(&deb).arg(name))
            .trim()
            .to_string()
    };
    assert_eq!(field("Package"), "skyapi");
    assert_eq!(field("Version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(field("Architecture"), "amd64");
    assert_eq!(field("Section"), "net");
    // Static: no shared library to depend on.
    assert_eq!(field("Depends"), "", "the binary is not static?");
    let description = field("Description");
    assert!(
        description.starts_with(env!("CARGO_PKG_DESCRIPTION")) && description.lines().count() > 2,
        "{description}"
    );
    let info = run_ok(
        Command::new("dpkg-deb")
            .arg("--info")
            .arg(&deb)
            .arg("conffiles"),
    );
    assert_eq!(info.trim(), "/etc/default/skyapi");
    for script in ["postinst", "prerm", "postrm"] {
        run_ok(Command::new("dpkg-deb").arg("--info").arg(&deb).arg(script));
    }
}

#[test]
fn deb_defaults_file_explains_every_flag_and_sets_none() {
    let help = run_ok(Command::new(skyapi::BIN).arg("--help"));
    let defaults = std::fs::read_to_string(repo().join("contrib/debian/skyapi.default"))
        .expect("contrib/debian/skyapi.default");
    for line in defaults.lines() {
        assert!(
            line.is_empty() || line.starts_with('#'),
            "/etc/default/skyapi must set nothing by default: {line:?}"
        );
    }
    let flags: Vec<&str> = help
        .lines()
        .filter_map(|l| l.strip_prefix("  --"))
        .filter_map(|l| l.split([' ', ',']).next())
        .collect();
    assert!(flags.len() > 15, "flags from --help: {flags:?}");
    for flag in flags {
        let var = format!("#SKYAPI_{}=", flag.replace('-', "_").to_ascii_uppercase());
        assert!(
            defaults.lines().any(|l| l.starts_with(&var)),
            "--{flag} has no `{var}` line in contrib/debian/skyapi.default"
        );
    }
}

#[test]
fn deb_installs_runs_and_purges() {
    let _w = watchdog(TEST_LIMIT);
    let deb = deb();
    tool("/usr/bin/dpkg", "dpkg");
    // Run as root (CI is): dpkg -i changes this machine, and is undone below.
    run_ok(Command::new("dpkg").arg("--install").arg(&deb));
    let installed = || {
        let version = run_ok(Command::new("/usr/bin/skyapi").arg("--version"));
        assert_eq!(
            version.trim(),
            format!("skyapi {}", env!("CARGO_PKG_VERSION"))
        );
        let conffiles =
            run_ok(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "skyapi"]));
        assert!(conffiles.contains("/etc/default/skyapi"), "{conffiles:?}");
        // Not enabled on install: it needs its etcd settings first.
        for wants in [
            "multi-user.target.wants/skyapi.service",
            "sockets.target.wants/skyapi.socket",
        ] {
            assert!(
                !Path::new("/etc/systemd/system").join(wants).exists(),
                "{wants} enabled by the package"
            );
        }
    };
    let outcome = std::panic::catch_unwind(installed);
    run_ok(Command::new("dpkg").args(["--purge", "skyapi"]));
    if let Err(e) = outcome {
        std::panic::resume_unwind(e);
    }
    assert!(
        !Path::new("/usr/bin/skyapi").exists(),
        "binary left after purge"
    );
    assert!(
        !Path::new("/etc/default/skyapi").exists(),
        "conffile left after purge"
    );
}

#[test]
fn shipped_units_pass_systemd_analyze_verify() {
    let _w = watchdog(TEST_LIMIT);
    let analyze = tool("/usr/bin/systemd-analyze", "systemd");
    let dir = TempDir::new("units");
    let units = ["skyapi.service", "skyapi.socket", "skyapi-provide@.service"];
    for unit in units {
        let text = std::fs::read_to_string(repo().join("contrib/systemd").join(unit))
            .unwrap_or_else(|e| panic!("contrib/systemd/{unit}: {e}"));
        assert!(
            text.contains("ExecStart=/usr/bin/skyapi") || unit.ends_with(".socket"),
            "{unit}"
        );
        dir.write(unit, &text.replace("/usr/bin/skyapi", skyapi::BIN));
    }
    let out = Command::new(analyze)
        .arg("verify")
        .args(units.iter().map(|u| dir.path(u)))
        .stdin(Stdio::null())
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A misspelt setting is only a warning (exit 0): no output is allowed.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    let service = std::fs::read_to_string(dir.path("skyapi.service")).unwrap();
    for line in ["Type=notify", "WatchdogSec=", "NotifyAccess=main"] {
        assert!(
            service.lines().any(|l| l.starts_with(line)),
            "skyapi.service lacks {line}"
        );
    }
}

// ------------------------------------------------------ Prometheus

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = repo().join("contrib/prometheus");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts_test.yml"][..],
    ] {
        let out = promtool::promtool(args, "", Some(&dir));
        assert!(
            out.status.success(),
            "promtool {args:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn alert_rules_use_only_metrics_skyapi_exports_and_limits_are_counted() {
    let _w = watchdog(TEST_LIMIT);
    let etcd = Etcd::start_new();
    let sky = Skyapi::start(&etcd, &["--max-connections", "2", "--timeout", "12"]);
    let addr = sky.connect_addr();
    let (_held, _) = register(&sky.url("/provide?service=foo&port=9999&host=127.0.0.1"));
    // A second connection that sends nothing holds the other slot...
    let idle = tcp_connect(addr);
    // ...so a third is one too many: answered 503 at once, before any
    // request is sent, and counted.
    eventually(
        "a 503 beyond --max-connections 2",
        Duration::from_secs(10),
        || {
            let mut s = tcp_connect(addr);
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut answer = String::new();
            let _ = std::io::Read::read_to_string(&mut s, &mut answer);
            answer.starts_with("HTTP/1.1 503").then_some(())
        },
    );
    drop(idle);
    // Until the idle connection's thread has seen it close, /metrics may
    // still get that 503 (written without reading the request).
    let text = eventually(
        "/metrics once the slot is free",
        Duration::from_secs(10),
        || {
            let mut s = tcp_connect(addr);
            let request =
                format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            std::io::Write::write_all(&mut s, request.as_bytes()).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut answer = String::new();
            let _ = std::io::Read::read_to_string(&mut s, &mut answer);
            answer.starts_with("HTTP/1.1 200").then_some(answer)
        },
    );
    let body = text
        .split_once("\r\n\r\n")
        .map_or(text.as_str(), |(_, b)| b);
    promtool::check_metrics(body);
    for (series, want) in [
        ("skyapi_connections_max", 2.0),
        ("skyapi_timeout_seconds", 12.0),
        ("skyapi_connections_open", 1.0),
    ] {
        assert_eq!(
            faults::metric_sum(body, series, &[]),
            want,
            "{series}\n{body}"
        );
    }
    assert!(
        faults::metric_sum(
            body,
            "skyapi_limit_hits_total",
            &[("limit", "max-connections")]
        ) >= 1.0,
        "{body}"
    );

    let rules = std::fs::read_to_string(repo().join("contrib/prometheus/alerts.yml")).unwrap();
    let used: std::collections::BTreeSet<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .flat_map(|e| e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
        .filter(|w| w.starts_with("skyapi_"))
        .collect();
    assert!(used.len() >= 6, "{used:?}");
    let exported = |name: &str| {
        body.lines()
            .any(|l| l.starts_with(&format!("# TYPE {name} ")))
    };
    for name in used {
        assert!(
            exported(name),
            "alerts.yml uses {name}, which /metrics does not export"
        );
    }
}
