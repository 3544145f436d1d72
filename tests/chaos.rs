//! The chaos run (issue 11 part 3): the promise checked continuously under
//! a seeded, randomized fault schedule, against a real 3-member etcd
//! cluster and two real skyapi instances (A and B) with `--timeout` 4.
//!
//! Three lanes run the schedule ([`support::chaos::schedule`]) on their own
//! threads: etcd (members killed and restarted, sometimes two at once for
//! a few seconds), skyapi (one instance at a time partitioned from etcd by
//! a TCP proxy that stops forwarding without closing, SIGSTOPped beyond
//! `--timeout`, or restarted on the same port after SIGTERM or SIGKILL),
//! and clients (websocket providers connecting, closing cleanly, closing
//! abruptly with FIN or RST, going half-open, moving between instances;
//! `skyapi provide` sidecars started, SIGSTOPped, SIGCONTed, stopped). A
//! checker reads etcd every 100 ms and compares it with the live clients
//! ([`Ledger`]); every violation of the promise is recorded with its
//! duration. README "Chaos run" defines "live" and the bound per fault.
//!
//! `SKYAPI_CHAOS_SECONDS` (default 45) sets the length and
//! `SKYAPI_CHAOS_SEED` (default random) the seed; `make chaos` runs it for
//! `DURATION` (300) seconds. The last line printed is the summary
//! `chaos: seed S, D s, N faults, V violations, max absence A s, max
//! staleness B s`; the test fails if V > 0. The skyapi logs of a run are
//! kept under `target/tmp/chaos-<seed>/`.
//!
//! The other tests here check the checker and the schedule without
//! processes: a checker that cannot fail would prove nothing.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use support::chaos::*;
use support::faults::TcpProxy;
use support::*;

/// `--timeout` of both instances: short, so the run sees many cycles.
const TIMEOUT_SECS: u64 = 4;
/// How often the checker reads etcd.
const CHECK_EVERY: Duration = Duration::from_millis(100);
/// Where the entries live (default `--etcd-prefix`).
const ROOT: &str = "/skydns/";

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    if v.is_empty() {
        return None;
    }
    Some(
        v.parse()
            .unwrap_or_else(|e| panic!("{name}={v:?} is not a whole number: {e}")),
    )
}

/// The flags both instances run with (`--timeout` is [`TIMEOUT_SECS`]).
const SERVER_ARGS: [&str; 2] = ["--timeout", "4"];

/// Sleeps until `at` after `start` (at once if that has passed).
fn sleep_until(start: Instant, at: Duration) {
    let due = start + at;
    let now = Instant::now();
    if due > now {
        thread::sleep(due - now);
    }
}

/// What a lane prints as it goes: the offset and the step.
fn log_step(start: Instant, step: &Step) {
    println!(
        "chaos: +{:7.3} s (due +{:.3}) {:?}",
        start.elapsed().as_secs_f64(),
        step.at.as_secs_f64(),
        step.action
    );
}

/// The etcd lane: members killed and restarted.
fn etcd_lane(
    mut members: Vec<Etcd>,
    steps: Vec<Step>,
    ledger: SharedLedger,
    start: Instant,
) -> Vec<Etcd> {
    let bounds = lock(&ledger).bounds;
    for step in steps {
        sleep_until(start, step.at);
        log_step(start, &step);
        match step.action {
            Action::KillMember { member, down } => {
                let now = Instant::now();
                // "Written within 2 s of the cluster answering": the
                // cluster answers on. An election it needs shows up as a
                // new raft term in the checker's reads, or as reads the
                // checker gets no answer to.
                lock(&ledger).begin_excuse(Excuse {
                    what: format!("etcd member {member} killed"),
                    scope: Scope::Etcd,
                    start: now,
                    end: Some(now),
                    absence_after: Some(bounds.pending()),
                    registering_only: true,
                    stale_after: Some(bounds.pending()),
                    drops: false,
                });
                members[member].kill();
                thread::sleep(down);
                members[member].start();
            }
            Action::LoseQuorum {
                members: pair,
                down,
            } => {
                let h = lock(&ledger).begin_excuse(Excuse {
                    what: format!("etcd quorum lost (members {pair:?} killed)"),
                    scope: Scope::Etcd,
                    start: Instant::now(),
                    end: None,
                    absence_after: Some(bounds.pending()),
                    registering_only: true,
                    stale_after: Some(bounds.pending()),
                    drops: false,
                });
                for m in pair {
                    members[m].kill();
                }
                thread::sleep(down);
                // The first restarted member makes a quorum with the one left.
                for m in pair {
                    members[m].start();
                }
                lock(&ledger).end_excuse(h, Instant::now());
            }
            other => unreachable!("not an etcd action: {other:?}"),
        }
    }
    members
}

/// The two instances and how to restart them.
struct Instances {
    live: Vec<Skyapi>,
    /// Processes that were restarted, kept for their logs.
    retired: Vec<(usize, Skyapi)>,
    apis: Vec<String>,
    ports: Vec<u16>,
    proxies: Vec<Vec<TcpProxy>>,
}

/// The skyapi lane: partitions, stalls and restarts, one instance at a time.
fn skyapi_lane(
    mut inst: Instances,
    steps: Vec<Step>,
    ledger: SharedLedger,
    start: Instant,
) -> Instances {
    let bounds = lock(&ledger).bounds;
    for step in steps {
        sleep_until(start, step.at);
        log_step(start, &step);
        match step.action {
            Action::Partition { inst: i, length } => {
                let h = lock(&ledger).begin_excuse(Excuse {
                    what: format!("skyapi {} partitioned from etcd", name(i)),
                    scope: Scope::Instance(i),
                    start: Instant::now(),
                    end: None,
                    absence_after: Some(bounds.after_partition()),
                    registering_only: false,
                    stale_after: Some(bounds.pending_hung()),
                    drops: false,
                });
                inst.proxies[i].iter().for_each(TcpProxy::partition);
                thread::sleep(length);
                inst.proxies[i].iter().for_each(TcpProxy::heal);
                lock(&ledger).end_excuse(h, Instant::now());
            }
            Action::Stall { inst: i, length } => {
                // Issue 11: every client stays connected and registered;
                // the entries come back within T/3 + 2 s of resuming. A
                // client that died meanwhile can only be found silent by a
                // ping sent after resuming: T + 1 s from then.
                let h = lock(&ledger).begin_excuse(Excuse {
                    what: format!("skyapi {} stalled (SIGSTOP)", name(i)),
                    scope: Scope::Instance(i),
                    start: Instant::now(),
                    end: None,
                    absence_after: Some(bounds.lease_lost()),
                    registering_only: false,
                    stale_after: Some(bounds.stale()),
                    drops: false,
                });
                inst.live[i].signal(libc::SIGSTOP);
                thread::sleep(length);
                inst.live[i].signal(libc::SIGCONT);
                lock(&ledger).end_excuse(h, Instant::now());
            }
            Action::Restart {
                inst: i,
                kill,
                pause,
            } => {
                // Issue 9: the clients are closed (or cut) and reconnect;
                // their entries never leave (zero gap). Only the drops
                // themselves are excused.
                let sig = if kill { "SIGKILL" } else { "SIGTERM" };
                let h = lock(&ledger).begin_excuse(Excuse {
                    what: format!("skyapi {} restarted after {sig}", name(i)),
                    scope: Scope::Instance(i),
                    start: Instant::now(),
                    end: None,
                    absence_after: None,
                    registering_only: false,
                    stale_after: None,
                    drops: true,
                });
                let signalled = Instant::now();
                // Nobody deletes for the stopped process: its entries go
                // with its lease, within T.
                lock(&ledger).begin_excuse(Excuse {
                    what: format!("skyapi {} {sig}", name(i)),
                    scope: Scope::Instance(i),
                    start: signalled,
                    end: Some(signalled),
                    absence_after: None,
                    registering_only: false,
                    stale_after: Some(bounds.lease_expiry()),
                    drops: false,
                });
                let old = &mut inst.live[i];
                old.signal(if kill { libc::SIGKILL } else { libc::SIGTERM });
                let status = old.wait_exit(Duration::from_secs(10));
                if !kill {
                    let took = signalled.elapsed();
                    match status {
                        // README, Restarts and upgrades: "exits 0 within a second".
                        Some(s) if s.success() && took <= Duration::from_secs(1) => {}
                        other => lock(&ledger).bad_exit(
                            i,
                            signalled,
                            format!("SIGTERM: exit {other:?} after {:.1} s", took.as_secs_f64()),
                        ),
                    }
                }
                thread::sleep(pause);
                let new = Skyapi::server_on(&inst.apis[i], inst.ports[i], &SERVER_ARGS, false);
                let old = std::mem::replace(&mut inst.live[i], new);
                inst.retired.push((i, old));
                lock(&ledger).end_excuse(h, Instant::now());
            }
            other => unreachable!("not a skyapi action: {other:?}"),
        }
    }
    inst
}

/// Everything the clients lane started.
#[derive(Default)]
struct Clients {
    ws: BTreeMap<usize, (Sender<Cmd>, JoinHandle<()>)>,
    sidecars: BTreeMap<usize, Skyapi>,
    graveyard: Arc<Mutex<Vec<support::client::Ws>>>,
}

fn ws_label(n: usize) -> String {
    format!("ws{n}")
}

fn sidecar_label(n: usize) -> String {
    format!("sidecar{n}")
}

/// The clients lane: providers and sidecars come, go, freeze and move.
fn clients_lane(
    steps: Vec<Step>,
    servers: [SocketAddr; 2],
    seed: u64,
    ledger: SharedLedger,
    start: Instant,
) -> Clients {
    let bounds = lock(&ledger).bounds;
    let mut clients = Clients::default();
    let mut rng = Rng::new(seed ^ 0x5eed_c11e);
    for step in steps {
        sleep_until(start, step.at);
        if step.at > Duration::ZERO {
            log_step(start, &step);
        }
        let now = Instant::now();
        match step.action {
            Action::NewWs { client, inst } => {
                let label = ws_label(client);
                let port = 20000 + client as u16;
                let weight = 1 + (client % 100) as u16;
                lock(&ledger).add_client(
                    &label,
                    ClientKind::Ws,
                    port,
                    weight,
                    now,
                    bounds.pending(),
                );
                let (tx, rx) = mpsc::channel();
                let handle = WsClient {
                    label,
                    port,
                    weight,
                    servers,
                    first: inst,
                    ledger: ledger.clone(),
                    cmds: rx,
                    rng: rng.fork(),
                    graveyard: clients.graveyard.clone(),
                }
                .spawn();
                clients.ws.insert(client, (tx, handle));
            }
            Action::CloseWs { client, how } => {
                // Why ignored: a client thread only ends when told to.
                let _ = clients.ws[&client].0.send(Cmd::Close(how));
            }
            Action::MoveWs { client, to, how } => {
                // Why ignored: as above.
                let _ = clients.ws[&client].0.send(Cmd::Move { to, how });
            }
            Action::NewSidecar { sidecar, first } => {
                let port = 30000 + sidecar as u16;
                let weight = 200 + sidecar as u16;
                let list = format!("ws://{},ws://{}", servers[first], servers[1 - first]);
                lock(&ledger).add_client(
                    &sidecar_label(sidecar),
                    ClientKind::Sidecar,
                    port,
                    weight,
                    now,
                    bounds.sidecar_return(),
                );
                let p = Skyapi::provide(
                    &[
                        "--server",
                        &list,
                        "--service",
                        SERVICE,
                        "--port",
                        &port.to_string(),
                        "--weight",
                        &weight.to_string(),
                        "--interval",
                        "1",
                    ],
                    &[],
                );
                clients.sidecars.insert(sidecar, p);
            }
            Action::StopSidecar { sidecar } => {
                lock(&ledger).die(&sidecar_label(sidecar), now);
                clients.sidecars[&sidecar].signal(libc::SIGSTOP);
            }
            Action::ContSidecar { sidecar } => {
                clients.sidecars[&sidecar].signal(libc::SIGCONT);
                lock(&ledger).revive(
                    &sidecar_label(sidecar),
                    Instant::now(),
                    bounds.sidecar_return(),
                );
            }
            Action::TermSidecar { sidecar } => {
                lock(&ledger).die(&sidecar_label(sidecar), now);
                let p = clients.sidecars.get_mut(&sidecar).expect("sidecar");
                p.signal(libc::SIGTERM);
                p.wait_exit(Duration::from_secs(5));
            }
            other => unreachable!("not a client action: {other:?}"),
        }
    }
    clients
}

/// Writes each process's log under `dir`, so a failed run can be read.
fn keep_logs(dir: &std::path::Path, name: &str, p: &Skyapi) {
    // Why ignored: losing a log must not hide the run's result.
    let _ = std::fs::create_dir_all(dir);
    let _ = std::fs::write(dir.join(format!("{name}.log")), p.logs().join("\n"));
}

#[test]
fn random_faults_keep_the_promise() {
    assert_eq!(SERVER_ARGS[1], TIMEOUT_SECS.to_string());
    let seconds = env_u64("SKYAPI_CHAOS_SECONDS").unwrap_or(45);
    let seed = env_u64("SKYAPI_CHAOS_SEED").unwrap_or_else(random_seed);
    let _dog = watchdog(Duration::from_secs(seconds + 240));
    let timeout = Duration::from_secs(TIMEOUT_SECS);
    let bounds = Bounds { timeout };
    let steps = schedule(seed, Duration::from_secs(seconds), timeout);
    println!(
        "chaos: seed {seed} (replay: SKYAPI_CHAOS_SEED={seed} SKYAPI_CHAOS_SECONDS={seconds} \
         cargo test --test chaos, or make chaos SEED={seed} DURATION={seconds})"
    );
    println!(
        "chaos: --timeout {TIMEOUT_SECS}, {seconds} s, schedule of {} steps:",
        steps.len()
    );
    for s in &steps {
        println!("  {}", describe(s));
    }

    let members = Etcd::start_cluster(3);
    let etcd_ports: Vec<u16> = members.iter().map(Etcd::client_port).collect();
    // Each instance reaches each member through its own proxy, so one
    // instance can be cut off while the other still talks to etcd.
    let proxies: Vec<Vec<TcpProxy>> = (0..2)
        .map(|_| {
            etcd_ports
                .iter()
                .map(|&p| TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], p))))
                .collect()
        })
        .collect();
    let apis: Vec<String> = proxies
        .iter()
        .map(|ps| {
            ps.iter()
                .map(|p| format!("http://{}", p.addr()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let live: Vec<Skyapi> = apis
        .iter()
        .map(|api| Skyapi::server_on(api, free_port(), &SERVER_ARGS, true))
        .collect();
    let servers = [live[0].connect_addr(), live[1].connect_addr()];
    let ports = servers.iter().map(SocketAddr::port).collect();
    let instances = Instances {
        live,
        retired: Vec::new(),
        apis,
        ports,
        proxies,
    };

    let start = Instant::now();
    let ledger: SharedLedger = Arc::new(Mutex::new(Ledger::new(bounds, start)));
    let stop = Arc::new(AtomicBool::new(false));
    let checker = {
        let (ledger, stop) = (ledger.clone(), stop.clone());
        let mut reader = EtcdReader::new(etcd_ports.clone());
        // An election longer than this shows up as etcd not answering.
        reader.timeout = Duration::from_millis(500);
        thread::Builder::new()
            .name("chaos-checker".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match reader.read(ROOT) {
                        Ok((term, kvs)) => {
                            let mut l = lock(&ledger);
                            l.saw_term(t, term);
                            l.observe(t, &kvs);
                        }
                        Err(why) => lock(&ledger).unanswered(t, &why),
                    }
                    if let Some(left) = (t + CHECK_EVERY).checked_duration_since(Instant::now()) {
                        thread::sleep(left);
                    }
                }
            })
            .expect("spawn the checker")
    };
    let lane = |l: Lane| -> Vec<Step> {
        steps
            .iter()
            .filter(|s| s.action.lane() == l)
            .cloned()
            .collect()
    };
    let etcd = {
        let (steps, ledger) = (lane(Lane::Etcd), ledger.clone());
        thread::spawn(move || etcd_lane(members, steps, ledger, start))
    };
    let sky = {
        let (steps, ledger) = (lane(Lane::Skyapi), ledger.clone());
        thread::spawn(move || skyapi_lane(instances, steps, ledger, start))
    };
    let cl = {
        let (steps, ledger) = (lane(Lane::Clients), ledger.clone());
        thread::spawn(move || clients_lane(steps, servers, seed, ledger, start))
    };
    let members = etcd.join().expect("the etcd lane panicked");
    let instances = sky.join().expect("the skyapi lane panicked");
    let clients = cl.join().expect("the clients lane panicked");
    // The last faults' allowances run out, and the checker keeps watching.
    thread::sleep(bounds.stale().max(bounds.after_partition()) + Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    checker.join().expect("the checker panicked");
    let ran = start.elapsed();

    let logs = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos-{seed}"));
    for (n, (i, p)) in instances.retired.iter().enumerate() {
        keep_logs(&logs, &format!("{}-{n}", name(*i)), p);
    }
    for (i, p) in instances.live.iter().enumerate() {
        keep_logs(&logs, &format!("{}-last", name(i)), p);
    }
    for (n, p) in &clients.sidecars {
        keep_logs(&logs, &sidecar_label(*n), p);
    }

    let led = lock(&ledger);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for s in steps
        .iter()
        .filter(|s| s.at > Duration::ZERO && s.action.is_fault())
    {
        *counts.entry(s.action.kind()).or_default() += 1;
    }
    let faults: usize = counts.values().sum();
    println!("chaos: faults:");
    for (kind, n) in &counts {
        println!("  {kind}: {n}");
    }
    println!(
        "chaos: checker: {} snapshots, {} reads etcd did not answer; logs in {}",
        led.samples,
        led.failed_samples,
        logs.display()
    );
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for v in led.violations() {
        *by_kind.entry(format!("{:?}", v.kind)).or_default() += 1;
    }
    let violations = led.violations().len();
    if violations > 0 {
        println!("chaos: violations by kind: {by_kind:?}");
        print!("chaos: violations:\n{}", led.describe_violations());
    }
    let summary = format!(
        "chaos: seed {seed}, {} s, {faults} faults, {violations} violations, \
         max absence {:.1} s, max staleness {:.1} s",
        ran.as_secs(),
        led.max_absence.as_secs_f64(),
        led.max_staleness.as_secs_f64()
    );
    // Straight to fd 2, past libtest's capture, so `make test` shows the
    // seed and result of a passing run too.
    // Why ignored: without a stderr there is nowhere to report the failure.
    let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{summary}\n").as_bytes());
    drop(led);
    // Ended quietly (their logs are in files), so a failure's output ends
    // with the violations and the summary.
    drop(clients);
    drop(instances);
    drop(members);
    assert_eq!(violations, 0, "{summary}");
}

// ---------------------------------------------------------------------------
// The checker and the schedule, without processes

const T: Duration = Duration::from_secs(TIMEOUT_SECS);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn ledger_at(t0: Instant) -> Ledger {
    Ledger::new(Bounds { timeout: T }, t0)
}

/// What etcd holds when `ports` (websocket client numbers) have their
/// correct entries.
fn snapshot(clients: &[(u16, u16)]) -> Vec<(String, String)> {
    clients
        .iter()
        .map(|&(port, weight)| (key_of(port), value_of(port, weight, T).to_string()))
        .collect()
}

fn kinds(l: &Ledger) -> Vec<ViolationKind> {
    l.violations().iter().map(|v| v.kind).collect()
}

#[test]
fn checker_flags_a_live_client_absent_beyond_its_grace() {
    let t0 = Instant::now();
    let mut l = ledger_at(t0);
    l.add_client("ws0", ClientKind::Ws, 20000, 1, t0, Duration::from_secs(2));
    l.attach("ws0", 0, t0);
    l.observe(t0 + ms(500), &[]);
    l.observe(t0 + ms(1900), &[]);
    assert!(l.violations().is_empty(), "absent within its grace");
    l.observe(t0 + ms(2100), &[]);
    l.observe(t0 + ms(2200), &[]);
    assert_eq!(kinds(&l), [ViolationKind::Absent]);
    l.observe(t0 + ms(2300), &snapshot(&[(20000, 1)]));
    let v = &l.violations()[0];
    assert_eq!((v.samples, v.duration()), (2, ms(200)));
    // From the first observation without it to the first with it.
    assert_eq!(l.max_absence, ms(1800));
}

#[test]
fn checker_excuses_a_partition_until_its_allowance_ends() {
    let t0 = Instant::now();
    let mut l = ledger_at(t0);
    l.add_client("ws0", ClientKind::Ws, 20000, 1, t0, ms(0));
    l.attach("ws0", 1, t0);
    l.set_registered("ws0", true);
    l.add_client("ws1", ClientKind::Ws, 20001, 2, t0, ms(0));
    l.attach("ws1", 0, t0);
    l.set_registered("ws1", true);
    let h = l.begin_excuse(Excuse {
        what: "B partitioned".into(),
        scope: Scope::Instance(1),
        start: t0 + ms(1000),
        end: None,
        absence_after: Some(Bounds { timeout: T }.after_partition()),
        registering_only: false,
        stale_after: None,
        drops: false,
    });
    // ws0 (on B) may go missing; ws1 (on A) may not.
    l.observe(t0 + ms(5000), &snapshot(&[(20001, 2)]));
    assert!(l.violations().is_empty());
    l.end_excuse(h, t0 + ms(8000));
    // after_partition() with T = 4: max(4/3 + 2, 4) = 4 s.
    l.observe(t0 + ms(11_900), &snapshot(&[(20001, 2)]));
    assert!(l.violations().is_empty());
    l.observe(t0 + ms(12_100), &snapshot(&[]));
    assert_eq!(kinds(&l), [ViolationKind::Absent, ViolationKind::Absent]);
    assert_eq!(
        l.violations()
            .iter()
            .map(|v| v.client.as_str())
            .collect::<Vec<_>>(),
        ["ws0", "ws1"]
    );
}

#[test]
fn checker_etcd_trouble_excuses_only_clients_still_registering() {
    let t0 = Instant::now();
    let mut l = ledger_at(t0);
    l.add_client("ws0", ClientKind::Ws, 20000, 1, t0, ms(0));
    l.set_registered("ws0", true);
    l.add_client("ws1", ClientKind::Ws, 20001, 2, t0, ms(0));
    l.unanswered(t0 + ms(100), "test");
    l.observe(t0 + ms(3000), &[]);
    assert_eq!(
        kinds(&l),
        [ViolationKind::Absent],
        "{l:?}",
        l = l.violations()
    );
    assert_eq!(l.violations()[0].client, "ws0");
    // ws1 is due 2 s after etcd answered again (at 3 s).
    l.observe(t0 + ms(4900), &[]);
    assert_eq!(l.violations().len(), 1);
    l.observe(t0 + ms(5100), &[]);
    assert_eq!(l.violations().len(), 2);
}

#[test]
fn checker_flags_an_entry_outliving_its_client_by_more_than_timeout_plus_1s() {
    let t0 = Instant::now();
    let mut l = ledger_at(t0);
    l.add_client("ws0", ClientKind::Ws, 20000, 1, t0, ms(0));
    l.attach("ws0", 0, t0);
    l.observe(t0 + ms(100), &snapshot(&[(20000, 1)]));
    l.die("ws0", t0 + ms(1000));
    l.detach("ws0", 0, t0 + ms(1000));
    l.observe(t0 + ms(5900), &snapshot(&[(20000, 1)]));
    assert!(l.violations().is_empty());
    l.observe(t0 + ms(6100), &snapshot(&[(20000, 1)]));
    assert_eq!(kinds(&l), [ViolationKind::Stale]);
    assert_eq!(l.max_staleness, ms(5100));
}

#[test]
fn checker_a_stall_pushes_the_stale_bound_to_after_resuming() {
    let t0 = Instant::now();
    let mut l = ledger_at(t0);
    l.add_client("ws0", ClientKind::Ws, 20000, 1, t0, ms(0));
    l.attach("ws0", 0, t0);
    let h = l.begin_excuse(Excuse {
        what: "A stalled".into(),
        scope: Scope::Instance(0),
        start: t0 + ms(1000),
        end: None,
        absence_after: Some(Bounds { timeout: T }.lease_lost()),
        registering_only: false,
        stale_after: Some(Bounds { timeout: T }.stale()),
        drops: false,
    });
    // Half-open during the stall: A can only find out after resuming.
    l.die("ws0", t0 + ms(2000));
    l.end_excuse(h, t0 + ms(8000));
    l.observe(t0 + ms(12_900), &snapshot(&[(20000, 1)]));
    assert!(l.violations().is_empty());
    l.observe(t0 + ms(13_100), &snapshot(&[(20000, 1)]));
    assert_eq!(kinds(&l), [ViolationKind::Stale]);
}

#[test]
fn checker_an_election_renews_leases_so_stale_entries_may_stay_t_plus_2s_after_it() {
    let t0 = Instant::now();
    let mut l = ledger_at(t0);
    l.add_client("ws0", ClientKind::Ws, 20000, 1, t0, ms(0));
    l.saw_term(t0, 2);
    l.observe(t0, &snapshot(&[(20000, 1)]));
    l.die("ws0", t0 + ms(1000));
    l.saw_term(t0 + ms(3000), 3);
    // Died at 1 s: T + 1 s would end at 6 s; the election seen at 3 s
    // moves it to 3 + T + 2 = 9 s.
    l.observe(t0 + ms(8900), &snapshot(&[(20000, 1)]));
    assert!(l.violations().is_empty());
    l.observe(t0 + ms(9100), &snapshot(&[(20000, 1)]));
    assert_eq!(kinds(&l), [ViolationKind::Stale]);
    // A term that does not grow (another member answering) is no election.
    let mut l = ledger_at(t0);
    l.add_client("ws0", ClientKind::Ws, 20000, 1, t0, ms(0));
    l.saw_term(t0, 3);
    l.die("ws0", t0 + ms(1000));
    l.saw_term(t0 + ms(3000), 3);
    l.observe(t0 + ms(6100), &snapshot(&[(20000, 1)]));
    assert_eq!(kinds(&l), [ViolationKind::Stale]);
}

#[test]
fn checker_flags_drops_outside_a_restart_and_wrong_or_foreign_entries() {
    let t0 = Instant::now();
    let mut l = ledger_at(t0);
    l.add_client("ws0", ClientKind::Ws, 20000, 1, t0, ms(0));
    l.attach("ws0", 0, t0);
    let h = l.begin_excuse(Excuse {
        what: "A restarted".into(),
        scope: Scope::Instance(0),
        start: t0 + ms(1000),
        end: None,
        absence_after: None,
        registering_only: false,
        stale_after: None,
        drops: true,
    });
    l.dropped("ws0", 0, t0 + ms(1100), "close 1012");
    assert!(l.violations().is_empty());
    l.end_excuse(h, t0 + ms(2000));
    l.attach("ws0", 0, t0 + ms(2000));
    l.dropped("ws0", 0, t0 + ms(4000), "EOF");
    assert_eq!(kinds(&l), [ViolationKind::Dropped]);
    let mut kvs = snapshot(&[(20000, 7)]);
    kvs.push(("/skydns/local/skydns/services/chaos/x".into(), "{}".into()));
    l.observe(t0 + ms(4100), &kvs);
    let mut found = kinds(&l);
    found.sort();
    assert_eq!(
        found,
        [
            ViolationKind::Duplicate,
            ViolationKind::WrongValue,
            ViolationKind::Dropped
        ]
    );
}

#[test]
fn schedule_is_a_function_of_the_seed_and_keeps_its_limits() {
    let run = Duration::from_secs(300);
    let a = schedule(7, run, T);
    assert_eq!(a, schedule(7, run, T));
    assert_ne!(a, schedule(8, run, T));
    let mut instance_free_at = Duration::ZERO;
    let mut stopped: BTreeMap<usize, Duration> = BTreeMap::new();
    for s in &a {
        match &s.action {
            Action::LoseQuorum { members, down } => {
                assert_ne!(members[0], members[1]);
                assert!(*down <= Duration::from_secs(3), "{s:?}");
            }
            Action::Stall { length, .. } => assert!(*length > T, "{s:?}"),
            _ => {}
        }
        if s.action.lane() == Lane::Skyapi {
            assert!(
                s.at >= instance_free_at,
                "overlapping instance faults: {s:?}"
            );
            instance_free_at = s.at
                + match s.action {
                    Action::Partition { length, .. } | Action::Stall { length, .. } => length,
                    _ => Duration::ZERO,
                };
        }
        match s.action {
            Action::StopSidecar { sidecar } => assert!(stopped.insert(sidecar, s.at).is_none()),
            Action::ContSidecar { sidecar } => assert!(stopped.remove(&sidecar).is_some()),
            _ => {}
        }
    }
    assert!(stopped.is_empty(), "sidecars left stopped: {stopped:?}");
    for kind in ["etcd member killed", "skyapi stalled", "client moved"] {
        assert!(a.iter().any(|s| s.action.kind() == kind), "no {kind}");
    }
}

#[test]
fn base64_round_trip() {
    for s in ["", "/", "/skydns/", "/skydns0", "ab", "abc", "abcd"] {
        assert_eq!(
            support::etcd::base64_decode(&base64_encode(s.as_bytes())).as_deref(),
            Some(s.as_bytes())
        );
    }
    assert_eq!(base64_encode(b"/skydns/"), "L3NreWRucy8=");
}
