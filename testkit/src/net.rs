//! Addresses for multi-process tests that never collide: every test that runs node processes takes
//! a whole loopback `/24` (`127.0.<octet>.0/24`) or a namespace-network id from here and holds it
//! until it drops the lease.
//!
//! Invariant: two live leases of one pool never share a number, in one process or across processes
//! (parallel test threads, test binaries run side by side, a `kvs-chaos` run beside the suite). A
//! lease is an exclusive lock on the file `<temp dir>/kvs-test-leases/<pool>-<number>`, taken with
//! `File::try_lock` and released by the kernel when the file closes: on drop, and also when the
//! holder is killed, so a crashed test never strands a number. A process started meanwhile holds
//! copies of the open lease files until it executes its program (they are close-on-exec): for that
//! moment a number just dropped still looks taken, and `take` moves on to the next.
//!
//! Reserved, never handed out: `127.0.0.x` (the local run and the operator's HTTP endpoints),
//! `127.0.1.x` to `127.0.9.x` (the benchmark scripts use `127.0.2.x` and `127.0.3.x`).

use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// The port every test node listens on.
pub const NODE_PORT: u16 = 8080;

/// Numbers handed out by every pool (the third octet of a loopback net, the id of a namespace run).
const FIRST: u8 = 10;
const LAST: u8 = 250;

/// One number of a pool, held until dropped.
#[derive(Debug)]
pub struct Lease {
    number: u8,
    /// Holding the locked file is what holds the number.
    _lock: File,
}

impl Lease {
    /// Takes the first free number of `pool`. Panics when every number is taken (hundreds of
    /// simultaneous tests: a leak, not a load).
    pub fn take(pool: &str) -> Lease {
        let dir = std::env::temp_dir().join("kvs-test-leases");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        // Start each search somewhere else, so parallel tests rarely try the same file first.
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let span = u32::from(LAST - FIRST) + 1;
        let start = (std::process::id().wrapping_mul(7919) + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        for i in 0..span {
            let number = FIRST + ((start + i) % span) as u8;
            let path: PathBuf = dir.join(format!("{pool}-{number}"));
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
            if file.try_lock().is_ok() {
                return Lease { number, _lock: file };
            }
        }
        panic!("every number of the {pool:?} pool is leased ({FIRST}..={LAST}): some test leaks leases")
    }

    pub fn number(&self) -> u8 {
        self.number
    }
}

/// A loopback `/24` of this test's own: `127.0.<octet>.1` … `127.0.<octet>.254`.
#[derive(Debug)]
pub struct LoopbackNet {
    lease: Lease,
}

impl LoopbackNet {
    pub fn take() -> LoopbackNet {
        LoopbackNet { lease: Lease::take("loopback") }
    }

    /// The third octet.
    pub fn octet(&self) -> u8 {
        self.lease.number()
    }

    /// `127.0.<octet>.<host>`.
    pub fn ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, self.octet(), host)
    }

    /// The address of node `i` (0-based): `127.0.<octet>.<i+1>:8080` (`.254` is left to
    /// [`LoopbackNet::service`]).
    pub fn node(&self, i: usize) -> String {
        let host = u8::try_from(i + 1).ok().filter(|h| *h < 254).expect("at most 253 nodes per net");
        format!("{}:{NODE_PORT}", self.ip(host))
    }

    /// `127.0.<octet>.` (for tools that append a host number themselves).
    pub fn prefix(&self) -> String {
        format!("127.0.{}.", self.octet())
    }

    /// An address for something that is not a node (an operator's HTTP endpoint, a proxy):
    /// `127.0.<octet>.254:<port>`, above the node addresses.
    pub fn service(&self, port: u16) -> String {
        format!("{}:{port}", self.ip(254))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_never_share_a_number_until_dropped() {
        // Regression (fresh-clone CI, 1 run): a process started by another test of this binary
        // held a copy of a lease file at the moment this test took every number.
        let _alone = crate::no_process_starts_meanwhile();
        let held: Vec<Lease> = (0..20).map(|_| Lease::take("unit-test")).collect();
        let mut numbers: Vec<u8> = held.iter().map(Lease::number).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), 20);
        assert!(numbers.iter().all(|n| (FIRST..=LAST).contains(n)));
        let freed = held[0].number();
        drop(held);
        // Every number is free again: taking them all must succeed and include the one freed.
        let all: Vec<Lease> = (0..=(LAST - FIRST)).map(|_| Lease::take("unit-test")).collect();
        assert!(all.iter().any(|l| l.number() == freed));
    }

    #[test]
    fn loopback_addresses() {
        let net = LoopbackNet::take();
        let o = net.octet();
        assert_eq!(net.node(0), format!("127.0.{o}.1:8080"));
        assert_eq!(net.node(5), format!("127.0.{o}.6:8080"));
        assert_eq!(net.service(8081), format!("127.0.{o}.254:8081"));
        assert_eq!(net.prefix(), format!("127.0.{o}."));
    }
}
