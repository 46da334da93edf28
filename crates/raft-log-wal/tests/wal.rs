//! The segment-file log store: the log-store contract, new segments once
//! compaction drops most of one, and what opening does with what a crash
//! or damage leaves behind.

use async_trait::async_trait;
use raft_core::storage::{LogBatch, LogState};
use raft_core::testing::{log_store_conformance, StoreFactory};
use raft_core::{Entry, EntryPayload, HardState, LogId, LogStore, StorageError};
use raft_log_wal::{WalLogStore, WalOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

struct WalFactory {
    dirs: Vec<tempfile::TempDir>,
    opts: WalOptions,
}

#[async_trait]
impl StoreFactory for WalFactory {
    type Store = WalLogStore;

    async fn fresh(&mut self) -> WalLogStore {
        let dir = tempfile::tempdir().expect("temp dir");
        let store =
            WalLogStore::open_with(dir.path().join("log"), self.opts.clone()).expect("open");
        self.dirs.push(dir);
        store
    }

    async fn reopen(&mut self, store: WalLogStore) -> WalLogStore {
        let path = store.path().to_path_buf();
        drop(store);
        WalLogStore::open_with(&path, self.opts.clone()).expect("reopen store")
    }
}

#[tokio::test]
async fn wal_log_store_conforms() {
    log_store_conformance(WalFactory {
        dirs: Vec::new(),
        opts: WalOptions::default(),
    })
    .await;
}

/// The contract holds across segment changes too (a segment of 4 KiB
/// starts a new one at almost every compaction).
#[tokio::test]
async fn wal_log_store_conforms_with_tiny_segments() {
    log_store_conformance(WalFactory {
        dirs: Vec::new(),
        opts: WalOptions {
            segment_bytes: 4096,
        },
    })
    .await;
}

fn entries(term: u64, from: u64, n: u64) -> Vec<Entry> {
    (from..from + n)
        .map(|i| Entry {
            term,
            index: i,
            payload: EntryPayload::Command(vec![(i % 251) as u8; 200].into()),
        })
        .collect()
}

fn batch(from: u64, n: u64) -> LogBatch {
    LogBatch {
        entries: entries(1, from, n),
        ..Default::default()
    }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    v.sort();
    v
}

/// A store with 10 batches of 10 entries, term 3, vote 2, closed.
async fn filled(dir: &Path) -> LogState {
    let mut s = WalLogStore::open(dir).unwrap();
    s.save(LogBatch {
        hard_state: Some(HardState {
            term: 3,
            vote: Some(2),
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    for b in 0..10 {
        s.save(batch(1 + b * 10, 10)).await.unwrap();
    }
    s.load().await.unwrap()
}

#[tokio::test]
async fn compaction_moves_the_state_to_a_new_segment_and_drops_the_old() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let opts = WalOptions {
        segment_bytes: 64 << 10,
    };
    let mut s = WalLogStore::open_with(&dir, opts.clone()).unwrap();
    let mut next = 1;
    for round in 0..50u64 {
        s.save(batch(next, 20)).await.unwrap();
        next += 20;
        // Keep the last 10 entries.
        s.purge(LogId {
            term: 1,
            index: next - 11,
        })
        .await
        .unwrap();
        if round % 10 == 9 {
            let want = s.load().await.unwrap();
            drop(s);
            s = WalLogStore::open_with(&dir, opts.clone()).unwrap();
            assert_eq!(s.load().await.unwrap(), want, "round {round}");
        }
    }
    let (seq, len) = s.segment().unwrap();
    assert!(
        seq > 3,
        "50 rounds of 4 KiB over 64 KiB segments: segment {seq}"
    );
    assert!(len < 2 * (64 << 10), "segment {seq} holds {len} bytes");
    assert_eq!(segments(&dir).len(), 1, "older segments are deleted");
    let st = s.load().await.unwrap();
    assert_eq!(st.purged.index, next - 11);
    assert_eq!(st.entries.len(), 10);
}

/// Where the records of the store in `dir` end (it is closed again).
fn records_end(dir: &Path) -> u64 {
    WalLogStore::open(dir).unwrap().segment().unwrap().1
}

#[tokio::test]
async fn a_half_written_last_record_is_cut_off() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let before = filled(&dir).await;
    let seg = segments(&dir).pop().unwrap();
    let end0 = records_end(&dir) as usize;
    // Write one more batch, then keep only part of its record.
    {
        let mut s = WalLogStore::open(&dir).unwrap();
        s.save(batch(101, 5)).await.unwrap();
    }
    let end1 = records_end(&dir) as usize;
    let longer = std::fs::read(&seg).unwrap();
    assert!(longer.len() > end1, "the segment is preallocated");
    let zeros = vec![0u8; 8192];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("its last bytes not written", {
            let mut v = longer.clone();
            v[end1 - 16..end1 - 8].fill(0);
            v
        }),
        ("only its header written", {
            let mut v = longer.clone();
            v[end0 + 8..end1].fill(0);
            v
        }),
        ("its header lost, later bytes landed", {
            let mut v = longer.clone();
            v[end0..end0 + 8].fill(0);
            v
        }),
    ];
    for (what, bytes) in cases {
        std::fs::write(&seg, &bytes).unwrap();
        let mut s = WalLogStore::open(&dir).unwrap();
        assert_eq!(s.load().await.unwrap(), before, "{what}");
        // It goes on appending where the good records end, and the torn
        // bytes are not read back.
        s.save(batch(101, 1)).await.unwrap();
        drop(s);
        let mut s = WalLogStore::open(&dir).unwrap();
        let st = s.load().await.unwrap();
        assert_eq!(st.entries.last().unwrap().index, 101, "{what}");
        assert_eq!(st.entries.len(), before.entries.len() + 1, "{what}");
    }
    // Only zeros after the last record: the preallocated space.
    std::fs::write(&seg, [&longer[..end0], &zeros[..]].concat()).unwrap();
    let mut s = WalLogStore::open(&dir).unwrap();
    assert_eq!(s.load().await.unwrap(), before);
    drop(s);
    // A file cut short cannot come from a crash (records go into space the
    // file already has): it is refused, wherever the cut falls.
    for cut in [end0 + 3, end0 + 8, end1 - 1] {
        std::fs::write(&seg, &longer[..cut]).unwrap();
        assert!(
            matches!(open_err(&dir), StorageError::Corrupt(_)),
            "cut at {cut}"
        );
    }
}

/// The offset of the last record of a segment whose records end at `end`
/// (walking the 8-aligned frames from the magic).
fn last_record(bytes: &[u8], end: usize) -> usize {
    let mut at = 8;
    loop {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let next = at + 8 + len.div_ceil(8) * 8;
        if next >= end {
            return at;
        }
        at = next;
    }
}

fn open_err(dir: &Path) -> StorageError {
    match WalLogStore::open(dir) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e,
    }
}

#[tokio::test]
async fn damage_before_the_end_is_refused_not_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    filled(&dir).await;
    let seg = segments(&dir).pop().unwrap();
    let good = std::fs::read(&seg).unwrap();
    // A byte inside an early record (past the magic and the checkpoint).
    let end = records_end(&dir) as usize;
    for at in [200, end / 2] {
        let mut bad = good.clone();
        bad[at] ^= 0x40;
        std::fs::write(&seg, &bad).unwrap();
        let e = open_err(&dir);
        assert!(matches!(e, StorageError::Corrupt(_)), "byte {at}: {e}");
        assert!(e.to_string().contains(".wal"), "names the file: {e}");
    }
    // A record whose checksum matches but which does not decode (another
    // format): refused, not cut off as if torn. The last record is
    // rewritten with a valid frame around an unknown variant.
    let mut bad = good.clone();
    let last = last_record(&good, end);
    let payload = [0x7fu8, 1, 2, 3];
    let len = payload.len() as u32;
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(&payload);
    bad[last..last + 4].copy_from_slice(&len.to_le_bytes());
    bad[last + 4..last + 8].copy_from_slice(&h.finalize().to_le_bytes());
    bad[last + 8..last + 12].copy_from_slice(&payload);
    bad[last + 12..end].fill(0);
    std::fs::write(&seg, &bad).unwrap();
    let e = open_err(&dir);
    assert!(e.to_string().contains("undecodable"), "{e}");
    // Two names for one sequence are not this store's: refused, and the
    // live segment is left alone.
    std::fs::write(&seg, &good).unwrap();
    let plus = seg.with_file_name("+000000000000001.wal");
    std::fs::write(&plus, b"x").unwrap();
    assert!(matches!(open_err(&dir), StorageError::Corrupt(_)));
    std::fs::remove_file(&plus).unwrap();
    assert!(seg.exists());
    // A segment that is not one.
    std::fs::write(&seg, b"not a log at all").unwrap();
    assert!(matches!(open_err(&dir), StorageError::Corrupt(_)));
    std::fs::write(&seg, &good).unwrap();
    assert!(WalLogStore::open(&dir).is_ok());
}

#[tokio::test]
async fn a_foreign_or_busy_directory_is_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    // A sled log given to this engine.
    let sled_dir = tmp.path().join("sled");
    std::fs::create_dir_all(&sled_dir).unwrap();
    std::fs::write(sled_dir.join("conf"), b"x").unwrap();
    std::fs::write(sled_dir.join("db"), b"x").unwrap();
    let e = open_err(&sled_dir).to_string();
    assert!(e.contains("sled"), "{e}");
    // Some other file.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::File::create(other.join("notes.txt"))
        .unwrap()
        .write_all(b"hello")
        .unwrap();
    assert!(open_err(&other).to_string().contains("notes.txt"));
    // Two processes (or two handles) on one log.
    let dir = tmp.path().join("log");
    let _first = WalLogStore::open(&dir).unwrap();
    let e = open_err(&dir).to_string();
    assert!(e.contains("in use"), "{e}");
}

#[tokio::test]
async fn invalid_batches_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let before = filled(&dir).await;
    let mut s = WalLogStore::open(&dir).unwrap();
    let (_, len) = s.segment().unwrap();
    // A gap after index 100.
    assert!(matches!(
        s.save(batch(150, 1)).await,
        Err(StorageError::Invalid(_))
    ));
    assert!(matches!(
        s.purge(LogId {
            term: 1,
            index: 500
        })
        .await,
        Err(StorageError::Invalid(_))
    ));
    assert_eq!(s.segment().unwrap().1, len, "nothing was written");
    assert_eq!(s.load().await.unwrap(), before);
}
