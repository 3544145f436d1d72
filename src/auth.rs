//! Access control: the token file, and the checks made before a websocket
//! is accepted or an admin endpoint answers.
//!
//! The token file has one line per token, `TOKEN GRANT[,GRANT...]`; blank
//! lines and `#` comments are ignored. A grant is a DNS name relative to the
//! root, written as a glob over whole labels: `foo.services`,
//! `web-*.services.production`. `*` matches any run of characters within one
//! label and `?` one character; neither ever matches a dot, and a grant
//! matches only names with exactly as many labels, so `*.services` reaches
//! `foo.services` but not `foo.victim.services`. A grant without a dot is the
//! original form, a service glob, and means that service in the default
//! category. `@admin` grants reading `/metrics` and `/services`.
//!
//! Why whole names: SkyDNS and CoreDNS answer a name with every record in
//! the subtree below it, so whoever may write `x.foo.services` can add
//! answers to `foo.services`. Granting a name therefore grants exactly that
//! name; a deeper name needs a grant of its own.
//!
//! Invariants: a malformed file is refused whole, naming the line, so a typo
//! never silently opens or closes access; tokens are compared in constant
//! time and never logged or echoed; a connection remembers only a
//! fingerprint of its token (`TokenId`), never the token; names under a
//! reserved label (`provide::RESERVED`) are refused whatever the grants say.

use std::path::Path;

use sha1::{Digest, Sha1};

use crate::provide::{reserved_label, Registration};

/// The grant that lets a token read `/metrics` and `/services`. `@` cannot
/// appear in a label, so no service glob of an older file can mean it.
pub const ADMIN_GRANT: &str = "@admin";

/// Identifies a token without holding it: SHA-1 of its bytes. Kept by a
/// live registration so a reload can tell whether its token still grants
/// its name.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenId([u8; 20]);

impl TokenId {
    fn of(token: &[u8]) -> TokenId {
        TokenId(Sha1::digest(token).into())
    }
}

impl std::fmt::Debug for TokenId {
    // Not even the fingerprint: logs have no use for it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenId(..)")
    }
}

/// One line of the token file.
#[derive(Clone)]
struct Line {
    token: Vec<u8>,
    id: TokenId,
    /// Name globs, each as labels left to right (`["web-*", "services"]`).
    names: Vec<Vec<String>>,
    admin: bool,
}

/// The parsed token file.
#[derive(Clone, Default)]
pub struct Tokens {
    lines: Vec<Line>,
}

impl std::fmt::Debug for Tokens {
    // Never prints a token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} grants)", self.lines.len())
    }
}

/// Why a request may not go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No token, or one not in the file: HTTP 401.
    Unauthenticated,
    /// The name lies under a label the DNS servers reserve: HTTP 403, for
    /// every token and without tokens too.
    Reserved(&'static str),
    /// A known token not granted this name (or not `@admin`): HTTP 403.
    Forbidden,
}

impl Tokens {
    /// Reads and parses the token file; `default_category` (labels, left
    /// to right) completes the grants written as bare service globs.
    pub fn load(path: &Path, default_category: &[String]) -> Result<Tokens, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        Tokens::parse(&text, default_category).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str, default_category: &[String]) -> Result<Tokens, String> {
        let mut lines = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |why: String| format!("line {}: {why}", n + 1);
            let mut fields = line.split_whitespace();
            let (Some(token), Some(grants), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(at("expected TOKEN GRANT[,GRANT...], a grant being a \
                     name glob (foo.services, web-*.services.production), a service glob \
                     (web-*) or @admin"
                    .into()));
            };
            if token.len() < 8 {
                return Err(at("token shorter than 8 characters".into()));
            }
            let mut names = Vec::new();
            let mut admin = false;
            for grant in grants.split(',') {
                if grant == ADMIN_GRANT {
                    admin = true;
                    continue;
                }
                names.push(name_glob(grant, default_category).map_err(at)?);
            }
            lines.push(Line {
                token: token.as_bytes().to_vec(),
                id: TokenId::of(token.as_bytes()),
                names,
                admin,
            });
        }
        Ok(Tokens { lines })
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Which token was presented, if it is one of the file's. Every line is
    /// compared, matched or not, so the time taken does not say which token
    /// (or how much of one) was right.
    pub fn authenticate(&self, presented: Option<&str>) -> Result<TokenId, Denied> {
        let presented = presented.unwrap_or("").as_bytes();
        let mut known = false;
        for l in &self.lines {
            known |= constant_time_eq(&l.token, presented);
        }
        if presented.is_empty() || !known {
            return Err(Denied::Unauthenticated);
        }
        Ok(TokenId::of(presented))
    }

    /// Whether token `id` is granted the name `labels` (relative to the
    /// root, left to right, lower-case). A token on several lines has the
    /// grants of all of them.
    pub fn grants<S: AsRef<str>>(&self, id: &TokenId, labels: &[S]) -> bool {
        self.lines
            .iter()
            .filter(|l| l.id == *id)
            .flat_map(|l| &l.names)
            .any(|glob| name_matches(glob, labels))
    }

    /// Whether token `id` may read the admin endpoints.
    pub fn grants_admin(&self, id: &TokenId) -> bool {
        self.lines.iter().any(|l| l.id == *id && l.admin)
    }
}

/// The access decision for `/provide`, made before the upgrade. With
/// tokens, an unknown token is refused first (401), whatever else the
/// request says. `registration` is `None` when the parameters are invalid:
/// that is reported as a parameter error after the upgrade, so only the
/// token is checked. A name under a reserved label is refused with or
/// without tokens. `Ok` carries the token that authorised the request, to
/// be checked again when the file is reloaded.
pub fn authorise(
    tokens: Option<&Tokens>,
    presented: Option<&str>,
    registration: Option<&Registration>,
) -> Result<Option<TokenId>, Denied> {
    let id = tokens.map(|t| t.authenticate(presented)).transpose()?;
    let Some(r) = registration else {
        return Ok(id);
    };
    if let Some(label) = r.reserved() {
        return Err(Denied::Reserved(label));
    }
    if let (Some(t), Some(id)) = (tokens, &id) {
        if !t.grants(id, &r.relative_labels()) {
            return Err(Denied::Forbidden);
        }
    }
    Ok(id)
}

/// Whether a live registration of `labels`, authorised by `id`, is still
/// allowed under `tokens` (after a reload).
pub fn still_granted<S: AsRef<str>>(tokens: &Tokens, id: &TokenId, labels: &[S]) -> bool {
    reserved_label(labels).is_none() && tokens.grants(id, labels)
}

/// Parses one grant into label globs; a bare service glob gets the default
/// category appended.
fn name_glob(grant: &str, default_category: &[String]) -> Result<Vec<String>, String> {
    let grant = grant.to_ascii_lowercase();
    let mut labels: Vec<String> = grant.split('.').map(String::from).collect();
    for l in &labels {
        let ok = !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| {
                b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'*' || b == b'?'
            });
        if !ok {
            return Err(format!(
                "{grant:?} is not a name glob: labels of letters, digits, -, _, *, ? \
                 separated by dots, or @admin"
            ));
        }
    }
    if labels.len() == 1 {
        labels.extend(default_category.iter().cloned());
    }
    // A glob such as `*` may still match a reserved label; `authorise`
    // refuses those names. A grant spelling one out is a mistake to report.
    if let Some(r) = reserved_label(&labels) {
        return Err(format!(
            "{grant:?} lies under {r:?}, which the DNS servers reserve; no name there can be granted"
        ));
    }
    Ok(labels)
}

/// A name matches a glob of as many labels whose every label matches.
fn name_matches<S: AsRef<str>>(glob_labels: &[String], labels: &[S]) -> bool {
    glob_labels.len() == labels.len()
        && glob_labels
            .iter()
            .zip(labels)
            .all(|(g, l)| glob(g.as_bytes(), l.as_ref().as_bytes()))
}

/// The token of a request: `Authorization: Bearer TOKEN`, else `token=`.
pub fn presented_token<'a>(
    authorization: Option<&'a str>,
    query_token: Option<&'a str>,
) -> Option<&'a str> {
    authorization
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .or(query_token)
}

/// Compares without an early exit; lengths may differ (then false), and
/// the loop still runs over the presented bytes.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for (i, y) in b.iter().enumerate() {
        let x = a.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    diff == 0
}

/// `*` matches any run (also empty), `?` one byte; everything else itself.
fn glob(pattern: &[u8], s: &[u8]) -> bool {
    // Iterative matcher with one backtrack point: linear in practice, no
    // recursion a hostile service name could deepen.
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == s[i]) {
            p += 1;
            i += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, i));
            p += 1;
        } else if let Some((sp, si)) = star {
            p = sp + 1;
            i = si + 1;
            star = Some((sp, si + 1));
        } else {
            return false;
        }
    }
    while p < pattern.len() && pattern[p] == b'*' {
        p += 1;
    }
    p == pattern.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provide::{parse, Layout, RESERVED};

    fn services() -> Vec<String> {
        vec!["services".to_string()]
    }

    fn tokens(text: &str) -> Tokens {
        Tokens::parse(text, &services()).unwrap()
    }

    fn id(t: &Tokens, token: &str) -> TokenId {
        t.authenticate(Some(token)).unwrap()
    }

    #[test]
    fn globs() {
        assert!(glob(b"web-*", b"web-1"));
        assert!(glob(b"web-*", b"web-"));
        assert!(!glob(b"web-*", b"web"));
        assert!(glob(b"*", b"anything"));
        assert!(glob(b"a?c", b"abc"));
        assert!(!glob(b"a?c", b"ac"));
        assert!(glob(b"*-db-*", b"eu-db-1"));
        assert!(!glob(b"foo", b"foo2"));
    }

    #[test]
    fn bare_service_globs_mean_the_default_category() {
        let t = tokens("# comment\n\nsecret-one web-*,api\nsecret-two *\n");
        assert_eq!(t.len(), 2);
        let one = id(&t, "secret-one");
        assert!(t.grants(&one, &["web-1", "services"]));
        assert!(t.grants(&one, &["api", "services"]));
        assert!(!t.grants(&one, &["db", "services"]));
        assert!(!t.grants(&one, &["web-1", "production"]));
        assert!(!t.grants(&one, &["web-1", "services", "production"]));
        let two = id(&t, "secret-two");
        assert!(t.grants(&two, &["db", "services"]));
        // `*` is one label: the old catch-all no longer reaches other
        // categories, nor names below another service.
        assert!(!t.grants(&two, &["db", "victim", "services"]));
        assert!(!t.grants(&two, &["db", "other"]));
        // Multi-label default category.
        let prod = vec!["services".to_string(), "production".to_string()];
        let t = Tokens::parse("secret-one web-*\n", &prod).unwrap();
        let one = id(&t, "secret-one");
        assert!(t.grants(&one, &["web-1", "services", "production"]));
        assert!(!t.grants(&one, &["web-1", "services"]));
    }

    #[test]
    fn name_globs_match_whole_labels_only() {
        let t = tokens(
            "tok-names-1 foo.services,web-*.services.production\n\
             tok-names-2 *.services\ntok-names-3 f?o.*\n",
        );
        let one = id(&t, "tok-names-1");
        assert!(t.grants(&one, &["foo", "services"]));
        assert!(t.grants(&one, &["web-7", "services", "production"]));
        assert!(!t.grants(&one, &["x", "foo", "services"]));
        assert!(!t.grants(&one, &["web-7", "services"]));
        assert!(!t.grants(&one, &["foo", "services", "production"]));
        let two = id(&t, "tok-names-2");
        assert!(t.grants(&two, &["victim", "services"]));
        assert!(!t.grants(&two, &["foo", "victim", "services"]));
        assert!(!t.grants(&two, &["services"]));
        let three = id(&t, "tok-names-3");
        assert!(t.grants(&three, &["foo", "anything"]));
        assert!(!t.grants(&three, &["fooo", "anything"]));
        assert!(!t.grants(&three, &["foo", "a", "b"]));
    }

    #[test]
    fn authentication_is_separate_from_grants() {
        let t = tokens("secret-one web-*\nsecret-one api\nsecret-adm @admin\n");
        assert_eq!(
            t.authenticate(Some("secret-on")),
            Err(Denied::Unauthenticated)
        );
        assert_eq!(
            t.authenticate(Some("secret-one2")),
            Err(Denied::Unauthenticated)
        );
        assert_eq!(t.authenticate(None), Err(Denied::Unauthenticated));
        assert_eq!(t.authenticate(Some("")), Err(Denied::Unauthenticated));
        // A token on two lines has both lines' grants.
        let one = id(&t, "secret-one");
        assert!(t.grants(&one, &["web-1", "services"]));
        assert!(t.grants(&one, &["api", "services"]));
        assert!(!t.grants_admin(&one));
        let adm = id(&t, "secret-adm");
        assert!(t.grants_admin(&adm));
        assert!(!t.grants(&adm, &["admin", "services"]));
        // `admin` without the `@` is a service, not the admin grant.
        let t = tokens("secret-svc admin\n");
        assert!(!t.grants_admin(&id(&t, "secret-svc")));
    }

    fn layout() -> Layout {
        Layout {
            etcd_prefix: "/skydns".into(),
            root: vec!["skydns".into(), "local".into()],
            default_category: services(),
            default_ttl: 30,
        }
    }

    fn decide(t: Option<&Tokens>, token: Option<&str>, q: &str) -> Result<Option<TokenId>, Denied> {
        let r = parse(q, "127.0.0.1".parse().unwrap(), &layout()).ok();
        authorise(t, token, r.as_ref())
    }

    #[test]
    fn the_review_hijacks_are_refused() {
        let t = tokens("tok-foo-only foo\n");
        let foo = Some("tok-foo-only");
        assert!(decide(Some(&t), foo, "service=foo&port=1").is_ok());
        assert_eq!(
            decide(Some(&t), foo, "service=victim&port=1"),
            Err(Denied::Forbidden)
        );
        assert_eq!(
            decide(
                Some(&t),
                foo,
                "service=foo&port=1&host=6.6.6.6&category=victim,services"
            ),
            Err(Denied::Forbidden)
        );
        assert_eq!(
            decide(Some(&t), foo, "service=foo&port=1&category=ns,dns"),
            Err(Denied::Reserved("dns"))
        );
        // Reserved without tokens too, and for a catch-all token.
        assert_eq!(
            decide(None, None, "service=foo&port=1&category=ns,dns"),
            Err(Denied::Reserved("dns"))
        );
        assert_eq!(
            decide(None, None, "service=foo&port=1&category=in-addr,arpa"),
            Err(Denied::Reserved("arpa"))
        );
        let all = tokens("tok-catch-all *.*.*,*.*\n");
        assert_eq!(
            decide(
                Some(&all),
                Some("tok-catch-all"),
                "service=x&port=1&category=stub,dns"
            ),
            Err(Denied::Reserved("dns"))
        );
        assert_eq!(
            decide(
                Some(&all),
                Some("tok-catch-all"),
                "service=ns&port=1&category=dns"
            ),
            Err(Denied::Reserved("dns"))
        );
        // `dns` deeper down is an ordinary label.
        assert!(decide(None, None, "service=dns&port=1").is_ok());
        assert!(decide(None, None, "service=x&port=1&category=dns,services").is_ok());
        // Unknown tokens first, whatever the request.
        assert_eq!(
            decide(Some(&t), None, "service=foo&port=1&category=ns,dns"),
            Err(Denied::Unauthenticated)
        );
        // Bad parameters with a good token: on to the parameter refusal.
        assert!(decide(Some(&t), foo, "service=foo&port=0").is_ok());
    }

    #[test]
    fn malformed_files_name_the_line() {
        let bad = |text: &str, line: &str| {
            let e = Tokens::parse(text, &services()).unwrap_err();
            assert!(e.contains(line), "{text:?}: {e}");
            e
        };
        bad("good-token-1 a\nbad\n", "line 2");
        bad("short a\n", "line 1");
        bad("long-enough a/b\n", "line 1");
        bad("long-enough a b\n", "line 1");
        bad("long-enough a..b\n", "line 1");
        bad("long-enough .a\n", "line 1");
        bad("long-enough a,\n", "line 1");
        bad("long-enough @root\n", "line 1");
        assert!(bad("long-enough ns.dns\n", "line 1").contains("\"dns\""));
        assert!(bad("long-enough x.in-addr.arpa\n", "line 1").contains("\"arpa\""));
        assert!(Tokens::parse("long-enough x.dns.services\n", &services()).is_ok());
    }

    #[test]
    fn bearer_header_wins_over_query() {
        assert_eq!(presented_token(Some("Bearer abc"), Some("q")), Some("abc"));
        assert_eq!(presented_token(Some("bearer  abc "), None), Some("abc"));
        assert_eq!(presented_token(Some("Basic abc"), Some("q")), Some("q"));
        assert_eq!(presented_token(None, None), None);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// An independent matcher for the oracle: recursive, per label.
        fn oracle_glob(p: &[u8], s: &[u8]) -> bool {
            match (p.first(), s.first()) {
                (None, None) => true,
                (Some(b'*'), _) => {
                    oracle_glob(&p[1..], s) || (!s.is_empty() && oracle_glob(p, &s[1..]))
                }
                (Some(b'?'), Some(_)) => oracle_glob(&p[1..], &s[1..]),
                (Some(a), Some(b)) if a == b => oracle_glob(&p[1..], &s[1..]),
                _ => false,
            }
        }

        /// Whether the name `labels` is one a grant text names.
        fn oracle_granted(grant: &str, labels: &[&str]) -> bool {
            let mut g: Vec<&str> = grant.split('.').collect();
            if g.len() == 1 {
                g.push("services");
            }
            g.len() == labels.len()
                && g.iter()
                    .zip(labels)
                    .all(|(g, l)| !l.contains('.') && oracle_glob(g.as_bytes(), l.as_bytes()))
        }

        const LABELS: [&str; 9] = [
            "foo",
            "victim",
            "services",
            "production",
            "dns",
            "ns",
            "arpa",
            "web-1",
            "stub",
        ];
        const GRANTS: [&str; 16] = [
            "*.*.services",
            "*.production",
            "victim.services",
            "*.foo.services",
            "foo",
            "foo.services",
            "*.services",
            "web-*.services.production",
            "*",
            "*.*",
            "*.*.*",
            "f?o.*",
            "victim",
            "*.victim.services",
            "@admin",
            "ns.*",
        ];

        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                12 => proptest::sample::select(&LABELS[..]).prop_map(String::from),
                1 => Just("victim.services".to_string()),
                1 => Just("victim%2Eservices".to_string()),
                1 => Just("%2e%2e".to_string()),
                1 => Just("DNS".to_string()),
                1 => "[a-z*?.%]{1,6}",
            ]
        }

        fn query() -> impl Strategy<Value = String> {
            (
                value(),
                proptest::option::weighted(0.8, proptest::collection::vec(value(), 1..4)),
            )
                .prop_map(|(service, category)| {
                    let mut q = format!("service={service}&port=80");
                    if let Some(c) = category {
                        q.push_str(&format!("&category={}", c.join(",")));
                    }
                    q
                })
        }

        fn grant_sets() -> impl Strategy<Value = Vec<Vec<&'static str>>> {
            proptest::collection::vec(
                proptest::collection::vec(proptest::sample::select(&GRANTS[..]), 1..4),
                1..4,
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            /// For every accepted request and grant set, the key written
            /// lies exactly at a name the presented token was granted, and
            /// outside every reserved subtree.
            #[test]
            fn accepted_keys_lie_in_a_granted_name_outside_reserved_trees(
                sets in grant_sets(),
                who in 0usize..4,
                q in query(),
            ) {
                let text: String = sets
                    .iter()
                    .enumerate()
                    .map(|(i, g)| format!("token-number-{i} {}\n", g.join(",")))
                    .collect();
                let t = Tokens::parse(&text, &services()).unwrap();
                let presented = format!("token-number-{who}");
                let l = layout();
                let Ok(r) = parse(&q, "127.0.0.1".parse().unwrap(), &l) else {
                    return Ok(());
                };
                let verdict = authorise(Some(&t), Some(&presented), Some(&r));
                let unrestricted = authorise(None, None, Some(&r));
                let Ok(_) = verdict else {
                    return Ok(());
                };
                prop_assert!(unrestricted.is_ok());
                prop_assert!(who < sets.len(), "an unknown token was accepted");
                let e = r.entry(&l);
                let rest = e.key.strip_prefix(&l.root_dir()).expect("under the root");
                let mut dirs: Vec<&str> = rest.split('/').collect();
                dirs.pop(); // the id
                let top = dirs[0];
                prop_assert!(!RESERVED.contains(&top), "{} written under {top}", e.key);
                dirs.reverse();
                prop_assert!(
                    sets[who].iter().any(|g| oracle_granted(g, &dirs)),
                    "{} (name {}) is not a name granted by {:?}",
                    e.key, dirs.join("."), sets[who]
                );
            }

            /// Without tokens, every parsed name outside the reserved
            /// subtrees is accepted, and none inside them.
            #[test]
            fn reserved_subtrees_are_refused_without_tokens(q in query()) {
                let l = layout();
                if let Ok(r) = parse(&q, "127.0.0.1".parse().unwrap(), &l) {
                    let top = r.category.last().unwrap().clone();
                    match authorise(None, None, Some(&r)) {
                        Ok(None) => prop_assert!(!RESERVED.contains(&top.as_str())),
                        Err(Denied::Reserved(label)) => prop_assert_eq!(label, top.as_str()),
                        other => prop_assert!(false, "{:?}", other),
                    }
                }
            }
        }
    }
}
