//! The load generator's view of etcd: key counts, a watch that timestamps
//! every event as it arrives, and etcd's own Prometheus counters.
//!
//! A watch started before the action measures "key stored" or "key gone"
//! without polling: etcd pushes the event once the write is committed.
//! Counts use `count_only` ranges (`etcdctl get --prefix --count-only`).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Bound on one etcd request from the load generator.
const CALL: Duration = Duration::from_secs(5);

/// Where skyapi keeps the keys of `service` under `key_dir` (`--key-dir`):
/// the prefix every scenario counts and watches.
pub fn service_prefix(key_dir: &str, service: &str) -> String {
    format!("{key_dir}/{service}/")
}

pub async fn connect(endpoint: &str) -> Result<Client, String> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(CALL)
        .with_timeout(CALL);
    timeout(CALL * 2, Client::connect([endpoint], Some(opts)))
        .await
        .map_err(|_| format!("etcd {endpoint}: connect timed out"))?
        .map_err(|e| format!("etcd {endpoint}: {e}"))
}

/// A client and the prefix of `service`, which must hold no key yet (a
/// scenario's leftovers would skew its counts); `what` names the scenario.
pub async fn empty_service(
    endpoint: &str,
    key_dir: &str,
    service: &str,
    what: &str,
) -> Result<(Client, String), String> {
    let client = connect(endpoint).await?;
    let prefix = service_prefix(key_dir, service);
    if count(&client, &prefix).await? != 0 {
        return Err(format!("keys under {prefix} before the {what}"));
    }
    Ok((client, prefix))
}

/// Number of keys under `prefix`.
pub async fn count(client: &Client, prefix: &str) -> Result<i64, String> {
    let mut c = client.clone();
    let resp = timeout(
        CALL,
        c.get(
            prefix,
            Some(GetOptions::new().with_prefix().with_count_only()),
        ),
    )
    .await
    .map_err(|_| "etcd count timed out".to_string())?
    .map_err(|e| format!("etcd count: {e}"))?;
    Ok(resp.count())
}

/// The lease of the first key under `prefix` (0 if it has none).
pub async fn lease_of_any(client: &Client, prefix: &str) -> Result<i64, String> {
    let mut c = client.clone();
    let resp = timeout(
        CALL,
        c.get(prefix, Some(GetOptions::new().with_prefix().with_limit(1))),
    )
    .await
    .map_err(|_| "etcd get timed out".to_string())?
    .map_err(|e| format!("etcd get: {e}"))?;
    resp.kvs()
        .first()
        .map(|kv| kv.lease())
        .ok_or_else(|| format!("no key under {prefix}"))
}

/// One event, stamped when the load generator received it.
#[derive(Debug, Clone)]
pub struct Event {
    pub at: Instant,
    pub put: bool,
    pub key: String,
    /// The lease the key was put with (0 for a delete or no lease).
    pub lease: i64,
}

/// A prefix watch whose events are read by a background task, so their
/// arrival times do not depend on when the scenario looks at them.
pub struct Watch {
    rx: mpsc::UnboundedReceiver<Event>,
    task: JoinHandle<()>,
    /// Events received but not asked for yet: (key, put) → arrival.
    seen: HashMap<(String, bool), Instant>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watch {
    /// Starts watching `prefix`; returns once etcd confirmed the watch, so
    /// nothing done afterwards can be missed.
    pub async fn start(client: &Client, prefix: &str) -> Result<Watch, String> {
        let mut c = client.clone();
        let mut stream = timeout(
            CALL,
            c.watch(prefix, Some(WatchOptions::new().with_prefix())),
        )
        .await
        .map_err(|_| "etcd watch timed out".to_string())?
        .map_err(|e| format!("etcd watch: {e}"))?;
        let first = timeout(CALL, stream.message())
            .await
            .map_err(|_| "etcd watch: no confirmation".to_string())?
            .map_err(|e| format!("etcd watch: {e}"))?;
        match first {
            Some(r) if r.created() => {}
            other => return Err(format!("etcd watch not created: {other:?}")),
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok(Some(resp)) = stream.message().await {
                let at = Instant::now();
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let event = Event {
                        at,
                        put: ev.event_type() == EventType::Put,
                        key: String::from_utf8_lossy(kv.key()).into_owned(),
                        lease: kv.lease(),
                    };
                    if tx.send(event).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Watch {
            rx,
            task,
            seen: HashMap::new(),
        })
    }

    /// When the event (`key`, put or delete) arrived; waits until `limit`.
    pub async fn wait_for(&mut self, key: &str, put: bool, limit: Duration) -> Option<Instant> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(at) = self.seen.remove(&(key.to_string(), put)) {
                return Some(at);
            }
            let ev = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .ok()??;
            // A key put twice keeps its first arrival.
            self.seen.entry((ev.key, ev.put)).or_insert(ev.at);
        }
    }

    /// The next event, if one arrives by `deadline`.
    pub async fn next_until(&mut self, deadline: tokio::time::Instant) -> Option<Event> {
        tokio::time::timeout_at(deadline, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Forgets everything received so far.
    pub fn clear(&mut self) {
        while self.rx.try_recv().is_ok() {}
        self.seen.clear();
    }
}

/// etcd's request counters, from its `/metrics` page. Keys are
/// `handled/<method>` (`grpc_server_handled_total`: finished RPCs, all
/// codes), `received/<method>` (`grpc_server_msg_received_total`: request
/// messages, which also counts each keepalive on the long-lived
/// LeaseKeepAlive stream), `sent_bytes` / `received_bytes`, `watch_events`
/// (events sent to watchers) and the gauge `gauge/watchers`.
pub async fn metrics(endpoint: &str) -> Result<BTreeMap<String, f64>, String> {
    let hostport = endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let body = timeout(CALL, async {
        let mut s = TcpStream::connect(&hostport).await?;
        s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {hostport}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    })
    .await
    .map_err(|_| "etcd /metrics timed out".to_string())?
    .map_err(|e| format!("etcd /metrics: {e}"))?;
    let text = String::from_utf8_lossy(&body);
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((name_labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = name_labels
            .split_once('{')
            .map(|(n, l)| (n, l.trim_end_matches('}')))
            .unwrap_or((name_labels, ""));
        let label = |wanted: &str| {
            labels.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == wanted).then(|| v.trim_matches('"').to_string())
            })
        };
        let key = match name {
            "grpc_server_handled_total" => {
                format!("handled/{}", label("grpc_method").unwrap_or_default())
            }
            "grpc_server_msg_received_total" => {
                format!("received/{}", label("grpc_method").unwrap_or_default())
            }
            "etcd_network_client_grpc_sent_bytes_total" => "sent_bytes".into(),
            "etcd_network_client_grpc_received_bytes_total" => "received_bytes".into(),
            // Events sent to watchers (a watch-based reconcile's cost of
            // other instances' churn), and how many watchers there are now.
            "etcd_debugging_mvcc_events_total" => "watch_events".into(),
            "etcd_debugging_mvcc_watcher_total" => "gauge/watchers".into(),
            _ => continue,
        };
        *out.entry(key).or_insert(0.0) += value;
    }
    if out.is_empty() {
        return Err("etcd /metrics has no grpc counters".into());
    }
    Ok(out)
}

/// Per-second rates of every counter that moved between two scrapes, plus
/// the totals `handled/*` and `received/*`; gauges (`gauge/...`) are not
/// counters and are left out.
pub fn rates(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    secs: f64,
) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let mut handled = 0.0;
    let mut received = 0.0;
    for (k, v) in after {
        if k.starts_with("gauge/") {
            continue;
        }
        let d = v - before.get(k).copied().unwrap_or(0.0);
        if k.starts_with("handled/") {
            handled += d;
        }
        if k.starts_with("received/") {
            received += d;
        }
        if d != 0.0 {
            out.insert(k.clone(), crate::stats::round3(d / secs));
        }
    }
    out.insert("handled/*".into(), crate::stats::round3(handled / secs));
    out.insert("received/*".into(), crate::stats::round3(received / secs));
    out
}
