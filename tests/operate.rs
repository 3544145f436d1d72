//! Operating skyapi (issue 5), end to end: `/healthz`, `/metrics` and
//! `/services` on the real binary; the `skyapi provide` sidecar against real
//! servers that are stopped and restarted; flags from `SKYAPI_<FLAG>`; and
//! etcd with authentication (expiring simple tokens) and with TLS client
//! certificates.
//!
//! Every test starts its own etcd and processes on ephemeral loopback ports.
//! Changes are awaited by polling against a deadline; the few "nothing
//! happens" checks watch for a bounded window longer than the time in which
//! it would have happened. The backoff test is the one place that waits a
//! fixed time on purpose: it measures what the sidecar does during it.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use support::operate::*;
use support::*;

/// Upper bound for any single test; the watchdog ends the run past it.
const TEST_LIMIT: Duration = Duration::from_secs(90);
/// Where entries live with the default `--etcd-prefix` and `--dns-root`.
const ROOT: &str = "/skydns/";
/// etcd's root user in the auth test, for reading back.
const ROOT_USER: &str = support::etcd::ROOT_USER;

// --------------------------------------------------------------- helpers

/// The original's id for one category: SHA-1 hex of service, category,
/// host and port concatenated.
fn expected_id(service: &str, category: &str, host: &str, port: u16) -> String {
    sha1_hex(&format!("{service}{category}{host}{port}"))
}

/// The key of `service` on `port`, registered from 127.0.0.1 with the
/// default root and category.
fn local_key(service: &str, port: u16) -> String {
    format!(
        "/skydns/local/skydns/services/{service}/{}",
        expected_id(service, "services", "127.0.0.1", port)
    )
}

fn parse_json(raw: &str) -> Value {
    serde_json::from_str(raw).unwrap_or_else(|e| panic!("not JSON ({e}): {raw:?}"))
}

/// A plain GET: status, head and body.
fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let (code, text) = http_get(addr, path);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("GET {path}: no end of head in {text:?}"));
    (code, head.to_string(), body.to_string())
}

/// `/healthz`: status and body.
fn healthz(addr: SocketAddr) -> (u16, String) {
    let (code, _, body) = get(addr, "/healthz");
    (code, body)
}

/// `/services` parsed.
fn services(addr: SocketAddr, query: &str) -> Vec<Value> {
    let (code, head, body) = get(addr, &format!("/services{query}"));
    assert_eq!(code, 200, "GET /services{query}: {head}\n{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "GET /services{query}: {head}"
    );
    match parse_json(&body) {
        Value::Array(list) => list,
        other => panic!("/services{query} is not a JSON array: {other}"),
    }
}

/// A one-line reason: the body is one non-empty line (a final newline
/// allowed).
fn assert_one_line(what: &str, body: &str) {
    let line = body.strip_suffix('\n').unwrap_or(body);
    assert!(
        !line.trim().is_empty() && !line.contains('\n') && !line.contains('\r'),
        "{what}: want a one-line reason, got {body:?}"
    );
}

/// Polls `etcd` until `key` is present (`Some(value)`) or absent (`None`)
/// as wanted; returns the value and how long it took.
fn wait_key(
    what: &str,
    within: Duration,
    mut read: impl FnMut() -> BTreeMap<String, (String, i64)>,
    key: &str,
    present: bool,
) -> (Option<(String, i64)>, Duration) {
    let start = Instant::now();
    loop {
        let got = read().get(key).cloned();
        if got.is_some() == present {
            return (got, start.elapsed());
        }
        if start.elapsed() >= within {
            panic!(
                "{what}: {key} still {} after {within:?}",
                if present { "missing" } else { "present" }
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn etcd_reader(etcd: &Etcd) -> impl FnMut() -> BTreeMap<String, (String, i64)> + '_ {
    move || etcd.get_prefix_with_lease(ROOT)
}

fn node_reader<'a>(
    node: &'a EtcdNode,
    user: Option<&'a str>,
) -> impl FnMut() -> BTreeMap<String, (String, i64)> + 'a {
    move || node.get_prefix(user, ROOT)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Checks that `cond` holds at every look, `period` apart, for `window`.
fn holds_every(window: Duration, period: Duration, mut cond: impl FnMut() -> Result<(), String>) {
    let start = Instant::now();
    loop {
        if let Err(why) = cond() {
            panic!("after {:?} of {window:?}: {why}", start.elapsed());
        }
        if start.elapsed() >= window {
            return;
        }
        thread::sleep(period);
    }
}

/// Reads what the server has sent so far without waiting (answering its
/// pings, so a client the test holds is not dropped as silent), keeping a
/// text message (the welcome) when one comes.
fn pump(ws: &mut Ws, welcome: &mut Option<String>) {
    match next_event(ws, Duration::ZERO) {
        Some(Event::Text(t)) => *welcome = Some(t),
        Some(e @ (Event::Close(_) | Event::Ended(_) | Event::Binary(_))) => {
            panic!("the held connection: {e:?}")
        }
        _ => {}
    }
}

// ------------------------------------------------------ the exposition

/// A `/metrics` page that `promtool check metrics` accepted: each series
/// (`name{labels}` as written) and its value, and each family's type.
struct Exposition {
    samples: BTreeMap<String, f64>,
    types: BTreeMap<String, String>,
    text: String,
}

impl Exposition {
    /// The value of a series, written exactly as the server writes it.
    fn get(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no series {series} in:\n{}", self.text))
    }

    /// Reads a page promtool has checked: no validation of its own.
    fn read(text: &str) -> Exposition {
        let mut samples = BTreeMap::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                if let Some((name, kind)) = rest.split_once(' ') {
                    types.insert(name.to_string(), kind.to_string());
                }
            } else if let Some((series, value)) = line.rsplit_once(' ') {
                if !line.starts_with('#') {
                    let value = match value {
                        "+Inf" => f64::INFINITY,
                        v => v
                            .parse()
                            .unwrap_or_else(|_| panic!("value of {line:?} does not parse")),
                    };
                    samples.insert(series.to_string(), value);
                }
            }
        }
        Exposition {
            samples,
            types,
            text: text.to_string(),
        }
    }
}

/// GETs `/metrics`, checks the content type, has `promtool check metrics`
/// check the format, and reads it.
fn scrape(addr: SocketAddr) -> Exposition {
    let (code, head, body) = get(addr, "/metrics");
    assert_eq!(code, 200, "GET /metrics: {head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "GET /metrics content type: {head}"
    );
    promtool::check_metrics(&body);
    Exposition::read(&body)
}

// --------------------------------------------------------------- /healthz

#[test]
fn healthz_follows_etcd_down_and_up() {
    let _w = watchdog(TEST_LIMIT);
    let mut etcd = Etcd::start_new();
    // --timeout 6: the lease is kept alive every 2 s, so a stopped etcd is
    // noticed within about 2 s + one request timeout.
    let sky = Skyapi::start(&etcd, &["--timeout", "6"]);
    let addr = sky.connect_addr();

    eventually("/healthz 200 with etcd up", Duration::from_secs(10), || {
        let (code, body) = healthz(addr);
        (code == 200).then_some(body)
    });
    let (code, head, body) = get(addr, "/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"), "{head}");

    etcd.stop();
    let stopped = Instant::now();
    let reason = eventually(
        "/healthz 503 once etcd is stopped",
        Duration::from_secs(15),
        || {
            let asked = Instant::now();
            let (code, body) = healthz(addr);
            // Answered from the worker's last known state, never by asking etcd
            // (whose requests time out after 1.5 s).
            assert!(
                asked.elapsed() < Duration::from_secs(1),
                "/healthz took {:?} with etcd down: it must not wait for etcd",
                asked.elapsed()
            );
            (code == 503).then_some(body)
        },
    );
    assert_one_line("/healthz 503", &reason);
    assert!(
        reason.starts_with("etcd unavailable for "),
        "503 reason should say etcd is unavailable and for how long: {reason:?}"
    );
    let age = |reason: &str| -> u64 {
        reason
            .strip_prefix("etcd unavailable for ")
            .and_then(|r| r.split_once("s:"))
            .and_then(|(n, _)| n.parse().ok())
            .unwrap_or_else(|| panic!("no age in {reason:?}"))
    };
    let first_age = age(&reason);
    assert!(
        first_age <= stopped.elapsed().as_secs() + 1,
        "age {first_age}s in {reason:?}, but etcd stopped {:?} ago",
        stopped.elapsed()
    );
    assert_eq!(scrape(addr).get("skyapi_etcd_up"), 0.0);

    // A registration while etcd is down is queued, listed as not stored.
    let mut pending = connect_raw(&sky.url("/provide?service=foo&port=9999&host=127.0.0.1"));
    let mut welcome = None;
    let listed = eventually(
        "the queued registration in /services",
        Duration::from_secs(5),
        || {
            pump(&mut pending, &mut welcome);
            let list = services(addr, "");
            (list.len() == 1).then_some(list)
        },
    );
    assert_eq!(listed[0]["stored"], false, "{listed:?}");
    eventually("a pending key in /metrics", Duration::from_secs(5), || {
        pump(&mut pending, &mut welcome);
        (scrape(addr).get("skyapi_worker_pending_keys") >= 1.0).then_some(())
    });
    assert!(welcome.is_none(), "welcomed with etcd down: {welcome:?}");
    // The age counts from when etcd went away.
    let later = eventually("the 503's age grows", Duration::from_secs(5), || {
        pump(&mut pending, &mut welcome);
        let (code, body) = healthz(addr);
        assert_eq!(code, 503, "{body}");
        (age(&body) > first_age).then_some(body)
    });
    assert!(age(&later) <= stopped.elapsed().as_secs() + 1, "{later:?}");

    etcd.start();
    eventually(
        "/healthz 200 after etcd restarts",
        Duration::from_secs(15),
        || {
            pump(&mut pending, &mut welcome);
            let (code, body) = healthz(addr);
            (code == 200 && body == "ok\n").then_some(())
        },
    );
    let text = eventually(
        "the queued registration is stored",
        Duration::from_secs(10),
        || {
            pump(&mut pending, &mut welcome);
            welcome.clone()
        },
    );
    assert_eq!(parse_json(&text)["key"], local_key("foo", 9999).as_str());
    assert!(etcd.get_prefix(ROOT).contains_key(&local_key("foo", 9999)));
    assert_eq!(services(addr, "")[0]["stored"], true);
    let m = scrape(addr);
    assert_eq!(m.get("skyapi_etcd_up"), 1.0);
    assert_eq!(m.get("skyapi_worker_pending_keys"), 0.0);
}

// --------------------------------------------------------------- /metrics

#[test]
fn metrics_are_well_formed_and_count_a_registration_lifecycle() {
    let _w = watchdog(TEST_LIMIT);
    let etcd = Etcd::start_new();
    let sky = Skyapi::start(&etcd, &[]);
    let addr = sky.connect_addr();

    let m = eventually("etcd up in /metrics", Duration::from_secs(10), || {
        let m = scrape(addr);
        (m.get("skyapi_etcd_up") == 1.0).then_some(m)
    });
    assert_eq!(
        m.get(&format!(
            "skyapi_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
    for (family, kind) in [
        ("skyapi_connections_open", "gauge"),
        ("skyapi_registrations_total", "counter"),
        ("skyapi_removals_total", "counter"),
        ("skyapi_etcd_requests_total", "counter"),
        ("skyapi_etcd_request_duration_seconds", "histogram"),
        ("skyapi_etcd_lease_regrants_total", "counter"),
        ("skyapi_worker_queue_depth", "gauge"),
        ("skyapi_connections_max", "gauge"),
        ("skyapi_timeout_seconds", "gauge"),
        ("skyapi_limit_hits_total", "counter"),
    ] {
        assert_eq!(
            m.types.get(family).map(String::as_str),
            Some(kind),
            "family {family}"
        );
    }
    assert_eq!(m.get("skyapi_connections_open"), 0.0);
    assert_eq!(m.get("skyapi_connections_max"), 10000.0);
    assert_eq!(m.get("skyapi_timeout_seconds"), 30.0);
    assert_eq!(m.get("skyapi_registrations_total{outcome=\"stored\"}"), 0.0);
    assert!(m.get("skyapi_etcd_requests_total{op=\"grant\",outcome=\"ok\"}") >= 1.0);

    let (mut ws, welcome) = register(&sky.url("/provide?service=foo&port=9999&host=127.0.0.1"));
    assert_eq!(welcome["key"], local_key("foo", 9999).as_str());
    let m = scrape(addr);
    assert_eq!(m.get("skyapi_registrations_total{outcome=\"stored\"}"), 1.0);
    assert_eq!(m.get("skyapi_connections_open"), 1.0);
    assert!(m.get("skyapi_etcd_requests_total{op=\"put\",outcome=\"ok\"}") >= 1.0);
    assert!(m.get("skyapi_etcd_request_duration_seconds_count{op=\"put\"}") >= 1.0);

    close(&mut ws, Duration::from_secs(5));
    let m = eventually(
        "removal counted, connection gone, delete sent",
        Duration::from_secs(5),
        || {
            let m = scrape(addr);
            (m.get("skyapi_removals_total{reason=\"close\"}") == 1.0
                && m.get("skyapi_connections_open") == 0.0
                && m.get("skyapi_etcd_requests_total{op=\"delete\",outcome=\"ok\"}") >= 1.0)
                .then_some(m)
        },
    );
    assert!(m.get("skyapi_etcd_request_duration_seconds_count{op=\"delete\"}") >= 1.0);
    assert!(m.get("skyapi_etcd_request_duration_seconds_sum{op=\"put\"}") > 0.0);
    for reason in ["ping_timeout", "error", "shutdown"] {
        assert_eq!(
            m.get(&format!("skyapi_removals_total{{reason=\"{reason}\"}}")),
            0.0,
            "reason {reason}"
        );
    }
    assert!(etcd.get_prefix(ROOT).is_empty(), "the entry is gone");

    // A refused request: missing port.
    try_refusal(&sky.url("/provide?service=foo")).expect("a request without port is refused");
    let m = eventually("refusal counted", Duration::from_secs(5), || {
        let m = scrape(addr);
        (m.get("skyapi_registrations_total{outcome=\"refused\"}") == 1.0
            && m.get("skyapi_connections_open") == 0.0)
            .then_some(m)
    });
    assert_eq!(m.get("skyapi_registrations_total{outcome=\"stored\"}"), 1.0);
    assert_eq!(
        m.get("skyapi_registrations_total{outcome=\"abandoned\"}"),
        0.0
    );
    assert_eq!(m.get("skyapi_etcd_lease_regrants_total"), 0.0);
}

// -------------------------------------------------------------- /services

#[test]
fn services_lists_live_registrations_and_filters() {
    let _w = watchdog(TEST_LIMIT);
    let etcd = Etcd::start_new();
    let sky = Skyapi::start(&etcd, &[]);
    let addr = sky.connect_addr();
    assert_eq!(services(addr, ""), Vec::<Value>::new(), "nothing yet");

    let before = now_unix();
    let (mut foo, _) =
        register(&sky.url("/provide?service=foo&port=9999&host=127.0.0.1&priority=5&weight=7"));
    let (bar, _) = register(&sky.url("/provide?service=bar&port=8080&host=192.0.2.7"));
    let after = now_unix();
    let foo_peer = foo.get_ref().local_addr().expect("local_addr").to_string();
    let bar_peer = bar.get_ref().local_addr().expect("local_addr").to_string();
    let foo_key = local_key("foo", 9999);
    let bar_key = format!(
        "/skydns/local/skydns/services/bar/{}",
        expected_id("bar", "services", "192.0.2.7", 8080)
    );

    let all = services(addr, "");
    assert_eq!(all.len(), 2, "{all:?}");
    // Sorted by key: .../bar/... before .../foo/...
    let (b, f) = (&all[0], &all[1]);
    let since = f["connected_since"]
        .as_u64()
        .unwrap_or_else(|| panic!("connected_since is not Unix seconds: {f}"));
    assert!(
        (before..=after).contains(&since),
        "connected_since {since} not in [{before}, {after}]"
    );
    assert_eq!(
        f,
        &json!({
            "service": "foo",
            "name": "foo.services.skydns.local.",
            "key": foo_key,
            "host": "127.0.0.1",
            "port": 9999,
            "priority": 5,
            "weight": 7,
            "peer": foo_peer,
            "connected_since": since,
            "stored": true,
        })
    );
    assert_eq!(
        b,
        &json!({
            "service": "bar",
            "name": "bar.services.skydns.local.",
            "key": bar_key,
            "host": "192.0.2.7",
            "port": 8080,
            "priority": 1,
            "weight": 100,
            "peer": bar_peer,
            "connected_since": b["connected_since"],
            "stored": true,
        })
    );

    let only_foo = services(addr, "?service=foo");
    assert_eq!(only_foo.len(), 1, "{only_foo:?}");
    assert_eq!(only_foo[0]["key"], foo_key.as_str());
    assert_eq!(services(addr, "?service=nosuch"), Vec::<Value>::new());

    for bad in [
        "?service=a/b",
        "?service=a%2Fb",
        "?service=",
        "?other=1",
        "?service=foo&x=1",
    ] {
        let (code, head, body) = get(addr, &format!("/services{bad}"));
        assert_eq!(code, 400, "/services{bad}: {head}\n{body}");
        assert_one_line(&format!("/services{bad}"), &body);
    }

    close(&mut foo, Duration::from_secs(5));
    eventually("foo leaves /services", Duration::from_secs(5), || {
        let all = services(addr, "");
        (all.len() == 1 && all[0]["key"] == bar_key.as_str()).then_some(())
    });
    assert_eq!(services(addr, "?service=foo"), Vec::<Value>::new());
    drop(bar);
}

// --------------------------------------------------------------- sidecar

/// Parses the delays of the sidecar's `reconnecting in N ms` lines.
fn reconnect_delays(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| {
            let at = l.find("reconnecting in ")? + "reconnecting in ".len();
            l[at..].split_whitespace().next()?.parse().ok()
        })
        .collect()
}

#[test]
fn sidecar_registers_and_reregisters_after_server_restart() {
    let _w = watchdog(TEST_LIMIT);
    let etcd = Etcd::start_new();
    let mut server = Proc::server_on(&etcd.endpoint(), free_port(), &[], true);
    let port = server.addr().port();
    let side = Proc::provide(
        &[
            "--server",
            &format!("ws://127.0.0.1:{port}"),
            "--service",
            "foo",
            "--port",
            "7001",
            "--priority",
            "3",
            "--weight",
            "7",
            "--ttl",
            "60",
            "--interval",
            "1",
        ],
        &[],
    );
    let key = local_key("foo", 7001);
    let (value, _) = wait_key(
        "sidecar registers",
        Duration::from_secs(10),
        etcd_reader(&etcd),
        &key,
        true,
    );
    assert_eq!(
        parse_json(&value.unwrap().0),
        json!({"host": "127.0.0.1", "port": 7001, "priority": 3, "weight": 7, "ttl": 60})
    );

    // A clean stop is a restart: the entry stays on the stopped server's
    // lease, and the sidecar's new registration moves it to the restarted
    // server's lease.
    let old_lease = etcd_reader(&etcd)()[&key].1;
    server.terminate();
    assert_eq!(
        etcd_reader(&etcd)().get(&key).map(|(_, l)| *l),
        Some(old_lease),
        "the entry outlives the stopped server"
    );
    let server = Proc::server_on(&etcd.endpoint(), port, &[], false);
    let moved = poll_until(Duration::from_secs(15), || {
        etcd_reader(&etcd)()
            .get(&key)
            .is_some_and(|(_, l)| *l != old_lease)
    });
    assert!(
        moved,
        "the sidecar re-registers with the restarted server: {:?}",
        etcd_reader(&etcd)().get(&key)
    );
    assert_eq!(
        side.lines_with("registered foo.services.skydns.local.")
            .len(),
        2,
        "one registration per server"
    );
    let listed = services(server.addr(), "?service=foo");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["stored"], true);
}

#[test]
fn sidecar_backoff_grows_and_does_not_spin_while_server_is_down() {
    let _w = watchdog(TEST_LIMIT);
    let etcd = Etcd::start_new();
    let mut server = Proc::server_on(&etcd.endpoint(), free_port(), &[], true);
    let port = server.addr().port();
    let side = Proc::provide(
        &[
            "--server",
            &format!("ws://127.0.0.1:{port}"),
            "--service",
            "foo",
            "--port",
            "7002",
            "--interval",
            "1",
        ],
        &[],
    );
    let key = local_key("foo", 7002);
    wait_key(
        "sidecar registers",
        Duration::from_secs(10),
        etcd_reader(&etcd),
        &key,
        true,
    );
    assert!(side.lines_with("reconnecting in").is_empty());

    // The server is down for 5 s; this is the measurement window.
    let window = Duration::from_secs(5);
    let cpu_before = side.cpu_time();
    server.terminate();
    thread::sleep(window);
    let cpu = side.cpu_time() - cpu_before;
    let delays = reconnect_delays(&side.logs());

    // The held registration was lost: one quick attempt (one server) after
    // [0, 250] ms, then delays drawn from [d/2, d] with d = 500 ms, 1 s,
    // 2 s, 4 s, ...: at most 6 attempts fit in 5 s, at least 3 must happen.
    assert!(
        (3..=7).contains(&delays.len()),
        "{} reconnect attempts in {window:?} (want a handful, 3..=7): {delays:?}",
        delays.len()
    );
    assert!(
        delays[0] <= 250,
        "the first attempt after losing a held registration waits {} ms, want [0, 250]",
        delays[0]
    );
    for (i, d) in delays.iter().enumerate().skip(1) {
        let cap = 500u64 << (i - 1).min(6);
        assert!(
            (cap / 2..=cap).contains(d),
            "delay #{i} is {d} ms, want within [{}, {cap}] ms: {delays:?}",
            cap / 2
        );
    }
    assert!(
        delays.windows(2).all(|w| w[1] >= w[0]),
        "delays must grow: {delays:?}"
    );
    assert!(
        cpu < Duration::from_millis(300),
        "the sidecar used {cpu:?} CPU in {window:?} with the server down: it spins"
    );

    // Back up: it registers again (after at most the current delay) ...
    let mut server = Proc::server_on(&etcd.endpoint(), port, &[], false);
    wait_key(
        "sidecar re-registers after the outage",
        Duration::from_secs(20),
        etcd_reader(&etcd),
        &key,
        true,
    );
    eventually(
        "the sidecar logs its re-registration",
        Duration::from_secs(5),
        || (side.lines_with("registered foo.services").len() == 2).then_some(()),
    );
    // ... and the backoff starts over from 500 ms after a registration.
    let seen = reconnect_delays(&side.logs()).len();
    server.terminate();
    let reset = eventually(
        "two reconnect lines after the second outage",
        Duration::from_secs(5),
        || reconnect_delays(&side.logs()).get(seen + 1).copied(),
    );
    assert!(
        (250..=500).contains(&reset),
        "first backoff delay after a registration is {reset} ms, want [250, 500]: the backoff must reset"
    );
    eprintln!("backoff: delays {delays:?} ms, CPU {cpu:?} in {window:?}; after reset {reset} ms");

    // SIGTERM while backing off: out promptly, status 0.
    let mut side = side;
    side.signal(libc::SIGTERM);
    let status = side
        .wait_exit(Duration::from_secs(2))
        .expect("the sidecar exits within 2 s of SIGTERM while backing off");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn sidecar_tcp_check_gates_the_registration() {
    let _w = watchdog(TEST_LIMIT);
    let etcd = Etcd::start_new();
    let sky = Skyapi::start(&etcd, &[]);
    let mut check = TcpCheck::start();
    let side = Proc::provide(
        &[
            "--server",
            &sky.url(""),
            "--service",
            "foo",
            "--port",
            "7003",
            "--check",
            &check.url(),
            "--interval",
            "1",
        ],
        &[],
    );
    let key = local_key("foo", 7003);
    wait_key(
        "registered while the check passes",
        Duration::from_secs(10),
        etcd_reader(&etcd),
        &key,
        true,
    );

    check.down();
    let (_, took) = wait_key(
        "deregistered when the check fails",
        Duration::from_secs(5),
        etcd_reader(&etcd),
        &key,
        false,
    );
    assert!(
        took <= Duration::from_secs(3),
        "a failing check (run every 1 s) took {took:?} to remove the entry"
    );
    assert!(
        !side.lines_with("check fails").is_empty(),
        "the state change is logged"
    );

    check.up();
    wait_key(
        "registered again when the check recovers",
        Duration::from_secs(5),
        etcd_reader(&etcd),
        &key,
        true,
    );
    wait_logged(&side, "registered foo.services", 2);
}

#[test]
fn sidecar_http_check_gates_the_registration() {
    let _w = watchdog(TEST_LIMIT);
    let etcd = Etcd::start_new();
    let sky = Skyapi::start(&etcd, &[]);
    // Failing from the start: nothing may be registered.
    let check = HttpCheck::start(503);
    let side = Proc::provide(
        &[
            "--server",
            &sky.url(""),
            "--service",
            "web",
            "--port",
            "7004",
            "--check",
            &check.url("/health"),
            "--interval",
            "1",
        ],
        &[],
    );
    let key = local_key("web", 7004);
    let window = Duration::from_millis(2500);
    if let Err(at) = holds_for(window, || {
        thread::sleep(Duration::from_millis(100));
        etcd.get_prefix(ROOT).is_empty()
    }) {
        panic!("registered after {at:?} although the check answers 503");
    }
    assert!(
        check.hits() >= 2,
        "the check was probed {} times in {window:?} (every 1 s expected)",
        check.hits()
    );
    assert!(!side.lines_with("check fails").is_empty());

    check.set_status(200);
    wait_key(
        "registered once the check answers 200",
        Duration::from_secs(5),
        etcd_reader(&etcd),
        &key,
        true,
    );
    check.set_status(503);
    wait_key(
        "deregistered when the check answers 503",
        Duration::from_secs(5),
        etcd_reader(&etcd),
        &key,
        false,
    );
    check.set_status(200);
    wait_key(
        "registered again when the check answers 200",
        Duration::from_secs(5),
        etcd_reader(&etcd),
        &key,
        true,
    );
    wait_logged(&side, "registered web.services", 2);
}

#[test]
fn sidecar_sigterm_exits_zero_and_removes_the_entry_at_once() {
    let _w = watchdog(TEST_LIMIT);
    let etcd = Etcd::start_new();
    let sky = Skyapi::start(&etcd, &[]);
    let mut side = Proc::provide(
        &[
            "--server",
            &sky.url(""),
            "--service",
            "foo",
            "--port",
            "7005",
            "--interval",
            "1",
        ],
        &[],
    );
    let key = local_key("foo", 7005);
    wait_key(
        "sidecar registers",
        Duration::from_secs(10),
        etcd_reader(&etcd),
        &key,
        true,
    );

    side.signal(libc::SIGTERM);
    let (_, took) = wait_key(
        "entry removed after SIGTERM",
        Duration::from_secs(5),
        etcd_reader(&etcd),
        &key,
        false,
    );
    assert!(
        took <= Duration::from_millis(1500),
        "the entry went {took:?} after SIGTERM, want about 1 s at most"
    );
    let status = side
        .wait_exit(Duration::from_secs(5))
        .expect("the sidecar exits within 5 s of SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
    // A clean websocket close on the server's side, not an error.
    eventually(
        "the server counts a clean close",
        Duration::from_secs(5),
        || {
            let m = scrape(sky.connect_addr());
            (m.get("skyapi_removals_total{reason=\"close\"}") == 1.0).then_some(())
        },
    );
    assert_eq!(
        scrape(sky.connect_addr()).get("skyapi_removals_total{reason=\"error\"}"),
        0.0
    );
}

#[test]
fn sidecar_fails_over_between_servers() {
    let _w = watchdog(TEST_LIMIT);
    let etcd = Etcd::start_new();
    // The first server in the list is down at first.
    let first_port = free_port();
    let mut second = Proc::server_on(&etcd.endpoint(), free_port(), &[], true);
    let second_url = format!("ws://127.0.0.1:{}", second.addr().port());
    let first_url = format!("ws://127.0.0.1:{first_port}");
    let side = Proc::provide(
        &[
            "--server",
            &format!("{first_url},{second_url}"),
            "--service",
            "foo",
            "--port",
            "7006",
            "--interval",
            "1",
        ],
        &[],
    );
    let key = local_key("foo", 7006);
    wait_key(
        "registered with the second server",
        Duration::from_secs(10),
        etcd_reader(&etcd),
        &key,
        true,
    );
    // The welcome (and so the log line) follows the put that made the key.
    eventually(
        "the sidecar logs its registration at the second server",
        Duration::from_secs(5),
        || (side.lines_with(&format!("at {second_url}")).len() == 1).then_some(()),
    );
    assert_eq!(services(second.addr(), "?service=foo").len(), 1);

    // The first comes up and the second goes: the sidecar moves back.
    let first = Proc::server_on(&etcd.endpoint(), first_port, &[], false);
    second.terminate();
    eventually(
        "registered at the first server after the second stopped",
        Duration::from_secs(15),
        || (!side.lines_with(&format!("at {first_url}")).is_empty()).then_some(()),
    );
    wait_key(
        "entry back, held by the first server",
        Duration::from_secs(5),
        etcd_reader(&etcd),
        &key,
        true,
    );
    assert_eq!(services(first.addr(), "?service=foo").len(), 1);
}

#[test]
fn sidecar_treats_a_silent_server_as_dead_and_fails_over() {
    let _w = watchdog(TEST_LIMIT);
    let etcd = Etcd::start_new();
    let a = Proc::server_on(&etcd.endpoint(), free_port(), &[], true);
    let b = Proc::server_on(&etcd.endpoint(), free_port(), &[], true);
    let (a_url, b_url) = (a.url(""), b.url(""));
    let side = Proc::provide(
        &[
            "--server",
            &format!("{a_url},{b_url}"),
            "--service",
            "foo",
            "--port",
            "7008",
            "--interval",
            "1",
        ],
        &[],
    );
    let key = local_key("foo", 7008);
    wait_key(
        "registered with the first server",
        Duration::from_secs(10),
        etcd_reader(&etcd),
        &key,
        true,
    );
    assert_eq!(side.lines_with(&format!("at {a_url}")).len(), 1);

    // Frozen: TCP stays open, nothing answers the sidecar's pings.
    a.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    eventually(
        "registered with the second server after the first froze",
        Duration::from_secs(10),
        || (!side.lines_with(&format!("at {b_url}")).is_empty()).then_some(()),
    );
    let took = frozen.elapsed();
    // No pong for two intervals (2 s) is noticed at the next tick, then
    // one backoff delay (at most 500 ms).
    assert!(
        took <= Duration::from_secs(5),
        "moving off a frozen server took {took:?}"
    );
    assert!(
        !side.lines_with("no pong").is_empty(),
        "the loss is logged as a missing pong"
    );
    assert_eq!(services(b.addr(), "?service=foo").len(), 1);
    assert!(etcd.get_prefix(ROOT).contains_key(&key));
    // Dropping `a` SIGKILLs it, frozen or not.
}

#[test]
fn sidecar_keeps_its_queued_registration_while_etcd_is_down() {
    let _w = watchdog(TEST_LIMIT);
    let mut etcd = Etcd::start_new();
    // The default --timeout 30: the server pings every 10 s, so for a while
    // nothing but the pending registration happens on the connection.
    let sky = Skyapi::start(&etcd, &[]);
    let addr = sky.connect_addr();
    eventually("etcd up", Duration::from_secs(10), || {
        (healthz(addr).0 == 200).then_some(())
    });
    // The server learns that etcd is gone when it tries to store the
    // registration; no need to wait for a keepalive to fail first.
    etcd.stop();

    // The server is alive and queues the registration (README: "new
    // registrations are queued, not refused"); the sidecar should hold the
    // connection and wait for the welcome, not give up on a live server.
    let side = Proc::provide(
        &[
            "--server",
            &sky.url(""),
            "--service",
            "foo",
            "--port",
            "7009",
            "--interval",
            "1",
        ],
        &[],
    );
    eventually(
        "the sidecar's registration queued",
        Duration::from_secs(5),
        || (services(addr, "?service=foo").len() == 1).then_some(()),
    );
    // Longer than the sidecar's 5 s I/O timeout, shorter than a ping period.
    let window = Duration::from_secs(7);
    if let Err(at) = holds_for(window, || {
        thread::sleep(Duration::from_millis(200));
        side.lines_with("reconnecting in").is_empty()
    }) {
        panic!(
            "the sidecar dropped its queued registration on a live server after {at:?} \
             (etcd down, server up):\n{}\nserver abandoned registrations: {}",
            side.logs().join("\n"),
            scrape(addr).get("skyapi_registrations_total{outcome=\"abandoned\"}")
        );
    }
    assert_eq!(
        scrape(addr).get("skyapi_registrations_total{outcome=\"abandoned\"}"),
        0.0
    );

    // etcd back: the queued registration is stored and the sidecar welcomed
    // within the server's bound for pending work (2 s after etcd answers).
    etcd.start();
    let back = Instant::now();
    let key = local_key("foo", 7009);
    wait_key(
        "the queued sidecar registration is stored",
        Duration::from_secs(10),
        etcd_reader(&etcd),
        &key,
        true,
    );
    eventually(
        "the sidecar logs its registration",
        Duration::from_secs(5),
        || (!side.lines_with("registered foo.services").is_empty()).then_some(()),
    );
    assert!(
        back.elapsed() <= Duration::from_secs(4),
        "registered {:?} after etcd answered again",
        back.elapsed()
    );
}

#[test]
fn sidecar_rejects_bad_flags_before_connecting() {
    let _w = watchdog(TEST_LIMIT);
    // Nothing listens on port 1: a sidecar that got past validation would
    // keep retrying instead of exiting.
    let base = ["provide", "--server", "ws://127.0.0.1:1"];
    for (flag, extra) in [
        ("--port", &["--service", "foo", "--port", "0"][..]),
        ("--port", &["--service", "foo"]),
        ("--service", &["--service", "a/b", "--port", "1"]),
        (
            "--check",
            &["--service", "foo", "--port", "1", "--check", "udp://x:1"],
        ),
        (
            "--interval",
            &["--service", "foo", "--port", "1", "--interval", "0"],
        ),
        (
            "provide",
            &["--service", "foo", "--port", "1", "--ttl", "0"],
        ),
    ] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let done = run_to_exit(&args, Duration::from_secs(10));
        assert_eq!(done.status.code(), Some(2), "{args:?}: {:?}", done.stderr);
        assert!(
            done.stderr.len() == 1 && done.stderr[0].contains(flag),
            "{args:?}: want one line naming {flag}, got {:?}",
            done.stderr
        );
    }
    let done = run_to_exit(
        &["provide", "--service", "foo", "--port", "1"],
        Duration::from_secs(10),
    );
    assert_eq!(
        done.status.code(),
        Some(2),
        "no --server: {:?}",
        done.stderr
    );
    assert!(done.stderr.len() == 1 && done.stderr[0].contains("--server"));
}

// ----------------------------------------------------------- environment

#[test]
fn environment_supplies_flags_and_the_command_line_wins() {
    let _w = watchdog(TEST_LIMIT);
    let etcd = Etcd::start_new();
    let endpoint = etcd.endpoint();
    let base_env = [
        ("SKYAPI_ETCD_API", endpoint.as_str()),
        ("SKYAPI_LISTEN_ADDR", "127.0.0.1:0"),
        ("SKYAPI_TIMEOUT", "5"),
        ("SKYAPI_DNS_ROOT", "env.test."),
        ("SKYAPI_DEFAULT_CATEGORY", "envcat"),
    ];

    // Everything from the environment.
    let from_env = Proc::server(&[], &base_env);
    assert!(
        !from_env.lines_with("timeout 5s").is_empty(),
        "the listening line reports the timeout from SKYAPI_TIMEOUT"
    );
    let (_a, welcome) = register(&from_env.url("/provide?service=foo&port=9999"));
    let key = format!(
        "/skydns/test/env/envcat/foo/{}",
        expected_id("foo", "envcat", "127.0.0.1", 9999)
    );
    assert_eq!(welcome["key"], key.as_str(), "{welcome}");
    let got = etcd.get_prefix_with_lease(ROOT);
    let (raw, lease) = got
        .get(&key)
        .unwrap_or_else(|| panic!("{key} not in {got:?}"));
    assert_eq!(parse_json(raw)["ttl"], 5, "ttl from SKYAPI_TIMEOUT");
    assert_eq!(etcd.lease_ttl(*lease).map(|t| t.1), Some(5), "lease TTL");

    // Flags beat the same variables (a repeatable one too: the etcd in the
    // environment does not exist); the others still apply.
    let mut dead_etcd_env = base_env;
    dead_etcd_env[0] = ("SKYAPI_ETCD_API", "http://127.0.0.1:1");
    let flags_win = Proc::server(
        &[
            "--timeout",
            "7",
            "--dns-root",
            "cli.test",
            "--etcd-api",
            &endpoint,
        ],
        &dead_etcd_env,
    );
    let (_b, welcome) = register(&flags_win.url("/provide?service=foo&port=9999"));
    let key = format!(
        "/skydns/test/cli/envcat/foo/{}",
        expected_id("foo", "envcat", "127.0.0.1", 9999)
    );
    assert_eq!(welcome["key"], key.as_str(), "{welcome}");
    let got = etcd.get_prefix_with_lease(ROOT);
    let (raw, lease) = got
        .get(&key)
        .unwrap_or_else(|| panic!("{key} not in {got:?}"));
    assert_eq!(parse_json(raw)["ttl"], 7, "--timeout beats SKYAPI_TIMEOUT");
    assert_eq!(etcd.lease_ttl(*lease).map(|t| t.1), Some(7), "lease TTL");

    // A switch from the environment, and an empty variable is ignored.
    let switched = Proc::server(
        &[],
        &[
            ("SKYAPI_ETCD_API", endpoint.as_str()),
            ("SKYAPI_LISTEN_ADDR", "127.0.0.1:0"),
            ("SKYAPI_TIMEOUT", ""),
            ("SKYAPI_HOST_MUST_MATCH_PEER", "1"),
        ],
    );
    assert!(
        !switched.lines_with("timeout 30s").is_empty(),
        "empty SKYAPI_TIMEOUT must mean the default 30"
    );
    match try_connect(&switched.url("/provide?service=foo&port=9999&host=192.0.2.1")) {
        Err(e) => assert!(e.contains("403"), "want HTTP 403, got {e}"),
        Ok(_) => panic!("SKYAPI_HOST_MUST_MATCH_PEER=1 did not refuse a foreign host"),
    }

    // A bad value from the environment stops start-up like a bad flag.
    let mut bad = Proc::spawn(
        "skyapi",
        &[],
        &[
            ("SKYAPI_TIMEOUT", "1"),
            ("SKYAPI_LISTEN_ADDR", "127.0.0.1:0"),
        ],
    );
    let status = bad
        .wait_exit(Duration::from_secs(10))
        .expect("exits on a bad SKYAPI_TIMEOUT");
    assert_eq!(status.code(), Some(2), "{:?}", bad.logs());
    let logs = bad.logs();
    assert!(
        logs.len() == 1 && logs[0].contains("--timeout"),
        "want one line naming --timeout: {logs:?}"
    );

    // The sidecar reads SKYAPI_<FLAG> too, and its command line wins.
    let side = Proc::provide(
        &["--port", "7007", "--interval", "1"],
        &[
            ("SKYAPI_SERVER", &from_env.url("")),
            ("SKYAPI_SERVICE", "envsvc"),
            ("SKYAPI_PORT", "1"),
        ],
    );
    let key = format!(
        "/skydns/test/env/envcat/envsvc/{}",
        expected_id("envsvc", "envcat", "127.0.0.1", 7007)
    );
    wait_key(
        "sidecar configured from the environment registers",
        Duration::from_secs(10),
        etcd_reader(&etcd),
        &key,
        true,
    );
    drop(side);
}

// --------------------------------------------------------------- etcd auth

#[test]
fn etcd_auth_survives_token_expiry_and_a_wrong_password_is_unhealthy() {
    let _w = watchdog(TEST_LIMIT);
    // Simple tokens that expire one second after their last use (etcd
    // checks every second), so they expire between skyapi's requests.
    // Info level: etcd logs each token it deletes.
    let node = EtcdNode::start(&[
        "--auth-token",
        "simple",
        "--auth-token-ttl",
        "1",
        "--log-level",
        "info",
    ]);
    for args in support::etcd::AUTH_SETUP {
        node.must(None, args);
    }
    assert!(
        node.etcdctl(None, &["get", "--prefix", ROOT]).is_err(),
        "auth is not on: anonymous reads still work"
    );
    let root = Some(ROOT_USER);

    // --timeout 6: keepalive every 2 s, past the token's 1 s lifetime (it
    // rides on a stream opened once; the second registration below is the
    // first request after the token expired).
    let sky = Proc::server(
        &[
            "--listen-addr",
            "127.0.0.1:0",
            "--etcd-api",
            &node.endpoint(),
            "--etcd-user",
            "skyapi",
            "--timeout",
            "6",
            "--revoke-on-exit",
        ],
        &[("SKYAPI_ETCD_PASSWORD", "pw")],
    );
    eventually(
        "/healthz 200 as user skyapi",
        Duration::from_secs(10),
        || (healthz(sky.addr()).0 == 200).then_some(()),
    );
    let (mut first, welcome) = register(&sky.url("/provide?service=foo&port=9999&host=127.0.0.1"));
    let first_key = local_key("foo", 9999);
    assert_eq!(welcome["key"], first_key.as_str());
    let registered = Instant::now();
    let got = node.get_prefix(root, ROOT);
    let (_, lease) = got
        .get(&first_key)
        .unwrap_or_else(|| panic!("{first_key} not in {got:?}"))
        .clone();

    // Past the lease TTL (6 s) with tokens expiring all along: healthy, and
    // the first entry kept alive on its original lease.
    holds_every(
        Duration::from_secs(7).saturating_sub(registered.elapsed()),
        Duration::from_millis(500),
        || {
            // Keep answering pings: a silent client is dropped after 6 s.
            pump(&mut first, &mut None);
            let (code, body) = healthz(sky.addr());
            if code != 200 {
                return Err(format!("/healthz {code}: {body}"));
            }
            match node.get_prefix(root, ROOT).get(&first_key) {
                Some((_, l)) if *l == lease => Ok(()),
                other => Err(format!("first entry now {other:?}, lease was {lease}")),
            }
        },
    );
    assert!(registered.elapsed() > Duration::from_secs(6));
    assert!(
        node.lease_ttl(root, lease).is_some_and(|t| t > 0),
        "the lease is alive past its TTL: keepalives work with expired tokens"
    );

    // A registration with the token long expired.
    let (mut second, welcome) = register(&sky.url("/provide?service=bar&port=8080&host=127.0.0.1"));
    let second_key = local_key("bar", 8080);
    assert_eq!(welcome["key"], second_key.as_str());
    // etcd deleted skyapi's token, and skyapi presented it again for this
    // put: proof that the expiry really happened under skyapi's feet.
    eventually(
        "etcd refuses an expired token of skyapi's",
        Duration::from_secs(15),
        || {
            let log = node.log();
            (log.contains("deleted a simple token")
                && log.contains("\"user-name\":\"skyapi\"")
                && log.contains("invalid auth token"))
            .then_some(())
        },
    );
    let got = node.get_prefix(root, ROOT);
    assert!(
        got.contains_key(&first_key) && got.contains_key(&second_key),
        "{got:?}"
    );
    // A close deletes the key (a transaction comparing its lease) as skyapi.
    close(&mut second, Duration::from_secs(5));
    wait_key(
        "entry deleted under auth",
        Duration::from_secs(3),
        node_reader(&node, root),
        &second_key,
        false,
    );
    let m = scrape(sky.addr());
    for outcome in ["unavailable", "rejected"] {
        assert_eq!(
            m.get(&format!(
                "skyapi_etcd_requests_total{{op=\"put\",outcome=\"{outcome}\"}}"
            )),
            0.0,
            "a put failed ({outcome}) on the way: a token refresh must be invisible"
        );
    }

    // A stop with --revoke-on-exit revokes the lease as user skyapi: both
    // entries go.
    let mut sky = sky;
    sky.terminate();
    assert!(
        !sky.lines_with("revoked").is_empty(),
        "the lease is revoked at shutdown with the user's rights"
    );
    assert!(node.get_prefix(root, ROOT).is_empty());
    drop(first);

    // The wrong password: unhealthy, and nothing is written.
    let wrong = Proc::server(
        &[
            "--listen-addr",
            "127.0.0.1:0",
            "--etcd-api",
            &node.endpoint(),
            "--etcd-user",
            "skyapi",
            "--dns-root",
            "wrong.test",
        ],
        &[("SKYAPI_ETCD_PASSWORD", "not-the-password")],
    );
    let reason = eventually(
        "/healthz 503 with a wrong password",
        Duration::from_secs(10),
        || {
            let (code, body) = healthz(wrong.addr());
            (code == 503 && !body.contains("not reached yet")).then_some(body)
        },
    );
    assert_one_line("/healthz 503", &reason);
    eprintln!("wrong password: /healthz says {reason:?}");
    assert!(
        reason.to_ascii_lowercase().contains("auth"),
        "the reason should say authentication failed: {reason:?}"
    );
    let mut pending = connect_raw(&wrong.url("/provide?service=baz&port=1&host=127.0.0.1"));
    let window = Duration::from_secs(2);
    let start = Instant::now();
    while start.elapsed() < window {
        match next_event(&mut pending, Duration::from_millis(200)) {
            None | Some(Event::Ping(_) | Event::Pong(_)) => {}
            Some(other) => panic!("with a wrong etcd password the client got {other:?}"),
        }
    }
    assert!(
        node.get_prefix(root, "/skydns/test/wrong/").is_empty(),
        "an entry was written with a wrong password"
    );
    let listed = services(wrong.addr(), "");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["stored"], false, "{listed:?}");
}

// ---------------------------------------------------------------- etcd TLS

#[test]
fn etcd_tls_with_client_certificates() {
    let _w = watchdog(TEST_LIMIT);
    let pki = Pki::generate();
    let node = EtcdNode::start_tls(&pki);
    assert!(node.endpoint().starts_with("https://"));

    let sky = Proc::server(
        &[
            "--listen-addr",
            "127.0.0.1:0",
            "--etcd-api",
            &node.endpoint(),
            "--etcd-cacert",
            &pki.ca(),
            "--etcd-cert",
            &pki.client_cert(),
            "--etcd-key",
            &pki.client_key(),
        ],
        &[],
    );
    eventually("/healthz 200 over TLS", Duration::from_secs(10), || {
        (healthz(sky.addr()).0 == 200).then_some(())
    });
    let (mut ws, welcome) = register(&sky.url("/provide?service=foo&port=9999&host=127.0.0.1"));
    let key = local_key("foo", 9999);
    assert_eq!(welcome["key"], key.as_str());
    let got = node.get_prefix(None, ROOT);
    let (raw, lease) = got
        .get(&key)
        .unwrap_or_else(|| panic!("{key} not in {got:?}"));
    assert_eq!(
        parse_json(raw),
        json!({"host": "127.0.0.1", "port": 9999, "priority": 1, "weight": 100, "ttl": 30})
    );
    assert_ne!(*lease, 0);
    close(&mut ws, Duration::from_secs(5));
    wait_key(
        "entry deleted over TLS",
        Duration::from_secs(3),
        node_reader(&node, None),
        &key,
        false,
    );

    // The CA but no client certificate: etcd refuses the handshake.
    let no_cert = Proc::server(
        &[
            "--listen-addr",
            "127.0.0.1:0",
            "--etcd-api",
            &node.endpoint(),
            "--etcd-cacert",
            &pki.ca(),
            "--dns-root",
            "nocert.test",
        ],
        &[],
    );
    let reason = eventually(
        "/healthz 503 without a client certificate",
        Duration::from_secs(10),
        || {
            let (code, body) = healthz(no_cert.addr());
            (code == 503 && !body.contains("not reached yet")).then_some(body)
        },
    );
    assert_one_line("/healthz 503", &reason);
    eprintln!("no client certificate: /healthz says {reason:?}");
    let mut pending = connect_raw(&no_cert.url("/provide?service=foo&port=9999&host=127.0.0.1"));
    let window = Duration::from_secs(2);
    let start = Instant::now();
    while start.elapsed() < window {
        match next_event(&mut pending, Duration::from_millis(200)) {
            None | Some(Event::Ping(_) | Event::Pong(_)) => {}
            Some(other) => panic!("without a client certificate the client got {other:?}"),
        }
    }
    assert!(
        node.get_prefix(None, "/skydns/test/nocert/").is_empty(),
        "an entry was written without a client certificate"
    );
    assert_eq!(healthz(no_cert.addr()).0, 503);
}

/// Waits (3 s at most) until `needle` has been logged `times` times by the
/// sidecar: the key is stored before the welcome reaches the sidecar and it
/// logs, so a log check right after the key appears would race.
fn wait_logged(side: &Proc, needle: &str, times: usize) {
    assert!(
        poll_until(Duration::from_secs(3), || side.lines_with(needle).len()
            == times),
        "{times} lines with {needle:?} logged: {:?}",
        side.lines_with(needle)
    );
}
