//! The `raft-kv` command line: `certs`, `node`, `demo` and `bench`.

use crate::node::{KvNode, NodeConfig};
use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use serde::Deserialize;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long shutting down (Raft, the state machine's flush, closing the
/// stores) may take before the process exits anyway.
const EXIT_GRACE: Duration = Duration::from_secs(10);

/// The Raft layer's default compaction step.
fn default_compact_threshold() -> u64 {
    raft_core::node::Config::new(0).compact_threshold
}

/// The Raft layer's default largest entry.
fn default_max_entry_bytes() -> usize {
    raft_core::node::Config::new(0).max_entry_bytes
}

/// A replicated key-value store on Raft that speaks the Redis protocol.
#[derive(Debug, Parser)]
#[command(name = "raft-kv", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a cluster CA and one certificate per node into a directory.
    Certs {
        /// Output directory.
        #[arg(long)]
        dir: PathBuf,
        /// Node ids, comma separated (e.g. 1,2,3).
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<u64>,
    },
    /// Run one node of a cluster.
    Node(NodeArgs),
    /// Run a whole cluster on this machine (loopback), for trying things out.
    Demo {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// Where to keep data and certificates (default: a new temporary directory).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// A closed-loop load generator.
    Bench(BenchArgs),
}

#[derive(Debug, clap::Args, Default)]
struct NodeArgs {
    /// A TOML file with the same keys as these options (command-line values win).
    #[arg(long)]
    config: Option<PathBuf>,
    /// This node's id.
    #[arg(long)]
    id: Option<u64>,
    /// UDP address for Raft traffic.
    #[arg(long)]
    raft_addr: Option<SocketAddr>,
    /// TCP address for Redis clients.
    #[arg(long)]
    client_addr: Option<SocketAddr>,
    /// A peer, as ID=RAFT_ADDR; repeat for each.
    #[arg(long = "peer")]
    peers: Vec<String>,
    /// Data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Directory with ca.pem, node-<id>.pem, node-<id>.key.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Heartbeat interval in milliseconds (default 100).
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// Election timeout lower bound in milliseconds (default 150).
    #[arg(long)]
    election_min_ms: Option<u64>,
    /// Election timeout upper bound in milliseconds (default 300).
    #[arg(long)]
    election_max_ms: Option<u64>,
    /// Require clients to AUTH with this password.
    #[arg(long)]
    password: Option<String>,
    /// Cluster id; nodes of different clusters refuse each other (default 0).
    #[arg(long)]
    cluster_id: Option<u64>,
    /// Log entries dropped at a time once the state machine holds them (default 8192).
    #[arg(long)]
    compact_threshold: Option<u64>,
    /// Largest encoded write command in bytes; larger writes are refused with
    /// an error before they are proposed (default 8388608 = 8 MiB; at most
    /// about 16 MiB, the transport's frame limit).
    #[arg(long)]
    max_entry_bytes: Option<usize>,
}

/// The TOML file form of the node options.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    id: Option<u64>,
    raft_addr: Option<SocketAddr>,
    client_addr: Option<SocketAddr>,
    #[serde(default)]
    peers: Vec<String>,
    data_dir: Option<PathBuf>,
    tls_dir: Option<PathBuf>,
    heartbeat_ms: Option<u64>,
    election_min_ms: Option<u64>,
    election_max_ms: Option<u64>,
    password: Option<String>,
    cluster_id: Option<u64>,
    compact_threshold: Option<u64>,
    max_entry_bytes: Option<usize>,
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// Server addresses, comma separated; connections are spread over them.
    #[arg(long, value_delimiter = ',', required = true)]
    addr: Vec<String>,
    /// Concurrent clients (requests in flight), spread over the connections.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// TCP connections.
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// Duration in seconds.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Operation: set or get.
    #[arg(long, default_value = "set")]
    op: String,
    /// Password, if the servers require AUTH.
    #[arg(long)]
    password: Option<String>,
}

fn parse_peer(s: &str) -> anyhow::Result<(u64, SocketAddr)> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| anyhow!("peer {s:?}: expected ID=ADDR"))?;
    let id = id
        .trim()
        .parse()
        .with_context(|| format!("peer {s:?}: bad id"))?;
    let addr = addr
        .trim()
        .parse()
        .with_context(|| format!("peer {s:?}: bad address"))?;
    Ok((id, addr))
}

/// Merges file and command-line options into a validated node configuration.
fn node_config(a: NodeArgs) -> anyhow::Result<NodeConfig> {
    let f: FileConfig = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("{}: invalid configuration", p.display()))?
        }
        None => FileConfig::default(),
    };
    let need = |name: &str| {
        anyhow!(
            "missing --{name} (or `{}` in the config file)",
            name.replace('-', "_")
        )
    };
    let id = a.id.or(f.id).ok_or_else(|| need("id"))?;
    let mut peers = BTreeMap::new();
    let peer_list = if a.peers.is_empty() { f.peers } else { a.peers };
    for p in &peer_list {
        let (pid, addr) = parse_peer(p)?;
        if peers.insert(pid, addr).is_some() {
            bail!("peer {pid} is given twice");
        }
    }
    if peers.contains_key(&id) {
        bail!("node {id} lists itself as a peer");
    }
    let ms = |v: Option<u64>, d: u64| Duration::from_millis(v.unwrap_or(d));
    let cfg = NodeConfig {
        id,
        raft_addr: a
            .raft_addr
            .or(f.raft_addr)
            .ok_or_else(|| need("raft-addr"))?,
        client_addr: a
            .client_addr
            .or(f.client_addr)
            .ok_or_else(|| need("client-addr"))?,
        peers,
        data_dir: a.data_dir.or(f.data_dir).ok_or_else(|| need("data-dir"))?,
        tls_dir: a.tls_dir.or(f.tls_dir).ok_or_else(|| need("tls-dir"))?,
        heartbeat: ms(a.heartbeat_ms.or(f.heartbeat_ms), 100),
        election_min: ms(a.election_min_ms.or(f.election_min_ms), 150),
        election_max: ms(a.election_max_ms.or(f.election_max_ms), 300),
        password: a.password.or(f.password),
        cluster_id: a.cluster_id.or(f.cluster_id).unwrap_or(0),
        compact_threshold: a
            .compact_threshold
            .or(f.compact_threshold)
            .unwrap_or_else(default_compact_threshold),
        max_entry_bytes: a
            .max_entry_bytes
            .or(f.max_entry_bytes)
            .unwrap_or_else(default_max_entry_bytes),
    };
    // The Raft layer validates the timing rules with precise messages.
    cfg.raft_config()?;
    Ok(cfg)
}

/// Starts a node and its client listener.
pub async fn run_node(
    cfg: NodeConfig,
) -> anyhow::Result<(Arc<KvNode>, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(cfg.client_addr)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.client_addr))?;
    let node = KvNode::start(cfg).await?;
    let server = tokio::spawn(crate::server::serve(listener, node.clone()));
    Ok((node, server))
}

async fn wait_for_stop() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Runs the command line and turns an error into a message and exit status 1.
pub fn run() -> std::process::ExitCode {
    match main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("raft-kv: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Entry point of the `raft-kv` binary.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let res = rt.block_on(async move {
        match cli.command {
            Command::Certs { dir, nodes } => {
                raft_net_quic::generate_cluster_certs(&dir, &nodes)?;
                println!(
                    "wrote ca.pem and certificates for nodes {nodes:?} to {}",
                    dir.display()
                );
                Ok(())
            }
            Command::Node(args) => {
                let cfg = node_config(args)?;
                let (node, server) = run_node(cfg).await?;
                // A node whose Raft stopped (a failed disk, a failed state
                // machine) must not linger looking healthy: it exits with
                // the reason, for its supervisor to see.
                let failed = tokio::select! {
                    _ = wait_for_stop() => None,
                    why = node.wait_stopped() => Some(why),
                };
                if let Some(why) = &failed {
                    tracing::error!(reason = %why, "raft stopped; shutting the node down");
                }
                // From here on the process exits within EXIT_GRACE, whatever
                // the disk does: a plain thread, so it fires even if every
                // runtime thread is stuck in a storage call.
                std::thread::spawn(move || {
                    std::thread::sleep(EXIT_GRACE);
                    eprintln!(
                        "raft-kv: error: shutdown did not finish within {EXIT_GRACE:?} (storage hung); exiting"
                    );
                    std::process::exit(1);
                });
                server.abort();
                node.shutdown().await;
                drop(node);
                match failed {
                    Some(why) => bail!("the node stopped: {why}"),
                    None => Ok(()),
                }
            }
            Command::Demo { nodes, data_dir } => demo(nodes, data_dir).await,
            Command::Bench(b) => bench(b).await,
        }
    });
    // A write stuck in a hung disk must not keep the process alive.
    rt.shutdown_timeout(Duration::from_secs(1));
    res
}

async fn demo(n: u64, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    if !(1..=9).contains(&n) {
        bail!("--nodes must be between 1 and 9");
    }
    let dir = data_dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("raft-kv-demo-{}", std::process::id()))
    });
    let ids: Vec<u64> = (1..=n).collect();
    let certs = dir.join("certs");
    raft_net_quic::generate_cluster_certs(&certs, &ids)?;
    let raft_addr = |id: u64| SocketAddr::from(([127, 0, 0, 1], 7100 + id as u16));
    let client_addr = |id: u64| SocketAddr::from(([127, 0, 0, 1], 7000 + id as u16));
    let mut running = Vec::new();
    for &id in &ids {
        let cfg = NodeConfig {
            id,
            raft_addr: raft_addr(id),
            client_addr: client_addr(id),
            peers: ids
                .iter()
                .filter(|&&p| p != id)
                .map(|&p| (p, raft_addr(p)))
                .collect(),
            data_dir: dir.join(format!("node-{id}")),
            tls_dir: certs.clone(),
            heartbeat: Duration::from_millis(100),
            election_min: Duration::from_millis(150),
            election_max: Duration::from_millis(300),
            password: None,
            cluster_id: 0,
            compact_threshold: default_compact_threshold(),
            max_entry_bytes: default_max_entry_bytes(),
        };
        running.push(run_node(cfg).await?);
    }
    println!(
        "raft-kv demo: {n} nodes, data and certificates in {}",
        dir.display()
    );
    for &id in &ids {
        println!(
            "  node {id}: clients on {}, raft on {}",
            client_addr(id),
            raft_addr(id)
        );
    }
    println!("connect with:  redis-cli -p 7001     (any node accepts any command; try INFO)");
    println!("press Ctrl-C to stop");
    wait_for_stop().await;
    for (node, server) in running {
        server.abort();
        node.shutdown().await;
    }
    println!("stopped");
    Ok(())
}

/// Length of the first complete RESP reply in `buf`, if there is one.
fn reply_len(buf: &[u8]) -> Option<usize> {
    fn line(buf: &[u8], from: usize) -> Option<usize> {
        buf.get(from..)?
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| from + p)
    }
    fn one(buf: &[u8], at: usize) -> Option<usize> {
        let end = line(buf, at)?;
        match *buf.get(at)? {
            b'+' | b'-' | b':' => Some(end + 2),
            b'$' => {
                let n: i64 = std::str::from_utf8(&buf[at + 1..end]).ok()?.parse().ok()?;
                if n < 0 {
                    return Some(end + 2);
                }
                let stop = end + 2 + n as usize + 2;
                (stop <= buf.len()).then_some(stop)
            }
            b'*' => {
                let n: i64 = std::str::from_utf8(&buf[at + 1..end]).ok()?.parse().ok()?;
                let mut pos = end + 2;
                for _ in 0..n.max(0) {
                    pos = one(buf, pos)?;
                }
                Some(pos)
            }
            _ => None,
        }
    }
    one(buf, 0)
}

fn request(op: &str, key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(value.len() + 64);
    let parts: &[&[u8]] = if op == "get" {
        &[b"GET", key]
    } else {
        &[b"SET", key, value]
    };
    r.extend_from_slice(format!("*{}\r\n", parts.len()).as_bytes());
    for p in parts {
        r.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
        r.extend_from_slice(p);
        r.extend_from_slice(b"\r\n");
    }
    r
}

struct ConnStats {
    latencies_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

async fn bench_conn(
    addr: String,
    window: usize,
    a: Arc<BenchArgs>,
    seed: u64,
    until: Instant,
) -> anyhow::Result<ConnStats> {
    let mut sock = tokio::net::TcpStream::connect(&addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    sock.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    if let Some(pw) = &a.password {
        sock.write_all(format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{pw}\r\n", pw.len()).as_bytes())
            .await?;
        loop {
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                bail!("{addr} closed the connection during AUTH");
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(l) = reply_len(&buf) {
                if buf[0] == b'-' {
                    bail!("AUTH failed: {}", String::from_utf8_lossy(&buf[..l]).trim());
                }
                buf.drain(..l);
                break;
            }
        }
    }
    let value = vec![b'x'; a.value_size];
    let mut rng = seed | 1;
    let keys = a.keys.max(1);
    let mut next_key = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        format!("key:{}", rng % keys).into_bytes()
    };
    let mut inflight: VecDeque<Instant> = VecDeque::new();
    let mut stats = ConnStats {
        latencies_us: Vec::new(),
        errors: 0,
        first_error: None,
    };
    let mut out = Vec::new();
    for _ in 0..window {
        out.extend(request(&a.op, &next_key(), &value));
        inflight.push_back(Instant::now());
    }
    sock.write_all(&out).await?;
    while !inflight.is_empty() {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            bail!("{addr} closed the connection");
        }
        buf.extend_from_slice(&chunk[..n]);
        out.clear();
        let mut consumed = 0;
        while let Some(l) = reply_len(&buf[consumed..]) {
            let sent = inflight
                .pop_front()
                .ok_or_else(|| anyhow!("more replies than requests"))?;
            stats
                .latencies_us
                .push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
            if buf[consumed] == b'-' {
                stats.errors += 1;
                if stats.first_error.is_none() {
                    stats.first_error = Some(
                        String::from_utf8_lossy(&buf[consumed..consumed + l])
                            .trim()
                            .to_string(),
                    );
                }
            }
            consumed += l;
            if Instant::now() < until {
                out.extend(request(&a.op, &next_key(), &value));
                inflight.push_back(Instant::now());
            }
        }
        buf.drain(..consumed);
        if !out.is_empty() {
            sock.write_all(&out).await?;
        }
    }
    Ok(stats)
}

async fn bench(a: BenchArgs) -> anyhow::Result<()> {
    if a.op != "set" && a.op != "get" {
        bail!("--op must be set or get");
    }
    if a.conns == 0 || a.clients < a.conns {
        bail!("need --conns >= 1 and --clients >= --conns");
    }
    let a = Arc::new(a);
    let start = Instant::now();
    let until = start + Duration::from_secs(a.secs);
    let mut tasks = Vec::new();
    for c in 0..a.conns {
        let window = a.clients / a.conns + usize::from(c < a.clients % a.conns);
        let addr = a.addr[c % a.addr.len()].clone();
        tasks.push(tokio::spawn(bench_conn(
            addr,
            window,
            a.clone(),
            0x9E37_79B9 + c as u64 * 7919,
            until,
        )));
    }
    let mut lat: Vec<u32> = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let s = t.await??;
        lat.extend(s.latencies_us);
        errors += s.errors;
        first_error = first_error.or(s.first_error);
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    println!(
        "{} {} ops in {:.1}s: {:.0} ops/s, p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms, errors {} ({} clients, {} conns, {} B values)",
        lat.len(),
        a.op.to_uppercase(),
        elapsed,
        lat.len() as f64 / elapsed,
        pct(0.5),
        pct(0.99),
        pct(0.999),
        errors,
        a.clients,
        a.conns,
        a.value_size
    );
    if let Some(e) = first_error {
        println!("first error: {e}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_boundaries() {
        assert_eq!(reply_len(b"+OK\r\n"), Some(5));
        assert_eq!(reply_len(b"$3\r\nabc\r\n:1\r\n"), Some(9));
        assert_eq!(reply_len(b"$3\r\nab"), None);
        assert_eq!(reply_len(b"*2\r\n$1\r\na\r\n$-1\r\n"), Some(16));
        assert_eq!(reply_len(b"$-1\r\n"), Some(5));
    }

    #[test]
    fn config_file_and_flags_merge_with_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("node.toml");
        std::fs::write(
            &f,
            "id = 1\nraft_addr = \"127.0.0.1:7101\"\nclient_addr = \"127.0.0.1:7001\"\npeers = [\"2=127.0.0.1:7102\", \"3=127.0.0.1:7103\"]\ndata_dir = \"d\"\ntls_dir = \"t\"\n",
        )
        .unwrap();
        let args = NodeArgs {
            config: Some(f.clone()),
            heartbeat_ms: Some(50),
            ..Default::default()
        };
        let cfg = node_config(args).unwrap();
        assert_eq!(cfg.peers.len(), 2);
        assert_eq!(cfg.heartbeat, Duration::from_millis(50));
        let bad = NodeArgs {
            config: Some(f.clone()),
            election_min_ms: Some(400),
            ..Default::default()
        };
        assert!(node_config(bad)
            .unwrap_err()
            .to_string()
            .contains("election_timeout_min"));
        let missing = NodeArgs {
            id: Some(1),
            ..Default::default()
        };
        assert!(node_config(missing)
            .unwrap_err()
            .to_string()
            .contains("--raft-addr"));
        let self_peer = NodeArgs {
            config: Some(f.clone()),
            peers: vec!["1=127.0.0.1:1".into()],
            ..Default::default()
        };
        assert!(node_config(self_peer).is_err());
        std::fs::write(&f, "id = 1\nbogus = 2\n").unwrap();
        let unknown_key = NodeArgs {
            config: Some(f),
            ..Default::default()
        };
        assert!(node_config(unknown_key)
            .unwrap_err()
            .to_string()
            .contains("invalid configuration"));
        assert!(parse_peer("2:127.0.0.1:1").is_err());
    }
}
