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

mod interface;
mod log;
mod membership;
mod progress;
mod read_queue;

#[cfg(test)]
mod tests;

use crate::config::Config;
use crate::message::{Message, MessageBody, RejectHint};
use crate::mutation::{broken, Mutation};
use crate::types::{
    Entry, EntryPayload, HardState, LogId, LogIndex, Membership, NodeId, Role, Term,
};
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
    last_leader_contact: Option<Duration>,

    votes: BTreeMap<NodeId, bool>,
    progress: BTreeMap<NodeId, Progress>,
    reads: ReadQueue,

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
    /// How often a follower needed entries that were compacted away (tests:
    /// must stay 0, there are no snapshots to send instead).
    #[cfg(test)]
    pub(crate) below_compaction: u64,
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
        if applied > last {
            return Err(EngineError::InvalidState(format!(
                "application applied index {applied} is past the last log index {last}"
            )));
        }
        if applied < purged.index {
            return Err(EngineError::InvalidState(format!(
                "application applied index {applied} is below the compaction point {}",
                purged.index
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
            last_leader_contact: None,
            votes: BTreeMap::new(),
            progress: BTreeMap::new(),
            reads: ReadQueue::default(),
            need_broadcast: false,
            hard_state_dirty: false,
            messages: Vec::new(),
            persisted_messages: Vec::new(),
            released: purged.index,
            peer_safe: purged.index,
            pending_purge: None,
            #[cfg(test)]
            below_compaction: 0,
            cfg,
        };
        e.reset_election_timer();
        Ok(e)
    }

    // ----- observers -------------------------------------------------------

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
    /// The membership in force.
    pub fn membership(&self) -> &Membership {
        self.members.current()
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
            Role::Leader if self.cfg.check_quorum => {
                self.heartbeat_deadline.min(self.quorum_deadline)
            }
            Role::Leader => self.heartbeat_deadline,
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
        self.propose_payload(EntryPayload::Command(command))
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
            .map(|c| self.append_local(EntryPayload::Command(c)))
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
    pub fn read_index(&mut self, ctx: u64) -> Result<(), NotLeader> {
        if self.role != Role::Leader {
            return Err(NotLeader {
                leader: self.leader,
            });
        }
        // A new leader does not know the commit index until its no-op commits.
        let committed = self.log.committed();
        let known = (self.log.term(committed) == Some(self.term)).then_some(committed);
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
        if msg.to != self.id || msg.from == self.id {
            tracing::warn!(
                node = self.id,
                from = msg.from,
                to = msg.to,
                "dropping misaddressed message"
            );
            return;
        }
        if !self.members.current().contains(msg.from) {
            tracing::warn!(
                node = self.id,
                from = msg.from,
                "dropping message from a non-member"
            );
            return;
        }
        let from = msg.from;
        if msg.term > self.term {
            match &msg.body {
                MessageBody::VoteRequest { pre_vote, .. } => {
                    if self.in_lease() {
                        tracing::debug!(
                            node = self.id,
                            term = self.term,
                            from,
                            "ignoring vote request: leader lease"
                        );
                        return;
                    }
                    if !pre_vote {
                        self.become_follower(msg.term, None);
                    }
                }
                MessageBody::VoteResponse {
                    pre_vote: true,
                    granted: true,
                } => {}
                MessageBody::AppendEntries { .. } | MessageBody::Heartbeat { .. } => {
                    self.become_follower(msg.term, Some(from));
                }
                _ => self.become_follower(msg.term, None),
            }
        } else if msg.term < self.term {
            match &msg.body {
                MessageBody::AppendEntries { .. } | MessageBody::Heartbeat { .. } => {
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
            } => self.on_vote_request(
                from,
                msg.term,
                pre_vote,
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
            || self.log.committed().min(self.log.durable) > self.log.applied
            || self.log.has_storage_ops()
            || self.pending_purge.is_some()
    }

    /// Collects everything the outside world must now do. See the module docs.
    pub fn take_ready(&mut self) -> Ready {
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
        let committed = self.log.take_committed(self.cfg.max_committed_per_ready);
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
        }
    }

    // ----- roles -----------------------------------------------------------

    fn reset_election_timer(&mut self) {
        let min = self.cfg.election_timeout_min.as_micros() as u64;
        let max = self.cfg.election_timeout_max.as_micros() as u64;
        self.election_deadline =
            self.now + Duration::from_micros(self.rng.u64(min..max.max(min + 1)));
    }

    fn in_lease(&self) -> bool {
        if !self.cfg.check_quorum {
            return false;
        }
        if self.role == Role::Leader {
            return true;
        }
        match (self.leader, self.last_leader_contact) {
            (Some(_), Some(t)) => self.now < t + self.cfg.election_timeout_min,
            _ => false,
        }
    }

    fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        if term > self.term {
            self.term = term;
            self.vote = None;
            self.hard_state_dirty = true;
        }
        if self.role == Role::Leader {
            self.reads.fail_all();
            self.progress.clear();
        }
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
                body: MessageBody::VoteRequest {
                    pre_vote,
                    last_log_index: last.index,
                    last_log_term: last.term,
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
        self.votes.clear();
        let next = self.log.last_index() + 1;
        let now = self.now;
        self.progress = self
            .members
            .current()
            .voters
            .iter()
            .filter(|&&id| id != self.id)
            .map(|&id| (id, Progress::new(next, now)))
            .collect();
        self.heartbeat_deadline = now + self.cfg.heartbeat_interval;
        self.quorum_deadline = now + self.cfg.election_timeout_min;
        if !broken(Mutation::CommitOldTerm) {
            self.append_local(EntryPayload::Blank);
        }
        self.need_broadcast = true;
        self.maybe_commit();
    }

    fn peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.members
            .current()
            .voters
            .iter()
            .copied()
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
            body,
        });
    }

    fn send_persisted(&mut self, to: NodeId, term: Term, body: MessageBody) {
        self.persisted_messages.push(Message {
            from: self.id,
            to,
            term,
            body,
        });
    }

    // ----- elections (§5.2, §5.4.1) -----------------------------------------

    fn on_vote_request(&mut self, from: NodeId, msg_term: Term, pre_vote: bool, cand_last: LogId) {
        let up_to_date =
            cand_last >= self.log.last_log_id() || broken(Mutation::VoteIgnoresUpToDate);
        let granted = if pre_vote {
            msg_term > self.term && up_to_date
        } else {
            let free = self.vote == Some(from)
                || (self.vote.is_none() && self.leader.is_none())
                || (broken(Mutation::DoubleVote) && self.role == Role::Follower);
            free && up_to_date
        };
        if granted && !pre_vote {
            self.vote = Some(from);
            self.hard_state_dirty = true;
            self.reset_election_timer();
        }
        tracing::debug!(
            node = self.id,
            term = self.term,
            from,
            pre_vote,
            granted,
            "vote request"
        );
        let reply_term = if pre_vote && granted {
            msg_term
        } else {
            self.term
        };
        self.send_persisted(
            from,
            reply_term,
            MessageBody::VoteResponse { pre_vote, granted },
        );
    }

    fn on_vote_response(&mut self, from: NodeId, msg_term: Term, pre_vote: bool, granted: bool) {
        let counts = match self.role {
            // A pre-vote is granted at the proposed term and refused at the voter's own.
            Role::PreCandidate if pre_vote => {
                self.term.checked_add(1) == Some(msg_term) || (!granted && msg_term == self.term)
            }
            Role::Candidate if !pre_vote => msg_term == self.term,
            _ => false,
        };
        if !counts {
            return;
        }
        self.votes.insert(from, granted);
        self.tally_votes();
    }

    // ----- replication, follower side (§5.3) ---------------------------------

    fn accept_leader(&mut self, from: NodeId) -> bool {
        if self.role == Role::Leader {
            tracing::error!(
                node = self.id,
                term = self.term,
                from,
                "another leader in my term; ignoring it"
            );
            return false;
        }
        if self.role != Role::Follower || self.leader != Some(from) {
            self.become_follower(self.term, Some(from));
        }
        self.last_leader_contact = Some(self.now);
        self.reset_election_timer();
        true
    }

    fn on_append(
        &mut self,
        from: NodeId,
        prev_index: LogIndex,
        prev_term: Term,
        entries: Vec<Entry>,
        leader_commit: LogIndex,
    ) {
        if !self.accept_leader(from) {
            return;
        }
        // Malformed input: entries must be contiguous after prev, terms ordered and not above the leader's.
        let mut expect = prev_index;
        let mut last_term = prev_term;
        for e in &entries {
            let Some(next) = expect.checked_add(1) else {
                tracing::warn!(
                    node = self.id,
                    from,
                    "dropping AppendEntries: index overflow"
                );
                return;
            };
            if e.index != next || e.term < last_term || e.term > self.term {
                tracing::warn!(node = self.id, from, "dropping malformed AppendEntries");
                return;
            }
            expect = next;
            last_term = e.term;
        }
        let term = self.term;
        if prev_index < self.log.committed() {
            // Everything up to our commit index is known to match any leader's log.
            let index = self.log.committed();
            self.send_persisted(
                from,
                term,
                MessageBody::AppendResponse {
                    success: true,
                    index,
                    hint: None,
                },
            );
            return;
        }
        if self.log.term(prev_index) != Some(prev_term) {
            let last = self.log.last_index();
            let hint = if prev_index > last {
                RejectHint {
                    conflict_term: None,
                    first_index: last + 1,
                }
            } else {
                RejectHint {
                    conflict_term: self.log.term(prev_index),
                    first_index: self
                        .log
                        .first_index_of_term_run(prev_index)
                        .max(self.log.committed() + 1),
                }
            };
            tracing::debug!(
                node = self.id,
                term,
                from,
                prev_index,
                "rejecting AppendEntries"
            );
            self.send_persisted(
                from,
                term,
                MessageBody::AppendResponse {
                    success: false,
                    index: prev_index,
                    hint: Some(hint),
                },
            );
            return;
        }
        // The highest index known to match the leader's log.
        let mut last_new = prev_index;
        for e in entries {
            let index = e.index;
            match self.log.term(index) {
                Some(t) if t == e.term => {
                    last_new = index;
                    continue;
                }
                Some(_) => {
                    if index <= self.log.committed() {
                        tracing::error!(
                            node = self.id,
                            term,
                            from,
                            index,
                            "leader conflicts with a committed entry; dropping"
                        );
                        return;
                    }
                    self.truncate_log(index);
                }
                None => {}
            }
            // Back-pressure: while committed entries wait for the application
            // beyond the limit, take only what fits; the leader sends the
            // rest later. Uncommitted bytes do not count here: only commit
            // progress frees them (the leader bounds them with `Busy`).
            let pending = self.log.committed_unapplied_bytes();
            if pending > 0 && pending + e.size_bound() as u64 > self.cfg.max_unapplied_bytes {
                tracing::debug!(
                    node = self.id,
                    term,
                    index,
                    pending,
                    "application is behind; accepting part of an AppendEntries"
                );
                break;
            }
            self.push_entry(e);
            last_new = index;
        }
        if broken(Mutation::TruncateAfterAppend) && last_new < self.log.last_index() {
            // The classic mistake: drop what follows even though it did not conflict.
            self.truncate_log(last_new + 1);
        }
        if leader_commit > self.log.committed() {
            let upto = if broken(Mutation::CommitPastVerified) {
                leader_commit
            } else {
                leader_commit.min(last_new)
            };
            self.log.commit_to(upto);
        }
        let ack = MessageBody::AppendResponse {
            success: true,
            index: last_new,
            hint: None,
        };
        if broken(Mutation::AckBeforeDurable) {
            self.send(from, ack);
        } else {
            self.send_persisted(from, term, ack);
        }
    }

    fn on_heartbeat(
        &mut self,
        from: NodeId,
        leader_commit: LogIndex,
        round: u64,
        purge_to_index: LogIndex,
    ) {
        if !self.accept_leader(from) {
            return;
        }
        // The leader caps leader_commit at our match index, so these entries are ours.
        let c = leader_commit.min(self.log.last_index());
        if c > self.log.committed() {
            self.log.commit_to(c);
        }
        self.peer_safe = self.peer_safe.max(purge_to_index);
        self.maybe_compact();
        self.send(from, MessageBody::HeartbeatResponse { round });
    }

    // ----- replication, leader side -----------------------------------------

    fn on_append_response(
        &mut self,
        from: NodeId,
        success: bool,
        index: LogIndex,
        hint: Option<RejectHint>,
    ) {
        if self.role != Role::Leader {
            return;
        }
        let last = self.log.last_index();
        let now = self.now;
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        pr.recent_active = true;
        if index > last {
            tracing::warn!(
                node = self.id,
                from,
                index,
                "dropping AppendResponse past our log end"
            );
            return;
        }
        if success {
            // A late duplicate tells nothing new; reacting to it (resending)
            // would turn duplicates into storms.
            let duplicate = match pr.state {
                _ if pr.backoff => index <= pr.match_index,
                ReplState::Replicate => index <= pr.match_index,
                ReplState::Probe => index < pr.match_index,
            };
            if duplicate {
                return;
            }
            // The follower took only part of what was sent (or nothing): its
            // application is behind (back-pressure). Wait for the next
            // heartbeat before offering more, instead of resending at once.
            let partial = match pr.state {
                ReplState::Probe => pr.probe_last.is_some_and(|l| index < l),
                ReplState::Replicate => pr
                    .inflight
                    .iter()
                    .find(|&&l| l >= index)
                    .is_some_and(|&l| index < l),
            };
            let moved = pr.ack(index, now);
            if partial {
                pr.become_probe();
                pr.paused = true;
                pr.probe_last = None;
                pr.backoff = true;
                if moved {
                    self.maybe_commit();
                }
                return;
            }
            if pr.state == ReplState::Probe {
                pr.become_replicate();
            }
            if pr.inflight.is_empty() {
                pr.last_progress = now;
            }
            if moved {
                self.maybe_commit();
            }
            self.fill_pipeline(from);
        } else {
            let stale = match pr.state {
                ReplState::Replicate => index <= pr.match_index,
                ReplState::Probe => index + 1 != pr.next_index,
            };
            if stale {
                return;
            }
            let mut next = match hint {
                Some(RejectHint {
                    conflict_term: Some(t),
                    first_index,
                }) => match self.log.last_index_of_term(t, index) {
                    Some(i) => i + 1,
                    None => first_index,
                },
                Some(RejectHint {
                    conflict_term: None,
                    first_index,
                }) => first_index,
                None => index,
            };
            // Every member holds the log up to the compaction point, so a
            // probe never needs to go below it.
            next = next
                .min(index)
                .max(pr.match_index + 1)
                .max(self.log.purged().index + 1);
            pr.become_probe();
            pr.next_index = next;
            pr.check();
            tracing::debug!(
                node = self.id,
                term = self.term,
                from,
                next,
                "follower rejected; backing off"
            );
            self.send_append(from, false);
        }
    }

    fn on_heartbeat_response(&mut self, from: NodeId, round: u64) {
        if self.role != Role::Leader {
            return;
        }
        let last = self.log.last_index();
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        pr.recent_active = true;
        let latest = self.reads.round();
        let round = if broken(Mutation::AnyHeartbeatConfirmsRead) {
            latest
        } else {
            round
        };
        pr.round_acked = pr.round_acked.max(round.min(latest));
        let lagging = pr.match_index < last;
        if pr.state == ReplState::Probe {
            pr.paused = false;
            pr.backoff = false;
        }
        self.check_reads();
        if lagging {
            self.fill_pipeline(from);
        }
    }

    fn on_heartbeat_timer(&mut self) {
        let now = self.now;
        let stall = self.cfg.election_timeout_min;
        for pr in self.progress.values_mut() {
            match pr.state {
                ReplState::Probe => pr.paused = false,
                ReplState::Replicate => {
                    if !pr.inflight.is_empty() && now >= pr.last_progress + stall {
                        // Appends or their answers were lost: find the match point again.
                        pr.become_probe();
                        pr.last_progress = now;
                    }
                }
            }
        }
        self.reads.next_round();
        self.broadcast_heartbeat();
        self.maybe_compact();
    }

    fn broadcast_heartbeat(&mut self) {
        let peers: Vec<(NodeId, LogIndex)> = self
            .progress
            .iter()
            .map(|(&id, p)| (id, p.match_index))
            .collect();
        let purge_to_index = self.safe_compact_index();
        for (p, m) in peers {
            let leader_commit = if broken(Mutation::HeartbeatCommitUncapped) {
                self.log.committed()
            } else {
                self.log.committed().min(m)
            };
            let round = self.reads.round();
            self.send(
                p,
                MessageBody::Heartbeat {
                    leader_commit,
                    round,
                    purge_to_index,
                },
            );
        }
    }

    fn broadcast_append(&mut self) {
        let peers: Vec<NodeId> = self.progress.keys().copied().collect();
        for p in peers {
            self.fill_pipeline(p);
        }
    }

    /// Sends what the follower is missing, as flow control allows. With
    /// `commit_only`, an up-to-date follower still gets an empty append that
    /// carries the new commit index.
    fn send_append(&mut self, to: NodeId, commit_only: bool) -> bool {
        let last = self.log.last_index();
        let committed = self.log.committed();
        let Some(pr) = self.progress.get_mut(&to) else {
            return false;
        };
        match pr.state {
            ReplState::Probe if pr.paused => return false,
            ReplState::Replicate if pr.inflight.len() >= self.cfg.max_inflight => return false,
            ReplState::Replicate if pr.next_index > last && !commit_only => return false,
            _ => {}
        }
        let prev = pr.next_index - 1;
        let Some(prev_term) = self.log.term(prev) else {
            #[cfg(test)]
            {
                self.below_compaction += 1;
            }
            tracing::warn!(
                node = self.id,
                to,
                prev,
                "follower needs entries below the compaction point"
            );
            return false;
        };
        let entries = self.log.slice(
            pr.next_index,
            self.cfg.max_entries_per_msg,
            self.cfg.max_bytes_per_msg,
        );
        match pr.state {
            ReplState::Probe => {
                pr.paused = true;
                pr.probe_last = entries.last().map(|e| e.index);
            }
            ReplState::Replicate => {
                if let Some(e) = entries.last() {
                    if pr.inflight.is_empty() {
                        pr.last_progress = self.now;
                    }
                    pr.next_index = e.index + 1;
                    pr.check();
                    pr.inflight.push_back(e.index);
                }
            }
        }
        self.send(
            to,
            MessageBody::AppendEntries {
                prev_log_index: prev,
                prev_log_term: prev_term,
                entries,
                leader_commit: committed,
            },
        );
        true
    }

    // ----- log compaction ----------------------------------------------------

    /// The highest index every member is known to hold: what the leader has
    /// seen acknowledged by all followers (and holds durably itself), or what
    /// a leader said so earlier.
    fn safe_compact_index(&self) -> LogIndex {
        let mut safe = self.peer_safe;
        if broken(Mutation::CompactIgnoringPeers) && self.role == Role::Leader {
            return self.log.durable;
        }
        if self.role == Role::Leader {
            let all = self
                .progress
                .values()
                .map(|p| p.match_index)
                .min()
                .unwrap_or(LogIndex::MAX)
                .min(self.log.durable);
            safe = safe.max(all);
        }
        safe
    }

    /// Drops log entries that every member holds, this node has applied and
    /// the application has stored, once there are `compact_threshold` of them.
    /// Without snapshots, nothing a member might still need is dropped: a
    /// member that is down holds the compaction back until it is back.
    fn maybe_compact(&mut self) {
        let released = if broken(Mutation::CompactIgnoringReleased) {
            LogIndex::MAX
        } else {
            self.released
        };
        let upto = self
            .safe_compact_index()
            .min(released)
            .min(self.log.applied)
            .min(self.log.delivered)
            .min(self.log.durable);
        let from = self.log.purged().index;
        if upto < from.saturating_add(self.cfg.compact_threshold) {
            return;
        }
        if let Some(id) = self.log.compact(upto) {
            tracing::debug!(node = self.id, upto = id.index, "log compacted");
            self.pending_purge = Some(id);
            // Membership entries purged: the latest of them becomes the base.
            self.members.purged(id.index);
        }
    }

    /// The application has durably stored the effects of every entry up to
    /// `index` (for example, flushed its state machine): the log no longer has
    /// to keep them for a restart. Entries are dropped once, in addition, every
    /// member holds them (`Ready::purge_to` tells the store).
    pub fn release(&mut self, index: LogIndex) {
        self.released = self.released.max(index.min(self.log.delivered));
        self.maybe_compact();
    }

    /// Sends appends to `to` until its pipeline is full or it has everything.
    fn fill_pipeline(&mut self, to: NodeId) {
        while self.send_append(to, false) {}
    }

    /// Commits the highest index held by a majority, only if it is from the
    /// current term (§5.4.2).
    fn maybe_commit(&mut self) {
        let durable = if broken(Mutation::LeaderCountsUnsynced) {
            self.log.last_index()
        } else {
            self.log.durable
        };
        let id = self.id;
        let progress = &self.progress;
        let n = self.members.current().committed_value(|v| {
            if v == id {
                durable
            } else {
                progress.get(&v).map_or(0, |p| p.match_index)
            }
        });
        if n <= self.log.committed() {
            return;
        }
        if self.log.term(n) != Some(self.term) && !broken(Mutation::CommitOldTerm) {
            return;
        }
        self.log.commit_to(n);
        // Followers learn the new commit index promptly.
        let peers: Vec<NodeId> = self.progress.keys().copied().collect();
        for p in peers {
            self.send_append(p, true);
        }
        if self.log.term(n) == Some(self.term) && self.reads.leader_committed(n) {
            self.check_reads();
        }
    }

    // ----- linearizable reads ----------------------------------------------

    fn start_read_round(&mut self) {
        if self.reads.all_in_round() {
            return;
        }
        self.reads.next_round();
        self.broadcast_heartbeat();
        self.check_reads();
    }

    /// Answers the reads whose round a quorum has confirmed.
    fn check_reads(&mut self) {
        if self.reads.is_empty() {
            return;
        }
        let id = self.id;
        let progress = &self.progress;
        let round = self.reads.round();
        // The highest round a majority has confirmed (this node confirms every round).
        let confirmed = self.members.current().committed_value(|v| {
            if v == id {
                round
            } else {
                progress.get(&v).map_or(0, |p| p.round_acked)
            }
        });
        let single = (self.members.current().voters.len() == 1
            && self.members.current().contains(id))
            || broken(Mutation::ReadWithoutQuorum);
        self.reads.confirm(confirmed, single);
    }
}
