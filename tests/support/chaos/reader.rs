//! Every key under a prefix through etcd's JSON gateway, with plain
//! sockets: cheap enough to poll every 100 ms.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::super::client::is_timeout;
use super::super::etcd::base64_decode;

/// Reads every key under a prefix through etcd's JSON gateway
/// (`POST /v3/kv/range`, a linearizable read) with plain sockets: cheap
/// enough to poll every 100 ms, where an `etcdctl` process per read would
/// cost a core. Tries the members in turn, starting with the last that
/// answered.
pub struct EtcdReader {
    ports: Vec<u16>,
    next: usize,
    pub timeout: Duration,
}

impl EtcdReader {
    pub fn new(ports: Vec<u16>) -> EtcdReader {
        EtcdReader {
            ports,
            next: 0,
            timeout: Duration::from_secs(1),
        }
    }

    /// The raft term and `(key, value)` of every key under `prefix`, or why
    /// no member answered.
    pub fn read(&mut self, prefix: &str) -> Result<(u64, Vec<(String, String)>), String> {
        let mut why = Vec::new();
        for i in 0..self.ports.len() {
            let n = (self.next + i) % self.ports.len();
            match range(self.ports[n], prefix, self.timeout) {
                Ok(kvs) => {
                    self.next = n;
                    return Ok(kvs);
                }
                Err(e) => why.push(format!("{}: {e}", self.ports[n])),
            }
        }
        Err(why.join("; "))
    }
}

/// Standard base64 with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The end of etcd's range for `prefix`: the prefix with its last byte + 1.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    let last = end.pop().expect("non-empty prefix");
    end.push(last + 1);
    end
}

fn range(
    port: u16,
    prefix: &str,
    timeout: Duration,
) -> Result<(u64, Vec<(String, String)>), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_millis(300)).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + timeout;
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    let body = json!({"key": base64_encode(prefix.as_bytes()),
                      "range_end": base64_encode(&prefix_end(prefix))})
    .to_string();
    // HTTP/1.0: Go's server then neither chunks nor keeps the connection.
    write!(
        s,
        "POST /v3/kv/range HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e.to_string()),
        }
        if Instant::now() >= deadline {
            return Err(format!("no answer within {timeout:?}"));
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not HTTP: {text:?}"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "{}: {}",
            head.lines().next().unwrap_or(""),
            body.trim()
        ));
    }
    let doc: Value = serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))?;
    let field = |kv: &Value, name: &str| -> Result<String, String> {
        let b64 = kv[name].as_str().unwrap_or("");
        base64_decode(b64)
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| format!("bad {name} in {kv}"))
    };
    // The gateway writes 64-bit numbers as strings.
    let term = doc["header"]["raft_term"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| format!("no raft_term in {}", doc["header"]))?;
    let kvs = doc["kvs"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|kv| Ok((field(kv, "key")?, field(kv, "value")?)))
        .collect::<Result<_, String>>()?;
    Ok((term, kvs))
}
