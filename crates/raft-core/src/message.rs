//! Messages exchanged between Raft nodes. Transports carry these as opaque values.

use crate::types::{Entry, LogIndex, NodeId, SnapshotMeta, Term};
use serde::{Deserialize, Serialize};

/// An upper bound on what an AppendEntries adds to an encoded frame beyond
/// its entries (each bounded by `Entry::size_bound`): sender, receiver, term,
/// the kind's tag, the previous entry's id, the commit index and the entry
/// count, with room to spare. A transport whose frames hold
/// `max_bytes_per_msg + MESSAGE_OVERHEAD` bytes carries every message.
pub const MESSAGE_OVERHEAD: usize = 128;

/// One message from one node to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The sender.
    pub from: NodeId,
    /// The receiver.
    pub to: NodeId,
    /// The sender's term (for a pre-vote request, the term it would campaign in).
    pub term: Term,
    /// The identity of the sender's storage (`LogState::incarnation`; 0:
    /// not given). A member whose recorded identity differs lost its disk
    /// and is refused (`MessageBody::Refused`).
    pub incarnation: u64,
    /// What the message says.
    pub body: MessageBody,
}

/// The kinds of messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageBody {
    /// RequestVote (§5.2), or a pre-vote probe when `pre_vote` is set.
    VoteRequest {
        /// True for a pre-vote: the receiver changes no state.
        pre_vote: bool,
        /// Index of the candidate's last entry (§5.4.1).
        last_log_index: LogIndex,
        /// Term of the candidate's last entry (§5.4.1).
        last_log_term: Term,
        /// The leader handed leadership to this candidate (`TimeoutNow`):
        /// voters answer even while they hear from that leader.
        transfer: bool,
    },
    /// The answer to a `VoteRequest`.
    VoteResponse {
        /// Answers a pre-vote.
        pre_vote: bool,
        /// True when the vote is granted.
        granted: bool,
    },
    /// AppendEntries (§5.3): replicates entries following `prev_log_index`.
    AppendEntries {
        /// Index of the entry immediately preceding `entries`.
        prev_log_index: LogIndex,
        /// Term of that entry.
        prev_log_term: Term,
        /// Entries to store, contiguous from `prev_log_index + 1`; empty for a probe.
        entries: Vec<Entry>,
        /// The leader's commit index.
        leader_commit: LogIndex,
    },
    /// The answer to `AppendEntries`.
    AppendResponse {
        /// True when the follower's log matched and now holds the entries.
        success: bool,
        /// On success: the highest index known to match the leader.
        /// On failure: the `prev_log_index` that was rejected.
        index: LogIndex,
        /// On failure: where the leader should retry (fast back-off).
        hint: Option<RejectHint>,
    },
    /// A leader's heartbeat: keeps followers from campaigning and confirms
    /// leadership for linearizable reads.
    Heartbeat {
        /// The leader's commit index, capped at what the follower is known to hold.
        leader_commit: LogIndex,
        /// The leader's heartbeat round; echoed back.
        round: u64,
        /// Every member holds the log up to this index: a node may drop
        /// entries up to it once it has applied them and the application has
        /// stored their effects (see `Engine::release`).
        purge_to_index: LogIndex,
    },
    /// The answer to a heartbeat.
    HeartbeatResponse {
        /// The round being answered.
        round: u64,
    },
    /// Leadership transfer (thesis §3.10): the leader tells an up-to-date
    /// follower to start an election at once.
    TimeoutNow,
    /// The receiver's storage is not the one the configuration records for
    /// its id (its disk was lost or replaced): it must not act as that
    /// member; it can be added back as a new one.
    Refused {
        /// The storage identity the configuration records for the receiver.
        recorded: u64,
    },
    /// A snapshot has arrived whole from the leader and is stored with the
    /// application. The receiving node's driver makes this message itself
    /// when the last chunk is durable; one arriving from the network is
    /// dropped. The engine answers with an `AppendResponse`.
    InstallSnapshot {
        /// What the snapshot covers.
        meta: SnapshotMeta,
    },
    /// A piece of a snapshot, streamed by the leader's driver (the engine
    /// never sees it). Chunks go out in order, a few ahead of the
    /// acknowledgements.
    SnapshotChunk {
        /// What the snapshot covers.
        meta: SnapshotMeta,
        /// The snapshot's size in bytes.
        size: u64,
        /// Where `data` starts in the snapshot.
        offset: u64,
        /// The bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// A follower's driver acknowledges snapshot bytes: it holds the first
    /// `next` bytes of the snapshot at `index` durably, and wants the rest
    /// from `next` on (a smaller `next` than sent asks for a resend; 0
    /// restarts the transfer).
    SnapshotAck {
        /// The snapshot's last index.
        index: LogIndex,
        /// The first byte not yet held.
        next: u64,
    },
}

/// The follower's hint for a rejected AppendEntries, letting the leader skip a
/// whole term of entries per round trip instead of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectHint {
    /// The term of the follower's entry at the rejected index, or `None` when the
    /// follower's log is shorter than that index.
    pub conflict_term: Option<Term>,
    /// The first index the follower holds for `conflict_term`, or, when the log is
    /// too short, its last index plus one.
    pub first_index: LogIndex,
}

impl MessageBody {
    /// A short name for logging.
    pub fn kind(&self) -> &'static str {
        match self {
            MessageBody::VoteRequest { pre_vote: true, .. } => "PreVote",
            MessageBody::VoteRequest { .. } => "RequestVote",
            MessageBody::VoteResponse { pre_vote: true, .. } => "PreVoteResponse",
            MessageBody::VoteResponse { .. } => "VoteResponse",
            MessageBody::AppendEntries { .. } => "AppendEntries",
            MessageBody::AppendResponse { .. } => "AppendResponse",
            MessageBody::Heartbeat { .. } => "Heartbeat",
            MessageBody::HeartbeatResponse { .. } => "HeartbeatResponse",
            MessageBody::InstallSnapshot { .. } => "InstallSnapshot",
            MessageBody::TimeoutNow => "TimeoutNow",
            MessageBody::Refused { .. } => "Refused",
            MessageBody::SnapshotChunk { .. } => "SnapshotChunk",
            MessageBody::SnapshotAck { .. } => "SnapshotAck",
        }
    }
}
