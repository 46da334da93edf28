//! Helpers shared by the integration tests and their child processes.

pub mod log_ops {
    //! A deterministic stream of log-store operations: the crash-test child
    //! performs them, and the test replays them on an in-memory model to know
    //! exactly what must be on disk after each acknowledged one.

    use raft_core::storage::{apply_batch, apply_purge, LogBatch, LogState, StorageError};
    use raft_core::{Entry, EntryPayload, HardState, LogId};

    /// One operation on a store.
    #[derive(Debug, Clone, PartialEq, Eq)]
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
        let last = state
            .entries
            .last()
            .map_or(state.snapshot.index, |e| e.index);
        let term = state.hard_state.term.max(1);
        let mk = |from: u64, count: u64, term: u64| -> Vec<Entry> {
            (0..count)
                .map(|i| {
                    let index = from + i;
                    let fill = (mix(seed, index ^ term) & 0xff) as u8;
                    Entry {
                        term,
                        index,
                        payload: EntryPayload::Command(vec![fill; 256]),
                    }
                })
                .collect()
        };
        let roll = r(0) % 100;
        if roll < 70 || last == state.snapshot.index {
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
            })
        } else if roll < 85 {
            let from = state.snapshot.index + 1 + r(4) % (last - state.snapshot.index);
            let count = 1 + r(5) % 8;
            Op::Save(LogBatch {
                hard_state: Some(HardState {
                    term: term + 1,
                    vote: None,
                }),
                truncate_from: Some(from),
                entries: mk(from, count, term + 1),
                membership: None,
            })
        } else if roll < 90 && last > state.snapshot.index + 1 {
            let upto = state.snapshot.index + 1 + r(6) % (last - state.snapshot.index - 1);
            let t = state
                .entries
                .iter()
                .find(|e| e.index == upto)
                .map_or(state.snapshot.term, |e| e.term);
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
}

pub mod linearizable {
    //! A linearizability checker for histories of one read/write register
    //! (one key of the store), after Wing and Gong with Lowe's memoisation:
    //! search for an order of the operations that respects real time (an
    //! operation that returned before another was invoked comes first) and
    //! register semantics (a read returns the latest write, or nothing before
    //! any write). Writes whose outcome is unknown (the client saw an error
    //! that does not rule the write out) may take effect at any point after
    //! they were invoked, or never.

    use std::collections::HashSet;

    /// What an operation did.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Kind {
        /// A write of this value (values are unique per history).
        Write(String),
        /// A read that returned this value (`None`: the key did not exist).
        Read(Option<String>),
    }

    /// One operation, with the times it was invoked and returned
    /// (`None`: its outcome is unknown; only writes may be unknown).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Op {
        /// What it did.
        pub kind: Kind,
        /// When the client sent it (any monotonic unit).
        pub call: u64,
        /// When the client got the answer; `None` for an unknown outcome.
        pub ret: Option<u64>,
    }

    /// Why a history is not linearizable: the longest prefix order found and
    /// the operations none of which could come next.
    #[derive(Debug)]
    pub struct NotLinearizable {
        /// How many operations could be placed at best.
        pub placed: usize,
        /// The operations that could not be placed after that prefix.
        pub stuck_at: Vec<Op>,
    }

    /// Checks one register's history; the initial value is "absent".
    pub fn check(history: &[Op]) -> Result<(), NotLinearizable> {
        // Unknown reads say nothing. Unknown writes are optional, and one whose
        // value no read returned can always be taken as never applied.
        let observed: HashSet<&str> = history
            .iter()
            .filter_map(|o| match &o.kind {
                Kind::Read(Some(v)) if o.ret.is_some() => Some(v.as_str()),
                _ => None,
            })
            .collect();
        let ops: Vec<&Op> = history
            .iter()
            .filter(|o| match &o.kind {
                _ if o.ret.is_some() => true,
                Kind::Write(v) => observed.contains(v.as_str()),
                Kind::Read(_) => false,
            })
            .collect();
        let n = ops.len();
        let must = ops.iter().filter(|o| o.ret.is_some()).count();
        let words = n.div_ceil(64);
        // Depth-first search over (set of placed ops, register value).
        struct Frame {
            done: Vec<u64>,
            value: Option<usize>, // index of the op whose write is current
            placed: usize,
            placed_required: usize,
        }
        let is_done = |d: &[u64], i: usize| d[i / 64] & (1 << (i % 64)) != 0;
        let mut seen: HashSet<(Vec<u64>, Option<usize>)> = HashSet::new();
        let mut stack = vec![Frame {
            done: vec![0; words],
            value: None,
            placed: 0,
            placed_required: 0,
        }];
        let mut best = (0usize, Vec::new());
        while let Some(f) = stack.pop() {
            if f.placed_required == must {
                return Ok(());
            }
            // An op may come next if it was invoked before every pending
            // required op returned.
            let horizon = (0..n)
                .filter(|&i| !is_done(&f.done, i))
                .filter_map(|i| ops[i].ret)
                .min()
                .unwrap_or(u64::MAX);
            let mut next = Vec::new();
            for i in (0..n).filter(|&i| !is_done(&f.done, i)) {
                let o = ops[i];
                if o.call > horizon {
                    continue;
                }
                let value = match &o.kind {
                    Kind::Write(_) => Some(i),
                    Kind::Read(r) => {
                        let cur = f.value.map(|w| match &ops[w].kind {
                            Kind::Write(v) => v.clone(),
                            Kind::Read(_) => unreachable!("only writes set the value"),
                        });
                        if *r != cur {
                            continue;
                        }
                        f.value
                    }
                };
                let mut done = f.done.clone();
                done[i / 64] |= 1 << (i % 64);
                if !seen.insert((done.clone(), value)) {
                    continue;
                }
                next.push(Frame {
                    done,
                    value,
                    placed: f.placed + 1,
                    placed_required: f.placed_required + usize::from(o.ret.is_some()),
                });
            }
            if next.is_empty() && f.placed >= best.0 {
                let stuck = (0..n)
                    .filter(|&i| !is_done(&f.done, i) && ops[i].call <= horizon)
                    .map(|i| ops[i].clone())
                    .collect();
                best = (f.placed, stuck);
            }
            stack.extend(next);
        }
        Err(NotLinearizable {
            placed: best.0,
            stuck_at: best.1,
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn w(v: &str, call: u64, ret: u64) -> Op {
            Op {
                kind: Kind::Write(v.into()),
                call,
                ret: Some(ret),
            }
        }
        fn r(v: Option<&str>, call: u64, ret: u64) -> Op {
            Op {
                kind: Kind::Read(v.map(Into::into)),
                call,
                ret: Some(ret),
            }
        }

        #[test]
        fn sequential_histories() {
            assert!(check(&[r(None, 0, 1), w("a", 2, 3), r(Some("a"), 4, 5)]).is_ok());
            // A read after a completed write must not see the older state.
            assert!(check(&[w("a", 0, 1), w("b", 2, 3), r(Some("a"), 4, 5)]).is_err());
            assert!(check(&[w("a", 0, 1), r(None, 2, 3)]).is_err());
        }

        #[test]
        fn concurrent_operations_may_take_effect_in_either_order() {
            // The read overlaps the write: old or new value are both fine.
            assert!(check(&[w("a", 0, 1), w("b", 2, 6), r(Some("a"), 3, 4)]).is_ok());
            assert!(check(&[w("a", 0, 1), w("b", 2, 6), r(Some("b"), 3, 4)]).is_ok());
            // But once one read saw the new value, a later read cannot see the old one.
            assert!(check(&[
                w("a", 0, 1),
                w("b", 2, 10),
                r(Some("b"), 3, 4),
                r(Some("a"), 5, 6)
            ])
            .is_err());
        }

        #[test]
        fn unknown_writes_may_apply_late_or_never() {
            let unknown = |v: &str, call: u64| Op {
                kind: Kind::Write(v.into()),
                call,
                ret: None,
            };
            // Never applied.
            assert!(check(&[w("a", 0, 1), unknown("b", 2), r(Some("a"), 10, 11)]).is_ok());
            // Applied long after its client gave up.
            assert!(check(&[
                w("a", 0, 1),
                unknown("b", 2),
                r(Some("a"), 10, 11),
                r(Some("b"), 20, 21)
            ])
            .is_ok());
            // But not before it was sent.
            assert!(check(&[w("a", 0, 1), r(Some("b"), 2, 3), unknown("b", 5)]).is_err());
        }

        #[test]
        fn a_stale_read_after_a_failover_is_caught() {
            // The deposed leader answers from its old state after the new
            // leader acknowledged "new".
            let h = [w("old", 0, 1), w("new", 5, 9), r(Some("old"), 12, 13)];
            let e = check(&h).unwrap_err();
            assert_eq!(e.placed, 2);
        }
    }
}
