//! A deterministic stream of log-store operations: the crash-test child
//! performs them, and the test replays them on an in-memory model to know
//! exactly what must be on disk after each acknowledged one.

use raft_core::storage::{apply_batch, apply_purge, LogBatch, LogState, StorageError};
use raft_core::{Entry, EntryPayload, HardState, LogId, Membership, SnapshotMeta};

/// One operation on a store.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // test ops, built one at a time
pub enum Op {
    /// A `save`.
    Save(LogBatch),
    /// A `purge`.
    Purge(LogId),
}

fn mix(seed: u64, n: u64) -> u64 {
    let mut z = seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The `n`th operation of stream `seed`, given the state before it.
pub fn op(seed: u64, n: u64, state: &LogState) -> Op {
    let r = |k: u64| mix(seed, n.wrapping_mul(16).wrapping_add(k));
    let last = state.entries.last().map_or(state.purged.index, |e| e.index);
    let term = state.hard_state.term.max(1);
    let mk = |from: u64, count: u64, term: u64| -> Vec<Entry> {
        (0..count)
            .map(|i| {
                let index = from + i;
                let fill = (mix(seed, index ^ term) & 0xff) as u8;
                Entry {
                    term,
                    index,
                    payload: EntryPayload::Command(vec![fill; 256].into()),
                }
            })
            .collect()
    };
    let roll = r(0) % 100;
    if roll < 70 || last == state.purged.index {
        let count = 1 + r(1) % 32;
        let hard_state = (r(2) % 10 == 0).then_some(HardState {
            term,
            vote: Some(1 + r(3) % 3),
        });
        Op::Save(LogBatch {
            hard_state,
            truncate_from: None,
            entries: mk(last + 1, count, term),
            membership: None,
            ..Default::default()
        })
    } else if roll < 85 {
        let from = state.purged.index + 1 + r(4) % (last - state.purged.index);
        let count = 1 + r(5) % 8;
        Op::Save(LogBatch {
            hard_state: Some(HardState {
                term: term + 1,
                vote: None,
            }),
            truncate_from: Some(from),
            entries: mk(from, count, term + 1),
            membership: None,
            ..Default::default()
        })
    } else if roll < 87 {
        // A leader's snapshot replaces the log: sometimes inside it,
        // sometimes far past its end; entries may follow in the same batch.
        let at = if r(9) % 2 == 0 {
            state.purged.index + 1 + r(10) % (last - state.purged.index)
        } else {
            last + 1 + r(10) % 5000
        };
        let snap_term = term + 1;
        Op::Save(LogBatch {
            hard_state: Some(HardState {
                term: snap_term,
                vote: None,
            }),
            install: Some(SnapshotMeta {
                last: LogId::new(snap_term, at),
                membership: Membership::new([1, 2, 3 + r(11) % 3]),
            }),
            entries: mk(at + 1, r(12) % 4, snap_term),
            ..Default::default()
        })
    } else if roll < 89 && last > state.purged.index {
        // The application recorded a snapshot inside the log.
        let at = state.purged.index + 1 + r(13) % (last - state.purged.index);
        let t = state
            .entries
            .iter()
            .find(|e| e.index == at)
            .map_or(state.purged.term, |e| e.term);
        Op::Save(LogBatch {
            snapshot: Some(SnapshotMeta {
                last: LogId::new(t, at),
                membership: Membership::new([1, 2, 3]),
            }),
            ..Default::default()
        })
    } else if roll < 92 && last > state.purged.index + 1 {
        let upto = state.purged.index + 1 + r(6) % (last - state.purged.index - 1);
        let t = state
            .entries
            .iter()
            .find(|e| e.index == upto)
            .map_or(state.purged.term, |e| e.term);
        Op::Purge(LogId::new(t, upto))
    } else {
        Op::Save(LogBatch {
            hard_state: Some(HardState {
                term: term + r(7) % 2,
                vote: Some(1 + r(8) % 3),
            }),
            truncate_from: None,
            entries: vec![],
            membership: None,
            ..Default::default()
        })
    }
}

/// Applies an operation to the in-memory model.
pub fn apply(state: &mut LogState, op: &Op) -> Result<(), StorageError> {
    match op {
        Op::Save(b) => apply_batch(state, b.clone()),
        Op::Purge(id) => apply_purge(state, *id),
    }
}
