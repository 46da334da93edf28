//! Durable storage of the Raft log: the [`LogStore`] trait every store
//! implements, and [`MemLogStore`], an in-memory store for tests and examples
//! that can simulate a crash.

use crate::types::{Entry, HardState, LogId, LogIndex, Membership, SnapshotMeta};
use async_trait::async_trait;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Everything a store holds, as loaded at start-up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogState {
    /// The last persisted term and vote.
    pub hard_state: HardState,
    /// The compaction point: entries up to and including it have been purged.
    pub purged: LogId,
    /// The entries after the compaction point, contiguous and in order.
    pub entries: Vec<Entry>,
    /// The membership in force at the compaction point (for a new cluster:
    /// the members it was bootstrapped with); `None` until one is stored.
    /// Membership entries in `entries` override it.
    pub membership: Option<Membership>,
    /// The latest snapshot the application holds, as recorded by
    /// `LogBatch::snapshot` or `LogBatch::install`.
    pub snapshot: Option<SnapshotMeta>,
    /// The storage's identity, made once when it was created
    /// (`LogBatch::incarnation`); 0 until then. A member that lost its
    /// disk comes back with another one and is recognised by it.
    pub incarnation: u64,
}

/// One durable write: applied in the order install, hard state,
/// truncation, append, snapshot record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogBatch {
    /// New term and vote, if they changed.
    pub hard_state: Option<HardState>,
    /// Remove every entry at or above this index first.
    pub truncate_from: Option<LogIndex>,
    /// Entries to append; the first follows the log's end after truncation.
    pub entries: Vec<Entry>,
    /// A new membership at the compaction point (bootstrap, or compaction
    /// past a membership entry), if it changed.
    pub membership: Option<Membership>,
    /// A snapshot from the leader replaces the log: drop every entry, make
    /// `last` the compaction point and `membership` its membership, and
    /// record it as the latest snapshot. Applied before everything else.
    pub install: Option<SnapshotMeta>,
    /// The application took a snapshot: record it as the latest.
    pub snapshot: Option<SnapshotMeta>,
    /// The storage's identity, written once by the node that creates it.
    pub incarnation: Option<u64>,
}

impl LogBatch {
    /// True when the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.hard_state.is_none()
            && self.truncate_from.is_none()
            && self.entries.is_empty()
            && self.membership.is_none()
            && self.install.is_none()
            && self.snapshot.is_none()
            && self.incarnation.is_none()
    }
}

/// A storage failure. The node stops on any of these: continuing could break
/// the promises Raft makes to its peers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// The underlying device or database failed.
    #[error("storage I/O error: {0}")]
    Io(String),
    /// Stored data is damaged or was written by something else.
    #[error("stored data is corrupt or foreign: {0}")]
    Corrupt(String),
    /// The caller asked for something the store cannot do (for example, a batch
    /// that would leave a gap in the log).
    #[error("invalid storage request: {0}")]
    Invalid(String),
}

/// The durable Raft log.
///
/// Contract:
/// * `save` returns only when the whole batch is durable (survives a crash
///   of the process and of the machine); a batch is all-or-nothing after a crash
///   only where the store says so, but never is a later part durable while an
///   earlier part is lost.
/// * Calls are made one at a time, in order, by a single node.
/// * `load` returns exactly what the acknowledged `save` and `purge` calls left.
/// * Any error is fatal for the node using the store.
#[async_trait]
pub trait LogStore: Send + 'static {
    /// Reads the whole durable state.
    async fn load(&mut self) -> Result<LogState, StorageError>;

    /// Durably applies one batch.
    async fn save(&mut self, batch: LogBatch) -> Result<(), StorageError>;

    /// Drops entries up to and including `upto`, recording it as the
    /// compaction point. Entries after it are kept.
    async fn purge(&mut self, upto: LogId) -> Result<(), StorageError>;
}

/// Checks that `batch` can be applied to a log holding entries
/// `purged_index + 1 ..= last`: the truncation stays above the compaction
/// point and the entries follow on without a gap. Returns the last index kept
/// before the batch's entries. Stores call it before writing anything.
pub fn check_batch(
    purged_index: LogIndex,
    last: LogIndex,
    batch: &LogBatch,
) -> Result<LogIndex, StorageError> {
    let (purged_index, last) = match &batch.install {
        Some(m) => (m.last.index, m.last.index),
        None => (purged_index, last),
    };
    let mut end = last;
    if let Some(t) = batch.truncate_from {
        if t <= purged_index {
            return Err(StorageError::Invalid(format!(
                "truncate from {t} reaches below the compaction point {purged_index}"
            )));
        }
        end = end.min(t - 1);
    }
    for (i, e) in batch.entries.iter().enumerate() {
        if e.index != end + 1 + i as u64 {
            return Err(StorageError::Invalid(format!(
                "entry {} does not follow index {}",
                e.index,
                end + i as u64
            )));
        }
    }
    Ok(end)
}

/// Checks a batch against the current state and applies it to `state`.
/// Shared by stores that keep their state as a [`LogState`].
pub fn apply_batch(state: &mut LogState, batch: LogBatch) -> Result<(), StorageError> {
    let last = state.entries.last().map_or(state.purged.index, |e| e.index);
    let end = check_batch(state.purged.index, last, &batch)?;
    if let Some(m) = batch.install {
        state.entries.clear();
        state.purged = m.last;
        state.membership = Some(m.membership.clone());
        state.snapshot = Some(m);
    }
    if let Some(m) = batch.snapshot {
        state.snapshot = Some(m);
    }
    if let Some(hs) = batch.hard_state {
        state.hard_state = hs;
    }
    if let Some(m) = batch.membership {
        state.membership = Some(m);
    }
    if let Some(i) = batch.incarnation {
        state.incarnation = i;
    }
    let keep = (end - state.purged.index) as usize;
    state.entries.truncate(keep);
    state.entries.extend(batch.entries);
    Ok(())
}

/// Applies a purge to a [`LogState`].
pub fn apply_purge(state: &mut LogState, upto: LogId) -> Result<(), StorageError> {
    take_purged(state, upto).map(drop)
}

/// Applies a purge to a [`LogState`] and returns the entries it removed,
/// for a store that frees them elsewhere (freeing many entries is slow,
/// and the next save waits behind the purge).
pub fn take_purged(state: &mut LogState, upto: LogId) -> Result<Vec<Entry>, StorageError> {
    if upto.index <= state.purged.index {
        return Ok(Vec::new());
    }
    let last = state.entries.last().map_or(state.purged.index, |e| e.index);
    if upto.index > last {
        return Err(StorageError::Invalid(format!(
            "purge to {} past the last index {last}",
            upto.index
        )));
    }
    let n = (upto.index - state.purged.index) as usize;
    let kept = state.entries.split_off(n);
    state.purged = upto;
    Ok(std::mem::replace(&mut state.entries, kept))
}

#[derive(Debug, Default)]
struct MemShared {
    durable: LogState,
    fail_writes: bool,
    /// Overrides the handle's write delay when set (changeable while running).
    write_delay: Option<Duration>,
}

/// An in-memory [`LogStore`]. Clones share one "disk", so a test can drop a
/// node, then [`MemLogStore::reopen`] the same disk to restart it with exactly
/// what was durable. With a write delay, a node killed during a write loses
/// that write, as a crash would.
#[derive(Debug, Clone, Default)]
pub struct MemLogStore {
    shared: Arc<Mutex<MemShared>>,
    write_delay: Duration,
}

impl MemLogStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every `save` takes this long before it becomes durable (a slow disk);
    /// a node stopped meanwhile loses the write.
    pub fn with_write_delay(mut self, delay: Duration) -> Self {
        self.write_delay = delay;
        self
    }

    /// A new handle on the same durable state, as after a restart.
    pub fn reopen(&self) -> Self {
        self.clone()
    }

    /// What is durable now.
    pub fn durable(&self) -> LogState {
        self.lock().durable.clone()
    }

    /// Changes the write delay of every handle on this disk, from the next write on.
    pub fn set_write_delay(&self, delay: Duration) {
        self.lock().write_delay = Some(delay);
    }

    /// Makes every later write fail (a dying disk).
    pub fn set_fail_writes(&self, fail: bool) {
        self.lock().fail_writes = fail;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemShared> {
        // A poisoned lock only means another test thread panicked; the data is still whole.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl LogStore for MemLogStore {
    async fn load(&mut self) -> Result<LogState, StorageError> {
        Ok(self.lock().durable.clone())
    }

    async fn save(&mut self, batch: LogBatch) -> Result<(), StorageError> {
        let delay = self.lock().write_delay.unwrap_or(self.write_delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut g = self.lock();
        if g.fail_writes {
            return Err(StorageError::Io("injected write failure".into()));
        }
        apply_batch(&mut g.durable, batch)
    }

    async fn purge(&mut self, upto: LogId) -> Result<(), StorageError> {
        apply_purge(&mut self.lock().durable, upto)
    }
}
