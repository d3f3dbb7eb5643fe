//! The write-ahead log that makes group commits cheap: each group is appended as checksummed frames
//! and `fdatasync`ed once, while the B-tree takes the same records in a non-durable commit. A
//! periodic checkpoint makes the B-tree durable and empties the log.
//!
//! Frame: `len: u32 LE | crc32(payload): u32 LE | payload` (postcard of `(key, Record)`).
//!
//! Invariants:
//! - A record is acknowledged only after its frame is on disk (`fdatasync` returned).
//! - Replay applies frames newest-wins, so replaying a frame that the B-tree already holds — or
//!   replaying the whole log twice — changes nothing. That is what makes the checkpoint order
//!   (durable B-tree commit, then truncate) safe at any crash point.
//! - Replay stops at the first short or corrupt frame: only the tail of an interrupted append can be
//!   damaged, and nothing in it was acknowledged.

use super::Record;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::Path;

const HEADER: usize = 8;
/// Frames larger than this are treated as corruption (values are at most a few MiB).
const MAX_FRAME: usize = 256 << 20;

/// An append-only log file.
pub struct Wal {
    file: File,
    bytes: u64,
}

impl Wal {
    /// Opens (creating if needed) the log at `path` and returns it with every intact record in it.
    pub fn open(path: &Path) -> std::io::Result<(Wal, Vec<(String, Record)>)> {
        let mut file = OpenOptions::new().create(true).read(true).append(true).open(path)?;
        let (records, intact) = read_frames(&mut file)?;
        let len = file.metadata()?.len();
        if intact < len {
            tracing::warn!(path = %path.display(), kept = intact, dropped = len - intact, "write-ahead log ends in a torn frame; dropping the unacknowledged tail");
            file.set_len(intact)?;
            file.sync_data()?;
        }
        Ok((Wal { file, bytes: intact }, records))
    }

    /// Appends the records and waits until they are on disk.
    pub fn append_durable<'a>(
        &mut self,
        records: impl IntoIterator<Item = (&'a str, &'a Record)>,
    ) -> std::io::Result<()> {
        let mut buf = Vec::new();
        for (key, record) in records {
            let payload = postcard::to_stdvec(&(key, record)).map_err(std::io::Error::other)?;
            buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            buf.extend_from_slice(&payload);
        }
        if buf.is_empty() {
            return Ok(());
        }
        self.file.write_all(&buf)?;
        self.file.sync_data()?;
        self.bytes += buf.len() as u64;
        Ok(())
    }

    /// Bytes in the log since the last truncation.
    pub fn len(&self) -> u64 {
        self.bytes
    }

    /// True when nothing was appended since the last truncation.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Empties the log (after a durable checkpoint of everything in it).
    pub fn truncate(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.sync_data()?;
        self.bytes = 0;
        Ok(())
    }
}

/// Reads intact frames from the start; returns them and the offset where intact data ends.
fn read_frames(file: &mut File) -> std::io::Result<(Vec<(String, Record)>, u64)> {
    let mut reader = BufReader::new(&*file);
    let mut records = Vec::new();
    let mut offset = 0u64;
    loop {
        let mut header = [0u8; HEADER];
        if !read_full(&mut reader, &mut header)? {
            break;
        }
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        if len > MAX_FRAME {
            break;
        }
        let mut payload = vec![0u8; len];
        if !read_full(&mut reader, &mut payload)? || crc32fast::hash(&payload) != crc {
            break;
        }
        match postcard::from_bytes::<(String, Record)>(&payload) {
            Ok(r) => records.push(r),
            Err(_) => break,
        }
        offset += (HEADER + len) as u64;
    }
    Ok((records, offset))
}

/// Fills `buf`; false if the input ended first.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..])? {
            0 => return Ok(false),
            n => filled += n,
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::causal::{VectorClock, Version};

    fn rec(ts: u64) -> Record {
        Record {
            version: Version { ts, writer: "n".into() },
            clock: VectorClock::new(),
            value: Some(bytes::Bytes::from_static(b"v")),
        }
    }

    #[test]
    fn appended_frames_come_back_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        {
            let (mut wal, old) = Wal::open(&path).unwrap();
            assert!(old.is_empty());
            wal.append_durable([("a", &rec(1)), ("b", &rec(2))]).unwrap();
            wal.append_durable([("c", &rec(3))]).unwrap();
        }
        // A crash in the middle of the next append leaves half a frame.
        let intact = std::fs::metadata(&path).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[40, 0, 0, 0, 1, 2, 3, 4, 9, 9]).unwrap();
        drop(f);
        let (mut wal, records) = Wal::open(&path).unwrap();
        assert_eq!(
            records.iter().map(|(k, r)| (k.as_str(), r.version.ts)).collect::<Vec<_>>(),
            [("a", 1), ("b", 2), ("c", 3)]
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), intact, "the torn tail is cut off");
        wal.truncate().unwrap();
        assert!(Wal::open(&path).unwrap().1.is_empty());
    }

    #[test]
    fn a_corrupt_frame_ends_replay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        Wal::open(&path).unwrap().0.append_durable([("a", &rec(1)), ("b", &rec(2))]).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let (_, records) = Wal::open(&path).unwrap();
        assert_eq!(records.len(), 1);
    }
}
