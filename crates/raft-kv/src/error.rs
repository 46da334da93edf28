//! The store's one error type. Its texts say what went wrong; the Redis
//! edge (`resp::error_reply`) picks the reply code (`ERR`, `TRYAGAIN`,
//! `UNKNOWN`, ...) and is the only place that spells a Redis error.

use serde::{Deserialize, Serialize};

/// Why a command got no value. Travels between nodes with forwarded writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum KvError {
    /// A value that must be an integer is not one.
    #[error("value is not an integer or out of range")]
    NotAnInteger,
    /// EXEC after a queued command was refused.
    #[error("Transaction discarded because of previous errors.")]
    ExecAbort,
    /// MULTI inside MULTI, EXEC or DISCARD outside, a command a
    /// transaction cannot hold: Redis's text.
    #[error("{0}")]
    Tx(String),
    /// A value that must be a float is not one.
    #[error("value is not a valid float")]
    NotAFloat,
    /// INCRBYFLOAT would make an infinity or NaN.
    #[error("increment would produce NaN or Infinity")]
    FloatOverflow,
    /// RENAME of a key that does not exist.
    #[error("no such key")]
    NoSuchKey,
    /// SETRANGE past the largest string.
    #[error("string exceeds maximum allowed size (proto-max-bulk-len)")]
    StringTooLong,
    /// INCR/INCRBY/DECR would leave the i64 range.
    #[error("increment or decrement would overflow")]
    Overflow,
    /// DECRBY with i64::MIN.
    #[error("decrement would overflow")]
    DecrementOverflow,
    /// The command has the wrong number of arguments (its name, lowercase).
    #[error("wrong number of arguments for '{0}' command")]
    WrongArity(String),
    /// An option is not understood.
    #[error("syntax error")]
    Syntax,
    /// No such command.
    #[error("unknown command '{name}', with args beginning with: {args}")]
    UnknownCommand {
        /// The name as sent.
        name: String,
        /// The first arguments, quoted.
        args: String,
    },
    /// A subcommand that does not exist.
    #[error("unknown subcommand '{sub}'. Try {command} HELP.")]
    UnknownSubcommand {
        /// The subcommand as sent (upper case).
        sub: String,
        /// The command.
        command: String,
    },
    /// HELLO with a protocol version that is not a number.
    #[error("Protocol version is not an integer or out of range")]
    ProtoNotInteger,
    /// HELLO with a protocol version other than 2 or 3.
    #[error("unsupported protocol version")]
    NoProto,
    /// HELLO with an unknown option.
    #[error("Syntax error in HELLO option '{0}'")]
    HelloSyntax(String),
    /// HELLO without AUTH on a connection that must authenticate.
    #[error("HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time")]
    HelloAuthRequired,
    /// SELECT of a database other than 0.
    #[error("DB index is out of range")]
    DbOutOfRange,
    /// CLIENT KILL of a client that does not exist.
    #[error("No such client")]
    NoSuchClient,
    /// A client name with spaces or special characters.
    #[error("Client names cannot contain spaces, newlines or special characters.")]
    BadClientName,
    /// Any other error, spelled as Redis spells it.
    #[error("{0}")]
    Other(String),
    /// AUTH while no password is configured.
    #[error("AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?")]
    NoPasswordSet,
    /// AUTH with the wrong password.
    #[error("invalid username-password pair or user is disabled.")]
    WrongPassword,
    /// A command before AUTH.
    #[error("Authentication required.")]
    AuthRequired,
    /// The command is larger than the log takes; nothing was written.
    #[error("command too large: {size} bytes encoded, the limit is {max} bytes (max-entry-bytes); nothing was written")]
    TooLarge {
        /// The encoded size.
        size: usize,
        /// `max_entry_bytes`.
        max: usize,
    },
    /// A reply would pass the client output limit; the client is
    /// disconnected after this answer.
    #[error(
        "reply too large: more than {limit} bytes (client-output-limit); closing the connection"
    )]
    ReplyTooLarge {
        /// The limit.
        limit: usize,
    },
    /// This node stopped (a failed disk or state machine).
    #[error("this node has stopped ({0}); it serves nothing until it is restarted")]
    Stopped(String),
    /// No leader within the wait; nothing was written.
    #[error("no leader is available; try again")]
    NoLeader,
    /// Known not applied (refused, replaced, or never sent); retry.
    #[error("{0}")]
    NotApplied(String),
    /// The write may or may not have been applied.
    #[error("the write's outcome is unknown ({0}); it may or may not have been applied")]
    Unknown(String),
    /// An entry at or below the applied index came again (never applied twice).
    #[error("already applied")]
    AlreadyApplied,
    /// The state machine's storage failed.
    #[error("storage: {0}")]
    Storage(String),
    /// This node does not lead (internal: the caller retries on the leader).
    #[error("not the leader (leader hint: {0:?})")]
    NotLeaderHint(Option<u64>),
    /// Raft refused the proposal for another reason.
    #[error("{0}")]
    Raft(String),
    /// A bug: something that cannot happen did.
    #[error("internal: {0}")]
    Internal(String),
    /// A command for one type used on a key of another.
    #[error("Operation against a key holding the wrong kind of value")]
    WrongType,
    /// HINCRBY on a field that is not an integer.
    #[error("hash value is not an integer")]
    HashNotAnInteger,
    /// HINCRBYFLOAT on a field that is not a float.
    #[error("hash value is not a float")]
    HashNotAFloat,
}

impl KvError {
    /// True when a write failed in a way that must stop the writes queued
    /// behind it (their order would no longer hold): its outcome is unknown
    /// or it was not applied.
    pub fn stops_pipeline(&self) -> bool {
        matches!(
            self,
            KvError::Unknown(_) | KvError::NoLeader | KvError::NotApplied(_)
        )
    }
}

impl From<sled::Error> for KvError {
    fn from(e: sled::Error) -> Self {
        KvError::Storage(e.to_string())
    }
}

/// redb's errors, one type per operation, all storage failures here.
macro_rules! from_redb {
    ($($t:ident),*) => {$(
        impl From<redb::$t> for KvError {
            fn from(e: redb::$t) -> Self {
                KvError::Storage(redb::Error::from(e).to_string())
            }
        }
    )*};
}
from_redb!(
    Error,
    StorageError,
    TableError,
    TransactionError,
    CommitError,
    SetDurabilityError,
    DatabaseError
);

/// A command's result.
pub type Reply = Result<crate::command::Value, KvError>;
