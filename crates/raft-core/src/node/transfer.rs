//! Snapshot transfers: the leader's task that streams a snapshot to one
//! follower, and the follower's task that stores what arrives.
//!
//! The leader reads `snapshot_chunk_bytes` at a time and keeps at most
//! `snapshot_chunks_in_flight` chunks ahead of the follower's
//! acknowledgements, so each side holds a few chunks whatever the
//! snapshot's size. The follower acknowledges every chunk it stored with
//! the first byte it still needs; a chunk that does not start there is
//! answered with that byte, and the leader goes back to it. A transfer
//! started again (after a timeout, or by a new leader with the same
//! snapshot) resumes where the follower's store stopped.

use crate::message::{Message, MessageBody};
use crate::snapshot::{SnapshotStore, SnapshotWriter};
use crate::types::{LogIndex, NodeId, SnapshotMeta, Term};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Settings of one transfer.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) chunk: usize,
    pub(super) in_flight: usize,
    pub(super) timeout: Duration,
}

/// Where a message of a transfer goes: the leader's task hands chunks to
/// the driver, which puts them on the transport.
pub(super) struct Route {
    pub(super) from: NodeId,
    pub(super) to: NodeId,
    pub(super) term: Term,
}

/// Streams the snapshot `meta` to `route.to`. Ends when the follower
/// acknowledged every byte; fails when the store fails, the driver goes
/// away, or no acknowledgement comes for `limits.timeout`.
pub(super) async fn send(
    store: Arc<dyn SnapshotStore>,
    meta: SnapshotMeta,
    route: Route,
    limits: Limits,
    out: mpsc::Sender<Message>,
    mut acks: mpsc::Receiver<u64>,
) -> Result<(), String> {
    let mut reader = store.open(&meta).await.map_err(|e| e.to_string())?;
    let size = reader.size();
    let window = (limits.chunk as u64).saturating_mul(limits.in_flight as u64);
    // The first byte not yet sent, and the first the follower still needs.
    let mut sent = 0u64;
    let mut acked = 0u64;
    let mut sent_any = false;
    // After going back to a byte, further answers naming it are echoes of
    // chunks already in flight, not new requests.
    let mut went_back_to: Option<u64> = None;
    // Silence for a while: the chunks or their answers were lost (or the
    // follower restarted); send again from the last acknowledged byte,
    // which a restarted follower answers with what it kept.
    let resend_after = (limits.timeout / 8).max(Duration::from_millis(200));
    let mut progress_at = tokio::time::Instant::now();
    loop {
        while (sent < size && sent - acked < window.max(1)) || !sent_any {
            let data = reader
                .read(sent, limits.chunk)
                .await
                .map_err(|e| e.to_string())?;
            if data.is_empty() && sent < size {
                return Err(format!("the snapshot ends at {sent}, {size} announced"));
            }
            let len = data.len() as u64;
            let msg = Message {
                from: route.from,
                to: route.to,
                term: route.term,
                incarnation: 0,
                body: MessageBody::SnapshotChunk {
                    meta: meta.clone(),
                    size,
                    offset: sent,
                    data,
                },
            };
            out.send(msg)
                .await
                .map_err(|_| "the node stopped".to_string())?;
            sent += len;
            sent_any = true;
        }
        let next = match tokio::time::timeout(resend_after, acks.recv()).await {
            Err(_) if progress_at.elapsed() >= limits.timeout => {
                return Err(format!("no progress for {:?}", limits.timeout));
            }
            Err(_) => {
                sent = acked;
                went_back_to = None;
                continue;
            }
            Ok(None) => return Err("cancelled".into()),
            Ok(Some(next)) => next.min(size),
        };
        if next >= size {
            return Ok(());
        }
        if next > acked {
            acked = next;
            sent = sent.max(next);
            went_back_to = None;
            progress_at = tokio::time::Instant::now();
        } else if next < sent && went_back_to != Some(next) {
            // A chunk went missing: send again from what the follower needs.
            acked = next;
            sent = next;
            went_back_to = Some(next);
        }
    }
}

/// What the follower's receiving task reports to its driver.
#[derive(Debug)]
pub(super) enum Received {
    /// Ask the leader for the bytes from `next` on.
    Ack {
        leader: NodeId,
        term: Term,
        index: LogIndex,
        next: u64,
    },
    /// Every byte is stored and finished.
    Done {
        leader: NodeId,
        term: Term,
        meta: SnapshotMeta,
        size: u64,
    },
    /// The store failed; the transfer is dropped (the leader starts again).
    Failed {
        leader: NodeId,
        term: Term,
        index: LogIndex,
        error: String,
    },
}

/// Stores the chunks of one snapshot as they come, in order.
pub(super) async fn receive(
    store: Arc<dyn SnapshotStore>,
    meta: SnapshotMeta,
    size: u64,
    leader: NodeId,
    term: Term,
    mut chunks: mpsc::Receiver<(u64, Vec<u8>)>,
    events: mpsc::UnboundedSender<Received>,
) {
    let index = meta.last.index;
    let fail = |error: String| {
        let _ = events.send(Received::Failed {
            leader,
            term,
            index,
            error,
        });
    };
    let mut writer: Box<dyn SnapshotWriter> = match store.receive(&meta, size).await {
        Ok(w) => w,
        Err(e) => return fail(e.to_string()),
    };
    let mut next = writer.received();
    while next < size {
        let Some((offset, data)) = chunks.recv().await else {
            return;
        };
        if offset != next || data.is_empty() || next + data.len() as u64 > size {
            let _ = events.send(Received::Ack {
                leader,
                term,
                index,
                next,
            });
            continue;
        }
        if let Err(e) = writer.write(&data).await {
            return fail(e.to_string());
        }
        next += data.len() as u64;
        if next < size {
            let _ = events.send(Received::Ack {
                leader,
                term,
                index,
                next,
            });
        }
    }
    match writer.finish().await {
        Ok(()) => {
            let _ = events.send(Received::Done {
                leader,
                term,
                meta,
                size,
            });
        }
        Err(e) => fail(e.to_string()),
    }
}
