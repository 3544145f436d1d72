//! The plain HTTP endpoints served beside `/provide` on the same listener.
//!
//! They answer from state the server already holds (the worker's last known
//! view of etcd), never with an etcd round trip, so monitoring that polls
//! them costs etcd nothing.

use std::net::TcpStream;

use crate::connection::plain;
use crate::http::Head;
use crate::server::Shared;

pub fn serve(shared: &Shared, stream: &TcpStream, head: &Head) {
    match (head.method.as_str(), head.path.as_str()) {
        ("GET" | "HEAD", "/healthz") => healthz(shared, stream),
        (_, "/healthz") => plain(stream, 405, "use GET"),
        _ => plain(
            stream,
            404,
            &format!("no such endpoint: {}", short(&head.path)),
        ),
    }
}

/// 200 `ok` while etcd answers and the lease is alive; 503 with the reason
/// and how long it has been so otherwise.
fn healthz(shared: &Shared, stream: &TcpStream) {
    let h = shared
        .health
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let age = h.since.elapsed().as_secs();
    if h.etcd_up && h.lease.is_some() {
        plain(stream, 200, "ok");
    } else if !h.etcd_up {
        let why = h.last_error.unwrap_or_else(|| "not yet reached".into());
        plain(
            stream,
            503,
            &format!("etcd unavailable for {age}s: {}", one_line(&why)),
        );
    } else {
        plain(stream, 503, "no etcd lease yet");
    }
}

fn one_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(200).collect()
}

fn short(path: &str) -> String {
    path.chars().take(64).collect()
}
