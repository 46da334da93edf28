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

mod durability;
mod lifecycle;
mod limits;
mod membership;
mod seed_scenarios;
mod snapshots;

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
            .map(|m| m.command.to_vec())
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

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let ok = timeout(secs(5), async {
        while !cond() {
            sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    assert!(ok.is_ok(), "timed out waiting until {what}");
}
