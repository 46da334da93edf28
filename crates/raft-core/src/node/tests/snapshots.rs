//! Snapshots through real nodes: an application that takes them, a member
//! that was down while the others compacted past it, a member whose disk
//! was wiped, all caught up by streamed snapshots in small chunks.

use super::*;
use crate::engine::{ChangeError, ChangeStep};
use crate::snapshot::MemSnapshotStore;
use crate::types::{LogId, Member};

/// A tiny application: its state is every command applied, in order; a
/// snapshot is that list, length-prefixed.
#[derive(Default)]
struct App {
    state: Vec<Vec<u8>>,
    applied: LogIndex,
    snapshots_loaded: usize,
}

fn encode(state: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in state {
        out.extend_from_slice(&(c.len() as u32).to_le_bytes());
        out.extend_from_slice(c);
    }
    out
}

fn decode(mut b: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
        out.push(b[4..4 + n].to_vec());
        b = &b[4 + n..];
    }
    out
}

struct SnapNode {
    raft: Raft,
    task: JoinHandle<()>,
}

struct SnapCluster {
    net: ChannelNetwork,
    ids: Vec<NodeId>,
    logs: BTreeMap<NodeId, MemLogStore>,
    snaps: BTreeMap<NodeId, MemSnapshotStore>,
    apps: BTreeMap<NodeId, Arc<StdMutex<App>>>,
    nodes: BTreeMap<NodeId, SnapNode>,
}

impl SnapCluster {
    async fn new(n: u64) -> Self {
        let ids: Vec<NodeId> = (1..=n).collect();
        let mut c = SnapCluster {
            net: ChannelNetwork::new(),
            ids: ids.clone(),
            logs: ids.iter().map(|&i| (i, MemLogStore::new())).collect(),
            snaps: ids.iter().map(|&i| (i, MemSnapshotStore::new())).collect(),
            apps: ids.iter().map(|&i| (i, Arc::default())).collect(),
            nodes: BTreeMap::new(),
        };
        for id in ids {
            c.start(id).await;
        }
        c
    }

    /// Starts a node; its application keeps its state across restarts
    /// (as if durable) and snapshots every 25 entries.
    async fn start(&mut self, id: NodeId) {
        self.start_with(id, false).await
    }

    /// Starts a node; with `join`, an empty one waits to be added.
    async fn start_with(&mut self, id: NodeId, join: bool) {
        let mut cfg = config(id, &self.ids);
        cfg.join = join;
        cfg.compact_threshold = 5;
        cfg.trailing_entries = 5;
        cfg.snapshot_chunk_bytes = 100;
        cfg.snapshot_chunks_in_flight = 3;
        let (tx, mut rx) = mpsc::channel::<ApplyMsg>(100);
        let snaps = self.snaps[&id].clone();
        let raft = Raft::with_snapshots(
            cfg,
            self.logs[&id].reopen(),
            snaps.clone(),
            self.net.join(id),
            tx,
        )
        .unwrap();
        let app = self.apps[&id].clone();
        let applied = app.lock().unwrap().applied;
        raft.start_with_applied(applied).await.unwrap();
        let handle = raft.clone();
        let app2 = app;
        let task = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let snapshot_at = {
                    let mut a = app2.lock().unwrap();
                    if let Some(meta) = &m.snapshot {
                        let (_, bytes) = snaps.get(meta.last.index).expect("received snapshot");
                        a.state = decode(&bytes);
                        a.snapshots_loaded += 1;
                    } else if m.command_valid {
                        a.state.push(m.command.to_vec());
                    }
                    a.applied = m.command_index;
                    (m.snapshot.is_none() && a.applied.is_multiple_of(25))
                        .then(|| (LogId::new(m.command_term, a.applied), encode(&a.state)))
                };
                if let Some((last, bytes)) = snapshot_at {
                    snaps.put(last, bytes);
                    let _ = handle.snapshot_taken(last.index).await;
                }
            }
        });
        self.nodes.insert(id, SnapNode { raft, task });
    }

    async fn stop(&mut self, id: NodeId) {
        if let Some(n) = self.nodes.remove(&id) {
            n.raft.shutdown().await.unwrap();
            n.task.abort();
            let _ = n.task.await;
        }
    }

    async fn leader(&self) -> NodeId {
        for _ in 0..400 {
            for n in self.nodes.values() {
                if n.raft.is_leader() {
                    return n.raft.status().id;
                }
            }
            sleep(Duration::from_millis(10)).await;
        }
        panic!("no leader");
    }

    async fn write_many(&self, n: usize) {
        let l = self.leader().await;
        for i in 0..n {
            self.nodes[&l]
                .raft
                .submit_and_wait(format!("cmd-{i}").into_bytes())
                .await
                .unwrap();
        }
    }

    fn state(&self, id: NodeId) -> (LogIndex, Vec<Vec<u8>>) {
        let a = self.apps[&id].lock().unwrap();
        (a.applied, a.state.clone())
    }

    /// Waits until `id` has applied what the leader has.
    async fn caught_up(&self, id: NodeId, leader: NodeId) {
        for _ in 0..1000 {
            if self.state(id) == self.state(leader) {
                return;
            }
            sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "node {id} did not catch up: {:?} vs leader {:?} ({:?})",
            self.state(id).0,
            self.state(leader).0,
            self.nodes[&id].raft.status()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_member_down_while_the_others_compact_past_it_is_caught_up_by_a_snapshot() {
    let mut c = SnapCluster::new(3).await;
    c.write_many(5).await;
    let l = c.leader().await;
    let down = c.ids.iter().copied().find(|&i| i != l).unwrap();
    c.stop(down).await;
    c.write_many(120).await;
    sleep(Duration::from_millis(500)).await;
    let st = c.nodes[&l].raft.status();
    assert!(st.snapshot_index >= 100, "{st:?}");
    assert!(
        st.purged_index > c.state(down).0,
        "the leader compacted past the member that is down: {st:?}"
    );
    c.start(down).await;
    c.caught_up(down, l).await;
    assert_eq!(c.apps[&down].lock().unwrap().snapshots_loaded, 1);
    let (_, state) = c.state(down);
    assert_eq!(state.len(), 125, "every command, once, in order");
    assert_eq!(state[124], b"cmd-119".to_vec());
    // And it keeps up with new writes from the log.
    c.write_many(3).await;
    c.caught_up(down, l).await;
}

/// A member whose disk was wiped comes back with another storage identity:
/// the leader refuses it (it could otherwise vote twice in a term, or
/// acknowledge entries it lost), and it stops with an error saying how to
/// recover. Started again empty as a new member, it is added as a learner
/// in place of the old one, caught up by a snapshot and promoted.
#[tokio::test(start_paused = true)]
async fn a_member_whose_disk_was_wiped_is_refused_then_rebuilt_as_a_new_member() {
    let mut c = SnapCluster::new(3).await;
    c.write_many(60).await;
    let l = c.leader().await;
    let wiped = c.ids.iter().copied().find(|&i| i != l).unwrap();
    // The leader has recorded every member's storage identity.
    for _ in 0..100 {
        let m = c.nodes[&l].raft.status().membership;
        if c.ids.iter().all(|&i| m.incarnation(i) != 0) {
            break;
        }
        sleep(Duration::from_millis(20)).await;
    }
    let old_identity = c.nodes[&l].raft.status().membership.incarnation(wiped);
    assert_ne!(old_identity, 0);
    c.stop(wiped).await;
    let wipe = |c: &mut SnapCluster| {
        c.logs.insert(wiped, MemLogStore::new());
        c.snaps.insert(wiped, MemSnapshotStore::new());
        c.apps.insert(wiped, Arc::default());
    };
    wipe(&mut c);
    c.start(wiped).await;
    let mut why = None;
    for _ in 0..200 {
        why = c.nodes[&wiped].raft.stopped();
        if why.is_some() {
            break;
        }
        sleep(Duration::from_millis(20)).await;
    }
    let why = why.expect("the wiped member is refused");
    assert!(
        why.contains("refuses node") && why.contains("--join"),
        "{why}"
    );
    assert_eq!(c.state(wiped).0, 0, "it applied nothing");
    // It has stopped by itself: shutting it down reports why.
    let n = c.nodes.remove(&wiped).unwrap();
    assert!(n.raft.shutdown().await.is_err());
    n.task.abort();

    // Back as a new member: empty, waiting to be added.
    wipe(&mut c);
    c.start_with(wiped, true).await;
    let identity = c.nodes[&wiped].raft.status().incarnation;
    assert_ne!(identity, old_identity);
    let leader = c.nodes[&l].raft.clone();
    // Removed and added back in one change is refused: the new storage
    // would count among the old voters during the joint phase.
    let add_back = ChangeStep::AddLearner {
        id: wiped,
        member: Member {
            addr: String::new(),
            incarnation: identity,
        },
    };
    let err = leader
        .change_membership(vec![ChangeStep::Remove(wiped), add_back.clone()])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("remove it first"), "{err}");
    let m = leader
        .change_membership(vec![ChangeStep::Remove(wiped)])
        .await
        .unwrap();
    assert!(!m.is_member(wiped), "{m}");
    let m = leader.change_membership(vec![add_back]).await.unwrap();
    assert!(m.learners.contains(&wiped) && !m.is_joint(), "{m}");
    assert_eq!(m.incarnation(wiped), identity);
    c.caught_up(wiped, l).await;
    assert_eq!(c.apps[&wiped].lock().unwrap().snapshots_loaded, 1);
    let m = loop {
        match leader
            .change_membership(vec![ChangeStep::Promote(wiped)])
            .await
        {
            Ok(m) => break m,
            Err(Error::Change(ChangeError::NotCaughtUp { .. })) => {
                sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(m.voters, c.ids.iter().copied().collect());
    c.write_many(3).await;
    c.caught_up(wiped, l).await;
}

#[tokio::test(start_paused = true)]
async fn a_transfer_into_a_failing_store_is_retried_once_the_store_recovers() {
    let mut c = SnapCluster::new(3).await;
    c.write_many(5).await;
    let l = c.leader().await;
    let down = c.ids.iter().copied().find(|&i| i != l).unwrap();
    c.stop(down).await;
    c.write_many(60).await;
    c.snaps[&down].set_fail_writes(true);
    c.start(down).await;
    sleep(Duration::from_secs(2)).await;
    assert!(
        c.state(down).0 < c.state(l).0,
        "cannot store the snapshot yet"
    );
    c.snaps[&down].set_fail_writes(false);
    c.caught_up(down, l).await;
    assert_eq!(c.apps[&down].lock().unwrap().snapshots_loaded, 1);
}

#[tokio::test(start_paused = true)]
async fn a_member_that_lost_its_state_and_snapshots_keeps_its_log_and_gets_the_leaders_snapshot() {
    let mut c = SnapCluster::new(3).await;
    c.write_many(80).await;
    let l = c.leader().await;
    let lost = c.ids.iter().copied().find(|&i| i != l).unwrap();
    c.caught_up(lost, l).await;
    sleep(Duration::from_millis(500)).await;
    let before = c.nodes[&lost].raft.status();
    assert!(before.purged_index > 0, "{before:?}");
    c.stop(lost).await;
    // The application's files are gone; the log is not.
    c.snaps.insert(lost, MemSnapshotStore::new());
    c.apps.insert(lost, Arc::default());
    c.start(lost).await;
    c.caught_up(lost, l).await;
    assert_eq!(c.apps[&lost].lock().unwrap().snapshots_loaded, 1);
    let after = c.nodes[&lost].raft.status();
    assert!(
        after.last_log_index >= before.last_log_index,
        "the log was kept: {before:?} -> {after:?}"
    );
    c.write_many(3).await;
    c.caught_up(lost, l).await;
}
