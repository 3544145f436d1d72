//! Fleet cost (issue 10): what etcd pays for K skyapi instances sharing one
//! etcd (or one cluster) and one root directory, idle and while the rest of
//! the fleet churns.
//!
//! The scenario starts the instances itself (`--spawn`, the skyapi command
//! line without `--listen-addr`), each with `--providers` idle providers of
//! its own service, and writes `--foreign` entries of another instance
//! under the same root directory, on a lease this scenario keeps alive (as
//! that instance would). For each K in `--instances` (and K = 0 first, the
//! baseline: etcd with the foreign entries, their keepalive and nothing
//! else) it measures two windows of `--window` seconds:
//! - idle: nothing registers anywhere;
//! - churn: `--churn-rate` foreign registrations per second (a put on a
//!   second foreign lease, deleted one second later), as another
//!   instance's churn would be.
//!
//! Each window records etcd's own counters summed over every member
//! (`--etcd-members`), the CPU of every etcd process (`--etcd-pids`) and of
//! every instance, and the scenario's own etcd requests in the window (so
//! the driver can subtract them exactly). Per-instance figures are the
//! driver's: (window at K − window at K = 0) / K, as etcd cannot attribute
//! its counters to a connection.
//!
//! Invariants: every instance is this process's child and gets SIGKILL if
//! this process dies (`PR_SET_PDEATHSIG`) and at the end; every
//! loop is bounded by a deadline; all traffic is to loopback.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, PutOptions, Txn, TxnOp};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::client::Target;
use crate::etcd;
use crate::fleet::Fleet;
use crate::procfs;
use crate::stats::round3;

pub struct Opts {
    /// skyapi's command line without `--listen-addr` (split on spaces).
    pub spawn: Vec<String>,
    /// Every member's client URL, for /metrics.
    pub members: Vec<String>,
    pub etcd_pids: Vec<u32>,
    /// K values, ascending; 0 (the baseline) is always measured first.
    pub instances: Vec<usize>,
    pub providers: usize,
    pub foreign: usize,
    pub churn_rate: u32,
    pub window: Duration,
    pub key_dir: String,
}

/// Lease of the foreign entries: what another instance's `--timeout` would
/// be; kept alive every third of it.
const FOREIGN_TTL: i64 = 30;
/// Puts per transaction when writing the foreign entries (etcd's
/// `--max-txn-ops` is 128).
const BATCH: usize = 100;
/// Bound on one etcd request, on starting an instance, on registering one
/// instance's providers.
const CALL: Duration = Duration::from_secs(10);
const START_LIMIT: Duration = Duration::from_secs(20);
const RAMP_LIMIT: Duration = Duration::from_secs(120);
/// Foreign registrations in flight at most (put, a second, delete).
const MAX_CHURN_IN_FLIGHT: usize = 1000;
/// Pause after a ramp or a churn start before a window opens.
const SETTLE: Duration = Duration::from_secs(2);

/// The scenario's own etcd requests (so the driver can take them out).
#[derive(Default)]
struct Own {
    keepalives: AtomicU64,
    puts: AtomicU64,
    deletes: AtomicU64,
}

impl Own {
    fn total(&self) -> u64 {
        self.keepalives.load(Ordering::Relaxed)
            + self.puts.load(Ordering::Relaxed)
            + self.deletes.load(Ordering::Relaxed)
    }
}

struct Instance {
    child: Child,
    addr: SocketAddr,
    fleet: Fleet,
}

impl Drop for Instance {
    /// SIGKILL: the etcd the fleet ran on is thrown away after the run, so
    /// what the instance would leave behind does not matter, and all of
    /// them stop at once.
    fn drop(&mut self) {
        self.fleet.stop();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn run(etcd_endpoint: &str, opts: &Opts) -> Result<serde_json::Value, String> {
    let client = etcd::connect(etcd_endpoint).await?;
    let own = Arc::new(Own::default());
    let started = Instant::now();

    // Two other instances: one holds the foreign entries, the other
    // churns. Not one lease for both: etcd 3.4 pays for a put or delete in
    // proportion to how many keys its lease holds (measured: 200 writes/s
    // on a lease of 100,000 keys cost 1.4 cores, on a small one 0.1), so
    // one lease would measure etcd's lease bookkeeping, not the instances.
    let lease = grant(&client).await?;
    let churn_lease = grant(&client).await?;
    let _keepers = [
        Abort(tokio::spawn(keep_alive(client.clone(), lease, own.clone()))),
        Abort(tokio::spawn(keep_alive(
            client.clone(),
            churn_lease,
            own.clone(),
        ))),
    ];
    let foreign_dir = format!("{}/fleetforeign/", opts.key_dir);
    let t = Instant::now();
    write_foreign(&client, &foreign_dir, opts.foreign, lease).await?;
    let foreign_write_s = round3(t.elapsed().as_secs_f64());
    eprintln!(
        "fleet: {} foreign entries written in {foreign_write_s} s",
        opts.foreign
    );

    let mut instances: Vec<Instance> = Vec::new();
    let mut windows = Vec::new();
    let mut ks = vec![0];
    ks.extend(opts.instances.iter().copied().filter(|&k| k > 0));
    ks.dedup();
    for &k in &ks {
        while instances.len() < k {
            let i = instances.len();
            instances.push(start_instance(opts, i).await?);
        }
        tokio::time::sleep(SETTLE).await;
        for churn in [false, true] {
            let churner = churn.then(|| {
                Abort(tokio::spawn(churn_foreign(
                    client.clone(),
                    format!("{foreign_dir}churn/"),
                    churn_lease,
                    opts.churn_rate,
                    own.clone(),
                )))
            });
            if churn {
                tokio::time::sleep(SETTLE).await;
            }
            let w = window(opts, &instances, &own).await?;
            drop(churner);
            eprintln!(
                "fleet: K={k} {}: etcd sent {} B/s, received {} req/s, etcd CPU {} %",
                if churn { "churn" } else { "idle" },
                w["etcd_sent_bytes_per_s"],
                w["etcd_received_per_s"],
                w["etcd_cpu_percent"]
            );
            let mut w = w;
            w["instances"] = json!(k);
            w["churn"] = json!(churn);
            windows.push(w);
        }
        for inst in &mut instances {
            if let Ok(Some(status)) = inst.child.try_wait() {
                return Err(format!("instance {} exited: {status}", inst.addr));
            }
        }
    }
    let keys = etcd::count(&client, &opts.key_dir).await?;
    let rss: Vec<u64> = instances
        .iter()
        .filter_map(|i| procfs::sample(i.child.id()).ok())
        .map(|s| s.rss_kib)
        .collect();
    drop(instances);
    Ok(json!({
        "members": opts.members.len(),
        "providers_per_instance": opts.providers,
        "foreign": opts.foreign,
        "foreign_lease_ttl_s": FOREIGN_TTL,
        "foreign_write_s": foreign_write_s,
        "churn_rate": opts.churn_rate,
        "window_s": opts.window.as_secs(),
        "keys_under_root_at_end": keys,
        "instance_rss_kib_at_end": rss,
        "windows": windows,
        "seconds": round3(started.elapsed().as_secs_f64()),
    }))
}

async fn grant(client: &Client) -> Result<i64, String> {
    Ok(timeout(CALL, client.clone().lease_grant(FOREIGN_TTL, None))
        .await
        .map_err(|_| "lease grant timed out".to_string())?
        .map_err(|e| format!("lease grant: {e}"))?
        .id())
}

/// Aborts a background task when dropped.
struct Abort(tokio::task::JoinHandle<()>);

impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn keep_alive(client: Client, lease: i64, own: Arc<Own>) {
    let mut c = client;
    let Ok((mut keeper, mut stream)) = c.lease_keep_alive(lease).await else {
        eprintln!("fleet: foreign keepalive stream failed");
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_secs(FOREIGN_TTL as u64 / 3));
    loop {
        tick.tick().await;
        own.keepalives.fetch_add(1, Ordering::Relaxed);
        if keeper.keep_alive().await.is_err() {
            eprintln!("fleet: foreign keepalive failed");
            return;
        }
        let _ = timeout(CALL, stream.message()).await;
    }
}

/// The value another instance would store: skyapi's SkyDNS JSON.
fn value(i: usize) -> String {
    format!(
        r#"{{"host":"10.{}.{}.{}","port":{},"priority":1,"weight":100,"ttl":30}}"#,
        (i >> 16) & 255,
        (i >> 8) & 255,
        i & 255,
        1000 + i % 60000
    )
}

/// `n` entries in `dir` on `lease`, `BATCH` puts per transaction, eight
/// transactions in flight.
async fn write_foreign(client: &Client, dir: &str, n: usize, lease: i64) -> Result<(), String> {
    let mut set = tokio::task::JoinSet::new();
    let mut start = 0;
    while start < n || !set.is_empty() {
        while start < n && set.len() < 8 {
            let ops: Vec<TxnOp> = (start..(start + BATCH).min(n))
                .map(|i| {
                    TxnOp::put(
                        format!("{dir}svc{}/{:016x}", i % 100, i),
                        value(i),
                        Some(PutOptions::new().with_lease(lease)),
                    )
                })
                .collect();
            start += BATCH;
            let mut c = client.clone();
            set.spawn(async move {
                timeout(CALL, c.txn(Txn::new().and_then(ops)))
                    .await
                    .map_err(|_| "foreign txn timed out".to_string())?
                    .map(|_| ())
                    .map_err(|e| format!("foreign txn: {e}"))
            });
        }
        if let Some(r) = set.join_next().await {
            r.map_err(|e| e.to_string())??;
        }
    }
    Ok(())
}

/// `rate` puts per second of new keys on `lease`, each deleted a second
/// later: registrations and removals of other instances. Each registration
/// is its own task (an etcd write waits for a disk sync, so one at a time
/// would fall behind the rate); at most `MAX_CHURN_IN_FLIGHT` run at once,
/// a tick that finds none free is skipped (the achieved rate is in each
/// window's `loadgen_puts_per_s`). Runs until aborted; the tasks end with it.
async fn churn_foreign(client: Client, dir: String, lease: i64, rate: u32, own: Arc<Own>) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let gate = Arc::new(tokio::sync::Semaphore::new(MAX_CHURN_IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    let mut i: u64 = 0;
    loop {
        tick.tick().await;
        while tasks.try_join_next().is_some() {}
        let Ok(permit) = gate.clone().try_acquire_owned() else {
            continue;
        };
        let mut c = client.clone();
        let key = format!("{dir}{i:016x}");
        let v = value(i as usize);
        let own = own.clone();
        tasks.spawn(async move {
            let _permit = permit;
            // Counted as sent, before etcd can count it: see `window`.
            own.puts.fetch_add(1, Ordering::Relaxed);
            let put = c.put(key.clone(), v, Some(PutOptions::new().with_lease(lease)));
            if !matches!(timeout(CALL, put).await, Ok(Ok(_))) {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            own.deletes.fetch_add(1, Ordering::Relaxed);
            let _ = timeout(CALL, c.delete(key, None)).await;
        });
        i += 1;
    }
}

fn free_addr() -> Result<SocketAddr, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    l.local_addr().map_err(|e| e.to_string())
}

async fn healthy(addr: SocketAddr) -> bool {
    let ask = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await.ok()?;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).await.ok()?;
        Some(buf[..n].starts_with(b"HTTP/1.1 200") || buf[..n].starts_with(b"HTTP/1.0 200"))
    };
    timeout(Duration::from_secs(1), ask)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Starts instance `i` on a free port and registers its providers.
async fn start_instance(opts: &Opts, i: usize) -> Result<Instance, String> {
    let (program, args) = opts.spawn.split_first().ok_or("--spawn is empty")?;
    let mut last = String::new();
    for _ in 0..3 {
        let addr = free_addr()?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .arg("--listen-addr")
            .arg(addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: prctl is async-signal-safe; the child dies with us.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting {program}: {e}"))?;
        let deadline = Instant::now() + START_LIMIT;
        let mut up = false;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                last = format!("instance on {addr} exited: {status}");
                break;
            }
            if healthy(addr).await {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !up {
            let _ = child.kill();
            let _ = child.wait();
            if last.is_empty() {
                last = format!("instance on {addr} not healthy within {START_LIMIT:?}");
            }
            continue;
        }
        let target = Target { addr };
        let mut fleet = Fleet::new(&target, &format!("own{i}"), 64);
        fleet.spawn(opts.providers, false);
        let deadline = tokio::time::Instant::now() + RAMP_LIMIT;
        let t = Instant::now();
        let mut welcomed = 0;
        while welcomed < opts.providers {
            match tokio::time::timeout_at(deadline, fleet.ready.recv()).await {
                Ok(Some(r)) => {
                    r.result
                        .map_err(|e| format!("instance {i}: a provider failed: {e}"))?;
                    welcomed += 1;
                }
                Ok(None) => return Err("the provider fleet ended".into()),
                Err(_) => {
                    return Err(format!(
                        "instance {i}: only {welcomed} of {} registered in {RAMP_LIMIT:?}",
                        opts.providers
                    ))
                }
            }
        }
        eprintln!(
            "fleet: instance {i} (pid {}) on {addr}: {welcomed} providers in {:.1} s",
            child.id(),
            t.elapsed().as_secs_f64()
        );
        return Ok(Instance { child, addr, fleet });
    }
    Err(last)
}

async fn scrape(members: &[String]) -> Result<BTreeMap<String, f64>, String> {
    let mut sum = BTreeMap::new();
    for m in members {
        for (k, v) in etcd::metrics(m).await? {
            *sum.entry(k).or_insert(0.0) += v;
        }
    }
    Ok(sum)
}

/// One window: etcd's counters (all members), etcd's and the instances'
/// CPU, and the scenario's own requests meanwhile.
async fn window(
    opts: &Opts,
    instances: &[Instance],
    own: &Own,
) -> Result<serde_json::Value, String> {
    let pids: Vec<u32> = instances.iter().map(|i| i.child.id()).collect();
    let etcd0: Vec<_> = opts
        .etcd_pids
        .iter()
        .map(|&p| procfs::sample(p))
        .collect::<Result<_, _>>()?;
    let sky0: Vec<_> = pids
        .iter()
        .map(|&p| procfs::sample(p))
        .collect::<Result<_, _>>()?;
    // Our requests are counted as they are sent, and read right after
    // each scrape, so one in flight across a scrape lands in both counts
    // or in neither.
    let m0 = scrape(&opts.members).await?;
    let own0 = own.total();
    let puts0 = own.puts.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(opts.window).await;
    let m1 = scrape(&opts.members).await?;
    let own1 = own.total();
    let puts1 = own.puts.load(Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    let etcd1: Vec<_> = opts
        .etcd_pids
        .iter()
        .map(|&p| procfs::sample(p))
        .collect::<Result<_, _>>()?;
    let sky1: Vec<_> = pids
        .iter()
        .map(|&p| procfs::sample(p))
        .collect::<Result<_, _>>()?;
    let rates = etcd::rates(&m0, &m1, secs);
    let per_member: Vec<f64> = etcd0
        .iter()
        .zip(&etcd1)
        .map(|(a, b)| round3(procfs::cpu_percent(a, b)))
        .collect();
    let sky: Vec<f64> = sky0
        .iter()
        .zip(&sky1)
        .map(|(a, b)| round3(procfs::cpu_percent(a, b)))
        .collect();
    Ok(json!({
        "seconds": round3(secs),
        "etcd_sent_bytes_per_s": rates.get("sent_bytes").copied().unwrap_or(0.0),
        "etcd_received_per_s": rates.get("received/*").copied().unwrap_or(0.0),
        "etcd_handled_per_s": rates.get("handled/*").copied().unwrap_or(0.0),
        "etcd_watch_events_per_s": rates.get("watch_events").copied().unwrap_or(0.0),
        "etcd_watchers": m1.get("gauge/watchers").copied(),
        "loadgen_requests_per_s": round3((own1 - own0) as f64 / secs),
        "loadgen_puts_per_s": round3((puts1 - puts0) as f64 / secs),
        "etcd_cpu_percent": round3(per_member.iter().sum()),
        "etcd_cpu_percent_by_member": per_member,
        "skyapi_cpu_percent": sky,
        "etcd_rates_per_s": rates,
    }))
}
