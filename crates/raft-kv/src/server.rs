//! The Redis-protocol server: one task per client connection, pipelined
//! requests answered in order. Each request is parsed once into a
//! [`Command`]; consecutive writes go to the node together.

use crate::command::{Command, Value, WriteCmd};
use crate::error::{KvError, Reply};
use crate::node::KvNode;
use crate::resp::{encode_reply, error_line, parse_command, Limits};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Accepts clients until the task is aborted. With a `password`, clients
/// must AUTH first.
pub async fn serve(listener: TcpListener, node: Arc<KvNode>, password: Option<String>) {
    let password: Arc<Option<String>> = Arc::new(password);
    loop {
        match listener.accept().await {
            Ok((sock, peer)) => {
                let _ = sock.set_nodelay(true);
                let (node, password) = (node.clone(), password.clone());
                tokio::spawn(async move {
                    if let Err(e) = connection(sock, node, &password).await {
                        tracing::debug!(%peer, error = %e, "client connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// A reply in a pipeline: known now, or a write not yet sent.
enum Pending {
    Now(Reply),
    Write(WriteCmd),
}

/// Sends the pipeline's queued writes as one batch and encodes every
/// queued reply, in order.
async fn flush_pending(node: &KvNode, pending: &mut Vec<Pending>, out: &mut Vec<u8>) {
    let writes: Vec<WriteCmd> = pending
        .iter_mut()
        .filter_map(|r| match r {
            Pending::Write(c) => Some(std::mem::replace(c, WriteCmd::Del(Vec::new()))),
            Pending::Now(_) => None,
        })
        .collect();
    let mut replies = node.write(writes).await.into_iter();
    for r in pending.drain(..) {
        match r {
            Pending::Now(r) => encode_reply(out, &r),
            Pending::Write(_) => encode_reply(
                out,
                &replies
                    .next()
                    .unwrap_or_else(|| Err(KvError::Internal("lost a reply".into()))),
            ),
        }
    }
}

/// Per-connection state.
struct Session<'a> {
    node: &'a KvNode,
    password: &'a Option<String>,
    authed: bool,
    /// A backup file to stream as the next reply, then remove.
    stream: Option<std::path::PathBuf>,
}

impl Session<'_> {
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
        let is_auth = name == b"AUTH";
        if !is_auth && !self.authed {
            return pending.push(Pending::Now(Err(KvError::AuthRequired)));
        }
        if !is_auth && name != b"INFO" {
            if let Some(why) = self.node.stopped() {
                return pending.push(Pending::Now(Err(KvError::Stopped(why))));
            }
        }
        let cmd = match Command::parse(args) {
            Ok(c) => c,
            Err(e) => return pending.push(Pending::Now(Err(e))),
        };
        if let Command::Auth(pw) = &cmd {
            let r = match self.password {
                None => Err(KvError::NoPasswordSet),
                Some(p) if p.as_bytes() == pw.as_slice() => {
                    self.authed = true;
                    Ok(Value::Ok)
                }
                Some(_) => Err(KvError::WrongPassword),
            };
            return pending.push(Pending::Now(r));
        }
        let r = match cmd {
            Command::Ping(None) => Ok(Value::Status("PONG".into())),
            Command::Ping(Some(m)) | Command::Echo(m) => Ok(Value::Bulk(m)),
            Command::CommandList => Ok(Value::Array(Vec::new())),
            Command::Info => Ok(Value::Bulk(self.node.info().into_bytes())),
            Command::Backup => {
                flush_pending(self.node, pending, out).await;
                match self.node.backup().await {
                    Ok((path, _)) => {
                        self.stream = Some(path);
                        return;
                    }
                    Err(e) => Err(e),
                }
            }
            Command::Admin(a) => {
                flush_pending(self.node, pending, out).await;
                self.node.admin(a).await
            }
            Command::Write(w) => return pending.push(Pending::Write(w)),
            Command::Read(r) => {
                // Reads observe every earlier command of this connection.
                flush_pending(self.node, pending, out).await;
                self.node.read(&r).await
            }
            Command::Auth(_) => Err(KvError::Internal("AUTH handled above".into())),
        };
        pending.push(Pending::Now(r));
    }
}

async fn connection(
    mut sock: TcpStream,
    node: Arc<KvNode>,
    password: &Option<String>,
) -> std::io::Result<()> {
    let limits = Limits::default();
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut session = Session {
        node: &node,
        password,
        authed: password.is_none(),
        stream: None,
    };
    let mut chunk = vec![0u8; 64 * 1024];
    // After a backup reply, requests already buffered run before reading more.
    let mut buffered = false;
    loop {
        if !buffered {
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        buffered = false;
        let mut out = Vec::new();
        let mut pending: Vec<Pending> = Vec::new();
        let mut consumed = 0;
        let mut close = false;
        loop {
            match parse_command(&buf[consumed..], &limits) {
                Ok(Some((args, used))) => {
                    consumed += used;
                    if args.is_empty() {
                        continue;
                    }
                    session.execute(args, &mut pending, &mut out).await;
                    if session.stream.is_some() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    flush_pending(&node, &mut pending, &mut out).await;
                    error_line(&mut out, &format!("ERR {e}"));
                    close = true;
                    break;
                }
            }
        }
        buf.drain(..consumed);
        flush_pending(&node, &mut pending, &mut out).await;
        sock.write_all(&out).await?;
        if let Some(path) = session.stream.take() {
            let sent = send_file(&mut sock, &path).await;
            let _ = tokio::fs::remove_file(&path).await;
            sent?;
            buffered = !buf.is_empty();
        }
        if close {
            return Ok(());
        }
    }
}

/// Sends a file as one bulk reply, streamed (a backup can be larger than
/// memory).
async fn send_file(sock: &mut TcpStream, path: &std::path::Path) -> std::io::Result<()> {
    let mut f = tokio::fs::File::open(path).await?;
    let len = f.metadata().await?.len();
    sock.write_all(format!("${len}\r\n").as_bytes()).await?;
    let copied = tokio::io::copy(&mut f, sock).await?;
    if copied != len {
        return Err(std::io::Error::other(
            "the backup file changed while it was sent",
        ));
    }
    sock.write_all(b"\r\n").await
}
