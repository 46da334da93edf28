//! Where snapshot bytes live: the [`SnapshotStore`] trait the application
//! implements (it alone knows how to write and load its state), and
//! [`MemSnapshotStore`], an in-memory one for tests and examples.
//!
//! The node streams a snapshot from the leader's store to a follower's in
//! chunks, a few at a time, and never holds a whole snapshot in memory. The
//! follower's application loads a received snapshot when its apply channel
//! says so (an [`ApplyMsg`](crate::ApplyMsg) with `snapshot` set), in order
//! with the entries around it.

use crate::storage::StorageError;
use crate::types::{LogId, LogIndex, SnapshotMeta};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// The application's snapshots, as the node reads and writes them.
///
/// Contract:
/// * `open` reads a snapshot the application reported with
///   `Raft::snapshot_taken` (or received); it must stay readable until a
///   newer one is reported.
/// * `receive` starts storing a snapshot from the leader. A store may keep
///   what an interrupted transfer of the same snapshot left and resume after
///   it (`SnapshotWriter::received`). Nothing of it counts until `finish`
///   returns: a crash before leaves the application's state as it was.
#[async_trait]
pub trait SnapshotStore: Send + Sync + 'static {
    /// Opens the snapshot `meta` describes, to send it.
    async fn open(&self, meta: &SnapshotMeta) -> Result<Box<dyn SnapshotReader>, StorageError>;

    /// Starts receiving the snapshot `meta` describes, `size` bytes long.
    async fn receive(
        &self,
        meta: &SnapshotMeta,
        size: u64,
    ) -> Result<Box<dyn SnapshotWriter>, StorageError>;
}

/// Reads one stored snapshot.
#[async_trait]
pub trait SnapshotReader: Send {
    /// The snapshot's size in bytes.
    fn size(&self) -> u64;

    /// Up to `max` bytes from `offset` (fewer only at the end).
    async fn read(&mut self, offset: u64, max: usize) -> Result<Vec<u8>, StorageError>;
}

/// Writes one snapshot as it arrives, in order.
#[async_trait]
pub trait SnapshotWriter: Send {
    /// How many bytes are held already (more than 0 when resuming).
    fn received(&self) -> u64;

    /// Appends `data`, which starts at `received()`.
    async fn write(&mut self, data: &[u8]) -> Result<(), StorageError>;

    /// Every byte is here: make the snapshot durable and ready to load.
    /// A store that checks its snapshots refuses a damaged one here.
    async fn finish(self: Box<Self>) -> Result<(), StorageError>;
}

#[derive(Debug, Default)]
struct MemShared {
    /// Finished snapshots by last index.
    done: BTreeMap<LogIndex, (SnapshotMeta, Vec<u8>)>,
    /// Bytes of unfinished transfers, by last index and term.
    partial: BTreeMap<(LogIndex, u64), Vec<u8>>,
    fail_writes: bool,
}

/// An in-memory [`SnapshotStore`]; clones share the same snapshots, so a
/// test can keep them across a node's restart.
#[derive(Debug, Clone, Default)]
pub struct MemSnapshotStore {
    shared: Arc<Mutex<MemShared>>,
}

impl MemSnapshotStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores a snapshot the application took, of its state after
    /// applying every entry up to `last`.
    pub fn put(&self, last: LogId, bytes: Vec<u8>) {
        let meta = SnapshotMeta {
            last,
            membership: Default::default(),
        };
        self.lock().done.insert(last.index, (meta, bytes));
    }

    /// The snapshot ending at `index`, if held and finished (the
    /// membership is known only for received ones).
    pub fn get(&self, index: LogIndex) -> Option<(SnapshotMeta, Vec<u8>)> {
        self.lock().done.get(&index).cloned()
    }

    /// The newest finished snapshot.
    pub fn latest(&self) -> Option<(SnapshotMeta, Vec<u8>)> {
        self.lock().done.values().next_back().cloned()
    }

    /// Makes every later write fail.
    pub fn set_fail_writes(&self, fail: bool) {
        self.lock().fail_writes = fail;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemShared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct MemReader {
    bytes: Arc<Vec<u8>>,
}

#[async_trait]
impl SnapshotReader for MemReader {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    async fn read(&mut self, offset: u64, max: usize) -> Result<Vec<u8>, StorageError> {
        let start = usize::try_from(offset)
            .ok()
            .filter(|&s| s <= self.bytes.len())
            .ok_or_else(|| StorageError::Invalid(format!("read at {offset} past the end")))?;
        let end = start.saturating_add(max).min(self.bytes.len());
        Ok(self.bytes[start..end].to_vec())
    }
}

struct MemWriter {
    store: MemSnapshotStore,
    meta: SnapshotMeta,
    size: u64,
    held: u64,
}

#[async_trait]
impl SnapshotWriter for MemWriter {
    fn received(&self) -> u64 {
        self.held
    }

    async fn write(&mut self, data: &[u8]) -> Result<(), StorageError> {
        let mut g = self.store.lock();
        if g.fail_writes {
            return Err(StorageError::Io("injected write failure".into()));
        }
        let key = (self.meta.last.index, self.meta.last.term);
        let buf = g.partial.entry(key).or_default();
        if buf.len() as u64 + data.len() as u64 > self.size {
            return Err(StorageError::Invalid(
                "snapshot longer than announced".into(),
            ));
        }
        buf.extend_from_slice(data);
        self.held = buf.len() as u64;
        Ok(())
    }

    async fn finish(self: Box<Self>) -> Result<(), StorageError> {
        let mut g = self.store.lock();
        let key = (self.meta.last.index, self.meta.last.term);
        let bytes = g.partial.remove(&key).unwrap_or_default();
        if bytes.len() as u64 != self.size {
            return Err(StorageError::Invalid(format!(
                "snapshot of {} bytes, {} announced",
                bytes.len(),
                self.size
            )));
        }
        g.done
            .insert(self.meta.last.index, (self.meta.clone(), bytes));
        Ok(())
    }
}

#[async_trait]
impl SnapshotStore for MemSnapshotStore {
    async fn open(&self, meta: &SnapshotMeta) -> Result<Box<dyn SnapshotReader>, StorageError> {
        let g = self.lock();
        match g.done.get(&meta.last.index) {
            Some((m, bytes)) if m.last == meta.last => Ok(Box::new(MemReader {
                bytes: Arc::new(bytes.clone()),
            })),
            _ => Err(StorageError::Invalid(format!(
                "no snapshot ending at {:?}",
                meta.last
            ))),
        }
    }

    async fn receive(
        &self,
        meta: &SnapshotMeta,
        size: u64,
    ) -> Result<Box<dyn SnapshotWriter>, StorageError> {
        let mut g = self.lock();
        let key = (meta.last.index, meta.last.term);
        // Keep what an earlier transfer of this snapshot left; drop others.
        g.partial.retain(|k, _| *k == key);
        let held = g.partial.get(&key).map_or(0, |b| b.len() as u64);
        Ok(Box::new(MemWriter {
            store: self.clone(),
            meta: meta.clone(),
            size,
            held: held.min(size),
        }))
    }
}
