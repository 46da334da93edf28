//! The `raft-kv` command line: `certs`, `node`, `demo` and `bench`.

use crate::node::{KvNode, NodeConfig};
use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How long shutting down (Raft, the state machine's flush, closing the
/// stores) may take before the process exits anyway.
const EXIT_GRACE: Duration = Duration::from_secs(10);
/// Applied entries between snapshots, unless configured.
pub const DEFAULT_SNAPSHOT_THRESHOLD: u64 = 100_000;

/// A replicated key-value store on Raft that speaks the Redis protocol.
#[derive(Debug, Parser)]
#[command(name = "raft-kv", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Write a cluster CA (`ca.pem`, and its key `ca.key`, 0600) and one
    /// certificate per node into a new directory; or, with `--add`, sign
    /// certificates for new members with the CA kept there.
    Certs {
        /// Output directory.
        #[arg(long)]
        dir: PathBuf,
        /// Node ids of a new cluster, comma separated (e.g. 1,2,3).
        #[arg(
            long,
            value_delimiter = ',',
            required_unless_present = "add",
            conflicts_with = "add"
        )]
        nodes: Vec<u64>,
        /// Ids of new members to sign with the existing CA (e.g. 4 or 4,5).
        #[arg(long, value_delimiter = ',')]
        add: Vec<u64>,
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
    Bench(crate::bench::BenchArgs),
    /// Save a consistent snapshot of a running cluster into a file.
    Backup {
        /// Any node's client address (HOST:PORT).
        #[arg(long)]
        addr: String,
        /// Where to write the backup.
        #[arg(long)]
        out: PathBuf,
        /// The cluster's client password, if it has one.
        #[arg(long)]
        password: Option<String>,
    },
    /// Seed one node of a new cluster from a backup (run it for every
    /// member, with the options that member's `node` command will get,
    /// before starting any of them).
    Restore {
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Changes or lists the cluster's members through any node's client
    /// port: `list`, `add ID RAFT-ADDR [IDENTITY]`, `promote ID`, `demote ID`,
    /// `remove ID` (sent as RAFT.MEMBER; the node forwards it to the leader).
    Member {
        /// A member's client address (host:port).
        #[arg(long)]
        addr: String,
        /// The cluster's client password, if it has one.
        #[arg(long)]
        password: Option<String>,
        /// The subcommand and its arguments.
        #[arg(required = true, num_args = 1..=4)]
        args: Vec<String>,
    },
    /// Hands leadership to node `--to` (or to the most up-to-date voter).
    Transfer {
        /// A member's client address (host:port).
        #[arg(long)]
        addr: String,
        /// The cluster's client password, if it has one.
        #[arg(long)]
        password: Option<String>,
        /// The voter to hand over to.
        #[arg(long)]
        to: Option<u64>,
    },
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
    /// Take a snapshot after this many applied entries, and compact the log
    /// up to it whatever the other members hold; 0 for never (default
    /// 100000).
    #[arg(long)]
    snapshot_threshold: Option<u64>,
    /// Bytes per snapshot chunk sent to a follower (default 1048576); four
    /// chunks are in flight at a time.
    #[arg(long)]
    snapshot_chunk_bytes: Option<usize>,
    /// Largest encoded write command in bytes; larger writes are refused with
    /// an error before they are proposed (default 8388608 = 8 MiB; at most
    /// about 16 MiB, the transport's frame limit).
    #[arg(long)]
    max_entry_bytes: Option<usize>,
    /// How a leader confirms a linearizable read: `index` (a heartbeat
    /// round per batch of reads; default) or `lease` (no round while a
    /// lease from the last acknowledged heartbeat runs; safe while the
    /// nodes' clock rates differ by less than 10%).
    #[arg(long)]
    read_policy: Option<String>,
    /// Start empty and ask the cluster at this client address (any
    /// member's) to add this node: as a learner, promoted to voter once it
    /// caught up. `--peer` is then not needed.
    #[arg(long)]
    join: Option<String>,
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
    snapshot_threshold: Option<u64>,
    snapshot_chunk_bytes: Option<usize>,
    max_entry_bytes: Option<usize>,
    read_policy: Option<String>,
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
    // Every Raft default comes from raft-core's one Config.
    let mut raft = raft_core::Config::new(id);
    let ms = |v: Option<u64>, d: &mut Duration| {
        if let Some(v) = v {
            *d = Duration::from_millis(v);
        }
    };
    ms(
        a.heartbeat_ms.or(f.heartbeat_ms),
        &mut raft.heartbeat_interval,
    );
    ms(
        a.election_min_ms.or(f.election_min_ms),
        &mut raft.election_timeout_min,
    );
    ms(
        a.election_max_ms.or(f.election_max_ms),
        &mut raft.election_timeout_max,
    );
    if let Some(t) = a.compact_threshold.or(f.compact_threshold) {
        raft.compact_threshold = t;
    }
    if let Some(c) = a.snapshot_chunk_bytes.or(f.snapshot_chunk_bytes) {
        raft.snapshot_chunk_bytes = c;
    }
    if let Some(m) = a.max_entry_bytes.or(f.max_entry_bytes) {
        raft.max_entry_bytes = m;
    }
    if let Some(p) = a.read_policy.or(f.read_policy) {
        raft.read_policy = match p.as_str() {
            "index" => raft_core::ReadPolicy::ReadIndex,
            "lease" => raft_core::ReadPolicy::Lease,
            other => bail!("--read-policy {other:?}: expected `index` or `lease`"),
        };
    }
    let cfg = NodeConfig {
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
        snapshot_threshold: a
            .snapshot_threshold
            .or(f.snapshot_threshold)
            .unwrap_or(DEFAULT_SNAPSHOT_THRESHOLD),
        tls_dir: a.tls_dir.or(f.tls_dir).ok_or_else(|| need("tls-dir"))?,
        password: a.password.or(f.password),
        cluster_id: a.cluster_id.or(f.cluster_id).unwrap_or(0),
        join: a.join,
        raft,
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
    let password = cfg.password.clone();
    let node = KvNode::start(cfg).await?;
    let server = tokio::spawn(crate::server::serve(listener, node.clone(), password));
    Ok((node, server))
}

/// Sends one administration command to a member and prints its answer.
async fn admin(
    addr: &str,
    password: Option<String>,
    name: &str,
    args: impl IntoIterator<Item = String>,
    prefix: &str,
) -> anyhow::Result<()> {
    let cmd: Vec<String> = std::iter::once(name.to_string()).chain(args).collect();
    let reply = crate::backup::call(addr, password.as_deref(), &cmd).await?;
    println!("{prefix}{reply}");
    Ok(())
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
            Command::Certs { dir, nodes, add } => {
                if add.is_empty() {
                    raft_net_quic::generate_cluster_certs(&dir, &nodes)?;
                    println!(
                        "wrote ca.pem, ca.key (keep it private) and certificates for nodes {nodes:?} to {}",
                        dir.display()
                    );
                } else {
                    raft_net_quic::add_node_certs(&dir, &add)?;
                    println!(
                        "signed certificates for nodes {add:?} with the CA in {}",
                        dir.display()
                    );
                }
                Ok(())
            }
            Command::Node(args) => {
                let cfg = node_config(args)?;
                let join = cfg
                    .join
                    .clone()
                    .map(|a| (a, cfg.raft_addr, cfg.password.clone()));
                let (node, server) = run_node(cfg).await?;
                if let Some((at, raft_addr, pw)) = join {
                    let node = node.clone();
                    tokio::spawn(async move {
                        if let Err(e) =
                            crate::backup::join(&at, &node, raft_addr, pw.as_deref()).await
                        {
                            tracing::error!(error = %format!("{e:#}"), "joining the cluster failed");
                        }
                    });
                }
                // A node whose Raft stopped (a failed disk, a failed state
                // machine) must not linger looking healthy: it exits with
                // the reason, for its supervisor to see.
                let failed = tokio::select! {
                    _ = wait_for_stop() => None,
                    why = node.wait_stopped() => Some(why),
                };
                if failed.is_none() {
                    // A leader hands over first: writes pause for an
                    // election's round trips, not an election timeout.
                    if let Some(pause) = node.hand_over().await {
                        eprintln!("raft-kv: leadership handed over in {} ms", pause.as_millis());
                    }
                }
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
            Command::Bench(b) => crate::bench::run(b).await,
            Command::Backup {
                addr,
                out,
                password,
            } => {
                let h = crate::backup::backup(&addr, &out, password.as_deref()).await?;
                println!(
                    "backup of {} keys at log index {} (term {}) written to {}",
                    h.keys,
                    h.index,
                    h.term,
                    out.display()
                );
                Ok(())
            }
            Command::Member {
                addr,
                password,
                args,
            } => admin(&addr, password, "RAFT.MEMBER", args, "").await,
            Command::Transfer { addr, password, to } => {
                let to = to.map(|t| t.to_string());
                admin(&addr, password, "RAFT.TRANSFER", to, "leader: node ").await
            }
            Command::Restore { from, node } => {
                let cfg = node_config(node)?;
                let h = crate::backup::restore(&from, &cfg).await?;
                println!(
                    "node {} seeded with {} keys at log index {} in {}; start it with the same options",
                    cfg.id(),
                    h.keys,
                    h.index,
                    cfg.data_dir.display()
                );
                Ok(())
            }
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
    // A demo run again in its directory keeps its CA.
    if !certs.join("ca.pem").exists() {
        raft_net_quic::generate_cluster_certs(&certs, &ids)?;
    }
    let raft_addr = |id: u64| SocketAddr::from(([127, 0, 0, 1], 7100 + id as u16));
    let client_addr = |id: u64| SocketAddr::from(([127, 0, 0, 1], 7000 + id as u16));
    let mut running = Vec::new();
    for &id in &ids {
        let cfg = NodeConfig {
            raft_addr: raft_addr(id),
            client_addr: client_addr(id),
            peers: ids
                .iter()
                .filter(|&&p| p != id)
                .map(|&p| (p, raft_addr(p)))
                .collect(),
            data_dir: dir.join(format!("node-{id}")),
            snapshot_threshold: DEFAULT_SNAPSHOT_THRESHOLD,
            tls_dir: certs.clone(),
            password: None,
            cluster_id: 0,
            join: None,
            raft: raft_core::Config::new(id),
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(cfg.raft.heartbeat_interval, Duration::from_millis(50));
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
        // Two peers at one address.
        let shared = NodeArgs {
            id: Some(1),
            raft_addr: Some("127.0.0.1:7101".parse().unwrap()),
            client_addr: Some("127.0.0.1:7001".parse().unwrap()),
            data_dir: Some("d".into()),
            tls_dir: Some("t".into()),
            peers: vec!["2=127.0.0.1:7102".into(), "4=127.0.0.1:7102".into()],
            ..Default::default()
        };
        let err = node_config(shared).unwrap_err().to_string();
        assert!(
            err.contains("peers 2 and 4 share the address 127.0.0.1:7102"),
            "{err}"
        );
        let bad_policy = NodeArgs {
            id: Some(1),
            raft_addr: Some("127.0.0.1:7101".parse().unwrap()),
            client_addr: Some("127.0.0.1:7001".parse().unwrap()),
            data_dir: Some("d".into()),
            tls_dir: Some("t".into()),
            read_policy: Some("fast".into()),
            ..Default::default()
        };
        let err = node_config(bad_policy).unwrap_err().to_string();
        assert!(err.contains("expected `index` or `lease`"), "{err}");
        let good_policy = NodeArgs {
            id: Some(1),
            raft_addr: Some("127.0.0.1:7101".parse().unwrap()),
            client_addr: Some("127.0.0.1:7001".parse().unwrap()),
            data_dir: Some("d".into()),
            tls_dir: Some("t".into()),
            read_policy: Some("lease".into()),
            ..Default::default()
        };
        let cfg = node_config(good_policy).unwrap();
        assert_eq!(cfg.raft.read_policy, raft_core::ReadPolicy::Lease);
    }
}
