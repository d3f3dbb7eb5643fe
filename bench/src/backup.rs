//! `kvs-bench backup`: back up a loaded cluster to a directory under client traffic, verify it,
//! and restore it into a second, empty cluster: throughput of each (keys/s, MB/s) and the clients'
//! throughput during the backup against their baseline.

use crate::BackupArgs;
use crate::load::{measure, preload_and_baseline};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

fn cluster(endpoints: &[String]) -> kvs_backup::Cluster {
    let admin = kvs_api::AdminClient::default().with_change_timeout(std::time::Duration::from_secs(3600));
    kvs_backup::Cluster::new(endpoints.to_vec(), admin)
}

fn rates(step: &str, seconds: f64, m: &kvs_backup::Manifest) -> serde_json::Value {
    serde_json::json!({
        "step": step,
        "seconds": seconds,
        "records": m.records,
        "bytes": m.bytes,
        "keys_per_sec": m.records as f64 / seconds,
        "mb_per_sec": m.bytes as f64 / seconds / 1e6,
    })
}

pub async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    preload_and_baseline(&args.load).await?;

    let dest = kvs_backup::Destination::open(&args.to)?;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (a, stop) = (args.load.clone(), stop.clone());
        tokio::spawn(async move { measure(&a, stop).await })
    };
    let started = Instant::now();
    let options = kvs_backup::BackupOptions::default();
    let manifest = kvs_backup::backup(&cluster(&args.load.endpoints), &dest, &options, &kvs_backup::Silent).await;
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let during = traffic.await??;
    let manifest = manifest?;
    let mut row = rates("backup", seconds, &manifest);
    row["client_ops_per_sec"] = during.ops_per_sec.into();
    row["client_p99_ms"] = during.p99_ms.into();
    row["client_errors"] = during.errors.into();
    println!("{row}");

    let started = Instant::now();
    kvs_backup::verify(&dest, &kvs_backup::Silent).await?;
    println!("{}", rates("verify", started.elapsed().as_secs_f64(), &manifest));

    let started = Instant::now();
    kvs_backup::restore(&cluster(&args.restore_endpoints), &dest, false, &kvs_backup::Silent).await?;
    println!("{}", rates("restore (verify included)", started.elapsed().as_secs_f64(), &manifest));
    Ok(())
}
