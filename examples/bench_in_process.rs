//! The driver's own speed: a 3-node cluster in one process (in-memory log,
//! in-process network), N client tasks each proposing a write and awaiting
//! its application on the leader before the next. Prints writes/s and
//! latency percentiles for each client count.
//!
//! Run: `cargo run --release -p examples --example bench_in_process -- [SECS] [CLIENTS,...]`
//! (defaults: 5 seconds, clients 1,64,256,4096). Add `--features mimalloc`
//! for the allocator the raft-kv binary uses.
//!
//! Shaped like openraft's `benchmarks/minimal`, to compare the two: each
//! write is an 8-byte command applied to a state machine with no data, and
//! the leader's application answers the proposer once it took the entry
//! (what a store's client waits for).

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use raft_core::node::{ApplyMsg, Raft};
use raft_core::{ChannelNetwork, Config, MemLogStore, NodeId};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Takes committed commands (a state machine with no data) and answers the
/// proposer (on the leader). Every 10,000 entries it lets the log drop what
/// it applied, as an application does once its state is safe.
async fn apply_loop(rf: Raft, mut rx: mpsc::Receiver<ApplyMsg>) {
    let mut applied = 0u64;
    let mut released = 0;
    while let Some(msg) = rx.recv().await {
        if msg.command_index >= released + 10_000 {
            released = msg.command_index;
            if rf.release_applied(released).await.is_err() {
                return;
            }
        }
        if msg.command_valid {
            applied += 1;
        }
        if let Some(r) = msg.responder {
            r.answer(());
        }
    }
    tracing::debug!(applied, "apply loop ended");
}

struct Cluster {
    nodes: Arc<BTreeMap<NodeId, Raft>>,
}

impl Cluster {
    async fn start() -> anyhow::Result<Self> {
        let net = ChannelNetwork::new();
        let ids: [NodeId; 3] = [1, 2, 3];
        let mut nodes = BTreeMap::new();
        for id in ids {
            let mut config = Config::new(id);
            for peer in ids.iter().filter(|&&p| p != id) {
                config.add_peer(*peer)?;
            }
            let (tx, rx) = mpsc::channel::<ApplyMsg>(4096);
            let rf = Raft::new(config, MemLogStore::new(), net.join(id), tx)?;
            rf.start().await?;
            tokio::spawn(apply_loop(rf.clone(), rx));
            nodes.insert(id, rf);
        }
        Ok(Cluster {
            nodes: Arc::new(nodes),
        })
    }

    async fn leader(&self) -> anyhow::Result<Raft> {
        for _ in 0..200 {
            if let Some(r) = self.nodes.values().find(|r| r.is_leader()) {
                return Ok(r.clone());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!("no leader after 2 s")
    }
}

/// One client: propose, await the leader's application, repeat until
/// `end`; its latencies in microseconds. (A vector, merged into one
/// histogram at the end: a histogram per client costs 4,096 clients a
/// gigabyte of zeroed memory at the start, a stall that ends leaderships.)
async fn client(
    nodes: Arc<BTreeMap<NodeId, Raft>>,
    mut leader: Raft,
    me: u64,
    end: Instant,
    errors: Arc<AtomicU64>,
) -> Vec<u32> {
    let mut lat = Vec::new();
    let mut seq = 0u64;
    while Instant::now() < end {
        seq += 1;
        let cmd = (me << 40 | seq).to_be_bytes().to_vec();
        let t = Instant::now();
        // The first few failures are shown.
        let show = |what: &str, e: &dyn std::fmt::Display| {
            if errors.load(Ordering::Relaxed) < 5 {
                eprintln!("{what}: {e}");
            }
        };
        let ok = match leader.propose(vec![cmd]).await {
            Ok(mut ps) => match ps.pop() {
                Some(p) => match p.outcome::<()>().await {
                    Ok(_) => true,
                    Err(e) => {
                        show("outcome", &e);
                        false
                    }
                },
                None => false,
            },
            Err(e) => {
                show("propose", &e);
                // Follow the leader, as a store's client does.
                if let Some(l) = leader.leader().and_then(|l| nodes.get(&l)) {
                    leader = l.clone();
                }
                false
            }
        };
        if ok {
            lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
        } else {
            errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    lat
}

async fn run(cluster: &Cluster, clients: u64, secs: f64) -> anyhow::Result<()> {
    let leader = cluster.leader().await?;
    let term = leader.status().term;
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..clients)
        .map(|me| {
            let nodes = cluster.nodes.clone();
            tokio::spawn(client(nodes, leader.clone(), me, end, errors.clone()))
        })
        .collect();
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        for us in t.await.context("client task")? {
            all.saturating_record(u64::from(us));
        }
    }
    let took = start.elapsed().as_secs_f64();
    let now = cluster.leader().await?;
    let changed = now.status().term != term || now.config().id != leader.config().id;
    println!(
        "{clients:>5} clients: {:>9.0} writes/s, p50 {:>8.3} ms, p99 {:>8.3} ms, p999 {:>8.3} ms, max {:>8.3} ms, errors {}{}",
        all.len() as f64 / took,
        all.value_at_quantile(0.5) as f64 / 1000.0,
        all.value_at_quantile(0.99) as f64 / 1000.0,
        all.value_at_quantile(0.999) as f64 / 1000.0,
        all.max() as f64 / 1000.0,
        errors.load(Ordering::Relaxed),
        if changed { ", LEADER CHANGED" } else { "" }
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let secs: f64 = match args.next() {
        Some(s) => s.parse().context("SECS: a number of seconds")?,
        None => 5.0,
    };
    let counts: Vec<u64> = match args.next() {
        Some(s) => s
            .split(',')
            .map(|c| {
                c.trim()
                    .parse()
                    .context("CLIENTS: counts separated by commas")
            })
            .collect::<Result<_, _>>()?,
        None => vec![1, 64, 256, 4096],
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let cluster = Cluster::start().await?;
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let alloc = if cfg!(feature = "mimalloc") { "mimalloc" } else { "system allocator" };
        println!("3 nodes in one process, in-memory log, {workers} tokio worker threads, {alloc}, {secs} s per run");
        for c in counts {
            run(&cluster, c, secs).await?;
        }
        for r in cluster.nodes.values() {
            r.shutdown().await?;
        }
        Ok(())
    })
}
