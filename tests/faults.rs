//! The fault suite (issue 3, README "Failure behaviour"): the faults of the
//! issue, numbered as there, against real etcd processes and the real
//! `skyapi` binary.
//!
//! | # | fault | tests |
//! |---|---|---|
//! | 1 | etcd briefly unavailable | `etcd_restart_keeps_clients_and_queues_registrations` (killed and restarted), `frozen_etcd_keeps_clients_and_queues_registrations` (SIGSTOP) |
//! | 2 | lease lost | `revoked_lease_is_regranted_and_entries_put_again` (`etcdctl lease revoke`), `partition_outlasting_the_lease_regrants_and_puts_again` (expired behind a partition) |
//! | 3 | entry removed or changed behind skyapi's back (seen through the watch) | `entry_deleted_or_changed_behind_skyapis_back_is_restored` |
//! | 4 | etcd not reachable at start-up | `etcd_unreachable_at_startup_then_appears` |
//! | 5 | a member of a cluster lost | `cluster_member_loss_loses_no_registration` (each member killed in turn), `cluster_member_frozen_loses_no_registration` (SIGSTOP) |
//! | 6 | several skyapi instances | `client_moved_to_another_instance_keeps_its_entry`, `client_moved_while_its_old_instance_was_partitioned_keeps_its_entry` |
//! | 7 | SIGKILL, SIGTERM | `sigterm_with_revoke_on_exit_removes_entries_in_one_second_and_sigkill_within_timeout` (the default, restart-safe SIGTERM is in `tests/continuity.rs`) |
//! | 8 | a client stops answering | `silent_clients_are_dropped_within_timeout` (SIGSTOPped sidecar, black hole) |
//! | 9 | many clients return at once | `many_clients_at_once_are_batched` |
//! | 10 | skyapi itself stalls beyond `--timeout` (issue 11) | `skyapi_stalled_beyond_timeout_keeps_every_client` |
//! | 11 | etcd refuses writes: NOSPACE alarm (issue 11) | `etcd_refusing_writes_is_a_steady_503_until_a_write_succeeds` |
//! | 12 | stale JWT auth tokens, a permission withdrawn (issue 11) | `stale_jwt_tokens_are_refreshed_not_fatal`, `permission_denied_is_waited_out_not_fatal` |
//! | 13 | the watch (issue 10): broken while etcd compacts, a lease-less overwrite, churn, one value refused among a key's holders | `compaction_while_the_watch_was_broken_is_followed_by_a_full_check`, `an_entry_overwritten_without_a_lease_is_restored_and_deleted_on_close`, `a_deleted_entry_is_restored_under_churn`, `a_refused_value_fails_only_its_registration`; measurements: `fleet_cost_is_independent_of_fleet_size`, `waiting_connections_cpu` (ignored) |
//!
//! Every test asserts the exact etcd contents under `/skydns/` (keys, JSON
//! values, and the lease where it matters) before, during and after its
//! fault, and that the websocket clients that should survive did: no close
//! frame, no end of stream, and a ping sent afterwards is answered
//! ([`Fleet::assert_connected`]). Bounds are checked by polling against a
//! deadline counted from the moment of the fault ([`within`]); the checks
//! that something does *not* happen watch for a bounded window
//! ([`holds_for`]). `--timeout` is 3 to 6 s so the file runs in well under
//! a minute and a half on two cores. The long variants are `#[ignore]`d and
//! run by `make soak`: twenty etcd restarts in a row, a two-minute
//! partition, a storm of 2000 clients.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::faults::*;
use support::*;

/// Where entries live with the default `--etcd-prefix` and `--dns-root`.
const ROOT: &str = "/skydns/";
/// Upper bound for any single test; the watchdog ends the run past it.
const TEST_LIMIT: Duration = Duration::from_secs(90);
/// "Deleted at once" after a close, including etcd's round trip.
const DELETE_WITHIN: Duration = Duration::from_secs(2);
/// "Pending work written within 2 s of etcd answering again" (README).
const BACK_WITHIN: Duration = Duration::from_secs(2);
/// Slack on top of a lease TTL: etcd checks expiry every 500 ms, plus polling.
const EXPIRY_MARGIN: Duration = Duration::from_secs(2);

/// Key → (value, lease) under [`ROOT`].
type Entries = BTreeMap<String, (Value, i64)>;

/// The key of `service` on `port` at host 127.0.0.1, default category: the
/// original skyapi's id, computed here independently of the server.
fn key(service: &str, port: u16) -> String {
    let id = sha1_hex(&format!("{service}services127.0.0.1{port}"));
    format!("/skydns/local/skydns/services/{service}/{id}")
}

fn value(port: u16, weight: u16, ttl: u64) -> Value {
    json!({"host": "127.0.0.1", "port": port, "priority": 1, "weight": weight, "ttl": ttl})
}

/// The `/provide` path and query for `service` on `port` (explicit host, so
/// the same client is the same key on every instance).
fn query(service: &str, port: u16) -> String {
    format!("/provide?service={service}&port={port}&host=127.0.0.1")
}

/// What etcd must hold for `list` (weight 100) with TTL `ttl` on `lease`.
fn on_lease(list: &[(&str, u16)], ttl: u64, lease: i64) -> Entries {
    list.iter()
        .map(|&(s, p)| (key(s, p), (value(p, 100, ttl), lease)))
        .collect()
}

/// Probe for [`within`]: whether etcd holds exactly `list` (weight 100, TTL
/// `ttl`), every entry on one lease, and that lease is not `old` (one that
/// was revoked or expired) if given; `Ok` with the lease.
fn on_one_lease(
    etcd: &Etcd,
    list: &[(&str, u16)],
    ttl: u64,
    old: Option<i64>,
) -> Result<i64, String> {
    let got = entries(etcd, ROOT);
    let lease = got.values().map(|(_, l)| *l).next().unwrap_or(0);
    if lease != 0 && Some(lease) != old && got == on_lease(list, ttl, lease) {
        Ok(lease)
    } else {
        Err(format!("{got:#?}"))
    }
}

/// The one lease every entry in `got` is attached to; panics if there is
/// none, several, or an entry without a lease.
fn common_lease(got: &Entries) -> i64 {
    let leases: std::collections::BTreeSet<i64> = got.values().map(|(_, l)| *l).collect();
    assert!(
        leases.len() == 1 && !leases.contains(&0),
        "entries are not all on one lease: {got:#?}"
    );
    *leases.first().expect("one lease")
}

/// Polls `probe` until it returns `Ok`, failing if it has not by `bound`
/// after `since`. A success counts if the probe *started* within the bound
/// (an etcdctl read takes tens of milliseconds).
fn within<T>(
    what: &str,
    since: Instant,
    bound: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    loop {
        let at = since.elapsed();
        match probe() {
            Ok(v) if at <= bound => {
                // Shown with --nocapture or on failure: how close to the bound.
                eprintln!("{what}: after {at:?} (bound {bound:?})");
                return v;
            }
            Ok(_) => panic!("{what}: only after {at:?} (bound {bound:?})"),
            Err(last) if at > bound => {
                panic!("{what}: not within {bound:?} (waited {at:?}); last seen: {last}")
            }
            Err(_) => std::thread::sleep(POLL_TICK),
        }
    }
}

/// Waits until etcd holds exactly `want` under [`ROOT`].
fn wait_entries(etcd: &Etcd, want: &Entries, since: Instant, bound: Duration, what: &str) {
    within(what, since, bound, || {
        let got = entries(etcd, ROOT);
        if got == *want {
            Ok(())
        } else {
            Err(format!("{got:#?}\nwant {want:#?}"))
        }
    })
}

fn healthz(sky: &Skyapi) -> (u16, String) {
    let (code, response) = http_get(sky.connect_addr(), "/healthz");
    (code, body_of(&response).trim().to_string())
}

/// A counter from skyapi's `/metrics`, summed over samples with `labels`.
fn sky_metric(sky: &Skyapi, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (code, response) = http_get(sky.connect_addr(), "/metrics");
    assert_eq!(code, 200, "skyapi /metrics: {response}");
    metric_sum(&response, name, labels)
}

/// The keys skyapi lists in `/services` (its live registrations).
fn services_keys(sky: &Skyapi) -> Vec<String> {
    let (code, response) = http_get(sky.connect_addr(), "/services");
    assert_eq!(code, 200, "skyapi /services: {response}");
    let list: Value = serde_json::from_str(body_of(&response))
        .unwrap_or_else(|e| panic!("/services is not JSON ({e}): {response}"));
    list.as_array()
        .unwrap_or_else(|| panic!("/services is not an array: {list}"))
        .iter()
        .map(|e| e["key"].as_str().unwrap_or_default().to_string())
        .collect()
}

// ------------------------------------------------ 1. etcd briefly unavailable

/// etcd dies (SIGKILL) and comes back on the same ports and data, `cycles`
/// times: clients stay connected, a registration arriving meanwhile is
/// queued (no ERROR, its welcome comes once etcd is back) and written within
/// 2 s of etcd answering, on the same lease, and the rebuilt keepalive keeps
/// renewing it.
fn etcd_restarts(cycles: usize) {
    const T: u64 = 6;
    let mut etcd = Etcd::start_new();
    let sky = Skyapi::start(&etcd, &["--timeout", "6"]);
    let fleet = Fleet::new();
    let mut services: Vec<(String, u16)> = vec![("foo".into(), 9999), ("bar".into(), 8888)];
    let mut ids: Vec<ClientId> = services
        .iter()
        .map(|(s, p)| fleet.register(s, &sky.url(&query(s, *p))))
        .collect();
    let want = |services: &[(String, u16)], lease: i64| {
        let list: Vec<(&str, u16)> = services.iter().map(|(s, p)| (s.as_str(), *p)).collect();
        on_lease(&list, T, lease)
    };
    let before = entries(&etcd, ROOT);
    let lease = common_lease(&before);
    assert_eq!(before, want(&services, lease), "before the outage");
    assert_eq!(healthz(&sky).0, 200, "healthz before the outage");

    for cycle in 0..cycles {
        etcd.kill();
        let down = Instant::now();
        // The worker notices at its next keepalive (every T/3) at the latest.
        let why = within(
            "/healthz turns 503 after etcd died",
            down,
            Duration::from_secs(T / 3 + 2),
            || match healthz(&sky) {
                (503, why) => Ok(why),
                other => Err(format!("{other:?}")),
            },
        );
        assert!(why.contains("etcd unavailable"), "healthz reason: {why:?}");

        // Queued, not refused: nothing but pings reaches any client meanwhile.
        let service = format!("queued{cycle}");
        let port = 7000 + cycle as u16;
        let queued = fleet.connect(&service, &sky.url(&query(&service, port)));
        let mut quiet: Vec<(ClientId, usize)> = ids.iter().map(|&i| (i, 1)).collect();
        quiet.push((queued, 0));
        if let Err(at) = holds_for(Duration::from_millis(1500), || fleet.quiet(&quiet)) {
            panic!(
                "cycle {cycle}: while etcd was down a client got a message or was dropped after {at:?}:\n  {}",
                fleet.describe()
            );
        }
        ids.push(queued);
        services.push((service.clone(), port));
        fleet.assert_connected(&ids, &format!("cycle {cycle}: etcd down"));
        assert_eq!(
            services_keys(&sky).len(),
            ids.len(),
            "the queued registration is live"
        );

        etcd.start();
        // etcd answered a moment before `start` returned (it polls
        // `endpoint health`): counting from here is lenient by that poll's
        // latency, tens of milliseconds, and no more.
        let up = Instant::now();
        let all = want(&services, lease);
        wait_entries(
            &etcd,
            &all,
            up,
            BACK_WITHIN,
            "the queued registration written, on the same lease, within 2 s of etcd answering",
        );
        let welcome = within("the queued client's welcome", up, BACK_WITHIN, || {
            fleet.welcome(queued).ok_or_else(|| fleet.describe())
        });
        assert_eq!(
            welcome["key"],
            key(&service, port).as_str(),
            "welcome {welcome}"
        );
        within("/healthz back to 200", up, BACK_WITHIN, || {
            match healthz(&sky) {
                (200, _) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });

        // The keepalive was rebuilt: the lease's remaining TTL goes back up
        // (only a keepalive raises it on a stable member), entries unchanged.
        let mut lowest: Option<i64> = None;
        within(
            "a keepalive renews the lease after the restart",
            Instant::now(),
            Duration::from_secs(T),
            || {
                let got = entries(&etcd, ROOT);
                assert_eq!(got, all, "entries changed after etcd came back");
                let (remaining, granted) = etcd
                    .lease_ttl(lease)
                    .unwrap_or_else(|| panic!("lease {lease:x} is gone after the restart"));
                assert_eq!(granted, T as i64, "granted TTL");
                match lowest {
                    Some(low) if remaining > low => Ok(()),
                    _ => {
                        lowest = Some(lowest.map_or(remaining, |l| l.min(remaining)));
                        Err(format!("remaining TTL {remaining}, lowest seen {lowest:?}"))
                    }
                }
            },
        );
        fleet.assert_connected(&ids, &format!("cycle {cycle}: after etcd came back"));
        let welcomed: Vec<(ClientId, usize)> = ids.iter().map(|&i| (i, 1)).collect();
        assert!(
            fleet.quiet(&welcomed),
            "unexpected messages:\n  {}",
            fleet.describe()
        );
    }

    // Deletes work again too.
    let mut ws = fleet.take(ids[0]);
    let t0 = Instant::now();
    close(&mut ws, DELETE_WITHIN);
    wait_entries(
        &etcd,
        &want(&services[1..], lease),
        t0,
        DELETE_WITHIN,
        "closed entry deleted after the outage",
    );
}

#[test]
fn etcd_restart_keeps_clients_and_queues_registrations() {
    let _w = watchdog(TEST_LIMIT);
    etcd_restarts(1);
}

/// Twenty restarts in a row; `make soak`.
#[test]
#[ignore]
fn etcd_restart_cycles_soak() {
    let _w = watchdog(Duration::from_secs(600));
    etcd_restarts(20);
}

/// The same with a frozen etcd (SIGSTOP): requests hang instead of failing.
#[test]
fn frozen_etcd_keeps_clients_and_queues_registrations() {
    let _w = watchdog(TEST_LIMIT);
    const T: u64 = 6;
    let etcd = Etcd::start_new();
    let sky = Skyapi::start(&etcd, &["--timeout", "6"]);
    let fleet = Fleet::new();
    let c_foo = fleet.register("foo", &sky.url(&query("foo", 9999)));
    let lease = common_lease(&entries(&etcd, ROOT));
    assert_eq!(entries(&etcd, ROOT), on_lease(&[("foo", 9999)], T, lease));

    etcd.pause();
    let c_bar = fleet.connect("bar", &sky.url(&query("bar", 8888)));
    // Shorter than the lease TTL left, so the lease cannot expire meanwhile.
    let frozen_for = Duration::from_secs(2);
    let outcome = holds_for(frozen_for, || fleet.quiet(&[(c_foo, 1), (c_bar, 0)]));
    etcd.resume();
    let thawed = Instant::now();
    if let Err(at) = outcome {
        panic!(
            "while etcd was frozen a client got a message or was dropped after {at:?}:\n  {}",
            fleet.describe()
        );
    }
    wait_entries(
        &etcd,
        &on_lease(&[("foo", 9999), ("bar", 8888)], T, lease),
        thawed,
        BACK_WITHIN,
        "the queued registration written within 2 s of etcd thawing",
    );
    within("the queued client's welcome", thawed, BACK_WITHIN, || {
        fleet.welcome(c_bar).ok_or_else(|| fleet.describe())
    });
    fleet.assert_connected(&[c_foo, c_bar], "after etcd thawed");
}

// ------------------------------------------------------------ 2. lease lost

/// An operator revokes skyapi's lease: its entries vanish with it, and come
/// back with the same values on a new lease within T/3 + 2 s.
#[test]
fn revoked_lease_is_regranted_and_entries_put_again() {
    let _w = watchdog(TEST_LIMIT);
    const T: u64 = 6;
    let list = [("foo", 9999), ("bar", 8888), ("baz", 7777)];
    let etcd = Etcd::start_new();
    let sky = Skyapi::start(&etcd, &["--timeout", "6"]);
    let fleet = Fleet::new();
    let ids: Vec<ClientId> = list
        .iter()
        .map(|&(s, p)| fleet.register(s, &sky.url(&query(s, p))))
        .collect();
    let before = entries(&etcd, ROOT);
    let old = common_lease(&before);
    assert_eq!(before, on_lease(&list, T, old), "before the revoke");
    let regrants = sky_metric(&sky, "skyapi_etcd_lease_regrants_total", &[]);

    let t0 = Instant::now();
    etcd.lease_revoke(old);
    assert_eq!(etcd.lease_ttl(old), None, "the lease is gone");
    let during = entries(&etcd, ROOT);
    assert!(
        during.values().all(|(_, l)| *l != old),
        "keys still on the revoked lease: {during:#?}"
    );

    let bound = Duration::from_secs(T / 3 + 2);
    let new = within("entries put again on a new lease", t0, bound, || {
        on_one_lease(&etcd, &list, T, Some(old))
    });
    assert_eq!(
        etcd.lease_ttl(new).map(|(_, granted)| granted),
        Some(T as i64),
        "the new lease's TTL is --timeout"
    );
    assert_eq!(
        sky_metric(&sky, "skyapi_etcd_lease_regrants_total", &[]) - regrants,
        1.0,
        "one re-grant"
    );
    fleet.assert_connected(&ids, "after the lease was revoked");
    let quiet: Vec<(ClientId, usize)> = ids.iter().map(|&i| (i, 1)).collect();
    assert!(
        fleet.quiet(&quiet),
        "unexpected messages:\n  {}",
        fleet.describe()
    );

    // The new lease is the one deletes are conditional on now.
    let mut ws = fleet.take(ids[0]);
    let t1 = Instant::now();
    close(&mut ws, DELETE_WITHIN);
    wait_entries(
        &etcd,
        &on_lease(&list[1..], T, new),
        t1,
        DELETE_WITHIN,
        "a close deletes on the new lease",
    );
}

/// A network partition between skyapi and etcd (a forwarder that stops
/// passing bytes, connections left open) outlasts the lease: etcd expires it
/// and the entries go. Clients stay connected meanwhile, a registration is
/// queued, and once the path heals every live entry is put again on a new
/// lease within T/3 + 2 s.
fn partition_outlasting_the_lease(extra: Duration) {
    const T: u64 = 3;
    let etcd = Etcd::start_new();
    let proxy = TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], etcd.client_port())));
    let through = format!("http://{}", proxy.addr());
    let sky = Skyapi::start(&etcd, &["--timeout", "3", "--etcd-api", &through]);
    let fleet = Fleet::new();
    let c_foo = fleet.register("foo", &sky.url(&query("foo", 9999)));
    let c_bar = fleet.register("bar", &sky.url(&query("bar", 8888)));
    let old = common_lease(&entries(&etcd, ROOT));
    assert_eq!(
        entries(&etcd, ROOT),
        on_lease(&[("foo", 9999), ("bar", 8888)], T, old),
        "before the partition"
    );

    let cut = Instant::now();
    proxy.partition();
    within(
        "etcd expires the lease behind the partition",
        cut,
        Duration::from_secs(T) + EXPIRY_MARGIN,
        || match (etcd.lease_ttl(old), entries(&etcd, ROOT)) {
            (None, got) if got.is_empty() => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let c_baz = fleet.connect("baz", &sky.url(&query("baz", 7777)));
    if let Err(at) = holds_for(Duration::from_secs(1) + extra, || {
        fleet.quiet(&[(c_foo, 1), (c_bar, 1), (c_baz, 0)])
    }) {
        panic!(
            "during the partition a client got a message or was dropped after {at:?}:\n  {}",
            fleet.describe()
        );
    }
    fleet.assert_connected(&[c_foo, c_bar, c_baz], "partitioned from etcd");
    assert!(
        entries(&etcd, ROOT).is_empty(),
        "entries reappeared during the partition"
    );

    let healed = Instant::now();
    proxy.heal();
    let list = [("foo", 9999), ("bar", 8888), ("baz", 7777)];
    let new = within(
        "every live entry put again on a new lease",
        healed,
        Duration::from_secs(T / 3 + 2),
        || on_one_lease(&etcd, &list, T, Some(old)),
    );
    within("the queued client's welcome", healed, BACK_WITHIN, || {
        fleet.welcome(c_baz).ok_or_else(|| fleet.describe())
    });
    assert_eq!(
        etcd.lease_ttl(new).map(|(_, granted)| granted),
        Some(T as i64)
    );
    fleet.assert_connected(&[c_foo, c_bar, c_baz], "after the partition healed");
}

#[test]
fn partition_outlasting_the_lease_regrants_and_puts_again() {
    let _w = watchdog(TEST_LIMIT);
    partition_outlasting_the_lease(Duration::ZERO);
}

/// The same partition held for two minutes; `make soak`.
#[test]
#[ignore]
fn long_partition_soak() {
    let _w = watchdog(Duration::from_secs(300));
    partition_outlasting_the_lease(Duration::from_secs(120));
}

// ------------------------------------------- 3. entry removed behind our back

/// An operator deletes a live entry, then overwrites another on skyapi's own
/// lease: the watch tells skyapi at once and it restores both within
/// T/3 + 2 s (which is within T), values and lease unchanged, without
/// reading the directory.
#[test]
fn entry_deleted_or_changed_behind_skyapis_back_is_restored() {
    let _w = watchdog(TEST_LIMIT);
    const T: u64 = 6;
    let bound = Duration::from_secs(T / 3 + 2).min(Duration::from_secs(T));
    let list = [("foo", 9999), ("bar", 8888), ("baz", 7777)];
    let etcd = Etcd::start_new();
    let sky = Skyapi::start(&etcd, &["--timeout", "6"]);
    let fleet = Fleet::new();
    let ids: Vec<ClientId> = list
        .iter()
        .map(|&(s, p)| fleet.register(s, &sky.url(&query(s, p))))
        .collect();
    let lease = common_lease(&entries(&etcd, ROOT));
    let want = on_lease(&list, T, lease);
    assert_eq!(entries(&etcd, ROOT), want, "before");
    let ranges_before = sky_metric(&sky, "skyapi_etcd_requests_total", &[("op", "range")]);
    let begin = Instant::now();

    let foo_key = key("foo", 9999);
    let t0 = Instant::now();
    let deleted = etcd
        .etcdctl(&["del", "--", &foo_key])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(deleted.trim(), "1", "etcdctl del removed the live key");
    wait_entries(&etcd, &want, t0, bound, "deleted entry restored");

    let bar_key = key("bar", 8888);
    let bogus = json!({"host": "192.0.2.66", "port": 1, "priority": 1, "weight": 100, "ttl": T});
    let t1 = Instant::now();
    etcd.etcdctl(&[
        "put",
        "--lease",
        &format!("{lease:x}"),
        "--",
        &bar_key,
        &bogus.to_string(),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    wait_entries(&etcd, &want, t1, bound, "changed entry restored");

    // The watch told it: no range read, however many entries there are.
    let elapsed = begin.elapsed().as_secs_f64();
    let ranges = sky_metric(&sky, "skyapi_etcd_requests_total", &[("op", "range")]) - ranges_before;
    assert_eq!(ranges, 0.0, "{ranges} range reads in {elapsed:.1} s");
    fleet.assert_connected(&ids, "after the restores");
}

// -------------------------------------------- 4. etcd not reachable at start

/// skyapi starts with nothing listening at its etcd endpoint: it serves,
/// accepts clients without refusing them, reports 503, and registers them
/// within 2 s of etcd answering (then 200).
#[test]
fn etcd_unreachable_at_startup_then_appears() {
    let _w = watchdog(TEST_LIMIT);
    const T: u64 = 3;
    // A member started once and stopped: its ports and data are reserved
    // for the later start, and nothing listens there meanwhile.
    let mut etcd = Etcd::start_new();
    etcd.kill();
    let sky = Skyapi::start(&etcd, &["--timeout", "3"]);
    let (code, why) = healthz(&sky);
    assert_eq!(code, 503, "healthz without etcd: {why}");

    let fleet = Fleet::new();
    let c_foo = fleet.connect("foo", &sky.url(&query("foo", 9999)));
    let c_bar = fleet.connect("bar", &sky.url(&query("bar", 8888)));
    if let Err(at) = holds_for(Duration::from_millis(1500), || {
        fleet.quiet(&[(c_foo, 0), (c_bar, 0)])
    }) {
        panic!(
            "without etcd a client got a message or was dropped after {at:?}:\n  {}",
            fleet.describe()
        );
    }
    fleet.assert_connected(&[c_foo, c_bar], "no etcd yet");
    assert_eq!(healthz(&sky).0, 503, "healthz still without etcd");
    assert!(
        sky.logs()
            .iter()
            .any(|l| l.contains("WARN") && l.contains("etcd")),
        "no warning about etcd logged:\n{}",
        sky.logs().join("\n")
    );

    etcd.start();
    let up = Instant::now();
    let list = [("foo", 9999), ("bar", 8888)];
    within(
        "entries written within 2 s of etcd answering",
        up,
        BACK_WITHIN,
        || on_one_lease(&etcd, &list, T, None),
    );
    for id in [c_foo, c_bar] {
        within("welcome once etcd is up", up, BACK_WITHIN, || {
            fleet.welcome(id).ok_or_else(|| fleet.describe())
        });
    }
    within(
        "/healthz 200 once etcd is up",
        up,
        BACK_WITHIN,
        || match healthz(&sky) {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    fleet.assert_connected(&[c_foo, c_bar], "after etcd appeared");
}

// ------------------------------------------------- 5. a member of a cluster

/// A 3-member cluster, skyapi given every endpoint. Each member in turn is
/// killed (whichever one skyapi talks to, the leader included) and brought
/// back: no entry is lost, the lease stays, a registration made meanwhile
/// succeeds, and every client stays connected.
#[test]
fn cluster_member_loss_loses_no_registration() {
    let _w = watchdog(TEST_LIMIT);
    const T: u64 = 3;
    // Killing the leader costs an election (1 s by default) before etcd
    // answers again; from then on the README's 2 s.
    let answer_within = Duration::from_secs(5);
    let mut members = Etcd::start_cluster(3);
    let endpoints = Etcd::endpoints(&members);
    let sky = Skyapi::start(&members[0], &["--timeout", "3", "--etcd-api", &endpoints]);
    let fleet = Fleet::new();
    let mut list: Vec<(&str, u16)> = vec![("foo", 9999)];
    let mut ids = vec![fleet.register("foo", &sky.url(&query("foo", 9999)))];
    let lease = common_lease(&entries(&members[0], ROOT));
    assert_eq!(entries(&members[0], ROOT), on_lease(&list, T, lease));

    for (i, service) in ["m0down", "m1down", "m2down"].into_iter().enumerate() {
        let killed_at = Instant::now();
        members[i].kill();
        let other = (i + 1) % 3;
        // Reads are linearizable: they need a leader, so after killing the
        // leader wait for the election.
        within(
            &format!("the cluster answers with member {i} down"),
            killed_at,
            answer_within,
            || members[other].etcdctl(&["endpoint", "health"]).map(|_| ()),
        );
        assert_eq!(
            entries(&members[other], ROOT),
            on_lease(&list, T, lease),
            "member {i} down: entries via member {other}"
        );
        let answering = Instant::now();
        let id = fleet.connect(service, &sky.url(&query(service, 7000 + i as u16)));
        let welcome = within(
            &format!("registration with member {i} down, within 2 s of the cluster answering"),
            answering,
            BACK_WITHIN,
            || fleet.welcome(id).ok_or_else(|| fleet.describe()),
        );
        assert_eq!(welcome["key"], key(service, 7000 + i as u16).as_str());
        list.push((service, 7000 + i as u16));
        ids.push(id);
        assert_eq!(
            entries(&members[other], ROOT),
            on_lease(&list, T, lease),
            "member {i} down: entries after the new registration"
        );
        fleet.assert_connected(&ids, &format!("member {i} down"));
        members[i].start();
    }
    // Each round took longer than T: only working keepalives kept the lease.
    for (i, m) in members.iter().enumerate() {
        assert_eq!(
            entries(m, ROOT),
            on_lease(&list, T, lease),
            "after the rounds, via member {i}"
        );
    }
    assert_eq!(
        members[0].lease_ttl(lease).map(|(_, granted)| granted),
        Some(T as i64)
    );
    fleet.assert_connected(&ids, "after the rounds");
    let mut ws = fleet.take(ids[0]);
    let t1 = Instant::now();
    close(&mut ws, DELETE_WITHIN);
    wait_entries(
        &members[2],
        &on_lease(&list[1..], T, lease),
        t1,
        DELETE_WITHIN,
        "a close still deletes",
    );
}

/// The member listed first is frozen (SIGSTOP: its connections stay open
/// but nothing answers, as behind a partition) for longer than T: requests
/// must go to the others; no entry is lost, the lease is kept alive, and a
/// registration made meanwhile succeeds.
#[test]
fn cluster_member_frozen_loses_no_registration() {
    let _w = watchdog(TEST_LIMIT);
    const T: u64 = 3;
    // An election, if the frozen member led.
    let answer_within = Duration::from_secs(5);
    let members = Etcd::start_cluster(3);
    let endpoints = Etcd::endpoints(&members);
    let sky = Skyapi::start(&members[0], &["--timeout", "3", "--etcd-api", &endpoints]);
    let fleet = Fleet::new();
    let c_foo = fleet.register("foo", &sky.url(&query("foo", 9999)));
    let lease = common_lease(&entries(&members[1], ROOT));
    assert_eq!(
        entries(&members[1], ROOT),
        on_lease(&[("foo", 9999)], T, lease)
    );

    members[0].pause();
    let frozen = Instant::now();
    within(
        "the cluster answers with member 0 frozen",
        frozen,
        answer_within,
        || members[1].etcdctl(&["endpoint", "health"]).map(|_| ()),
    );
    let answering = Instant::now();
    let c_bar = fleet.connect("bar", &sky.url(&query("bar", 8888)));
    // A hung member is not refused, it is silent: a request sent to it waits
    // out skyapi's request timeout (1.5 s) unless HTTP/2 keepalive (0.5 s
    // ping, 1 s timeout) has already marked it dead, then is retried 0.5 s
    // later on another member. Hence a wider bound than a clean outage's.
    let hung_member_within = Duration::from_secs(4);
    within(
        "registration with member 0 frozen, within 4 s of the cluster answering",
        answering,
        hung_member_within,
        || fleet.welcome(c_bar).ok_or_else(|| fleet.describe()),
    );
    let both = on_lease(&[("foo", 9999), ("bar", 8888)], T, lease);
    // Longer than the lease TTL: only keepalives through the other members
    // keep it.
    if let Err(at) = holds_for(Duration::from_secs(T + 1), || {
        entries(&members[1], ROOT) == both
    }) {
        panic!(
            "with member 0 frozen the entries changed after {at:?}: {:#?}",
            entries(&members[1], ROOT)
        );
    }
    fleet.assert_connected(&[c_foo, c_bar], "member 0 frozen");
    members[0].resume();
}

// ----------------------------------------------- 6. several skyapi instances

/// Two instances on one etcd. The same clients (same service, port, host)
/// register via A, then again via B (a reconnect to another instance): B's
/// put wins and A leaves it alone. A's old connections then end (one closes
/// cleanly, one goes silent and is dropped after T): the keys stay, on B's
/// lease with B's values. When B's connections close, the keys go.
#[test]
fn client_moved_to_another_instance_keeps_its_entry() {
    let _w = watchdog(TEST_LIMIT);
    const T: u64 = 3;
    let etcd = Etcd::start_new();
    let a = Skyapi::start(&etcd, &["--timeout", "3"]);
    let b = Skyapi::start(&etcd, &["--timeout", "3"]);
    let fleet = Fleet::new();
    let marker_a = fleet.register("marker via A", &a.url(&query("markera", 1)));
    let marker_b = fleet.register("marker via B", &b.url(&query("markerb", 2)));
    let got = entries(&etcd, ROOT);
    let la = got[&key("markera", 1)].1;
    let lb = got[&key("markerb", 2)].1;
    assert!(la != 0 && lb != 0 && la != lb, "leases {la:x} {lb:x}");
    let markers: Entries = [
        (key("markera", 1), (value(1, 100, T), la)),
        (key("markerb", 2), (value(2, 100, T), lb)),
    ]
    .into_iter()
    .collect();
    let with = |weight: u16, lease: i64| {
        let mut e = markers.clone();
        e.insert(key("foo", 9999), (value(9999, weight, T), lease));
        e.insert(key("bar", 8888), (value(8888, weight, T), lease));
        e
    };
    // Weights differ (they are not part of the id) so each instance's value
    // is recognisable.
    let via =
        |sky: &Skyapi, s: &str, p: u16, w: u16| sky.url(&format!("{}&weight={w}", query(s, p)));

    let foo_a = fleet.register("foo via A", &via(&a, "foo", 9999, 10));
    let bar_a = fleet.register("bar via A", &via(&a, "bar", 8888, 10));
    assert_eq!(entries(&etcd, ROOT), with(10, la), "registered via A");
    let foo_b = fleet.register("foo via B", &via(&b, "foo", 9999, 20));
    let bar_b = fleet.register("bar via B", &via(&b, "bar", 8888, 20));
    let moved = with(20, lb);
    assert_eq!(entries(&etcd, ROOT), moved, "registered again via B");
    // A's reconcile (every T/3) must not take the keys back.
    if let Err(at) = holds_for(Duration::from_secs(T / 3 + 1), || {
        entries(&etcd, ROOT) == moved
    }) {
        panic!(
            "instance A took the keys back after {at:?}: {:#?}",
            entries(&etcd, ROOT)
        );
    }

    // A's old connections end: foo's with a close frame, bar's by going
    // silent (half dead), which A notices only after T.
    let mut ws = fleet.take(foo_a);
    close(&mut ws, DELETE_WITHIN);
    fleet.silence(bar_a);
    let silent_at = Instant::now();
    within(
        "instance A drops the silent old connection",
        silent_at,
        Duration::from_secs(T) + EXPIRY_MARGIN,
        || {
            assert_eq!(
                entries(&etcd, ROOT),
                moved,
                "an old connection's end on A touched B's entries"
            );
            let live = services_keys(&a);
            if live == [key("markera", 1)] {
                Ok(())
            } else {
                Err(format!("A still lists {live:?}"))
            }
        },
    );
    // A wrongful delete would follow the drop at once.
    if let Err(at) = holds_for(DELETE_WITHIN, || entries(&etcd, ROOT) == moved) {
        panic!(
            "B's entries changed {at:?} after A dropped the old connection: {:#?}",
            entries(&etcd, ROOT)
        );
    }
    fleet.assert_connected(&[marker_a, marker_b, foo_b, bar_b], "after A let go");

    let t0 = Instant::now();
    for id in [foo_b, bar_b] {
        let mut ws = fleet.take(id);
        close(&mut ws, DELETE_WITHIN);
    }
    wait_entries(
        &etcd,
        &markers,
        t0,
        DELETE_WITHIN,
        "B's closes delete the keys",
    );
}

/// The realistic way a client ends up on two instances: instance A is cut
/// off from etcd long enough for its lease to expire, and the client
/// registers again via B. When A's path to etcd heals, A grants a new lease
/// and puts its live entries again, while it still holds the client's old,
/// now silent, connection. B's put must win over A's re-put, and when A
/// finally drops the old connection the key must stay B's.
#[test]
fn client_moved_while_its_old_instance_was_partitioned_keeps_its_entry() {
    let _w = watchdog(TEST_LIMIT);
    const T: u64 = 3;
    let etcd = Etcd::start_new();
    let proxy = TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], etcd.client_port())));
    let through = format!("http://{}", proxy.addr());
    let a = Skyapi::start(&etcd, &["--timeout", "3", "--etcd-api", &through]);
    let b = Skyapi::start(&etcd, &["--timeout", "3"]);
    let fleet = Fleet::new();
    let marker_a = fleet.register("marker via A", &a.url(&query("markera", 1)));
    let marker_b = fleet.register("marker via B", &b.url(&query("markerb", 2)));
    let via = |sky: &Skyapi, w: u16| sky.url(&format!("{}&weight={w}", query("foo", 9999)));
    let foo_a = fleet.register("foo via A", &via(&a, 10));
    let got = entries(&etcd, ROOT);
    let la = got[&key("markera", 1)].1;
    let lb = got[&key("markerb", 2)].1;
    assert_eq!(
        got[&key("foo", 9999)],
        (value(9999, 10, T), la),
        "foo via A"
    );

    let cut = Instant::now();
    proxy.partition();
    within(
        "A's lease expires behind the partition",
        cut,
        Duration::from_secs(T) + EXPIRY_MARGIN,
        || match etcd.lease_ttl(la) {
            None => Ok(()),
            Some(ttl) => Err(format!("{ttl:?}")),
        },
    );
    let marker_b_entry = (key("markerb", 2), (value(2, 100, T), lb));
    assert_eq!(
        entries(&etcd, ROOT),
        [marker_b_entry.clone()].into_iter().collect::<Entries>(),
        "A's entries expired with its lease"
    );
    // The client gives up on A (its old connection goes silent) and
    // registers via B.
    fleet.silence(foo_a);
    let foo_b = fleet.register("foo via B", &via(&b, 20));
    let moved = |marker_a: Option<i64>| -> Entries {
        let mut e: Entries = [
            marker_b_entry.clone(),
            (key("foo", 9999), (value(9999, 20, T), lb)),
        ]
        .into_iter()
        .collect();
        if let Some(l) = marker_a {
            e.insert(key("markera", 1), (value(1, 100, T), l));
        }
        e
    };
    assert_eq!(entries(&etcd, ROOT), moved(None), "foo registered via B");

    let healed = Instant::now();
    proxy.heal();
    let la2 = within(
        "A puts its own live entry again on a new lease",
        healed,
        Duration::from_secs(T / 3 + 2),
        || {
            let got = entries(&etcd, ROOT);
            let stored = &got.get(&key("foo", 9999));
            assert_eq!(
                *stored,
                moved(None).get(&key("foo", 9999)),
                "A's re-put overwrote the key B holds for the live client ({:?} after the heal)",
                healed.elapsed()
            );
            match got.get(&key("markera", 1)) {
                Some((_, l)) if *l != la => Ok(*l),
                other => Err(format!("{other:?}")),
            }
        },
    );
    // A drops the silent old connection T after it went quiet; the key
    // stays B's all along, and after the drop.
    within(
        "A drops the client's old connection",
        healed,
        Duration::from_secs(T) + EXPIRY_MARGIN,
        || {
            assert_eq!(
                entries(&etcd, ROOT),
                moved(Some(la2)),
                "the moved client's entry changed ({:?} after the heal)",
                healed.elapsed()
            );
            let live = services_keys(&a);
            if live == [key("markera", 1)] {
                Ok(())
            } else {
                Err(format!("A still lists {live:?}"))
            }
        },
    );
    if let Err(at) = holds_for(DELETE_WITHIN, || entries(&etcd, ROOT) == moved(Some(la2))) {
        panic!(
            "the moved client's entry changed {at:?} after A dropped the old connection: {:#?}",
            entries(&etcd, ROOT)
        );
    }
    fleet.assert_connected(&[marker_a, marker_b, foo_b], "after A came back");
}

// ------------------------------------------------------ 7. SIGKILL, SIGTERM

/// Two instances with several clients each. SIGTERM on one started with
/// `--revoke-on-exit`: its entries are gone within 1 s of the signal (the
/// other's untouched), its clients get a 1001 close, it exits 0. SIGKILL on
/// the other: its entries stay until its lease expires, and are gone within
/// T of the signal (plus etcd's expiry tick).
#[test]
fn sigterm_with_revoke_on_exit_removes_entries_in_one_second_and_sigkill_within_timeout() {
    let _w = watchdog(TEST_LIMIT);
    const T: u64 = 3;
    let etcd = Etcd::start_new();
    // --timeout 30 for the SIGTERM'd one: lease expiry cannot be what
    // removes its entries within 1 s.
    let mut term = Skyapi::start(&etcd, &["--timeout", "30", "--revoke-on-exit"]);
    let mut kill = Skyapi::start(&etcd, &["--timeout", "3"]);
    let fleet = Fleet::new();
    let term_list = [("alpha", 1001), ("beta", 1002), ("gamma", 1003)];
    let kill_list = [("delta", 2001), ("epsilon", 2002), ("zeta", 2003)];
    let term_ids: Vec<ClientId> = term_list
        .iter()
        .map(|&(s, p)| fleet.register(s, &term.url(&query(s, p))))
        .collect();
    let kill_ids: Vec<ClientId> = kill_list
        .iter()
        .map(|&(s, p)| fleet.register(s, &kill.url(&query(s, p))))
        .collect();
    let got = entries(&etcd, ROOT);
    let lt = got[&key("alpha", 1001)].1;
    let lk = got[&key("delta", 2001)].1;
    let term_entries: Entries = term_list
        .iter()
        .map(|&(s, p)| (key(s, p), (value(p, 100, 30), lt)))
        .collect();
    let kill_entries = on_lease(&kill_list, T, lk);
    let mut both = term_entries.clone();
    both.extend(kill_entries.clone());
    assert_eq!(got, both, "before the signals");

    let t0 = Instant::now();
    term.signal(libc::SIGTERM);
    wait_entries(
        &etcd,
        &kill_entries,
        t0,
        Duration::from_secs(1),
        "SIGTERM: its entries gone within 1 s, the other instance's untouched",
    );
    within(
        "SIGTERM: every client closed with 1001",
        t0,
        Duration::from_secs(5),
        || {
            let codes: Vec<Option<Event>> = term_ids.iter().map(|&i| fleet.seen(i).end).collect();
            if codes
                .iter()
                .all(|e| matches!(e, Some(Event::Close(Some((1001, _))))))
            {
                Ok(())
            } else {
                Err(format!("{codes:?}"))
            }
        },
    );
    let status = term
        .wait_exit(Duration::from_secs(5).saturating_sub(t0.elapsed()))
        .expect("skyapi still running 5 s after SIGTERM");
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert_eq!(etcd.lease_ttl(lt), None, "SIGTERM revoked the lease");
    fleet.assert_connected(&kill_ids, "after the other instance's SIGTERM");

    let t1 = Instant::now();
    kill.signal(libc::SIGKILL);
    // Keepalives every T/3 leave at least 2T/3 on the lease: for the first
    // second after the kill the entries must still be there.
    let right_after = entries(&etcd, ROOT);
    if t1.elapsed() < Duration::from_secs(1) {
        assert_eq!(right_after, kill_entries, "entries right after SIGKILL");
    }
    assert!(
        kill.wait_exit(Duration::from_secs(2)).is_some(),
        "SIGKILL did not end skyapi"
    );
    within(
        "SIGKILL: the clients see their connections end",
        t1,
        Duration::from_secs(2),
        || {
            let ends: Vec<Option<Event>> = kill_ids.iter().map(|&i| fleet.seen(i).end).collect();
            if ends.iter().all(Option::is_some) {
                Ok(())
            } else {
                Err(format!("{ends:?}"))
            }
        },
    );
    wait_entries(
        &etcd,
        &Entries::new(),
        t1,
        Duration::from_secs(T) + EXPIRY_MARGIN,
        "SIGKILL: entries gone within --timeout (lease expiry)",
    );
    assert_eq!(
        etcd.lease_ttl(lk),
        None,
        "the killed instance's lease expired"
    );
}

// ---------------------------------------------- 8. a client stops answering

/// A sidecar process frozen with SIGSTOP, and a raw connection that
/// completed the upgrade and then went quiet (a network black hole with TCP
/// open): each is tolerated for T and removed within T (+ margin) of its
/// last sign of life, while an answering client beside them is untouched.
/// Thawed, the sidecar registers again; SIGTERM removes it at once.
#[test]
fn silent_clients_are_dropped_within_timeout() {
    let _w = watchdog(TEST_LIMIT);
    const T: u64 = 3;
    let timeout = Duration::from_secs(T);
    let margin = Duration::from_millis(1500);
    let etcd = Etcd::start_new();
    let sky = Skyapi::start(&etcd, &["--timeout", "3"]);
    let fleet = Fleet::new();
    let live = fleet.register("live", &sky.url(&query("foo", 9999)));
    let lease = common_lease(&entries(&etcd, ROOT));

    let server = format!("ws://{}", sky.connect_addr());
    let mut side = Skyapi::provide(
        &[
            "--server",
            &server,
            "--service",
            "side",
            "--port",
            "7001",
            "--host",
            "127.0.0.1",
            "--interval",
            "1",
        ],
        &[],
    );
    let with_side = on_lease(&[("foo", 9999), ("side", 7001)], T, lease);
    wait_entries(
        &etcd,
        &with_side,
        Instant::now(),
        Duration::from_secs(10),
        "the sidecar registers",
    );
    let _hole = blackhole_connect(&sky.url(&query("hole", 7002)));
    let hole_at = Instant::now();
    let all = on_lease(&[("foo", 9999), ("side", 7001), ("hole", 7002)], T, lease);
    wait_entries(
        &etcd,
        &all,
        hole_at,
        DELETE_WITHIN,
        "the black-holed client registers",
    );

    let stop_at = Instant::now();
    side.signal(libc::SIGSTOP);
    let foo_key = key("foo", 9999);
    let (side_key, hole_key) = (key("side", 7001), key("hole", 7002));
    let (mut side_gone, mut hole_gone) = (None, None);
    within(
        "both silent clients removed",
        stop_at,
        timeout + margin,
        || {
            let got = entries(&etcd, ROOT);
            assert_eq!(
                got.get(&foo_key),
                all.get(&foo_key),
                "the answering client's entry changed"
            );
            if side_gone.is_none() && !got.contains_key(&side_key) {
                side_gone = Some(stop_at.elapsed());
            }
            if hole_gone.is_none() && !got.contains_key(&hole_key) {
                hole_gone = Some(hole_at.elapsed());
            }
            assert!(
                side_gone.is_some() || stop_at.elapsed() <= timeout + margin,
                "the frozen sidecar's entry still there {:?} after SIGSTOP",
                stop_at.elapsed()
            );
            assert!(
                hole_gone.is_some() || hole_at.elapsed() <= timeout + margin,
                "the black-holed entry still there {:?} after its upgrade",
                hole_at.elapsed()
            );
            match (side_gone, hole_gone) {
                (Some(_), Some(_)) => Ok(()),
                _ => Err(format!("{got:#?}")),
            }
        },
    );
    let (side_gone, hole_gone) = (side_gone.unwrap(), hole_gone.unwrap());
    // Tolerated for T: the sidecar pinged at most 1 s (its interval) before
    // the stop; the black hole's last sign was the upgrade.
    assert!(
        side_gone + Duration::from_millis(1200) >= timeout,
        "the frozen sidecar was dropped {side_gone:?} after SIGSTOP, before T"
    );
    assert!(
        hole_gone + Duration::from_millis(200) >= timeout,
        "the black-holed client was dropped {hole_gone:?} after its upgrade, before T"
    );
    assert_eq!(
        entries(&etcd, ROOT),
        on_lease(&[("foo", 9999)], T, lease),
        "after the drops"
    );
    fleet.assert_connected(&[live], "beside the silent clients");

    // Thawed, the sidecar finds its connection dead and registers again.
    let cont_at = Instant::now();
    side.signal(libc::SIGCONT);
    wait_entries(
        &etcd,
        &with_side,
        cont_at,
        Duration::from_secs(5),
        "the thawed sidecar registers again",
    );
    let term_at = Instant::now();
    side.signal(libc::SIGTERM);
    wait_entries(
        &etcd,
        &on_lease(&[("foo", 9999)], T, lease),
        term_at,
        DELETE_WITHIN,
        "the sidecar's SIGTERM closes cleanly and its entry goes at once",
    );
    let status = side
        .wait_exit(Duration::from_secs(5))
        .expect("sidecar still running 5 s after SIGTERM");
    assert!(status.success(), "sidecar exit after SIGTERM: {status}");
}

// ------------------------------------------ 9. many clients return at once

/// Clients of one service, `n` of them, connect at once to a fresh
/// instance, then again after it was SIGKILLed and restarted on the same
/// port. The transactions are counted by etcd itself, over the storm only:
/// its gRPC counter of Txn calls (which counts every call, unlike
/// `etcd_debugging_mvcc_txn_total`, which skips one-operation
/// transactions).
///
/// Batching is opportunistic: the worker sends one request at a time and
/// puts everything that queued up meanwhile into the next transaction (at
/// most 128 operations), so etcd never sees more than one request in
/// flight per instance. How many clients share a transaction depends on
/// how fast they arrive compared with etcd's latency: on a fresh instance
/// with a fast etcd (the first storm) the server's own handshake work
/// spreads the arrivals, and up to n/9 calls were seen on two loaded cores,
/// so that storm is held to a loose n/4. The restart storm meets an etcd
/// that is slower than the arrivals (frozen until every registration is
/// queued, as a busy etcd would be): there at most n/10 calls may reach it.
/// The restarted instance's puts move every key to its lease, so the dead
/// instance's lease expiring removes nothing.
fn storm(n: usize, ttl: u64) {
    let etcd = Etcd::start_new();
    let listen = format!("127.0.0.1:{}", free_port());
    let ttl_arg = ttl.to_string();
    let args = ["--timeout", &ttl_arg, "--listen-addr", &listen];
    let txns = || {
        etcd_metric(
            &etcd,
            "grpc_server_started_total",
            &[("grpc_method", "Txn")],
        )
    };
    let puts = || etcd_metric(&etcd, "etcd_debugging_mvcc_put_total", &[]);
    let ports: Vec<u16> = (0..n).map(|i| 20000 + i as u16).collect();
    let want = |lease: i64| -> Entries {
        ports
            .iter()
            .map(|&p| (key("storm", p), (value(p, 100, ttl), lease)))
            .collect()
    };

    let run = |sky: &Skyapi, what: &str, busy_etcd: bool, max_txn: usize| {
        within(
            &format!("{what}: lease granted"),
            Instant::now(),
            Duration::from_secs(5),
            || match healthz(sky) {
                (200, _) => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
        let urls: Vec<String> = ports.iter().map(|&p| sky.url(&query("storm", p))).collect();
        let (txn0, put0) = (txns(), puts());
        let t0 = Instant::now();
        let fleet = Fleet::new();
        if busy_etcd {
            etcd.pause();
        }
        let ids = fleet.storm("storm", &urls, Duration::from_secs(30));
        if busy_etcd {
            within(
                &format!("{what}: every registration queued"),
                t0,
                Duration::from_secs(10),
                || match services_keys(sky).len() {
                    queued if queued == n => Ok(()),
                    queued => Err(format!("{queued} of {n}")),
                },
            );
            assert!(
                fleet.quiet(&ids.iter().map(|&i| (i, 0)).collect::<Vec<_>>()),
                "{what}: a client got an answer while etcd was frozen"
            );
            etcd.resume();
        }
        within(
            &format!("{what}: every client welcomed"),
            t0,
            Duration::from_secs(30),
            || {
                let missing = ids.iter().filter(|&&i| fleet.welcome(i).is_none()).count();
                if missing == 0 {
                    Ok(())
                } else {
                    Err(format!("{missing} of {n} without a welcome"))
                }
            },
        );
        let took = t0.elapsed();
        let (txn1, put1) = (txns(), puts());
        let got = entries(&etcd, ROOT);
        let lease = got.values().map(|(_, l)| *l).next().unwrap_or(0);
        if got != want(lease) {
            let missing: Vec<&u16> = ports
                .iter()
                .filter(|&&p| !got.contains_key(&key("storm", p)))
                .collect();
            panic!(
                "{what}: {} keys in etcd for {n} welcomed clients; missing ports {missing:?}; \
                 other differences: {}",
                got.len(),
                want(lease)
                    .iter()
                    .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
                    .count()
            );
        }
        let (txn, put) = (txn1 - txn0, put1 - put0);
        eprintln!("{what}: {n} clients registered in {took:?} with {txn} Txn calls ({put} puts)");
        assert!(put >= n as f64, "{what}: only {put} puts for {n} clients");
        assert!(
            txn <= max_txn as f64,
            "{what}: {txn} Txn calls for {n} clients registering at once (bound {max_txn}): \
             not batched"
        );
        (fleet, ids, lease)
    };

    let mut first = Skyapi::start(&etcd, &args);
    let (fleet, ids, l1) = run(&first, "first start", false, n / 4);
    let killed_at = Instant::now();
    first.signal(libc::SIGKILL);
    assert!(
        first.wait_exit(Duration::from_secs(2)).is_some(),
        "SIGKILL did not end skyapi"
    );
    within(
        "the clients see the kill",
        killed_at,
        Duration::from_secs(5),
        || {
            let open = ids.iter().filter(|&&i| fleet.seen(i).end.is_none()).count();
            if open == 0 {
                Ok(())
            } else {
                Err(format!("{open} still open"))
            }
        },
    );
    drop(fleet);

    let second = Skyapi::start(&etcd, &args);
    let (fleet, ids, l2) = run(&second, "after a restart", true, n / 10);
    assert_ne!(l1, l2, "the restarted instance has its own lease");
    within(
        "the killed instance's lease expires",
        killed_at,
        Duration::from_secs(ttl) + EXPIRY_MARGIN,
        || match etcd.lease_ttl(l1) {
            None => Ok(()),
            Some(left) => Err(format!("{left:?}")),
        },
    );
    assert_eq!(
        entries(&etcd, ROOT),
        want(l2),
        "after the old lease expired"
    );
    fleet.assert_connected(&ids, "after the storm");
}

#[test]
fn many_clients_at_once_are_batched() {
    let _w = watchdog(TEST_LIMIT);
    storm(300, 4);
}

/// The same with thousands of clients (more than one full transaction per
/// storm); `make soak`.
#[test]
#[ignore]
fn many_clients_at_once_are_batched_soak() {
    let _w = watchdog(Duration::from_secs(300));
    // A longer --timeout: thousands of debug-build connections on two
    // loaded cores must not be dropped for slow pongs.
    storm(2000, 10);
}

// ------------------------------------------------- 10. skyapi itself stalls

/// skyapi frozen (SIGSTOP) for `--timeout` + 2 s with several clients, then
/// resumed: no client is dropped (each answered every ping it was sent;
/// skyapi was the silent one), every entry is back on a new lease within
/// T/3 + 2 s of resuming (the old lease expired meanwhile), and the stall is
/// counted in `/metrics` and logged once, not once per connection.
#[test]
fn skyapi_stalled_beyond_timeout_keeps_every_client() {
    let _w = watchdog(TEST_LIMIT);
    const T: u64 = 3;
    let list = [("foo", 9999), ("bar", 8888), ("baz", 7777), ("qux", 6666)];
    let etcd = Etcd::start_new();
    let sky = Skyapi::start(&etcd, &["--timeout", "3"]);
    let fleet = Fleet::new();
    let ids: Vec<ClientId> = list
        .iter()
        .map(|&(s, p)| fleet.register(s, &sky.url(&query(s, p))))
        .collect();
    let old = common_lease(&entries(&etcd, ROOT));
    assert_eq!(entries(&etcd, ROOT), on_lease(&list, T, old), "before");
    // A few ping rounds first, so pings are outstanding at any moment.
    std::thread::sleep(Duration::from_millis(1500));
    let stalls_before = sky_metric(&sky, "skyapi_stalls_total", &[]);

    let frozen_for = Duration::from_secs(T + 2);
    sky.signal(libc::SIGSTOP);
    std::thread::sleep(frozen_for);
    assert_eq!(
        etcd.lease_ttl(old),
        None,
        "the lease expired during the stall"
    );
    sky.signal(libc::SIGCONT);
    let resumed = Instant::now();

    let new = within(
        "entries back on a new lease after the stall",
        resumed,
        Duration::from_secs(T / 3 + 2),
        || on_one_lease(&etcd, &list, T, Some(old)),
    );
    // Past the point where the old code dropped everyone, and a whole
    // --timeout more: nobody is dropped, nobody is told anything.
    let quiet: Vec<(ClientId, usize)> = ids.iter().map(|&i| (i, 1)).collect();
    if let Err(at) = holds_for(Duration::from_secs(T + 1), || fleet.quiet(&quiet)) {
        panic!(
            "a client got a message or was dropped {at:?} after skyapi resumed:\n  {}",
            fleet.describe()
        );
    }
    fleet.assert_connected(&ids, "after skyapi resumed");
    assert_eq!(entries(&etcd, ROOT), on_lease(&list, T, new), "after");
    let mut listed = services_keys(&sky);
    listed.sort();
    let mut want: Vec<String> = list.iter().map(|&(s, p)| key(s, p)).collect();
    want.sort();
    assert_eq!(listed, want, "/services after the stall");
    assert_eq!(
        sky_metric(&sky, "skyapi_removals_total", &[]),
        0.0,
        "no registration ended"
    );

    let stalls = sky_metric(&sky, "skyapi_stalls_total", &[]) - stalls_before;
    let stalled_secs = sky_metric(&sky, "skyapi_stall_seconds_total", &[]);
    let lines = sky.lines_with("did not run for");
    eprintln!("stall: {stalls} counted, {stalled_secs:.1} s; log: {lines:#?}");
    assert!(stalls >= 1.0, "the stall is counted in /metrics");
    assert!(
        stalled_secs >= (frozen_for - Duration::from_secs(T / 3 + 1)).as_secs_f64(),
        "stall seconds {stalled_secs} for a {frozen_for:?} stall"
    );
    // Four connections and the worker all noticed it: one line per stall
    // (the machine may have stalled skyapi a second time under load, which
    // would be counted and logged as a stall of its own).
    assert_eq!(
        lines.len() as f64,
        stalls + stalls_before,
        "one log line per stall, not per connection: {lines:#?}"
    );
}

// -------------------------------------------------- 11. etcd refuses writes

/// etcd at its space quota (NOSPACE alarm: every put and lease grant
/// refused with "database space exceeded", keepalives and reads still
/// answered) with a registration waiting: `/healthz` says 503 with the
/// reason on every sample, steadily (also once nothing is queued any more),
/// the registration stays queued (no `ERROR`), the condition is logged
/// once, and the metrics say so. Once an operator clears the alarm, the
/// registration waiting then is stored, `/healthz` is 200 again and the
/// recovery is logged once.
#[test]
fn etcd_refusing_writes_is_a_steady_503_until_a_write_succeeds() {
    let _w = watchdog(TEST_LIMIT);
    const T: u64 = 6;
    let etcd = Etcd::start_with(&["--quota-backend-bytes", TINY_QUOTA], None);
    let sky = Skyapi::start(&etcd, &["--timeout", "6"]);
    let fleet = Fleet::new();
    let c_foo = fleet.register("foo", &sky.url(&query("foo", 9999)));
    let lease = common_lease(&entries(&etcd, ROOT));
    assert_eq!(healthz(&sky).0, 200, "healthz before");

    fill_to_quota(&etcd);
    let c_bar = fleet.connect("bar", &sky.url(&query("bar", 8888)));
    let reason = "etcd refuses writes: database space exceeded (NOSPACE alarm)";
    let refused = Instant::now();
    within(
        "/healthz 503 with the reason",
        refused,
        BACK_WITHIN,
        || match healthz(&sky) {
            (503, why) if why.contains(reason) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    // Two keepalive periods and more: every sample 503 with the reason.
    // The one other truthful reason: a request that really found etcd
    // unreachable (an HTTP/2 ping unanswered for 1 s on a loaded machine
    // resets the connection); it is logged, and counted below.
    let truthful = |why: &str| why.contains(reason) || why.starts_with("etcd unavailable");
    let mut samples = 0;
    let steady = holds_for(Duration::from_secs(5), || {
        samples += 1;
        let (code, why) = healthz(&sky);
        std::thread::sleep(Duration::from_millis(80));
        code == 503 && truthful(&why)
    });
    if let Err(at) = steady {
        panic!(
            "/healthz left 503 after {at:?} ({samples} samples): {:?}",
            healthz(&sky)
        );
    }
    let m = |name: &str, labels: &[(&str, &str)]| sky_metric(&sky, name, labels);
    within(
        "skyapi_etcd_state refusing_writes",
        Instant::now(),
        BACK_WITHIN,
        || match m("skyapi_etcd_state", &[("state", "refusing_writes")]) {
            1.0 => Ok(()),
            _ => Err(healthz(&sky).1),
        },
    );
    assert_eq!(m("skyapi_etcd_state", &[]), 1.0, "one state at a time");
    assert_eq!(m("skyapi_etcd_up", &[]), 0.0);
    let oldest = m("skyapi_oldest_waiting_registration_seconds", &[]);
    assert!(oldest >= 4.0, "oldest waiting registration: {oldest} s");
    assert!(
        fleet.quiet(&[(c_foo, 1), (c_bar, 0)]),
        "the waiting registration must not be refused:\n  {}",
        fleet.describe()
    );
    assert_eq!(
        entries(&etcd, ROOT),
        on_lease(&[("foo", 9999)], T, lease),
        "the stored entry stays, renewed"
    );
    let said = |needle: &str| sky.lines_with(needle).len();
    let started = format!("[WARN] {reason}");
    // Once, not per attempt; again only after a real transport failure.
    let unreachable = || said("[WARN] etcd unreachable");
    assert_eq!(
        said(&started),
        1 + unreachable(),
        "said once, not per attempt"
    );
    assert_eq!(
        said("etcd answers"),
        1,
        "no flapping: only the first contact"
    );

    // The waiting client gives up and another one comes: with nothing
    // queued for a while, the state still holds (only a write can end it).
    let mut ws = fleet.take(c_bar);
    close(&mut ws, DELETE_WITHIN);
    if let Err(at) = holds_for(Duration::from_secs(4), || {
        std::thread::sleep(Duration::from_millis(80));
        let (code, why) = healthz(&sky);
        code == 503 && truthful(&why)
    }) {
        panic!(
            "/healthz left 503 with nothing queued after {at:?}: {:?}",
            healthz(&sky)
        );
    }
    let c_baz = fleet.connect("baz", &sky.url(&query("baz", 7777)));

    clear_quota(&etcd);
    let cleared = Instant::now();
    // The worker backs off to at most 2 s between refused attempts.
    let bound = Duration::from_secs(2) + BACK_WITHIN;
    wait_entries(
        &etcd,
        &on_lease(&[("foo", 9999), ("baz", 7777)], T, lease),
        cleared,
        bound,
        "the queued registration stored once etcd takes writes",
    );
    within("/healthz 200 again", cleared, bound, || {
        match healthz(&sky) {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    within("the queued client's welcome", cleared, bound, || {
        fleet.welcome(c_baz).ok_or_else(|| fleet.describe())
    });
    assert_eq!(m("skyapi_etcd_state", &[("state", "ok")]), 1.0);
    assert_eq!(m("skyapi_oldest_waiting_registration_seconds", &[]), 0.0);
    assert_eq!(
        said("etcd stores registrations again"),
        1,
        "recovery said once"
    );
    assert_eq!(
        said(&started),
        1 + unreachable(),
        "the condition said once in all"
    );
    fleet.assert_connected(&[c_foo, c_baz], "after the alarm was cleared");
}

// ----------------------------------------------- 12. stale auth tokens

/// skyapi logged in as the user `skyapi` (see `AUTH_SETUP`), `--timeout 6`.
fn skyapi_as_user(etcd: &Etcd) -> Skyapi {
    Skyapi::server(
        &[
            "--listen-addr",
            "127.0.0.1:0",
            "--etcd-api",
            &etcd.endpoint(),
            "--etcd-user",
            "skyapi",
            "--timeout",
            "6",
        ],
        &[("SKYAPI_ETCD_PASSWORD", "pw")],
    )
}

/// etcd with JWT auth tokens: every change to users or roles makes etcd
/// refuse the tokens issued before it ("revision of auth store is old").
/// skyapi logs in again and retries: registrations made right after each
/// change are stored, none is refused, `/healthz` stays 200.
#[test]
fn stale_jwt_tokens_are_refreshed_not_fatal() {
    let _w = watchdog(TEST_LIMIT);
    let dir = TempDir::new("jwt");
    let etcd = jwt_etcd(&dir);
    let root = Some(JWT_ROOT);
    let sky = skyapi_as_user(&etcd);
    let fleet = Fleet::new();
    let mut ids = vec![fleet.register("first", &sky.url(&query("first", 1000)))];
    for round in 1..=5u16 {
        // A user or role change, then at once a registration: its put is
        // the first request on the stale token.
        let change = if round % 2 == 0 {
            vec!["user".to_string(), "add".into(), format!("u{round}:pw")]
        } else {
            vec!["role".to_string(), "add".into(), format!("r{round}")]
        };
        let change: Vec<&str> = change.iter().map(String::as_str).collect();
        etcd.must_as(root, &change);
        let service = format!("s{round}");
        let id = fleet.connect(&service, &sky.url(&query(&service, 1000 + round)));
        within(
            &format!("registration after auth change {round}"),
            Instant::now(),
            Duration::from_secs(5),
            || match fleet.welcome(id) {
                Some(_) => Ok(()),
                None => Err(fleet.describe()),
            },
        );
        ids.push(id);
        let stored = etcd.get_prefix_with_lease_as(root, ROOT);
        assert!(
            stored.contains_key(&key(&service, 1000 + round)),
            "round {round}: not in etcd: {stored:#?}"
        );
    }
    fleet.assert_connected(&ids, "after five auth changes");
    assert_eq!(healthz(&sky).0, 200, "healthz after the auth changes");
    let stale = sky.lines_with("revision of auth store is old");
    eprintln!("skyapi on stale tokens: {stale:#?}");
    assert!(
        !stale.is_empty(),
        "skyapi never met a stale token: the test did not test anything"
    );
    assert_eq!(
        sky_metric(
            &sky,
            "skyapi_etcd_requests_total",
            &[("outcome", "rejected")]
        ),
        0.0,
        "no request counted as bad"
    );
}

/// skyapi's user loses its permission on `/skydns/` while a client
/// registers: the registration waits (no `ERROR`), `/healthz` says 503
/// with the reason, and once the permission is granted again the
/// registration is stored and `/healthz` is 200.
#[test]
fn permission_denied_is_waited_out_not_fatal() {
    let _w = watchdog(TEST_LIMIT);
    let dir = TempDir::new("perm");
    let etcd = jwt_etcd(&dir);
    let root = Some(JWT_ROOT);
    let sky = skyapi_as_user(&etcd);
    let fleet = Fleet::new();
    let c_foo = fleet.register("foo", &sky.url(&query("foo", 9999)));
    let grant = support::etcd::SKYDNS_GRANT;
    etcd.must_as(
        root,
        &[
            "role",
            "revoke-permission",
            "skydns-rw",
            "/skydns/",
            "--prefix=true",
        ],
    );
    let c_bar = fleet.connect("bar", &sky.url(&query("bar", 8888)));
    let reason = "etcd denies permission";
    within(
        "/healthz 503 with the reason",
        Instant::now(),
        Duration::from_secs(3),
        || match healthz(&sky) {
            (503, why) if why.contains(reason) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    if let Err(at) = holds_for(Duration::from_secs(3), || {
        std::thread::sleep(Duration::from_millis(100));
        healthz(&sky).0 == 503 && fleet.quiet(&[(c_foo, 1), (c_bar, 0)])
    }) {
        panic!(
            "after {at:?}: /healthz {:?}, clients:\n  {}",
            healthz(&sky),
            fleet.describe()
        );
    }
    assert_eq!(
        sky_metric(&sky, "skyapi_etcd_state", &[("state", "permission_denied")]),
        1.0
    );

    etcd.must_as(root, grant);
    let granted = Instant::now();
    // The worker backs off to at most 2 s between refused attempts.
    let bound = Duration::from_secs(2) + BACK_WITHIN;
    within("the queued client's welcome", granted, bound, || {
        fleet.welcome(c_bar).ok_or_else(|| fleet.describe())
    });
    within("/healthz 200 again", granted, bound, || {
        match healthz(&sky) {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let stored = etcd.get_prefix_with_lease_as(root, ROOT);
    assert!(stored.contains_key(&key("bar", 8888)), "{stored:#?}");
    fleet.assert_connected(&[c_foo, c_bar], "after the permission came back");
}

// ------------------------------------ 13. the change feed (issue 10)

/// The current revision of `etcd` (from a read's header).
fn revision(etcd: &Etcd) -> i64 {
    let out = etcd
        .etcdctl(&["get", "/", "-w", "json"])
        .unwrap_or_else(|e| panic!("{e}"));
    let (header, _) = support::etcd::parse_get(&out);
    header["header"]["revision"]
        .as_i64()
        .unwrap_or_else(|| panic!("no revision in {out}"))
}

/// The watch breaks behind a partition; meanwhile an operator deletes a
/// live entry and etcd compacts away the revisions the watch would resume
/// from. Once the path heals the watch cannot resume, skyapi checks every
/// key in one full read and restores the entry, within the lease.
#[test]
fn compaction_while_the_watch_was_broken_is_followed_by_a_full_check() {
    let _w = watchdog(TEST_LIMIT);
    // Long enough for the lease to outlive the partition: the watch's
    // connection pings every 6 s (as etcd allows) and gives up 3 s later.
    const T: u64 = 30;
    let etcd = Etcd::start_new();
    let proxy = TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], etcd.client_port())));
    let through = format!("http://{}", proxy.addr());
    let sky = Skyapi::start(&etcd, &["--timeout", "30", "--etcd-api", &through]);
    let fleet = Fleet::new();
    let list = [("foo", 9999), ("bar", 8888)];
    let ids: Vec<ClientId> = list
        .iter()
        .map(|&(s, p)| fleet.register(s, &sky.url(&query(s, p))))
        .collect();
    let lease = common_lease(&entries(&etcd, ROOT));
    let want = on_lease(&list, T, lease);
    assert_eq!(entries(&etcd, ROOT), want, "before");
    let ranges_before = sky_metric(&sky, "skyapi_etcd_requests_total", &[("op", "range")]);

    let cut = Instant::now();
    proxy.partition();
    within(
        "skyapi sees its watch broken",
        cut,
        Duration::from_secs(12),
        || {
            let logs = sky.logs();
            logs.iter()
                .any(|l| l.contains("etcd watch broken"))
                .then_some(())
                .ok_or_else(|| logs.join("\n"))
        },
    );
    etcd.del(&key("foo", 9999));
    for i in 0..5 {
        etcd.put(&format!("/elsewhere/{i}"), "x");
    }
    let compact_to = revision(&etcd);
    etcd.etcdctl(&["compact", &compact_to.to_string()])
        .unwrap_or_else(|e| panic!("{e}"));

    let healed = Instant::now();
    proxy.heal();
    wait_entries(
        &etcd,
        &want,
        healed,
        Duration::from_secs(10),
        "the entry deleted during the break restored",
    );
    assert!(
        sky.logs().iter().any(|l| l.contains("compacted")),
        "skyapi says why it reads everything: {:#?}",
        sky.logs()
    );
    let ranges = sky_metric(&sky, "skyapi_etcd_requests_total", &[("op", "range")]) - ranges_before;
    assert!(
        ranges >= 1.0,
        "one full read after the compaction, saw {ranges}"
    );
    fleet.assert_connected(&ids, "after the compaction");
}

/// A plain `etcdctl put` (no lease) over a live entry is not another
/// instance's registration: skyapi puts its own back on its lease, and the
/// close deletes it. Overwritten again just before a close, the close still
/// deletes it, and skyapi logs what etcd did.
#[test]
fn an_entry_overwritten_without_a_lease_is_restored_and_deleted_on_close() {
    let _w = watchdog(TEST_LIMIT);
    const T: u64 = 6;
    let etcd = Etcd::start_new();
    let sky = Skyapi::start(&etcd, &["--timeout", "6"]);
    let fleet = Fleet::new();
    let list = [("foo", 9999), ("bar", 8888)];
    let ids: Vec<ClientId> = list
        .iter()
        .map(|&(s, p)| fleet.register(s, &sky.url(&query(s, p))))
        .collect();
    let lease = common_lease(&entries(&etcd, ROOT));
    let want = on_lease(&list, T, lease);
    let bogus = json!({"host": "192.0.2.66", "port": 1, "priority": 1, "weight": 100, "ttl": T});

    let t0 = Instant::now();
    etcd.put(&key("foo", 9999), &bogus.to_string());
    wait_entries(
        &etcd,
        &want,
        t0,
        Duration::from_secs(T / 3 + 2),
        "restored on our lease",
    );
    let mut ws = fleet.take(ids[0]);
    let closed = Instant::now();
    close(&mut ws, Duration::from_secs(2));
    within(
        "foo deleted on close",
        closed,
        DELETE_WITHIN,
        || match entries(&etcd, ROOT).get(&key("foo", 9999)) {
            None => Ok(()),
            Some(e) => Err(format!("{e:?}")),
        },
    );

    // Overwritten and closed at once: whichever skyapi handles first, the
    // key must go.
    let mut ws = fleet.take(ids[1]);
    etcd.put(&key("bar", 8888), &bogus.to_string());
    let closed = Instant::now();
    close(&mut ws, Duration::from_secs(2));
    within(
        "bar deleted on close",
        closed,
        DELETE_WITHIN,
        || match entries(&etcd, ROOT).get(&key("bar", 8888)) {
            None => Ok(()),
            Some(e) => Err(format!("{e:?}")),
        },
    );
    assert!(
        !sky.logs().iter().any(|l| l.contains("was not deleted")),
        "every delete deleted: {:#?}",
        sky.logs()
    );
}

/// Registrations come and go at a few hundred per second while an operator
/// deletes a live entry: it is restored within T/3 + 2 s anyway.
#[test]
fn a_deleted_entry_is_restored_under_churn() {
    let _w = watchdog(TEST_LIMIT);
    const T: u64 = 6;
    let etcd = Etcd::start_new();
    let sky = Skyapi::start(&etcd, &["--timeout", "6"]);
    let fleet = Fleet::new();
    let live = fleet.register("live", &sky.url(&query("live", 9999)));
    let lease = common_lease(&entries(&etcd, ROOT));
    let want = on_lease(&[("live", 9999)], T, lease);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let churners: Vec<_> = (0..12u16)
        .map(|t| {
            let (stop, done) = (stop.clone(), done.clone());
            let base = sky.url("");
            std::thread::spawn(move || {
                let mut i = 0u16;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let port = 10_000 + t * 1000 + i % 1000;
                    let (mut ws, _) = connect(&format!("{base}{}", query("churn", port)));
                    close(&mut ws, Duration::from_secs(5));
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let before = done.load(std::sync::atomic::Ordering::Relaxed);
    let t0 = Instant::now();
    etcd.del(&key("live", 9999));
    within(
        "the live entry restored under churn",
        t0,
        Duration::from_secs(T / 3 + 2),
        || match entries(&etcd, ROOT).get(&key("live", 9999)) {
            Some(got) if *got == want[&key("live", 9999)] => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    let rate = (done.load(std::sync::atomic::Ordering::Relaxed) - before) as f64
        / t0.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in churners {
        c.join().expect("a churn thread");
    }
    eprintln!("churn: {rate:.0} registrations/s");
    assert!(rate >= 50.0, "the churn ran ({rate:.0}/s)");
    fleet.assert_connected(&[live], "under churn");
}

/// etcd refuses one registration's value (larger than its request limit):
/// only that registration fails; another connection holding the same key
/// keeps it, and its close deletes it.
#[test]
fn a_refused_value_fails_only_its_registration() {
    let _w = watchdog(TEST_LIMIT);
    // The host makes every put of this key far larger than its delete; the
    // limit lies between the two values' puts (measured with etcd 3.4: 267
    // and 285 bytes).
    let host = format!("{}.{}.example.com", "h".repeat(60), "h".repeat(30));
    let etcd = Etcd::start_with(&["--max-request-bytes", "277"], None);
    let sky = Skyapi::start(&etcd, &["--timeout", "6"]);
    let fleet = Fleet::new();
    let small = sky.url(&format!(
        "/provide?service=foo&port=9999&host={host}&priority=0&weight=0&ttl=1"
    ));
    let large = sky.url(&format!(
        "/provide?service=foo&port=9999&host={host}&priority=65535&weight=65535&ttl=2147483647"
    ));
    let k = format!(
        "/skydns/local/skydns/services/foo/{}",
        sha1_hex(&format!("fooservices{host}9999"))
    );
    let a = fleet.register("small", &small);
    let held = entries(&etcd, ROOT);
    assert_eq!(held.len(), 1, "{held:#?}");
    assert_eq!(held[&k].0["priority"], 0);

    let b = fleet.connect("large", &large);
    within(
        "the large one refused",
        Instant::now(),
        Duration::from_secs(5),
        || {
            let seen = fleet.seen(b);
            match (&seen.end, seen.texts.first()) {
                (Some(_), Some(t)) if t.starts_with("ERROR") => Ok(()),
                _ => Err(format!("{seen:?}")),
            }
        },
    );
    assert_eq!(entries(&etcd, ROOT), held, "the small one keeps the key");
    fleet.assert_connected(&[a], "after the other registration was refused");

    let mut ws = fleet.take(a);
    let closed = Instant::now();
    close(&mut ws, Duration::from_secs(2));
    within(
        "deleted with its last holder",
        closed,
        DELETE_WITHIN,
        || {
            let got = entries(&etcd, ROOT);
            got.is_empty()
                .then_some(())
                .ok_or_else(|| format!("{got:#?}"))
        },
    );
}

/// The cost figures of BENCHMARKS.md, "The reconcile" (issue 10): one idle
/// instance with 1,000 connections beside 100,000 entries of other
/// instances, as etcd's own /metrics count it; the two candidates for the
/// reconcile; the cost of the others' churn reaching this instance through
/// its watch; and skyapi's CPU while 2,000 connections wait for an
/// unreachable etcd. Asserts the goal (≤ 1 KiB/s, ≤ 0.5 requests/s idle).
/// `cargo test --release --test faults fleet_cost -- --ignored --nocapture`.
#[test]
#[ignore]
fn fleet_cost_is_independent_of_fleet_size() {
    let _w = watchdog(Duration::from_secs(600));
    const OWN: usize = 1000;
    const FOREIGN: usize = 100_000;
    const IDLE: Duration = Duration::from_secs(30);
    let dir = "/skydns/local/skydns/services/";
    let etcd = Etcd::start_new();
    let t = Instant::now();
    fill_foreign(&etcd, dir, FOREIGN);
    eprintln!("{FOREIGN} foreign entries put in {:?}", t.elapsed());
    let sky = Skyapi::start(&etcd, &["--timeout", "30"]);
    let fleet = Fleet::new();
    for i in 0..OWN {
        fleet.register("own", &sky.url(&query("own", 20_000 + i as u16)));
    }
    std::thread::sleep(Duration::from_secs(3));

    let before = EtcdLoad::read(&etcd);
    let t0 = Instant::now();
    std::thread::sleep(IDLE);
    let idle = EtcdLoad::read(&etcd).rate_since(&before, t0.elapsed().as_secs_f64());
    eprintln!(
        "idle, {OWN} own connections, {FOREIGN} foreign entries: {:.0} B/s sent, {:.2} requests/s",
        idle.0, idle.1
    );

    // The other candidate: LeaseTimeToLive with keys, once per TTL/3.
    let lease = common_lease(&entries(&etcd, "/skydns/local/skydns/services/own/"));
    let before = EtcdLoad::read(&etcd);
    let out = etcd
        .etcdctl(&["lease", "timetolive", "--keys", &format!("{lease:x}")])
        .unwrap_or_else(|e| panic!("{e}"));
    let ttl_keys = EtcdLoad::read(&etcd).sent_bytes - before.sent_bytes;
    eprintln!(
        "LeaseTimeToLive(keys) of {OWN} keys: {ttl_keys:.0} B per call ({} B of text), \
         {:.0} B/s at one call per TTL/3 (10 s)",
        out.len(),
        ttl_keys / 10.0
    );

    // The others' churn, seen through this instance's watch: the same
    // churn with and without skyapi running, the difference is its share.
    let churn = |label: &str| {
        let before = EtcdLoad::read(&etcd);
        let t0 = Instant::now();
        foreign_churn(&etcd, dir, 100, 10);
        let rate = EtcdLoad::read(&etcd).rate_since(&before, t0.elapsed().as_secs_f64());
        eprintln!("{label}: {:.0} B/s sent, {:.1} requests/s", rate.0, rate.1);
        rate
    };
    let with =
        churn("others' churn (100 registrations/s, each a put and a delete), skyapi watching");
    drop(fleet);
    drop(sky);
    std::thread::sleep(Duration::from_secs(1));
    let without = churn("the same churn, no skyapi");
    eprintln!(
        "per instance: 200 events/s, {:.0} B/s through its watch",
        with.0 - without.0
    );

    assert!(idle.0 <= 1024.0, "idle: {:.0} B/s sent", idle.0);
    assert!(idle.1 <= 0.5, "idle: {:.2} requests/s", idle.1);
}

/// skyapi's CPU while 2,000 connections wait for their entry with etcd
/// unreachable (issue 10: they must not poll). Prints the figure for
/// BENCHMARKS.md ("The reconcile"). `cargo test --release --test faults
/// waiting_connections_cpu -- --ignored --nocapture`.
#[test]
#[ignore]
fn waiting_connections_cpu() {
    let _w = watchdog(Duration::from_secs(300));
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let nowhere = format!("http://{}", dead.local_addr().expect("addr"));
    drop(dead);
    let etcd = Etcd::start_new();
    let sky = Skyapi::start(&etcd, &["--timeout", "30", "--etcd-api", &nowhere]);
    let fleet = Fleet::new();
    for i in 0..2000u16 {
        fleet.connect("waiting", &sky.url(&query("wait", 20_000 + i)));
    }
    std::thread::sleep(Duration::from_secs(3));
    let c0 = cpu_seconds(sky.pid());
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(20));
    let share = (cpu_seconds(sky.pid()) - c0) / t0.elapsed().as_secs_f64();
    eprintln!(
        "2000 connections waiting, etcd unreachable: {:.1} % of a core",
        share * 100.0
    );
    assert!(share < 0.05, "{:.1} % of a core", share * 100.0);
}
