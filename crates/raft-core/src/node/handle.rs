//! The [`Raft`] handle applications hold: construction, start (restoring the
//! durable state), the seed's API, and shutdown. Everything it asks of the
//! node travels as a [`Request`] to the driver task.

use super::apply::{applier, ApplyMsg, ApplyQueue, Proposal};
use super::driver::Driver;
use super::Error;
use crate::config::Config;
use crate::engine::ChangeStep;
use crate::engine::{Engine, InitialState};
use crate::snapshot::SnapshotStore;
use crate::storage::{LogBatch, LogStore};
use crate::transport::Transport;
use crate::types::{EntryPayload, LogId, LogIndex, Membership, NodeId, Role, SnapshotMeta, Term};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

/// A purged of what the node knows.
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
    pub purged_index: LogIndex,
    /// The highest index the application released
    /// ([`Raft::release_applied`]). Entries between `purged_index` and it
    /// are kept only because a member does not hold them yet (or fewer
    /// than `Config::compact_threshold` wait).
    pub released_index: LogIndex,
    /// The last index of the latest snapshot (0 for none).
    pub snapshot_index: LogIndex,
    /// A follower needs a snapshot and this node has none to send: the
    /// application should take one ([`Raft::snapshot_taken`]).
    pub snapshot_wanted: bool,
    /// The voting members (both sides during a change).
    pub members: Vec<NodeId>,
    /// The configuration in force: voters, learners, addresses.
    pub membership: Membership,
    /// The latest membership entry while a change is in flight (joint or
    /// not committed yet).
    pub change_in_flight: Option<LogIndex>,
    /// A leadership transfer under way: its target.
    pub transferring_to: Option<NodeId>,
    /// This node's storage identity.
    pub incarnation: u64,
    /// Bytes of entries held that the application has not taken yet
    /// (bounded by `Config::max_unapplied_bytes`).
    pub unapplied_bytes: u64,
    /// Why the node stopped, once it has.
    pub stopped: Option<String>,
}

pub(super) type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// What a handle asks of the driver.
pub(super) enum Request {
    /// Append commands; nobody waits for their outcome.
    Submit(Vec<Vec<u8>>, Reply<Vec<LogId>>),
    /// Append commands and register a waiter for each; `true`: the
    /// application answers each (else the hand-over resolves it).
    Propose(Vec<Vec<u8>>, bool, Reply<Vec<Proposal>>),
    ReadIndex(Reply<LogIndex>),
    Release(LogIndex),
    SnapshotTaken(LogIndex, Reply<Option<SnapshotMeta>>),
    ChangeMembership(Vec<ChangeStep>, Reply<LogId>),
    TransferLeadership(Option<NodeId>, Reply<NodeId>),
    /// The leader's per-peer progress (empty on other nodes).
    Progress(oneshot::Sender<Vec<(NodeId, LogIndex)>>),
}

struct Parts {
    store: Box<dyn LogStore>,
    snapshots: Option<Arc<dyn SnapshotStore>>,
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
/// use raft_core::{ApplyMsg, ChannelNetwork, Config, MemLogStore, Raft};
///
/// # async fn demo() -> Result<(), raft_core::Error> {
/// let net = ChannelNetwork::new();
/// let mut cfg = Config::new(1);
/// cfg.add_peer(2)?.add_peer(3)?;
/// let (apply_tx, mut apply_rx) = tokio::sync::mpsc::channel::<ApplyMsg>(100);
/// let raft = Raft::new(cfg, MemLogStore::new(), net.join(1), apply_tx)?;
/// raft.start().await?;
/// tokio::spawn(async move {
///     while let Some(msg) = apply_rx.recv().await {
///         if msg.command_valid {
///             let applied = msg.command.len(); // apply msg.command here
///             // The node that proposed it waits for this answer.
///             if let Some(r) = msg.responder {
///                 r.answer(applied);
///             }
///         }
///     }
/// });
/// if raft.is_leader() {
///     // The seed's Submit: (index, term), nobody waits.
///     let (_index, _term) = raft.submit(b"SET key value".to_vec()).await?;
///     // Or propose and wait for the application's answer.
///     for p in raft.propose(vec![b"SET other value".to_vec()]).await? {
///         let answer: Option<usize> = p.outcome().await?;
///         assert_eq!(answer, Some(15));
///     }
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
pub(super) const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

impl Raft {
    /// Builds a node (not yet running) from a validated configuration, a log
    /// store, a transport and the channel committed entries go to.
    pub fn new(
        config: Config,
        store: impl LogStore,
        transport: impl Transport,
        apply_tx: mpsc::Sender<ApplyMsg>,
    ) -> Result<Raft, Error> {
        Self::build(config, store, None, transport, apply_tx)
    }

    /// Builds a node that takes part in snapshots: the application reports
    /// the snapshots it takes ([`Raft::snapshot_taken`]), `snapshots` reads
    /// them to send to followers that fell behind the compaction point and
    /// stores those a leader sends, and the apply channel says when to load
    /// one ([`ApplyMsg::snapshot`]). Without snapshots (`Raft::new`), the
    /// log is compacted only past what every member holds.
    pub fn with_snapshots(
        config: Config,
        store: impl LogStore,
        snapshots: impl SnapshotStore,
        transport: impl Transport,
        apply_tx: mpsc::Sender<ApplyMsg>,
    ) -> Result<Raft, Error> {
        Self::build(
            config,
            store,
            Some(Arc::new(snapshots)),
            transport,
            apply_tx,
        )
    }

    fn build(
        config: Config,
        store: impl LogStore,
        snapshots: Option<Arc<dyn SnapshotStore>>,
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
            purged_index: 0,
            released_index: 0,
            snapshot_index: 0,
            snapshot_wanted: false,
            members: config.members().into_iter().collect(),
            membership: Membership::new(config.members()),
            change_in_flight: None,
            transferring_to: None,
            incarnation: 0,
            unapplied_bytes: 0,
            stopped: None,
        };
        let (status_tx, status_rx) = watch::channel(status);
        let parts = Parts {
            store: Box::new(store),
            snapshots,
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
        let engine = Self::restore(
            &self.inner.config,
            &mut parts.store,
            parts.snapshots.as_deref(),
            applied_index,
        )
        .await?;
        let Lifecycle::NotStarted(parts) = std::mem::replace(&mut *lc, Lifecycle::Stopped) else {
            return Err(Error::AlreadyStarted);
        };
        let Parts {
            store,
            snapshots,
            transport,
            apply_tx,
            req_rx,
            status_tx,
        } = *parts;
        let cfg = &self.inner.config;
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
        let apply = ApplyQueue {
            tx: apply_tx,
            overflow: apply_q_tx,
            queued: apply_queued,
            applied: self.inner.applied.clone(),
            failed: apply_fail_tx,
        };
        let driver = Driver::new(
            engine,
            store,
            snapshots,
            transport,
            cfg.max_write_stall,
            Instant::now(),
            req_rx,
            status_tx,
            apply,
        );
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
        snapshots: Option<&dyn SnapshotStore>,
        applied_index: LogIndex,
    ) -> Result<Engine, Error> {
        let mut state = store.load().await?;
        // A recorded snapshot whose bytes are gone cannot be loaded or sent.
        if let (Some(m), Some(snaps)) = (&state.snapshot, snapshots) {
            if let Err(e) = snaps.open(m).await {
                tracing::warn!(node = cfg.id, index = m.last.index, error = %e, "the recorded snapshot cannot be read; this node will not use it");
                state.snapshot = None;
            }
        }
        // The storage's identity is made once, when it is created.
        let mut incarnation = state.incarnation;
        if incarnation == 0 {
            incarnation = loop {
                let x = fastrand::u64(..);
                if x != 0 {
                    break x;
                }
            };
            store
                .save(LogBatch {
                    incarnation: Some(incarnation),
                    ..LogBatch::default()
                })
                .await?;
        }
        let configured = Membership::new(cfg.members());
        let fresh = state.entries.is_empty()
            && state.purged == LogId::default()
            && state.hard_state == crate::types::HardState::default();
        let base = match state.membership.clone() {
            Some(m) => m,
            // A new cluster's member: bootstrap from the configuration.
            None if fresh && !cfg.join => {
                store
                    .save(LogBatch {
                        membership: Some(configured.clone()),
                        ..LogBatch::default()
                    })
                    .await?;
                configured.clone()
            }
            // A node waiting to be added (or added, before its first
            // compaction): the leader's entries bring the membership.
            None => Membership::default(),
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
        if !cfg.join && !in_force.voters.is_empty() && in_force.all_voters() != configured.voters {
            // The peers given at start only bootstrap; the log counts.
            tracing::warn!(
                node = cfg.id,
                configured = ?configured.voters,
                stored = %in_force,
                "the configured peers differ from the membership in the log; the log's counts"
            );
        }
        let init = InitialState {
            hard_state: state.hard_state,
            purged: state.purged,
            entries: state.entries,
            membership: base,
            applied: applied_index,
            snapshot: state.snapshot,
            await_snapshot: snapshots.is_some(),
            incarnation,
        };
        let seed = seed_for(cfg.id);
        Ok(Engine::new(
            cfg.clone(),
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

    /// On a leader, the last index known replicated on each other member
    /// (for metrics); empty on other nodes.
    pub async fn peer_progress(&self) -> Vec<(NodeId, LogIndex)> {
        let (tx, rx) = oneshot::channel();
        if self.inner.req_tx.send(Request::Progress(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
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

    /// Proposes a command (the seed's `Submit`). On the leader it returns the
    /// index and term the entry will have if it commits; elsewhere
    /// `Error::NotLeader` with a hint. Nobody waits for the outcome: use
    /// [`Raft::propose`] for that.
    pub async fn submit(&self, command: Vec<u8>) -> Result<(LogIndex, Term), Error> {
        let ids = self
            .request(|tx| Request::Submit(vec![command], tx))
            .await?;
        ids.first()
            .map(|id| (id.index, id.term))
            .ok_or(Error::Stopped("the node proposed nothing".into()))
    }

    /// Proposes several commands in one request to the driver, in order; they
    /// land in consecutive entries (all or none). Returns each one's (index, term).
    pub async fn submit_batch(
        &self,
        commands: Vec<Vec<u8>>,
    ) -> Result<Vec<(LogIndex, Term)>, Error> {
        let ids = self.request(|tx| Request::Submit(commands, tx)).await?;
        Ok(ids.into_iter().map(|id| (id.index, id.term)).collect())
    }

    /// Proposes commands in order, as consecutive entries (all or none), and
    /// returns a [`Proposal`] per command that resolves with what the
    /// application answers once it applied the entry (see
    /// [`ApplyMsg::responder`]). The waiter is registered in the same step
    /// that appends the entry, so no outcome can slip past it.
    pub async fn propose(&self, commands: Vec<Vec<u8>>) -> Result<Vec<Proposal>, Error> {
        self.request(|tx| Request::Propose(commands, true, tx))
            .await
    }

    /// Proposes one command and waits until it has been committed and
    /// handed to the apply channel; returns its index.
    pub async fn submit_and_wait(&self, command: Vec<u8>) -> Result<LogIndex, Error> {
        let mut ps = self
            .request(|tx| Request::Propose(vec![command], false, tx))
            .await?;
        match ps.pop() {
            Some(p) => p.committed().await,
            None => Err(Error::Stopped("the node proposed nothing".into())),
        }
    }

    /// Tells the node that the application has durably stored the effects of
    /// every entry up to `index` (for example, it flushed its state machine
    /// and `index` was its applied index then). Log entries up to it are
    /// dropped, from memory and from the log store, once every member holds
    /// them too. Without this call the log keeps every entry.
    ///
    /// Without snapshots, a member that is down holds this compaction back
    /// until it returns; see [`Raft::snapshot_taken`].
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

    /// Tells the node that the application holds a durable snapshot of its
    /// state after applying every entry up to `index`, readable through its
    /// [`SnapshotStore`]. The log is compacted up to it (less
    /// `Config::trailing_entries`) whatever the other members hold; a
    /// member that needs what was dropped is sent the snapshot. Returns what
    /// the snapshot covers, or `None` when it is not newer than the latest
    /// one or `index` was not applied here.
    pub async fn snapshot_taken(&self, index: LogIndex) -> Result<Option<SnapshotMeta>, Error> {
        self.request(|tx| Request::SnapshotTaken(index, tx)).await
    }

    /// Changes the membership (leader only): `steps` together make one
    /// change, through a joint configuration when the voters change.
    /// Returns once the final configuration is committed, with it; a
    /// second change while one is in flight is refused
    /// (`ChangeError::InProgress`). Callers add their own timeout.
    pub async fn change_membership(&self, steps: Vec<ChangeStep>) -> Result<Membership, Error> {
        let id = self
            .request(|r| Request::ChangeMembership(steps, r))
            .await?;
        let mut rx = self.inner.status_rx.clone();
        loop {
            {
                let s = rx.borrow_and_update();
                if let Some(why) = &s.stopped {
                    return Err(Error::Stopped(why.clone()));
                }
                if s.term != id.term || s.role != Role::Leader {
                    // Whether the change survives is the next leader's log's business.
                    return Err(Error::Unknown(id.index));
                }
                if s.commit_index >= id.index && s.change_in_flight.is_none() {
                    return Ok(s.membership.clone());
                }
            }
            if rx.changed().await.is_err() {
                return Err(Error::Stopped("the node has stopped".into()));
            }
        }
    }

    /// Adds a learner: a member that receives the log and snapshots and
    /// does not vote. `addr` is where peers reach it; `incarnation` its
    /// storage identity (from its `Status::incarnation`; 0 if unknown).
    pub async fn add_learner(
        &self,
        id: NodeId,
        addr: String,
        incarnation: u64,
    ) -> Result<Membership, Error> {
        self.change_membership(vec![ChangeStep::AddLearner {
            id,
            member: crate::types::Member { addr, incarnation },
        }])
        .await
    }

    /// Hands leadership to `to` (or to the most up-to-date voter) and waits
    /// until that member leads or the attempt was given up (an election
    /// timeout). Proposals are refused meanwhile.
    pub async fn transfer_leadership(&self, to: Option<NodeId>) -> Result<NodeId, Error> {
        let target = self.request(|r| Request::TransferLeadership(to, r)).await?;
        let mut rx = self.inner.status_rx.clone();
        let limit = self.inner.config.election_timeout_max * 3;
        let wait = async {
            loop {
                {
                    let s = rx.borrow_and_update();
                    if let Some(why) = &s.stopped {
                        return Err(Error::Stopped(why.clone()));
                    }
                    if s.leader == Some(target) {
                        return Ok(target);
                    }
                    // The driver published the transfer before replying.
                    if s.role == Role::Leader && s.transferring_to.is_none() {
                        return Err(Error::TransferFailed(target));
                    }
                }
                if rx.changed().await.is_err() {
                    return Err(Error::Stopped("the node has stopped".into()));
                }
            }
        };
        tokio::time::timeout(limit, wait)
            .await
            .unwrap_or(Err(Error::TransferFailed(target)))
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
