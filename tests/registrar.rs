//! The registrar contract (issue 2), end to end: the real `skyapi` binary, a
//! real etcd, real websocket clients, and etcd read back with `etcdctl`.
//!
//! Each test starts its own etcd and skyapi on ephemeral loopback ports, so
//! tests run in parallel. Bounds ("deleted at once", "within --timeout") are
//! checked by polling against a deadline; the one negative check (a shared
//! key survives one close) watches for a bounded window instead.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;
use tungstenite::Message;

/// Known vector from the original Go skyapi: service foo, category services,
/// host 127.0.0.1, port 9999.
const FOO_ID: &str = "10ec6ea983c7a572acb0a023b9d645f6765c5a68";
const FOO_KEY: &str = "/skydns/local/skydns/services/foo/10ec6ea983c7a572acb0a023b9d645f6765c5a68";
/// Where entries live with the default `--etcd-prefix` and `--dns-root`.
const ROOT: &str = "/skydns/";
/// Upper bound for any single test; the watchdog ends the run past it.
const TEST_LIMIT: Duration = Duration::from_secs(90);
/// "Deleted at once" after a close, including etcd's round trip.
const DELETE_WITHIN: Duration = Duration::from_secs(2);

/// The original's id: SHA-1 of service, category (one label as text, several
/// as Go's `%#v` of a `[]string`), host and port, with no separators.
fn expected_id(service: &str, categories: &[&str], host: &str, port: u16) -> String {
    let category = match categories {
        [one] => one.to_string(),
        many => format!(
            "[]string{{{}}}",
            many.iter()
                .map(|c| format!("{c:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    sha1_hex(&format!("{service}{category}{host}{port}"))
}

fn parse(raw: &str) -> Value {
    serde_json::from_str(raw).unwrap_or_else(|e| panic!("etcd value is not JSON ({e}): {raw:?}"))
}

fn keys<V>(map: &BTreeMap<String, V>) -> Vec<&str> {
    map.keys().map(String::as_str).collect()
}

/// Polls until nothing is left under `prefix`; panics if that takes longer
/// than `bound` counted from `since`, showing what is left.
fn wait_until_empty(etcd: &Etcd, prefix: &str, since: Instant, bound: Duration) {
    loop {
        let left = etcd.get_prefix(prefix);
        if left.is_empty() {
            return;
        }
        if since.elapsed() > bound {
            panic!(
                "entries under {prefix} still present {:?} after the event (bound {bound:?}): {left:?}",
                since.elapsed()
            );
        }
        std::thread::sleep(POLL_TICK);
    }
}

// ---------------------------------------------------------------- register

#[test]
fn register_writes_exact_value_on_a_lease_and_welcomes() {
    let _w = watchdog(TEST_LIMIT);
    let etcd = Etcd::start_new();
    let sky = Skyapi::start(&etcd, &[]);

    let (_ws, welcome) = register(&sky.url("/provide?service=foo&port=9999&host=127.0.0.1"));
    assert_eq!(
        welcome["name"], "foo.services.skydns.local.",
        "welcome {welcome}"
    );
    assert_eq!(welcome["key"], FOO_KEY, "welcome {welcome}");

    // The welcome is sent once the entry is stored: no polling here.
    let got = etcd.get_prefix_with_lease(ROOT);
    assert_eq!(keys(&got), [FOO_KEY]);
    let (raw, lease) = &got[FOO_KEY];
    assert_eq!(
        parse(raw),
        json!({"host": "127.0.0.1", "port": 9999, "priority": 1, "weight": 100, "ttl": 30}),
        "raw value {raw}"
    );
    assert_ne!(*lease, 0, "entry is not attached to a lease");
    let (remaining, granted) = etcd.lease_ttl(*lease).expect("the entry's lease exists");
    assert_eq!(granted, 30, "lease TTL must be --timeout (default 30)");
    assert!(remaining > 0);
}

#[test]
fn defaults_use_peer_ip_and_timeout_as_ttl() {
    let _w = watchdog(TEST_LIMIT);
    let etcd = Etcd::start_new();
    let sky = Skyapi::start(&etcd, &["--timeout", "7"]);

    let (_ws, welcome) = register(&sky.url("/provide?service=web&port=8080"));
    let id = expected_id("web", &["services"], "127.0.0.1", 8080);
    let key = format!("/skydns/local/skydns/services/web/{id}");
    assert_eq!(
        welcome["name"], "web.services.skydns.local.",
        "welcome {welcome}"
    );
    assert_eq!(welcome["key"], key.as_str(), "welcome {welcome}");

    let got = etcd.get_prefix_with_lease(ROOT);
    assert_eq!(keys(&got), [key.as_str()]);
    let (raw, lease) = &got[&key];
    assert_eq!(
        parse(raw),
        json!({"host": "127.0.0.1", "port": 8080, "priority": 1, "weight": 100, "ttl": 7})
    );
    assert_eq!(
        etcd.lease_ttl(*lease).map(|t| t.1),
        Some(7),
        "lease TTL = --timeout"
    );
}

#[test]
fn unspecified_host_means_peer_ip() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&[]);
    for host in ["0.0.0.0", "::", "%3A%3A"] {
        let (mut ws, welcome) =
            register(&sky.url(&format!("/provide?service=foo&port=9999&host={host}")));
        assert_eq!(
            welcome["key"], FOO_KEY,
            "host={host}: the id uses the peer IP"
        );
        let got = etcd.get_prefix(ROOT);
        assert_eq!(keys(&got), [FOO_KEY], "host={host}");
        assert_eq!(parse(&got[FOO_KEY])["host"], "127.0.0.1", "host={host}");
        let t0 = Instant::now();
        close(&mut ws, DELETE_WITHIN);
        wait_until_empty(&etcd, ROOT, t0, DELETE_WITHIN);
    }
}

#[test]
fn dual_stack_listener_stores_ipv4_peers_as_plain_ipv4() {
    let _w = watchdog(TEST_LIMIT);
    let etcd = Etcd::start_new();
    // `:PORT` is the original's form for "all interfaces, IPv4 and IPv6".
    let sky = Skyapi::start(&etcd, &["--listen-addr", ":0"]);
    let port = sky.addr().port();

    let (_v4, welcome) = register(&format!(
        "ws://127.0.0.1:{port}/provide?service=foo&port=9999"
    ));
    assert_eq!(
        welcome["key"], FOO_KEY,
        "IPv4 peer must be 127.0.0.1, not ::ffff:127.0.0.1"
    );
    assert_eq!(parse(&etcd.get_prefix(ROOT)[FOO_KEY])["host"], "127.0.0.1");

    let (_v6, welcome) = register(&format!("ws://[::1]:{port}/provide?service=foo&port=9999"));
    let key6 = format!(
        "/skydns/local/skydns/services/foo/{}",
        expected_id("foo", &["services"], "::1", 9999)
    );
    assert_eq!(welcome["key"], key6.as_str());
    assert_eq!(parse(&etcd.get_prefix(ROOT)[&key6])["host"], "::1");
}

#[test]
fn explicit_host_priority_weight_ttl_and_names_are_stored() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&[]);
    let long = "a".repeat(63);
    let cases = [
        (
            "service=db&port=5432&host=192.0.2.7&priority=5&weight=0&ttl=60".to_string(),
            format!(
                "/skydns/local/skydns/services/db/{}",
                expected_id("db", &["services"], "192.0.2.7", 5432)
            ),
            json!({"host": "192.0.2.7", "port": 5432, "priority": 5, "weight": 0, "ttl": 60}),
        ),
        (
            "service=api&port=65535&host=db1.example.org&priority=0&weight=65535".to_string(),
            format!(
                "/skydns/local/skydns/services/api/{}",
                expected_id("api", &["services"], "db1.example.org", 65535)
            ),
            json!({"host": "db1.example.org", "port": 65535, "priority": 0, "weight": 65535, "ttl": 30}),
        ),
        (
            "service=v6&port=53&host=2001%3Adb8%3A%3A1".to_string(),
            format!(
                "/skydns/local/skydns/services/v6/{}",
                expected_id("v6", &["services"], "2001:db8::1", 53)
            ),
            json!({"host": "2001:db8::1", "port": 53, "priority": 1, "weight": 100, "ttl": 30}),
        ),
        (
            format!("service={long}&port=1&host=192.0.2.9"),
            format!(
                "/skydns/local/skydns/services/{long}/{}",
                expected_id(&long, &["services"], "192.0.2.9", 1)
            ),
            json!({"host": "192.0.2.9", "port": 1, "priority": 1, "weight": 100, "ttl": 30}),
        ),
    ];
    let mut open = Vec::new();
    for (query, key, value) in &cases {
        let (ws, welcome) = register(&sky.url(&format!("/provide?{query}")));
        assert_eq!(welcome["key"], key.as_str(), "{query}");
        let got = etcd.get_prefix(ROOT);
        let raw = got
            .get(key)
            .unwrap_or_else(|| panic!("{query}: {key} not in etcd: {got:?}"));
        assert_eq!(&parse(raw), value, "{query}");
        open.push(ws);
    }

    // Labels are stored lower-case.
    let (_ws, welcome) =
        register(&sky.url("/provide?service=Web_Api&port=80&category=Prod&host=192.0.2.8"));
    assert_eq!(
        welcome["name"], "web_api.prod.skydns.local.",
        "welcome {welcome}"
    );
    let key = welcome["key"].as_str().expect("welcome key is a string");
    let id = key
        .strip_prefix("/skydns/local/skydns/prod/web_api/")
        .unwrap_or_else(|| panic!("upper-case labels not lower-cased in key {key}"));
    assert!(
        id.len() == 40
            && id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "id {id:?} is not 40 lower-case hex digits"
    );
    assert_eq!(etcd.get_prefix(ROOT).len(), cases.len() + 1);
}

// ------------------------------------------------------- names and layout

#[test]
fn single_category_names_the_subdomain() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&[]);
    let (_ws, welcome) =
        register(&sky.url("/provide?service=foo&port=9999&host=127.0.0.1&category=production"));
    let key = "/skydns/local/skydns/production/foo/ab1bf2b93e9ea57648d14fc65411547dd9698818";
    assert_eq!(welcome["name"], "foo.production.skydns.local.");
    assert_eq!(welcome["key"], key);
    assert_eq!(keys(&etcd.get_prefix(ROOT)), [key]);
}

#[test]
fn multi_level_category_is_a_subdomain_chain() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&[]);

    let (_a, welcome) = register(
        &sky.url("/provide?service=foo&port=9999&host=127.0.0.1&category=services,production"),
    );
    // sha1 of `foo[]string{"services", "production"}127.0.0.19999`.
    let key2 =
        "/skydns/local/skydns/production/services/foo/c861a0497c69790adcb6ddcffce9d1d278cabea6";
    assert_eq!(welcome["name"], "foo.services.production.skydns.local.");
    assert_eq!(welcome["key"], key2);

    let (_b, welcome) =
        register(&sky.url("/provide?service=foo&port=9999&host=127.0.0.1&category=a,b,c"));
    let key3 = format!(
        "/skydns/local/skydns/c/b/a/foo/{}",
        expected_id("foo", &["a", "b", "c"], "127.0.0.1", 9999)
    );
    assert_eq!(welcome["name"], "foo.a.b.c.skydns.local.");
    assert_eq!(welcome["key"], key3.as_str());

    let got = etcd.get_prefix(ROOT);
    assert_eq!(keys(&got), {
        let mut k = vec![key3.as_str(), key2];
        k.sort();
        k
    });
}

#[test]
fn flags_set_root_prefix_default_category_and_ttl() {
    let _w = watchdog(TEST_LIMIT);
    let etcd = Etcd::start_new();
    let sky = Skyapi::start(
        &etcd,
        &[
            "--dns-root",
            "turtles.com",
            "--etcd-prefix",
            "/dns",
            "--default-category",
            "web",
            "--timeout",
            "5",
        ],
    );
    let (_ws, welcome) = register(&sky.url("/provide?service=foo&port=9999&host=127.0.0.1"));
    let key = format!(
        "/dns/com/turtles/web/foo/{}",
        expected_id("foo", &["web"], "127.0.0.1", 9999)
    );
    assert_eq!(
        welcome["name"], "foo.web.turtles.com.",
        "trailing dot optional in --dns-root"
    );
    assert_eq!(welcome["key"], key.as_str());
    let all = etcd.get_all();
    assert_eq!(
        keys(&all),
        [key.as_str()],
        "only the entry, under --etcd-prefix"
    );
    assert_eq!(
        parse(&all[&key]),
        json!({"host": "127.0.0.1", "port": 9999, "priority": 1, "weight": 100, "ttl": 5})
    );
}

#[test]
fn prefix_param_shortens_the_id() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&[]);
    let (_a, welcome) =
        register(&sky.url("/provide?service=foo&port=9999&host=127.0.0.1&prefix=dc1"));
    let key_a = format!("/skydns/local/skydns/services/foo/dc1-{}", &FOO_ID[..20]);
    assert_eq!(welcome["key"], key_a.as_str());
    assert_eq!(welcome["name"], "foo.services.skydns.local.");

    let (_b, welcome) =
        register(&sky.url("/provide?service=foo&port=9999&host=127.0.0.1&prefix=DC2"));
    let key_b = format!("/skydns/local/skydns/services/foo/dc2-{}", &FOO_ID[..20]);
    assert_eq!(
        welcome["key"],
        key_b.as_str(),
        "prefix is stored lower-case"
    );

    assert_eq!(
        keys(&etcd.get_prefix(ROOT)),
        [key_a.as_str(), key_b.as_str()]
    );
}

#[test]
fn id_matches_original_go_skyapi() {
    // The harness's own formula against the vectors first.
    assert_eq!(expected_id("foo", &["services"], "127.0.0.1", 9999), FOO_ID);
    assert_eq!(
        expected_id("foo", &["services", "production"], "127.0.0.1", 9999),
        "c861a0497c69790adcb6ddcffce9d1d278cabea6"
    );

    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&["--dns-root", "skydns.local."]);
    // Defaulted host and explicit host give the same id, so the same key.
    let (_a, welcome_a) = register(&sky.url("/provide?service=foo&port=9999"));
    let (_b, welcome_b) = register(&sky.url("/provide?service=foo&port=9999&host=127.0.0.1"));
    assert_eq!(welcome_a["key"], FOO_KEY);
    assert_eq!(welcome_b["key"], FOO_KEY);
    assert_eq!(keys(&etcd.get_prefix(ROOT)), [FOO_KEY]);
}

// ---------------------------------------------------------------- refusals

/// Sends each `(what, query)` to `/provide` on one server and checks each is
/// refused properly: upgrade, `ERROR: <reason>`, close 1008 with a reason,
/// and the etcd keyspace unchanged. Collects every misbehaving case before
/// failing, then checks the server still registers a good request.
fn assert_refused(cases: &[(&str, String)]) {
    let _w = watchdog(Duration::from_secs(180));
    let (etcd, sky) = start(&[]);
    let before = etcd.get_all();
    let mut failures = Vec::new();
    for (what, query) in cases {
        let url = sky.url(&format!("/provide?{query}"));
        let mut problem = match try_refusal(&url) {
            Err(e) => Some(e),
            Ok(r) if !r.text.starts_with("ERROR: ") || r.text.trim() == "ERROR:" => {
                Some(format!("text {:?} is not `ERROR: <reason>`", r.text))
            }
            Ok(r) if r.code != 1008 => Some(format!(
                "close code {} (reason {:?}), want 1008",
                r.code, r.reason
            )),
            Ok(r) if r.reason.is_empty() => {
                Some(format!("close 1008 without a reason after {:?}", r.text))
            }
            Ok(_) => None,
        };
        let after = etcd.get_all();
        if after != before {
            problem = Some(format!(
                "{}etcd changed: {after:?}",
                problem.map(|p| p + "; ").unwrap_or_default()
            ));
        }
        if let Some(p) = problem {
            failures.push(format!("  {what} [{query}]: {p}"));
        }
    }
    let (_ws, welcome) = register(&sky.url("/provide?service=after&port=1"));
    assert!(
        welcome["key"].as_str().is_some_and(|k| k.starts_with(ROOT)),
        "a good request after the refusals: {welcome}"
    );
    assert!(
        failures.is_empty(),
        "{} of {} refusals misbehaved:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

fn cases(list: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    list.iter().map(|(w, q)| (*w, q.to_string())).collect()
}

#[test]
fn refuses_missing_or_bad_port() {
    assert_refused(&cases(&[
        ("missing port", "service=foo"),
        ("port 0", "service=foo&port=0"),
        ("port 65536", "service=foo&port=65536"),
        ("port 70000", "service=foo&port=70000"),
        ("non-numeric port", "service=foo&port=http"),
        ("negative port", "service=foo&port=-1"),
        ("empty port", "service=foo&port="),
        ("port with space", "service=foo&port=%2099"),
    ]));
}

#[test]
fn refuses_missing_or_bad_service() {
    let mut list = cases(&[
        ("missing service", "port=9999"),
        ("empty service", "service=&port=9999"),
        ("path traversal", "service=../x&port=9999"),
        ("slash", "service=a/b&port=9999"),
        ("encoded slash", "service=a%2Fb&port=9999"),
        ("encoded slash alone", "service=%2F&port=9999"),
        ("encoded dot-dot", "service=%2E%2E&port=9999"),
        ("dot", "service=a.b&port=9999"),
        ("space", "service=a%20b&port=9999"),
        ("non-ASCII", "service=caf%C3%A9&port=9999"),
        ("NUL byte", "service=a%00b&port=9999"),
    ]);
    list.push((
        "64-character label",
        format!("service={}&port=9999", "a".repeat(64)),
    ));
    assert_refused(&list);
}

#[test]
fn refuses_bad_host_and_numbers() {
    let mut list = cases(&[
        ("host with slash", "service=foo&port=9999&host=a/b"),
        (
            "host path traversal",
            "service=foo&port=9999&host=..%2F..%2Fetc",
        ),
        ("host with space", "service=foo&port=9999&host=bad%20host"),
        (
            "host label starting with '-'",
            "service=foo&port=9999&host=-bad.example.org",
        ),
        ("host with quote", "service=foo&port=9999&host=a%22b"),
        ("priority 70000", "service=foo&port=9999&priority=70000"),
        ("priority -1", "service=foo&port=9999&priority=-1"),
        (
            "priority not a number",
            "service=foo&port=9999&priority=high",
        ),
        ("weight 70000", "service=foo&port=9999&weight=70000"),
        ("weight not a number", "service=foo&port=9999&weight=x"),
        ("ttl not a number", "service=foo&port=9999&ttl=abc"),
        ("ttl negative", "service=foo&port=9999&ttl=-5"),
    ]);
    list.push((
        "host label of 64 characters",
        format!("service=foo&port=9999&host={}.example.org", "h".repeat(64)),
    ));
    assert_refused(&list);
}

#[test]
fn refuses_bad_category_prefix_duplicate_and_unknown_params() {
    let mut list = cases(&[
        ("category with slash", "service=foo&port=9999&category=a/b"),
        ("category with dot", "service=foo&port=9999&category=a.b"),
        ("empty category", "service=foo&port=9999&category="),
        (
            "empty category label",
            "service=foo&port=9999&category=services,,production",
        ),
        (
            "trailing comma in category",
            "service=foo&port=9999&category=services,",
        ),
        ("prefix with dot", "service=foo&port=9999&prefix=a.b"),
        ("prefix with slash", "service=foo&port=9999&prefix=a/b"),
        ("empty prefix", "service=foo&port=9999&prefix="),
        ("duplicate port", "service=foo&port=9999&port=9998"),
        (
            "duplicate port, same value",
            "service=foo&port=9999&port=9999",
        ),
        ("duplicate service", "service=foo&service=bar&port=9999"),
        (
            "duplicate host",
            "service=foo&port=9999&host=127.0.0.1&host=127.0.0.2",
        ),
        ("unknown parameter", "service=foo&port=9999&color=red"),
        ("unknown parameter, no value", "service=foo&port=9999&debug"),
    ]);
    list.push((
        "64-character category label",
        format!("service=foo&port=9999&category={}", "c".repeat(64)),
    ));
    list.push((
        "64-character prefix",
        format!("service=foo&port=9999&prefix={}", "p".repeat(64)),
    ));
    assert_refused(&list);
}

#[test]
fn plain_http_gets_400_and_unknown_paths_404() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&[]);
    let before = etcd.get_all();
    let addr = sky.connect_addr();
    for (path, want) in [
        ("/provide?service=foo&port=9999", 400),
        ("/provide", 400),
        ("/nope", 404),
        ("/provide/extra?service=foo&port=9999", 404),
    ] {
        let (code, response) = http_get(addr, path);
        assert_eq!(code, want, "GET {path}: {response}");
    }
    match try_connect(&sky.url("/nope?service=foo&port=9999")) {
        Ok(_) => panic!("websocket upgrade on an unknown path was accepted"),
        Err(e) => assert!(e.contains("404"), "websocket to /nope: {e}"),
    }
    assert_eq!(etcd.get_all(), before, "HTTP requests wrote to etcd");
}

// ------------------------------------------------------------ liveness

#[test]
fn entry_deleted_on_close() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&[]);
    let (mut ws, _) = register(&sky.url("/provide?service=foo&port=9999"));
    assert_eq!(keys(&etcd.get_prefix(ROOT)), [FOO_KEY]);
    let t0 = Instant::now();
    close(&mut ws, DELETE_WITHIN);
    wait_until_empty(&etcd, ROOT, t0, DELETE_WITHIN);
}

#[test]
fn entry_deleted_when_tcp_connection_drops() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&[]);
    let (ws, _) = register(&sky.url("/provide?service=foo&port=9999"));
    assert_eq!(keys(&etcd.get_prefix(ROOT)), [FOO_KEY]);
    let t0 = Instant::now();
    drop_tcp(ws);
    wait_until_empty(&etcd, ROOT, t0, DELETE_WITHIN);
}

#[test]
fn client_messages_are_ignored_and_pings_answered() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&[]);
    let (mut ws, _) = register(&sky.url("/provide?service=foo&port=9999"));
    let before = etcd.get_prefix_with_lease(ROOT);

    ws.send(Message::text("hello")).expect("send text");
    ws.send(Message::binary(vec![1u8, 2, 3]))
        .expect("send binary");
    ws.send(Message::Ping(b"probe".to_vec().into()))
        .expect("send ping");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_event(&mut ws, left) {
            Some(Event::Pong(p)) if p == b"probe" => break,
            Some(Event::Ping(_) | Event::Pong(_)) => continue,
            Some(other) => panic!("after client messages and a ping, got {other:?}"),
            None => panic!("no pong for our ping within 3 s"),
        }
    }
    assert_eq!(
        etcd.get_prefix_with_lease(ROOT),
        before,
        "the entry changed"
    );
    // Still open and registered: a normal close still deletes the entry.
    let t0 = Instant::now();
    close(&mut ws, DELETE_WITHIN);
    wait_until_empty(&etcd, ROOT, t0, DELETE_WITHIN);
}

#[test]
fn silent_client_is_dropped_within_timeout() {
    let _w = watchdog(TEST_LIMIT);
    let timeout = Duration::from_secs(3);
    let (etcd, sky) = start(&["--timeout", "3"]);
    // After the welcome this client never reads again, so tungstenite never
    // answers the server's pings: the process looks frozen while its TCP
    // connection stays open (the kernel still ACKs).
    let (mut ws, _) = register(&sky.url("/provide?service=foo&port=9999"));
    let t0 = Instant::now();
    assert_eq!(keys(&etcd.get_prefix(ROOT)), [FOO_KEY]);
    wait_until_empty(&etcd, ROOT, t0, timeout + Duration::from_secs(2));
    // ... and the server hung up on it.
    let closed = try_read_until_close(&mut ws, Duration::from_secs(3));
    assert!(
        closed.is_some(),
        "entry removed but the server kept the silent connection open"
    );
}

#[test]
fn answering_client_outlives_timeout() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&["--timeout", "3"]);
    let (mut ws, _) = register(&sky.url("/provide?service=foo&port=9999"));
    let first = etcd.get_prefix_with_lease(ROOT);
    assert_eq!(keys(&first), [FOO_KEY]);

    // Read (and so answer pings) for well over --timeout; the entry and its
    // lease (TTL 3 s, so it must be kept alive) stay throughout.
    let window = Duration::from_secs(7);
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < window {
        match next_event(&mut ws, Duration::from_millis(500)) {
            None => {}
            Some(Event::Ping(_)) => pings += 1,
            Some(other) => panic!("live client got {other:?} after {:?}", start.elapsed()),
        }
        let now = etcd.get_prefix_with_lease(ROOT);
        assert_eq!(now, first, "entry changed after {:?}", start.elapsed());
    }
    // Pings every --timeout/2 or sooner: at 1.5 s, 3 s, 4.5 s and 6 s at the latest.
    assert!(
        pings >= 4,
        "only {pings} pings in {window:?} with --timeout 3"
    );
    let lease = first[FOO_KEY].1;
    assert!(
        etcd.lease_ttl(lease).is_some_and(|(ttl, _)| ttl > 0),
        "lease not kept alive"
    );
}

#[test]
fn same_params_share_one_key_until_the_last_closes() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&[]);
    let url = sky.url("/provide?service=foo&port=9999");
    let (mut a, wa) = register(&url);
    let (mut b, wb) = register(&url);
    assert_eq!(wa["key"], FOO_KEY);
    assert_eq!(wb["key"], FOO_KEY);
    let shared = etcd.get_prefix_with_lease(ROOT);
    assert_eq!(keys(&shared), [FOO_KEY]);

    close(&mut a, DELETE_WITHIN);
    // A wrongful delete would come "at once", i.e. within DELETE_WITHIN.
    if let Err(at) = holds_for(DELETE_WITHIN, || etcd.get_prefix_with_lease(ROOT) == shared) {
        panic!(
            "closing one of two connections changed the shared entry after {at:?}: {:?}",
            etcd.get_prefix_with_lease(ROOT)
        );
    }
    let t0 = Instant::now();
    close(&mut b, DELETE_WITHIN);
    wait_until_empty(&etcd, ROOT, t0, DELETE_WITHIN);
}

// ---------------------------------------------------------------- shutdown

#[test]
fn sigterm_and_sigint_keep_entries_close_clients_with_1012_and_exit_0_within_1s() {
    let _w = watchdog(TEST_LIMIT);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let (etcd, mut sky) = start(&["--timeout", "30"]);
        let (mut a, _) = register(&sky.url("/provide?service=foo&port=9999"));
        let (mut b, _) = register(&sky.url("/provide?service=bar&port=8888&category=production"));
        let before = etcd.get_prefix_with_lease(ROOT);
        assert_eq!(before.len(), 2);

        let t0 = Instant::now();
        sky.signal(sig);
        for (name, ws) in [("foo", &mut a), ("bar", &mut b)] {
            let closed = read_until_close(ws, Duration::from_secs(1));
            assert_eq!(
                closed.code(),
                Some(1012),
                "signal {sig}, {name}: {closed:?}"
            );
        }
        let status = sky
            .wait_exit(Duration::from_secs(1).saturating_sub(t0.elapsed()))
            .unwrap_or_else(|| panic!("skyapi still running 1 s after signal {sig}"));
        assert!(status.success(), "exit after signal {sig}: {status}");
        // A restart-safe stop: the entries, values and lease are untouched.
        assert_eq!(etcd.get_prefix_with_lease(ROOT), before, "signal {sig}");
    }
}

#[test]
fn revoke_on_exit_removes_entries_closes_clients_with_1001_and_exits_0() {
    let _w = watchdog(TEST_LIMIT);
    // Set from the environment, as an operator would in /etc/default.
    // --timeout 30: lease expiry cannot be what removes the entries in 1 s.
    let etcd = Etcd::start_new();
    let mut sky = Skyapi::server(
        &[
            "--listen-addr",
            "127.0.0.1:0",
            "--etcd-api",
            &etcd.endpoint(),
            "--timeout",
            "30",
        ],
        &[("SKYAPI_REVOKE_ON_EXIT", "1")],
    );
    let (mut a, _) = register(&sky.url("/provide?service=foo&port=9999"));
    let (mut b, _) = register(&sky.url("/provide?service=bar&port=8888&category=production"));
    assert_eq!(etcd.get_prefix(ROOT).len(), 2);

    let t0 = Instant::now();
    sky.signal(libc::SIGTERM);
    wait_until_empty(&etcd, ROOT, t0, Duration::from_secs(1));

    let bound = Duration::from_secs(5);
    for (name, ws) in [("foo", &mut a), ("bar", &mut b)] {
        let left = bound.saturating_sub(t0.elapsed());
        let closed = read_until_close(ws, left);
        assert_eq!(closed.code(), Some(1001), "{name}: {closed:?}");
    }
    let status = sky
        .wait_exit(bound.saturating_sub(t0.elapsed()))
        .unwrap_or_else(|| panic!("skyapi still running {bound:?} after SIGTERM"));
    assert!(status.success(), "exit after SIGTERM: {status}");
}

#[test]
fn sigkill_entries_expire_with_the_lease() {
    let _w = watchdog(TEST_LIMIT);
    let timeout = Duration::from_secs(3);
    let (etcd, mut sky) = start(&["--timeout", "3"]);
    let (_a, _) = register(&sky.url("/provide?service=foo&port=9999"));
    let (_b, _) = register(&sky.url("/provide?service=bar&port=8888"));
    let got = etcd.get_prefix_with_lease(ROOT);
    assert_eq!(got.len(), 2);
    assert!(
        got.values().all(|(_, lease)| *lease != 0),
        "unleased entries: {got:?}"
    );

    sky.signal(libc::SIGKILL);
    let t0 = Instant::now();
    assert!(
        sky.wait_exit(Duration::from_secs(2)).is_some(),
        "SIGKILL did not end skyapi"
    );
    // etcd checks lease expiry every 500 ms; allow that and polling.
    wait_until_empty(&etcd, ROOT, t0, timeout + Duration::from_secs(2));
}

// ------------------------------------------------------------ command line

#[test]
fn bad_flags_exit_nonzero_with_one_line_naming_the_flag() {
    let _w = watchdog(TEST_LIMIT);
    let etcd_args = ["--etcd-api", "http://127.0.0.1:1"];
    let listen = ["--listen-addr", "127.0.0.1:0"];
    let cases: &[(&[&str], &str)] = &[
        (&["--timeout", "1"], "timeout"),
        (&["--timeout", "0"], "timeout"),
        (&["--timeout", "ten"], "timeout"),
        (&["--port-typo", "1"], "port-typo"),
        (&["--log-level", "loud"], "log-level"),
    ];
    let mut failures = Vec::new();
    let mut run = |args: Vec<&str>, names: &str| {
        let out = run_to_exit(&args, Duration::from_secs(5));
        let lines: Vec<&String> = out.stderr.iter().filter(|l| !l.trim().is_empty()).collect();
        let problem = if out.status.success() {
            Some(format!("exited {}", out.status))
        } else if out.stderr.iter().any(|l| l.contains("listening on")) {
            Some("bound a socket before refusing the flag".to_string())
        } else if lines.len() != 1 {
            Some(format!(
                "stderr is {} lines, want 1: {lines:?}",
                lines.len()
            ))
        } else if !lines[0].contains(names) {
            Some(format!("message does not name `{names}`: {:?}", lines[0]))
        } else {
            None
        };
        if let Some(p) = problem {
            failures.push(format!("  {args:?}: {p}"));
        }
    };
    for (bad, names) in cases {
        let mut args = bad.to_vec();
        args.extend(etcd_args);
        args.extend(listen);
        run(args, names);
    }
    let mut args = vec!["--listen-addr", "nowhere"];
    args.extend(etcd_args);
    run(args, "listen-addr");
    let mut args = etcd_args.to_vec();
    args.extend(listen);
    args.push("--timeout");
    run(args, "timeout");
    assert!(
        failures.is_empty(),
        "bad flags mishandled:\n{}",
        failures.join("\n")
    );
}

#[test]
fn version_and_help() {
    let _w = watchdog(TEST_LIMIT);
    let out = run_to_exit(&["--version"], Duration::from_secs(5));
    assert!(
        out.status.success(),
        "--version: {} {:?}",
        out.status,
        out.stderr
    );
    assert!(
        out.stdout
            .iter()
            .any(|l| l.contains(env!("CARGO_PKG_VERSION"))),
        "--version printed {:?}",
        out.stdout
    );

    let out = run_to_exit(&["--help"], Duration::from_secs(5));
    assert!(
        out.status.success(),
        "--help: {} {:?}",
        out.status,
        out.stderr
    );
    let help = out.stdout.join("\n");
    for flag in [
        "--listen-addr",
        "--etcd-api",
        "--dns-root",
        "--timeout",
        "--default-category",
        "--etcd-prefix",
        "--log-level",
        "--etcd-pool-size",
        "--version",
    ] {
        assert!(
            help.contains(flag),
            "--help does not mention {flag}:\n{help}"
        );
    }
}

#[test]
fn etcd_api_comma_list_and_pool_size_are_accepted() {
    let _w = watchdog(TEST_LIMIT);
    let etcd = Etcd::start_new();
    let list = format!("{},{}", etcd.endpoint(), etcd.endpoint());
    let sky = Skyapi::start(
        &etcd,
        &[
            "--etcd-api",
            &list,
            "--etcd-pool-size",
            "4",
            "--log-level",
            "debug",
        ],
    );
    let (_ws, welcome) = register(&sky.url("/provide?service=foo&port=9999"));
    assert_eq!(welcome["key"], FOO_KEY);
    assert_eq!(keys(&etcd.get_prefix(ROOT)), [FOO_KEY]);
}
