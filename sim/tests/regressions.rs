//! Seeds that found bugs, pinned with a one-line postmortem each (they replay bit for bit, so each
//! keeps exercising exactly the schedule that broke).

use kvs_sim::{Config, run_seed};

fn passes(seed: u64) {
    let outcome = run_seed(seed, Config::default());
    assert!(outcome.passed(), "seed {seed}: {:?}", outcome.violations);
}

/// Postmortem: a node paused through a K change came back on its old view, coordinated writes as
/// an owner it no longer was and accepted late replicas; nothing ever pruned those records again,
/// so they stayed outside every replica set. Now replicas refuse records of slots they do not own
/// and every node hands unowned records to their owners every 25 anti-entropy rounds.
#[test]
fn seed_23_a_node_behind_a_k_change_keeps_no_records_it_does_not_own() {
    passes(23);
}

/// Same bug after a membership change and crashes (three crashes, one partition).
#[test]
fn seed_929_records_delivered_after_a_membership_change_are_handed_over() {
    passes(929);
}

/// Postmortem: the harness read the final state before a node that missed a view change had
/// learned it (it answered from its old view); convergence now means every node is on the final
/// view and holds nothing it does not own. Pinned because it writes through a stale-view node.
#[test]
fn seed_43_writes_through_a_node_that_missed_a_view_change_are_not_lost() {
    passes(43);
}

/// Postmortem (a bug in the checker, not the store): a read of "absent" was remembered as having
/// seen the newest delete that could have produced it, even one still under way, so a later read
/// of a value written before that delete began looked like a step back. An ambiguous read now
/// counts as having seen only the oldest write that could have produced it.
#[test]
fn seed_115_a_read_of_absent_proves_only_the_oldest_delete_it_may_have_seen() {
    passes(115);
}
