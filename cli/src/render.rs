//! What each command prints (pure: typed answers in, text out), as tables for people and JSON
//! documents for scripts. Values are bytes: JSON carries them as `value` when they are UTF-8 and as
//! `value_base64` when they are not.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use comfy_table::presets::NOTHING;
use comfy_table::{CellAlignment, Table};
use kvs_api::{ClusterStatus, Layout, RebalancePhase, Stored, ViewPlan, WriteResponse};
use serde_json::{Value, json};

fn table(header: &[&str], rows: Vec<Vec<String>>, numeric_from: usize) -> String {
    let mut t = Table::new();
    t.load_preset(NOTHING).set_header(header.to_vec());
    for row in rows {
        t.add_row(row);
    }
    for i in numeric_from..header.len() {
        if let Some(column) = t.column_mut(i) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    t.to_string().lines().map(str::trim_end).collect::<Vec<_>>().join("\n")
}

/// Digits grouped by thousands (`12,345`).
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A read, as JSON.
pub fn stored_json(key: &str, stored: &Stored) -> Value {
    let mut doc = json!({ "key": key, "partition_id": stored.partition_id, "timestamp": stored.timestamp });
    match std::str::from_utf8(&stored.value) {
        Ok(text) => doc["value"] = json!(text),
        Err(_) => doc["value_base64"] = json!(STANDARD.encode(&stored.value)),
    }
    doc
}

/// A write or a delete, for people.
pub fn written(verb: &str, key: &str, w: &WriteResponse) -> String {
    let copies = match w.replicas {
        0 => String::new(),
        r => format!(", durable on {} of {r} replicas", w.copies),
    };
    format!("{verb} {key:?} (partition {}{copies})", w.partition_id)
}

/// A write or a delete, as JSON.
pub fn written_json(key: &str, w: &WriteResponse) -> Value {
    json!({
        "key": key,
        "partition_id": w.partition_id,
        "timestamp": w.timestamp,
        "changed_liveness": w.changed_liveness,
        "copies": w.copies,
        "replicas": w.replicas,
    })
}

fn layout_line(l: &Layout) -> String {
    let members = l.members().count();
    format!(
        "epoch {} · replication factor {} · {} partitions · {members} members{}",
        l.epoch,
        l.replication_factor,
        l.partitions.len(),
        match l.proxies.len() {
            0 => String::new(),
            p => format!(" ({p} proxying)"),
        }
    )
}

/// One line about the latest view change, as the status's node saw it.
pub fn change_line(status: &ClusterStatus) -> String {
    let r = &status.rebalance;
    let moved = || {
        let total = if r.total_keys == 0 { "?".into() } else { count(r.total_keys) };
        format!("{} of {total} records moved", count(r.moved_keys))
    };
    match r.phase {
        RebalancePhase::Idle => "no change under way".into(),
        RebalancePhase::Failed => {
            format!("change to epoch {} failed: {}", r.epoch, r.error.as_deref().unwrap_or("no reason given"))
        }
        RebalancePhase::Done => format!("last change: to epoch {}, {} records moved", r.epoch, count(r.moved_keys)),
        RebalancePhase::Pending => {
            format!("change to epoch {} under way, driven by another node: {}", r.epoch, moved())
        }
        phase => format!("change to epoch {} {phase}: {}", r.epoch, moved()),
    }
}

/// The cluster, for people: a summary line, the latest change, one row per replica.
pub fn status(s: &ClusterStatus) -> String {
    let Some(layout) = &s.layout else {
        return format!("{} has no view yet: it waits to be added to a cluster", s.node);
    };
    let mut rows = Vec::new();
    for p in &s.partitions {
        let agreed = p.digests.first().cloned().flatten();
        for (i, member) in p.members.iter().enumerate() {
            let keys = p.live_keys.get(i).copied().flatten();
            let digest = p.digests.get(i).cloned().flatten();
            let sync = match (&digest, &agreed) {
                (None, _) => "unreachable",
                (Some(d), Some(a)) if d == a => "yes",
                _ => "differs",
            };
            rows.push(vec![
                p.partition_id.to_string(),
                member.clone(),
                sync.to_owned(),
                keys.map_or("?".into(), count),
            ]);
        }
    }
    for proxy in &layout.proxies {
        rows.push(vec!["-".into(), proxy.clone(), "proxy".into(), "-".into()]);
    }
    format!(
        "{}\n{}\n\n{}",
        layout_line(layout),
        change_line(s),
        table(&["PARTITION", "MEMBER", "IN SYNC", "KEYS"], rows, 3)
    )
}

/// A view-change preview, for people.
pub fn plan(p: &ViewPlan) -> String {
    if p.current == p.target {
        return format!(
            "{}\nno change: the cluster already has these members and replication factor",
            layout_line(&p.current)
        );
    }
    let rows = p
        .nodes
        .iter()
        .map(|n| {
            let proxy = p.target.proxies.contains(&n.node);
            let role = match (p.current.members().any(|m| *m == n.node), p.target.members().any(|m| *m == n.node)) {
                (false, true) if proxy => "joins, proxies",
                (false, true) => "joins",
                (true, false) => "leaves",
                _ if proxy => "stays, proxies",
                _ => "stays",
            };
            vec![
                n.node.clone(),
                role.into(),
                count(n.records_now),
                count(n.records_in),
                count(n.records_out),
                count(n.records_after),
            ]
        })
        .collect();
    let mut out = format!(
        "from {}\n  to {}\n{} slots change owners; {} records would be sent\n\n{}",
        layout_line(&p.current),
        layout_line(&p.target),
        count(u64::from(p.moved_slots)),
        count(p.moved_records),
        table(&["NODE", "ROLE", "RECORDS NOW", "IN", "OUT", "AFTER"], rows, 2)
    );
    if !p.unmeasured_partitions.is_empty() {
        out.push_str(&format!(
            "\nno replica of partitions {:?} answered: their records are not counted",
            p.unmeasured_partitions
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvs_api::{NodePlan, PartitionStatus, RebalanceProgress};

    fn layout(epoch: u64, partitions: &[&[&str]]) -> Layout {
        Layout {
            epoch,
            replication_factor: 2,
            partitions: partitions.iter().map(|p| p.iter().map(|m| m.to_string()).collect()).collect(),
            proxies: vec![],
        }
    }

    #[test]
    fn counts_group_thousands() {
        assert_eq!(
            (count(0), count(999), count(1000), count(1234567)),
            ("0".into(), "999".into(), "1,000".into(), "1,234,567".into())
        );
    }

    #[test]
    fn binary_values_go_to_json_as_base64() {
        let stored = Stored { value: bytes::Bytes::from_static(&[0xff, 0x00]), partition_id: 1, timestamp: 7 };
        let doc = stored_json("k", &stored);
        assert_eq!(doc["value_base64"], "/wA=");
        assert!(doc.get("value").is_none());
        let text = Stored { value: bytes::Bytes::from_static(b"hi"), partition_id: 1, timestamp: 7 };
        assert_eq!(stored_json("k", &text)["value"], "hi");
    }

    #[test]
    fn status_marks_replicas_that_differ_or_did_not_answer() {
        let cluster = ClusterStatus {
            node: "a:1".into(),
            layout: Some(layout(3, &[&["a:1", "b:1", "c:1"]])),
            pending_epoch: None,
            partitions: vec![PartitionStatus {
                partition_id: 0,
                members: vec!["a:1".into(), "b:1".into(), "c:1".into()],
                live_keys: vec![Some(1200), Some(1199), None],
                digests: vec![Some("x".into()), Some("y".into()), None],
            }],
            rebalance: RebalanceProgress {
                epoch: 3,
                phase: RebalancePhase::Done,
                moved_keys: 5000,
                ..Default::default()
            },
        };
        let text = status(&cluster);
        assert!(text.contains("epoch 3 · replication factor 2 · 1 partitions · 3 members"), "{text}");
        assert!(text.contains("last change: to epoch 3, 5,000 records moved"), "{text}");
        let rows: Vec<&str> = text.lines().skip(4).collect();
        assert!(rows[0].contains("a:1") && rows[0].contains("yes") && rows[0].contains("1,200"), "{text}");
        assert!(rows[1].contains("differs") && rows[2].contains("unreachable") && rows[2].ends_with('?'), "{text}");
    }

    #[test]
    fn a_plan_names_who_joins_and_leaves() {
        let preview = ViewPlan {
            current: layout(1, &[&["a:1", "b:1"]]),
            target: layout(2, &[&["a:1", "c:1"]]),
            nodes: ["a:1", "b:1", "c:1"]
                .iter()
                .map(|n| NodePlan { node: n.to_string(), ..Default::default() })
                .collect(),
            moved_slots: 16384,
            moved_records: 10,
            unmeasured_partitions: vec![],
        };
        let text = plan(&preview);
        assert!(text.contains("16,384 slots change owners; 10 records would be sent"), "{text}");
        let role = |node: &str| text.lines().find(|l| l.trim_start().starts_with(node)).unwrap().to_owned();
        assert!(role("b:1").contains("leaves") && role("c:1").contains("joins") && role("a:1").contains("stays"));
    }
}
