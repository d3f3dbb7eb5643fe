//! Checking a backup against its manifest, and restoring it.
//!
//! [`verify`] re-reads every file: the header, every record, the counts, the size and the SHA-256
//! the manifest names, and that every key lies in its partition's slots.
//!
//! [`restore`] verifies first (nothing is written from a damaged backup), then streams each file's
//! records in batches to the cluster, whose receiving node stores each batch on every owner of its
//! keys under the cluster's own view — so the target may have any size and K. A cluster that
//! already holds keys is refused unless `overwrite` is asked; then the two merge key by key, the
//! newer version winning (a restored key older than the cluster's stays as the cluster has it).

use crate::format::{FileSummary, FrameDecoder, MANIFEST, Manifest, PartitionFile};
use crate::{BackupError, Cluster, Destination, Progress};
use futures::StreamExt;
use kvs_api::backup::BackupRecord;
use kvs_api::slot_of;
use std::time::Duration;

/// Records and bytes per restore request.
const BATCH_RECORDS: usize = 2_000;
const BATCH_BYTES: usize = 2 << 20;
/// Attempts per batch (a node answers 503 while an owner is unreachable).
const BATCH_ATTEMPTS: u32 = 5;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub manifest: Manifest,
    pub files: usize,
}

/// Reads the manifest at `dest`.
pub async fn read_manifest(dest: &Destination) -> Result<Manifest, BackupError> {
    let no_backup = |detail: String| BackupError::NoBackup { url: dest.url().to_owned(), detail };
    if !dest.exists(MANIFEST).await? {
        return Err(no_backup(format!("no {MANIFEST}: not a backup, or one that did not finish")));
    }
    let bytes = dest.get(MANIFEST).await?;
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| no_backup(format!("{MANIFEST} does not parse: {e}")))?;
    if manifest.format != crate::format::FORMAT || manifest.version != crate::format::VERSION {
        return Err(no_backup(format!(
            "{MANIFEST} is format {:?} version {}; this kvstore reads {:?} version {}",
            manifest.format,
            manifest.version,
            crate::format::FORMAT,
            crate::format::VERSION
        )));
    }
    Ok(manifest)
}

/// Streams one partition file, checking it against its manifest entry as it goes; `each` gets the
/// records in order. Returns the problems found (none: the file is as the manifest says).
pub async fn read_partition<F, Fut>(
    dest: &Destination,
    entry: &PartitionFile,
    mut each: F,
) -> Result<Vec<String>, BackupError>
where
    F: FnMut(Vec<BackupRecord>) -> Fut,
    Fut: std::future::Future<Output = Result<(), BackupError>>,
{
    let mut stream = dest.read(&entry.file).await?;
    let mut decoder = FrameDecoder::new(&entry.file);
    let mut summary = FileSummary::default();
    let mut problems = Vec::new();
    let in_partition = |key: &str| {
        let slot = slot_of(key.as_bytes());
        entry.slots.iter().any(|[lo, hi]| (*lo..=*hi).contains(&slot))
    };
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        summary.bytes(&chunk);
        let records = decoder.push(&chunk)?;
        for r in &records {
            summary.record(r);
            if !in_partition(&r.key) && problems.len() < 10 {
                problems
                    .push(format!("{}: key {:?} is not in partition {}'s slots", entry.file, r.key, entry.partition));
            }
        }
        each(records).await?;
    }
    decoder.finish()?;
    let read = summary.finish(entry.partition, entry.slots.clone());
    for (what, found, expected) in [
        ("records", read.records, entry.records),
        ("live keys", read.live_keys, entry.live_keys),
        ("deletions", read.tombstones, entry.tombstones),
        ("bytes", read.bytes, entry.bytes),
    ] {
        if found != expected {
            problems.push(format!("{}: {found} {what}, the manifest says {expected}", entry.file));
        }
    }
    if read.sha256 != entry.sha256 {
        problems.push(format!("{}: SHA-256 {} differs from the manifest's {}", entry.file, read.sha256, entry.sha256));
    }
    Ok(problems)
}

/// Re-reads the backup at `dest` and checks every file against the manifest.
pub async fn verify(dest: &Destination, progress: &dyn Progress) -> Result<VerifyReport, BackupError> {
    let manifest = read_manifest(dest).await?;
    progress.stage("verifying", manifest.records);
    let mut problems = Vec::new();
    for entry in &manifest.partitions {
        let found = read_partition(dest, entry, |records| {
            progress.advance(records.len() as u64);
            async { Ok(()) }
        })
        .await;
        match found {
            Ok(p) => problems.extend(p),
            Err(BackupError::Format(e)) => problems.push(e.to_string()),
            Err(e) => return Err(e),
        }
    }
    if !problems.is_empty() {
        return Err(BackupError::Damaged { url: dest.url().to_owned(), problems });
    }
    Ok(VerifyReport { files: manifest.partitions.len(), manifest })
}

/// Restores the backup at `dest` into `cluster`; returns its manifest.
pub async fn restore(
    cluster: &Cluster,
    dest: &Destination,
    overwrite: bool,
    progress: &dyn Progress,
) -> Result<Manifest, BackupError> {
    let status = cluster.status().await?;
    if status.layout.is_none() {
        return Err(BackupError::Refused(format!("{} has no view yet: restore into a running cluster", status.node)));
    }
    if let Some(epoch) = status.pending_epoch {
        return Err(BackupError::Refused(format!(
            "a view change to epoch {epoch} is under way; restore once it has finished"
        )));
    }
    let held: u64 = status.partitions.iter().map(|p| p.live_keys.iter().flatten().copied().max().unwrap_or(0)).sum();
    if held > 0 && !overwrite {
        return Err(BackupError::Refused(format!(
            "the cluster already holds {held} keys; restore into an empty cluster, or ask to overwrite (keys merge, the newer version of each winning)"
        )));
    }
    let manifest = verify(dest, progress).await?.manifest;
    progress.stage("restoring", manifest.records);
    for entry in &manifest.partitions {
        let mut batch: Vec<BackupRecord> = Vec::new();
        let mut bytes = 0;
        let problems = read_partition(dest, entry, |records| {
            let mut full = Vec::new();
            for r in records {
                bytes += r.key.len() + r.value.as_ref().map_or(0, |v| v.len()) + 64;
                batch.push(r);
                if batch.len() >= BATCH_RECORDS || bytes >= BATCH_BYTES {
                    full.push(std::mem::take(&mut batch));
                    bytes = 0;
                }
            }
            async move {
                for b in full {
                    send(cluster, &b).await?;
                    progress.advance(b.len() as u64);
                }
                Ok(())
            }
        })
        .await?;
        if !problems.is_empty() {
            return Err(BackupError::Damaged { url: dest.url().to_owned(), problems });
        }
        if !batch.is_empty() {
            send(cluster, &batch).await?;
            progress.advance(batch.len() as u64);
        }
    }
    Ok(manifest)
}

/// Sends one batch through the first endpoint that takes it, retrying while owners are away.
async fn send(cluster: &Cluster, batch: &[BackupRecord]) -> Result<(), BackupError> {
    let mut failures = Vec::new();
    for attempt in 0..BATCH_ATTEMPTS {
        for endpoint in &cluster.endpoints {
            match cluster.admin.restore(endpoint, batch).await {
                Ok(_) => return Ok(()),
                Err(e) if e.status().is_some_and(|s| (400..500).contains(&s)) => {
                    return Err(BackupError::Refused(e.to_string()));
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
        tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
    }
    failures.dedup();
    Err(BackupError::Cluster(format!("no node stored a batch of the restore: {}", failures.join("; "))))
}
