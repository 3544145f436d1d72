//! Command-line flags, parsed raw with pico-args and validated into a
//! `Config` before any socket is bound.
//!
//! The flags are the original Go skyapi's, so a fleet can switch binaries:
//! Go's single-dash spelling (`-listen-addr :8053`) and `--flag=value` are
//! accepted too. Invariant: a `Config` that exists is one the server can run
//! with; every refusal names the flag.

use std::ffi::OsString;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use log::LevelFilter;

use crate::error::ConfigError;
use crate::provide::{label, Layout};

/// etcd refuses lease TTLs below this with default election settings.
pub const MIN_TIMEOUT_SECS: u64 = 2;
/// A day: beyond it a dead client would linger for longer than any operator
/// expects from a liveness bound.
pub const MAX_TIMEOUT_SECS: u64 = 86_400;

pub const USAGE: &str = "\
skyapi: keeps SkyDNS entries in etcd v3 alive while processes hold a websocket

usage: skyapi [FLAGS]

  --listen-addr ADDR        where /provide and the HTTP endpoints are served
                            (default :8053, all interfaces, IPv4 and IPv6)
  --etcd-api URL            etcd v3 endpoint; repeatable and/or comma-separated
                            (default http://127.0.0.1:2379)
  --dns-root DOMAIN         root domain SkyDNS serves (default skydns.local.)
  --timeout SECS            liveness bound: lease TTL of every entry and how long
                            a silent client is tolerated (default 30, min 2)
  --default-category NAME   category when a client names none (default services)
  --etcd-prefix PATH        SkyDNS's path prefix in etcd (default /skydns)
  --max-connections N       open connections beyond which upgrades get 503
                            (default 10000)
  --log-level LEVEL         error, warn, info, debug or trace (default info)
  --etcd-pool-size N        accepted and ignored, as in the original skyapi
  -h, --help                this text
  -V, --version             the version

Clients: ws://HOST:8053/provide?service=foo&port=9999[&host=H][&priority=N]
         [&weight=N][&category=a,b][&prefix=P][&ttl=SECS]
";

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Serve(Config),
    Help,
    Version,
}

/// A validated server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Addresses to try binding, in order; the first that binds is used.
    pub listen: Vec<SocketAddr>,
    pub etcd_endpoints: Vec<String>,
    pub layout: Layout,
    pub timeout: Duration,
    pub log_level: LevelFilter,
    pub max_connections: usize,
}

/// Parses `args` (without the program name).
pub fn parse(args: Vec<OsString>) -> Result<Command, ConfigError> {
    let args = args.into_iter().map(go_style_flag).collect();
    let mut p = pico_args::Arguments::from_vec(args);
    if p.contains(["-h", "--help"]) {
        return Ok(Command::Help);
    }
    if p.contains(["-V", "--version"]) {
        return Ok(Command::Version);
    }

    let listen = opt(&mut p, "--listen-addr")?.unwrap_or_else(|| ":8053".into());
    let mut etcd = Vec::new();
    for v in p
        .values_from_str::<_, String>("--etcd-api")
        .map_err(|e| flag_error("--etcd-api", e))?
    {
        etcd.extend(v.split(',').map(str::trim).map(String::from));
    }
    if etcd.is_empty() {
        etcd.push("http://127.0.0.1:2379".into());
    }
    let dns_root = opt(&mut p, "--dns-root")?.unwrap_or_else(|| "skydns.local.".into());
    let timeout = opt(&mut p, "--timeout")?.unwrap_or_else(|| "30".into());
    let category = opt(&mut p, "--default-category")?.unwrap_or_else(|| "services".into());
    let prefix = opt(&mut p, "--etcd-prefix")?.unwrap_or_else(|| "/skydns".into());
    let log_level = opt(&mut p, "--log-level")?.unwrap_or_else(|| "info".into());
    let max_conns = opt(&mut p, "--max-connections")?.unwrap_or_else(|| "10000".into());
    // Accepted for compatibility with the original; a single client serves.
    let _pool_size = opt(&mut p, "--etcd-pool-size")?;

    let rest = p.finish();
    if let Some(first) = rest.first() {
        return Err(ConfigError(format!(
            "unknown argument {:?} (see --help)",
            first.to_string_lossy()
        )));
    }

    let timeout_secs: u64 = timeout.parse().map_err(|_| {
        ConfigError(format!(
            "--timeout: {timeout:?} is not a whole number of seconds"
        ))
    })?;
    if !(MIN_TIMEOUT_SECS..=MAX_TIMEOUT_SECS).contains(&timeout_secs) {
        return Err(ConfigError(format!(
            "--timeout: {timeout_secs} is outside {MIN_TIMEOUT_SECS}..{MAX_TIMEOUT_SECS} (etcd's minimum lease TTL is 2 s)"
        )));
    }

    Ok(Command::Serve(Config {
        listen: listen_addrs(&listen)?,
        etcd_endpoints: etcd.iter().map(|e| endpoint(e)).collect::<Result<_, _>>()?,
        layout: Layout {
            etcd_prefix: etcd_prefix(&prefix)?,
            root: dns_root_labels(&dns_root)?,
            default_category: category
                .split(',')
                .map(|c| label("category", c))
                .collect::<Result<_, _>>()
                .map_err(|e| ConfigError(format!("--default-category: {e}")))?,
            default_ttl: timeout_secs as u32,
        },
        timeout: Duration::from_secs(timeout_secs),
        log_level: log_level.parse().map_err(|_| {
            ConfigError(format!(
                "--log-level: {log_level:?} is not one of error, warn, info, debug, trace"
            ))
        })?,
        max_connections: max_conns.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
            ConfigError(format!(
                "--max-connections: {max_conns:?} is not a positive number"
            ))
        })?,
    }))
}

fn opt(p: &mut pico_args::Arguments, flag: &'static str) -> Result<Option<String>, ConfigError> {
    p.opt_value_from_str(flag).map_err(|e| flag_error(flag, e))
}

fn flag_error(flag: &str, e: pico_args::Error) -> ConfigError {
    match e {
        pico_args::Error::OptionWithoutAValue(_) => ConfigError(format!("{flag}: needs a value")),
        other => ConfigError(format!("{flag}: {other}")),
    }
}

/// Go's flag package takes `-name`; pico-args wants `--name`. Short flags
/// (`-h`, `-V`) and values are left alone.
fn go_style_flag(arg: OsString) -> OsString {
    match arg.to_str() {
        Some(s) if s.len() > 2 && s.starts_with('-') && !s.starts_with("--") => {
            let rest = &s[1..];
            if rest.starts_with(|c: char| c.is_ascii_alphabetic()) {
                return format!("-{s}").into();
            }
            arg
        }
        _ => arg,
    }
}

/// `:8053` means every interface, IPv6 and IPv4 (falling back to IPv4 only
/// where IPv6 is off); anything else is resolved as `host:port`.
fn listen_addrs(raw: &str) -> Result<Vec<SocketAddr>, ConfigError> {
    let bad = |why: &str| ConfigError(format!("--listen-addr: {raw:?} {why}"));
    if let Some(port) = raw.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| bad("has no valid port"))?;
        return Ok(vec![
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        ]);
    }
    let addrs: Vec<SocketAddr> = raw
        .to_socket_addrs()
        .map_err(|e| bad(&format!("is not HOST:PORT ({e})")))?
        .collect();
    if addrs.is_empty() {
        return Err(bad("resolves to no address"));
    }
    Ok(addrs)
}

fn endpoint(raw: &str) -> Result<String, ConfigError> {
    let bad = |why: &str| ConfigError(format!("--etcd-api: {raw:?} {why}"));
    let url = if raw.contains("://") {
        raw.to_string()
    } else {
        format!("http://{raw}")
    };
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| bad("must be an http:// or https:// URL"))?;
    let hostport = rest.trim_end_matches('/');
    if hostport.is_empty() || hostport.contains('/') || !hostport.contains(':') {
        return Err(bad("must be a URL like http://127.0.0.1:2379"));
    }
    Ok(url)
}

fn etcd_prefix(raw: &str) -> Result<String, ConfigError> {
    let segments: Vec<&str> = raw.split('/').filter(|s| !s.is_empty()).collect();
    if segments.is_empty() {
        return Err(ConfigError(format!(
            "--etcd-prefix: {raw:?} needs at least one path segment, like /skydns"
        )));
    }
    for s in &segments {
        if *s == "." || *s == ".." || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError(format!(
                "--etcd-prefix: segment {s:?} is not allowed"
            )));
        }
    }
    Ok(format!("/{}", segments.join("/")))
}

fn dns_root_labels(raw: &str) -> Result<Vec<String>, ConfigError> {
    let name = raw.strip_suffix('.').unwrap_or(raw);
    if name.is_empty() {
        return Err(ConfigError("--dns-root: must name a domain".into()));
    }
    name.split('.')
        .map(|l| label("label", l))
        .collect::<Result<_, _>>()
        .map_err(|e| ConfigError(format!("--dns-root: {raw:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> Result<Config, ConfigError> {
        match parse(args.iter().map(OsString::from).collect())? {
            Command::Serve(c) => Ok(c),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults_match_the_original() {
        let c = serve(&[]).unwrap();
        assert_eq!(c.listen[0].to_string(), "[::]:8053");
        assert_eq!(c.etcd_endpoints, vec!["http://127.0.0.1:2379"]);
        assert_eq!(c.layout.root_dir(), "/skydns/local/skydns/");
        assert_eq!(c.layout.root_name(), "skydns.local.");
        assert_eq!(c.layout.default_category, vec!["services"]);
        assert_eq!(c.timeout, Duration::from_secs(30));
        assert_eq!(c.log_level, LevelFilter::Info);
    }

    #[test]
    fn go_spelling_and_lists() {
        let c = serve(&[
            "-listen-addr",
            "127.0.0.1:0",
            "--etcd-api=http://a:1,b:2",
            "--etcd-api",
            "https://c:3",
            "-dns-root",
            "Turtles.COM",
            "--etcd-prefix",
            "skydns/",
            "--etcd-pool-size",
            "7",
        ])
        .unwrap();
        assert_eq!(c.listen[0].to_string(), "127.0.0.1:0");
        let mut endpoints = c.etcd_endpoints.clone();
        endpoints.sort();
        assert_eq!(endpoints, vec!["http://a:1", "http://b:2", "https://c:3"]);
        assert_eq!(c.layout.root_dir(), "/skydns/com/turtles/");
    }

    #[test]
    fn refusals_name_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--timeout", "1"], "--timeout"),
            (&["--timeout", "x"], "--timeout"),
            (&["--timeout"], "--timeout"),
            (&["--listen-addr", "nope"], "--listen-addr"),
            (&["--etcd-api", "ftp://x:1"], "--etcd-api"),
            (&["--dns-root", "a..b"], "--dns-root"),
            (&["--default-category", "a/b"], "--default-category"),
            (&["--etcd-prefix", "/a/../b"], "--etcd-prefix"),
            (&["--log-level", "loud"], "--log-level"),
            (&["--max-connections", "0"], "--max-connections"),
            (&["--bogus"], "--bogus"),
        ];
        for (args, flag) in cases {
            let e = serve(args).unwrap_err().to_string();
            assert!(e.contains(flag), "{args:?}: {e}");
        }
    }
}
