//! A damaged or foreign data directory is refused at open with an error that
//! names the path: never a panic, never silent acceptance.

use raft_core::storage::{LogBatch, StorageError};
use raft_core::{Entry, EntryPayload, HardState, LogStore};
use raft_log::SledLogStore;
use std::path::{Path, PathBuf};

fn entries(n: u64) -> Vec<Entry> {
    (1..=n)
        .map(|i| Entry {
            term: 1,
            index: i,
            payload: EntryPayload::Command(vec![i as u8; 256].into()),
        })
        .collect()
}

/// A store with some content, closed again.
async fn populated(dir: &Path) -> PathBuf {
    let path = dir.join("log");
    let mut s = SledLogStore::open(&path).unwrap();
    // Batches of 10: the store keeps one run per batch, keyed 1, 11, 21, ...
    for chunk in entries(200).chunks(10) {
        let hard_state = Some(HardState {
            term: 1,
            vote: Some(1),
        });
        let batch = LogBatch {
            hard_state,
            truncate_from: None,
            entries: chunk.to_vec(),
            membership: None,
            ..Default::default()
        };
        s.save(batch).await.unwrap();
    }
    drop(s);
    path
}

/// Opens the sled database under a store directly, to damage it on purpose.
/// sled frees its file lock asynchronously after the store is dropped.
fn open_raw(path: &Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(e)
                if std::time::Instant::now() < deadline
                    && e.to_string().contains("could not acquire lock") =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            Err(e) => panic!("cannot open {}: {e}", path.display()),
        }
    }
}

fn assert_refused(res: Result<SledLogStore, StorageError>, path: &Path, case: &str) {
    match res {
        Ok(_) => panic!("{case}: a damaged directory was accepted"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&path.display().to_string()),
                "{case}: error does not name the path: {msg}"
            );
        }
    }
}

#[test]
fn foreign_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    std::fs::create_dir_all(&path).unwrap();
    std::fs::write(path.join("notes.txt"), b"not a database").unwrap();
    assert_refused(SledLogStore::open(&path), &path, "foreign files");
    assert_eq!(
        std::fs::read_dir(&path).unwrap().count(),
        1,
        "nothing may be written into a foreign directory"
    );
}

#[test]
fn sled_database_of_another_program_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    {
        let db = open_raw(&path);
        db.insert(b"user:1", b"alice").unwrap();
        db.flush().unwrap();
    }
    assert_refused(SledLogStore::open(&path), &path, "other sled database");
}

#[tokio::test]
async fn random_bytes_over_the_database_file_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = populated(dir.path()).await;
    let len = std::fs::metadata(path.join("db")).unwrap().len() as usize;
    let mut x = 0x1234_5678u64;
    let junk: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(path.join("db"), junk).unwrap();
    assert_refused(SledLogStore::open(&path), &path, "random bytes");
}

#[tokio::test]
async fn truncated_database_files_are_refused() {
    for (file, keep) in [("db", 0usize), ("db", 7), ("db", 100)] {
        let dir = tempfile::tempdir().unwrap();
        let path = populated(dir.path()).await;
        let f = path.join(file);
        let data = std::fs::read(&f).unwrap();
        std::fs::write(&f, &data[..keep.min(data.len())]).unwrap();
        assert_refused(
            SledLogStore::open(&path),
            &path,
            &format!("{file} truncated to {keep} bytes"),
        );
    }
}

#[tokio::test]
async fn a_damaged_sled_conf_is_accepted_only_when_every_entry_is_intact() {
    for keep in [0usize, 3] {
        let dir = tempfile::tempdir().unwrap();
        let path = populated(dir.path()).await;
        let data = std::fs::read(path.join("conf")).unwrap();
        std::fs::write(path.join("conf"), &data[..keep.min(data.len())]).unwrap();
        if let Ok(mut s) = SledLogStore::open(&path) {
            let st = s.load().await.unwrap();
            assert_eq!(
                st.entries,
                entries(200),
                "sled rebuilt its conf; the log must be whole"
            );
            assert_eq!(
                st.hard_state,
                HardState {
                    term: 1,
                    vote: Some(1)
                }
            );
        }
    }
}

#[tokio::test]
async fn database_truncated_mid_file_never_opens_with_a_damaged_log() {
    // sled may recover an older consistent state from a torn file (as after a
    // crash); what it must never do is open with a log that has gaps or bad values.
    for frac in [2usize, 3, 5] {
        let dir = tempfile::tempdir().unwrap();
        let path = populated(dir.path()).await;
        let f = path.join("db");
        let data = std::fs::read(&f).unwrap();
        std::fs::write(&f, &data[..data.len() / frac]).unwrap();
        if let Ok(mut s) = SledLogStore::open(&path) {
            let st = s.load().await.unwrap();
            for (k, e) in st.entries.iter().enumerate() {
                assert_eq!(e.index, k as u64 + 1, "1/{frac}: gap in the recovered log");
                assert_eq!(
                    e.payload,
                    EntryPayload::Command(vec![e.index as u8; 256].into()),
                    "1/{frac}: damaged entry"
                );
            }
        }
    }
}

#[tokio::test]
async fn damaged_value_and_log_gap_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = populated(dir.path()).await;
    {
        // Flip bytes inside one stored run of entries.
        let db = open_raw(&path);
        let mut key = b"e:".to_vec();
        key.extend_from_slice(&41u64.to_be_bytes());
        let mut v = db.get(&key).unwrap().unwrap().to_vec();
        v[10] ^= 0xff;
        db.insert(&key, v).unwrap();
        db.flush().unwrap();
    }
    let res = SledLogStore::open(&path);
    assert_refused(res, &path, "flipped bytes");

    let dir = tempfile::tempdir().unwrap();
    let path = populated(dir.path()).await;
    {
        let db = open_raw(&path);
        let mut key = b"e:".to_vec();
        key.extend_from_slice(&71u64.to_be_bytes());
        db.remove(&key).unwrap();
        db.flush().unwrap();
    }
    let err = SledLogStore::open(&path)
        .expect_err("gap refused")
        .to_string();
    assert!(err.contains("gap"), "{err}");
}
