//! The node's one error type.

use crate::config::ConfigError;
use crate::engine::{ChangeError, EngineError, ProposeError, TransferError};
use crate::storage::StorageError;
use crate::types::{LogIndex, NodeId, Term};

/// Errors of the node API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// This node is not the leader; `leader` is whom it follows, if known.
    #[error("not the leader (leader hint: {leader:?})")]
    NotLeader {
        /// The leader's id, if known.
        leader: Option<NodeId>,
    },
    /// The configuration was rejected.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The log store failed; the node has stopped.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The stored state cannot be restored.
    #[error(transparent)]
    Restore(#[from] EngineError),
    /// `start` was not called yet.
    #[error("the node has not been started")]
    NotStarted,
    /// `start` was called twice.
    #[error("the node was already started")]
    AlreadyStarted,
    /// The node is not running any more.
    #[error("the node has stopped: {0}")]
    Stopped(String),
    /// The application dropped the receiving end of the apply channel.
    #[error("the apply channel was closed by the application")]
    ApplyChannelClosed,
    /// The entry at this index was replaced by another leader's; it will never commit.
    #[error("entry {index} of term {term} was overwritten by a later leader")]
    Overwritten {
        /// The submitted index.
        index: LogIndex,
        /// The submitted term.
        term: Term,
    },
    /// The outcome cannot be known any more (the entry was compacted away).
    #[error("the outcome of entry {0} is unknown")]
    Unknown(LogIndex),
    /// The command is larger than `Config::max_entry_bytes`; nothing was proposed.
    #[error("command of {size} bytes exceeds the limit of {max} bytes (max_entry_bytes)")]
    TooLarge {
        /// The command's size (for a batch: the batch's).
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Too many bytes wait to commit or to be applied; nothing was proposed.
    /// Retry later.
    #[error(
        "busy: {pending} bytes of entries wait to commit and apply (limit {max}); retry later"
    )]
    Busy {
        /// Bytes waiting.
        pending: u64,
        /// The limit (`Config::max_unapplied_bytes`).
        max: u64,
    },
    /// A membership change was refused.
    #[error(transparent)]
    Change(ChangeError),
    /// A leadership transfer was refused.
    #[error(transparent)]
    Transfer(TransferError),
    /// Leadership is being handed to another member; retry there.
    #[error("leadership is being transferred to node {to}; retry on the new leader")]
    Transferring {
        /// The member taking over.
        to: NodeId,
    },
    /// The transfer to this member did not complete within an election
    /// timeout; the old leader leads on (or another member won).
    #[error("leadership transfer to node {0} did not complete")]
    TransferFailed(NodeId),
    /// The cluster refused this node: the configuration records another
    /// storage identity for its id, so this node's disk is not the one the
    /// member had (it was wiped or replaced).
    #[error("the cluster refuses node {id}: its storage (identity {mine:x}) is not the one the cluster recorded for it ({recorded:x}); its data was lost or replaced. Start it again empty, as a new member: remove node {id} from the cluster and add it back (raft-kv: start it with --join)")]
    Refused {
        /// This node's id.
        id: NodeId,
        /// The identity the configuration records.
        recorded: u64,
        /// This node's storage identity.
        mine: u64,
    },
}

impl From<ChangeError> for Error {
    fn from(e: ChangeError) -> Self {
        match e {
            ChangeError::NotLeader(n) => n.into(),
            ChangeError::Transferring { to } => Error::Transferring { to },
            e => Error::Change(e),
        }
    }
}

impl From<TransferError> for Error {
    fn from(e: TransferError) -> Self {
        match e {
            TransferError::NotLeader(n) => n.into(),
            e => Error::Transfer(e),
        }
    }
}

impl From<ProposeError> for Error {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::NotLeader(n) => n.into(),
            ProposeError::TooLarge { size, max } => Error::TooLarge { size, max },
            ProposeError::Busy { pending, max } => Error::Busy { pending, max },
            ProposeError::Transferring { to } => Error::Transferring { to },
        }
    }
}

impl From<crate::engine::NotLeader> for Error {
    fn from(e: crate::engine::NotLeader) -> Self {
        Error::NotLeader { leader: e.leader }
    }
}
