//! [`log_store_conformance`] checks any [`LogStore`] against the trait's
//! contract. Run it from your own store's tests:
//!
//! ```text
//! #[tokio::test]
//! async fn my_store_conforms() {
//!     raft_core::testing::log_store_conformance(MyFactory::new()).await;
//! }
//! ```

use crate::storage::{LogBatch, LogState, LogStore, StorageError};
use crate::types::{Entry, EntryPayload, HardState, LogId, Membership, SnapshotMeta};
use async_trait::async_trait;

/// Makes stores for the conformance suite.
#[async_trait]
pub trait StoreFactory: Send {
    /// The store type under test.
    type Store: LogStore;
    /// A new, empty store with its own backing storage.
    async fn fresh(&mut self) -> Self::Store;
    /// Closes `store` and opens its backing storage again, as after a restart.
    async fn reopen(&mut self, store: Self::Store) -> Self::Store;
}

fn e(term: u64, index: u64) -> Entry {
    Entry {
        term,
        index,
        payload: EntryPayload::Command(format!("{term}:{index}").into_bytes().into()),
    }
}

fn entries(term: u64, from: u64, to: u64) -> Vec<Entry> {
    (from..=to).map(|i| e(term, i)).collect()
}

async fn save<S: LogStore>(s: &mut S, b: LogBatch) {
    if let Err(err) = s.save(b).await {
        panic!("save failed: {err}");
    }
}

async fn load<S: LogStore>(s: &mut S) -> LogState {
    match s.load().await {
        Ok(st) => st,
        Err(err) => panic!("load failed: {err}"),
    }
}

/// Runs every conformance check; panics with a description on the first failure.
pub async fn log_store_conformance<F: StoreFactory>(mut f: F) {
    // An empty store loads the default state.
    let mut s = f.fresh().await;
    assert_eq!(
        load(&mut s).await,
        LogState::default(),
        "a new store must be empty"
    );

    // Appends and hard state survive a reopen exactly.
    let hs = HardState {
        term: 3,
        vote: Some(2),
    };
    save(
        &mut s,
        LogBatch {
            hard_state: Some(hs),
            truncate_from: None,
            entries: entries(1, 1, 5),
            membership: None,
            ..Default::default()
        },
    )
    .await;
    save(
        &mut s,
        LogBatch {
            hard_state: None,
            truncate_from: None,
            entries: entries(3, 6, 8),
            membership: None,
            ..Default::default()
        },
    )
    .await;
    let mut s = f.reopen(s).await;
    let st = load(&mut s).await;
    assert_eq!(st.hard_state, hs);
    assert_eq!(st.purged, LogId::default());
    let mut want = entries(1, 1, 5);
    want.extend(entries(3, 6, 8));
    assert_eq!(
        st.entries, want,
        "reopen must restore exactly what was saved"
    );

    // Truncate a suffix and append in one batch.
    save(
        &mut s,
        LogBatch {
            hard_state: Some(HardState {
                term: 4,
                vote: None,
            }),
            truncate_from: Some(7),
            entries: entries(4, 7, 9),
            membership: None,
            ..Default::default()
        },
    )
    .await;
    let mut s = f.reopen(s).await;
    let st = load(&mut s).await;
    let mut want = entries(1, 1, 5);
    want.extend(entries(3, 6, 6));
    want.extend(entries(4, 7, 9));
    assert_eq!(st.entries, want, "truncate-then-append");
    assert_eq!(
        st.hard_state,
        HardState {
            term: 4,
            vote: None
        }
    );

    // A truncation alone, past the end, is harmless.
    save(
        &mut s,
        LogBatch {
            hard_state: None,
            truncate_from: Some(100),
            entries: vec![],
            membership: None,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(load(&mut s).await.entries.len(), 9);

    // A batch that leaves a gap is refused and changes nothing.
    let before = load(&mut s).await;
    let res = s
        .save(LogBatch {
            hard_state: Some(HardState {
                term: 9,
                vote: None,
            }),
            truncate_from: None,
            entries: entries(4, 11, 12),
            membership: None,
            ..Default::default()
        })
        .await;
    assert!(
        matches!(res, Err(StorageError::Invalid(_))),
        "gap must be refused, got {res:?}"
    );
    assert_eq!(
        load(&mut s).await,
        before,
        "a refused batch must change nothing"
    );

    // Purge a prefix: the compaction point moves, later entries stay.
    if let Err(err) = s.purge(LogId::new(1, 4)).await {
        panic!("purge failed: {err}");
    }
    let mut s = f.reopen(s).await;
    let st = load(&mut s).await;
    assert_eq!(st.purged, LogId::new(1, 4));
    assert_eq!(st.entries.first().map(|x| x.index), Some(5));
    assert_eq!(st.entries.last().map(|x| x.index), Some(9));
    // Purging again below the point is a no-op; past the end is refused.
    assert!(s.purge(LogId::new(1, 2)).await.is_ok());
    assert!(matches!(
        s.purge(LogId::new(4, 50)).await,
        Err(StorageError::Invalid(_))
    ));
    // Truncating below the compaction point is refused.
    let res = s
        .save(LogBatch {
            hard_state: None,
            truncate_from: Some(3),
            entries: vec![],
            membership: None,
            ..Default::default()
        })
        .await;
    assert!(matches!(res, Err(StorageError::Invalid(_))));
    // Appends continue after the purge.
    save(
        &mut s,
        LogBatch {
            hard_state: None,
            truncate_from: None,
            entries: entries(4, 10, 10),
            membership: None,
            ..Default::default()
        },
    )
    .await;
    let mut s = f.reopen(s).await;
    let st = load(&mut s).await;
    assert_eq!(
        st.entries.iter().map(|x| x.index).collect::<Vec<_>>(),
        vec![5, 6, 7, 8, 9, 10]
    );

    // Every payload kind round-trips, and a large batch works.
    let mut s2 = f.fresh().await;
    let kinds = vec![
        Entry {
            term: 1,
            index: 1,
            payload: EntryPayload::Blank,
        },
        Entry {
            term: 1,
            index: 2,
            payload: EntryPayload::Membership(Membership::new([1, 2, 3])),
        },
        Entry {
            term: 1,
            index: 3,
            payload: EntryPayload::Command(vec![0u8; 4096].into()),
        },
    ];
    save(
        &mut s2,
        LogBatch {
            hard_state: None,
            truncate_from: None,
            entries: kinds.clone(),
            membership: None,
            ..Default::default()
        },
    )
    .await;
    let big: Vec<Entry> = (4..=2003).map(|i| e(2, i)).collect();
    save(
        &mut s2,
        LogBatch {
            hard_state: Some(HardState {
                term: 2,
                vote: Some(1),
            }),
            truncate_from: None,
            entries: big.clone(),
            membership: None,
            ..Default::default()
        },
    )
    .await;
    let mut s2 = f.reopen(s2).await;
    let st = load(&mut s2).await;
    assert_eq!(&st.entries[..3], &kinds[..]);
    assert_eq!(st.entries.len(), 2003);
    assert_eq!(st.entries.last(), big.last());

    // Truncating everything leaves an empty log that accepts index 1 again.
    save(
        &mut s2,
        LogBatch {
            hard_state: None,
            truncate_from: Some(1),
            entries: entries(5, 1, 2),
            membership: None,
            ..Default::default()
        },
    )
    .await;
    let mut s2 = f.reopen(s2).await;
    assert_eq!(load(&mut s2).await.entries, entries(5, 1, 2));

    // The membership is stored with a batch, survives reopening, purges and
    // later batches without one, and is replaced by a newer one.
    let mut s3 = f.fresh().await;
    assert_eq!(load(&mut s3).await.membership, None);
    let boot = Membership::new([1, 2, 3]);
    save(
        &mut s3,
        LogBatch {
            membership: Some(boot.clone()),
            ..LogBatch::default()
        },
    )
    .await;
    let mut s3 = f.reopen(s3).await;
    assert_eq!(load(&mut s3).await.membership, Some(boot.clone()));
    save(
        &mut s3,
        LogBatch {
            entries: entries(1, 1, 6),
            ..LogBatch::default()
        },
    )
    .await;
    if let Err(err) = s3.purge(LogId::new(1, 3)).await {
        panic!("purge failed: {err}");
    }
    let mut s3 = f.reopen(s3).await;
    let st = load(&mut s3).await;
    assert_eq!(
        st.membership,
        Some(boot),
        "membership kept across appends and purges"
    );
    // A membership with learners, a joint configuration and addresses
    // keeps all of them.
    let mut grown = Membership::new([1, 2, 3, 4]);
    grown.outgoing = [1, 2, 3].into_iter().collect();
    grown.learners.insert(5);
    grown.nodes.insert(
        5,
        crate::types::Member {
            addr: "10.0.0.5:7000".into(),
            incarnation: 0xfeed,
        },
    );
    save(
        &mut s3,
        LogBatch {
            membership: Some(grown.clone()),
            ..LogBatch::default()
        },
    )
    .await;
    let mut s3 = f.reopen(s3).await;
    let st = load(&mut s3).await;
    assert_eq!(
        st.membership,
        Some(grown),
        "a newer membership replaces the old"
    );
    assert_eq!(st.entries, entries(1, 4, 6));

    // The storage identity is written once and survives reopening and
    // later batches.
    assert_eq!(st.incarnation, 0, "a new store has no identity yet");
    save(
        &mut s3,
        LogBatch {
            incarnation: Some(0x5eed_1234),
            ..LogBatch::default()
        },
    )
    .await;
    save(
        &mut s3,
        LogBatch {
            hard_state: Some(HardState {
                term: 1,
                vote: Some(2),
            }),
            ..LogBatch::default()
        },
    )
    .await;
    let mut s3 = f.reopen(s3).await;
    assert_eq!(load(&mut s3).await.incarnation, 0x5eed_1234);

    // A snapshot record survives reopening and later batches.
    let taken = SnapshotMeta {
        last: LogId::new(1, 5),
        membership: Membership::new([1, 2, 3, 4]),
    };
    save(
        &mut s3,
        LogBatch {
            snapshot: Some(taken.clone()),
            entries: entries(1, 7, 7),
            ..LogBatch::default()
        },
    )
    .await;
    let mut s3 = f.reopen(s3).await;
    let st = load(&mut s3).await;
    assert_eq!(st.snapshot, Some(taken));
    assert_eq!(st.entries, entries(1, 4, 7));

    // A leader's snapshot replaces the whole log: entries on either side
    // of its end go, the compaction point, its membership and the record
    // become the snapshot's, and what the same batch appends follows it.
    let leaders = SnapshotMeta {
        last: LogId::new(3, 6),
        membership: Membership::new([1, 2, 3]),
    };
    save(
        &mut s3,
        LogBatch {
            install: Some(leaders.clone()),
            entries: vec![e(3, 7)],
            ..LogBatch::default()
        },
    )
    .await;
    let mut s3 = f.reopen(s3).await;
    let st = load(&mut s3).await;
    assert_eq!(st.purged, LogId::new(3, 6));
    assert_eq!(st.entries, vec![e(3, 7)], "the old entries are gone");
    assert_eq!(st.membership, Some(leaders.membership.clone()));
    assert_eq!(st.snapshot, Some(leaders.clone()));
    // A snapshot far past the log's end, into an empty store.
    let far = SnapshotMeta {
        last: LogId::new(4, 1000),
        membership: Membership::new([1, 2, 3]),
    };
    save(
        &mut s3,
        LogBatch {
            install: Some(far.clone()),
            ..LogBatch::default()
        },
    )
    .await;
    save(
        &mut s3,
        LogBatch {
            entries: vec![e(4, 1001), e(4, 1002)],
            ..LogBatch::default()
        },
    )
    .await;
    let mut s3 = f.reopen(s3).await;
    let st = load(&mut s3).await;
    assert_eq!(st.purged, far.last);
    assert_eq!(st.entries, vec![e(4, 1001), e(4, 1002)]);
    assert_eq!(st.snapshot, Some(far));
    // Appending with a gap after it is still refused.
    let gap = s3
        .save(LogBatch {
            entries: vec![e(4, 1010)],
            ..LogBatch::default()
        })
        .await;
    assert!(matches!(gap, Err(StorageError::Invalid(_))), "{gap:?}");
}

/// [`StoreFactory`] for [`crate::MemLogStore`].
#[derive(Debug, Default)]
pub struct MemStoreFactory;

#[async_trait]
impl StoreFactory for MemStoreFactory {
    type Store = crate::MemLogStore;
    async fn fresh(&mut self) -> Self::Store {
        crate::MemLogStore::new()
    }
    async fn reopen(&mut self, store: Self::Store) -> Self::Store {
        store.reopen()
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn mem_log_store_conforms() {
        super::log_store_conformance(super::MemStoreFactory).await;
    }
}
