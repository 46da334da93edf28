//! A store node: Raft (sled log, QUIC transport) + the sled state machine,
//! with writes forwarded to the leader and linearizable reads.

use crate::command::{decode, encode, Forward, ForwardReply, Outcome, WriteCmd};
use crate::sm::StateMachine;
use raft_core::node::{ApplyMsg, Config as RaftConfig, Error as RaftError, Raft};
use raft_core::{NodeId, Role, Term};
use raft_log::SledLogStore;
use raft_net_quic::{QuicConfig, QuicTransport, RpcClient, RpcError, TlsMaterial};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;

/// Everything a node needs to run.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id.
    pub id: NodeId,
    /// UDP address for Raft traffic (QUIC).
    pub raft_addr: SocketAddr,
    /// TCP address for Redis clients.
    pub client_addr: SocketAddr,
    /// Peer id -> Raft address.
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// Where the log (`log/`) and the state machine (`sm/`) live.
    pub data_dir: PathBuf,
    /// Where `ca.pem`, `node-<id>.pem` and `node-<id>.key` are.
    pub tls_dir: PathBuf,
    /// Leader heartbeat interval.
    pub heartbeat: Duration,
    /// Election timeout lower bound.
    pub election_min: Duration,
    /// Election timeout upper bound.
    pub election_max: Duration,
    /// Clients must AUTH with this password when set.
    pub password: Option<String>,
    /// Nodes of different clusters refuse each other.
    pub cluster_id: u64,
    /// Log entries dropped at a time once the state machine holds them.
    pub compact_threshold: u64,
    /// Largest encoded write command; larger ones are refused before they
    /// are proposed. With the message overhead it must fit the transport's
    /// frame limit (16 MiB).
    pub max_entry_bytes: usize,
}

impl NodeConfig {
    /// The Raft layer's configuration for this node, validated.
    pub fn raft_config(&self) -> Result<RaftConfig, raft_core::node::ConfigError> {
        let mut rc = RaftConfig::new(self.id);
        for (&p, a) in &self.peers {
            rc.add_peer(p, a.to_string())?;
        }
        rc.heartbeat_interval = self.heartbeat;
        rc.election_timeout_min = self.election_min;
        rc.election_timeout_max = self.election_max;
        rc.compact_threshold = self.compact_threshold;
        rc.max_entry_bytes = self.max_entry_bytes;
        // Enough room for several of the largest entries.
        rc.max_unapplied_bytes = rc
            .max_unapplied_bytes
            .max(4 * self.max_entry_bytes as u64 + 4096);
        rc.validate()?;
        rc.validate_for_transport(Some(
            QuicConfig::new(self.id, self.raft_addr).max_frame_bytes,
        ))?;
        Ok(rc)
    }
}

/// How long a client request may wait for a leader to appear.
const LEADER_WAIT: Duration = Duration::from_secs(3);
/// How long a proposed write may take before its outcome is reported unknown.
const COMMIT_WAIT: Duration = Duration::from_secs(5);
/// How often the state machine is flushed so the log can drop what it covers.
const RELEASE_EVERY: Duration = Duration::from_secs(1);
/// How long shutdown waits for the state machine's final flush.
const FLUSH_GRACE: Duration = Duration::from_secs(3);

fn try_again() -> Outcome {
    Outcome::Error("TRYAGAIN no leader is available; try again".into())
}

fn too_large(size: usize, max: usize) -> Outcome {
    Outcome::Error(format!(
        "ERR command too large: {size} bytes encoded, the limit is {max} bytes (max-entry-bytes); nothing was written"
    ))
}

fn stopped(why: &str) -> Outcome {
    Outcome::Error(format!(
        "ERR this node has stopped ({why}); it serves nothing until it is restarted"
    ))
}

/// The outcome for a proposal Raft refused; nothing was proposed.
fn refused(e: &RaftError) -> Outcome {
    match e {
        RaftError::Busy { .. } => Outcome::Error(format!("TRYAGAIN {e}")),
        RaftError::Stopped(why) => stopped(why),
        _ => Outcome::Error(format!("ERR {e}")),
    }
}

fn unknown(why: &str) -> Outcome {
    Outcome::Error(format!(
        "UNKNOWN the write's outcome is unknown ({why}); it may or may not have been applied"
    ))
}

/// A write in progress; see [`KvNode::begin_write`].
#[derive(Debug)]
pub enum Ticket {
    /// Finished.
    Done(Outcome),
    /// Proposed at this index; the outcome arrives when it is applied.
    Waiting(u64, oneshot::Receiver<Outcome>),
}

#[derive(Default)]
struct Waiters {
    pending: HashMap<u64, (Term, oneshot::Sender<Outcome>)>,
    /// Outcomes of recently applied entries, for waiters that register late.
    recent: BTreeMap<u64, (Term, Outcome)>,
}

/// A running store node.
pub struct KvNode {
    cfg: NodeConfig,
    raft: Raft,
    sm: Arc<StateMachine>,
    rpc: RpcClient,
    /// The largest frame a peer accepts: forwarded requests are cut to fit.
    frame_limit: usize,
    /// Why the state machine stopped applying, if it did.
    failure: Arc<Mutex<Option<String>>>,
    waiters: Arc<Mutex<Waiters>>,
    applier: Mutex<Option<tokio::task::JoinHandle<()>>>,
    releaser: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for KvNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvNode")
            .field("id", &self.cfg.id)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl KvNode {
    /// Opens the stores, binds the transport and starts Raft.
    pub async fn start(cfg: NodeConfig) -> anyhow::Result<Arc<KvNode>> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| anyhow::anyhow!("{}: {e}", cfg.data_dir.display()))?;
        // Opening reads and checks whole databases: off the async threads.
        let log = SledLogStore::open_async(cfg.data_dir.join("log")).await?;
        let sm_path = cfg.data_dir.join("sm");
        let sm = Arc::new(
            tokio::task::spawn_blocking(move || StateMachine::open(&sm_path))
                .await
                .map_err(|e| anyhow::anyhow!("opening the state machine failed: {e}"))??,
        );
        let tls = TlsMaterial::load_dir(&cfg.tls_dir, cfg.id)?;
        let mut qc = QuicConfig::new(cfg.id, cfg.raft_addr);
        qc.cluster_id = cfg.cluster_id;
        qc.peers = cfg.peers.clone();
        let transport = QuicTransport::bind(qc, &tls)?;
        let frame_limit = transport.max_frame_bytes();
        let rpc = transport.rpc_client();
        let slot: Arc<OnceLock<std::sync::Weak<KvNode>>> = Arc::new(OnceLock::new());
        let handler_slot = slot.clone();
        transport.set_rpc_handler(Arc::new(move |from, req| {
            let node = handler_slot.get().and_then(|w| w.upgrade());
            Box::pin(async move {
                let reply = match (node, decode::<Forward>(&req)) {
                    (Some(n), Some(f)) => n.handle_forward(from, f).await,
                    (None, _) => ForwardReply::NotLeader(None),
                    (_, None) => ForwardReply::Outcomes(vec![Outcome::Error(
                        "ERR undecodable forwarded request".into(),
                    )]),
                };
                encode(&reply)
            })
        }));
        let rc = cfg.raft_config()?;
        let (apply_tx, apply_rx) = mpsc::channel::<ApplyMsg>(4096);
        let raft = Raft::new(rc, log, transport, apply_tx)?;
        raft.start_with_applied(sm.applied()).await?;
        let waiters = Arc::new(Mutex::new(Waiters::default()));
        let failure = Arc::new(Mutex::new(None));
        let applier = tokio::spawn(apply_loop(
            apply_rx,
            sm.clone(),
            waiters.clone(),
            failure.clone(),
            raft.clone(),
        ));
        let releaser = tokio::spawn(release_loop(raft.clone(), sm.clone()));
        let node = Arc::new(KvNode {
            cfg,
            raft,
            sm,
            rpc,
            frame_limit,
            failure,
            waiters,
            applier: Mutex::new(Some(applier)),
            releaser: Mutex::new(Some(releaser)),
        });
        let _ = slot.set(Arc::downgrade(&node));
        tracing::info!(node = node.cfg.id, raft = %node.cfg.raft_addr, client = %node.cfg.client_addr, "node started");
        Ok(node)
    }

    /// The node's configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// The state machine (read access).
    pub fn state_machine(&self) -> &StateMachine {
        &self.sm
    }

    /// The Raft handle.
    pub fn raft(&self) -> &Raft {
        &self.raft
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
            tracing::warn!(node = self.cfg.id, error = %e, "raft stopped with an error");
        }
        let tasks = [lock(&self.releaser).take(), lock(&self.applier).take()];
        for t in tasks.into_iter().flatten() {
            t.abort();
            let _ = t.await;
        }
        let sm = self.sm.clone();
        match timeout(FLUSH_GRACE, tokio::task::spawn_blocking(move || sm.flush())).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                tracing::warn!(node = self.cfg.id, error = %e, "state machine flush failed")
            }
            Ok(Err(e)) => {
                tracing::warn!(node = self.cfg.id, error = %e, "state machine flush failed")
            }
            Err(_) => tracing::error!(
                node = self.cfg.id,
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

    /// Runs a write: on the leader directly, elsewhere forwarded to it.
    pub async fn write(&self, cmd: WriteCmd) -> Outcome {
        self.write_many(vec![cmd])
            .await
            .pop()
            .unwrap_or_else(|| Outcome::Error("ERR internal".into()))
    }

    /// Answers commands too large for the log at once (`Some`), and keeps
    /// the rest in order.
    fn check_sizes(&self, cmds: Vec<WriteCmd>) -> (Vec<Option<Outcome>>, Vec<WriteCmd>) {
        let max = self.raft.max_command_bytes();
        let stop = self.stopped();
        let mut early = Vec::with_capacity(cmds.len());
        let mut ok = Vec::with_capacity(cmds.len());
        for c in cmds {
            if let Some(why) = &stop {
                early.push(Some(stopped(why)));
                continue;
            }
            let size = c.encoded_len();
            if size > max {
                early.push(Some(too_large(size, max)));
            } else {
                early.push(None);
                ok.push(c);
            }
        }
        (early, ok)
    }

    /// Runs writes in order: on the leader as one batch, elsewhere forwarded
    /// to it (in requests that fit the transport's frames). Returns one
    /// outcome per command.
    pub async fn write_many(&self, cmds: Vec<WriteCmd>) -> Vec<Outcome> {
        let (early, ok) = self.check_sizes(cmds);
        let done = self.write_checked(ok).await;
        merge(early, done, || {
            Outcome::Error("ERR internal: lost an outcome".into())
        })
    }

    /// `write_many` for commands that passed `check_sizes`.
    async fn write_checked(&self, ok: Vec<WriteCmd>) -> Vec<Outcome> {
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
                    Outcome::Error(
                        "TRYAGAIN not sent: an earlier write of this pipeline failed".into(),
                    )
                }));
                continue;
            }
            let outcomes = self.write_chunk(chunk).await;
            failed = outcomes.iter().any(|o| {
                matches!(o, Outcome::Error(e) if e.starts_with("UNKNOWN") || e.starts_with("TRYAGAIN"))
            });
            done.extend(outcomes);
        }
        done
    }

    async fn write_chunk(&self, cmds: Vec<WriteCmd>) -> Vec<Outcome> {
        let n = cmds.len();
        let mut hint = self.raft.leader();
        for _ in 0..4 {
            let leader = match hint {
                Some(l) => l,
                None => match self.leader_within(LEADER_WAIT).await {
                    Some(l) => l,
                    None => return vec![try_again(); n],
                },
            };
            if leader == self.cfg.id {
                match self.propose_local(&cmds).await {
                    Ok(tickets) => return self.finish_all(tickets).await,
                    Err(h) => hint = h.filter(|&h| h != leader),
                }
                continue;
            }
            match self.forward(leader, Forward::Writes(cmds.clone())).await {
                Ok(ForwardReply::Outcomes(v)) if v.len() == n => return v,
                Ok(ForwardReply::NotLeader(h)) => hint = h.filter(|&h| h != leader),
                Ok(_) => {
                    return vec![
                        Outcome::Error(
                            "ERR internal: unexpected reply from the leader".into()
                        );
                        n
                    ]
                }
                Err(RpcError::Unreachable(_)) | Err(RpcError::UnknownPeer(_)) => hint = None,
                Err(RpcError::Broken(_, why)) => return vec![unknown(&why); n],
            }
        }
        vec![try_again(); n]
    }

    async fn finish_all(&self, tickets: Vec<Ticket>) -> Vec<Outcome> {
        let mut out = Vec::with_capacity(tickets.len());
        for t in tickets {
            out.push(self.finish(t).await);
        }
        out
    }

    /// Sends a request to the node believed to lead. Gives up as soon as this
    /// node stops believing `to` leads (it died, or lost an election): waiting
    /// for the transport to notice a dead peer would take seconds.
    async fn forward(&self, to: NodeId, f: Forward) -> Result<ForwardReply, RpcError> {
        let mut status = self.raft.watch_status();
        let deposed = async move {
            let _ = status.wait_for(|s| s.leader != Some(to)).await;
        };
        let bytes = encode(&f);
        tokio::select! {
            r = timeout(COMMIT_WAIT + Duration::from_secs(1), self.rpc.call(to, &bytes)) => match r {
                Ok(Ok(bytes)) => decode::<ForwardReply>(&bytes).ok_or_else(|| RpcError::Broken(to, "undecodable reply".into())),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(RpcError::Broken(to, "timed out".into())),
            },
            _ = deposed => Err(RpcError::Broken(to, "the leader changed while the request was in flight".into())),
        }
    }

    /// Proposes the commands in order as one batch on this node. `Err` with
    /// the leader hint when this node does not lead.
    async fn propose_local(&self, cmds: &[WriteCmd]) -> Result<Vec<Ticket>, Option<NodeId>> {
        let encoded = cmds.iter().map(WriteCmd::encode).collect();
        let ids = match self.raft.submit_batch(encoded).await {
            Ok(ids) => ids,
            Err(RaftError::NotLeader { leader }) => return Err(leader),
            Err(e) => {
                let o = refused(&e);
                return Ok(cmds.iter().map(|_| Ticket::Done(o.clone())).collect());
            }
        };
        let mut w = lock(&self.waiters);
        Ok(ids
            .into_iter()
            .map(|(index, term)| {
                if let Some((t, o)) = w.recent.get(&index) {
                    return Ticket::Done(if *t == term { o.clone() } else { overwritten() });
                }
                let (tx, rx) = oneshot::channel();
                w.pending.insert(index, (term, tx));
                Ticket::Waiting(index, rx)
            })
            .collect())
    }

    /// Starts writes without waiting for them: on the leader they are proposed
    /// now, as one batch and in order, and each ticket is redeemed with
    /// [`KvNode::finish`]; elsewhere they are forwarded to the leader in one
    /// request, which is waited for here.
    pub async fn begin_writes(&self, cmds: Vec<WriteCmd>) -> Vec<Ticket> {
        if cmds.is_empty() {
            return Vec::new();
        }
        let (early, ok) = self.check_sizes(cmds);
        let mut tickets = None;
        if self.raft.is_leader() && !ok.is_empty() {
            tickets = self.propose_local(&ok).await.ok();
        }
        let tickets = match tickets {
            Some(t) => t,
            None => self
                .write_checked(ok)
                .await
                .into_iter()
                .map(Ticket::Done)
                .collect(),
        };
        let early = early.into_iter().map(|e| e.map(Ticket::Done)).collect();
        merge(early, tickets, || {
            Ticket::Done(Outcome::Error("ERR internal: lost a write ticket".into()))
        })
    }

    /// Waits for a ticket's outcome.
    pub async fn finish(&self, t: Ticket) -> Outcome {
        match t {
            Ticket::Done(o) => o,
            Ticket::Waiting(index, rx) => match timeout(COMMIT_WAIT, rx).await {
                Ok(Ok(o)) => o,
                Ok(Err(_)) => unknown("the node stopped"),
                Err(_) => {
                    lock(&self.waiters).pending.remove(&index);
                    unknown("timed out waiting for the commit")
                }
            },
        }
    }

    async fn handle_forward(&self, from: NodeId, f: Forward) -> ForwardReply {
        tracing::trace!(node = self.cfg.id, from, ?f, "forwarded request");
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
                    Ok(tickets) => {
                        let done = self.finish_all(tickets).await;
                        ForwardReply::Outcomes(merge(early, done, || {
                            Outcome::Error("ERR internal: lost an outcome".into())
                        }))
                    }
                    Err(hint) => ForwardReply::NotLeader(hint),
                }
            }
            Forward::ReadIndex => match self.raft.read_index().await {
                Ok(i) => ForwardReply::ReadIndex(i),
                Err(RaftError::NotLeader { leader }) => ForwardReply::NotLeader(leader),
                Err(_) => ForwardReply::NotLeader(None),
            },
        }
    }

    /// Waits until reading local state is linearizable: a read index from the
    /// leader (confirmed by a heartbeat round), then local apply up to it.
    pub async fn read_barrier(&self) -> Result<(), Outcome> {
        let mut hint = self.raft.leader();
        for _ in 0..4 {
            let leader = match hint {
                Some(l) => l,
                None => self
                    .leader_within(LEADER_WAIT)
                    .await
                    .ok_or_else(try_again)?,
            };
            let index = if leader == self.cfg.id {
                match timeout(COMMIT_WAIT, self.raft.read_index()).await {
                    Ok(Ok(i)) => i,
                    Ok(Err(RaftError::NotLeader { leader })) => {
                        hint = leader;
                        continue;
                    }
                    _ => return Err(try_again()),
                }
            } else {
                match self.forward(leader, Forward::ReadIndex).await {
                    Ok(ForwardReply::ReadIndex(i)) => i,
                    Ok(ForwardReply::NotLeader(h)) => {
                        hint = h.filter(|&h| h != leader);
                        continue;
                    }
                    _ => {
                        hint = None;
                        continue;
                    }
                }
            };
            let mut applied = self.sm.watch_applied();
            let reached = timeout(COMMIT_WAIT, applied.wait_for(|&a| a >= index))
                .await
                .is_ok_and(|r| r.is_ok());
            return if reached { Ok(()) } else { Err(try_again()) };
        }
        Err(try_again())
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
        format!(
            "# Raft\r\nnode_id:{}\r\nrole:{role}\r\n{stopped_line}term:{}\r\nleader_id:{}\r\ncommit_index:{}\r\napplied_index:{}\r\nlast_log_index:{}\r\ncompacted_index:{}\r\nunapplied_bytes:{}\r\nmax_entry_bytes:{}\r\nmembers:{}\r\n",
            s.id,
            s.term,
            s.leader.map_or_else(|| "none".to_string(), |l| l.to_string()),
            s.commit_index,
            self.sm.applied(),
            s.last_log_index,
            s.compacted_index,
            s.unapplied_bytes,
            self.raft.max_command_bytes(),
            members.join(","),
        )
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

fn overwritten() -> Outcome {
    Outcome::Error(
        "TRYAGAIN the write was replaced after a leader change and not applied; try again".into(),
    )
}

/// Flushes the state machine now and then and tells Raft how far it is
/// durable, so the log (in memory and on disk) can drop those entries. The
/// state machine is otherwise never flushed: until it is, the log is the
/// durable record of what it applied.
async fn release_loop(raft: Raft, sm: Arc<StateMachine>) {
    let mut tick = tokio::time::interval(RELEASE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut released = sm.applied();
    loop {
        tick.tick().await;
        // Read before the flush: the flush covers at least this much.
        let applied = sm.applied();
        if applied == released {
            continue;
        }
        let flushing = sm.clone();
        match tokio::task::spawn_blocking(move || flushing.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "state machine flush failed; the log keeps its entries");
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

/// Most committed entries applied in one state-machine batch.
const APPLY_BATCH: usize = 512;

/// Decodes and applies one batch of committed entries (blocking: sled).
fn apply_batch(sm: &StateMachine, batch: &[ApplyMsg]) -> anyhow::Result<Vec<Outcome>> {
    let cmds: Vec<Option<WriteCmd>> = batch
        .iter()
        .map(|m| {
            let cmd = if m.command_valid {
                WriteCmd::decode(&m.command)
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
        .collect();
    let items: Vec<(u64, Option<&WriteCmd>)> = batch
        .iter()
        .zip(&cmds)
        .map(|(m, c)| (m.command_index, c.as_ref()))
        .collect();
    sm.apply_many(&items)
}

async fn apply_loop(
    mut rx: mpsc::Receiver<ApplyMsg>,
    sm: Arc<StateMachine>,
    waiters: Arc<Mutex<Waiters>>,
    failure: Arc<Mutex<Option<String>>>,
    raft: Raft,
) {
    while let Some(first) = rx.recv().await {
        let mut batch: Vec<ApplyMsg> = Vec::with_capacity(APPLY_BATCH);
        batch.push(first);
        // Everything already delivered goes into the same atomic sled batch.
        while batch.len() < APPLY_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        // sled reads and writes block: off the async threads.
        let sm2 = sm.clone();
        let res = tokio::task::spawn_blocking(move || {
            let r = apply_batch(&sm2, &batch);
            (batch, r)
        })
        .await;
        let (batch, outcomes) = match res {
            Ok((batch, Ok(o))) => (batch, o),
            Ok((_, Err(e))) => {
                tracing::error!(error = %e, "state machine failed; stopping the node");
                *lock(&failure) = Some(format!("the state machine failed: {e}"));
                // Waiting clients learn at once that the outcome is unknown.
                lock(&waiters).pending.clear();
                // Raft stops too: the node must not go on looking healthy.
                let _ = raft.shutdown().await;
                return;
            }
            Err(e) => {
                *lock(&failure) = Some(format!("the state machine task failed: {e}"));
                lock(&waiters).pending.clear();
                let _ = raft.shutdown().await;
                return;
            }
        };
        let mut w = lock(&waiters);
        for (m, outcome) in batch.into_iter().zip(outcomes) {
            if let Some((term, tx)) = w.pending.remove(&m.command_index) {
                let _ = tx.send(if term == m.command_term {
                    outcome.clone()
                } else {
                    overwritten()
                });
            }
            w.recent.insert(m.command_index, (m.command_term, outcome));
        }
        while w.recent.len() > 4096 {
            w.recent.pop_first();
        }
    }
}
