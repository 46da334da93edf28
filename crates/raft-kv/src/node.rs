//! The Raft adapter: a store node is raft-core's [`Raft`] on any log store
//! and any transport, the state machine fed by its apply channel, writes
//! proposed on the leader or forwarded to it through the transport's
//! [`PeerRpc`] channel, and linearizable reads behind a read barrier.
//!
//! A write goes one way: [`KvNode::write`] proposes it with
//! [`Raft::propose`], whose waiter travels with the entry; the apply loop
//! answers the entry's responder with the state machine's result, and that
//! result is the client's reply.

use crate::command::{AdminCmd, ReadCmd, Value, WriteCmd};
use crate::error::{KvError, Reply};
use crate::forward::{Forward, ForwardReply};
use crate::sm::StateMachine;
use crate::snapshots::{SnapshotStats, Snapshots};
use raft_core::{
    ApplyMsg, Config as RaftConfig, Error as RaftError, InboundRpc, LogStore, NodeId, PeerRpc,
    Proposal, Raft, Responder, Role, RpcError, SnapshotMeta, Transport,
};
use raft_log::SledLogStore;
use raft_net_quic::{QuicConfig, QuicTransport, TlsMaterial};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Everything a node of the `raft-kv` binary needs: addresses, directories,
/// and the Raft settings (one [`raft_core::Config`], whose defaults are the
/// binary's defaults).
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// UDP address for Raft traffic (QUIC).
    pub raft_addr: SocketAddr,
    /// TCP address for Redis clients.
    pub client_addr: SocketAddr,
    /// Peer id -> Raft address (the peers' ids are `raft.peers`).
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// Where the log (`log/`), the state machine (`sm/`) and the snapshots
    /// (`snapshots/`) live.
    pub data_dir: PathBuf,
    /// Take a snapshot (and compact the log up to it) after this many
    /// applied entries; 0 for never.
    pub snapshot_threshold: u64,
    /// Where `ca.pem`, `node-<id>.pem` and `node-<id>.key` are.
    pub tls_dir: PathBuf,
    /// Clients must AUTH with this password when set.
    pub password: Option<String>,
    /// Nodes of different clusters refuse each other.
    pub cluster_id: u64,
    /// Start empty and ask the cluster whose client address this is to add
    /// this node (as a learner, then promoted once caught up).
    pub join: Option<String>,
    /// The Raft log's storage engine (in `log/`).
    pub log_engine: LogEngine,
    /// How often the state machine writes what it applied to disk, so the
    /// log can drop those entries. Longer: less disk work per write (a
    /// key rewritten in the interval reaches the disk once), more memory
    /// and more log to replay after a crash. Memory past 64 MiB of writes
    /// flushes sooner whatever this says.
    pub flush_every: Duration,
    /// The Raft settings; `raft.id` is this node's id. `raft.peers` is
    /// filled from `peers`.
    pub raft: RaftConfig,
}

/// Which crate keeps the Raft log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogEngine {
    /// The engine whose files `log/` holds; the segment log for a new node.
    #[default]
    Auto,
    /// `raft-log`: sled.
    Sled,
    /// `raft-log-wal`: append-only segment files.
    Wal,
}

impl LogEngine {
    /// The engine to open `log_dir` with: this one, or for `Auto` the one
    /// whose files the directory holds (sled's `conf` and `db`), and the
    /// segment log when it holds neither's.
    pub fn resolve(self, log_dir: &Path) -> LogEngine {
        match self {
            LogEngine::Auto if log_dir.join("conf").exists() || log_dir.join("db").exists() => {
                LogEngine::Sled
            }
            LogEngine::Auto => LogEngine::Wal,
            e => e,
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A store could not be opened.
    #[error("{0}")]
    Store(String),
    /// The transport could not be set up.
    #[error(transparent)]
    Net(#[from] raft_net_quic::NetError),
    /// Raft refused to start.
    #[error(transparent)]
    Raft(#[from] RaftError),
}

impl NodeConfig {
    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.raft.id
    }

    /// The Raft configuration this node runs with, validated (against the
    /// QUIC frame limit too), with the peers' addresses checked.
    pub fn raft_config(&self) -> Result<RaftConfig, StartError> {
        let mut rc = self.raft.clone();
        rc.peers = self.peers.keys().copied().collect();
        rc.join = self.join.is_some();
        // Enough room for several of the largest entries.
        rc.max_unapplied_bytes = rc
            .max_unapplied_bytes
            .max(4 * rc.max_entry_bytes as u64 + 4096);
        let bad = |e: raft_core::ConfigError| StartError::Config(e.to_string());
        rc.validate().map_err(bad)?;
        rc.validate_for_transport(Some(QuicConfig::new(rc.id, self.raft_addr).max_frame_bytes))
            .map_err(bad)?;
        let mut seen: BTreeMap<SocketAddr, NodeId> = BTreeMap::new();
        for (&id, &addr) in &self.peers {
            if let Some(other) = seen.insert(addr, id) {
                return Err(StartError::Config(format!(
                    "peers {other} and {id} share the address {addr}"
                )));
            }
        }
        Ok(rc)
    }
}

/// How long a client request may wait for a leader to appear.
const LEADER_WAIT: Duration = Duration::from_secs(3);
/// How long a proposed write may take before its outcome is reported unknown.
const COMMIT_WAIT: Duration = Duration::from_secs(5);
/// How often the state machine is flushed (so the log can drop what it
/// covers) unless [`NodeConfig::flush_every`] says otherwise.
pub const DEFAULT_FLUSH_EVERY: Duration = Duration::from_secs(5);
/// How often the snapshot policy looks at the applied index.
const SNAPSHOT_CHECK: Duration = Duration::from_millis(200);
/// How long shutdown waits for the state machine's final flush.
const FLUSH_GRACE: Duration = Duration::from_secs(3);

/// The reply for a proposal Raft refused; nothing was proposed.
fn refused(e: &RaftError) -> KvError {
    match e {
        RaftError::Busy { .. } => KvError::NotApplied(e.to_string()),
        RaftError::Stopped(why) => KvError::Stopped(why.clone()),
        _ => KvError::Raft(e.to_string()),
    }
}

/// Waits for a proposal's result until `deadline`.
async fn settle(p: Proposal, deadline: tokio::time::Instant) -> Reply {
    match tokio::time::timeout_at(deadline, p.outcome::<Reply>()).await {
        Ok(Ok(Some(r))) => r,
        // Committed, but the answer was lost (the node stopped first).
        Ok(Ok(None)) => Err(KvError::Unknown("the node stopped before answering".into())),
        Ok(Err(RaftError::Overwritten { .. })) => Err(KvError::NotApplied(
            "the write was replaced after a leader change and not applied; try again".into(),
        )),
        Ok(Err(_)) => Err(KvError::Unknown("the node stopped".into())),
        Err(_) => Err(KvError::Unknown("timed out waiting for the commit".into())),
    }
}

/// A running store node.
pub struct KvNode {
    id: NodeId,
    raft: Raft,
    sm: Arc<StateMachine>,
    snaps: Snapshots,
    rpc: Arc<dyn PeerRpc>,
    /// The largest request a peer accepts: forwarded requests are cut to fit.
    frame_limit: usize,
    /// Why the state machine stopped applying, if it did.
    failure: Arc<Mutex<Option<String>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Raft addresses this node knows (its own and its configured peers'):
    /// recorded in the configuration when a member is added, so members
    /// that join later learn them from the log.
    addrs: Mutex<BTreeMap<NodeId, String>>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl std::fmt::Debug for KvNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvNode")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Finding the leader for a request: follows the hints the nodes asked
/// give, waits for a leader when there is none, and gives up once
/// `LEADER_WAIT` has passed. The first retry follows a hint at once; later
/// ones are paced (elections and hand-overs take a few round trips to
/// settle, and answers bounce meanwhile).
struct Route {
    hint: Option<NodeId>,
    tries: u32,
    deadline: tokio::time::Instant,
}

impl Route {
    fn new(hint: Option<NodeId>) -> Self {
        Route {
            hint,
            tries: 0,
            deadline: tokio::time::Instant::now() + LEADER_WAIT,
        }
    }

    /// The node to try next; `None` when time is up.
    async fn next(&mut self, node: &KvNode) -> Option<NodeId> {
        self.tries += 1;
        if self.tries > 2 {
            let pause = Duration::from_millis(u64::from(5 * self.tries).min(50));
            if tokio::time::Instant::now() + pause >= self.deadline {
                return None;
            }
            tokio::time::sleep(pause).await;
        }
        match self.hint {
            Some(l) => Some(l),
            None => {
                let left = self
                    .deadline
                    .saturating_duration_since(tokio::time::Instant::now());
                node.leader_within(left).await
            }
        }
    }

    /// `tried` does not lead (or could not be reached); `hint` is who it
    /// says does.
    fn redirect(&mut self, tried: NodeId, hint: Option<NodeId>) {
        self.hint = hint.filter(|&h| h != tried);
    }
}

impl KvNode {
    /// Opens the log (`cfg.log_engine`) and the state machine in `cfg.data_dir`, binds the
    /// QUIC transport and starts Raft: the `raft-kv` binary's node.
    pub async fn start(cfg: NodeConfig) -> Result<Arc<KvNode>, StartError> {
        let rc = cfg.raft_config()?;
        // Created readable by the owner only: it holds every value.
        raft_net_quic::tls::create_private_dir(&cfg.data_dir)
            .map_err(|e| StartError::Store(format!("{}: {e}", cfg.data_dir.display())))?;
        let tls = TlsMaterial::load_dir(&cfg.tls_dir, rc.id)?;
        let mut qc = QuicConfig::new(rc.id, cfg.raft_addr);
        qc.cluster_id = cfg.cluster_id;
        qc.peers = cfg.peers.clone();
        let transport = QuicTransport::bind(qc, &tls)?;
        let net = transport.stats();
        // Opening reads and checks the whole log: off the async threads.
        // Both engines use `log/`: each refuses the other's files, so a
        // node started with the wrong engine stops with an error rather
        // than coming up with an empty log.
        let log_dir = cfg.data_dir.join("log");
        let store_err = |e: raft_core::StorageError| StartError::Store(e.to_string());
        let engine = cfg.log_engine.resolve(&log_dir);
        tracing::info!(node = rc.id, ?engine, "opening the log");
        let node = match engine {
            LogEngine::Sled => {
                let log = SledLogStore::open_async(&log_dir)
                    .await
                    .map_err(store_err)?;
                Self::start_on(rc, &cfg, log, transport).await?
            }
            LogEngine::Wal | LogEngine::Auto => {
                let log = raft_log_wal::WalLogStore::open_async(&log_dir)
                    .await
                    .map_err(store_err)?;
                Self::start_on(rc, &cfg, log, transport).await?
            }
        };
        node.metrics.set_net(net);
        {
            let mut a = lock(&node.addrs);
            a.insert(node.id, cfg.raft_addr.to_string());
            for (&id, addr) in &cfg.peers {
                a.insert(id, addr.to_string());
            }
        }
        tracing::info!(node = node.id, raft = %cfg.raft_addr, client = %cfg.client_addr, "node started");
        Ok(node)
    }

    /// Starts a node on `log` with `cfg`'s state machine settings.
    async fn start_on(
        rc: RaftConfig,
        cfg: &NodeConfig,
        log: impl LogStore,
        transport: impl Transport,
    ) -> Result<Arc<KvNode>, StartError> {
        Self::start_flushing_every(
            rc,
            &cfg.data_dir,
            cfg.snapshot_threshold,
            cfg.flush_every,
            log,
            transport,
        )
        .await
    }

    /// Starts a node on any log store and any transport that carries
    /// application requests ([`Transport::rpc_endpoint`]); the state
    /// machine lives in `dir/sm`, the snapshots in `dir/snapshots`, and a
    /// snapshot is taken after `snapshot_threshold` applied entries when
    /// the log keeps that many already released ones for a member that
    /// lags (0: only when a follower needs one).
    pub async fn start_with(
        rc: RaftConfig,
        dir: &Path,
        snapshot_threshold: u64,
        store: impl LogStore,
        transport: impl Transport,
    ) -> Result<Arc<KvNode>, StartError> {
        Self::start_flushing_every(
            rc,
            dir,
            snapshot_threshold,
            DEFAULT_FLUSH_EVERY,
            store,
            transport,
        )
        .await
    }

    /// [`KvNode::start_with`], with the state machine flushed every
    /// `flush_every` (see [`NodeConfig::flush_every`]).
    pub async fn start_flushing_every(
        rc: RaftConfig,
        dir: &Path,
        snapshot_threshold: u64,
        flush_every: Duration,
        mut store: impl LogStore,
        mut transport: impl Transport,
    ) -> Result<Arc<KvNode>, StartError> {
        let endpoint = transport.rpc_endpoint().ok_or_else(|| {
            StartError::Config("the transport carries no requests between members".into())
        })?;
        let sm_path = dir.join("sm");
        let sm = Arc::new(
            tokio::task::spawn_blocking(move || open_or_set_aside(&sm_path))
                .await
                .map_err(|e| {
                    StartError::Store(format!("opening the state machine failed: {e}"))
                })??,
        );
        let snaps = Snapshots::open(&dir.join("snapshots"))
            .map_err(|e| StartError::Store(e.to_string()))?;
        report_lost_state(&mut store, &sm, &snaps).await?;
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let store = crate::metrics::TimedLog::new(store, metrics.clone());
        let frame_limit = endpoint.client.max_request_bytes().unwrap_or(64 << 20);
        let (apply_tx, apply_rx) = mpsc::channel::<ApplyMsg>(4096);
        let raft = Raft::with_snapshots(rc, store, snaps.clone(), transport, apply_tx)?;
        raft.start_with_applied(sm.applied()).await?;
        let failure = Arc::new(Mutex::new(None));
        let applier = tokio::spawn(apply_loop(
            apply_rx,
            sm.clone(),
            snaps.clone(),
            failure.clone(),
            raft.clone(),
        ));
        let releaser = tokio::spawn(release_loop(raft.clone(), sm.clone(), flush_every));
        let snapshotter = tokio::spawn(snapshot_loop(
            raft.clone(),
            sm.clone(),
            snaps.clone(),
            snapshot_threshold,
        ));
        let tasks = vec![applier, releaser, snapshotter];
        let node = Arc::new(KvNode {
            id: raft.config().id,
            raft,
            sm,
            snaps,
            rpc: endpoint.client,
            frame_limit,
            failure,
            tasks: Mutex::new(tasks),
            addrs: Mutex::new(BTreeMap::new()),
            metrics,
        });
        let watcher = node.metrics.watch_leader(&node);
        lock(&node.tasks).push(watcher);
        let server = tokio::spawn(serve_peers(Arc::downgrade(&node), endpoint.inbound));
        lock(&node.tasks).push(server);
        let reaper = tokio::spawn(expiry_loop(Arc::downgrade(&node)));
        lock(&node.tasks).push(reaper);
        Ok(node)
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// The Raft node underneath.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The last entry applied to the state machine.
    pub fn applied_index(&self) -> u64 {
        self.sm.applied()
    }

    /// Waits up to `within` until entry `index` is applied; whether it was.
    pub async fn wait_applied(&self, index: u64, within: Duration) -> bool {
        let mut applied = self.sm.watch_applied();
        timeout(within, applied.wait_for(|&a| a >= index))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The node's snapshot files.
    pub fn snapshots(&self) -> &Snapshots {
        &self.snaps
    }

    /// A backup: after a read barrier (so it holds every write
    /// acknowledged before the call), a snapshot of this node's state,
    /// written to a new file in the snapshot directory. The caller removes
    /// the file once it has sent it.
    pub async fn backup(&self) -> Result<(PathBuf, crate::sm::SnapshotInfo), KvError> {
        self.read_barrier().await?;
        let out = self.snaps.dir().join(format!(
            "backup-{}-{}.tmp",
            std::process::id(),
            fastrand::u64(..)
        ));
        let sm = self.sm.clone();
        let o2 = out.clone();
        let info = in_background(move || sm.write_snapshot(&o2))
            .await
            .map_err(|e| KvError::Internal(format!("snapshot task failed: {e}")))??;
        Ok((out, info))
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The state machine (read access).
    pub fn state_machine(&self) -> &StateMachine {
        &self.sm
    }

    /// Why this node stopped serving, once Raft has stopped (a failed disk,
    /// a failed state machine): every command then answers an error.
    pub fn stopped(&self) -> Option<String> {
        let raft = self.raft.stopped()?;
        // The state machine's own failure explains a closed apply channel.
        Some(lock(&self.failure).clone().unwrap_or(raft))
    }

    /// Waits until Raft stops on its own (not through `shutdown`), and
    /// returns why.
    pub async fn wait_stopped(&self) -> String {
        let mut st = self.raft.watch_status();
        let stopped = st.wait_for(|s| s.stopped.is_some()).await.is_ok();
        drop(st);
        if stopped {
            self.stopped().unwrap_or_else(|| "raft stopped".to_string())
        } else {
            "raft stopped".to_string()
        }
    }

    /// Stops Raft and the applier, and flushes the state machine. Bounded in
    /// time even when the disk hangs: the state machine's flush is given
    /// up after `FLUSH_GRACE` (the log re-delivers what it did not store).
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(node = self.id, error = %e, "raft stopped with an error");
        }
        let tasks = std::mem::take(&mut *lock(&self.tasks));
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        let sm = self.sm.clone();
        match timeout(FLUSH_GRACE, tokio::task::spawn_blocking(move || sm.flush())).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                tracing::warn!(node = self.id, error = %e, "state machine flush failed")
            }
            Ok(Err(e)) => {
                tracing::warn!(node = self.id, error = %e, "state machine flush failed")
            }
            Err(_) => tracing::error!(
                node = self.id,
                "state machine flush did not finish within {FLUSH_GRACE:?}; giving up"
            ),
        }
    }

    /// Waits up to `within` for a known leader.
    async fn leader_within(&self, within: Duration) -> Option<NodeId> {
        if let Some(l) = self.raft.leader() {
            return Some(l);
        }
        let mut st = self.raft.watch_status();
        let res = timeout(
            within,
            st.wait_for(|s| s.leader.is_some() || s.stopped.is_some()),
        )
        .await
        .ok()
        .and_then(|r| r.ok().and_then(|s| s.leader));
        res
    }

    /// Answers commands too large for the log at once (`Some`), and keeps
    /// the rest in order.
    fn check_sizes(&self, cmds: Vec<WriteCmd>) -> (Vec<Option<Reply>>, Vec<WriteCmd>) {
        let max = self.raft.max_command_bytes();
        let stop = self.stopped();
        let mut early = Vec::with_capacity(cmds.len());
        let mut ok = Vec::with_capacity(cmds.len());
        for c in cmds {
            if let Some(why) = &stop {
                early.push(Some(Err(KvError::Stopped(why.clone()))));
                continue;
            }
            let size = c.entry_len();
            if size > max {
                early.push(Some(Err(KvError::TooLarge { size, max })));
            } else {
                early.push(None);
                ok.push(c);
            }
        }
        (early, ok)
    }

    /// Runs writes in order, one reply per command: on the leader as one
    /// batch of proposals, elsewhere forwarded to it (in requests that fit
    /// the transport's frames). The one way a write enters the store.
    pub async fn write(&self, cmds: Vec<WriteCmd>) -> Vec<Reply> {
        if cmds.is_empty() {
            return Vec::new();
        }
        let (early, ok) = self.check_sizes(cmds);
        let done = self.write_checked(ok).await;
        merge(early, done, || {
            Err(KvError::Internal("lost a reply".into()))
        })
    }

    /// `write` for commands that passed `check_sizes`.
    async fn write_checked(&self, ok: Vec<WriteCmd>) -> Vec<Reply> {
        let mut done = Vec::with_capacity(ok.len());
        // Each forwarded request stays well inside one frame.
        let budget = self.frame_limit.saturating_sub(4096).max(1);
        let mut chunk = Vec::new();
        let mut bytes = 0;
        let mut chunks: Vec<Vec<WriteCmd>> = Vec::new();
        for c in ok {
            let size = c.encoded_len();
            if !chunk.is_empty() && bytes + size > budget {
                chunks.push(std::mem::take(&mut chunk));
                bytes = 0;
            }
            bytes += size;
            chunk.push(c);
        }
        if !chunk.is_empty() {
            chunks.push(chunk);
        }
        let mut failed = false;
        for chunk in chunks {
            if failed {
                // Never sent: later writes must not overtake one whose
                // outcome is unknown or that was refused.
                done.extend(chunk.iter().map(|_| {
                    Err(KvError::NotApplied(
                        "not sent: an earlier write of this pipeline failed".into(),
                    ))
                }));
                continue;
            }
            let outcomes = self.write_chunk(chunk).await;
            failed = outcomes
                .iter()
                .any(|o| o.as_ref().is_err_and(KvError::stops_pipeline));
            done.extend(outcomes);
        }
        done
    }

    async fn write_chunk(&self, cmds: Vec<WriteCmd>) -> Vec<Reply> {
        let n = cmds.len();
        let mut request = None;
        let mut route = Route::new(self.raft.leader());
        while let Some(leader) = route.next(self).await {
            if leader == self.id {
                let t = std::time::Instant::now();
                match self.propose_local(&cmds).await {
                    Ok(replies) => {
                        self.metrics.proposals.inc_by(n as u64);
                        self.metrics
                            .commit_latency
                            .observe(t.elapsed().as_secs_f64());
                        return replies;
                    }
                    Err(h) => route.redirect(leader, h),
                }
                continue;
            }
            let req = request.get_or_insert_with(|| Forward::Writes(cmds.clone()));
            match self.forward(leader, req).await {
                Ok(ForwardReply::Replies(v)) if v.len() == n => return v,
                Ok(ForwardReply::NotLeader(h)) => route.redirect(leader, h),
                Ok(_) => {
                    return vec![
                        Err(KvError::Internal("unexpected reply from the leader".into()));
                        n
                    ]
                }
                Err(RpcError::Unreachable(_)) | Err(RpcError::UnknownPeer(_)) => {
                    route.redirect(leader, None)
                }
                Err(RpcError::Broken(_, why)) => return vec![Err(KvError::Unknown(why)); n],
            }
        }
        vec![Err(KvError::NoLeader); n]
    }

    /// Sends a request to the node believed to lead. Gives up as soon as this
    /// node stops believing `to` leads (it died, or lost an election): waiting
    /// for the transport to notice a dead peer would take seconds.
    async fn forward(&self, to: NodeId, f: &Forward) -> Result<ForwardReply, RpcError> {
        let mut status = self.raft.watch_status();
        // A leader that steps down may still answer: its entries commit
        // under the next leader (a hand-over waits until the next one holds
        // them). Give it an election timeout before calling the outcome
        // unknown; a dead one is not waited for longer than that.
        let grace = self.raft.config().election_timeout_max;
        let deposed = async move {
            let _ = status.wait_for(|s| s.leader != Some(to)).await;
            tokio::time::sleep(grace).await;
        };
        let bytes = f.encode();
        tokio::select! {
            r = timeout(COMMIT_WAIT + Duration::from_secs(1), self.rpc.call(to, bytes)) => match r {
                Ok(Ok(bytes)) => ForwardReply::decode(&bytes).ok_or_else(|| RpcError::Broken(to, "undecodable reply".into())),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(RpcError::Broken(to, "timed out".into())),
            },
            _ = deposed => Err(RpcError::Broken(to, "the leader changed while the request was in flight".into())),
        }
    }

    /// Proposes the commands in order as one batch on this node and waits
    /// for their results. `Err` with the leader hint when this node does not lead.
    async fn propose_local(&self, cmds: &[WriteCmd]) -> Result<Vec<Reply>, Option<NodeId>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        // Every write carries this leader's time: expiry on every node is
        // decided by it, never by a node's own clock.
        let now = wall_clock_ms();
        let encoded = cmds.iter().map(|c| c.encode_at(now)).collect();
        let proposals = match self.raft.propose(encoded).await {
            Ok(p) => p,
            Err(RaftError::NotLeader { leader }) => return Err(leader),
            Err(RaftError::Transferring { to }) => {
                // Handing leadership over: wait (at most an election
                // timeout or two) for it to move, then the caller retries
                // on the new leader. Nothing was proposed.
                let mut status = self.raft.watch_status();
                let _ = timeout(
                    self.raft.config().election_timeout_max * 2,
                    status.wait_for(|s| s.transferring_to.is_none()),
                )
                .await;
                return Err(Some(to));
            }
            Err(e) => return Ok(vec![Err(refused(&e)); cmds.len()]),
        };
        // One deadline for the batch: a slow entry does not multiply the wait.
        let deadline = tokio::time::Instant::now() + COMMIT_WAIT;
        let mut out = Vec::with_capacity(proposals.len());
        for p in proposals {
            out.push(settle(p, deadline).await);
        }
        Ok(out)
    }

    async fn handle_forward(&self, from: NodeId, f: Forward) -> ForwardReply {
        tracing::trace!(node = self.id, from, ?f, "forwarded request");
        if self.stopped().is_some() {
            // Let the asking node look for a leader that is alive.
            return ForwardReply::NotLeader(None);
        }
        match f {
            Forward::Writes(cmds) => {
                // Each command is checked against this node's limit, so one
                // too large does not get the others refused with it.
                let (early, ok) = self.check_sizes(cmds);
                match self.propose_local(&ok).await {
                    Ok(done) => ForwardReply::Replies(merge(early, done, || {
                        Err(KvError::Internal("lost a reply".into()))
                    })),
                    Err(hint) => ForwardReply::NotLeader(hint),
                }
            }
            Forward::Admin(cmd) => match self.admin_local(&cmd).await {
                Err(KvError::NotLeaderHint(h)) => ForwardReply::NotLeader(h),
                r => ForwardReply::Admin(r),
            },
            Forward::ReadIndex => match self.raft.read_index().await {
                Ok(i) => ForwardReply::ReadIndex(i),
                Err(RaftError::NotLeader { leader }) => ForwardReply::NotLeader(leader),
                Err(_) => ForwardReply::NotLeader(None),
            },
        }
    }

    /// Waits until reading local state is linearizable: a read index from the
    /// leader (confirmed by a heartbeat round), then local apply up to it.
    async fn read_barrier(&self) -> Result<(), KvError> {
        let mut route = Route::new(self.raft.leader());
        let mut index = None;
        while let Some(leader) = route.next(self).await {
            if leader == self.id {
                match timeout(COMMIT_WAIT, self.raft.read_index()).await {
                    Ok(Ok(i)) => index = Some(i),
                    Ok(Err(RaftError::NotLeader { leader: h })) => {
                        route.redirect(leader, h);
                        continue;
                    }
                    _ => return Err(KvError::NoLeader),
                }
            } else {
                match self.forward(leader, &Forward::ReadIndex).await {
                    Ok(ForwardReply::ReadIndex(i)) => index = Some(i),
                    Ok(ForwardReply::NotLeader(h)) => {
                        route.redirect(leader, h);
                        continue;
                    }
                    _ => {
                        route.redirect(leader, None);
                        continue;
                    }
                }
            }
            break;
        }
        let index = index.ok_or(KvError::NoLeader)?;
        if self.wait_applied(index, COMMIT_WAIT).await {
            Ok(())
        } else {
            Err(KvError::NoLeader)
        }
    }

    /// For WATCH: an index such that every write applied after it is one
    /// this connection may not have seen, and every write up to it is one
    /// its reads will see (a read barrier, then the applied index here).
    pub async fn watch_index(&self) -> Result<u64, KvError> {
        if let Some(why) = self.stopped() {
            return Err(KvError::Stopped(why));
        }
        self.read_barrier().await?;
        Ok(self.sm.applied())
    }

    /// Runs a read linearizably: a read barrier, then one view of the
    /// applied state (all the keys of MGET or EXISTS, and DBSIZE, from the
    /// same batches), which batches being applied meanwhile never hold up.
    pub async fn read(&self, cmd: &ReadCmd) -> Reply {
        self.read_limited(cmd, usize::MAX).await
    }

    /// [`KvNode::read`] with a cap on the reply's size (the client output
    /// limit): a larger reply is `ReplyTooLarge`, found before it is built.
    pub async fn read_limited(&self, cmd: &ReadCmd, limit: usize) -> Reply {
        if let Some(why) = self.stopped() {
            return Err(KvError::Stopped(why));
        }
        self.read_barrier().await?;
        // A read view never waits for the applier (redb is MVCC); it may
        // read pages from disk, as any read may. One that may take long
        // runs on the blocking pool: the thread that runs Raft (the only
        // one, with `--threads 1`) must go on sending heartbeats.
        if cmd.is_cheap() {
            return self.sm.read_view(|v| v.read_limited(cmd, limit));
        }
        let sm = self.sm.clone();
        let cmd = cmd.clone();
        tokio::task::spawn_blocking(move || sm.read_view(|v| v.read_limited(&cmd, limit)))
            .await
            .unwrap_or_else(|e| Err(KvError::Internal(format!("the read failed: {e}"))))
    }

    /// Runs a cluster administration request: LIST here, the others on the
    /// leader (forwarded to it when this node does not lead).
    pub async fn admin(&self, cmd: AdminCmd) -> Reply {
        if cmd == AdminCmd::List {
            return Ok(self.member_list());
        }
        let first = self.raft.leader();
        // A forwarded request cut off (its leader stepped down, as a
        // transfer or the leader's own removal makes it do) may have been
        // carried out: never carry it out twice.
        let mut cut_off = false;
        let mut route = Route::new(first);
        while let Some(leader) = route.next(self).await {
            // (A transfer to the member that leads is done before it starts.)
            if cut_off || matches!(cmd, AdminCmd::Transfer(Some(_))) {
                if let Some(done) = self.admin_done(&cmd, first, leader).await {
                    return Ok(done);
                }
            }
            if leader == self.id {
                match self.admin_local(&cmd).await {
                    Err(KvError::NotLeaderHint(h)) => route.redirect(leader, h),
                    r => return r,
                }
                continue;
            }
            match self.forward(leader, &Forward::Admin(cmd.clone())).await {
                Ok(ForwardReply::Admin(r)) => return r,
                Ok(ForwardReply::NotLeader(h)) => route.redirect(leader, h),
                _ => {
                    cut_off = true;
                    route.redirect(leader, None);
                }
            }
        }
        Err(KvError::NoLeader)
    }

    /// After a cut-off attempt: `Some` when what `cmd` asks for holds
    /// already (this node's view of the configuration may lag the
    /// leader's by a heartbeat: it is given a moment to catch up).
    async fn admin_done(
        &self,
        cmd: &AdminCmd,
        first: Option<NodeId>,
        leader: NodeId,
    ) -> Option<Value> {
        if let AdminCmd::Transfer(to) = *cmd {
            let moved = to == Some(leader) || (to.is_none() && first.is_some_and(|f| f != leader));
            return moved.then_some(Value::Int(leader as i64));
        }
        let holds = |m: &raft_core::Membership| match *cmd {
            AdminCmd::Add { id, .. } => m.is_member(id),
            AdminCmd::Promote(id) => m.voters.contains(&id) && !m.is_joint(),
            AdminCmd::Demote(id) => m.learners.contains(&id) && !m.is_joint(),
            AdminCmd::Remove(id) => !m.is_member(id),
            AdminCmd::List | AdminCmd::Transfer(_) => false,
        };
        let mut status = self.raft.watch_status();
        let done = timeout(
            self.raft.config().election_timeout_max,
            status.wait_for(|s| holds(&s.membership)),
        )
        .await
        .ok()?
        .ok()?
        .membership
        .to_string();
        Some(Value::Bulk(done.into_bytes()))
    }

    /// An administration request on this node, which must lead.
    async fn admin_local(&self, cmd: &AdminCmd) -> Reply {
        use raft_core::{ChangeError, ChangeStep, Member};
        let steps = match cmd {
            AdminCmd::List => return Ok(self.member_list()),
            AdminCmd::Transfer(to) => {
                let to = timeout(
                    self.raft.config().election_timeout_max * 4,
                    self.raft.transfer_leadership(*to),
                )
                .await
                .map_err(|_| KvError::Raft("the transfer did not complete".into()))?;
                return match to {
                    Ok(id) => Ok(Value::Int(id as i64)),
                    Err(RaftError::NotLeader { leader }) => Err(KvError::NotLeaderHint(leader)),
                    Err(e) => Err(KvError::Raft(e.to_string())),
                };
            }
            AdminCmd::Add {
                id,
                addr,
                incarnation,
            } => {
                let mut steps = vec![ChangeStep::AddLearner {
                    id: *id,
                    member: Member {
                        addr: addr.clone(),
                        incarnation: *incarnation,
                    },
                }];
                // Record the addresses this node knows that the
                // configuration does not hold yet: the new member learns
                // where everyone is from the log.
                let m = self.raft.status().membership;
                for (&mid, a) in lock(&self.addrs).iter() {
                    if m.is_member(mid) && m.addr(mid).is_none() {
                        steps.push(ChangeStep::SetAddr {
                            id: mid,
                            addr: a.clone(),
                        });
                    }
                }
                steps
            }
            AdminCmd::Promote(id) => vec![ChangeStep::Promote(*id)],
            AdminCmd::Demote(id) => vec![ChangeStep::Demote(*id)],
            AdminCmd::Remove(id) => vec![ChangeStep::Remove(*id)],
        };
        // A change in flight (the leader recording identities, say)
        // finishes within a few round trips: retry a little.
        for _ in 0..50 {
            let r = timeout(COMMIT_WAIT, self.raft.change_membership(steps.clone())).await;
            match r {
                Err(_) => return Err(KvError::Unknown("the change did not commit in time".into())),
                Ok(Ok(m)) => return Ok(Value::Bulk(m.to_string().into_bytes())),
                Ok(Err(RaftError::NotLeader { leader })) => {
                    return Err(KvError::NotLeaderHint(leader))
                }
                Ok(Err(RaftError::Change(ChangeError::InProgress { .. }))) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Ok(Err(e)) => return Err(KvError::Raft(e.to_string())),
            }
        }
        Err(KvError::Raft(
            "another membership change is in flight; retry".into(),
        ))
    }

    /// RAFT.MEMBER LIST: one line per member.
    fn member_list(&self) -> Value {
        let s = self.raft.status();
        let m = &s.membership;
        let mut lines = Vec::new();
        for id in m.all_members() {
            let role = if m.voters.contains(&id) {
                "voter"
            } else if m.outgoing.contains(&id) {
                "outgoing"
            } else {
                "learner"
            };
            let leader = if s.leader == Some(id) { " leader" } else { "" };
            lines.push(Some(
                format!(
                    "{id} {role}{leader} addr={} identity={:x}",
                    m.addr(id).unwrap_or("-"),
                    m.incarnation(id)
                )
                .into_bytes(),
            ));
        }
        Value::Array(lines)
    }

    /// Hands leadership to another voter before this node stops (a no-op
    /// when it does not lead); returns how long writes were paused.
    pub async fn hand_over(&self) -> Option<Duration> {
        if !self.raft.is_leader() {
            return None;
        }
        let t0 = std::time::Instant::now();
        let r = timeout(
            self.raft.config().election_timeout_max * 4,
            self.raft.transfer_leadership(None),
        )
        .await;
        match r {
            Ok(Ok(to)) => {
                tracing::info!(
                    node = self.id,
                    to,
                    pause_ms = t0.elapsed().as_millis() as u64,
                    "leadership handed over"
                );
                Some(t0.elapsed())
            }
            _ => {
                tracing::warn!(
                    node = self.id,
                    "leadership hand-over failed; stopping anyway"
                );
                None
            }
        }
    }

    /// The storage identity of this node (for `RAFT.MEMBER ADD`).
    pub fn identity(&self) -> u64 {
        self.raft.status().incarnation
    }

    /// The `# Raft` section of INFO.
    pub fn info(&self) -> String {
        let s = self.raft.status();
        let role = match s.role {
            _ if s.stopped.is_some() => "stopped",
            Role::Leader => "leader",
            Role::Candidate | Role::PreCandidate => "candidate",
            Role::Follower => "follower",
        };
        let stopped_line = match &self.stopped() {
            Some(why) => format!("stopped_reason:{}\r\n", why.replace(['\r', '\n'], " ")),
            None => String::new(),
        };
        let members: Vec<String> = s.members.iter().map(|m| m.to_string()).collect();
        let learners: Vec<String> = s
            .membership
            .learners
            .iter()
            .map(|m| m.to_string())
            .collect();
        let membership_line = format!(
            "raft_voters:{}\r\nraft_learners:{}\r\nraft_joint:{}\r\nraft_change_in_flight:{}\r\nraft_identity:{:x}\r\n",
            s.membership.voters.iter().map(|m| m.to_string()).collect::<Vec<_>>().join(","),
            learners.join(","),
            u8::from(s.membership.is_joint()),
            s.change_in_flight.unwrap_or(0),
            s.incarnation,
        );
        let SnapshotStats {
            bytes,
            keys,
            last_duration_ms,
            ..
        } = self.snaps.stats();
        format!(
            "# Raft\r\nnode_id:{}\r\nrole:{role}\r\n{stopped_line}term:{}\r\nleader_id:{}\r\ncommit_index:{}\r\napplied_index:{}\r\nlast_log_index:{}\r\npurged_index:{}\r\nsnapshot_index:{}\r\nsnapshot_bytes:{bytes}\r\nsnapshot_keys:{keys}\r\nsnapshot_last_duration_ms:{last_duration_ms}\r\nunapplied_bytes:{}\r\nmax_entry_bytes:{}\r\nread_policy:{}\r\nmembers:{}\r\npeer_messages_dropped:{}\r\npeer_messages_sent:{}\r\n{membership_line}",
            s.id,
            s.term,
            s.leader.map_or_else(|| "none".to_string(), |l| l.to_string()),
            s.commit_index,
            self.sm.applied(),
            s.last_log_index,
            s.purged_index,
            s.snapshot_index,
            s.unapplied_bytes,
            self.raft.max_command_bytes(),
            match self.raft.config().read_policy {
                raft_core::ReadPolicy::ReadIndex => "index",
                raft_core::ReadPolicy::Lease => "lease",
            },
            members.join(","),
            self.metrics.peer_messages_dropped(),
            self.metrics.peer_messages_sent(),
        )
    }
}

/// Answers requests from other members until the node is gone.
async fn serve_peers(node: Weak<KvNode>, mut inbound: mpsc::Receiver<InboundRpc>) {
    while let Some(req) = inbound.recv().await {
        let node = node.clone();
        tokio::spawn(async move {
            let reply = match (node.upgrade(), Forward::decode(&req.request)) {
                (Some(n), Some(f)) => n.handle_forward(req.from, f).await,
                (None, _) => ForwardReply::NotLeader(None),
                (_, None) => ForwardReply::Replies(vec![Err(KvError::Internal(
                    "undecodable forwarded request".into(),
                ))]),
            };
            req.reply(reply.encode());
        });
    }
}

/// Puts answers back in command order: `early` holds the ones known before
/// proposing (`Some`), `rest` the others in order.
fn merge<T>(early: Vec<Option<T>>, rest: Vec<T>, lost: impl Fn() -> T) -> Vec<T> {
    let mut rest = rest.into_iter();
    early
        .into_iter()
        .map(|e| e.or_else(|| rest.next()).unwrap_or_else(&lost))
        .collect()
}

/// Flushes the state machine now and then and tells Raft how far it is
/// durable, so the log (in memory and on disk) can drop those entries. The
/// state machine is otherwise never flushed: until it is, the log is the
/// durable record of what it applied.
async fn release_loop(raft: Raft, sm: Arc<StateMachine>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut released = sm.applied();
    let mut failed = false;
    loop {
        if failed {
            // After a failure, wait the whole interval before trying again.
            tick.tick().await;
        } else {
            tokio::select! {
                _ = tick.tick() => {}
                () = sm.flush_wanted() => {}
            }
        }
        // Read before the flush: the flush covers at least this much.
        let applied = sm.applied();
        if applied == released {
            continue;
        }
        let flushing = sm.clone();
        let t0 = std::time::Instant::now();
        match tokio::task::spawn_blocking(move || flushing.flush()).await {
            Ok(Ok(())) => {
                failed = false;
                tracing::debug!(
                    ms = t0.elapsed().as_millis() as u64,
                    "state machine flushed"
                );
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "state machine flush failed; the log keeps its entries");
                failed = true;
                continue;
            }
            Err(_) => return,
        }
        if raft.release_applied(applied).await.is_err() {
            return;
        }
        released = applied;
    }
}

/// Milliseconds since the Unix epoch, by this node's clock.
pub(crate) fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How often the leader looks for keys whose expiry time has come.
const EXPIRY_TICK: Duration = Duration::from_millis(100);
/// Most keys one reaping entry removes.
const REAP_BATCH: usize = 1000;

/// On the leader, while any key has an expiry time: every `EXPIRY_TICK`,
/// proposes the removal of the keys whose time has come by its clock
/// (`WriteCmd::Reap`, which removes only those still expired when it is
/// applied). The entry also carries the leader's time like any write, so
/// the state machines' clock moves on even when nothing else is written:
/// a key becomes invisible to reads within about one tick of its expiry.
async fn expiry_loop(node: std::sync::Weak<KvNode>) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else {
            return;
        };
        if node.stopped().is_some() {
            return;
        }
        if !node.raft.is_leader() {
            continue;
        }
        let now = wall_clock_ms();
        let found = node.sm.read_view(|v| -> Result<_, KvError> {
            if !v.has_expiring_keys()? || v.clock() >= now {
                return Ok(None);
            }
            Ok(Some(v.expired_keys(now, REAP_BATCH)?))
        });
        match found {
            Ok(Some(keys)) => {
                let _ = node.write(vec![WriteCmd::Reap(keys)]).await;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot look for expired keys"),
        }
    }
}

/// Most committed entries applied in one state-machine batch.
const APPLY_BATCH: usize = 512;

/// A batch up to this many entries and bytes is applied on the applier's
/// own task instead of the blocking pool.
const INLINE_APPLY_ENTRIES: usize = 8;
const INLINE_APPLY_BYTES: usize = 64 << 10;

/// A batch's commands, decoded (`None`: Raft's own entry, or one that
/// does not decode, applied as a no-op), with the leader's time.
type Decoded = Vec<Option<(Option<u64>, WriteCmd)>>;

/// Decodes a batch's commands.
fn decode_batch(batch: &[ApplyMsg]) -> Decoded {
    batch
        .iter()
        .map(|m| {
            let cmd = if m.command_valid {
                WriteCmd::decode_entry(&m.command)
            } else {
                None
            };
            if m.command_valid && cmd.is_none() {
                tracing::error!(
                    index = m.command_index,
                    "undecodable command in the log; applying as a no-op"
                );
            }
            cmd
        })
        .collect()
}

/// Applies a decoded batch (blocking).
fn apply_decoded(
    sm: &StateMachine,
    batch: &[ApplyMsg],
    cmds: &Decoded,
) -> Result<Vec<Reply>, KvError> {
    let items: Vec<(u64, Option<u64>, Option<&WriteCmd>)> = batch
        .iter()
        .zip(cmds)
        .map(|(m, c)| match c {
            Some((at, cmd)) => (m.command_index, *at, Some(cmd)),
            None => (m.command_index, None, None),
        })
        .collect();
    sm.apply_entries(&items, batch.last().map(|m| m.command_term))
}

/// Applies committed entries in batches and answers each proposer waiting
/// here; loads a snapshot from the leader when the apply channel says so.
async fn apply_loop(
    mut rx: mpsc::Receiver<ApplyMsg>,
    sm: Arc<StateMachine>,
    snaps: Snapshots,
    failure: Arc<Mutex<Option<String>>>,
    raft: Raft,
) {
    let mut next: Option<ApplyMsg> = None;
    loop {
        let first = match next.take() {
            Some(m) => m,
            None => match rx.recv().await {
                Some(m) => m,
                None => return,
            },
        };
        if let Some(meta) = first.snapshot.clone() {
            if let Err(why) = load_snapshot(&sm, &snaps, &meta).await {
                return fail_applying(why, Vec::new(), &failure, &raft).await;
            }
            continue;
        }
        let mut batch: Vec<ApplyMsg> = Vec::with_capacity(APPLY_BATCH);
        batch.push(first);
        // Everything already delivered goes into the same transaction
        // (up to a snapshot, which waits for the next turn).
        while batch.len() < APPLY_BATCH {
            match rx.try_recv() {
                Ok(m) if m.snapshot.is_some() => {
                    next = Some(m);
                    break;
                }
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let responders: Vec<Option<Responder>> =
            batch.iter_mut().map(|m| m.responder.take()).collect();
        // A small batch of cheap writes (a client or two waiting, a light
        // load) is applied here: handing it to the blocking pool and back
        // takes longer than applying it. Larger ones, writes whose cost
        // grows with what is stored (collections, patterns, copies), and a
        // batch that must first flush block for longer: off the async
        // threads.
        let small = batch.len() <= INLINE_APPLY_ENTRIES
            && batch.iter().map(|m| m.command.len()).sum::<usize>() <= INLINE_APPLY_BYTES
            && !sm.apply_must_flush();
        let decoded = small.then(|| decode_batch(&batch));
        let cheap = decoded.as_ref().is_some_and(|cmds| {
            cmds.iter()
                .all(|c| c.as_ref().is_none_or(|(_, cmd)| cmd.is_cheap()))
        });
        let res = match decoded {
            Some(cmds) if cheap => Ok(apply_decoded(&sm, &batch, &cmds)),
            // Decoded already (a small batch, not all cheap) or not yet.
            decoded => {
                let sm2 = sm.clone();
                tokio::task::spawn_blocking(move || {
                    let cmds = decoded.unwrap_or_else(|| decode_batch(&batch));
                    apply_decoded(&sm2, &batch, &cmds)
                })
                .await
            }
        };
        let why = match res {
            Ok(Ok(replies)) => {
                for (r, reply) in responders.into_iter().zip(replies) {
                    if let Some(r) = r {
                        r.answer(reply);
                    }
                }
                continue;
            }
            Ok(Err(e)) => format!("the state machine failed: {e}"),
            Err(e) => format!("the state machine task failed: {e}"),
        };
        return fail_applying(why, responders, &failure, &raft).await;
    }
}

/// The state machine cannot go on: waiting clients learn at once that the
/// outcome is unknown, and Raft stops too (the node must not go on
/// looking healthy).
async fn fail_applying(
    why: String,
    responders: Vec<Option<Responder>>,
    failure: &Mutex<Option<String>>,
    raft: &Raft,
) {
    tracing::error!(error = %why, "stopping the node");
    *lock(failure) = Some(why.clone());
    for r in responders.into_iter().flatten() {
        r.answer::<Reply>(Err(KvError::Unknown(why.clone())));
    }
    let _ = raft.shutdown().await;
}

/// Replaces the state with the snapshot `meta` describes, from this node's
/// snapshot files (received from the leader, or its own).
async fn load_snapshot(
    sm: &Arc<StateMachine>,
    snaps: &Snapshots,
    meta: &SnapshotMeta,
) -> Result<(), String> {
    let keep = meta.last.index;
    let path = snaps.path(meta.last.index, meta.last.term);
    let t0 = std::time::Instant::now();
    let sm2 = sm.clone();
    let p2 = path.clone();
    let h = in_background(move || sm2.load_snapshot(&p2))
        .await
        .map_err(|e| format!("loading a snapshot failed: {e}"))?
        .map_err(|e| format!("loading the snapshot ending at {:?}: {e}", meta.last))?;
    if h.index != meta.last.index {
        return Err(format!(
            "the snapshot file for {:?} ends at {}",
            meta.last, h.index
        ));
    }
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let ms = t0.elapsed().as_millis() as u64;
    tracing::info!(index = h.index, keys = h.keys, bytes, ms, "snapshot loaded");
    snaps.record(
        SnapshotStats {
            index: h.index,
            bytes,
            keys: h.keys,
            last_duration_ms: ms,
        },
        keep,
    );
    Ok(())
}

/// Takes a snapshot once `threshold` entries were applied since the last
/// one and the log keeps that many the state machine has flushed and
/// released (a member lags; 0: never), and whenever Raft has
/// a follower to send one to and none to send: written from a
/// point-in-time view while writes go on, then reported to Raft, which
/// compacts the log up to it. While every member keeps up, the log is
/// compacted as the state machine flushes and keeps fewer than the
/// threshold: no snapshot is taken (it would cost a scan of the whole
/// state for nothing); a member that falls behind holds the log back, and
/// the snapshot then bounds it.
async fn snapshot_loop(raft: Raft, sm: Arc<StateMachine>, snaps: Snapshots, threshold: u64) {
    let mut tick = tokio::time::interval(SNAPSHOT_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let st = raft.status();
        let last = snaps.stats().index.max(st.snapshot_index);
        // Entries the state machine no longer needs (flushed and released)
        // that the log still keeps: a member lags and holds compaction
        // back. While all keep up this stays under the compaction step,
        // however long the state machine waits between flushes. (Both
        // indexes come from one status: the release and the compaction it
        // allows are one step of the engine.)
        let held = st.released_index.saturating_sub(st.purged_index);
        let due =
            threshold > 0 && sm.applied() >= last.saturating_add(threshold) && held >= threshold;
        if !(due || (st.snapshot_wanted && sm.applied() > last)) {
            continue;
        }
        let t0 = std::time::Instant::now();
        let tmp = snaps.temp_path();
        let sm2 = sm.clone();
        let t2 = tmp.clone();
        let info = match in_background(move || sm2.write_snapshot(&t2)).await {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "taking a snapshot failed");
                continue;
            }
            Err(_) => return,
        };
        let h = info.header;
        if h.term == 0 {
            // A state machine from before terms were recorded, with nothing
            // applied since it opened: its file could not be named.
            let _ = std::fs::remove_file(&tmp);
            continue;
        }
        if let Err(e) = snaps.publish(&tmp, h.index, h.term) {
            tracing::warn!(error = %e, "storing a snapshot failed");
            continue;
        }
        match raft.snapshot_taken(h.index).await {
            Ok(Some(meta)) if meta.last.term == h.term => {}
            Ok(Some(meta)) => {
                tracing::error!(file = ?(h.index, h.term), raft = ?meta.last, "snapshot term disagrees with the log");
            }
            Ok(None) => {}
            Err(_) => return,
        }
        let ms = t0.elapsed().as_millis() as u64;
        tracing::info!(
            index = h.index,
            keys = h.keys,
            bytes = info.bytes,
            ms,
            "snapshot taken"
        );
        snaps.record(
            SnapshotStats {
                index: h.index,
                bytes: info.bytes,
                keys: h.keys,
                last_duration_ms: ms,
            },
            raft.status().snapshot_index,
        );
    }
}

/// Runs bulk work (writing or loading a whole snapshot) on a thread of its
/// own at a lower scheduling priority, so that on a busy machine it yields
/// the CPU to the node's request and replication work.
async fn in_background<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("sm-snapshot".into())
        .spawn(move || {
            lower_priority();
            let _ = tx.send(f());
        })
        .map_err(|e| e.to_string())?;
    rx.await
        .map_err(|_| "the snapshot thread ended early".to_string())
}

/// Lowers the calling thread's priority (nice 10).
#[cfg(target_os = "linux")]
fn lower_priority() {
    // SAFETY: setpriority with PRIO_PROCESS and id 0 changes only the
    // calling thread's nice value on Linux; it reads no memory of ours.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
    if r != 0 {
        tracing::debug!("could not lower the snapshot thread's priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

/// Opens the state machine; one that cannot be opened (damaged) is moved
/// aside and replaced by an empty one, which the log or the leader's
/// snapshot fills again.
fn open_or_set_aside(path: &Path) -> Result<StateMachine, StartError> {
    match StateMachine::open(path) {
        Ok(sm) => Ok(sm),
        Err(e) => {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let aside = path.with_extension(format!("damaged-{stamp}"));
            tracing::error!(error = %e, aside = %aside.display(), "the state machine cannot be opened; setting it aside and rebuilding it");
            std::fs::rename(path, &aside)
                .map_err(|e2| StartError::Store(format!("{e}; moving it aside failed: {e2}")))?;
            StateMachine::open(path).map_err(|e| StartError::Store(e.to_string()))
        }
    }
}

/// A state machine behind the log's compaction point (its files were lost
/// or damaged) is rebuilt from this node's snapshot when it holds the one
/// the log names; otherwise Raft keeps the log (and replicates and votes
/// with it) while it waits for the leader's snapshot. Either way, say so.
async fn report_lost_state(
    store: &mut impl LogStore,
    sm: &StateMachine,
    snaps: &Snapshots,
) -> Result<(), StartError> {
    let state = store
        .load()
        .await
        .map_err(|e| StartError::Store(e.to_string()))?;
    if sm.applied() >= state.purged.index {
        return Ok(());
    }
    match &state.snapshot {
        Some(m)
            if m.last.index >= state.purged.index
                && snaps.path(m.last.index, m.last.term).is_file() =>
        {
            // Checked before it is relied on: a damaged one is set aside,
            // and the leader's snapshot is waited for instead.
            let path = snaps.path(m.last.index, m.last.term);
            let p2 = path.clone();
            match tokio::task::spawn_blocking(move || crate::snapfile::verify(&p2)).await {
                Ok(Ok(_)) => tracing::warn!(
                    applied = sm.applied(),
                    snapshot = m.last.index,
                    "the state machine is behind the log's compaction point; loading the local snapshot"
                ),
                res => {
                    let why = match res {
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => e.to_string(),
                        Ok(Ok(_)) => String::new(),
                    };
                    let aside = path.with_extension("damaged");
                    tracing::error!(file = %path.display(), error = %why, "the local snapshot is damaged; setting it aside and waiting for the leader's snapshot");
                    std::fs::rename(&path, &aside)
                        .map_err(|e| StartError::Store(format!("{}: {e}", path.display())))?;
                }
            }
        }
        _ => tracing::warn!(
            applied = sm.applied(),
            purged = state.purged.index,
            "the state machine is behind the log's compaction point and no local snapshot covers it; waiting for the leader's snapshot"
        ),
    }
    Ok(())
}
