//! Membership per log index (thesis §4.1): the membership at the purge
//! point, one per membership entry after it, and the one in force (the
//! latest, committed or not). Truncating an entry reverts to the one
//! before; purging past entries moves the base, which the store must learn.

use crate::types::{Entry, EntryPayload, LogIndex, Membership};

/// The memberships a node's log holds.
#[derive(Debug)]
pub(super) struct MembershipLog {
    /// The membership at the purge point.
    base: Membership,
    /// Membership entries after the purge point, in index order.
    entries: Vec<(LogIndex, Membership)>,
    /// The membership in force: the last of `entries`, else `base`.
    current: Membership,
    /// `base` changed: store it with the next purge.
    base_dirty: bool,
}

impl MembershipLog {
    /// From the base at the purge point and the log entries after it.
    pub(super) fn restore(base: Membership, log: &[Entry]) -> Self {
        let mut m = MembershipLog {
            current: base.clone(),
            base,
            entries: Vec::new(),
            base_dirty: false,
        };
        for e in log {
            m.appended(e);
        }
        m
    }

    /// The membership in force.
    pub(super) fn current(&self) -> &Membership {
        &self.current
    }

    /// The index of the latest membership entry in the log (0 when the one
    /// in force is the base, which is committed).
    pub(super) fn latest_index(&self) -> LogIndex {
        self.entries.last().map_or(0, |(i, _)| *i)
    }

    /// The membership in force at `index` (at or above the purge point).
    pub(super) fn at(&self, index: LogIndex) -> &Membership {
        self.entries
            .iter()
            .rev()
            .find(|(i, _)| *i <= index)
            .map_or(&self.base, |(_, m)| m)
    }

    /// An entry was appended: a membership entry takes effect at once.
    pub(super) fn appended(&mut self, e: &Entry) {
        if let EntryPayload::Membership(m) = &e.payload {
            self.entries.push((e.index, m.clone()));
            self.current = m.clone();
        }
    }

    /// Entries from `index` on were removed; true when the membership in
    /// force reverted.
    pub(super) fn truncated(&mut self, index: LogIndex) -> bool {
        if self.entries.last().is_none_or(|(i, _)| *i < index) {
            return false;
        }
        self.entries.retain(|(i, _)| *i < index);
        self.current = self
            .entries
            .last()
            .map_or_else(|| self.base.clone(), |(_, m)| m.clone());
        true
    }

    /// Entries up to `index` were purged: the latest membership among them
    /// becomes the base.
    pub(super) fn purged(&mut self, index: LogIndex) {
        let n = self.entries.partition_point(|(i, _)| *i <= index);
        if let Some((_, m)) = self.entries.drain(..n).next_back() {
            self.base = m;
            self.base_dirty = true;
        }
    }

    /// The new base for the store, once, after it moved.
    pub(super) fn take_new_base(&mut self) -> Option<Membership> {
        if !self.base_dirty {
            return None;
        }
        self.base_dirty = false;
        Some(self.base.clone())
    }
}
