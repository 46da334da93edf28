//! Three Raft nodes with the production pieces: the durable sled log
//! (raft-log) and QUIC with mutual TLS (raft-net-quic), on loopback in one
//! process. Each node could as well be its own process on its own host.
//!
//! Run: `cargo run -p examples --example quic_sled_cluster`

use raft_core::node::{ApplyMsg, Raft};
use raft_core::Config;
use raft_core::NodeId;
use raft_log::SledLogStore;
use raft_net_quic::{ClusterCa, QuicConfig, QuicTransport};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::mpsc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let ids: [NodeId; 3] = [1, 2, 3];
    let dir = std::env::temp_dir().join(format!("raft-example-{}", std::process::id()));
    // One CA for the cluster; each node gets a certificate naming its id.
    let ca = ClusterCa::generate()?;

    // Bind every transport first (port 0), then tell each the others' addresses.
    let mut transports = BTreeMap::new();
    for id in ids {
        let mut qc = QuicConfig::new(id, "127.0.0.1:0".parse()?);
        for p in ids.iter().filter(|&&p| p != id) {
            qc.peers.insert(*p, "127.0.0.1:9".parse()?);
        }
        transports.insert(id, QuicTransport::bind(qc, &ca.material(id)?)?);
    }
    let addrs: BTreeMap<NodeId, _> = transports
        .iter()
        .map(|(&id, t)| (id, t.local_addr()))
        .collect();
    for (&id, t) in &transports {
        for (&p, a) in &addrs {
            if p != id {
                t.set_peer_addr(
                    p,
                    a.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?.to_owned(),
                )?;
            }
        }
    }

    let mut nodes = BTreeMap::new();
    for (id, transport) in transports {
        let mut cfg = Config::new(id);
        for p in ids.iter().filter(|&&p| p != id) {
            cfg.add_peer(*p)?;
        }
        let store = SledLogStore::open(dir.join(format!("node-{id}")))?;
        let (tx, mut rx) = mpsc::channel::<ApplyMsg>(1024);
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if m.command_valid {
                    tracing::info!(
                        node = id,
                        index = m.command_index,
                        "applied {:?}",
                        String::from_utf8_lossy(&m.command)
                    );
                }
            }
        });
        let raft = Raft::new(cfg, store, transport, tx)?;
        raft.start().await?;
        nodes.insert(id, raft);
    }

    // Wait for a leader, then write through it.
    let leader = loop {
        if let Some((&id, _)) = nodes.iter().find(|(_, r)| r.is_leader()) {
            break id;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("node {leader} leads over QUIC");
    for i in 0..3 {
        let index = nodes[&leader]
            .submit_and_wait(format!("SET k{i} v{i}").into_bytes())
            .await?;
        println!("committed write {i} at index {index}, durable on a majority of sled logs");
    }
    let read = nodes[&leader].read_index().await?;
    println!("linearizable read point: index {read}");
    for r in nodes.values() {
        r.shutdown().await?;
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
