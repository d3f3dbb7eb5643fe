//! Causality: vector clocks, the opaque `causal_payload` clients carry, and the hybrid logical
//! clock (HLC) that stamps every write.
//!
//! Every write gets a timestamp from its coordinator's HLC: microseconds since the Unix epoch,
//! pushed past every timestamp the write causally depends on. A write's vector clock is the client's
//! context merged with the key's previous clock, with the coordinator's own entry set to the write's
//! timestamp. Hence:
//! - if write `a` happened before write `b`, then `a.ts < b.ts` and `a.clock <= b.clock`;
//! - ordering versions by `(ts, writer)` is a total order that extends causal order — "causal order,
//!   then replica timestamp, then node identity", in one comparison;
//! - clock entries are HLC values, so they only grow across restarts without being persisted.
//!
//! Pure: nothing here performs I/O; the HLC reads the wall clock through a caller-supplied value.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// A vector clock keyed by node identity (`ip:port`), not by position in a view.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VectorClock(BTreeMap<String, u64>);

impl VectorClock {
    /// The empty clock (what an empty `causal_payload` means).
    pub fn new() -> Self {
        Self::default()
    }

    /// The entry for `node`, 0 when absent.
    pub fn get(&self, node: &str) -> u64 {
        self.0.get(node).copied().unwrap_or(0)
    }

    /// Raises `node`'s entry to at least `value`.
    pub fn observe(&mut self, node: &str, value: u64) {
        let entry = self.0.entry(node.to_owned()).or_insert(0);
        *entry = (*entry).max(value);
    }

    /// Pointwise maximum with `other`.
    pub fn merge(&mut self, other: &VectorClock) {
        for (node, &value) in &other.0 {
            self.observe(node, value);
        }
    }

    /// True when every entry of `self` is `<=` the same entry of `other`.
    pub fn dominated_by(&self, other: &VectorClock) -> bool {
        self.0.iter().all(|(node, &value)| value <= other.get(node))
    }

    /// The largest entry: every entry is an HLC timestamp, so this is the newest time the clock
    /// has seen.
    pub fn max_entry(&self) -> u64 {
        self.0.values().copied().max().unwrap_or(0)
    }

    /// True when no entry is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Entries, ordered by node id.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(k, &v)| (k.as_str(), v))
    }

    /// Encodes the clock as the opaque, URL-safe `causal_payload` string ("" for the empty clock).
    pub fn to_payload(&self) -> String {
        if self.0.is_empty() {
            return String::new();
        }
        let wire =
            PayloadWire { version: PAYLOAD_VERSION, entries: self.0.iter().map(|(k, &v)| (k.as_str(), v)).collect() };
        let bytes = postcard::to_stdvec(&wire).expect("serializing plain data into a Vec cannot fail");
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Decodes a `causal_payload`. Empty (or only whitespace) is the empty clock.
    pub fn from_payload(payload: &str) -> Result<Self, PayloadError> {
        let payload = payload.trim();
        if payload.is_empty() {
            return Ok(Self::new());
        }
        if payload.len() > MAX_PAYLOAD_LEN {
            return Err(PayloadError::TooLong { len: payload.len() });
        }
        let bytes = URL_SAFE_NO_PAD.decode(payload).map_err(|_| PayloadError::NotBase64)?;
        let (wire, rest): (PayloadWireOwned, _) =
            postcard::take_from_bytes(&bytes).map_err(|_| PayloadError::Malformed)?;
        if !rest.is_empty() {
            return Err(PayloadError::Malformed);
        }
        if wire.version != PAYLOAD_VERSION {
            return Err(PayloadError::UnknownVersion(wire.version));
        }
        let mut clock = Self::new();
        for (node, value) in wire.entries {
            if node.is_empty() || node.len() > MAX_NODE_ID_LEN {
                return Err(PayloadError::Malformed);
            }
            clock.observe(&node, value);
        }
        Ok(clock)
    }
}

/// The context entry holding the newest view epoch the client has been served under. Not a node
/// (node ids are `host:port`); merging takes the maximum like any entry.
pub const EPOCH_ENTRY: &str = "#epoch";

/// Longest accepted `causal_payload`: room for ~400 node entries; anything longer is not ours.
pub const MAX_PAYLOAD_LEN: usize = 16 * 1024;
const MAX_NODE_ID_LEN: usize = 255;
const PAYLOAD_VERSION: u8 = 1;

#[derive(Serialize)]
struct PayloadWire<'a> {
    version: u8,
    entries: Vec<(&'a str, u64)>,
}

#[derive(Deserialize)]
struct PayloadWireOwned {
    version: u8,
    entries: Vec<(String, u64)>,
}

/// Why a `causal_payload` was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    #[error(
        "causal_payload is {len} bytes, longer than any this store issues; send back the payload from your last response, or '' for none"
    )]
    TooLong { len: usize },
    #[error(
        "causal_payload is not a payload this store issued (not URL-safe base64); send back the payload from your last response, or '' for none"
    )]
    NotBase64,
    #[error(
        "causal_payload is not a payload this store issued (undecodable); send back the payload from your last response, or '' for none"
    )]
    Malformed,
    #[error("causal_payload has unknown format version {0}; it was issued by a newer store")]
    UnknownVersion(u8),
}

/// The identity of one version of a key: total order, newest wins.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    /// HLC timestamp (µs since the Unix epoch, pushed forward past causal dependencies).
    pub ts: u64,
    /// The coordinating node's identity: the tie-breaker for equal timestamps.
    pub writer: String,
}

/// A hybrid logical clock: monotonic, close to wall time, and always ahead of what it has observed.
///
/// Lock-free (one atomic) because every write on every request path ticks it.
#[derive(Debug, Default)]
pub struct Hlc {
    last: AtomicU64,
}

impl Hlc {
    /// A clock that will never issue a timestamp at or below `floor` (e.g. the largest persisted one).
    pub fn starting_after(floor: u64) -> Self {
        Hlc { last: AtomicU64::new(floor) }
    }

    /// Issues a timestamp greater than every one issued before, than `depends_on`, and at least
    /// `wall_micros`.
    pub fn tick(&self, wall_micros: u64, depends_on: u64) -> u64 {
        let mut current = self.last.load(Ordering::Relaxed);
        loop {
            let next = wall_micros.max(depends_on + 1).max(current + 1);
            match self.last.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return next,
                Err(seen) => current = seen,
            }
        }
    }

    /// Makes sure future ticks are above `ts` (a timestamp received from another node).
    pub fn observe(&self, ts: u64) {
        self.last.fetch_max(ts, Ordering::AcqRel);
    }

    /// The last issued or observed timestamp.
    pub fn peek(&self) -> u64 {
        self.last.load(Ordering::Acquire)
    }
}

/// Current wall-clock time in microseconds since the Unix epoch (0 if the clock is before 1970).
pub fn wall_micros() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Where a node reads wall-clock time (for HLC timestamps and forwarded-write expiry): the system
/// clock in production, a simulated one in deterministic tests.
pub trait Clock: Send + Sync + 'static {
    /// Microseconds since the Unix epoch.
    fn wall_micros(&self) -> u64;
}

/// The system's wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn wall_micros(&self) -> u64 {
        wall_micros()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn clock(entries: &[(&str, u64)]) -> VectorClock {
        let mut c = VectorClock::new();
        for &(n, v) in entries {
            c.observe(n, v);
        }
        c
    }

    #[test]
    fn empty_payload_is_the_empty_clock() {
        assert_eq!(VectorClock::from_payload("").unwrap(), VectorClock::new());
        assert_eq!(VectorClock::from_payload("  ").unwrap(), VectorClock::new());
        assert_eq!(VectorClock::new().to_payload(), "");
    }

    #[test]
    fn garbage_payloads_are_rejected_with_a_reason() {
        assert_eq!(VectorClock::from_payload("not base64!"), Err(PayloadError::NotBase64));
        assert_eq!(VectorClock::from_payload("AQ"), Err(PayloadError::Malformed), "version 1, entries missing");
        assert_eq!(VectorClock::from_payload("AQAA"), Err(PayloadError::Malformed), "trailing bytes");
        assert!(matches!(
            VectorClock::from_payload(&"A".repeat(MAX_PAYLOAD_LEN + 1)),
            Err(PayloadError::TooLong { .. })
        ));
        let future = URL_SAFE_NO_PAD.encode(postcard::to_stdvec(&PayloadWire { version: 9, entries: vec![] }).unwrap());
        assert_eq!(VectorClock::from_payload(&future), Err(PayloadError::UnknownVersion(9)));
    }

    #[test]
    fn payload_is_compact() {
        let c = clock(&[("10.0.0.21:8080", 1_764_000_000_000_000), ("10.0.0.22:8080", 1_764_000_000_000_123)]);
        let p = c.to_payload();
        assert!(p.len() < 80, "{} bytes: {p}", p.len());
        assert!(p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    }

    #[test]
    fn hlc_is_strictly_monotonic_and_respects_dependencies() {
        let hlc = Hlc::starting_after(100);
        let a = hlc.tick(50, 0);
        assert_eq!(a, 101);
        let b = hlc.tick(50, 500);
        assert_eq!(b, 501);
        let c = hlc.tick(1000, 0);
        assert_eq!(c, 1000);
        hlc.observe(5000);
        assert_eq!(hlc.tick(1000, 0), 5001);
    }

    proptest! {
        #[test]
        fn payload_round_trips(entries in proptest::collection::btree_map("[0-9.:]{1,21}", any::<u64>(), 0..8)) {
            let c = VectorClock(entries);
            prop_assert_eq!(VectorClock::from_payload(&c.to_payload()).unwrap(), c);
        }

        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,200}") {
            let _ = VectorClock::from_payload(&s);
        }

        #[test]
        fn merge_is_an_upper_bound(a in proptest::collection::btree_map("[a-c]", 0u64..10, 0..3),
                                   b in proptest::collection::btree_map("[a-c]", 0u64..10, 0..3)) {
            let (a, b) = (VectorClock(a), VectorClock(b));
            let mut m = a.clone();
            m.merge(&b);
            prop_assert!(a.dominated_by(&m) && b.dominated_by(&m));
            prop_assert_eq!(m.max_entry(), a.max_entry().max(b.max_entry()));
        }
    }
}
