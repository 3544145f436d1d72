//! Socket activation: the listening sockets systemd (or
//! `systemd-socket-activate`) passes under its `LISTEN_FDS` protocol.
//!
//! The protocol: `LISTEN_PID` is this process's id, `LISTEN_FDS` the number
//! of descriptors passed, starting at 3, and `LISTEN_FDNAMES` optionally
//! names them (`FileDescriptorName=` in the `.socket` unit), `:`-separated.
//!
//! Invariants:
//! - the variables are removed from the environment whatever they say, so
//!   nothing skyapi might start inherits sockets meant for skyapi;
//! - every passed descriptor is marked close-on-exec and checked to be a
//!   listening TCP socket (IPv4 or IPv6) before it is used: anything else
//!   (a UNIX or UDP socket, a closed descriptor) stops start-up with a
//!   message naming the descriptor;
//! - the sockets stay open in the manager: skyapi never calls shutdown(2)
//!   on them (that would stop the manager's socket from listening too), it
//!   only closes its own descriptors.

use std::net::TcpListener;
use std::os::fd::{FromRawFd, RawFd};

/// The first descriptor the protocol passes.
const FIRST_FD: RawFd = 3;
/// More than any sane `.socket` unit passes; a larger count is a mistake.
const MAX_FDS: usize = 64;

/// A listening socket passed by the manager.
pub struct Passed {
    pub listener: TcpListener,
    pub fd: RawFd,
    /// Its `FileDescriptorName=` (systemd passes the unit name by default).
    pub name: Option<String>,
}

/// Takes the sockets passed to this process, if any (an empty list: start
/// normally and bind `--listen-addr`). Call before any thread starts: it
/// changes the environment.
pub fn take() -> Result<Vec<Passed>, String> {
    let var = |name| std::env::var(name).ok();
    let (pid, fds, names) = (var("LISTEN_PID"), var("LISTEN_FDS"), var("LISTEN_FDNAMES"));
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(name);
    }
    let passed = parse(
        pid.as_deref(),
        fds.as_deref(),
        names.as_deref(),
        std::process::id(),
    )?;
    let mut out = Vec::with_capacity(passed.len());
    for (fd, name) in passed {
        check(fd).map_err(|e| {
            format!(
                "socket activation: fd {fd}{}: {e}",
                name.as_deref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            )
        })?;
        // SAFETY: `check` proved `fd` is an open listening TCP socket, and
        // the protocol hands it to this process to own.
        let listener = unsafe { TcpListener::from_raw_fd(fd) };
        out.push(Passed { listener, fd, name });
    }
    Ok(out)
}

/// The descriptors (and names) the variables pass to `own_pid`.
fn parse(
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
    own_pid: u32,
) -> Result<Vec<(RawFd, Option<String>)>, String> {
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Vec::new());
    };
    // Meant for another process (we were started by the activated one and
    // it forgot to unset them): not ours to take.
    if pid.trim().parse::<u32>().ok() != Some(own_pid) {
        return Ok(Vec::new());
    }
    let n: usize = fds
        .trim()
        .parse()
        .map_err(|_| format!("socket activation: LISTEN_FDS={fds:?} is not a number"))?;
    if n > MAX_FDS {
        return Err(format!(
            "socket activation: LISTEN_FDS={n}: more than {MAX_FDS} sockets"
        ));
    }
    // Names only count when there is one per descriptor.
    let names: Vec<Option<String>> = match names.map(|n| n.split(':').collect::<Vec<_>>()) {
        Some(list) if list.len() == n => list
            .into_iter()
            .map(|s| (!s.is_empty()).then(|| s.to_string()))
            .collect(),
        _ => vec![None; n],
    };
    Ok((FIRST_FD..).zip(names).take(n).collect())
}

/// Marks `fd` close-on-exec and checks it is a listening TCP socket.
fn check(fd: RawFd) -> Result<(), String> {
    // SAFETY: fcntl and getsockopt on a descriptor number only read or set
    // its flags; a closed number fails with EBADF, which is reported.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) < 0 {
            return Err(format!("{}", std::io::Error::last_os_error()));
        }
        let opt = |name: libc::c_int| -> Result<libc::c_int, String> {
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            if libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            ) != 0
            {
                return Err(format!(
                    "not a socket ({})",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(v)
        };
        let domain = opt(libc::SO_DOMAIN)?;
        if domain != libc::AF_INET && domain != libc::AF_INET6 {
            return Err("not an IPv4 or IPv6 socket: skyapi serves TCP only (ListenStream=PORT or ADDR:PORT)".into());
        }
        if opt(libc::SO_TYPE)? != libc::SOCK_STREAM {
            return Err("not a stream (TCP) socket: use ListenStream=".into());
        }
        if opt(libc::SO_ACCEPTCONN)? == 0 {
            return Err(
                "not listening (Accept=yes is not supported: skyapi accepts itself)".into(),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn parses_the_variables() {
        assert_eq!(parse(None, None, None, 7), Ok(vec![]));
        assert_eq!(parse(Some("7"), None, None, 7), Ok(vec![]));
        assert_eq!(
            parse(Some("8"), Some("1"), None, 7),
            Ok(vec![]),
            "another pid's"
        );
        assert_eq!(parse(Some("7"), Some("1"), None, 7), Ok(vec![(3, None)]));
        assert_eq!(
            parse(Some("7"), Some("2"), Some("a:b"), 7),
            Ok(vec![(3, Some("a".into())), (4, Some("b".into()))])
        );
        assert_eq!(
            parse(Some("7"), Some("2"), Some("a"), 7),
            Ok(vec![(3, None), (4, None)]),
            "names that do not match the count are ignored"
        );
        assert_eq!(parse(Some("7"), Some("0"), None, 7), Ok(vec![]));
        assert!(parse(Some("7"), Some("two"), None, 7).is_err());
        assert!(parse(Some("7"), Some("1000"), None, 7).is_err());
    }

    #[test]
    fn the_variables_are_removed_even_when_meant_for_another_process() {
        // The only test in this crate that touches these variables.
        std::env::set_var("LISTEN_PID", "1");
        std::env::set_var("LISTEN_FDS", "1");
        std::env::set_var("LISTEN_FDNAMES", "skyapi");
        assert!(take().unwrap().is_empty());
        for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            assert!(std::env::var_os(name).is_none(), "{name} left behind");
        }
    }

    #[test]
    fn only_listening_tcp_sockets_pass() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(check(l.as_raw_fd()), Ok(()));
        // SAFETY: reads the flags of a descriptor we own.
        let flags = unsafe { libc::fcntl(l.as_raw_fd(), libc::F_GETFD) };
        assert!(flags & libc::FD_CLOEXEC != 0);

        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(check(s.as_raw_fd()).unwrap_err().contains("not listening"));
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(check(u.as_raw_fd()).unwrap_err().contains("stream"));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(check(a.as_raw_fd()).unwrap_err().contains("TCP only"));
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(check(f.as_raw_fd()).unwrap_err().contains("not a socket"));
        assert!(check(100_000).is_err(), "a closed descriptor");
    }
}
