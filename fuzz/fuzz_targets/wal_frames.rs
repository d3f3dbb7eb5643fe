//! Write-ahead log replay over arbitrary bytes: never panics, keeps a prefix of intact frames.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("kvs-fuzz-wal-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("wal");
    std::fs::write(&path, data).expect("temp file");
    let _ = kvs_node::store::replay_wal_for_fuzzing(&path);
});
