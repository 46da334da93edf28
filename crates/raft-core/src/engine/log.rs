//! The engine's in-memory view of the replicated log and its bookkeeping:
//! what is committed, what is durable, what has been handed to the application
//! and which changes still have to reach the `LogStore`.

use crate::types::{Entry, LogId, LogIndex, Term};

/// The log as the engine sees it. Entries at and below the compaction point
/// (`purged`) are no longer held; the first held entry is `snapshot.index + 1`.
#[derive(Debug)]
pub(crate) struct RaftLog {
    purged: LogId,
    entries: Vec<Entry>,
    /// Highest index known committed (moved only by `commit_to`).
    committed: LogIndex,
    /// Highest index handed to the application.
    pub(crate) applied: LogIndex,
    /// Highest index known durable in the local `LogStore`.
    pub(crate) durable: LogIndex,
    /// Lowest index whose entry is not yet written to the store.
    unstable_from: LogIndex,
    /// Lowest index removed since the last `take_storage_ops`.
    pending_truncate: Option<LogIndex>,
    /// Highest index the application has taken from the apply queue.
    pub(crate) delivered: LogIndex,
    /// Encoded-size bound of the entries after `delivered`: what this node
    /// holds for the application that it has not taken yet (back-pressure).
    unapplied_bytes: u64,
    /// The part of `unapplied_bytes` that is committed: what only the
    /// application can free (a follower's back-pressure looks at this).
    committed_unapplied_bytes: u64,
}

impl RaftLog {
    /// A log restored from durable state. The caller has validated contiguity.
    pub(crate) fn restore(purged: LogId, entries: Vec<Entry>, applied: LogIndex) -> Self {
        let last = entries.last().map(|e| e.index).unwrap_or(purged.index);
        let applied = applied.max(purged.index);
        let unapplied_bytes = entries
            .iter()
            .filter(|e| e.index > applied)
            .map(|e| e.size_bound() as u64)
            .sum();
        RaftLog {
            purged,
            entries,
            committed: applied,
            applied,
            durable: last,
            unstable_from: last + 1,
            pending_truncate: None,
            delivered: applied,
            unapplied_bytes,
            committed_unapplied_bytes: 0,
        }
    }

    /// The commit index.
    pub(crate) fn committed(&self) -> LogIndex {
        self.committed
    }

    /// Moves the commit index forward to `index` (never back).
    pub(crate) fn commit_to(&mut self, index: LogIndex) {
        if index <= self.committed {
            return;
        }
        debug_assert!(
            index <= self.last_index()
                || crate::mutation::broken(crate::mutation::Mutation::CommitPastVerified),
            "commit {index} past the last index {}",
            self.last_index()
        );
        let from = self.committed.max(self.delivered);
        let upto = index.min(self.last_index());
        for i in from + 1..=upto {
            if let Some(e) = self.entry(i) {
                self.committed_unapplied_bytes += e.size_bound() as u64;
            }
        }
        self.committed = index;
    }

    /// Encoded-size bound of committed entries the application has not taken yet.
    pub(crate) fn committed_unapplied_bytes(&self) -> u64 {
        self.committed_unapplied_bytes
    }

    /// Encoded-size bound of the entries the application has not taken yet.
    pub(crate) fn unapplied_bytes(&self) -> u64 {
        self.unapplied_bytes
    }

    /// Records that the application took every entry up to `index`.
    pub(crate) fn deliver(&mut self, index: LogIndex) {
        let index = index.min(self.applied);
        while self.delivered < index {
            self.delivered += 1;
            let sz = self
                .entry(self.delivered)
                .map_or(0, |e| e.size_bound() as u64);
            self.unapplied_bytes = self.unapplied_bytes.saturating_sub(sz);
            if self.delivered <= self.committed {
                self.committed_unapplied_bytes = self.committed_unapplied_bytes.saturating_sub(sz);
            }
        }
    }

    pub(crate) fn purged(&self) -> LogId {
        self.purged
    }

    pub(crate) fn last_index(&self) -> LogIndex {
        self.entries
            .last()
            .map(|e| e.index)
            .unwrap_or(self.purged.index)
    }

    pub(crate) fn last_term(&self) -> Term {
        self.entries
            .last()
            .map(|e| e.term)
            .unwrap_or(self.purged.term)
    }

    pub(crate) fn last_log_id(&self) -> LogId {
        LogId::new(self.last_term(), self.last_index())
    }

    /// The term of the entry at `index`: `None` when it lies beyond the end or
    /// below the compaction point.
    pub(crate) fn term(&self, index: LogIndex) -> Option<Term> {
        if index == self.purged.index {
            return Some(self.purged.term);
        }
        self.entry(index).map(|e| e.term)
    }

    pub(crate) fn entry(&self, index: LogIndex) -> Option<&Entry> {
        if index <= self.purged.index {
            return None;
        }
        let pos = usize::try_from(index - self.purged.index - 1).ok()?;
        self.entries.get(pos)
    }

    /// Entries from `from`, at most `max_entries` and about `max_bytes` (always at
    /// least one entry when one exists).
    pub(crate) fn slice(&self, from: LogIndex, max_entries: usize, max_bytes: usize) -> Vec<Entry> {
        if from <= self.purged.index || from > self.last_index() {
            return Vec::new();
        }
        let start = (from - self.purged.index - 1) as usize;
        let mut bytes = 0usize;
        let mut out = Vec::new();
        for e in self.entries[start..].iter().take(max_entries.max(1)) {
            let sz = e.size_bound();
            if !out.is_empty() && bytes + sz > max_bytes {
                break;
            }
            bytes += sz;
            out.push(e.clone());
        }
        out
    }

    /// The last index holding `term`, searching down from `from`.
    pub(crate) fn last_index_of_term(&self, term: Term, from: LogIndex) -> Option<LogIndex> {
        let mut i = from.min(self.last_index());
        while i > self.purged.index {
            let t = self.term(i)?;
            if t == term {
                return Some(i);
            }
            if t < term {
                return None;
            }
            i -= 1;
        }
        None
    }

    /// The first index of the run of `term` that contains `index`.
    pub(crate) fn first_index_of_term_run(&self, index: LogIndex) -> LogIndex {
        let Some(t) = self.term(index) else {
            return index;
        };
        let mut i = index;
        while i > self.purged.index + 1 && self.term(i - 1) == Some(t) {
            i -= 1;
        }
        i
    }

    /// Drops every entry up to and including `upto`, which must be applied
    /// (hence committed and durable). Returns the new compaction point.
    pub(crate) fn compact(&mut self, upto: LogIndex) -> Option<LogId> {
        if upto <= self.purged.index
            || upto > self.applied
            || upto > self.durable
            || upto > self.delivered
        {
            return None;
        }
        let term = self.term(upto)?;
        let n = (upto - self.purged.index) as usize;
        self.entries.drain(..n);
        self.purged = LogId::new(term, upto);
        Some(self.purged)
    }

    /// Replaces the whole log with a snapshot ending at `last`: every entry
    /// goes, and everything up to `last` counts as committed, applied,
    /// delivered and durable (the store installs it first thing in the
    /// same write).
    pub(crate) fn install(&mut self, last: LogId) {
        self.entries.clear();
        self.purged = last;
        self.committed = self.committed.max(last.index);
        self.applied = last.index;
        self.delivered = last.index;
        self.durable = last.index;
        self.unstable_from = last.index + 1;
        self.pending_truncate = None;
        self.unapplied_bytes = 0;
        self.committed_unapplied_bytes = 0;
    }

    /// Appends one entry at the end. The caller guarantees `entry.index == last + 1`.
    pub(crate) fn push(&mut self, entry: Entry) {
        debug_assert_eq!(
            entry.index,
            self.last_index() + 1,
            "log must stay contiguous"
        );
        self.unapplied_bytes += entry.size_bound() as u64;
        self.entries.push(entry);
    }

    /// Removes every entry from `index` on. Never removes a committed entry.
    pub(crate) fn truncate_from(&mut self, index: LogIndex) {
        debug_assert!(
            index > self.committed
                || crate::mutation::broken(crate::mutation::Mutation::TruncateAfterAppend),
            "truncating committed entry {index} (commit {})",
            self.committed
        );
        if index > self.last_index() || index <= self.purged.index {
            return;
        }
        let keep = (index - self.purged.index - 1) as usize;
        let removed: u64 = self.entries[keep..]
            .iter()
            .map(|e| e.size_bound() as u64)
            .sum();
        self.unapplied_bytes = self.unapplied_bytes.saturating_sub(removed);
        self.entries.truncate(keep);
        self.pending_truncate = Some(self.pending_truncate.map_or(index, |p| p.min(index)));
        self.unstable_from = self.unstable_from.min(index);
        self.durable = self.durable.min(index - 1);
    }

    /// The store operations accumulated since the last call: a suffix to remove
    /// and the entries to write. Afterwards everything counts as handed to the store.
    pub(crate) fn take_storage_ops(&mut self) -> (Option<LogIndex>, Vec<Entry>) {
        let trunc = self.pending_truncate.take();
        let last = self.last_index();
        let entries = if self.unstable_from <= last {
            let start = (self.unstable_from - self.purged.index - 1) as usize;
            self.entries[start..].to_vec()
        } else {
            Vec::new()
        };
        self.unstable_from = last + 1;
        (trunc, entries)
    }

    /// True when entries or a truncation still have to reach the store.
    pub(crate) fn has_storage_ops(&self) -> bool {
        self.pending_truncate.is_some() || self.unstable_from <= self.last_index()
    }

    /// Records that the store made everything up to `id` durable.
    /// Returns true when the durable index moved.
    pub(crate) fn persisted(&mut self, id: LogId) -> bool {
        if id.index > self.durable
            && id.index < self.unstable_from
            && self.term(id.index) == Some(id.term)
        {
            self.durable = id.index;
            self.check();
            return true;
        }
        false
    }

    /// Committed, durable entries not yet handed to the application; marks them applied.
    pub(crate) fn take_committed(&mut self, max: usize) -> Vec<Entry> {
        let upto = self.committed.min(self.durable);
        if upto <= self.applied {
            return Vec::new();
        }
        let n = ((upto - self.applied) as usize).min(max);
        let out = self.slice(self.applied + 1, n, usize::MAX);
        if let Some(last) = out.last() {
            self.applied = last.index;
        }
        self.check();
        out
    }

    /// The log's invariants: applied <= committed (only committed entries
    /// are handed out), durable <= last, delivered <= applied.
    pub(crate) fn check(&self) {
        debug_assert!(
            self.applied <= self.committed || self.applied == self.purged.index,
            "applied {} past committed {}",
            self.applied,
            self.committed
        );
        debug_assert!(
            self.durable <= self.last_index(),
            "durable {} past the last index {}",
            self.durable,
            self.last_index()
        );
        debug_assert!(
            self.delivered <= self.applied,
            "delivered {} past applied {}",
            self.delivered,
            self.applied
        );
    }
}
