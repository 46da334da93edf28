//! The leader's linearizable reads (thesis §6.4) and the heartbeat rounds
//! that confirm them: [`ReadQueue`] owns every read request from its
//! arrival to its answer, and the round counter the heartbeats carry.

use super::interface::{NotLeader, ReadResult};
use crate::types::LogIndex;

#[derive(Debug, Clone, Copy)]
struct PendingRead {
    ctx: u64,
    index: LogIndex,
    /// The heartbeat round whose quorum confirms leadership; `None` until one is started.
    round: Option<u64>,
}

/// Read requests waiting for their read index or for a quorum's
/// confirmation, and the answers not yet handed out.
#[derive(Debug, Default)]
pub(super) struct ReadQueue {
    /// The latest heartbeat round (each broadcast starts one).
    round: u64,
    /// When recent rounds were sent (leader's clock), oldest first.
    sent: std::collections::VecDeque<(u64, std::time::Duration)>,
    /// Reads with a read index, waiting for a round's quorum.
    pending: Vec<PendingRead>,
    /// Reads that reached a new leader before it committed an entry of its
    /// term: their read index is that entry's.
    before_commit: Vec<u64>,
    /// Reads wait for a round that has not started.
    need_round: bool,
    results: Vec<ReadResult>,
}

impl ReadQueue {
    /// The latest round.
    pub(super) fn round(&self) -> u64 {
        self.round
    }

    /// A read arrives; `committed` is the read index when the leader
    /// already committed an entry of its term, else it waits for one.
    pub(super) fn push(&mut self, ctx: u64, committed: Option<LogIndex>) {
        match committed {
            Some(index) => {
                self.pending.push(PendingRead {
                    ctx,
                    index,
                    round: None,
                });
                self.need_round = true;
            }
            None => self.before_commit.push(ctx),
        }
    }

    /// The leader committed an entry of its term at `index`: reads waiting
    /// for it get it as their read index. True when some did.
    pub(super) fn leader_committed(&mut self, index: LogIndex) -> bool {
        if self.before_commit.is_empty() {
            return false;
        }
        for ctx in std::mem::take(&mut self.before_commit) {
            self.pending.push(PendingRead {
                ctx,
                index,
                round: None,
            });
        }
        self.need_round = true;
        true
    }

    /// True when reads wait for a round that has not started.
    pub(super) fn needs_round(&self) -> bool {
        self.need_round
    }

    /// Forgets the wish for a round (not leader, or a round is starting).
    pub(super) fn clear_need(&mut self) {
        self.need_round = false;
    }

    /// True when every pending read has a round already.
    pub(super) fn all_in_round(&self) -> bool {
        self.pending.iter().all(|r| r.round.is_some())
    }

    /// Starts the next round (a heartbeat broadcast follows); reads without
    /// one join it. Returns its number.
    pub(super) fn next_round(&mut self, now: std::time::Duration) -> u64 {
        self.round += 1;
        let round = self.round;
        self.sent.push_back((round, now));
        // Only rounds newer than the one a majority confirmed can matter.
        while self.sent.len() > 64 {
            self.sent.pop_front();
        }
        for r in self.pending.iter_mut().filter(|r| r.round.is_none()) {
            r.round = Some(round);
        }
        round
    }

    /// A quorum has confirmed every round up to `confirmed` (or no quorum
    /// is needed: `single`): those reads are answered.
    pub(super) fn confirm(&mut self, confirmed: u64, single: bool) {
        let results = &mut self.results;
        self.pending.retain(|r| {
            let done = single || r.round.is_some_and(|rr| rr <= confirmed);
            if done {
                results.push(ReadResult {
                    ctx: r.ctx,
                    result: Ok(r.index),
                });
            }
            !done
        });
    }

    /// When round `round` was sent, if it is recent.
    pub(super) fn sent_at(&self, round: u64) -> Option<std::time::Duration> {
        self.sent.iter().find(|(r, _)| *r == round).map(|(_, t)| *t)
    }

    /// Answers a read at once (a lease read).
    pub(super) fn answer_now(&mut self, ctx: u64, index: LogIndex) {
        self.results.push(ReadResult {
            ctx,
            result: Ok(index),
        });
    }

    /// A new term: rounds of an earlier leadership confirm nothing.
    pub(super) fn forget_rounds(&mut self) {
        self.sent.clear();
    }

    /// True when no read waits for a quorum.
    pub(super) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Leadership is lost: every waiting read fails.
    pub(super) fn fail_all(&mut self) {
        let leader = NotLeader { leader: None };
        let failed = self
            .pending
            .drain(..)
            .map(|r| r.ctx)
            .chain(self.before_commit.drain(..));
        self.results.extend(failed.map(|ctx| ReadResult {
            ctx,
            result: Err(leader),
        }));
    }

    /// True when answers wait to be handed out.
    pub(super) fn has_results(&self) -> bool {
        !self.results.is_empty()
    }

    /// The answers to hand out.
    pub(super) fn take_results(&mut self) -> Vec<ReadResult> {
        std::mem::take(&mut self.results)
    }
}
