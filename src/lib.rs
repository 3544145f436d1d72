//! skyapi: keeps a SkyDNS entry in etcd v3 for every process that holds a
//! websocket to `/provide`, and removes it when the connection ends.
//!
//! Modules, by concern:
//! - `config`: flags into a validated `Config`;
//! - `admin`: the admin listener for the read endpoints;
//! - `auth`: the token file and access checks (names, reserved labels, @admin);
//! - `provide`: the `/provide` contract: parameters, ids, keys, values;
//! - `http`: request heads, routing helpers and plain responses;
//! - `connection`: one thread per connection: handshake and ping loop;
//! - `ack`: a registration's answer, waking the connection thread;
//! - `liveness`: when to ping, when to drop a client, and stalls of skyapi;
//! - `worker`: the etcd worker's logic behind the `Store` trait;
//! - `etcd`: `Store` on a real etcd through etcd-client;
//! - `watch`: the change feed: a watch on the directory, into the worker;
//! - `health`: whether registrations are being stored, for `/healthz`;
//! - `endpoints`: `/healthz`, `/metrics`, `/services`;
//! - `metrics`: counters and the Prometheus text writer;
//! - `server`: accept loop, signals and shutdown;
//! - `listen`: the listening sockets, bound or passed by systemd, and the
//!   wait for connections on them;
//! - `activation`: systemd's socket-activation protocol (`LISTEN_FDS`);
//! - `supervisor`: systemd's notify protocol: readiness, status, watchdog;
//! - `logging`: log lines for a terminal or for the journal;
//! - `sidecar`: `skyapi provide`, the reconnecting client;
//! - `tls`: rustls configuration for wss://;
//! - `transport`: the socket with a per-read deadline, plain or under TLS;
//! - `error`: the error types of each boundary.

pub mod ack;
pub mod activation;
pub mod admin;
pub mod auth;
pub mod config;
pub mod connection;
pub mod endpoints;
pub mod error;
pub mod etcd;
pub mod health;
pub mod http;
pub mod listen;
pub mod liveness;
pub mod logging;
pub mod metrics;
pub mod provide;
pub mod server;
pub mod sidecar;
pub mod supervisor;
pub mod tls;
pub mod transport;
pub mod watch;
pub mod worker;
