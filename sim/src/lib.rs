//! Deterministic simulation: whole kvstore clusters in one process, on a simulated network, clock
//! and disk, with faults scheduled from a seed, and the history checker judging every run (the
//! FoundationDB / TigerBeetle way).
//!
//! Why not a general network simulator (turmoil)? The node already talks to its peers through one
//! typed RPC boundary ([`kvs_node::peers::Peers`]), so simulating that boundary simulates every
//! message between nodes, with no HTTP stack to port and no std threads or real sockets left
//! behind it; and its faults map onto the evidence the failure detector reads (a crashed node
//! refuses, a cut-off or paused one is silent). The real-process fault-injection suite (`kvs-e2e`)
//! keeps covering HTTP, TCP and UDP.
//!
//! Determinism: a run is one current-thread tokio runtime with paused time (the clock jumps to the
//! next timer when every task waits), every random choice comes from generators seeded from the
//! run's seed, the node's `select!`s are biased and the maps it iterates are ordered. A seed
//! therefore replays bit for bit ([`run_seed`] twice gives the same [`Outcome::fingerprint`]).
//!
//! - [`net`]: the simulated network (latency, partitions, pauses, crashes; held messages are
//!   delivered when a fault heals, as on a real network);
//! - [`cluster`]: nodes with their simulated disks and clocks, crash and restart;
//! - [`workload`]: clients doing causal reads and writes, recording the history;
//! - [`nemesis`]: the fault schedule;
//! - [`run`]: one seed, start to verdict.

pub mod cluster;
pub mod nemesis;
pub mod net;
mod run;
pub mod workload;

pub use run::{Config, Outcome, run_all, run_seed};
