//! Handing committed entries to the application, and the answers that come
//! back. A proposal made with [`Raft::propose`](super::Raft::propose)
//! registers its waiter with the driver in the same step that appends it;
//! when the entry commits, the waiter travels on the entry's [`ApplyMsg`] as
//! a [`Responder`], and what the application answers goes straight to the
//! proposer's [`Proposal`]. No table is searched afterwards, and an entry
//! that a later leader replaced fails its waiter with `Error::Overwritten`.

use super::Error;
use crate::types::{Entry, EntryPayload, LogIndex, SnapshotMeta, Term};
use std::any::Any;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// What an application answered for one entry, type-erased on its way
/// through the node; [`Proposal::outcome`] gives it back typed.
type Answer = Box<dyn Any + Send>;
type AnswerTx = oneshot::Sender<Result<Option<Answer>, Error>>;

/// A committed log entry, handed to the application in index order, each
/// exactly once per run of the node.
#[derive(Debug)]
pub struct ApplyMsg {
    /// True for an application command; false for Raft's own entries (the
    /// leader's no-op, membership), which the application only counts.
    pub command_valid: bool,
    /// The command bytes as submitted (empty when `command_valid` is false):
    /// the log's own buffer, shared, not a copy.
    pub command: bytes::Bytes,
    /// The entry's log index. Persist it with the state it produces.
    pub command_index: LogIndex,
    /// The term the entry was created in.
    pub command_term: Term,
    /// Present when this node proposed the entry with `Raft::propose` and
    /// the proposer waits: answer it once the command is applied (or drop
    /// it, which tells the proposer the entry applied without an answer).
    pub responder: Option<Responder>,
    /// Set when the leader's snapshot replaced this node's log: load the
    /// snapshot the application's `SnapshotStore` received for it (ending
    /// at `command_index`) in place of the current state; the next entries
    /// follow it. `command_valid` is false.
    pub snapshot: Option<SnapshotMeta>,
}

impl ApplyMsg {
    pub(super) fn from_entry(e: Entry, responder: Option<Responder>) -> ApplyMsg {
        match e.payload {
            EntryPayload::Command(c) => ApplyMsg {
                command_valid: true,
                command: c,
                command_index: e.index,
                command_term: e.term,
                responder,
                snapshot: None,
            },
            _ => ApplyMsg {
                command_valid: false,
                command: bytes::Bytes::new(),
                command_index: e.index,
                command_term: e.term,
                responder,
                snapshot: None,
            },
        }
    }

    pub(super) fn from_snapshot(meta: SnapshotMeta) -> ApplyMsg {
        ApplyMsg {
            command_valid: false,
            command: bytes::Bytes::new(),
            command_index: meta.last.index,
            command_term: meta.last.term,
            responder: None,
            snapshot: Some(meta),
        }
    }
}

/// The way back to the node that proposed an entry. Dropping it unanswered
/// resolves the proposal with no answer.
#[derive(Debug)]
pub struct Responder {
    tx: Option<AnswerTx>,
}

impl Responder {
    /// Gives the proposer the result of applying the entry. The proposer
    /// reads it with `Proposal::outcome::<T>()` for the same `T`.
    pub fn answer<T: Any + Send>(mut self, value: T) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Ok(Some(Box::new(value))));
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Ok(None));
        }
    }
}

/// A command appended to the leader's log, whose outcome is on its way.
#[derive(Debug)]
pub struct Proposal {
    /// The entry's index.
    pub index: LogIndex,
    /// The entry's term (the leader's term when it was appended).
    pub term: Term,
    rx: oneshot::Receiver<Result<Option<Answer>, Error>>,
}

impl Proposal {
    /// Waits until the entry has been committed and applied, and returns
    /// what the application answered: `Ok(Some(value))` when it answered
    /// with a `T`; `Ok(None)` when the entry committed but no answer came
    /// (the application dropped the responder or answered another type, or
    /// the node stopped before the application took the entry).
    /// `Error::Overwritten`: a later leader replaced the entry; it never
    /// applies. `Error::Stopped`: the node stopped first; the outcome is
    /// unknown.
    pub async fn outcome<T: Any + Send>(self) -> Result<Option<T>, Error> {
        match self.rx.await {
            Ok(Ok(Some(a))) => Ok(a.downcast::<T>().ok().map(|b| *b)),
            Ok(Ok(None)) => Ok(None),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Stopped("the node stopped".into())),
        }
    }

    /// Waits until the entry has been committed and applied; returns its index.
    pub async fn committed(self) -> Result<LogIndex, Error> {
        let index = self.index;
        self.outcome::<()>().await.map(|_| index)
    }
}

/// The driver's waiters: one per proposal still on its way to the
/// application, registered when the entry was appended. Several may share
/// an index (a deposed leader's entry, then a later one's): which of them
/// won is only known when that index commits.
#[derive(Debug, Default)]
pub(super) struct Waiters {
    /// Index -> (the entry's term, whether the application answers (else
    /// the hand-over resolves it), the waiter).
    by_index: BTreeMap<LogIndex, Vec<(Term, bool, AnswerTx)>>,
    /// The newest committed term already swept for older waiters: waiters
    /// are registered at the leader's term, never older than a term
    /// committed in its log, so a sweep per term suffices.
    swept: Term,
}

impl Waiters {
    /// Registers a waiter for the entry just appended at (`index`, `term`);
    /// `answered`: the application's answer resolves it, else the hand-over.
    pub(super) fn register(&mut self, index: LogIndex, term: Term, answered: bool) -> Proposal {
        let (tx, rx) = oneshot::channel();
        self.by_index
            .entry(index)
            .or_default()
            .push((term, answered, tx));
        Proposal { index, term, rx }
    }

    /// The responder for a committed entry, if it was proposed here. The
    /// waiters of other terms at this index lost their entry for good.
    pub(super) fn take(&mut self, index: LogIndex, term: Term) -> Option<Responder> {
        let mut won = None;
        for (t, answered, tx) in self.by_index.remove(&index)? {
            if t != term {
                let _ = tx.send(Err(Error::Overwritten { index, term: t }));
            } else if answered {
                won = Some(Responder { tx: Some(tx) });
            } else {
                let _ = tx.send(Ok(None));
            }
        }
        won
    }

    /// (`index`, `term`) committed: a waiter further on with an older term
    /// can never commit (a log holding it would hold a term no newer than
    /// its own at `index`), so it fails now rather than when its index
    /// fills up, which could take forever on an idle cluster.
    pub(super) fn committed(&mut self, index: LogIndex, term: Term) {
        if term <= self.swept {
            return;
        }
        self.swept = term;
        let mut emptied = Vec::new();
        for (&i, ws) in self.by_index.range_mut(index + 1..) {
            for (t, _, tx) in ws.extract_if(.., |(t, _, _)| *t < term) {
                let _ = tx.send(Err(Error::Overwritten { index: i, term: t }));
            }
            if ws.is_empty() {
                emptied.push(i);
            }
        }
        for i in emptied {
            self.by_index.remove(&i);
        }
    }

    /// A snapshot replaced the log up to `upto`: whether the entries
    /// waited for committed is unknown here.
    pub(super) fn covered(&mut self, upto: LogIndex) {
        let rest = self.by_index.split_off(&(upto + 1));
        for (i, ws) in std::mem::replace(&mut self.by_index, rest) {
            for (_, _, tx) in ws {
                let _ = tx.send(Err(Error::Unknown(i)));
            }
        }
    }

    /// Fails every waiter: the node stopped.
    pub(super) fn fail_all(&mut self, why: &str) {
        for (_, ws) in std::mem::take(&mut self.by_index) {
            for (_, _, tx) in ws {
                let _ = tx.send(Err(Error::Stopped(why.to_string())));
            }
        }
    }
}

/// The application's end of the node: the apply channel, fed in order,
/// directly when it has room, else through the [`applier`] task.
pub(super) struct ApplyQueue {
    /// The application's channel, fed directly while the applier holds nothing.
    pub(super) tx: mpsc::Sender<ApplyMsg>,
    /// Batches for the applier, which waits for room in order.
    pub(super) overflow: mpsc::UnboundedSender<Vec<ApplyMsg>>,
    /// Messages the applier holds.
    pub(super) queued: Arc<AtomicUsize>,
    /// The highest index the application's channel accepted.
    pub(super) applied: Arc<AtomicU64>,
    /// Tells the driver the application closed its channel.
    pub(super) failed: mpsc::Sender<()>,
}

impl ApplyQueue {
    /// Puts committed entries on the apply channel: directly when it has room
    /// and the applier holds nothing older (one task hop less per commit),
    /// otherwise through the applier.
    pub(super) fn hand_over(&mut self, msgs: Vec<ApplyMsg>) {
        let Some(last) = msgs.last().map(|m| m.command_index) else {
            return;
        };
        if self.queued.load(Ordering::Acquire) == 0 {
            match self.tx.try_reserve_many(msgs.len()) {
                Ok(permits) => {
                    for (permit, m) in permits.zip(msgs) {
                        permit.send(m);
                    }
                    self.applied.store(last, Ordering::Release);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(())) => {
                    let _ = self.failed.try_send(());
                    return;
                }
                Err(mpsc::error::TrySendError::Full(())) => {}
            }
        }
        self.queued.fetch_add(msgs.len(), Ordering::AcqRel);
        // The applier only goes away after the driver; a failed send means it already reported.
        let _ = self.overflow.send(msgs);
    }

    /// The highest index the application's channel accepted.
    pub(super) fn applied(&self) -> LogIndex {
        self.applied.load(Ordering::Acquire)
    }
}

/// Feeds the apply channel with what the driver could not hand over at once
/// (the channel was full), in order. `queued` counts the messages it holds.
pub(super) async fn applier(
    mut queue: mpsc::UnboundedReceiver<Vec<ApplyMsg>>,
    apply_tx: mpsc::Sender<ApplyMsg>,
    applied: Arc<AtomicU64>,
    queued: Arc<AtomicUsize>,
    failed: mpsc::Sender<()>,
) {
    while let Some(batch) = queue.recv().await {
        for m in batch {
            let idx = m.command_index;
            if apply_tx.send(m).await.is_err() {
                let _ = failed.try_send(());
                return;
            }
            applied.store(idx, Ordering::Release);
            queued.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which of two proposals at one index wins is decided when the index
    /// commits, not when the second is made: a deposed leader's entry may
    /// still commit through another leader.
    #[tokio::test]
    async fn the_entry_that_commits_decides_which_waiter_wins() {
        let mut w = Waiters::default();
        let older = w.register(5, 1, true);
        let newer = w.register(5, 3, true);
        let r = w.take(5, 1).expect("the older entry committed");
        r.answer(7u32);
        assert_eq!(older.outcome::<u32>().await, Ok(Some(7)));
        assert_eq!(
            newer.outcome::<u32>().await,
            Err(Error::Overwritten { index: 5, term: 3 })
        );
    }

    /// A commit of a newer term fails the older-term waiters beyond it at
    /// once; waiters of its own term wait for their index.
    #[tokio::test]
    async fn a_newer_commit_fails_older_waiters_beyond_it() {
        let mut w = Waiters::default();
        let stale = w.register(9, 2, true);
        let current = w.register(8, 3, false);
        w.committed(7, 3);
        let waited = std::time::Duration::from_millis(100);
        assert_eq!(
            tokio::time::timeout(waited, stale.outcome::<()>()).await,
            Ok(Err(Error::Overwritten { index: 9, term: 2 })),
            "the stale waiter must be failed by the commit, not left waiting"
        );
        assert!(
            w.take(8, 3).is_none(),
            "resolved at hand-over, no responder"
        );
        assert_eq!(current.committed().await, Ok(8));
    }
}
