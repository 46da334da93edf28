//! A 3-node Raft cluster inside one process, written the way the seed document
//! shows it: a `Config` per node, a node built with an apply channel, `start`,
//! `is_leader`, `submit`, `leader`, and an application that applies committed
//! commands to a map. Clients retry the way the seed's `submitWithRetry` means
//! it: follow the leader hint, and back off only when there is no hint.
//!
//! Run: `cargo run -p examples --example in_process_cluster`

use anyhow::{bail, Context};
use raft_core::node::{ApplyMsg, Error, Raft};
use raft_core::Config;
use raft_core::{ChannelNetwork, MemLogStore, NodeId};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// The application's state machine: `SET key value` commands applied to a map.
#[derive(Default)]
struct KvState {
    data: HashMap<String, String>,
    applied_index: u64,
}

fn apply_command(state: &Mutex<KvState>, msg: &ApplyMsg) {
    let mut s = state.lock().expect("state lock");
    if msg.command_valid {
        let text = String::from_utf8_lossy(&msg.command);
        let mut parts = text.splitn(3, ' ');
        if let (Some("SET"), Some(k), Some(v)) = (parts.next(), parts.next(), parts.next()) {
            s.data.insert(k.to_string(), v.to_string());
        }
    }
    s.applied_index = msg.command_index;
}

/// Submits through any node: on "not the leader", go to the hinted leader at
/// once; with no hint (an election is running), wait a little and try the next.
async fn submit_with_retry(nodes: &BTreeMap<NodeId, Raft>, cmd: &[u8]) -> anyhow::Result<u64> {
    let ids: Vec<NodeId> = nodes.keys().copied().collect();
    let mut target = ids[0];
    for attempt in 0..20 {
        match nodes[&target].submit_and_wait(cmd.to_vec()).await {
            Ok(index) => return Ok(index),
            Err(Error::NotLeader { leader: Some(l) }) if nodes.contains_key(&l) => target = l,
            Err(e) => {
                tracing::debug!(attempt, error = %e, "retrying");
                target = ids[(attempt + 1) % ids.len()];
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    bail!("no leader accepted the command after 20 attempts")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let net = ChannelNetwork::new();
    let ids: [NodeId; 3] = [1, 2, 3];
    let mut nodes = BTreeMap::new();
    let mut states = BTreeMap::new();
    for id in ids {
        // Config: node id, peers (id -> address), and the seed's timing defaults.
        let mut config = Config::new(id);
        for peer in ids.iter().filter(|&&p| p != id) {
            config.add_peer(*peer)?;
        }
        config.heartbeat_interval = Duration::from_millis(100);
        config.election_timeout_min = Duration::from_millis(150);
        config.election_timeout_max = Duration::from_millis(300);

        let (apply_tx, mut apply_rx) = mpsc::channel::<ApplyMsg>(100);
        let rf = Raft::new(config, MemLogStore::new(), net.join(id), apply_tx)?;
        rf.start().await?;

        let state = Arc::new(Mutex::new(KvState::default()));
        let st = state.clone();
        tokio::spawn(async move {
            while let Some(msg) = apply_rx.recv().await {
                apply_command(&st, &msg);
            }
        });
        nodes.insert(id, rf);
        states.insert(id, state);
    }

    for i in 0..5 {
        let cmd = format!("SET key{i} value{i}");
        let index = submit_with_retry(&nodes, cmd.as_bytes()).await?;
        println!("committed {cmd:?} at index {index}");
    }
    let leader = nodes[&1].leader().context("a leader is known")?;
    println!(
        "leader is node {leader}; is_leader on node {leader}: {}",
        nodes[&leader].is_leader()
    );

    // Kill the leader: the others elect a new one and the client follows it.
    nodes[&leader].shutdown().await?;
    let survivors: BTreeMap<NodeId, Raft> = nodes
        .iter()
        .filter(|(&id, _)| id != leader)
        .map(|(&id, r)| (id, r.clone()))
        .collect();
    let index = submit_with_retry(&survivors, b"SET after failover").await?;
    let new_leader = survivors
        .values()
        .find_map(|r| r.leader())
        .context("new leader")?;
    println!("node {leader} stopped; node {new_leader} leads; committed at index {index}");

    // Wait until every surviving state machine has applied the last write.
    for _ in 0..100 {
        if survivors
            .keys()
            .all(|id| states[id].lock().expect("state lock").applied_index >= index)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for id in survivors.keys() {
        let s = states[id].lock().expect("state lock");
        println!(
            "node {id}: applied up to {}, {} keys, key3 = {:?}",
            s.applied_index,
            s.data.len(),
            s.data.get("key3")
        );
    }
    for r in survivors.values() {
        r.shutdown().await?;
    }
    Ok(())
}
