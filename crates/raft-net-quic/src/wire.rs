//! The wire format: a stream header, then length-prefixed bincode frames.
//!
//! Header (28 bytes): `RQ`, protocol version (u16 LE), cluster id (u64 LE),
//! sender id (u64 LE), receiver id (u64 LE). Frame: body length (u32 LE), then
//! the bincode (standard configuration) encoding of a `raft_core::Message`.

use raft_core::{Message, NodeId};

/// The protocol version spoken by this crate.
pub const VERSION: u16 = 1;
const MAGIC: [u8; 2] = *b"RQ";
/// Header length: magic (2), version (2), cluster id (8), from (8), to (8).
pub const HEADER_LEN: usize = 28;
/// Stream stop code: malformed input.
pub const ERR_PROTOCOL: quinn::VarInt = quinn::VarInt::from_u32(1);
/// Connection close code: the peer is not allowed in.
pub const ERR_REFUSED: quinn::VarInt = quinn::VarInt::from_u32(2);

/// A decoded stream header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The sender's cluster.
    pub cluster_id: u64,
    /// The id the sender claims.
    pub from: NodeId,
    /// The intended receiver.
    pub to: NodeId,
}

/// Why a stream was closed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream could not be read.
    #[error("read failed: {0}")]
    Read(String),
    /// The header is not ours.
    #[error("bad header: {0}")]
    Header(String),
    /// A frame announced more bytes than allowed.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The frame's bytes are not a message.
    #[error("undecodable frame: {0}")]
    Decode(String),
    /// A message could not be encoded.
    #[error("cannot encode: {0}")]
    Encode(String),
}

/// Builds a stream header.
pub fn header(cluster_id: u64, from: NodeId, to: NodeId) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..2].copy_from_slice(&MAGIC);
    h[2..4].copy_from_slice(&VERSION.to_le_bytes());
    h[4..12].copy_from_slice(&cluster_id.to_le_bytes());
    h[12..20].copy_from_slice(&from.to_le_bytes());
    h[20..28].copy_from_slice(&to.to_le_bytes());
    h
}

/// Reads and checks a stream header.
pub async fn read_header(recv: &mut quinn::RecvStream) -> Result<Header, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    recv.read_exact(&mut h)
        .await
        .map_err(|e| FrameError::Read(e.to_string()))?;
    if h[..2] != MAGIC {
        return Err(FrameError::Header("not a raft-quic stream".into()));
    }
    let version = u16::from_le_bytes([h[2], h[3]]);
    if version != VERSION {
        return Err(FrameError::Header(format!(
            "protocol version {version}, expected {VERSION}"
        )));
    }
    let word = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[r]);
        u64::from_le_bytes(b)
    };
    Ok(Header {
        cluster_id: word(4..12),
        from: word(12..20),
        to: word(20..28),
    })
}

/// Encodes one message as a frame: u32 LE length, then bincode.
pub fn encode_frame(msg: &Message) -> Result<Vec<u8>, FrameError> {
    let body = bincode::serde::encode_to_vec(msg, bincode::config::standard())
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    let len =
        u32::try_from(body.len()).map_err(|_| FrameError::Encode("message over 4 GiB".into()))?;
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// The largest frame any configuration may allow; decoding never reserves
/// more than this, whatever a frame's length fields claim.
pub const MAX_FRAME_LIMIT: usize = 64 << 20;

/// Decodes a frame body.
pub fn decode_body(body: &[u8]) -> Result<Message, FrameError> {
    if body.len() > MAX_FRAME_LIMIT {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max: MAX_FRAME_LIMIT,
        });
    }
    let (msg, used) = bincode::serde::decode_from_slice(
        body,
        bincode::config::standard().with_limit::<MAX_FRAME_LIMIT>(),
    )
    .map_err(|e| FrameError::Decode(e.to_string()))?;
    if used != body.len() {
        return Err(FrameError::Decode("trailing bytes".into()));
    }
    Ok(msg)
}

/// Reads one frame; `Ok(None)` when the stream ended cleanly between frames.
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<Message>, FrameError> {
    match read_raw_frame(recv, max).await? {
        Some(body) => decode_body(&body).map(Some),
        None => Ok(None),
    }
}

/// Reads one frame's bytes; `Ok(None)` when the stream ended cleanly between frames.
pub async fn read_raw_frame(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(FrameError::Truncated),
        Err(e) => return Err(FrameError::Read(e.to_string())),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    // The buffer grows with the bytes that arrive: a length field alone
    // (16 MiB claimed, nothing sent) costs nothing.
    let mut body = Vec::with_capacity(len.min(64 * 1024));
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
            Ok(None) => return Err(FrameError::Truncated),
            Err(e) => return Err(FrameError::Read(e.to_string())),
        }
    }
    Ok(Some(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft_core::MessageBody;

    #[test]
    fn frames_round_trip_and_lying_length_fields_are_refused() {
        let msg = Message {
            from: 1,
            to: 2,
            term: 3,
            incarnation: 0,
            body: MessageBody::HeartbeatResponse { round: 9 },
        };
        let frame = encode_frame(&msg).unwrap();
        assert_eq!(decode_body(&frame[4..]).unwrap(), msg);
        // from 1, to 2, term 3, AppendEntries (variant 2), prev index 0,
        // prev term 0, then an entry count claiming 2^32 - 1 entries.
        let lying = [1, 2, 3, 2, 0, 0, 0xfc, 0xff, 0xff, 0xff, 0xff];
        assert!(decode_body(&lying).is_err());
        assert!(matches!(
            decode_body(&vec![0u8; MAX_FRAME_LIMIT + 1]),
            Err(FrameError::TooLarge { .. })
        ));
    }
}
