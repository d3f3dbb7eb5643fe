//! Backups as a user takes them with kvsctl, against node processes: a consistent cut under a
//! writer (the 100,000 keys are stored through the nodes' bulk path, some more through clients), to a directory and to S3 (a real S3 API server, moto, on loopback), verified, restored
//! into a cluster of another size and K and compared key by key with what the writers were told;
//! and backups whose replicas die midway, which resume on another replica or fail cleanly.

mod common;

use common::{Cluster, ok, text};
use kvs_api::{KvClient, WriteResponse};
use kvs_backup::{BackupError, BackupOptions, Destination, Manifest, Progress};
use kvs_testkit::s3::MotoServer;
use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Keys written before the backup (`KVS_BACKUP_TEST_KEYS` overrides it).
const KEYS: usize = 100_000;
/// Client sessions writing at once.
const WRITERS: usize = 32;

/// Every acknowledged write of a key: its version timestamp and value (`None`: a delete).
type Acks = HashMap<String, Vec<(u64, Option<String>)>>;

fn keys() -> usize {
    std::env::var("KVS_BACKUP_TEST_KEYS").ok().and_then(|k| k.parse().ok()).unwrap_or(KEYS)
}

fn ack(acks: &mut Acks, key: String, written: &WriteResponse, value: Option<String>) {
    acks.entry(key).or_default().push((written.timestamp, value));
}

/// Writes `key{i}` for every i (a value each, every 50th deleted again), from `WRITERS` sessions.
async fn load(node: &str, n: usize) -> Acks {
    let tasks = (0..WRITERS).map(|w| {
        let node = node.to_owned();
        tokio::spawn(async move {
            // Straight to an owner of each key: no forwarding hop (the load is most of the test).
            let client = KvClient::routed(node, Duration::from_secs(30)).await.expect("a routed client");
            let mut acks = Acks::new();
            for i in (w..n).step_by(WRITERS) {
                let (key, value) = (format!("key{i}"), format!("v{i}"));
                let written = client.put(&key, value.clone()).await.expect("a write before the backup");
                ack(&mut acks, key.clone(), &written, Some(value));
                if i % 50 == 0 {
                    let deleted = client.delete(&key).await.expect("a delete before the backup");
                    ack(&mut acks, key, &deleted, None);
                }
            }
            acks
        })
    });
    let mut all = Acks::new();
    for task in futures::future::join_all(tasks).await {
        for (key, mut versions) in task.expect("a loader") {
            all.entry(key).or_default().append(&mut versions);
        }
    }
    all
}

/// Stores `key{i}` for every i (a value each; every 50th deleted again) through the nodes' bulk
/// path (`/v1/admin/restore`: durable on every owner before it answers), with versions stamped
/// now: what a long-running cluster holds, without `n` client round trips in a debug build.
async fn seed(admin: &kvs_api::AdminClient, node: &str, n: usize) -> Acks {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_micros() as u64;
    let mut acks = Acks::new();
    let mut batch = Vec::new();
    for i in 0..n {
        let (key, value) = (format!("key{i}"), format!("v{i}"));
        let mut versions = vec![(now + i as u64, Some(value))];
        if i % 50 == 0 {
            versions.push((now + (n + i) as u64, None));
        }
        for (timestamp, value) in &versions {
            batch.push(kvs_api::backup::BackupRecord {
                key: key.clone(),
                value: value.as_ref().map(|v| bytes::Bytes::from(v.clone())),
                timestamp: *timestamp,
                writer: "seed".into(),
                clock: Vec::new(),
            });
        }
        acks.insert(key, versions);
        if batch.len() >= 2_000 || i + 1 == n {
            admin.restore(node, &std::mem::take(&mut batch)).await.expect("seeding");
        }
    }
    acks
}

/// Overwrites and deletes existing keys and writes new ones until `stop`; every outcome must be a
/// success.
async fn write_until(node: String, n: usize, stop: Arc<AtomicBool>) -> Acks {
    let client = KvClient::new(node, Duration::from_secs(30));
    let mut acks = Acks::new();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let existing = format!("key{}", (i * 7919) % n);
        match i % 3 {
            0 => {
                let deleted = client.delete(&existing).await.expect("a delete during the backup");
                ack(&mut acks, existing, &deleted, None);
            }
            1 => {
                let value = format!("during{i}");
                let written = client.put(&existing, value.clone()).await.expect("a write during the backup");
                ack(&mut acks, existing, &written, Some(value));
            }
            _ => {
                let (key, value) = (format!("new{i}"), format!("during{i}"));
                let written = client.put(&key, value.clone()).await.expect("a write during the backup");
                ack(&mut acks, key, &written, Some(value));
            }
        }
        i += 1;
    }
    acks
}

/// Each key's state at `cut`: its newest acknowledged version at or below it.
fn state_at(acks: &Acks, cut: u64) -> HashMap<&str, Option<&str>> {
    acks.iter()
        .map(|(key, versions)| {
            let at = versions.iter().filter(|(ts, _)| *ts <= cut).max_by_key(|(ts, _)| *ts);
            (key.as_str(), at.and_then(|(_, v)| v.as_deref()))
        })
        .collect()
}

/// kvsctl with `env` added, in a blocking thread (writers keep running meanwhile).
async fn kvsctl_with(endpoints: String, args: Vec<String>, env: Vec<(&'static str, String)>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kvsctl"));
        command.args(&args).env("KVS_ENDPOINTS", &endpoints).envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        command.output().expect("kvsctl runs")
    })
    .await
    .expect("the kvsctl thread")
}

fn manifest_of(out: &std::process::Output) -> Manifest {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("a manifest ({e}): {}", text(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_under_writes_is_a_consistent_cut_that_restores_into_six_nodes_at_k3() {
    let n = keys();
    let a = Cluster::start(4, 0, 2).await;
    let s3 = MotoServer::start(&a.net.node(99)).await;
    s3.bucket("kvs-backups").await;
    let loading = std::time::Instant::now();
    let mut acks = seed(&a.admin(), &a.addr(0), n).await;
    // And some through the client path, before the backup too.
    let loaded = load(&a.addr(2), 2_000).await;
    for (key, mut versions) in loaded {
        acks.entry(key).or_default().append(&mut versions);
    }
    println!("stored {n} keys in {:?}", loading.elapsed());
    let acknowledged_before: u64 = acks.values().flatten().map(|(ts, _)| *ts).max().expect("writes");

    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_until(a.addr(1), n, stop.clone()));
    let dir = tempfile::tempdir().expect("a directory");
    let to_dir = dir.path().join("backup-1").display().to_string();
    let token = a.token_path().to_owned();
    let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let started = std::time::Instant::now();
    let out =
        kvsctl_with(a.endpoints(), args(&["-o", "json", "backup", "--to", &to_dir, "--token-file", &token]), vec![])
            .await;
    let to_dir_manifest = manifest_of(&ok(out));
    let dir_took = started.elapsed();
    let started = std::time::Instant::now();
    let out = kvsctl_with(
        a.endpoints(),
        args(&["-o", "json", "backup", "--to", "s3://kvs-backups/nightly/1", "--token-file", &token]),
        s3.settings().to_vec(),
    )
    .await;
    let manifest = manifest_of(&ok(out));
    let s3_took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let during = writer.await.expect("the writer");
    let written_during: usize = during.values().map(Vec::len).sum();
    let touched: std::collections::HashSet<String> = during.keys().cloned().collect();
    for (key, mut versions) in during {
        acks.entry(key).or_default().append(&mut versions);
    }
    println!(
        "{n} keys; backups took {dir_took:?} (directory) and {s3_took:?} (S3) while a writer made {written_during} writes; \
         S3 backup: {} records, {} bytes",
        manifest.records, manifest.bytes
    );
    assert!(written_during > 0, "the writer wrote during the backups");
    assert!(manifest.cut >= acknowledged_before, "the cut covers every write acknowledged before the backup");
    assert!(to_dir_manifest.cut <= manifest.cut);

    // Both verify; a backup location is never overwritten.
    ok(kvsctl_with(String::new(), args(&["backup", "verify", &to_dir]), vec![]).await);
    ok(kvsctl_with(String::new(), args(&["backup", "verify", "s3://kvs-backups/nightly/1"]), s3.settings().to_vec())
        .await);
    let again = kvsctl_with(a.endpoints(), args(&["backup", "--to", &to_dir, "--token-file", &token]), vec![]).await;
    assert_eq!(again.status.code(), Some(4), "{}", text(&again.stderr));

    // Restore into 6 nodes at K=3: exactly the state at the cut, key by key.
    let b = Cluster::start(6, 0, 3).await;
    let b_token = b.token_path().to_owned();
    let restore = ["restore", "--from", "s3://kvs-backups/nightly/1", "--token-file", &b_token];
    ok(kvsctl_with(b.endpoints(), args(&restore), s3.settings().to_vec()).await);
    let refused = kvsctl_with(b.endpoints(), args(&restore), s3.settings().to_vec()).await;
    assert_eq!(refused.status.code(), Some(4), "a second restore into data is refused: {}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("already holds"), "{}", text(&refused.stderr));

    let expected = state_at(&acks, manifest.cut);
    let live = expected.values().filter(|v| v.is_some()).count() as u64;
    assert_eq!(manifest.live_keys, live, "the backup holds exactly the keys live at the cut");
    // Every key, compared in bulk: back the restored cluster up and read its files.
    let check = Destination::open(&dir.path().join("check").display().to_string()).expect("a directory");
    let b_cluster = kvs_backup::Cluster::new(vec![b.addr(0), b.addr(1)], b.admin());
    let restored = kvs_backup::backup(&b_cluster, &check, &BackupOptions::default(), &kvs_backup::Silent)
        .await
        .expect("a backup of the restored cluster");
    let mut held: HashMap<String, Option<String>> = HashMap::new();
    for entry in &restored.partitions {
        let problems = kvs_backup::restore::read_partition(&check, entry, |records| {
            for r in records {
                held.insert(r.key, r.value.map(|v| String::from_utf8_lossy(&v).into_owned()));
            }
            async { Ok(()) }
        })
        .await
        .expect("the check backup reads");
        assert!(problems.is_empty(), "{problems:?}");
    }
    let mut wrong: Vec<String> = expected
        .iter()
        .filter(|(key, want)| held.get(**key).cloned().flatten().as_deref() != **want)
        .map(|(key, want)| format!("{key}: {:?}, expected {want:?}", held.get(*key)))
        .collect();
    wrong.extend(
        held.iter()
            .filter(|(key, value)| value.is_some() && !expected.contains_key(key.as_str()))
            .map(|(key, value)| format!("{key}: {value:?}, never written")),
    );
    assert!(wrong.is_empty(), "{} keys differ from the cut, e.g. {:?}", wrong.len(), &wrong[..wrong.len().min(5)]);

    // And as clients read them: every key a writer touched during the backup, and every 10th.
    let reader = KvClient::routed(b.addr(0), Duration::from_secs(30)).await.expect("a routed client");
    let reading = std::time::Instant::now();
    let mut read = 0;
    for (key, want) in &expected {
        let sampled = key.strip_prefix("key").and_then(|i| i.parse::<usize>().ok()).is_some_and(|i| i % 10 == 0);
        if !(sampled || touched.contains(*key)) {
            continue;
        }
        let got = reader.get(key).await.expect("a read after the restore");
        let got = got.map(|s| String::from_utf8_lossy(&s.value).into_owned());
        assert_eq!(got.as_deref(), *want, "{key} read through the restored cluster");
        read += 1;
    }
    println!("compared {} keys in bulk and read {read} through clients in {:?}", expected.len(), reading.elapsed());
}

/// Kills the replica being read once the backup has read its first page.
struct KillOnFirstPage<'a> {
    cluster: &'a Cluster,
    victim: String,
    killed: AtomicBool,
}

impl Progress for KillOnFirstPage<'_> {
    fn stage(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {
        if !self.killed.swap(true, Ordering::SeqCst) {
            self.cluster.kill(&self.victim);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_resumes_on_another_replica_and_fails_cleanly_when_none_is_left() {
    let c = Cluster::start(4, 0, 2).await;
    load(&c.addr(0), 5_000).await;
    let map =
        KvClient::routed(c.addr(0), Duration::from_secs(10)).await.expect("a client").cluster_map().expect("a map");
    let first = map.partitions[0].members.clone();
    let cluster = kvs_backup::Cluster::new(vec![c.addr(2), c.addr(3)], c.admin());
    // One partition at a time, small pages: partition 0 is read first, from its first replica.
    let options = BackupOptions { parallel: 1, page_records: 100, ..BackupOptions::default() };
    let dir = tempfile::tempdir().expect("a directory");

    let resumed = Destination::open(&dir.path().join("resumed").display().to_string()).expect("a directory");
    let kill_first = KillOnFirstPage { cluster: &c, victim: first[0].clone(), killed: AtomicBool::new(false) };
    let manifest = kvs_backup::backup(&cluster, &resumed, &options, &kill_first).await.expect("a backup that resumed");
    assert!(kill_first.killed.load(Ordering::SeqCst), "the replica being read was killed");
    // 5,000 keys, every 50th deleted: 4,900 live and 100 deletions, each once.
    assert_eq!((manifest.live_keys, manifest.tombstones), (4_900, 100), "every key once, none twice");
    kvs_backup::verify(&resumed, &kvs_backup::Silent).await.expect("the resumed backup verifies");

    // Partition 0's last replica dies too: the backup fails, naming it, and leaves no backup.
    let failed = Destination::open(&dir.path().join("failed").display().to_string()).expect("a directory");
    let kill_last = KillOnFirstPage { cluster: &c, victim: first[1].clone(), killed: AtomicBool::new(false) };
    let error = kvs_backup::backup(&cluster, &failed, &options, &kill_last).await.expect_err("no replica left");
    assert!(kill_last.killed.load(Ordering::SeqCst));
    assert!(matches!(error, BackupError::PartitionFailed { partition: 0, .. }), "{error}");
    let left: Vec<_> = std::fs::read_dir(dir.path().join("failed")).expect("the directory").flatten().collect();
    assert!(left.is_empty(), "a failed backup leaves nothing: {left:?}");
    let no_backup = kvs_backup::verify(&failed, &kvs_backup::Silent).await.expect_err("nothing to verify");
    assert!(matches!(no_backup, BackupError::NoBackup { .. }), "{no_backup}");
}
