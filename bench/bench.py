#!/usr/bin/env python3
"""`make bench`: start a throwaway etcd and skyapi on free loopback ports, run
every scenario of examples/loadgen.rs against them, and write BENCHMARKS.md
(figures, goals, exact commands, machine) plus bench/results.json (every raw
figure) and bench/results.svg (RSS against connections, latency percentiles).

The measured skyapi is the shipped one, the static musl build (`--skyapi`);
the `--both` scenarios (latency, idle) run again with the glibc build
(`--skyapi-glibc`) right after, and the report says which binary each
figure is from.

Each scenario gets a fresh skyapi (SIGTERM between them: a restart-safe
stop, so its entries stay until its lease runs out; each scenario counts
only its own service), so one scenario's leftovers cannot skew the next;
etcd lives for the whole run. The fleet scenarios (`fleet`: one etcd,
`fleet_cluster`: three members) get etcds of their own, and the load
generator starts their skyapi instances. Every process started here is
stopped on the way out, Ctrl-C included. Traffic goes to 127.0.0.1 only,
and every loop is bounded.

Standard library only (Python 3.9+).
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "target", "bench")

# The original Go skyapi on this machine class (issue 4).
GO = {
    "rss_per_conn_kib": 54,
    "etcd_writes_per_s": "N/15 (0.67/s at 10, 667/s at 10,000)",
    "reg_p50_ms": 0.57,
    "reg_ratio": 1.11,
    "removal_p50_s": 12,
    "removal_p99_s": 22,
    "storm": "5,000 visible in 2 s",
    "idle_cpu": "10.7 % at 5,000",
    # It never revoked and re-set every entry with a TTL every timeout/2
    # (etcd v2): a restart left the entries until their TTL ran out, and a
    # returning client's next re-set refreshed it: no gap, but a client
    # that did not return stayed in DNS for up to the whole timeout.
    "restart": "no gap (entries outlive it by their TTL)",
}


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def free_port():
    """A port the kernel considers free right now (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=1.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (OSError, urllib.error.URLError):
        return None, ""


class Proc:
    """A child process in its own session, its output in a log file."""

    def __init__(self, name, argv):
        self.name = name
        self.argv = argv
        self.log_path = os.path.join(WORK, f"{name}.log")
        self.log = open(self.log_path, "ab")
        self.log.write(f"\n=== {time.strftime('%H:%M:%S')} {shlex.join(argv)}\n".encode())
        self.log.flush()
        self.p = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        self.pid = self.p.pid

    def alive(self):
        return self.p.poll() is None

    def stop(self, wait=5.0):
        """SIGTERM, then SIGKILL after `wait`; returns (exit code, seconds)."""
        if not self.alive():
            self.log.close()
            return self.p.returncode, 0.0
        t = time.monotonic()
        self.p.send_signal(signal.SIGTERM)
        try:
            code = self.p.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            self.p.kill()
            code = self.p.wait(timeout=5)
        self.log.close()
        return code, time.monotonic() - t


def wait_until(what, check, proc, limit):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.p.returncode}; see {proc.log_path}")
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready within {limit} s; see {proc.log_path}")


def start_etcd(name="etcd", members=1):
    """etcd (one member, or a cluster of `members`) on free ports, data under
    target/bench; retried if a port was taken between choosing and binding
    it. Returns the member processes and their client URLs."""
    for _ in range(3):
        ports = [(free_port(), free_port()) for _ in range(members)]
        names = [f"{name}{i}" if members > 1 else name for i in range(members)]
        cluster = ",".join(f"{n}=http://127.0.0.1:{peer}" for n, (_, peer) in zip(names, ports))
        procs, urls = [], []
        for n, (client, peer) in zip(names, ports):
            data = os.path.join(WORK, f"{n}-data")
            shutil.rmtree(data, ignore_errors=True)
            url = f"http://127.0.0.1:{client}"
            argv = [
                "etcd", "--name", n, "--data-dir", data,
                "--listen-client-urls", url, "--advertise-client-urls", url,
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", cluster, "--initial-cluster-state", "new",
            ]  # fmt: skip
            procs.append(Proc(n, argv))
            urls.append(url)
        try:
            for p, url in zip(procs, urls):
                wait_until(p.name, lambda: http_get(url + "/health")[0] == 200, p, 30)
            return procs, urls
        except RuntimeError as e:
            log(f"etcd did not start ({e}); retrying on other ports")
            for p in procs:
                p.stop()
    raise RuntimeError("etcd would not start")


def start_skyapi(binary, etcd_url, timeout, max_conn):
    for _ in range(3):
        port = free_port()
        argv = [
            binary, "--listen-addr", f"127.0.0.1:{port}", "--etcd-api", etcd_url,
            "--timeout", str(timeout), "--max-connections", str(max_conn), "--log-level", "warn",
        ]  # fmt: skip
        p = Proc("skyapi", argv)
        try:
            wait_until(
                "skyapi", lambda: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200, p, 20
            )
            return p, f"127.0.0.1:{port}"
        except RuntimeError as e:
            log(f"skyapi did not start ({e}); retrying on another port")
            p.stop()
    raise RuntimeError("skyapi would not start")


# Seconds after a skyapi start before a scenario begins (see above).
STARTUP_SETTLE = 6


def stop_pid(pid, wait=5.0):
    """SIGTERM to a process that is not our child (the restart scenario's
    restarted skyapi), then SIGKILL if it is still there after `wait`."""
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def proc_sample(pid):
    with open(f"/proc/{pid}/status") as f:
        status = f.read()
    rss = next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmRSS:"))
    return {
        "rss_kib": rss,
        "threads": len(os.listdir(f"/proc/{pid}/task")),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def machine_jiffies():
    """Clock ticks of the whole machine (all cores) from /proc/stat: (time
    in processes: user, nice, system, steal; time in interrupts: irq and
    softirq, which is where loopback TCP is mostly processed and which no
    process is charged for)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]] + [0] * 8
    user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
    return user + nice + system + steal, irq + softirq


def proc_jiffies(pid):
    """utime + stime of one process, in clock ticks; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return int(rest[11]) + int(rest[12])
    except (OSError, IndexError, ValueError):
        return 0


def children_jiffies():
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r.ru_utime + r.ru_stime) * os.sysconf("SC_CLK_TCK")


class CpuShare:
    """CPU used between start() and stop(), in % of one core: the whole
    machine, our processes (by pid), the load generator (a waited child),
    and everything else (other users of this machine)."""

    def __init__(self, pids):
        self.pids = pids
        self.t = time.monotonic()
        self.m = machine_jiffies()
        self.p = {k: proc_jiffies(v) for k, v in pids.items()}
        self.c = children_jiffies()

    def stop(self):
        hz = os.sysconf("SC_CLK_TCK")
        secs = max(time.monotonic() - self.t, 1e-6)
        pct = lambda j: round(j / hz / secs * 100, 1)
        procs, irq = machine_jiffies()
        out = {
            "seconds": round(secs, 1),
            "machine": pct(procs - self.m[0] + irq - self.m[1]),
            "interrupts": pct(irq - self.m[1]),
        }
        ours = 0
        for k, pid in self.pids.items():
            d = proc_jiffies(pid) - self.p[k]
            ours += d
            out[k] = pct(d)
        d = children_jiffies() - self.c
        out["loadgen"] = pct(d)
        ours += d
        out["others"] = round(max(pct(procs - self.m[0]) - pct(ours), 0.0), 1)
        return out


def wait_quiet(pids, limit=30.0, threshold=25.0):
    """Waits (at most `limit` s) until processes other than ours use less
    than `threshold` % of one core over 2 s: other work on a shared machine
    skews latencies. Returns the last reading."""
    deadline = time.monotonic() + limit
    while True:
        c = CpuShare(pids)
        time.sleep(2)
        r = c.stop()
        if r["others"] < threshold or time.monotonic() >= deadline:
            if r["others"] >= threshold:
                log(f"other processes still use {r['others']} % of a core; going on")
            return r
        log(f"waiting for a quieter machine: other processes use {r['others']} % of a core")


def run_loadgen(binary, argv, limit):
    """Runs one scenario; its JSON (stdout) parsed, its progress passed on."""
    cmd = [binary] + argv
    log("running " + shlex.join(cmd))
    t = time.monotonic()
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        return cmd, {"error": f"loadgen did not finish within {limit} s"}
    took = time.monotonic() - t
    if out.returncode != 0:
        return cmd, {"error": f"loadgen exited {out.returncode}", "seconds": round(took, 1)}
    try:
        res = json.loads(out.stdout)
    except json.JSONDecodeError as e:
        return cmd, {"error": f"loadgen printed no JSON: {e}"}
    res["wall_s"] = round(took, 1)
    return cmd, res


def skyapi_metrics(addr):
    """skyapi's own counters (its /metrics): etcd requests by op and outcome,
    mean etcd request duration by op, registrations and removals."""
    status, text = http_get(f"http://{addr}/metrics", timeout=5)
    if status != 200:
        return {}
    out, sums, counts = {}, {}, {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        try:
            v = float(value)
        except ValueError:
            continue
        if name.startswith("skyapi_etcd_request_duration_seconds_sum"):
            sums[name.split('op="')[1].split('"')[0]] = v
        elif name.startswith("skyapi_etcd_request_duration_seconds_count"):
            counts[name.split('op="')[1].split('"')[0]] = v
        elif v and name.startswith(("skyapi_etcd_requests_total", "skyapi_registrations_total",
                                    "skyapi_removals_total")):
            out[name] = v
    for op, c in counts.items():
        if c:
            out[f"etcd_{op}_mean_ms"] = round(sums.get(op, 0) / c * 1000, 3)
    return out


def sh(argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def machine():
    model = "?"
    mem = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
        with open("/proc/meminfo") as f:
            kib = int(next(l.split()[1] for l in f if l.startswith("MemTotal:")))
            mem = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    commit = sh(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    dirty = sh(["git", "-C", ROOT, "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"])
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory": mem,
        "kernel": platform.release(),
        "rustc": sh(["rustc", "--version"]),
        "etcd": sh(["etcd", "--version"]).splitlines()[0] if sh(["etcd", "--version"]) else "?",
        "commit": commit + (" (src modified)" if dirty else ""),
        "loadavg_at_start": open("/proc/loadavg").read().split()[:3],
        "nofile_hard": sh(["bash", "-c", "ulimit -Hn"]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def describe_binary(path):
    """Size and kind of a measured binary (`file`'s verdict: static or not)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        size = None
    kind = sh(["file", "-b", path])
    return {
        "path": os.path.relpath(path, ROOT),
        "size_mib": round(size / 1048576, 1) if size else None,
        "static": "static" in kind,
        "file": kind.split(", BuildID")[0] + (", not stripped" if "not stripped" in kind else ", stripped"),
    }


def run_fleet(name, args, commands):
    """The fleet scenario on a fresh etcd of its own (one member for
    `fleet`, three for `fleet_cluster`), so the foreign entries never reach
    the other scenarios' etcd. The load generator starts the instances."""
    members = 3 if name == "fleet_cluster" else 1
    etcds = []
    try:
        etcds, urls = start_etcd(name, members)
        log(f"{name}: etcd {','.join(urls)} (pids {' '.join(str(p.pid) for p in etcds)})")
        spawn = [
            args.skyapi, "--etcd-api", ",".join(urls), "--timeout", str(args.timeout),
            "--max-connections", str(2 * args.fleet_providers + 100), "--log-level", "warn",
        ]  # fmt: skip
        argv = ["fleet", "--etcd", urls[0], "--etcd-members", ",".join(urls),
                "--etcd-pids", ",".join(str(p.pid) for p in etcds),
                "--spawn", " ".join(spawn), "--instances", args.fleet_instances,
                "--providers", str(args.fleet_providers), "--foreign", str(args.fleet_foreign),
                "--churn-rate", str(args.fleet_churn_rate), "--window", str(args.fleet_window)]
        ks = [int(k) for k in args.fleet_instances.split(",") if k]
        # Two windows per K (and K = 0), ramps, the foreign write.
        limit = (len(ks) + 1) * 2 * (args.fleet_window + 10) + 60 * len(ks) + 300
        pids = {f"etcd{i}": p.pid for i, p in enumerate(etcds)}
        quiet = wait_quiet(pids, args.quiet_limit)
        share = CpuShare(pids)
        cmd, res = run_loadgen(args.loadgen, argv, limit)
        res["cpu_share"] = share.stop()
        c = res["cpu_share"]
        c["etcd"] = round(sum(c.pop(k) for k in list(c) if k.startswith("etcd")), 1)
        res["quiet_before"] = quiet
        res["binary"] = "musl"
        commands[name] = shlex.join(["target/release/examples/loadgen"] + cmd[1:]).replace(ROOT + "/", "")
        for i, p in enumerate(etcds):
            commands[f"{name} etcd {i}"] = shlex.join(p.argv)
        return res
    except RuntimeError as e:
        return {"error": str(e)}
    finally:
        for p in etcds:
            p.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skyapi", default=os.path.join(ROOT, "target/x86_64-unknown-linux-musl/release/skyapi"),
                    help="the binary measured in every scenario: the shipped static musl build (make static)")
    ap.add_argument("--skyapi-glibc", default=os.path.join(ROOT, "target/release/skyapi"),
                    help="the glibc build, measured beside it in the --both scenarios ('' to skip)")
    ap.add_argument("--both", default="latency,idle",
                    help="scenarios also run with --skyapi-glibc")
    ap.add_argument("--loadgen", default=os.path.join(ROOT, "target/release/examples/loadgen"))
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    ap.add_argument("--json", default=os.path.join(ROOT, "bench/results.json"))
    ap.add_argument("--svg", default=os.path.join(ROOT, "bench/results.svg"))
    ap.add_argument("--notes", default=os.path.join(ROOT, "bench/NOTES.md"))
    ap.add_argument("--only", default="latency,idle,storm,churn,restart,restart_kill,fleet,fleet_cluster")
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--timeout", type=int, default=30, help="skyapi --timeout (and the window)")
    ap.add_argument("--window", type=int, default=30)
    ap.add_argument("--latency-count", type=int, default=1000)
    ap.add_argument("--churn-rate", type=int, default=1000)
    ap.add_argument("--churn-seconds", type=int, default=60)
    ap.add_argument("--fleet-instances", default="1,2,4,8")
    ap.add_argument("--fleet-providers", type=int, default=1000, help="idle providers per instance")
    ap.add_argument("--fleet-foreign", type=int, default=100000)
    ap.add_argument("--fleet-churn-rate", type=int, default=100)
    ap.add_argument("--fleet-window", type=int, default=20,
                    help="seconds; a multiple of timeout/3, so each window holds whole reconcile periods")
    ap.add_argument("--quiet-limit", type=float, default=30.0,
                    help="how long each scenario waits at most for other processes to quieten")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite the report from --json (e.g. after editing bench/NOTES.md); run nothing")
    args = ap.parse_args()
    if args.render_only:
        with open(args.json) as f:
            write_reports(json.load(f), args)
        return

    # SIGTERM (e.g. from a CI timeout) unwinds like Ctrl-C, through `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.makedirs(WORK, exist_ok=True)
    for b in (args.skyapi, args.loadgen) + ((args.skyapi_glibc,) if args.skyapi_glibc else ()):
        if not os.access(b, os.X_OK):
            sys.exit(f"bench: {b} is missing: build with `make static`, `cargo build --release` and "
                     "`cargo build --release --example loadgen` (make bench does)")

    n = args.connections
    binaries = {"musl": args.skyapi}
    if args.skyapi_glibc:
        binaries["glibc"] = args.skyapi_glibc
    results = {"machine": machine(), "params": vars(args), "scenarios": {}, "glibc": {},
               "commands": {}, "binaries": {k: describe_binary(v) for k, v in binaries.items()}}
    scenarios = [s for s in args.only.split(",") if s]
    both = set(x for x in args.both.split(",") if x)
    # The glibc runs go right after their musl twin, so both see the same machine.
    runs = [r for name in scenarios for r in [(name, "musl")] + ([(name, "glibc")] if name in both and "glibc" in binaries else [])]
    procs = []
    started = time.monotonic()
    try:
        etcds, urls = start_etcd()
        etcd, etcd_url = etcds[0], urls[0]
        procs.append(etcd)
        results["commands"]["etcd"] = shlex.join(etcd.argv)
        log(f"etcd {etcd_url} (pid {etcd.pid})")
        for name, build in runs:
            if name in ("fleet", "fleet_cluster"):
                res = run_fleet(name, args, results["commands"])
                results["scenarios"][name] = res
                if "error" in res:
                    log(f"{name}: {res['error']}")
                continue
            binary = binaries[build]
            sky, addr = start_skyapi(binary, etcd_url, args.timeout, 2 * n)
            procs.append(sky)
            results["commands"]["skyapi" if build == "musl" else "skyapi (glibc)"] = shlex.join(sky.argv)
            # Past skyapi's start-up gathering (worker.rs STARTUP_GATHER, 5 s:
            # a restart's returning registrations are written in windows of
            # up to 200 ms, a lone one after 25 ms), so every scenario sees
            # the steady state; the restart scenarios measure the gathering.
            time.sleep(STARTUP_SETTLE)
            fresh = proc_sample(sky.pid)
            log(f"{name} ({build}): skyapi {addr} (pid {sky.pid}) fresh: {fresh}")
            common = ["--skyapi", addr, "--etcd", etcd_url]
            if name == "latency":
                argv = ["latency"] + common + ["--count", str(args.latency_count)]
                limit = 120 + args.latency_count // 50
            elif name == "idle":
                steps = sorted({10, n // 10, n // 4, n // 2, 3 * n // 4, n} - {0})
                argv = ["idle"] + common + [
                    "--pid", str(sky.pid), "--etcd-pid", str(etcd.pid),
                    "--steps", ",".join(map(str, steps)),
                    "--windows-at", f"10,{n}", "--window", str(args.window),
                ]  # fmt: skip
                limit = 2 * args.window + 300
            elif name == "storm":
                argv = ["storm"] + common + ["--pid", str(sky.pid), "--count", str(n)]
                limit = 180
            elif name == "churn":
                argv = ["churn"] + common + [
                    "--pid", str(sky.pid), "--rate", str(args.churn_rate),
                    "--duration", str(args.churn_seconds),
                ]  # fmt: skip
                limit = args.churn_seconds + 120
            elif name in ("restart", "restart_kill"):
                argv = ["restart"] + common + [
                    "--pid", str(sky.pid), "--count", str(n),
                    "--signal", "kill" if name == "restart_kill" else "term",
                    "--restart", " ".join(sky.argv),
                ]  # fmt: skip
                limit = 240
            else:
                sys.exit(f"bench: unknown scenario {name}")
            pids = {"skyapi": sky.pid, "etcd": etcd.pid}
            quiet = wait_quiet(pids, args.quiet_limit)
            share = CpuShare(pids)
            cmd, res = run_loadgen(args.loadgen, argv, limit)
            res["cpu_share"] = share.stop()
            res["quiet_before"] = quiet
            res["skyapi_fresh"] = fresh
            res["binary"] = build
            # After a restart scenario this is the restarted instance, on
            # the same address: its counters are the takeover's.
            res["skyapi_metrics"] = skyapi_metrics(addr)
            res["skyapi_alive_after"] = sky.alive()
            code, took = sky.stop()
            procs.remove(sky)
            res["skyapi_sigterm"] = {"exit": code, "seconds": round(took, 2)}
            if res.get("restarted_pid"):
                stop_pid(res["restarted_pid"])
            if build == "musl":
                results["scenarios"][name] = res
                results["commands"][name] = shlex.join(["target/release/examples/loadgen"] + cmd[1:])
            else:
                results["glibc"][name] = res
            if "error" in res:
                log(f"{name} ({build}): {res['error']}")
    finally:
        for p in reversed(procs):
            p.stop()
    results["total_s"] = round(time.monotonic() - started, 1)
    results["machine"]["loadavg_at_end"] = open("/proc/loadavg").read().split()[:3]

    with open(args.json, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
        f.write("\n")
    write_reports(results, args)
    failed = [k for k, v in results["scenarios"].items() if "error" in v]
    failed += [k + " (glibc)" for k, v in results["glibc"].items() if "error" in v]
    if failed:
        log("scenarios that failed: " + ", ".join(failed))
        sys.exit(1)


def write_reports(results, args):
    svg = render_svg(results)
    if svg:
        with open(args.svg, "w") as f:
            f.write(svg)
    notes = ""
    if os.path.exists(args.notes):
        with open(args.notes) as f:
            notes = f.read()
    with open(args.out, "w") as f:
        svg_rel = os.path.relpath(args.svg, os.path.dirname(os.path.abspath(args.out))) if svg else ""
        f.write(render_md(results, notes, svg_rel))
    log(f"wrote {args.out} and {args.svg} from a run of {results['total_s']} s ({args.json})")


# ---------------------------------------------------------------- report


def g(d, *path, default=None):
    """d[path[0]][path[1]]..., or `default` when any step is missing."""
    for p in path:
        if not isinstance(d, (dict, list)):
            return default
        try:
            d = d[p]
        except (KeyError, IndexError, TypeError):
            return default
    return default if d is None else d


def fmt(x, unit="", nd=2):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        s = f"{x:,.{nd}f}"
    else:
        s = f"{x:,}"
    return s + unit


def verdict(ok):
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def render_md(r, notes, svg_rel):
    m = r["machine"]
    p = r["params"]
    s = r["scenarios"]
    n = p["connections"]
    lat, idle, storm, churn = (s.get(k, {}) for k in ("latency", "idle", "storm", "churn"))
    restarts = [(k, s[k]) for k in ("restart", "restart_kill") if k in s]
    rows = []

    # Held connections.
    per_conn = g(idle, "rss_per_connection_kib")
    top = next((x for x in reversed(g(idle, "steps", default=[])) if x.get("connections") == n), {})
    rows.append((
        f"RSS per idle connection (0 → {n:,})",
        "≤ 32 KiB",
        f"{GO['rss_per_conn_kib']} KiB",
        fmt(per_conn, " KiB", 1),
        verdict(None if per_conn is None else per_conn <= 32),
    ))
    # etcd load.
    win = {w["connections"]: w for w in g(idle, "windows", default=[])}
    w10, wn = win.get(10, {}), win.get(n, {})
    r10 = g(w10, "etcd_rates_per_s", "received/*")
    rn = g(wn, "etcd_rates_per_s", "received/*")
    same = None
    if r10 is not None and rn is not None:
        # Within two requests over the window: the counters are sampled at
        # arbitrary phases of the TTL/3 period.
        same = abs(rn - r10) <= 2.0 / p["window"] + 1e-9
    rows.append((
        f"etcd requests/s from one instance, 10 vs {n:,} connections",
        "the same",
        GO["etcd_writes_per_s"],
        f"{fmt(r10, '/s', 3)} vs {fmt(rn, '/s', 3)}",
        verdict(same),
    ))
    # Registration.
    reg = g(lat, "sky_registered", "p50_ms")
    put = g(lat, "bare_put", "p50_ms")
    ratio = g(lat, "ratio_p50_registered_vs_put")
    rows.append((
        "registration p50 from the upgrade request → welcome, vs bare etcd put p50",
        "≤ 1.5×",
        f"{GO['reg_p50_ms']} ms, {GO['reg_ratio']}×",
        f"{fmt(reg, ' ms', 3)} vs {fmt(put, ' ms', 3)}: {fmt(ratio, '×')}",
        verdict(None if ratio is None else ratio <= 1.5),
    ))
    after = g(lat, "sky_registered_after_upgrade", "p50_ms")
    ratio_after = g(lat, "ratio_p50_registered_after_upgrade_vs_put")
    rows.append((
        "registration p50 from the 101 answer (upgrade done) → welcome, vs bare put p50",
        "≤ 1.5×",
        "",
        f"{fmt(after, ' ms', 3)} vs {fmt(put, ' ms', 3)}: {fmt(ratio_after, '×')}",
        verdict(None if ratio_after is None else ratio_after <= 1.5),
    ))
    rem99 = g(lat, "sky_removed_watch", "p99_ms")
    rows.append((
        "removal p50 / p99 (close frame → delete event)",
        "p99 ≤ 100 ms",
        f"{GO['removal_p50_s']} s / {GO['removal_p99_s']} s",
        f"{fmt(g(lat, 'sky_removed_watch', 'p50_ms'), ' ms', 3)} / {fmt(rem99, ' ms', 3)}",
        verdict(None if rem99 is None else rem99 <= 100),
    ))
    up = g(storm, "connect", "count_reached_s")
    welcomed = g(storm, "connect", "welcomed")
    rows.append((
        f"storm: {n:,} connect at once, all keys in etcd",
        "≤ 3 s",
        GO["storm"],
        f"{fmt(up, ' s', 2)} ({fmt(welcomed)} welcomed)",
        verdict(None if not storm else (up is not None and up <= 3)),
    ))
    down = g(storm, "disconnect", "count_zero_s")
    rows.append((
        f"storm: {n:,} disconnect at once, all keys gone",
        "≤ 3 s",
        "12–22 s (lease-driven)",
        f"{fmt(down, ' s', 2)} ({fmt(g(storm, 'disconnect', 'keys_left'))} keys left)",
        verdict(None if not storm else (down is not None and down <= 3)),
    ))
    cb, ca = g(churn, "before", default={}), g(churn, "after", default={})
    leftover = None
    if churn and "error" not in churn:
        leftover = (
            ca.get("threads", 1 << 30) <= cb.get("threads", 0)
            and ca.get("fds", 1 << 30) <= cb.get("fds", 0)
            and g(churn, "keys_after") == 0
            and ca.get("rss_kib", 1 << 30) - cb.get("rss_kib", 0) <= 2048
        )
    rows.append((
        f"churn {p['churn_rate']:,}/s × {p['churn_seconds']} s: left behind",
        "nothing",
        "heap never returned",
        f"threads {fmt(cb.get('threads'))}→{fmt(ca.get('threads'))}, fds {fmt(cb.get('fds'))}→{fmt(ca.get('fds'))}, "
        f"RSS {fmt(cb.get('rss_kib'))}→{fmt(ca.get('rss_kib'))} KiB, keys {fmt(g(churn, 'keys_after'))}; "
        f"{fmt(g(churn, 'ok'))}/{fmt(g(churn, 'cycles'))} cycles ok",
        verdict(leftover),
    ))
    for k, rs in restarts:
        minp = g(rs, "min_keys_present")
        rows.append((
            f"{'SIGKILL' if k == 'restart_kill' else 'SIGTERM'} and restart with {n:,} "
            "reconnecting providers: fewest keys in etcd",
            f"all {n:,} (zero gap)",
            GO["restart"],
            f"{fmt(minp)}; all on the new lease after {fmt(g(rs, 'all_on_new_lease_s'), ' s', 2)}",
            verdict(None if not rs or "error" in rs else minp == n),
        ))
    rows.append((
        f"idle CPU at {n:,} connections (% of one core)",
        "report",
        GO["idle_cpu"],
        fmt(g(wn, "skyapi_cpu_percent"), " %"),
        "—",
    ))

    out = []
    w = out.append
    w("# Benchmarks\n")
    w("Generated by `make bench` (bench/bench.py driving `examples/loadgen.rs`) on "
      f"{m['date']}, commit {m['commit']}; the whole run took {r.get('total_s')} s. "
      "Raw figures: [bench/results.json](bench/results.json). "
      "Hand-written analysis: the last section.\n")
    bins = r.get("binaries", {})
    if bins:
        mb = bins.get("musl", {})
        w(f"**Which binary.** Every figure below is from the shipped binary, the static musl build "
          f"(`make static`: `{mb.get('path')}`, {fmt(mb.get('size_mib'), ' MiB', 1)}, {mb.get('file')}), "
          "except the glibc columns of \"musl and glibc builds\", which are from `cargo build --release` "
          f"(`{g(bins, 'glibc', 'path')}`).\n")
    w("## Machine\n")
    w("| | |\n|---|---|")
    w(f"| CPU | {m['nproc']} × {m['cpu']} |")
    w(f"| memory | {m['memory']} |")
    w(f"| kernel | {m['kernel']} |")
    w(f"| rustc | {m['rustc']} |")
    w(f"| etcd | {m['etcd']} (one member, data on local disk; the fleet_cluster scenario: three members "
      "on this same machine and disk) |")
    w(f"| open files (hard limit) | {m['nofile_hard']} |")
    w(f"| load average at start | {' '.join(m['loadavg_at_start'])} |")
    w("")
    w("The load generator (a tokio runtime with 2 workers), skyapi and etcd share "
      f"the {m['nproc']} cores; nothing is pinned. Latencies therefore include "
      "scheduling among the three processes, and the load generator's own CPU is "
      "reported beside skyapi's.\n")
    w("CPU used while each scenario ran, in % of one core (the machine has "
      f"{m['nproc']} cores, so at most {100 * (m['nproc'] or 1)} %). *others* are processes "
      "outside this benchmark (the machine is shared with builds and tests); they make "
      f"latencies noisier, so each scenario first waits (at most {p.get('quiet_limit', 60):g} s) until they "
      f"use less than 25 % of a core. Load average at the end: {' '.join(m.get('loadavg_at_end', []))}.\n")
    w("| scenario | seconds | whole machine | skyapi | etcd | loadgen | interrupts (loopback TCP) | others |\n"
      "|---|---|---|---|---|---|---|---|")
    for k, v in list(s.items()) + [(k + " (glibc)", v) for k, v in r.get("glibc", {}).items()]:
        c = v.get("cpu_share", {})
        w(f"| {k} | {fmt(c.get('seconds'))} | {fmt(c.get('machine'))} | {fmt(c.get('skyapi'))} | "
          f"{fmt(c.get('etcd'))} | {fmt(c.get('loadgen'))} | {fmt(c.get('interrupts'))} | {fmt(c.get('others'))} |")
    w("")
    w("## Goals (issue 4)\n")
    w("| what | goal | original Go skyapi | skyapi (this run) | |\n|---|---|---|---|---|")
    for row in rows:
        w("| " + " | ".join(str(c) for c in row) + " |")
    w("")
    if svg_rel:
        w(f"![RSS against connections; latency percentiles]({svg_rel})\n")

    render_builds(r, w)
    render_fleet(r, w)

    # Details.
    w("## Held connections (musl)\n")
    steps = g(idle, "steps", default=[])
    if steps:
        w("| connections | keys in etcd | skyapi RSS KiB | threads | fds | ramp s |\n|---|---|---|---|---|---|")
        for x in steps:
            sk = x.get("skyapi", {})
            w(f"| {x['connections']:,} | {fmt(x.get('keys'))} | {fmt(sk.get('rss_kib'))} | "
              f"{fmt(sk.get('threads'))} | {fmt(sk.get('fds'))} | {fmt(x.get('ramp_s'))} |")
        ac = g(idle, "after_close", default={})
        w(f"| 0 (after all closed) | {fmt(g(idle, 'keys_left_after_close'))} | {fmt(ac.get('rss_kib'))} | "
          f"{fmt(ac.get('threads'))} | {fmt(ac.get('fds'))} | |")
        w("")
        w(f"RSS per connection = (RSS at {n:,} − RSS at 0) / {n:,} = **{fmt(per_conn, ' KiB', 1)}**. "
          f"A fresh skyapi (before any connection) had {fmt(g(idle, 'skyapi_fresh', 'rss_kib'))} KiB. "
          + (f"All {n:,} closing at once: keys gone after {fmt(g(idle, 'all_closed_keys_gone_s'), ' s', 3)}.\n"
             if g(idle, "all_closed_keys_gone_s") is not None else
             f"All {n:,} closing at once: **{fmt(g(idle, 'keys_left_after_close'))} keys were still in etcd "
             "20 s later** (see the analysis).\n"))
    elif idle:
        w(f"Failed: {idle.get('error')}\n")
    w("### Quiet windows: CPU and etcd requests\n")
    if win:
        w(f"Each window is {p['window']} s with skyapi at `--timeout {p['timeout']}` (one keepalive "
          f"and one reconcile range read every {p['timeout'] // 3} s expected), the providers idle "
          "but answering pings, and no etcd request from the load generator. "
          "`received` counts request messages (`grpc_server_msg_received_total`, which includes "
          "each keepalive on the long-lived LeaseKeepAlive stream); `handled` counts finished "
          "RPCs (`grpc_server_handled_total`, which never counts that stream while it stays open).\n")
        w("| connections | skyapi CPU % | etcd CPU % | loadgen CPU % | etcd requests/s (received) | "
          "handled/s | by method | etcd bytes sent/s |\n|---|---|---|---|---|---|---|---|")
        for c in sorted(win):
            x = win[c]
            rates = x.get("etcd_rates_per_s", {})
            by = ", ".join(f"{k.split('/')[1]} {v}" for k, v in rates.items()
                           if k.startswith("received/") and k != "received/*")
            w(f"| {c:,} | {fmt(x.get('skyapi_cpu_percent'))} | {fmt(x.get('etcd_cpu_percent'))} | "
              f"{fmt(x.get('loadgen_cpu_percent'))} | {fmt(rates.get('received/*'), '', 3)} | "
              f"{fmt(rates.get('handled/*'), '', 3)} | {by or '—'} | {fmt(rates.get('sent_bytes'), '', 0)} |")
        w("")
    w("## Registration and removal latency\n")
    if lat and "error" not in lat:
        w(f"{lat['rounds']:,} sequential rounds after {lat['warmup']} warm-up rounds, alternating a bare "
          "etcd round (etcd-client: `put` of the same "
          f"{lat['value_bytes']}-byte value with a lease, `get`, `delete`) and a skyapi round "
          "(websocket connect, upgrade, welcome, `get`, close). skyapi sends its welcome only after "
          "its etcd transaction succeeded, so the welcome means *readable*; the `get` after it "
          f"found the key in {lat['confirmed_present_after_welcome']:,}/{lat['rounds']:,} rounds, and "
          f"after the delete event the key was gone in {lat['confirmed_gone_after_delete_event']:,}/"
          f"{lat['rounds']:,}. Removal is timed from writing the close frame to the arrival of the "
          "delete event on an etcd watch opened before the run.\n")
        w("| interval | p50 ms | p90 ms | p99 ms | max ms |\n|---|---|---|---|---|")
        names = [
            ("bare_put", "bare etcd put"),
            ("bare_txn_put", "bare etcd put as a one-operation txn (skyapi's form)"),
            ("bare_put_get", "bare etcd put + get"),
            ("bare_put_watch", "bare etcd put → watch event"),
            ("sky_upgraded", "skyapi: upgrade request → 101"),
            ("sky_registered", "**skyapi: upgrade request → welcome (registered)**"),
            ("sky_registered_after_upgrade", "skyapi: 101 received → welcome"),
            ("sky_registered_from_connect", "skyapi: TCP connect → welcome"),
            ("sky_registered_get", "skyapi: upgrade request → welcome + get"),
            ("sky_registered_watch", "skyapi: upgrade request → watch put event"),
            ("bare_delete", "bare etcd delete"),
            ("bare_delete_watch", "bare etcd delete → watch event"),
            ("sky_removed_watch", "**skyapi: close frame → watch delete event (removed)**"),
            ("sky_close_answered", "skyapi: close frame → server's close frame"),
        ]
        for k, label in names:
            x = lat.get(k, {})
            w(f"| {label} | {fmt(x.get('p50_ms'), '', 3)} | {fmt(x.get('p90_ms'), '', 3)} | "
              f"{fmt(x.get('p99_ms'), '', 3)} | {fmt(x.get('max_ms'), '', 3)} |")
        w("")
        w(f"p50 ratios: registered/put {fmt(lat.get('ratio_p50_registered_vs_put'), '×')}, "
          f"(registered+get)/(put+get) {fmt(lat.get('ratio_p50_registered_get_vs_put_get'), '×')}, "
          f"watch-to-watch {fmt(lat.get('ratio_p50_registered_watch_vs_put_watch'), '×')}.\n")
        sm = lat.get("skyapi_metrics", {})
        if sm.get("etcd_put_mean_ms") is not None:
            w(f"Inside skyapi (its own `/metrics`), an etcd put transaction took "
              f"{sm['etcd_put_mean_ms']} ms and a delete transaction {sm.get('etcd_delete_mean_ms', 'n/a')} ms "
              "on average over this scenario, measured around the etcd-client call.\n")
        if lat.get("failures"):
            w(f"Failures: {lat['failures'][:5]}\n")
    elif lat:
        w(f"Failed: {lat.get('error')}\n")
    w("## Reconnect storm\n")
    if storm and "error" not in storm:
        c, d = storm["connect"], storm["disconnect"]
        w(f"{storm['count']:,} providers, each a task parked on one gate, start connecting at the same "
          "instant (a refused or timed-out attempt is retried, at most 3 attempts). Times are from the "
          "gate opening; `count` is the first `get --prefix --count-only` poll (every 100 ms) that "
          "saw them all, `watch` the last distinct event on a watch opened before.\n")
        w("| | |\n|---|---|")
        w(f"| welcomed / failed / needed a retry | {c['welcomed']:,} / {c['failed']:,} / {c['retried']:,} |")
        wl = c.get("welcome_after_gate", {})
        w(f"| welcome after gate p50 / p99 / max | {fmt(wl.get('p50_ms'), ' ms', 1)} / "
          f"{fmt(wl.get('p99_ms'), ' ms', 1)} / {fmt(wl.get('max_ms'), ' ms', 1)} |")
        w(f"| all keys counted in etcd | {fmt(c.get('count_reached_s'), ' s', 2)} "
          f"(watch: {fmt(c.get('all_puts_seen_s'), ' s', 2)}) |")
        w(f"| skyapi peak threads / RSS | {fmt(c.get('skyapi_peak_threads'))} / "
          f"{fmt(c.get('skyapi_peak_rss_kib'))} KiB |")
        w(f"| kernel listen-queue counters during the connect half | {c.get('kernel_listen_counters')} |")
        w(f"| all disconnect: keys gone | {fmt(d.get('count_zero_s'), ' s', 2)} "
          f"(watch: {fmt(d.get('all_deletes_seen_s'), ' s', 2)}); {fmt(d.get('keys_left'))} left |")
        errs = (c.get("errors") or []) + (d.get("errors") or [])
        if errs:
            w(f"| errors (first few) | {'; '.join(errs[:5])} |")
        w("")
    elif storm:
        w(f"Failed: {storm.get('error')}\n")
    w("## Restart\n")
    if restarts:
        w(f"{n:,} providers that reconnect as `skyapi provide` does (first attempt after a random "
          "0–250 ms, then the sidecar's backoff) are registered; skyapi is stopped with SIGTERM (a "
          "restart-safe stop: close 1012, nothing deleted) or SIGKILL (a crash) and started again on the "
          "same port as soon as the old process is gone, as a supervisor would. A prefix watch opened "
          "before the signal sees every put (with its lease) and delete, so the fewest keys present is "
          "exact, not sampled. The original skyapi never revoked: its entries outlived a restart by "
          "their TTL, so it had no gap either, but a client that did not return stayed for up to the "
          "whole timeout, as it does here.\n")
        w("| | " + " | ".join("SIGKILL" if k == "restart_kill" else "SIGTERM" for k, _ in restarts) + " |")
        w("|---|" + "---|" * len(restarts))
        def row(label, f):
            w(f"| {label} | " + " | ".join(f(rs) for _, rs in restarts) + " |")
        row("old process gone after", lambda rs: fmt(g(rs, "old_exit_s"), " s", 3))
        row("fewest keys present (watch)", lambda rs: fmt(g(rs, "min_keys_present")))
        row("deletes seen", lambda rs: fmt(g(rs, "deletes_seen")))
        row("all keys on the new lease after", lambda rs: fmt(g(rs, "all_on_new_lease_s"), " s", 2))
        row("providers welcomed again", lambda rs: fmt(g(rs, "rewelcomed")))
        row("welcome again p50 / p99 (from the signal)", lambda rs: (
            f"{fmt(g(rs, 'rewelcome_after_signal', 'p50_ms'), ' ms', 0)} / "
            f"{fmt(g(rs, 'rewelcome_after_signal', 'p99_ms'), ' ms', 0)}"))
        row("etcd transactions during the takeover (etcd's counter)",
            lambda rs: fmt(g(rs, "etcd_txns_during_takeover")))
        row("put transactions of the restarted skyapi (its /metrics)", lambda rs: fmt(
            g(rs, "skyapi_metrics", "skyapi_etcd_requests_total{op=\"put\",outcome=\"ok\"}")))
        w("")
        for k, rs in restarts:
            if "error" in rs:
                w(f"{k} failed: {rs.get('error')}\n")
    w("## Churn\n")
    if churn and "error" not in churn:
        cy = churn.get("cycle", {})
        w(f"A cycle (connect, upgrade, welcome, close frame, wait for the server to end TCP) is started "
          f"every {1000 / churn['rate']:.1f} ms for {churn['duration_s']:.0f} s; "
          f"{churn['ok']:,} of {churn['cycles']:,} completed ({churn['failed']:,} failed), "
          f"{fmt(churn.get('achieved_rate'), '/s', 0)} achieved; cycle p50 {fmt(cy.get('p50_ms'), ' ms', 2)}, "
          f"p99 {fmt(cy.get('p99_ms'), ' ms', 2)}; skyapi used {fmt(churn.get('skyapi_cpu_percent'), ' %', 1)} "
          "of a core meanwhile.\n")
        w("| | threads | fds | RSS KiB |\n|---|---|---|---|")
        for k in ("before", "peak", "after"):
            x = churn.get(k, {})
            w(f"| {k} | {fmt(x.get('threads'))} | {fmt(x.get('fds'))} | {fmt(x.get('rss_kib'))} |")
        w("")
        w(f"etcd keys under the churn service afterwards: **{fmt(churn.get('keys_after'))}** "
          f"(whole skyapi directory: {fmt(churn.get('root_keys_after'))}).\n")
        if churn.get("errors"):
            w(f"Errors (first few): {churn['errors']}\n")
    elif churn:
        w(f"Failed: {churn.get('error')}\n")
    w("## Commands\n")
    w("`make bench` runs `make static`, `cargo build --release`, `cargo build --release --example loadgen`, then "
      "`python3 bench/bench.py`, which ran (ports are chosen free per run; each scenario gets a fresh "
      "skyapi started as shown):\n")
    w("```sh")
    order = ["etcd", "skyapi", "skyapi (glibc)", "latency", "idle", "storm", "churn", "restart",
             "restart_kill", "fleet", "fleet etcd 0", "fleet_cluster", "fleet_cluster etcd 0",
             "fleet_cluster etcd 1", "fleet_cluster etcd 2"]
    for k in sorted(r["commands"], key=lambda k: order.index(k) if k in order else len(order)):
        w(f"# {k}\n{r['commands'][k].replace(ROOT + '/', '')}")
    w("```\n")
    w("A single scenario can be re-run by hand the same way, e.g. "
      "`python3 bench/bench.py --only latency --out /tmp/b.md --json /tmp/b.json --svg /tmp/b.svg`.\n")
    if notes:
        w(notes.rstrip() + "\n")
    return "\n".join(out)


def rss_per_conn_at(idle, c):
    """(RSS at c − RSS at 0) / c from the idle scenario's steps, KiB."""
    steps = {x.get("connections"): g(x, "skyapi", "rss_kib") for x in g(idle, "steps", default=[])}
    if steps.get(c) is None or steps.get(0) is None or not c:
        return None
    return (steps[c] - steps[0]) / c


def render_builds(r, w):
    """musl (shipped) beside glibc: the scenarios run on both."""
    gl = r.get("glibc", {})
    if not gl:
        return
    s = r["scenarios"]
    n = r["params"]["connections"]
    half = n // 2
    bins = r.get("binaries", {})
    cols = [("musl (shipped, static)", s), ("glibc (`cargo build --release`)", gl)]
    w("## musl and glibc builds\n")
    w("The same scenarios, run back to back with each binary against the same etcd. "
      "The allocator differs: musl's mallocng returns freed memory to the kernel, glibc's malloc "
      "keeps it in per-thread arenas.\n")
    w("| | " + " | ".join(c for c, _ in cols) + " |")
    w("|---|" + "---|" * len(cols))

    def row(label, f):
        w(f"| {label} | " + " | ".join(f(x) for _, x in cols) + " |")

    def size(k):
        stripped = "not stripped" not in g(bins, k, "file", default="not stripped")
        return f"{fmt(g(bins, k, 'size_mib'), ' MiB', 1)} ({'stripped' if stripped else 'with debug info, not stripped'})"

    w(f"| binary size | {size('musl')} | {size('glibc')} |")
    row("fresh RSS (before any connection)", lambda x: fmt(g(x, "idle", "skyapi_fresh", "rss_kib"), " KiB"))
    row(f"RSS per connection at {half:,} held", lambda x: fmt(rss_per_conn_at(x.get("idle", {}), half), " KiB", 1))
    row(f"RSS per connection at {n:,} held", lambda x: fmt(g(x, "idle", "rss_per_connection_kib"), " KiB", 1))
    row(f"RSS after all {n:,} closed", lambda x: fmt(g(x, "idle", "after_close", "rss_kib"), " KiB"))
    row(f"idle CPU at {n:,} (% of a core)", lambda x: fmt(next(
        (v.get("skyapi_cpu_percent") for v in g(x, "idle", "windows", default=[]) if v.get("connections") == n), None)))
    row("registration p50 / p99 (upgrade request → welcome)", lambda x: (
        f"{fmt(g(x, 'latency', 'sky_registered', 'p50_ms'), ' ms', 3)} / "
        f"{fmt(g(x, 'latency', 'sky_registered', 'p99_ms'), ' ms', 3)}"))
    row("… vs bare etcd put p50 (same run)", lambda x: fmt(g(x, "latency", "ratio_p50_registered_vs_put"), "×"))
    row("removal p50 / p99 (close frame → delete event)", lambda x: (
        f"{fmt(g(x, 'latency', 'sky_removed_watch', 'p50_ms'), ' ms', 3)} / "
        f"{fmt(g(x, 'latency', 'sky_removed_watch', 'p99_ms'), ' ms', 3)}"))
    w("")


def fleet_rows(f):
    """Per K and mode: totals, and per instance = (K − baseline K=0) / K.
    Requests exclude the load generator's own (foreign keepalive, churn)."""
    ws = g(f, "windows", default=[])
    base = {w["churn"]: w for w in ws if w.get("instances") == 0}
    out = []
    for w in ws:
        k, churn = w.get("instances"), w.get("churn")
        req = w["etcd_received_per_s"] - w.get("loadgen_requests_per_s", 0)
        row = {"k": k, "churn": churn, "sent": w["etcd_sent_bytes_per_s"], "req": req,
               "events": w.get("etcd_watch_events_per_s"), "watchers": w.get("etcd_watchers"),
               "handled": w["etcd_handled_per_s"], "cpu": w["etcd_cpu_percent"],
               "sky_cpu": sum(w.get("skyapi_cpu_percent", [])), "w": w}
        b = base.get(churn)
        if k and b:
            breq = b["etcd_received_per_s"] - b.get("loadgen_requests_per_s", 0)
            row["per_sent"] = (row["sent"] - b["etcd_sent_bytes_per_s"]) / k
            row["per_req"] = (req - breq) / k
            row["per_cpu"] = (row["cpu"] - b["etcd_cpu_percent"]) / k
            if row["events"] is not None and b.get("etcd_watch_events_per_s") is not None:
                row["per_events"] = (row["events"] - b["etcd_watch_events_per_s"]) / k
        out.append(row)
    return out


def render_fleet(r, w):
    s = r["scenarios"]
    runs = [(k, s[k]) for k in ("fleet", "fleet_cluster") if k in s]
    if not runs:
        return
    p = r["params"]
    w("## Fleet: K instances on one etcd (issue 10)\n")
    w(f"K skyapi instances (musl, `--timeout {p['timeout']}`, all given every member's URL) each hold "
      f"{p['fleet_providers']:,} idle providers of their own; {p['fleet_foreign']:,} entries of another "
      "instance sit under the same root directory on a lease the load generator keeps alive (as that "
      f"instance would). Each window is {p['fleet_window']} s (whole reconcile periods of "
      f"{p['timeout'] // 3} s); *churn* windows add {p['fleet_churn_rate']} foreign registrations/s "
      "elsewhere in the fleet (a put on a second foreign lease, deleted a second later; see the analysis "
      "for why not the lease of the 100,000). etcd's counters "
      "are summed over its members' `/metrics`, its CPU over their `/proc/PID/stat`.\n")
    w("**Method for the per-instance split:** etcd does not attribute its counters to a connection, "
      "so every K is compared with a K = 0 window of the same kind (the foreign entries, their keepalive "
      "and, in churn windows, the churn, with no instance): per instance = (total at K − total at 0) / K. "
      "Requests are etcd's `grpc_server_msg_received_total` (every request message, keepalives on the "
      "stream included) minus the load generator's own requests, which it counts.\n")
    goal = []
    for name, f in runs:
        label = "one etcd" if name == "fleet" else "3-member etcd cluster"
        w(f"### {label}\n")
        if "error" in f:
            w(f"Failed: {f['error']}\n")
            continue
        w(f"{f['foreign']:,} foreign entries written in {fmt(f.get('foreign_write_s'), ' s', 1)}; "
          f"{fmt(f.get('keys_under_root_at_end'))} keys under the root at the end; "
          f"the scenario took {fmt(f.get('seconds'), ' s', 0)}.\n")
        rows = fleet_rows(f)
        # Runs before the watch counters were scraped have no such columns.
        ev = any(x["events"] is not None for x in rows)
        w("| K | window | etcd bytes sent/s | per instance | requests/s (not ours) | per instance | "
          "etcd CPU % | per instance | skyapi CPU % (all K) | "
          + ("watch events sent/s | per instance | watchers | " if ev else "")
          + "requests/s by method (all, ours included) |\n|---|---|---|---|---|---|---|---|---|"
          + ("---|---|---|" if ev else "") + "---|")
        for x in rows:
            mode = f"churn ({fmt(x['w'].get('loadgen_puts_per_s'), '/s', 0)})" if x["churn"] else "idle"
            w(f"| {x['k']} | {mode} | {fmt(x['sent'], '', 0)} | "
              f"{fmt(x.get('per_sent'), '', 0)} | {fmt(x['req'], '', 2)} | {fmt(x.get('per_req'), '', 2)} | "
              f"{fmt(x['cpu'], '', 2)} | {fmt(x.get('per_cpu'), '', 2)} | {fmt(x['sky_cpu'], '', 2)} | "
              + (f"{fmt(x['events'], '', 1)} | {fmt(x.get('per_events'), '', 1)} | {fmt(x['watchers'], '', 0)} | "
                 if ev else "")
              + ", ".join(f"{k.split('/')[1]} {v:g}" for k, v in x["w"].get("etcd_rates_per_s", {}).items()
                          if k.startswith("received/") and k != "received/*") + " |")
        w("")
        per = [x for x in rows if x["k"] and "per_sent" in x]
        if per:
            goal.append((label, per))
    if goal:
        w("### Goal (issue 10)\n")
        w("Steady state (idle windows): per instance ≤ 1,024 bytes/s sent by etcd and ≤ 0.5 requests/s, "
          "whatever K; churn windows are reported beside it (what the others' churn costs each instance).\n")
        w("| etcd | idle: worst per-instance bytes/s | idle: worst per-instance requests/s | "
          "idle bytes/s per instance, K = 1 → max | churn: worst per-instance bytes/s / requests/s | goal |"
          "\n|---|---|---|---|---|---|")
        for label, per in goal:
            idle = [x for x in per if not x["churn"]]
            ch = [x for x in per if x["churn"]]
            if not idle:
                continue
            b = max(x["per_sent"] for x in idle)
            rq = max(x["per_req"] for x in idle)
            trend = f"{fmt(idle[0]['per_sent'], '', 0)} → {fmt(idle[-1]['per_sent'], '', 0)}"
            churn = (f"{fmt(max(x['per_sent'] for x in ch), '', 0)} / {fmt(max(x['per_req'] for x in ch), '', 2)}"
                     if ch else "n/a")
            w(f"| {label} | {fmt(b, '', 0)} | {fmt(rq, '', 2)} | {trend} | {churn} | "
              f"{verdict(b <= 1024 and rq <= 0.5)} |")
        w("")


def render_svg(r):
    """Two panels, no plotting library: RSS and threads against held
    connections; latency percentiles of bare etcd and skyapi."""
    steps = g(r, "scenarios", "idle", "steps", default=[])
    lat = g(r, "scenarios", "latency", default={})
    if not steps and not lat:
        return ""
    W, H = 900, 340
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>']

    def nice(x):
        """The smallest round number (1, 1.5, 2, ... 8 times a power of ten) >= x."""
        import math

        e = 10 ** math.floor(math.log10(x)) if x > 0 else 1
        return next(m * e for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10) if m * e >= x)

    def axes(x0, y0, w, h, xmax, ymax, xlabel, ylabel, title):
        out.append(f'<text x="{x0 + w / 2}" y="{y0 - h - 12}" text-anchor="middle" font-weight="bold">{title}</text>')
        out.append(f'<line x1="{x0}" y1="{y0}" x2="{x0 + w}" y2="{y0}" stroke="black"/>')
        out.append(f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y0 - h}" stroke="black"/>')
        for i in range(5):
            yv = ymax * i / 4
            y = y0 - h * i / 4
            out.append(f'<line x1="{x0 - 4}" y1="{y}" x2="{x0 + w}" y2="{y}" stroke="#ddd"/>')
            out.append(f'<text x="{x0 - 6}" y="{y + 4}" text-anchor="end">{yv:.3g}</text>')
        out.append(f'<text x="{x0 + w / 2}" y="{y0 + 32}" text-anchor="middle">{xlabel}</text>')
        out.append(f'<text x="{x0 - 48}" y="{y0 - h / 2}" text-anchor="middle" '
                   f'transform="rotate(-90 {x0 - 48} {y0 - h / 2})">{ylabel}</text>')

    if steps:
        x0, y0, w, h = 70, 290, 330, 230
        xs = [s["connections"] for s in steps]
        ys = [s["skyapi"]["rss_kib"] / 1024 for s in steps]
        xmax, ymax = max(xs) or 1, nice((max(ys) or 1) * 1.05)
        axes(x0, y0, w, h, xmax, ymax, "idle registered connections", "skyapi RSS (MiB)", "RSS against connections")
        for i in range(5):
            xv = xmax * i / 4
            out.append(f'<text x="{x0 + w * i / 4}" y="{y0 + 16}" text-anchor="middle">{xv:,.0f}</text>')
        pts = " ".join(f"{x0 + w * x / xmax:.1f},{y0 - h * y / ymax:.1f}" for x, y in zip(xs, ys))
        out.append(f'<polyline points="{pts}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
        for x, y in zip(xs, ys):
            out.append(f'<circle cx="{x0 + w * x / xmax:.1f}" cy="{y0 - h * y / ymax:.1f}" r="3" fill="#1f77b4"/>')
        per = g(r, "scenarios", "idle", "rss_per_connection_kib")
        if per is not None:
            out.append(f'<text x="{x0 + 10}" y="{y0 - h + 6}">{per:.1f} KiB per connection (goal ≤ 32)</text>')
    if lat and "error" not in lat:
        x0, y0, w, h = 540, 290, 330, 230
        series = [("bare_put", "etcd put"), ("sky_registered", "registered"),
                  ("bare_delete_watch", "etcd delete"), ("sky_removed_watch", "removed")]
        pcts = [("p50_ms", "#1f77b4"), ("p90_ms", "#ff7f0e"), ("p99_ms", "#d62728")]
        vals = [[g(lat, k, pk, default=0) for pk, _ in pcts] for k, _ in series]
        ymax = nice(max(max(v) for v in vals) * 1.15 or 1)
        axes(x0, y0, w, h, 1, ymax, "", "milliseconds", "Latency percentiles (p50, p90, p99)")
        gw = w / len(series)
        bw = gw / (len(pcts) + 1)
        for si, (k, label) in enumerate(series):
            for pi, (_, color) in enumerate(pcts):
                v = vals[si][pi]
                bh = h * v / ymax
                x = x0 + si * gw + bw * (pi + 0.5)
                out.append(f'<rect x="{x:.1f}" y="{y0 - bh:.1f}" width="{bw:.1f}" height="{bh:.1f}" fill="{color}"/>')
            out.append(f'<text x="{x0 + si * gw + gw / 2:.1f}" y="{y0 + 16}" text-anchor="middle" font-size="11">{label}</text>')
        for pi, (pk, color) in enumerate(pcts):
            out.append(f'<rect x="{x0 + w - 150 + pi * 50}" y="{y0 - h - 4}" width="10" height="10" fill="{color}"/>')
            out.append(f'<text x="{x0 + w - 137 + pi * 50}" y="{y0 - h + 5}">{pk[:3]}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
