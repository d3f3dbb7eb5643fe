//! kvstore's cross-process test kit: real node processes on loopback or in network namespaces
//! (`cluster`), seeded fault-injection runs with a recording workload (`chaos`), and the checker
//! that judges the recorded history (`history`, pure).

pub mod chaos;
pub mod cluster;
pub mod history;
