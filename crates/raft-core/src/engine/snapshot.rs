//! Snapshots (§7): the application's snapshots as the engine records
//! them, a follower that needs one, and a follower that receives one.
//!
//! The engine never touches snapshot bytes. The application takes a
//! snapshot and reports its index ([`Engine::snapshot_taken`]); the log may
//! then be compacted up to it whatever the other members hold. A leader
//! whose follower needs entries below the compaction point asks the driver
//! to stream the latest snapshot (`Ready::send_snapshots`); the follower's
//! driver stores the chunks with the application and, once the last one is
//! durable, hands the engine an `InstallSnapshot` message.

use super::*;

impl Engine {
    /// The application holds a durable snapshot of its state after applying
    /// every entry up to `index`. The engine records it (the store learns it
    /// through `Ready::snapshot`), counts the state as stored (see
    /// [`Engine::release`]) and may compact the log up to it, keeping
    /// `trailing_entries` below it. Returns what the snapshot covers, or
    /// `None` when `index` is not newer than the latest snapshot, was not
    /// handed to the application, or lies below the compaction point.
    pub fn snapshot_taken(&mut self, index: LogIndex) -> Option<SnapshotMeta> {
        if self
            .snapshot
            .as_ref()
            .is_some_and(|m| m.last.index >= index)
        {
            return None;
        }
        if index > self.log.applied || index > self.log.delivered {
            return None;
        }
        let term = self.log.term(index)?;
        let meta = SnapshotMeta {
            last: LogId::new(term, index),
            membership: self.members.at(index).clone(),
        };
        tracing::debug!(node = self.id, index, "snapshot taken");
        self.snapshot_wanted = false;
        self.snapshot = Some(meta.clone());
        self.pending_snapshot = Some(meta.clone());
        self.released = self.released.max(index);
        self.maybe_compact();
        Some(meta)
    }

    /// The snapshot transfer to `to` failed: go back to probing, so the next
    /// heartbeat answer starts it again (resuming where the follower
    /// stopped, when it kept what it received).
    pub fn snapshot_failed(&mut self, to: NodeId, index: LogIndex) {
        if self.role != Role::Leader {
            return;
        }
        if let Some(pr) = self.progress.get_mut(&to) {
            if pr.state == ReplState::Snapshot(index) {
                tracing::debug!(
                    node = self.id,
                    term = self.term,
                    to,
                    "snapshot transfer failed"
                );
                pr.become_probe();
            }
        }
    }

    /// The snapshot ending at `index` reached `to` whole. Its answer may
    /// still be lost: probe from just after the snapshot, which the answer
    /// to the probe confirms (or, if the follower did not take it, sends
    /// the leader back to a snapshot).
    pub fn snapshot_sent(&mut self, to: NodeId, index: LogIndex) {
        if self.role != Role::Leader {
            return;
        }
        if let Some(pr) = self.progress.get_mut(&to) {
            if pr.state == ReplState::Snapshot(index) {
                pr.become_probe();
                pr.next_index = pr.next_index.max(index + 1);
                self.send_append(to, false);
            }
        }
    }

    /// A follower whose state was lost asks for a snapshot reaching at
    /// least `at_least` (its compaction point): send the latest if it does,
    /// else ask the application for a newer one. Its log is intact, so what
    /// it acknowledged still counts.
    pub(super) fn on_snapshot_request(&mut self, from: NodeId, at_least: LogIndex) {
        let Some(pr) = self.progress.get(&from) else {
            return;
        };
        if matches!(pr.state, ReplState::Snapshot(_)) {
            return;
        }
        if self
            .snapshot
            .as_ref()
            .is_some_and(|m| m.last.index >= at_least && m.last.index >= self.log.purged().index)
        {
            self.start_snapshot(from);
        } else if self.can_snapshot {
            tracing::info!(
                node = self.id,
                term = self.term,
                from,
                at_least,
                "a follower needs a newer snapshot than this node holds"
            );
            self.snapshot_wanted = true;
        }
    }

    /// `to` needs entries from `next` on, which the log no longer holds:
    /// send the latest snapshot instead. Returns false when there is none
    /// that covers them.
    pub(super) fn start_snapshot(&mut self, to: NodeId) -> bool {
        let purged = self.log.purged().index;
        let Some(meta) = self.snapshot.clone().filter(|m| m.last.index >= purged) else {
            return false;
        };
        let Some(pr) = self.progress.get_mut(&to) else {
            return false;
        };
        tracing::debug!(
            node = self.id,
            term = self.term,
            to,
            index = meta.last.index,
            "follower needs a snapshot"
        );
        pr.become_snapshot(meta.last.index);
        self.snapshot_sends.push((to, meta));
        true
    }

    /// The leader's snapshot for a node whose state was lost: one that
    /// ends below the compaction point cannot restore it (the entries in
    /// between are gone); otherwise it is loaded, and the log after it kept
    /// when it matches.
    fn on_snapshot_while_awaiting(&mut self, from: NodeId, meta: SnapshotMeta) {
        let last = meta.last;
        let purged = self.log.purged().index;
        if last.index < purged {
            tracing::info!(
                node = self.id,
                index = last.index,
                purged,
                "the leader's snapshot ends below this log's compaction point; asking for a newer one"
            );
            self.ask_for_snapshot(from);
            return;
        }
        self.awaiting_snapshot = false;
        if self.log.term(last.index) != Some(last.term) {
            // The log does not hold it: replaced as for any follower.
            return self.on_install_snapshot(from, meta);
        }
        tracing::info!(
            node = self.id,
            term = self.term,
            index = last.index,
            "loading the leader's snapshot; the log after it stays"
        );
        self.log.commit_to(last.index);
        self.log.applied = last.index;
        self.log.deliver(last.index);
        self.log.check();
        self.released = self.released.max(last.index);
        self.snapshot = Some(meta.clone());
        self.pending_snapshot = Some(meta.clone());
        self.pending_apply_snapshot = Some(meta);
        self.ack_snapshot(from, last.index);
    }

    /// A snapshot from the leader is stored with the application (§7,
    /// Figure 13). One the commit index already covers changes nothing; if
    /// the log holds its last entry, the entries after it are kept and the
    /// log applies as usual; otherwise it replaces the log and the state.
    pub(super) fn on_install_snapshot(&mut self, from: NodeId, meta: SnapshotMeta) {
        // Malformed: no log can continue after it, an entry from a term
        // not reached yet, or nobody to run the cluster.
        if meta.last.index == LogIndex::MAX
            || meta.last.term > self.term
            || meta.membership.voters.is_empty()
        {
            tracing::warn!(node = self.id, from, last = ?meta.last, "dropping a malformed snapshot");
            return;
        }
        if !self.accept_leader(from) {
            return;
        }
        let term = self.term;
        let last = meta.last;
        let committed = self.log.committed();
        if self.awaiting_snapshot {
            return self.on_snapshot_while_awaiting(from, meta);
        }
        if last.index <= committed && !broken(Mutation::InstallOlderThanCommit) {
            tracing::debug!(
                node = self.id,
                term,
                index = last.index,
                committed,
                "snapshot already covered by the commit index"
            );
            self.ack_snapshot(from, committed);
            return;
        }
        if last.index > committed
            && self.log.term(last.index) == Some(last.term)
            && !broken(Mutation::DiscardMatchingSuffix)
        {
            // The log matches the leader's up to the snapshot's end, and
            // the snapshot only holds committed entries.
            self.log.commit_to(last.index);
            self.ack_snapshot(from, last.index);
            return;
        }
        tracing::info!(
            node = self.id,
            term,
            index = last.index,
            "installing a snapshot from the leader"
        );
        self.log.install(last);
        self.log.check();
        self.members = MembershipLog::restore(meta.membership.clone(), &[]);
        self.released = self.released.max(last.index);
        self.pending_purge = None;
        self.snapshot = Some(meta.clone());
        self.pending_snapshot = None;
        self.pending_install = Some(meta.clone());
        self.pending_apply_snapshot = Some(meta);
        self.ack_snapshot(from, last.index);
    }

    /// Answers the leader's snapshot: the log matches its own up to `index`
    /// (sent once this node's writes before it are durable).
    fn ack_snapshot(&mut self, to: NodeId, index: LogIndex) {
        let term = self.term;
        self.send_persisted(
            to,
            term,
            MessageBody::AppendResponse {
                success: true,
                index,
                hint: None,
            },
        );
    }
}
