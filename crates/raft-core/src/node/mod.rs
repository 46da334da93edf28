//! The async Raft node: one tokio task that owns an [`Engine`], a [`LogStore`]
//! and a [`Transport`], and the [`Raft`] handle applications talk to.
//!
//! Each turn of the driver waits for anything (a request, a peer message, a
//! timer, a finished disk write), then takes everything else already waiting,
//! feeds it all to the engine, and carries out the engine's output. Log writes
//! run one after another as a future the driver polls alongside everything
//! else; the ones that queue up meanwhile go into the next durable `save`
//! together (group commit). The driver keeps turning while a write runs, so heartbeats, votes refused and a leader's appends
//! travel while the disk works. What promises durable state (acknowledgements,
//! votes, and while a term or vote is being written, every message) goes out
//! only once the writes before it have returned.
//! Committed entries flow to the application's apply channel through a
//! separate task, so a slow application never delays heartbeats.

mod config;

pub use config::{Config, ConfigError};

use crate::engine::{Engine, EngineError, InitialState, ProposeError, ReadResult};
use crate::message::Message;
use crate::mutation::{broken, Mutation};
use crate::storage::{LogBatch, LogStore, StorageError};
use crate::transport::Transport;
use crate::types::{Entry, EntryPayload, LogId, LogIndex, Membership, NodeId, Role, Term};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

/// A committed log entry, handed to the application in index order, each
/// exactly once per run of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyMsg {
    /// True for an application command; false for Raft's own entries (the
    /// leader's no-op, membership), which the application only counts.
    pub command_valid: bool,
    /// The command bytes as submitted (empty when `command_valid` is false).
    pub command: Vec<u8>,
    /// The entry's log index. Persist it with the state it produces.
    pub command_index: LogIndex,
    /// The term the entry was created in.
    pub command_term: Term,
}

/// A snapshot of what the node knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// This node's id.
    pub id: NodeId,
    /// Its role.
    pub role: Role,
    /// Its current term.
    pub term: Term,
    /// The leader it follows, if known (itself when leader).
    pub leader: Option<NodeId>,
    /// The commit index.
    pub commit_index: LogIndex,
    /// The highest index accepted by the apply channel.
    pub applied_index: LogIndex,
    /// The last index in its log.
    pub last_log_index: LogIndex,
    /// The compaction point: entries up to it are no longer in the log.
    pub compacted_index: LogIndex,
    /// The voting members.
    pub members: Vec<NodeId>,
    /// Bytes of entries held that the application has not taken yet
    /// (bounded by `Config::max_unapplied_bytes`).
    pub unapplied_bytes: u64,
    /// Why the node stopped, once it has.
    pub stopped: Option<String>,
}

/// Errors of the node API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// This node is not the leader; `leader` is whom it follows, if known.
    #[error("not the leader (leader hint: {leader:?})")]
    NotLeader {
        /// The leader's id, if known.
        leader: Option<NodeId>,
    },
    /// The configuration was rejected.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The log store failed; the node has stopped.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The stored state cannot be restored.
    #[error(transparent)]
    Restore(#[from] EngineError),
    /// `start` was not called yet.
    #[error("the node has not been started")]
    NotStarted,
    /// `start` was called twice.
    #[error("the node was already started")]
    AlreadyStarted,
    /// The node is not running any more.
    #[error("the node has stopped: {0}")]
    Stopped(String),
    /// The application dropped the receiving end of the apply channel.
    #[error("the apply channel was closed by the application")]
    ApplyChannelClosed,
    /// The entry at this index was replaced by another leader's; it will never commit.
    #[error("entry {index} of term {term} was overwritten by a later leader")]
    Overwritten {
        /// The submitted index.
        index: LogIndex,
        /// The submitted term.
        term: Term,
    },
    /// The outcome cannot be known any more (the entry was compacted away).
    #[error("the outcome of entry {0} is unknown")]
    Unknown(LogIndex),
    /// The command is larger than `Config::max_entry_bytes`; nothing was proposed.
    #[error("command of {size} bytes exceeds the limit of {max} bytes (max_entry_bytes)")]
    TooLarge {
        /// The command's size (for a batch: the batch's).
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Too many bytes wait to commit or to be applied; nothing was proposed.
    /// Retry later.
    #[error(
        "busy: {pending} bytes of entries wait to commit and apply (limit {max}); retry later"
    )]
    Busy {
        /// Bytes waiting.
        pending: u64,
        /// The limit (`Config::max_unapplied_bytes`).
        max: u64,
    },
    /// The configured members disagree with the membership stored in the log.
    #[error("the configured members {configured:?} disagree with the membership stored in the log {stored:?}; the stored membership counts: start with the peers it names")]
    MembershipMismatch {
        /// The members the configuration names (this node and its peers).
        configured: Vec<NodeId>,
        /// The members in force according to the durable log.
        stored: Vec<NodeId>,
    },
}

impl From<ProposeError> for Error {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::NotLeader(n) => n.into(),
            ProposeError::TooLarge { size, max } => Error::TooLarge { size, max },
            ProposeError::Busy { pending, max } => Error::Busy { pending, max },
        }
    }
}

impl From<crate::engine::NotLeader> for Error {
    fn from(e: crate::engine::NotLeader) -> Self {
        Error::NotLeader { leader: e.leader }
    }
}

type Reply<T> = oneshot::Sender<Result<T, Error>>;

enum Request {
    Propose(Vec<u8>, Reply<LogId>),
    ProposeBatch(Vec<Vec<u8>>, Reply<Vec<LogId>>),
    WaitCommit(LogId, Reply<()>),
    ReadIndex(Reply<LogIndex>),
    Release(LogIndex),
}

struct Parts {
    store: Box<dyn LogStore>,
    transport: Box<dyn Transport>,
    apply_tx: mpsc::Sender<ApplyMsg>,
    req_rx: mpsc::Receiver<Request>,
    status_tx: watch::Sender<Status>,
}

struct Running {
    shutdown: oneshot::Sender<()>,
    driver: JoinHandle<Result<(), Error>>,
    applier: JoinHandle<()>,
}

enum Lifecycle {
    NotStarted(Box<Parts>),
    Running(Running),
    Stopped,
}

struct Inner {
    config: Config,
    req_tx: mpsc::Sender<Request>,
    status_rx: watch::Receiver<Status>,
    applied: Arc<AtomicU64>,
    started: std::sync::atomic::AtomicBool,
    lifecycle: Mutex<Lifecycle>,
}

/// A handle on one Raft node. Cheap to clone; every clone drives the same node.
///
/// ```no_run
/// use raft_core::node::{ApplyMsg, Config, Raft};
/// use raft_core::{ChannelNetwork, MemLogStore};
///
/// # async fn demo() -> Result<(), raft_core::node::Error> {
/// let net = ChannelNetwork::new();
/// let mut cfg = Config::new(1);
/// cfg.add_peer(2, "node2")?.add_peer(3, "node3")?;
/// let (apply_tx, mut apply_rx) = tokio::sync::mpsc::channel::<ApplyMsg>(100);
/// let raft = Raft::new(cfg, MemLogStore::new(), net.join(1), apply_tx)?;
/// raft.start().await?;
/// tokio::spawn(async move {
///     while let Some(msg) = apply_rx.recv().await {
///         if msg.command_valid { /* apply msg.command */ }
///     }
/// });
/// if raft.is_leader() {
///     let (index, term) = raft.submit(b"SET key value".to_vec()).await?;
///     raft.wait_committed(index, term).await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Raft {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Raft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Raft")
            .field("id", &self.inner.config.id)
            .finish()
    }
}

const REQUEST_QUEUE: usize = 4096;
/// How long `shutdown` waits for the driver to finish its current write.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);
const MAX_EVENTS_PER_TURN: usize = 4096;

impl Raft {
    /// Builds a node (not yet running) from a validated configuration, a log
    /// store, a transport and the channel committed entries go to.
    pub fn new(
        config: Config,
        store: impl LogStore,
        transport: impl Transport,
        apply_tx: mpsc::Sender<ApplyMsg>,
    ) -> Result<Raft, Error> {
        config.validate()?;
        config.validate_for_transport(transport.max_message_bytes())?;
        let (req_tx, req_rx) = mpsc::channel(REQUEST_QUEUE);
        let status = Status {
            id: config.id,
            role: Role::Follower,
            term: 0,
            leader: None,
            commit_index: 0,
            applied_index: 0,
            last_log_index: 0,
            compacted_index: 0,
            members: config.members().into_iter().collect(),
            unapplied_bytes: 0,
            stopped: None,
        };
        let (status_tx, status_rx) = watch::channel(status);
        let parts = Parts {
            store: Box::new(store),
            transport: Box::new(transport),
            apply_tx,
            req_rx,
            status_tx,
        };
        Ok(Raft {
            inner: Arc::new(Inner {
                config,
                req_tx,
                status_rx,
                applied: Arc::new(AtomicU64::new(0)),
                started: std::sync::atomic::AtomicBool::new(false),
                lifecycle: Mutex::new(Lifecycle::NotStarted(Box::new(parts))),
            }),
        })
    }

    /// Starts the node with nothing applied yet.
    pub async fn start(&self) -> Result<(), Error> {
        self.start_with_applied(0).await
    }

    /// Starts the node. `applied_index` is the highest index the application
    /// has already applied durably (0 for none): entries up to it are not
    /// delivered again.
    pub async fn start_with_applied(&self, applied_index: LogIndex) -> Result<(), Error> {
        let mut lc = self.inner.lifecycle.lock().await;
        let parts = match &mut *lc {
            Lifecycle::NotStarted(p) => p,
            _ => return Err(Error::AlreadyStarted),
        };
        // Everything that can fail happens before the parts are taken: a
        // refused start leaves the node startable with the same store.
        let engine = Self::restore(&self.inner.config, &mut parts.store, applied_index).await?;
        let Lifecycle::NotStarted(parts) = std::mem::replace(&mut *lc, Lifecycle::Stopped) else {
            return Err(Error::AlreadyStarted);
        };
        let Parts {
            store,
            transport,
            apply_tx,
            req_rx,
            status_tx,
        } = *parts;
        let cfg = &self.inner.config;
        let origin = Instant::now();
        self.inner
            .applied
            .store(engine.applied_index(), Ordering::Release);
        let (apply_q_tx, apply_q_rx) = mpsc::unbounded_channel();
        let (apply_fail_tx, apply_fail_rx) = mpsc::channel(1);
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let apply_queued = Arc::new(AtomicUsize::new(0));
        let applier = tokio::spawn(applier(
            apply_q_rx,
            apply_tx.clone(),
            self.inner.applied.clone(),
            apply_queued.clone(),
            apply_fail_tx.clone(),
        ));
        let span = tracing::info_span!("raft", node = cfg.id);
        let driver = Driver {
            engine,
            store: Some(store),
            writing: None,
            jobs: std::collections::VecDeque::new(),
            pending: std::collections::VecDeque::new(),
            max_write_stall: cfg.max_write_stall,
            transport,
            origin,
            req_rx,
            status_tx,
            applied: self.inner.applied.clone(),
            apply_q: apply_q_tx,
            apply_tx,
            apply_queued,
            apply_failed: apply_fail_tx,
            commit_waiters: BTreeMap::new(),
            read_waiters: HashMap::new(),
            reads_after_apply: BTreeMap::new(),
            next_ctx: 1,
        };
        let driver = tokio::spawn(driver.run(shutdown_rx, apply_fail_rx).instrument(span));
        self.inner.started.store(true, Ordering::Release);
        *lc = Lifecycle::Running(Running {
            shutdown: shutdown_tx,
            driver,
            applier,
        });
        Ok(())
    }

    /// Loads the durable state and builds the engine from it. The membership
    /// is bootstrapped from the configuration once, into the store; after
    /// that the stored one counts, and a configuration naming other members
    /// is refused.
    async fn restore(
        cfg: &Config,
        store: &mut Box<dyn LogStore>,
        applied_index: LogIndex,
    ) -> Result<Engine, Error> {
        let state = store.load().await?;
        let configured = Membership::new(cfg.members());
        let base = match state.membership.clone() {
            Some(m) => m,
            None => {
                let fresh = state.entries.is_empty()
                    && state.snapshot == LogId::default()
                    && state.hard_state == crate::types::HardState::default();
                if !fresh {
                    tracing::warn!(
                        node = cfg.id,
                        members = ?configured.voters,
                        "the log stores no membership (written by an older version); storing the configured one"
                    );
                }
                store
                    .save(LogBatch {
                        membership: Some(configured.clone()),
                        ..LogBatch::default()
                    })
                    .await?;
                configured.clone()
            }
        };
        let in_force = state
            .entries
            .iter()
            .rev()
            .find_map(|e| match &e.payload {
                EntryPayload::Membership(m) => Some(m.clone()),
                _ => None,
            })
            .unwrap_or_else(|| base.clone());
        if in_force != configured {
            return Err(Error::MembershipMismatch {
                configured: configured.voters.into_iter().collect(),
                stored: in_force.voters.into_iter().collect(),
            });
        }
        let init = InitialState {
            hard_state: state.hard_state,
            snapshot: state.snapshot,
            entries: state.entries,
            membership: base,
            applied: applied_index,
        };
        let seed = seed_for(cfg.id);
        Ok(Engine::new(
            cfg.engine_config(),
            init,
            seed,
            std::time::Duration::ZERO,
        )?)
    }

    /// Stops the node and waits until none of its tasks is running. Returns
    /// the error that stopped the node earlier, if one did.
    ///
    /// A log write in progress is abandoned, not awaited (a hung disk must
    /// not hang shutdown): nothing that depends on it has been sent, but a
    /// store that hands work to other threads (the sled store uses tokio's
    /// blocking pool) may still finish that write after `shutdown` returns.
    /// Reopen the same store only once it has let go of its files (the sled
    /// store waits for its lock for a short time).
    pub async fn shutdown(&self) -> Result<(), Error> {
        let mut lc = self.inner.lifecycle.lock().await;
        match std::mem::replace(&mut *lc, Lifecycle::Stopped) {
            Lifecycle::Running(mut r) => {
                let _ = r.shutdown.send(());
                // A hung disk must not hang shutdown: the driver may be
                // waiting on a write that never returns. Abandoning it is
                // safe: nothing that depends on it has been sent.
                let res = match tokio::time::timeout(SHUTDOWN_GRACE, &mut r.driver).await {
                    Ok(Ok(res)) => res,
                    Ok(Err(e)) => Err(Error::Stopped(format!("driver task failed: {e}"))),
                    Err(_) => {
                        r.driver.abort();
                        Err(Error::Stopped(format!(
                            "shutdown gave up after {SHUTDOWN_GRACE:?}: the log store did not answer"
                        )))
                    }
                };
                r.applier.abort();
                let _ = r.applier.await;
                res
            }
            _ => Ok(()),
        }
    }

    /// This node's configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The largest command `submit` accepts (`Config::max_entry_bytes`).
    pub fn max_command_bytes(&self) -> usize {
        self.inner.config.max_entry_bytes
    }

    /// The current status.
    pub fn status(&self) -> Status {
        let mut s = self.inner.status_rx.borrow().clone();
        s.applied_index = self.inner.applied.load(Ordering::Acquire);
        s
    }

    /// A receiver that sees every status change (for waiting on a condition).
    /// Do not hold a borrowed value (`borrow()`, or the guard `wait_for`
    /// returns) across an await: it blocks the node from publishing its status.
    pub fn watch_status(&self) -> watch::Receiver<Status> {
        self.inner.status_rx.clone()
    }

    /// Why the node stopped, once it has (without copying the whole status).
    pub fn stopped(&self) -> Option<String> {
        self.inner.status_rx.borrow().stopped.clone()
    }

    /// True when this node believes it is the leader.
    pub fn is_leader(&self) -> bool {
        self.inner.status_rx.borrow().role == Role::Leader
    }

    /// The leader this node follows, if known.
    pub fn leader(&self) -> Option<NodeId> {
        self.inner.status_rx.borrow().leader
    }

    async fn request<R>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<R, Error>>) -> Request,
    ) -> Result<R, Error> {
        if !self.inner.started.load(Ordering::Acquire) {
            return Err(Error::NotStarted);
        }
        let (tx, rx) = oneshot::channel();
        if self.inner.req_tx.send(make(tx)).await.is_err() {
            return Err(self.stopped_error());
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(self.stopped_error()),
        }
    }

    fn stopped_error(&self) -> Error {
        let s = self.inner.status_rx.borrow();
        match &s.stopped {
            Some(why) => Error::Stopped(why.clone()),
            None => Error::NotStarted,
        }
    }

    /// Proposes a command. On the leader it returns the index and term the
    /// entry will have if it commits; elsewhere `Error::NotLeader` with a hint.
    pub async fn submit(&self, command: Vec<u8>) -> Result<(LogIndex, Term), Error> {
        let id = self.request(|tx| Request::Propose(command, tx)).await?;
        Ok((id.index, id.term))
    }

    /// Proposes several commands in one request to the driver, in order; they
    /// land in consecutive entries. Returns each one's (index, term).
    pub async fn submit_batch(
        &self,
        commands: Vec<Vec<u8>>,
    ) -> Result<Vec<(LogIndex, Term)>, Error> {
        let ids = self
            .request(|tx| Request::ProposeBatch(commands, tx))
            .await?;
        Ok(ids.into_iter().map(|id| (id.index, id.term)).collect())
    }

    /// Waits until the entry submitted at (`index`, `term`) commits and is on
    /// its way to the apply channel; `Error::Overwritten` when a later leader
    /// replaced it.
    pub async fn wait_committed(&self, index: LogIndex, term: Term) -> Result<(), Error> {
        self.request(|tx| Request::WaitCommit(LogId::new(term, index), tx))
            .await
    }

    /// Submits and waits for the commit; returns the entry's index.
    pub async fn submit_and_wait(&self, command: Vec<u8>) -> Result<LogIndex, Error> {
        let (index, term) = self.submit(command).await?;
        self.wait_committed(index, term).await?;
        Ok(index)
    }

    /// Tells the node that the application has durably stored the effects of
    /// every entry up to `index` (for example, it flushed its state machine
    /// and `index` was its applied index then). Log entries up to it are
    /// dropped, from memory and from the log store, once every member holds
    /// them too. Without this call the log keeps every entry.
    ///
    /// There are no snapshots yet: a member that is down holds compaction
    /// back until it returns, and a member whose log is lost cannot be rebuilt
    /// from the others once they have compacted.
    pub async fn release_applied(&self, index: LogIndex) -> Result<(), Error> {
        if !self.inner.started.load(Ordering::Acquire) {
            return Err(Error::NotStarted);
        }
        self.inner
            .req_tx
            .send(Request::Release(index))
            .await
            .map_err(|_| self.stopped_error())
    }

    /// A linearizable read barrier (leader only). The leader confirms with a
    /// heartbeat round that it still leads, then returns an index once all
    /// entries up to it are on their way to the apply channel. Reading the
    /// application's state after it has applied that index is linearizable.
    pub async fn read_index(&self) -> Result<LogIndex, Error> {
        self.request(Request::ReadIndex).await
    }
}

/// A per-process seed for election-timeout randomness.
fn seed_for(id: NodeId) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(std::process::id())
}

/// Feeds the apply channel with what the driver could not hand over at once
/// (the channel was full), in order. `queued` counts the messages it holds.
async fn applier(
    mut queue: mpsc::UnboundedReceiver<Vec<ApplyMsg>>,
    apply_tx: mpsc::Sender<ApplyMsg>,
    applied: Arc<AtomicU64>,
    queued: Arc<AtomicUsize>,
    failed: mpsc::Sender<()>,
) {
    while let Some(batch) = queue.recv().await {
        for m in batch {
            let idx = m.command_index;
            if apply_tx.send(m).await.is_err() {
                let _ = failed.try_send(());
                return;
            }
            applied.store(idx, Ordering::Release);
            queued.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// One durable write, waiting for the one in progress.
struct DiskJob {
    batch: LogBatch,
    purge_to: Option<LogId>,
}

/// What remains of a ready once its write (and every write before it) is durable.
struct AfterSave {
    /// When a write was queued for this ready (`None`: it had nothing to write).
    queued_at: Option<Instant>,
    /// That write has returned.
    done: bool,
    /// It changed the term or vote: later messages wait for it.
    hard_state: bool,
    last: Option<LogId>,
    persisted_messages: Vec<Message>,
    committed: Vec<Entry>,
    reads: Vec<ReadResult>,
}

/// A log write in progress: it gives the store back with its result and the
/// number of jobs it carried.
type Writing = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = (Box<dyn LogStore>, Result<(), StorageError>, usize)>
            + Send,
    >,
>;

/// Runs one write: the batch (several jobs merged) and then the purge.
async fn write(
    mut store: Box<dyn LogStore>,
    batch: LogBatch,
    purge_to: Option<LogId>,
    jobs: usize,
) -> (Box<dyn LogStore>, Result<(), StorageError>, usize) {
    let t0 = Instant::now();
    let n = batch.entries.len();
    let mut res = if batch.is_empty() {
        Ok(())
    } else {
        store.save(batch).await
    };
    tracing::trace!(
        entries = n,
        jobs,
        micros = t0.elapsed().as_micros() as u64,
        "log write"
    );
    if res.is_ok() {
        if let Some(upto) = purge_to {
            res = store.purge(upto).await;
            tracing::debug!(upto = upto.index, "log purged");
        }
    }
    (store, res, jobs)
}

struct Driver {
    engine: Engine,
    /// The log store, while no write holds it.
    store: Option<Box<dyn LogStore>>,
    /// The write in progress: the driver keeps turning while it runs, and
    /// jobs that queue up meanwhile go to disk together next (group commit).
    writing: Option<Writing>,
    /// Writes waiting for the one in progress, in order.
    jobs: std::collections::VecDeque<DiskJob>,
    /// Readies waiting for their write (or an earlier one), oldest first.
    pending: std::collections::VecDeque<AfterSave>,
    /// A write older than this stops the node.
    max_write_stall: std::time::Duration,
    transport: Box<dyn Transport>,
    origin: Instant,
    req_rx: mpsc::Receiver<Request>,
    status_tx: watch::Sender<Status>,
    applied: Arc<AtomicU64>,
    apply_q: mpsc::UnboundedSender<Vec<ApplyMsg>>,
    /// The application's channel, fed directly while the applier holds nothing.
    apply_tx: mpsc::Sender<ApplyMsg>,
    apply_queued: Arc<AtomicUsize>,
    apply_failed: mpsc::Sender<()>,
    commit_waiters: BTreeMap<LogIndex, Vec<(Term, Reply<()>)>>,
    read_waiters: HashMap<u64, Reply<LogIndex>>,
    reads_after_apply: BTreeMap<LogIndex, Vec<Reply<LogIndex>>>,
    next_ctx: u64,
}

/// Waits for the write in progress; never resolves when there is none.
async fn poll_writing(
    writing: &mut Option<Writing>,
) -> (Box<dyn LogStore>, Result<(), StorageError>, usize) {
    match writing {
        Some(w) => w.await,
        None => std::future::pending().await,
    }
}

enum Wake {
    Shutdown,
    ApplyFailed,
    DiskDone(Box<dyn LogStore>, Result<(), StorageError>, usize),
    WriteStalled,
    Request(Request),
    Message(Message),
    HandlesGone,
    TransportClosed,
    Timer,
}

impl Driver {
    fn now(&self) -> std::time::Duration {
        Instant::now().saturating_duration_since(self.origin)
    }

    async fn run(
        mut self,
        mut shutdown: oneshot::Receiver<()>,
        mut apply_failed: mpsc::Receiver<()>,
    ) -> Result<(), Error> {
        tracing::info!(term = self.engine.term(), last = ?self.engine.last_log_id(), "node started");
        let result = loop {
            let deadline = self.origin + self.engine.next_deadline();
            // The oldest write not yet durable must not be older than the limit.
            let stall_at = self
                .pending
                .iter()
                .find(|p| p.queued_at.is_some() && !p.done)
                .and_then(|p| p.queued_at)
                .map(|t| t + self.max_write_stall);
            let stalled = async move {
                match stall_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            let wake = tokio::select! {
                biased;
                _ = &mut shutdown => Wake::Shutdown,
                _ = apply_failed.recv() => Wake::ApplyFailed,
                (store, res, n) = poll_writing(&mut self.writing) => Wake::DiskDone(store, res, n),
                r = self.req_rx.recv() => r.map_or(Wake::HandlesGone, Wake::Request),
                m = self.transport.recv() => m.map_or(Wake::TransportClosed, Wake::Message),
                _ = tokio::time::sleep_until(deadline) => Wake::Timer,
                _ = stalled => Wake::WriteStalled,
            };
            // The engine's clock must be current before it sees the event: it
            // stamps leader contact and re-arms the election timer with it.
            let now = self.now();
            self.engine.tick(now);
            self.engine.delivered(self.applied.load(Ordering::Acquire));
            match wake {
                Wake::Shutdown | Wake::HandlesGone => break Ok(()),
                Wake::ApplyFailed => break Err(Error::ApplyChannelClosed),
                Wake::TransportClosed => break Err(Error::Stopped("transport closed".into())),
                Wake::DiskDone(store, res, n) => {
                    self.writing = None;
                    self.store = Some(store);
                    if let Err(e) = res {
                        tracing::error!(error = %e, "stopping node");
                        break Err(e.into());
                    }
                    for _ in 0..n {
                        self.disk_done_once();
                    }
                    self.start_write();
                }
                Wake::WriteStalled => {
                    let e = StorageError::Io(format!(
                        "a log write has not finished after {:?}: the disk is stalled",
                        self.max_write_stall
                    ));
                    tracing::error!(error = %e, "stopping node");
                    break Err(e.into());
                }
                Wake::Request(r) => self.handle_request(r),
                Wake::Message(m) => self.engine.handle_message(m),
                Wake::Timer => {}
            }
            // Take everything else already waiting: one turn, one durable write.
            for _ in 0..MAX_EVENTS_PER_TURN {
                tokio::select! {
                    biased;
                    Some(r) = self.req_rx.recv() => self.handle_request(r),
                    Some(m) = self.transport.recv() => self.engine.handle_message(m),
                    _ = std::future::ready(()) => break,
                }
            }
            let now = self.now();
            self.engine.tick(now);
            if let Err(e) = self.process_ready().await {
                tracing::error!(error = %e, "stopping node");
                break Err(e);
            }
            self.publish_status(None);
        };
        let why = match &result {
            Ok(()) => "shut down".to_string(),
            Err(e) => e.to_string(),
        };
        self.fail_waiters(&why);
        self.publish_status(Some(why));
        tracing::info!("node stopped");
        result
    }

    fn handle_request(&mut self, r: Request) {
        match r {
            Request::Propose(cmd, reply) => {
                let _ = reply.send(self.engine.propose(cmd).map_err(Error::from));
            }
            Request::ProposeBatch(cmds, reply) => {
                let _ = reply.send(self.engine.propose_batch(cmds).map_err(Error::from));
            }
            Request::WaitCommit(id, reply) => {
                if id.index <= self.engine.applied_index() {
                    let res = match self.engine.log_term(id.index) {
                        Some(t) if t == id.term => Ok(()),
                        Some(_) => Err(Error::Overwritten {
                            index: id.index,
                            term: id.term,
                        }),
                        None => Err(Error::Unknown(id.index)),
                    };
                    let _ = reply.send(res);
                } else {
                    self.commit_waiters
                        .entry(id.index)
                        .or_default()
                        .push((id.term, reply));
                }
            }
            Request::Release(index) => self.engine.release(index),
            Request::ReadIndex(reply) => {
                let ctx = self.next_ctx;
                self.next_ctx += 1;
                match self.engine.read_index(ctx) {
                    Ok(()) => {
                        self.read_waiters.insert(ctx, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
        }
    }

    async fn process_ready(&mut self) -> Result<(), Error> {
        while self.engine.has_ready() {
            let mut rd = self.engine.take_ready();
            // While a term or vote is on its way to disk, every message waits
            // for it (each may depend on it).
            let hold = self.pending.iter().any(|p| p.hard_state && !p.done);
            let mut persisted_messages = std::mem::take(&mut rd.persisted_messages);
            if hold {
                persisted_messages.splice(0..0, std::mem::take(&mut rd.messages));
            }
            for m in std::mem::take(&mut rd.messages) {
                self.transport.send(m);
            }
            if broken(Mutation::DriverSendsBeforeSave) {
                for m in std::mem::take(&mut persisted_messages) {
                    self.transport.send(m);
                }
            }
            let batch = LogBatch {
                hard_state: rd.hard_state,
                truncate_from: rd.truncate_from,
                entries: std::mem::take(&mut rd.entries),
                membership: rd.membership.take(),
            };
            let has_job = !batch.is_empty() || rd.purge_to.is_some();
            let after = AfterSave {
                queued_at: has_job.then(Instant::now),
                done: false,
                hard_state: batch.hard_state.is_some(),
                last: batch.entries.last().map(Entry::log_id),
                persisted_messages,
                committed: rd.committed,
                reads: rd.reads,
            };
            if has_job {
                self.jobs.push_back(DiskJob {
                    batch,
                    purge_to: rd.purge_to,
                });
            }
            self.pending.push_back(after);
            self.finish_durable();
        }
        self.start_write();
        Ok(())
    }

    /// Starts the next write when none is in progress: every queued job
    /// that only appends goes into one batch (group commit).
    fn start_write(&mut self) {
        if self.writing.is_some() || self.jobs.is_empty() {
            return;
        }
        let Some(store) = self.store.take() else {
            return;
        };
        let Some(first) = self.jobs.pop_front() else {
            self.store = Some(store);
            return;
        };
        let mut batch = first.batch;
        let mut purge_to = first.purge_to;
        let mut count = 1usize;
        while purge_to.is_none()
            && self
                .jobs
                .front()
                .is_some_and(|j| j.batch.truncate_from.is_none())
        {
            let Some(j) = self.jobs.pop_front() else {
                break;
            };
            if j.batch.hard_state.is_some() {
                batch.hard_state = j.batch.hard_state;
            }
            if j.batch.membership.is_some() {
                batch.membership = j.batch.membership;
            }
            batch.entries.extend(j.batch.entries);
            purge_to = j.purge_to;
            count += 1;
        }
        self.writing = Some(Box::pin(write(store, batch, purge_to, count)));
    }

    /// The oldest outstanding write job is durable.
    fn disk_done_once(&mut self) {
        if let Some(p) = self
            .pending
            .iter_mut()
            .find(|p| p.queued_at.is_some() && !p.done)
        {
            p.done = true;
        }
        self.finish_durable();
    }

    /// Completes, in order, every ready whose write (and every write before
    /// it) is durable: the engine learns what is durable, acknowledgements
    /// and votes go out, committed entries go to the application.
    fn finish_durable(&mut self) {
        while self
            .pending
            .front()
            .is_some_and(|p| p.done || p.queued_at.is_none())
        {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            if let Some(last) = p.last {
                self.engine.persisted(last);
            }
            for m in p.persisted_messages {
                self.transport.send(m);
            }
            if !p.committed.is_empty() {
                self.deliver(p.committed);
            }
            for r in p.reads {
                self.on_read(r);
            }
        }
    }

    fn deliver(&mut self, committed: Vec<Entry>) {
        let Some(last) = committed.last().map(|e| e.index) else {
            return;
        };
        for e in &committed {
            if let Some(ws) = self.commit_waiters.remove(&e.index) {
                for (term, tx) in ws {
                    let res = if term == e.term {
                        Ok(())
                    } else {
                        Err(Error::Overwritten {
                            index: e.index,
                            term,
                        })
                    };
                    let _ = tx.send(res);
                }
            }
        }
        let msgs = committed
            .into_iter()
            .map(|e| match e.payload {
                EntryPayload::Command(c) => ApplyMsg {
                    command_valid: true,
                    command: c,
                    command_index: e.index,
                    command_term: e.term,
                },
                _ => ApplyMsg {
                    command_valid: false,
                    command: Vec::new(),
                    command_index: e.index,
                    command_term: e.term,
                },
            })
            .collect();
        self.hand_over(msgs, last);
        let rest = self.reads_after_apply.split_off(&(last + 1));
        for (idx, ws) in std::mem::replace(&mut self.reads_after_apply, rest) {
            for w in ws {
                let _ = w.send(Ok(idx));
            }
        }
    }

    /// Puts committed entries on the apply channel: directly when it has room
    /// and the applier holds nothing older (one task hop less per commit),
    /// otherwise through the applier, which waits for room in order.
    fn hand_over(&mut self, msgs: Vec<ApplyMsg>, last: LogIndex) {
        if self.apply_queued.load(Ordering::Acquire) == 0 {
            match self.apply_tx.try_reserve_many(msgs.len()) {
                Ok(permits) => {
                    for (permit, m) in permits.zip(msgs) {
                        permit.send(m);
                    }
                    self.applied.store(last, Ordering::Release);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(())) => {
                    let _ = self.apply_failed.try_send(());
                    return;
                }
                Err(mpsc::error::TrySendError::Full(())) => {}
            }
        }
        self.apply_queued.fetch_add(msgs.len(), Ordering::AcqRel);
        // The applier only goes away after the driver; a failed send means it already reported.
        let _ = self.apply_q.send(msgs);
    }

    fn on_read(&mut self, r: ReadResult) {
        let Some(reply) = self.read_waiters.remove(&r.ctx) else {
            return;
        };
        match r.result {
            Ok(index) if index <= self.engine.applied_index() => {
                let _ = reply.send(Ok(index));
            }
            Ok(index) => self.reads_after_apply.entry(index).or_default().push(reply),
            Err(_) => {
                let _ = reply.send(Err(Error::NotLeader {
                    leader: self.engine.leader(),
                }));
            }
        }
    }

    fn fail_waiters(&mut self, why: &str) {
        for (_, ws) in std::mem::take(&mut self.commit_waiters) {
            for (_, tx) in ws {
                let _ = tx.send(Err(Error::Stopped(why.to_string())));
            }
        }
        for (_, tx) in self.read_waiters.drain() {
            let _ = tx.send(Err(Error::Stopped(why.to_string())));
        }
        for (_, ws) in std::mem::take(&mut self.reads_after_apply) {
            for tx in ws {
                let _ = tx.send(Err(Error::Stopped(why.to_string())));
            }
        }
    }

    fn publish_status(&self, stopped: Option<String>) {
        let e = &self.engine;
        let applied = self.applied.load(Ordering::Acquire);
        self.status_tx.send_if_modified(|s| {
            let new = Status {
                id: e.id(),
                role: e.role(),
                term: e.term(),
                leader: e.leader(),
                commit_index: e.commit_index(),
                applied_index: applied,
                last_log_index: e.last_log_id().index,
                compacted_index: e.snapshot().index,
                members: e.membership().voters.iter().copied().collect(),
                unapplied_bytes: e.unapplied_bytes(),
                stopped: stopped.clone().or_else(|| s.stopped.clone()),
            };
            if *s != new {
                *s = new;
                true
            } else {
                false
            }
        });
    }
}

#[cfg(test)]
mod tests;
