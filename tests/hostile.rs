//! Hostile input and access control (issue 6), end to end: the real
//! `skyapi` binary, a real etcd, and clients that write every byte they
//! send themselves.
//!
//! Every refusal is checked twice: what the client saw (the HTTP status, or
//! the `ERROR:` text and close code 1008) AND that etcd holds exactly what
//! it held before, keyspace and store revision alike, so even a write that
//! was undone at once would show. Resource limits are checked from outside
//! the server: `/proc/PID` for threads, descriptors and memory, socket ends
//! for deadlines. The plain parameter refusals of the registrar are in
//! `tests/registrar.rs`; this file goes after what an attacker would send.

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use support::hostile::*;
use support::*;
use tungstenite::Message;

/// Upper bound for any single test; the watchdog ends the run past it.
const TEST_LIMIT: Duration = Duration::from_secs(90);
/// "Deleted at once" after a close, including etcd's round trip.
const DELETE_WITHIN: Duration = Duration::from_secs(2);
/// Where entries live with the default `--etcd-prefix` and `--dns-root`.
const ROOT: &str = "/skydns/local/skydns/";
/// The server's handshake deadline (README "Limits": 5 s).
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// Slack allowed past a server deadline (scheduling on a busy 2-core box).
const MARGIN: Duration = Duration::from_millis(1500);

/// An upgrade request for `/provide?<query>` with no extra headers.
fn provide(query: &str) -> Vec<u8> {
    upgrade_request(format!("/provide?{query}").as_bytes(), &[])
}

fn short(s: &str) -> String {
    if s.len() <= 80 {
        return s.to_string();
    }
    let mut end = 80;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...({} bytes)", &s[..end], s.len())
}

fn has_control(s: &str) -> bool {
    s.chars().any(|c| c.is_control())
}

/// What a hostile request must get.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Want {
    /// Upgrade, `ERROR: <reason>`, close 1008 with a reason.
    Refused,
    /// This plain HTTP status, no upgrade.
    Http(u16),
}

struct Case {
    what: String,
    request: Vec<u8>,
    want: Want,
}

fn case(what: impl Into<String>, request: Vec<u8>, want: Want) -> Case {
    Case {
        what: what.into(),
        request,
        want,
    }
}

/// Runs every case against `sky`, one connection each, and returns one line
/// per misbehaving case: wrong answer, a refusal text or reason carrying
/// control characters (log and header injection) or echoing a long piece
/// of the input, or any change in etcd.
fn run_cases(etcd: &Etcd, sky: &Skyapi, cases: &[Case]) -> Vec<String> {
    let addr = sky.connect_addr();
    let mut failures = Vec::new();
    for c in cases {
        let before = snapshot(etcd);
        let (outcome, ws) = exchange(addr, &c.request);
        let mut problems = Vec::new();
        match (c.want, &outcome) {
            (Want::Refused, o) if o.is_refusal_1008() => {
                if let Outcome::Refused { text, reason, .. } = o {
                    if has_control(text) || has_control(reason) {
                        problems.push(format!(
                            "refusal carries control characters: {text:?} / {reason:?}"
                        ));
                    }
                    // The refusal quotes at most a short piece of the input.
                    if text.len() > 256 {
                        problems.push(format!("refusal text of {} bytes", text.len()));
                    }
                }
            }
            (Want::Http(want), Outcome::Http { status, .. }) if *status == want => {}
            (want, got) => problems.push(format!("want {want:?}, got {got:?}")),
        }
        if let Some(mut ws) = ws {
            close(&mut ws, DELETE_WITHIN);
            // Let the delete land, so the next case starts from the same state.
            thread::sleep(Duration::from_millis(200));
        }
        if let Some(diff) = snapshot_diff(&before, &snapshot(etcd)) {
            problems.push(diff);
        }
        if !problems.is_empty() {
            failures.push(format!("  {} -> {}", c.what, problems.join("; ")));
        }
    }
    failures
}

/// `run_cases`, then checks the server still registers a good request and
/// that nothing a case sent forged a log line; panics listing every failure.
fn assert_cases(etcd: &Etcd, sky: &Skyapi, cases: &[Case]) {
    let failures = run_cases(etcd, sky, cases);
    let (mut ws, welcome) = register(&sky.url("/provide?service=after&port=1"));
    let key = welcome["key"].as_str().unwrap_or_default().to_string();
    assert!(
        key.starts_with(ROOT),
        "a good request after the hostile ones: {welcome}"
    );
    close(&mut ws, DELETE_WITHIN);
    // Gone before the caller's next snapshot.
    assert!(
        poll_until(DELETE_WITHIN, || !etcd.get_prefix(ROOT).contains_key(&key)),
        "{key} still in etcd after its close"
    );
    // Log lines are split at LF; a forged one starts with injected text,
    // and no line may carry a raw CR or other control character.
    let forged: Vec<String> = sky
        .logs()
        .into_iter()
        .filter(|l| {
            l.starts_with("INJECTED")
                || l.starts_with("X-Injected")
                || l.chars().any(|c| c.is_control() && c != '\t')
        })
        .collect();
    assert!(forged.is_empty(), "a request forged log lines: {forged:?}");
    assert!(
        failures.is_empty(),
        "{} of {} hostile requests misbehaved:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

// ------------------------------------------------------------- tokens

const TOK_WEB: &str = "tok-web-5f1c9a7e2b";
const TOK_API: &str = "tok-api-83d04c6e11";
const TOK_ALL: &str = "tok-all-c2b7e9015a";
const TOK_UNKNOWN: &str = "tok-nope-00000000";
const TOK_ADMIN: &str = "tok-admin-7d3e91b0c4";

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

fn with_headers(query: &str, headers: &[String]) -> Vec<u8> {
    upgrade_request(format!("/provide?{query}").as_bytes(), headers)
}

/// Asserts that no line skyapi logged contains any of `secrets`.
fn assert_never_logged(sky: &Skyapi, secrets: &[&str]) {
    let logs = sky.logs();
    for s in secrets {
        let hits: Vec<&String> = logs.iter().filter(|l| l.contains(s)).collect();
        assert!(
            hits.is_empty(),
            "token {s:?} appears in skyapi's log: {hits:?}"
        );
    }
}

#[test]
fn token_file_answers_401_and_403_before_any_upgrade() {
    let _w = watchdog(TEST_LIMIT);
    let dir = TempDir::new("tokens");
    let file = dir.write(
        "tokens",
        &format!(
            "# grants for the hostile suite\n\n{TOK_WEB} web-*\n{TOK_API} api,db-?\n   {TOK_ALL}\t*  \n{TOK_ADMIN} @admin\n"
        ),
    );
    let (etcd, sky) = start(&[
        "--token-file",
        file.to_str().unwrap(),
        "--log-level",
        "trace",
    ]);

    let truncated = &TOK_WEB[..TOK_WEB.len() - 1];
    let extended = format!("{TOK_WEB}x");
    let upper = TOK_WEB.to_uppercase();
    let h401 = Want::Http(401);
    let h403 = Want::Http(403);
    let cases = vec![
        case("no token", provide("service=web-1&port=80"), h401),
        case(
            "unknown bearer token",
            with_headers("service=web-1&port=80", &[bearer(TOK_UNKNOWN)]),
            h401,
        ),
        case(
            "unknown token=",
            provide(&format!("service=web-1&port=80&token={TOK_UNKNOWN}")),
            h401,
        ),
        case(
            "valid token minus its last character",
            with_headers("service=web-1&port=80", &[bearer(truncated)]),
            h401,
        ),
        case(
            "valid token plus one character",
            provide(&format!("service=web-1&port=80&token={extended}")),
            h401,
        ),
        case(
            "valid token in upper case",
            with_headers("service=web-1&port=80", &[bearer(&upper)]),
            h401,
        ),
        case(
            "empty bearer",
            with_headers(
                "service=web-1&port=80",
                &["Authorization: Bearer ".to_string()],
            ),
            h401,
        ),
        case(
            "valid token under the Basic scheme",
            with_headers(
                "service=web-1&port=80",
                &[format!("Authorization: Basic {TOK_WEB}")],
            ),
            h401,
        ),
        case(
            "valid token with a NUL appended",
            provide(&format!("service=web-1&port=80&token={TOK_WEB}%00")),
            h401,
        ),
        case(
            "valid token followed by CR LF and a header",
            provide(&format!(
                "service=web-1&port=80&token={TOK_WEB}%0d%0aX-Injected:%201"
            )),
            h401,
        ),
        case(
            "no token and bad parameters",
            provide("service=../x&port=0"),
            h401,
        ),
        case(
            "web-* token for api",
            with_headers("service=api&port=80", &[bearer(TOK_WEB)]),
            h403,
        ),
        case(
            "web-* token for web (the glob needs the dash)",
            with_headers("service=web&port=80", &[bearer(TOK_WEB)]),
            h403,
        ),
        case(
            "web-* token for xweb-1",
            provide(&format!("service=xweb-1&port=80&token={TOK_WEB}")),
            h403,
        ),
        case(
            "db-? token for db-12",
            with_headers("service=db-12&port=80", &[bearer(TOK_API)]),
            h403,
        ),
        case(
            "api token for apix",
            with_headers("service=apix&port=80", &[bearer(TOK_API)]),
            h403,
        ),
        case(
            "valid token, bad parameters: refused as parameters",
            with_headers("service=web-1&port=0", &[bearer(TOK_WEB)]),
            Want::Refused,
        ),
        case(
            "valid token=, bad parameters: refused as parameters",
            provide(&format!("service=web-1&port=0&token={TOK_WEB}")),
            Want::Refused,
        ),
        case(
            "catch-all token, traversal in service",
            provide(&format!("service=..%2Fx&port=80&token={TOK_ALL}")),
            Want::Refused,
        ),
    ];
    let failures = run_cases(&etcd, &sky, &cases);

    // The answers never echo a token.
    let addr = sky.connect_addr();
    for (what, request) in [
        (
            "401",
            with_headers("service=web-1&port=80", &[bearer(TOK_UNKNOWN)]),
        ),
        (
            "403",
            with_headers("service=api&port=80", &[bearer(TOK_WEB)]),
        ),
    ] {
        let (outcome, _) = exchange(addr, &request);
        let Outcome::Http { body, .. } = &outcome else {
            panic!("{what}: {outcome:?}");
        };
        assert!(
            !body.contains(TOK_WEB) && !body.contains(TOK_UNKNOWN),
            "{what} body echoes the token: {body:?}"
        );
    }

    // Allowed: by header (either case of the scheme), by token=, by glob,
    // a service given in upper case (stored and matched lower-case), and a
    // percent-encoded token (decoded like every parameter).
    let allowed = [
        (
            "web-1",
            with_headers("service=web-1&port=80", &[bearer(TOK_WEB)]),
        ),
        (
            "web-2",
            provide(&format!("service=web-2&port=80&token={TOK_WEB}")),
        ),
        (
            "web-3",
            with_headers(
                "service=web-3&port=80",
                &[format!("authorization: bearer {TOK_WEB}")],
            ),
        ),
        (
            "web-4",
            with_headers("service=WEB-4&port=80", &[bearer(TOK_WEB)]),
        ),
        (
            "web-5",
            provide(&format!(
                "service=web-5&port=80&token={}",
                TOK_WEB.replace('-', "%2D")
            )),
        ),
        (
            "api",
            with_headers("service=api&port=80", &[bearer(TOK_API)]),
        ),
        (
            "db-7",
            with_headers("service=db-7&port=80", &[bearer(TOK_API)]),
        ),
        (
            "anything",
            with_headers("service=anything&port=80", &[bearer(TOK_ALL)]),
        ),
    ];
    let mut open = Vec::new();
    for (service, request) in allowed {
        let (outcome, ws) = exchange(addr, &request);
        let Outcome::Registered(welcome) = &outcome else {
            panic!("{service}: a granted token was not registered: {outcome:?}");
        };
        let key = welcome["key"].as_str().unwrap_or_default().to_string();
        let dir = format!("{ROOT}services/{service}/");
        assert!(
            key.starts_with(&dir),
            "{service}: key {key} not under {dir}"
        );
        assert!(
            etcd.get_prefix(ROOT).contains_key(&key),
            "{service}: {key} not in etcd"
        );
        open.push((key, ws.expect("registered socket")));
    }
    // Live registrations and metrics do not show tokens either.
    for path in ["/services", "/metrics"] {
        let got = get_with(addr, path, &[bearer(TOK_ADMIN)]);
        let Outcome::Http {
            status: 200,
            body: text,
        } = got
        else {
            panic!("GET {path} with the admin token: {got:?}");
        };
        for t in [TOK_WEB, TOK_API, TOK_ALL] {
            assert!(!text.contains(t), "GET {path} shows token {t}: {text}");
        }
    }
    for (key, mut ws) in open {
        close(&mut ws, DELETE_WITHIN);
        assert!(
            poll_until(DELETE_WITHIN, || !etcd.get_prefix(ROOT).contains_key(&key)),
            "{key} still in etcd after its connection closed"
        );
    }

    assert!(
        failures.is_empty(),
        "{} of {} token cases misbehaved:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert_never_logged(
        &sky,
        &[TOK_WEB, TOK_API, TOK_ALL, TOK_ADMIN, TOK_UNKNOWN, truncated],
    );
}

#[test]
fn malformed_token_file_stops_start_up_naming_the_line() {
    let _w = watchdog(TEST_LIMIT);
    let dir = TempDir::new("bad-tokens");
    let cases = [
        (
            format!("{TOK_WEB} web-*\n\nlonely-token-without-a-glob\n"),
            "line 3",
        ),
        ("# a comment\nshort web\n".to_string(), "line 2"),
        (format!("{TOK_WEB} web/*\n"), "line 1"),
        (format!("{TOK_WEB} web-* extra-field\n"), "line 1"),
        (format!("{TOK_WEB} web-*,\n"), "line 1"),
        (format!("{TOK_WEB} web-*\n{TOK_API} ../etc\n"), "line 2"),
        (format!("{TOK_WEB} web-*.services..production\n"), "line 1"),
        (format!("{TOK_WEB} foo\n{TOK_API} ns.dns\n"), "line 2"),
        (format!("{TOK_WEB} x.in-addr.arpa\n"), "line 1"),
        (format!("{TOK_WEB} @root\n"), "line 1"),
    ];
    for (i, (text, line)) in cases.iter().enumerate() {
        let file = dir.write(&format!("tokens-{i}"), text);
        let port = free_port().to_string();
        let listen = format!("127.0.0.1:{port}");
        let run = run_to_exit(
            &[
                "--listen-addr",
                &listen,
                // Nothing listens there: start-up must stop before etcd matters.
                "--etcd-api",
                "http://127.0.0.1:9",
                "--token-file",
                file.to_str().unwrap(),
            ],
            Duration::from_secs(10),
        );
        let all = [run.stdout.clone(), run.stderr.clone()].concat().join("\n");
        assert!(
            !run.status.success(),
            "{text:?}: exited with {} instead of failing:\n{all}",
            run.status
        );
        assert!(
            run.stderr.iter().any(|l| l.contains(line)),
            "{text:?}: no stderr line names {line}:\n{all}"
        );
        assert!(
            !all.contains("listening on"),
            "{text:?}: it listened before refusing the file:\n{all}"
        );
        for t in [TOK_WEB, TOK_API, "lonely-token-without-a-glob"] {
            assert!(
                !all.contains(t),
                "{text:?}: the error shows a token:\n{all}"
            );
        }
    }
}

#[test]
fn sighup_reloads_tokens_and_a_malformed_file_keeps_the_old_ones() {
    let _w = watchdog(TEST_LIMIT);
    const OLD: &str = "old-token-4c1d8e0f";
    const NEW: &str = "new-token-9a7b2c3d";
    const THIRD: &str = "third-token-e5f6a7b8";
    let dir = TempDir::new("reload");
    let file = dir.write("tokens", &format!("{OLD} web-*\n"));
    let (etcd, sky) = start(&[
        "--token-file",
        file.to_str().unwrap(),
        "--log-level",
        "trace",
    ]);
    let addr = sky.connect_addr();
    let attempt = |token: &str| {
        let (outcome, ws) = exchange(
            addr,
            &with_headers("service=web-1&port=80", &[bearer(token)]),
        );
        if let Some(mut ws) = ws {
            close(&mut ws, DELETE_WITHIN);
            // Gone before the next snapshot: the delete follows the close.
            assert!(
                poll_until(DELETE_WITHIN, || etcd.get_prefix(ROOT).is_empty()),
                "the entry stayed after its close"
            );
        }
        outcome
    };
    let registered = |o: &Outcome| matches!(o, Outcome::Registered(_));

    assert!(registered(&attempt(OLD)), "the start-up token must work");
    assert_eq!(attempt(NEW).http_status(), Some(401));

    // A new file: the old token goes, the new one works.
    dir.write("tokens", &format!("{NEW} web-*\n"));
    let reloads = |sky: &Skyapi| {
        sky.logs()
            .iter()
            .filter(|l| l.contains("SIGHUP") && l.contains("reloaded"))
            .count()
    };
    sky.signal(libc::SIGHUP);
    assert!(
        poll_until(Duration::from_secs(5), || reloads(&sky) == 1),
        "no reload logged after SIGHUP"
    );
    let before = snapshot(&etcd);
    assert_eq!(
        attempt(OLD).http_status(),
        Some(401),
        "old token after reload"
    );
    assert_eq!(snapshot_diff(&before, &snapshot(&etcd)), None);
    assert!(registered(&attempt(NEW)), "new token after reload");

    // A malformed file (line 2): logged as an error, the loaded one stays.
    dir.write(
        "tokens",
        &format!("{THIRD} web-*\nbroken-line-without-glob\n"),
    );
    sky.signal(libc::SIGHUP);
    let error_line = |sky: &Skyapi| {
        sky.logs()
            .into_iter()
            .find(|l| l.contains("SIGHUP") && l.contains("line 2"))
    };
    let line = eventually(
        "the malformed file's error in the log",
        Duration::from_secs(5),
        || error_line(&sky),
    );
    assert!(
        line.contains("[ERROR]"),
        "a refused reload must be logged as an error: {line}"
    );
    assert!(
        registered(&attempt(NEW)),
        "the token in force before the bad reload"
    );
    let before = snapshot(&etcd);
    assert_eq!(
        attempt(THIRD).http_status(),
        Some(401),
        "token of the bad file"
    );
    assert_eq!(
        attempt(OLD).http_status(),
        Some(401),
        "token of the first file"
    );
    assert_eq!(snapshot_diff(&before, &snapshot(&etcd)), None);

    // A vanished file: same.
    std::fs::remove_file(&file).expect("remove token file");
    let errors = |sky: &Skyapi| {
        sky.logs()
            .iter()
            .filter(|l| l.contains("SIGHUP") && l.contains("[ERROR]"))
            .count()
    };
    sky.signal(libc::SIGHUP);
    assert!(
        poll_until(Duration::from_secs(5), || errors(&sky) == 2),
        "no error logged for a SIGHUP with the token file gone"
    );
    assert!(
        registered(&attempt(NEW)),
        "the token in force before the file vanished"
    );

    assert_never_logged(&sky, &[OLD, NEW, THIRD]);
}

// ------------------------------------------------------ names and grants

const TOK_FOO: &str = "tok-foo-only-1a2b3c4d";
const TOK_NAMES: &str = "tok-names-5e6f7a8b9c";
const TOK_STAR: &str = "tok-star-services-0d1e";
const TOK_EVERY: &str = "tok-every-depth-2f3a4b";

/// What a refusal must say: its status, and a piece of its body.
fn refused_with(status: u16, body_has: &str, outcome: &Outcome) -> Result<(), String> {
    match outcome {
        Outcome::Http { status: s, body } if *s == status && body.contains(body_has) => Ok(()),
        other => Err(format!(
            "want HTTP {status} saying {body_has:?}, got {other:?}"
        )),
    }
}

/// Runs `(what, request, status, body piece)` refusals, each on a fresh
/// connection, checking etcd's keyspace and revision are untouched; returns
/// one line per misbehaving request.
fn refusals(etcd: &Etcd, addr: SocketAddr, cases: &[(&str, Vec<u8>, u16, &str)]) -> Vec<String> {
    let mut failures = Vec::new();
    for (what, request, status, body_has) in cases {
        let before = snapshot(etcd);
        let (outcome, ws) = exchange(addr, request);
        let mut problems = Vec::new();
        if let Err(e) = refused_with(*status, body_has, &outcome) {
            problems.push(e);
        }
        if let Some(mut ws) = ws {
            close(&mut ws, DELETE_WITHIN);
            thread::sleep(Duration::from_millis(200));
        }
        if let Some(diff) = snapshot_diff(&before, &snapshot(etcd)) {
            problems.push(diff);
        }
        if !problems.is_empty() {
            failures.push(format!("  {what} -> {}", problems.join("; ")));
        }
    }
    failures
}

#[test]
fn grants_cover_whole_names_and_the_review_hijacks_are_refused() {
    let _w = watchdog(TEST_LIMIT);
    let dir = TempDir::new("names");
    let file = dir.write(
        "tokens",
        &format!(
            "{TOK_FOO} foo\n\
             {TOK_NAMES} foo.services,web-*.services.production\n\
             {TOK_STAR} *.services\n\
             {TOK_EVERY} *.*,*.*.*,*.*.*.*\n"
        ),
    );
    let (etcd, sky) = start(&["--token-file", file.to_str().unwrap()]);
    let addr = sky.connect_addr();
    let with = |token: &str, query: &str| with_headers(query, &[bearer(token)]);

    // The real victim, registered by a token granted its name.
    let (victim, victim_ws) = exchange(
        addr,
        &with(TOK_STAR, "service=victim&port=80&host=10.0.0.1"),
    );
    let Outcome::Registered(victim) = victim else {
        panic!("the victim did not register: {victim:?}");
    };
    let victim_key = victim["key"].as_str().unwrap_or_default().to_string();
    assert!(victim_key.starts_with(&format!("{ROOT}services/victim/")));

    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        // The review's two hijacks, with a token granted only `foo`.
        (
            "foo token, service=victim",
            with(TOK_FOO, "service=victim&port=80"),
            403,
            "victim.services",
        ),
        (
            "foo token, service=foo below victim.services (hijack 1)",
            with(
                TOK_FOO,
                "service=foo&host=6.6.6.6&port=80&category=victim,services",
            ),
            403,
            "foo.victim.services",
        ),
        (
            "foo token, service=foo in ns.dns (hijack 2)",
            with(TOK_FOO, "service=foo&port=80&category=ns,dns"),
            403,
            "dns.skydns.local.",
        ),
        (
            "foo token, foo in another category",
            with(TOK_FOO, "service=foo&port=80&category=production"),
            403,
            "foo.production",
        ),
        (
            "foo token, the category percent-encoded",
            with(TOK_FOO, "service=foo&port=80&category=victim%2Cservices"),
            403,
            "foo.victim.services",
        ),
        // `*` is one label: `*.services` reaches no deeper name.
        (
            "*.services token, foo below victim.services",
            with(TOK_STAR, "service=foo&port=80&category=victim,services"),
            403,
            "foo.victim.services",
        ),
        (
            "*.services token, x in services.production",
            with(TOK_STAR, "service=x&port=80&category=services,production"),
            403,
            "x.services.production",
        ),
        // Exact names: a grant of foo.services is not one of x.foo.services.
        (
            "foo.services token, x below foo.services",
            with(TOK_NAMES, "service=x&port=80&category=foo,services"),
            403,
            "x.foo.services",
        ),
        (
            "names token, web-1 in services only",
            with(TOK_NAMES, "service=web-1&port=80"),
            403,
            "web-1.services",
        ),
        (
            "names token, web-1.services.production.eu",
            with(
                TOK_NAMES,
                "service=web-1&port=80&category=services,production,eu",
            ),
            403,
            "web-1.services.production.eu",
        ),
        // Reserved subtrees stay closed to a token granted every depth.
        (
            "every-depth token, ns.dns",
            with(TOK_EVERY, "service=foo&port=80&category=ns,dns"),
            403,
            "dns.skydns.local.",
        ),
        (
            "every-depth token, stub.dns (SkyDNS forwarders)",
            with(TOK_EVERY, "service=example&port=53&category=com,stub,dns"),
            403,
            "dns.skydns.local.",
        ),
        (
            "every-depth token, arpa",
            with(TOK_EVERY, "service=1&port=80&category=0,in-addr,arpa"),
            403,
            "arpa.skydns.local.",
        ),
        (
            "every-depth token, unknown token",
            with(TOK_UNKNOWN, "service=foo&port=80&category=ns,dns"),
            401,
            "token",
        ),
    ];
    let failures = refusals(&etcd, addr, &cases);

    // The victim's name still answers with the victim only.
    let under_victim = etcd.get_prefix(&format!("{ROOT}services/victim/"));
    assert_eq!(
        under_victim.keys().collect::<Vec<_>>(),
        vec![&victim_key],
        "something was written below victim.services"
    );
    assert!(etcd.get_prefix(&format!("{ROOT}dns/")).is_empty());

    // What the grants do allow, each at exactly the granted name.
    let allowed = [
        (TOK_FOO, "service=foo&port=80", "services/foo/"),
        (TOK_FOO, "service=FOO&port=81", "services/foo/"),
        (
            TOK_NAMES,
            "service=foo&port=82&category=services",
            "services/foo/",
        ),
        (
            TOK_NAMES,
            "service=web-9&port=80&category=services,production",
            "production/services/web-9/",
        ),
        (TOK_STAR, "service=anything&port=80", "services/anything/"),
        (
            TOK_EVERY,
            "service=x&port=80&category=dns,services",
            "services/dns/x/",
        ),
    ];
    let mut open = vec![victim_ws.expect("victim socket")];
    for (token, query, dir) in allowed {
        let (outcome, ws) = exchange(addr, &with(token, query));
        let Outcome::Registered(w) = &outcome else {
            panic!("{query}: a granted name was not registered: {outcome:?}");
        };
        let key = w["key"].as_str().unwrap_or_default();
        assert!(
            key.starts_with(&format!("{ROOT}{dir}")),
            "{query}: key {key} not under {ROOT}{dir}"
        );
        assert!(etcd.get_prefix(ROOT).contains_key(key), "{key} not in etcd");
        open.push(ws.expect("registered socket"));
    }
    for ws in &mut open {
        close(ws, DELETE_WITHIN);
    }
    assert!(
        failures.is_empty(),
        "{} of {} name cases misbehaved:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert_never_logged(&sky, &[TOK_FOO, TOK_NAMES, TOK_STAR, TOK_EVERY]);
}

#[test]
fn reserved_labels_are_refused_without_tokens_too() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&[]);
    let addr = sky.connect_addr();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = [
        ("ns.dns", "service=foo&port=80&category=ns,dns", "dns"),
        ("dns", "service=ns&port=80&category=dns", "dns"),
        ("stub.dns", "service=com&port=53&category=stub,dns", "dns"),
        (
            "DNS upper case",
            "service=foo&port=80&category=ns,DNS",
            "dns",
        ),
        (
            "dns percent-encoded",
            "service=foo&port=80&category=ns,%64ns",
            "dns",
        ),
        ("arpa", "service=1&port=80&category=0,in-addr,arpa", "arpa"),
    ]
    .into_iter()
    .map(|(what, q, label)| (what, provide(q), 403, label))
    .collect();
    let failures = refusals(&etcd, addr, &cases);
    assert!(
        failures.is_empty(),
        "reserved names misbehaved:\n{}",
        failures.join("\n")
    );
    // `dns` below the top is an ordinary label.
    for q in [
        "service=dns&port=80",
        "service=x&port=80&category=dns,services",
    ] {
        let (outcome, ws) = exchange(addr, &provide(q));
        assert!(
            matches!(outcome, Outcome::Registered(_)),
            "{q}: {outcome:?}"
        );
        close(&mut ws.expect("registered socket"), DELETE_WITHIN);
    }
    // A default category in a reserved subtree is refused at start-up.
    let run = run_to_exit(
        &[
            "--listen-addr",
            "127.0.0.1:0",
            "--etcd-api",
            "http://127.0.0.1:9",
            "--default-category",
            "ns,dns",
        ],
        Duration::from_secs(10),
    );
    assert_eq!(run.status.code(), Some(2), "{:?}", run.stderr);
    assert!(
        run.stderr.iter().any(|l| l.contains("--default-category")),
        "{:?}",
        run.stderr
    );
}

#[test]
fn sighup_revokes_exactly_the_registrations_no_longer_granted() {
    let _w = watchdog(TEST_LIMIT);
    const A: &str = "tok-revoke-a-1b2c3d";
    const B: &str = "tok-revoke-b-4e5f6a";
    const C: &str = "tok-revoke-c-7b8c9d";
    let dir = TempDir::new("revoke");
    let file = dir.write(
        "tokens",
        &format!("{A} web-*\n{B} api\n{C} foo.services,bar.services\n{TOK_ADMIN} @admin\n"),
    );
    let (etcd, sky) = start(&["--token-file", file.to_str().unwrap()]);
    let addr = sky.connect_addr();
    let hold = |token: &str, service: &str| -> (Ws, String) {
        let (outcome, ws) = exchange(
            addr,
            &with_headers(&format!("service={service}&port=80"), &[bearer(token)]),
        );
        let Outcome::Registered(w) = outcome else {
            panic!("{service}: {outcome:?}");
        };
        let key = w["key"].as_str().unwrap_or_default().to_string();
        (ws.expect("registered socket"), key)
    };
    let mut kept = vec![hold(A, "web-1"), hold(C, "foo")];
    let mut lost = vec![hold(A, "web-2"), hold(B, "api"), hold(C, "bar")];
    // Without --token-file nothing is revocable; here every entry is stored.
    assert!(poll_until(DELETE_WITHIN, || etcd.get_prefix(ROOT).len() == 5));

    // web-2 loses its grant, B loses its token, bar.services is dropped.
    dir.write(
        "tokens",
        &format!("{A} web-1\n{C} foo.services\n{TOK_ADMIN} @admin\n"),
    );
    sky.signal(libc::SIGHUP);
    let mut failures = Vec::new();
    for (ws, key) in &mut lost {
        match close_code_on(ws, Duration::from_secs(3)) {
            Ok((1008, reason)) if reason == "token revoked" => {}
            other => failures.push(format!(
                "{key}: want close 1008 \"token revoked\", got {other:?}"
            )),
        }
        if !poll_until(DELETE_WITHIN, || {
            !etcd.get_prefix(ROOT).contains_key(key.as_str())
        }) {
            failures.push(format!("{key} still in etcd after its revocation"));
        }
    }
    // The others never noticed.
    for (ws, key) in &mut kept {
        still_served(ws, key);
        if !etcd.get_prefix(ROOT).contains_key(key.as_str()) {
            failures.push(format!("{key} is gone though its token still grants it"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let metrics = get_with(addr, "/metrics", &[bearer(TOK_ADMIN)]);
    assert!(
        matches!(&metrics, Outcome::Http { status: 200, body }
            if body.contains("skyapi_removals_total{reason=\"revoked\"} 3")),
        "{metrics:?}"
    );
    // A reload that changes nothing revokes nothing.
    sky.signal(libc::SIGHUP);
    assert!(poll_until(Duration::from_secs(5), || sky
        .lines_with("token file reloaded")
        .len()
        == 2));
    for (ws, key) in &mut kept {
        still_served(ws, key);
    }
    assert_eq!(etcd.get_prefix(ROOT).len(), 2);
    assert_eq!(sky.lines_with("SIGHUP: token no longer grants").len(), 3);
    assert_never_logged(&sky, &[A, B, C, TOK_ADMIN]);
}

#[test]
fn admin_endpoints_are_protected_by_token_or_moved_to_the_admin_listener() {
    let _w = watchdog(TEST_LIMIT);
    let dir = TempDir::new("admin");
    let file = dir.write(
        "tokens",
        &format!("{TOK_WEB} web-*\n{TOK_ADMIN} @admin\n{TOK_ALL} admin\n"),
    );
    let (etcd, sky) = start(&["--token-file", file.to_str().unwrap()]);
    let addr = sky.connect_addr();
    let (mut ws, _) = {
        let (o, ws) = exchange(
            addr,
            &with_headers("service=web-1&port=80&host=10.9.8.7", &[bearer(TOK_WEB)]),
        );
        (ws.unwrap_or_else(|| panic!("{o:?}")), o)
    };
    let mut failures = Vec::new();
    let mut expect = |what: &str, got: Outcome, status: u16, has: &str| {
        if let Err(e) = refused_with(status, has, &got) {
            failures.push(format!("  {what}: {e}"));
        }
    };
    for path in ["/metrics", "/services"] {
        expect(path, get_with(addr, path, &[]), 401, "token");
        expect(
            path,
            get_with(addr, path, &[bearer(TOK_UNKNOWN)]),
            401,
            "token",
        );
        // A registering token, and a token granted the *service* `admin`.
        expect(path, get_with(addr, path, &[bearer(TOK_WEB)]), 403, path);
        expect(path, get_with(addr, path, &[bearer(TOK_ALL)]), 403, path);
        // Only the header counts: tokens in URLs end up in logs.
        let q = format!("{path}?token={TOK_ADMIN}");
        expect(&q, get_with(addr, &q, &[]), 401, "token");
    }
    expect(
        "/metrics as admin",
        get_with(addr, "/metrics", &[bearer(TOK_ADMIN)]),
        200,
        "skyapi_connections_open",
    );
    expect(
        "/services as admin",
        get_with(addr, "/services", &[bearer(TOK_ADMIN)]),
        200,
        "10.9.8.7",
    );
    expect("/healthz", get_with(addr, "/healthz", &[]), 200, "ok");
    close(&mut ws, DELETE_WITHIN);
    drop(sky);

    // With an admin listener, the endpoints leave the main one.
    let sky = Skyapi::start(&etcd, &["--admin-listen-addr", "127.0.0.1:0"]);
    let addr = sky.connect_addr();
    let admin = admin_addr(&sky);
    assert_ne!(admin, addr);
    let (mut ws, _) = register(&sky.url("/provide?service=listed&port=80&host=10.1.2.3"));
    for path in ["/metrics", "/services"] {
        expect(path, get_with(addr, path, &[]), 404, "--admin-listen-addr");
    }
    expect("/healthz", get_with(addr, "/healthz", &[]), 200, "ok");
    expect(
        "admin /healthz",
        get_with(admin, "/healthz", &[]),
        200,
        "ok",
    );
    expect(
        "admin /metrics",
        get_with(admin, "/metrics", &[]),
        200,
        "skyapi_connections_open 1",
    );
    expect(
        "admin /services",
        get_with(admin, "/services", &[]),
        200,
        "10.1.2.3",
    );
    // The admin listener registers nothing.
    let before = snapshot(&etcd);
    let (outcome, _) = exchange(admin, &provide("service=sneaky&port=80"));
    expect("admin /provide", outcome, 404, "no such endpoint");
    assert_eq!(snapshot_diff(&before, &snapshot(&etcd)), None);
    close(&mut ws, DELETE_WITHIN);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_never_logged(&sky, &[TOK_WEB, TOK_ADMIN, TOK_ALL]);
}

// ----------------------------------------------------- host spoofing

#[test]
fn host_must_match_peer_refuses_other_hosts_with_403() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&["--host-must-match-peer"]);
    let mut cases: Vec<Case> = [
        "192.0.2.1",
        "127.0.0.2",
        "10.0.0.1",
        "::1",
        "example.org",
        "localhost",
    ]
    .iter()
    .map(|h| {
        case(
            format!("host={h}"),
            provide(&format!("service=spoof&port=80&host={h}")),
            Want::Http(403),
        )
    })
    .collect();
    // A bad host is a parameter error, answered as such.
    cases.push(case(
        "host=a/b",
        provide("service=spoof&port=80&host=a%2Fb"),
        Want::Refused,
    ));
    assert_cases(&etcd, &sky, &cases);

    // Its own address, said or implied, is accepted.
    for query in [
        "service=own&port=80&host=127.0.0.1",
        "service=own&port=80",
        "service=own&port=80&host=0.0.0.0",
        "service=own&port=80&host=%31%32%37.0.0.1",
    ] {
        let (outcome, ws) = exchange(sky.connect_addr(), &provide(query));
        let Outcome::Registered(welcome) = &outcome else {
            panic!("{query}: the peer's own address was not accepted: {outcome:?}");
        };
        let key = welcome["key"].as_str().unwrap_or_default().to_string();
        let value = etcd.get_prefix(ROOT).get(&key).cloned().unwrap_or_default();
        assert!(
            value.contains(r#""host":"127.0.0.1""#),
            "{query}: stored {key} = {value:?}"
        );
        close(&mut ws.expect("registered socket"), DELETE_WITHIN);
        assert!(
            poll_until(DELETE_WITHIN, || etcd.get_prefix(ROOT).is_empty()),
            "{query}: entry not removed after close"
        );
    }
}

// ---------------------------------------------------------------- TLS

#[test]
fn tls_serves_wss_and_https_and_plain_ws_gets_nothing() {
    let _w = watchdog(TEST_LIMIT);
    let pki = Pki::generate();
    let (etcd, sky) = start(&[
        "--tls-cert",
        pki.cert.to_str().unwrap(),
        "--tls-key",
        pki.key.to_str().unwrap(),
    ]);
    let addr = sky.connect_addr();
    let config = tls_client_config(&pki.ca);

    // wss:// registers.
    let tls = tls_connect(addr, &config).unwrap_or_else(|e| panic!("TLS to skyapi: {e}"));
    let url = format!("wss://{addr}/provide?service=secure&port=443");
    let mut ws = wss_connect(&url, tls).unwrap_or_else(|e| panic!("{url}: {e}"));
    let welcome = match next_event(&mut ws, REPLY_WITHIN) {
        Some(Event::Text(t)) => serde_json::from_str::<serde_json::Value>(&t)
            .unwrap_or_else(|e| panic!("welcome over wss is not JSON ({e}): {t}")),
        other => panic!("over wss, expected the welcome, got {other:?}"),
    };
    let key = welcome["key"].as_str().expect("welcome key").to_string();
    assert!(key.starts_with(&format!("{ROOT}services/secure/")), "{key}");
    assert!(
        etcd.get_prefix(ROOT).contains_key(&key),
        "{key} not in etcd"
    );

    // https:// serves the endpoints.
    let (code, text) =
        https_get(addr, &config, "/healthz").unwrap_or_else(|e| panic!("https /healthz: {e}"));
    assert_eq!(code, 200, "https /healthz: {text}");
    assert!(text.ends_with("ok\n"), "https /healthz body: {text:?}");

    // Plain ws:// and http:// to the TLS port: no upgrade, no answer,
    // nothing written.
    let before = snapshot(&etcd);
    match try_connect(&sky.url("/provide?service=plain&port=80")) {
        Ok(_) => panic!("a plain ws:// upgrade succeeded on the TLS port"),
        Err(e) => assert!(!e.contains("HTTP 101"), "{e}"),
    }
    let (outcome, _) = exchange(addr, &provide("service=plain&port=80"));
    assert!(
        matches!(outcome, Outcome::NoAnswer(_)),
        "plain HTTP on the TLS port got {outcome:?}"
    );
    assert_eq!(snapshot_diff(&before, &snapshot(&etcd)), None);

    // A client that does not trust the CA cannot connect.
    let other = Pki::generate();
    let untrusting = tls_client_config(&other.ca);
    let err = match tls_connect(addr, &untrusting) {
        Ok(_) => panic!("a client trusting another CA completed the TLS handshake"),
        Err(e) => e,
    };
    assert!(err.contains("TLS handshake"), "{err}");

    // The sidecar registers over wss:// with --cacert; without it (system
    // roots, which do not hold our CA) it must not.
    let server = format!("wss://{addr}");
    let trusting = Sidecar::start(
        &[
            "--server",
            &server,
            "--service",
            "side",
            "--port",
            "7",
            "--cacert",
            pki.ca.to_str().unwrap(),
        ],
        &[],
    );
    let untrusted = Sidecar::start(
        &["--server", &server, "--service", "rogue", "--port", "7"],
        &[],
    );
    let side_dir = format!("{ROOT}services/side/");
    assert!(
        poll_until(Duration::from_secs(10), || etcd.get_prefix(&side_dir).len()
            == 1),
        "the wss:// sidecar with --cacert did not register:\n{}",
        trusting.logs()
    );
    assert!(
        poll_until(Duration::from_secs(5), || untrusted
            .logs()
            .contains("UnknownIssuer")),
        "the sidecar without --cacert did not reject the certificate:\n{}",
        untrusted.logs()
    );
    assert!(
        etcd.get_prefix(&format!("{ROOT}services/rogue/"))
            .is_empty(),
        "a sidecar that cannot verify the server registered anyway:\n{}",
        untrusted.logs()
    );
    drop(trusting);
    drop(untrusted);

    close_on(&mut ws);
    assert!(
        poll_until(DELETE_WITHIN + Duration::from_secs(2), || !etcd
            .get_prefix(ROOT)
            .contains_key(&key)),
        "{key} still in etcd after the wss client closed"
    );
}

/// Closes a websocket over any stream, waiting briefly for the answer.
fn close_on<S: std::io::Read + std::io::Write>(ws: &mut tungstenite::WebSocket<S>) {
    // Errors mean the server is already gone, which is the goal.
    let _ = ws.close(None);
    let deadline = Instant::now() + DELETE_WITHIN;
    while Instant::now() < deadline {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

// ------------------------------------------------------ slow handshakes

/// Connects to `addr`, then runs `feed` (which may write and sleep) on its
/// own thread while the caller waits for the server to hang up. Returns
/// how long after connecting that was (`None`: not within `watch`).
fn time_to_hangup(
    addr: SocketAddr,
    watch: Duration,
    feed: impl FnOnce(TcpStream, Instant) + Send + 'static,
) -> Option<Duration> {
    let mut s = tcp_connect(addr);
    let t0 = Instant::now();
    let writer = s.try_clone().expect("clone socket");
    let feeder = thread::spawn(move || feed(writer, t0));
    let took = time_to_eof(&mut s, t0, watch);
    // Why ignored: unblocks the feeder, whose writes now fail.
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = feeder.join();
    took
}

/// Writes `bytes` one at a time, `every` apart, until a write fails or
/// `until` has passed since `t0`.
fn trickle(mut s: TcpStream, t0: Instant, bytes: Vec<u8>, every: Duration, until: Duration) {
    for b in bytes.iter().cycle() {
        if t0.elapsed() >= until || s.write_all(&[*b]).is_err() {
            return;
        }
        thread::sleep(every);
    }
}

/// Whether the server hung up at its handshake deadline (not before, and
/// not much after).
fn hung_up_in_time(what: &str, took: Option<Duration>) -> Result<(), String> {
    let bound = HANDSHAKE_DEADLINE + MARGIN;
    match took {
        Some(t) if t >= HANDSHAKE_DEADLINE - Duration::from_millis(500) && t <= bound => Ok(()),
        Some(t) => Err(format!(
            "{what}: the server hung up after {t:?}; want about {HANDSHAKE_DEADLINE:?} (at most {bound:?})"
        )),
        None => Err(format!(
            "{what}: the server still held the connection after the watch window; want a hang-up within {bound:?}"
        )),
    }
}

/// Joins the slowloris runs; one line for every one not dropped in time.
fn late_hang_ups(runs: Vec<(&str, thread::JoinHandle<Option<Duration>>)>) -> Vec<String> {
    runs.into_iter()
        .filter_map(|(what, run)| {
            hung_up_in_time(what, run.join().expect("slowloris thread")).err()
        })
        .collect()
}

#[test]
fn slowloris_heads_are_dropped_at_the_handshake_deadline() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&[]);
    let addr = sky.connect_addr();
    let before = snapshot(&etcd);
    let watch = HANDSHAKE_DEADLINE + Duration::from_secs(4);
    let runs: Vec<(&str, thread::JoinHandle<Option<Duration>>)> = vec![
        (
            "nothing sent",
            thread::spawn(move || time_to_hangup(addr, watch, |_, _| {})),
        ),
        (
            "half a request line",
            thread::spawn(move || {
                time_to_hangup(addr, watch, |mut s, _| {
                    let _ = s.write_all(b"GET /provide?serv");
                })
            }),
        ),
        (
            "request line and headers, no blank line",
            thread::spawn(move || {
                time_to_hangup(addr, watch, |mut s, _| {
                    let _ = s.write_all(
                        b"GET /provide?service=slow&port=1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n",
                    );
                })
            }),
        ),
        (
            "a header trickled a byte every 250 ms",
            thread::spawn(move || {
                time_to_hangup(addr, watch, move |s, t0| {
                    trickle(
                        s,
                        t0,
                        b"GET /provide?service=slow&port=1 HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaa"
                            .to_vec(),
                        Duration::from_millis(250),
                        watch,
                    )
                })
            }),
        ),
    ];
    let late = late_hang_ups(runs);
    assert_eq!(snapshot_diff(&before, &snapshot(&etcd)), None);
    assert!(late.is_empty(), "{}", late.join("\n"));
    let (_ws, welcome) = register(&sky.url("/provide?service=after&port=1"));
    assert!(welcome["key"].is_string(), "{welcome}");
}

#[test]
fn tls_handshakes_are_held_to_the_same_deadline() {
    let _w = watchdog(TEST_LIMIT);
    let pki = Pki::generate();
    let (etcd, sky) = start(&[
        "--tls-cert",
        pki.cert.to_str().unwrap(),
        "--tls-key",
        pki.key.to_str().unwrap(),
    ]);
    let addr = sky.connect_addr();
    let before = snapshot(&etcd);
    let watch = HANDSHAKE_DEADLINE + Duration::from_secs(4);
    // A TLS handshake record announcing a 16000-byte ClientHello, whose
    // bytes then come one at a time: each read returns something, so only
    // a deadline on the whole handshake ends it.
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x3e, 0x80, 0x01, 0x00, 0x3e, 0x7c, 0x03, 0x03,
    ];
    hello.extend(std::iter::repeat_n(0u8, 64));
    let config = tls_client_config(&pki.ca);
    let config2 = config.clone();
    let runs: Vec<(&str, thread::JoinHandle<Option<Duration>>)> = vec![
        (
            "TLS: nothing sent",
            thread::spawn(move || time_to_hangup(addr, watch, |_, _| {})),
        ),
        (
            "TLS: a ClientHello trickled a byte every 500 ms",
            thread::spawn(move || {
                time_to_hangup(addr, watch, move |s, t0| {
                    trickle(s, t0, hello, Duration::from_millis(500), watch)
                })
            }),
        ),
        (
            "TLS done, then half a request line",
            thread::spawn(move || {
                // The server's deadline starts at accept, before TLS.
                let t0 = Instant::now();
                let Ok(mut tls) = tls_connect(addr, &config) else {
                    return Some(Duration::ZERO);
                };
                let _ = tls
                    .write_all(b"GET /provide?serv")
                    .and_then(|_| tls.flush());
                let (_, ended) = read_until(&mut tls, watch, |_| false);
                ended.map(|_| t0.elapsed())
            }),
        ),
        (
            "TLS done, then a 16 KiB record trickled a byte every 500 ms",
            thread::spawn(move || {
                let t0 = Instant::now();
                let Ok(tls) = tls_connect(addr, &config2) else {
                    return Some(Duration::ZERO);
                };
                let mut raw = tls.sock;
                let writer = raw.try_clone().expect("clone socket");
                let mut record = vec![0x17, 0x03, 0x03, 0x40, 0x00];
                record.extend(std::iter::repeat_n(0x5au8, 64));
                let feeder = thread::spawn(move || {
                    trickle(writer, t0, record, Duration::from_millis(500), watch)
                });
                let took = time_to_eof(&mut raw, t0, watch);
                let _ = raw.shutdown(std::net::Shutdown::Both);
                let _ = feeder.join();
                took
            }),
        ),
    ];
    let late = late_hang_ups(runs);
    assert_eq!(snapshot_diff(&before, &snapshot(&etcd)), None);
    assert!(late.is_empty(), "{}", late.join("\n"));
}

// ------------------------------------------------ injection in parameters

/// Values that are invalid in every parameter: traversal, separators,
/// encodings of them, NUL, CR/LF, look-alike letters, invalid UTF-8, bad
/// escapes, JSON and quoting characters, over-long values.
fn hostile_values() -> Vec<String> {
    let mut v: Vec<String> = [
        "../x",
        "..%2Fx",
        "%2E%2E%2Fx",
        "%2e%2e",
        "..",
        ".",
        "/",
        "%2F",
        "a%2Fb",
        "a/b",
        "%5C..%5Cx",
        "..%252F",
        "%00",
        "a%00b",
        "a%0d%0aX-Injected:%201",
        "a%0aINJECTED%20line",
        "%0d",
        // Look-alikes: Cyrillic а and е, Greek ο and α, fullwidth ｗｅｂ,
        // fullwidth ．．／, division slash, one-dot leader, Kelvin sign,
        // dotless ı, zero-width space, right-to-left override, soft hyphen.
        "%D0%B0pi",
        "w%D0%B5b",
        "f%CE%BFo",
        "%CE%B1pi",
        "%EF%BD%97%EF%BD%85%EF%BD%82",
        "%EF%BC%8E%EF%BC%8E%EF%BC%8F",
        "a%E2%88%95b",
        "a%E2%80%A4b",
        "%E2%84%AA",
        "%C4%B1",
        "a%E2%80%8Bb",
        "a%E2%80%AEb",
        "a%C2%ADb",
        // Invalid UTF-8: a lone byte, a broken sequence, overlong '.' and '/'.
        "%ff",
        "%c3%28",
        "%C0%AE%C0%AE%C0%AF",
        "%E0%80%AE",
        // Bad escapes.
        "%zz",
        "%",
        "a%2",
        // JSON and quoting.
        "a%22b",
        "%7B%22x%22%3A1%7D",
        "a%22%2C%22port%22%3A1%2C%22x%22%3A%22",
        "a%27b",
        "a%5Cb",
        // Separators and blanks.
        "%20",
        "a+b",
        "a;b",
        "a%09b",
        "a%3Db",
        "a%26b",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("a".repeat(64));
    v.push("9".repeat(64));
    v.push("b".repeat(4000));
    v
}

/// A query with `param=value` and valid values for the rest.
fn query_with(param: &str, value: &str) -> String {
    let mut pairs = vec![("service", "hostile"), ("port", "9999")];
    match pairs.iter_mut().find(|(p, _)| *p == param) {
        Some(pair) => pair.1 = value,
        None => pairs.push((param, value)),
    }
    pairs
        .iter()
        .map(|(p, v)| format!("{p}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

fn cases_for(params: &[&str], extra: &[(&str, String)]) -> Vec<Case> {
    let mut cases = Vec::new();
    for p in params {
        for v in hostile_values() {
            cases.push(case(
                format!("{p}={}", short(&v)),
                provide(&query_with(p, &v)),
                Want::Refused,
            ));
        }
        // 10 KiB: over the 8 KiB head cap before any parameter is read.
        cases.push(case(
            format!("{p}=<10 KiB>"),
            provide(&query_with(p, &"c".repeat(10 * 1024))),
            Want::Http(431),
        ));
    }
    for (p, v) in extra {
        cases.push(case(
            format!("{p}={}", short(v)),
            provide(&query_with(p, v)),
            Want::Refused,
        ));
    }
    cases
}

#[test]
fn traversal_and_injection_in_labels_are_refused_and_write_nothing() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&[]);
    let extra: Vec<(&str, String)> = vec![
        ("category", "services,..".into()),
        ("category", "services,%2F".into()),
        ("category", "services%2F..%2F..%2Fx".into()),
        ("category", ",".into()),
        ("category", "services,%00".into()),
        ("category", format!("services,{}", "d".repeat(64))),
        ("prefix", "p".repeat(43)),
        ("service", "%2E".into()),
        ("service", "-%0a-".into()),
    ];
    let mut cases = cases_for(&["service", "category", "prefix"], &extra);
    // Well-formed names in the DNS servers' own subtrees, disguised or not:
    // refused as not allowed (403), before any upgrade.
    for category in [
        "ns,dns",
        "ns,DNS",
        "ns,%64ns",
        "ns%2Cdns",
        "com,stub,dns",
        "dns",
        "0,in-addr,arpa",
        "in-addr,%61rpa",
    ] {
        cases.push(case(
            format!("category={category}"),
            provide(&query_with("category", category)),
            Want::Http(403),
        ));
    }
    assert_cases(&etcd, &sky, &cases);
}

#[test]
fn traversal_and_injection_in_host_are_refused_and_write_nothing() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&[]);
    let extra: Vec<(&str, String)> = [
        "127.0.0.1%00",
        "127.0.0.1%0d%0a",
        "127.0.0.1/32",
        "127.0.0.1:80",
        "[::1]",
        "::1%25lo",
        "1.2.3.4.5",
        "256.1.1.1",
        "127.1",
        "0x7f.0.0.1",
        "ex%D0%B0mple.org",
        "exam%C2%ADple.org",
        "example.org%2F..%2F..",
        "example..org",
        "-a.example.org",
        "a-.example.org",
        "a_b.example.org",
        "localhost%0d%0aSet-Cookie:%20x",
        "%22%7D%2C%22host%22%3A%22evil",
        "example.org%22%2C%22priority%22%3A0%2C%22x%22%3A%22",
    ]
    .iter()
    .map(|h| ("host", h.to_string()))
    .chain([
        ("host", format!("{}a", "a.".repeat(127))),
        ("host", format!("{}.example.org", "h".repeat(64))),
    ])
    .collect();
    let cases = cases_for(&["host"], &extra);
    assert_cases(&etcd, &sky, &cases);
}

#[test]
fn traversal_and_injection_in_numbers_are_refused_and_write_nothing() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&[]);
    let mut extra: Vec<(&str, String)> = Vec::new();
    for p in ["port", "priority", "weight", "ttl"] {
        for v in [
            "1%00",
            "1%0d%0a",
            "0x10",
            "1e3",
            "%2B1",
            "1.0",
            "-0",
            "%201",
            "1%20",
            "%EF%BC%91",
            "%D9%A1",
            "00000000001",
            "4294967296",
            "4294967297",
            "18446744073709551617",
        ] {
            extra.push((p, v.to_string()));
        }
    }
    extra.push(("port", "65536".into()));
    extra.push(("port", "0".into()));
    extra.push(("priority", "65536".into()));
    extra.push(("weight", "65536".into()));
    extra.push(("ttl", "2147483648".into()));
    extra.push(("ttl", "0".into()));
    let cases = cases_for(&["port", "priority", "weight", "ttl"], &extra);
    assert_cases(&etcd, &sky, &cases);
}

#[test]
fn duplicate_and_disguised_parameters_are_refused_and_write_nothing() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&[]);
    let base = "service=hostile&port=9999";
    let mut cases = Vec::new();
    for (p, v) in [
        ("service", "hostile"),
        ("service", "other"),
        ("port", "9999"),
        ("host", "192.0.2.1"),
        ("priority", "1"),
        ("weight", "1"),
        ("category", "services"),
        ("prefix", "dc1"),
        ("ttl", "60"),
    ] {
        let once = if base.contains(&format!("{p}=")) {
            base.to_string()
        } else {
            format!("{base}&{p}={v}")
        };
        cases.push(case(
            format!("{p} twice"),
            provide(&format!("{once}&{p}={v}")),
            Want::Refused,
        ));
        // The second one disguised by percent-encoding its name.
        let first = p.chars().next().unwrap();
        let disguised = format!("%{:02X}{}", first as u32, &p[1..]);
        cases.push(case(
            format!("{p} twice, the second as {disguised}"),
            provide(&format!("{once}&{disguised}={v}")),
            Want::Refused,
        ));
    }
    for (what, query) in [
        ("second service without a value", format!("{base}&service")),
        ("second service empty", format!("{base}&service=")),
        ("name in upper case", format!("{base}&Host=192.0.2.1")),
        ("name with NUL", format!("{base}&host%00=192.0.2.1")),
        ("name with a space", format!("{base}&host%20=192.0.2.1")),
        ("name with CR LF", format!("{base}&host%0d%0a=192.0.2.1")),
        ("empty name", format!("{base}&=x")),
        (
            "name with look-alike",
            format!("{base}&h%D0%BEst=192.0.2.1"),
        ),
        (
            "';' as a separator",
            "service=hostile;port=9999".to_string(),
        ),
        ("'=' in a value", "service=hostile=x&port=9999".to_string()),
        ("'#' in a value", "service=hostile&port=9999#x".to_string()),
        (
            "500 unknown parameters",
            format!("{base}{}", "&x=1".repeat(500)),
        ),
        (
            "service twice, 200 parameters apart",
            format!("{base}{}&service=x", "&port=9999".repeat(200)),
        ),
    ] {
        cases.push(case(what, provide(&query), Want::Refused));
    }
    assert_cases(&etcd, &sky, &cases);
}

#[test]
fn raw_bytes_in_the_request_line_are_refused_and_write_nothing() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&[]);
    let raw = |target: &[u8]| upgrade_request(target, &[]);
    // Not UTF-8, or not a valid request line: the head itself is malformed,
    // so the answer is HTTP 400 before any upgrade.
    let bad400: &[(&str, &[u8])] = &[
        ("Latin-1 byte", b"/provide?service=caf\xe9&port=1"),
        ("0xff 0xfe", b"/provide?service=\xff\xfe&port=1"),
        ("trailing 0x80", b"/provide?service=web&port=1\x80"),
        ("overlong dots", b"/provide?service=\xc0\xae\xc0\xae&port=1"),
        (
            "lone continuation bytes",
            b"/provide?service=\x80\x80&port=1",
        ),
        ("raw NUL", b"/provide?service=a\x00b&port=1"),
        (
            "raw CR LF and a header",
            b"/provide?service=a\r\nX-Injected: 1&port=1",
        ),
        ("raw LF", b"/provide?service=a\nINJECTED&port=1"),
        ("raw space", b"/provide?service=a b&port=1"),
        ("raw tab", b"/provide?service=a\tb&port=1"),
        ("raw DEL", b"/provide?service=a\x7fb&port=1"),
    ];
    let mut cases: Vec<Case> = bad400
        .iter()
        .map(|(what, target)| case(*what, raw(target), Want::Http(400)))
        .collect();
    // Valid UTF-8 sent raw: a well-formed head whose parameters are refused.
    let refused: &[(&str, &[u8])] = &[
        ("raw é", "/provide?service=café&port=1".as_bytes()),
        ("raw Cyrillic а", "/provide?service=аpi&port=1".as_bytes()),
        (
            "raw fullwidth ｗ",
            "/provide?service=ｗeb&port=1".as_bytes(),
        ),
        (
            "raw fullwidth solidus",
            "/provide?service=a／b&port=1".as_bytes(),
        ),
        ("raw '..' path", b"/provide?service=..&port=1"),
        ("raw '#' fragment", b"/provide?service=web&port=1#x"),
        ("empty query", b"/provide?"),
    ];
    cases.extend(
        refused
            .iter()
            .map(|(what, target)| case(*what, raw(target), Want::Refused)),
    );
    // Traversal or disguise in the path: no such endpoint.
    let not_found: &[(&str, &[u8])] = &[
        ("dot segments", b"/provide/../provide?service=x&port=1"),
        ("double slash", b"//provide?service=x&port=1"),
        ("encoded path", b"/%70rovide?service=x&port=1"),
        ("path parameter", b"/provide;x?service=x&port=1"),
        ("absolute form", b"http://evil/provide?service=x&port=1"),
        ("trailing dot", b"/provide.?service=x&port=1"),
    ];
    cases.extend(
        not_found
            .iter()
            .map(|(what, target)| case(*what, raw(target), Want::Http(404))),
    );
    assert_cases(&etcd, &sky, &cases);
}

// --------------------------------------------------------------- limits

#[test]
fn oversized_request_heads_get_431_and_write_nothing() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&[]);
    let q = b"/provide?service=big&port=1";
    let headers = |n: usize| -> Vec<String> { (0..n).map(|i| format!("X-H{i}: v")).collect() };
    let mut cases = vec![
        case(
            "one 9 KiB header",
            upgrade_request(q, &[format!("X-Big: {}", "a".repeat(9 * 1024))]),
            Want::Http(431),
        ),
        case(
            "a 100 KiB header",
            upgrade_request(q, &[format!("X-Big: {}", "a".repeat(100 * 1024))]),
            Want::Http(431),
        ),
        case(
            "a 12 KiB request line",
            upgrade_request(
                format!("/provide?service=big&port=1&x={}", "a".repeat(12 * 1024)).as_bytes(),
                &[],
            ),
            Want::Http(431),
        ),
        // The websocket request has 5 headers of its own.
        case(
            "33 headers",
            upgrade_request(q, &headers(28)),
            Want::Http(431),
        ),
        case(
            "200 headers",
            upgrade_request(q, &headers(195)),
            Want::Http(431),
        ),
        case(
            "2000 empty-valued headers",
            upgrade_request(q, &(0..2000).map(|_| "X:".to_string()).collect::<Vec<_>>()),
            Want::Http(431),
        ),
    ];
    // A plain GET too.
    let mut plain = b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec();
    plain.extend_from_slice(format!("X-Big: {}\r\n\r\n", "a".repeat(9 * 1024)).as_bytes());
    cases.push(case(
        "plain GET with a 9 KiB header",
        plain,
        Want::Http(431),
    ));
    assert_cases(&etcd, &sky, &cases);

    // A head that never ends, sent in small pieces: the cap counts across
    // reads.
    let mut s = tcp_connect(sky.connect_addr());
    let before = snapshot(&etcd);
    let mut sent = 0;
    let _ = s.write_all(b"GET /provide?service=big&port=1 HTTP/1.1\r\n");
    let mut answer = Vec::new();
    while sent < 64 * 1024 {
        if s.write_all(format!("X-{sent}: {}\r\n", "p".repeat(200)).as_bytes())
            .is_err()
        {
            break;
        }
        sent += 210;
        let (got, ended) = read_until(&mut s, Duration::from_millis(10), |r| !r.is_empty());
        answer.extend(got);
        if !answer.is_empty() || ended.is_some() {
            break;
        }
    }
    let (rest, _) = read_until(&mut s, Duration::from_secs(2), |r| {
        r.windows(4).any(|w| w == b"\r\n\r\n")
    });
    answer.extend(rest);
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 431"),
        "a head trickled in 210-byte lines got {text:?} after {sent} bytes"
    );
    assert!(
        sent <= 16 * 1024,
        "the server read {sent} bytes of head before answering"
    );
    assert_eq!(snapshot_diff(&before, &snapshot(&etcd)), None);

    // Just under the caps is fine: 32 headers, and a 7 KiB head.
    for (what, request) in [
        ("32 headers", upgrade_request(q, &headers(27))),
        (
            "7 KiB head",
            upgrade_request(q, &[format!("X-Pad: {}", "a".repeat(7 * 1024))]),
        ),
    ] {
        let (outcome, ws) = exchange(sky.connect_addr(), &request);
        assert!(
            matches!(outcome, Outcome::Registered(_)),
            "{what}: {outcome:?}"
        );
        close(&mut ws.expect("registered socket"), DELETE_WITHIN);
    }
}

#[test]
fn max_connections_answers_503_beyond_the_limit_and_recovers() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&["--max-connections", "5"]);
    let addr = sky.connect_addr();

    // Five registered clients hold every slot.
    let mut held: Vec<Ws> = (0..5)
        .map(|i| register(&sky.url(&format!("/provide?service=held{i}&port=1"))).0)
        .collect();
    let before = snapshot(&etcd);
    assert_eq!(before.kvs.len(), 5);
    let got = get(addr, "/healthz");
    assert_eq!(
        got.http_status(),
        Some(503),
        "6th connection (GET /healthz): {got:?}"
    );
    let (outcome, _) = exchange(addr, &provide("service=sixth&port=1"));
    assert_eq!(
        outcome.http_status(),
        Some(503),
        "6th connection (upgrade): {outcome:?}"
    );
    assert_eq!(snapshot_diff(&before, &snapshot(&etcd)), None);
    assert!(
        sky.logs().iter().any(|l| l.contains("max-connections")),
        "hitting the limit is not logged"
    );

    // Once they close, new connections are served again.
    for ws in &mut held {
        close(ws, DELETE_WITHIN);
    }
    let (mut ws, _) = eventually(
        "a registration after the five closed",
        Duration::from_secs(5),
        || match exchange(addr, &provide("service=later&port=1")) {
            (Outcome::Registered(w), Some(ws)) => Some((ws, w)),
            _ => None,
        },
    );
    close(&mut ws, DELETE_WITHIN);

    // Five silent sockets hold the slots too, but only until the handshake
    // deadline reaps them; nobody has to close anything.
    let silent: Vec<TcpStream> = (0..5).map(|_| tcp_connect(addr)).collect();
    let t0 = Instant::now();
    assert!(
        poll_until(Duration::from_secs(2), || get(addr, "/healthz")
            .http_status()
            == Some(503)),
        "five silent sockets did not take the five slots"
    );
    let took = eventually(
        "a slot freed by the handshake deadline",
        HANDSHAKE_DEADLINE + MARGIN + Duration::from_secs(2),
        || (get(addr, "/healthz").http_status() == Some(200)).then(|| t0.elapsed()),
    );
    assert!(
        took <= HANDSHAKE_DEADLINE + MARGIN,
        "silent sockets held their slots for {took:?}"
    );
    drop(silent);
}

/// A plain `GET path`. Unlike `http_get`, a failed write is not fatal: a
/// server at its connection limit answers 503 without reading the request.
fn get(addr: SocketAddr, path: &str) -> Outcome {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .0
}

#[test]
fn accept_errors_are_logged_and_retried_not_fatal() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&[]);
    let pid = sky.pid();
    let addr = sky.connect_addr();
    let (mut steady, steady_key) = registered(&sky, "steady");

    // Two descriptors to spare: the third pending connection makes accept()
    // fail with EMFILE, and keeps it failing while the limit stands.
    let old = set_nofile_soft(pid, proc_fds(pid) as u64 + 2);
    let pending: Vec<TcpStream> = (0..6).map(|_| tcp_connect(addr)).collect();
    let accept_errors = |sky: &Skyapi| {
        sky.logs()
            .iter()
            .filter(|l| l.contains("accept failed"))
            .count()
    };
    assert!(
        poll_until(Duration::from_secs(3), || accept_errors(&sky) > 0),
        "no accept error logged while out of descriptors"
    );
    let first = accept_errors(&sky);
    thread::sleep(Duration::from_secs(1));
    let in_a_second = accept_errors(&sky) - first;
    set_nofile_soft(pid, old);
    assert!(
        sky.logs().iter().all(|l| !l.contains("panicked")),
        "skyapi panicked while out of descriptors"
    );
    // Retried after a pause, not in a busy loop (README: 100 ms).
    assert!(
        (1..=20).contains(&in_a_second),
        "{in_a_second} accept errors logged in one second"
    );

    // With descriptors back, the server serves again, the queued
    // connections included, and the steady client never noticed.
    let (mut newcomer, newcomer_key) = eventually(
        "a registration once descriptors are back",
        Duration::from_secs(5),
        || match exchange(addr, &provide("service=newcomer&port=1")) {
            (Outcome::Registered(w), Some(ws)) => {
                Some((ws, w["key"].as_str().unwrap_or_default().to_string()))
            }
            _ => None,
        },
    );
    let live = etcd.get_prefix(ROOT);
    assert!(
        live.contains_key(&newcomer_key),
        "newcomer not stored: {live:?}"
    );
    assert!(
        live.contains_key(&steady_key),
        "steady entry gone: {live:?}"
    );
    still_served(&mut steady, "the steady client");
    close(&mut newcomer, DELETE_WITHIN);
    drop(pending);
}

/// A registered client for service `name`; panics if it is not.
fn registered(sky: &Skyapi, name: &str) -> (Ws, String) {
    let (ws, welcome) = register(&sky.url(&format!("/provide?service={name}&port=1")));
    let key = welcome["key"].as_str().expect("welcome key").to_string();
    (ws, key)
}

/// Sends a ping on `ws` and waits for its pong (answering the server's own
/// pings meanwhile); the way to show a connection is still served.
fn still_served(ws: &mut Ws, what: &str) {
    ws.send(Message::Ping(b"alive?".to_vec().into()))
        .unwrap_or_else(|e| panic!("{what}: sending a ping: {e}"));
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_event(ws, left) {
            Some(Event::Pong(p)) if p == b"alive?" => return,
            Some(Event::Ping(_) | Event::Pong(_) | Event::Text(_)) => continue,
            other => panic!("{what}: expected our pong, got {other:?}"),
        }
    }
}

#[test]
fn oversized_frames_are_refused_with_1009_without_being_read() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&[]);
    let pid = sky.pid();
    let (mut steady, steady_key) = registered(&sky, "steady");
    let mib = 1024 * 1024u64;

    struct Attack {
        what: &'static str,
        bytes: Vec<u8>,
        /// Keep streaming payload after the header, ignoring the close.
        stream_more: bool,
        want: u16,
        /// Check that the server's peak RSS did not grow with the frame.
        memory: bool,
    }
    let fragments: Vec<u8> = (0..5)
        .flat_map(|i| frame(if i == 0 { 0x2 } else { 0x0 }, i == 4, &[7u8; 1024]))
        .collect();
    let attacks = vec![
        Attack {
            what: "binary frame announcing 100 MiB, a few bytes sent",
            bytes: [frame_header(0x2, true, 100 * mib), vec![1u8; 16]].concat(),
            stream_more: false,
            want: 1009,
            memory: true,
        },
        Attack {
            what: "text frame announcing 100 MiB, a few bytes sent",
            bytes: [frame_header(0x1, true, 100 * mib), b"abcdefgh".to_vec()].concat(),
            stream_more: false,
            want: 1009,
            memory: true,
        },
        Attack {
            what: "frame announcing 2^63 bytes",
            bytes: frame_header(0x2, true, 1 << 63),
            stream_more: false,
            want: 1009,
            memory: true,
        },
        Attack {
            what: "4097-byte frame, one over the cap",
            bytes: frame(0x2, true, &[0u8; 4097]),
            stream_more: false,
            want: 1009,
            memory: false,
        },
        Attack {
            what: "5 KiB message in 1 KiB fragments",
            bytes: fragments,
            stream_more: false,
            want: 1009,
            memory: false,
        },
        Attack {
            what: "binary frame announcing 100 MiB, then streaming it",
            bytes: frame_header(0x2, true, 100 * mib),
            stream_more: true,
            want: 1009,
            memory: false,
        },
    ];

    let mut failures = Vec::new();
    for (i, a) in attacks.into_iter().enumerate() {
        let (mut ws, key) = registered(&sky, &format!("big{i}"));
        let hwm_before = proc_status_kib(pid, "VmHWM");
        let mut problems = Vec::new();
        if let Err(e) = ws.get_mut().write_all(&a.bytes) {
            problems.push(format!("writing the frame: {e}"));
        }
        let streamer = a.stream_more.then(|| {
            let mut w = ws.get_ref().try_clone().expect("clone socket");
            thread::spawn(move || {
                let chunk = vec![0x5au8; 256 * 1024];
                let t0 = Instant::now();
                let mut sent = 0usize;
                while t0.elapsed() < Duration::from_secs(2) && sent < 100 << 20 {
                    match w.write(&chunk) {
                        Ok(n) => sent += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => break,
                    }
                }
                sent
            })
        });
        match close_code_on(&mut ws, Duration::from_secs(5)) {
            Ok((code, _)) if code == a.want => {}
            Ok((code, reason)) => {
                problems.push(format!("close {code} {reason:?}, want {}", a.want))
            }
            Err(e) => problems.push(format!("want close {}: {e}", a.want)),
        }
        if let Some(s) = streamer {
            let sent = s.join().expect("streamer");
            eprintln!("{}: streamed {} MiB after the header", a.what, sent >> 20);
        }
        let hwm_after = proc_status_kib(pid, "VmHWM");
        if a.memory && hwm_after.saturating_sub(hwm_before) > 8 * 1024 {
            problems.push(format!(
                "peak RSS grew from {hwm_before} KiB to {hwm_after} KiB"
            ));
        }
        if !poll_until(DELETE_WITHIN, || !etcd.get_prefix(ROOT).contains_key(&key)) {
            problems.push(format!("{key} still in etcd after the close"));
        }
        if !problems.is_empty() {
            failures.push(format!("  {}: {}", a.what, problems.join("; ")));
        }
    }

    // A frame of exactly the cap is fine, and the steady client never
    // noticed any of it.
    let (mut fits, _) = registered(&sky, "fits");
    fits.send(Message::binary(vec![0u8; 4096]))
        .expect("send a 4096-byte frame");
    still_served(&mut fits, "after a 4096-byte frame");
    still_served(&mut steady, "the steady client");
    assert!(
        etcd.get_prefix(ROOT).contains_key(&steady_key),
        "the steady client's entry is gone"
    );
    let panics: Vec<String> = sky
        .logs()
        .into_iter()
        .filter(|l| l.contains("panicked"))
        .collect();
    assert!(
        failures.is_empty(),
        "oversized frames misbehaved:\n{}",
        failures.join("\n")
    );
    assert!(
        panics.is_empty(),
        "a peer's frames reached a panic in skyapi:\n{}",
        panics.join("\n")
    );
}

#[test]
fn message_flood_is_closed_with_1008_and_others_stay() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&[]);
    let (mut steady, steady_key) = registered(&sky, "steady");
    let (mut flood, flood_key) = registered(&sky, "flood");
    let (mut burst, burst_key) = registered(&sky, "burst");

    // 1,000 small messages in one go.
    for i in 0..1000 {
        flood
            .write(Message::text(format!("m{i}")))
            .expect("queue a message");
    }
    flood.flush().expect("send the flood");
    let got = close_code_on(&mut flood, Duration::from_secs(5));
    assert!(
        matches!(&got, Ok((1008, reason)) if reason.contains("too many messages")),
        "the flooding client got {got:?}, want close 1008 \"too many messages\""
    );
    assert!(
        poll_until(DELETE_WITHIN, || !etcd
            .get_prefix(ROOT)
            .contains_key(&flood_key)),
        "the flooder's entry is still in etcd"
    );

    // 90 at once is within the burst of 100: still served.
    for i in 0..90 {
        burst
            .write(Message::text(format!("b{i}")))
            .expect("queue a message");
    }
    burst.flush().expect("send the burst");
    still_served(&mut burst, "a client within the burst");
    still_served(&mut steady, "the steady client");
    let live = etcd.get_prefix(ROOT);
    assert!(
        live.contains_key(&steady_key),
        "steady entry gone: {live:?}"
    );
    assert!(live.contains_key(&burst_key), "burst entry gone: {live:?}");
    assert!(
        sky.logs().iter().any(|l| l.contains("floods")),
        "closing a flooder is not logged"
    );
}

#[test]
fn floods_of_pings_pongs_and_fragments_are_closed_with_1008() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&[]);
    let (mut steady, steady_key) = registered(&sky, "steady");
    let (mut flood, flood_key) = registered(&sky, "pings");
    let (mut pongs, pongs_key) = registered(&sky, "pongs");

    // 1,000 pings of 125 bytes (the control-frame maximum) in one go: each
    // would be answered, so each counts against --max-message-rate.
    let ping = frame(0x9, true, &[0x70; 125]);
    let flood_bytes: Vec<u8> = (0..1000).flat_map(|_| ping.clone()).collect();
    // The server may close before reading it all; the close is what counts.
    let _ = flood.get_mut().write_all(&flood_bytes);
    let got = close_code_on(&mut flood, Duration::from_secs(5));
    assert!(
        matches!(&got, Ok((1008, reason)) if reason.contains("too many messages")),
        "the ping flood got {got:?}, want close 1008 \"too many messages\""
    );
    // Unsolicited pongs count too.
    let pong = frame(0xA, true, b"unasked");
    let _ = pongs
        .get_mut()
        .write_all(&(0..1000).flat_map(|_| pong.clone()).collect::<Vec<u8>>());
    let got = close_code_on(&mut pongs, Duration::from_secs(5));
    assert!(
        matches!(&got, Ok((1008, _))),
        "the pong flood got {got:?}, want close 1008"
    );
    // Frames that never make a message (empty continuation fragments) are
    // held to the bytes that many messages would take.
    let (mut frames, frames_key) = registered(&sky, "fragments");
    let mut endless = frame(0x1, false, b"");
    endless.extend((0..200_000).flat_map(|_| frame(0x0, false, b"")));
    let _ = frames.get_mut().write_all(&endless);
    let got = close_code_on(&mut frames, Duration::from_secs(5));
    assert!(
        matches!(&got, Ok((1008, _))),
        "a flood of empty fragments got {got:?}, want close 1008"
    );
    for key in [&flood_key, &pongs_key, &frames_key] {
        assert!(
            poll_until(DELETE_WITHIN, || !etcd.get_prefix(ROOT).contains_key(key)),
            "{key} is still in etcd after its flood"
        );
    }
    still_served(&mut steady, "the steady client");
    assert!(etcd.get_prefix(ROOT).contains_key(&steady_key));
}

#[test]
fn invalid_utf8_is_closed_with_1007() {
    let _w = watchdog(TEST_LIMIT);
    let (etcd, sky) = start(&[]);
    let (mut steady, _) = registered(&sky, "steady");
    let attacks: Vec<(&str, Vec<u8>)> = vec![
        ("a text message of 0xff", frame(0x1, true, b"ok \xff")),
        (
            "an overlong '/' in a text message",
            frame(0x1, true, b"\xc0\xaf"),
        ),
        (
            "a text message split mid-character over two fragments",
            [frame(0x1, false, b"caf\xc3"), frame(0x0, true, b"(")].concat(),
        ),
        (
            "a close reason that is not UTF-8",
            frame(0x8, true, b"\x03\xe8bye \xff\xfe"),
        ),
    ];
    let mut failures = Vec::new();
    for (i, (what, bytes)) in attacks.into_iter().enumerate() {
        let (mut ws, key) = registered(&sky, &format!("utf{i}"));
        let _ = ws.get_mut().write_all(&bytes);
        match close_code_on(&mut ws, Duration::from_secs(5)) {
            Ok((1007, _)) => {}
            other => failures.push(format!("  {what}: want close 1007, got {other:?}")),
        }
        if !poll_until(DELETE_WITHIN, || !etcd.get_prefix(ROOT).contains_key(&key)) {
            failures.push(format!("  {what}: {key} still in etcd"));
        }
    }
    // Valid UTF-8 (multi-byte, split over fragments) is fine.
    let (mut fine, _) = registered(&sky, "fine");
    let _ = fine
        .get_mut()
        .write_all(&[frame(0x1, false, b"caf\xc3"), frame(0x0, true, b"\xa9")].concat());
    still_served(&mut fine, "after valid fragmented UTF-8");
    still_served(&mut steady, "the steady client");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn max_connections_under_tls_answers_503_and_a_flood_takes_few_threads() {
    let _w = watchdog(TEST_LIMIT);
    let pki = Pki::generate();
    let (etcd, sky) = start(&[
        "--tls-cert",
        pki.cert.to_str().unwrap(),
        "--tls-key",
        pki.key.to_str().unwrap(),
        "--max-connections",
        "2",
    ]);
    let addr = sky.connect_addr();
    let config = tls_client_config(&pki.ca);
    let wss = |service: &str| {
        let tls = tls_connect(addr, &config).unwrap_or_else(|e| panic!("TLS: {e}"));
        let url = format!("wss://{addr}/provide?service={service}&port=443");
        let mut ws = wss_connect(&url, tls).unwrap_or_else(|e| panic!("{url}: {e}"));
        match next_event(&mut ws, REPLY_WITHIN) {
            Some(Event::Text(t)) if t.starts_with('{') => ws,
            other => panic!("{service}: want the welcome, got {other:?}"),
        }
    };
    let mut held = [wss("held0"), wss("held1")];
    let before = snapshot(&etcd);
    for path in ["/healthz", "/provide?service=third&port=443"] {
        match https_get(addr, &config, path) {
            Ok((503, text)) => assert!(text.contains("too many connections"), "{text}"),
            other => panic!("GET {path} beyond --max-connections under TLS: {other:?}"),
        }
    }
    assert_eq!(snapshot_diff(&before, &snapshot(&etcd)), None);

    // Silent sockets beyond the limit: a bounded number of short-lived
    // threads answers them, and each is let go within about a second.
    let pid = sky.pid();
    let threads_before = proc_threads(pid);
    let silent: Vec<TcpStream> = (0..60).map(|_| tcp_connect(addr)).collect();
    let mut peak = threads_before;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(800) {
        peak = peak.max(proc_threads(pid));
        thread::sleep(Duration::from_millis(20));
    }
    eprintln!("60 silent TLS sockets beyond the limit: threads {threads_before} -> peak {peak}");
    assert!(
        peak <= threads_before + 16,
        "60 silent TLS sockets beyond the limit raised the threads from {threads_before} to {peak}"
    );
    assert!(
        poll_until(Duration::from_secs(3), || proc_threads(pid)
            <= threads_before),
        "threads answering 503 did not end: {} (were {threads_before})",
        proc_threads(pid)
    );
    drop(silent);
    // Still answering 503 after the flood, and serving once a slot is free.
    assert!(matches!(https_get(addr, &config, "/healthz"), Ok((503, _))));
    close_on(&mut held[0]);
    assert!(
        poll_until(Duration::from_secs(3), || matches!(
            https_get(addr, &config, "/healthz"),
            Ok((200, _))
        )),
        "no slot freed after a client closed"
    );
    close_on(&mut held[1]);
}

#[test]
fn max_head_size_is_exact() {
    let _w = watchdog(TEST_LIMIT);
    // Not a multiple of the server's 1 KiB reads: a cap checked only
    // after whole reads would let a head reach 2048 bytes.
    let (etcd, sky) = start(&["--max-head-size", "1500"]);
    let addr = sky.connect_addr();
    // An unknown path: its 404 says the head was read, whatever etcd's state.
    let (at, _) = exchange(addr, &head_of_size("/unknown", false, 1500));
    assert_eq!(at.http_status(), Some(404), "a 1500-byte head: {at:?}");
    let (over, _) = exchange(addr, &head_of_size("/unknown", false, 1501));
    assert_eq!(over.http_status(), Some(431), "a 1501-byte head: {over:?}");
    let (at, ws) = exchange(
        addr,
        &head_of_size("/provide?service=fits&port=1", true, 1500),
    );
    assert!(
        matches!(at, Outcome::Registered(_)),
        "a 1500-byte upgrade: {at:?}"
    );
    close(&mut ws.expect("registered socket"), DELETE_WITHIN);
    assert!(poll_until(DELETE_WITHIN, || etcd
        .get_prefix(ROOT)
        .is_empty()));
    let before = snapshot(&etcd);
    let (over, _) = exchange(
        addr,
        &head_of_size("/provide?service=over&port=1", true, 1501),
    );
    assert_eq!(
        over.http_status(),
        Some(431),
        "a 1501-byte upgrade: {over:?}"
    );
    assert_eq!(snapshot_diff(&before, &snapshot(&etcd)), None);
    // A first frame sent with the head is not counted in it, nor lost.
    let mut both = head_of_size("/provide?service=eager&port=1", true, 1500);
    both.extend(frame(0x9, true, b"early"));
    let (outcome, ws) = exchange(addr, &both);
    assert!(matches!(outcome, Outcome::Registered(_)), "{outcome:?}");
    let mut ws = ws.expect("registered socket");
    let got_pong = (0..5).any(
        |_| matches!(next_event(&mut ws, REPLY_WITHIN), Some(Event::Pong(p)) if p == b"early"),
    );
    assert!(
        got_pong,
        "the ping sent right after the head was not answered"
    );
    close(&mut ws, DELETE_WITHIN);
}

// -------------------------------------------------------------- resources

/// Sets the flag when dropped, however the scope it lives in ends.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Issue 6's proof: `slow` sockets that open and never finish a handshake,
/// plus `big` registered clients that announce 10 MiB frames, while a
/// steady client stays registered and a new one registers; then the
/// server's threads and descriptors return to where they were.
fn exhaust_and_recover(slow: usize, big: usize) {
    let limit = ::skyapi::server::raise_fd_limit().expect("getrlimit");
    assert!(
        limit as usize > slow + big + 256,
        "the open-file limit ({limit}) is too low for {slow} + {big} sockets"
    );
    // Room for every socket of the attack: this is about reclaiming, not
    // about the 503 (tested on its own).
    let max = (slow + big + 1000).max(3000).to_string();
    let (etcd, sky) = start(&["--max-connections", &max]);
    let pid = sky.pid();
    let addr = sky.connect_addr();
    let (mut steady, steady_key) = registered(&sky, "steady");

    // Baseline once the server is idle but for the steady client.
    let settled = || {
        let a = (proc_threads(pid), proc_fds(pid));
        thread::sleep(Duration::from_millis(300));
        let b = (proc_threads(pid), proc_fds(pid));
        (a == b).then_some(b)
    };
    let (base_threads, base_fds) = eventually("a steady baseline", Duration::from_secs(5), settled);
    let rss_before = proc_status_kib(pid, "VmRSS");
    let stop = AtomicBool::new(false);
    let missing = Mutex::new(Vec::<Duration>::new());
    let t_attack = Instant::now();

    let report = thread::scope(|scope| {
        // If anything below panics, the keeper and the watcher must still
        // stop, or the scope would wait for them until the watchdog fires.
        let _stop = StopOnDrop(&stop);
        // The steady client answers pings on its own thread until told to
        // stop, and reports whether its connection ended.
        let keeper = scope.spawn(|| -> Result<(), String> {
            while !stop.load(Ordering::SeqCst) {
                match next_event(&mut steady, Duration::from_millis(200)) {
                    None | Some(Event::Ping(_) | Event::Pong(_)) => {}
                    Some(other) => return Err(format!("steady client: {other:?}")),
                }
            }
            Ok(())
        });
        // Its key is watched throughout.
        let watcher = scope.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let present = etcd
                    .etcdctl(&["get", "--keys-only", "--", &steady_key])
                    .is_ok_and(|out| out.contains(&steady_key));
                if !present {
                    missing.lock().unwrap().push(t_attack.elapsed());
                }
                thread::sleep(Duration::from_millis(200));
            }
        });
        // The slow sockets, each with half a request line. They are opened
        // in batches paced by the server's thread count: a burst beyond the
        // listen backlog would have its SYNs dropped and retried a second
        // later, and the first sockets would be reaped before the last
        // were open.
        let slow_socks = scope.spawn(|| {
            const BATCH: usize = 100;
            let mut socks = Vec::with_capacity(slow);
            while socks.len() < slow {
                for _ in 0..BATCH.min(slow - socks.len()) {
                    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                        .unwrap_or_else(|e| panic!("slow socket {}: {e}", socks.len()));
                    // Why ignored: a server that already dropped it is what we test.
                    let _ = s.write_all(b"GET /provide?service=slow&p");
                    socks.push(s);
                }
                let want = base_threads + socks.len() - socks.len().min(BATCH / 2);
                poll_until(Duration::from_secs(1), || proc_threads(pid) >= want);
            }
            socks
        });
        // The big-frame clients, at the same time.
        let big_clients = scope.spawn(|| {
            let mut outcomes = Vec::with_capacity(big);
            let mut open = Vec::with_capacity(big);
            for i in 0..big {
                let (outcome, ws) = exchange(addr, &provide(&format!("service=big{i}&port=1")));
                let Some(mut ws) = ws else {
                    outcomes.push(Err(format!("big{i} not registered: {outcome:?}")));
                    continue;
                };
                let mut bytes = frame_header(0x2, true, 10 * 1024 * 1024);
                bytes.extend(std::iter::repeat_n(0x5au8, 2048));
                if let Err(e) = ws.get_mut().write_all(&bytes) {
                    outcomes.push(Err(format!("big{i}: writing: {e}")));
                    continue;
                }
                open.push((i, ws));
            }
            for (i, mut ws) in open {
                outcomes.push(match close_code_on(&mut ws, Duration::from_secs(10)) {
                    Ok((1009, _)) => Ok(()),
                    other => Err(format!("big{i}: {other:?}, want close 1009")),
                });
            }
            outcomes
        });

        let socks = slow_socks.join().expect("slow sockets thread");
        let opened = t_attack.elapsed();
        let peak_threads = proc_threads(pid);
        // Under siege, a newcomer still registers.
        let t_newcomer = Instant::now();
        let newcomer = match exchange(addr, &provide("service=newcomer&port=1")) {
            (Outcome::Registered(welcome), Some(mut ws)) => {
                let took = t_newcomer.elapsed();
                let key = welcome["key"].as_str().unwrap_or_default().to_string();
                let stored = etcd.get_prefix(ROOT).contains_key(&key);
                close(&mut ws, DELETE_WITHIN);
                if stored {
                    Ok(took)
                } else {
                    Err(format!("welcomed after {took:?} but {key} is not in etcd"))
                }
            }
            (other, _) => Err(format!("after {:?}: {other:?}", t_newcomer.elapsed())),
        };
        let big_outcomes = big_clients.join().expect("big-frame thread");

        // The server reaps the slow sockets itself: threads and descriptors
        // come back to the baseline.
        let back = poll_until(HANDSHAKE_DEADLINE + Duration::from_secs(10), || {
            proc_threads(pid) <= base_threads && proc_fds(pid) <= base_fds
        });
        let (threads, fds) = (proc_threads(pid), proc_fds(pid));
        eprintln!(
            "{slow} slow + {big} big: opened in {opened:?}; threads {base_threads} -> peak \
             {peak_threads} -> {threads}; fds {base_fds} -> {fds}; VmRSS {rss_before} -> {} KiB, \
             VmHWM {} KiB; checked after {:?}",
            proc_status_kib(pid, "VmRSS"),
            proc_status_kib(pid, "VmHWM"),
            t_attack.elapsed()
        );
        // The client ends of the slow sockets see the server hang up.
        let mut unclosed = 0;
        for mut s in socks.into_iter().step_by(slow.div_ceil(50).max(1)) {
            s.set_read_timeout(Some(Duration::from_millis(100))).ok();
            if time_to_eof(&mut s, Instant::now(), Duration::from_millis(200)).is_none() {
                unclosed += 1;
            }
        }
        stop.store(true, Ordering::SeqCst);
        let steady_end = keeper.join().expect("keeper thread");
        watcher.join().expect("watcher thread");
        (
            back,
            threads,
            fds,
            unclosed,
            newcomer,
            steady_end,
            big_outcomes,
        )
    });
    let (back, threads, fds, unclosed, newcomer, steady_end, big_outcomes) = report;

    assert!(
        back,
        "threads {threads} (baseline {base_threads}), fds {fds} (baseline {base_fds}) \
         did not return to the baseline"
    );
    assert_eq!(unclosed, 0, "sampled slow sockets the server never closed");
    let took = newcomer.unwrap_or_else(|e| panic!("a client registering under siege: {e}"));
    eprintln!("a client registered under siege in {took:?}");
    let missing = missing.into_inner().unwrap();
    assert!(
        missing.is_empty(),
        "the steady client's key was missing at {missing:?} into the attack"
    );
    steady_end.unwrap_or_else(|e| panic!("{e}"));
    still_served(&mut steady, "the steady client after the attack");
    let big_failures: Vec<String> = big_outcomes.into_iter().filter_map(Result::err).collect();
    assert!(
        big_failures.is_empty(),
        "{} of {big} big-frame clients misbehaved:\n{}",
        big_failures.len(),
        big_failures.join("\n")
    );
    let panics: Vec<String> = sky
        .logs()
        .into_iter()
        .filter(|l| l.contains("panicked"))
        .collect();
    assert!(panics.is_empty(), "skyapi panicked:\n{}", panics.join("\n"));
}

/// Issue 6's proof at its stated size: 2,000 slow sockets and 100 clients
/// announcing 10 MiB frames.
#[test]
fn resource_exhaustion_is_survived_and_reclaimed() {
    let _w = watchdog(TEST_LIMIT);
    exhaust_and_recover(2000, 100);
}

/// Two and a half times that, for `make soak`.
#[test]
#[ignore]
fn resource_exhaustion_soak() {
    let _w = watchdog(Duration::from_secs(180));
    exhaust_and_recover(5000, 250);
}
