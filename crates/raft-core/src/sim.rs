//! A seeded, deterministic simulator of whole Raft clusters.
//!
//! Virtual time, and a fault model aimed at the bugs that hide in timing:
//! * a network that drops, delays (and so reorders) and duplicates; some
//!   messages are held for longer than an election; partitions (symmetric,
//!   asymmetric, leader isolated) either drop what crosses them or queue it
//!   and deliver it late, after the partition changes;
//! * disks that take time, and sometimes stall for tens to hundreds of
//!   milliseconds (longer than a round trip and than an election);
//! * crashes aimed at nodes with a write in flight, which then loses the
//!   write, keeps it, or keeps only a prefix of it; quick restarts;
//! * an application that applies in memory, flushes its state lazily (and
//!   only then releases the log), and loses the unflushed part in a crash,
//!   as raft-kv does;
//! * clients proposing and reading on any node that believes it leads.
//!
//! After every step it checks the safety properties of the Raft paper's
//! Figure 3: Election Safety, Leader Append-Only, Log Matching, Leader
//! Completeness and State Machine Safety, plus "a read index is never behind a
//! commit known when the read began", "no entry is applied twice or out of
//! order" and "nothing the application has not stored is compacted". After
//! the fault phase everything heals; within a bounded virtual time a new
//! proposal must commit, every live node must catch up to it, and every read
//! still pending must be answered (liveness).
//!
//! Every run is a pure function of its seed: a failure prints the seed and the
//! command that replays it.

use crate::config::Config;
use crate::engine::{Engine, InitialState};
use crate::message::{Message, MessageBody};
use crate::mutation::Mutation;
use crate::types::{
    Entry, HardState, LogId, LogIndex, Member, Membership, NodeId, SnapshotMeta, Term,
};
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::time::Duration;

/// The shape of one simulated run.
/// Lease seeds run elections of 600-1200 ms (long next to the simulated
/// network, so that a lease broken by a few percent is visible) with a
/// margin of 200 ms: enough for clocks 20% fast or slow (the margin must be
/// at least 2 * 600 ms * rho / (1 + rho) = 200 ms for rho = 0.2). Without the
/// margin a deposed leader's lease would outlive its followers' by 250 ms.
const LEASE_ELECTION_MIN: Duration = Duration::from_millis(600);
const LEASE_MARGIN: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
pub(crate) struct SimConfig {
    pub(crate) seed: u64,
    pub(crate) nodes: usize,
    /// Steps with faults; afterwards the cluster heals.
    pub(crate) fault_steps: usize,
    /// Virtual time allowed after healing for a new proposal to commit.
    pub(crate) liveness_bound: Duration,
    pub(crate) pre_vote: bool,
    pub(crate) check_quorum: bool,
    /// Entries per AppendEntries (small values make lagging followers common).
    pub(crate) max_entries_per_msg: usize,
    /// Back-pressure limit, when not the default.
    pub(crate) max_unapplied_bytes: Option<u64>,
    /// A rule broken on purpose for this run.
    pub(crate) mutation: Option<Mutation>,
    /// Inject crashes, partitions and message faults.
    pub(crate) faults: bool,
    /// Leaders answer reads under a lease (`ReadPolicy::Lease`).
    pub(crate) lease: bool,
    /// Each node's clock runs this many parts per million fast or slow.
    pub(crate) drift_ppm: u64,
    /// Applications take snapshots at random; the log is compacted up to
    /// them and lagging followers get them.
    pub(crate) snapshots: bool,
    /// Leaders change the membership at random (add learners, promote,
    /// demote, remove, replace) and hand leadership over, among up to 7 nodes.
    pub(crate) membership_changes: bool,
}

impl SimConfig {
    pub(crate) fn new(seed: u64, nodes: usize, fault_steps: usize) -> Self {
        // Every supported setting is exercised: a third of the seeds run
        // without check-quorum (leaders then only learn of a newer term from
        // messages), a quarter without pre-vote.
        let mix = fastrand::Rng::with_seed(seed ^ 0xc0ff_ee00).u64(..);
        SimConfig {
            seed,
            nodes,
            fault_steps,
            liveness_bound: Duration::from_secs(10),
            pre_vote: !mix.is_multiple_of(4),
            check_quorum: !(mix >> 8).is_multiple_of(3),
            max_entries_per_msg: [1, 2, 8][((mix >> 16) % 3) as usize],
            // A quarter of the seeds run with a tiny back-pressure limit (a
            // few dozen entries), so that `Busy`, partial acceptance and
            // the leader's back-off happen all the time.
            max_unapplied_bytes: if (mix >> 24).is_multiple_of(4) {
                Some(2000)
            } else {
                None
            },
            mutation: None,
            faults: true,
            // Half of the check-quorum seeds read under a lease, with clocks
            // 20% fast or slow: at the edge of what `LEASE_MARGIN` allows.
            lease: !(mix >> 8).is_multiple_of(3) && (mix >> 32).is_multiple_of(2),
            drift_ppm: 200_000,
            snapshots: (mix >> 40).is_multiple_of(2),
            // A member added after compaction needs a snapshot to catch up.
            membership_changes: (mix >> 40).is_multiple_of(2) && !(mix >> 48).is_multiple_of(3),
        }
    }
}

/// What a finished run saw.
#[derive(Debug, Default, Clone)]
pub(crate) struct SimStats {
    pub(crate) steps: usize,
    pub(crate) committed: LogIndex,
    pub(crate) leaders_elected: usize,
    pub(crate) crashes: usize,
    /// Crashes that hit a node with a disk write in flight.
    pub(crate) crashes_mid_write: usize,
    /// Disk writes that stalled longer than an election timeout's minimum.
    pub(crate) disk_stalls: usize,
    /// Messages held by a partition and delivered after it changed.
    pub(crate) held_delivered: usize,
    /// Log compactions carried out by stores.
    pub(crate) purges: usize,
    /// Restarts that began from a compacted log.
    pub(crate) restarts_compacted: usize,
    pub(crate) reads_confirmed: usize,
    /// Reads answered under a leader's lease.
    pub(crate) lease_reads: u64,
    /// Of those, reads answered while another node led in a newer term.
    pub(crate) deposed_lease_reads: u64,
    pub(crate) messages_delivered: usize,
    /// Restarts whose application had to load a snapshot first.
    pub(crate) restarts_from_snapshot: usize,
    /// Restarts whose application had lost its state and snapshots, and
    /// waited for the leader's snapshot.
    pub(crate) restarts_awaiting_snapshot: usize,
    /// Crashes that also lost the application's state and snapshots.
    pub(crate) app_state_lost: usize,
    /// Snapshots the applications took.
    pub(crate) snapshots_taken: usize,
    /// Snapshots that arrived at a follower (duplicates included).
    pub(crate) snapshots_delivered: usize,
    /// Snapshots a follower's application loaded (after a leader's
    /// transfer, or at a restart).
    pub(crate) snapshots_loaded: usize,
    /// Membership changes proposed and accepted by a leader.
    pub(crate) changes: usize,
    /// Leadership transfers started.
    pub(crate) transfers: usize,
    pub(crate) virtual_time: Duration,
}

/// A broken property, with where it broke.
#[derive(Debug, Clone)]
pub(crate) struct Violation {
    pub(crate) seed: u64,
    pub(crate) step: usize,
    pub(crate) what: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "safety/liveness violation at step {} with seed {}: {}\n  replay: RAFT_SIM_SEED={} cargo test -p raft-core sim::tests::replay_seed -- --nocapture",
            self.step, self.seed, self.what, self.seed
        )
    }
}

#[derive(Debug)]
enum Event {
    Deliver(Message),
    /// The oldest queued write of a node (in the given incarnation) is done.
    DiskDone(NodeId, u64),
    Restart(NodeId),
    /// A whole snapshot reaches a follower: (from, to, term, what it
    /// covers, the state's hash).
    SnapshotArrives(NodeId, NodeId, Term, SnapshotMeta, u64),
    /// The leader's transfer to a follower gave up (to, from).
    SnapshotFailed(NodeId, NodeId, LogIndex),
    /// The leader's transfer ended: (leader, follower, snapshot index).
    SnapshotSent(NodeId, NodeId, LogIndex),
}

/// A ready whose storage writes are still on their way to disk.
#[derive(Debug)]
struct PendingDisk {
    hard_state: Option<HardState>,
    truncate_from: Option<LogIndex>,
    entries: Vec<Entry>,
    persisted_messages: Vec<Message>,
    committed: Vec<Entry>,
    taken_as_leader_of: Option<Term>,
    purge_to: Option<LogId>,
    /// A leader's snapshot replaces the log first.
    install: Option<SnapshotMeta>,
    /// The store records the application's latest snapshot.
    snapshot: Option<SnapshotMeta>,
    /// The application loads this snapshot before `committed`.
    apply_snapshot: Option<SnapshotMeta>,
}

#[derive(Debug)]
struct SimNode {
    engine: Option<Engine>,
    hard_state: HardState,
    /// The durable log, each entry with the hash chain of its whole prefix.
    log: Vec<(Entry, u64)>,
    /// Readies waiting for their write, oldest first; the disk runs them in
    /// order, as the node driver does.
    disk: std::collections::VecDeque<PendingDisk>,
    /// When the last queued write finishes.
    disk_free_at: Duration,
    /// Incarnation: a crash discards the disk events of the one before.
    epoch: u64,
    /// The application's state in memory: last applied index.
    applied: LogIndex,
    /// The application's durable state: last applied index it flushed.
    flushed: LogIndex,
    /// The store's compaction point (`node.log` keeps every entry so the
    /// checks can see them; a restart hands the engine only what follows).
    purged: LogId,
    /// Highest commit index already compared against the global record.
    checked_commit: LogIndex,
    /// The application's state: the hash chain of the entries applied.
    app_hash: u64,
    /// The hash of the state it flushed.
    flushed_hash: u64,
    /// The application's durable snapshots: last index -> (what it
    /// covers, the state's hash).
    snaps: BTreeMap<LogIndex, (SnapshotMeta, u64)>,
    /// The latest snapshot the log store recorded.
    log_snapshot: Option<SnapshotMeta>,
    /// The application's files were lost and it has not recovered yet.
    state_lost: bool,
    /// The membership it starts with on an empty disk (none: it waits to
    /// be added).
    boot: Membership,
}

fn entry_hash(e: &Entry) -> u64 {
    let mut h = DefaultHasher::new();
    e.term.hash(&mut h);
    e.index.hash(&mut h);
    e.payload.hash(&mut h);
    h.finish()
}

fn chain(prev: u64, e: &Entry) -> u64 {
    let mut h = DefaultHasher::new();
    prev.hash(&mut h);
    entry_hash(e).hash(&mut h);
    h.finish()
}

pub(crate) struct Sim {
    cfg: SimConfig,
    rng: fastrand::Rng,
    now: Duration,
    seq: u64,
    queue: BTreeMap<(Duration, u64), Event>,
    nodes: BTreeMap<NodeId, SimNode>,
    membership: Membership,
    /// Directed links that currently drop (or hold) everything.
    blocked: BTreeSet<(NodeId, NodeId)>,
    /// The current partition queues messages instead of dropping them.
    partition_holds: bool,
    /// Messages held by a partition, delivered once their link is open.
    held: Vec<Message>,
    drop_per_mille: u64,
    dup_per_mille: u64,
    max_delay_ms: u64,
    step: usize,
    // Checker state.
    leaders_by_term: HashMap<Term, NodeId>,
    /// (index, term) -> prefix hash, over every durable log ever seen.
    log_registry: HashMap<(LogIndex, Term), u64>,
    /// Committed entries by index (position 0 is index 1): (term, entry hash).
    committed: Vec<(Term, u64)>,
    /// The committed entries themselves with the hash chain of the prefix
    /// ending at each (what a snapshot of that prefix must hash to).
    committed_log: Vec<(Entry, u64)>,
    /// For each committed index, the term of the node that committed it first
    /// (the leader of that term): Leader Completeness binds later terms only.
    commit_terms: Vec<Term>,
    max_commit_seen: LogIndex,
    /// Leader (node, term) -> the durable log length and prefix hash last seen.
    leader_log_marks: HashMap<(NodeId, Term), (usize, u64)>,
    /// Read ctx -> (node asked, commit index known when the read began).
    pending_reads: HashMap<u64, (NodeId, LogIndex)>,
    next_ctx: u64,
    next_cmd: u64,
    stats: SimStats,
    violation: Option<String>,
    /// Each node's clock (lease seeds): since true time `.0` it reads `.1`
    /// plus the elapsed true time scaled by `.2` parts per million.
    clock_ppm: BTreeMap<NodeId, (Duration, Duration, i64)>,
    /// Lease seeds: a leader cut off until the others elect a new leader
    /// that commits (or a time limit passes): (old leader, until).
    deposing: Option<(NodeId, Duration)>,
}

impl Sim {
    pub(crate) fn new(cfg: SimConfig) -> Self {
        let mut rng = fastrand::Rng::with_seed(cfg.seed);
        let voters: Vec<NodeId> = (1..=cfg.nodes as NodeId).collect();
        let membership = Membership::new(voters.iter().copied());
        // Spare nodes to add, up to 7 in all.
        let spares = if cfg.membership_changes {
            7usize.saturating_sub(cfg.nodes).clamp(1, 2)
        } else {
            0
        };
        let ids: Vec<NodeId> = (1..=(cfg.nodes + spares) as NodeId).collect();
        let (drop_per_mille, dup_per_mille, max_delay_ms) = if cfg.faults {
            (rng.range(0, 100), rng.range(0, 50), rng.range(2, 60))
        } else {
            (0, 0, 3)
        };
        let mut sim = Sim {
            rng,
            now: Duration::ZERO,
            seq: 0,
            queue: BTreeMap::new(),
            nodes: BTreeMap::new(),
            membership,
            blocked: BTreeSet::new(),
            partition_holds: false,
            held: Vec::new(),
            drop_per_mille,
            dup_per_mille,
            max_delay_ms,
            step: 0,
            leaders_by_term: HashMap::new(),
            log_registry: HashMap::new(),
            committed: Vec::new(),
            committed_log: Vec::new(),
            commit_terms: Vec::new(),
            max_commit_seen: 0,
            leader_log_marks: HashMap::new(),
            pending_reads: HashMap::new(),
            next_ctx: 1,
            next_cmd: 1,
            stats: SimStats::default(),
            violation: None,
            clock_ppm: BTreeMap::new(),
            deposing: None,
            cfg,
        };
        for id in ids {
            sim.nodes.insert(
                id,
                SimNode {
                    engine: None,
                    hard_state: HardState::default(),
                    log: Vec::new(),
                    disk: std::collections::VecDeque::new(),
                    disk_free_at: Duration::ZERO,
                    epoch: 0,
                    applied: 0,
                    flushed: 0,
                    purged: LogId::default(),
                    checked_commit: 0,
                    app_hash: 0,
                    flushed_hash: 0,
                    snaps: BTreeMap::new(),
                    log_snapshot: None,
                    state_lost: false,
                    boot: if voters.contains(&id) {
                        sim.membership.clone()
                    } else {
                        Membership::default()
                    },
                },
            );
            if sim.cfg.lease {
                let d = sim.cfg.drift_ppm as i64;
                let ppm = if sim.rng.bool() { d } else { -d };
                sim.set_rate(id, ppm);
            }
            sim.start_node(id);
        }
        sim
    }

    fn engine_config(&self, id: NodeId) -> Config {
        let mut c = Config::new(id);
        c.pre_vote = self.cfg.pre_vote;
        c.check_quorum = self.cfg.check_quorum;
        c.max_entries_per_msg = self.cfg.max_entries_per_msg;
        c.max_inflight = 4;
        // Compact often, so that restarts, elections and lagging followers
        // meet compacted logs all the time.
        c.compact_threshold = 5;
        // Snapshots leave few entries behind: followers need them often.
        c.trailing_entries = self.cfg.seed % 4;
        if self.cfg.lease {
            c.read_policy = crate::config::ReadPolicy::Lease;
            c.lease_drift_margin = LEASE_MARGIN;
            c.election_timeout_min = LEASE_ELECTION_MIN;
            c.election_timeout_max = LEASE_ELECTION_MIN * 2;
        }
        if let Some(b) = self.cfg.max_unapplied_bytes {
            c.max_unapplied_bytes = b;
            c.max_entry_bytes = 64;
        }
        c
    }

    /// Node `id`'s clock at true time `t`.
    fn local(&self, id: NodeId, t: Duration) -> Duration {
        let (at, reads, ppm) = self.clock_ppm.get(&id).copied().unwrap_or_default();
        let since = t.saturating_sub(at).as_nanos();
        let nanos = since * (1_000_000i128 + ppm as i128) as u128 / 1_000_000;
        reads + Duration::from_nanos(nanos.min(u64::MAX as u128) as u64)
    }

    /// Changes node `id`'s clock rate from now on (its time stays continuous).
    fn set_rate(&mut self, id: NodeId, ppm: i64) {
        let reads = self.local(id, self.now);
        self.clock_ppm.insert(id, (self.now, reads, ppm));
    }

    /// The true time at which node `id`'s clock reads `local` (rounded up,
    /// so that the node's clock has reached `local` by then).
    fn global(&self, id: NodeId, local: Duration) -> Duration {
        let (at, reads, ppm) = self.clock_ppm.get(&id).copied().unwrap_or_default();
        let rate = (1_000_000i128 + ppm as i128) as u128;
        let nanos = (local.saturating_sub(reads).as_nanos() * 1_000_000).div_ceil(rate);
        at + Duration::from_nanos(nanos.min(u64::MAX as u128) as u64)
    }

    fn start_node(&mut self, id: NodeId) {
        let cfg = self.engine_config(id);
        let seed = self.rng.u64(..);
        let now = self.local(id, self.now);
        let initial = self.membership.clone();
        let node = self.nodes.get_mut(&id).expect("known node");
        // The membership at the compaction point: the latest membership
        // entry up to it (the sim keeps every entry, or the committed
        // prefix a snapshot replaced), else the cluster's initial one (a
        // spare that never received anything: none).
        let membership = node.log[..node.purged.index as usize]
            .iter()
            .rev()
            .find_map(|(e, _)| match &e.payload {
                crate::types::EntryPayload::Membership(m) => Some(m.clone()),
                _ => None,
            })
            .unwrap_or_else(|| {
                if node.purged.index > 0 {
                    initial
                } else {
                    node.boot.clone()
                }
            });
        if node.purged.index > 0 {
            self.stats.restarts_compacted += 1;
        }
        if node.flushed < node.purged.index {
            self.stats.restarts_from_snapshot += 1;
        }
        // The application must wait for the leader's snapshot when it is
        // behind the compaction point and holds no snapshot that reaches it.
        let awaiting_before = node.flushed < node.purged.index
            && !node.log_snapshot.as_ref().is_some_and(|m| {
                node.snaps.contains_key(&m.last.index) && m.last.index >= node.purged.index
            });
        let init = InitialState {
            hard_state: node.hard_state,
            purged: node.purged,
            entries: node
                .log
                .iter()
                .skip(node.purged.index as usize)
                .map(|(e, _)| e.clone())
                .collect(),
            membership,
            applied: node.flushed,
            // As the driver does: a recorded snapshot the application no
            // longer holds is not used.
            snapshot: node
                .log_snapshot
                .clone()
                .filter(|m| node.snaps.contains_key(&m.last.index)),
            await_snapshot: self.cfg.snapshots,
            incarnation: 0,
        };
        // The application restarts from what it flushed.
        node.applied = node.flushed;
        node.app_hash = node.flushed_hash;
        match Engine::new(cfg, init, seed, now) {
            Ok(e) => {
                if e.awaiting_snapshot() != awaiting_before {
                    let what = format!(
                        "node {id}: awaiting a snapshot is {} but the application lost its state: {awaiting_before}",
                        e.awaiting_snapshot()
                    );
                    self.fail(what);
                    return;
                }
                let node = self.nodes.get_mut(&id).expect("known node");
                if awaiting_before {
                    self.stats.restarts_awaiting_snapshot += 1;
                } else {
                    // Rebuilt from the log alone.
                    node.state_lost = false;
                }
                node.checked_commit = e.commit_index();
                node.engine = Some(e);
            }
            Err(err) => self.fail(format!(
                "node {id} cannot restart from its durable state: {err}"
            )),
        }
    }

    fn fail(&mut self, what: String) {
        if self.violation.is_none() {
            self.violation = Some(what);
        }
    }

    fn schedule(&mut self, at: Duration, ev: Event) {
        self.seq += 1;
        self.queue.insert((at, self.seq), ev);
    }

    fn chance(&mut self, per_mille: u64) -> bool {
        self.rng.range(0, 1000) < per_mille
    }

    fn live_ids(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.engine.is_some())
            .map(|(&id, _)| id)
            .collect()
    }

    fn leader(&self) -> Option<NodeId> {
        // The leader with the highest term, if several believe they lead.
        self.nodes
            .iter()
            .filter_map(|(&id, n)| {
                n.engine
                    .as_ref()
                    .filter(|e| e.is_leader())
                    .map(|e| (e.term(), id))
            })
            .max()
            .map(|(_, id)| id)
    }

    fn send(&mut self, msg: Message) {
        if self.blocked.contains(&(msg.from, msg.to)) {
            if self.partition_holds {
                self.held.push(msg);
            }
            return;
        }
        if self.chance(self.drop_per_mille) {
            return;
        }
        let copies = if self.chance(self.dup_per_mille) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self.message_delay();
            self.schedule(self.now + delay, Event::Deliver(msg.clone()));
        }
    }

    /// Usually a LAN-like delay; now and then one longer than an election.
    fn message_delay(&mut self) -> Duration {
        if self.cfg.faults && self.chance(30) {
            Duration::from_millis(self.rng.range(100, 1500))
        } else {
            Duration::from_micros(self.rng.range(200, self.max_delay_ms * 1000))
        }
    }

    /// Sets new blocked links; held messages whose link is open now go out late.
    fn set_blocked(&mut self, blocked: BTreeSet<(NodeId, NodeId)>) {
        self.blocked = blocked;
        self.partition_holds = self.rng.range(0, 2) == 0;
        let held = std::mem::take(&mut self.held);
        for m in held {
            if self.blocked.contains(&(m.from, m.to)) {
                self.held.push(m);
            } else {
                self.stats.held_delivered += 1;
                let delay = self.message_delay();
                self.schedule(self.now + delay, Event::Deliver(m));
            }
        }
    }

    /// How long a disk write takes: usually 0.05-3 ms, sometimes a stall
    /// longer than a round trip and an election.
    fn disk_latency(&mut self) -> Duration {
        if self.cfg.faults && self.chance(60) {
            self.stats.disk_stalls += 1;
            Duration::from_millis(self.rng.range(20, 400))
        } else {
            Duration::from_micros(self.rng.range(50, 3000))
        }
    }

    /// Moves a node's pending output out: sends what may go now, starts the disk write.
    fn pump(&mut self, id: NodeId) {
        loop {
            let node = self.nodes.get_mut(&id).expect("known node");
            let Some(engine) = node.engine.as_mut() else {
                return;
            };
            if !engine.has_ready() {
                return;
            }
            let leader_term = engine.is_leader().then(|| engine.term());
            let ready = engine.take_ready();
            // While a term or vote is being written, every message waits for it.
            let hold = node.disk.iter().any(|p| p.hard_state.is_some());
            for r in &ready.reads {
                self.check_read(r.ctx, r.result);
            }
            let mut persisted_messages = ready.persisted_messages;
            if hold {
                persisted_messages.splice(0..0, ready.messages);
            } else {
                for m in ready.messages {
                    self.send(m);
                }
            }
            for (to, meta) in ready.send_snapshots {
                self.send_snapshot(id, to, meta);
            }
            let needs_disk = ready.hard_state.is_some()
                || ready.truncate_from.is_some()
                || !ready.entries.is_empty()
                || ready.install.is_some()
                || ready.snapshot.is_some();
            let pending = PendingDisk {
                hard_state: ready.hard_state,
                truncate_from: ready.truncate_from,
                entries: ready.entries,
                persisted_messages,
                committed: ready.committed,
                taken_as_leader_of: leader_term,
                purge_to: ready.purge_to,
                install: ready.install,
                snapshot: ready.snapshot,
                apply_snapshot: ready.apply_snapshot,
            };
            let node = self.nodes.get_mut(&id).expect("known node");
            if !needs_disk && node.disk.is_empty() {
                self.finish_disk(id, pending);
                continue;
            }
            // The disk runs writes one after another.
            let latency = if needs_disk {
                self.disk_latency()
            } else {
                Duration::ZERO
            };
            let node = self.nodes.get_mut(&id).expect("known node");
            let at = node.disk_free_at.max(self.now) + latency;
            node.disk_free_at = at;
            node.disk.push_back(pending);
            let epoch = node.epoch;
            self.schedule(at, Event::DiskDone(id, epoch));
        }
    }

    /// Makes a write durable: all of it, or (a crash mid-write) the hard
    /// state, the truncation and the first `keep` entries.
    fn persist(&mut self, id: NodeId, p: &PendingDisk, keep: usize) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(m) = &p.install {
            let s = m.last.index as usize;
            let node = self.nodes.get_mut(&id).expect("known node");
            match self.committed_log.get(s.wrapping_sub(1)) {
                Some((e, _)) if e.term == m.last.term => {
                    // Figure 13: a log that holds the snapshot's last entry
                    // keeps what follows it (entries it may have acknowledged).
                    let matched = node
                        .log
                        .get(s - 1)
                        .is_some_and(|(le, _)| le.term == m.last.term);
                    if matched && node.log.len() > s {
                        problems.push(format!(
                            "Snapshot install: node {id} dropped entries {}..={} that follow the snapshot's matching last entry {:?}",
                            s + 1,
                            node.log.len(),
                            m.last
                        ));
                    }
                    // The log now starts after the snapshot; the sim keeps
                    // the committed prefix in its place for its checks.
                    node.log = self.committed_log[..s].to_vec();
                    node.purged = m.last;
                    node.log_snapshot = Some(m.clone());
                }
                _ if s == 0 => {}
                _ => problems.push(format!(
                    "node {id} installed a snapshot ending at {:?}, which is not a committed entry",
                    m.last
                )),
            }
        }
        if let Some(m) = &p.snapshot {
            let node = self.nodes.get_mut(&id).expect("known node");
            node.log_snapshot = Some(m.clone());
        }
        {
            let node = self.nodes.get_mut(&id).expect("known node");
            if let Some(hs) = p.hard_state {
                if hs.term < node.hard_state.term {
                    problems.push(format!(
                        "node {id} persisted a lower term {} < {}",
                        hs.term, node.hard_state.term
                    ));
                }
                node.hard_state = hs;
            }
            if let Some(t) = p.truncate_from {
                if let Some(term) = p.taken_as_leader_of {
                    problems.push(format!(
                        "Leader Append-Only: leader {id} of term {term} truncated its log at {t}"
                    ));
                }
                if t <= node.applied.max(node.flushed) {
                    problems.push(format!(
                        "node {id} truncated applied entry {t} (applied {})",
                        node.applied
                    ));
                }
                node.log.truncate(t.saturating_sub(1) as usize);
            }
            for e in p.entries.iter().take(keep) {
                if e.index != node.log.len() as u64 + 1 {
                    problems.push(format!(
                        "node {id} wrote entry {} after a log of length {}",
                        e.index,
                        node.log.len()
                    ));
                    break;
                }
                let prev = node.log.last().map_or(0, |(_, c)| *c);
                let c = chain(prev, e);
                match self.log_registry.get(&(e.index, e.term)) {
                    Some(&other) if other != c => problems.push(format!(
                        "Log Matching: node {id} holds entry ({}, {}) with a different prefix than another log",
                        e.index, e.term
                    )),
                    Some(_) => {}
                    None => {
                        self.log_registry.insert((e.index, e.term), c);
                    }
                }
                node.log.push((e.clone(), c));
            }
        }
        problems
    }

    fn finish_disk(&mut self, id: NodeId, p: PendingDisk) {
        let mut problems = self.persist(id, &p, p.entries.len());
        if let Some(last) = p.entries.last() {
            let node = self.nodes.get_mut(&id).expect("known node");
            if let Some(engine) = node.engine.as_mut() {
                engine.persisted(last.log_id());
            }
        }
        for m in p.persisted_messages {
            self.send(m);
        }
        if let Some(upto) = p.purge_to {
            let node = self.nodes.get_mut(&id).expect("known node");
            let held = node
                .log
                .get((upto.index as usize).wrapping_sub(1))
                .map(|(e, _)| e.term);
            let stored = node
                .flushed
                .max(node.snaps.keys().next_back().copied().unwrap_or(0));
            if upto.index > stored || held != Some(upto.term) {
                let what = format!(
                    "node {id} compacted its log to {upto:?}, past what the application stored ({}; durable term there {held:?})",
                    node.flushed
                );
                problems.push(what);
            } else {
                node.purged = node.purged.max(upto);
                self.stats.purges += 1;
            }
        }
        if let Some(m) = p.apply_snapshot {
            self.load_snapshot(id, &m);
        }
        for e in p.committed {
            self.apply(id, e);
        }
        {
            let node = self.nodes.get_mut(&id).expect("known node");
            let applied = node.applied;
            // The application takes what it applied from the queue late,
            // now and then, as a busy one would.
            let take = self.rng.range(0, 3) != 0;
            let node = self.nodes.get_mut(&id).expect("known node");
            if let Some(engine) = node.engine.as_mut().filter(|_| take) {
                engine.delivered(applied);
            }
        }
        // The application flushes its state now and then, and only then
        // releases the log entries it covers.
        if self.chance(100) {
            let node = self.nodes.get_mut(&id).expect("known node");
            node.flushed = node.applied;
            node.flushed_hash = node.app_hash;
            let flushed = node.flushed;
            if let Some(engine) = node.engine.as_mut() {
                engine.release(flushed);
            }
        }
        // Or it takes a snapshot of what it applied (at once when a
        // follower needs one).
        let wanted = self.nodes[&id]
            .engine
            .as_ref()
            .is_some_and(|e| e.snapshot_wanted());
        if self.cfg.snapshots && (wanted || self.chance(40)) {
            let node = self.nodes.get_mut(&id).expect("known node");
            let (applied, hash) = (node.applied, node.app_hash);
            if let Some(meta) = node.engine.as_mut().and_then(|e| e.snapshot_taken(applied)) {
                if meta.last.index != applied {
                    problems.push(format!(
                        "node {id}: snapshot at {applied} recorded as {:?}",
                        meta.last
                    ));
                }
                node.snaps.insert(applied, (meta, hash));
                self.stats.snapshots_taken += 1;
            }
        }
        for what in problems {
            self.fail(what);
        }
    }

    fn apply(&mut self, id: NodeId, e: Entry) {
        for p in self.record_commits(id) {
            self.fail(p);
        }
        let node = self.nodes.get_mut(&id).expect("known node");
        if e.index != node.applied + 1 {
            let what = format!(
                "node {id} applied {} after {}: an entry applied twice or skipped",
                e.index, node.applied
            );
            self.fail(what);
            return;
        }
        node.applied = e.index;
        node.app_hash = chain(node.app_hash, &e);
        let h = entry_hash(&e);
        match self.committed.get(e.index as usize - 1) {
            Some(&(t, eh)) if t != e.term || eh != h => self.fail(format!(
                "State Machine Safety: node {id} applied ({}, {}) but term {t} was committed there",
                e.index, e.term
            )),
            Some(_) => {}
            None => self.fail(format!(
                "node {id} applied {} before anyone committed it",
                e.index
            )),
        }
    }

    /// The leader's driver streams the snapshot `meta` from its store: it
    /// arrives whole after a while, or is lost (the transfer then times
    /// out), now and then twice or very late.
    fn send_snapshot(&mut self, from: NodeId, to: NodeId, meta: SnapshotMeta) {
        let Some(term) = self.nodes[&from].engine.as_ref().map(|e| e.term()) else {
            return;
        };
        let Some((held, hash)) = self.nodes[&from].snaps.get(&meta.last.index).cloned() else {
            self.fail(format!(
                "node {from} was asked to send a snapshot ending at {:?} that its application does not hold",
                meta.last
            ));
            return;
        };
        if held != meta {
            self.fail(format!(
                "node {from} was asked to send {meta:?} but holds {held:?} there"
            ));
            return;
        }
        let timeout = Duration::from_millis(self.rng.range(300, 2000));
        if self.blocked.contains(&(from, to)) || self.chance(self.drop_per_mille * 2) {
            self.schedule(
                self.now + timeout,
                Event::SnapshotFailed(to, from, meta.last.index),
            );
            return;
        }
        let copies = if self.chance(self.dup_per_mille * 3) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if self.cfg.faults && self.chance(100) {
                Duration::from_millis(self.rng.range(200, 3000))
            } else {
                Duration::from_millis(self.rng.range(1, 50))
            };
            self.schedule(
                self.now + delay,
                Event::SnapshotArrives(from, to, term, meta.clone(), hash),
            );
        }
    }

    /// A whole snapshot arrives: the follower's store keeps it, then the
    /// engine decides what to do with it.
    fn snapshot_arrives(
        &mut self,
        from: NodeId,
        to: NodeId,
        term: Term,
        meta: SnapshotMeta,
        hash: u64,
    ) {
        let now = self.local(to, self.now);
        if self.nodes[&to].engine.is_none() {
            // Nobody answers: the leader's transfer times out.
            let timeout = Duration::from_millis(self.rng.range(300, 2000));
            self.schedule(
                self.now + timeout,
                Event::SnapshotFailed(to, from, meta.last.index),
            );
            return;
        }
        let node = self.nodes.get_mut(&to).expect("known node");
        let Some(e) = node.engine.as_mut() else {
            return;
        };
        let index = meta.last.index;
        node.snaps.insert(index, (meta.clone(), hash));
        self.stats.snapshots_delivered += 1;
        e.tick(now);
        e.handle_message(
            now,
            Message {
                from,
                to,
                term,
                incarnation: 0,
                body: MessageBody::InstallSnapshot { meta },
            },
        );
        self.pump(to);
        // The last acknowledgement reaches the leader's driver, or its
        // transfer times out.
        if !self.blocked.contains(&(to, from)) && !self.chance(self.drop_per_mille) {
            let delay = self.message_delay();
            self.schedule(self.now + delay, Event::SnapshotSent(from, to, index));
        } else {
            let timeout = Duration::from_millis(self.rng.range(300, 2000));
            self.schedule(self.now + timeout, Event::SnapshotFailed(to, from, index));
        }
    }

    /// The application replaces its state with the snapshot `m` from its
    /// store: it must be the committed prefix, and never behind what the
    /// application had applied.
    fn load_snapshot(&mut self, id: NodeId, m: &SnapshotMeta) {
        let s = m.last.index;
        let node = self.nodes.get_mut(&id).expect("known node");
        let Some((held, hash)) = node.snaps.get(&s).cloned() else {
            let what =
                format!("node {id} must load a snapshot ending at {s} that it does not hold");
            self.fail(what);
            return;
        };
        if held != *m {
            let what = format!("node {id} must load {m:?} but holds {held:?}");
            self.fail(what);
            return;
        }
        if s < node.applied {
            let what = format!(
                "node {id} loaded a snapshot ending at {s} after applying {}: its state went back",
                node.applied
            );
            self.fail(what);
            return;
        }
        node.applied = s;
        node.app_hash = hash;
        node.state_lost = false;
        node.flushed = s;
        node.flushed_hash = hash;
        self.stats.snapshots_loaded += 1;
        match self.committed_log.get(s as usize - 1) {
            Some((_, c)) if *c == hash => {}
            _ => self.fail(format!(
                "State Machine Safety: node {id} loaded a snapshot ending at {s} that is not the committed prefix"
            )),
        }
    }

    fn check_read(&mut self, ctx: u64, result: Result<LogIndex, crate::engine::NotLeader>) {
        let Some((_, floor)) = self.pending_reads.remove(&ctx) else {
            return;
        };
        if let Ok(index) = result {
            self.stats.reads_confirmed += 1;
            if index < floor {
                self.fail(format!(
                    "stale read: read index {index} is behind commit index {floor} known when the read began"
                ));
            }
        }
    }

    /// The properties that must hold after every step.
    fn check_invariants(&mut self) {
        let mut problems = Vec::new();
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            let node = &self.nodes[&id];
            let Some(e) = node.engine.as_ref() else {
                continue;
            };
            // With snapshots, a follower below the compaction point gets
            // one (or the application is asked for one).
            if e.below_compaction > 0 && !self.cfg.snapshots {
                problems.push(format!(
                    "node {id} needed entries below its compaction point for a follower"
                ));
            }
            // Election Safety: at most one leader per term.
            if e.is_leader() {
                let term = e.term();
                match self.leaders_by_term.get(&term) {
                    Some(&other) if other != id => problems.push(format!(
                        "Election Safety: nodes {other} and {id} both led term {term}"
                    )),
                    Some(_) => {}
                    None => {
                        self.leaders_by_term.insert(term, id);
                        self.stats.leaders_elected += 1;
                        // Votes are durable before they are sent: a majority
                        // holds this vote on disk (or has moved to a later term).
                        let durable_votes: BTreeSet<NodeId> = self
                            .nodes
                            .iter()
                            .filter(|(&nid, n)| {
                                nid == id
                                    || n.hard_state.term > term
                                    || (n.hard_state.term == term && n.hard_state.vote == Some(id))
                            })
                            .map(|(&nid, _)| nid)
                            .collect();
                        if !holds_quorum(e.membership(), &durable_votes) {
                            problems.push(format!(
                                "Vote durability: node {id} leads term {term} ({}) but only {durable_votes:?} hold a vote for it on disk",
                                e.membership()
                            ));
                        }
                        // Leader Completeness: the new leader holds every committed
                        // entry (up to its compaction point: the point's term).
                        let snap = e.purged();
                        for (i, &(t, h)) in self.committed.iter().enumerate() {
                            let idx = i as LogIndex + 1;
                            // Committed in this term or a later one (by a
                            // leader this one has not heard of): not binding.
                            if idx < snap.index || self.commit_terms[i] >= term {
                                continue;
                            }
                            let ok = if idx == snap.index {
                                snap.term == t
                            } else {
                                e.log_entry(idx)
                                    .is_some_and(|le| le.term == t && entry_hash(le) == h)
                            };
                            if !ok {
                                problems.push(format!(
                                    "Leader Completeness: leader {id} of term {term} lacks committed entry {idx} (term {t})"
                                ));
                                break;
                            }
                        }
                    }
                }
                // Leader Append-Only, on the durable log: the prefix seen earlier in this term is intact.
                let len = node.log.len();
                let cur = node.log.last().map_or(0, |(_, c)| *c);
                if let Some(&(mlen, mhash)) = self.leader_log_marks.get(&(id, term)) {
                    let still = if mlen == 0 {
                        0
                    } else {
                        node.log.get(mlen - 1).map_or(u64::MAX, |(_, c)| *c)
                    };
                    if len < mlen || still != mhash {
                        problems.push(format!("Leader Append-Only: leader {id} of term {term} lost or changed entries"));
                    }
                }
                self.leader_log_marks.insert((id, term), (len, cur));
            }
            problems.extend(self.record_commits(id));
        }
        for p in problems {
            self.fail(p);
        }
    }

    /// State Machine Safety at commit: a committed index never holds two different entries.
    fn record_commits(&mut self, id: NodeId) -> Vec<String> {
        let mut problems = Vec::new();
        let node = &self.nodes[&id];
        let Some(e) = node.engine.as_ref() else {
            return problems;
        };
        let commit = e.commit_index();
        // Entries a snapshot replaced were checked where they were committed.
        let from = node.checked_commit.max(e.purged().index);
        for idx in from + 1..=commit {
            let Some(le) = e.log_entry(idx) else {
                problems.push(format!("node {id} committed {idx} beyond its log"));
                break;
            };
            let rec = (le.term, entry_hash(le));
            let pos = idx as usize - 1;
            if pos < self.committed.len() {
                if self.committed[pos] != rec {
                    problems.push(format!(
                        "State Machine Safety: node {id} committed ({idx}, {}) where term {} was committed",
                        le.term, self.committed[pos].0
                    ));
                }
            } else if pos == self.committed.len() {
                // Committed means durable on a majority: count the durable copies.
                let copies: BTreeSet<NodeId> = self
                    .nodes
                    .iter()
                    .filter(|(_, n)| n.log.get(pos).is_some_and(|(le2, _)| le2.term == le.term))
                    .map(|(&nid, _)| nid)
                    .collect();
                if !holds_quorum(e.membership(), &copies) {
                    problems.push(format!(
                        "Commit durability: node {id} committed ({idx}, {}) while only {copies:?} hold it durably ({})",
                        le.term,
                        e.membership()
                    ));
                }
                // Leader Completeness, also for leaders elected before this
                // commit was seen: every leader of a later term holds it.
                for (&oid, other) in &self.nodes {
                    let Some(oe) = other.engine.as_ref().filter(|oe| oe.is_leader()) else {
                        continue;
                    };
                    if oe.term() > e.term()
                        && idx > oe.purged().index
                        && oe.log_entry(idx).is_none_or(|x| x.term != le.term)
                    {
                        problems.push(format!(
                            "Leader Completeness: leader {oid} of term {} lacks entry {idx} (term {}) committed in term {}",
                            oe.term(),
                            le.term,
                            e.term()
                        ));
                    }
                }
                self.committed.push(rec);
                let prev = self.committed_log.last().map_or(0, |(_, c)| *c);
                self.committed_log.push((le.clone(), chain(prev, le)));
                self.commit_terms.push(e.term());
            } else {
                problems.push(format!(
                    "node {id} committed {idx} with a gap in the global record"
                ));
            }
        }
        self.max_commit_seen = self.max_commit_seen.max(commit);
        let node = self.nodes.get_mut(&id).expect("known node");
        node.checked_commit = node.checked_commit.max(commit);
        problems
    }

    /// Crashes a node: it loses its volatile state, the application's
    /// unflushed state and any write in flight (which may also have become
    /// durable, wholly or in part, just before the crash).
    fn crash(&mut self, id: NodeId) {
        let pending = {
            let node = self.nodes.get_mut(&id).expect("known node");
            node.engine = None;
            node.applied = node.flushed;
            node.app_hash = node.flushed_hash;
            node.epoch += 1;
            node.disk_free_at = Duration::ZERO;
            // Only the oldest write can be in the middle of reaching the disk.
            let front = node.disk.pop_front();
            node.disk.clear();
            front
        };
        self.stats.crashes += 1;
        if let Some(p) = pending {
            self.stats.crashes_mid_write += 1;
            let keep = match self.rng.range(0, 3) {
                0 => None,
                1 => Some(p.entries.len()),
                _ => Some(self.rng.range(0, p.entries.len() as u64 + 1) as usize),
            };
            if let Some(keep) = keep {
                for what in self.persist(id, &p, keep) {
                    self.fail(what);
                }
            }
        }
        self.pending_reads.retain(|_, (n, _)| *n != id);
        // One member at a time, as a disk failure would: a lost state
        // needs another member's snapshot.
        let another_lost = self.nodes.iter().any(|(&o, n)| o != id && n.state_lost);
        if self.cfg.snapshots && !another_lost && self.chance(100) {
            // The application's files are lost: state and snapshots; the
            // log survives.
            let node = self.nodes.get_mut(&id).expect("known node");
            node.flushed = 0;
            node.flushed_hash = 0;
            node.applied = 0;
            node.app_hash = 0;
            node.snaps.clear();
            node.state_lost = true;
            self.stats.app_state_lost += 1;
        }
        if self.rng.range(0, 2) == 0 {
            // A quick restart, as a supervisor would do.
            let at = self.now + Duration::from_millis(self.rng.range(1, 100));
            self.schedule(at, Event::Restart(id));
        }
    }

    fn random_fault(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        if let Some((old, until)) = self.deposing {
            // Hold the cut until another node leads in a newer term and has
            // committed in it (then the old leader's lease is what protects
            // its reads), or until the limit.
            let old_term = self.nodes[&old].engine.as_ref().map_or(0, |e| e.term());
            let replaced = self.nodes.iter().any(|(&id, n)| {
                id != old
                    && n.engine.as_ref().is_some_and(|e| {
                        e.is_leader()
                            && e.term() > old_term
                            && e.log_term(e.commit_index()) == Some(e.term())
                    })
            });
            if replaced || self.now >= until {
                self.deposing = None;
                self.set_blocked(BTreeSet::new());
            }
            return;
        }
        if self.cfg.lease && self.rng.range(0, 1000) < 3 {
            if let Some(l) = self.any_leader() {
                let mut blocked = BTreeSet::new();
                for &b in &ids {
                    if b != l {
                        blocked.insert((l, b));
                        blocked.insert((b, l));
                    }
                }
                self.set_blocked(blocked);
                self.deposing = Some((l, self.now + Duration::from_secs(5)));
                // The worst drift the bound allows: the cut-off leader's
                // clock slow, everyone else's fast (its lease then lasts
                // longest next to theirs).
                let d = self.cfg.drift_ppm as i64;
                for &b in &ids {
                    self.set_rate(b, if b == l { -d } else { d });
                }
                return;
            }
        }
        let roll = self.rng.range(0, 1000);
        if roll < 6 {
            let live = self.live_ids();
            let writing: Vec<NodeId> = live
                .iter()
                .copied()
                .filter(|id| !self.nodes[id].disk.is_empty())
                .collect();
            // Most crashes hit a node with a write in flight.
            let pool = if !writing.is_empty() && self.rng.range(0, 10) < 7 {
                writing
            } else {
                live
            };
            if !pool.is_empty() {
                let id = pool[self.rng.range(0, pool.len() as u64) as usize];
                self.crash(id);
            }
        } else if roll < 13 {
            let dead: Vec<NodeId> = ids
                .iter()
                .copied()
                .filter(|id| self.nodes[id].engine.is_none())
                .collect();
            if !dead.is_empty() {
                let id = dead[self.rng.range(0, dead.len() as u64) as usize];
                self.start_node(id);
            }
        } else if roll < 18 {
            let mut blocked = BTreeSet::new();
            match self.rng.range(0, 3) {
                0 => {
                    // Symmetric split into two random groups.
                    let side: Vec<bool> = ids.iter().map(|_| self.rng.range(0, 2) == 0).collect();
                    for (i, &a) in ids.iter().enumerate() {
                        for (j, &b) in ids.iter().enumerate() {
                            if side[i] != side[j] {
                                blocked.insert((a, b));
                            }
                        }
                    }
                }
                1 => {
                    // Asymmetric: some directed links fail.
                    for &a in &ids {
                        for &b in &ids {
                            if a != b && self.rng.range(0, 4) == 0 {
                                blocked.insert((a, b));
                            }
                        }
                    }
                }
                _ => {
                    // Isolate a leader.
                    if let Some(l) = self.any_leader() {
                        for &b in &ids {
                            if b != l {
                                blocked.insert((l, b));
                                blocked.insert((b, l));
                            }
                        }
                    }
                }
            }
            self.set_blocked(blocked);
        } else if roll < if self.cfg.lease { 20 } else { 25 } {
            // Lease seeds keep partitions longer: a deposed leader's lease
            // only matters once the others have elected and committed.
            self.set_blocked(BTreeSet::new());
        }
    }

    /// Every live node that believes it leads (several may).
    fn leaders(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.engine.as_ref().is_some_and(|e| e.is_leader()))
            .map(|(&id, _)| id)
            .collect()
    }

    /// A random node among those that believe they lead.
    fn any_leader(&mut self) -> Option<NodeId> {
        let leaders = self.leaders();
        if leaders.is_empty() {
            return None;
        }
        Some(leaders[self.rng.range(0, leaders.len() as u64) as usize])
    }

    /// A leader changes the membership or hands leadership over, at random.
    fn random_change(&mut self) {
        let Some(l) = self.any_leader() else {
            return;
        };
        let all: Vec<NodeId> = self.nodes.keys().copied().collect();
        let roll = self.rng.range(0, 100);
        let pick = |rng: &mut fastrand::Rng, v: &[NodeId]| -> Option<NodeId> {
            (!v.is_empty()).then(|| v[rng.range(0, v.len() as u64) as usize])
        };
        let e = self.nodes[&l].engine.as_ref().expect("leader is live");
        let m = e.membership().clone();
        let voters: Vec<NodeId> = m.voters.iter().copied().collect();
        let learners: Vec<NodeId> = m.learners.iter().copied().collect();
        let outsiders: Vec<NodeId> = all.iter().copied().filter(|id| !m.is_member(*id)).collect();
        use crate::engine::ChangeStep;
        let steps: Vec<ChangeStep> = if roll < 15 {
            let to = if self.rng.bool() {
                None
            } else {
                pick(&mut self.rng, &voters)
            };
            let e = self
                .nodes
                .get_mut(&l)
                .and_then(|n| n.engine.as_mut())
                .expect("live");
            if e.transfer_leadership(to).is_ok() {
                self.stats.transfers += 1;
            }
            self.pump(l);
            return;
        } else if roll < 40 {
            match pick(&mut self.rng, &outsiders) {
                Some(id) => vec![ChangeStep::AddLearner {
                    id,
                    member: Member::default(),
                }],
                None => return,
            }
        } else if roll < 65 && voters.len() < 7 {
            match pick(&mut self.rng, &learners) {
                Some(id) => vec![ChangeStep::Promote(id)],
                None => return,
            }
        } else if roll < 75 && voters.len() > 3 {
            match pick(&mut self.rng, &voters) {
                Some(id) => vec![ChangeStep::Demote(id)],
                None => return,
            }
        } else if roll < 85 && voters.len() > 3 {
            match pick(&mut self.rng, &voters) {
                Some(id) => vec![ChangeStep::Remove(id)],
                None => return,
            }
        } else if roll < 92 {
            match pick(&mut self.rng, &learners) {
                Some(id) => vec![ChangeStep::Remove(id)],
                None => return,
            }
        } else {
            // Replace a voter by a learner in one change.
            match (pick(&mut self.rng, &voters), pick(&mut self.rng, &learners)) {
                (Some(out), Some(inn)) => vec![ChangeStep::Remove(out), ChangeStep::Promote(inn)],
                _ => return,
            }
        };
        let e = self
            .nodes
            .get_mut(&l)
            .and_then(|n| n.engine.as_mut())
            .expect("live");
        let before = e.change_in_flight();
        if e.change_membership(&steps).is_ok() {
            self.stats.changes += 1;
            if let Some(index) = before {
                self.fail(format!(
                    "Configuration change: leader {l} accepted {steps:?} while the change at {index} was in flight"
                ));
            }
        }
        self.pump(l);
    }

    fn random_client(&mut self) {
        if self.cfg.membership_changes && self.rng.range(0, 1000) < 8 {
            self.random_change();
        }
        let roll = self.rng.range(0, 1000);
        if roll < 150 {
            if let Some(l) = self.any_leader() {
                let cmd = self.next_cmd;
                self.next_cmd += 1;
                let e = self
                    .nodes
                    .get_mut(&l)
                    .and_then(|n| n.engine.as_mut())
                    .expect("leader is live");
                let _ = e.propose(cmd.to_le_bytes().to_vec());
                self.pump(l);
            }
        } else if roll < 230 {
            if let Some(l) = self.any_leader() {
                self.start_read(l);
            }
        } else if self.cfg.lease && roll < 530 {
            // Lease reads answer at once: ask every node that believes it
            // leads, a deposed one included, as often as possible.
            for l in self.leaders() {
                self.start_read(l);
            }
        }
    }

    fn start_read(&mut self, on: NodeId) {
        let ctx = self.next_ctx;
        self.next_ctx += 1;
        let floor = self.max_commit_seen;
        let now = self.local(on, self.now);
        let Some(e) = self.nodes.get_mut(&on).and_then(|n| n.engine.as_mut()) else {
            return;
        };
        let before = e.lease_reads;
        let term = e.term();
        if e.read_index(now, ctx).is_ok() {
            self.pending_reads.insert(ctx, (on, floor));
        }
        let lease = e.lease_reads - before;
        self.stats.lease_reads += lease;
        if lease > 0
            && self
                .nodes
                .values()
                .filter_map(|n| n.engine.as_ref())
                .any(|o| o.is_leader() && o.term() > term)
        {
            self.stats.deposed_lease_reads += 1;
        }
        self.pump(on);
    }

    /// Runs one event: the earliest message, disk completion or timer.
    fn step_once(&mut self) {
        self.step += 1;
        let next_timer = self
            .nodes
            .iter()
            .filter_map(|(&id, n)| {
                n.engine
                    .as_ref()
                    .map(|e| (self.global(id, e.next_deadline()), id))
            })
            .min();
        let next_event = self.queue.keys().next().copied();
        let use_timer = match (next_timer, next_event) {
            (Some((t, _)), Some((et, _))) => t <= et,
            (Some(_), None) => true,
            _ => false,
        };
        if use_timer {
            let (t, id) = next_timer.expect("checked");
            self.now = self.now.max(t);
            let now = self.local(id, self.now);
            if let Some(e) = self.nodes.get_mut(&id).and_then(|n| n.engine.as_mut()) {
                e.tick(now);
            }
            self.pump(id);
        } else if let Some((key, ev)) = self.queue.pop_first() {
            self.now = self.now.max(key.0);
            match ev {
                Event::Deliver(m) => {
                    let to = m.to;
                    let now = self.local(to, self.now);
                    if let Some(e) = self.nodes.get_mut(&to).and_then(|n| n.engine.as_mut()) {
                        e.tick(now);
                        e.handle_message(now, m);
                        self.stats.messages_delivered += 1;
                        self.pump(to);
                    }
                }
                Event::DiskDone(id, epoch) => {
                    let p = self
                        .nodes
                        .get_mut(&id)
                        .filter(|n| n.epoch == epoch)
                        .and_then(|n| n.disk.pop_front());
                    if let Some(p) = p {
                        self.finish_disk(id, p);
                        self.pump(id);
                    }
                }
                Event::Restart(id) => {
                    if self.nodes[&id].engine.is_none() {
                        self.start_node(id);
                    }
                }
                Event::SnapshotArrives(from, to, term, meta, hash) => {
                    self.snapshot_arrives(from, to, term, meta, hash);
                }
                Event::SnapshotSent(from, to, index) => {
                    if let Some(e) = self.nodes.get_mut(&from).and_then(|n| n.engine.as_mut()) {
                        e.snapshot_sent(to, index);
                    }
                    self.pump(from);
                }
                Event::SnapshotFailed(to, from, index) => {
                    if let Some(e) = self.nodes.get_mut(&from).and_then(|n| n.engine.as_mut()) {
                        e.snapshot_failed(to, index);
                    }
                    self.pump(from);
                }
            }
        }
        self.check_invariants();
    }

    fn heal(&mut self) {
        self.set_blocked(BTreeSet::new());
        // From here on: no long stalls or delays either, and a LAN's jitter
        // (heavy reordering makes pipelined catch-up crawl, not stop).
        self.cfg.faults = false;
        self.max_delay_ms = self.max_delay_ms.min(10);
        self.drop_per_mille = 0;
        self.dup_per_mille = 0;
        let dead: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.engine.is_none())
            .map(|(&id, _)| id)
            .collect();
        for id in dead {
            self.start_node(id);
        }
    }

    fn violation(&self) -> Option<Violation> {
        self.violation.as_ref().map(|what| Violation {
            seed: self.cfg.seed,
            step: self.step,
            what: what.clone(),
        })
    }

    /// Runs the fault phase, heals, and checks liveness.
    pub(crate) fn run(mut self) -> Result<SimStats, Violation> {
        let _mutation = self.cfg.mutation.map(crate::mutation::inject);
        for _ in 0..self.cfg.fault_steps {
            if self.cfg.faults {
                self.random_fault();
            }
            self.random_client();
            self.step_once();
            if let Some(v) = self.violation() {
                return Err(v);
            }
        }
        self.heal();
        let healed_at = self.now;
        let deadline = healed_at + self.cfg.liveness_bound;
        // A healthy cluster settles in a few thousand events; a broken one
        // can storm (elections, retransmissions) without bound.
        let step_limit = self.step + 50 * self.cfg.fault_steps.max(1000);
        let mut marker: Option<(NodeId, Term, LogIndex)> = None;
        loop {
            if self.now > deadline || self.step > step_limit {
                let applied: Vec<(NodeId, LogIndex)> =
                    self.nodes.iter().map(|(&id, n)| (id, n.applied)).collect();
                if std::env::var_os("RAFT_SIM_DEBUG").is_some() {
                    for (id, n) in &self.nodes {
                        if let Some(e) = &n.engine {
                            eprintln!(
                                "node {id}: {:?} term {} commit {} last {:?} durable {} applied {} snap {:?} disk queue {} | {}",
                                e.role(), e.term(), e.commit_index(), e.last_log_id(), e.durable_index(),
                                e.applied_index(), e.purged(), n.disk.len(), e.progress_debug()
                            );
                            let writes = n
                                .disk
                                .iter()
                                .filter(|p| {
                                    p.hard_state.is_some()
                                        || p.truncate_from.is_some()
                                        || !p.entries.is_empty()
                                })
                                .count();
                            let hs = n.disk.iter().filter(|p| p.hard_state.is_some()).count();
                            let tr = n.disk.iter().filter(|p| p.truncate_from.is_some()).count();
                            let msgs: usize =
                                n.disk.iter().map(|p| p.persisted_messages.len()).sum();
                            eprintln!("   queue: {writes} writes ({hs} hard state, {tr} truncations), {msgs} held messages, free at {:?} now {:?}", n.disk_free_at, self.now);
                        }
                    }
                }
                self.fail(format!(
                    "liveness: within {:?} of healing, the new proposal {marker:?} did not commit and reach every node (leader: {:?}, applied: {applied:?}), or reads stayed unanswered ({:?})",
                    self.cfg.liveness_bound,
                    self.leader(),
                    self.pending_reads,
                ));
                return Err(self.violation().expect("just set"));
            }
            if let Some(l) = self.leader() {
                let term = self.nodes[&l]
                    .engine
                    .as_ref()
                    .map(|e| e.term())
                    .unwrap_or(0);
                if marker.is_none_or(|(ml, mt, _)| ml != l || mt != term) {
                    let e = self
                        .nodes
                        .get_mut(&l)
                        .and_then(|n| n.engine.as_mut())
                        .expect("live");
                    if let Ok(id) = e.propose(b"liveness".to_vec()) {
                        marker = Some((l, id.term, id.index));
                    }
                    self.pump(l);
                }
            }
            if let Some((l, t, idx)) = marker {
                let n = &self.nodes[&l];
                let done = n.applied >= idx
                    && n.log
                        .get(idx as usize - 1)
                        .is_some_and(|(e, _)| e.term == t);
                // Every member catches up, and every read is answered.
                let members = self.nodes[&l]
                    .engine
                    .as_ref()
                    .map(|e| e.membership().all_members())
                    .unwrap_or_default();
                let all_caught_up = self
                    .nodes
                    .iter()
                    .filter(|(id, _)| members.contains(id))
                    .all(|(_, n)| n.applied >= idx);
                if done && all_caught_up && self.pending_reads.is_empty() {
                    break;
                }
            }
            self.step_once();
            if let Some(v) = self.violation() {
                return Err(v);
            }
        }
        self.stats.steps = self.step;
        self.stats.committed = self.committed.len() as LogIndex;
        self.stats.virtual_time = self.now;
        Ok(self.stats)
    }
}

/// The simulator's own quorum rule, kept apart from the engine's (which the
/// mutations break): a majority of the voters and, during a joint
/// configuration, a majority of the outgoing voters too. Learners never count.
fn holds_quorum(m: &Membership, holders: &BTreeSet<NodeId>) -> bool {
    let majority = |set: &BTreeSet<NodeId>| {
        set.iter().filter(|id| holders.contains(id)).count() * 2 > set.len()
    };
    !m.voters.is_empty() && majority(&m.voters) && (m.outgoing.is_empty() || majority(&m.outgoing))
}

/// `[lo, hi)`, or `lo` when empty: the one shape the simulator draws with.
trait Draw {
    fn range(&mut self, lo: u64, hi: u64) -> u64;
}

impl Draw for fastrand::Rng {
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            self.u64(lo..hi)
        }
    }
}

#[cfg(test)]
mod tests;
