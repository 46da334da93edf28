//! The inbound side: accepting connections, admitting streams whose header
//! and certificate agree, and handing Raft messages and application
//! requests to the node.

use crate::peer::{lock, WarnLimiter};
use crate::{tls, wire};
use raft_core::{InboundRpc, Message, NodeId};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

/// Connections one peer may hold open to this node at once (a restart
/// leaves the old one until its idle timeout).
pub const MAX_CONNECTIONS_PER_PEER: usize = 4;
/// Bytes of received messages waiting for the node, all peers together.
pub const INBOUND_QUEUE_BYTES: usize = 64 << 20;
/// How long a peer may take to send one request's body.
pub const RPC_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// A received message and its share of the inbound byte budget, given back
/// when the node takes the message.
pub(crate) type Queued = (Message, Option<OwnedSemaphorePermit>);

/// What inbound tasks need to check and deliver messages.
pub(crate) struct Inbound {
    pub(crate) id: NodeId,
    pub(crate) cluster_id: u64,
    pub(crate) max_frame: usize,
    pub(crate) tx: mpsc::Sender<Queued>,
    /// Bytes of queued messages ([`INBOUND_QUEUE_BYTES`]).
    pub(crate) budget: Arc<Semaphore>,
    /// Open connections per authenticated peer.
    pub(crate) connections: Mutex<HashMap<NodeId, usize>>,
    /// Streams refused at admission since the start.
    pub(crate) refused: std::sync::atomic::AtomicU64,
    /// Messages to peers dropped since the start because the peer's
    /// queue was full (Raft sends again; each one is a lost round trip).
    pub(crate) dropped: std::sync::atomic::AtomicU64,
    /// Messages queued to peers since the start.
    pub(crate) sent: std::sync::atomic::AtomicU64,
    /// Refusal warnings, at most one per interval per claimed id.
    pub(crate) refusals: Mutex<HashMap<NodeId, WarnLimiter>>,
    /// Peer addresses (shared with the outbound links): a peer this node
    /// knows no address for is reached where its authenticated connection
    /// came from (a QUIC endpoint dials from the port it listens on).
    pub(crate) addrs: Arc<RwLock<BTreeMap<NodeId, SocketAddr>>>,
    /// Where requests from peers go, once the application took its endpoint.
    pub(crate) rpc: RwLock<Option<mpsc::Sender<InboundRpc>>>,
}

pub(crate) async fn accept_loop(endpoint: quinn::Endpoint, inbound: Arc<Inbound>) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(handle_connection(incoming, inbound.clone()));
    }
}

async fn handle_connection(incoming: quinn::Incoming, inbound: Arc<Inbound>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(node = inbound.id, %remote, error = %e, "refused connection (TLS handshake failed)");
            return;
        }
    };
    // The peer this connection speaks for, once a stream header proved it.
    let slot: Arc<Mutex<Slot>> = Arc::default();
    let bi = {
        let (conn, inbound, slot) = (conn.clone(), inbound.clone(), slot.clone());
        tokio::spawn(async move {
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(handle_rpc(
                    conn.clone(),
                    slot.clone(),
                    send,
                    recv,
                    inbound.clone(),
                ));
            }
        })
    };
    while let Ok(recv) = conn.accept_uni().await {
        tokio::spawn(handle_stream(
            conn.clone(),
            slot.clone(),
            recv,
            inbound.clone(),
        ));
    }
    bi.abort();
    // Closed: no stream admitted from now on counts it again. (Locks are
    // always taken in this order: connections, then the slot.)
    let mut c = lock(&inbound.connections);
    let mut sl = lock(&slot);
    sl.closed = true;
    if let Some(id) = sl.peer.take() {
        if let Some(n) = c.get_mut(&id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.remove(&id);
            }
        }
    }
}

/// Which peer a connection speaks for, and whether it has ended.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    peer: Option<NodeId>,
    closed: bool,
}

/// Checks a stream header against the connection's certificate; on failure
/// closes the connection and returns None. The first admitted stream counts
/// the connection against its peer's [`MAX_CONNECTIONS_PER_PEER`].
fn admit(
    conn: &quinn::Connection,
    slot: &Mutex<Slot>,
    header: &wire::Header,
    inbound: &Inbound,
) -> Option<NodeId> {
    let why = if header.cluster_id != inbound.cluster_id {
        format!("cluster id {} is not ours", header.cluster_id)
    } else if header.to != inbound.id {
        format!("stream is addressed to node {}", header.to)
    } else if !tls::peer_is(conn, header.from) {
        format!("certificate does not name node {}", header.from)
    } else if let Err(why) = count_connection(slot, header.from, inbound) {
        why
    } else {
        let mut addrs = inbound.addrs.write().unwrap_or_else(|p| p.into_inner());
        addrs
            .entry(header.from)
            .or_insert_with(|| conn.remote_address());
        return Some(header.from);
    };
    inbound
        .refused
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let allowed = {
        let mut r = lock(&inbound.refusals);
        if r.len() > 1024 {
            r.clear();
        }
        r.entry(header.from)
            .or_insert_with(WarnLimiter::new)
            .allow()
    };
    if let Some(suppressed) = allowed {
        tracing::warn!(node = inbound.id, remote = %conn.remote_address(), claimed = header.from, suppressed, "refused peer: {why}");
    }
    conn.close(wire::ERR_REFUSED, why.as_bytes());
    None
}

/// Counts the connection for `from` at its first admitted stream; later
/// streams of the same connection pass. Refused: another peer's streams on
/// it, too many connections for `from`, or a connection already ended.
fn count_connection(slot: &Mutex<Slot>, from: NodeId, inbound: &Inbound) -> Result<(), String> {
    let mut c = lock(&inbound.connections);
    let mut sl = lock(slot);
    if sl.closed {
        return Err("the connection has ended".into());
    }
    match sl.peer {
        Some(id) if id == from => return Ok(()),
        Some(id) => return Err(format!("connection already speaks for node {id}")),
        None => {}
    }
    let n = c.entry(from).or_insert(0);
    if *n >= MAX_CONNECTIONS_PER_PEER {
        return Err(format!(
            "node {from} already has {MAX_CONNECTIONS_PER_PEER} connections open"
        ));
    }
    *n += 1;
    sl.peer = Some(from);
    Ok(())
}

async fn handle_rpc(
    conn: quinn::Connection,
    slot: Arc<Mutex<Slot>>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    inbound: Arc<Inbound>,
) {
    let Ok(Ok(header)) =
        tokio::time::timeout(Duration::from_secs(5), wire::read_header(&mut recv)).await
    else {
        let _ = recv.stop(wire::ERR_PROTOCOL);
        return;
    };
    let Some(from) = admit(&conn, &slot, &header, &inbound) else {
        return;
    };
    let body = tokio::time::timeout(
        RPC_BODY_TIMEOUT,
        wire::read_raw_frame(&mut recv, inbound.max_frame),
    )
    .await
    .unwrap_or_else(|_| Err(wire::FrameError::Read("the request body timed out".into())));
    let request = match body {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(node = inbound.id, peer = from, error = %e, "bad request frame; closing stream");
            let _ = recv.stop(wire::ERR_PROTOCOL);
            return;
        }
    };
    let handler = inbound
        .rpc
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let reply = match handler {
        Some(h) => {
            let (tx, rx) = oneshot::channel();
            if h.send(InboundRpc::new(from, request, tx)).await.is_err() {
                let _ = send.reset(wire::ERR_PROTOCOL);
                return;
            }
            match rx.await {
                Ok(reply) => reply,
                // Dropped unanswered: the caller learns the exchange broke.
                Err(_) => {
                    let _ = send.reset(wire::ERR_PROTOCOL);
                    return;
                }
            }
        }
        // Nobody takes requests yet: the caller learns it was not handled.
        None => {
            let _ = send.reset(wire::ERR_PROTOCOL);
            return;
        }
    };
    let Ok(len) = u32::try_from(reply.len()) else {
        return;
    };
    if send.write_all(&len.to_le_bytes()).await.is_ok() && send.write_all(&reply).await.is_ok() {
        let _ = send.finish();
    }
}

async fn handle_stream(
    conn: quinn::Connection,
    slot: Arc<Mutex<Slot>>,
    mut recv: quinn::RecvStream,
    inbound: Arc<Inbound>,
) {
    let remote = conn.remote_address();
    let header = match tokio::time::timeout(Duration::from_secs(5), wire::read_header(&mut recv))
        .await
    {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::warn!(node = inbound.id, %remote, error = %e, "bad stream header; closing stream");
            let _ = recv.stop(wire::ERR_PROTOCOL);
            return;
        }
        Err(_) => {
            let _ = recv.stop(wire::ERR_PROTOCOL);
            return;
        }
    };
    let Some(from) = admit(&conn, &slot, &header, &inbound) else {
        return;
    };
    loop {
        match wire::read_raw_frame(&mut recv, inbound.max_frame)
            .await
            .and_then(|b| match b {
                Some(body) => wire::decode_body(&body).map(|m| Some((m, body.len()))),
                None => Ok(None),
            }) {
            Ok(Some((msg, size))) => {
                tracing::trace!(
                    node = inbound.id,
                    peer = from,
                    kind = msg.body.kind(),
                    "received"
                );
                if msg.from != from || msg.to != inbound.id {
                    tracing::warn!(
                        node = inbound.id,
                        peer = from,
                        "message under a foreign id; closing stream"
                    );
                    let _ = recv.stop(wire::ERR_PROTOCOL);
                    return;
                }
                // Queued messages are bounded in bytes as well as in number:
                // a full queue holds this stream (and QUIC's flow control
                // holds the peer) until the node catches up.
                let want = u32::try_from(size.clamp(1, INBOUND_QUEUE_BYTES)).unwrap_or(u32::MAX);
                let Ok(permit) = inbound.budget.clone().acquire_many_owned(want).await else {
                    return;
                };
                if inbound.tx.send((msg, Some(permit))).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            // The peer went away (restart, shutdown, network): not its fault.
            Err(e @ wire::FrameError::Read(_)) => {
                tracing::debug!(node = inbound.id, peer = from, error = %e, "stream from peer ended");
                return;
            }
            Err(e) => {
                tracing::warn!(node = inbound.id, peer = from, error = %e, "bad frame; closing stream");
                let _ = recv.stop(wire::ERR_PROTOCOL);
                return;
            }
        }
    }
}
