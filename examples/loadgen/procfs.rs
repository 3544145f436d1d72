//! What /proc says about a process (skyapi, etcd, or the load generator
//! itself) and about the kernel's TCP counters.
//!
//! RSS is `VmRSS` from /proc/PID/status (resident pages: heap, touched stack
//! pages, mapped binary); threads are the entries of /proc/PID/task; CPU is
//! utime+stime from /proc/PID/stat, in clock ticks.

use std::collections::BTreeMap;
use std::fs;
use std::time::Instant;

use serde_json::json;

/// One look at a process.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    pub rss_kib: u64,
    pub threads: u64,
    pub fds: u64,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
}

impl Sample {
    pub fn json(&self) -> serde_json::Value {
        json!({
            "rss_kib": self.rss_kib,
            "threads": self.threads,
            "fds": self.fds,
        })
    }
}

/// `pid` 0 means this process.
pub fn sample(pid: u32) -> Result<Sample, String> {
    let dir = if pid == 0 {
        "/proc/self".to_string()
    } else {
        format!("/proc/{pid}")
    };
    let at = Instant::now();
    let status =
        fs::read_to_string(format!("{dir}/status")).map_err(|e| format!("{dir}/status: {e}"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let rss_kib = field("VmRSS:");
    let threads = fs::read_dir(format!("{dir}/task"))
        .map(|d| d.count() as u64)
        .unwrap_or_else(|_| field("Threads:"));
    let fds = fs::read_dir(format!("{dir}/fd"))
        .map_err(|e| format!("{dir}/fd: {e}"))?
        .count() as u64;
    let stat = fs::read_to_string(format!("{dir}/stat")).map_err(|e| format!("{dir}/stat: {e}"))?;
    // Fields after the command name (which may hold spaces and parentheses):
    // state is field 3, utime 14 and stime 15, so they are the 12th and 13th
    // after the closing parenthesis.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let nums: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| nums.get(i).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
    let cpu_ticks = tick(11) + tick(12);
    Ok(Sample {
        at,
        rss_kib,
        threads,
        fds,
        cpu_ticks,
    })
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU used between two samples of one process, in percent of one core.
pub fn cpu_percent(a: &Sample, b: &Sample) -> f64 {
    let secs = b.at.duration_since(a.at).as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    (b.cpu_ticks.saturating_sub(a.cpu_ticks)) as f64 / clock_ticks() / secs * 100.0
}

/// The kernel's TCP listen-queue counters (machine-wide, from
/// /proc/net/netstat): a SYN or final ACK dropped because an accept queue
/// was full shows up here.
pub fn listen_counters() -> BTreeMap<String, u64> {
    let text = fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = BTreeMap::new();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        if !names.starts_with("TcpExt:") {
            continue;
        }
        for (n, v) in names
            .split_whitespace()
            .zip(values.split_whitespace())
            .skip(1)
        {
            if matches!(
                n,
                "ListenOverflows" | "ListenDrops" | "TCPReqQFullDrop" | "SyncookiesSent"
            ) {
                out.insert(n.to_string(), v.parse().unwrap_or(0));
            }
        }
    }
    out
}

/// `after - before`, counter by counter.
pub fn counter_delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v.saturating_sub(*before.get(k).unwrap_or(&0))))
        .collect()
}
