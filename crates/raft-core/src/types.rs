//! The vocabulary shared by every layer: ids, terms, log entries, membership.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

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
    /// An application command, opaque to Raft. Shared, not copied, by the
    /// log, the messages to each follower and the log store. Encoded as
    /// bytes (a length and the bytes), as a `Vec<u8>` with `serde_bytes`.
    Command(bytes::Bytes),
    /// A new cluster membership; takes effect as soon as it is in the log.
    Membership(Membership),
}

/// An upper bound on what an entry adds to an encoded message beyond its
/// payload's own bytes (`EntryPayload::size_hint`): its term and index, the
/// payload's tag and length prefix, with room to spare for any integer
/// encoding.
pub const ENTRY_OVERHEAD: usize = 48;

impl EntryPayload {
    /// The payload's variable part in bytes: a command's length; for a
    /// membership, 9 bytes per id and 18 plus the address per member. With `ENTRY_OVERHEAD` an upper bound on the
    /// entry's encoded size, used to bound message sizes.
    pub fn size_hint(&self) -> usize {
        match self {
            EntryPayload::Blank => 0,
            EntryPayload::Command(c) => c.len(),
            EntryPayload::Membership(m) => {
                9 * (m.voters.len() + m.outgoing.len() + m.learners.len())
                    + m.nodes.values().map(|n| 18 + n.addr.len()).sum::<usize>()
            }
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

/// A cluster configuration (thesis §4): who votes, who only receives the
/// log, and where each member listens. Quorums are always computed from a
/// `Membership`, never from a constant.
///
/// During joint consensus (thesis §4.3) `outgoing` holds the previous
/// voters: an election or a commit then needs a majority of `voters` and a
/// majority of `outgoing`, each on its own. Outside a change `outgoing` is
/// empty.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Membership {
    /// The voting members (during a change: the incoming configuration).
    pub voters: BTreeSet<NodeId>,
    /// During joint consensus: the outgoing configuration's voters; empty otherwise.
    pub outgoing: BTreeSet<NodeId>,
    /// Members that receive the log and snapshots but never vote or count
    /// toward a commit.
    pub learners: BTreeSet<NodeId>,
    /// What is known of each member (address, storage identity); members
    /// missing here are reached through the addresses the transport was
    /// started with.
    pub nodes: BTreeMap<NodeId, Member>,
}

/// What the configuration records about one member.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Member {
    /// The address peers reach it at (the transport's syntax, e.g. `host:port`);
    /// empty when unknown.
    pub addr: String,
    /// The identity of the member's storage, made when its storage was
    /// created (0: not recorded). A node whose storage has another
    /// identity is not this member: it lost its disk.
    pub incarnation: u64,
}

/// The majority of `set` that `value` reaches: the highest value held by a
/// majority (ids missing from `value` count as 0). An empty set accepts anything.
fn majority_value(set: &BTreeSet<NodeId>, value: &impl Fn(NodeId) -> u64) -> u64 {
    if set.is_empty() {
        return u64::MAX;
    }
    let mut vals: Vec<u64> = set.iter().map(|&id| value(id)).collect();
    vals.sort_unstable_by(|a, b| b.cmp(a));
    vals[set.len() / 2]
}

impl Membership {
    /// A membership of the given voters, no learners, no addresses.
    pub fn new(voters: impl IntoIterator<Item = NodeId>) -> Self {
        Membership {
            voters: voters.into_iter().collect(),
            ..Default::default()
        }
    }

    /// True when `id` votes: in `voters`, or in `outgoing` during a change.
    pub fn contains(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.outgoing.contains(&id)
    }

    /// True when `id` is a voter or a learner.
    pub fn is_member(&self, id: NodeId) -> bool {
        self.contains(id) || self.learners.contains(&id)
    }

    /// True during joint consensus.
    pub fn is_joint(&self) -> bool {
        !self.outgoing.is_empty()
    }

    /// Every node that votes in this configuration (both sides of a change).
    pub fn all_voters(&self) -> BTreeSet<NodeId> {
        self.voters.union(&self.outgoing).copied().collect()
    }

    /// Every member: voters of both sides and learners.
    pub fn all_members(&self) -> BTreeSet<NodeId> {
        let mut all = self.all_voters();
        all.extend(self.learners.iter().copied());
        all
    }

    /// The address recorded for `id`, if any.
    pub fn addr(&self, id: NodeId) -> Option<&str> {
        self.nodes
            .get(&id)
            .map(|m| m.addr.as_str())
            .filter(|a| !a.is_empty())
    }

    /// The storage identity recorded for `id` (0: none recorded).
    pub fn incarnation(&self, id: NodeId) -> u64 {
        self.nodes.get(&id).map_or(0, |m| m.incarnation)
    }

    /// How many votes (or acknowledgements) make a majority of `voters`
    /// (outside a change, the whole story; during one, see [`Membership::is_quorum`]).
    pub fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    /// True when the voters in `yes` form a majority (of both sides during
    /// a change). Learners never count.
    pub fn is_quorum<'a>(&self, yes: impl IntoIterator<Item = &'a NodeId>) -> bool {
        let yes: BTreeSet<NodeId> = yes.into_iter().copied().collect();
        let learners_count =
            crate::mutation::broken(crate::mutation::Mutation::LearnerCountsInQuorum);
        let majority = |set: &BTreeSet<NodeId>| {
            let mut n = set.iter().filter(|id| yes.contains(id)).count();
            let mut size = set.len();
            if learners_count && set == &self.voters {
                n += self.learners.iter().filter(|id| yes.contains(id)).count();
                size += self.learners.len();
            }
            n > size / 2
        };
        let new_side = majority(&self.voters)
            || crate::mutation::broken(crate::mutation::Mutation::JointCommitOldOnly)
                && self.is_joint();
        let old_side = self.outgoing.is_empty()
            || majority(&self.outgoing)
            || crate::mutation::broken(crate::mutation::Mutation::JointCommitNewOnly);
        !self.voters.is_empty() && new_side && old_side
    }

    /// The highest value a majority has reached (a majority of each side
    /// during a change), given each voter's value (voters missing from
    /// `value` count as 0). Learners never count.
    pub fn committed_value(&self, value: impl Fn(NodeId) -> u64) -> u64 {
        use crate::mutation::{broken, Mutation};
        if self.voters.is_empty() {
            return 0;
        }
        let new_side = if broken(Mutation::LearnerCountsInQuorum) {
            let all: BTreeSet<NodeId> = self.voters.union(&self.learners).copied().collect();
            majority_value(&all, &value)
        } else if broken(Mutation::JointCommitOldOnly) && self.is_joint() {
            u64::MAX
        } else {
            majority_value(&self.voters, &value)
        };
        let old_side = if broken(Mutation::JointCommitNewOnly) {
            u64::MAX
        } else {
            majority_value(&self.outgoing, &value)
        };
        new_side.min(old_side)
    }

    /// Checks that the configuration can run a cluster: at least one voter,
    /// no node both voter and learner (an outgoing voter may be an incoming
    /// learner: it is being demoted).
    pub fn validate(&self) -> Result<(), String> {
        if self.voters.is_empty() {
            return Err("a configuration needs at least one voter".into());
        }
        if let Some(id) = self.learners.iter().find(|id| self.voters.contains(*id)) {
            return Err(format!("node {id} is both a voter and a learner"));
        }
        if let Some(id) = self.nodes.keys().find(|id| !self.is_member(**id)) {
            return Err(format!("node {id} has an address but is not a member"));
        }
        Ok(())
    }
}

impl std::fmt::Display for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "voters {:?}", self.voters)?;
        if self.is_joint() {
            write!(f, " joint with {:?}", self.outgoing)?;
        }
        if !self.learners.is_empty() {
            write!(f, " learners {:?}", self.learners)?;
        }
        Ok(())
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
