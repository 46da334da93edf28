//! The Redis-protocol server: one task per client connection, pipelined
//! requests answered in order. Each request is parsed once into a
//! [`Command`]; consecutive writes go to the node together.
//!
//! The client port is built to survive hostile clients: requests are parsed
//! incrementally (linear CPU in their size), unauthenticated clients get
//! Redis's small pre-AUTH limits, replies are written as they are produced
//! and one reply may not exceed the output limit, the number of clients is
//! capped, idle clients may be closed, and an idle connection holds no
//! buffers.

use crate::command::{ClientCmd, Command, ReadTx, TxCmd, Value, WriteCmd};
use crate::error::{KvError, Reply};
use crate::metrics::Metrics;
use crate::node::KvNode;
use crate::resp::{encode_reply_as, error_line, Limits, RequestParser};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Limits and settings of the client port.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Clients must AUTH with this password when set.
    pub password: Option<String>,
    /// Most clients connected at once (Redis's `maxclients`).
    pub max_clients: usize,
    /// Close a client idle this long (Redis's `timeout`; `None`: never).
    pub idle_timeout: Option<Duration>,
    /// Largest single reply; a client whose reply would pass it gets an
    /// error and is disconnected.
    pub output_limit: usize,
    /// TLS on the client port.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// A client that does not take its replies (or a backup's next piece)
    /// for this long is disconnected.
    pub write_timeout: Duration,
    /// With a password: a client that has not authenticated this long
    /// after connecting is disconnected.
    pub auth_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            password: None,
            max_clients: DEFAULT_MAX_CLIENTS,
            idle_timeout: None,
            output_limit: DEFAULT_OUTPUT_LIMIT,
            tls: None,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            auth_timeout: DEFAULT_AUTH_TIMEOUT,
        }
    }
}

/// Default `--maxclients`, as Redis.
pub const DEFAULT_MAX_CLIENTS: usize = 10_000;
/// Default `--client-output-limit`: 64 MiB.
pub const DEFAULT_OUTPUT_LIMIT: usize = 64 << 20;
/// Default [`ClientConfig::write_timeout`].
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default [`ClientConfig::auth_timeout`].
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Once the server is stopping, how long a connection may still take to
/// write what it owes.
const STOP_WRITE_GRACE: Duration = Duration::from_secs(2);
/// Replies are written to the socket once this many bytes are queued.
const WRITE_CHUNK: usize = 64 * 1024;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 16 * 1024;

/// A client connection's byte stream: plain TCP or TLS.
pub trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send {
    /// Waits for bytes and appends them to `buf`; 0 at end of stream. An
    /// idle plain connection holds no buffer while it waits.
    fn fill(&mut self, buf: &mut Vec<u8>) -> impl Future<Output = std::io::Result<usize>> + Send;
}

impl ClientIo for TcpStream {
    async fn fill(&mut self, buf: &mut Vec<u8>) -> std::io::Result<usize> {
        loop {
            self.readable().await?;
            buf.reserve(READ_CHUNK);
            match self.try_read_buf(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl ClientIo for tokio_rustls::server::TlsStream<TcpStream> {
    async fn fill(&mut self, buf: &mut Vec<u8>) -> std::io::Result<usize> {
        buf.reserve(READ_CHUNK);
        self.read_buf(buf).await
    }
}

/// Resolves once `stop` turns true; never, if its sender is gone (a
/// dropped handle does not stop the server).
async fn stopping(stop: &mut tokio::sync::watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Accepts clients until `stop` turns true (or the task is aborted); then
/// stops accepting, lets every connection finish the requests it has read
/// (idle ones close at once), and returns when all have closed.
pub async fn serve(
    listener: TcpListener,
    node: Arc<KvNode>,
    cfg: ClientConfig,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let cfg = Arc::new(cfg);
    let tls = cfg.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let connected = Arc::new(AtomicUsize::new(0));
    let clients = Arc::new(Clients::default());
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            _ = stopping(&mut stop) => break,
        };
        match accepted {
            Ok((sock, peer)) => {
                let _ = sock.set_nodelay(true);
                // Dead peers (a host that vanished) are found and their
                // places freed.
                let _ = socket2::SockRef::from(&sock).set_keepalive(true);
                if connected.load(Ordering::Relaxed) >= cfg.max_clients {
                    metrics.client_rejected("maxclients");
                    // One try, without waiting on the client (a TLS client
                    // cannot read it and just sees the close).
                    if tls.is_none() {
                        let _ = sock.try_write(b"-ERR max number of clients reached\r\n");
                    }
                    continue;
                }
                let guard = ClientGuard::new(&connected, &metrics);
                let laddr = sock.local_addr().map(|a| a.to_string()).unwrap_or_default();
                let (id, entry, kill) = clients.add(peer.to_string(), laddr);
                let me = Me {
                    id,
                    entry,
                    kill,
                    clients: clients.clone(),
                };
                let (node, cfg, metrics, tls, stop) = (
                    node.clone(),
                    cfg.clone(),
                    metrics.clone(),
                    tls.clone(),
                    stop.clone(),
                );
                conns.spawn(async move {
                    let _guard = guard;
                    let res = match tls {
                        None => connection(sock, &node, &cfg, &metrics, stop, &me).await,
                        Some(acceptor) => {
                            match tokio::time::timeout(
                                Duration::from_secs(10),
                                acceptor.accept(sock),
                            )
                            .await
                            {
                                Ok(Ok(s)) => connection(s, &node, &cfg, &metrics, stop, &me).await,
                                Ok(Err(e)) => {
                                    metrics.client_rejected("tls");
                                    Err(e)
                                }
                                Err(_) => {
                                    metrics.client_rejected("tls");
                                    Err(std::io::Error::other("TLS handshake timed out"))
                                }
                            }
                        }
                    };
                    if let Err(e) = res {
                        tracing::debug!(%peer, error = %e, "client connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    // Connections between requests close now; the others after answering
    // what they have read.
    for (_, c) in clients.all() {
        entry_lock(&c).kill.notify_one();
    }
    while conns.join_next().await.is_some() {}
}

/// A connection's entry in [`Clients`], removed when it ends.
struct Me {
    id: u64,
    entry: Arc<std::sync::Mutex<ClientEntry>>,
    kill: Arc<tokio::sync::Notify>,
    clients: Arc<Clients>,
}

impl Drop for Me {
    fn drop(&mut self) {
        self.clients.remove(self.id);
    }
}

/// Counts a connected client while it lives.
struct ClientGuard {
    connected: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl ClientGuard {
    fn new(connected: &Arc<AtomicUsize>, metrics: &Arc<Metrics>) -> Self {
        connected.fetch_add(1, Ordering::Relaxed);
        metrics.client_connections.inc();
        ClientGuard {
            connected: connected.clone(),
            metrics: metrics.clone(),
        }
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.connected.fetch_sub(1, Ordering::Relaxed);
        self.metrics.client_connections.dec();
    }
}

/// A reply in a pipeline: known now, or a write not yet sent; with the
/// protocol (RESP3 or not) in force when its command was read.
enum Pending {
    Now(Reply, bool),
    Write(WriteCmd, bool),
}

/// The clients connected to this node, for `CLIENT LIST`, `CLIENT INFO`
/// and `CLIENT KILL`.
#[derive(Debug, Default)]
pub struct Clients {
    next_id: std::sync::atomic::AtomicU64,
    /// Each entry has a lock of its own: a connection updates its entry
    /// on every command without touching the others'.
    map: std::sync::Mutex<std::collections::BTreeMap<u64, Arc<std::sync::Mutex<ClientEntry>>>>,
}

/// One connected client.
#[derive(Debug)]
struct ClientEntry {
    addr: String,
    laddr: String,
    name: Vec<u8>,
    lib_name: Vec<u8>,
    lib_ver: Vec<u8>,
    resp: u8,
    since: std::time::Instant,
    last: std::time::Instant,
    cmd: &'static str,
    kill: Arc<tokio::sync::Notify>,
}

impl ClientEntry {
    fn line(&self, id: u64) -> String {
        let now = std::time::Instant::now();
        format!(
            "id={id} addr={} laddr={} fd=-1 name={} age={} idle={} flags=N db=0 sub=0 psub=0 ssub=0 multi=-1 watch=0 cmd={} user=default redir=-1 resp={} lib-name={} lib-ver={}\n",
            self.addr,
            self.laddr,
            String::from_utf8_lossy(&self.name),
            now.duration_since(self.since).as_secs(),
            now.duration_since(self.last).as_secs(),
            self.cmd,
            self.resp,
            String::from_utf8_lossy(&self.lib_name),
            String::from_utf8_lossy(&self.lib_ver),
        )
    }
}

impl Clients {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::BTreeMap<u64, Arc<std::sync::Mutex<ClientEntry>>>,
    > {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection; its id, its entry and the signal that kills it.
    fn add(
        &self,
        addr: String,
        laddr: String,
    ) -> (
        u64,
        Arc<std::sync::Mutex<ClientEntry>>,
        Arc<tokio::sync::Notify>,
    ) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let kill = Arc::new(tokio::sync::Notify::new());
        let now = std::time::Instant::now();
        let entry = Arc::new(std::sync::Mutex::new(ClientEntry {
            addr,
            laddr,
            name: Vec::new(),
            lib_name: Vec::new(),
            lib_ver: Vec::new(),
            resp: 2,
            since: now,
            last: now,
            cmd: "NULL",
            kill: kill.clone(),
        }));
        self.lock().insert(id, entry.clone());
        (id, entry, kill)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Every entry, in id order.
    fn all(&self) -> Vec<(u64, Arc<std::sync::Mutex<ClientEntry>>)> {
        self.lock().iter().map(|(&i, e)| (i, e.clone())).collect()
    }
}

fn entry_lock(e: &std::sync::Mutex<ClientEntry>) -> std::sync::MutexGuard<'_, ClientEntry> {
    e.lock().unwrap_or_else(|p| p.into_inner())
}

/// Elements beyond which a reply is encoded on the blocking pool.
const LARGE_REPLY: usize = 1024;

/// A reply of more than [`LARGE_REPLY`] elements.
fn is_large(r: &Reply) -> bool {
    match r {
        Ok(Value::Array(a)) => a.len() > LARGE_REPLY,
        Ok(Value::List(a) | Value::Set(a) | Value::Pairs(a)) => a.len() > LARGE_REPLY,
        Ok(Value::Map(m)) => m.len() > LARGE_REPLY,
        _ => false,
    }
}

impl Session<'_> {
    /// Runs `f` on this connection's entry.
    fn with<T>(&self, f: impl FnOnce(&mut ClientEntry) -> T) -> T {
        f(&mut entry_lock(&self.me.entry))
    }
}

/// What MULTI does with a command.
enum Queued {
    Tx(TxCmd),
    Nested,
    Watch,
    NotAllowed,
    PassThrough,
}

/// How a parsed command behaves inside MULTI.
fn cmd_ref(c: &Command) -> Queued {
    match c {
        Command::Write(w) => Queued::Tx(TxCmd::Write(w.clone())),
        Command::Read(r) => match ReadTx::from_read(r.clone()) {
            Some(r) => Queued::Tx(TxCmd::Read(r)),
            None => Queued::NotAllowed,
        },
        Command::Ping(m) => Queued::Tx(TxCmd::Ping(m.clone())),
        Command::Echo(m) => Queued::Tx(TxCmd::Echo(m.clone())),
        Command::Multi => Queued::Nested,
        Command::Watch(_) => Queued::Watch,
        Command::Unwatch | Command::Select(0) => Queued::Tx(TxCmd::Reply(Value::Ok)),
        Command::Select(_) => Queued::Tx(TxCmd::Reply(Value::Error(crate::resp::error_reply(
            &KvError::DbOutOfRange,
        )))),
        Command::Exec | Command::Discard | Command::Quit | Command::Reset => Queued::PassThrough,
        _ => Queued::NotAllowed,
    }
}

/// A client name Redis would take: printable ASCII without spaces.
fn valid_client_name(n: &[u8]) -> bool {
    n.iter().all(|&c| (b'!'..=b'~').contains(&c))
}

/// Compares two passwords in time independent of where they differ (and of
/// their lengths: both are hashed first).
fn password_matches(expected: &str, given: &[u8]) -> bool {
    use ring::digest::{digest, SHA256};
    use subtle::ConstantTimeEq;
    let a = digest(&SHA256, expected.as_bytes());
    let b = digest(&SHA256, given);
    a.as_ref().ct_eq(b.as_ref()).into()
}

/// Per-connection state.
struct Session<'a> {
    node: &'a KvNode,
    cfg: &'a ClientConfig,
    metrics: &'a Metrics,
    authed: bool,
    /// A backup file to stream as the next reply, then remove.
    stream: Option<std::path::PathBuf>,
    /// A reply passed the output limit, or QUIT: close after the replies.
    close: bool,
    /// RESP3 (after `HELLO 3`).
    resp3: bool,
    /// This connection's id.
    id: u64,
    me: &'a Me,
    /// Inside MULTI: the queued commands.
    multi: Option<Vec<TxCmd>>,
    /// A command queued in MULTI was refused: EXEC answers EXECABORT.
    multi_failed: bool,
    /// WATCH: the keys, each with the index its watch started after.
    watching: Option<Vec<(Vec<u8>, u64)>>,
}

impl Session<'_> {
    /// Sends the pipeline's queued writes as one batch and encodes every
    /// queued reply, in order.
    async fn flush_pending(&self, pending: &mut Vec<Pending>, out: &mut Vec<u8>) {
        if pending.is_empty() {
            return;
        }
        let writes: Vec<WriteCmd> = pending
            .iter_mut()
            .filter_map(|r| match r {
                Pending::Write(c, _) => Some(std::mem::replace(c, WriteCmd::Del(Vec::new()))),
                Pending::Now(..) => None,
            })
            .collect();
        let mut replies = if writes.is_empty() {
            Vec::new().into_iter()
        } else {
            self.node.write(writes).await.into_iter()
        };
        for r in pending.drain(..) {
            let (r, resp3) = match r {
                Pending::Now(r, v) => (r, v),
                Pending::Write(_, v) => (
                    replies
                        .next()
                        .unwrap_or_else(|| Err(KvError::Internal("lost a reply".into()))),
                    v,
                ),
            };
            if let Err(e) = &r {
                self.metrics.command_error(e);
            }
            encode_reply_as(out, &r, resp3);
        }
    }

    /// Runs one request; writes are queued in `pending`, anything that must
    /// observe them (a read) sends them first.
    async fn execute(&mut self, args: Vec<Vec<u8>>, pending: &mut Vec<Pending>, out: &mut Vec<u8>) {
        // AUTH, then the AUTH requirement, then a stopped node's answer come
        // before the command is even looked at: nothing about commands is
        // revealed before AUTH, nor served by a stopped node.
        let name = args
            .first()
            .map(|a| a.to_ascii_uppercase())
            .unwrap_or_default();
        let v3 = self.resp3;
        let now = |r: Reply| Pending::Now(r, v3);
        // HELLO may authenticate, or is refused with its own NOAUTH text.
        let is_auth = name == b"AUTH" || name == b"HELLO";
        // Connection commands a client sends before anything else.
        let connection = is_auth || name == b"QUIT" || name == b"RESET";
        if !is_auth && !self.authed {
            if name == b"QUIT" {
                self.close = true;
                return pending.push(now(Ok(Value::Ok)));
            }
            return pending.push(now(Err(KvError::AuthRequired)));
        }
        let label = self.metrics.command(&name);
        self.with(|c| {
            c.last = std::time::Instant::now();
            c.cmd = label;
        });
        if !connection && name != b"INFO" {
            if let Some(why) = self.node.stopped() {
                return pending.push(now(Err(KvError::Stopped(why))));
            }
        }
        let cmd = match Command::parse(args) {
            Ok(c) => c,
            Err(e) => {
                if let Some(q) = self.multi.as_mut() {
                    // As in Redis: an unknown command or a wrong number of
                    // arguments dooms the transaction; a bad argument is
                    // found only when it runs, so its error is queued.
                    if matches!(
                        e,
                        KvError::WrongArity(_)
                            | KvError::UnknownCommand { .. }
                            | KvError::UnknownSubcommand { .. }
                    ) {
                        self.multi_failed = true;
                    } else {
                        q.push(TxCmd::Reply(Value::Error(crate::resp::error_reply(&e))));
                        return pending.push(now(Ok(Value::Status("QUEUED".into()))));
                    }
                }
                return pending.push(now(Err(e)));
            }
        };
        if self.multi.is_some() {
            if let Some(r) = self.queue(cmd_ref(&cmd)) {
                return pending.push(now(r));
            }
        }
        if let Command::Auth(user, pw) = &cmd {
            let r = match &self.cfg.password {
                None => Err(KvError::NoPasswordSet),
                // The one user there is: `default`, as in Redis.
                Some(p)
                    if password_matches(p, pw)
                        && user.as_deref().is_none_or(|u| u == b"default") =>
                {
                    self.authed = true;
                    Ok(Value::Ok)
                }
                Some(_) => Err(KvError::WrongPassword),
            };
            return pending.push(now(r));
        }
        if let Command::Hello {
            proto,
            auth,
            setname,
        } = cmd
        {
            let r = self.hello(proto, auth, setname);
            // The answer comes in the protocol it chose.
            return pending.push(Pending::Now(r, self.resp3));
        }
        if let Some(queued) = self.multi.take() {
            let failed = std::mem::take(&mut self.multi_failed);
            match cmd {
                Command::Discard => {
                    self.watching = None;
                    return pending.push(now(Ok(Value::Ok)));
                }
                Command::Exec if failed => {
                    self.watching = None;
                    return pending.push(now(Err(KvError::ExecAbort)));
                }
                Command::Exec => {
                    // One log entry: applied on every node at once, after
                    // the writes this connection sent before it. Watched
                    // keys are checked when it is applied.
                    self.flush_pending(pending, out).await;
                    let exec = match self.watching.take() {
                        Some(keys) => Some(WriteCmd::ExecWatched { keys, cmds: queued }),
                        None if queued.is_empty() => None,
                        None => Some(WriteCmd::Exec(queued)),
                    };
                    let r = match exec {
                        None => Ok(Value::List(Vec::new())),
                        Some(w) => self
                            .node
                            .write(vec![w])
                            .await
                            .pop()
                            .unwrap_or_else(|| Err(KvError::Internal("lost a reply".into()))),
                    };
                    return pending.push(now(r));
                }
                // QUIT and RESET end the transaction.
                _ => {}
            }
        }
        let r = match cmd {
            Command::Ping(None) => Ok(Value::Status("PONG".into())),
            Command::Ping(Some(m)) | Command::Echo(m) => Ok(Value::Bulk(m)),
            Command::Info => Ok(Value::Verbatim(self.node.info())),
            Command::Client(c) => self.client(c),
            Command::Select(0) => Ok(Value::Ok),
            Command::Select(_) => Err(KvError::DbOutOfRange),
            Command::Quit => {
                self.close = true;
                Ok(Value::Ok)
            }
            Command::Reset => {
                self.multi = None;
                self.multi_failed = false;
                self.watching = None;
                self.resp3 = false;
                self.authed = self.cfg.password.is_none();
                self.with(|c| {
                    c.name.clear();
                    c.resp = 2;
                });
                Ok(Value::Status("RESET".into()))
            }
            Command::Time => {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                Ok(Value::List(vec![
                    Value::text(t.as_secs().to_string()),
                    Value::text(t.subsec_micros().to_string()),
                ]))
            }
            Command::CommandInfo(q) => Ok(crate::command::describe(&q)),
            Command::Multi => {
                self.multi = Some(Vec::new());
                self.multi_failed = false;
                Ok(Value::Ok)
            }
            Command::Discard => Err(KvError::Tx("DISCARD without MULTI".into())),
            Command::Exec => Err(KvError::Tx("EXEC without MULTI".into())),
            Command::Watch(keys) => {
                // WATCH observes this connection's earlier writes.
                self.flush_pending(pending, out).await;
                match self.node.watch_index().await {
                    Ok(i) => {
                        let w = self.watching.get_or_insert_with(Vec::new);
                        for k in keys {
                            // A key watched again keeps its first start.
                            if !w.iter().any(|(w, _)| *w == k) {
                                w.push((k, i));
                            }
                        }
                        Ok(Value::Ok)
                    }
                    Err(e) => Err(e),
                }
            }
            Command::Unwatch => {
                self.watching = None;
                Ok(Value::Ok)
            }
            Command::Hello { .. } => Err(KvError::Internal("HELLO handled above".into())),
            Command::Backup => {
                self.flush_pending(pending, out).await;
                match self.node.backup().await {
                    Ok((path, _)) => {
                        self.stream = Some(path);
                        return;
                    }
                    Err(e) => Err(e),
                }
            }
            Command::Admin(a) => {
                self.flush_pending(pending, out).await;
                self.node.admin(a).await
            }
            Command::Write(w) => return pending.push(Pending::Write(w, v3)),
            Command::Read(r) => {
                // Reads observe every earlier command of this connection.
                self.flush_pending(pending, out).await;
                let r = self.node.read_limited(&r, self.cfg.output_limit).await;
                if matches!(r, Err(KvError::ReplyTooLarge { .. })) {
                    self.close = true;
                }
                if is_large(&r) {
                    // Encoding (and freeing) a reply of many elements takes
                    // long: off the thread that runs Raft. Nothing is
                    // pending (sent above), so the order holds.
                    let mut buf = std::mem::take(out);
                    let v3 = self.resp3;
                    match tokio::task::spawn_blocking(move || {
                        encode_reply_as(&mut buf, &r, v3);
                        buf
                    })
                    .await
                    {
                        Ok(buf) => *out = buf,
                        Err(e) => {
                            tracing::error!(error = %e, "encoding a reply failed");
                            self.close = true;
                        }
                    }
                    return;
                }
                r
            }
            Command::Auth(..) => Err(KvError::Internal("AUTH handled above".into())),
        };
        pending.push(now(r));
    }

    /// Inside MULTI: queues the command (`+QUEUED`), or answers it now
    /// (a nested MULTI, WATCH, a command a transaction cannot hold);
    /// `None`: run it below (EXEC, DISCARD, QUIT, RESET).
    fn queue(&mut self, cmd: Queued) -> Option<Reply> {
        let q = self.multi.as_mut()?;
        match cmd {
            Queued::Tx(c) => {
                q.push(c);
                Some(Ok(Value::Status("QUEUED".into())))
            }
            Queued::PassThrough => None,
            Queued::Nested => Some(Err(KvError::Tx("MULTI calls can not be nested".into()))),
            Queued::Watch => Some(Err(KvError::Tx("WATCH inside MULTI is not allowed".into()))),
            Queued::NotAllowed => {
                self.multi_failed = true;
                Some(Err(KvError::Tx(
                    "Command not allowed inside a transaction".into(),
                )))
            }
        }
    }

    /// HELLO: authenticates (with AUTH), switches protocol, names the
    /// client, and describes the server.
    fn hello(
        &mut self,
        proto: Option<i64>,
        auth: Option<(Vec<u8>, Vec<u8>)>,
        setname: Option<Vec<u8>>,
    ) -> Reply {
        if let Some(p) = proto {
            if p != 2 && p != 3 {
                return Err(KvError::NoProto);
            }
        }
        if let Some((user, pw)) = auth {
            match &self.cfg.password {
                // No password: the default user takes any (as Redis's
                // `nopass` default user).
                None if user == b"default" => {}
                None => return Err(KvError::WrongPassword),
                Some(p) if user == b"default" && password_matches(p, &pw) => self.authed = true,
                Some(_) => return Err(KvError::WrongPassword),
            }
        } else if !self.authed {
            return Err(KvError::HelloAuthRequired);
        }
        if let Some(n) = &setname {
            if !valid_client_name(n) {
                return Err(KvError::BadClientName);
            }
        }
        if let Some(p) = proto {
            self.resp3 = p == 3;
        }
        let resp = if self.resp3 { 3 } else { 2 };
        self.with(|c| {
            c.resp = resp;
            if let Some(n) = setname {
                c.name = n;
            }
        });
        let t = Value::text;
        Ok(Value::Map(vec![
            (t("server"), t("redis")),
            (t("version"), t(crate::command::REDIS_VERSION)),
            (t("proto"), Value::Int(i64::from(resp))),
            (t("id"), Value::Int(self.id as i64)),
            (t("mode"), t("standalone")),
            (t("role"), t("master")),
            (t("modules"), Value::List(Vec::new())),
            (t("raft_kv_version"), t(env!("CARGO_PKG_VERSION"))),
        ]))
    }

    /// CLIENT subcommands.
    fn client(&mut self, c: ClientCmd) -> Reply {
        let id = self.id;
        match c {
            ClientCmd::SetName(n) => {
                if !valid_client_name(&n) {
                    return Err(KvError::BadClientName);
                }
                self.with(|c| c.name = n);
                Ok(Value::Ok)
            }
            ClientCmd::GetName => {
                let n = self.with(|c| c.name.clone());
                Ok(if n.is_empty() {
                    Value::Nil
                } else {
                    Value::Bulk(n)
                })
            }
            ClientCmd::Id => Ok(Value::Int(id as i64)),
            ClientCmd::SetInfo { lib_name, value } => {
                if !valid_client_name(&value) {
                    return Err(KvError::Other(
                        "lib-name or lib-ver cannot contain spaces, newlines or special characters."
                            .into(),
                    ));
                }
                self.with(|c| {
                    if lib_name {
                        c.lib_name = value;
                    } else {
                        c.lib_ver = value;
                    }
                });
                Ok(Value::Ok)
            }
            ClientCmd::Info => Ok(Value::Verbatim(self.with(|c| c.line(id)))),
            ClientCmd::List(ids) => {
                let text: String = self
                    .me
                    .clients
                    .all()
                    .into_iter()
                    .filter(|(i, _)| ids.is_empty() || ids.contains(i))
                    .map(|(i, c)| entry_lock(&c).line(i))
                    .collect();
                Ok(Value::Verbatim(text))
            }
            ClientCmd::Kill {
                old_form,
                id: fid,
                addr,
                laddr,
                skip_me,
            } => {
                let mut killed = 0;
                for (i, c) in self.me.clients.all() {
                    let c = entry_lock(&c);
                    if (skip_me && i == id)
                        || fid.is_some_and(|f| f != i)
                        || addr.as_ref().is_some_and(|a| *a != c.addr)
                        || laddr.as_ref().is_some_and(|a| *a != c.laddr)
                    {
                        continue;
                    }
                    c.kill.notify_one();
                    killed += 1;
                }
                if old_form {
                    if killed == 0 {
                        Err(KvError::NoSuchClient)
                    } else {
                        Ok(Value::Ok)
                    }
                } else {
                    Ok(Value::Int(killed))
                }
            }
            ClientCmd::NoOp => Ok(Value::Ok),
        }
    }
}

async fn connection<S: ClientIo>(
    mut sock: S,
    node: &KvNode,
    cfg: &ClientConfig,
    metrics: &Metrics,
    mut stop: tokio::sync::watch::Receiver<bool>,
    me: &Me,
) -> std::io::Result<()> {
    let mut session = Session {
        node,
        cfg,
        metrics,
        authed: cfg.password.is_none(),
        stream: None,
        close: false,
        resp3: false,
        id: me.id,
        me,
        multi: None,
        multi_failed: false,
        watching: None,
    };
    let auth_deadline = tokio::time::Instant::now() + cfg.auth_timeout;
    let mut parser = RequestParser::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut pos = 0;
    // After a streamed reply, requests already buffered run before reading.
    let mut resume = false;
    loop {
        if !resume {
            if pos == buf.len() {
                // Nothing left over: an idle client holds no buffer.
                buf = Vec::new();
            } else {
                // The front of a line the parser needs whole: keep it.
                buf.drain(..pos);
            }
            pos = 0;
            if *stop.borrow() {
                return Ok(());
            }
            // An unauthenticated client gets a short deadline, whatever
            // the idle timeout: it cannot hold a place for long.
            let limit = if session.authed {
                cfg.idle_timeout
            } else {
                let left = auth_deadline.saturating_duration_since(tokio::time::Instant::now());
                Some(cfg.idle_timeout.map_or(left, |t| t.min(left)))
            };
            let n = tokio::select! {
                biased;
                r = within(limit, sock.fill(&mut buf)) => match r {
                    Some(r) => r?,
                    None => return Ok(()),
                },
                // CLIENT KILL, or the server stopping (which signals every
                // connection this way: one shared signal would make every
                // connection's every read take a shared lock).
                _ = me.kill.notified() => return Ok(()),
            };
            if n == 0 {
                return Ok(());
            }
        }
        resume = false;
        let mut out = Vec::new();
        let mut pending: Vec<Pending> = Vec::new();
        let mut close = false;
        loop {
            let limits = if session.authed {
                Limits::default()
            } else {
                Limits::unauthenticated()
            };
            match parser.next(&buf, &mut pos, &limits) {
                Ok(Some(args)) => {
                    if args.is_empty() {
                        continue;
                    }
                    session.execute(args, &mut pending, &mut out).await;
                    if session.stream.is_some() || session.close {
                        break;
                    }
                    if out.len() >= WRITE_CHUNK {
                        write_bounded(&mut sock, &out, cfg.write_timeout, &mut stop).await?;
                        out.clear();
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    session.flush_pending(&mut pending, &mut out).await;
                    error_line(&mut out, &format!("ERR {e}"));
                    metrics.command_error_code("ERR");
                    close = true;
                    break;
                }
            }
        }
        session.flush_pending(&mut pending, &mut out).await;
        write_bounded(&mut sock, &out, cfg.write_timeout, &mut stop).await?;
        drop(out);
        if let Some(path) = session.stream.take() {
            let sent = send_file(&mut sock, &path, cfg.write_timeout, &mut stop).await;
            let _ = tokio::fs::remove_file(&path).await;
            sent?;
            resume = pos < buf.len();
        }
        if close || session.close {
            let _ = sock.shutdown().await;
            return Ok(());
        }
    }
}

/// `f`, unless `limit` passes first (`None`).
async fn within<F: Future>(limit: Option<Duration>, f: F) -> Option<F::Output> {
    match limit {
        Some(t) => tokio::time::timeout(t, f).await.ok(),
        None => Some(f.await),
    }
}

/// Writes `data`, unless the client takes none of it for `timeout`, or the
/// server is stopping and [`STOP_WRITE_GRACE`] has passed: then the
/// connection ends (a client that does not read cannot pin memory, a file,
/// or the shutdown).
async fn write_bounded<S: AsyncWrite + Unpin>(
    sock: &mut S,
    data: &[u8],
    timeout: Duration,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut at = 0;
    while at < data.len() {
        let end = (at + WRITE_CHUNK).min(data.len());
        let write = tokio::time::timeout(timeout, sock.write_all(&data[at..end]));
        let give_up = async {
            stopping(stop).await;
            tokio::time::sleep(STOP_WRITE_GRACE).await;
        };
        tokio::select! {
            biased;
            r = write => r.map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "the client does not read its replies")
            })??,
            _ = give_up => return Err(std::io::Error::other("shutting down")),
        }
        at = end;
    }
    Ok(())
}

/// Sends a file as one bulk reply, streamed (a backup can be larger than
/// memory), each piece bounded as [`write_bounded`].
async fn send_file<S: AsyncWrite + Unpin>(
    sock: &mut S,
    path: &std::path::Path,
    timeout: Duration,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut f = tokio::fs::File::open(path).await?;
    let len = f.metadata().await?.len();
    write_bounded(sock, format!("${len}\r\n").as_bytes(), timeout, stop).await?;
    let mut piece = vec![0u8; WRITE_CHUNK];
    let mut copied = 0u64;
    loop {
        let n = f.read(&mut piece).await?;
        if n == 0 {
            break;
        }
        write_bounded(sock, &piece[..n], timeout, stop).await?;
        copied += n as u64;
    }
    if copied != len {
        return Err(std::io::Error::other(
            "the backup file changed while it was sent",
        ));
    }
    write_bounded(sock, b"\r\n", timeout, stop).await
}

/// TLS for the client port from PEM files: the server's certificate chain
/// and key, and optionally a CA whose certificates clients must present.
pub fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: Option<&std::path::Path>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let bad = |p: &std::path::Path, e: String| format!("{}: {e}", p.display());
    let chain = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad(cert, "no certificate in file".into()));
    }
    let key_der =
        PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| bad(key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&read(ca)?) {
                let c = c.map_err(|e| bad(ca, e.to_string()))?;
                roots.add(c).map_err(|e| bad(ca, e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(bad(ca, "no certificate in file".into()));
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| bad(ca, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let cfg = builder
        .with_single_cert(chain, key_der)
        .map_err(|e| format!("{} / {}: {e}", cert.display(), key.display()))?;
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply of many elements is encoded off the runtime's thread.
    #[test]
    fn replies_of_many_elements_are_large() {
        let bulk = |n: usize| {
            (0..n)
                .map(|_| Value::Bulk(b"k".to_vec()))
                .collect::<Vec<_>>()
        };
        assert!(!is_large(&Ok(Value::List(bulk(LARGE_REPLY)))));
        assert!(is_large(&Ok(Value::List(bulk(LARGE_REPLY + 1)))));
        assert!(is_large(&Ok(Value::Set(bulk(LARGE_REPLY + 1)))));
        assert!(is_large(&Ok(Value::Pairs(bulk(LARGE_REPLY + 1)))));
        assert!(is_large(&Ok(Value::Array(vec![None; LARGE_REPLY + 1]))));
        assert!(!is_large(&Ok(Value::Bulk(vec![0; 1 << 20]))));
        assert!(!is_large(&Err(KvError::NoLeader)));
    }
}
