//! Test support shared by kvstore's suites.
//!
//! - [`history`]: operation histories and the checker that judges them (no lost acknowledged
//!   write, no causal read going back in time), used by the real-process fault-injection runs
//!   (`kvs-e2e`) and the deterministic simulator (`kvs-sim`).

pub mod history;
