//! The inbound side: accepting connections, admitting streams whose header
//! and certificate agree, and handing Raft messages and application
//! requests to the node.

use crate::{tls, wire};
use raft_core::{InboundRpc, Message, NodeId};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// What inbound tasks need to check and deliver messages.
pub(crate) struct Inbound {
    pub(crate) id: NodeId,
    pub(crate) cluster_id: u64,
    pub(crate) max_frame: usize,
    pub(crate) tx: mpsc::Sender<Message>,
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
    let bi = {
        let (conn, inbound) = (conn.clone(), inbound.clone());
        tokio::spawn(async move {
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(handle_rpc(conn.clone(), send, recv, inbound.clone()));
            }
        })
    };
    while let Ok(recv) = conn.accept_uni().await {
        tokio::spawn(handle_stream(conn.clone(), recv, inbound.clone()));
    }
    bi.abort();
}

/// Checks a stream header against the connection's certificate; on failure
/// closes the connection and returns None.
fn admit(conn: &quinn::Connection, header: &wire::Header, inbound: &Inbound) -> Option<NodeId> {
    let why = if header.cluster_id != inbound.cluster_id {
        format!("cluster id {} is not ours", header.cluster_id)
    } else if header.to != inbound.id {
        format!("stream is addressed to node {}", header.to)
    } else if !tls::peer_is(conn, header.from) {
        format!("certificate does not name node {}", header.from)
    } else {
        let mut addrs = inbound.addrs.write().unwrap_or_else(|p| p.into_inner());
        addrs
            .entry(header.from)
            .or_insert_with(|| conn.remote_address());
        return Some(header.from);
    };
    tracing::warn!(node = inbound.id, remote = %conn.remote_address(), claimed = header.from, "refused peer: {why}");
    conn.close(wire::ERR_REFUSED, why.as_bytes());
    None
}

async fn handle_rpc(
    conn: quinn::Connection,
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
    let Some(from) = admit(&conn, &header, &inbound) else {
        return;
    };
    let request = match wire::read_raw_frame(&mut recv, inbound.max_frame).await {
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
    let Some(from) = admit(&conn, &header, &inbound) else {
        return;
    };
    loop {
        match wire::read_frame(&mut recv, inbound.max_frame).await {
            Ok(Some(msg)) => {
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
                if inbound.tx.send(msg).await.is_err() {
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
