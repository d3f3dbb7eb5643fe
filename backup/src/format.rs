//! The backup format, version 1 (pure: bytes in, bytes out).
//!
//! A backup is a directory (an object-store prefix) holding:
//! - `partition-NNNN.kvb`, one per partition of the backed-up view: the 16-byte [`MAGIC`], then one
//!   frame per record — a 4-byte big-endian length and that many bytes of a postcard-encoded
//!   [`BackupRecord`] (key, value or none for a deletion, version timestamp and writer, causal
//!   clock). Records are in slot order, each key once.
//! - `manifest.json` ([`Manifest`]), written last: a backup without one did not finish and is
//!   never restored. It names the cluster, view epoch, K, the cut, and per file its slot ranges,
//!   counts, size and SHA-256.

use kvs_api::backup::BackupRecord;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// First bytes of every partition file.
pub const MAGIC: &[u8; 16] = b"KVSTORE-BACKUP1\n";
/// `Manifest::format`.
pub const FORMAT: &str = "kvstore-backup";
/// `Manifest::version`: what this code writes and reads.
pub const VERSION: u32 = 1;
/// The manifest's name under the backup's prefix.
pub const MANIFEST: &str = "manifest.json";
/// Largest frame a reader accepts (a record's value is at most the node's value limit, 1 MiB by
/// default; this leaves room for larger limits and the clock).
pub const MAX_FRAME: usize = 64 << 20;

/// The partition file's name.
pub fn partition_file(partition: u32) -> String {
    format!("partition-{partition:04}.kvb")
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub backup_id: String,
    /// The cluster's name, when the runner knows it (the operator does).
    pub cluster: Option<String>,
    /// Unix seconds when the backup started and finished.
    pub started_at: u64,
    pub finished_at: u64,
    /// The cut: every record is the key's state at this HLC timestamp (µs).
    pub cut: u64,
    pub view_epoch: u64,
    pub replication_factor: u32,
    pub partitions: Vec<PartitionFile>,
    pub records: u64,
    pub live_keys: u64,
    pub tombstones: u64,
    /// Bytes of the partition files together.
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionFile {
    pub partition: u32,
    pub file: String,
    /// The partition's slots as inclusive ranges.
    pub slots: Vec<[u16; 2]>,
    pub records: u64,
    pub live_keys: u64,
    pub tombstones: u64,
    pub bytes: u64,
    /// Hex SHA-256 of the whole file.
    pub sha256: String,
}

/// Counts and checksum of a partition file as it is written or read.
#[derive(Default)]
pub struct FileSummary {
    sha: Sha256,
    pub records: u64,
    pub live_keys: u64,
    pub tombstones: u64,
    pub bytes: u64,
}

impl FileSummary {
    /// Takes file bytes in order (the magic included).
    pub fn bytes(&mut self, chunk: &[u8]) {
        self.sha.update(chunk);
        self.bytes += chunk.len() as u64;
    }

    pub fn record(&mut self, r: &BackupRecord) {
        self.records += 1;
        match r.value {
            Some(_) => self.live_keys += 1,
            None => self.tombstones += 1,
        }
    }

    pub fn finish(self, partition: u32, slots: Vec<[u16; 2]>) -> PartitionFile {
        PartitionFile {
            partition,
            file: partition_file(partition),
            slots,
            records: self.records,
            live_keys: self.live_keys,
            tombstones: self.tombstones,
            bytes: self.bytes,
            sha256: format!("{:x}", self.sha.finalize()),
        }
    }
}

/// Appends `record` as one frame.
pub fn encode_frame(record: &BackupRecord, out: &mut Vec<u8>) {
    let body = postcard::to_stdvec(record).expect("records encode");
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
}

/// Why a backup cannot be read back as written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("{file} does not start with the kvstore backup header: not a backup file, or from another version")]
    BadMagic { file: String },
    #[error("{file} is cut short inside a record (at byte {at})")]
    Truncated { file: String, at: u64 },
    #[error("{file}: record {index} does not decode ({detail})")]
    BadRecord { file: String, index: u64, detail: String },
    #[error("{file}: a frame claims {len} bytes, more than any record ({MAX_FRAME})")]
    FrameTooLarge { file: String, len: usize },
}

/// Splits a partition file's bytes, arriving in chunks of any size, back into records.
pub struct FrameDecoder {
    file: String,
    buffer: Vec<u8>,
    consumed: u64,
    magic_seen: bool,
    index: u64,
}

impl FrameDecoder {
    pub fn new(file: impl Into<String>) -> Self {
        FrameDecoder { file: file.into(), buffer: Vec::new(), consumed: 0, magic_seen: false, index: 0 }
    }

    /// Takes the next chunk; returns the records it completes.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<BackupRecord>, FormatError> {
        self.buffer.extend_from_slice(chunk);
        let mut at = 0;
        if !self.magic_seen {
            if self.buffer.len() < MAGIC.len() {
                return Ok(Vec::new());
            }
            if &self.buffer[..MAGIC.len()] != MAGIC {
                return Err(FormatError::BadMagic { file: self.file.clone() });
            }
            self.magic_seen = true;
            at = MAGIC.len();
        }
        let mut records = Vec::new();
        while self.buffer.len() - at >= 4 {
            let len = u32::from_be_bytes(self.buffer[at..at + 4].try_into().expect("4 bytes")) as usize;
            if len > MAX_FRAME {
                return Err(FormatError::FrameTooLarge { file: self.file.clone(), len });
            }
            if self.buffer.len() - at - 4 < len {
                break;
            }
            let body = &self.buffer[at + 4..at + 4 + len];
            let record = postcard::from_bytes(body).map_err(|e| FormatError::BadRecord {
                file: self.file.clone(),
                index: self.index,
                detail: e.to_string(),
            })?;
            records.push(record);
            self.index += 1;
            at += 4 + len;
        }
        self.buffer.drain(..at);
        self.consumed += at as u64;
        Ok(records)
    }

    /// The file ended: anything left over is a record cut short.
    pub fn finish(self) -> Result<(), FormatError> {
        match (self.magic_seen, self.buffer.is_empty()) {
            (true, true) => Ok(()),
            (false, _) => Err(FormatError::BadMagic { file: self.file }),
            (true, false) => Err(FormatError::Truncated { file: self.file, at: self.consumed }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u64, deleted: bool) -> BackupRecord {
        BackupRecord {
            key: format!("key{i}"),
            value: (!deleted).then(|| bytes::Bytes::from(vec![0, 255, i as u8])),
            timestamp: 1_000 + i,
            writer: "10.0.0.1:8080".into(),
            clock: vec![("10.0.0.1:8080".into(), i)],
        }
    }

    #[test]
    fn records_come_back_whatever_the_chunking() {
        let written: Vec<BackupRecord> = (0..50).map(|i| record(i, i % 7 == 0)).collect();
        let mut file = MAGIC.to_vec();
        for r in &written {
            encode_frame(r, &mut file);
        }
        for chunk in [1, 3, 17, 4096] {
            let mut decoder = FrameDecoder::new("p");
            let mut read = Vec::new();
            for piece in file.chunks(chunk) {
                read.extend(decoder.push(piece).unwrap());
            }
            decoder.finish().unwrap();
            assert_eq!(read, written, "chunks of {chunk}");
        }
    }

    #[test]
    fn damaged_files_are_named_for_what_is_wrong() {
        let mut file = MAGIC.to_vec();
        encode_frame(&record(1, false), &mut file);
        let mut cut = FrameDecoder::new("p");
        cut.push(&file[..file.len() - 2]).unwrap();
        assert!(matches!(cut.finish(), Err(FormatError::Truncated { at: 16, .. })));
        let mut other = FrameDecoder::new("p");
        assert!(matches!(other.push(b"PK\x03\x04 a zip file, not ours"), Err(FormatError::BadMagic { .. })));
        let mut huge = FrameDecoder::new("p");
        let mut bad = MAGIC.to_vec();
        bad.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(huge.push(&bad), Err(FormatError::FrameTooLarge { .. })));
    }

    #[test]
    fn the_summary_counts_and_checksums_what_it_is_given() {
        let mut s = FileSummary::default();
        s.bytes(b"abc");
        s.record(&record(1, false));
        s.record(&record(2, true));
        let f = s.finish(3, vec![[0, 9]]);
        assert_eq!((f.records, f.live_keys, f.tombstones, f.bytes), (2, 1, 1, 3));
        assert_eq!(f.sha256, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(f.file, "partition-0003.kvb");
    }
}
