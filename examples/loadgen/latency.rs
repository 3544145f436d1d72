//! Registration and removal latency, one provider at a time, beside a bare
//! etcd put/get/delete of the same value from the same client library.
//!
//! Each round does the bare etcd calls, then one skyapi registration:
//! - bare: `put` (with a lease, as skyapi's keys have), then `get`; later
//!   `delete`; each also timed until the prefix watch reports it; then the
//!   same put as a one-operation transaction (skyapi's form), and a delete;
//! - skyapi: TCP connect, upgrade, welcome (sent by skyapi only after its
//!   etcd transaction succeeded), then a `get` that must find the key; then
//!   the close frame, and the time until the watch reports the delete, and a
//!   `get` that must not find it.
//!
//! "Registered" is measured from the moment the upgrade request is written
//! (TCP already connected) to the welcome; `after_upgrade` starts at the
//! 101 answer instead, `from_connect` before the TCP connect. The bare and
//! skyapi rounds alternate, so both see the same etcd.

use std::time::{Duration, Instant};

use etcd_client::{Client, GetResponse, PutOptions, Txn, TxnOp};
use serde_json::json;

use crate::client::{self, Target};
use crate::etcd::{self, Watch};
use crate::stats::{round3, Samples};

pub struct Opts {
    pub count: usize,
    pub warmup: usize,
    pub service: String,
    pub key_dir: String,
}

/// Bound on each step of a round.
const STEP: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Figures {
    bare_put: Samples,
    bare_txn_put: Samples,
    bare_put_get: Samples,
    bare_put_watch: Samples,
    bare_delete: Samples,
    bare_delete_watch: Samples,
    sky_upgraded: Samples,
    sky_registered: Samples,
    sky_registered_after_upgrade: Samples,
    sky_registered_from_connect: Samples,
    sky_registered_get: Samples,
    sky_registered_watch: Samples,
    sky_removed_watch: Samples,
    sky_close_answered: Samples,
    confirmed_present: usize,
    confirmed_gone: usize,
    failures: Vec<String>,
}

pub async fn run(
    target: &Target,
    etcd_endpoint: &str,
    opts: &Opts,
) -> Result<serde_json::Value, String> {
    let client = etcd::connect(etcd_endpoint).await?;
    let mut kv = client.clone();
    let lease = kv
        .lease_grant(120, None)
        .await
        .map_err(|e| format!("lease grant: {e}"))?
        .id();
    let bare_dir = format!("/bench/bare/{}/", opts.service);
    let sky_dir = etcd::service_prefix(&opts.key_dir, &opts.service);
    let mut bare_watch = Watch::start(&client, &bare_dir).await?;
    let mut sky_watch = Watch::start(&client, &sky_dir).await?;

    // The value skyapi stores, read back once, so the bare put writes the
    // very same bytes.
    let value = {
        let mut c = client::open(target, &opts.service, 65535, STEP).await?;
        let w = c.welcome(STEP).await?;
        let got = get(&mut kv, &w.key).await?;
        let v = got
            .kvs()
            .first()
            .map(|kv| kv.value().to_vec())
            .ok_or("the first registration is not in etcd after its welcome")?;
        c.close(STEP).await?;
        v
    };
    eprintln!(
        "latency: {} warm-up + {} rounds; value {} bytes",
        opts.warmup,
        opts.count,
        value.len()
    );

    let mut f = Figures::default();
    let started = Instant::now();
    for i in 0..opts.warmup + opts.count {
        let record = i >= opts.warmup;
        if let Err(e) = bare_round(
            &client,
            &mut bare_watch,
            &bare_dir,
            i,
            &value,
            lease,
            record,
            &mut f,
        )
        .await
        {
            f.failures.push(format!("bare {i}: {e}"));
        }
        if let Err(e) = sky_round(target, &client, &mut sky_watch, opts, i, record, &mut f).await {
            f.failures.push(format!("skyapi {i}: {e}"));
        }
        if f.failures.len() > 20 {
            return Err(format!("too many failures: {:?}", f.failures));
        }
    }
    // The bare keys are deleted already; the lease goes with them.
    let _ = kv.lease_revoke(lease).await;

    let p50 = |s: &Samples| {
        s.percentile(50.0)
            .map(|d| d.as_secs_f64())
            .unwrap_or(f64::NAN)
    };
    Ok(json!({
        "rounds": opts.count,
        "warmup": opts.warmup,
        "seconds": round3(started.elapsed().as_secs_f64()),
        "value_bytes": value.len(),
        "bare_put": f.bare_put.summary(),
        "bare_txn_put": f.bare_txn_put.summary(),
        "bare_put_get": f.bare_put_get.summary(),
        "bare_put_watch": f.bare_put_watch.summary(),
        "bare_delete": f.bare_delete.summary(),
        "bare_delete_watch": f.bare_delete_watch.summary(),
        "sky_upgraded": f.sky_upgraded.summary(),
        "sky_registered": f.sky_registered.summary(),
        "sky_registered_after_upgrade": f.sky_registered_after_upgrade.summary(),
        "sky_registered_from_connect": f.sky_registered_from_connect.summary(),
        "sky_registered_get": f.sky_registered_get.summary(),
        "sky_registered_watch": f.sky_registered_watch.summary(),
        "sky_removed_watch": f.sky_removed_watch.summary(),
        "sky_close_answered": f.sky_close_answered.summary(),
        "ratio_p50_registered_vs_put": round3(p50(&f.sky_registered) / p50(&f.bare_put)),
        "ratio_p50_registered_after_upgrade_vs_put": round3(p50(&f.sky_registered_after_upgrade) / p50(&f.bare_put)),
        "ratio_p50_registered_get_vs_put_get": round3(p50(&f.sky_registered_get) / p50(&f.bare_put_get)),
        "ratio_p50_registered_watch_vs_put_watch": round3(p50(&f.sky_registered_watch) / p50(&f.bare_put_watch)),
        "confirmed_present_after_welcome": f.confirmed_present,
        "confirmed_gone_after_delete_event": f.confirmed_gone,
        "failures": f.failures,
    }))
}

/// A `get` of one key, its error worded as every round reports it.
async fn get(kv: &mut Client, key: &str) -> Result<GetResponse, String> {
    kv.get(key, None).await.map_err(|e| format!("get: {e}"))
}

#[allow(clippy::too_many_arguments)] // one round's whole context; a struct would only rename it
async fn bare_round(
    client: &Client,
    watch: &mut Watch,
    dir: &str,
    i: usize,
    value: &[u8],
    lease: i64,
    record: bool,
    f: &mut Figures,
) -> Result<(), String> {
    let mut kv = client.clone();
    let key = format!("{dir}{i:040x}");
    let t = Instant::now();
    kv.put(
        key.as_str(),
        value,
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .map_err(|e| format!("put: {e}"))?;
    let put = t.elapsed();
    let got = get(&mut kv, &key).await?;
    let put_get = t.elapsed();
    if got.kvs().is_empty() {
        return Err("key not readable after put".into());
    }
    let put_watch = watch
        .wait_for(&key, true, STEP)
        .await
        .ok_or("no put event")?
        .duration_since(t);
    let t = Instant::now();
    kv.delete(key.as_str(), None)
        .await
        .map_err(|e| format!("delete: {e}"))?;
    let delete = t.elapsed();
    let delete_watch = watch
        .wait_for(&key, false, STEP)
        .await
        .ok_or("no delete event")?
        .duration_since(t);
    // The same put as a one-operation transaction, which is what skyapi
    // sends (its batches are transactions), on a key of its own.
    let txn_key = format!("{dir}t{i:039x}");
    let t = Instant::now();
    kv.txn(Txn::new().and_then([TxnOp::put(
        txn_key.as_str(),
        value,
        Some(PutOptions::new().with_lease(lease)),
    )]))
    .await
    .map_err(|e| format!("txn: {e}"))?;
    let txn_put = t.elapsed();
    kv.delete(txn_key.as_str(), None)
        .await
        .map_err(|e| format!("delete: {e}"))?;
    if record {
        f.bare_put.push(put);
        f.bare_txn_put.push(txn_put);
        f.bare_put_get.push(put_get);
        f.bare_put_watch.push(put_watch);
        f.bare_delete.push(delete);
        f.bare_delete_watch.push(delete_watch);
    }
    Ok(())
}

async fn sky_round(
    target: &Target,
    client: &Client,
    watch: &mut Watch,
    opts: &Opts,
    i: usize,
    record: bool,
    f: &mut Figures,
) -> Result<(), String> {
    let mut kv = client.clone();
    // Ports 1..=count: a distinct key per round.
    let port = (i % 65534) as u32 + 1;
    let mut conn = client::open(target, &opts.service, port, STEP).await?;
    let welcome = conn.welcome(STEP).await?;
    let got = get(&mut kv, &welcome.key).await?;
    let got_at = Instant::now();
    let present = !got.kvs().is_empty();
    let put_seen = watch
        .wait_for(&welcome.key, true, STEP)
        .await
        .ok_or("no put event")?;
    let (started, connected, upgraded) = (conn.started, conn.connected, conn.upgraded);

    let closed = conn.close(STEP).await?;
    let gone_seen = watch
        .wait_for(&welcome.key, false, STEP)
        .await
        .ok_or("no delete event within 5 s of the close")?;
    let after = get(&mut kv, &welcome.key).await?;
    if record {
        f.sky_upgraded.push(upgraded.duration_since(connected));
        f.sky_registered.push(welcome.at.duration_since(connected));
        f.sky_registered_after_upgrade
            .push(welcome.at.duration_since(upgraded));
        f.sky_registered_from_connect
            .push(welcome.at.duration_since(started));
        f.sky_registered_get.push(got_at.duration_since(connected));
        f.sky_registered_watch
            .push(put_seen.duration_since(connected));
        f.sky_removed_watch
            .push(gone_seen.duration_since(closed.sent));
        f.sky_close_answered
            .push(closed.answered.duration_since(closed.sent));
        f.confirmed_present += usize::from(present);
        f.confirmed_gone += usize::from(after.kvs().is_empty());
    }
    if !present {
        return Err("key not readable after the welcome".into());
    }
    Ok(())
}
