//! Membership changes (thesis §4.3, joint consensus), learners, storage
//! identities and leadership transfer (thesis §3.10): what the leader does
//! to change who is in the cluster and who leads it.
//!
//! A change is proposed as one entry. When it changes the voters, that
//! entry is a joint configuration (`Membership::outgoing` holds the old
//! voters) and decisions need a majority of each side; once it commits,
//! the leader appends the final configuration by itself. One change is in
//! flight at a time. A leader that is not a voter of the final
//! configuration hands over and steps down once that configuration commits.

use super::*;

/// One step of a membership change; several steps make one change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeStep {
    /// A new member that receives the log (and snapshots) but does not
    /// vote until promoted.
    AddLearner {
        /// Its id; must not be a member already.
        id: NodeId,
        /// Its address and storage identity.
        member: Member,
    },
    /// A new voter right away (it may hold commits back until it catches
    /// up: adding a learner and promoting it is the gentler way).
    AddVoter {
        /// Its id; must not be a member already.
        id: NodeId,
        /// Its address and storage identity.
        member: Member,
    },
    /// A learner becomes a voter; refused until it has caught up.
    Promote(NodeId),
    /// A voter becomes a learner.
    Demote(NodeId),
    /// A member leaves.
    Remove(NodeId),
    /// Records (or changes) where a member listens.
    SetAddr {
        /// The member.
        id: NodeId,
        /// Its address.
        addr: String,
    },
}

/// Why a membership change was refused. Nothing was appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    /// This node does not lead.
    #[error(transparent)]
    NotLeader(#[from] NotLeader),
    /// Another change is in flight (joint, or not committed yet), or this
    /// leader has not yet committed an entry of its own term; retry.
    #[error("a membership change is in flight (entry {index}); retry once it commits")]
    InProgress {
        /// The latest membership entry.
        index: LogIndex,
    },
    /// Leadership is being handed over.
    #[error("leadership is being transferred to node {to}; retry on the new leader")]
    Transferring {
        /// The member taking over.
        to: NodeId,
    },
    /// The learner is behind the commit index; promote it once it caught up.
    #[error(
        "node {id} has not caught up (holds up to {matched}, commit index {committed}); retry"
    )]
    NotCaughtUp {
        /// The learner.
        id: NodeId,
        /// What it is known to hold.
        matched: LogIndex,
        /// The leader's commit index.
        committed: LogIndex,
    },
    /// The change makes no sense for the configuration in force.
    #[error("invalid membership change: {0}")]
    Invalid(String),
}

/// Why a leadership transfer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    /// This node does not lead.
    #[error(transparent)]
    NotLeader(#[from] NotLeader),
    /// Another transfer is running.
    #[error("leadership is already being transferred to node {to}")]
    InProgress {
        /// Its target.
        to: NodeId,
    },
    /// No such voter to hand over to.
    #[error("cannot transfer leadership: {0}")]
    Invalid(String),
}

/// A leadership transfer under way.
#[derive(Debug, Clone, Copy)]
pub(super) struct Transfer {
    pub(super) to: NodeId,
    /// Given up at this time (an election timeout after it began).
    pub(super) deadline: Duration,
    /// `TimeoutNow` went out.
    pub(super) sent: bool,
}

impl Engine {
    /// The index of the latest membership entry, when it is not committed
    /// yet or is joint (a change is in flight).
    pub fn change_in_flight(&self) -> Option<LogIndex> {
        let index = self.members.latest_index();
        (self.members.current().is_joint() || index > self.log.committed()).then_some(index)
    }

    /// The leadership transfer under way, if any: its target.
    pub fn transferring_to(&self) -> Option<NodeId> {
        self.transfer.map(|t| t.to)
    }

    /// Proposes a membership change made of `steps`, applied together. A
    /// change of the voters goes through a joint configuration, which the
    /// leader leaves by itself once it commits. Returns the id of the entry.
    pub fn change_membership(&mut self, steps: &[ChangeStep]) -> Result<LogId, ChangeError> {
        if self.role != Role::Leader {
            return Err(NotLeader {
                leader: self.leader,
            }
            .into());
        }
        if let Some(t) = self.transfer {
            return Err(ChangeError::Transferring { to: t.to });
        }
        // A new leader commits an entry of its own term before it changes
        // the configuration (thesis §4.1, the single-server bug's fix).
        let settled = self.committed_own_term();
        if let Some(index) = self.change_in_flight() {
            if !broken(Mutation::TwoChangesInFlight) {
                return Err(ChangeError::InProgress { index });
            }
        }
        if !settled {
            return Err(ChangeError::InProgress {
                index: self.members.latest_index(),
            });
        }
        let current = self.members.current().clone();
        let mut next = current.clone();
        // A joint configuration only with the mutation: finish it first.
        next.outgoing.clear();
        let mut removed = BTreeSet::new();
        for step in steps {
            match step {
                ChangeStep::AddLearner { id, member } | ChangeStep::AddVoter { id, member } => {
                    if next.is_member(*id) {
                        return Err(ChangeError::Invalid(format!(
                            "node {id} is a member already (remove it first)"
                        )));
                    }
                    if removed.contains(id) {
                        // During the joint phase it would still count among
                        // the old voters, under a new identity that may
                        // vote again in a term the old one voted in.
                        return Err(ChangeError::Invalid(format!(
                            "node {id} is removed and added in one change: remove it first, then add it back"
                        )));
                    }
                    if matches!(step, ChangeStep::AddVoter { .. }) {
                        next.voters.insert(*id);
                    } else {
                        next.learners.insert(*id);
                    }
                    next.nodes.insert(*id, member.clone());
                }
                ChangeStep::Promote(id) => {
                    if !next.learners.remove(id) {
                        return Err(ChangeError::Invalid(format!("node {id} is not a learner")));
                    }
                    if !current.voters.contains(id) {
                        let matched = self.progress.get(id).map_or(0, |p| p.match_index);
                        let committed = self.log.committed();
                        let margin = self.cfg.max_entries_per_msg as u64;
                        // It must have answered at least once (a log of a
                        // few entries is within any margin of an empty one).
                        if matched == 0 || matched.saturating_add(margin) < committed {
                            return Err(ChangeError::NotCaughtUp {
                                id: *id,
                                matched,
                                committed,
                            });
                        }
                    }
                    next.voters.insert(*id);
                }
                ChangeStep::Demote(id) => {
                    if !next.voters.remove(id) {
                        return Err(ChangeError::Invalid(format!("node {id} is not a voter")));
                    }
                    next.learners.insert(*id);
                }
                ChangeStep::SetAddr { id, addr } => {
                    if !next.is_member(*id) {
                        return Err(ChangeError::Invalid(format!("node {id} is not a member")));
                    }
                    next.nodes.entry(*id).or_default().addr = addr.clone();
                }
                ChangeStep::Remove(id) => {
                    if !next.is_member(*id) {
                        return Err(ChangeError::Invalid(format!("node {id} is not a member")));
                    }
                    next.voters.remove(id);
                    next.learners.remove(id);
                    next.nodes.remove(id);
                    removed.insert(*id);
                }
            }
        }
        if next.voters.is_empty() {
            return Err(ChangeError::Invalid(
                "the change leaves no voter; add one first".into(),
            ));
        }
        if next == current {
            return Err(ChangeError::Invalid("the change changes nothing".into()));
        }
        if next.voters != current.voters {
            // Joint consensus: the old voters must agree as well.
            next.outgoing = current.voters.clone();
        }
        if let Err(e) = next.validate() {
            return Err(ChangeError::Invalid(e));
        }
        tracing::info!(node = self.id, term = self.term, from = %current, to = %next, "proposing a membership change");
        let id = self.append_local(EntryPayload::Membership(next));
        self.sync_progress();
        self.need_broadcast = true;
        self.maybe_commit();
        Ok(id)
    }

    /// The leader's progress map follows the configuration in force: one
    /// entry per other member, voters and learners alike.
    pub(super) fn sync_progress(&mut self) {
        if self.role != Role::Leader {
            return;
        }
        let members = self.members.current().all_members();
        self.progress.retain(|id, _| members.contains(id));
        let next = self.log.last_index() + 1;
        let now = self.now;
        for id in members {
            if id != self.id {
                self.progress
                    .entry(id)
                    .or_insert_with(|| Progress::new(next, now));
            }
        }
        if let Some(t) = self.transfer {
            if !self.members.current().voters.contains(&t.to) {
                self.transfer = None;
            }
        }
    }

    /// After the commit index moved: a committed joint configuration is
    /// left (the final one appended); a leader that is no voter of a
    /// committed configuration hands over and steps down; identities
    /// learned from members are recorded.
    pub(super) fn after_commit(&mut self) {
        if self.role != Role::Leader || self.members.latest_index() > self.log.committed() {
            return;
        }
        let current = self.members.current().clone();
        if current.is_joint() {
            let mut next = current;
            next.outgoing.clear();
            let keep = next.all_members();
            next.nodes.retain(|id, _| keep.contains(id));
            tracing::info!(node = self.id, term = self.term, to = %next, "joint configuration committed; leaving it");
            self.append_local(EntryPayload::Membership(next));
            self.sync_progress();
            self.need_broadcast = true;
            self.maybe_commit();
            return;
        }
        if !current.contains(self.id) {
            // Removed (or demoted): hand leadership to the most up-to-date
            // voter, then step down (thesis §4.2.2).
            let last = self.log.last_index();
            let best = self
                .best_successor()
                .filter(|id| self.progress.get(id).is_some_and(|p| p.match_index == last));
            tracing::info!(node = self.id, term = self.term, successor = ?best, "no longer a voter; stepping down");
            if let Some(to) = best {
                self.send(to, MessageBody::TimeoutNow);
            }
            self.become_follower(self.term, None);
            return;
        }
        self.record_identities();
    }

    /// Records the storage identities members told this leader about and
    /// the configuration does not hold yet (bootstrap members), as one
    /// configuration entry.
    pub(super) fn record_identities(&mut self) {
        if self.role != Role::Leader
            || self.learned.is_empty()
            || self.change_in_flight().is_some()
            || self.transfer.is_some()
            || !self.committed_own_term()
        {
            return;
        }
        let mut next = self.members.current().clone();
        let learned = std::mem::take(&mut self.learned);
        let mut changed = false;
        for (id, inc) in learned {
            if next.is_member(id) && next.incarnation(id) == 0 {
                next.nodes.entry(id).or_default().incarnation = inc;
                changed = true;
            }
        }
        if next.incarnation(self.id) == 0 && self.incarnation != 0 {
            next.nodes.entry(self.id).or_default().incarnation = self.incarnation;
            changed = true;
        }
        if changed {
            tracing::info!(
                node = self.id,
                term = self.term,
                "recording members' storage identities"
            );
            self.append_local(EntryPayload::Membership(next));
            self.need_broadcast = true;
            self.maybe_commit();
        }
    }

    /// Hands leadership to `to`, or to the most up-to-date voter: once it
    /// holds the whole log it is told to campaign at once (`TimeoutNow`).
    /// Proposals are refused meanwhile; the transfer is given up after an
    /// election timeout. Returns the target.
    pub fn transfer_leadership(&mut self, to: Option<NodeId>) -> Result<NodeId, TransferError> {
        if self.role != Role::Leader {
            return Err(NotLeader {
                leader: self.leader,
            }
            .into());
        }
        let voters = &self.members.current().voters;
        let target = match to {
            Some(id) if id == self.id => {
                return Err(TransferError::Invalid(format!("node {id} leads already")))
            }
            Some(id) if !voters.contains(&id) => {
                return Err(TransferError::Invalid(format!("node {id} is not a voter")))
            }
            Some(id) => id,
            None => self
                .best_successor()
                .ok_or_else(|| TransferError::Invalid("no other voter".into()))?,
        };
        if let Some(t) = self.transfer {
            if t.to == target {
                return Ok(target);
            }
            return Err(TransferError::InProgress { to: t.to });
        }
        tracing::info!(
            node = self.id,
            term = self.term,
            to = target,
            "transferring leadership"
        );
        self.transfer = Some(Transfer {
            to: target,
            deadline: self.now + self.cfg.election_timeout_max,
            sent: false,
        });
        // Reads under a lease stop now: the target's election does not
        // wait for the lease to run out.
        self.lease_until = Duration::ZERO;
        self.maybe_send_timeout_now();
        if self.transfer.is_some_and(|t| !t.sent) {
            self.fill_pipeline(target);
        }
        Ok(target)
    }

    /// The voter (other than this leader) holding the most of the log;
    /// the lowest id among equals.
    fn best_successor(&self) -> Option<NodeId> {
        let voters = &self.members.current().voters;
        self.progress
            .iter()
            .filter(|(id, _)| voters.contains(id))
            .max_by_key(|(&id, p)| (p.match_index, std::cmp::Reverse(id)))
            .map(|(&id, _)| id)
    }

    /// Sends `TimeoutNow` once the transfer's target holds the whole log.
    pub(super) fn maybe_send_timeout_now(&mut self) {
        let Some(t) = self.transfer else {
            return;
        };
        if t.sent || self.role != Role::Leader {
            return;
        }
        let last = self.log.last_index();
        if self
            .progress
            .get(&t.to)
            .is_some_and(|p| p.match_index == last)
        {
            self.send(t.to, MessageBody::TimeoutNow);
            self.transfer = Some(Transfer { sent: true, ..t });
        }
    }

    /// Gives up a transfer that did not complete within an election timeout.
    pub(super) fn check_transfer(&mut self) {
        if let Some(t) = self.transfer {
            if self.now >= t.deadline {
                tracing::warn!(
                    node = self.id,
                    term = self.term,
                    to = t.to,
                    "leadership transfer timed out; leading on"
                );
                self.transfer = None;
            }
        }
    }

    /// The leader says: campaign now (thesis §3.10).
    pub(super) fn on_timeout_now(&mut self, from: NodeId) {
        if self.role != Role::Follower
            || self.leader != Some(from)
            || !self.members.current().contains(self.id)
            || self.awaiting_snapshot
        {
            return;
        }
        tracing::info!(
            node = self.id,
            term = self.term,
            from,
            "leadership handed over; campaigning"
        );
        self.campaign_with(false, true);
    }

    /// A message from a member whose recorded storage identity differs:
    /// the sender lost its disk. Returns true when the message must be dropped.
    pub(super) fn check_identity(&mut self, msg: &Message) -> bool {
        let recorded = self.members.current().incarnation(msg.from);
        if msg.incarnation == 0 {
            return false;
        }
        if recorded == 0 {
            if self.role == Role::Leader && self.members.current().is_member(msg.from) {
                self.learned.insert(msg.from, msg.incarnation);
            }
            return false;
        }
        if recorded == msg.incarnation {
            return false;
        }
        tracing::warn!(
            node = self.id,
            term = self.term,
            from = msg.from,
            recorded,
            claimed = msg.incarnation,
            "refusing a member whose storage is not the one recorded (its disk was lost?)"
        );
        if self.role == Role::Leader {
            self.send(msg.from, MessageBody::Refused { recorded });
        }
        true
    }

    /// This node's storage is not the one the cluster records for its id.
    pub(super) fn on_refused(&mut self, from: NodeId, recorded: u64) {
        if self.refused.is_none() {
            tracing::error!(
                node = self.id,
                term = self.term,
                from,
                recorded,
                mine = self.incarnation,
                "the cluster refuses this node: its storage is not the one recorded for this id"
            );
        }
        self.refused = Some(recorded);
    }
}
