//! Counters, gauges and histograms for `/metrics`, written in the Prometheus
//! text exposition format 0.0.4.
//!
//! Hand-written rather than a metrics crate: the set is small and fixed,
//! every series is known at compile time (labels are enums, never peer
//! input, so a client cannot grow the series count), and plain atomics keep
//! the hot path at one relaxed increment. `Metered` wraps a `Store` so every
//! etcd request is counted and timed in one place.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::error::StoreError;
use crate::health::EtcdState;
use crate::liveness::Stalls;
use crate::worker::{Guard, Store, StoredKv};

/// etcd operations, as the `op` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Grant,
    KeepAlive,
    Revoke,
    Put,
    Delete,
    Range,
}

const OPS: [Op; 6] = [
    Op::Grant,
    Op::KeepAlive,
    Op::Revoke,
    Op::Put,
    Op::Delete,
    Op::Range,
];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Grant => "grant",
            Op::KeepAlive => "keepalive",
            Op::Revoke => "revoke",
            Op::Put => "put",
            Op::Delete => "delete",
            Op::Range => "range",
        }
    }
}

/// `unavailable` is etcd unreachable and `rejected` one bad request, the
/// names these outcomes had before the other refusals had their own.
const OUTCOMES: [&str; 7] = [
    "ok",
    "unavailable",
    "lease_not_found",
    "rejected",
    "refusing_writes",
    "auth",
    "permission_denied",
];

fn outcome_index<T>(r: &Result<T, StoreError>) -> usize {
    match r {
        Ok(_) => 0,
        Err(StoreError::Unreachable(_)) => 1,
        Err(StoreError::LeaseNotFound) => 2,
        Err(StoreError::BadRequest(_)) => 3,
        Err(StoreError::RefusingWrites(_)) => 4,
        Err(StoreError::Auth(_)) => 5,
        Err(StoreError::PermissionDenied(_)) => 6,
    }
}

/// How a `/provide` request turned out, as the `outcome` label.
#[derive(Debug, Clone, Copy)]
pub enum Registration {
    /// Stored in etcd and acknowledged to the client.
    Stored,
    /// Refused for its parameters (or access control).
    Refused,
    /// The client went away before etcd stored the entry.
    Abandoned,
}

const REGISTRATION_OUTCOMES: [&str; 3] = ["stored", "refused", "abandoned"];

/// Why a registration ended, as the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Close,
    PingTimeout,
    Error,
    Shutdown,
    /// A reloaded token file no longer grants the name.
    Revoked,
}

const REMOVAL_REASONS: [&str; 5] = ["close", "ping_timeout", "error", "shutdown", "revoked"];

impl Removal {
    /// The label value, also used in log lines.
    pub fn as_str(self) -> &'static str {
        REMOVAL_REASONS[self as usize]
    }
}

/// The limits counted in `skyapi_limit_hits_total`, by flag name; a limit
/// not listed here counts as `other`.
const LIMITS: [&str; 6] = [
    "max-connections",
    "handshake-timeout",
    "max-head-size",
    "max-message-size",
    "max-message-rate",
    "other",
];

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn observe(&self, secs: f64) {
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add((secs * 1e9) as u64, Ordering::Relaxed);
    }
}

#[derive(Default)]
pub struct Metrics {
    connections_open: AtomicI64,
    /// `--max-connections` and `--timeout`, so alert rules can compare
    /// against what this instance runs with.
    connections_max: AtomicU64,
    timeout_secs: AtomicU64,
    limit_hits: [AtomicU64; LIMITS.len()],
    registrations: [AtomicU64; 3],
    removals: [AtomicU64; REMOVAL_REASONS.len()],
    etcd_requests: [[AtomicU64; OUTCOMES.len()]; 6],
    etcd_latency: [Histogram; 6],
    lease_regrants: AtomicU64,
    queue: AtomicI64,
    pending_keys: AtomicI64,
    /// Index of the current `EtcdState` in `EtcdState::ALL` (0: ok).
    etcd_state: AtomicUsize,
    /// When the oldest registration still waiting for etcd arrived.
    oldest_waiting: Mutex<Option<Instant>>,
    /// Stalls of skyapi itself, as connection threads and the worker saw
    /// them.
    pub stalls: Stalls,
}

impl Metrics {
    /// Records the settings alert rules compare against.
    pub fn configured(&self, max_connections: usize, timeout: std::time::Duration) {
        self.connections_max
            .store(max_connections as u64, Ordering::Relaxed);
        self.timeout_secs
            .store(timeout.as_secs(), Ordering::Relaxed);
    }

    /// A limit was hit; `flag` names it (`--max-connections`).
    pub fn limit_hit(&self, flag: &str) {
        let name = flag.trim_start_matches('-');
        let i = LIMITS
            .iter()
            .position(|l| *l == name)
            .unwrap_or(LIMITS.len() - 1);
        self.limit_hits[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_opened(&self) {
        self.connections_open.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self) {
        self.connections_open.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn registration(&self, outcome: Registration) {
        self.registrations[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn removal(&self, reason: Removal) {
        self.removals[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn lease_regranted(&self) {
        self.lease_regrants.fetch_add(1, Ordering::Relaxed);
    }

    /// A command entered (+1) or left (-1) the worker's channel.
    pub fn queued(&self, delta: i64) {
        self.queue.fetch_add(delta, Ordering::Relaxed);
    }

    pub fn set_pending_keys(&self, n: usize) {
        self.pending_keys.store(n as i64, Ordering::Relaxed);
    }

    pub fn set_etcd_state(&self, state: EtcdState) {
        let i = EtcdState::ALL.iter().position(|s| *s == state).unwrap_or(0);
        self.etcd_state.store(i, Ordering::Relaxed);
    }

    pub fn set_oldest_waiting(&self, since: Option<Instant>) {
        *self
            .oldest_waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = since;
    }

    fn etcd_request<T>(&self, op: Op, started: Instant, r: &Result<T, StoreError>) {
        let i = OPS.iter().position(|o| *o == op).unwrap_or(0);
        self.etcd_requests[i][outcome_index(r)].fetch_add(1, Ordering::Relaxed);
        self.etcd_latency[i].observe(started.elapsed().as_secs_f64());
    }

    /// The whole exposition, text format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        // Writing to a String cannot fail: the `let _ =` below drop `Ok(())`.
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };

        family(
            &mut out,
            "skyapi_build_info",
            "gauge",
            "Build information; always 1.",
        );
        let _ = writeln!(
            out,
            "skyapi_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );

        family(
            &mut out,
            "skyapi_connections_open",
            "gauge",
            "Open /provide websocket connections.",
        );
        let _ = writeln!(
            out,
            "skyapi_connections_open {}",
            self.connections_open.load(Ordering::Relaxed).max(0)
        );

        family(
            &mut out,
            "skyapi_connections_max",
            "gauge",
            "--max-connections: open connections beyond which new ones get 503.",
        );
        let _ = writeln!(out, "skyapi_connections_max {}", get(&self.connections_max));

        family(
            &mut out,
            "skyapi_timeout_seconds",
            "gauge",
            "--timeout: the lease TTL and the liveness bound of every client.",
        );
        let _ = writeln!(out, "skyapi_timeout_seconds {}", get(&self.timeout_secs));

        family(
            &mut out,
            "skyapi_limit_hits_total",
            "counter",
            "Times a limit was hit, by the flag that sets it.",
        );
        for (i, l) in LIMITS.iter().enumerate() {
            let _ = writeln!(
                out,
                "skyapi_limit_hits_total{{limit=\"{l}\"}} {}",
                get(&self.limit_hits[i])
            );
        }

        family(
            &mut out,
            "skyapi_registrations_total",
            "counter",
            "/provide requests by outcome.",
        );
        for (i, o) in REGISTRATION_OUTCOMES.iter().enumerate() {
            let _ = writeln!(
                out,
                "skyapi_registrations_total{{outcome=\"{o}\"}} {}",
                get(&self.registrations[i])
            );
        }

        family(
            &mut out,
            "skyapi_removals_total",
            "counter",
            "Registrations ended, by reason.",
        );
        for (i, r) in REMOVAL_REASONS.iter().enumerate() {
            let _ = writeln!(
                out,
                "skyapi_removals_total{{reason=\"{r}\"}} {}",
                get(&self.removals[i])
            );
        }

        family(
            &mut out,
            "skyapi_etcd_requests_total",
            "counter",
            "etcd requests by operation and outcome.",
        );
        for (i, op) in OPS.iter().enumerate() {
            for (j, o) in OUTCOMES.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "skyapi_etcd_requests_total{{op=\"{}\",outcome=\"{o}\"}} {}",
                    op.name(),
                    get(&self.etcd_requests[i][j])
                );
            }
        }

        family(
            &mut out,
            "skyapi_etcd_request_duration_seconds",
            "histogram",
            "etcd request latency by operation.",
        );
        for (i, op) in OPS.iter().enumerate() {
            let h = &self.etcd_latency[i];
            for (b, le) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "skyapi_etcd_request_duration_seconds_bucket{{op=\"{}\",le=\"{le}\"}} {}",
                    op.name(),
                    get(&h.buckets[b])
                );
            }
            let count = get(&h.count);
            let _ = writeln!(
                out,
                "skyapi_etcd_request_duration_seconds_bucket{{op=\"{}\",le=\"+Inf\"}} {count}",
                op.name()
            );
            let _ = writeln!(
                out,
                "skyapi_etcd_request_duration_seconds_sum{{op=\"{}\"}} {}",
                op.name(),
                get(&h.sum_nanos) as f64 / 1e9
            );
            let _ = writeln!(
                out,
                "skyapi_etcd_request_duration_seconds_count{{op=\"{}\"}} {count}",
                op.name()
            );
        }

        family(
            &mut out,
            "skyapi_etcd_lease_regrants_total",
            "counter",
            "New leases granted after the previous one was lost.",
        );
        let _ = writeln!(
            out,
            "skyapi_etcd_lease_regrants_total {}",
            get(&self.lease_regrants)
        );

        let state = self.etcd_state.load(Ordering::Relaxed);
        family(
            &mut out,
            "skyapi_etcd_up",
            "gauge",
            "1 while etcd stores registrations, else 0 (see skyapi_etcd_state).",
        );
        let _ = writeln!(out, "skyapi_etcd_up {}", (state == 0) as u8);

        family(
            &mut out,
            "skyapi_etcd_state",
            "gauge",
            "1 for the state etcd is in as the worker last found it, else 0.",
        );
        for (i, s) in EtcdState::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "skyapi_etcd_state{{state=\"{}\"}} {}",
                s.label(),
                (i == state) as u8
            );
        }

        let oldest = *self
            .oldest_waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        family(
            &mut out,
            "skyapi_oldest_waiting_registration_seconds",
            "gauge",
            "Age of the oldest registration waiting for etcd to store it; 0 if none.",
        );
        let _ = writeln!(
            out,
            "skyapi_oldest_waiting_registration_seconds {}",
            oldest.map_or(0.0, |t| t.elapsed().as_secs_f64())
        );

        family(
            &mut out,
            "skyapi_stalls_total",
            "counter",
            "Times skyapi itself did not run for longer than a ping interval \
             (process stopped, host overloaded, VM paused).",
        );
        let _ = writeln!(out, "skyapi_stalls_total {}", self.stalls.count());
        family(
            &mut out,
            "skyapi_stall_seconds_total",
            "counter",
            "Total length of those stalls.",
        );
        let _ = writeln!(out, "skyapi_stall_seconds_total {}", self.stalls.seconds());

        family(
            &mut out,
            "skyapi_worker_queue_depth",
            "gauge",
            "Commands waiting in the etcd worker's channel.",
        );
        let _ = writeln!(
            out,
            "skyapi_worker_queue_depth {}",
            self.queue.load(Ordering::Relaxed).max(0)
        );

        family(
            &mut out,
            "skyapi_worker_pending_keys",
            "gauge",
            "Keys waiting to be written to or deleted from etcd.",
        );
        let _ = writeln!(
            out,
            "skyapi_worker_pending_keys {}",
            self.pending_keys.load(Ordering::Relaxed)
        );
        out
    }
}

/// A `Store` that counts and times every request of the one it wraps.
pub struct Metered<S> {
    pub inner: S,
    pub metrics: std::sync::Arc<Metrics>,
}

impl<S: Store> Metered<S> {
    fn timed<T>(
        &mut self,
        op: Op,
        f: impl FnOnce(&mut S) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let r = f(&mut self.inner);
        self.metrics.etcd_request(op, started, &r);
        r
    }
}

impl<S: Store> Store for Metered<S> {
    fn grant(&mut self, ttl_secs: i64) -> Result<i64, StoreError> {
        self.timed(Op::Grant, |s| s.grant(ttl_secs))
    }
    fn keep_alive(&mut self, lease: i64) -> Result<(), StoreError> {
        self.timed(Op::KeepAlive, |s| s.keep_alive(lease))
    }
    fn revoke(&mut self, lease: i64) -> Result<(), StoreError> {
        self.timed(Op::Revoke, |s| s.revoke(lease))
    }
    fn put(
        &mut self,
        kvs: &[(String, String, Guard)],
        lease: i64,
    ) -> Result<(i64, Vec<bool>), StoreError> {
        self.timed(Op::Put, |s| s.put(kvs, lease))
    }
    fn delete_if(&mut self, keys: &[(String, i64)]) -> Result<Vec<bool>, StoreError> {
        self.timed(Op::Delete, |s| s.delete_if(keys))
    }
    fn rewrite_owned(
        &mut self,
        kv: &(String, String),
        lease: i64,
    ) -> Result<Option<i64>, StoreError> {
        self.timed(Op::Put, |s| s.rewrite_owned(kv, lease))
    }
    fn list(&mut self, dir: &str) -> Result<Vec<StoredKv>, StoreError> {
        self.timed(Op::Range, |s| s.list(dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rules `promtool check metrics` applies that a writer can break:
    /// every sample belongs to a family with HELP and TYPE, counters end in
    /// `_total`, histogram buckets are cumulative and end with `+Inf`.
    #[test]
    fn exposition_is_well_formed() {
        let m = Metrics::default();
        m.registration(Registration::Stored);
        m.removal(Removal::PingTimeout);
        m.etcd_latency[3].observe(0.003);
        m.etcd_latency[3].observe(7.0);
        let text = m.render();
        let mut typed = std::collections::HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(typed.insert(name.to_string(), kind.to_string()).is_none());
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "{name}");
                }
                continue;
            }
            if line.starts_with('#') {
                assert!(line.starts_with("# HELP "), "{line}");
                continue;
            }
            let name = line.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| typed.get(*f).is_some_and(|k| k == "histogram"))
                })
                .unwrap_or(name);
            assert!(typed.contains_key(family), "sample without TYPE: {line}");
            let value = line.rsplit(' ').next().unwrap();
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("bad value: {line}"));
        }
        assert!(text.contains("skyapi_registrations_total{outcome=\"stored\"} 1"));
        assert!(text.contains("skyapi_removals_total{reason=\"ping_timeout\"} 1"));
        assert!(
            text.contains("skyapi_etcd_request_duration_seconds_bucket{op=\"put\",le=\"0.005\"} 1")
        );
        assert!(
            text.contains("skyapi_etcd_request_duration_seconds_bucket{op=\"put\",le=\"+Inf\"} 2")
        );
        assert!(text.contains("skyapi_etcd_request_duration_seconds_count{op=\"put\"} 2"));
    }

    #[test]
    fn limits_are_counted_by_flag_and_settings_shown() {
        let m = Metrics::default();
        m.configured(500, std::time::Duration::from_secs(15));
        m.limit_hit("--max-connections");
        m.limit_hit("--max-connections");
        m.limit_hit("--max-message-rate");
        m.limit_hit("--something-new");
        let text = m.render();
        for line in [
            "skyapi_connections_max 500",
            "skyapi_timeout_seconds 15",
            "skyapi_limit_hits_total{limit=\"max-connections\"} 2",
            "skyapi_limit_hits_total{limit=\"max-message-rate\"} 1",
            "skyapi_limit_hits_total{limit=\"max-head-size\"} 0",
            "skyapi_limit_hits_total{limit=\"other\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
