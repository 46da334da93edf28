//! The vocabulary shared by every layer: ids, terms, log entries, membership.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Identifies one member of a cluster. Ids are chosen by the operator and never reused.
pub type NodeId = u64;
/// A Raft term (§5.1): a logical clock that only moves forward.
pub type Term = u64;
/// The position of an entry in the replicated log; the first real entry is index 1.
pub type LogIndex = u64;

/// The (term, index) pair that names one log position.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct LogId {
    /// The term of the entry at `index`.
    pub term: Term,
    /// The index of the entry.
    pub index: LogIndex,
}

impl LogId {
    /// Builds a log id.
    pub fn new(term: Term, index: LogIndex) -> Self {
        LogId { term, index }
    }
}

/// What a log entry carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EntryPayload {
    /// A no-op, appended by every new leader so that it can commit an entry of its own term.
    Blank,
    /// An application command, opaque to Raft.
    // As bytes, not a sequence of u8: same encoding, one copy instead of a loop.
    Command(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A new cluster membership; takes effect as soon as it is in the log.
    Membership(Membership),
}

/// An upper bound on what an entry adds to an encoded message beyond its
/// payload's own bytes (`EntryPayload::size_hint`): its term and index, the
/// payload's tag and length prefix, with room to spare for any integer
/// encoding.
pub const ENTRY_OVERHEAD: usize = 48;

impl EntryPayload {
    /// The payload's variable part in bytes: a command's length, 9 bytes per
    /// voter of a membership. With `ENTRY_OVERHEAD` an upper bound on the
    /// entry's encoded size, used to bound message sizes.
    pub fn size_hint(&self) -> usize {
        match self {
            EntryPayload::Blank => 0,
            EntryPayload::Command(c) => c.len(),
            EntryPayload::Membership(m) => 9 * m.voters.len(),
        }
    }
}

/// One entry of the replicated log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The term in which a leader created this entry.
    pub term: Term,
    /// Its position in the log.
    pub index: LogIndex,
    /// What it carries.
    pub payload: EntryPayload,
}

impl Entry {
    /// An upper bound on this entry's encoded size in a message.
    pub fn size_bound(&self) -> usize {
        self.payload.size_hint() + ENTRY_OVERHEAD
    }

    /// The (term, index) of this entry.
    pub fn log_id(&self) -> LogId {
        LogId::new(self.term, self.index)
    }
}

/// The set of voting members. Quorums are always computed from a `Membership`,
/// never from a constant, so that membership changes can be added without
/// touching the quorum code.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Membership {
    /// The voting members.
    pub voters: BTreeSet<NodeId>,
}

impl Membership {
    /// A membership of the given voters.
    pub fn new(voters: impl IntoIterator<Item = NodeId>) -> Self {
        Membership {
            voters: voters.into_iter().collect(),
        }
    }

    /// True when `id` is a voter.
    pub fn contains(&self, id: NodeId) -> bool {
        self.voters.contains(&id)
    }

    /// How many votes (or acknowledgements) make a majority.
    pub fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    /// True when the voters in `yes` form a majority.
    pub fn is_quorum<'a>(&self, yes: impl IntoIterator<Item = &'a NodeId>) -> bool {
        yes.into_iter()
            .filter(|id| self.voters.contains(id))
            .count()
            >= self.quorum()
    }

    /// The highest value that a majority of voters has reached, given each
    /// voter's value (voters missing from `value` count as 0).
    pub fn committed_value(&self, value: impl Fn(NodeId) -> u64) -> u64 {
        if self.voters.is_empty() {
            return 0;
        }
        let mut vals: Vec<u64> = self.voters.iter().map(|&id| value(id)).collect();
        vals.sort_unstable_by(|a, b| b.cmp(a));
        vals[self.quorum() - 1]
    }
}

/// What a snapshot covers: the application's state after applying every
/// entry up to `last`, and the membership in force there. The log store
/// keeps the latest one (`LogState::snapshot`); the bytes live with the
/// application (`SnapshotStore`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The last entry the snapshot covers.
    pub last: LogId,
    /// The membership in force at `last`.
    pub membership: Membership,
}

/// The state that must be durable before any message that depends on it leaves
/// the node (Figure 2, "persistent state on all servers").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HardState {
    /// The latest term this node has seen.
    pub term: Term,
    /// The candidate this node voted for in `term`, if any.
    pub vote: Option<NodeId>,
}

/// The role a node plays in its current term (§5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Passive: answers leaders and candidates.
    Follower,
    /// Asking peers whether they would vote, without disturbing their term (pre-vote, thesis §9.6).
    PreCandidate,
    /// Asking for votes in a new term.
    Candidate,
    /// Handles all proposals and replicates the log.
    Leader,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Follower => "follower",
            Role::PreCandidate => "pre-candidate",
            Role::Candidate => "candidate",
            Role::Leader => "leader",
        })
    }
}
