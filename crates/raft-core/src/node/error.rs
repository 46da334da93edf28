//! The node's one error type.

use crate::config::ConfigError;
use crate::engine::{EngineError, ProposeError};
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
    /// The configured members disagree with the membership stored in the log.
    #[error("the configured members {configured:?} disagree with the membership stored in the log {stored:?}; the stored membership counts: start with the peers it names")]
    MembershipMismatch {
        /// The members the configuration names (this node and its peers).
        configured: Vec<NodeId>,
        /// The members in force according to the durable log.
        stored: Vec<NodeId>,
    },
}

impl From<ProposeError> for Error {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::NotLeader(n) => n.into(),
            ProposeError::TooLarge { size, max } => Error::TooLarge { size, max },
            ProposeError::Busy { pending, max } => Error::Busy { pending, max },
        }
    }
}

impl From<crate::engine::NotLeader> for Error {
    fn from(e: crate::engine::NotLeader) -> Self {
        Error::NotLeader { leader: e.leader }
    }
}
