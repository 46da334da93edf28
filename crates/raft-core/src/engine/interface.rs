//! What goes into the engine and what comes out: the durable state it
//! restarts from, its errors, and the [`Ready`] the driver carries out.

use crate::config::ConfigError;
use crate::message::Message;
use crate::types::{Entry, HardState, LogId, LogIndex, Membership, NodeId, SnapshotMeta};

/// The durable state a node restarts from.
#[derive(Debug, Clone, Default)]
pub struct InitialState {
    /// Last persisted term and vote.
    pub hard_state: HardState,
    /// The compaction point: the last index (and its term) no longer in the log.
    /// `LogId::default()` for a log that starts at index 1.
    pub purged: LogId,
    /// The log entries after the compaction point, contiguous.
    pub entries: Vec<Entry>,
    /// The membership in force at the compaction point (for a new cluster: the
    /// initial members). Membership entries in `entries` override it.
    pub membership: Membership,
    /// The highest index the application has already applied; entries up to it
    /// are not handed out again.
    pub applied: LogIndex,
    /// The latest snapshot the application holds (`LogState::snapshot`).
    /// When `applied` is below the compaction point (a crash between
    /// storing a leader's snapshot and installing it, or state files
    /// lost), the node hands it to the application first
    /// (`Ready::apply_snapshot`).
    pub snapshot: Option<SnapshotMeta>,
    /// When `applied` is below the compaction point and no snapshot here
    /// covers it: instead of refusing to start, keep the log (and vote with
    /// it) but apply nothing and campaign for nothing until the leader's
    /// snapshot arrives (a node whose state files were lost). Only for a
    /// node that can receive snapshots and has other members to get one
    /// from.
    pub await_snapshot: bool,
    /// This node's storage identity (`LogState::incarnation`), sent with
    /// every message; 0 when the store keeps none.
    pub incarnation: u64,
}

/// Why durable state could not be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The persisted state contradicts itself.
    #[error("inconsistent persisted state: {0}")]
    InvalidState(String),
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Why a proposal was refused. Nothing was appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// This node does not lead.
    #[error(transparent)]
    NotLeader(#[from] NotLeader),
    /// The command is larger than `max_entry_bytes`.
    #[error("command of {size} bytes exceeds the limit of {max} bytes (max_entry_bytes)")]
    TooLarge {
        /// The command's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The node holds `max_unapplied_bytes` of entries that are not committed
    /// and applied yet (followers or the application are behind); retry later.
    #[error(
        "busy: {pending} bytes of entries wait to commit and apply (limit {max}); retry later"
    )]
    Busy {
        /// Bytes waiting.
        pending: u64,
        /// The limit.
        max: u64,
    },
    /// Leadership is being handed to another member; retry there.
    #[error("leadership is being transferred to node {to}; retry on the new leader")]
    Transferring {
        /// The member taking over.
        to: NodeId,
    },
}

/// A proposal or read reached a node that is not the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not the leader (leader hint: {leader:?})")]
pub struct NotLeader {
    /// The leader this node believes in, if any.
    pub leader: Option<NodeId>,
}

/// The outcome of a `Engine::read_index` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadResult {
    /// The caller's token.
    pub ctx: u64,
    /// `Ok(index)`: a read that waits until `index` is applied is linearizable.
    /// `Err`: leadership was lost before it could be confirmed.
    pub result: Result<LogIndex, NotLeader>,
}

/// Everything the engine asks the outside world to do. See the module docs for
/// the order in which the parts must be carried out.
#[derive(Debug, Default)]
pub struct Ready {
    /// Term and vote to persist, when they changed.
    pub hard_state: Option<HardState>,
    /// Remove every stored entry from this index on (before appending `entries`).
    pub truncate_from: Option<LogIndex>,
    /// Entries to append durably.
    pub entries: Vec<Entry>,
    /// Messages that may be sent right away.
    pub messages: Vec<Message>,
    /// Messages to send only after this ready's state is durable.
    pub persisted_messages: Vec<Message>,
    /// Committed entries to apply, in index order, each exactly once.
    pub committed: Vec<Entry>,
    /// Answers to read-index requests.
    pub reads: Vec<ReadResult>,
    /// The store may drop every entry up to and including this one, once this
    /// ready's writes are durable (`LogStore::purge`).
    pub purge_to: Option<LogId>,
    /// The membership in force at `purge_to`, when compaction moved past a
    /// membership entry: store it (`LogBatch::membership`) before purging.
    pub membership: Option<Membership>,
    /// The application's new snapshot: record it (`LogBatch::snapshot`).
    pub snapshot: Option<SnapshotMeta>,
    /// A snapshot from the leader replaces the log (`LogBatch::install`),
    /// before this ready's other writes.
    pub install: Option<SnapshotMeta>,
    /// Once this ready's writes are durable, the application must load
    /// this snapshot (it holds the bytes) before applying `committed`.
    pub apply_snapshot: Option<SnapshotMeta>,
    /// Followers that need a snapshot: stream it to them, then tell the
    /// engine if the transfer fails (`Engine::snapshot_failed`).
    pub send_snapshots: Vec<(NodeId, SnapshotMeta)>,
}

impl Ready {
    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.hard_state.is_none()
            && self.truncate_from.is_none()
            && self.entries.is_empty()
            && self.messages.is_empty()
            && self.persisted_messages.is_empty()
            && self.committed.is_empty()
            && self.reads.is_empty()
            && self.purge_to.is_none()
            && self.membership.is_none()
            && self.snapshot.is_none()
            && self.install.is_none()
            && self.apply_snapshot.is_none()
            && self.send_snapshots.is_empty()
    }

    /// The id of the last entry to append, to pass to `Engine::persisted`.
    pub fn last_entry(&self) -> Option<LogId> {
        self.entries.last().map(Entry::log_id)
    }
}
