//! Prometheus metrics and the health endpoints (`--metrics-addr`).
//!
//! Counters and histograms are updated where things happen (the client
//! port, the write path, the log store); gauges of Raft's state are read
//! from the node when a scrape arrives. The HTTP side answers three paths
//! and closes the connection after each answer: `/metrics`, `/health` and
//! `/ready`.

use crate::node::KvNode;
use async_trait::async_trait;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use raft_core::{LogBatch, LogId, LogState, LogStore, Role, StorageError};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabel {
    command: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabel {
    role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

const ROLES: &[&str] = &["follower", "candidate", "leader", "learner", "stopped"];

/// One node's metrics.
pub struct Metrics {
    registry: Registry,
    /// One scrape at a time: the gauges are set, then read.
    rendering: std::sync::Mutex<()>,
    /// Clients connected now.
    pub client_connections: Gauge,
    rejected: Family<ReasonLabel, Counter>,
    commands: Family<CommandLabel, Counter>,
    /// `commands`' counters, one per command this store serves (in the
    /// order of [`crate::command::names`]), made once: counting a command
    /// takes no lock, and a client cannot grow the label set (anything else
    /// counts as `other`).
    command_counters: Vec<Counter>,
    other_commands: Counter,
    errors: Family<CodeLabel, Counter>,
    /// Writes proposed on this node (as leader).
    pub proposals: Counter,
    /// A write proposed on this node until it was applied and answered.
    pub commit_latency: Histogram,
    /// One durable log save (fsync included).
    pub log_save: Histogram,
    /// Leader changes this node saw.
    pub leader_changes: Counter,
    /// Snapshots this node took or loaded.
    pub snapshots: Counter,
    /// Messages to peers the transport dropped because a queue was full.
    peer_messages_dropped: Counter,
    peer_messages_sent: Counter,
    /// The QUIC transport's counters (the binary's transport).
    net: std::sync::OnceLock<raft_net_quic::NetStats>,
    role: Family<RoleLabel, Gauge>,
    term: Gauge,
    commit_index: Gauge,
    applied_index: Gauge,
    last_log_index: Gauge,
    compacted_index: Gauge,
    apply_lag: Gauge,
    peer_match: Family<PeerLabel, Gauge>,
    peer_lag: Family<PeerLabel, Gauge>,
    snapshot_index: Gauge,
    snapshot_bytes: Gauge,
    snapshot_duration: Gauge<f64, AtomicU64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn latency_buckets() -> Histogram {
    // 50 µs .. about 6.5 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
}

impl Metrics {
    /// All metrics, registered under the `raftkv_` prefix.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("raftkv");
        let m = Metrics {
            client_connections: Gauge::default(),
            rejected: Family::default(),
            commands: Family::default(),
            command_counters: Vec::new(),
            other_commands: Counter::default(),
            errors: Family::default(),
            proposals: Counter::default(),
            commit_latency: latency_buckets(),
            log_save: latency_buckets(),
            leader_changes: Counter::default(),
            snapshots: Counter::default(),
            peer_messages_dropped: Counter::default(),
            peer_messages_sent: Counter::default(),
            net: std::sync::OnceLock::new(),
            role: Family::default(),
            term: Gauge::default(),
            commit_index: Gauge::default(),
            applied_index: Gauge::default(),
            last_log_index: Gauge::default(),
            compacted_index: Gauge::default(),
            apply_lag: Gauge::default(),
            peer_match: Family::default(),
            peer_lag: Family::default(),
            snapshot_index: Gauge::default(),
            snapshot_bytes: Gauge::default(),
            snapshot_duration: Gauge::default(),
            registry: Registry::default(),
            rendering: std::sync::Mutex::new(()),
        };
        r.register(
            "client_connections",
            "Clients connected now",
            m.client_connections.clone(),
        );
        r.register(
            "client_connections_rejected",
            "Client connections refused, by reason (maxclients, tls)",
            m.rejected.clone(),
        );
        r.register(
            "commands",
            "Client commands received, by name (other: unknown names)",
            m.commands.clone(),
        );
        r.register(
            "command_errors",
            "Error replies sent to clients, by Redis error code",
            m.errors.clone(),
        );
        r.register(
            "raft_proposals",
            "Writes proposed on this node as leader",
            m.proposals.clone(),
        );
        r.register(
            "raft_commit_latency_seconds",
            "A write proposed on this node until it was applied and answered",
            m.commit_latency.clone(),
        );
        r.register(
            "log_save_seconds",
            "One durable log save, fsync included",
            m.log_save.clone(),
        );
        r.register(
            "raft_leader_changes",
            "Leader changes this node saw",
            m.leader_changes.clone(),
        );
        r.register(
            "snapshots",
            "Snapshots this node took or loaded",
            m.snapshots.clone(),
        );
        r.register(
            "peer_messages_dropped",
            "Messages to peers dropped because the peer's send queue was full",
            m.peer_messages_dropped.clone(),
        );
        r.register(
            "peer_messages_sent",
            "Messages queued to peers (appends, heartbeats, votes, answers, snapshot chunks)",
            m.peer_messages_sent.clone(),
        );
        r.register(
            "raft_role",
            "1 for this node's current role",
            m.role.clone(),
        );
        r.register("raft_term", "The current term", m.term.clone());
        r.register(
            "raft_commit_index",
            "The commit index",
            m.commit_index.clone(),
        );
        r.register(
            "raft_applied_index",
            "The last entry applied to the state machine",
            m.applied_index.clone(),
        );
        r.register(
            "raft_last_log_index",
            "The last index in the log",
            m.last_log_index.clone(),
        );
        r.register(
            "raft_compacted_index",
            "Entries up to this index are no longer in the log",
            m.compacted_index.clone(),
        );
        r.register(
            "raft_apply_lag_entries",
            "Committed entries not applied yet",
            m.apply_lag.clone(),
        );
        r.register(
            "raft_peer_match_index",
            "The last index known replicated on each peer (leader only)",
            m.peer_match.clone(),
        );
        r.register(
            "raft_peer_lag_entries",
            "Entries each peer is behind the leader's log (leader only)",
            m.peer_lag.clone(),
        );
        r.register(
            "snapshot_index",
            "The last index of the latest snapshot",
            m.snapshot_index.clone(),
        );
        r.register(
            "snapshot_bytes",
            "The size of the latest snapshot",
            m.snapshot_bytes.clone(),
        );
        r.register(
            "snapshot_last_duration_seconds",
            "How long the latest snapshot took to take or load",
            m.snapshot_duration.clone(),
        );
        let command_counters = crate::command::names()
            .map(|name| {
                let command = name.to_ascii_uppercase();
                m.commands.get_or_create(&CommandLabel { command }).clone()
            })
            .collect();
        let other_commands = m
            .commands
            .get_or_create(&CommandLabel {
                command: "other".into(),
            })
            .clone();
        Metrics {
            registry: r,
            command_counters,
            other_commands,
            ..m
        }
    }

    /// Counts a client command by its name (any case); returns the name
    /// it was counted under, in lower case (`other` for names not served).
    pub fn command(&self, name: &[u8]) -> &'static str {
        match crate::command::names().position(|c| c.as_bytes().eq_ignore_ascii_case(name)) {
            Some(i) => {
                self.command_counters[i].inc();
                crate::command::names().nth(i).unwrap_or("other")
            }
            None => {
                self.other_commands.inc();
                "other"
            }
        }
    }

    /// Counts an error reply.
    pub fn command_error(&self, e: &crate::error::KvError) {
        self.command_error_code(crate::resp::error_code(e));
    }

    /// Counts an error reply by its code.
    pub fn command_error_code(&self, code: &'static str) {
        self.errors.get_or_create(&CodeLabel { code }).inc();
    }

    /// Counts a refused client connection.
    pub fn client_rejected(&self, reason: &'static str) {
        self.rejected.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Reads Raft's state into the gauges and renders everything (the
    /// leader's per-peer progress asked of Raft now).
    pub async fn scrape(&self, node: &KvNode) -> String {
        let progress = node.raft().peer_progress().await;
        self.render_with(node, &progress)
    }

    /// Reads the transport's counters from now on.
    pub fn set_net(&self, net: raft_net_quic::NetStats) {
        let _ = self.net.set(net);
    }

    /// Messages to peers the transport dropped from a full queue (0 for a
    /// transport that does not count them).
    pub fn peer_messages_dropped(&self) -> u64 {
        self.net.get().map_or(0, raft_net_quic::NetStats::dropped)
    }

    /// Messages queued to peers (0 for a transport that does not count
    /// them).
    pub fn peer_messages_sent(&self) -> u64 {
        self.net.get().map_or(0, raft_net_quic::NetStats::sent)
    }

    /// Renders without per-peer progress (for callers that cannot wait).
    pub fn render(&self, node: &KvNode) -> String {
        self.render_with(node, &[])
    }

    fn render_with(&self, node: &KvNode, progress: &[(u64, u64)]) -> String {
        let _one = self.rendering.lock().unwrap_or_else(|p| p.into_inner());
        let s = node.raft().status();
        let role = match s.role {
            _ if s.stopped.is_some() => "stopped",
            Role::Leader => "leader",
            Role::Candidate | Role::PreCandidate => "candidate",
            Role::Follower if !s.membership.voters.contains(&s.id) => "learner",
            Role::Follower => "follower",
        };
        for r in ROLES {
            self.role
                .get_or_create(&RoleLabel { role: r })
                .set(i64::from(*r == role));
        }
        let g = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
        let applied = node.applied_index();
        self.term.set(g(s.term));
        self.commit_index.set(g(s.commit_index));
        self.applied_index.set(g(applied));
        self.last_log_index.set(g(s.last_log_index));
        self.compacted_index.set(g(s.purged_index));
        self.apply_lag
            .set(g(s.commit_index.saturating_sub(applied)));
        self.peer_match.clear();
        self.peer_lag.clear();
        for &(peer, matched) in progress {
            let l = PeerLabel {
                peer: peer.to_string(),
            };
            self.peer_match.get_or_create(&l).set(g(matched));
            self.peer_lag
                .get_or_create(&l)
                .set(g(s.last_log_index.saturating_sub(matched)));
        }
        let st = node.snapshots().stats();
        let (taken, counted) = (node.snapshots().recorded(), self.snapshots.get());
        if taken > counted {
            self.snapshots.inc_by(taken - counted);
        }
        let (dropped, counted) = (
            self.peer_messages_dropped(),
            self.peer_messages_dropped.get(),
        );
        if dropped > counted {
            self.peer_messages_dropped.inc_by(dropped - counted);
        }
        let (sent, counted) = (self.peer_messages_sent(), self.peer_messages_sent.get());
        if sent > counted {
            self.peer_messages_sent.inc_by(sent - counted);
        }
        self.snapshot_index.set(g(s.snapshot_index));
        self.snapshot_bytes.set(g(st.bytes));
        self.snapshot_duration
            .set(st.last_duration_ms as f64 / 1000.0);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts leader changes as the node sees them, until the node stops.
    pub fn watch_leader(self: &Arc<Self>, node: &KvNode) -> tokio::task::JoinHandle<()> {
        let mut rx = node.raft().watch_status();
        let m = self.clone();
        tokio::spawn(async move {
            let mut leader = rx.borrow().leader;
            while rx.changed().await.is_ok() {
                let now = rx.borrow().leader;
                if now.is_some() && now != leader {
                    m.leader_changes.inc();
                }
                leader = now;
            }
        })
    }
}

/// A log store that times each save into [`Metrics::log_save`].
pub struct TimedLog<L> {
    inner: L,
    metrics: Arc<Metrics>,
}

impl<L> TimedLog<L> {
    /// Wraps `inner`.
    pub fn new(inner: L, metrics: Arc<Metrics>) -> Self {
        TimedLog { inner, metrics }
    }
}

#[async_trait]
impl<L: LogStore> LogStore for TimedLog<L> {
    async fn load(&mut self) -> Result<LogState, StorageError> {
        self.inner.load().await
    }

    async fn save(&mut self, batch: LogBatch) -> Result<(), StorageError> {
        let t = Instant::now();
        let r = self.inner.save(batch).await;
        self.metrics.log_save.observe(t.elapsed().as_secs_f64());
        r
    }

    async fn purge(&mut self, upto: LogId) -> Result<(), StorageError> {
        self.inner.purge(upto).await
    }
}

/// Whether the node can serve: it knows a leader and applies up to the
/// commit index it knows now within [`READY_APPLY_WAIT`] (under steady
/// writes the applied index always trails the commit index a little; a
/// node catching up trails it for longer).
pub async fn ready(node: &KvNode) -> bool {
    let s = node.raft().status();
    s.stopped.is_none()
        && s.leader.is_some()
        && node.wait_applied(s.commit_index, READY_APPLY_WAIT).await
}

/// How long `/ready` waits for the applied index to reach the commit index.
pub const READY_APPLY_WAIT: Duration = Duration::from_secs(1);
/// Metrics connections served at once; more wait for the accept loop.
const HTTP_CONNECTIONS: usize = 16;

/// Serves `/metrics`, `/health` and `/ready` until the task is aborted:
/// at most [`HTTP_CONNECTIONS`] at once, each given 5 seconds.
pub async fn serve_http(listener: TcpListener, node: Arc<KvNode>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(HTTP_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (mut sock, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let node = node.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(Duration::from_secs(5), answer(&mut sock, &node)).await;
        });
    }
}

/// Reads one request head (at most 8 KiB) and answers it.
async fn answer(sock: &mut tokio::net::TcpStream, node: &KvNode) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let path = loop {
        let mut chunk = [0u8; 1024];
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let head = req.method == Some("HEAD");
                break (req.method == Some("GET") || head)
                    .then(|| (req.path.unwrap_or("").to_string(), head));
            }
            Ok(httparse::Status::Partial) if buf.len() < 8192 => continue,
            _ => {
                return respond(sock, 400, "text/plain", "bad request\n", false).await;
            }
        }
    };
    let Some((path, head)) = path else {
        return respond(sock, 405, "text/plain", "only GET\n", false).await;
    };
    let respond = |sock, code, ctype, body| respond(sock, code, ctype, body, head);
    match path.split('?').next().unwrap_or("") {
        "/metrics" => {
            let body = node.metrics().scrape(node).await;
            respond(
                sock,
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                &body,
            )
            .await
        }
        "/health" => match node.stopped() {
            None => respond(sock, 200, "text/plain", "ok\n").await,
            Some(why) => respond(sock, 503, "text/plain", &format!("stopped: {why}\n")).await,
        },
        "/ready" => {
            if ready(node).await {
                respond(sock, 200, "text/plain", "ready\n").await
            } else {
                respond(sock, 503, "text/plain", "not ready\n").await
            }
        }
        _ => respond(sock, 404, "text/plain", "not found\n").await,
    }
}

/// Answers with `body` (its length only, for HEAD) and closes.
async fn respond(
    sock: &mut tokio::net::TcpStream,
    code: u16,
    ctype: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    if !head_only {
        sock.write_all(body.as_bytes()).await?;
    }
    sock.shutdown().await
}
