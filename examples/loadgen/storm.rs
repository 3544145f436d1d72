//! Reconnect storm: N providers (tasks parked on one gate) start connecting
//! at the same instant; then, once all are registered, all close at once.
//!
//! "Registered" is measured three ways from the gate opening: the last
//! welcome, the Nth distinct put seen by a prefix watch started before the
//! storm, and the first `count_only` poll (every 100 ms) that finds N keys.
//! Removal likewise: the Nth delete event, and the first poll finding 0.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::client::Target;
use crate::etcd::{self, Watch};
use crate::fleet::Fleet;
use crate::procfs;
use crate::stats::{self, round3, Samples};

pub struct Opts {
    pub count: usize,
    pub service: String,
    pub key_dir: String,
    pub pid: u32,
}

/// Bound on each half of the storm.
const LIMIT: Duration = Duration::from_secs(30);
/// Period of the `count_only` poll.
const POLL: Duration = Duration::from_millis(100);

pub async fn run(
    target: &Target,
    etcd_endpoint: &str,
    opts: &Opts,
) -> Result<serde_json::Value, String> {
    let (client, prefix) =
        etcd::empty_service(etcd_endpoint, &opts.key_dir, &opts.service, "storm").await?;
    let n = opts.count;
    let mut watch = Watch::start(&client, &prefix).await?;
    let mut fleet = Fleet::new(target, &opts.service, 0);
    fleet.spawn(n, true);
    // Let every task reach the gate.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = procfs::sample(opts.pid)?;
    let net0 = procfs::listen_counters();

    eprintln!("storm: {n} providers connect at once");
    let t0 = Instant::now();
    fleet.go();
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut welcomed = 0usize;
    let mut failed = 0usize;
    let mut errors = Vec::new();
    let mut retried = 0usize;
    let mut last_welcome: Option<Instant> = None;
    let mut welcome_lat = Samples::default();
    // Welcomes per 100 ms since the gate: where the time goes.
    let mut per_tick = vec![0usize; (LIMIT.as_millis() / 100) as usize + 1];
    let mut put_keys = HashSet::new();
    let mut all_put_seen: Option<Instant> = None;
    let mut count_full: Option<Instant> = None;
    let mut keys_seen = 0i64;
    let mut poll = tokio::time::interval(POLL);
    let mut peak_threads = 0u64;
    let mut peak_rss = 0u64;
    let mut watch_ended = false;
    while (welcomed + failed < n
        || (all_put_seen.is_none() && !watch_ended)
        || count_full.is_none())
        && tokio::time::Instant::now() < deadline
    {
        tokio::select! {
            r = fleet.ready.recv(), if welcomed + failed < n => match r {
                Some(r) => match r.result {
                    Ok(ok) => {
                        welcomed += 1;
                        retried += usize::from(ok.attempts > 1);
                        let since = ok.welcomed.duration_since(t0);
                        welcome_lat.push(since);
                        let tick = ((since.as_millis() / 100) as usize).min(per_tick.len() - 1);
                        per_tick[tick] += 1;
                        last_welcome = Some(last_welcome.map_or(ok.welcomed, |l| l.max(ok.welcomed)));
                    }
                    Err(e) => {
                        failed += 1;
                        stats::keep_error(&mut errors, e);
                    }
                },
                None => break,
            },
            ev = watch.next_until(deadline), if all_put_seen.is_none() && !watch_ended => {
                match ev {
                    Some(ev) => {
                        if ev.put && put_keys.insert(ev.key) && put_keys.len() == n {
                            all_put_seen = Some(ev.at);
                        }
                    }
                    None => watch_ended = true,
                }
            },
            _ = poll.tick(), if count_full.is_none() => {
                if let Ok(s) = procfs::sample(opts.pid) {
                    peak_threads = peak_threads.max(s.threads);
                    peak_rss = peak_rss.max(s.rss_kib);
                }
                keys_seen = etcd::count(&client, &prefix).await?;
                if keys_seen as usize >= n {
                    count_full = Some(Instant::now());
                }
            },
        }
    }
    let net1 = procfs::listen_counters();
    let since = |t: Option<Instant>| t.map(|t| round3(t.duration_since(t0).as_secs_f64()));
    eprintln!(
        "storm: {welcomed} welcomed, {failed} failed; last welcome {:?} s, all puts seen {:?} s, count {:?} s",
        since(last_welcome),
        since(all_put_seen),
        since(count_full)
    );
    let connect = json!({
        "welcomed": welcomed,
        "failed": failed,
        "retried": retried,
        "last_welcome_s": since(last_welcome),
        "all_puts_seen_s": since(all_put_seen),
        "count_reached_s": since(count_full),
        "keys_counted": keys_seen,
        "welcome_after_gate": welcome_lat.summary(),
        "welcomes_per_100ms": trim_zeros(per_tick),
        "skyapi_before": before.json(),
        "skyapi_peak_threads": peak_threads,
        "skyapi_peak_rss_kib": peak_rss,
        "kernel_listen_counters": procfs::counter_delta(&net0, &net1),
        "errors": errors,
    });

    // Every welcomed provider is held; now all of them close at once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    watch.clear();
    let held = procfs::sample(opts.pid)?;
    let t1 = Instant::now();
    fleet.stop();
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut deleted = HashSet::new();
    let mut all_deleted: Option<Instant> = None;
    let mut count_zero: Option<Instant> = None;
    let mut keys_left = -1i64;
    while ((all_deleted.is_none() && !watch_ended) || count_zero.is_none())
        && tokio::time::Instant::now() < deadline
    {
        tokio::select! {
            ev = watch.next_until(deadline), if all_deleted.is_none() && !watch_ended => {
                match ev {
                    Some(ev) => {
                        if !ev.put && deleted.insert(ev.key) && deleted.len() == welcomed {
                            all_deleted = Some(ev.at);
                        }
                    }
                    None => watch_ended = true,
                }
            },
            _ = poll.tick(), if count_zero.is_none() => {
                keys_left = etcd::count(&client, &prefix).await?;
                if keys_left == 0 {
                    count_zero = Some(Instant::now());
                }
            },
        }
    }
    let (closed_ok, close_failed, close_errors) =
        fleet.join(tokio::time::Instant::now() + LIMIT).await;
    let since1 = |t: Option<Instant>| t.map(|t| round3(t.duration_since(t1).as_secs_f64()));
    eprintln!(
        "storm: all closed; all deletes seen {:?} s, count zero {:?} s",
        since1(all_deleted),
        since1(count_zero)
    );
    let disconnect = json!({
        "deleted": deleted.len(),
        "all_deletes_seen_s": since1(all_deleted),
        "count_zero_s": since1(count_zero),
        "keys_left": keys_left,
        "closed_ok": closed_ok,
        "close_failed": close_failed,
        "skyapi_held": held.json(),
        "errors": close_errors,
    });
    Ok(json!({ "count": n, "connect": connect, "disconnect": disconnect }))
}

/// The timeline up to its last non-zero entry.
fn trim_zeros(mut v: Vec<usize>) -> Vec<usize> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}
