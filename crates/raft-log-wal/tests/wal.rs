//! The segment-file log store: the log-store contract, new segments that
//! do not copy the log and are dropped once compacted, and what opening
//! does with what a crash or damage leaves behind.

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
async fn full_segments_are_followed_by_new_ones_and_dropped_once_compacted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let opts = WalOptions {
        segment_bytes: 64 << 10,
    };
    let mut s = WalLogStore::open_with(&dir, opts.clone()).unwrap();
    let mut next = 1;
    let mut most = 0;
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
        s.settle();
        most = most.max(segments(&dir).len());
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
    // A segment is dropped at the first purge past its last entry.
    assert!(most <= 2, "at most the current and the one before: {most}");
    let st = s.load().await.unwrap();
    assert_eq!(st.purged.index, next - 11);
    assert_eq!(st.entries.len(), 10);
}

/// A new segment does not copy the log: with 100 KiB of entries kept and
/// segments of 8 KiB, each begins with a record of a few hundred bytes,
/// and the older ones stay until compaction passes them.
#[tokio::test]
async fn a_new_segment_does_not_copy_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let opts = WalOptions {
        segment_bytes: 8 << 10,
    };
    let mut s = WalLogStore::open_with(&dir, opts.clone()).unwrap();
    for b in 0..50 {
        s.save(batch(1 + b * 10, 10)).await.unwrap();
    }
    let files = segments(&dir);
    assert!(files.len() > 10, "{} segments", files.len());
    let newest = files.last().unwrap();
    let first = std::fs::read(newest).unwrap();
    let first_record = u32::from_le_bytes(first[8..12].try_into().unwrap());
    assert!(
        first_record < 512,
        "the new segment begins with {first_record} bytes"
    );
    let want = s.load().await.unwrap();
    assert_eq!(want.entries.len(), 500);
    drop(s);
    let mut s = WalLogStore::open_with(&dir, opts.clone()).unwrap();
    assert_eq!(s.load().await.unwrap(), want);
    // Compaction to the middle drops the segments wholly below it.
    s.purge(LogId {
        term: 1,
        index: 250,
    })
    .await
    .unwrap();
    s.settle();
    let left = segments(&dir).len();
    assert!(
        left < files.len() * 2 / 3 && left > 2,
        "{left} of {}",
        files.len()
    );
    let want = s.load().await.unwrap();
    drop(s);
    // A segment still needed that goes missing is refused, not skipped.
    let oldest = segments(&dir).remove(0);
    let kept = std::fs::read(&oldest).unwrap();
    std::fs::remove_file(&oldest).unwrap();
    let e = open_err_with(&dir, &opts);
    assert!(e.to_string().contains("missing"), "{e}");
    std::fs::write(&oldest, &kept).unwrap();
    let mut s = WalLogStore::open_with(&dir, opts.clone()).unwrap();
    assert_eq!(s.load().await.unwrap(), want);
}

/// A record lost from the end of a segment that is not the newest (a vote,
/// here) is refused, not read as the end of that segment.
#[tokio::test]
async fn a_record_lost_from_an_older_segment_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let opts = WalOptions {
        segment_bytes: 1024,
    };
    let mut s = WalLogStore::open_with(&dir, opts.clone()).unwrap();
    s.save(batch(1, 2)).await.unwrap();
    // Votes alone until one starts a new segment: it is then the last
    // record of the first.
    let mut term = 1;
    while s.segment().unwrap().0 == 1 {
        term += 1;
        s.save(LogBatch {
            hard_state: Some(HardState {
                term,
                vote: Some(1),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    s.save(batch(3, 1)).await.unwrap();
    let first_end = first_records_end(&dir);
    drop(s);
    let first = segments(&dir).remove(0);
    let mut bytes = std::fs::read(&first).unwrap();
    let last = last_record(&bytes, first_end);
    bytes[last..first_end].fill(0);
    std::fs::write(&first, &bytes).unwrap();
    let e = open_err_with(&dir, &opts);
    assert!(e.to_string().contains("does not continue"), "{e}");
}

/// Where the records of the oldest segment in `dir` end.
fn first_records_end(dir: &Path) -> usize {
    let first = segments(dir).remove(0);
    let bytes = std::fs::read(&first).unwrap();
    let mut at = 8;
    loop {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        if len == 0 {
            return at;
        }
        at += 8 + len.div_ceil(8) * 8;
        if at >= bytes.len() {
            return at;
        }
    }
}

fn open_err_with(dir: &Path, opts: &WalOptions) -> StorageError {
    match WalLogStore::open_with(dir, opts.clone()) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e,
    }
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn read_segments(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    segments(dir)
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect()
}

/// Random saves (appends, truncations, snapshots installed, memberships),
/// purges and reopenings on segments of 1 KiB, checked against the same
/// operations on an in-memory state after every step. Now and then a
/// segment that was deleted comes back (a deletion a crash undid, since
/// deletions are not synced): opening must give the same state.
#[tokio::test]
async fn random_operations_over_many_segments_match_a_model() {
    let mut resurrected = 0;
    for seed in 1..=10u64 {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let opts = WalOptions {
            segment_bytes: 1024,
        };
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut s = WalLogStore::open_with(&dir, opts.clone()).unwrap();
        let mut model = LogState::default();
        let mut term = 1u64;
        // Segments deleted since the last new segment (whose directory
        // sync made the earlier deletions durable).
        let mut undone: Vec<(PathBuf, Vec<u8>)> = Vec::new();
        for step in 0..500 {
            let last = model.entries.last().map_or(model.purged.index, |e| e.index);
            let before = read_segments(&dir);
            let what = rng.below(100);
            if what < 45 {
                let b = LogBatch {
                    hard_state: (rng.below(10) == 0).then_some(HardState {
                        term,
                        vote: Some(rng.below(3) + 1),
                    }),
                    entries: entries(term, last + 1, 1 + rng.below(8)),
                    ..Default::default()
                };
                s.save(b.clone()).await.unwrap();
                raft_core::storage::apply_batch(&mut model, b).unwrap();
            } else if what < 57 && last > model.purged.index {
                // A new leader overwrites a suffix.
                term += 1;
                let from = model.purged.index + 1 + rng.below(last - model.purged.index);
                let b = LogBatch {
                    hard_state: Some(HardState { term, vote: None }),
                    truncate_from: Some(from),
                    entries: entries(term, from, rng.below(6)),
                    ..Default::default()
                };
                s.save(b.clone()).await.unwrap();
                raft_core::storage::apply_batch(&mut model, b).unwrap();
            } else if what < 77 && last > model.purged.index {
                let i = model.purged.index + 1 + rng.below(last - model.purged.index);
                let t = model.entries[(i - model.purged.index - 1) as usize].term;
                let upto = LogId { term: t, index: i };
                s.purge(upto).await.unwrap();
                raft_core::storage::apply_purge(&mut model, upto).unwrap();
            } else if what < 80 {
                let meta = raft_core::SnapshotMeta {
                    last: LogId {
                        term,
                        index: last + rng.below(30),
                    },
                    membership: raft_core::Membership::new([1, 2, 3 + rng.below(3)]),
                };
                let b = LogBatch {
                    install: Some(meta),
                    ..Default::default()
                };
                s.save(b.clone()).await.unwrap();
                raft_core::storage::apply_batch(&mut model, b).unwrap();
            } else if what < 85 {
                let b = LogBatch {
                    membership: Some(raft_core::Membership::new([1, 2, 3 + rng.below(5)])),
                    incarnation: (rng.below(4) == 0).then(|| rng.next()),
                    ..Default::default()
                };
                s.save(b.clone()).await.unwrap();
                raft_core::storage::apply_batch(&mut model, b).unwrap();
            } else {
                // Reopen, as after a crash that undid some of the
                // deletions since the last directory sync.
                drop(s);
                for (p, bytes) in undone.drain(..) {
                    if rng.below(2) == 0 {
                        std::fs::write(&p, bytes).unwrap();
                        resurrected += 1;
                    }
                }
                s = WalLogStore::open_with(&dir, opts.clone())
                    .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
            }
            s.settle();
            let after = segments(&dir);
            if after.last() != before.last().map(|(p, _)| p) {
                undone.clear();
            }
            // (Not the segment that was current: its copy from before this
            // step may lack the records this step wrote to it.)
            let current = before.last().map(|(p, _)| p.clone());
            undone.extend(
                before
                    .into_iter()
                    .filter(|(p, _)| !after.contains(p) && Some(p) != current.as_ref()),
            );
            assert_eq!(
                s.load().await.unwrap(),
                model,
                "seed {seed} step {step} (op {what})"
            );
        }
        drop(s);
        let mut s = WalLogStore::open_with(&dir, opts.clone()).unwrap();
        assert_eq!(s.load().await.unwrap(), model, "seed {seed} at the end");
    }
    assert!(resurrected > 20, "segments brought back: {resurrected}");
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
    open_err_with(dir, &WalOptions::default())
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
    // (sled keeps `snap.*` files beside them; listed first or not.)
    std::fs::write(sled_dir.join("snap.000000000002DB19"), b"x").unwrap();
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
