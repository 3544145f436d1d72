//! Access control for `/provide`: the token file and the checks made before
//! a websocket is accepted.
//!
//! The token file has one grant per line, `TOKEN SERVICE-GLOB[,GLOB...]`
//! (`*` any run of characters, `?` one); blank lines and `#` comments are
//! ignored. Invariants: a malformed file is refused whole, naming the line,
//! so a typo never silently opens or closes access; tokens are compared in
//! constant time and never logged or echoed.

use std::path::Path;

/// One line of the token file.
#[derive(Clone)]
struct Grant {
    token: Vec<u8>,
    patterns: Vec<String>,
}

/// The parsed token file.
#[derive(Clone, Default)]
pub struct Tokens {
    grants: Vec<Grant>,
}

impl std::fmt::Debug for Tokens {
    // Never prints a token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} grants)", self.grants.len())
    }
}

/// Why a request may not register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No token, or one not in the file: HTTP 401.
    Unauthenticated,
    /// A known token not granted this service: HTTP 403.
    Forbidden,
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Tokens, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        Tokens::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Tokens, String> {
        let mut grants = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(token), Some(patterns), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(format!(
                    "line {}: expected TOKEN SERVICE-GLOB[,GLOB...]",
                    n + 1
                ));
            };
            if token.len() < 8 {
                return Err(format!("line {}: token shorter than 8 characters", n + 1));
            }
            let patterns: Vec<String> = patterns.split(',').map(str::to_ascii_lowercase).collect();
            for p in &patterns {
                let ok = !p.is_empty()
                    && p.bytes().all(|b| {
                        b.is_ascii_alphanumeric()
                            || b == b'-'
                            || b == b'_'
                            || b == b'*'
                            || b == b'?'
                    });
                if !ok {
                    return Err(format!(
                        "line {}: {p:?} is not a service glob (letters, digits, -, _, *, ?)",
                        n + 1
                    ));
                }
            }
            grants.push(Grant {
                token: token.as_bytes().to_vec(),
                patterns,
            });
        }
        Ok(Tokens { grants })
    }

    pub fn len(&self) -> usize {
        self.grants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }

    /// Checks a presented token against `service` (already lower-case).
    /// Every grant is compared, matched or not, so the time taken does not
    /// say which token (or how much of one) was right.
    pub fn check(&self, presented: Option<&str>, service: &str) -> Result<(), Denied> {
        let presented = presented.unwrap_or("").as_bytes();
        let mut known = false;
        let mut allowed = false;
        for g in &self.grants {
            let same = constant_time_eq(&g.token, presented);
            known |= same;
            allowed |= same
                && g.patterns
                    .iter()
                    .any(|p| glob(p.as_bytes(), service.as_bytes()));
        }
        if presented.is_empty() || !known {
            Err(Denied::Unauthenticated)
        } else if !allowed {
            Err(Denied::Forbidden)
        } else {
            Ok(())
        }
    }
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
    fn checks() {
        let t = Tokens::parse("# comment\n\nsecret-one web-*,api\nsecret-two *\n").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.check(Some("secret-one"), "web-1"), Ok(()));
        assert_eq!(t.check(Some("secret-one"), "api"), Ok(()));
        assert_eq!(t.check(Some("secret-one"), "db"), Err(Denied::Forbidden));
        assert_eq!(t.check(Some("secret-two"), "db"), Ok(()));
        assert_eq!(
            t.check(Some("secret-on"), "web-1"),
            Err(Denied::Unauthenticated)
        );
        assert_eq!(
            t.check(Some("secret-one2"), "web-1"),
            Err(Denied::Unauthenticated)
        );
        assert_eq!(t.check(None, "web-1"), Err(Denied::Unauthenticated));
        assert_eq!(t.check(Some(""), "web-1"), Err(Denied::Unauthenticated));
    }

    #[test]
    fn malformed_files_name_the_line() {
        assert!(Tokens::parse("good-token-1 a\nbad\n")
            .unwrap_err()
            .contains("line 2"));
        assert!(Tokens::parse("short a\n").unwrap_err().contains("line 1"));
        assert!(Tokens::parse("long-enough a/b\n")
            .unwrap_err()
            .contains("line 1"));
        assert!(Tokens::parse("long-enough a b\n")
            .unwrap_err()
            .contains("line 1"));
    }

    #[test]
    fn bearer_header_wins_over_query() {
        assert_eq!(presented_token(Some("Bearer abc"), Some("q")), Some("abc"));
        assert_eq!(presented_token(Some("bearer  abc "), None), Some("abc"));
        assert_eq!(presented_token(Some("Basic abc"), Some("q")), Some("q"));
        assert_eq!(presented_token(None, None), None);
    }
}
