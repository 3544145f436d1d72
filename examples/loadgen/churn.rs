//! Churn: connect + welcome + close cycles started at a fixed rate for a
//! fixed time, then a count of what skyapi kept: threads, fds, RSS, and
//! etcd keys.
//!
//! Cycle i starts at t0 + i/rate (never earlier; later only if
//! `max_in_flight` cycles are still running, which is reported as lateness).
//! Each cycle is bounded, so the scenario ends by itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{mpsc, Semaphore};

use crate::client::{self, Target};
use crate::etcd;
use crate::procfs;
use crate::stats::{self, round3, Samples};

pub struct Opts {
    pub rate: u32,
    pub duration: Duration,
    pub service: String,
    pub key_dir: String,
    /// Distinct provider ports cycled through (so distinct keys).
    pub ports: u32,
    pub max_in_flight: usize,
    pub pid: u32,
}

/// Bound on each step of a cycle.
const STEP: Duration = Duration::from_secs(5);
/// How long skyapi gets to let its threads go after the last cycle.
const SETTLE_LIMIT: Duration = Duration::from_secs(15);
/// skyapi is sampled this often during the run.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

pub async fn run(
    target: &Target,
    etcd_endpoint: &str,
    opts: &Opts,
) -> Result<serde_json::Value, String> {
    let client = etcd::connect(etcd_endpoint).await?;
    let prefix = etcd::service_prefix(&opts.key_dir, &opts.service);
    let before = procfs::sample(opts.pid)?;
    let keys_before = etcd::count(&client, &prefix).await?;
    let root_keys_before = etcd::count(&client, &opts.key_dir).await?;
    let total = (opts.rate as f64 * opts.duration.as_secs_f64()) as usize;
    eprintln!(
        "churn: {total} cycles at {}/s; skyapi before: {} threads, {} fds, RSS {} KiB",
        opts.rate, before.threads, before.fds, before.rss_kib
    );

    let gate = Arc::new(Semaphore::new(opts.max_in_flight));
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<Duration, String>>();
    let period = Duration::from_secs_f64(1.0 / opts.rate as f64);
    let t0 = tokio::time::Instant::now();
    let mut late = Samples::default();
    let mut peak = before.clone();
    let mut next_sample = Instant::now() + SAMPLE_EVERY;
    let mut timeline = Vec::new();
    for i in 0..total {
        let due = t0 + period * i as u32;
        tokio::time::sleep_until(due).await;
        let permit = gate
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        late.push(tokio::time::Instant::now().saturating_duration_since(due));
        let target = target.clone();
        let service = opts.service.clone();
        let port = (i as u32 % opts.ports) + 1;
        let tx = tx.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let outcome = async {
                let mut conn = client::open(&target, &service, port, STEP).await?;
                conn.welcome(STEP).await?;
                conn.close(STEP).await?;
                Ok::<_, String>(t.elapsed())
            }
            .await;
            drop(permit);
            // The receiver outlives every cycle (it is drained below).
            let _ = tx.send(outcome);
        });
        if Instant::now() >= next_sample {
            next_sample += SAMPLE_EVERY;
            if let Ok(s) = procfs::sample(opts.pid) {
                timeline.push(json!({
                    "t_s": round3(t0.elapsed().as_secs_f64()),
                    "cycles_started": i + 1,
                    "skyapi": s.json(),
                }));
                peak.rss_kib = peak.rss_kib.max(s.rss_kib);
                peak.threads = peak.threads.max(s.threads);
                peak.fds = peak.fds.max(s.fds);
            }
        }
    }
    let started_for = t0.elapsed();
    drop(tx);
    let mut cycle = Samples::default();
    let mut failed = 0usize;
    let mut errors = Vec::new();
    let drain_deadline = tokio::time::Instant::now() + STEP * 4;
    while let Ok(Some(r)) = tokio::time::timeout_at(drain_deadline, rx.recv()).await {
        match r {
            Ok(d) => cycle.push(d),
            Err(e) => {
                failed += 1;
                stats::keep_error(&mut errors, e);
            }
        }
    }
    let ended = t0.elapsed();
    let cpu_during = procfs::sample(opts.pid)?;

    // Let skyapi's connection threads finish (they end right after the
    // close); bounded.
    let settle_deadline = Instant::now() + SETTLE_LIMIT;
    let mut after = procfs::sample(opts.pid)?;
    while after.threads > before.threads && Instant::now() < settle_deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = procfs::sample(opts.pid)?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    after = procfs::sample(opts.pid)?;
    let keys_after = etcd::count(&client, &prefix).await?;
    let root_keys_after = etcd::count(&client, &opts.key_dir).await?;
    eprintln!(
        "churn: {} cycles ok, {failed} failed in {:.1} s; after: {} threads, {} fds, RSS {} KiB, {keys_after} keys left",
        cycle.len(),
        ended.as_secs_f64(),
        after.threads,
        after.fds,
        after.rss_kib
    );
    Ok(json!({
        "rate": opts.rate,
        "duration_s": opts.duration.as_secs_f64(),
        "cycles": total,
        "ok": cycle.len(),
        "failed": failed,
        "errors": errors,
        "achieved_rate": round3(cycle.len() as f64 / started_for.as_secs_f64()),
        "start_lateness": late.summary(),
        "cycle": cycle.summary(),
        "skyapi_cpu_percent": round3(procfs::cpu_percent(&before, &cpu_during)),
        "before": before.json(),
        "peak": peak.json(),
        "after": after.json(),
        "timeline": timeline,
        "keys_before": keys_before,
        "keys_after": keys_after,
        "root_keys_before": root_keys_before,
        "root_keys_after": root_keys_after,
    }))
}
