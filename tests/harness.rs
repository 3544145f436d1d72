//! Checks of the test harness itself (tests/support) against a real etcd,
//! independent of skyapi: if these fail, the registrar and fault suites'
//! failures say nothing about the server.

mod support;

use std::time::Duration;

use support::etcd::base64_decode;
use support::*;

#[test]
fn base64_decoder_matches_known_vectors() {
    assert_eq!(base64_decode("").unwrap(), b"");
    assert_eq!(base64_decode("L2EvYg==").unwrap(), b"/a/b");
    assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
    assert_eq!(base64_decode("eA==").unwrap(), b"x");
    assert_eq!(base64_decode("Zm9vYmFy").unwrap(), b"foobar");
    assert_eq!(base64_decode("+/+/").unwrap(), [0xfb, 0xff, 0xbf]);
    assert!(base64_decode("abc").is_none());
    assert!(base64_decode("a===").is_none());
    assert!(base64_decode("ab!=").is_none());
}

#[test]
fn listening_line_is_parsed() {
    use support::skyapi::parse_listening;
    let want: std::net::SocketAddr = "127.0.0.1:41234".parse().unwrap();
    for line in [
        "12:00:01 [INFO] listening on 127.0.0.1:41234",
        "listening on 127.0.0.1:41234.",
        "skyapi 0.1.0 listening on ws://127.0.0.1:41234/ (etcd http://x)",
    ] {
        assert_eq!(parse_listening(line), Some(want), "{line}");
    }
    assert_eq!(
        parse_listening("listening on [::]:8053"),
        Some("[::]:8053".parse().unwrap())
    );
    assert_eq!(parse_listening("not yet"), None);
}

#[test]
fn etcd_put_get_delete_and_leases() {
    let _w = watchdog(Duration::from_secs(60));
    let etcd = Etcd::start_new();
    assert!(etcd.get_all().is_empty(), "fresh etcd is not empty");

    etcd.put("/skydns/a", "{\"x\":1}");
    etcd.put("/other", "-starts-with-dash");
    let lease = etcd.lease_grant(30);
    assert_ne!(lease, 0);
    etcd.etcdctl(&[
        "put",
        "--lease",
        &format!("{lease:x}"),
        "--",
        "/skydns/b",
        "v",
    ])
    .unwrap();

    let got = etcd.get_prefix_with_lease("/skydns/");
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got["/skydns/a"], ("{\"x\":1}".to_string(), 0));
    assert_eq!(got["/skydns/b"], ("v".to_string(), lease));
    assert_eq!(etcd.get_all()["/other"], "-starts-with-dash");

    let (ttl, granted) = etcd.lease_ttl(lease).expect("lease exists");
    assert_eq!(granted, 30);
    assert!((25..=30).contains(&ttl), "ttl {ttl}");

    etcd.lease_revoke(lease);
    assert_eq!(etcd.lease_ttl(lease), None);
    assert!(!etcd.get_prefix("/skydns/").contains_key("/skydns/b"));

    etcd.del("/skydns/a");
    assert!(etcd.get_prefix("/skydns/").is_empty());
}

#[test]
fn etcd_restarts_with_its_data_and_pauses() {
    let _w = watchdog(Duration::from_secs(90));
    let mut etcd = Etcd::start_new();
    etcd.put("/k", "kept");

    etcd.stop();
    assert!(!etcd.is_running());
    assert!(
        etcd.etcdctl(&["--dial-timeout=500ms", "--command-timeout=1s", "get", "/k"])
            .is_err(),
        "stopped etcd still answers"
    );
    etcd.start();
    assert_eq!(etcd.get_all()["/k"], "kept");

    etcd.pause();
    assert!(
        etcd.etcdctl(&["--dial-timeout=500ms", "--command-timeout=1s", "get", "/k"])
            .is_err(),
        "paused etcd still answers"
    );
    etcd.resume();
    assert_eq!(etcd.get_all()["/k"], "kept");

    etcd.kill();
    assert!(!etcd.is_running());
    etcd.start();
    assert_eq!(etcd.get_all()["/k"], "kept");
}

#[test]
fn parallel_etcds_do_not_collide() {
    let _w = watchdog(Duration::from_secs(90));
    let etcds: Vec<Etcd> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3).map(|_| s.spawn(Etcd::start_new)).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, e) in etcds.iter().enumerate() {
        e.put("/who", &i.to_string());
    }
    for (i, e) in etcds.iter().enumerate() {
        assert_eq!(e.get_all()["/who"], i.to_string());
    }
}

#[test]
fn etcd_cluster_survives_losing_one_member() {
    let _w = watchdog(Duration::from_secs(120));
    let mut members = Etcd::start_cluster(3);
    let list = Etcd::endpoints(&members);
    assert_eq!(list.split(',').count(), 3);
    members[0].put("/k", "v1");
    assert_eq!(members[2].get_all()["/k"], "v1", "replicated to member 2");

    members[0].stop();
    members[1].put("/k", "v2");
    assert_eq!(
        members[2].get_all()["/k"],
        "v2",
        "quorum of two still serves"
    );
    members[0].start();
    assert!(
        poll_until(Duration::from_secs(10), || members[0]
            .etcdctl(&["get", "/k", "--consistency=s", "--print-value-only"])
            .is_ok_and(|v| v.trim() == "v2")),
        "restarted member did not catch up"
    );

    // Whole-cluster restart.
    for m in members.iter_mut() {
        m.stop();
    }
    Etcd::start_all(&mut members);
    assert_eq!(members[1].get_all()["/k"], "v2");
}
