//! Load generator for skyapi: thousands of websocket providers as tokio tasks
//! on a two-worker runtime (not one thread each), with etcd watches and
//! etcd's own counters as the measuring instruments. Prints one JSON object
//! on stdout per run; progress goes to stderr. `make bench` drives it.
//!
//! ```text
//! cargo run --release --example loadgen -- SCENARIO --skyapi 127.0.0.1:PORT \
//!     --etcd http://127.0.0.1:PORT [--pid SKYAPI_PID] [options]
//! ```
//!
//! Scenarios (each bounded in count and time; traffic only to the given
//! loopback addresses):
//! - `latency`: registration and removal latency over `--count` sequential
//!   providers, beside bare etcd put/get/delete of the same value;
//! - `idle`: RSS/threads/fds at 0 and each of `--steps` held providers, CPU
//!   and etcd request rates over `--window` seconds at `--windows-at`, then
//!   everyone closes at once;
//! - `storm`: `--count` providers connect at the same instant, then all
//!   close at once;
//! - `churn`: connect+welcome+close cycles at `--rate`/s for `--duration` s,
//!   then what skyapi kept (threads, fds, RSS, etcd keys);
//! - `restart`: `--count` reconnecting providers, skyapi stopped with
//!   `--signal` and started again with `--restart`: keys present at every
//!   moment, time to the new lease, etcd transactions.

// A crate root looks for modules beside itself, not in examples/loadgen/.
#[path = "loadgen/churn.rs"]
mod churn;
#[path = "loadgen/client.rs"]
mod client;
#[path = "loadgen/etcd.rs"]
mod etcd;
#[path = "loadgen/fleet.rs"]
mod fleet;
#[path = "loadgen/idle.rs"]
mod idle;
#[path = "loadgen/latency.rs"]
mod latency;
#[path = "loadgen/procfs.rs"]
mod procfs;
#[path = "loadgen/restart.rs"]
mod restart;
#[path = "loadgen/stats.rs"]
mod stats;
#[path = "loadgen/storm.rs"]
mod storm;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use client::Target;

const USAGE: &str = "\
usage: loadgen SCENARIO --skyapi ADDR --etcd URL [options]

scenarios and their options (defaults in brackets):
  latency  --count N [1000] --warmup N [20] --service S [lat]
  idle     --pid PID --steps N,N,.. [10,1000,2500,5000,7500,10000]
           --windows-at N,.. [10,10000] --window SECS [30] --settle SECS [2]
           --concurrency N [256] --service S [idle] [--etcd-pid PID]
  storm    --pid PID --count N [10000] --service S [storm]
  churn    --pid PID --rate N [1000] --duration SECS [60] --ports N [10000]
           --max-in-flight N [2000] --service S [churn]
  restart  --pid PID --count N [10000] --signal term|kill [term]
           --restart 'SKYAPI ARGS...' (split on spaces) --service S [restart]
common:
  --skyapi ADDR      skyapi's listen address (IP:PORT, loopback)
  --etcd URL         etcd client URL, http://127.0.0.1:PORT
  --key-dir PATH     [/skydns/local/skydns/services]: where skyapi puts keys
";

enum Scenario {
    Latency(latency::Opts),
    Idle(idle::Opts),
    Storm(storm::Opts),
    Churn(churn::Opts),
    Restart(restart::Opts),
}

struct Args {
    target: Target,
    etcd: String,
    scenario: Scenario,
}

fn list<T: FromStr>(s: &str) -> Result<Vec<T>, String> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.trim().parse().map_err(|_| format!("bad list item {p:?}")))
        .collect()
}

fn parse() -> Result<Args, String> {
    let mut a = pico_args::Arguments::from_env();
    if a.contains(["-h", "--help"]) {
        return Err(String::new());
    }
    let name = a
        .subcommand()
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    let e = |e: pico_args::Error| e.to_string();
    let addr: SocketAddr = a.value_from_str("--skyapi").map_err(e)?;
    if !addr.ip().is_loopback() {
        return Err("--skyapi must be a loopback address: this tool sends load".into());
    }
    let etcd: String = a.value_from_str("--etcd").map_err(e)?;
    let etcd_host = etcd
        .trim_start_matches("http://")
        .rsplit_once(':')
        .map(|(h, _)| h.to_string())
        .unwrap_or_default();
    if !(etcd_host == "127.0.0.1" || etcd_host == "localhost" || etcd_host == "[::1]") {
        return Err("--etcd must be http://127.0.0.1:PORT: this tool sends load".into());
    }
    let key_dir: String = a
        .opt_value_from_str("--key-dir")
        .map_err(e)?
        .unwrap_or_else(|| "/skydns/local/skydns/services".into());
    let service = |a: &mut pico_args::Arguments, d: &str| -> Result<String, String> {
        Ok(a.opt_value_from_str("--service")
            .map_err(e)?
            .unwrap_or_else(|| d.to_string()))
    };
    let num = |a: &mut pico_args::Arguments, flag: &'static str, d: u64| -> Result<u64, String> {
        Ok(a.opt_value_from_str(flag).map_err(e)?.unwrap_or(d))
    };
    let scenario = match name.as_str() {
        "latency" => Scenario::Latency(latency::Opts {
            count: num(&mut a, "--count", 1000)? as usize,
            warmup: num(&mut a, "--warmup", 20)? as usize,
            service: service(&mut a, "lat")?,
            key_dir,
        }),
        "idle" => Scenario::Idle(idle::Opts {
            pid: a.value_from_str("--pid").map_err(e)?,
            etcd_pid: a.opt_value_from_str("--etcd-pid").map_err(e)?,
            steps: match a.opt_value_from_str::<_, String>("--steps").map_err(e)? {
                Some(s) => list(&s)?,
                None => vec![10, 1000, 2500, 5000, 7500, 10000],
            },
            windows_at: match a
                .opt_value_from_str::<_, String>("--windows-at")
                .map_err(e)?
            {
                Some(s) => list(&s)?,
                None => vec![10, 10000],
            },
            window: Duration::from_secs(num(&mut a, "--window", 30)?),
            settle: Duration::from_secs(num(&mut a, "--settle", 2)?),
            concurrency: num(&mut a, "--concurrency", 256)? as usize,
            service: service(&mut a, "idle")?,
            key_dir,
        }),
        "storm" => Scenario::Storm(storm::Opts {
            pid: a.value_from_str("--pid").map_err(e)?,
            count: num(&mut a, "--count", 10000)? as usize,
            service: service(&mut a, "storm")?,
            key_dir,
        }),
        "churn" => Scenario::Churn(churn::Opts {
            pid: a.value_from_str("--pid").map_err(e)?,
            rate: num(&mut a, "--rate", 1000)?.clamp(1, 100_000) as u32,
            duration: Duration::from_secs(num(&mut a, "--duration", 60)?.min(3600)),
            ports: num(&mut a, "--ports", 10000)?.clamp(1, 65535) as u32,
            max_in_flight: num(&mut a, "--max-in-flight", 2000)?.max(1) as usize,
            service: service(&mut a, "churn")?,
            key_dir,
        }),
        "restart" => Scenario::Restart(restart::Opts {
            pid: a.value_from_str("--pid").map_err(e)?,
            count: num(&mut a, "--count", 10000)? as usize,
            signal: match a
                .opt_value_from_str::<_, String>("--signal")
                .map_err(e)?
                .as_deref()
            {
                None | Some("term") => libc::SIGTERM,
                Some("kill") => libc::SIGKILL,
                Some(other) => return Err(format!("--signal {other:?}: term or kill")),
            },
            restart: a
                .value_from_str::<_, String>("--restart")
                .map_err(e)?
                .split_whitespace()
                .map(str::to_string)
                .collect(),
            service: service(&mut a, "restart")?,
            key_dir,
        }),
        "" => return Err("no scenario given".into()),
        other => return Err(format!("unknown scenario {other:?}")),
    };
    let rest = a.finish();
    if !rest.is_empty() {
        return Err(format!("unexpected arguments: {rest:?}"));
    }
    Ok(Args {
        target: Target { addr },
        etcd,
        scenario,
    })
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("loadgen: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let limit = skyapi::server::raise_fd_limit().unwrap_or(0);
    eprintln!("loadgen: open-file limit {limit}");
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match &args.scenario {
            Scenario::Latency(o) => latency::run(&args.target, &args.etcd, o).await,
            Scenario::Idle(o) => idle::run(&args.target, &args.etcd, o).await,
            Scenario::Storm(o) => storm::run(&args.target, &args.etcd, o).await,
            Scenario::Churn(o) => churn::run(&args.target, &args.etcd, o).await,
            Scenario::Restart(o) => restart::run(&args.target, &args.etcd, o).await,
        }
    });
    // Tasks still parked (none in a clean run) must not hold the exit.
    rt.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(v) => {
            let mut v = v;
            v["loadgen"] = serde_json::json!({ "open_file_limit": limit, "runtime_workers": 2 });
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
