//! The `raft-kv` command line: `certs`, `node`, `demo` and `bench`.

use crate::node::{KvNode, LogEngine, NodeConfig, DEFAULT_FLUSH_EVERY};
use crate::server::ClientConfig;
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
    /// Log format on stderr: `text` (colours only on a terminal) or `json`
    /// (one object per line).
    #[arg(long, global = true, default_value = "text")]
    log_format: LogFormat,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
        /// Where to write the backup.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        dial: DialArgs,
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
        #[command(flatten)]
        dial: DialArgs,
        /// The subcommand and its arguments.
        #[arg(required = true, num_args = 1..=4)]
        args: Vec<String>,
    },
    /// Hands leadership to node `--to` (or to the most up-to-date voter).
    Transfer {
        #[command(flatten)]
        dial: DialArgs,
        /// The voter to hand over to.
        #[arg(long)]
        to: Option<u64>,
    },
}

/// How a tool reaches a node's client port.
#[derive(Debug, clap::Args)]
struct DialArgs {
    /// A member's client address (HOST:PORT).
    #[arg(long)]
    addr: String,
    /// The cluster's client password, if it has one (or set
    /// RAFT_KV_PASSWORD, which `ps` does not show).
    #[arg(long, env = "RAFT_KV_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// The client port serves TLS: trust the CA certificates in this file.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// With `--tls-ca`: a client certificate to present (the port checks them).
    #[arg(long, requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// The key of `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The name the node's certificate carries (default: the host in `--addr`).
    #[arg(long, requires = "tls_ca")]
    tls_server_name: Option<String>,
}

impl DialArgs {
    fn dial(self) -> anyhow::Result<(String, crate::backup::Dial)> {
        let tls = match &self.tls_ca {
            Some(ca) => Some(crate::backup::DialTls::new(
                ca,
                self.tls_cert.as_deref().zip(self.tls_key.as_deref()),
                self.tls_server_name,
            )?),
            None => None,
        };
        Ok((
            self.addr,
            crate::backup::Dial {
                password: self.password,
                tls,
            },
        ))
    }
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
    /// How long a leader waits for the next append or heartbeat to carry a
    /// new commit index before it sends it on its own, in milliseconds
    /// (default 2; 0: at once).
    #[arg(long)]
    commit_notice_ms: Option<u64>,
    /// Require clients to AUTH with this password. Prefer
    /// `--password-file` or the RAFT_KV_PASSWORD environment variable: a
    /// command line is visible to every user through `ps`.
    #[arg(long, conflicts_with = "password_file")]
    password: Option<String>,
    /// Read the client password from this file (its first line); the file
    /// must not be readable by group or others.
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// Refuse to start with a client address other than loopback and no
    /// password: `yes` (default) or `no`.
    #[arg(long)]
    protected_mode: Option<String>,
    /// Most clients connected at once; more get `-ERR max number of
    /// clients reached` (default 10000).
    #[arg(long)]
    maxclients: Option<usize>,
    /// Close a client idle for this many seconds (default 0: never).
    #[arg(long)]
    client_timeout: Option<u64>,
    /// Largest reply in bytes; a client whose reply would pass it gets an
    /// error and is disconnected (default 67108864 = 64 MiB).
    #[arg(long)]
    client_output_limit: Option<usize>,
    /// Serve clients over TLS with this certificate chain (PEM).
    #[arg(long, requires = "client_tls_key")]
    client_tls_cert: Option<PathBuf>,
    /// The private key of `--client-tls-cert` (PEM).
    #[arg(long, requires = "client_tls_cert")]
    client_tls_key: Option<PathBuf>,
    /// Require clients to present a certificate signed by a CA in this file
    /// (PEM; needs `--client-tls-cert`).
    #[arg(long, requires = "client_tls_cert")]
    client_tls_ca: Option<PathBuf>,
    /// Serve Prometheus metrics (`/metrics`), `/health` and `/ready` over
    /// HTTP on this address.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// On SIGTERM or SIGINT, exit within this many seconds whatever the
    /// disk does (default 10).
    #[arg(long)]
    shutdown_timeout_secs: Option<u64>,
    /// Cluster id; nodes of different clusters refuse each other (default 0).
    #[arg(long)]
    cluster_id: Option<u64>,
    /// Log entries dropped at a time once the state machine holds them (default 8192).
    #[arg(long)]
    compact_threshold: Option<u64>,
    /// Take a snapshot after this many applied entries when the log keeps
    /// that many the state machine has already flushed (a member lags and
    /// holds compaction back), and
    /// compact the log up to it whatever the other members hold; 0 for
    /// only when a follower needs one (default 100000).
    #[arg(long)]
    snapshot_threshold: Option<u64>,
    /// How often, in milliseconds, the state machine writes what it
    /// applied to disk so the log can drop it (default 5000; sooner when
    /// 64 MiB of writes wait). Shorter: less memory and less log to
    /// replay after a crash, more disk work per write.
    #[arg(long)]
    flush_every_ms: Option<u64>,
    /// Threads that run the node's network, client and Raft work (default:
    /// half the machine's cores, at least 1). With 1 everything runs on one
    /// thread, which wastes no time handing work between threads; disk
    /// writes and the state machine's flushes always have threads of their
    /// own. Several nodes on one machine: divide its cores between them.
    #[arg(long)]
    threads: Option<usize>,
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
    /// The Raft log's storage engine: `auto` (default: the engine whose
    /// files the log directory holds, `wal` for a new node), `wal`
    /// (append-only segment files, one write and one fdatasync per batch)
    /// or `sled`. A node keeps the engine its log was created with: the
    /// other one refuses the directory.
    #[arg(long)]
    log_engine: Option<String>,
    /// Start empty and ask the cluster at this client address (any
    /// member's) to add this node: as a learner, promoted to voter once it
    /// caught up. `--peer` is then not needed.
    #[arg(long)]
    join: Option<String>,
    /// With `--join`, when the cluster's client ports serve TLS: trust the
    /// CA certificates in this file (this node's `--client-tls-cert` and
    /// key are presented as a client certificate).
    #[arg(long, requires = "join")]
    join_tls_ca: Option<PathBuf>,
    /// With `--join-tls-ca`: the name the member's certificate carries
    /// (default: the host in `--join`).
    #[arg(long, requires = "join_tls_ca")]
    join_tls_server_name: Option<String>,
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
    commit_notice_ms: Option<u64>,
    password: Option<String>,
    password_file: Option<PathBuf>,
    protected_mode: Option<String>,
    maxclients: Option<usize>,
    client_timeout: Option<u64>,
    client_output_limit: Option<usize>,
    client_tls_cert: Option<PathBuf>,
    client_tls_key: Option<PathBuf>,
    client_tls_ca: Option<PathBuf>,
    metrics_addr: Option<SocketAddr>,
    shutdown_timeout_secs: Option<u64>,
    cluster_id: Option<u64>,
    compact_threshold: Option<u64>,
    snapshot_threshold: Option<u64>,
    snapshot_chunk_bytes: Option<usize>,
    flush_every_ms: Option<u64>,
    threads: Option<usize>,
    max_entry_bytes: Option<usize>,
    read_policy: Option<String>,
    log_engine: Option<String>,
}

/// A node's whole setup: the node, its client port, its metrics address and
/// its shutdown bound.
#[derive(Debug)]
pub struct Setup {
    /// The node.
    pub node: NodeConfig,
    /// The client port (its password is `node.password`).
    pub client: ClientConfig,
    /// Where `/metrics`, `/health` and `/ready` are served.
    pub metrics_addr: Option<SocketAddr>,
    /// How long a shutdown may take.
    pub shutdown_timeout: Duration,
    /// How `--join` reaches the member it asks.
    pub join_dial: crate::backup::Dial,
    /// Runtime threads (1: a single-threaded runtime).
    pub threads: usize,
}

/// Most runtime threads `--threads` accepts.
const MAX_THREADS: usize = 1024;

/// The default for `--threads`: half the cores, at least one. The other
/// half is left to the threads that write the log and flush the state
/// machine, which do not run on the runtime.
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// The runtime a node runs on: one thread, or a multi-threaded one.
fn node_runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// Refuses a file holding a secret that group or others can read.
fn check_private(path: &std::path::Path, what: &str) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            bail!(
                "{} holds {what} and is readable by other users (mode {:o}); run `chmod 600 {}`",
                path.display(),
                mode & 0o777,
                path.display()
            );
        }
    }
    #[cfg(not(unix))]
    let _ = (path, what);
    Ok(())
}

/// The client password, from the first source given in this order: the
/// command line (`--password`, `--password-file`), the environment
/// (`RAFT_KV_PASSWORD`), the config file (`password_file`, `password`; not
/// both). An empty password is refused: it would pass protected mode and
/// let `AUTH ""` in.
fn choose_password(
    flag: Option<String>,
    flag_file: Option<PathBuf>,
    env: Option<String>,
    conf_file: Option<PathBuf>,
    conf: Option<String>,
) -> anyhow::Result<Option<String>> {
    if conf_file.is_some() && conf.is_some() {
        bail!("the config file gives both `password` and `password_file`; keep one");
    }
    let pw = match (flag, flag_file, env, conf_file, conf) {
        (Some(p), ..) => Some(p),
        (None, Some(file), ..) => Some(read_password_file(&file)?),
        (None, None, Some(p), ..) => Some(p),
        (None, None, None, Some(file), _) => Some(read_password_file(&file)?),
        (None, None, None, None, p) => p,
    };
    if pw.as_deref() == Some("") {
        bail!("the client password is empty; give a password or none at all");
    }
    Ok(pw)
}

/// The password from a file: its first line, without the line end.
fn read_password_file(path: &std::path::Path) -> anyhow::Result<String> {
    check_private(path, "a password")?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let pw = text.lines().next().unwrap_or("").to_string();
    if pw.is_empty() {
        bail!("{}: the password file is empty", path.display());
    }
    Ok(pw)
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
    Ok(node_setup(a, false)?.node)
}

/// Merges file and command-line options into a validated node setup;
/// `serving`: the node is about to serve clients (protected mode applies).
fn node_setup(a: NodeArgs, serving: bool) -> anyhow::Result<Setup> {
    let f: FileConfig = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            let f: FileConfig = toml::from_str(&text)
                .with_context(|| format!("{}: invalid configuration", p.display()))?;
            if f.password.is_some() {
                check_private(p, "a password")?;
            }
            f
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
    ms(
        a.commit_notice_ms.or(f.commit_notice_ms),
        &mut raft.commit_notice_delay,
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
    let log_engine = match a.log_engine.or(f.log_engine).as_deref() {
        None | Some("auto") => LogEngine::Auto,
        Some("sled") => LogEngine::Sled,
        Some("wal") => LogEngine::Wal,
        Some(other) => bail!("--log-engine {other:?}: expected `auto`, `sled` or `wal`"),
    };
    let flush_every = match a.flush_every_ms.or(f.flush_every_ms) {
        None => DEFAULT_FLUSH_EVERY,
        Some(ms @ 1..=3_600_000) => Duration::from_millis(ms),
        Some(ms) => bail!("--flush-every-ms {ms}: expected 1 to 3600000 (one hour)"),
    };
    let threads = match a.threads.or(f.threads) {
        None => default_threads(),
        Some(n @ 1..=MAX_THREADS) => n,
        Some(n) => bail!("--threads {n}: expected 1 to {MAX_THREADS}"),
    };
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
        password: choose_password(
            a.password,
            a.password_file,
            std::env::var("RAFT_KV_PASSWORD").ok(),
            f.password_file,
            f.password,
        )?,
        cluster_id: a.cluster_id.or(f.cluster_id).unwrap_or(0),
        join: a.join,
        log_engine,
        flush_every,
        raft,
    };
    // The Raft layer validates the timing rules with precise messages.
    cfg.raft_config()?;
    let protected = match a.protected_mode.or(f.protected_mode).as_deref() {
        None | Some("yes") => true,
        Some("no") => false,
        Some(other) => bail!("--protected-mode {other:?}: expected `yes` or `no`"),
    };
    if serving && protected && cfg.password.is_none() && !cfg.client_addr.ip().is_loopback() {
        bail!(
            "refusing to serve clients on {} without a password (protected mode): set one with \
             --password-file or RAFT_KV_PASSWORD, or listen on a loopback address, or pass \
             --protected-mode no if every client that can reach this address is trusted",
            cfg.client_addr
        );
    }
    let mut client = ClientConfig {
        password: cfg.password.clone(),
        ..ClientConfig::default()
    };
    if let Some(n) = a.maxclients.or(f.maxclients) {
        if n == 0 {
            bail!("--maxclients must be at least 1");
        }
        client.max_clients = n;
    }
    client.idle_timeout = a
        .client_timeout
        .or(f.client_timeout)
        .filter(|&s| s > 0)
        .map(Duration::from_secs);
    if let Some(n) = a.client_output_limit.or(f.client_output_limit) {
        if n < 1024 {
            bail!("--client-output-limit must be at least 1024 bytes");
        }
        client.output_limit = n;
    }
    let tls_cert = a.client_tls_cert.or(f.client_tls_cert);
    let tls_key = a.client_tls_key.or(f.client_tls_key);
    let tls_ca = a.client_tls_ca.or(f.client_tls_ca);
    let join_dial = crate::backup::Dial {
        password: cfg.password.clone(),
        tls: match &a.join_tls_ca {
            Some(ca) => Some(crate::backup::DialTls::new(
                ca,
                tls_cert.as_deref().zip(tls_key.as_deref()),
                a.join_tls_server_name.clone(),
            )?),
            None => None,
        },
    };
    client.tls = match (tls_cert, tls_key) {
        (Some(c), Some(k)) => Some(
            crate::server::tls_config(&c, &k, tls_ca.as_deref())
                .map_err(|e| anyhow!("client TLS: {e}"))?,
        ),
        (None, None) if tls_ca.is_none() => None,
        _ => bail!("client TLS needs both --client-tls-cert and --client-tls-key"),
    };
    let shutdown_timeout = Duration::from_secs(
        a.shutdown_timeout_secs
            .or(f.shutdown_timeout_secs)
            .unwrap_or(EXIT_GRACE.as_secs())
            .max(1),
    );
    Ok(Setup {
        node: cfg,
        client,
        metrics_addr: a.metrics_addr.or(f.metrics_addr),
        shutdown_timeout,
        join_dial,
        threads,
    })
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A running client port (and metrics endpoint). Dropping it leaves them
/// running; [`Serving::abort`] or [`Serving::drain`] stops them.
#[derive(Debug)]
#[must_use = "dropping it leaves the client port running with no way to stop it"]
pub struct Serving {
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Serving {
    /// Stops at once: no more clients, open connections closed, the
    /// metrics endpoint stopped.
    pub fn abort(&self) {
        self.task.abort();
    }

    /// Stops accepting clients, lets connections answer what they have read
    /// (idle ones close at once), and waits up to `within` for them.
    /// Returns whether every connection closed in time.
    pub async fn drain(mut self, within: Duration) -> bool {
        let _ = self.stop.send(true);
        match tokio::time::timeout(within, &mut self.task).await {
            Ok(_) => true,
            Err(_) => {
                // What is left is closed: the node is about to stop.
                self.task.abort();
                false
            }
        }
    }
}

/// Starts a node and its client listener, with the client port's defaults.
pub async fn run_node(cfg: NodeConfig) -> anyhow::Result<(Arc<KvNode>, Serving)> {
    run_node_with(cfg, ClientConfig::default(), None).await
}

/// Starts a node, its client listener (`client`, whose password is taken
/// from `cfg.password`) and, with an address, its metrics endpoint.
pub async fn run_node_with(
    cfg: NodeConfig,
    mut client: ClientConfig,
    metrics_addr: Option<SocketAddr>,
) -> anyhow::Result<(Arc<KvNode>, Serving)> {
    let listener = tokio::net::TcpListener::bind(cfg.client_addr)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.client_addr))?;
    let metrics = match metrics_addr {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen on {a} (--metrics-addr)"))?,
        ),
        None => None,
    };
    client.password = cfg.password.clone();
    let node = KvNode::start(cfg).await?;
    let (n, m) = (node.clone(), node.metrics().clone());
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        // Stopped with the client port, however that ends (aborted too).
        let _http =
            metrics.map(|l| AbortOnDrop(tokio::spawn(crate::metrics::serve_http(l, n.clone()))));
        crate::server::serve(listener, n, client, m, stop_rx).await;
    });
    Ok((node, Serving { task, stop }))
}

/// Sends one administration command to a member and prints its answer.
async fn admin(
    addr: &str,
    how: &crate::backup::Dial,
    name: &str,
    args: impl IntoIterator<Item = String>,
    prefix: &str,
) -> anyhow::Result<()> {
    let cmd: Vec<String> = std::iter::once(name.to_string()).chain(args).collect();
    let reply = crate::backup::call(addr, how, &cmd).await?;
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

/// Exit status: the node stopped itself because Raft stopped (a failed
/// disk or state machine, or its storage refused by the cluster).
pub const EXIT_RAFT_STOPPED: u8 = 3;
/// Set once a node's shutdown finished: the exit timer stands down.
static SHUT_DOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Exit status: a shutdown did not finish within its bound.
pub const EXIT_SHUTDOWN_TIMEOUT: u8 = 4;

/// An error that exits with a status of its own (not 1).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct ExitWith {
    code: u8,
    message: String,
}

/// Runs the command line and turns an error into a message and an exit
/// status: 1 for errors, 2 for command-line usage errors (clap's),
/// [`EXIT_RAFT_STOPPED`] and [`EXIT_SHUTDOWN_TIMEOUT`].
pub fn run() -> std::process::ExitCode {
    match main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("raft-kv: error: {e:#}");
            match e.downcast_ref::<ExitWith>() {
                Some(x) => std::process::ExitCode::from(x.code),
                None => std::process::ExitCode::FAILURE,
            }
        }
    }
}

/// Entry point of the `raft-kv` binary.
pub fn main() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        // Colour codes only where a terminal shows them, never in a file or
        // a journal.
        LogFormat::Text => {
            use std::io::IsTerminal;
            logs.with_ansi(std::io::stderr().is_terminal()).init()
        }
    }
    // A node's options choose its runtime, so they are read first.
    let mut prepared = None;
    let rt = if let Command::Node(args) = &mut cli.command {
        let setup = node_setup(std::mem::take(args), true)?;
        let rt = node_runtime(setup.threads)?;
        prepared = Some(setup);
        rt
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    };
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
            Command::Node(_) => {
                let Setup {
                    node: cfg,
                    client,
                    metrics_addr,
                    shutdown_timeout,
                    join_dial,
                    threads: _,
                } = prepared.ok_or_else(|| anyhow!("the node's options were not read"))?;
                let join = cfg.join.clone().map(|a| (a, cfg.raft_addr, join_dial));
                let (node, serving) = run_node_with(cfg, client, metrics_addr).await?;
                if let Some((at, raft_addr, how)) = join {
                    let node = node.clone();
                    tokio::spawn(async move {
                        if let Err(e) = crate::backup::join(&at, &node, raft_addr, &how).await
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
                // From here on the process exits within the bound, whatever
                // the disk does: a plain thread, so it fires even if every
                // runtime thread is stuck in a storage call.
                // (A node that stopped because its disk failed may hang in
                // that disk while closing its stores: it still exits with
                // the reason and status 3.)
                let (code, why) = match &failed {
                    Some(why) => (EXIT_RAFT_STOPPED, format!("the node stopped: {why}; ")),
                    None => (EXIT_SHUTDOWN_TIMEOUT, String::new()),
                };
                std::thread::spawn(move || {
                    std::thread::sleep(shutdown_timeout);
                    if SHUT_DOWN.load(std::sync::atomic::Ordering::Acquire) {
                        return;
                    }
                    eprintln!(
                        "raft-kv: error: {why}shutdown did not finish within {shutdown_timeout:?} (storage hung?); exiting"
                    );
                    std::process::exit(i32::from(code));
                });
                if failed.is_none() {
                    tracing::info!("stopping: no new clients; answering requests in flight");
                    // A leader hands over first: writes pause for an
                    // election's round trips, not an election timeout. The
                    // requests in flight are answered meanwhile (forwarded
                    // to the new leader).
                    let drained = serving.drain(shutdown_timeout / 2);
                    let (handed, drained) = tokio::join!(node.hand_over(), drained);
                    if let Some(pause) = handed {
                        eprintln!("raft-kv: leadership handed over in {} ms", pause.as_millis());
                    }
                    if !drained {
                        tracing::warn!("some clients were still being answered at shutdown");
                    }
                } else {
                    serving.abort();
                }
                if let Some(why) = &failed {
                    tracing::error!(reason = %why, "raft stopped; shutting the node down");
                }
                node.shutdown().await;
                drop(node);
                SHUT_DOWN.store(true, std::sync::atomic::Ordering::Release);
                match failed {
                    Some(why) => Err(ExitWith {
                        code: EXIT_RAFT_STOPPED,
                        message: format!("the node stopped: {why}"),
                    }
                    .into()),
                    None => Ok(()),
                }
            }
            Command::Demo { nodes, data_dir } => demo(nodes, data_dir).await,
            Command::Bench(b) => crate::bench::run(b).await,
            Command::Backup { out, dial } => {
                let (addr, how) = dial.dial()?;
                let h = crate::backup::backup(&addr, &out, &how).await?;
                println!(
                    "backup of {} keys at log index {} (term {}) written to {}",
                    h.keys,
                    h.index,
                    h.term,
                    out.display()
                );
                Ok(())
            }
            Command::Member { dial, args } => {
                let (addr, how) = dial.dial()?;
                admin(&addr, &how, "RAFT.MEMBER", args, "").await
            }
            Command::Transfer { dial, to } => {
                let (addr, how) = dial.dial()?;
                let to = to.map(|t| t.to_string());
                admin(&addr, &how, "RAFT.TRANSFER", to, "leader: node ").await
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
    let dir = match data_dir {
        Some(d) => d,
        None => {
            // A new directory only its owner can enter: never one that
            // someone else created in the shared temporary directory.
            let d = std::env::temp_dir().join(format!(
                "raft-kv-demo-{}-{:08x}",
                std::process::id(),
                fastrand::u32(..)
            ));
            let mut b = std::fs::DirBuilder::new();
            #[cfg(unix)]
            {
                use std::os::unix::fs::DirBuilderExt;
                b.mode(0o700);
            }
            b.create(&d)
                .with_context(|| format!("cannot create {}", d.display()))?;
            d
        }
    };
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
            log_engine: LogEngine::Auto,
            flush_every: DEFAULT_FLUSH_EVERY,
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
    fn the_password_comes_from_one_source_in_a_fixed_order_and_is_never_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\nignored\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let s = |x: &str| Some(x.to_string());
        let f = || Some(file.clone());
        let pick = |a, b, c, d, e| choose_password(a, b, c, d, e);
        assert_eq!(
            pick(s("flag"), None, s("env"), f(), None).unwrap(),
            s("flag")
        );
        assert_eq!(
            pick(None, f(), s("env"), None, s("conf")).unwrap(),
            s("from-file")
        );
        assert_eq!(pick(None, None, s("env"), f(), None).unwrap(), s("env"));
        assert_eq!(pick(None, None, None, f(), None).unwrap(), s("from-file"));
        assert_eq!(pick(None, None, None, None, s("conf")).unwrap(), s("conf"));
        assert_eq!(pick(None, None, None, None, None).unwrap(), None);
        assert!(pick(None, None, None, f(), s("conf"))
            .unwrap_err()
            .to_string()
            .contains("keep one"));
        for empty in [
            pick(s(""), None, None, None, None),
            pick(None, None, s(""), None, None),
            pick(None, None, None, None, s("")),
        ] {
            assert!(empty.unwrap_err().to_string().contains("empty"));
        }
        std::fs::write(&file, "\n").unwrap();
        assert!(pick(None, f(), None, None, None).is_err());
    }

    #[test]
    fn the_example_config_file_is_valid() {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/node.toml.example"
        );
        let text = std::fs::read_to_string(p).unwrap();
        let f: FileConfig = toml::from_str(&text).unwrap();
        assert_eq!(f.id, Some(1));
        assert!(f.password_file.is_some() && f.metrics_addr.is_some());
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
            commit_notice_ms: Some(0),
            ..Default::default()
        };
        let cfg = node_config(args).unwrap();
        assert_eq!(cfg.peers.len(), 2);
        assert_eq!(cfg.raft.heartbeat_interval, Duration::from_millis(50));
        assert_eq!(cfg.raft.commit_notice_delay, Duration::ZERO);
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
        assert_eq!(cfg.log_engine, LogEngine::Auto, "the default engine");
        let engine = |e: &str| NodeArgs {
            id: Some(1),
            raft_addr: Some("127.0.0.1:7101".parse().unwrap()),
            client_addr: Some("127.0.0.1:7001".parse().unwrap()),
            data_dir: Some("d".into()),
            tls_dir: Some("t".into()),
            log_engine: Some(e.into()),
            ..Default::default()
        };
        assert_eq!(
            node_config(engine("wal")).unwrap().log_engine,
            LogEngine::Wal
        );
        let err = node_config(engine("rocks")).unwrap_err().to_string();
        assert!(err.contains("expected `auto`, `sled` or `wal`"), "{err}");
        // `auto` follows what the log directory holds.
        let tmp = tempfile::tempdir().unwrap();
        let (new, sled, wal) = (
            tmp.path().join("new"),
            tmp.path().join("sled"),
            tmp.path().join("wal"),
        );
        std::fs::create_dir_all(&sled).unwrap();
        std::fs::write(sled.join("conf"), b"").unwrap();
        std::fs::write(sled.join("db"), b"").unwrap();
        drop(raft_log_wal::WalLogStore::open(&wal).unwrap());
        assert_eq!(LogEngine::Auto.resolve(&new), LogEngine::Wal);
        assert_eq!(LogEngine::Auto.resolve(&sled), LogEngine::Sled);
        assert_eq!(LogEngine::Auto.resolve(&wal), LogEngine::Wal);
        assert_eq!(LogEngine::Sled.resolve(&new), LogEngine::Sled);
        assert_eq!(LogEngine::Wal.resolve(&sled), LogEngine::Wal);
        let flush = |ms: Option<u64>| NodeArgs {
            flush_every_ms: ms,
            ..required_args()
        };
        assert_eq!(
            node_config(flush(None)).unwrap().flush_every,
            DEFAULT_FLUSH_EVERY
        );
        assert_eq!(
            node_config(flush(Some(250))).unwrap().flush_every,
            Duration::from_millis(250)
        );
        for bad in [0, 3_600_001] {
            let err = node_config(flush(Some(bad))).unwrap_err().to_string();
            assert!(err.contains("expected 1 to 3600000"), "{err}");
        }
    }

    /// The options a node cannot start without, and nothing else.
    fn required_args() -> NodeArgs {
        NodeArgs {
            id: Some(1),
            raft_addr: Some("127.0.0.1:7101".parse().unwrap()),
            client_addr: Some("127.0.0.1:7001".parse().unwrap()),
            data_dir: Some("d".into()),
            tls_dir: Some("t".into()),
            ..Default::default()
        }
    }

    #[test]
    fn threads_default_to_half_the_cores_and_out_of_range_is_refused() {
        let args = |threads: Option<usize>| NodeArgs {
            threads,
            ..required_args()
        };
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(
            node_setup(args(None), false).unwrap().threads,
            (cores / 2).max(1)
        );
        assert_eq!(node_setup(args(Some(1)), false).unwrap().threads, 1);
        assert_eq!(node_setup(args(Some(3)), false).unwrap().threads, 3);
        for bad in [0, MAX_THREADS + 1] {
            let err = node_setup(args(Some(bad)), false).unwrap_err().to_string();
            assert!(err.contains("expected 1 to 1024"), "{err}");
        }
        // The file's value is taken when the command line gives none.
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("node.toml");
        std::fs::write(&conf, "threads = 2\n").unwrap();
        let from_file = NodeArgs {
            config: Some(conf),
            ..args(None)
        };
        assert_eq!(node_setup(from_file, false).unwrap().threads, 2);
        // Both runtimes a node may get run tasks.
        for n in [1, 2] {
            let rt = node_runtime(n).unwrap();
            assert_eq!(
                rt.block_on(async { tokio::spawn(async { 7 }).await.unwrap() }),
                7
            );
        }
    }
}
