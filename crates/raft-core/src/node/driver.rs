//! The driver task: one engine, one log store, one transport, the timers,
//! and the turn loop that feeds the engine and carries out its output.

use super::apply::{ApplyMsg, ApplyQueue, Waiters};
use super::handle::{Reply, Request};
use super::transfer::{self, Limits, Received, Route};
use super::{Error, Status};
use crate::engine::{Engine, ReadResult};
use crate::message::{Message, MessageBody};
use crate::mutation::{broken, Mutation};
use crate::snapshot::SnapshotStore;
use crate::storage::{LogBatch, LogStore, StorageError};
use crate::transport::Transport;
use crate::types::{Entry, LogId, LogIndex, NodeId, SnapshotMeta, Term};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// Most requests and messages taken into one turn.
const MAX_EVENTS_PER_TURN: usize = 4096;

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
    /// A snapshot the application must load before `committed`.
    apply_snapshot: Option<SnapshotMeta>,
}

/// A snapshot being streamed to a follower.
struct Outgoing {
    index: LogIndex,
    /// The term the chunks carry.
    term: Term,
    acks: mpsc::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

/// A snapshot arriving from the leader.
struct Incoming {
    leader: NodeId,
    term: Term,
    meta: SnapshotMeta,
    chunks: mpsc::Sender<(u64, Vec<u8>)>,
    task: tokio::task::JoinHandle<()>,
}

/// Snapshot transfers in both directions.
struct Transfers {
    store: Option<Arc<dyn SnapshotStore>>,
    limits: Limits,
    outgoing: HashMap<NodeId, Outgoing>,
    /// Chunks the sending tasks produced, for the transport.
    chunk_tx: mpsc::Sender<Message>,
    chunk_rx: mpsc::Receiver<Message>,
    /// Sending tasks that ended: (follower, snapshot index, term, result).
    done_tx: mpsc::UnboundedSender<SendDone>,
    done_rx: mpsc::UnboundedReceiver<SendDone>,
    incoming: Option<Incoming>,
    events_tx: mpsc::UnboundedSender<Received>,
    events_rx: mpsc::UnboundedReceiver<Received>,
}

/// A sending task's end: (follower, snapshot index, term, result).
type SendDone = (NodeId, LogIndex, Term, Result<(), String>);

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

pub(super) struct Driver {
    engine: Engine,
    /// The log store, while no write holds it.
    store: Option<Box<dyn LogStore>>,
    /// The write in progress: the driver keeps turning while it runs, and
    /// jobs that queue up meanwhile go to disk together next (group commit).
    writing: Option<Writing>,
    /// Writes waiting for the one in progress, in order.
    jobs: VecDeque<DiskJob>,
    /// Readies waiting for their write (or an earlier one), oldest first.
    pending: VecDeque<AfterSave>,
    /// A write older than this stops the node.
    max_write_stall: std::time::Duration,
    transport: Box<dyn Transport>,
    origin: Instant,
    req_rx: mpsc::Receiver<Request>,
    status_tx: watch::Sender<Status>,
    apply: ApplyQueue,
    /// Proposals waiting for their entry to be applied.
    waiters: Waiters,
    read_waiters: HashMap<u64, Reply<LogIndex>>,
    reads_after_apply: BTreeMap<LogIndex, Vec<Reply<LogIndex>>>,
    next_ctx: u64,
    transfers: Transfers,
    /// The configuration the transport was last told about.
    known_members: crate::types::Membership,
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
    Chunk(Message),
    SendDone(SendDone),
    Received(Received),
}

impl Driver {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        engine: Engine,
        store: Box<dyn LogStore>,
        snapshots: Option<Arc<dyn SnapshotStore>>,
        transport: Box<dyn Transport>,
        max_write_stall: std::time::Duration,
        origin: Instant,
        req_rx: mpsc::Receiver<Request>,
        status_tx: watch::Sender<Status>,
        apply: ApplyQueue,
    ) -> Driver {
        let cfg = engine.config();
        let limits = Limits {
            chunk: cfg.snapshot_chunk_bytes,
            in_flight: cfg.snapshot_chunks_in_flight,
            timeout: cfg.snapshot_timeout,
        };
        let (chunk_tx, chunk_rx) = mpsc::channel(cfg.snapshot_chunks_in_flight.max(1));
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let transfers = Transfers {
            store: snapshots,
            limits,
            outgoing: HashMap::new(),
            chunk_tx,
            chunk_rx,
            done_tx,
            done_rx,
            incoming: None,
            events_tx,
            events_rx,
        };
        let known_members = engine.membership().clone();
        transport.update_members(&known_members);
        let d = Driver {
            known_members,
            transfers,
            engine,
            store: Some(store),
            writing: None,
            jobs: VecDeque::new(),
            pending: VecDeque::new(),
            max_write_stall,
            transport,
            origin,
            req_rx,
            status_tx,
            apply,
            waiters: Waiters::default(),
            read_waiters: HashMap::new(),
            reads_after_apply: BTreeMap::new(),
            next_ctx: 1,
        };
        d.publish_status(None);
        d
    }

    fn now(&self) -> std::time::Duration {
        Instant::now().saturating_duration_since(self.origin)
    }

    pub(super) async fn run(
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
                Some(ev) = self.transfers.events_rx.recv() => Wake::Received(ev),
                Some(done) = self.transfers.done_rx.recv() => Wake::SendDone(done),
                Some(m) = self.transfers.chunk_rx.recv() => Wake::Chunk(m),
            };
            // The engine's clock must be current before it sees the event: it
            // stamps leader contact and re-arms the election timer with it.
            let now = self.now();
            self.engine.tick(now);
            self.engine.delivered(self.apply.applied());
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
                Wake::Message(m) => self.on_message(m),
                Wake::Timer => {}
                Wake::Chunk(m) => self.transport.send(m),
                Wake::SendDone(done) => self.on_send_done(done),
                Wake::Received(ev) => self.on_received(ev),
            }
            // Take everything else already waiting: one turn, one durable write.
            for _ in 0..MAX_EVENTS_PER_TURN {
                tokio::select! {
                    biased;
                    Some(r) = self.req_rx.recv() => self.handle_request(r),
                    Some(m) = self.transport.recv() => self.on_message(m),
                    _ = std::future::ready(()) => break,
                }
            }
            let now = self.now();
            self.engine.tick(now);
            if let Err(e) = self.process_ready() {
                tracing::error!(error = %e, "stopping node");
                break Err(e);
            }
            if let Some(recorded) = self.engine.refused() {
                break Err(Error::Refused {
                    id: self.engine.id(),
                    recorded,
                    mine: self.engine.incarnation(),
                });
            }
            if self.engine.membership() != &self.known_members {
                self.known_members = self.engine.membership().clone();
                self.transport.update_members(&self.known_members);
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
            // The status shows the change or the transfer before the caller
            // hears back: callers wait on the status for them to finish.
            Request::ChangeMembership(steps, reply) => {
                let r = self.engine.change_membership(&steps).map_err(Error::from);
                self.publish_status(None);
                let _ = reply.send(r);
            }
            Request::TransferLeadership(to, reply) => {
                let r = self.engine.transfer_leadership(to).map_err(Error::from);
                self.publish_status(None);
                let _ = reply.send(r);
            }
            Request::Submit(cmds, reply) => {
                let _ = reply.send(self.engine.propose_batch(cmds).map_err(Error::from));
            }
            Request::Propose(cmds, answered, reply) => {
                let res = self.engine.propose_batch(cmds).map(|ids| {
                    ids.into_iter()
                        .map(|id| self.waiters.register(id.index, id.term, answered))
                        .collect()
                });
                let _ = reply.send(res.map_err(Error::from));
            }
            Request::Release(index) => self.engine.release(index),
            Request::Progress(reply) => {
                let _ = reply.send(self.engine.peer_progress());
            }
            Request::SnapshotTaken(index, reply) => {
                let _ = reply.send(Ok(self.engine.snapshot_taken(index)));
            }
            Request::ReadIndex(reply) => {
                let ctx = self.next_ctx;
                self.next_ctx += 1;
                match self.engine.read_index(self.now(), ctx) {
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

    fn process_ready(&mut self) -> Result<(), Error> {
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
            for (to, meta) in std::mem::take(&mut rd.send_snapshots) {
                self.start_sending(to, meta);
            }
            let batch = LogBatch {
                hard_state: rd.hard_state,
                truncate_from: rd.truncate_from,
                entries: std::mem::take(&mut rd.entries),
                membership: rd.membership.take(),
                install: rd.install.take(),
                snapshot: rd.snapshot.take(),
                incarnation: None,
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
                apply_snapshot: rd.apply_snapshot.take(),
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
                .is_some_and(|j| j.batch.truncate_from.is_none() && j.batch.install.is_none())
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
            if j.batch.snapshot.is_some() {
                batch.snapshot = j.batch.snapshot;
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
            if let Some(meta) = p.apply_snapshot {
                self.deliver_snapshot(meta);
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
        let Some((last, last_term)) = committed.last().map(|e| (e.index, e.term)) else {
            return;
        };
        self.waiters.committed(last, last_term);
        let msgs = committed
            .into_iter()
            .map(|e| {
                let responder = self.waiters.take(e.index, e.term);
                ApplyMsg::from_entry(e, responder)
            })
            .collect();
        self.apply.hand_over(msgs);
        let rest = self.reads_after_apply.split_off(&(last + 1));
        for (idx, ws) in std::mem::replace(&mut self.reads_after_apply, rest) {
            for w in ws {
                let _ = w.send(Ok(idx));
            }
        }
    }

    /// The application loads a snapshot: entries it covers that were
    /// waited for have an unknown outcome here, reads up to it are served.
    fn deliver_snapshot(&mut self, meta: SnapshotMeta) {
        let last = meta.last.index;
        self.waiters.covered(last);
        self.apply.hand_over(vec![ApplyMsg::from_snapshot(meta)]);
        let rest = self.reads_after_apply.split_off(&(last + 1));
        for (idx, ws) in std::mem::replace(&mut self.reads_after_apply, rest) {
            for w in ws {
                let _ = w.send(Ok(idx));
            }
        }
    }

    /// A message from a peer: snapshot transfers are the driver's; the
    /// rest goes to the engine.
    fn on_message(&mut self, m: Message) {
        let now = self.now();
        match m.body {
            MessageBody::SnapshotChunk {
                meta,
                size,
                offset,
                data,
            } => self.on_chunk(m.from, m.term, meta, size, offset, data),
            MessageBody::SnapshotAck { index, next } => {
                if let Some(o) = self.transfers.outgoing.get(&m.from) {
                    if o.index == index && o.term == m.term {
                        let _ = o.acks.try_send(next);
                    }
                }
            }
            MessageBody::InstallSnapshot { .. } => {
                tracing::warn!(
                    from = m.from,
                    "dropping an InstallSnapshot from the network: only a finished transfer makes one"
                );
            }
            _ => self.engine.handle_message(now, m),
        }
    }

    /// Starts streaming `meta` to `to`, unless that transfer is running.
    fn start_sending(&mut self, to: NodeId, meta: SnapshotMeta) {
        let Some(store) = self.transfers.store.clone() else {
            tracing::warn!(
                to,
                "a follower needs a snapshot, but this node has no snapshot store"
            );
            self.engine.snapshot_failed(to, meta.last.index);
            return;
        };
        let index = meta.last.index;
        let term = self.engine.term();
        if self
            .transfers
            .outgoing
            .get(&to)
            .is_some_and(|o| o.index == index && o.term == term && !o.task.is_finished())
        {
            return;
        }
        let (acks_tx, acks_rx) = mpsc::channel(self.transfers.limits.in_flight * 2 + 4);
        let route = Route {
            from: self.engine.id(),
            to,
            term,
        };
        let limits = self.transfers.limits;
        let out = self.transfers.chunk_tx.clone();
        let done = self.transfers.done_tx.clone();
        tracing::info!(to, index, "sending a snapshot");
        let task = tokio::spawn(async move {
            let res = transfer::send(store, meta, route, limits, out, acks_rx).await;
            let _ = done.send((to, index, term, res));
        });
        // A transfer of an older snapshot, or from an older term, stops.
        if let Some(old) = self.transfers.outgoing.insert(
            to,
            Outgoing {
                index,
                term,
                acks: acks_tx,
                task,
            },
        ) {
            old.task.abort();
        }
    }

    fn on_send_done(&mut self, (to, index, term, res): SendDone) {
        if self
            .transfers
            .outgoing
            .get(&to)
            .is_some_and(|o| o.index == index && o.term == term)
        {
            self.transfers.outgoing.remove(&to);
        } else {
            // Replaced by a newer transfer: its outcome is that one's.
            return;
        }
        if term != self.engine.term() {
            return;
        }
        match res {
            Ok(()) => {
                tracing::info!(to, index, "snapshot sent");
                self.engine.snapshot_sent(to, index);
            }
            Err(e) => {
                tracing::warn!(to, index, error = %e, "snapshot transfer failed");
                self.engine.snapshot_failed(to, index);
            }
        }
    }

    /// A chunk from the leader: handed to the task storing that snapshot
    /// (started on the first chunk of a snapshot not being received).
    fn on_chunk(
        &mut self,
        from: NodeId,
        term: Term,
        meta: SnapshotMeta,
        size: u64,
        offset: u64,
        data: Vec<u8>,
    ) {
        // Only the leader of this node's term streams to it; chunks of a
        // newer term wait until its heartbeat raised the term here (the
        // leader resends), older ones are stale.
        if term != self.engine.term() || self.engine.leader() != Some(from) {
            return;
        }
        let Some(store) = self.transfers.store.clone() else {
            tracing::warn!(
                from,
                "a snapshot arrived, but this node has no snapshot store"
            );
            return;
        };
        let same = self.transfers.incoming.as_ref().is_some_and(|i| {
            i.meta == meta && i.leader == from && i.term == term && !i.chunks.is_closed()
        });
        if !same {
            if let Some(old) = self.transfers.incoming.take() {
                // Its writes must not mix with the new task's in one file.
                old.task.abort();
            }
            let cap = self.transfers.limits.in_flight * 2 + 4;
            let (tx, rx) = mpsc::channel(cap);
            let events = self.transfers.events_tx.clone();
            tracing::info!(from, index = meta.last.index, size, "receiving a snapshot");
            let task = tokio::spawn(transfer::receive(
                store,
                meta.clone(),
                size,
                from,
                term,
                rx,
                events,
            ));
            self.transfers.incoming = Some(Incoming {
                leader: from,
                term,
                meta,
                chunks: tx,
                task,
            });
        }
        // The task answers chunks that do not follow on; a full queue only
        // means the leader sent more than its window (it resends).
        if let Some(inc) = self.transfers.incoming.as_ref() {
            let _ = inc.chunks.try_send((offset, data));
        }
    }

    fn on_received(&mut self, ev: Received) {
        match ev {
            Received::Ack {
                leader,
                term,
                index,
                next,
            } => self.transport.send(Message {
                from: self.engine.id(),
                to: leader,
                term,
                incarnation: 0,
                body: MessageBody::SnapshotAck { index, next },
            }),
            Received::Done {
                leader,
                term,
                meta,
                size,
            } => {
                if self
                    .transfers
                    .incoming
                    .as_ref()
                    .is_some_and(|i| i.meta == meta && i.leader == leader && i.term == term)
                {
                    self.transfers.incoming = None;
                }
                let index = meta.last.index;
                self.transport.send(Message {
                    from: self.engine.id(),
                    to: leader,
                    term,
                    incarnation: 0,
                    body: MessageBody::SnapshotAck { index, next: size },
                });
                tracing::info!(from = leader, index, "snapshot received");
                let now = self.now();
                self.engine.handle_message(
                    now,
                    Message {
                        from: leader,
                        to: self.engine.id(),
                        term,
                        incarnation: 0,
                        body: MessageBody::InstallSnapshot { meta },
                    },
                );
            }
            Received::Failed {
                leader,
                term,
                index,
                error,
            } => {
                tracing::warn!(index, error = %error, "storing a snapshot failed");
                if self.transfers.incoming.as_ref().is_some_and(|i| {
                    i.meta.last.index == index && i.leader == leader && i.term == term
                }) {
                    self.transfers.incoming = None;
                }
            }
        }
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
        self.waiters.fail_all(why);
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
        let applied = self.apply.applied();
        self.status_tx.send_if_modified(|s| {
            let new = Status {
                id: e.id(),
                role: e.role(),
                term: e.term(),
                leader: e.leader(),
                commit_index: e.commit_index(),
                applied_index: applied,
                last_log_index: e.last_log_id().index,
                purged_index: e.purged().index,
                released_index: e.released(),
                snapshot_index: e.snapshot().map_or(0, |m| m.last.index),
                snapshot_wanted: e.snapshot_wanted(),
                members: e.membership().all_voters().into_iter().collect(),
                membership: e.membership().clone(),
                change_in_flight: e.change_in_flight(),
                transferring_to: e.transferring_to(),
                incarnation: e.incarnation(),
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
