//! `Store` on a real etcd v3, through etcd-client.
//!
//! etcd-client is async and needs a Tokio reactor (it panics under
//! `pollster::block_on`), so this store owns a current-thread Tokio runtime
//! and blocks on one request at a time. It lives on the etcd worker thread
//! and is the only async code in the program.
//!
//! Invariants: every call returns within `REQUEST_TIMEOUT` (plus connect
//! time), so a hung etcd never freezes the worker; there is one client per
//! endpoint, created lazily, and a member that does not answer is left for
//! the next one (a failed request is sent on at once); the keepalive stream
//! (which etcd-client neither times nor rebuilds) is reopened, on the
//! current member, after any failure.

use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse,
    TxnResponse, WatchOptions, WatchStream,
};
use tokio::runtime::Runtime;
use tonic::Code;

use crate::config::EtcdConfig;
use crate::error::StoreError;
use crate::worker::{Change, Guard, Store, StoredKv};

/// Bound on one etcd request. Short, so queued work is retried promptly
/// after etcd comes back; long enough for a loaded etcd to answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(1500);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
/// Keys per page of the reconcile's range read.
const LIST_PAGE: i64 = 10_000;

/// One client per endpoint, used one at a time: the store fails over to
/// the next endpoint itself when the current one does not answer, rather
/// than leaving it to a load balancer that may pick a hung member again.
pub struct EtcdStore {
    rt: Runtime,
    config: EtcdConfig,
    clients: Vec<Option<Client>>,
    current: usize,
    keeper: Option<(i64, LeaseKeeper, LeaseKeepAliveStream)>,
    /// Whether the last call ran on a client connected (and logged in) for
    /// it: a refused token is then not stale, and logging in again would
    /// only cost etcd another bcrypt.
    last_call_fresh: bool,
}

/// HTTP/2 ping interval and answer timeout. etcd (grpc-go) closes a
/// connection that pings more often than `--grpc-keepalive-min-time` (5 s
/// by default) while it sends little back ("too_many_pings"): measured,
/// pinging every 500 ms, an idle watch was cut every 2.5 s, and under auth
/// the worker's connection every keepalive (each time a new login, a
/// bcrypt for etcd). A hung member is found by the request timeout
/// (`REQUEST_TIMEOUT`) first; the pings find a dead idle connection (the
/// watch's) within about 9 s.
const PINGS: (Duration, Duration) = (Duration::from_secs(6), Duration::from_secs(3));

impl EtcdStore {
    pub fn new(config: EtcdConfig) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let clients = config.endpoints.iter().map(|_| None).collect();
        Ok(EtcdStore {
            rt,
            config,
            clients,
            current: 0,
            keeper: None,
            last_call_fresh: false,
        })
    }

    /// Runs one etcd call against the current endpoint's client, bounded in
    /// time; when the endpoint does not answer, the next call goes to the
    /// next endpoint.
    fn call<T, F, Fut>(&mut self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.last_call_fresh = self.clients[self.current].is_none();
        let result = match self.client() {
            Ok(client) => match self
                .rt
                .block_on(async { tokio::time::timeout(REQUEST_TIMEOUT, f(client)).await })
            {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(classify(e)),
                Err(_) => Err(StoreError::Unreachable(format!(
                    "no answer within {} ms",
                    REQUEST_TIMEOUT.as_millis()
                ))),
            },
            Err(e) => Err(e),
        };
        match &result {
            Err(StoreError::Unreachable(_)) => self.fail_over(),
            // The token etcd no longer accepts lives in the client (and in
            // the keepalive stream): the next call logs in afresh.
            Err(StoreError::Auth(_)) => {
                self.keeper = None;
                self.clients[self.current] = None;
            }
            _ => {}
        }
        result
    }

    /// Drops the current endpoint's client (and the keepalive stream, which
    /// is pinned to its connection) and moves on to the next endpoint.
    fn fail_over(&mut self) {
        self.keeper = None;
        self.clients[self.current] = None;
        self.current = (self.current + 1) % self.clients.len();
    }

    /// `call` for a request that may be sent again: when a member does not
    /// answer, the request is sent at once to the next one (each member at
    /// most once), rather than 0.5 s later by the worker's retry; when etcd
    /// refuses our token (stale after a user or role change, or expired), it
    /// is sent once more on a fresh login, as etcd's own Go client does.
    fn unary<T, F, Fut>(&mut self, f: F) -> Result<T, StoreError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut attempt = 1;
        let mut relogged = false;
        loop {
            match self.call(&f) {
                Err(StoreError::Unreachable(why)) if attempt < self.clients.len() => {
                    log::debug!("etcd: {why}; trying the next member");
                    attempt += 1;
                }
                Err(StoreError::Auth(why)) if !relogged && self.may_log_in_again() => {
                    log::info!("etcd: {why}; logging in again and retrying");
                    relogged = true;
                }
                other => return other,
            }
        }
    }

    /// After an `Auth` error: whether the token refused may be stale (see
    /// `last_call_fresh`), so a fresh login can help.
    fn may_log_in_again(&self) -> bool {
        self.config.user.is_some() && !self.last_call_fresh
    }

    fn client(&mut self) -> Result<Client, StoreError> {
        if let Some(c) = &self.clients[self.current] {
            return Ok(c.clone());
        }
        // HTTP/2 pings find a connection to a member that hangs (frozen,
        // partitioned).
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(PINGS.0, PINGS.1)
            .with_keep_alive_while_idle(true);
        if let Some((user, password)) = &self.config.user {
            // etcd's simple tokens expire (5 minutes by default): have the
            // client authenticate again when etcd calls the token invalid.
            options = options
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        if self.config.ca.is_some() || self.config.identity.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.config.ca {
                tls = tls.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &self.config.identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            options = options.with_tls(tls);
        }
        let endpoint = [self.config.endpoints[self.current].clone()];
        let connected = self.rt.block_on(async {
            tokio::time::timeout(
                CONNECT_TIMEOUT + REQUEST_TIMEOUT,
                Client::connect(endpoint, Some(options)),
            )
            .await
        });
        match connected {
            Ok(Ok(c)) => {
                self.clients[self.current] = Some(c.clone());
                Ok(c)
            }
            // A refused login (wrong password) is `Auth`: the worker then
            // backs off instead of hammering etcd's bcrypt.
            Ok(Err(e)) => Err(match classify(e) {
                StoreError::Auth(m) => StoreError::Auth(format!("connect: {m}")),
                StoreError::Unreachable(m) => StoreError::Unreachable(format!("connect: {m}")),
                other => other,
            }),
            Err(_) => Err(StoreError::Unreachable("connect timed out".into())),
        }
    }

    /// One keepalive on the open stream, or opening it.
    fn keep_alive_once(&mut self, lease: i64) -> Result<(), StoreError> {
        if self.keeper.as_ref().is_some_and(|(id, _, _)| *id != lease) {
            self.keeper = None;
        }
        match self.keeper.take() {
            Some((id, mut keeper, mut stream)) => {
                let answer = self.call(|_| async {
                    keeper.keep_alive().await?;
                    stream.message().await
                })?;
                match answer {
                    Some(r) if r.ttl() > 0 => {
                        self.keeper = Some((id, keeper, stream));
                        Ok(())
                    }
                    Some(_) => Err(StoreError::LeaseNotFound),
                    // etcd ended the stream; the next call reopens it.
                    None => Err(StoreError::Unreachable("keepalive stream closed".into())),
                }
            }
            None => {
                // Opening the stream sends the first keepalive and reads its
                // answer; a dead lease comes back as an error.
                let (keeper, stream) =
                    self.call(|mut c| async move { c.lease_keep_alive(lease).await })?;
                self.keeper = Some((lease, keeper, stream));
                Ok(())
            }
        }
    }
}

/// Sorts an etcd-client error by what the worker must do about it.
fn classify(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(status) => classify_status(status.code(), status.message()),
        E::LeaseKeepAliveError(msg) if msg.contains("lease not found") => StoreError::LeaseNotFound,
        other => StoreError::Unreachable(error_chain(&other)),
    }
}

/// Sorts an answer of etcd by its gRPC code and message. etcd's codes are
/// too coarse on their own (a stale token and a too-large request are both
/// `InvalidArgument`), so its messages (stable across 3.4 to 3.6, from
/// `api/v3rpc/rpctypes`) decide first.
fn classify_status(code: Code, msg: &str) -> StoreError {
    let has = |s: &str| msg.contains(s);
    if has("lease not found") {
        StoreError::LeaseNotFound
    } else if has("database space exceeded") {
        StoreError::RefusingWrites("database space exceeded (NOSPACE alarm)".into())
    } else if has("corrupt") {
        StoreError::RefusingWrites(format!("data corruption detected (CORRUPT alarm): {msg}"))
    } else if has("revision of auth store is old")
        || has("invalid auth token")
        || has("user name is empty")
        || has("authentication failed")
        || has("invalid auth management")
        || code == Code::Unauthenticated
    {
        StoreError::Auth(msg.to_string())
    } else if code == Code::PermissionDenied || has("permission denied") {
        StoreError::PermissionDenied(msg.to_string())
    } else if has("too large")
        || has("too many operations")
        || has("larger than max")
        || has("duplicate key")
        || has("key is not provided")
    {
        StoreError::BadRequest(msg.to_string())
    } else {
        match code {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                StoreError::BadRequest(msg.to_string())
            }
            // Unavailable, DeadlineExceeded, "leader changed", "too many
            // requests" (ResourceExhausted), ...: etcd is not serving us now.
            _ => StoreError::Unreachable(msg.to_string()),
        }
    }
}

impl Store for EtcdStore {
    fn grant(&mut self, ttl_secs: i64) -> Result<i64, StoreError> {
        self.unary(|mut c| async move { c.lease_grant(ttl_secs, None).await })
            .map(|r| r.id())
    }

    fn keep_alive(&mut self, lease: i64) -> Result<(), StoreError> {
        let reused = self.keeper.is_some();
        // A stale token is refreshed here as in `unary`.
        match self.keep_alive_once(lease) {
            Err(StoreError::Auth(why)) if self.may_log_in_again() => {
                log::info!("etcd: {why}; logging in again and retrying the keepalive");
                self.keep_alive_once(lease)
            }
            // A stream that sat idle between keepalives may have been
            // closed by etcd meanwhile (a GOAWAY: a restart, its ping
            // policy): that is not etcd being unreachable until a fresh
            // connection fails too (on the next member, if there is one).
            Err(StoreError::Unreachable(why)) if reused => {
                log::debug!("etcd keepalive stream broken ({why}); reopening it");
                self.keep_alive_once(lease)
            }
            other => other,
        }
    }

    fn revoke(&mut self, lease: i64) -> Result<(), StoreError> {
        self.keeper = None;
        match self.unary(|mut c| async move { c.lease_revoke(lease).await }) {
            Err(StoreError::LeaseNotFound) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    fn put(
        &mut self,
        kvs: &[(String, String, Guard)],
        lease: i64,
    ) -> Result<(i64, Vec<bool>), StoreError> {
        let ops: Vec<TxnOp> = kvs
            .iter()
            .map(|(k, v, guard)| {
                let put = TxnOp::put(
                    k.as_str(),
                    v.as_str(),
                    Some(PutOptions::new().with_lease(lease)),
                );
                // A guarded put is a nested transaction, so each key's
                // comparison decides for that key alone. etcd compares a
                // missing key's lease as 0.
                let when = match guard {
                    Guard::Always => return put,
                    Guard::Free => Compare::lease(k.as_str(), CompareOp::Equal, 0),
                    Guard::Ours => Compare::lease(k.as_str(), CompareOp::Equal, lease),
                };
                TxnOp::txn(Txn::new().when([when]).and_then([put]))
            })
            .collect();
        let txn = Txn::new().and_then(ops);
        let resp = self.unary(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let nested = nested_results(&resp, kvs.len());
        let written = kvs
            .iter()
            .zip(nested)
            .map(|((_, _, guard), ok)| *guard == Guard::Always || ok)
            .collect();
        Ok((revision, written))
    }

    fn rewrite_owned(
        &mut self,
        (key, value): &(String, String),
        lease: i64,
    ) -> Result<Option<i64>, StoreError> {
        // A top-level comparison: etcd's quota check counts the put in the
        // success branch (it does not look into nested transactions).
        let txn = Txn::new()
            .when([Compare::lease(key.as_str(), CompareOp::Equal, lease)])
            .and_then([TxnOp::put(
                key.as_str(),
                value.as_str(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let resp = self.unary(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map(|h| h.revision()))
            .flatten())
    }

    fn delete_if(&mut self, keys: &[(String, i64)]) -> Result<Vec<bool>, StoreError> {
        // One outer transaction of nested ones, each deleting its key only if
        // the key is still attached to the lease given (0: to none).
        let ops: Vec<TxnOp> = keys
            .iter()
            .map(|(k, lease)| {
                TxnOp::txn(
                    Txn::new()
                        .when([Compare::lease(k.as_str(), CompareOp::Equal, *lease)])
                        .and_then([TxnOp::delete(k.as_str(), None)]),
                )
            })
            .collect();
        let txn = Txn::new().and_then(ops);
        let resp = self.unary(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })?;
        // A missing key compares as lease 0: "succeeded" alone would call it
        // deleted, so count what etcd says it deleted.
        let deleted = resp
            .op_responses()
            .iter()
            .map(|op| match op {
                TxnOpResponse::Txn(t) => t
                    .op_responses()
                    .iter()
                    .any(|inner| matches!(inner, TxnOpResponse::Delete(d) if d.deleted() > 0)),
                _ => false,
            })
            .collect::<Vec<_>>();
        Ok(pad(deleted, keys.len()))
    }

    fn list(&mut self, dir: &str) -> Result<Vec<StoredKv>, StoreError> {
        // Keys only, in pages: the answer for tens of thousands of entries
        // stays far below gRPC's 4 MiB message limit, and values (which the
        // reconcile does not need) are never sent.
        let end = prefix_end(dir.as_bytes());
        let mut from = dir.as_bytes().to_vec();
        let mut out = Vec::new();
        loop {
            let resp = self.unary(|mut c| {
                let (start, range_end) = (from.clone(), end.clone());
                async move {
                    let options = GetOptions::new()
                        .with_range(range_end)
                        .with_keys_only()
                        .with_limit(LIST_PAGE);
                    c.get(start, Some(options)).await
                }
            })?;
            out.extend(resp.kvs().iter().map(|kv| StoredKv {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                lease: kv.lease(),
                mod_revision: kv.mod_revision(),
            }));
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(out),
            }
        }
    }
}

/// Per nested transaction of `resp`, whether its comparison held.
fn nested_results(resp: &TxnResponse, n: usize) -> Vec<bool> {
    let got = resp
        .op_responses()
        .iter()
        .map(|op| matches!(op, TxnOpResponse::Txn(t) if t.succeeded()))
        .collect();
    pad(got, n)
}

/// `n` answers, however many etcd sent (it sends one per operation): a
/// missing one counts as "not done", which only costs a log line.
fn pad(mut v: Vec<bool>, n: usize) -> Vec<bool> {
    v.resize(n, false);
    v
}

/// The watch on the directory, for `watch.rs`: its own store (own runtime,
/// own client), since a watch stream must be read while the worker blocks
/// on its channel.
impl EtcdStore {
    /// Opens a watch on every key under `dir`, from revision `from` (None:
    /// from now); etcd answers the creation first.
    pub fn open_watch(&mut self, dir: &str, from: Option<i64>) -> Result<WatchStream, StoreError> {
        let end = prefix_end(dir.as_bytes());
        let key = dir.as_bytes().to_vec();
        self.unary(|mut c| {
            let mut options = WatchOptions::new().with_range(end.clone());
            if let Some(rev) = from {
                options = options.with_start_revision(rev);
            }
            let key = key.clone();
            async move { c.watch(key, Some(options)).await }
        })
    }

    /// The next answer on the watch, waiting as long as it takes (a dead
    /// connection is found by the client's HTTP/2 pings); `None` when etcd
    /// ended the stream.
    pub fn next_watch(&mut self, stream: &mut WatchStream) -> Result<Option<Watched>, StoreError> {
        let msg = self.rt.block_on(stream.message()).map_err(classify)?;
        let Some(resp) = msg else { return Ok(None) };
        if resp.canceled() {
            return Ok(Some(if resp.compact_revision() > 0 {
                Watched::Compacted(resp.compact_revision())
            } else {
                Watched::Canceled(resp.cancel_reason().to_string())
            }));
        }
        if resp.created() {
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            return Ok(Some(Watched::Created(revision)));
        }
        let changes = resp
            .events()
            .iter()
            .filter_map(|ev| {
                let kv = ev.kv()?;
                let deleted = matches!(ev.event_type(), EventType::Delete);
                Some(Change {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    lease: if deleted { 0 } else { kv.lease() },
                    mod_revision: kv.mod_revision(),
                    deleted,
                })
            })
            .collect();
        Ok(Some(Watched::Changes(changes)))
    }

    /// Forgets every client (after a broken watch, so the next one connects
    /// afresh, to the next member if this one failed).
    pub fn reset(&mut self) {
        self.fail_over();
    }
}

/// One answer on the watch.
pub enum Watched {
    /// The watch is in place; etcd's revision when it was created.
    Created(i64),
    Changes(Vec<Change>),
    /// The revision asked for is compacted away (etcd's oldest is this).
    Compacted(i64),
    /// etcd ended the watch for another reason (permissions, shutdown).
    Canceled(String),
}

/// An error with its causes: tonic's own text ("transport error") hides
/// what an operator needs ("invalid peer certificate: UnknownIssuer").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// The end of the range holding every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: to the end of the keyspace.
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Messages as etcd 3.4 sends them (`etcdctl` prints the same text).
    #[test]
    fn etcd_answers_are_sorted_by_what_to_do() {
        let cases = [
            (
                Code::ResourceExhausted,
                "etcdserver: mvcc: database space exceeded",
                "refusing",
            ),
            (Code::DataLoss, "etcdserver: corrupt cluster", "refusing"),
            (
                Code::InvalidArgument,
                "etcdserver: revision of auth store is old",
                "auth",
            ),
            (
                Code::Unauthenticated,
                "etcdserver: invalid auth token",
                "auth",
            ),
            (
                Code::InvalidArgument,
                "etcdserver: authentication failed, invalid user ID or password",
                "auth",
            ),
            (
                Code::PermissionDenied,
                "etcdserver: permission denied",
                "denied",
            ),
            (
                Code::NotFound,
                "etcdserver: requested lease not found",
                "lease",
            ),
            (
                Code::InvalidArgument,
                "etcdserver: request is too large",
                "bad",
            ),
            (
                Code::InvalidArgument,
                "etcdserver: too many operations in txn request",
                "bad",
            ),
            (
                Code::Unavailable,
                "etcdserver: leader changed",
                "unreachable",
            ),
            (
                Code::ResourceExhausted,
                "etcdserver: too many requests",
                "unreachable",
            ),
            (
                Code::DeadlineExceeded,
                "context deadline exceeded",
                "unreachable",
            ),
        ];
        for (code, msg, want) in cases {
            let got = classify_status(code, msg);
            let kind = match &got {
                StoreError::RefusingWrites(_) => "refusing",
                StoreError::Auth(_) => "auth",
                StoreError::PermissionDenied(_) => "denied",
                StoreError::LeaseNotFound => "lease",
                StoreError::BadRequest(_) => "bad",
                StoreError::Unreachable(_) => "unreachable",
            };
            assert_eq!(kind, want, "{code:?} {msg:?} -> {got:?}");
        }
        assert_eq!(
            classify_status(
                Code::ResourceExhausted,
                "etcdserver: mvcc: database space exceeded"
            )
            .to_string(),
            "etcd refuses writes: database space exceeded (NOSPACE alarm)"
        );
    }
}
