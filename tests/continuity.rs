//! Continuity (issue 9, README "Restarts and upgrades"): a restart,
//! upgrade or loss of a skyapi instance never takes a live provider out of
//! DNS.
//!
//! | what | test |
//! |---|---|
//! | (a) 50 sidecars, skyapi restarted on the same port: no key ever missing, every key ends on the new lease, the takeover is a few transactions | `restart_with_sidecars_loses_no_entry_for_a_moment` |
//! | (b) a client that does not come back: gone within `--timeout` + 1 s | `a_client_that_does_not_come_back_expires_with_the_old_lease` |
//! | (c) `--revoke-on-exit`: every key gone within 1 s, 1001 | `tests/faults.rs`: `sigterm_with_revoke_on_exit_removes_entries_in_one_second_and_sigkill_within_timeout` |
//! | (d) two instances, SIGKILL or SIGTERM of one: zero gap for providers listing both | `failover_on_sigkill_loses_no_entry`, `failover_on_sigterm_loses_no_entry` |
//!
//! "Never missing" is proved with an `etcdctl watch` opened before the
//! restart: it reports every delete under the root, including a key absent
//! for a millisecond, which a poll could miss.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::etcd::Watch;
use support::faults::{entries, metric_sum};
use support::*;

const ROOT: &str = "/skydns/";
const TEST_LIMIT: Duration = Duration::from_secs(120);
/// Slack on top of a lease TTL: etcd checks expiry every 500 ms, plus polling.
const EXPIRY_MARGIN: Duration = Duration::from_secs(1);

/// The key of `service` on `port` at host 127.0.0.1, default category.
fn key(service: &str, port: u16) -> String {
    let id = sha1_hex(&format!("{service}services127.0.0.1{port}"));
    format!("/skydns/local/skydns/services/{service}/{id}")
}

/// Key -> lease of every entry under the root.
fn leases(etcd: &Etcd) -> BTreeMap<String, i64> {
    entries(etcd, ROOT)
        .into_iter()
        .map(|(k, (_, lease))| (k, lease))
        .collect()
}

/// `n` sidecars for service `svc` on ports `first..`, listing `servers`.
fn sidecars(servers: &str, svc: &str, first: u16, n: u16) -> (Vec<Skyapi>, Vec<String>) {
    let procs = (0..n)
        .map(|i| {
            Skyapi::provide(
                &[
                    "--server",
                    servers,
                    "--service",
                    svc,
                    "--port",
                    &(first + i).to_string(),
                    "--interval",
                    "2",
                ],
                &[],
            )
        })
        .collect();
    let keys = (0..n).map(|i| key(svc, first + i)).collect();
    (procs, keys)
}

/// Waits until every key in `keys` is on a lease other than `old` (all on
/// one lease), and returns that lease.
fn wait_moved(etcd: &Etcd, keys: &[String], old: i64, within: Duration, what: &str) -> i64 {
    eventually(what, within, || {
        let got = leases(etcd);
        let on: Vec<i64> = keys.iter().filter_map(|k| got.get(k).copied()).collect();
        (on.len() == keys.len() && on.iter().all(|l| *l != old && *l == on[0])).then(|| on[0])
    })
}

/// Asserts the watch saw no delete of any of `keys`.
fn assert_never_missing(watch: &Watch, keys: &[String], what: &str) {
    let deleted: Vec<String> = watch
        .deleted()
        .into_iter()
        .filter(|k| keys.contains(k))
        .collect();
    assert!(
        deleted.is_empty(),
        "{what}: {} keys were missing from etcd for a moment: {deleted:#?}",
        deleted.len()
    );
}

fn metrics_of(sky: &Skyapi) -> String {
    let (code, body) = http_get(sky.addr(), "/metrics");
    assert_eq!(code, 200, "/metrics: HTTP {code}");
    body
}

#[test]
fn restart_with_sidecars_loses_no_entry_for_a_moment() {
    let _w = watchdog(TEST_LIMIT);
    const N: u16 = 50;
    let etcd = Etcd::start_new();
    let mut old = Skyapi::start(&etcd, &["--timeout", "10"]);
    let port = old.addr().port();
    let (sides, keys) = sidecars(&format!("ws://127.0.0.1:{port}"), "cont", 20000, N);
    let old_lease = eventually("all sidecars registered", Duration::from_secs(30), || {
        let got = leases(&etcd);
        let on: Vec<i64> = keys.iter().filter_map(|k| got.get(k).copied()).collect();
        (on.len() == keys.len()).then(|| on[0])
    });
    let watch = etcd.watch(ROOT);

    let t0 = Instant::now();
    old.signal(libc::SIGTERM);
    let status = old
        .wait_exit(Duration::from_secs(1))
        .expect("skyapi still running 1 s after SIGTERM");
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert!(
        old.lines_with("revoked").is_empty(),
        "a restart must not revoke: {:?}",
        old.lines_with("revoked")
    );
    let right_after = leases(&etcd);
    assert!(
        keys.iter().all(|k| right_after.contains_key(k)),
        "entries outlive the stopped instance"
    );

    let new = Skyapi::server_on(&etcd.endpoint(), port, &["--timeout", "10"], false);
    // The old lease was kept alive every T/3 until the stop: it lives at
    // least 2T/3 = 6.6 s more, which is the bound for the takeover.
    let new_lease = wait_moved(
        &etcd,
        &keys,
        old_lease,
        Duration::from_secs(6).saturating_sub(t0.elapsed()),
        "every key taken over by the restarted instance before the old lease expires",
    );
    let took = t0.elapsed();
    // The watch reports a little after a read sees the keys.
    let seen = poll_until(Duration::from_secs(5), || {
        keys.iter().all(|k| watch.puts_of(k) >= 1)
    });
    assert!(
        seen,
        "the watch did not report every takeover put: {} events, missing {:#?}",
        watch.events().len(),
        keys.iter()
            .filter(|k| watch.puts_of(k) == 0)
            .collect::<Vec<_>>()
    );
    assert_never_missing(&watch, &keys, "restart");
    assert_eq!(
        etcd.lease_ttl(new_lease).map(|(_, granted)| granted),
        Some(10)
    );
    for (i, side) in sides.iter().enumerate() {
        assert!(
            !side.lines_with("(1012: ").is_empty(),
            "sidecar {i} was not told 1012: {:?}",
            side.logs()
        );
    }
    // The takeover: fewer transactions than clients (the worker gathers the
    // returning registrations just after start).
    let m = metrics_of(&new);
    let puts = metric_sum(
        &m,
        "skyapi_etcd_requests_total",
        &[("op", "put"), ("outcome", "ok")],
    );
    let grants = metric_sum(&m, "skyapi_etcd_requests_total", &[("op", "grant")]);
    eprintln!(
        "restart of {N} sidecars: all on the new lease {took:?} after SIGTERM, \
         {puts} put transactions, {grants} grants"
    );
    assert!(
        puts >= 1.0 && puts <= f64::from(N) / 4.0,
        "{puts} put transactions for {N} returning clients: want a few, not one per client"
    );
    // The old lease takes nothing with it when it expires: every key moved.
    assert!(
        poll_until(Duration::from_secs(12), || etcd
            .lease_ttl(old_lease)
            .is_none()),
        "the old lease never expired"
    );
    let after = leases(&etcd);
    assert!(keys.iter().all(|k| after.get(k) == Some(&new_lease)));
    assert_never_missing(&watch, &keys, "after the old lease expired");
    drop(sides);
}

#[test]
fn a_client_that_does_not_come_back_expires_with_the_old_lease() {
    let _w = watchdog(TEST_LIMIT);
    const T: u64 = 3;
    let etcd = Etcd::start_new();
    let mut sky = Skyapi::start(&etcd, &["--timeout", &T.to_string()]);
    let k = key("gone", 4001);
    let (mut ws, welcome) = register(&sky.url("/provide?service=gone&port=4001"));
    assert_eq!(welcome["key"], k.as_str());

    let t0 = Instant::now();
    sky.signal(libc::SIGTERM);
    let closed = read_until_close(&mut ws, Duration::from_secs(2));
    assert_eq!(closed.code(), Some(1012), "close on a restart: {closed:?}");
    sky.wait_exit(Duration::from_secs(1))
        .expect("skyapi still running 1 s after SIGTERM");
    assert!(
        leases(&etcd).contains_key(&k),
        "the stop itself deletes nothing"
    );
    within_bound(t0, Duration::from_secs(T) + EXPIRY_MARGIN, || {
        !leases(&etcd).contains_key(&k)
    });
}

/// Providers listing instances A and B, all on A; one raw client on A that
/// does not fail over. A is stopped by `signal`: the providers move to B
/// without their keys ever missing, and the raw client's key is gone within
/// `--timeout` of the signal.
fn failover(signal: libc::c_int, what: &str) {
    let _w = watchdog(TEST_LIMIT);
    const T: u64 = 6;
    let etcd = Etcd::start_new();
    let mut a = Skyapi::start(&etcd, &["--timeout", &T.to_string()]);
    let b = Skyapi::start(&etcd, &["--timeout", &T.to_string()]);
    let servers = format!(
        "ws://127.0.0.1:{},ws://127.0.0.1:{}",
        a.addr().port(),
        b.addr().port()
    );
    let (sides, keys) = sidecars(&servers, "fo", 21000, 10);
    let lonely = key("lonely", 4002);
    let (_ws, _) = register(&a.url("/provide?service=lonely&port=4002"));
    let lease_a = eventually("all on A", Duration::from_secs(30), || {
        let got = leases(&etcd);
        let on: Vec<i64> = keys.iter().filter_map(|k| got.get(k).copied()).collect();
        (on.len() == keys.len() && on.iter().all(|l| *l == on[0])).then(|| on[0])
    });
    assert_eq!(leases(&etcd).get(&lonely), Some(&lease_a));
    let watch = etcd.watch(ROOT);

    let t0 = Instant::now();
    a.signal(signal);
    a.wait_exit(Duration::from_secs(2))
        .unwrap_or_else(|| panic!("{what}: A still running"));
    let lease_b = wait_moved(
        &etcd,
        &keys,
        lease_a,
        Duration::from_secs(T * 2 / 3).saturating_sub(t0.elapsed()),
        &format!("{what}: every provider taken over by B before A's lease expires"),
    );
    assert_ne!(lease_b, lease_a);
    assert_never_missing(&watch, &keys, what);
    within_bound(t0, Duration::from_secs(T) + EXPIRY_MARGIN, || {
        !leases(&etcd).contains_key(&lonely)
    });
    assert_never_missing(&watch, &keys, &format!("{what}, after A's lease expired"));
    let after = leases(&etcd);
    assert!(keys.iter().all(|k| after.get(k) == Some(&lease_b)));
    drop(sides);
}

#[test]
fn failover_on_sigkill_loses_no_entry() {
    failover(libc::SIGKILL, "SIGKILL of A");
}

#[test]
fn failover_on_sigterm_loses_no_entry() {
    failover(libc::SIGTERM, "SIGTERM of A");
}

/// Polls `cond` until it holds, failing if that takes longer than `bound`
/// from `t0`.
fn within_bound(t0: Instant, bound: Duration, mut cond: impl FnMut() -> bool) {
    let ok = poll_until(bound.saturating_sub(t0.elapsed()), &mut cond);
    assert!(
        ok,
        "not within {bound:?} (now {:?} after the signal)",
        t0.elapsed()
    );
}
