//! The plain HTTP endpoints served beside `/provide` on the same listener:
//! `/healthz`, `/metrics` and `/services`.
//!
//! They answer from state the server already holds (the worker's last known
//! view of etcd, counters, the live registrations), never with an etcd round
//! trip, so monitoring that polls them costs etcd nothing.

use std::io::Write;
use std::time::{Instant, UNIX_EPOCH};

use crate::connection::plain;
use crate::http::{self, Head};
use crate::provide;
use crate::server::Shared;

pub fn serve(shared: &Shared, stream: &mut dyn Write, head: &Head) {
    let path = head.path.as_str();
    if !matches!(path, "/healthz" | "/metrics" | "/services") {
        return plain(stream, 404, &format!("no such endpoint: {}", short(path)));
    }
    if head.method != "GET" {
        return plain(stream, 405, &format!("{path} takes GET"));
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
