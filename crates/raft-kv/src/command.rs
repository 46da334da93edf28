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

/// The most bytes a command or forwarded message may claim: a client request
/// is at most 64 MiB, and so is what one connection's pipeline forwards at a
/// time. A damaged length field costs at most this much memory, briefly.
const MAX_DECODE: usize = 128 << 20;

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

impl WriteCmd {
    /// Encodes for the log.
    pub fn encode(&self) -> Vec<u8> {
        // Encoding plain owned data into a Vec cannot fail.
        bincode::serde::encode_to_vec(self, config()).unwrap_or_default()
    }

    /// The size of [`WriteCmd::encode`]'s output, without encoding.
    pub fn encoded_len(&self) -> usize {
        let mut w = bincode::enc::write::SizeWriter::default();
        match bincode::serde::encode_into_writer(self, &mut w, config()) {
            Ok(()) => w.bytes_written,
            Err(_) => usize::MAX,
        }
    }

    /// Decodes a log entry; `None` when it is not a command of this store.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        // A damaged entry must not make the decoder reserve what its length
        // fields claim: nothing decodes to more than the entry holds.
        if bytes.len() > MAX_DECODE {
            return None;
        }
        bincode::serde::decode_from_slice(bytes, config().with_limit::<MAX_DECODE>())
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
    if b.len() > MAX_DECODE {
        return None;
    }
    bincode::serde::decode_from_slice(b, config().with_limit::<MAX_DECODE>())
        .ok()
        .map(|(v, _)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A damaged entry whose length fields claim gigabytes is refused. (The
    /// `log_commands` fuzz target, run with an RSS limit, checks that no such
    /// claim is reserved: before the decode limit it allocated 4 GB.)
    #[test]
    fn damaged_length_fields_are_refused() {
        let good = WriteCmd::Set {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            cond: SetCond::Always,
        };
        assert_eq!(WriteCmd::decode(&good.encode()), Some(good.clone()));
        assert_eq!(good.encoded_len(), good.encode().len());
        let big = WriteCmd::MSet(vec![(vec![1; 300], vec![2; 70_000]); 3]);
        assert_eq!(big.encoded_len(), big.encode().len());
        // Variant 1 (Del), then a varint claiming 2^32 - 1 keys.
        let bogus = [1u8, 0xfc, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(WriteCmd::decode(&bogus), None);
        // Variant 0 (Set), a key claiming 2^32 - 1 bytes.
        let bogus = [0u8, 0xfc, 0xff, 0xff, 0xff, 0xff, b'k'];
        assert_eq!(WriteCmd::decode(&bogus), None);
        assert_eq!(
            decode::<Forward>(&[0u8, 0xfc, 0xff, 0xff, 0xff, 0xff]),
            None
        );
    }
}
