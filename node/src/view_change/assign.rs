//! Source assignment (pure): for each slot that moves in a view change, which live old owner sends
//! it, to which new owners, after catching up from which other old owners.
//!
//! Sources rotate by slot so the work spreads over every live old owner; a slot whose old owners
//! are all dead or failed is reported as stranded (its keys cannot move now and stay where they
//! are); a slot with no live receiver is skipped (the receivers catch up by anti-entropy).

use crate::placement::Slot;
use crate::protocol::Assignment;
use crate::view::{NodeId, SlotMove};
use std::collections::{BTreeMap, BTreeSet};

/// What each source is to send, and the slots nobody can send.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub by_source: BTreeMap<NodeId, Vec<Assignment>>,
    pub stranded: Vec<Slot>,
}

/// Assigns `moves` to sources among the `live` nodes, leaving out `failed` ones.
pub fn assign(moves: &[SlotMove], live: &[NodeId], failed: &BTreeSet<NodeId>) -> Plan {
    let mut plan = Plan::default();
    for m in moves {
        let sources: Vec<&NodeId> = m.sources.iter().filter(|n| live.contains(n) && !failed.contains(*n)).collect();
        let receivers: Vec<NodeId> = m.receivers.iter().filter(|n| live.contains(n)).cloned().collect();
        if receivers.is_empty() {
            continue;
        }
        let Some(&source) = sources.get(m.slot as usize % sources.len().max(1)) else {
            plan.stranded.push(m.slot);
            continue;
        };
        let co_sources = sources.iter().filter(|s| **s != source).map(|s| (*s).clone()).collect();
        plan.by_source.entry(source.clone()).or_default().push(Assignment { slot: m.slot, receivers, co_sources });
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mv(slot: Slot, sources: &[&str], receivers: &[&str]) -> SlotMove {
        SlotMove {
            slot,
            sources: sources.iter().map(|s| s.to_string()).collect(),
            receivers: receivers.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn names(n: &[&str]) -> Vec<NodeId> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sources_rotate_skip_the_dead_and_name_the_others_as_co_sources() {
        let moves = [mv(0, &["a", "b"], &["c"]), mv(1, &["a", "b"], &["c"]), mv(2, &["a", "b"], &["c", "d"])];
        let plan = assign(&moves, &names(&["a", "b", "c"]), &BTreeSet::new());
        assert_eq!(plan.by_source["a"].iter().map(|a| a.slot).collect::<Vec<_>>(), [0, 2]);
        assert_eq!(plan.by_source["b"][0].slot, 1);
        assert_eq!(plan.by_source["b"][0].co_sources, ["a"]);
        assert_eq!(plan.by_source["a"][1].receivers, ["c"], "dead receivers are left out");
        let failed: BTreeSet<NodeId> = ["a".to_string()].into();
        let plan = assign(&moves, &names(&["a", "b", "c"]), &failed);
        assert_eq!(plan.by_source.keys().collect::<Vec<_>>(), ["b"], "a failed source gets nothing");
        assert!(plan.by_source["b"].iter().all(|a| a.co_sources.is_empty()));
    }

    #[test]
    fn slots_without_a_live_source_are_stranded_and_without_a_live_receiver_skipped() {
        let moves = [mv(0, &["a"], &["c"]), mv(1, &["b"], &["d"])];
        let plan = assign(&moves, &names(&["b", "c"]), &BTreeSet::new());
        assert_eq!(plan.stranded, [0]);
        assert!(plan.by_source.is_empty(), "slot 1's only receiver is dead");
    }
}
