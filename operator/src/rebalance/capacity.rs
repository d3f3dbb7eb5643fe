//! Capacity preview (pure): before a view change that leaves fewer partitions (a scale-in, a higher
//! replication factor), what each node will hold, and whether that fits the volume each pod has.
//!
//! The data today is measured, not guessed: every member reports the key and value bytes it holds
//! (`GET /v1/admin/usage`), and a partition's data is what its fullest replica holds. After the
//! change, `P′ = floor(members / K)` partitions (one when `members < K`) split the 16,384 slots
//! evenly (`SLOT_COUNT / P′` slots each, or one more: the node's slot table), and keys spread over
//! slots by SHA-1, so the fullest partition holds its slots' share of the total; each of its `K`
//! replicas holds all of it, and the leftover nodes (proxies) hold nothing.
//!
//! A volume must hold more than the data: the B-tree's pages and the write-ahead log. The rule
//! ([`needed_bytes`]) was measured on a node's data directory (`docs/operations.md`, "Capacity").

use kvs_api::{Layout, NodeUsage, SLOT_COUNT};

/// Volume bytes per byte of keys and values: each record also carries its version and causal
/// clock, and the copy-on-write B-tree keeps free pages. Measured with 100 B values and 12 B keys:
/// 3.3 times (20,000 keys) and 3.5 times (200,000 keys) in disk blocks; rounded up to 4.
pub const OVERHEAD_FACTOR: u64 = 4;
/// Volume bytes that do not depend on the data: the write-ahead log grows in 4 MiB steps up to
/// what a memtable holds before a flush (16 MiB), plus room for it to be rewritten.
pub const RESERVED_BYTES: u64 = 32 << 20;

/// What a change would make each node hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapacityPlan {
    pub members: u32,
    pub replication_factor: u32,
    pub partitions: u32,
    /// Nodes that will hold a partition (`partitions × K`, or every member when fewer than K).
    pub storing_nodes: u32,
    /// Distinct live keys and their bytes in the cluster now.
    pub total_keys: u64,
    pub total_bytes: u64,
    /// What the fullest storing node will hold.
    pub per_node_keys: u64,
    pub per_node_bytes: u64,
    /// The volume that needs (see [`needed_bytes`]).
    pub needed_bytes: u64,
    /// Each pod's volume (`spec.storage.size`), if known.
    pub volume_bytes: Option<u64>,
}

impl CapacityPlan {
    /// Whether the fullest node's data fits its volume (no volume size known: it fits).
    pub fn fits(&self) -> bool {
        self.volume_bytes.is_none_or(|v| self.needed_bytes <= v)
    }

    /// One line with the numbers, for a condition, an Event or a terminal.
    pub fn summary(&self) -> String {
        let verdict = match self.volume_bytes {
            Some(v) if self.fits() => format!("fits the {} volumes", human(v)),
            Some(v) => format!("does NOT fit the {} volumes", human(v)),
            None => "no volume size to check".to_owned(),
        };
        format!(
            "{} nodes at replicationFactor {}: {} partitions over {} nodes; {} keys, {} in all; each storing node \
             about {} keys, {}, needing {} of volume: {verdict}",
            self.members,
            self.replication_factor,
            self.partitions,
            self.storing_nodes,
            self.total_keys,
            human(self.total_bytes),
            self.per_node_keys,
            human(self.per_node_bytes),
            human(self.needed_bytes),
        )
    }
}

/// Why a change that leaves fewer partitions is held back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The fullest node would not fit its volume.
    DoesNotFit(CapacityPlan),
    /// What the members hold could not be measured, so the change is not made blind.
    Unmeasured(Unmeasured),
}

impl Refusal {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::DoesNotFit(_) => "InsufficientStorage",
            Refusal::Unmeasured(_) => "CapacityUnknown",
        }
    }

    /// What is refused and what to do, with the numbers.
    pub fn explain(&self) -> String {
        match self {
            Refusal::DoesNotFit(plan) => format!(
                "refusing the change: {}; scale in less, keep replicationFactor, or create the cluster with larger \
                 storage.size",
                plan.summary()
            ),
            Refusal::Unmeasured(why) => format!("holding the change until its capacity can be checked: {why}"),
        }
    }
}

/// Why no plan could be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unmeasured {
    #[error("no member of partition {0} reported what it holds (GET /v1/admin/usage)")]
    Partition(usize),
}

/// The volume a node holding `data_bytes` of keys and values needs.
pub fn needed_bytes(data_bytes: u64) -> u64 {
    data_bytes.saturating_mul(OVERHEAD_FACTOR).saturating_add(RESERVED_BYTES)
}

/// Partitions a view of `members` nodes at `k` has (as the nodes chunk it).
pub fn partition_count(members: u32, k: u32) -> u32 {
    if members < k.max(1) { 1 } else { members / k.max(1) }
}

/// Whether changing `current` to `members` nodes at `k` leaves fewer partitions, so that each
/// storing node holds more.
pub fn shrinks(current: &Layout, members: u32, k: u32) -> bool {
    partition_count(members, k) < current.partitions.len() as u32
}

/// The plan for changing `current` to `members` nodes at `k`, from what the members hold now.
pub fn preview(
    current: &Layout,
    usage: &[NodeUsage],
    members: u32,
    k: u32,
    volume_bytes: Option<u64>,
) -> Result<CapacityPlan, Unmeasured> {
    let (mut total_keys, mut total_bytes) = (0u64, 0u64);
    for (i, partition) in current.partitions.iter().enumerate() {
        let reports: Vec<&NodeUsage> = usage.iter().filter(|u| partition.contains(&u.node)).collect();
        let fullest = reports.iter().max_by_key(|u| (u.live_bytes, u.live_keys)).ok_or(Unmeasured::Partition(i))?;
        total_keys += fullest.live_keys;
        total_bytes += fullest.live_bytes;
    }
    let partitions = partition_count(members, k);
    let storing_nodes = if members < k { members } else { partitions * k };
    let slots = SLOT_COUNT.div_ceil(partitions as usize) as u64;
    let share = |total: u64| (u128::from(total) * u128::from(slots)).div_ceil(SLOT_COUNT as u128) as u64;
    let per_node_bytes = share(total_bytes);
    Ok(CapacityPlan {
        members,
        replication_factor: k,
        partitions,
        storing_nodes,
        total_keys,
        total_bytes,
        per_node_keys: share(total_keys),
        per_node_bytes,
        needed_bytes: needed_bytes(per_node_bytes),
        volume_bytes,
    })
}

/// Bytes for people (binary units, as Kubernetes quantities are usually written).
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(members: u32, k: u32) -> Layout {
        let all: Vec<String> = (0..members).map(|o| format!("n{o}")).collect();
        let p = partition_count(members, k) as usize;
        Layout {
            epoch: 3,
            replication_factor: k,
            partitions: all.chunks(k as usize).take(p).map(|c| c.to_vec()).collect(),
            proxies: all[(p * k as usize).min(all.len())..].to_vec(),
        }
    }

    fn usage(node: &str, keys: u64, bytes: u64) -> NodeUsage {
        NodeUsage { node: node.into(), live_keys: keys, live_bytes: bytes, tombstones: 0 }
    }

    #[test]
    fn a_scale_in_to_one_partition_puts_everything_on_each_remaining_node() {
        // 4 nodes, K=2: two partitions of 1,000 keys / 100 KB each (one replica lagging).
        let reports = [
            usage("n0", 1000, 100_000),
            usage("n1", 990, 99_000),
            usage("n2", 1000, 100_000),
            usage("n3", 1000, 100_000),
        ];
        let now = layout(4, 2);
        assert!(shrinks(&now, 2, 2) && !shrinks(&now, 5, 2) && !shrinks(&now, 4, 1) && shrinks(&now, 3, 3));
        let plan = preview(&now, &reports, 2, 2, Some(64 << 20)).unwrap();
        assert_eq!((plan.partitions, plan.storing_nodes), (1, 2));
        assert_eq!(
            (plan.total_keys, plan.total_bytes, plan.per_node_keys, plan.per_node_bytes),
            (2000, 200_000, 2000, 200_000)
        );
        assert_eq!(plan.needed_bytes, 800_000 + RESERVED_BYTES);
        assert!(plan.fits(), "{}", plan.summary());
        let small = preview(&now, &reports, 2, 2, Some(1 << 20)).unwrap();
        assert!(!small.fits());
        assert!(small.summary().contains("does NOT fit the 1.0 MiB volumes"), "{}", small.summary());
    }

    #[test]
    fn three_partitions_share_the_slots_and_proxies_hold_nothing() {
        let now = layout(6, 1);
        let reports: Vec<NodeUsage> = (0..6).map(|o| usage(&format!("n{o}"), 100, 16_384)).collect();
        // 7 nodes at K=2: 3 partitions (6 storing nodes, 1 proxy); 5,462 of 16,384 slots each.
        let plan = preview(&now, &reports, 7, 2, None).unwrap();
        assert_eq!((plan.partitions, plan.storing_nodes), (3, 6));
        assert_eq!(plan.per_node_bytes, (6 * 16_384 * 5_462u64).div_ceil(16_384));
        assert!(plan.fits());
    }

    #[test]
    fn a_partition_nobody_reports_is_not_guessed() {
        let now = layout(4, 2);
        let reports = [usage("n0", 1, 1), usage("n1", 1, 1)];
        assert_eq!(preview(&now, &reports, 2, 2, None), Err(Unmeasured::Partition(1)));
    }
}
