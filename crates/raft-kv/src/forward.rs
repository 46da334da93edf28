//! The requests one node sends another through the transport's
//! [`PeerRpc`](raft_core::PeerRpc) channel: writes forwarded to the leader,
//! and read-index requests.

use crate::command::{config, AdminCmd, WriteCmd, MAX_DECODE};
use crate::error::Reply;
use serde::{Deserialize, Serialize};

/// Requests one node sends another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Forward {
    /// Run these writes, in order, as leader and return their results.
    Writes(Vec<WriteCmd>),
    /// Confirm leadership and return a linearizable read index.
    ReadIndex,
    /// Run a cluster administration request as leader.
    Admin(AdminCmd),
}

/// Replies to [`Forward`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForwardReply {
    /// The writes' results, in order (errors included).
    Replies(Vec<Reply>),
    /// A read index.
    ReadIndex(u64),
    /// The node asked is not the leader; it names the one it knows.
    NotLeader(Option<u64>),
    /// An administration request's result.
    Admin(Reply),
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Encoding plain owned data into a Vec cannot fail.
    bincode::serde::encode_to_vec(v, config()).unwrap_or_default()
}

fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Option<T> {
    // A damaged length field must not make the decoder reserve what it claims.
    if b.len() > MAX_DECODE {
        return None;
    }
    bincode::serde::decode_from_slice(b, config().with_limit::<MAX_DECODE>())
        .ok()
        .map(|(v, _)| v)
}

impl Forward {
    /// The request's bytes.
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// A request from its bytes; `None` when they are not one.
    pub fn decode(b: &[u8]) -> Option<Self> {
        decode(b)
    }
}

impl ForwardReply {
    /// The reply's bytes.
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// A reply from its bytes; `None` when they are not one.
    pub fn decode(b: &[u8]) -> Option<Self> {
        decode(b)
    }
}
