//! The plain HTTP endpoints: `/healthz`, `/metrics` and `/services`, and who
//! may read them on which listener.
//!
//! They answer from state the server already holds (the worker's last known
//! view of etcd, counters, the live registrations), never with an etcd round
//! trip, so monitoring that polls them costs etcd nothing.
//!
//! Exposure, decided here only:
//! - `/healthz` is open everywhere: load balancers probe it, and it says no
//!   more than whether etcd answers;
//! - `/metrics` and `/services` (every provider's address) are "admin"
//!   endpoints. With `--admin-listen-addr` they are served only there (open:
//!   that address is private by the operator's choice) and the main listener
//!   answers 404. Without it they stay on the main listener: open without
//!   `--token-file`, and with it only to a bearer token granted `@admin`
//!   (401 without a known token, 403 with another).

use std::io::Write;
use std::time::{Instant, UNIX_EPOCH};

use log::info;

use crate::auth::{self, Denied};
use crate::connection::plain;
use crate::http::{self, Head};
use crate::provide;
use crate::server::Shared;

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// `--listen-addr`: `/provide` and, unless an admin listener exists,
    /// the admin endpoints under the rules above.
    Main,
    /// `--admin-listen-addr`: the endpoints only, open.
    Admin,
}

pub fn serve(shared: &Shared, stream: &mut dyn Write, head: &Head, on: Listener) {
    let path = head.path.as_str();
    if !matches!(path, "/healthz" | "/metrics" | "/services") {
        return plain(stream, 404, &format!("no such endpoint: {}", short(path)));
    }
    if head.method != "GET" {
        return plain(stream, 405, &format!("{path} takes GET"));
    }
    if path != "/healthz" && on == Listener::Main {
        if shared.admin_listener {
            return plain(
                stream,
                404,
                &format!("{path} is served on the admin listener (--admin-listen-addr)"),
            );
        }
        if let Some(tokens) = shared.tokens() {
            // Header only: a token in a URL ends up in proxies' logs.
            let presented = auth::presented_token(head.header("authorization"), None);
            let verdict = tokens.authenticate(presented).and_then(|id| {
                if tokens.grants_admin(&id) {
                    Ok(())
                } else {
                    Err(Denied::Forbidden)
                }
            });
            match verdict {
                Ok(()) => {}
                Err(Denied::Unauthenticated) => {
                    info!("GET {path} without a valid token: 401");
                    return plain(stream, 401, "a valid bearer token is required");
                }
                Err(_) => {
                    info!("GET {path} with a token not granted @admin: 403");
                    return plain(stream, 403, &format!("this token may not read {path}"));
                }
            }
        }
    }
    match path {
        "/healthz" => healthz(shared, stream),
        "/metrics" => {
            // The peer may be gone; nothing to do about it.
            let _ = http::respond(
                stream,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                &[],
                &shared.metrics.render(),
            );
        }
        _ => services(shared, stream, &head.query),
    }
}

/// 200 `ok` while registrations are being stored (etcd takes our writes,
/// the lease is alive, the etcd worker runs); 503 with the one-line reason
/// and how long it has been so otherwise.
fn healthz(shared: &Shared, stream: &mut dyn Write) {
    let h = shared
        .health
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    match h.verdict(Instant::now(), shared.timeout) {
        Ok(()) => plain(stream, 200, "ok"),
        Err(why) => plain(stream, 503, &one_line(&why)),
    }
}

/// This instance's live registrations as JSON, optionally `?service=NAME`.
fn services(shared: &Shared, stream: &mut dyn Write, query: &str) {
    let mut filter = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("service", v)) => match provide::label("service", v) {
                Ok(s) => filter = Some(s),
                Err(e) => return plain(stream, 400, &e.to_string()),
            },
            _ => return plain(stream, 400, "the only parameter is service=NAME"),
        }
    }
    let mut list: Vec<serde_json::Value> = shared
        .live_registrations()
        .values()
        .filter(|l| filter.as_ref().is_none_or(|f| *f == l.service))
        .map(|l| {
            let since = l
                .since
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            serde_json::json!({
                "service": l.service,
                "name": l.name,
                "key": l.key,
                "host": l.host,
                "port": l.port,
                "priority": l.priority,
                "weight": l.weight,
                "peer": l.peer.to_string(),
                "connected_since": since,
                "stored": l.stored,
            })
        })
        .collect();
    list.sort_by(|a, b| a["key"].as_str().cmp(&b["key"].as_str()));
    let body = serde_json::Value::Array(list).to_string();
    let _ = http::respond(stream, 200, "application/json", &[], &body);
}

fn one_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(300).collect()
}

fn short(path: &str) -> String {
    path.chars().take(64).collect()
}
