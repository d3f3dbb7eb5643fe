//! The write-ahead log that makes group commits cheap: each group is appended as checksummed frames
//! and `fdatasync`ed once; the B-tree takes the same records later, without an fsync of its own. A
//! periodic checkpoint makes the B-tree durable and starts the log over.
//!
//! Layout: a 16-byte header (`KVSWAL02`, then the log's *generation*, u64 LE), then frames
//! `len: u32 LE | crc32(generation ++ payload): u32 LE | payload` (postcard of `(key, Record)`).
//!
//! The file is preallocated (zeros written and synced, [`GROWTH`] at a time) and reused rather than
//! truncated: starting over writes a new generation into the header and appends from the start
//! again. Appends then land inside allocated blocks, so `fdatasync` writes data only, not the
//! file's size and extents through the file system's journal (measured on this machine kind's
//! ext4: ~25 % less time and ~15 % less CPU per append-and-sync). Frames of an earlier generation
//! left behind fail their checksum, because the checksum covers the generation.
//!
//! Invariants:
//! - A record is acknowledged only after its frame is on disk (`fdatasync` returned).
//! - Replay applies frames newest-wins, so replaying a frame that the B-tree already holds — or
//!   replaying the whole log twice — changes nothing. That is what makes the checkpoint order
//!   (durable B-tree commit, then a new generation) safe at any crash point.
//! - Replay stops at the first short, zero, corrupt or earlier-generation frame: only the tail of
//!   an interrupted append can be damaged, and nothing in it was acknowledged.
//! - A log written by an earlier version (no header: frames from offset 0, checksum over the
//!   payload alone) is replayed as such; the first start-over rewrites it in this layout.

use super::Record;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

const MAGIC: &[u8; 8] = b"KVSWAL02";
const FILE_HEADER: u64 = 16;
const FRAME_HEADER: usize = 8;
/// Frames larger than this are treated as corruption (values are at most a few MiB).
const MAX_FRAME: usize = 256 << 20;
/// How much the file grows at a time (zeros written and synced once, then reused).
pub const GROWTH: u64 = 4 << 20;

/// A preallocated, reused log file.
pub struct Wal {
    file: File,
    generation: u64,
    /// Where the next frame goes.
    end: u64,
    /// Bytes of the file that are allocated (written once, with zeros or frames).
    allocated: u64,
}

impl Wal {
    /// Opens (creating if needed) the log at `path` and returns it with every intact record in it.
    /// Nothing in the file changes until the caller starts the log over ([`Wal::start_over`]),
    /// except that a new file gets its header.
    pub fn open(path: &Path) -> std::io::Result<(Wal, Vec<(String, Record)>)> {
        let mut file = OpenOptions::new().create(true).read(true).write(true).truncate(false).open(path)?;
        let allocated = file.metadata()?.len();
        let mut magic = [0u8; 8];
        let has_header = allocated >= FILE_HEADER && {
            file.read_exact_at(&mut magic, 0)?;
            &magic == MAGIC
        };
        let (generation, records, end) = if has_header {
            let mut g = [0u8; 8];
            file.read_exact_at(&mut g, 8)?;
            let generation = u64::from_le_bytes(g);
            let (records, end) = read_frames(&mut file, FILE_HEADER, Some(generation))?;
            (generation, records, end)
        } else if allocated == 0 {
            write_header(&file, 1)?;
            (1, Vec::new(), FILE_HEADER)
        } else {
            // An earlier version's log: replay it; the next start-over writes a header. Until then
            // nothing is appended to it (the caller starts over right after replay).
            let (records, end) = read_frames(&mut file, 0, None)?;
            (0, records, end)
        };
        if end < allocated && generation != 0 {
            tracing::debug!(path = %path.display(), intact = end, "write-ahead log replayed up to its first unwritten or torn frame");
        }
        Ok((Wal { file, generation, end, allocated: allocated.max(FILE_HEADER) }, records))
    }

    /// Appends the records and waits until they are on disk.
    pub fn append_durable<'a>(
        &mut self,
        records: impl IntoIterator<Item = (&'a str, &'a Record)>,
    ) -> std::io::Result<()> {
        if self.generation == 0 {
            // Never append to an earlier version's log: its frames carry no generation.
            self.start_over()?;
        }
        let mut buf = Vec::new();
        let generation = self.generation.to_le_bytes();
        for (key, record) in records {
            let payload = postcard::to_stdvec(&(key, record)).map_err(std::io::Error::other)?;
            let mut crc = crc32fast::Hasher::new();
            crc.update(&generation);
            crc.update(&payload);
            buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc.finalize().to_le_bytes());
            buf.extend_from_slice(&payload);
        }
        if buf.is_empty() {
            return Ok(());
        }
        let end = self.end + buf.len() as u64;
        if end > self.allocated {
            self.grow_to(end)?;
        }
        self.file.write_all_at(&buf, self.end)?;
        self.file.sync_data()?;
        self.end = end;
        Ok(())
    }

    /// Bytes of frames since the last start-over.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(FILE_HEADER)
    }

    /// True when nothing was appended since the last start-over.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts the log over (after a durable checkpoint of everything in it): a new generation in
    /// the header makes every frame in the file stale, and appends start from the beginning.
    pub fn start_over(&mut self) -> std::io::Result<()> {
        if self.generation == 0 {
            // An earlier version's log: rewrite it in this layout.
            self.file.set_len(0)?;
            self.allocated = FILE_HEADER;
        }
        self.generation += 1;
        write_header(&self.file, self.generation)?;
        self.end = FILE_HEADER;
        Ok(())
    }

    /// Extends the preallocated part of the file to cover `end` (zeros, synced with the size).
    fn grow_to(&mut self, end: u64) -> std::io::Result<()> {
        let target = end.div_ceil(GROWTH) * GROWTH;
        let zeros = vec![0u8; (1 << 20).min((target - self.allocated) as usize)];
        let mut at = self.allocated;
        while at < target {
            let n = zeros.len().min((target - at) as usize);
            self.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        self.file.sync_all()?;
        self.allocated = target;
        Ok(())
    }
}

fn write_header(file: &File, generation: u64) -> std::io::Result<()> {
    let mut header = [0u8; FILE_HEADER as usize];
    header[..8].copy_from_slice(MAGIC);
    header[8..].copy_from_slice(&generation.to_le_bytes());
    file.write_all_at(&header, 0)?;
    file.sync_data()
}

/// Reads intact frames from `start`; returns them and the offset where intact data ends. With a
/// generation, checksums cover it (this layout); without, the payload alone (an earlier version).
fn read_frames(file: &mut File, start: u64, generation: Option<u64>) -> std::io::Result<(Vec<(String, Record)>, u64)> {
    file.seek(SeekFrom::Start(start))?;
    let mut reader = BufReader::new(&*file);
    let mut records = Vec::new();
    let mut offset = start;
    loop {
        let mut header = [0u8; FRAME_HEADER];
        if !read_full(&mut reader, &mut header)? {
            break;
        }
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_FRAME {
            break;
        }
        let mut payload = vec![0u8; len];
        if !read_full(&mut reader, &mut payload)? {
            break;
        }
        let mut hasher = crc32fast::Hasher::new();
        if let Some(g) = generation {
            hasher.update(&g.to_le_bytes());
        }
        hasher.update(&payload);
        if hasher.finalize() != crc {
            break;
        }
        match postcard::from_bytes::<(String, Record)>(&payload) {
            Ok(r) => records.push(r),
            Err(_) => break,
        }
        offset += (FRAME_HEADER + len) as u64;
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

    fn stamps(records: &[(String, Record)]) -> Vec<(&str, u64)> {
        records.iter().map(|(k, r)| (k.as_str(), r.version.ts)).collect()
    }

    #[test]
    fn appended_frames_come_back_and_a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let end = {
            let (mut wal, old) = Wal::open(&path).unwrap();
            assert!(old.is_empty());
            wal.append_durable([("a", &rec(1)), ("b", &rec(2))]).unwrap();
            wal.append_durable([("c", &rec(3))]).unwrap();
            wal.end
        };
        assert_eq!(std::fs::metadata(&path).unwrap().len(), GROWTH, "the file is preallocated");
        // A crash in the middle of the next append leaves half a frame.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[40, 0, 0, 0, 1, 2, 3, 4, 9, 9], end).unwrap();
        drop(f);
        let (mut wal, records) = Wal::open(&path).unwrap();
        assert_eq!(stamps(&records), [("a", 1), ("b", 2), ("c", 3)]);
        wal.start_over().unwrap();
        assert!(Wal::open(&path).unwrap().1.is_empty());
    }

    #[test]
    fn frames_of_an_earlier_generation_are_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&path).unwrap();
        wal.append_durable([("a", &rec(1)), ("b", &rec(2)), ("c", &rec(3))]).unwrap();
        wal.start_over().unwrap();
        // Shorter than what it overwrites: the old frames after it are intact but stale.
        wal.append_durable([("d", &rec(4))]).unwrap();
        drop(wal);
        let (_, records) = Wal::open(&path).unwrap();
        assert_eq!(stamps(&records), [("d", 4)]);
    }

    #[test]
    fn the_log_grows_past_its_preallocation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&path).unwrap();
        let big = Record { value: Some(bytes::Bytes::from(vec![7u8; 1 << 20])), ..rec(1) };
        for i in 0..6 {
            wal.append_durable([(format!("k{i}").as_str(), &big)]).unwrap();
        }
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 * GROWTH);
        drop(wal);
        assert_eq!(Wal::open(&path).unwrap().1.len(), 6);
    }

    #[test]
    fn a_corrupt_frame_ends_replay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&path).unwrap();
        wal.append_durable([("a", &rec(1)), ("b", &rec(2))]).unwrap();
        let last = wal.end - 1;
        drop(wal);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff], last).unwrap();
        drop(f);
        let (_, records) = Wal::open(&path).unwrap();
        assert_eq!(records.len(), 1);
    }

    #[test]
    fn a_log_of_the_earlier_layout_is_replayed_then_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        // The earlier layout: frames from offset 0, checksums over the payload alone.
        let mut bytes = Vec::new();
        for (key, ts) in [("a", 1), ("b", 2)] {
            let payload = postcard::to_stdvec(&(key, &rec(ts))).unwrap();
            bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            bytes.extend_from_slice(&payload);
        }
        std::fs::write(&path, &bytes).unwrap();
        let (mut wal, records) = Wal::open(&path).unwrap();
        assert_eq!(stamps(&records), [("a", 1), ("b", 2)]);
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "opening changes nothing");
        wal.start_over().unwrap();
        wal.append_durable([("c", &rec(3))]).unwrap();
        drop(wal);
        assert_eq!(stamps(&Wal::open(&path).unwrap().1), [("c", 3)]);
    }
}
