//! The commands replicated through the Raft log, and their results.

use serde::{Deserialize, Serialize};

/// A condition on SET.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetCond {
    /// Always set.
    Always,
    /// Only if the key does not exist (NX).
    IfAbsent,
    /// Only if the key exists (XX).
    IfPresent,
}

/// A write, as stored in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteCmd {
    /// SET key value [NX|XX].
    Set {
        /// Key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// Value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// Condition.
        cond: SetCond,
    },
    /// DEL key...
    Del(Vec<Vec<u8>>),
    /// MSET key value ...
    MSet(Vec<(Vec<u8>, Vec<u8>)>),
    /// INCRBY key delta (INCR, DECR, INCRBY).
    IncrBy(#[serde(with = "serde_bytes")] Vec<u8>, i64),
    /// CAS key expected new: set to `new` only if the value equals `expected`.
    Cas {
        /// Key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// Expected current value.
        #[serde(with = "serde_bytes")]
        expected: Vec<u8>,
        /// New value.
        #[serde(with = "serde_bytes")]
        new: Vec<u8>,
    },
}

/// The outcome of applying a write (or of a read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// +OK
    Ok,
    /// A null bulk string.
    Nil,
    /// An integer.
    Int(i64),
    /// A bulk string.
    Bulk(Vec<u8>),
    /// An array of optional bulk strings.
    Array(Vec<Option<Vec<u8>>>),
    /// An error reply (the full text after the `-`).
    Error(String),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

impl WriteCmd {
    /// Encodes for the log.
    pub fn encode(&self) -> Vec<u8> {
        // Encoding plain owned data into a Vec cannot fail.
        bincode::serde::encode_to_vec(self, config()).unwrap_or_default()
    }

    /// Decodes a log entry; `None` when it is not a command of this store.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        bincode::serde::decode_from_slice(bytes, config())
            .ok()
            .map(|(c, _)| c)
    }
}

/// Requests one node sends another over the cluster transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Forward {
    /// Run these writes, in order, as leader and return their outcomes.
    Writes(Vec<WriteCmd>),
    /// Confirm leadership and return a linearizable read index.
    ReadIndex,
}

/// Replies to [`Forward`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForwardReply {
    /// The writes' outcomes, in order (errors included).
    Outcomes(Vec<Outcome>),
    /// A read index.
    ReadIndex(u64),
    /// The node asked is not the leader; it names the one it knows.
    NotLeader(Option<u64>),
}

/// Encodes a forwarded request or reply.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, config()).unwrap_or_default()
}

/// Decodes a forwarded request or reply.
pub fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Option<T> {
    bincode::serde::decode_from_slice(b, config().with_limit::<{ 1 << 28 }>())
        .ok()
        .map(|(v, _)| v)
}
