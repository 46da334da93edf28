//! [`transport_conformance`] checks any [`Transport`] (and its [`PeerRpc`]
//! channel, when it has one) against the traits' contracts. Run it from
//! your own transport's tests:
//!
//! ```text
//! #[tokio::test]
//! async fn my_transport_conforms() {
//!     raft_core::testing::transport_conformance(MyNetwork::new()).await;
//! }
//! ```

use crate::message::{Message, MessageBody, MESSAGE_OVERHEAD};
use crate::transport::{RpcError, Transport};
use crate::types::{Entry, EntryPayload, NodeId, ENTRY_OVERHEAD};
use async_trait::async_trait;
use std::collections::BTreeSet;
use std::time::Duration;

/// Makes connected transports for the conformance suite.
#[async_trait]
pub trait NetworkFactory: Send {
    /// The transport type under test.
    type Transport: Transport;
    /// One transport per id, each knowing the others as its peers.
    async fn cluster(&mut self, ids: &[NodeId]) -> Vec<Self::Transport>;
}

/// How long a healthy link may take to deliver (a real transport connects first).
const DELIVERY: Duration = Duration::from_secs(10);

fn heartbeat(from: NodeId, to: NodeId, round: u64) -> Message {
    Message {
        from,
        to,
        term: 7,
        incarnation: 0,
        body: MessageBody::Heartbeat {
            leader_commit: 3,
            round,
            purge_to_index: 0,
        },
    }
}

async fn next<T: Transport>(t: &mut T, what: &str) -> Message {
    match tokio::time::timeout(DELIVERY, t.recv()).await {
        Ok(Some(m)) => m,
        Ok(None) => panic!("{what}: the transport closed"),
        Err(_) => panic!("{what}: nothing arrived within {DELIVERY:?}"),
    }
}

/// Runs every check; panics with a description of the first violation.
///
/// * messages arrive intact, addressed to their receiver, under their
///   sender's id, on every link;
/// * a burst on one link arrives whole (no loss on a healthy link);
/// * a message for an unknown node is dropped quietly, and the link goes on;
/// * a message under another node's id never arrives under that id;
/// * the largest message the transport claims to carry
///   (`max_message_bytes`, or 4 MiB without a limit) arrives intact;
/// * with an RPC endpoint: requests reach the member asked, under the
///   caller's authenticated id, and their replies come back; a request to
///   an unknown member fails without being delivered; a request dropped
///   unanswered is reported broken; the endpoint is handed out only once.
pub async fn transport_conformance<F: NetworkFactory>(mut f: F) {
    let ids = [1, 2, 3];
    let mut ts = f.cluster(&ids).await;
    assert_eq!(ts.len(), 3, "the factory must return one transport per id");

    // Every link, both ways.
    for (i, &from) in ids.iter().enumerate() {
        for &to in ids.iter().filter(|&&to| to != from) {
            ts[i].send(heartbeat(from, to, from * 10 + to));
        }
    }
    for (i, &me) in ids.iter().enumerate() {
        let mut got = BTreeSet::new();
        for _ in 0..2 {
            let m = next(&mut ts[i], "a message on a healthy link").await;
            assert_eq!(m.to, me, "a message arrived at the wrong node");
            assert_eq!(
                m,
                heartbeat(m.from, me, m.from * 10 + me),
                "a message changed on the way"
            );
            got.insert(m.from);
        }
        let want: BTreeSet<NodeId> = ids.iter().copied().filter(|&x| x != me).collect();
        assert_eq!(got, want, "node {me} did not hear from every peer");
    }

    // A burst on one link arrives whole.
    for round in 0..200 {
        ts[0].send(heartbeat(1, 2, 1000 + round));
    }
    let mut rounds = BTreeSet::new();
    while rounds.len() < 200 {
        let m = next(&mut ts[1], "a burst of 200 messages").await;
        if let MessageBody::Heartbeat { round, .. } = m.body {
            rounds.insert(round);
        }
    }
    assert_eq!(
        rounds,
        (1000..1200).collect(),
        "a burst lost or changed messages"
    );

    // Unknown receiver: dropped quietly; a forged sender: never delivered as such.
    ts[0].send(heartbeat(1, 99, 5));
    ts[0].send(heartbeat(3, 2, 6));
    ts[0].send(heartbeat(1, 2, 7));
    loop {
        let m = next(&mut ts[1], "a message after a forged one").await;
        assert_ne!(
            m.from, 3,
            "a message sent by node 1 under node 3's id arrived as node 3's"
        );
        if m == heartbeat(1, 2, 7) {
            break;
        }
    }

    // The largest message the transport claims to carry.
    let limit = ts[0].max_message_bytes().unwrap_or(4 << 20);
    let payload = limit - MESSAGE_OVERHEAD - ENTRY_OVERHEAD;
    let big = Message {
        from: 1,
        to: 3,
        term: 7,
        incarnation: 0,
        body: MessageBody::AppendEntries {
            prev_log_index: 0,
            prev_log_term: 0,
            entries: vec![Entry {
                term: 7,
                index: 1,
                payload: EntryPayload::Command(vec![0xa5; payload].into()),
            }],
            leader_commit: 0,
        },
    };
    ts[0].send(big.clone());
    let m = next(&mut ts[2], "a message at the size limit").await;
    assert!(
        m == big,
        "a message at the size limit ({limit} bytes) changed on the way"
    );

    rpc_checks(&mut ts).await;
}

async fn rpc_checks<T: Transport>(ts: &mut [T]) {
    let Some(mut one) = ts[0].rpc_endpoint() else {
        // This transport carries no application requests: nothing more to check.
        for t in ts.iter_mut() {
            assert!(
                t.rpc_endpoint().is_none(),
                "RPC support must not differ between nodes"
            );
        }
        return;
    };
    assert!(
        ts[0].rpc_endpoint().is_none(),
        "the RPC endpoint was handed out twice"
    );
    let Some(mut two) = ts[1].rpc_endpoint() else {
        panic!("node 2 has no RPC endpoint while node 1 has one");
    };
    // Node 2 answers: the sender's id, then the request reversed; it drops
    // requests that start with "drop" unanswered.
    let server = tokio::spawn(async move {
        while let Some(req) = two.inbound.recv().await {
            if req.request.starts_with(b"drop") {
                continue;
            }
            let mut reply = req.from.to_be_bytes().to_vec();
            reply.extend(req.request.iter().rev());
            req.reply(reply);
        }
    });
    let call = |to: NodeId, body: &[u8]| {
        let c = one.client.clone();
        let body = body.to_vec();
        async move {
            tokio::time::timeout(DELIVERY, c.call(to, body))
                .await
                .unwrap_or_else(|_| {
                    panic!("a request to node {to} got no answer within {DELIVERY:?}")
                })
        }
    };
    let reply = call(2, b"abc")
        .await
        .expect("a request to a healthy member");
    let mut want = 1u64.to_be_bytes().to_vec();
    want.extend(b"cba");
    assert_eq!(
        reply, want,
        "the reply did not come from node 2 answering node 1"
    );
    // Concurrent requests each get their own reply.
    let calls: Vec<_> = (0..20u8)
        .map(|i| tokio::spawn(call(2, &[i, i + 1])))
        .collect();
    for (i, r) in (0..20u8).zip(calls) {
        let mut want = 1u64.to_be_bytes().to_vec();
        want.extend([i + 1, i]);
        let r = r.await.expect("the request task");
        assert_eq!(
            r.expect("a concurrent request"),
            want,
            "replies were mixed up"
        );
    }
    match call(99, b"x").await {
        Err(RpcError::UnknownPeer(99)) | Err(RpcError::Unreachable(99)) => {}
        other => panic!("a request to an unknown node must fail undelivered, got {other:?}"),
    }
    match call(2, b"drop me").await {
        Err(RpcError::Broken(2, _)) => {}
        other => panic!("a request dropped unanswered must be reported broken, got {other:?}"),
    }
    // The link still works afterwards.
    assert!(
        call(2, b"again").await.is_ok(),
        "the link broke after a dropped request"
    );
    // Node 1's inbound side stays quiet: nothing was addressed to it.
    assert!(
        one.inbound.try_recv().is_err(),
        "node 1 received a request nobody sent it"
    );
    server.abort();
}
