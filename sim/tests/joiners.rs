//! A joining node that loses steps of the view change adding it, on the simulated network: once
//! the change has committed on the others, the joiner must end on that view, catch up and serve
//! its partition — it has no view of its own to learn the new one from, so its peers hand it over.
//!
//! Each test counts the steps the network lost, so the fault it names did happen.

use kvs_node::node::Node;
use kvs_node::protocol::{ChangeStep, PeerRequest};
use kvs_node::view::View;
use kvs_sim::cluster::SimCluster;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// How long (virtual time) a joiner may take to learn the view once the change has returned.
const LEARN_LIMIT: Duration = Duration::from_secs(30);

fn simulate<F: std::future::Future>(test: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build();
    runtime.expect("a current-thread runtime builds").block_on(test)
}

/// Four members (K=2) and two spares; `keys` written before the change. The network loses every
/// request to the last spare that `lose` picks; the change adds both spares (a new partition).
/// Returns the cluster, the joiner's id and how many requests were lost.
async fn add_two_losing(keys: usize, lose: fn(&ChangeStep) -> bool) -> (SimCluster, String, usize) {
    let cluster = SimCluster::start(11, 4, 2, 2);
    let ids = cluster.ids();
    let first = cluster.net.node(&ids[0]).expect("running");
    for i in 0..keys {
        let value = bytes::Bytes::from(format!("v{i}"));
        first.write(&format!("key{i}"), Some(value), Default::default(), 0).await.expect("a write before the change");
    }
    let joiner = ids[5].clone();
    let lost = Arc::new(AtomicUsize::new(0));
    let (to, counter) = (joiner.clone(), lost.clone());
    cluster.net.set_loss(Some(Arc::new(move |_from: &str, dest: &str, request: &PeerRequest| {
        let picked = dest == to && matches!(request, PeerRequest::Change(step) if lose(step));
        if picked {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        picked
    })));
    let changed = first.change_view(ids.clone(), 2).await.expect("the change commits without the joiner's answers");
    assert_eq!(changed.layout.partitions.len(), 3);
    cluster.net.set_loss(None);
    let lost = lost.load(Ordering::Relaxed);
    (cluster, joiner, lost)
}

/// Waits until `node` holds `layout`'s view with nothing pending and has caught up.
async fn learns(node: &Node, view: &View) {
    let deadline = Instant::now() + LEARN_LIMIT;
    loop {
        let on_view = node.view().is_some_and(|v| v.layout() == view.layout()) && node.pending().is_none();
        if on_view && node.is_caught_up() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} still on {:?} (pending {:?}, caught up {}) {LEARN_LIMIT:?} after the change to epoch {}",
            node.id(),
            node.view().map(|v| v.epoch()),
            node.pending().map(|p| p.epoch()),
            node.is_caught_up(),
            view.epoch()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every key reads back through `node` with its value.
async fn all_readable(node: &Node, keys: usize) {
    for i in 0..keys {
        let read = node.read(&format!("key{i}"), Default::default()).await.expect("a read through the joiner");
        let value = read.record.and_then(|r| r.value);
        assert_eq!(value.as_deref(), Some(format!("v{i}").as_bytes()), "key{i} through {}", node.id());
    }
}

#[test]
fn a_joiner_that_loses_the_commit_learns_the_view_and_serves_its_partition() {
    simulate(async {
        let (cluster, joiner, lost) = add_two_losing(300, |s| matches!(s, ChangeStep::Commit { .. })).await;
        assert_eq!(lost, 1, "the commit to the joiner was lost");
        let view = cluster.net.node(&cluster.ids()[0]).and_then(|n| n.view()).expect("the first member's view");
        let node = cluster.net.node(&joiner).expect("the joiner runs");
        learns(&node, &view).await;
        all_readable(&node, 300).await;
    });
}

#[test]
fn a_joiner_that_got_only_the_prepare_is_handed_the_view_and_serves_its_partition() {
    simulate(async {
        // No keys yet: nothing is transferred to the joiner, so the change commits although it
        // missed the begin (and with it every later step: the primary sends those only to the
        // nodes that took the begin); it ends with no view and no pending one.
        let lose = |s: &ChangeStep| !matches!(s, ChangeStep::Prepare { .. });
        let (cluster, joiner, lost) = add_two_losing(0, lose).await;
        assert_eq!(lost, 1, "the begin to the joiner was lost");
        let first = cluster.net.node(&cluster.ids()[0]).expect("running");
        let view = first.view().expect("the first member's view");
        let node = cluster.net.node(&joiner).expect("the joiner runs");
        learns(&node, &view).await;
        for i in 0..200 {
            let value = bytes::Bytes::from(format!("v{i}"));
            first
                .write(&format!("key{i}"), Some(value), Default::default(), 0)
                .await
                .expect("a write after the change");
        }
        all_readable(&node, 200).await;
    });
}

#[test]
fn a_joiner_that_comes_back_with_an_empty_disk_is_handed_the_view_and_resyncs() {
    simulate(async {
        let (mut cluster, joiner, _) = add_two_losing(300, |_| false).await;
        let view = cluster.net.node(&cluster.ids()[0]).and_then(|n| n.view()).expect("the first member's view");
        let node = cluster.net.node(&joiner).expect("the joiner runs");
        learns(&node, &view).await;
        // Its volume is lost: it was added by a change, so it restarts with no view at all.
        cluster.crash(&joiner);
        cluster.wipe_disk(&joiner);
        cluster.restart(&joiner);
        let node = cluster.net.node(&joiner).expect("the joiner runs again");
        assert!(node.view().is_none() && node.store().digests().stats().live_keys == 0, "restarted empty");
        learns(&node, &view).await;
        all_readable(&node, 300).await;
        assert!(node.store().digests().stats().live_keys > 0, "it holds its partition's keys again");
    });
}
