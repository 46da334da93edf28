//! The Raft protocol as a deterministic, sans-IO state machine.
//!
//! The engine owns no clock, no socket, no file and no thread RNG. Time comes in
//! as a `now` argument (any monotonic origin the driver likes), randomness from a
//! seed handed to [`Engine::new`]. Events go in through `handle_message`,
//! `propose`, `read_index`, `tick` and `persisted`; everything the outside world
//! must do comes out of [`Engine::take_ready`] as a [`Ready`]:
//!
//! 1. write `hard_state`, apply `truncate_from`, append `entries` — durably, as one batch;
//! 2. `messages` may be sent at once, even before step 1 completes (they are a
//!    leader's appends, which may race its own disk write);
//! 3. after step 1 is durable: call [`Engine::persisted`] with the last entry's
//!    id, then send `persisted_messages` (votes and acknowledgements that promise
//!    durable state);
//! 4. apply `committed` entries in order and answer `reads`.
//!
//! Readies must be processed one at a time, in order.

mod changes;
mod compaction;
mod election;
mod follower;
mod interface;
mod leader;
mod log;
mod membership;
mod progress;
mod read_queue;
mod snapshot;

#[cfg(test)]
mod tests;

use crate::config::Config;
use crate::message::{Message, MessageBody, RejectHint};
use crate::mutation::{broken, Mutation};
use crate::types::{
    Entry, EntryPayload, HardState, LogId, LogIndex, Member, Membership, NodeId, Role,
    SnapshotMeta, Term,
};
pub use changes::{ChangeError, ChangeStep, TransferError};
pub use interface::{EngineError, InitialState, NotLeader, ProposeError, ReadResult, Ready};
use log::RaftLog;
use membership::MembershipLog;
use progress::{Progress, ReplState};
use read_queue::ReadQueue;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// One Raft node's protocol state. See the module docs.
#[derive(Debug)]
pub struct Engine {
    cfg: Config,
    id: NodeId,
    term: Term,
    vote: Option<NodeId>,
    role: Role,
    leader: Option<NodeId>,
    log: RaftLog,
    /// The membership per log index; the latest counts, committed or not.
    members: MembershipLog,
    rng: crate::rng::Rng,
    now: Duration,

    election_deadline: Duration,
    heartbeat_deadline: Duration,
    quorum_deadline: Duration,
    /// On a leader whose commit index moved: when followers not told yet
    /// get an append of their own that carries it.
    commit_notice: Option<Duration>,
    last_leader_contact: Option<Duration>,

    votes: BTreeMap<NodeId, bool>,
    progress: BTreeMap<NodeId, Progress>,
    reads: ReadQueue,
    /// With lease reads: reads are answered without a round until then
    /// (this node's clock).
    lease_until: Duration,
    /// With lease reads: a (re)started member ignores candidates until
    /// then, as if it were in a leader's lease: it may have acknowledged a
    /// heartbeat just before it went down.
    startup_lease_until: Duration,

    need_broadcast: bool,
    hard_state_dirty: bool,
    messages: Vec<Message>,
    persisted_messages: Vec<Message>,
    /// The application has stored the effects of every entry up to here.
    released: LogIndex,
    /// Every member is known to hold the log up to here (never decreases:
    /// such entries are committed everywhere and never removed).
    peer_safe: LogIndex,
    /// A compaction the store has not been told about yet.
    pending_purge: Option<LogId>,
    /// The latest snapshot the application holds.
    snapshot: Option<SnapshotMeta>,
    /// A snapshot taken that the store has not recorded yet.
    pending_snapshot: Option<SnapshotMeta>,
    /// A leader's snapshot that replaces the log in the next write.
    pending_install: Option<SnapshotMeta>,
    /// A snapshot the application must load next.
    pending_apply_snapshot: Option<SnapshotMeta>,
    /// The application lost its state: nothing is applied, and this node
    /// does not campaign, until the leader's snapshot arrives.
    awaiting_snapshot: bool,
    /// Followers to stream a snapshot to.
    snapshot_sends: Vec<(NodeId, SnapshotMeta)>,
    /// A follower needs a snapshot and there is none: the application
    /// should take one.
    snapshot_wanted: bool,
    /// The driver can send and receive snapshots (`InitialState::await_snapshot`).
    can_snapshot: bool,
    /// This node's storage identity (`InitialState::incarnation`).
    incarnation: u64,
    /// A leadership transfer under way.
    transfer: Option<changes::Transfer>,
    /// Leader: storage identities members reported that the configuration
    /// does not record yet.
    learned: BTreeMap<NodeId, u64>,
    /// The leader refused this node: the configuration records another
    /// storage identity for its id (this one).
    refused: Option<u64>,
    /// How often a follower needed entries that were compacted away (tests:
    /// must stay 0, there are no snapshots to send instead).
    #[cfg(test)]
    pub(crate) below_compaction: u64,
    /// Reads answered under the lease (tests: the simulator reports it).
    #[cfg(test)]
    pub(crate) lease_reads: u64,
}

impl Engine {
    /// Restores an engine from durable state. `seed` drives the election-timeout
    /// randomness; `now` is the driver's current time.
    pub fn new(
        cfg: Config,
        init: InitialState,
        seed: u64,
        now: Duration,
    ) -> Result<Self, EngineError> {
        cfg.validate()?;
        let InitialState {
            hard_state,
            purged,
            entries,
            membership: base_membership,
            applied,
            snapshot,
            await_snapshot,
            incarnation,
        } = init;
        let mut expect = purged.index + 1;
        let mut prev_term = purged.term;
        for e in &entries {
            if e.index != expect {
                return Err(EngineError::InvalidState(format!(
                    "log gap: expected index {expect}, found {}",
                    e.index
                )));
            }
            if e.term < prev_term || e.term > hard_state.term {
                return Err(EngineError::InvalidState(format!(
                    "entry {} has term {} (previous {prev_term}, current term {})",
                    e.index, e.term, hard_state.term
                )));
            }
            prev_term = e.term;
            expect += 1;
        }
        let last = expect - 1;
        if let Some(m) = &snapshot {
            if m.last.index > last {
                return Err(EngineError::InvalidState(format!(
                    "the latest snapshot ends at {} past the last log index {last}",
                    m.last.index
                )));
            }
        }
        // The application is behind the compaction point: it must load the
        // snapshot first (a crash between storing a leader's snapshot and
        // loading it, or lost state files).
        let mut apply_snapshot = None;
        let mut applied = applied;
        let mut awaiting_snapshot = false;
        if applied < purged.index {
            match &snapshot {
                Some(m) if m.last.index >= purged.index => {
                    applied = m.last.index;
                    apply_snapshot = Some(m.clone());
                }
                _ if await_snapshot
                    && MembershipLog::restore(base_membership.clone(), &entries)
                        .current()
                        .all_members()
                        .iter()
                        .any(|&v| v != cfg.id) =>
                {
                    awaiting_snapshot = true;
                    applied = purged.index;
                }
                _ => {
                    return Err(EngineError::InvalidState(format!(
                        "application applied index {applied} is below the compaction point {} and no snapshot covers it",
                        purged.index
                    )))
                }
            }
        }
        if applied > last {
            return Err(EngineError::InvalidState(format!(
                "application applied index {applied} is past the last log index {last}"
            )));
        }
        let id = cfg.id;
        // A mutation for the simulator: forget what the application applied.
        let applied = if broken(Mutation::ReapplyAfterRestart) {
            purged.index
        } else {
            applied
        };
        let members = MembershipLog::restore(base_membership, &entries);
        let mut e = Engine {
            id,
            term: hard_state.term,
            vote: hard_state.vote,
            role: Role::Follower,
            leader: None,
            log: RaftLog::restore(purged, entries, applied),
            members,
            rng: crate::rng::Rng::with_seed(seed ^ id.rotate_left(17)),
            now,
            election_deadline: now,
            heartbeat_deadline: now,
            quorum_deadline: now,
            commit_notice: None,
            last_leader_contact: None,
            votes: BTreeMap::new(),
            progress: BTreeMap::new(),
            reads: ReadQueue::default(),
            lease_until: Duration::ZERO,
            startup_lease_until: if cfg.read_policy == crate::config::ReadPolicy::Lease {
                now + cfg.election_timeout_min
            } else {
                Duration::ZERO
            },
            need_broadcast: false,
            hard_state_dirty: false,
            messages: Vec::new(),
            persisted_messages: Vec::new(),
            released: purged.index,
            peer_safe: purged.index,
            pending_purge: None,
            snapshot,
            pending_snapshot: None,
            pending_install: None,
            pending_apply_snapshot: apply_snapshot,
            awaiting_snapshot,
            snapshot_sends: Vec::new(),
            snapshot_wanted: false,
            can_snapshot: await_snapshot,
            incarnation,
            transfer: None,
            learned: BTreeMap::new(),
            refused: None,
            #[cfg(test)]
            below_compaction: 0,
            #[cfg(test)]
            lease_reads: 0,
            cfg,
        };
        e.reset_election_timer();
        Ok(e)
    }

    // ----- observers -------------------------------------------------------

    /// The configuration the engine runs with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }
    /// The current term.
    pub fn term(&self) -> Term {
        self.term
    }
    /// The vote cast in the current term.
    pub fn vote(&self) -> Option<NodeId> {
        self.vote
    }
    /// The current role.
    pub fn role(&self) -> Role {
        self.role
    }
    /// True when leader.
    pub fn is_leader(&self) -> bool {
        self.role == Role::Leader
    }
    /// The leader this node currently follows (itself when leader).
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }
    /// On a leader, the last index known replicated on each other member
    /// (voters and learners); empty otherwise.
    pub fn peer_progress(&self) -> Vec<(NodeId, LogIndex)> {
        if self.role != Role::Leader {
            return Vec::new();
        }
        self.progress
            .iter()
            .filter(|(&id, _)| id != self.id)
            .map(|(&id, p)| (id, p.match_index))
            .collect()
    }
    /// The commit index.
    pub fn commit_index(&self) -> LogIndex {
        self.log.committed()
    }
    /// The highest index handed out for applying.
    pub fn applied_index(&self) -> LogIndex {
        self.log.applied
    }
    /// The highest index known durable locally.
    #[cfg(test)]
    pub(crate) fn durable_index(&self) -> LogIndex {
        self.log.durable
    }
    /// The last entry's id.
    pub fn last_log_id(&self) -> LogId {
        self.log.last_log_id()
    }
    /// The compaction point.
    pub fn purged(&self) -> LogId {
        self.log.purged()
    }
    /// The highest index the application said it stored
    /// ([`Engine::release`]).
    pub fn released(&self) -> LogIndex {
        self.released
    }
    /// The membership in force.
    pub fn membership(&self) -> &Membership {
        self.members.current()
    }
    /// This node's storage identity.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }
    /// When the leader refused this node because the configuration records
    /// another storage identity for its id: that identity. The node must
    /// stop; it can be added back as a new member.
    pub fn refused(&self) -> Option<u64> {
        self.refused
    }
    /// True while the application's state is lost and the leader's
    /// snapshot has not arrived (see `InitialState::await_snapshot`).
    pub fn awaiting_snapshot(&self) -> bool {
        self.awaiting_snapshot
    }
    /// True when a follower needs entries below the compaction point and
    /// there is no snapshot to send: the application should take one
    /// ([`Engine::snapshot_taken`]).
    pub fn snapshot_wanted(&self) -> bool {
        self.snapshot_wanted
    }
    /// The latest snapshot the application holds, as far as the engine knows.
    pub fn snapshot(&self) -> Option<&SnapshotMeta> {
        self.snapshot.as_ref()
    }
    /// The term of the entry at `index`, if held.
    pub fn log_term(&self, index: LogIndex) -> Option<Term> {
        self.log.term(index)
    }
    /// The entry at `index`, if held.
    pub fn log_entry(&self, index: LogIndex) -> Option<&Entry> {
        self.log.entry(index)
    }
    /// The earliest time at which [`Engine::tick`] has something to do.
    pub fn next_deadline(&self) -> Duration {
        match self.role {
            Role::Leader => {
                let mut d = self.heartbeat_deadline;
                if self.cfg.check_quorum {
                    d = d.min(self.quorum_deadline);
                }
                self.commit_notice.map_or(d, |c| d.min(c))
            }
            _ => self.election_deadline,
        }
    }
    /// The leader's replication state per follower, for diagnostics.
    #[cfg(test)]
    pub(crate) fn progress_debug(&self) -> String {
        self.progress
            .iter()
            .map(|(id, p)| {
                format!(
                    "{id}: match {} next {} {:?} paused {} inflight {:?}",
                    p.match_index, p.next_index, p.state, p.paused, p.inflight
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    // ----- inputs ----------------------------------------------------------

    /// Advances time: fires election timeouts, heartbeats and check-quorum.
    pub fn tick(&mut self, now: Duration) {
        self.now = self.now.max(now);
        let now = self.now;
        if self.role == Role::Leader {
            if now >= self.heartbeat_deadline {
                self.heartbeat_deadline = now + self.cfg.heartbeat_interval;
                self.on_heartbeat_timer();
            }
            // After the heartbeat, which may have told them already.
            if self.commit_notice.is_some_and(|at| now >= at) {
                self.notify_commit();
            }
            self.check_transfer();
            if self.cfg.check_quorum && now >= self.quorum_deadline {
                self.quorum_deadline = now + self.cfg.election_timeout_min;
                let mut active: BTreeSet<NodeId> = self
                    .progress
                    .iter()
                    .filter(|(_, p)| p.recent_active)
                    .map(|(&id, _)| id)
                    .collect();
                active.insert(self.id);
                for p in self.progress.values_mut() {
                    p.recent_active = false;
                }
                if !self.members.current().is_quorum(&active) {
                    tracing::info!(
                        node = self.id,
                        term = self.term,
                        "lost contact with a majority, stepping down"
                    );
                    self.become_follower(self.term, None);
                }
            }
        } else if now >= self.election_deadline {
            if self.members.current().contains(self.id) {
                self.campaign(self.cfg.pre_vote);
            } else {
                self.reset_election_timer();
            }
        }
    }

    /// Proposes an application command. On the leader it is appended at once and
    /// its future position returned; it commits later, or is lost if leadership is.
    pub fn propose(&mut self, command: Vec<u8>) -> Result<LogId, ProposeError> {
        if command.len() > self.cfg.max_entry_bytes {
            return Err(ProposeError::TooLarge {
                size: command.len(),
                max: self.cfg.max_entry_bytes,
            });
        }
        self.propose_payload(EntryPayload::Command(command.into()))
    }

    /// Proposes several commands as consecutive entries, all or none: when
    /// one is too large or together they exceed the back-pressure limit,
    /// nothing is appended.
    pub fn propose_batch(&mut self, commands: Vec<Vec<u8>>) -> Result<Vec<LogId>, ProposeError> {
        if self.role != Role::Leader {
            return Err(NotLeader {
                leader: self.leader,
            }
            .into());
        }
        if let Some(t) = self.transfer {
            return Err(ProposeError::Transferring { to: t.to });
        }
        let mut total = 0u64;
        for c in &commands {
            if c.len() > self.cfg.max_entry_bytes {
                return Err(ProposeError::TooLarge {
                    size: c.len(),
                    max: self.cfg.max_entry_bytes,
                });
            }
            total += (c.len() + crate::types::ENTRY_OVERHEAD) as u64;
        }
        if commands.len() > 1 && total > self.cfg.max_unapplied_bytes {
            // Could never be accepted as one batch: the caller must split it.
            return Err(ProposeError::TooLarge {
                size: usize::try_from(total).unwrap_or(usize::MAX),
                max: usize::try_from(self.cfg.max_unapplied_bytes).unwrap_or(usize::MAX),
            });
        }
        let pending = self.log.unapplied_bytes();
        if pending > 0 && pending + total > self.cfg.max_unapplied_bytes {
            return Err(ProposeError::Busy {
                pending,
                max: self.cfg.max_unapplied_bytes,
            });
        }
        let ids = commands
            .into_iter()
            .map(|c| self.append_local(EntryPayload::Command(c.into())))
            .collect();
        self.need_broadcast = true;
        Ok(ids)
    }

    fn propose_payload(&mut self, payload: EntryPayload) -> Result<LogId, ProposeError> {
        if self.role != Role::Leader {
            return Err(NotLeader {
                leader: self.leader,
            }
            .into());
        }
        if let Some(t) = self.transfer {
            return Err(ProposeError::Transferring { to: t.to });
        }
        let pending = self.log.unapplied_bytes();
        let size = (payload.size_hint() + crate::types::ENTRY_OVERHEAD) as u64;
        if pending > 0 && pending + size > self.cfg.max_unapplied_bytes {
            return Err(ProposeError::Busy {
                pending,
                max: self.cfg.max_unapplied_bytes,
            });
        }
        let id = self.append_local(payload);
        self.need_broadcast = true;
        Ok(id)
    }

    /// Asks for a linearizable read point. The answer arrives in a later
    /// `Ready::reads` with the same `ctx`: once the application has applied the
    /// returned index, reading its state is linearizable.
    pub fn read_index(&mut self, now: Duration, ctx: u64) -> Result<(), NotLeader> {
        self.now = self.now.max(now);
        if self.role != Role::Leader {
            return Err(NotLeader {
                leader: self.leader,
            });
        }
        // A new leader does not know the commit index until its no-op commits.
        let committed = self.log.committed();
        let known = self.committed_own_term().then_some(committed);
        if let Some(index) = known {
            if self.cfg.read_policy == crate::config::ReadPolicy::Lease
                && self.now < self.lease_until
            {
                self.reads.answer_now(ctx, index);
                #[cfg(test)]
                {
                    self.lease_reads += 1;
                }
                return Ok(());
            }
        }
        self.reads.push(ctx, known);
        self.check_reads();
        Ok(())
    }

    /// Records that the application took every committed entry up to
    /// `index` from the apply queue: their bytes no longer count toward
    /// `max_unapplied_bytes`.
    pub fn delivered(&mut self, index: LogIndex) {
        self.log.deliver(index);
    }

    /// Encoded-size bound of the entries this node holds that the
    /// application has not taken yet (see `Config::max_unapplied_bytes`).
    pub fn unapplied_bytes(&self) -> u64 {
        self.log.unapplied_bytes()
    }

    /// Records that the store made the log durable up to `last` (the
    /// `Ready::last_entry` of a processed ready).
    pub fn persisted(&mut self, last: LogId) {
        if self.log.persisted(last) && self.role == Role::Leader {
            self.maybe_commit();
        }
    }

    /// Handles a message from a peer that arrived at `now` (the engine's
    /// clock moves to it, never back; timers fire only in [`Engine::tick`]).
    /// Messages not addressed to this node, from unknown nodes, or malformed
    /// are dropped.
    pub fn handle_message(&mut self, now: Duration, msg: Message) {
        self.now = self.now.max(now);
        if matches!(
            msg.body,
            MessageBody::SnapshotChunk { .. } | MessageBody::SnapshotAck { .. }
        ) {
            tracing::warn!(
                node = self.id,
                from = msg.from,
                "dropping a snapshot transfer message: the driver handles those"
            );
            return;
        }
        if msg.to != self.id || msg.from == self.id {
            tracing::warn!(
                node = self.id,
                from = msg.from,
                to = msg.to,
                "dropping misaddressed message"
            );
            return;
        }
        // Leaders and their traffic are accepted from anyone (a member
        // added by a configuration this node has not seen yet leads); vote
        // requests only from voters of the configuration in force, so a
        // removed member that keeps running cannot disturb the cluster.
        if matches!(msg.body, MessageBody::VoteRequest { .. })
            && !self.members.current().contains(msg.from)
        {
            tracing::debug!(
                node = self.id,
                from = msg.from,
                "ignoring a vote request from a non-voter"
            );
            return;
        }
        if let MessageBody::Refused { recorded } = msg.body {
            if msg.term >= self.term {
                self.on_refused(msg.from, recorded);
            }
            return;
        }
        if self.check_identity(&msg) {
            return;
        }
        let from = msg.from;
        if msg.term > self.term {
            match &msg.body {
                MessageBody::VoteRequest {
                    pre_vote, transfer, ..
                } => {
                    if self.in_lease() && !transfer {
                        tracing::debug!(
                            node = self.id,
                            term = self.term,
                            from,
                            "ignoring vote request: leader lease"
                        );
                        return;
                    }
                    if !pre_vote {
                        // A follower's timer runs on unless it grants the
                        // vote (Figure 2): a candidate that cannot win must
                        // not hold back, term after term, one that can.
                        let kept = (self.role == Role::Follower).then_some(self.election_deadline);
                        self.become_follower(msg.term, None);
                        if let Some(d) = kept {
                            self.election_deadline = d;
                        }
                    }
                }
                MessageBody::VoteResponse {
                    pre_vote: true,
                    granted: true,
                } => {}
                MessageBody::AppendEntries { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::InstallSnapshot { .. }
                | MessageBody::TimeoutNow => {
                    self.become_follower(msg.term, Some(from));
                }
                _ => self.become_follower(msg.term, None),
            }
        } else if msg.term < self.term {
            match &msg.body {
                MessageBody::AppendEntries { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::InstallSnapshot { .. } => {
                    // Tell the stale leader about the newer term so it steps down.
                    self.send(
                        from,
                        MessageBody::AppendResponse {
                            success: false,
                            index: 0,
                            hint: None,
                        },
                    );
                }
                MessageBody::VoteRequest { pre_vote: true, .. } => {
                    self.send(
                        from,
                        MessageBody::VoteResponse {
                            pre_vote: true,
                            granted: false,
                        },
                    );
                }
                _ => {}
            }
            return;
        }

        match msg.body {
            MessageBody::VoteRequest {
                pre_vote,
                last_log_index,
                last_log_term,
                transfer,
            } => self.on_vote_request(
                from,
                msg.term,
                pre_vote,
                transfer,
                LogId::new(last_log_term, last_log_index),
            ),
            MessageBody::VoteResponse { pre_vote, granted } => {
                self.on_vote_response(from, msg.term, pre_vote, granted)
            }
            MessageBody::AppendEntries {
                prev_log_index,
                prev_log_term,
                entries,
                leader_commit,
            } => self.on_append(from, prev_log_index, prev_log_term, entries, leader_commit),
            MessageBody::AppendResponse {
                success,
                index,
                hint,
            } => self.on_append_response(from, success, index, hint),
            MessageBody::Heartbeat {
                leader_commit,
                round,
                purge_to_index,
            } => self.on_heartbeat(from, leader_commit, round, purge_to_index),
            MessageBody::HeartbeatResponse { round } => self.on_heartbeat_response(from, round),
            MessageBody::InstallSnapshot { meta } => self.on_install_snapshot(from, meta),
            MessageBody::TimeoutNow => self.on_timeout_now(from),
            MessageBody::SnapshotChunk { .. }
            | MessageBody::SnapshotAck { .. }
            | MessageBody::Refused { .. } => {}
        }
    }

    /// True when `take_ready` would return something.
    pub fn has_ready(&self) -> bool {
        self.hard_state_dirty
            || self.need_broadcast
            || self.reads.needs_round()
            || !self.messages.is_empty()
            || !self.persisted_messages.is_empty()
            || self.reads.has_results()
            || (self.log.committed().min(self.log.durable) > self.log.applied
                && !self.awaiting_snapshot)
            || self.log.has_storage_ops()
            || self.pending_purge.is_some()
            || self.pending_snapshot.is_some()
            || self.pending_install.is_some()
            || self.pending_apply_snapshot.is_some()
            || !self.snapshot_sends.is_empty()
    }

    /// Collects everything the outside world must now do. See the module docs.
    pub fn take_ready(&mut self) -> Ready {
        if self.role == Role::Leader && self.awaiting_snapshot && self.snapshot_wanted {
            // Elected without its state, it cannot send a follower the
            // snapshot it needs: it steps aside for one that can.
            tracing::info!(
                node = self.id,
                term = self.term,
                "stepping down: a follower needs a snapshot this node does not have"
            );
            self.snapshot_wanted = false;
            self.become_follower(self.term, None);
        }
        if self.role == Role::Leader {
            if self.need_broadcast {
                self.need_broadcast = false;
                self.broadcast_append();
            }
            if self.reads.needs_round() {
                self.reads.clear_need();
                self.start_read_round();
            }
        } else {
            self.need_broadcast = false;
            self.reads.clear_need();
        }
        let (truncate_from, entries) = self.log.take_storage_ops();
        let hard_state = if self.hard_state_dirty {
            self.hard_state_dirty = false;
            Some(HardState {
                term: self.term,
                vote: self.vote,
            })
        } else {
            None
        };
        let mut messages = std::mem::take(&mut self.messages);
        let mut persisted_messages = std::mem::take(&mut self.persisted_messages);
        if broken(Mutation::VoteBeforeDurable) {
            // Votes and vote requests leave at once.
            let (votes, rest): (Vec<_>, Vec<_>) = persisted_messages.into_iter().partition(|m| {
                matches!(
                    m.body,
                    MessageBody::VoteRequest { .. } | MessageBody::VoteResponse { .. }
                )
            });
            persisted_messages = rest;
            let (votes2, rest2): (Vec<_>, Vec<_>) = messages.into_iter().partition(|m| {
                matches!(
                    m.body,
                    MessageBody::VoteRequest { .. } | MessageBody::VoteResponse { .. }
                )
            });
            messages = rest2;
            if hard_state.is_some() {
                persisted_messages.append(&mut messages);
            }
            messages.extend(votes.into_iter().chain(votes2));
        } else if hard_state.is_some() {
            // Every message may depend on the new term or vote.
            persisted_messages.append(&mut messages);
        }
        let committed = if self.awaiting_snapshot {
            Vec::new()
        } else {
            self.log.take_committed(self.cfg.max_committed_per_ready)
        };
        Ready {
            hard_state,
            truncate_from,
            entries,
            messages,
            persisted_messages,
            committed,
            reads: self.reads.take_results(),
            membership: match self.pending_purge {
                Some(_) => self.members.take_new_base(),
                None => None,
            },
            purge_to: self.pending_purge.take(),
            snapshot: self.pending_snapshot.take(),
            install: self.pending_install.take(),
            apply_snapshot: self.pending_apply_snapshot.take(),
            send_snapshots: std::mem::take(&mut self.snapshot_sends),
        }
    }

    // ----- roles -----------------------------------------------------------

    fn reset_election_timer(&mut self) {
        let min = self.cfg.election_timeout_min.as_micros() as u64;
        let max = self.cfg.election_timeout_max.as_micros() as u64;
        self.election_deadline =
            self.now + Duration::from_micros(self.rng.u64(min..max.max(min + 1)));
        if self.awaiting_snapshot {
            // A node without its state campaigns last: it cannot serve.
            self.election_deadline += self.cfg.election_timeout_max * 2;
        }
    }

    /// The commit index is at an entry of this term: a new leader knows
    /// what is committed only from then on (its no-op committed).
    fn committed_own_term(&self) -> bool {
        self.log.term(self.log.committed()) == Some(self.term)
    }

    pub(super) fn in_lease(&self) -> bool {
        if !self.cfg.check_quorum {
            return false;
        }
        if self.now < self.startup_lease_until {
            return true;
        }
        if self.role == Role::Leader {
            return true;
        }
        match (self.leader, self.last_leader_contact) {
            (Some(_), Some(t)) => self.now < t + self.cfg.election_timeout_min,
            // Under lease reads the contact alone counts: a stray message
            // with a higher term clears the leader, not the promise this
            // member made by acknowledging its heartbeat.
            (None, Some(t)) if self.cfg.read_policy == crate::config::ReadPolicy::Lease => {
                self.now < t + self.cfg.election_timeout_min
            }
            _ => false,
        }
    }

    fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        if self.role == Role::Leader && term == self.term && self.commit_notice.is_some() {
            // Stepping aside in its own term (removed, handing over): the
            // followers still learn what it committed.
            self.notify_commit();
        }
        if term > self.term {
            self.term = term;
            self.vote = None;
            self.hard_state_dirty = true;
        }
        if self.role == Role::Leader {
            self.lease_until = Duration::ZERO;
            self.reads.fail_all();
            self.progress.clear();
            self.learned.clear();
        }
        self.commit_notice = None;
        self.transfer = None;
        if self.role != Role::Follower || self.leader != leader {
            tracing::debug!(
                node = self.id,
                term = self.term,
                ?leader,
                "becoming follower"
            );
        }
        self.role = Role::Follower;
        self.leader = leader;
        self.votes.clear();
        self.reset_election_timer();
    }

    fn campaign(&mut self, pre_vote: bool) {
        self.campaign_with(pre_vote, false)
    }

    /// Starts an election (or a pre-vote); `transfer` when the leader
    /// handed over (`TimeoutNow`).
    fn campaign_with(&mut self, pre_vote: bool, transfer: bool) {
        self.votes.clear();
        self.leader = None;
        self.reset_election_timer();
        let campaign_term = if pre_vote {
            self.role = Role::PreCandidate;
            match self.term.checked_add(1) {
                Some(t) => t,
                None => {
                    tracing::error!(node = self.id, "term space exhausted; cannot campaign");
                    self.role = Role::Follower;
                    return;
                }
            }
        } else {
            let Some(t) = self.term.checked_add(1) else {
                tracing::error!(node = self.id, "term space exhausted; cannot campaign");
                self.role = Role::Follower;
                return;
            };
            if self.role == Role::Leader {
                self.reads.fail_all();
                self.progress.clear();
                self.learned.clear();
                self.transfer = None;
            }
            self.role = Role::Candidate;
            debug_assert!(t > self.term, "terms never decrease");
            self.term = t;
            self.vote = Some(self.id);
            self.hard_state_dirty = true;
            t
        };
        tracing::debug!(
            node = self.id,
            term = campaign_term,
            pre_vote,
            "starting election"
        );
        self.votes.insert(self.id, true);
        let last = self.log.last_log_id();
        let peers: Vec<NodeId> = self.peers().collect();
        for p in peers {
            self.messages.push(Message {
                from: self.id,
                to: p,
                term: campaign_term,
                incarnation: self.incarnation,
                body: MessageBody::VoteRequest {
                    pre_vote,
                    last_log_index: last.index,
                    last_log_term: last.term,
                    transfer,
                },
            });
        }
        self.tally_votes();
    }

    fn tally_votes(&mut self) {
        let granted: Vec<NodeId> = self
            .votes
            .iter()
            .filter(|(_, &g)| g)
            .map(|(&id, _)| id)
            .collect();
        let rejected: Vec<NodeId> = self
            .votes
            .iter()
            .filter(|(_, &g)| !g)
            .map(|(&id, _)| id)
            .collect();
        if self.members.current().is_quorum(&granted) {
            match self.role {
                Role::PreCandidate => self.campaign(false),
                Role::Candidate => self.become_leader(),
                _ => {}
            }
        } else if self.members.current().is_quorum(&rejected) {
            self.become_follower(self.term, None);
        }
    }

    fn become_leader(&mut self) {
        tracing::info!(node = self.id, term = self.term, "became leader");
        self.role = Role::Leader;
        self.leader = Some(self.id);
        self.lease_until = Duration::ZERO;
        self.reads.forget_rounds();
        self.votes.clear();
        let next = self.log.last_index() + 1;
        let now = self.now;
        self.progress = self
            .members
            .current()
            .all_members()
            .into_iter()
            .filter(|&id| id != self.id)
            .map(|id| (id, Progress::new(next, now)))
            .collect();
        self.heartbeat_deadline = now + self.cfg.heartbeat_interval;
        self.quorum_deadline = now + self.cfg.election_timeout_min;
        self.commit_notice = None;
        if !broken(Mutation::CommitOldTerm) {
            self.append_local(EntryPayload::Blank);
        }
        self.need_broadcast = true;
        self.maybe_commit();
    }

    fn peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.members
            .current()
            .all_voters()
            .into_iter()
            .filter(move |&id| id != self.id)
    }

    fn append_local(&mut self, payload: EntryPayload) -> LogId {
        let id = LogId::new(self.term, self.log.last_index() + 1);
        self.push_entry(Entry {
            term: id.term,
            index: id.index,
            payload,
        });
        id
    }

    /// Appends to the log; a membership entry takes effect at once (§4.1).
    fn push_entry(&mut self, e: Entry) {
        self.members.appended(&e);
        self.log.push(e);
    }

    /// Removes every entry from `index` on; a membership entry removed with
    /// them stops counting, and the one before it is in force again.
    fn truncate_log(&mut self, index: LogIndex) {
        self.log.truncate_from(index);
        if self.members.truncated(index) {
            tracing::info!(node = self.id, term = self.term, members = ?self.members.current().voters, "membership entry truncated; reverted");
        }
    }

    fn send(&mut self, to: NodeId, body: MessageBody) {
        self.messages.push(Message {
            from: self.id,
            to,
            term: self.term,
            incarnation: self.incarnation,
            body,
        });
    }

    fn send_persisted(&mut self, to: NodeId, term: Term, body: MessageBody) {
        self.persisted_messages.push(Message {
            from: self.id,
            to,
            term,
            incarnation: self.incarnation,
            body,
        });
    }
}
