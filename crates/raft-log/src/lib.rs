//! # raft-log
//!
//! [`SledLogStore`]: a durable, crash-safe [`LogStore`] on sled 0.34.
//!
//! Layout: one sled tree holding
//! * `m:magic` — identifies the directory as a raft-log store, with a format version;
//! * `m:hard` — the hard state (term, vote);
//! * `m:snap` — the compaction point (index, term);
//! * `m:identity` — the storage's identity (a random number made at creation);
//! * `m:members` — the membership at the compaction point (the bootstrap
//!   membership until compaction passes a membership entry);
//! * `e:` + big-endian index — a run of up to 64 consecutive entries starting
//!   at that index (a batch of appends is one insert per run; a truncation
//!   inside a run rewrites that run).
//!
//! A purge only records the new compaction point: runs wholly at or below it
//! are then deleted a few at a time by later writes (reading skips them), so
//! compacting a long log never stalls the node.
//!
//! Every value carries a CRC32 of its bytes. Each `save` or `purge` is one
//! atomic sled batch followed by one `flush` (sled's fsync), so a batch is
//! either wholly durable or absent after a crash, and `save` returns only once
//! it is durable.
//!
//! Opening validates everything: a directory that is not a sled database, a sled
//! database of another program, damaged files, undecodable values and a log
//! with gaps are all refused with an error naming the path. sled panics on some
//! damaged files; the panic is caught and reported as corruption.
//!
//! ```no_run
//! use raft_core::{Config, LogStore, Raft};
//! use raft_log::SledLogStore;
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store = SledLogStore::open("/var/lib/mynode/raft-log")?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

use async_trait::async_trait;
use raft_core::storage::{check_batch, LogBatch, LogState, LogStore, StorageError};
use raft_core::{Entry, HardState, LogId, LogIndex, Membership, SnapshotMeta};
use serde::{de::DeserializeOwned, Serialize};
use std::path::{Path, PathBuf};

const MAGIC_KEY: &[u8] = b"m:magic";
const HARD_KEY: &[u8] = b"m:hard";
const SNAP_KEY: &[u8] = b"m:snap";
const MEMBERS_KEY: &[u8] = b"m:members";
const LATEST_SNAPSHOT_KEY: &[u8] = b"m:snapshot";
const IDENTITY_KEY: &[u8] = b"m:identity";
const ENTRY_PREFIX: &[u8] = b"e:";
const MAGIC: &[u8] = b"raft-log store, format 3";
/// The previous format: memberships without learners or addresses.
const MAGIC_V2: &[u8] = b"raft-log store, format 2";
/// Entries stored under one key: a batch of appends costs one sled insert per
/// run instead of one per entry, and runs stay small enough to stay inline.
const RUN_LEN: usize = 64;
/// Most obsolete runs deleted along with one write.
const SWEEP_PER_WRITE: usize = 256;
/// A marker file beside sled's files: it outlives damage that makes sled
/// recover an empty database, so such damage is detected instead of a silent
/// "new, empty log".
const MARKER_FILE: &str = "RAFT_LOG_STORE";

/// A durable Raft log in a sled database directory. One store per directory
/// per process (sled's rule).
///
/// Every operation of the `LogStore` trait runs on tokio's blocking pool
/// (encoding, sled reads, the batch and the fsync alike), so the async
/// threads never wait for the disk. [`SledLogStore::open`] blocks (it reads
/// and checks the whole log); from async code use [`SledLogStore::open_async`].
#[derive(Debug)]
pub struct SledLogStore {
    path: PathBuf,
    /// `None` only while an operation runs on the blocking pool, or after
    /// one panicked there.
    core: Option<Core>,
}

/// The store's state and its synchronous operations.
#[derive(Debug)]
struct Core {
    db: sled::Db,
    path: PathBuf,
    /// The compaction point, cached.
    purged: LogId,
    /// The last index, cached.
    last: LogIndex,
    /// Runs wholly below the compaction point may still be stored.
    stale_runs: bool,
}

fn entry_key(index: LogIndex) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[..2].copy_from_slice(ENTRY_PREFIX);
    k[2..].copy_from_slice(&index.to_be_bytes());
    k
}

fn key_index(k: &[u8]) -> Option<LogIndex> {
    let rest = k.strip_prefix(ENTRY_PREFIX)?;
    Some(u64::from_be_bytes(rest.try_into().ok()?))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StorageError> {
    let body = bincode::serde::encode_to_vec(v, bincode::config::standard())
        .map_err(|e| StorageError::Invalid(format!("cannot encode value: {e}")))?;
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

fn decode<T: DeserializeOwned>(raw: &[u8], what: &str, path: &Path) -> Result<T, StorageError> {
    let corrupt = |why: String| StorageError::Corrupt(format!("{}: {what}: {why}", path.display()));
    if raw.len() < 4 {
        return Err(corrupt("value too short".into()));
    }
    let (crc, body) = raw.split_at(4);
    let want = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32fast::hash(body) != want {
        return Err(corrupt("checksum mismatch".into()));
    }
    let (v, used) = bincode::serde::decode_from_slice(body, bincode::config::standard())
        .map_err(|e| corrupt(format!("undecodable: {e}")))?;
    if used != body.len() {
        return Err(corrupt("trailing bytes".into()));
    }
    Ok(v)
}

/// Opens sled, catching its panics on damaged files. sled releases its file
/// lock from background threads some time after the last handle is dropped,
/// so reopening a store in the same process can briefly find the lock taken;
/// that case is waited out for a bounded time (another live holder then gets
/// a clear error).
fn open_sled(path: &Path) -> std::thread::Result<sled::Result<sled::Db>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let p = path.to_path_buf();
        let res = std::panic::catch_unwind(move || {
            // Every save ends in an explicit flush, so sled's periodic
            // background flush would only compete with ours for the disk.
            sled::Config::new()
                .path(&p)
                .mode(sled::Mode::HighThroughput)
                .flush_every_ms(None)
                .open()
        });
        let locked = matches!(&res, Ok(Err(sled::Error::Io(e))) if e.to_string().contains("could not acquire lock"));
        if !locked || std::time::Instant::now() >= deadline {
            return res;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_all()?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> StorageError {
    StorageError::Io(format!("{}: {e}", path.display()))
}

impl SledLogStore {
    /// Opens (or creates) the store in directory `path`, checking that it holds
    /// a raft-log store in good order. Blocks: it reads the whole log.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        let core = Core::open(path.as_ref())?;
        Ok(SledLogStore {
            path: core.path.clone(),
            core: Some(core),
        })
    }

    /// [`SledLogStore::open`] on tokio's blocking pool.
    pub async fn open_async(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        let path: PathBuf = path.as_ref().to_path_buf();
        let p = path.clone();
        tokio::task::spawn_blocking(move || Self::open(p))
            .await
            .map_err(|e| io_err(&path, format!("opening failed: {e}")))?
    }

    /// The directory this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `op` on the core, on the blocking pool.
    async fn run<T: Send + 'static>(
        &mut self,
        op: impl FnOnce(&mut Core) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let Some(mut core) = self.core.take() else {
            return Err(StorageError::Io(format!(
                "{}: the store is unusable after an earlier failure",
                self.path.display()
            )));
        };
        let (core, res) = tokio::task::spawn_blocking(move || {
            let res = op(&mut core);
            (core, res)
        })
        .await
        .map_err(|e| io_err(&self.path, format!("storage task failed: {e}")))?;
        self.core = Some(core);
        res
    }
}

impl Core {
    fn open(path: &Path) -> Result<Self, StorageError> {
        let path = path.to_path_buf();
        let fresh = match std::fs::read_dir(&path) {
            Ok(mut it) => it.next().is_none(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => return Err(io_err(&path, e)),
        };
        let has_sled_files = path.join("conf").is_file() && path.join("db").is_file();
        if !fresh && !has_sled_files {
            if path.join(MARKER_FILE).exists() {
                return Err(StorageError::Corrupt(format!(
                    "{}: sled's files are missing from a raft-log store",
                    path.display()
                )));
            }
            let wal = std::fs::read_dir(&path)
                .map_err(|e| io_err(&path, e))?
                .flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".wal"));
            if wal {
                return Err(StorageError::Corrupt(format!(
                    "{}: the directory is not a sled database: it holds a segment log \
                     (raft-log-wal); start the node with the log engine that wrote it",
                    path.display()
                )));
            }
            return Err(StorageError::Corrupt(format!(
                "{}: the directory is not empty and is not a sled database (no conf/db files)",
                path.display()
            )));
        }
        let opened = open_sled(&path);
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(sled::Error::Io(e))) if e.kind() != std::io::ErrorKind::InvalidData => {
                return Err(io_err(&path, e))
            }
            Ok(Err(e)) => {
                return Err(StorageError::Corrupt(format!(
                    "{}: sled cannot open it: {e}",
                    path.display()
                )))
            }
            Err(_) => {
                return Err(StorageError::Corrupt(format!(
                    "{}: sled failed while reading the files (damaged database)",
                    path.display()
                )))
            }
        };
        let mut store = Core {
            db,
            path,
            purged: LogId::default(),
            last: 0,
            stale_runs: true,
        };
        store.check_magic()?;
        store.check_marker()?;
        let state = store.read_state()?;
        store.purged = state.purged;
        store.last = state.entries.last().map_or(state.purged.index, |e| e.index);
        Ok(store)
    }

    fn check_magic(&self) -> Result<(), StorageError> {
        let guard = |r: sled::Result<Option<sled::IVec>>| r.map_err(|e| io_err(&self.path, e));
        match guard(self.db.get(MAGIC_KEY))? {
            Some(m) if m.as_ref() == MAGIC => Ok(()),
            Some(m) if m.as_ref() == MAGIC_V2 => Err(StorageError::Corrupt(format!(
                "{}: written by an older raft-log (format 2, memberships without learners and addresses); restore the node from a backup or a peer's snapshot into a new directory",
                self.path.display()
            ))),
            Some(m) => Err(StorageError::Corrupt(format!(
                "{}: unknown format marker {:?}",
                self.path.display(),
                String::from_utf8_lossy(&m)
            ))),
            None => {
                // Only a database with nothing in it may be adopted (a crash
                // right after creation leaves exactly that), and only if it was
                // never a finished store: then the marker file would exist.
                if self.path.join(MARKER_FILE).exists() {
                    return Err(StorageError::Corrupt(format!(
                        "{}: the database lost its contents (damaged or truncated files)",
                        self.path.display()
                    )));
                }
                let names = self.db.tree_names();
                let empty = self.db.is_empty() && names.len() <= 1;
                if !empty {
                    return Err(StorageError::Corrupt(format!(
                        "{}: a sled database of another program (no raft-log marker)",
                        self.path.display()
                    )));
                }
                self.db
                    .insert(MAGIC_KEY, MAGIC)
                    .map_err(|e| io_err(&self.path, e))?;
                self.db.flush().map_err(|e| io_err(&self.path, e))?;
                Ok(())
            }
        }
    }

    fn check_marker(&self) -> Result<(), StorageError> {
        let marker = self.path.join(MARKER_FILE);
        match std::fs::read(&marker) {
            Ok(m) if m == MAGIC => Ok(()),
            Ok(_) => Err(StorageError::Corrupt(format!(
                "{}: damaged marker file",
                marker.display()
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Written last at creation; missing only if creation was cut short.
                let st = self.read_state()?;
                if st != LogState::default() {
                    return Err(StorageError::Corrupt(format!(
                        "{}: the marker file is missing from a store that holds data",
                        self.path.display()
                    )));
                }
                write_synced(&marker, MAGIC).map_err(|e| io_err(&marker, e))
            }
            Err(e) => Err(io_err(&marker, e)),
        }
    }

    /// Reads and validates the whole state.
    fn read_state(&self) -> Result<LogState, StorageError> {
        let path = &self.path;
        let get = |k: &[u8]| self.db.get(k).map_err(|e| io_err(path, e));
        let hard_state: HardState = match get(HARD_KEY)? {
            Some(v) => decode(&v, "hard state", path)?,
            None => HardState::default(),
        };
        let purged: LogId = match get(SNAP_KEY)? {
            Some(v) => decode(&v, "compaction point", path)?,
            None => LogId::default(),
        };
        let membership: Option<Membership> = match get(MEMBERS_KEY)? {
            Some(v) => Some(decode(&v, "membership", path)?),
            None => None,
        };
        let snapshot: Option<SnapshotMeta> = match get(LATEST_SNAPSHOT_KEY)? {
            Some(v) => Some(decode(&v, "snapshot record", path)?),
            None => None,
        };
        let incarnation: u64 = match get(IDENTITY_KEY)? {
            Some(v) => decode(&v, "storage identity", path)?,
            None => 0,
        };
        let mut entries: Vec<Entry> = Vec::new();
        let mut expect = purged.index + 1;
        // Runs wholly below the compaction point may linger (a purge deletes
        // them lazily): start at the run that holds the entry after it.
        let start = self
            .db
            .range(&entry_key(0)[..]..=&entry_key(expect)[..])
            .keys()
            .next_back()
            .transpose()
            .map_err(|e| io_err(path, e))?
            .map_or_else(|| entry_key(0).to_vec(), |k| k.to_vec());
        for kv in self.db.range(&start[..]..) {
            let (k, v) = kv.map_err(|e| io_err(path, e))?;
            if !k.starts_with(ENTRY_PREFIX) {
                break;
            }
            let first = key_index(&k).ok_or_else(|| {
                StorageError::Corrupt(format!("{}: malformed entry key", path.display()))
            })?;
            let mut run: Vec<Entry> = decode(&v, &format!("entries from {first}"), path)?;
            let contiguous = run
                .iter()
                .enumerate()
                .all(|(i, e)| e.index == first + i as u64);
            if contiguous && !run.is_empty() && first < expect && first <= purged.index {
                // The run straddles the compaction point: keep what follows it.
                let below = ((expect - first) as usize).min(run.len());
                run.drain(..below);
                expect += run.len() as u64;
                entries.extend(run);
                continue;
            }
            if first != expect || run.is_empty() || !contiguous {
                return Err(StorageError::Corrupt(format!(
                    "{}: log gap or misplaced entries: expected index {expect}, found a run keyed {first}",
                    path.display()
                )));
            }
            expect += run.len() as u64;
            entries.extend(run);
        }
        Ok(LogState {
            hard_state,
            purged,
            entries,
            membership,
            snapshot,
            incarnation,
        })
    }

    /// Adds to `b` the edits that remove every entry from `at` on
    /// (truncation). A run that straddles `at` is rewritten.
    fn truncate_runs(&self, b: &mut sled::Batch, at: LogIndex) -> Result<(), StorageError> {
        let path = &self.path;
        let lo = entry_key(0);
        let at_key = entry_key(at);
        // The run holding `at - 1`..`at`, if it starts below `at`.
        let straddle = self
            .db
            .range(&lo[..]..&at_key[..])
            .next_back()
            .transpose()
            .map_err(|e| io_err(path, e))?;
        if let Some((k, v)) = straddle {
            let first = key_index(&k).ok_or_else(|| {
                StorageError::Corrupt(format!("{}: malformed entry key", path.display()))
            })?;
            let run: Vec<Entry> = decode(&v, &format!("entries from {first}"), path)?;
            let last = first + run.len() as u64 - 1;
            if last >= at {
                let split = (at - first) as usize;
                b.insert(&k, encode(&&run[..split])?);
            }
        }
        let range: Vec<sled::IVec> = self
            .db
            .range(&at_key[..]..)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| io_err(path, e))?;
        for k in range {
            if k.starts_with(ENTRY_PREFIX) {
                b.remove(k);
            }
        }
        Ok(())
    }

    /// Adds to `b` the deletion of up to `SWEEP_PER_WRITE` runs that lie
    /// wholly at or below the compaction point. Runs are contiguous, so every
    /// run before the last one starting at or below `snapshot + 1` is such a run.
    fn sweep(&mut self, b: &mut sled::Batch) -> Result<(), StorageError> {
        if !self.stale_runs {
            return Ok(());
        }
        let keys: Vec<sled::IVec> = self
            .db
            .range(&entry_key(0)[..]..=&entry_key(self.purged.index + 1)[..])
            .keys()
            .take(SWEEP_PER_WRITE + 1)
            .collect::<Result<_, _>>()
            .map_err(|e| io_err(&self.path, e))?;
        let n = if keys.len() > SWEEP_PER_WRITE {
            SWEEP_PER_WRITE
        } else {
            // The last key found holds the entry after the point (or is the
            // first run above it): it stays. Nothing else is left to sweep.
            self.stale_runs = false;
            keys.len().saturating_sub(1)
        };
        for k in &keys[..n] {
            b.remove(k);
        }
        Ok(())
    }

    /// Applies `b` and flushes (sled's fsync).
    fn write(&self, b: sled::Batch) -> Result<(), StorageError> {
        self.db.apply_batch(b).map_err(|e| io_err(&self.path, e))?;
        self.db.flush().map_err(|e| io_err(&self.path, e))?;
        Ok(())
    }

    fn save(&mut self, batch: LogBatch) -> Result<(), StorageError> {
        let end = check_batch(self.purged.index, self.last, &batch)?;
        let mut b = sled::Batch::default();
        if let Some(m) = &batch.install {
            // Entries after the snapshot go now; those up to it are below
            // the new compaction point and go lazily.
            let after = m.last.index.saturating_add(1);
            if after <= self.last {
                self.truncate_runs(&mut b, after)?;
            }
            b.insert(SNAP_KEY, encode(&m.last)?);
            b.insert(MEMBERS_KEY, encode(&m.membership)?);
            b.insert(LATEST_SNAPSHOT_KEY, encode(m)?);
        }
        if let Some(m) = &batch.snapshot {
            b.insert(LATEST_SNAPSHOT_KEY, encode(m)?);
        }
        if let Some(t) = batch.truncate_from {
            if t <= self.last {
                self.truncate_runs(&mut b, t)?;
            }
        }
        if let Some(hs) = &batch.hard_state {
            b.insert(HARD_KEY, encode(hs)?);
        }
        if let Some(m) = &batch.membership {
            b.insert(MEMBERS_KEY, encode(m)?);
        }
        if let Some(i) = &batch.incarnation {
            b.insert(IDENTITY_KEY, encode(i)?);
        }
        for run in batch.entries.chunks(RUN_LEN) {
            b.insert(&entry_key(run[0].index)[..], encode(&run)?);
        }
        self.sweep(&mut b)?;
        self.write(b)?;
        if let Some(m) = &batch.install {
            self.purged = m.last;
            self.stale_runs = true;
        }
        self.last = batch.entries.last().map_or(end, |e| e.index);
        Ok(())
    }

    fn purge(&mut self, upto: LogId) -> Result<(), StorageError> {
        if upto.index <= self.purged.index {
            return Ok(());
        }
        if upto.index > self.last {
            return Err(StorageError::Invalid(format!(
                "purge to {} past the last index {}",
                upto.index, self.last
            )));
        }
        // Recording the point is the purge; the runs below it go lazily.
        let mut b = sled::Batch::default();
        b.insert(SNAP_KEY, encode(&upto)?);
        self.write(b)?;
        self.purged = upto;
        self.stale_runs = true;
        Ok(())
    }
}

impl Drop for SledLogStore {
    /// sled flushes when it closes; on a full or hung disk that flush never
    /// returns. It happens on a thread of its own, never on the caller's
    /// (an async runtime's thread blocked there would stall every task it
    /// was about to run). Every save was already flushed.
    fn drop(&mut self) {
        if let Some(core) = self.core.take() {
            let _ = std::thread::Builder::new()
                .name("raft-log-close".into())
                .spawn(move || drop(core));
        }
    }
}

#[async_trait]
impl LogStore for SledLogStore {
    async fn load(&mut self) -> Result<LogState, StorageError> {
        self.run(|c| c.read_state()).await
    }

    async fn save(&mut self, batch: LogBatch) -> Result<(), StorageError> {
        self.run(move |c| c.save(batch)).await
    }

    async fn purge(&mut self, upto: LogId) -> Result<(), StorageError> {
        self.run(move |c| c.purge(upto)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft_core::EntryPayload;

    fn entries(from: LogIndex, n: u64) -> Vec<Entry> {
        (from..from + n)
            .map(|i| Entry {
                term: 1,
                index: i,
                payload: EntryPayload::Command(i.to_be_bytes().to_vec().into()),
            })
            .collect()
    }

    fn run_keys(s: &SledLogStore) -> Vec<LogIndex> {
        let Some(core) = s.core.as_ref() else {
            return Vec::new();
        };
        core.db
            .scan_prefix(ENTRY_PREFIX)
            .keys()
            .map(|k| key_index(&k.unwrap()).unwrap())
            .collect()
    }

    async fn save(s: &mut SledLogStore, from: LogIndex, n: u64) {
        s.save(LogBatch {
            entries: entries(from, n),
            ..Default::default()
        })
        .await
        .unwrap();
    }

    /// A purge records the point at once; the runs below it are deleted by
    /// later writes, a bounded number at a time, and every load in between
    /// (also after reopening) returns exactly the entries after the point.
    #[tokio::test]
    async fn purge_is_lazy_and_loads_never_see_purged_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut s = SledLogStore::open(&path).unwrap();
        // 600 runs of 10 entries each.
        for r in 0..600u64 {
            save(&mut s, 1 + r * 10, 10).await;
        }
        // The point falls inside the run 5551..=5560.
        s.purge(LogId::new(1, 5555)).await.unwrap();
        let check = |st: LogState| {
            assert_eq!(st.purged, LogId::new(1, 5555));
            let idx: Vec<LogIndex> = st.entries.iter().map(|e| e.index).collect();
            assert_eq!(idx, (5556..=6000).collect::<Vec<_>>());
            assert_eq!(st.entries[0], entries(5556, 1)[0]);
        };
        check(s.load().await.unwrap());
        assert!(run_keys(&s).len() > 500, "nothing deleted yet");
        drop(s);
        let mut s = SledLogStore::open(&path).unwrap();
        check(s.load().await.unwrap());
        // Each write deletes at most SWEEP_PER_WRITE obsolete runs.
        let left_below = |s: &SledLogStore| run_keys(s).iter().filter(|&&k| k <= 5555).count();
        assert_eq!(left_below(&s), 556, "runs from 1, 11, ..., 5551");
        save(&mut s, 6001, 1).await;
        assert_eq!(left_below(&s), 556 - SWEEP_PER_WRITE);
        save(&mut s, 6002, 1).await;
        save(&mut s, 6003, 1).await;
        // Only the run that straddles the point is left below it.
        assert_eq!(
            run_keys(&s)
                .iter()
                .filter(|&&k| k <= 5555)
                .collect::<Vec<_>>(),
            vec![&5551]
        );
        let st = s.load().await.unwrap();
        assert_eq!(st.entries.first().unwrap().index, 5556);
        assert_eq!(st.entries.last().unwrap().index, 6003);
        // A later purge past the straddling run lets it go too.
        s.purge(LogId::new(1, 5570)).await.unwrap();
        save(&mut s, 6004, 1).await;
        assert!(run_keys(&s).iter().all(|&k| k > 5560));
        drop(s);
        let mut s = SledLogStore::open(&path).unwrap();
        let st = s.load().await.unwrap();
        assert_eq!(st.purged, LogId::new(1, 5570));
        assert_eq!(
            st.entries.iter().map(|e| e.index).collect::<Vec<_>>(),
            (5571..=6004).collect::<Vec<_>>()
        );
    }
}
