//! Engine unit tests, one file per section of the Raft paper (§5.1-§5.4) or
//! the thesis, each test named after the rule it checks; this file holds the
//! shared harness (hand-wired engines whose messages move only when a test
//! says so).

use super::*;
use crate::message::{Message, MessageBody};
use std::collections::BTreeMap;

mod compaction;
mod election;
mod hostile_input;
mod leadership;
mod limits;
mod membership;
mod reads;
mod replication;
mod safety;
mod snapshot;
mod terms;

fn ms(x: u64) -> Duration {
    Duration::from_millis(x)
}

fn cfg(id: NodeId) -> Config {
    let mut c = Config::new(id);
    c.pre_vote = false;
    c.check_quorum = false;
    c
}

fn cmd(s: &str) -> EntryPayload {
    EntryPayload::Command(s.as_bytes().to_vec().into())
}

fn ent(term: Term, index: LogIndex) -> Entry {
    Entry {
        term,
        index,
        payload: cmd(&format!("{term}/{index}")),
    }
}

/// A log with the given terms at indexes 1, 2, ...
fn log_of(terms: &[Term]) -> Vec<Entry> {
    terms
        .iter()
        .enumerate()
        .map(|(i, &t)| ent(t, i as LogIndex + 1))
        .collect()
}

fn engine_with(c: Config, voters: &[NodeId], term: Term, entries: Vec<Entry>) -> Engine {
    let init = InitialState {
        hard_state: HardState { term, vote: None },
        entries,
        membership: Membership::new(voters.iter().copied()),
        ..Default::default()
    };
    Engine::new(c, init, 7, Duration::ZERO).expect("valid state")
}

/// Several engines wired by hand: messages move only when a test says so.
struct Cluster {
    nodes: BTreeMap<NodeId, Engine>,
    applied: BTreeMap<NodeId, Vec<Entry>>,
    reads: BTreeMap<NodeId, Vec<ReadResult>>,
    now: Duration,
    /// Directed links that drop messages.
    cut: Vec<(NodeId, NodeId)>,
    /// Snapshots leaders asked to send: (from, to, what).
    snapshot_sends: Vec<(NodeId, NodeId, SnapshotMeta)>,
    /// Snapshots each node's application was told to load.
    loaded: BTreeMap<NodeId, Vec<SnapshotMeta>>,
    /// Log resets each node's store was told to carry out.
    installs: BTreeMap<NodeId, Vec<SnapshotMeta>>,
    /// AppendEntries and Heartbeat messages delivered.
    requests: u64,
}

impl Cluster {
    fn new(n: u64, f: impl Fn(Config) -> Config) -> Self {
        let voters: Vec<NodeId> = (1..=n).collect();
        let nodes = voters
            .iter()
            .map(|&id| (id, engine_with(f(cfg(id)), &voters, 0, vec![])))
            .collect();
        Cluster {
            nodes,
            applied: BTreeMap::new(),
            reads: BTreeMap::new(),
            now: Duration::ZERO,
            cut: vec![],
            snapshot_sends: vec![],
            loaded: BTreeMap::new(),
            installs: BTreeMap::new(),
            requests: 0,
        }
    }

    fn from_logs(logs: &[(NodeId, Term, Vec<Entry>)]) -> Self {
        let voters: Vec<NodeId> = logs.iter().map(|(id, _, _)| *id).collect();
        let nodes = logs
            .iter()
            .map(|(id, term, log)| (*id, engine_with(cfg(*id), &voters, *term, log.clone())))
            .collect();
        Cluster {
            nodes,
            applied: BTreeMap::new(),
            reads: BTreeMap::new(),
            now: Duration::ZERO,
            cut: vec![],
            snapshot_sends: vec![],
            loaded: BTreeMap::new(),
            installs: BTreeMap::new(),
            requests: 0,
        }
    }

    fn node(&mut self, id: NodeId) -> &mut Engine {
        self.nodes.get_mut(&id).expect("node exists")
    }

    /// Processes one node's readies as a driver would (disk is instant).
    fn drain(&mut self, id: NodeId) -> Vec<Message> {
        let mut out = vec![];
        loop {
            let e = self.nodes.get_mut(&id).expect("node exists");
            if !e.has_ready() {
                return out;
            }
            let rd = e.take_ready();
            if let Some(last) = rd.last_entry() {
                e.persisted(last);
            }
            out.extend(rd.messages);
            out.extend(rd.persisted_messages);
            for (to, m) in rd.send_snapshots {
                self.snapshot_sends.push((id, to, m));
            }
            if let Some(m) = rd.install {
                self.installs.entry(id).or_default().push(m);
            }
            if let Some(m) = rd.apply_snapshot {
                self.loaded.entry(id).or_default().push(m);
            }
            // The application takes committed entries at once.
            if let Some(last) = rd.committed.last() {
                e.delivered(last.index);
            }
            self.applied.entry(id).or_default().extend(rd.committed);
            self.reads.entry(id).or_default().extend(rd.reads);
        }
    }

    /// Moves messages until the network is quiet, letting time reach a
    /// leader's commit notice (a couple of milliseconds) when that is all
    /// there is left to happen.
    fn settle(&mut self) {
        for _ in 0..100 {
            self.settle_in_no_time();
            let due: Vec<(NodeId, Duration)> = self
                .nodes
                .iter()
                .filter(|(_, e)| e.role() == Role::Leader)
                .filter_map(|(&id, e)| e.commit_notice.map(|at| (id, at)))
                .collect();
            if due.is_empty() {
                return;
            }
            for (id, at) in due {
                self.tick_node(id, at);
            }
        }
        panic!("commit notices never stopped");
    }

    /// Moves messages until the network is quiet, with time standing still.
    fn settle_in_no_time(&mut self) {
        for _ in 0..1000 {
            if !self.step() {
                return;
            }
        }
        panic!("network never settled");
    }

    /// Takes every node's readies and delivers what they sent, once;
    /// false if nothing was sent.
    fn step(&mut self) -> bool {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        let mut msgs = vec![];
        for id in ids {
            msgs.extend(self.drain(id));
        }
        if msgs.is_empty() {
            return false;
        }
        for m in msgs {
            if self.cut.contains(&(m.from, m.to)) {
                continue;
            }
            if matches!(
                m.body,
                MessageBody::AppendEntries { .. } | MessageBody::Heartbeat { .. }
            ) {
                self.requests += 1;
            }
            if let Some(e) = self.nodes.get_mut(&m.to) {
                e.handle_message(Duration::ZERO, m);
            }
        }
        true
    }

    fn tick_node(&mut self, id: NodeId, to: Duration) {
        self.now = self.now.max(to);
        let now = self.now;
        self.node(id).tick(now);
    }

    /// Makes `id` time out and wins it the election.
    fn elect(&mut self, id: NodeId) {
        let deadline = self.node(id).next_deadline();
        self.tick_node(id, deadline);
        self.settle();
        assert_eq!(
            self.node(id).role(),
            Role::Leader,
            "node {id} should have won"
        );
    }

    fn applied_payloads(&self, id: NodeId) -> Vec<EntryPayload> {
        self.applied
            .get(&id)
            .map_or(vec![], |v| v.iter().map(|e| e.payload.clone()).collect())
    }
}

fn msg(from: NodeId, to: NodeId, term: Term, body: MessageBody) -> Message {
    Message {
        from,
        to,
        term,
        incarnation: 0,
        body,
    }
}

fn append(
    prev_index: LogIndex,
    prev_term: Term,
    entries: Vec<Entry>,
    leader_commit: LogIndex,
) -> MessageBody {
    MessageBody::AppendEntries {
        prev_log_index: prev_index,
        prev_log_term: prev_term,
        entries,
        leader_commit,
    }
}

fn take_all(e: &mut Engine) -> (Vec<Message>, Vec<Message>) {
    let rd = e.take_ready();
    if let Some(l) = rd.last_entry() {
        e.persisted(l);
    }
    (rd.messages, rd.persisted_messages)
}

// ----- §5.1 terms ------------------------------------------------------------

/// Heartbeat round: the leader's timer fires and everything is delivered.
fn heartbeat_round(c: &mut Cluster, leader: NodeId) {
    let d = c.node(leader).next_deadline();
    c.tick_node(leader, d);
    c.settle();
}

fn members_entry(term: Term, index: LogIndex, voters: &[NodeId]) -> Entry {
    Entry {
        term,
        index,
        payload: EntryPayload::Membership(Membership::new(voters.iter().copied())),
    }
}
