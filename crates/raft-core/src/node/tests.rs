//! In-process clusters of real nodes (tokio tasks, in-memory disks, channel
//! network) run in tokio's virtual time: the seed's failure scenarios,
//! deterministic in their timing checks and fast.

use super::handle::SHUTDOWN_GRACE;
use super::*;
use crate::config::Config;
use crate::storage::LogStore;
use crate::storage::MemLogStore;
use crate::storage::StorageError;
use crate::transport::ChannelNetwork;
use crate::types::{LogIndex, Membership, NodeId, Role, Term};
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::Mutex as StdMutex;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio::time::{sleep, timeout};

const ELECTION_MAX: Duration = Duration::from_millis(300);

struct TestNode {
    raft: Raft,
    consumer: JoinHandle<()>,
}

/// What each node's application applied, kept across restarts (a durable state machine).
type Applied = Arc<StdMutex<Vec<ApplyMsg>>>;

struct TestCluster {
    net: ChannelNetwork,
    ids: Vec<NodeId>,
    nodes: BTreeMap<NodeId, TestNode>,
    applied: BTreeMap<NodeId, Applied>,
    stores: BTreeMap<NodeId, MemLogStore>,
    /// `Config::compact_threshold` for nodes started from now on.
    compact_threshold: Option<u64>,
}

fn config(id: NodeId, ids: &[NodeId]) -> Config {
    let mut c = Config::new(id);
    for &p in ids.iter().filter(|&&p| p != id) {
        c.add_peer(p).unwrap();
    }
    c
}

impl TestCluster {
    async fn new(n: u64) -> Self {
        let ids: Vec<NodeId> = (1..=n).collect();
        let mut c = TestCluster {
            net: ChannelNetwork::new(),
            ids: ids.clone(),
            nodes: BTreeMap::new(),
            applied: ids.iter().map(|&id| (id, Applied::default())).collect(),
            stores: ids.iter().map(|&id| (id, MemLogStore::new())).collect(),
            compact_threshold: None,
        };
        for id in ids {
            c.start(id).await;
        }
        c
    }

    async fn start(&mut self, id: NodeId) {
        let store = self.stores[&id].reopen();
        let (tx, mut rx) = mpsc::channel::<ApplyMsg>(100);
        let mut cfg = config(id, &self.ids);
        if let Some(t) = self.compact_threshold {
            cfg.compact_threshold = t;
        }
        let raft = Raft::new(cfg, store, self.net.join(id), tx).unwrap();
        let applied = self.applied[&id].clone();
        let already = applied
            .lock()
            .unwrap()
            .last()
            .map_or(0, |m| m.command_index);
        raft.start_with_applied(already).await.unwrap();
        let consumer = tokio::spawn(async move {
            while let Some(mut m) = rx.recv().await {
                // Applied: a proposer waiting on it may go on.
                drop(m.responder.take());
                applied.lock().unwrap().push(m);
            }
        });
        self.nodes.insert(id, TestNode { raft, consumer });
    }

    async fn kill(&mut self, id: NodeId) {
        if let Some(n) = self.nodes.remove(&id) {
            n.raft.shutdown().await.unwrap();
            n.consumer.abort();
            let _ = n.consumer.await;
        }
    }

    fn raft(&self, id: NodeId) -> &Raft {
        &self.nodes[&id].raft
    }

    /// The leader among `among` with the highest term, once exactly one such node leads.
    fn current_leader(&self, among: &[NodeId]) -> Option<NodeId> {
        let leaders: Vec<(Term, NodeId)> = among
            .iter()
            .filter_map(|id| self.nodes.get(id))
            .map(|n| n.raft.status())
            .filter(|s| s.role == Role::Leader)
            .map(|s| (s.term, s.id))
            .collect();
        leaders.iter().max().map(|&(_, id)| id)
    }

    async fn wait_leader(&self, among: &[NodeId], within: Duration) -> Option<NodeId> {
        let end = Instant::now() + within;
        loop {
            if let Some(l) = self.current_leader(among) {
                return Some(l);
            }
            if Instant::now() >= end {
                return None;
            }
            sleep(Duration::from_millis(5)).await;
        }
    }

    /// Submits through the cluster the way a client would: try a node, follow
    /// the leader hint, retry after a pause.
    async fn write(
        &self,
        among: &[NodeId],
        cmd: &str,
        within: Duration,
    ) -> Result<LogIndex, Error> {
        let end = Instant::now() + within;
        let mut target = among[0];
        loop {
            let res = match self.nodes.get(&target) {
                Some(n) => match timeout(
                    Duration::from_millis(500),
                    n.raft.submit_and_wait(cmd.as_bytes().to_vec()),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err(Error::Unknown(0)),
                },
                None => Err(Error::NotLeader { leader: None }),
            };
            match res {
                Ok(i) => return Ok(i),
                Err(e) if Instant::now() >= end => return Err(e),
                Err(Error::NotLeader { leader: Some(l) }) if among.contains(&l) => target = l,
                Err(_) => {
                    let pos = among.iter().position(|&x| x == target).unwrap_or(0);
                    target = among[(pos + 1) % among.len()];
                    sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    fn commands(&self, id: NodeId) -> Vec<Vec<u8>> {
        self.applied[&id]
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.command_valid)
            .map(|m| m.command.clone())
            .collect()
    }

    fn applied_indexes(&self, id: NodeId) -> Vec<LogIndex> {
        self.applied[&id]
            .lock()
            .unwrap()
            .iter()
            .map(|m| m.command_index)
            .collect()
    }

    async fn wait_applied(&self, ids: &[NodeId], index: LogIndex, within: Duration) -> bool {
        let end = Instant::now() + within;
        loop {
            if ids
                .iter()
                .all(|id| self.applied_indexes(*id).last().copied().unwrap_or(0) >= index)
            {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            sleep(Duration::from_millis(5)).await;
        }
    }

    async fn shutdown_all(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            self.kill(id).await;
        }
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[tokio::test(start_paused = true)]
async fn three_nodes_elect_replicate_and_apply_in_order() {
    let mut c = TestCluster::new(3).await;
    let l = c.wait_leader(&[1, 2, 3], secs(2)).await.expect("a leader");
    for i in 0..20 {
        c.write(&[l], &format!("cmd{i}"), secs(2)).await.unwrap();
    }
    let last = c.raft(l).status().commit_index;
    assert!(c.wait_applied(&[1, 2, 3], last, secs(2)).await);
    let want: Vec<Vec<u8>> = (0..20).map(|i| format!("cmd{i}").into_bytes()).collect();
    for id in [1, 2, 3] {
        assert_eq!(c.commands(id), want, "node {id}");
        let idx = c.applied_indexes(id);
        assert_eq!(
            idx,
            (1..=idx.len() as u64).collect::<Vec<_>>(),
            "node {id} applies each index once, in order"
        );
    }
    c.shutdown_all().await;
}

async fn leader_failover(n: u64) {
    let mut c = TestCluster::new(n).await;
    let all: Vec<NodeId> = (1..=n).collect();
    let old = c.wait_leader(&all, secs(2)).await.expect("a leader");
    c.write(&all, "before", secs(2)).await.unwrap();
    let killed_at = Instant::now();
    c.kill(old).await;
    let rest: Vec<NodeId> = all.iter().copied().filter(|&x| x != old).collect();
    let new = c.wait_leader(&rest, secs(5)).await.expect("a new leader");
    let took = killed_at.elapsed();
    println!("{n} nodes: leader {old} killed, node {new} leads after {took:?} (virtual time)");
    assert_ne!(new, old);
    assert!(
        took <= 2 * ELECTION_MAX,
        "{n} nodes: new leader after {took:?}, more than two election timeouts"
    );
    c.write(&rest, "after", secs(2))
        .await
        .expect("writes resume");
    let last = c.raft(new).status().commit_index;
    assert!(c.wait_applied(&rest, last, secs(2)).await);
    for id in &rest {
        assert_eq!(c.commands(*id), vec![b"before".to_vec(), b"after".to_vec()]);
    }
    c.shutdown_all().await;
}

#[tokio::test(start_paused = true)]
async fn leader_killed_is_replaced_within_two_election_timeouts_3_nodes() {
    leader_failover(3).await;
}

#[tokio::test(start_paused = true)]
async fn leader_killed_is_replaced_within_two_election_timeouts_5_nodes() {
    leader_failover(5).await;
}

#[tokio::test(start_paused = true)]
async fn seven_nodes_elect_and_commit() {
    let mut c = TestCluster::new(7).await;
    let all: Vec<NodeId> = (1..=7).collect();
    c.wait_leader(&all, secs(2)).await.expect("a leader");
    let i = c.write(&all, "seven", secs(2)).await.unwrap();
    assert!(c.wait_applied(&all, i, secs(2)).await);
    c.shutdown_all().await;
}

async fn majority_keeps_serving(n: u64, majority: &[NodeId], minority: &[NodeId]) {
    let mut c = TestCluster::new(n).await;
    let all: Vec<NodeId> = (1..=n).collect();
    c.wait_leader(&all, secs(2)).await.expect("a leader");
    c.write(&all, "before", secs(2)).await.unwrap();
    c.net.partition(&[majority, minority]);
    // Let in-flight messages land and a minority leader (if any) step down.
    sleep(ELECTION_MAX).await;
    let frozen: BTreeMap<NodeId, (LogIndex, Term)> = minority
        .iter()
        .map(|&id| {
            let s = c.raft(id).status();
            (id, (s.commit_index, s.term))
        })
        .collect();
    let mut watchers = Vec::new();
    for &id in minority {
        let mut rx = c.raft(id).watch_status();
        watchers.push(tokio::spawn(async move {
            let mut led = false;
            while rx.changed().await.is_ok() {
                led |= rx.borrow().role == Role::Leader;
            }
            led
        }));
    }
    for i in 0..10 {
        c.write(majority, &format!("during{i}"), secs(3))
            .await
            .expect("the majority keeps committing");
    }
    sleep(secs(2)).await;
    for &id in minority {
        let s = c.raft(id).status();
        assert_ne!(s.role, Role::Leader, "minority node {id} must not lead");
        assert_eq!(
            s.commit_index, frozen[&id].0,
            "minority node {id} must commit nothing"
        );
        assert!(!c.commands(id).iter().any(|x| x.starts_with(b"during")));
    }
    c.net.heal();
    let i = c.write(&all, "healed", secs(3)).await.unwrap();
    assert!(
        c.wait_applied(&all, i, secs(3)).await,
        "minority catches up after healing"
    );
    c.shutdown_all().await;
    for w in watchers {
        assert!(
            !w.await.unwrap(),
            "a minority node became leader during the partition"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn partition_majority_serves_minority_never_leads_3_nodes() {
    majority_keeps_serving(3, &[1, 2], &[3]).await;
}

#[tokio::test(start_paused = true)]
async fn partition_majority_serves_minority_never_leads_5_nodes() {
    majority_keeps_serving(5, &[1, 2, 3], &[4, 5]).await;
}

#[tokio::test(start_paused = true)]
async fn no_majority_no_service_then_service_after_healing() {
    let mut c = TestCluster::new(3).await;
    let all = [1, 2, 3];
    c.wait_leader(&all, secs(2)).await.expect("a leader");
    c.write(&all, "before", secs(2)).await.unwrap();
    let commit_before: Vec<LogIndex> = all
        .iter()
        .map(|&id| c.raft(id).status().commit_index)
        .collect();
    c.net.partition(&[&[1], &[2], &[3]]);
    sleep(ELECTION_MAX).await;
    let res = c.write(&all, "lonely", secs(3)).await;
    assert!(
        res.is_err(),
        "no write may commit without a majority: {res:?}"
    );
    assert_eq!(c.current_leader(&all), None, "no leader without a majority");
    for (k, &id) in all.iter().enumerate() {
        assert!(c.raft(id).status().commit_index <= commit_before[k] + 1);
    }
    c.net.heal();
    let l = c
        .wait_leader(&all, secs(3))
        .await
        .expect("a leader after healing");
    let i = c.write(&[l], "healed", secs(3)).await.unwrap();
    assert!(c.wait_applied(&all, i, secs(3)).await);
    for id in all {
        assert!(
            !c.commands(id).contains(&b"lonely".to_vec()),
            "an unacknowledged write never applies"
        );
    }
    c.shutdown_all().await;
}

#[tokio::test(start_paused = true)]
async fn old_leader_rejoins_steps_down_and_its_uncommitted_entries_are_replaced() {
    let mut c = TestCluster::new(3).await;
    let all = [1, 2, 3];
    let old = c.wait_leader(&all, secs(2)).await.expect("a leader");
    c.write(&[old], "committed", secs(2)).await.unwrap();
    c.net.isolate(old);
    let doomed = c.raft(old).propose(vec![b"doomed".to_vec()]).await.unwrap();
    let doomed = doomed.into_iter().next().unwrap();
    let (idx, term) = (doomed.index, doomed.term);
    let rest: Vec<NodeId> = all.iter().copied().filter(|&x| x != old).collect();
    let new = c
        .wait_leader(&rest, secs(3))
        .await
        .expect("majority elects");
    for i in 0..3 {
        c.write(&[new], &format!("new{i}"), secs(2)).await.unwrap();
    }
    let waiter = tokio::spawn(doomed.committed());
    c.net.heal();
    let last = c.raft(new).status().commit_index;
    assert!(
        c.wait_applied(&all, last, secs(3)).await,
        "old leader catches up"
    );
    assert_ne!(c.raft(old).status().role, Role::Leader);
    assert_eq!(
        waiter.await.unwrap(),
        Err(Error::Overwritten { index: idx, term })
    );
    for id in all {
        assert_eq!(
            c.commands(id),
            vec![
                b"committed".to_vec(),
                b"new0".to_vec(),
                b"new1".to_vec(),
                b"new2".to_vec()
            ]
        );
    }
    c.shutdown_all().await;
}

#[tokio::test(start_paused = true)]
async fn follower_refuses_writes_with_a_leader_hint_and_reads_are_linearizable_on_the_leader() {
    let mut c = TestCluster::new(3).await;
    let l = c.wait_leader(&[1, 2, 3], secs(2)).await.unwrap();
    let i = c.write(&[l], "x", secs(2)).await.unwrap();
    assert!(c.wait_applied(&[1, 2, 3], i, secs(2)).await);
    let f = [1, 2, 3].into_iter().find(|&x| x != l).unwrap();
    assert_eq!(
        c.raft(f).submit(b"y".to_vec()).await,
        Err(Error::NotLeader { leader: Some(l) })
    );
    assert_eq!(c.raft(f).leader(), Some(l));
    assert_eq!(
        c.raft(f).read_index().await,
        Err(Error::NotLeader { leader: Some(l) })
    );
    let r = c.raft(l).read_index().await.unwrap();
    assert!(
        r >= i,
        "read index {r} must cover the acknowledged write at {i}"
    );
    // A leader cut off from the majority cannot confirm a read.
    c.net.isolate(l);
    let res = timeout(secs(2), c.raft(l).read_index()).await;
    assert!(
        !matches!(res, Ok(Ok(_))),
        "an isolated leader must not serve a read: {res:?}"
    );
    c.shutdown_all().await;
}

#[tokio::test(start_paused = true)]
async fn restarted_node_recovers_from_its_store_without_reapplying() {
    let mut c = TestCluster::new(3).await;
    let all = [1, 2, 3];
    let l = c.wait_leader(&all, secs(2)).await.unwrap();
    let i = c.write(&all, "a", secs(2)).await.unwrap();
    assert!(c.wait_applied(&all, i, secs(2)).await);
    let f = all.into_iter().find(|&x| x != l).unwrap();
    c.kill(f).await;
    let durable = c.stores[&f].durable();
    assert!(durable.entries.len() as u64 >= i && durable.hard_state.term >= 1);
    c.write(&all, "b", secs(2)).await.unwrap();
    c.start(f).await;
    let j = c.write(&all, "c", secs(2)).await.unwrap();
    assert!(c.wait_applied(&[f], j, secs(3)).await);
    assert_eq!(
        c.commands(f),
        vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
    );
    let idx = c.applied_indexes(f);
    let uniq: BTreeSet<LogIndex> = idx.iter().copied().collect();
    assert_eq!(
        uniq.len(),
        idx.len(),
        "no entry applied twice across the restart"
    );
    c.shutdown_all().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_leaves_no_task_running() {
    let mut c = TestCluster::new(3).await;
    c.wait_leader(&[1, 2, 3], secs(2)).await.unwrap();
    c.write(&[1, 2, 3], "x", secs(2)).await.unwrap();
    let handles: Vec<Raft> = c.nodes.values().map(|n| n.raft.clone()).collect();
    c.shutdown_all().await;
    tokio::task::yield_now().await;
    let alive = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    assert_eq!(alive, 0, "tasks still running after shutdown");
    for r in handles {
        assert!(r.status().stopped.is_some());
        assert!(matches!(
            r.submit(b"late".to_vec()).await,
            Err(Error::Stopped(_))
        ));
    }
}

#[tokio::test(start_paused = true)]
async fn closed_apply_channel_stops_the_node_with_a_clear_error() {
    let net = ChannelNetwork::new();
    let (tx, rx) = mpsc::channel(1);
    let raft = Raft::new(Config::new(1), MemLogStore::new(), net.join(1), tx).unwrap();
    raft.start().await.unwrap();
    drop(rx);
    // A single node elects itself and commits its no-op, which cannot be delivered.
    let mut st = raft.watch_status();
    let stopped = timeout(secs(2), st.wait_for(|s| s.stopped.is_some()))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(stopped, "the node should stop");
    let why = raft.status().stopped.unwrap();
    assert!(why.contains("apply channel"), "{why}");
    assert!(matches!(
        raft.submit(b"x".to_vec()).await,
        Err(Error::Stopped(_))
    ));
    assert_eq!(raft.shutdown().await, Err(Error::ApplyChannelClosed));
}

#[tokio::test(start_paused = true)]
async fn failing_disk_stops_the_node_with_a_storage_error() {
    let net = ChannelNetwork::new();
    let (tx, _rx) = mpsc::channel(16);
    let store = MemLogStore::new();
    let disk = store.clone();
    let raft = Raft::new(Config::new(1), store, net.join(1), tx).unwrap();
    raft.start().await.unwrap();
    disk.set_fail_writes(true);
    let mut st = raft.watch_status();
    // Reduce to a bool at once: the returned guard holds the status lock.
    let stopped = timeout(secs(2), st.wait_for(|s| s.stopped.is_some()))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(stopped, "node stops");
    assert!(matches!(
        raft.shutdown().await,
        Err(Error::Storage(StorageError::Io(_)))
    ));
}

#[tokio::test(start_paused = true)]
async fn lifecycle_errors_are_reported() {
    let net = ChannelNetwork::new();
    let (tx, _rx) = mpsc::channel(16);
    let mut bad = Config::new(1);
    bad.election_timeout_max = bad.election_timeout_min;
    assert!(matches!(
        Raft::new(bad, MemLogStore::new(), net.join(1), tx.clone()),
        Err(Error::Config(_))
    ));
    let raft = Raft::new(Config::new(1), MemLogStore::new(), net.join(1), tx).unwrap();
    assert_eq!(raft.submit(b"x".to_vec()).await, Err(Error::NotStarted));
    raft.start().await.unwrap();
    assert_eq!(raft.start().await, Err(Error::AlreadyStarted));
    raft.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn cluster_survives_lossy_slow_network() {
    let mut c = TestCluster::new(5).await;
    c.net.set_drop_per_mille(100);
    c.net
        .set_delay(Duration::from_millis(1), Duration::from_millis(20));
    let all: Vec<NodeId> = (1..=5).collect();
    for i in 0..20 {
        c.write(&all, &format!("lossy{i}"), secs(10)).await.unwrap();
    }
    c.net.set_drop_per_mille(0);
    let l = c.wait_leader(&all, secs(3)).await.unwrap();
    let last = c.raft(l).status().commit_index;
    assert!(c.wait_applied(&all, last, secs(5)).await);
    let first = c.commands(1);
    for id in &all {
        assert_eq!(c.commands(*id), first, "node {id} diverged");
    }
    // Each acknowledged write is applied; a retried write may appear twice (at-least-once).
    for i in 0..20 {
        assert!(first.contains(&format!("lossy{i}").into_bytes()));
    }
    c.shutdown_all().await;
}

#[tokio::test(start_paused = true)]
async fn slow_disk_crash_loses_only_unacknowledged_writes() {
    let net = ChannelNetwork::new();
    let ids = [1u64, 2, 3];
    let stores: Vec<MemLogStore> = ids
        .iter()
        .map(|_| MemLogStore::new().with_write_delay(Duration::from_millis(5)))
        .collect();
    let mut rafts = Vec::new();
    for (k, &id) in ids.iter().enumerate() {
        let (tx, mut rx) = mpsc::channel(64);
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let r = Raft::new(config(id, &ids), stores[k].clone(), net.join(id), tx).unwrap();
        r.start().await.unwrap();
        rafts.push(r);
    }
    let mut acked = Vec::new();
    let end = Instant::now() + secs(3);
    while acked.len() < 10 && Instant::now() < end {
        for r in &rafts {
            if let Ok(i) = r
                .submit_and_wait(format!("w{}", acked.len()).into_bytes())
                .await
            {
                acked.push(i);
            }
        }
        sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(acked.len(), 10);
    for r in &rafts {
        r.shutdown().await.unwrap();
    }
    // Every acknowledged write is durable on a majority of the disks.
    for i in acked {
        let holders = stores
            .iter()
            .filter(|s| s.durable().entries.iter().any(|e| e.index == i))
            .count();
        assert!(
            holders >= 2,
            "acknowledged entry {i} is durable on only {holders} node(s)"
        );
    }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let ok = timeout(secs(5), async {
        while !cond() {
            sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    assert!(ok.is_ok(), "timed out waiting until {what}");
}

/// Committed entries go onto the apply channel directly while it has room,
/// and through the applier task (which waits for room, in order) when it is
/// full. `applied_index` counts exactly what the channel accepted, and every
/// index arrives once, in order, across both paths.
#[tokio::test(start_paused = true)]
async fn apply_channel_gets_every_entry_once_in_order_whether_it_has_room_or_not() {
    let net = ChannelNetwork::new();
    let (tx, mut rx) = mpsc::channel::<ApplyMsg>(4);
    let raft = Raft::new(Config::new(1), MemLogStore::new(), net.join(1), tx).unwrap();
    raft.start().await.unwrap();
    let mut st = raft.watch_status();
    timeout(secs(2), st.wait_for(|s| s.role == Role::Leader))
        .await
        .expect("leads")
        .expect("running");
    // Room: the no-op (index 1) and one command are accepted at once, with
    // nobody reading the channel yet.
    let (i, _) = raft.submit(b"a".to_vec()).await.unwrap();
    assert_eq!(i, 2);
    wait_until("entry 2 is accepted", || raft.status().applied_index == 2).await;
    // No room for a batch of 5 (2 slots left): the applier takes it and the
    // channel accepts only what fits; a later single entry must queue behind it.
    let ids = raft.submit_batch(vec![b"b".to_vec(); 5]).await.unwrap();
    assert_eq!(ids.last().unwrap().0, 7);
    let (last, _) = raft.submit(b"c".to_vec()).await.unwrap();
    assert_eq!(last, 8);
    wait_until("the channel is full", || raft.status().applied_index == 4).await;
    sleep(Duration::from_millis(50)).await;
    assert_eq!(
        raft.status().applied_index,
        4,
        "applied_index must not count what the full channel has not accepted"
    );
    // A slow reader drains it; later writes alternate between the two paths.
    let received = Arc::new(StdMutex::new(Vec::<LogIndex>::new()));
    let r2 = received.clone();
    let consumer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            r2.lock().unwrap().push(m.command_index);
            sleep(Duration::from_micros(200)).await;
        }
    });
    let mut last = last;
    for round in 0..30u8 {
        let n = 1 + usize::from(round % 6);
        let ids = raft.submit_batch(vec![vec![round]; n]).await.unwrap();
        last = ids.last().unwrap().0;
        if round % 3 == 0 {
            sleep(Duration::from_micros(700)).await;
        }
    }
    wait_until("every entry is delivered", || {
        received.lock().unwrap().last() == Some(&last)
    })
    .await;
    assert_eq!(
        *received.lock().unwrap(),
        (1..=last).collect::<Vec<_>>(),
        "each index once, in order"
    );
    assert_eq!(raft.status().applied_index, last);
    raft.shutdown().await.unwrap();
    consumer.abort();
}

/// Entries the application released are purged from every store once all
/// members hold them; a node restarted from a purged store resumes after the
/// compaction point without re-applying anything, and replication goes on.
#[tokio::test(start_paused = true)]
async fn released_entries_are_purged_and_restarts_resume_after_the_compaction_point() {
    let mut c = TestCluster::new(3).await;
    c.compact_threshold = Some(10);
    for id in [1, 2, 3] {
        c.kill(id).await;
        c.start(id).await;
    }
    let l = c.wait_leader(&[1, 2, 3], secs(2)).await.expect("a leader");
    for i in 0..40 {
        c.write(&[l], &format!("a{i}"), secs(2)).await.unwrap();
    }
    let last = c.raft(l).status().commit_index;
    assert!(c.wait_applied(&[1, 2, 3], last, secs(2)).await);
    // Nothing released yet: every store still holds the whole log.
    sleep(Duration::from_millis(500)).await;
    for id in [1, 2, 3] {
        let st = c.stores[&id].reopen().load().await.unwrap();
        assert_eq!(st.purged.index, 0, "node {id} purged unreleased entries");
    }
    for id in [1, 2, 3] {
        let applied = c.applied_indexes(id).last().copied().unwrap();
        c.raft(id).release_applied(applied).await.unwrap();
    }
    // Followers learn that every member holds the entries from heartbeats.
    sleep(Duration::from_millis(500)).await;
    for id in [1, 2, 3] {
        let st = c.stores[&id].reopen().load().await.unwrap();
        assert!(
            st.purged.index >= last - 10 && st.purged.index <= last,
            "node {id}: compaction point {:?}, last {last}",
            st.purged
        );
        if let Some(first) = st.entries.first() {
            assert_eq!(
                first.index,
                st.purged.index + 1,
                "node {id}: the store keeps what follows the point"
            );
        }
    }
    let follower = [1, 2, 3].into_iter().find(|&id| id != l).unwrap();
    c.kill(follower).await;
    c.start(follower).await;
    for i in 0..5 {
        c.write(&[l], &format!("b{i}"), secs(2)).await.unwrap();
    }
    let last = c.raft(l).status().commit_index;
    assert!(c.wait_applied(&[1, 2, 3], last, secs(2)).await);
    for id in [1, 2, 3] {
        let idx = c.applied_indexes(id);
        assert_eq!(
            idx,
            (1..=last).collect::<Vec<_>>(),
            "node {id} applies each index once, in order"
        );
        assert!(c.commands(id).ends_with(&[b"b4".to_vec()]));
    }
    c.shutdown_all().await;
}

// ----- durability, back-pressure, start-up -----------------------------------

/// Three nodes on slow disks; reports every broken durability rule seen:
/// a leader whose votes are not durable on a majority when it is elected, and
/// an entry reported committed that is not durable on a majority. Followers
/// crash in the middle of writes along the way (a stopped node loses the
/// write in flight).
async fn durability_violations() -> Vec<String> {
    let ids = [1u64, 2, 3];
    let net = ChannelNetwork::new();
    let stores: BTreeMap<NodeId, MemLogStore> = ids
        .iter()
        .map(|&id| {
            (
                id,
                MemLogStore::new().with_write_delay(Duration::from_millis(40)),
            )
        })
        .collect();
    let mut nodes: BTreeMap<NodeId, Raft> = BTreeMap::new();
    let start = |id: NodeId, nodes: &mut BTreeMap<NodeId, Raft>| {
        let (tx, mut rx) = mpsc::channel::<ApplyMsg>(1000);
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let raft = Raft::new(config(id, &ids), stores[&id].reopen(), net.join(id), tx).unwrap();
        nodes.insert(id, raft);
    };
    for id in ids {
        start(id, &mut nodes);
        nodes[&id].start().await.unwrap();
    }
    let mut problems = Vec::new();
    let votes_ok = |leader: NodeId, term: Term| {
        let n = stores
            .values()
            .filter(|s| {
                let hs = s.durable().hard_state;
                hs.term > term || (hs.term == term && hs.vote == Some(leader))
            })
            .count();
        n >= 2
    };
    let mut seen_terms = BTreeSet::new();
    for round in 0..6u64 {
        // Wait for a leader and check its votes at once.
        let deadline = Instant::now() + secs(5);
        let leader = loop {
            let l = nodes
                .iter()
                .find(|(_, r)| r.is_leader())
                .map(|(&id, r)| (id, r.status().term));
            if let Some(l) = l {
                break Some(l);
            }
            if Instant::now() > deadline {
                break None;
            }
            sleep(Duration::from_millis(1)).await;
        };
        let Some((leader, term)) = leader else {
            problems.push(format!("round {round}: no leader"));
            break;
        };
        if seen_terms.insert(term) && !votes_ok(leader, term) {
            problems.push(format!(
                "node {leader} leads term {term} before a majority stored its vote"
            ));
        }
        // The leader's disk is fast, the followers' slow: only the
        // followers' acknowledgements decide when an entry commits.
        for (&id, s) in &stores {
            s.set_write_delay(if id == leader {
                Duration::from_millis(1)
            } else {
                Duration::from_millis(200)
            });
        }
        for i in 0..3 {
            let cmd = format!("r{round}-{i}").into_bytes();
            match nodes[&leader].propose(vec![cmd]).await {
                Ok(mut ps) => {
                    let p = ps.pop().unwrap();
                    let (index, t) = (p.index, p.term);
                    if p.committed().await.is_ok() {
                        let holders = stores
                            .values()
                            .filter(|s| {
                                s.durable()
                                    .entries
                                    .iter()
                                    .any(|e| e.index == index && e.term == t)
                            })
                            .count();
                        if holders < 2 {
                            problems.push(format!(
                                "entry {index} of term {t} reported committed while durable on {holders} of 3 disks"
                            ));
                        }
                    }
                }
                Err(_) => break,
            }
        }
        // A follower crashes in the middle of a write, and the leader is
        // restarted to force an election among slow disks.
        let follower = ids.iter().copied().find(|&id| id != leader).unwrap_or(1);
        let _ = nodes[&leader].submit(b"in flight".to_vec()).await;
        sleep(Duration::from_millis(20)).await;
        for id in [follower, leader] {
            let _ = nodes[&id].shutdown().await;
            start(id, &mut nodes);
            nodes[&id].start().await.unwrap();
        }
        for s in stores.values() {
            s.set_write_delay(Duration::from_millis(40));
        }
    }
    for r in nodes.values() {
        let _ = r.shutdown().await;
    }
    problems
}

/// Acknowledgements and votes leave only after the write they promise is
/// durable. The same scenario with the driver changed to send them before
/// `save` returns must be caught.
#[tokio::test(start_paused = true)]
async fn acks_and_votes_leave_only_after_their_save_returns() {
    let problems = durability_violations().await;
    assert!(problems.is_empty(), "{problems:#?}");
    let broken = {
        let _m = crate::mutation::inject(crate::mutation::Mutation::DriverSendsBeforeSave);
        durability_violations().await
    };
    println!("with acks and votes sent before save: {broken:#?}");
    assert!(
        !broken.is_empty(),
        "sending before save returns went unnoticed"
    );
}

fn small_limits(id: NodeId, ids: &[NodeId]) -> Config {
    let mut c = config(id, ids);
    c.max_entry_bytes = 64 << 10;
    c.max_unapplied_bytes = 1 << 20;
    c
}

fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// An application that stops reading the apply channel: the node refuses
/// new proposals with `Busy` instead of queueing without bound, memory stays
/// flat while clients keep trying, and everything flows again once the
/// application reads.
#[tokio::test(start_paused = true)]
async fn application_that_stops_reading_gets_busy_not_unbounded_memory() {
    let net = ChannelNetwork::new();
    let (tx, mut rx) = mpsc::channel::<ApplyMsg>(4);
    let raft = Raft::new(small_limits(1, &[1]), MemLogStore::new(), net.join(1), tx).unwrap();
    raft.start().await.unwrap();
    wait_until("leader", || raft.is_leader()).await;
    let cmd = vec![7u8; 60 << 10];
    let mut accepted = 0u64;
    let mut busy = 0u64;
    let rss_before = rss_bytes();
    // 16k attempts of 60 KiB: about 1 GiB offered.
    for _ in 0..16_384 {
        match raft.submit(cmd.clone()).await {
            Ok(_) => accepted += 1,
            Err(Error::Busy { pending, max }) => {
                assert!(pending <= max, "{pending} > {max}");
                busy += 1;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    let st = raft.status();
    let rss_after = rss_bytes();
    println!(
        "accepted {accepted}, busy {busy}, unapplied {} bytes, rss {:?} -> {:?}",
        st.unapplied_bytes, rss_before, rss_after
    );
    assert!(
        busy > 16_000,
        "the node kept accepting: {accepted} accepted"
    );
    assert!(st.unapplied_bytes <= 1 << 20);
    if let (Some(a), Some(b)) = (rss_before, rss_after) {
        // The margin covers other tests running in this process.
        assert!(
            b.saturating_sub(a) < 256 << 20,
            "memory grew by {} bytes",
            b - a
        );
    }
    // The application reads again: every accepted entry arrives, and
    // proposals are accepted again.
    let mut got = 0u64;
    while got < accepted {
        let m = timeout(secs(5), rx.recv()).await.unwrap().unwrap();
        if m.command_valid {
            got += 1;
        }
    }
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let mut ok = false;
    for _ in 0..100 {
        if raft.submit_and_wait(cmd.clone()).await.is_ok() {
            ok = true;
            break;
        }
        sleep(Duration::from_millis(10)).await;
    }
    assert!(ok, "proposals accepted again once the application reads");
    raft.shutdown().await.unwrap();
}

/// Followers whose disks are slow: the leader's uncommitted entries are
/// bounded; it answers `Busy` and commits what it accepted.
#[tokio::test(start_paused = true)]
async fn slow_follower_disks_bound_the_leaders_uncommitted_entries() {
    let ids = [1u64, 2, 3];
    let net = ChannelNetwork::new();
    let stores: Vec<MemLogStore> = ids.iter().map(|_| MemLogStore::new()).collect();
    let mut nodes = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        let (tx, mut rx) = mpsc::channel::<ApplyMsg>(100);
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let r = Raft::new(small_limits(id, &ids), stores[i].reopen(), net.join(id), tx).unwrap();
        r.start().await.unwrap();
        nodes.push(r);
    }
    wait_until("leader", || nodes.iter().any(|r| r.is_leader())).await;
    let li = nodes.iter().position(|r| r.is_leader()).unwrap_or(0);
    for (i, s) in stores.iter().enumerate() {
        if i != li {
            // Slow, but below the election timeout: a disk slower than that
            // keeps any cluster from holding a leader.
            s.set_write_delay(Duration::from_millis(100));
        }
    }
    let cmd = vec![1u8; 60 << 10];
    let (mut accepted, mut busy, mut max_seen) = (Vec::new(), 0, 0);
    let rss_before = rss_bytes();
    // 16k attempts of 60 KiB: about 1 GiB offered.
    for _ in 0..16_384 {
        match nodes[li].propose(vec![cmd.clone()]).await {
            Ok(ps) => accepted.extend(ps),
            Err(Error::Busy { .. }) => busy += 1,
            Err(e) => panic!("unexpected error {e}"),
        }
        max_seen = max_seen.max(nodes[li].status().unapplied_bytes);
    }
    let rss_after = rss_bytes();
    println!(
        "accepted {}, busy {busy}, most unapplied bytes seen {max_seen}, rss {rss_before:?} -> {rss_after:?}",
        accepted.len()
    );
    assert!(busy > 16_000, "a leader with slow followers kept accepting");
    assert!(max_seen <= 1 << 20, "{max_seen}");
    // About 1 GiB was offered; memory must not follow (the margin covers
    // other tests running in this process).
    if let (Some(a), Some(b)) = (rss_before, rss_after) {
        assert!(
            b.saturating_sub(a) < 256 << 20,
            "memory grew by {} bytes",
            b - a
        );
    }
    for p in accepted {
        p.committed().await.unwrap();
    }
    for r in &nodes {
        r.shutdown().await.unwrap();
    }
}

/// A start refused for bad durable state leaves the node startable: a
/// corrected retry runs it.
#[tokio::test(start_paused = true)]
async fn a_refused_start_can_be_retried() {
    let net = ChannelNetwork::new();
    let (tx, _rx) = mpsc::channel(16);
    let raft = Raft::new(Config::new(1), MemLogStore::new(), net.join(1), tx).unwrap();
    let err = raft.start_with_applied(100).await.unwrap_err();
    assert!(matches!(err, Error::Restore(_)), "{err}");
    assert_eq!(raft.status().stopped, None);
    raft.start_with_applied(0).await.unwrap();
    wait_until("leader", || raft.is_leader()).await;
    raft.submit_and_wait(b"x".to_vec()).await.unwrap();
    assert_eq!(raft.start().await, Err(Error::AlreadyStarted));
    raft.shutdown().await.unwrap();
}

/// The members are stored at the first start; a restart with other peers
/// (none, or a phantom one) is refused with both sets named, and a restart
/// with the stored ones works.
#[tokio::test(start_paused = true)]
async fn stored_membership_counts_and_other_peers_are_refused() {
    let net = ChannelNetwork::new();
    let disk = MemLogStore::new();
    let run = |cfg: Config| {
        let (tx, mut rx) = mpsc::channel::<ApplyMsg>(16);
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        Raft::new(cfg, disk.reopen(), net.join(2), tx).unwrap()
    };
    let r = run(config(2, &[1, 2, 3]));
    r.start().await.unwrap();
    r.shutdown().await.unwrap();
    assert_eq!(
        disk.durable().membership,
        Some(Membership::new([1, 2, 3])),
        "bootstrapped once, durably"
    );
    for wrong in [vec![2u64], vec![1, 2, 3, 4], vec![1, 2]] {
        let r = run(config(2, &wrong));
        let err = r.start().await.unwrap_err();
        assert_eq!(
            err,
            Error::MembershipMismatch {
                configured: wrong.clone(),
                stored: vec![1, 2, 3]
            }
        );
        let text = err.to_string();
        assert!(
            text.contains("[1, 2, 3]") && text.contains(&format!("{wrong:?}")),
            "{text}"
        );
    }
    let r = run(config(2, &[1, 2, 3]));
    r.start().await.unwrap();
    r.shutdown().await.unwrap();
}

/// Commands larger than `max_entry_bytes` are refused before anything is
/// proposed; a batch is all or nothing.
#[tokio::test(start_paused = true)]
async fn oversized_commands_are_refused_with_a_typed_error() {
    let net = ChannelNetwork::new();
    let (tx, mut rx) = mpsc::channel::<ApplyMsg>(16);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let raft = Raft::new(small_limits(1, &[1]), MemLogStore::new(), net.join(1), tx).unwrap();
    raft.start().await.unwrap();
    wait_until("leader", || raft.is_leader()).await;
    let max = raft.max_command_bytes();
    assert_eq!(max, 64 << 10);
    raft.submit_and_wait(vec![0; max]).await.unwrap();
    assert_eq!(
        raft.submit(vec![0; max + 1]).await,
        Err(Error::TooLarge { size: max + 1, max })
    );
    let before = raft.status().last_log_index;
    let res = raft.submit_batch(vec![vec![1; 10], vec![0; max + 1]]).await;
    assert!(matches!(res, Err(Error::TooLarge { .. })), "{res:?}");
    assert_eq!(raft.status().last_log_index, before, "nothing was proposed");
    raft.shutdown().await.unwrap();
}

/// A disk that stops answering must not hang shutdown.
#[tokio::test(start_paused = true)]
async fn shutdown_is_bounded_when_the_disk_hangs() {
    let net = ChannelNetwork::new();
    let (tx, mut rx) = mpsc::channel::<ApplyMsg>(16);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let disk = MemLogStore::new();
    let raft = Raft::new(Config::new(1), disk.reopen(), net.join(1), tx).unwrap();
    raft.start().await.unwrap();
    wait_until("leader", || raft.is_leader()).await;
    disk.set_write_delay(Duration::from_secs(24 * 3600));
    let r = raft.clone();
    tokio::spawn(async move {
        let _ = r.submit(b"stuck".to_vec()).await;
    });
    sleep(Duration::from_millis(10)).await;
    let t0 = Instant::now();
    let res = raft.shutdown().await;
    let took = t0.elapsed();
    // The driver never waits for the disk itself; the stuck write is abandoned.
    assert_eq!(res, Ok(()));
    assert!(took <= SHUTDOWN_GRACE, "{took:?}");
}

/// A leader whose disk hangs cannot apply anything; it must not stay leader
/// looking healthy. The node stops with a storage error after
/// `max_write_stall`, and the others elect a new leader.
#[tokio::test(start_paused = true)]
async fn a_stalled_disk_stops_the_node_and_the_others_take_over() {
    let c = TestCluster::new(3).await;
    let leader = c.wait_leader(&[1, 2, 3], secs(5)).await.expect("a leader");
    c.stores[&leader].set_write_delay(Duration::from_secs(24 * 3600));
    let r = c.nodes[&leader].raft.clone();
    tokio::spawn(async move {
        let _ = r.submit(b"stuck".to_vec()).await;
    });
    let mut st = c.nodes[&leader].raft.watch_status();
    let stopped = timeout(secs(10), st.wait_for(|s| s.stopped.is_some()))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(stopped, "the node with the stalled disk stops");
    let why = c.nodes[&leader].raft.status().stopped.unwrap_or_default();
    assert!(why.contains("stalled"), "{why}");
    let others: Vec<NodeId> = [1, 2, 3].into_iter().filter(|&i| i != leader).collect();
    let next = c.wait_leader(&others, secs(5)).await;
    assert!(next.is_some_and(|n| n != leader), "{next:?}");
}
