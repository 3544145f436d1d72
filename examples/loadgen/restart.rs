//! Restart (issue 9): N providers that reconnect as the sidecar does are
//! registered; skyapi is stopped with `--signal` (SIGTERM: a restart-safe
//! stop; SIGKILL: a crash) and started again on the same port with
//! `--restart` (the command line, which this scenario runs itself, as a
//! supervisor would, once the old process is gone).
//!
//! A prefix watch opened before the signal sees every put and delete, with
//! the lease of each put, so the scenario measures exactly:
//! - the minimum number of keys present at any moment (goal: all N);
//! - when every key is on a lease other than the old one (taken over);
//! - how many providers were welcomed again, and how fast.
//!
//! The restarted skyapi is left running; its pid is in the output
//! (`restarted_pid`) for the driver to scrape and stop.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::client::Target;
use crate::etcd::{self, Watch};
use crate::fleet::Fleet;
use crate::stats::{round3, Samples};

pub struct Opts {
    pub count: usize,
    pub service: String,
    pub key_dir: String,
    /// The running skyapi.
    pub pid: u32,
    /// `libc::SIGTERM` or `libc::SIGKILL`.
    pub signal: i32,
    /// How to start skyapi again (program and arguments).
    pub restart: Vec<String>,
}

/// Bound on registering the fleet, and on the takeover.
const LIMIT: Duration = Duration::from_secs(60);
/// How long the old process may take to exit.
const EXIT_LIMIT: Duration = Duration::from_secs(10);

pub async fn run(
    target: &Target,
    etcd_endpoint: &str,
    opts: &Opts,
) -> Result<serde_json::Value, String> {
    let (client, prefix) =
        etcd::empty_service(etcd_endpoint, &opts.key_dir, &opts.service, "restart").await?;
    let n = opts.count;
    let mut fleet = Fleet::new(target, &opts.service, 256).reconnecting();
    fleet.spawn(n, false);
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut welcomed = 0usize;
    while welcomed < n {
        match tokio::time::timeout_at(deadline, fleet.ready.recv()).await {
            Ok(Some(r)) => {
                r.result.map_err(|e| format!("a provider failed: {e}"))?;
                welcomed += 1;
            }
            Ok(None) => return Err("the fleet ended".into()),
            Err(_) => return Err(format!("only {welcomed} of {n} registered in {LIMIT:?}")),
        }
    }
    let mut watch = Watch::start(&client, &prefix).await?;
    // The lease every key is on now: read back one key.
    let old_lease = etcd::lease_of_any(&client, &prefix).await?;
    let before = etcd::metrics(etcd_endpoint).await?;
    eprintln!(
        "restart: {n} providers on lease {old_lease:x}; signal {}",
        opts.signal
    );

    let t0 = Instant::now();
    // SAFETY: kill(2) on the pid the driver gave us.
    if unsafe { libc::kill(opts.pid as i32, opts.signal) } != 0 {
        return Err(format!("kill: {}", std::io::Error::last_os_error()));
    }
    let exited = wait_exit(opts.pid, EXIT_LIMIT).await?;
    let (program, args) = opts.restart.split_first().ok_or("--restart is empty")?;
    let child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {program}: {e}"))?;
    let restarted_at = Instant::now();

    // Key -> lease, as the watch tells it; every key starts present.
    let mut lease: HashMap<String, i64> = HashMap::new();
    let mut present = n as i64;
    let mut min_present = present;
    let mut deletes = 0usize;
    let mut moved = 0usize;
    let mut all_moved: Option<Instant> = None;
    let mut welcome_after = Samples::default();
    let mut rewelcomed = 0usize;
    let deadline = tokio::time::Instant::now() + LIMIT;
    while (all_moved.is_none() || rewelcomed < n) && tokio::time::Instant::now() < deadline {
        tokio::select! {
            ev = watch.next_until(deadline), if all_moved.is_none() => {
                let Some(ev) = ev else { break };
                // Absent keys are recorded with lease 0; keys not recorded
                // yet are still on the old lease.
                let was = lease.get(&ev.key).copied().unwrap_or(old_lease);
                let now = if ev.put { ev.lease } else { 0 };
                lease.insert(ev.key, now);
                let is_new = |l: i64| l != 0 && l != old_lease;
                moved = moved + usize::from(is_new(now)) - usize::from(is_new(was));
                if was == 0 && now != 0 {
                    present += 1;
                }
                if was != 0 && now == 0 {
                    deletes += 1;
                    present -= 1;
                    min_present = min_present.min(present);
                }
                if moved == n {
                    all_moved = Some(ev.at);
                }
            },
            r = fleet.ready.recv(), if rewelcomed < n => match r {
                Some(r) => {
                    if let Ok(ok) = r.result {
                        rewelcomed += 1;
                        welcome_after.push(ok.welcomed.duration_since(t0));
                    }
                }
                None => break,
            },
        }
    }
    let after = etcd::metrics(etcd_endpoint).await?;
    let since = |t: Option<Instant>| t.map(|t| round3(t.duration_since(t0).as_secs_f64()));
    eprintln!(
        "restart: min present {min_present} of {n}, {deletes} deletes, all on the new lease {:?} s",
        since(all_moved)
    );
    let txns = after.get("handled/Txn").unwrap_or(&0.0) - before.get("handled/Txn").unwrap_or(&0.0);
    fleet.stop();
    let (closed_ok, close_failed, errors) = fleet.join(tokio::time::Instant::now() + LIMIT).await;
    Ok(json!({
        "count": n,
        "signal": if opts.signal == libc::SIGKILL { "SIGKILL" } else { "SIGTERM" },
        "old_exit_s": round3(exited.duration_since(t0).as_secs_f64()),
        "restarted_s": round3(restarted_at.duration_since(t0).as_secs_f64()),
        "min_keys_present": min_present,
        "deletes_seen": deletes,
        "all_on_new_lease_s": since(all_moved),
        "moved": moved,
        "rewelcomed": rewelcomed,
        "rewelcome_after_signal": welcome_after.summary(),
        "etcd_txns_during_takeover": txns,
        "restarted_pid": child.id(),
        "closed_ok": closed_ok,
        "close_failed": close_failed,
        "errors": errors,
    }))
}

/// Waits until `pid` has exited (gone, or a zombie its parent has not
/// reaped yet, with no thread left: after SIGKILL the main thread is a
/// zombie while the others, and the sockets they share, are still being
/// torn down); the moment it was seen gone.
async fn wait_exit(pid: u32, limit: Duration) -> Result<Instant, String> {
    let deadline = Instant::now() + limit;
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(") ")
                    .and_then(|(_, rest)| rest.chars().next())
            });
        let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.count())
            .unwrap_or(0);
        if state.is_none() || (matches!(state, Some('Z') | Some('X')) && threads <= 1) {
            return Ok(Instant::now());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "skyapi {pid} still running {limit:?} after the signal"
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
