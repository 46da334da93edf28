//! A durable Raft log ([`LogStore`]) on append-only segment files: each
//! `save` or `purge` is one record written at the end of the current
//! segment and one `fdatasync`, nothing else. Where `raft-log` (on sled)
//! keeps the log in a B-tree and pays for its page writes, this store pays
//! for the bytes of the batch and the sync alone.
//!
//! ```no_run
//! # async fn f() -> Result<(), raft_core::StorageError> {
//! use raft_core::LogStore;
//! let mut log = raft_log_wal::WalLogStore::open_async("/var/lib/node-1/log").await?;
//! let state = log.load().await?;
//! # Ok(()) }
//! ```
//!
//! # On disk
//!
//! A directory of segments `<sequence, 16 hex digits>.wal`, and `LOCK`
//! (held while a process uses the store). A segment is the 8-byte magic
//! `RAFTWAL1` and then records, each `length (u32 LE) | CRC-32 of the
//! length and the payload (u32 LE) | payload (bincode) | zeros to the next
//! multiple of 8`: a header never straddles two disk sectors, so a power
//! loss leaves it whole or not written. The first segment begins with a
//! checkpoint: the whole state (term and vote, compaction point, entries
//! after it, membership, latest snapshot, identity). Every later record is
//! a batch or a purge, applied to it in order.
//!
//! When the current segment passes its size (64 MiB by default), the store
//! starts the next one (written under a temporary name, synced, renamed,
//! the directory synced). It begins with a continuation: the same state
//! less the entries, and the id of the last entry, which the segment before
//! it must end at. Nothing of the log is copied, so starting a segment
//! costs the same whatever the log holds. A segment is deleted once the
//! compaction point reaches the last entry the log held when the segment
//! after it began: nothing in it is needed any more.
//!
//! Opening replays the newest run of consecutive segments, oldest first.
//! When the oldest is a continuation (the ones before it are deleted), the
//! entries it does not hold were compacted by a purge still to come in its
//! records; until that purge, replay skips entries and truncations at or
//! below the continuation's last entry, and the store refuses to open if
//! the purge never comes (a segment that was needed is missing). The state
//! is kept in memory as well (the node's engine keeps the same entries).
//!
//! # Crashes and damage
//!
//! A segment grows 4 MiB at a time, written as zeros and synced once, so
//! that a record's `fdatasync` writes data into blocks the file already
//! has; a zero length where the next record would start ends the records.
//!
//! Deleting old segments and freeing purged entries happen on a thread
//! of the store's own, so that saves do not wait for them
//! ([`WalLogStore::settle`] waits for them).
//!
//! Deleting an old segment is not synced: a crash can bring one back,
//! either before a gap (ignored and deleted again) or still followed by
//! its successor (replayed, then deleted again).
//!
//! A crash can leave the last record half written (never an earlier one:
//! each was synced before the next began), inside space the file already
//! had. Opening cuts it off when only zeros follow it. Everything else is
//! corruption and the store refuses to open, saying where: a record whose
//! checksum fails with data after it, a checksum that matches on a record
//! that does not decode, a header claiming more than the file holds (or a
//! file cut short), a segment without its checkpoint, foreign files,
//! entries that do not follow on. One case cannot be told from a crash: a
//! header damaged to all zeros reads as the end of the log (a crash can
//! lose the first page of an unacknowledged write and keep later ones).
//! The store assumes, as any log on a disk does, that a sector is written
//! whole or not at all, and that a process exits after a failed sync
//! (reopening in the same process could read back what never reached the
//! disk).

use raft_core::storage::{apply_batch, apply_purge, check_batch, take_purged, LogBatch, LogState};
use raft_core::{
    Entry, HardState, LogId, LogIndex, LogStore, Membership, SnapshotMeta, StorageError,
};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"RAFTWAL1";
const RECORD_HEADER: u64 = 8;
/// The largest record (a checkpoint holds the whole log after compaction).
const MAX_RECORD: u64 = 1 << 30;
const LOCK_FILE: &str = "LOCK";
const SUFFIX: &str = ".wal";
const TMP_SUFFIX: &str = ".wal.tmp";

/// The default segment size past which the store starts a new segment.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

/// Space a segment is grown by, written as zeros and synced once, so that a
/// record's `fdatasync` writes data into blocks the file already has:
/// growing the file on every append made each sync commit file system
/// metadata too (5x slower for a batch of 16 entries on ext4).
const PREALLOCATE: u64 = 4 << 20;

/// What [`WalLogStore::open_with`] may change.
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// A new segment starts once the current one holds this many bytes.
    pub segment_bytes: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
        }
    }
}

/// A record as written (borrowing what it writes).
#[derive(Serialize)]
enum RecordOut<'a> {
    Checkpoint(CheckpointOut<'a>),
    Batch(BatchOut<'a>),
    Purge(LogId),
    Continue(ContinueOut<'a>),
}

/// A record as read. Variants and fields in the same order as `RecordOut`.
#[derive(Deserialize)]
enum RecordIn {
    Checkpoint(CheckpointIn),
    Batch(BatchIn),
    Purge(LogId),
    Continue(ContinueIn),
}

#[derive(Serialize)]
struct CheckpointOut<'a> {
    hard_state: &'a HardState,
    purged: &'a LogId,
    entries: &'a [Entry],
    membership: &'a Option<Membership>,
    snapshot: &'a Option<SnapshotMeta>,
    incarnation: u64,
}

#[derive(Deserialize)]
struct CheckpointIn {
    hard_state: HardState,
    purged: LogId,
    entries: Vec<Entry>,
    membership: Option<Membership>,
    snapshot: Option<SnapshotMeta>,
    incarnation: u64,
}

/// The first record of every segment after the first: the state when the
/// segment began, less the entries (they stay in the older segments).
#[derive(Serialize)]
struct ContinueOut<'a> {
    hard_state: &'a HardState,
    purged: &'a LogId,
    membership: &'a Option<Membership>,
    snapshot: &'a Option<SnapshotMeta>,
    incarnation: u64,
    /// The last entry then (`purged` when there was none).
    last: LogId,
}

#[derive(Deserialize)]
struct ContinueIn {
    hard_state: HardState,
    purged: LogId,
    membership: Option<Membership>,
    snapshot: Option<SnapshotMeta>,
    incarnation: u64,
    last: LogId,
}

#[derive(Serialize)]
struct BatchOut<'a> {
    hard_state: &'a Option<HardState>,
    truncate_from: &'a Option<LogIndex>,
    entries: &'a [Entry],
    membership: &'a Option<Membership>,
    install: &'a Option<SnapshotMeta>,
    snapshot: &'a Option<SnapshotMeta>,
    incarnation: &'a Option<u64>,
}

#[derive(Deserialize)]
struct BatchIn {
    hard_state: Option<HardState>,
    truncate_from: Option<LogIndex>,
    entries: Vec<Entry>,
    membership: Option<Membership>,
    install: Option<SnapshotMeta>,
    snapshot: Option<SnapshotMeta>,
    incarnation: Option<u64>,
}

impl From<BatchIn> for LogBatch {
    fn from(b: BatchIn) -> Self {
        LogBatch {
            hard_state: b.hard_state,
            truncate_from: b.truncate_from,
            entries: b.entries,
            membership: b.membership,
            install: b.install,
            snapshot: b.snapshot,
            incarnation: b.incarnation,
        }
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> StorageError {
    StorageError::Io(format!("{}: {e}", path.display()))
}

fn corrupt(path: &Path, e: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(format!("{}: {e}", path.display()))
}

/// The CRC-32 of a record: over its length field and its payload.
fn record_crc(len: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Rounds up to a multiple of 8: records start 8-aligned, so a header never
/// straddles two disk sectors (a power loss cannot leave half of one).
fn align8(n: u64) -> u64 {
    n.div_ceil(8) * 8
}

/// A record framed for the file: header, payload and zero padding to the
/// next 8-byte boundary, in one buffer (one write).
fn frame(rec: &RecordOut<'_>) -> Result<Vec<u8>, StorageError> {
    let mut buf = vec![0u8; RECORD_HEADER as usize];
    bincode::serde::encode_into_std_write(rec, &mut buf, bincode::config::standard())
        .map_err(|e| StorageError::Invalid(format!("cannot encode a log record: {e}")))?;
    let len = u32::try_from(buf.len() - RECORD_HEADER as usize)
        .ok()
        .filter(|&l| u64::from(l) <= MAX_RECORD)
        .ok_or_else(|| StorageError::Invalid("a log record over 1 GiB".into()))?;
    let crc = record_crc(len, &buf[RECORD_HEADER as usize..]);
    buf[..4].copy_from_slice(&len.to_le_bytes());
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
    buf.resize(align8(buf.len() as u64) as usize, 0);
    Ok(buf)
}

fn segment_name(seq: u64) -> String {
    format!("{seq:016x}{SUFFIX}")
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, format!("cannot sync the directory: {e}")))
}

/// How reading a segment's records ended.
enum Tail {
    /// At the end of the file.
    Clean,
    /// At this offset, where only the zeros of preallocated space follow.
    Zeros(u64),
    /// At a damaged record nothing valid can follow: cut the file here.
    Torn(u64),
}

/// Reads the records of a segment, calling `each` on every valid one with
/// its index (0: the checkpoint).
fn read_segment(
    path: &Path,
    mut each: impl FnMut(usize, RecordIn) -> Result<(), StorageError>,
) -> Result<Tail, StorageError> {
    let mut f = File::open(path).map_err(|e| io_err(path, e))?;
    let size = f.metadata().map_err(|e| io_err(path, e))?.len();
    let mut magic = [0u8; 8];
    if size < 8 || f.read_exact(&mut magic).is_err() || &magic != MAGIC {
        return Err(corrupt(path, "not a raft-log-wal segment (bad magic)"));
    }
    let mut r = std::io::BufReader::with_capacity(1 << 20, f);
    let mut at = 8u64;
    let mut n = 0usize;
    let mut payload = Vec::new();
    'records: while at < size {
        // A record a crash can have left half written is the last one
        // (each earlier one was synced before the next began), in space
        // the file already had (preallocated, synced): its 8-aligned header
        // is whole or still zeros. So a damaged record is torn when only
        // zeros follow it; anything else is damage.
        let why = 'bad: {
            if size - at < RECORD_HEADER {
                break 'bad "the file ends inside a record header".to_string();
            }
            let mut h = [0u8; 8];
            r.read_exact(&mut h).map_err(|e| io_err(path, e))?;
            let len32 = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
            let len = u64::from(len32);
            let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
            if h == [0; 8] {
                // The end of the records, in preallocated space. Non-zero
                // bytes after it are the later pages of an unacknowledged
                // write whose first page a crash lost.
                if n == 0 {
                    break 'bad "a zero header where the checkpoint should be".to_string();
                }
                if only_zeros_after(path, at, size)? {
                    return Ok(Tail::Zeros(at));
                }
                tracing::warn!(
                    path = %path.display(),
                    at,
                    "discarding the remains of a write a crash interrupted"
                );
                return Ok(Tail::Torn(at));
            }
            let end = at + RECORD_HEADER + align8(len);
            if len == 0 || len > MAX_RECORD || end > size {
                return Err(corrupt(
                    path,
                    format!("byte {at}: a record header claiming {len} bytes"),
                ));
            }
            payload.resize(len as usize, 0);
            r.read_exact(&mut payload).map_err(|e| io_err(path, e))?;
            let mut pad = [0u8; 8];
            r.read_exact(&mut pad[..(end - at - RECORD_HEADER - len) as usize])
                .map_err(|e| io_err(path, e))?;
            if record_crc(len32, &payload) != crc {
                if n > 0 && only_zeros_after(path, end, size)? {
                    tracing::warn!(
                        path = %path.display(),
                        at,
                        "cutting off a record a crash left half written"
                    );
                    return Ok(Tail::Torn(at));
                }
                break 'bad "a checksum mismatch".to_string();
            }
            // The checksum matches: the write was whole, so a record that
            // does not decode is damage (or another format), never torn.
            let rec: RecordIn =
                match bincode::serde::decode_from_slice(&payload, bincode::config::standard()) {
                    Ok((rec, used)) if used == payload.len() => rec,
                    Ok(_) => break 'bad "trailing bytes in a record".to_string(),
                    Err(e) => break 'bad format!("an undecodable record: {e}"),
                };
            each(n, rec).map_err(|e| match e {
                StorageError::Corrupt(m) | StorageError::Invalid(m) => {
                    corrupt(path, format!("record {n} at byte {at}: {m}"))
                }
                other => other,
            })?;
            n += 1;
            at = end;
            continue 'records;
        };
        return Err(corrupt(path, format!("byte {at}: {why}")));
    }
    if n == 0 {
        return Err(corrupt(path, "a segment without its checkpoint"));
    }
    Ok(Tail::Clean)
}

/// True when every byte of `path` from `from` to `size` is zero.
fn only_zeros_after(path: &Path, from: u64, size: u64) -> Result<bool, StorageError> {
    if from >= size {
        return Ok(true);
    }
    let mut f = File::open(path).map_err(|e| io_err(path, e))?;
    f.seek(SeekFrom::Start(from)).map_err(|e| io_err(path, e))?;
    let mut buf = vec![0u8; 1 << 16];
    let mut rest = size - from;
    while rest > 0 {
        let n = (rest as usize).min(buf.len());
        f.read_exact(&mut buf[..n]).map_err(|e| io_err(path, e))?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        rest -= n as u64;
    }
    Ok(true)
}

/// Work done on a thread of the store's own, off the path of saves: under
/// load a purge drops some 190,000 entries (80 ms here, freeing each
/// one's buffer) and deletes a 64 MiB segment (25 ms), and every save
/// waits behind a purge.
enum Chore {
    Delete(PathBuf),
    Drop(Vec<Entry>),
    Done(std::sync::mpsc::SyncSender<()>),
}

impl Chore {
    fn run(self) {
        match self {
            Chore::Delete(p) => match std::fs::remove_file(&p) {
                Ok(()) => tracing::debug!(path = %p.display(), "deleted an old log segment"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // Opening deletes it again; the log is whole.
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "cannot delete an old log segment")
                }
            },
            Chore::Drop(entries) => drop(entries),
            Chore::Done(tx) => {
                let _ = tx.send(());
            }
        }
    }
}

/// The thread that does the chores, in order. Dropping it waits for the
/// queued ones (a store reopened in the same process must not find a
/// segment being deleted under it).
struct Janitor {
    tx: Option<std::sync::mpsc::Sender<Chore>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Janitor {
    fn start() -> Janitor {
        let (tx, rx) = std::sync::mpsc::channel::<Chore>();
        match std::thread::Builder::new()
            .name("raft-log-wal".into())
            .spawn(move || rx.into_iter().for_each(Chore::run))
        {
            Ok(thread) => Janitor {
                tx: Some(tx),
                thread: Some(thread),
            },
            // No thread: the chores are done in place.
            Err(_) => Janitor {
                tx: None,
                thread: None,
            },
        }
    }

    fn run(&self, chore: Chore) {
        match &self.tx {
            Some(tx) => {
                if let Err(std::sync::mpsc::SendError(chore)) = tx.send(chore) {
                    chore.run();
                }
            }
            None => chore.run(),
        }
    }

    /// Waits until the chores queued so far are done.
    fn wait(&self) {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.run(Chore::Done(tx));
        let _ = rx.recv();
    }
}

impl Drop for Janitor {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An older segment, kept until the compaction point reaches the last entry
/// the log held when the segment after it began: from then on nothing in it
/// is needed.
struct Older {
    seq: u64,
    until: LogIndex,
}

struct Core {
    dir: PathBuf,
    opts: WalOptions,
    /// Deletes old segments and drops purged entries; joined (on drop)
    /// before the lock is released.
    janitor: Janitor,
    /// Held (locked) while the store is open.
    _lock: File,
    file: File,
    file_path: PathBuf,
    seq: u64,
    /// Bytes of records in the current segment (where the next one goes).
    len: u64,
    /// The segment file's size: `len` plus preallocated zeros.
    allocated: u64,
    state: LogState,
    /// The segment size at which to start a new segment (later again when
    /// one could not be written).
    next_check: u64,
    /// Older segments, oldest first.
    older: VecDeque<Older>,
}

/// The id of the last entry of `state` (the compaction point when none).
fn last_id(state: &LogState) -> LogId {
    state.entries.last().map_or(state.purged, |e| LogId {
        term: e.term,
        index: e.index,
    })
}

/// The state rebuilt from the records of consecutive segments, oldest first.
#[derive(Default)]
struct Replay {
    state: LogState,
    /// Set while replaying from a segment whose older segments are gone:
    /// they held the entries up to this index, which a later purge (still
    /// to come in the records) compacted. Until that purge, entries and
    /// truncations at or below it are skipped.
    floor: Option<LogIndex>,
}

impl Replay {
    /// A segment that starts with the whole state.
    fn checkpoint(&mut self, c: CheckpointIn) -> Result<(), StorageError> {
        let mut prev = c.purged.index;
        for e in &c.entries {
            if Some(e.index) != prev.checked_add(1) {
                return Err(StorageError::Corrupt(format!(
                    "checkpoint entry {} does not follow {prev}",
                    e.index
                )));
            }
            prev = e.index;
        }
        self.state = LogState {
            hard_state: c.hard_state,
            purged: c.purged,
            entries: c.entries,
            membership: c.membership,
            snapshot: c.snapshot,
            incarnation: c.incarnation,
        };
        self.floor = None;
        Ok(())
    }

    /// A segment that continues the one before it; `first` when that one
    /// is gone.
    fn continuation(&mut self, c: ContinueIn, first: bool) -> Result<(), StorageError> {
        if first {
            self.state = LogState {
                hard_state: c.hard_state,
                purged: c.last,
                entries: Vec::new(),
                membership: c.membership,
                snapshot: c.snapshot,
                incarnation: c.incarnation,
            };
            self.floor = (c.purged.index < c.last.index).then_some(c.last.index);
            return Ok(());
        }
        let last = last_id(&self.state);
        // While entries below the floor are skipped, where the log ended
        // below it is not known, but nothing above it can be there.
        let unknown = self.floor.is_some_and(|f| c.last.index <= f);
        if (unknown && !self.state.entries.is_empty()) || (last != c.last && !unknown) {
            return Err(StorageError::Corrupt(format!(
                "the segment begins after entry {} (term {}), but the one before it ends at {} (term {})",
                c.last.index, c.last.term, last.index, last.term
            )));
        }
        // The rest of the state must match too: records lost from the end
        // of the segment before (a vote, a membership) would otherwise go
        // unnoticed. (The compaction point is made up while skipping.)
        let s = &self.state;
        if s.hard_state != c.hard_state
            || s.membership != c.membership
            || s.snapshot != c.snapshot
            || s.incarnation != c.incarnation
            || (self.floor.is_none() && s.purged != c.purged)
        {
            return Err(StorageError::Corrupt(
                "the segment does not continue the state the one before it ends with \
                 (records lost from its end?)"
                    .into(),
            ));
        }
        Ok(())
    }

    fn record(&mut self, rec: RecordIn) -> Result<(), StorageError> {
        match rec {
            RecordIn::Batch(b) => {
                let mut b = LogBatch::from(b);
                if let Some(f) = self.floor {
                    if b.install.is_some() {
                        // A snapshot replaces the whole log.
                        self.floor = None;
                    } else {
                        if b.truncate_from.is_some_and(|t| t <= f) {
                            b.truncate_from = Some(f + 1);
                        }
                        let skip = b.entries.iter().take_while(|e| e.index <= f).count();
                        b.entries.drain(..skip);
                    }
                }
                apply_batch(&mut self.state, b)
            }
            RecordIn::Purge(upto) => match self.floor {
                Some(f) if upto.index < f => Ok(()),
                Some(f) => {
                    self.floor = None;
                    if upto.index == f {
                        self.state.purged = upto;
                        Ok(())
                    } else {
                        apply_purge(&mut self.state, upto)
                    }
                }
                None => apply_purge(&mut self.state, upto),
            },
            RecordIn::Checkpoint(_) | RecordIn::Continue(_) => Err(StorageError::Corrupt(
                "a checkpoint after the first record".into(),
            )),
        }
    }
}

impl Core {
    fn open(dir: &Path, opts: WalOptions) -> Result<Core, StorageError> {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
            // The new directory's entry must survive a power loss too.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(|e| io_err(dir, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(io_err(dir, "the log is in use by another process"))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(dir, e)),
        }
        // sled's files (and raft-log's marker), whatever else is beside
        // them (sled's `snap.*`).
        if ["conf", "db", "RAFT_LOG_STORE"]
            .iter()
            .any(|f| dir.join(f).exists())
        {
            return Err(corrupt(
                dir,
                "this directory holds a sled log (raft-log), not a raft-log-wal log: \
                 start the node with the log engine that wrote it",
            ));
        }
        let mut segments = Vec::new();
        for ent in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
            let ent = ent.map_err(|e| io_err(dir, e))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            // `lost+found`: the log may be the root of its own file system.
            if name == LOCK_FILE || name == "lost+found" {
                continue;
            }
            if name.ends_with(TMP_SUFFIX) {
                // A new segment a crash interrupted before its rename.
                std::fs::remove_file(ent.path()).map_err(|e| io_err(&ent.path(), e))?;
                continue;
            }
            // Exactly the names this store writes (`from_str_radix` alone
            // would take "+..." or upper case, two names for one sequence).
            let seq = name
                .strip_suffix(SUFFIX)
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                .filter(|&seq| segment_name(seq) == name);
            match seq {
                Some(seq) => segments.push(seq),
                None => {
                    return Err(corrupt(
                        dir,
                        format!("a file that is not part of a raft-log-wal log: {name}"),
                    ))
                }
            }
        }
        segments.sort_unstable();
        if segments.is_empty() {
            return Self::create(dir, opts, lock);
        }
        // The log is the newest run of consecutive segments: older ones are
        // deleted oldest first, so what precedes a gap is what a crash kept
        // of deletions it interrupted. Replaying checks that the run holds
        // the whole log.
        let mut start = segments.len() - 1;
        while start > 0 && segments[start - 1] + 1 == segments[start] {
            start -= 1;
        }
        let mut stale: Vec<u64> = segments[..start].to_vec();
        let run = &segments[start..];
        let mut replay = Replay::default();
        // Each segment of the run with the last index the log held when it
        // began (`None`: it begins with the whole state).
        let mut bases: Vec<(u64, Option<LogIndex>)> = Vec::with_capacity(run.len());
        let mut tail = Tail::Clean;
        for (i, &seq) in run.iter().enumerate() {
            let path = dir.join(segment_name(seq));
            let mut base = None;
            tail = read_segment(&path, |n, rec| match (n, rec) {
                (0, RecordIn::Checkpoint(c)) => replay.checkpoint(c),
                (0, RecordIn::Continue(c)) => {
                    base = Some(c.last.index);
                    replay.continuation(c, i == 0)
                }
                (0, _) => Err(StorageError::Corrupt(
                    "the first record is not a checkpoint".into(),
                )),
                (_, rec) => replay.record(rec),
            })?;
            if i + 1 < run.len() && !matches!(tail, Tail::Clean | Tail::Zeros(_)) {
                // Every record of a segment was synced before the next
                // segment began: damage, not a crash.
                return Err(corrupt(
                    &path,
                    "a damaged record in a segment that is not the newest",
                ));
            }
            if base.is_none() {
                // A whole state: what came before it is superseded (a
                // crash interrupted deleting it).
                stale.extend(bases.drain(..).map(|(s, _)| s));
            }
            bases.push((seq, base));
        }
        if let Some(f) = replay.floor {
            return Err(corrupt(
                &dir.join(segment_name(run[0])),
                format!(
                    "the segments before this one are missing: they held entries up to {f}, \
                     which the log never compacted"
                ),
            ));
        }
        let seq = *run.last().expect("a segment");
        let path = dir.join(segment_name(seq));
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        let size = file.metadata().map_err(|e| io_err(&path, e))?.len();
        let (len, allocated) = match tail {
            Tail::Clean => (size, size),
            Tail::Zeros(at) => (at, size),
            Tail::Torn(at) => {
                // Cut the torn bytes off (new records must not land in
                // front of stale ones); the space is preallocated again.
                file.set_len(at)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| io_err(&path, e))?;
                (at, at)
            }
        };
        for old in stale {
            let p = dir.join(segment_name(old));
            std::fs::remove_file(&p).map_err(|e| io_err(&p, e))?;
        }
        let older = bases
            .windows(2)
            .map(|w| Older {
                seq: w[0].0,
                until: w[1].1.unwrap_or(0),
            })
            .collect();
        let mut core = Core {
            dir: dir.to_path_buf(),
            _lock: lock,
            file,
            file_path: path,
            seq,
            len,
            allocated,
            state: replay.state,
            next_check: opts.segment_bytes,
            opts,
            older,
            janitor: Janitor::start(),
        };
        core.drop_older();
        Ok(core)
    }

    /// A new store: segment 1 with an empty checkpoint.
    fn create(dir: &Path, opts: WalOptions, lock: File) -> Result<Core, StorageError> {
        let state = LogState::default();
        let rec = frame(&RecordOut::Checkpoint(CheckpointOut {
            hard_state: &state.hard_state,
            purged: &state.purged,
            entries: &state.entries,
            membership: &state.membership,
            snapshot: &state.snapshot,
            incarnation: state.incarnation,
        }))?;
        let (file, file_path, len) = Self::write_segment(dir, 1, &rec)?;
        Ok(Core {
            dir: dir.to_path_buf(),
            _lock: lock,
            file,
            file_path,
            seq: 1,
            len,
            allocated: len,
            state,
            next_check: opts.segment_bytes,
            opts,
            older: VecDeque::new(),
            janitor: Janitor::start(),
        })
    }

    /// Writes segment `seq` with `first` as its first record, durably
    /// (temporary name, sync, rename, directory sync); returns it open for
    /// appending.
    fn write_segment(
        dir: &Path,
        seq: u64,
        first: &[u8],
    ) -> Result<(File, PathBuf, u64), StorageError> {
        let path = dir.join(segment_name(seq));
        let tmp = dir.join(format!("{seq:016x}{TMP_SUFFIX}"));
        {
            let mut f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
            f.write_all(MAGIC)
                .and_then(|()| f.write_all(first))
                .and_then(|()| f.sync_all())
                .map_err(|e| io_err(&tmp, e))?;
        }
        std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
        sync_dir(dir)?;
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        let len = MAGIC.len() as u64 + first.len() as u64;
        Ok((file, path, len))
    }

    /// Appends one framed record and syncs it.
    fn append(&mut self, rec: &[u8]) -> Result<(), StorageError> {
        use std::os::unix::fs::FileExt;
        let need = self.len + rec.len() as u64;
        if need > self.allocated {
            let to = need + PREALLOCATE;
            let zeros = vec![0u8; 1 << 20];
            let mut at = self.allocated;
            while at < to {
                let n = (to - at).min(zeros.len() as u64) as usize;
                self.file
                    .write_all_at(&zeros[..n], at)
                    .map_err(|e| io_err(&self.file_path, e))?;
                at += n as u64;
            }
            self.file
                .sync_all()
                .map_err(|e| io_err(&self.file_path, e))?;
            self.allocated = to;
        }
        self.file
            .write_all_at(rec, self.len)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| io_err(&self.file_path, e))?;
        self.len = need;
        Ok(())
    }

    fn last(&self) -> LogIndex {
        last_id(&self.state).index
    }

    fn save(&mut self, batch: LogBatch) -> Result<(), StorageError> {
        if batch.is_empty() {
            return Ok(());
        }
        check_batch(self.state.purged.index, self.last(), &batch)?;
        let rec = frame(&RecordOut::Batch(BatchOut {
            hard_state: &batch.hard_state,
            truncate_from: &batch.truncate_from,
            entries: &batch.entries,
            membership: &batch.membership,
            install: &batch.install,
            snapshot: &batch.snapshot,
            incarnation: &batch.incarnation,
        }))?;
        self.append(&rec)?;
        apply_batch(&mut self.state, batch)?;
        // An installed snapshot can make older segments unneeded.
        self.drop_older();
        self.maybe_rotate()
    }

    fn purge(&mut self, upto: LogId) -> Result<(), StorageError> {
        if upto.index <= self.state.purged.index {
            return Ok(());
        }
        if upto.index > self.last() {
            return Err(StorageError::Invalid(format!(
                "purge to {} past the last index {}",
                upto.index,
                self.last()
            )));
        }
        self.append(&frame(&RecordOut::Purge(upto))?)?;
        let gone = take_purged(&mut self.state, upto)?;
        self.janitor.run(Chore::Drop(gone));
        self.drop_older();
        self.maybe_rotate()
    }

    /// Deletes the older segments compaction has passed, oldest first (on
    /// the janitor's thread). Not synced: a deletion a crash undoes leaves a
    /// segment that opening deletes again.
    fn drop_older(&mut self) {
        while let Some(o) = self.older.front() {
            if self.state.purged.index < o.until {
                break;
            }
            self.janitor
                .run(Chore::Delete(self.dir.join(segment_name(o.seq))));
            self.older.pop_front();
        }
    }

    /// Starts a new segment once the current one is full. The new one
    /// begins with the state less the entries (they stay where they are),
    /// so this costs a few hundred bytes and three syncs, whatever the
    /// log holds.
    fn maybe_rotate(&mut self) -> Result<(), StorageError> {
        if self.len < self.next_check {
            return Ok(());
        }
        let seq = self.seq + 1;
        let last = last_id(&self.state);
        let rec = frame(&RecordOut::Continue(ContinueOut {
            hard_state: &self.state.hard_state,
            purged: &self.state.purged,
            membership: &self.state.membership,
            snapshot: &self.state.snapshot,
            incarnation: self.state.incarnation,
            last,
        }))?;
        // The save that got here is durable already: a new segment that
        // cannot be written (a full disk) is tried again later, and the
        // current one goes on.
        let (file, path, len) = match Self::write_segment(&self.dir, seq, &rec) {
            Ok(made) => made,
            Err(e) => {
                let tmp = self.dir.join(format!("{seq:016x}{TMP_SUFFIX}"));
                let _ = std::fs::remove_file(tmp);
                // If it got as far as its name, it must go: it would take
                // the place of the records the current one receives from
                // now on.
                let made = self.dir.join(segment_name(seq));
                if made.exists() {
                    std::fs::remove_file(&made).map_err(|_| e.clone())?;
                    sync_dir(&self.dir).map_err(|_| e.clone())?;
                }
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot start a new log segment; keeping the current one");
                self.next_check = self.len + self.opts.segment_bytes / 4;
                return Ok(());
            }
        };
        self.older.push_back(Older {
            seq: self.seq,
            until: last.index,
        });
        self.file = file;
        self.file_path = path;
        self.seq = seq;
        self.len = len;
        self.allocated = len;
        self.next_check = self.opts.segment_bytes;
        tracing::debug!(dir = %self.dir.display(), seq, "started a new log segment");
        self.drop_older();
        Ok(())
    }
}

/// A [`LogStore`] on append-only segment files; see the crate docs.
pub struct WalLogStore {
    path: PathBuf,
    /// `None` while an operation runs on the blocking pool, and after one
    /// failed there.
    core: Option<Core>,
}

impl std::fmt::Debug for WalLogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalLogStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl WalLogStore {
    /// Opens (or creates) the store in directory `path`. Blocks: it reads
    /// the segments the log still needs.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        Self::open_with(path, WalOptions::default())
    }

    /// [`WalLogStore::open`] with options.
    pub fn open_with(path: impl AsRef<Path>, opts: WalOptions) -> Result<Self, StorageError> {
        let core = Core::open(path.as_ref(), opts)?;
        Ok(WalLogStore {
            path: core.dir.clone(),
            core: Some(core),
        })
    }

    /// [`WalLogStore::open`] on tokio's blocking pool.
    pub async fn open_async(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        let path = path.as_ref().to_path_buf();
        let p = path.clone();
        tokio::task::spawn_blocking(move || Self::open(p))
            .await
            .map_err(|e| io_err(&path, format!("opening failed: {e}")))?
    }

    /// The directory this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current segment's sequence number and size in bytes.
    pub fn segment(&self) -> Option<(u64, u64)> {
        self.core.as_ref().map(|c| (c.seq, c.len))
    }

    /// Waits until the work queued so far off the path of saves is done:
    /// deleting old segments, freeing purged entries. For tests and tools
    /// that look at the directory.
    pub fn settle(&self) {
        if let Some(c) = &self.core {
            c.janitor.wait();
        }
    }

    /// Runs `op` on the core, on the blocking pool (a write and an fsync
    /// must not hold up the async threads).
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
        // After an I/O error the file's end is unknown: refuse from then on.
        if !matches!(res, Err(StorageError::Io(_))) {
            self.core = Some(core);
        }
        res
    }
}

#[async_trait::async_trait]
impl LogStore for WalLogStore {
    async fn load(&mut self) -> Result<LogState, StorageError> {
        self.run(|c| Ok(c.state.clone())).await
    }

    async fn save(&mut self, batch: LogBatch) -> Result<(), StorageError> {
        self.run(move |c| c.save(batch)).await
    }

    async fn purge(&mut self, upto: LogId) -> Result<(), StorageError> {
        self.run(move |c| c.purge(upto)).await
    }
}
