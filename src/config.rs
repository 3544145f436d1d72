//! Command-line flags, parsed raw with pico-args and validated into a
//! `Config` before any socket is bound.
//!
//! The flags are the original Go skyapi's, so a fleet can switch binaries:
//! Go's single-dash spelling (`-listen-addr :8053`) and `--flag=value` are
//! accepted too. Invariant: a `Config` that exists is one the server can run
//! with; every refusal names the flag.

use std::ffi::OsString;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use log::LevelFilter;

use crate::error::ConfigError;
use crate::provide::{label, reserved_label, Layout};

/// etcd refuses lease TTLs below this with default election settings.
pub const MIN_TIMEOUT_SECS: u64 = 2;
/// A day: beyond it a dead client would linger for longer than any operator
/// expects from a liveness bound.
pub const MAX_TIMEOUT_SECS: u64 = 86_400;

pub const USAGE: &str = "\
skyapi: keeps SkyDNS entries in etcd v3 alive while processes hold a websocket

usage: skyapi [FLAGS]                 run the server
       skyapi provide [FLAGS]         hold a registration for a local process
                                      (see skyapi provide --help)

  --listen-addr ADDR        where /provide and the HTTP endpoints are served
                            (default :8053, all interfaces, IPv4 and IPv6)
  --admin-listen-addr ADDR  serve /healthz, /metrics and /services here (plain
                            HTTP, for a private address); /metrics and
                            /services then leave --listen-addr
  --etcd-api URL            etcd v3 endpoint; repeatable and/or comma-separated
                            (default http://127.0.0.1:2379)
  --dns-root DOMAIN         root domain SkyDNS serves (default skydns.local.)
  --timeout SECS            liveness bound: lease TTL of every entry and how long
                            a silent client is tolerated (default 30, min 2)
  --default-category NAME   category when a client names none (default services)
  --etcd-prefix PATH        SkyDNS's path prefix in etcd (default /skydns)
  --etcd-user NAME          etcd user (NAME:PASSWORD also accepted)
  --etcd-password PASS      etcd password; better: SKYAPI_ETCD_PASSWORD
  --etcd-cacert FILE        CA bundle to verify etcd's certificate (https://)
  --etcd-cert FILE          client certificate for etcd (with --etcd-key)
  --etcd-key FILE           client key for etcd
  --token-file FILE         require bearer tokens on /provide; lines are
                            TOKEN GRANT[,GRANT...], a grant being a name glob
                            (foo.services, web-*.services.production), a
                            service glob (web-*) or @admin; re-read on SIGHUP
  --tls-cert FILE           serve wss:// and https:// with this certificate chain
  --tls-key FILE            ... and this private key (PEM)
  --host-must-match-peer    refuse a host= other than the peer's own address
  --revoke-on-exit          on SIGTERM/SIGINT revoke the lease (every entry goes
                            at once) and close clients with 1001, for
                            decommissioning; by default a stop keeps the entries
                            for the next instance to take over (close 1012)
  --max-connections N       open connections beyond which new ones get 503
                            (default 10000)
  --handshake-timeout SECS  a request head (and TLS handshake) must be complete
                            within this (default 5)
  --max-head-size BYTES     largest request head; 431 beyond (default 8192)
  --max-message-size BYTES  largest websocket frame or message a client may
                            send; close 1009 beyond (default 4096)
  --max-message-rate N      messages a second a client may send, bursts of 5x;
                            close 1008 beyond (default 20)
  --log-level LEVEL         error, warn, info, debug or trace (default info)
  --etcd-pool-size N        accepted and ignored, as in the original skyapi
  -h, --help                this text
  -V, --version             the version

Every flag may also come from the environment as SKYAPI_<FLAG>, e.g.
SKYAPI_ETCD_API or SKYAPI_HOST_MUST_MATCH_PEER=1; the command line wins.

Clients: ws://HOST:8053/provide?service=foo&port=9999[&host=H][&priority=N]
         [&weight=N][&category=a,b][&prefix=P][&ttl=SECS]
";

pub const PROVIDE_USAGE: &str = "\
skyapi provide: holds a registration on a skyapi server for a local process,
reconnecting forever (exponential backoff with jitter, capped at 30 s).

usage: skyapi provide --server ws://HOST:8053 --service NAME --port N [FLAGS]

  --server URL[,URL...]     skyapi servers (ws:// or wss://), tried in turn
  --service NAME            the service name
  --port N                  the service's port
  --host H                  advertised host (default: the address skyapi sees)
  --priority N, --weight N, --category A[,B], --prefix P, --ttl SECS
                            as the /provide parameters of the same names
  --check URL               register only while it passes: tcp://HOST:PORT
                            (connects) or http://HOST:PORT/PATH (answers 2xx)
  --interval SECS           ping and check period (default 10)
  --token TOKEN             bearer token for a server with --token-file;
                            better: SKYAPI_TOKEN
  --cacert FILE             PEM roots to verify wss:// servers (default: the
                            system bundle)
  --log-level LEVEL         error, warn, info, debug or trace (default info)

SIGTERM or SIGINT closes the connection cleanly (the entry goes at once) and
exits 0. Flags may come from the environment as SKYAPI_<FLAG> too.
";

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Serve(Box<Config>),
    Provide(SidecarConfig),
    Help,
    ProvideHelp,
    Version,
}

/// A validated server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Addresses to try binding, in order; the first that binds is used.
    pub listen: Vec<SocketAddr>,
    /// `--admin-listen-addr`, the same way: where the admin endpoints go.
    pub admin_listen: Option<Vec<SocketAddr>>,
    pub etcd: EtcdConfig,
    pub layout: Layout,
    pub timeout: Duration,
    pub log_level: LevelFilter,
    pub max_connections: usize,
    pub limits: Limits,
    pub token_file: Option<PathBuf>,
    /// Certificate chain and key files for wss://.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub host_must_match_peer: bool,
    /// At SIGTERM/SIGINT, revoke the lease instead of leaving the entries
    /// for a restarted or another instance to take over.
    pub revoke_on_exit: bool,
}

/// What one connection may cost; each limit is logged when hit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// The request head (and TLS handshake) must be complete within this.
    pub handshake_timeout: Duration,
    /// Largest request head in bytes.
    pub max_head: usize,
    /// Largest websocket frame or message from a client, in bytes.
    pub max_message: usize,
    /// Sustained messages a second from a client; bursts of 5x that.
    pub message_rate: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(5),
            max_head: 8 * 1024,
            max_message: 4 * 1024,
            message_rate: 20.0,
        }
    }
}

/// How to reach etcd.
#[derive(Clone, Default)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// User and password for etcd's authentication.
    pub user: Option<(String, String)>,
    /// PEM of the CA that signs etcd's certificate.
    pub ca: Option<Vec<u8>>,
    /// PEM client certificate and key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdConfig {
    // Never prints the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("ca", &self.ca.is_some())
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

/// A validated `skyapi provide` configuration.
#[derive(Clone)]
pub struct SidecarConfig {
    /// Base URLs (`ws://host:port`), tried in turn.
    pub servers: Vec<String>,
    /// The `/provide` query string, parameters already validated.
    pub query: String,
    pub service: String,
    pub check: Option<Check>,
    pub interval: Duration,
    pub token: Option<String>,
    /// PEM roots for wss:// servers (default: the system bundle).
    pub cacert: Option<String>,
    pub log_level: LevelFilter,
}

impl std::fmt::Debug for SidecarConfig {
    // Never prints the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidecarConfig")
            .field("servers", &self.servers)
            .field("query", &self.query)
            .field("check", &self.check)
            .field("interval", &self.interval)
            .finish()
    }
}

/// A local health check for the sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Passes when a TCP connection to `host:port` succeeds.
    Tcp(String),
    /// Passes when `GET path` on `host:port` answers 2xx.
    Http { addr: String, path: String },
}

/// Reads a variable of the environment; a parameter so tests control it.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Parses `args` (without the program name), with `SKYAPI_<FLAG>` from `env`
/// as fallback for every flag.
pub fn parse(args: Vec<OsString>, env: Env) -> Result<Command, ConfigError> {
    let mut args: Vec<OsString> = args.into_iter().map(go_style_flag).collect();
    if args.first().is_some_and(|a| a == "provide") {
        args.remove(0);
        return parse_provide(args, env);
    }
    let mut f = Flags::new(args, env);
    if f.p.contains(["-h", "--help"]) {
        return Ok(Command::Help);
    }
    if f.p.contains(["-V", "--version"]) {
        return Ok(Command::Version);
    }

    let listen = f.value("--listen-addr")?.unwrap_or_else(|| ":8053".into());
    let admin_listen = f.value("--admin-listen-addr")?;
    let mut etcd = f.values("--etcd-api")?;
    if etcd.is_empty() {
        etcd.push("http://127.0.0.1:2379".into());
    }
    let dns_root = f
        .value("--dns-root")?
        .unwrap_or_else(|| "skydns.local.".into());
    let timeout = f.value("--timeout")?.unwrap_or_else(|| "30".into());
    let category = f
        .value("--default-category")?
        .unwrap_or_else(|| "services".into());
    let prefix = f
        .value("--etcd-prefix")?
        .unwrap_or_else(|| "/skydns".into());
    let log_level = f.value("--log-level")?.unwrap_or_else(|| "info".into());
    let max_conns = f
        .value("--max-connections")?
        .unwrap_or_else(|| "10000".into());
    let defaults = Limits::default();
    let limits = Limits {
        handshake_timeout: match f.value("--handshake-timeout")? {
            Some(v) => Duration::from_secs(number_flag("--handshake-timeout", &v, 1, 60)?),
            None => defaults.handshake_timeout,
        },
        max_head: match f.value("--max-head-size")? {
            Some(v) => number_flag("--max-head-size", &v, 1024, 65536)? as usize,
            None => defaults.max_head,
        },
        max_message: match f.value("--max-message-size")? {
            Some(v) => number_flag("--max-message-size", &v, 125, 1 << 20)? as usize,
            None => defaults.max_message,
        },
        message_rate: match f.value("--max-message-rate")? {
            Some(v) => number_flag("--max-message-rate", &v, 1, 10_000)? as f64,
            None => defaults.message_rate,
        },
    };
    let etcd_user = f.value("--etcd-user")?;
    let etcd_password = f.value("--etcd-password")?;
    let etcd_cacert = f.value("--etcd-cacert")?;
    let etcd_cert = f.value("--etcd-cert")?;
    let etcd_key = f.value("--etcd-key")?;
    let token_file = f.value("--token-file")?;
    let tls_cert = f.value("--tls-cert")?;
    let tls_key = f.value("--tls-key")?;
    let host_must_match_peer = f.switch("--host-must-match-peer")?;
    let revoke_on_exit = f.switch("--revoke-on-exit")?;
    // Accepted for compatibility with the original; a single client serves.
    let _pool_size = f.value("--etcd-pool-size")?;
    f.finish()?;

    let timeout_secs = timeout_secs(&timeout)?;
    let endpoints: Vec<String> = etcd.iter().map(|e| endpoint(e)).collect::<Result<_, _>>()?;
    let user = match (etcd_user, etcd_password) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(ConfigError(
                "--etcd-password: given without --etcd-user".into(),
            ))
        }
        (Some(u), Some(p)) => Some((u, p)),
        (Some(u), None) => match u.split_once(':') {
            Some((u, p)) => Some((u.to_string(), p.to_string())),
            None => {
                return Err(ConfigError(format!(
                "--etcd-user: no password for {u:?}: set SKYAPI_ETCD_PASSWORD or use NAME:PASSWORD"
            )))
            }
        },
    };
    let identity = match (etcd_cert, etcd_key) {
        (None, None) => None,
        (Some(c), Some(k)) => Some((read_file("--etcd-cert", &c)?, read_file("--etcd-key", &k)?)),
        _ => return Err(ConfigError("--etcd-cert and --etcd-key go together".into())),
    };
    let ca = etcd_cacert
        .map(|c| read_file("--etcd-cacert", &c))
        .transpose()?;
    if (ca.is_some() || identity.is_some()) && !endpoints.iter().all(|e| e.starts_with("https://"))
    {
        return Err(ConfigError(
            "--etcd-api: TLS options need https:// endpoints".into(),
        ));
    }
    let tls = match (tls_cert, tls_key) {
        (None, None) => None,
        (Some(c), Some(k)) => {
            // Read now so a bad path fails before any socket is bound.
            read_file("--tls-cert", &c)?;
            read_file("--tls-key", &k)?;
            Some((PathBuf::from(c), PathBuf::from(k)))
        }
        _ => return Err(ConfigError("--tls-cert and --tls-key go together".into())),
    };
    if let Some(t) = &token_file {
        read_file("--token-file", t)?;
    }

    let default_category: Vec<String> = category
        .split(',')
        .map(|c| label("category", c))
        .collect::<Result<_, _>>()
        .map_err(|e| ConfigError(format!("--default-category: {e}")))?;
    if let Some(r) = reserved_label(&default_category) {
        return Err(ConfigError(format!(
            "--default-category: {r:?} directly under the root is reserved for the DNS server's own records"
        )));
    }

    Ok(Command::Serve(Box::new(Config {
        listen: listen_addrs("--listen-addr", &listen)?,
        admin_listen: admin_listen
            .map(|a| listen_addrs("--admin-listen-addr", &a))
            .transpose()?,
        etcd: EtcdConfig {
            endpoints,
            user,
            ca,
            identity,
        },
        layout: Layout {
            etcd_prefix: etcd_prefix(&prefix)?,
            root: dns_root_labels(&dns_root)?,
            default_category,
            default_ttl: timeout_secs as u32,
        },
        timeout: Duration::from_secs(timeout_secs),
        log_level: log_level_of(&log_level)?,
        max_connections: max_conns.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
            ConfigError(format!(
                "--max-connections: {max_conns:?} is not a positive number"
            ))
        })?,
        limits,
        token_file: token_file.map(PathBuf::from),
        tls,
        host_must_match_peer,
        revoke_on_exit,
    })))
}

fn parse_provide(args: Vec<OsString>, env: Env) -> Result<Command, ConfigError> {
    let mut f = Flags::new(args, env);
    if f.p.contains(["-h", "--help"]) {
        return Ok(Command::ProvideHelp);
    }
    let servers = f.values("--server")?;
    let mut query = Vec::new();
    let service = f
        .value("--service")?
        .ok_or_else(|| ConfigError("--service: required".into()))?;
    let service = label("service", &service).map_err(|e| ConfigError(format!("--service: {e}")))?;
    query.push(format!("service={service}"));
    let port = f
        .value("--port")?
        .ok_or_else(|| ConfigError("--port: required".into()))?;
    number_flag("--port", &port, 1, 65535)?;
    query.push(format!("port={port}"));
    for (flag, param) in [
        ("--host", "host"),
        ("--priority", "priority"),
        ("--weight", "weight"),
        ("--category", "category"),
        ("--prefix", "prefix"),
        ("--ttl", "ttl"),
    ] {
        if let Some(v) = f.value(flag)? {
            query.push(format!("{param}={}", percent_encode(&v)));
        }
    }
    let check = f.value("--check")?.map(|c| check(&c)).transpose()?;
    let interval = f.value("--interval")?.unwrap_or_else(|| "10".into());
    let interval = number_flag("--interval", &interval, 1, 3600)?;
    let token = f.value("--token")?;
    let cacert = f.value("--cacert")?;
    if let Some(c) = &cacert {
        read_file("--cacert", c)?;
    }
    let log_level = f.value("--log-level")?.unwrap_or_else(|| "info".into());
    f.finish()?;

    if servers.is_empty() {
        return Err(ConfigError(
            "--server: required, e.g. ws://127.0.0.1:8053".into(),
        ));
    }
    let servers = servers
        .iter()
        .map(|s| {
            let base = s.trim_end_matches('/');
            let rest = base
                .strip_prefix("ws://")
                .or_else(|| base.strip_prefix("wss://"))
                .ok_or_else(|| {
                    ConfigError(format!("--server: {s:?} must be a ws:// or wss:// URL"))
                })?;
            if rest.is_empty() || rest.contains('/') {
                return Err(ConfigError(format!(
                    "--server: {s:?} must be ws://HOST:PORT without a path"
                )));
            }
            Ok(base.to_string())
        })
        .collect::<Result<_, _>>()?;
    // Validate the parameters the way the server will, so a typo fails here
    // and not on every reconnect.
    let q = query.join("&");
    let probe_layout = Layout {
        etcd_prefix: "/skydns".into(),
        root: vec!["local".into()],
        default_category: vec!["services".into()],
        default_ttl: 30,
    };
    let probe = crate::provide::parse(&q, std::net::Ipv4Addr::LOCALHOST.into(), &probe_layout)
        .map_err(|e| ConfigError(format!("provide: {e}")))?;
    if let Some(r) = probe.reserved() {
        return Err(ConfigError(format!(
            "--category: names under {r:?} are reserved for the DNS server's own records"
        )));
    }
    Ok(Command::Provide(SidecarConfig {
        servers,
        query: q,
        service,
        check,
        interval: Duration::from_secs(interval),
        token,
        cacert,
        log_level: log_level_of(&log_level)?,
    }))
}

/// The command line, with `SKYAPI_<FLAG>` as the fallback of every flag.
struct Flags<'a> {
    p: pico_args::Arguments,
    env: Env<'a>,
}

impl<'a> Flags<'a> {
    fn new(args: Vec<OsString>, env: Env<'a>) -> Self {
        Flags {
            p: pico_args::Arguments::from_vec(args),
            env,
        }
    }

    fn env_var(&self, flag: &str) -> Option<String> {
        let name = format!(
            "SKYAPI_{}",
            flag.trim_start_matches('-')
                .replace('-', "_")
                .to_ascii_uppercase()
        );
        (self.env)(&name).filter(|v| !v.is_empty())
    }

    fn value(&mut self, flag: &'static str) -> Result<Option<String>, ConfigError> {
        let v: Option<String> = self
            .p
            .opt_value_from_str(flag)
            .map_err(|e| flag_error(flag, e))?;
        Ok(v.or_else(|| self.env_var(flag)))
    }

    /// A repeatable flag whose values may also be comma-separated.
    fn values(&mut self, flag: &'static str) -> Result<Vec<String>, ConfigError> {
        let mut raw: Vec<String> = self
            .p
            .values_from_str(flag)
            .map_err(|e| flag_error(flag, e))?;
        if raw.is_empty() {
            raw.extend(self.env_var(flag));
        }
        Ok(raw
            .iter()
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(String::from)
            .collect())
    }

    fn switch(&mut self, flag: &'static str) -> Result<bool, ConfigError> {
        if self.p.contains(flag) {
            return Ok(true);
        }
        match self.env_var(flag).as_deref() {
            None | Some("0") | Some("false") | Some("no") => Ok(false),
            Some("1") | Some("true") | Some("yes") => Ok(true),
            Some(other) => Err(ConfigError(format!(
                "{flag}: environment value {other:?} is not 1/true/yes or 0/false/no"
            ))),
        }
    }

    fn finish(self) -> Result<(), ConfigError> {
        let rest = self.p.finish();
        match rest.first() {
            Some(first) => Err(ConfigError(format!(
                "unknown argument {:?} (see --help)",
                first.to_string_lossy()
            ))),
            None => Ok(()),
        }
    }
}

fn flag_error(flag: &str, e: pico_args::Error) -> ConfigError {
    match e {
        pico_args::Error::OptionWithoutAValue(_) => ConfigError(format!("{flag}: needs a value")),
        other => ConfigError(format!("{flag}: {other}")),
    }
}

fn timeout_secs(raw: &str) -> Result<u64, ConfigError> {
    let secs: u64 = raw.parse().map_err(|_| {
        ConfigError(format!(
            "--timeout: {raw:?} is not a whole number of seconds"
        ))
    })?;
    if !(MIN_TIMEOUT_SECS..=MAX_TIMEOUT_SECS).contains(&secs) {
        return Err(ConfigError(format!(
            "--timeout: {secs} is outside {MIN_TIMEOUT_SECS}..{MAX_TIMEOUT_SECS} (etcd's minimum lease TTL is 2 s)"
        )));
    }
    Ok(secs)
}

fn number_flag(flag: &str, raw: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
    raw.parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| ConfigError(format!("{flag}: {raw:?} is not a number in {min}..{max}")))
}

fn log_level_of(raw: &str) -> Result<LevelFilter, ConfigError> {
    raw.parse().map_err(|_| {
        ConfigError(format!(
            "--log-level: {raw:?} is not one of error, warn, info, debug, trace"
        ))
    })
}

fn read_file(flag: &str, path: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError(format!("{flag}: cannot read {path:?}: {e}")))
}

fn check(raw: &str) -> Result<Check, ConfigError> {
    let bad = || {
        ConfigError(format!(
            "--check: {raw:?} is not tcp://HOST:PORT or http://HOST:PORT/PATH"
        ))
    };
    if let Some(addr) = raw.strip_prefix("tcp://") {
        if addr.is_empty() || addr.contains('/') || !addr.contains(':') {
            return Err(bad());
        }
        return Ok(Check::Tcp(addr.to_string()));
    }
    if let Some(rest) = raw.strip_prefix("http://") {
        let (addr, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if addr.is_empty() {
            return Err(bad());
        }
        let addr = if addr.contains(':') && !addr.ends_with(']') {
            addr.to_string()
        } else {
            format!("{addr}:80")
        };
        return Ok(Check::Http {
            addr,
            path: path.to_string(),
        });
    }
    Err(bad())
}

/// Escapes what may not stand raw in a query value. Sidecar values are
/// labels, numbers and hosts, so this is only belt and braces.
fn percent_encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.:,".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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
fn listen_addrs(flag: &str, raw: &str) -> Result<Vec<SocketAddr>, ConfigError> {
    let bad = |why: &str| ConfigError(format!("{flag}: {raw:?} {why}"));
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
    let labels: Vec<String> = name
        .split('.')
        .map(|l| label("label", l))
        .collect::<Result<_, _>>()
        .map_err(|e| ConfigError(format!("--dns-root: {raw:?}: {e}")))?;
    // Reverse (PTR) records live under `<etcd-prefix>/arpa/`: a root there
    // would put registrations among them.
    if labels.last().is_some_and(|l| l == "arpa") {
        return Err(ConfigError(format!(
            "--dns-root: {raw:?} is in the arpa tree, which is reserved for reverse lookups"
        )));
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> Result<Config, ConfigError> {
        match parse(args.iter().map(OsString::from).collect(), &|_| None)? {
            Command::Serve(c) => Ok(*c),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults_match_the_original() {
        let c = serve(&[]).unwrap();
        assert_eq!(c.listen[0].to_string(), "[::]:8053");
        assert_eq!(c.etcd.endpoints, vec!["http://127.0.0.1:2379"]);
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
        let mut endpoints = c.etcd.endpoints.clone();
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
            (&["--admin-listen-addr", "nope"], "--admin-listen-addr"),
            (&["--default-category", "ns,dns"], "--default-category"),
            (&["--default-category", "arpa"], "--default-category"),
            (&["--dns-root", "in-addr.arpa."], "--dns-root"),
            (&["--etcd-api", "ftp://x:1"], "--etcd-api"),
            (&["--dns-root", "a..b"], "--dns-root"),
            (&["--default-category", "a/b"], "--default-category"),
            (&["--etcd-prefix", "/a/../b"], "--etcd-prefix"),
            (&["--log-level", "loud"], "--log-level"),
            (&["--max-connections", "0"], "--max-connections"),
            (&["--handshake-timeout", "0"], "--handshake-timeout"),
            (&["--max-head-size", "100"], "--max-head-size"),
            (&["--max-message-size", "x"], "--max-message-size"),
            (&["--max-message-rate", "0"], "--max-message-rate"),
            (&["--bogus"], "--bogus"),
        ];
        for (args, flag) in cases {
            let e = serve(args).unwrap_err().to_string();
            assert!(e.contains(flag), "{args:?}: {e}");
        }
    }

    #[test]
    fn admin_listener_is_optional_and_from_the_environment_too() {
        assert_eq!(serve(&[]).unwrap().admin_listen, None);
        let c = serve(&["--admin-listen-addr", "127.0.0.1:9100"]).unwrap();
        assert_eq!(c.admin_listen.unwrap()[0].to_string(), "127.0.0.1:9100");
        let env = |k: &str| (k == "SKYAPI_ADMIN_LISTEN_ADDR").then(|| ":9100".to_string());
        let Command::Serve(c) = parse(Vec::new(), &env).unwrap() else {
            panic!("not a server command");
        };
        assert_eq!(c.admin_listen.unwrap()[0].to_string(), "[::]:9100");
    }

    #[test]
    fn the_sidecar_refuses_reserved_names_before_connecting() {
        let args = |cat: &str| -> Vec<OsString> {
            [
                "provide",
                "--server",
                "ws://127.0.0.1:1",
                "--service",
                "foo",
                "--port",
                "1",
                "--category",
                cat,
            ]
            .iter()
            .map(OsString::from)
            .collect()
        };
        let e = parse(args("ns,dns"), &|_| None).unwrap_err().to_string();
        assert!(e.contains("--category") && e.contains("dns"), "{e}");
        assert!(matches!(
            parse(args("dns,services"), &|_| None),
            Ok(Command::Provide(_))
        ));
    }

    #[test]
    fn limits_have_safe_defaults_and_flags() {
        assert_eq!(serve(&[]).unwrap().limits, Limits::default());
        let c = serve(&[
            "--handshake-timeout",
            "2",
            "--max-head-size",
            "2048",
            "--max-message-size",
            "1000",
            "--max-message-rate",
            "5",
        ])
        .unwrap();
        assert_eq!(
            c.limits,
            Limits {
                handshake_timeout: Duration::from_secs(2),
                max_head: 2048,
                max_message: 1000,
                message_rate: 5.0,
            }
        );
    }
}
