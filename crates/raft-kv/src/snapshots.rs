//! The node's snapshot files (`<data_dir>/snapshots`): raft-core's
//! [`SnapshotStore`] over them, so the leader streams a file to a follower
//! chunk by chunk and a follower stores one as it arrives; and the policy
//! that takes a snapshot every `snapshot_threshold` applied entries.
//!
//! A finished snapshot is `snap-<index>-<term>.rks`; one arriving is
//! `recv-<index>-<term>.part` until every byte is there and the file
//! checked out (a transfer that breaks off resumes after what the part
//! holds). The two newest finished snapshots are kept.

use crate::snapfile;
use async_trait::async_trait;
use raft_core::{SnapshotMeta, SnapshotReader, SnapshotStore, SnapshotWriter, StorageError};
use std::io::{Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The newest snapshot: what INFO shows.
#[derive(Debug, Clone, Default)]
pub struct SnapshotStats {
    /// Its last index.
    pub index: u64,
    /// Its size in bytes.
    pub bytes: u64,
    /// Keys in it.
    pub keys: u64,
    /// How long the last snapshot took to write (taken here) or to load
    /// (received from the leader), in milliseconds.
    pub last_duration_ms: u64,
}

/// The snapshot directory of one node.
#[derive(Debug, Clone)]
pub struct Snapshots {
    dir: PathBuf,
    stats: Arc<Mutex<SnapshotStats>>,
    /// Snapshots taken or loaded since the start.
    recorded: Arc<std::sync::atomic::AtomicU64>,
}

fn io(path: &Path, e: impl std::fmt::Display) -> StorageError {
    StorageError::Io(format!("{}: {e}", path.display()))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::Io(format!("snapshot task failed: {e}")))?
}

impl Snapshots {
    /// Opens (creating) the directory; removes files left by writes that
    /// never finished.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        for e in std::fs::read_dir(dir).map_err(|e| io(dir, e))?.flatten() {
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let s = Snapshots {
            dir: dir.to_path_buf(),
            stats: Arc::default(),
            recorded: Arc::default(),
        };
        if let Some((index, _, path)) = s.latest() {
            let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let keys = snapfile::Reader::new(std::fs::File::open(&path).map_err(|e| io(&path, e))?)
                .map(|r| r.header().keys)
                .unwrap_or(0);
            *s.lock() = SnapshotStats {
                index,
                bytes,
                keys,
                last_duration_ms: 0,
            };
        }
        Ok(s)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SnapshotStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Snapshots taken or loaded since the start.
    pub fn recorded(&self) -> u64 {
        self.recorded.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What INFO shows.
    pub fn stats(&self) -> SnapshotStats {
        self.lock().clone()
    }

    /// Records the newest snapshot, and prunes the older ones (the one
    /// ending at `keep`, which Raft recorded, stays).
    pub fn record(&self, stats: SnapshotStats, keep: u64) {
        *self.lock() = stats;
        self.recorded
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.prune(keep);
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the finished snapshot ending at (`index`, `term`) lives.
    pub fn path(&self, index: u64, term: u64) -> PathBuf {
        self.dir.join(format!("snap-{index}-{term}.rks"))
    }

    fn part_path(&self, index: u64, term: u64) -> PathBuf {
        self.dir.join(format!("recv-{index}-{term}.part"))
    }

    /// A file name for a snapshot being written here.
    pub fn temp_path(&self) -> PathBuf {
        self.dir.join("taking.tmp")
    }

    /// Finished snapshots, oldest first: (index, term, path).
    fn finished(&self) -> Vec<(u64, u64, PathBuf)> {
        let mut out: Vec<(u64, u64, PathBuf)> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let (i, t) = name
                    .strip_prefix("snap-")?
                    .strip_suffix(".rks")?
                    .split_once('-')?;
                Some((i.parse().ok()?, t.parse().ok()?, e.path()))
            })
            .collect();
        out.sort();
        out
    }

    /// The newest finished snapshot, if any.
    pub fn latest(&self) -> Option<(u64, u64, PathBuf)> {
        self.finished().pop()
    }

    /// Keeps the two newest finished snapshots (a follower may be reading
    /// the older one; an open file stays readable after its removal), and
    /// the one ending at `keep` (the one Raft recorded).
    fn prune(&self, keep: u64) {
        let all = self.finished();
        for (i, _, p) in all.iter().take(all.len().saturating_sub(2)) {
            if *i != keep {
                let _ = std::fs::remove_file(p);
            }
        }
    }

    /// Moves a snapshot written to `tmp` into place as the one ending at
    /// (`index`, `term`), durably.
    pub fn publish(&self, tmp: &Path, index: u64, term: u64) -> std::io::Result<PathBuf> {
        let dest = self.path(index, term);
        std::fs::rename(tmp, &dest)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(dest)
    }
}

struct FileReader {
    file: Arc<std::fs::File>,
    size: u64,
}

#[async_trait]
impl SnapshotReader for FileReader {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&mut self, offset: u64, max: usize) -> Result<Vec<u8>, StorageError> {
        let file = self.file.clone();
        let len = (self.size.saturating_sub(offset)).min(max as u64) as usize;
        blocking(move || {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, offset)
                .map_err(|e| StorageError::Io(format!("reading a snapshot: {e}")))?;
            Ok(buf)
        })
        .await
    }
}

struct FileWriter {
    snaps: Snapshots,
    meta: SnapshotMeta,
    path: PathBuf,
    file: Option<std::fs::File>,
    size: u64,
    held: u64,
    /// Bytes written since the file was last synced.
    unsynced: u64,
}

#[async_trait]
impl SnapshotWriter for FileWriter {
    fn received(&self) -> u64 {
        self.held
    }

    async fn write(&mut self, data: &[u8]) -> Result<(), StorageError> {
        if self.held + data.len() as u64 > self.size {
            return Err(StorageError::Invalid(
                "snapshot longer than announced".into(),
            ));
        }
        let Some(mut f) = self.file.take() else {
            return Err(StorageError::Io("the snapshot file is gone".into()));
        };
        let n = data.len() as u64;
        let data = data.to_vec();
        let path = self.path.clone();
        let mut unsynced = self.unsynced;
        let (f, unsynced) = blocking(move || {
            f.write_all(&data).map_err(|e| io(&path, e))?;
            snapfile::SyncingFile::wrote(&f, &mut unsynced, n).map_err(|e| io(&path, e))?;
            Ok((f, unsynced))
        })
        .await?;
        self.file = Some(f);
        self.unsynced = unsynced;
        self.held += n;
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<(), StorageError> {
        let f = self.file.take();
        let (part, index, term) = (self.path.clone(), self.meta.last.index, self.meta.last.term);
        let snaps = self.snaps.clone();
        blocking(move || {
            if let Some(f) = f {
                f.sync_all().map_err(|e| io(&part, e))?;
            }
            let h = match snapfile::verify(&part) {
                Ok(h) => h,
                Err(e) => {
                    // Damaged on the way or on disk: start over next time.
                    let _ = std::fs::remove_file(&part);
                    return Err(StorageError::Corrupt(format!(
                        "snapshot from the leader: {e}"
                    )));
                }
            };
            if h.index != index || (h.term != term && h.term != 0) {
                let _ = std::fs::remove_file(&part);
                return Err(StorageError::Corrupt(format!(
                    "the leader's snapshot for ({index}, {term}) holds ({}, {})",
                    h.index, h.term
                )));
            }
            snaps
                .publish(&part, index, term)
                .map_err(|e| io(&part, e))?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl SnapshotStore for Snapshots {
    async fn open(&self, meta: &SnapshotMeta) -> Result<Box<dyn SnapshotReader>, StorageError> {
        let path = self.path(meta.last.index, meta.last.term);
        blocking(move || {
            let file = std::fs::File::open(&path).map_err(|e| io(&path, e))?;
            let size = file.metadata().map_err(|e| io(&path, e))?.len();
            Ok(Box::new(FileReader {
                file: Arc::new(file),
                size,
            }) as Box<dyn SnapshotReader>)
        })
        .await
    }

    async fn receive(
        &self,
        meta: &SnapshotMeta,
        size: u64,
    ) -> Result<Box<dyn SnapshotWriter>, StorageError> {
        let path = self.part_path(meta.last.index, meta.last.term);
        let dir = self.dir.clone();
        let p2 = path.clone();
        let (file, held) = blocking(move || {
            // Parts of other snapshots are of no use any more.
            for e in std::fs::read_dir(&dir).map_err(|e| io(&dir, e))?.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.ends_with(".part") && e.path() != p2 {
                    let _ = std::fs::remove_file(e.path());
                }
            }
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p2)
                .map_err(|e| io(&p2, e))?;
            let mut held = f.metadata().map_err(|e| io(&p2, e))?.len();
            if held > size {
                f.set_len(0).map_err(|e| io(&p2, e))?;
                held = 0;
            }
            f.seek(std::io::SeekFrom::End(0)).map_err(|e| io(&p2, e))?;
            Ok((f, held))
        })
        .await?;
        if held > 0 {
            tracing::info!(
                index = meta.last.index,
                held,
                "resuming a snapshot transfer"
            );
        }
        Ok(Box::new(FileWriter {
            snaps: self.clone(),
            meta: meta.clone(),
            path,
            file: Some(file),
            size,
            held,
            unsynced: 0,
        }))
    }
}
