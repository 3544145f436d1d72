//! Held connections: skyapi's RSS, threads and fds at 0 and at each step up
//! to N idle registered providers; at chosen steps a quiet window measures
//! skyapi's CPU and the etcd request rate from etcd's own counters; at the
//! end all providers close at once and the keys are counted down to zero.
//!
//! During a window the load generator sends etcd nothing (its counts are
//! taken before the window starts), so every request etcd counts is
//! skyapi's.

use std::time::{Duration, Instant};

use etcd_client::Client;
use serde_json::json;

use crate::client::Target;
use crate::etcd;
use crate::fleet::Fleet;
use crate::procfs::{self, Sample};
use crate::stats::{self, round3};

pub struct Opts {
    pub steps: Vec<usize>,
    pub windows_at: Vec<usize>,
    pub window: Duration,
    pub settle: Duration,
    pub service: String,
    pub key_dir: String,
    pub concurrency: usize,
    pub pid: u32,
    pub etcd_pid: Option<u32>,
}

/// Bound on reaching one step (connect + welcome of every new provider).
const RAMP_LIMIT: Duration = Duration::from_secs(120);
/// Bound on all keys being removed after the fleet closes.
const DRAIN_LIMIT: Duration = Duration::from_secs(20);

pub async fn run(
    target: &Target,
    etcd_endpoint: &str,
    opts: &Opts,
) -> Result<serde_json::Value, String> {
    let client = etcd::connect(etcd_endpoint).await?;
    let prefix = etcd::service_prefix(&opts.key_dir, &opts.service);
    let before_keys = etcd::count(&client, &prefix).await?;
    if before_keys != 0 {
        return Err(format!("{before_keys} keys under {prefix} before the run"));
    }
    tokio::time::sleep(opts.settle).await;
    let zero = procfs::sample(opts.pid)?;
    let mut steps = vec![json!({
        "connections": 0,
        "keys": 0,
        "skyapi": zero.json(),
    })];
    let mut windows = Vec::new();
    let mut fleet = Fleet::new(target, &opts.service, opts.concurrency);
    let mut failed_opens = 0usize;
    let mut errors: Vec<String> = Vec::new();
    let mut last: Sample = zero.clone();

    for &step in &opts.steps {
        let new = step.saturating_sub(fleet.len());
        let t = Instant::now();
        fleet.spawn(new, false);
        let deadline = tokio::time::Instant::now() + RAMP_LIMIT;
        for _ in 0..new {
            match tokio::time::timeout_at(deadline, fleet.ready.recv()).await {
                Ok(Some(r)) => {
                    if let Err(e) = r.result {
                        failed_opens += 1;
                        stats::keep_error(&mut errors, e);
                    }
                }
                _ => {
                    return Err(format!(
                        "step {step}: not all providers registered within {RAMP_LIMIT:?}"
                    ))
                }
            }
        }
        let ramp = t.elapsed();
        tokio::time::sleep(opts.settle).await;
        let keys = etcd::count(&client, &prefix).await?;
        last = procfs::sample(opts.pid)?;
        eprintln!(
            "idle: {step} connections ({failed_opens} failed so far), {keys} keys, RSS {} KiB, {} threads, {} fds",
            last.rss_kib, last.threads, last.fds
        );
        steps.push(json!({
            "connections": step,
            "keys": keys,
            "ramp_s": round3(ramp.as_secs_f64()),
            "skyapi": last.json(),
        }));
        if opts.windows_at.contains(&step) {
            windows.push(window(etcd_endpoint, opts, step).await?);
        }
    }

    let held = fleet.len();
    let per_conn = if held > 0 {
        (last.rss_kib as f64 - zero.rss_kib as f64) / held as f64
    } else {
        0.0
    };

    // Everyone closes at once; time until etcd holds none of the keys.
    let t = Instant::now();
    fleet.stop();
    let (drained, left) = drain(&client, &prefix, t).await?;
    let (closed_ok, close_failed, close_errors) = fleet
        .join(tokio::time::Instant::now() + Duration::from_secs(10))
        .await;
    tokio::time::sleep(opts.settle.max(Duration::from_secs(2))).await;
    let after = procfs::sample(opts.pid)?;
    eprintln!(
        "idle: all closed; keys gone in {:?}; {left} left; RSS {} KiB, {} threads, {} fds",
        drained, after.rss_kib, after.threads, after.fds
    );
    errors.extend(close_errors);
    Ok(json!({
        "steps": steps,
        "windows": windows,
        "held": held,
        "failed_opens": failed_opens,
        "rss_per_connection_kib": round3(per_conn),
        "all_closed_keys_gone_s": drained.map(|d| round3(d.as_secs_f64())),
        "keys_left_after_close": left,
        "closed_ok": closed_ok,
        "close_failed": close_failed,
        "after_close": after.json(),
        "errors": errors,
    }))
}

/// Polls the key count every 50 ms until it is zero: the time since
/// `from`, or `None` and the keys left if `DRAIN_LIMIT` passed first.
pub async fn drain(
    client: &Client,
    prefix: &str,
    from: Instant,
) -> Result<(Option<Duration>, i64), String> {
    let deadline = from + DRAIN_LIMIT;
    loop {
        let n = etcd::count(client, prefix).await?;
        if n == 0 {
            return Ok((Some(from.elapsed()), 0));
        }
        if Instant::now() >= deadline {
            return Ok((None, n));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A quiet window: skyapi's (and etcd's, and our own) CPU, and etcd's
/// request counters, over `opts.window`.
async fn window(
    etcd_endpoint: &str,
    opts: &Opts,
    connections: usize,
) -> Result<serde_json::Value, String> {
    eprintln!(
        "idle: {connections} connections: quiet window of {} s",
        opts.window.as_secs()
    );
    let m0 = etcd::metrics(etcd_endpoint).await?;
    let s0 = procfs::sample(opts.pid)?;
    let e0 = opts.etcd_pid.map(procfs::sample).transpose()?;
    let l0 = procfs::sample(0)?;
    tokio::time::sleep(opts.window).await;
    let m1 = etcd::metrics(etcd_endpoint).await?;
    let s1 = procfs::sample(opts.pid)?;
    let e1 = opts.etcd_pid.map(procfs::sample).transpose()?;
    let l1 = procfs::sample(0)?;
    let secs = s1.at.duration_since(s0.at).as_secs_f64();
    let rates = etcd::rates(&m0, &m1, secs);
    let counts = etcd::rates(&m0, &m1, 1.0);
    eprintln!(
        "idle: {connections} connections: skyapi {:.2} % CPU, etcd requests {}/s (handled), {}/s (messages)",
        procfs::cpu_percent(&s0, &s1),
        rates["handled/*"],
        rates["received/*"]
    );
    Ok(json!({
        "connections": connections,
        "seconds": round3(secs),
        "skyapi_cpu_percent": round3(procfs::cpu_percent(&s0, &s1)),
        "etcd_cpu_percent": match (&e0, &e1) {
            (Some(a), Some(b)) => json!(round3(procfs::cpu_percent(a, b))),
            _ => json!(null),
        },
        "loadgen_cpu_percent": round3(procfs::cpu_percent(&l0, &l1)),
        "etcd_rates_per_s": rates,
        "etcd_counts": counts,
        "skyapi": s1.json(),
    }))
}
