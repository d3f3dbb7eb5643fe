//! Naming the members of a resized cluster (pure): `kvsctl plan --replicas N` keeps the numbering
//! the current members follow, as a StatefulSet numbers its pods (`demo-0.demo…`, `demo-1.demo…`)
//! or local mode its loopback addresses (`127.0.0.1:8080`, `127.0.0.2:8080`). Shrinking removes
//! the highest numbers; growing adds the next ones.
//!
//! The number is the one run of digits in which the members differ (with a single member: the
//! last run before the port). Members that do not follow one numbering get an error asking for
//! `--members`.

/// A member split around its number.
#[derive(Debug, PartialEq, Eq)]
struct Numbered {
    prefix: String,
    number: u64,
    suffix: String,
}

/// Runs of digits and of everything else, in order.
fn runs(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let bytes = s.as_bytes();
    for i in 1..=bytes.len() {
        if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[i - 1].is_ascii_digit() {
            out.push(&s[start..i]);
            start = i;
        }
    }
    out
}

fn is_number(run: &str) -> bool {
    run.bytes().all(|b| b.is_ascii_digit())
}

/// Which run holds the number, for members that all have the same shape.
fn numbered_run(members: &[Vec<&str>]) -> Option<usize> {
    let shape = &members[0];
    if members.iter().any(|m| m.len() != shape.len()) {
        return None;
    }
    let differing: Vec<usize> = (0..shape.len()).filter(|&i| members.iter().any(|m| m[i] != shape[i])).collect();
    match differing.as_slice() {
        [i] if members.iter().all(|m| is_number(m[*i])) => Some(*i),
        [] if members.len() == 1 => {
            // One member: the last number before the port (`:8080`).
            let port = shape.iter().rposition(|r| r.ends_with(':')).map_or(shape.len(), |p| p + 1);
            (0..port.min(shape.len())).rev().find(|&i| is_number(shape[i]) && i + 1 < shape.len())
        }
        _ => None,
    }
}

fn split(members: &[String]) -> Option<Vec<Numbered>> {
    let all: Vec<Vec<&str>> = members.iter().map(|m| runs(m)).collect();
    let at = numbered_run(&all)?;
    all.iter()
        .map(|r| Some(Numbered { prefix: r[..at].concat(), number: r[at].parse().ok()?, suffix: r[at + 1..].concat() }))
        .collect()
}

/// The members of the cluster resized to `n` nodes, from its current `members`.
pub fn resize(members: &[String], n: usize) -> Result<Vec<String>, String> {
    if n == 0 {
        return Err("--replicas must be at least 1".into());
    }
    if members.is_empty() {
        return Err("the cluster has no members to number new ones after; pass --members".into());
    }
    let mut numbered = split(members).ok_or_else(|| {
        format!("the members {members:?} do not follow one numbering to name new ones by; pass --members instead")
    })?;
    numbered.sort_by_key(|m| m.number);
    let (prefix, suffix) = (numbered[0].prefix.clone(), numbered[0].suffix.clone());
    let mut next = numbered.last().map_or(0, |m| m.number + 1);
    while numbered.len() < n {
        numbered.push(Numbered { prefix: prefix.clone(), number: next, suffix: suffix.clone() });
        next += 1;
    }
    numbered.truncate(n);
    Ok(numbered.into_iter().map(|m| format!("{}{}{}", m.prefix, m.number, m.suffix)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn statefulset_pods_grow_and_shrink_by_ordinal() {
        let pods = names(&["demo-1.demo.ns.svc:8080", "demo-0.demo.ns.svc:8080"]);
        assert_eq!(
            resize(&pods, 3).unwrap(),
            names(&["demo-0.demo.ns.svc:8080", "demo-1.demo.ns.svc:8080", "demo-2.demo.ns.svc:8080"])
        );
        assert_eq!(resize(&pods, 1).unwrap(), names(&["demo-0.demo.ns.svc:8080"]));
    }

    #[test]
    fn loopback_addresses_count_up_in_their_last_byte() {
        let local = names(&["127.0.0.1:8080", "127.0.0.2:8080", "127.0.0.3:8080", "127.0.0.4:8080"]);
        assert_eq!(resize(&local, 6).unwrap()[4..], names(&["127.0.0.5:8080", "127.0.0.6:8080"]));
        assert_eq!(resize(&names(&["127.0.0.1:8080"]), 2).unwrap(), names(&["127.0.0.1:8080", "127.0.0.2:8080"]));
        // Ports that differ are the numbering too.
        assert_eq!(resize(&names(&["h:8080", "h:8081"]), 3).unwrap()[2], "h:8082");
    }

    #[test]
    fn members_without_one_numbering_ask_for_the_list() {
        let mixed = names(&["a.example:8080", "b.example:8080"]);
        assert!(resize(&mixed, 3).unwrap_err().contains("--members"));
        let two_numbers = names(&["10.0.0.1:8080", "10.0.1.2:8080"]);
        assert!(resize(&two_numbers, 3).is_err());
        assert!(resize(&names(&["10.0.0.1:8080"]), 0).is_err());
    }
}
