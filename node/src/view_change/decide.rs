//! The change decision (pure): what a primary receiver does with a request for a membership and
//! K, given the view it holds, a change that may be pending, and who holds the promise for it.

use super::ChangeError;
use crate::view::{NodeId, plan_layout};
use kvs_api::Layout;

/// What to do with a requested change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The view already has exactly these members and K.
    NoOp,
    /// Run a change to this layout.
    Change(Layout),
    /// A change is pending whose proposer is gone (or is this node): finish it first (every phase
    /// is idempotent), then decide again.
    Resume(Layout),
}

/// Checks a requested membership and K.
pub fn validate(members: &[NodeId], k: u32) -> Result<(), ChangeError> {
    if k == 0 {
        return Err(ChangeError::ZeroReplicationFactor);
    }
    if members.is_empty() {
        return Err(ChangeError::NoMembers);
    }
    for m in members {
        match m.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
            _ => return Err(ChangeError::BadMember(m.clone())),
        }
    }
    Ok(())
}

/// True when `layout` already has exactly `members` (in any order, duplicates ignored) and `k`.
pub fn same_membership(layout: &Layout, members: &[NodeId], k: u32) -> bool {
    let mut have: Vec<&String> = layout.members().collect();
    have.sort();
    let mut want: Vec<&String> = members.iter().collect();
    want.sort();
    want.dedup();
    layout.replication_factor == k && have == want
}

/// Decides what `me` does with a request for `members` at `k` (already validated). `promise`:
/// the live promise for the pending change, if any (epoch, proposer).
pub fn decide(
    current: &Layout,
    pending: Option<&Layout>,
    promise: Option<(u64, &str)>,
    me: &str,
    members: &[NodeId],
    k: u32,
) -> Result<Decision, ChangeError> {
    if let Some(pending) = pending {
        let driven_elsewhere = promise.filter(|(_, proposer)| *proposer != me);
        return match driven_elsewhere {
            Some((_, proposer)) if !same_membership(pending, members, k) => {
                Err(ChangeError::InProgress { epoch: pending.epoch, proposer: proposer.to_owned() })
            }
            _ => Ok(Decision::Resume(pending.clone())),
        };
    }
    if same_membership(current, members, k) {
        return Ok(Decision::NoOp);
    }
    Ok(Decision::Change(plan_layout(current, members, k)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::View;

    fn names(n: &[&str]) -> Vec<NodeId> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn requests_are_validated() {
        assert!(matches!(validate(&names(&["a:1"]), 0), Err(ChangeError::ZeroReplicationFactor)));
        assert!(matches!(validate(&[], 1), Err(ChangeError::NoMembers)));
        assert!(matches!(validate(&names(&["a:1", "b"]), 1), Err(ChangeError::BadMember(m)) if m == "b"));
        assert!(matches!(validate(&names(&[":1"]), 1), Err(ChangeError::BadMember(_))));
        validate(&names(&["a:1", "b:2"]), 2).unwrap();
    }

    #[test]
    fn no_op_change_resume_or_conflict() {
        let current = View::initial(&names(&["a:1", "b:1"]), 1).layout().clone();
        assert_eq!(decide(&current, None, None, "a:1", &names(&["b:1", "a:1", "a:1"]), 1).unwrap(), Decision::NoOp);
        let Decision::Change(target) = decide(&current, None, None, "a:1", &names(&["a:1", "b:1", "c:1"]), 1).unwrap()
        else {
            panic!("a new member is a change");
        };
        assert_eq!(target.epoch, current.epoch + 1);
        let pending = target.clone();
        let members = names(&["a:1", "b:1"]);
        assert!(
            matches!(
                decide(&current, Some(&pending), Some((pending.epoch, "b:1")), "a:1", &members, 1),
                Err(ChangeError::InProgress { proposer, .. }) if proposer == "b:1"
            ),
            "another live proposer's change to something else"
        );
        let same = names(&["a:1", "b:1", "c:1"]);
        let resumed = decide(&current, Some(&pending), Some((pending.epoch, "b:1")), "a:1", &same, 1).unwrap();
        assert_eq!(resumed, Decision::Resume(pending.clone()), "asking for what is pending joins it");
        let abandoned = decide(&current, Some(&pending), None, "a:1", &members, 1).unwrap();
        assert_eq!(abandoned, Decision::Resume(pending.clone()), "a lapsed promise: finish it first");
        let mine = decide(&current, Some(&pending), Some((pending.epoch, "a:1")), "a:1", &members, 1).unwrap();
        assert_eq!(mine, Decision::Resume(pending), "this node's own interrupted change");
    }
}
