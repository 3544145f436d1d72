//! The `/provide` contract: query parameters in, a SkyDNS entry (key, value,
//! DNS name) out.
//!
//! Owns the validation of everything a client says and the construction of
//! the etcd key. Invariants, relied on by the rest of the server:
//! - every accepted `Registration` names only labels of `[a-z0-9_-]{1,63}`, so
//!   its key lies under `<etcd-prefix>/<root labels reversed>/` with exactly
//!   one segment per category label, one for the service and one for the id,
//!   and no request can write outside its own service directory;
//! - the id is the original Go skyapi's (SHA-1 of service, category, host and
//!   port), so a mixed fleet agrees on keys;
//! - the value is always the documented JSON and always carries `ttl`
//!   (CoreDNS before 1.12.4 served the lease id as TTL without it,
//!   CVE-2025-58063);
//! - the subtrees the DNS servers keep for themselves (`RESERVED`) are
//!   named here, and `Registration::reserved` says whether a name falls in
//!   one; access control (`auth`) refuses those names for everyone.

use std::fmt::Write as _;
use std::net::IpAddr;

use sha1::{Digest, Sha1};

use crate::error::Refusal;

/// Longest `prefix=` value: `<prefix>-<20 hex>` must stay one DNS label (63).
pub const MAX_PREFIX_LEN: usize = 63 - 21;
/// Longest DNS TTL a client may ask for (RFC 2181: 2^31 - 1).
pub const MAX_DNS_TTL: u32 = 2_147_483_647;

/// Labels directly under the DNS root that SkyDNS and CoreDNS read for
/// their own records, never as services:
/// - `dns`: NS records live at `ns.dns.<root>` (both servers answer
///   `<root> NS` from there) and SkyDNS's stub zones (forwarders for whole
///   domains) at `stub.dns.<root>`;
/// - `arpa`: reverse (PTR) lookups read `<etcd-prefix>/arpa/...`, outside
///   any root that is not itself under `arpa`; `arpa` directly under the
///   root is refused too, so no registered name can pass for one.
pub const RESERVED: [&str; 2] = ["dns", "arpa"];

/// The reserved label that a name's labels (left to right, relative to the
/// root) fall under, if any: the last one, the label right below the root.
pub fn reserved_label<S: AsRef<str>>(labels: &[S]) -> Option<&'static str> {
    let top = labels.last()?.as_ref();
    RESERVED.iter().copied().find(|r| *r == top)
}

/// Where entries live in etcd and which DNS names they get; fixed at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// SkyDNS's path prefix, normalised to `/a/b` (leading slash, no trailing).
    pub etcd_prefix: String,
    /// `--dns-root` as lower-case labels, left to right (`skydns`, `local`).
    pub root: Vec<String>,
    /// `--default-category` as labels, left to right.
    pub default_category: Vec<String>,
    /// `--timeout` in seconds: the default DNS TTL written into every value.
    pub default_ttl: u32,
}

impl Layout {
    /// The directory holding every entry this layout can produce, with a
    /// trailing slash: `/skydns/local/skydns/`.
    pub fn root_dir(&self) -> String {
        let mut dir = self.etcd_prefix.clone();
        for label in self.root.iter().rev() {
            dir.push('/');
            dir.push_str(label);
        }
        dir.push('/');
        dir
    }

    /// The DNS root with a trailing dot: `skydns.local.`.
    pub fn root_name(&self) -> String {
        let mut name = String::new();
        for label in &self.root {
            name.push_str(label);
            name.push('.');
        }
        name
    }
}

/// One validated `/provide` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub service: String,
    /// Category labels, left to right as written (`services,production`).
    pub category: Vec<String>,
    pub host: String,
    pub port: u16,
    pub priority: u16,
    pub weight: u16,
    pub prefix: Option<String>,
    pub ttl: u32,
}

/// What the etcd worker stores for a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: String,
    /// `foo.services.skydns.local.`
    pub name: String,
    /// The last key segment (the SRV target's first label).
    pub id: String,
}

/// Parses and validates a raw query string (without the `?`). `peer` is the
/// connection's address, already unmapped from `::ffff:a.b.c.d`.
pub fn parse(query: &str, peer: IpAddr, layout: &Layout) -> Result<Registration, Refusal> {
    let mut service = None;
    let mut port = None;
    let mut host = None;
    let mut priority = None;
    let mut weight = None;
    let mut category = None;
    let mut prefix = None;
    let mut ttl = None;

    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_decode(raw_name)?;
        let value = percent_decode(raw_value)?;
        let slot = match name.as_str() {
            "service" => &mut service,
            "port" => &mut port,
            "host" => &mut host,
            "priority" => &mut priority,
            "weight" => &mut weight,
            "category" => &mut category,
            "prefix" => &mut prefix,
            "ttl" => &mut ttl,
            // The bearer token of --token-file (see `token_param`); it
            // means nothing to the entry.
            "token" => continue,
            other => {
                return Err(Refusal::new(format!(
                    "unknown parameter {:?}",
                    truncate(other, 32)
                )))
            }
        };
        if slot.is_some() {
            return Err(Refusal::new(format!("parameter {name} given twice")));
        }
        *slot = Some(value);
    }

    let service = label(
        "service",
        &service.ok_or_else(|| Refusal::new("missing parameter service"))?,
    )?;
    let port = number(
        "port",
        &port.ok_or_else(|| Refusal::new("missing parameter port"))?,
        1,
        65535,
    )? as u16;
    let priority = match priority {
        Some(v) => number("priority", &v, 0, 65535)? as u16,
        None => 1,
    };
    let weight = match weight {
        Some(v) => number("weight", &v, 0, 65535)? as u16,
        None => 100,
    };
    let category = match category {
        Some(v) => v
            .split(',')
            .map(|part| label("category", part))
            .collect::<Result<Vec<_>, _>>()?,
        None => layout.default_category.clone(),
    };
    let prefix = match prefix {
        Some(v) => {
            let p = label("prefix", &v)?;
            if p.len() > MAX_PREFIX_LEN {
                return Err(Refusal::new(format!(
                    "prefix longer than {MAX_PREFIX_LEN} characters (with the id it must fit one DNS label)"
                )));
            }
            Some(p)
        }
        None => None,
    };
    let ttl = match ttl {
        // 0 would read as "no ttl" to SkyDNS, which then serves the lease id.
        Some(v) => number("ttl", &v, 1, MAX_DNS_TTL as u64)? as u32,
        None => layout.default_ttl,
    };
    let host = match host.as_deref() {
        None | Some("") | Some("0.0.0.0") | Some("::") => peer.to_string(),
        Some(h) => valid_host(h)?.to_string(),
    };

    Ok(Registration {
        service,
        category,
        host,
        port,
        priority,
        weight,
        prefix,
        ttl,
    })
}

/// The `token=` parameter, decoded, whether or not the rest of the query is
/// valid: a client with a good token and a bad parameter should hear about
/// the parameter, not about its token.
pub fn token_param(query: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(name, _)| percent_decode(name).is_ok_and(|n| n == "token"))
        .and_then(|(_, value)| percent_decode(value).ok())
}

impl Registration {
    /// The original skyapi's id: lower-case hex SHA-1 of service, category,
    /// host and decimal port concatenated without separators. A single
    /// category is its text; several are Go's `%#v` of the `[]string`.
    pub fn id(&self) -> String {
        let category = if self.category.len() == 1 {
            self.category[0].clone()
        } else {
            let quoted: Vec<String> = self.category.iter().map(|c| format!("{c:?}")).collect();
            format!("[]string{{{}}}", quoted.join(", "))
        };
        let mut hasher = Sha1::new();
        hasher.update(self.service.as_bytes());
        hasher.update(category.as_bytes());
        hasher.update(self.host.as_bytes());
        hasher.update(self.port.to_string().as_bytes());
        let hex = hex(&hasher.finalize());
        match &self.prefix {
            Some(prefix) => format!("{prefix}-{}", &hex[..20]),
            None => hex,
        }
    }

    /// The name relative to the root, as labels left to right:
    /// `[service, category...]`. This is what a token must be granted.
    pub fn relative_labels(&self) -> Vec<&str> {
        std::iter::once(self.service.as_str())
            .chain(self.category.iter().map(String::as_str))
            .collect()
    }

    /// The relative name as text: `foo.services.production`.
    pub fn relative_name(&self) -> String {
        self.relative_labels().join(".")
    }

    /// The reserved label this name falls under (see `RESERVED`), if any.
    pub fn reserved(&self) -> Option<&'static str> {
        reserved_label(&self.category)
    }

    /// The DNS name clients resolve: `<service>.<category...>.<root>`.
    pub fn name(&self, layout: &Layout) -> String {
        let mut name = format!("{}.", self.service);
        for label in &self.category {
            name.push_str(label);
            name.push('.');
        }
        name.push_str(&layout.root_name());
        name
    }

    /// The entry to store: key under the layout's root directory, value the
    /// SkyDNS JSON.
    pub fn entry(&self, layout: &Layout) -> Entry {
        let id = self.id();
        let mut key = layout.root_dir();
        for label in self.category.iter().rev() {
            key.push_str(label);
            key.push('/');
        }
        key.push_str(&self.service);
        key.push('/');
        key.push_str(&id);
        // Written by hand to keep the documented field order; the host is the
        // only string and is escaped by serde_json.
        let value = format!(
            r#"{{"host":{},"port":{},"priority":{},"weight":{},"ttl":{}}}"#,
            serde_json::Value::from(self.host.as_str()),
            self.port,
            self.priority,
            self.weight,
            self.ttl
        );
        Entry {
            key,
            value,
            name: self.name(layout),
            id,
        }
    }
}

/// Validates one DNS label: 1..63 of letters, digits, `-`, `_`; lower-cased.
pub fn label(what: &str, raw: &str) -> Result<String, Refusal> {
    if raw.is_empty() {
        return Err(Refusal::new(format!("{what} is empty")));
    }
    if raw.len() > 63 {
        return Err(Refusal::new(format!("{what} longer than 63 characters")));
    }
    if !raw
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Refusal::new(format!(
            "{what} {:?} may hold only letters, digits, '-' and '_'",
            truncate(raw, 63)
        )));
    }
    Ok(raw.to_ascii_lowercase())
}

fn number(what: &str, raw: &str, min: u64, max: u64) -> Result<u64, Refusal> {
    let bad = || Refusal::new(format!("{what} must be a number in {min}..{max}"));
    if raw.is_empty() || raw.len() > 10 || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = raw.parse().map_err(|_| bad())?;
    if n < min || n > max {
        return Err(bad());
    }
    Ok(n)
}

/// An IPv4/IPv6 literal or an RFC 1123 host name (optionally with the root
/// dot), returned as given.
fn valid_host(raw: &str) -> Result<&str, Refusal> {
    if raw.parse::<IpAddr>().is_ok() {
        return Ok(raw);
    }
    let bad = || {
        Refusal::new(format!(
            "host {:?} is neither an IP address nor a host name",
            truncate(raw, 63)
        ))
    };
    let name = raw.strip_suffix('.').unwrap_or(raw);
    if name.is_empty() || name.len() > 253 {
        return Err(bad());
    }
    let labels: Vec<&str> = name.split('.').collect();
    for l in &labels {
        let ok = !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-');
        if !ok {
            return Err(bad());
        }
    }
    // An all-numeric last label is a mistyped address, not a name (RFC 3696).
    if labels
        .last()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad());
    }
    Ok(raw)
}

/// Percent-decodes one query component; `+` stays `+` (it is invalid in
/// every parameter anyway). Bad escapes and non-UTF-8 results are refused.
fn percent_decode(raw: &str) -> Result<String, Refusal> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = bytes.get(i + 1).and_then(|b| (*b as char).to_digit(16));
            let lo = bytes.get(i + 2).and_then(|b| (*b as char).to_digit(16));
            match (hi, lo) {
                (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
                _ => return Err(Refusal::new("bad percent-escape in the query")),
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Refusal::new("query is not valid UTF-8"))
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Cuts a peer-supplied string for an error message at a char boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            etcd_prefix: "/skydns".into(),
            root: vec!["turtles".into(), "com".into()],
            default_category: vec!["services".into()],
            default_ttl: 30,
        }
    }

    fn peer() -> IpAddr {
        "127.0.0.1".parse().unwrap()
    }

    fn ok(q: &str) -> Registration {
        parse(q, peer(), &layout()).unwrap()
    }

    fn refused(q: &str) -> String {
        parse(q, peer(), &layout()).unwrap_err().to_string()
    }

    #[test]
    fn original_id_vector() {
        let r = ok("service=foo&port=9999&host=127.0.0.1");
        assert_eq!(r.id(), "10ec6ea983c7a572acb0a023b9d645f6765c5a68");
        let e = r.entry(&layout());
        assert_eq!(
            e.key,
            "/skydns/com/turtles/services/foo/10ec6ea983c7a572acb0a023b9d645f6765c5a68"
        );
        assert_eq!(e.name, "foo.services.turtles.com.");
        assert_eq!(
            e.value,
            r#"{"host":"127.0.0.1","port":9999,"priority":1,"weight":100,"ttl":30}"#
        );
    }

    #[test]
    fn defaults_use_peer_address() {
        let r = ok("service=foo&port=1");
        assert_eq!(r.host, "127.0.0.1");
        assert_eq!((r.priority, r.weight, r.ttl), (1, 100, 30));
        assert_eq!(ok("service=foo&port=1&host=0.0.0.0").host, "127.0.0.1");
        assert_eq!(ok("service=foo&port=1&host=::").host, "127.0.0.1");
    }

    #[test]
    fn several_categories_use_go_slice_syntax() {
        let r = ok("service=foo&port=9999&host=127.0.0.1&category=services,production");
        let mut h = Sha1::new();
        h.update(br#"foo[]string{"services", "production"}127.0.0.19999"#);
        assert_eq!(r.id(), hex(&h.finalize()));
        let e = r.entry(&layout());
        assert!(e
            .key
            .starts_with("/skydns/com/turtles/production/services/foo/"));
        assert_eq!(e.name, "foo.services.production.turtles.com.");
    }

    #[test]
    fn prefix_shortens_id() {
        let r = ok("service=foo&port=9999&host=127.0.0.1&prefix=DC1");
        assert_eq!(r.id(), "dc1-10ec6ea983c7a572acb0");
    }

    #[test]
    fn labels_are_lower_cased() {
        let r = ok("service=Foo_Bar&port=1&category=Prod");
        assert_eq!(r.service, "foo_bar");
        assert_eq!(r.category, vec!["prod"]);
    }

    #[test]
    fn percent_escapes_decode_before_validation() {
        assert_eq!(ok("service=f%6Fo&port=1").service, "foo");
        assert!(refused("service=a%2Fb&port=1").contains("service"));
        assert!(refused("service=a%00b&port=1").contains("service"));
        assert!(refused("service=%ff&port=1").contains("UTF-8"));
        assert!(refused("service=a%2&port=1").contains("percent"));
    }

    #[test]
    fn refusals_name_the_problem() {
        assert!(refused("port=1").contains("missing parameter service"));
        assert!(refused("service=foo").contains("missing parameter port"));
        for p in ["0", "65536", "-1", "x", "", "99999999999999999999"] {
            assert!(refused(&format!("service=foo&port={p}")).contains("port"));
        }
        assert!(refused("service=foo&port=1&priority=65536").contains("priority"));
        assert!(refused("service=foo&port=1&weight=x").contains("weight"));
        assert!(refused("service=foo&port=1&ttl=0").contains("ttl"));
        assert!(refused("service=../x&port=1").contains("service"));
        assert!(refused("service=a.b&port=1").contains("service"));
        assert!(refused(&format!("service={}&port=1", "a".repeat(64))).contains("63"));
        assert!(refused("service=foo&port=1&category=a,,b").contains("category"));
        assert!(refused("service=foo&port=1&category=").contains("category"));
        assert!(refused("service=foo&port=1&port=2").contains("twice"));
        assert!(refused("service=foo&port=1&colour=red").contains("unknown"));
        assert!(
            refused(&format!("service=foo&port=1&prefix={}", "p".repeat(43))).contains("prefix")
        );
        assert!(refused("service=fοo&port=1").contains("service")); // Greek omicron
    }

    #[test]
    fn hosts() {
        assert_eq!(ok("service=a&port=1&host=10.0.0.1").host, "10.0.0.1");
        assert_eq!(ok("service=a&port=1&host=fe80::1").host, "fe80::1");
        assert_eq!(
            ok("service=a&port=1&host=db-1.example.com").host,
            "db-1.example.com"
        );
        assert_eq!(
            ok("service=a&port=1&host=db.example.com.").host,
            "db.example.com."
        );
        for bad in [
            "-a.com",
            "a..b",
            "a_b.com",
            "999.1.1.1",
            "a/b",
            "[::1]",
            "a b",
        ] {
            let q = format!("service=a&port=1&host={bad}");
            assert!(refused(&q).contains("host"), "{bad}");
        }
    }

    #[test]
    fn every_accepted_key_stays_in_its_directory() {
        let l = layout();
        let r = ok("service=x&port=5&category=a,b,c");
        let e = r.entry(&l);
        let rest = e.key.strip_prefix(&l.root_dir()).unwrap();
        assert_eq!(rest.split('/').count(), 3 + 2);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Query values built from hostile pieces: traversal, separators,
        /// escapes, NUL, look-alikes, long runs, and plain labels.
        fn piece() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-zA-Z0-9_-]{1,70}",
                Just("..".to_string()),
                Just("/".to_string()),
                Just("%2F".to_string()),
                Just("%2e%2e".to_string()),
                Just("%00".to_string()),
                Just("%ff".to_string()),
                Just("fο".to_string()),
                Just(",".to_string()),
                Just("dns".to_string()),
                Just("arpa".to_string()),
                Just("&".to_string()),
                Just("=".to_string()),
                "\\PC{0,8}",
            ]
        }

        fn value() -> impl Strategy<Value = String> {
            proptest::collection::vec(piece(), 1..4).prop_map(|v| v.concat())
        }

        /// Mostly valid labels (so many requests are accepted and their
        /// keys checked), sometimes hostile values.
        fn label_or_hostile() -> impl Strategy<Value = String> {
            prop_oneof![3 => "[a-zA-Z0-9_-]{1,63}", 1 => value()]
        }

        fn query() -> impl Strategy<Value = String> {
            const OPTIONAL: [&str; 8] = [
                "host", "category", "prefix", "priority", "weight", "ttl", "token", "service",
            ];
            (
                label_or_hostile(),
                prop_oneof![3 => "[1-9][0-9]{0,4}", 1 => value()],
                proptest::collection::vec(
                    (proptest::sample::select(&OPTIONAL[..]), label_or_hostile()),
                    0..4,
                ),
            )
                .prop_map(|(service, port, rest)| {
                    let mut q = vec![format!("service={service}"), format!("port={port}")];
                    q.extend(rest.iter().map(|(n, v)| format!("{n}={v}")));
                    q.join("&")
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn accepted_keys_stay_in_their_directory(q in query()) {
                let l = layout();
                if let Ok(r) = parse(&q, peer(), &l) {
                    let e = r.entry(&l);
                    let rest = e.key.strip_prefix(&l.root_dir()).expect("under the root");
                    let segments: Vec<&str> = rest.split('/').collect();
                    prop_assert_eq!(segments.len(), r.category.len() + 2);
                    // `reserved` names exactly the keys written under a
                    // reserved subtree, which access control then refuses.
                    prop_assert_eq!(
                        r.reserved().is_some(),
                        RESERVED.contains(&segments[0])
                    );
                    for s in &segments {
                        prop_assert!(!s.is_empty() && s.len() <= 63);
                        prop_assert!(s.bytes().all(|b| b.is_ascii_lowercase()
                            || b.is_ascii_digit() || b == b'-' || b == b'_'));
                    }
                    let v: serde_json::Value = serde_json::from_str(&e.value).unwrap();
                    prop_assert!(v["ttl"].as_u64().is_some_and(|t| t > 0));
                }
            }

            #[test]
            fn arbitrary_bytes_never_panic(q in "\\PC{0,200}") {
                let _ = parse(&q, peer(), &layout());
            }
        }
    }
}
