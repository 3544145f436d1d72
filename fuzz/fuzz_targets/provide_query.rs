//! Fuzzes the /provide query parser and key builder: no input may panic,
//! and every accepted request's key lies under the root directory with one
//! segment per category label, one for the service and one for the id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skyapi::provide::{parse, Layout};

fuzz_target!(|data: &[u8]| {
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    let layout = Layout {
        etcd_prefix: "/skydns".into(),
        root: vec!["skydns".into(), "local".into()],
        default_category: vec!["services".into()],
        default_ttl: 30,
    };
    let peer = "192.0.2.1".parse().unwrap();
    if let Ok(r) = parse(query, peer, &layout) {
        let e = r.entry(&layout);
        let rest = e.key.strip_prefix(&layout.root_dir()).expect("key outside the root");
        let segments: Vec<&str> = rest.split('/').collect();
        assert_eq!(segments.len(), r.category.len() + 2);
        for s in segments {
            assert!(!s.is_empty() && s.len() <= 63);
            assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'));
        }
        let v: serde_json::Value = serde_json::from_str(&e.value).expect("value is JSON");
        assert!(v.get("ttl").is_some());
    }
});
