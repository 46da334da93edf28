//! The Redis-protocol server: one task per client connection, pipelined
//! requests answered in order, commands mapped onto the replicated store.

use crate::command::{Outcome, SetCond, WriteCmd};
use crate::node::KvNode;
use crate::resp::{encode_outcome, parse_command, simple, Limits};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Accepts clients until the task is aborted.
pub async fn serve(listener: TcpListener, node: Arc<KvNode>) {
    loop {
        match listener.accept().await {
            Ok((sock, peer)) => {
                let _ = sock.set_nodelay(true);
                let node = node.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(sock, node).await {
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

enum Reply {
    Now(Vec<u8>),
    /// A write not yet started: consecutive ones are proposed together.
    Write(WriteCmd),
}

async fn flush_pending(node: &KvNode, pending: &mut Vec<Reply>, out: &mut Vec<u8>) {
    let writes: Vec<WriteCmd> = pending
        .iter_mut()
        .filter_map(|r| match r {
            Reply::Write(c) => Some(std::mem::replace(c, WriteCmd::Del(Vec::new()))),
            _ => None,
        })
        .collect();
    let mut tickets = node.begin_writes(writes).await.into_iter();
    for r in pending.drain(..) {
        match r {
            Reply::Now(b) => out.extend_from_slice(&b),
            Reply::Write(_) => match tickets.next() {
                Some(t) => encode_outcome(out, &node.finish(t).await),
                None => encode_outcome(
                    out,
                    &Outcome::Error("ERR internal: lost a write ticket".into()),
                ),
            },
        }
    }
}

async fn connection(mut sock: TcpStream, node: Arc<KvNode>) -> std::io::Result<()> {
    let limits = Limits::default();
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut authed = node.config().password.is_none();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut out = Vec::new();
        let mut pending: Vec<Reply> = Vec::new();
        let mut consumed = 0;
        let mut close = false;
        loop {
            match parse_command(&buf[consumed..], &limits) {
                Ok(Some((args, used))) => {
                    consumed += used;
                    if args.is_empty() {
                        continue;
                    }
                    let r = execute(&node, &args, &mut authed, &mut pending, &mut out).await;
                    pending.push(r);
                }
                Ok(None) => break,
                Err(e) => {
                    flush_pending(&node, &mut pending, &mut out).await;
                    encode_outcome(&mut out, &Outcome::Error(format!("ERR {e}")));
                    close = true;
                    break;
                }
            }
        }
        buf.drain(..consumed);
        flush_pending(&node, &mut pending, &mut out).await;
        sock.write_all(&out).await?;
        if close {
            return Ok(());
        }
    }
}

fn err(s: &str) -> Reply {
    let mut b = Vec::new();
    encode_outcome(&mut b, &Outcome::Error(s.to_string()));
    Reply::Now(b)
}

fn now(o: Outcome) -> Reply {
    let mut b = Vec::new();
    encode_outcome(&mut b, &o);
    Reply::Now(b)
}

fn arity(name: &str) -> Reply {
    err(&format!(
        "ERR wrong number of arguments for '{}' command",
        name.to_ascii_lowercase()
    ))
}

fn parse_i64(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

async fn execute(
    node: &KvNode,
    args: &[Vec<u8>],
    authed: &mut bool,
    pending: &mut Vec<Reply>,
    out: &mut Vec<u8>,
) -> Reply {
    let name = String::from_utf8_lossy(&args[0]).to_ascii_uppercase();
    let n = args.len();
    if name == "AUTH" {
        let pw = match n {
            2 => &args[1],
            3 => &args[2],
            _ => return arity(&name),
        };
        return match &node.config().password {
            None => err("ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?"),
            Some(p) if p.as_bytes() == pw.as_slice() => {
                *authed = true;
                now(Outcome::Ok)
            }
            Some(_) => err("WRONGPASS invalid username-password pair or user is disabled."),
        };
    }
    if !*authed {
        return err("NOAUTH Authentication required.");
    }
    // A stopped node says so to every command but INFO (which shows why).
    if name != "INFO" {
        if let Some(why) = node.stopped() {
            return err(&format!(
                "ERR this node has stopped ({why}); it serves nothing until it is restarted"
            ));
        }
    }
    let write = |cmd: WriteCmd| async move { Reply::Write(cmd) };
    match (name.as_str(), n) {
        ("PING", 1) => {
            let mut b = Vec::new();
            simple(&mut b, "PONG");
            Reply::Now(b)
        }
        ("PING", 2) | ("ECHO", 2) => now(Outcome::Bulk(args[1].clone())),
        ("PING", _) | ("ECHO", _) => arity(&name),
        ("COMMAND", _) => now(Outcome::Array(vec![])),
        ("SET", 3..) => {
            let cond = match args[3..]
                .iter()
                .map(|a| String::from_utf8_lossy(a).to_ascii_uppercase())
                .collect::<Vec<_>>()
                .as_slice()
            {
                [] => SetCond::Always,
                [x] if x == "NX" => SetCond::IfAbsent,
                [x] if x == "XX" => SetCond::IfPresent,
                _ => return err("ERR syntax error"),
            };
            write(WriteCmd::Set {
                key: args[1].clone(),
                value: args[2].clone(),
                cond,
            })
            .await
        }
        ("DEL", 2..) => write(WriteCmd::Del(args[1..].to_vec())).await,
        ("MSET", _) if n >= 3 && n % 2 == 1 => {
            write(WriteCmd::MSet(
                args[1..]
                    .chunks(2)
                    .map(|p| (p[0].clone(), p[1].clone()))
                    .collect(),
            ))
            .await
        }
        ("INCR", 2) => write(WriteCmd::IncrBy(args[1].clone(), 1)).await,
        ("DECR", 2) => write(WriteCmd::IncrBy(args[1].clone(), -1)).await,
        ("INCRBY", 3) | ("DECRBY", 3) => match parse_i64(&args[2]) {
            Some(d) if name == "INCRBY" => write(WriteCmd::IncrBy(args[1].clone(), d)).await,
            Some(d) => match d.checked_neg() {
                Some(nd) => write(WriteCmd::IncrBy(args[1].clone(), nd)).await,
                None => err("ERR decrement would overflow"),
            },
            None => err("ERR value is not an integer or out of range"),
        },
        ("CAS", 4) => {
            write(WriteCmd::Cas {
                key: args[1].clone(),
                expected: args[2].clone(),
                new: args[3].clone(),
            })
            .await
        }
        ("GET", 2) | ("MGET", 2..) | ("EXISTS", 2..) | ("STRLEN", 2) | ("DBSIZE", 1) => {
            // Reads observe every earlier command of this connection.
            flush_pending(node, pending, out).await;
            if let Err(o) = node.read_barrier().await {
                return now(o);
            }
            now(read(node, &name, &args[1..]).await)
        }
        ("INFO", 1 | 2) => now(Outcome::Bulk(node.info().into_bytes())),
        (
            "SET" | "DEL" | "MSET" | "INCR" | "DECR" | "INCRBY" | "DECRBY" | "CAS" | "GET" | "MGET"
            | "EXISTS" | "STRLEN" | "DBSIZE" | "INFO",
            _,
        ) => arity(&name),
        _ => {
            let shown: String = args[1..]
                .iter()
                .take(8)
                .map(|a| format!("'{}' ", String::from_utf8_lossy(a)))
                .collect();
            err(&format!(
                "ERR unknown command '{}', with args beginning with: {shown}",
                String::from_utf8_lossy(&args[0])
            ))
        }
    }
}

/// Answers a read from one applied state: all the keys of one command (MGET,
/// EXISTS) and DBSIZE come from the same view, never half of a batch. While
/// a batch is being applied the task waits without holding its thread; a
/// batch that never finishes (a hung disk) gets `-TRYAGAIN` after 5 s.
async fn read(node: &KvNode, name: &str, keys: &[Vec<u8>]) -> Outcome {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut tries = 0u32;
    loop {
        if let Some(o) = try_read(node, name, keys) {
            return o;
        }
        if tokio::time::Instant::now() >= deadline {
            return Outcome::Error("TRYAGAIN the state machine is busy; try again".into());
        }
        tries += 1;
        if tries < 16 {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
}

fn try_read(node: &KvNode, name: &str, keys: &[Vec<u8>]) -> Option<Outcome> {
    let res: Option<anyhow::Result<Outcome>> = node.state_machine().try_read_view(|v| {
        Ok(match name {
            "GET" => v.get(&keys[0])?.map_or(Outcome::Nil, Outcome::Bulk),
            "MGET" => Outcome::Array(keys.iter().map(|k| v.get(k)).collect::<Result<_, _>>()?),
            "EXISTS" => {
                let mut c = 0;
                for k in keys {
                    if v.exists(k)? {
                        c += 1;
                    }
                }
                Outcome::Int(c)
            }
            "STRLEN" => Outcome::Int(v.get(&keys[0])?.map_or(0, |v| v.len() as i64)),
            _ => Outcome::Int(v.dbsize()? as i64),
        })
    });
    res.map(|r| r.unwrap_or_else(|e| Outcome::Error(format!("ERR storage: {e}"))))
}
