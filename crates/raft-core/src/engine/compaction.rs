//! Log compaction: what may be purged (what every member holds and the
//! application has stored), and when.

use super::*;

impl Engine {
    /// The highest index every member is known to hold: what the leader has
    /// seen acknowledged by all followers (and holds durably itself), or what
    /// a leader said so earlier.
    pub(super) fn safe_compact_index(&self) -> LogIndex {
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
    /// the application has stored, or that the latest snapshot covers (less
    /// `trailing_entries`), once there are `compact_threshold` of them. A
    /// member that needs what was dropped gets the snapshot.
    pub(super) fn maybe_compact(&mut self) {
        let released = if broken(Mutation::CompactIgnoringReleased) {
            LogIndex::MAX
        } else {
            self.released
        };
        // Without a snapshot: what every member holds and the application
        // stored. With one: up to it, whatever the others hold, less the
        // trailing entries kept for followers a little behind.
        let by_snapshot = self.snapshot.as_ref().map_or(0, |m| {
            m.last.index.saturating_sub(self.cfg.trailing_entries)
        });
        let upto = self
            .safe_compact_index()
            .min(released)
            .max(by_snapshot)
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
}
