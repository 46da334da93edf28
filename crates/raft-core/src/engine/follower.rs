//! Replication, follower side (§5.3): the prevLog check, conflict repair,
//! the commit index learned from the leader, heartbeats.

use super::*;

impl Engine {
    pub(super) fn accept_leader(&mut self, from: NodeId) -> bool {
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

    pub(super) fn on_append(
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

    pub(super) fn on_heartbeat(
        &mut self,
        from: NodeId,
        leader_commit: LogIndex,
        round: u64,
        purge_to_index: LogIndex,
    ) {
        if !self.accept_leader(from) {
            return;
        }
        if self.awaiting_snapshot {
            self.ask_for_snapshot(from);
        }
        // The leader caps leader_commit at our match index, so these entries
        // are ours; a log shorter than that lost what it acknowledged (a
        // wiped disk): say so, so the leader starts over.
        let last = self.log.last_index();
        if leader_commit > last && !broken(Mutation::HeartbeatCommitUncapped) {
            tracing::warn!(
                node = self.id,
                term = self.term,
                from,
                leader_commit,
                last,
                "the leader believes this log holds more than it does"
            );
            let term = self.term;
            self.send_persisted(
                from,
                term,
                MessageBody::AppendResponse {
                    success: false,
                    index: leader_commit,
                    hint: Some(RejectHint {
                        conflict_term: None,
                        first_index: last + 1,
                    }),
                },
            );
        }
        let c = leader_commit.min(last);
        if c > self.log.committed() {
            self.log.commit_to(c);
        }
        self.peer_safe = self.peer_safe.max(purge_to_index);
        self.maybe_compact();
        self.send(from, MessageBody::HeartbeatResponse { round });
    }

    /// This node's state is lost (its log is not: it keeps replicating
    /// and acknowledging): at each heartbeat it asks the leader for a
    /// snapshot that reaches at least its compaction point, with a rejection
    /// whose hint names first index 0 (no log starts there) and whose index
    /// is that point.
    pub(super) fn ask_for_snapshot(&mut self, from: NodeId) {
        let index = self.log.purged().index;
        self.send(
            from,
            MessageBody::AppendResponse {
                success: false,
                index,
                hint: Some(RejectHint {
                    conflict_term: None,
                    first_index: 0,
                }),
            },
        );
    }
}
