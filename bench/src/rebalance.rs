//! `kvs-bench rebalance`: add one node and remove it again under client traffic; the time, the keys
//! moved against the minimum, and the clients' throughput and errors during each move.

use crate::RebalanceArgs;
use crate::load::{measure, preload_and_baseline};
use anyhow::Context;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Live keys of each partition (first member's count).
fn partition_keys(status: &kvs_api::ClusterStatus) -> Vec<u64> {
    status.partitions.iter().map(|p| p.live_keys.first().copied().flatten().unwrap_or(0)).collect()
}

pub async fn rebalance(args: RebalanceArgs) -> anyhow::Result<()> {
    let admin = kvs_api::AdminClient::default().with_change_timeout(Duration::from_secs(3600));
    let members = args.load.endpoints.clone();
    let primary = members[0].clone();
    preload_and_baseline(&args.load).await?;
    let with_new: Vec<String> = members.iter().cloned().chain([args.add.clone()]).collect();
    for (step, target) in [("add", with_new), ("remove", members.clone())] {
        let before = admin.status(&primary).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let traffic = {
            let (a, stop) = (args.load.clone(), stop.clone());
            tokio::spawn(async move { measure(&a, stop).await })
        };
        let started = Instant::now();
        let changed = admin.change_view_paced(&primary, target, args.replication_factor, args.transfer_rate).await;
        let seconds = started.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let during = traffic.await??;
        let changed = changed.with_context(|| format!("{step} failed"))?;
        let after = admin.status(&primary).await?;
        let (p_before, p_after) = (partition_keys(&before), partition_keys(&after));
        // Keys that changed partition: the new partition's keys on add, the removed one's on remove.
        let distinct_moved =
            if p_after.len() > p_before.len() { p_after.last().copied() } else { p_before.last().copied() }
                .unwrap_or(0);
        let partitions = p_after.len().max(p_before.len()) as u64;
        let minimum = args.load.keys / partitions;
        let copies = changed.moved_keys;
        println!(
            "{}",
            serde_json::json!({
                "step": step,
                "seconds": seconds,
                "partitions_before": p_before.len(),
                "partitions_after": p_after.len(),
                "keys_changing_partition": distinct_moved,
                "minimum": minimum,
                "moved_vs_minimum": distinct_moved as f64 / minimum.max(1) as f64,
                "record_copies_sent": copies,
                "keys_per_sec": distinct_moved as f64 / seconds,
                "copies_per_sec": copies as f64 / seconds,
                "client_ops_per_sec": during.ops_per_sec,
                "client_p99_ms": during.p99_ms,
                "client_errors": during.errors,
            })
        );
    }
    Ok(())
}
