//! Test support shared by kvstore's suites.
//!
//! - [`process`]: node processes (start from a command, signal, pause until stopped, stop
//!   cleanly, kill, restart on the same data, wait until healthy), used by the node's cluster
//!   tests, the fault-injection harness and the stand-in kubelet of `kvs-e2e`.
//! - [`net`]: addresses that never collide between tests running side by side (a loopback `/24`
//!   or a namespace-network id per test, leased through a file lock).
//! - [`k8s_request`]: the attributes the Kubernetes API server derives from a request, for the test
//!   doubles that stand in for parts of it.
//! - [`s3`]: a real S3 API server (moto) on a test's own loopback address.
//! - [`certs`]: a test's own certificate authority, issuing certificates into files (TLS tests).
//! - [`history`]: operation histories and the checker that judges them (no lost acknowledged
//!   write, no causal read going back in time), used by the real-process fault-injection runs
//!   (`kvs-e2e`) and the deterministic simulator (`kvs-sim`).

pub mod certs;
pub mod history;
pub mod k8s_request;
pub mod net;
pub mod process;
pub mod s3;

/// Held by this crate's unit tests that start processes and by the lease test. Starting a process
/// copies the parent's open files into the child until it executes its program (they are
/// close-on-exec), so for that moment the child also holds every lease file open then, with its
/// lock: a number freed a moment before can look taken. The lease test needs every number of its
/// pool free at once, so it must not run beside them (tests of one binary run in parallel threads).
#[cfg(test)]
pub(crate) fn no_process_starts_meanwhile() -> std::sync::MutexGuard<'static, ()> {
    static STARTS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    STARTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
