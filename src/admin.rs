//! The admin listener (`--admin-listen-addr`): `/healthz`, `/metrics` and
//! `/services` on an address of their own, in plain HTTP, meant to be
//! private (loopback, a management network). What is served where is
//! decided in `endpoints`.
//!
//! Built on the server's own request-head reader and endpoints rather than
//! tiny_http: the limits (head size, deadline) and the endpoint code then
//! exist once for both listeners, and no dependency is added for a second
//! accept loop of a few lines.
//!
//! Invariants: each request is served on its own short-lived thread, at
//! most `MAX_OPEN` at once (503 beyond, answered without a thread); every
//! read has the `--handshake-timeout` deadline and the head
//! `--max-head-size`; `accept()` errors are logged and retried.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use log::error;

use crate::connection;
use crate::listen::Listeners;
use crate::server::{self, Shared, CONN_STACK};

/// Admin requests served at once: scrapers and operators, not a fleet.
pub const MAX_OPEN: usize = 32;

/// Gives its slot back when the request's thread ends, however.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves the admin listener until shutdown.
pub fn accept_loop(listener: &Listeners, shared: &Arc<Shared>) {
    let open = Arc::new(AtomicUsize::new(0));
    // Not watched by the systemd watchdog: the admin loop is not needed to
    // keep registrations.
    while let Some((stream, peer)) = server::accept(listener, shared, || {}) {
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_OPEN {
            open.fetch_sub(1, Ordering::SeqCst);
            shared.limit_hit(
                "admin connections",
                &format!("{MAX_OPEN} admin requests open: answering 503"),
            );
            server::busy(stream);
            continue;
        }
        let slot = Slot(open.clone());
        let shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("admin".into())
            .stack_size(CONN_STACK)
            .spawn(move || {
                let _slot = slot;
                let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    connection::serve_admin(&shared, stream, peer)
                }));
                if served.is_err() {
                    error!("admin request from {peer} panicked");
                }
            });
        if let Err(e) = spawned {
            // The closure, with the stream and the slot, was dropped.
            error!("cannot start a thread for admin request from {peer}: {e}");
        }
    }
}
