//! Replication, leader side (§5.3, §5.4.2): answers to appends and
//! heartbeats, back-off, pipelining, commit of current-term entries, and
//! the heartbeat rounds that confirm reads (thesis §6.4).

use super::*;

impl Engine {
    pub(super) fn on_append_response(
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
        if let ReplState::Snapshot(pending) = pr.state {
            // Only the follower's answer to the snapshot (or a later one)
            // ends the transfer; anything older is stale.
            if success && index >= pending {
                pr.ack(index, now);
                pr.become_replicate();
                self.maybe_commit();
                self.fill_pipeline(from);
            }
            return;
        }
        if success {
            // A late duplicate tells nothing new; reacting to it (resending)
            // would turn duplicates into storms.
            let duplicate = match pr.state {
                _ if pr.backoff => index <= pr.match_index,
                ReplState::Replicate | ReplState::Snapshot(_) => index <= pr.match_index,
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
                ReplState::Snapshot(_) => false,
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
            self.maybe_send_timeout_now();
        } else {
            if let Some(RejectHint {
                conflict_term: None,
                first_index: 0,
            }) = hint
            {
                self.on_snapshot_request(from, index);
                return;
            }
            // A follower with an empty log that had acknowledged entries
            // lost its disk (a wiped member rejoining; it says so when a
            // heartbeat's commit index is past its log): start over with
            // the snapshot. (An old rejection reordered behind a later
            // acknowledgement looks the same; it costs one needless snapshot
            // offer, which a follower holding the entries answers at once,
            // Figure 13.)
            if let Some(RejectHint {
                conflict_term: None,
                first_index: 1,
            }) = hint
            {
                if pr.match_index > 0 && self.can_snapshot {
                    tracing::warn!(
                        node = self.id,
                        term = self.term,
                        from,
                        acknowledged = pr.match_index,
                        "follower's log is empty though it acknowledged entries (its disk was replaced?)"
                    );
                    pr.match_index = 0;
                    pr.become_probe();
                    self.send_append(from, false);
                    return;
                }
            }
            let stale = match pr.state {
                ReplState::Replicate => index <= pr.match_index,
                ReplState::Probe => index + 1 != pr.next_index,
                ReplState::Snapshot(_) => true,
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
            // Below the compaction point the follower gets a snapshot.
            next = next.min(index).max(pr.match_index + 1);
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

    pub(super) fn on_heartbeat_response(&mut self, from: NodeId, round: u64) {
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
        self.extend_lease();
        self.check_reads();
        if lagging {
            self.fill_pipeline(from);
        }
    }

    pub(super) fn on_heartbeat_timer(&mut self) {
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
                ReplState::Snapshot(_) => {}
            }
        }
        self.reads.next_round(self.now);
        self.broadcast_heartbeat();
        self.maybe_compact();
        self.record_identities();
    }

    pub(super) fn broadcast_heartbeat(&mut self) {
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
            if let Some(pr) = self.progress.get_mut(&p) {
                pr.commit_told = pr.commit_told.max(leader_commit);
            }
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

    pub(super) fn broadcast_append(&mut self) {
        let peers: Vec<NodeId> = self.progress.keys().copied().collect();
        for p in peers {
            self.fill_pipeline(p);
        }
    }

    /// Sends what the follower is missing, as flow control allows. With
    /// `commit_only`, an up-to-date follower still gets an empty append that
    /// carries the new commit index.
    pub(super) fn send_append(&mut self, to: NodeId, commit_only: bool) -> bool {
        let last = self.log.last_index();
        let committed = self.log.committed();
        let Some(pr) = self.progress.get_mut(&to) else {
            return false;
        };
        match pr.state {
            ReplState::Snapshot(_) => return false,
            ReplState::Probe if pr.paused => return false,
            ReplState::Replicate if pr.inflight.len() >= self.cfg.max_inflight => return false,
            ReplState::Replicate if pr.next_index > last && !commit_only => return false,
            _ => {}
        }
        let prev = pr.next_index - 1;
        let Some(prev_term) = self.log.term(prev) else {
            if self.start_snapshot(to) {
                return false;
            }
            self.snapshot_wanted = true;
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
            ReplState::Snapshot(_) => {}
        }
        pr.commit_told = pr.commit_told.max(committed);
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

    /// Tells every follower not told yet the commit index, in an append
    /// (empty if it has every entry).
    pub(super) fn notify_commit(&mut self) {
        self.commit_notice = None;
        let committed = self.log.committed();
        let peers: Vec<NodeId> = self
            .progress
            .iter()
            .filter(|(_, p)| p.commit_told < committed)
            .map(|(&id, _)| id)
            .collect();
        for p in peers {
            self.send_append(p, true);
        }
    }

    /// Sends appends to `to` until its pipeline is full or it has everything.
    pub(super) fn fill_pipeline(&mut self, to: NodeId) {
        while self.send_append(to, false) {}
    }

    /// Commits the highest index held by a majority, only if it is from the
    /// current term (§5.4.2).
    pub(super) fn maybe_commit(&mut self) {
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
        // Followers learn the new commit index from the next append or
        // heartbeat; those still not told after `commit_notice_delay` get
        // an append of their own.
        if self.cfg.commit_notice_delay.is_zero() {
            self.notify_commit();
        } else if self.commit_notice.is_none() {
            self.commit_notice = Some(self.now + self.cfg.commit_notice_delay);
        }
        self.after_commit();
        if self.role != Role::Leader {
            return;
        }
        if self.awaiting_snapshot {
            // Elected without its state (no other member could win): its
            // log now reached a majority; it steps aside so one that can
            // serve, and send it a snapshot, takes over.
            tracing::info!(
                node = self.id,
                term = self.term,
                "stepping down: this node's state is still to come from a snapshot"
            );
            self.become_follower(self.term, None);
            return;
        }
        if self.log.term(n) == Some(self.term) && self.reads.leader_committed(n) {
            self.check_reads();
        }
    }

    pub(super) fn start_read_round(&mut self) {
        if self.reads.all_in_round() {
            return;
        }
        self.reads.next_round(self.now);
        self.broadcast_heartbeat();
        self.check_reads();
    }

    /// The highest heartbeat round a majority has confirmed (this node
    /// confirms every round).
    pub(super) fn confirmed_round(&self) -> u64 {
        let id = self.id;
        let progress = &self.progress;
        let round = self.reads.round();
        self.members.current().committed_value(|v| {
            if v == id {
                round
            } else {
                progress.get(&v).map_or(0, |p| p.round_acked)
            }
        })
    }

    /// With lease reads: a majority acknowledged a heartbeat sent at T, so
    /// no other leader can exist before T + election_timeout_min on their
    /// clocks; this leader trusts T + election_timeout_min - margin on its own.
    pub(super) fn extend_lease(&mut self) {
        if self.cfg.read_policy != crate::config::ReadPolicy::Lease || self.transfer.is_some() {
            return;
        }
        let confirmed = self.confirmed_round();
        let from = if broken(Mutation::LeaseFromAnswer) {
            Some(self.now)
        } else {
            self.reads.sent_at(confirmed)
        };
        let Some(from) = from else {
            return;
        };
        let margin = if broken(Mutation::LeaseWithoutDriftMargin) {
            Duration::ZERO
        } else {
            self.cfg.lease_drift_margin
        };
        let until = from + self.cfg.election_timeout_min.saturating_sub(margin);
        self.lease_until = self.lease_until.max(until);
    }

    /// Answers the reads whose round a quorum has confirmed.
    pub(super) fn check_reads(&mut self) {
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
            && !self.members.current().is_joint()
            && self.members.current().contains(id))
            || broken(Mutation::ReadWithoutQuorum);
        self.reads.confirm(confirmed, single);
    }
}
