//! What a leader knows about each follower's log (Figure 2, "volatile state on leaders"),
//! plus the flow-control state for pipelined replication.

use crate::types::LogIndex;
use std::collections::VecDeque;
use std::time::Duration;

/// How the leader currently sends to a follower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplState {
    /// The follower's match point is unknown: one AppendEntries at a time, each
    /// waiting for its answer (or the next heartbeat) before the next is sent.
    Probe,
    /// The follower's log is known to match: AppendEntries are pipelined, up to
    /// `max_inflight` unanswered messages at once.
    Replicate,
    /// The follower needs entries below the compaction point: a snapshot
    /// ending at this index is on its way; nothing else is sent until the
    /// follower acknowledges it (or the transfer fails).
    Snapshot(LogIndex),
}

#[derive(Debug, Clone)]
pub(crate) struct Progress {
    /// Highest index known replicated (and durable) on the follower.
    pub(crate) match_index: LogIndex,
    /// Next index to send.
    pub(crate) next_index: LogIndex,
    pub(crate) state: ReplState,
    /// In Probe state: a probe is unanswered.
    pub(crate) paused: bool,
    /// In Probe state: the last index the unanswered probe carried, if any.
    pub(crate) probe_last: Option<LogIndex>,
    /// The follower took only part of what was sent (its application is
    /// behind): acknowledgements that show no progress are ignored until a
    /// heartbeat answer or real progress, so duplicates cannot restart sending.
    pub(crate) backoff: bool,
    /// In Replicate state: last index of each unanswered AppendEntries, oldest first.
    pub(crate) inflight: VecDeque<LogIndex>,
    /// Heard from since the last check-quorum round.
    pub(crate) recent_active: bool,
    /// Highest heartbeat round the follower answered.
    pub(crate) round_acked: u64,
    /// When replication last made progress (or the pipeline was last empty).
    pub(crate) last_progress: Duration,
    /// The highest commit index sent to the follower (in an append, or a
    /// heartbeat within what it holds).
    pub(crate) commit_told: LogIndex,
}

impl Progress {
    pub(crate) fn new(next_index: LogIndex, now: Duration) -> Self {
        Progress {
            match_index: 0,
            next_index,
            state: ReplState::Probe,
            paused: false,
            probe_last: None,
            backoff: false,
            inflight: VecDeque::new(),
            recent_active: false,
            round_acked: 0,
            last_progress: now,
            commit_told: 0,
        }
    }

    /// A follower's progress invariant: the next index to send is past
    /// what it is known to hold.
    pub(crate) fn check(&self) {
        debug_assert!(
            self.match_index < self.next_index,
            "match {} not below next {}",
            self.match_index,
            self.next_index
        );
    }

    pub(crate) fn become_probe(&mut self) {
        self.state = ReplState::Probe;
        self.paused = false;
        self.inflight.clear();
        self.next_index = self.match_index + 1;
    }

    pub(crate) fn become_snapshot(&mut self, index: LogIndex) {
        self.backoff = false;
        self.state = ReplState::Snapshot(index);
        self.paused = false;
        self.probe_last = None;
        self.inflight.clear();
    }

    pub(crate) fn become_replicate(&mut self) {
        self.backoff = false;
        self.state = ReplState::Replicate;
        self.paused = false;
        self.inflight.clear();
        self.next_index = self.match_index + 1;
    }

    /// Records a successful append up to `index`; returns true if `match_index` moved.
    pub(crate) fn ack(&mut self, index: LogIndex, now: Duration) -> bool {
        while self.inflight.front().is_some_and(|&i| i <= index) {
            self.inflight.pop_front();
        }
        self.paused = false;
        if index > self.match_index {
            self.match_index = index;
            self.next_index = self.next_index.max(index + 1);
            self.last_progress = now;
            self.check();
            true
        } else {
            false
        }
    }
}
