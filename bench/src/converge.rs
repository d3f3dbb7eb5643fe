//! `kvs-bench converge`: how long a paused replica takes, once resumed, to hold every key written
//! through its partner meanwhile (anti-entropy convergence).

use crate::ConvergeArgs;
use anyhow::{Context, bail};
use std::time::{Duration, Instant};

pub async fn live_keys(http: &reqwest::Client, node: &str) -> anyhow::Result<u64> {
    let text = http.get(format!("http://{node}/metrics")).send().await?.text().await?;
    let line = text.lines().find(|l| l.starts_with("kvs_keys{state=\"live\"}")).context("no kvs_keys metric")?;
    Ok(line.rsplit(' ').next().unwrap_or("0").parse::<f64>()? as u64)
}

fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let ok = std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status()?.success();
    if !ok {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

pub async fn converge(args: ConvergeArgs) -> anyhow::Result<()> {
    let http = kvs_api::http_client().timeout(Duration::from_secs(10)).build()?;
    let partition: serde_json::Value =
        http.get(format!("http://{}/kv-store/get_partition_id", args.replica)).send().await?.json().await?;
    let partition = partition["partition_id"].as_i64().context("the replica reports no partition_id")?;
    let before = live_keys(&http, &args.replica).await?;
    signal(args.pause_pid, "STOP")?;
    // Write until `keys` of them landed in the paused replica's partition (others are forwarded
    // elsewhere and do not concern it).
    let written = async {
        let mut mine = 0;
        let mut i = 0u64;
        while mine < args.keys {
            i += 1;
            let resp = http
                .put(format!("http://{}/v1/kv/converge_{}_{i}", args.via, std::process::id()))
                .body("v")
                .send()
                .await?;
            if !resp.status().is_success() {
                bail!("write failed: {}", resp.status());
            }
            let w: serde_json::Value = resp.json().await?;
            if w["partition_id"].as_i64() == Some(partition) {
                mine += 1;
            }
        }
        Ok(())
    }
    .await;
    signal(args.pause_pid, "CONT")?;
    written?;
    let resumed = Instant::now();
    let deadline = resumed + Duration::from_secs(30);
    loop {
        let now = live_keys(&http, &args.replica).await.unwrap_or(0);
        if now >= before + args.keys {
            break;
        }
        if Instant::now() > deadline {
            bail!("replica did not converge within 30 s ({} of {} keys)", now.saturating_sub(before), args.keys);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ms = resumed.elapsed().as_secs_f64() * 1000.0;
    println!("{}", serde_json::json!({"converge_ms": ms, "keys": args.keys}));
    Ok(())
}
