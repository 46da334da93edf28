//! Bulk throughput of QuicTransport on loopback, the way a snapshot
//! travels: 1 MiB `SnapshotChunk` messages, at most 4 in flight (the
//! receiver's count is the acknowledgement). The anchor for the snapshot
//! transfer benchmark (`scripts/bench-snapshot.sh`).
//!
//! Usage: cargo run --release -p raft-net-quic --example quic_bulk -- [MiB]

use raft_core::{LogId, Message, MessageBody, NodeId, SnapshotMeta, Transport};
use raft_net_quic::{ClusterCa, QuicConfig, QuicTransport};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHUNK: usize = 1 << 20;
const IN_FLIGHT: u64 = 4;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1024);
    let ca = ClusterCa::generate()?;
    let mk = |id: NodeId, peer: NodeId| -> Result<QuicTransport, Box<dyn std::error::Error>> {
        let mut c = QuicConfig::new(id, "127.0.0.1:0".parse()?);
        c.peers.insert(peer, "127.0.0.1:9".parse()?);
        Ok(QuicTransport::bind(c, &ca.material(id)?)?)
    };
    let a = mk(1, 2)?;
    let mut b = mk(2, 1)?;
    a.set_peer_addr(2, b.local_addr()?)?;
    b.set_peer_addr(1, a.local_addr()?)?;
    let got = Arc::new(AtomicU64::new(0));
    let g2 = got.clone();
    let rx = tokio::spawn(async move {
        while let Some(m) = b.recv().await {
            if let MessageBody::SnapshotChunk { data, .. } = m.body {
                g2.fetch_add(data.len() as u64, Ordering::Release);
            }
        }
    });
    let meta = SnapshotMeta {
        last: LogId::new(1, 1),
        membership: Default::default(),
    };
    let total = mib * CHUNK as u64;
    let data = vec![0xa5u8; CHUNK];
    let t0 = Instant::now();
    let mut sent = 0u64;
    while got.load(Ordering::Acquire) < total {
        while sent < total && sent < got.load(Ordering::Acquire) + IN_FLIGHT * CHUNK as u64 {
            a.send(Message {
                from: 1,
                to: 2,
                term: 1,
                incarnation: 0,
                body: MessageBody::SnapshotChunk {
                    meta: meta.clone(),
                    size: total,
                    offset: sent,
                    data: data.clone(),
                },
            });
            sent += CHUNK as u64;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
        if t0.elapsed() > Duration::from_secs(120) {
            return Err("no progress (messages dropped?)".into());
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "quic bulk: {mib} MiB in {secs:.2}s = {:.0} MB/s ({} KiB messages, {IN_FLIGHT} in flight)",
        total as f64 / secs / 1e6,
        CHUNK / 1024
    );
    rx.abort();
    Ok(())
}
